"""Core merge benchmark (issue 2): the torch reference path against the straightforward baseline.

In one run: ``unify`` of N tasks and ``add_task`` as the N-th task (on top of a session of N-1),
on a synthetic state dict of P float32 parameters in T tensors, each timed against
``benchmarks/baseline.py`` (stack all tasks per tensor, bool masks, materialise every earlier
expert). Prints a markdown table with time, speed-up and peak memory above the inputs, and checks
that both give the same masks and ``u``.

    python benchmarks/bench_core.py                       # 11 tasks x 20M params, ~100 tensors
    python benchmarks/bench_core.py --params 2e6 --json out.json

Peak memory is the process's high-water mark (VmHWM, reset before each step) minus the resident
size before it: what the step itself allocates on top of its inputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.baseline import baseline_add_task, baseline_unify  # noqa: E402
from benchmarks.memory import trim_heap  # noqa: E402

from condu_merge import add_task, unify  # noqa: E402
from condu_merge.backends import TorchBackend, available_backends  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn, repeat: int):
    """Best-of-``repeat`` wall time and the peak bytes allocated above the resident set before."""
    best, peak = float("inf"), 0
    out = None
    for _ in range(repeat):
        out = None
        gc.collect()
        trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        before = _status("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        peak = max(peak, _status("VmHWM") - before)
    return out, best, peak


def make_deltas(n_tasks: int, n_params: int, n_tensors: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    per = n_params // n_tensors
    sizes = [per] * n_tensors
    sizes[-1] += n_params - per * n_tensors
    deltas = []
    for _ in range(n_tasks):
        d = {}
        for j, s in enumerate(sizes):
            x = torch.randn(s, generator=g) * 1e-3
            x[torch.rand(s, generator=g) < 0.05] = 0  # some exact zeros, as in real deltas
            d[f"layer{j}.weight"] = x
        deltas.append(d)
    return deltas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=11)
    ap.add_argument("--params", type=float, default=20e6)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    n_params = int(args.params)
    torch.set_num_threads(os.cpu_count() or 1)
    deltas = make_deltas(args.tasks, n_params, args.tensors)
    in_bytes = sum(t.numel() * t.element_size() for d in deltas for t in d.values())
    mib = 1 / 2**20
    torch_be = TorchBackend()

    rows = []
    # ---------------- unify of all tasks
    (bu, bm, _, _), t_base, p_base = measure(lambda: baseline_unify(deltas), args.repeat)
    (lu, lt), t_lib, p_lib = measure(lambda: unify(deltas, backend=torch_be), args.repeat)
    for k in lu:
        assert torch.equal(lu[k], bu[k]), k
        assert all(torch.equal(lt[i].mask(k), bm[i][k]) for i in range(args.tasks)), k
    out_bytes = sum(t.numel() * t.element_size() for t in lu.values()) + sum(tr.nbytes for tr in lt)
    rows.append(("unify", args.tasks, t_base, t_lib, p_base, p_lib, out_bytes))
    del bu, bm, lu, lt
    gc.collect()

    # ---------------- add_task as the last task, on a session of the others
    u0, t0 = unify(deltas[:-1], backend=torch_be)
    bool_masks = [{k: tr.mask(k) for k in u0} for tr in t0]
    lams = [tr.rescaler for tr in t0]
    (bu, bm, _, _), t_base, p_base = measure(lambda: baseline_add_task(u0, bool_masks, lams, deltas[-1]), args.repeat)
    del bool_masks
    (lu, lt), t_lib, p_lib = measure(lambda: add_task(u0, t0, deltas[-1], backend=torch_be), args.repeat)
    # masks may differ only where the election sum is within rounding of zero
    mismatch = sum(int((lt[i].mask(k) != bm[i][k]).sum()) for i in range(args.tasks) for k in lu)
    out_bytes = sum(t.numel() * t.element_size() for t in lu.values()) + sum(tr.nbytes for tr in lt)
    rows.append(("add_task", args.tasks, t_base, t_lib, p_base, p_lib, out_bytes))

    print(f"\n## bench_core: {args.tasks} tasks x {n_params / 1e6:.1f}M float32 params in {args.tensors} tensors")
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"inputs {in_bytes * mib:.0f} MiB; backends available: {available_backends()}\n")
    print("| step | tasks | baseline s | torch path s | speed-up | baseline peak MiB | torch peak MiB | outputs MiB |")
    print("|---|---|---|---|---|---|---|---|")
    result = []
    for name, n, tb, tl, pb, pl, ob in rows:
        print(f"| {name} | {n} | {tb:.3f} | {tl:.3f} | {tb / tl:.2f}x | {pb * mib:.0f} | {pl * mib:.0f} | {ob * mib:.0f} |")
        result.append({"step": name, "tasks": n, "baseline_s": tb, "lib_s": tl, "speedup": tb / tl,
                       "baseline_peak_bytes": pb, "lib_peak_bytes": pl, "output_bytes": ob})
    print(f"\nadd_task mask bits differing from the baseline (near-zero election sums): {mismatch}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"params": n_params, "tensors": args.tensors, "tasks": args.tasks, "rows": result,
                       "mask_mismatch_bits": mismatch, "torch": torch.__version__}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
