"""Core merge benchmark: ``unify``, ``add_task`` and ``decouple_many`` through the public API on
every CPU backend, against the released code's algorithm and the copy bandwidth, in one run.

In one run: ``unify`` of N tasks, ``add_task`` as the N-th task (on top of a session of N-1) and
``decouple_many`` of the N experts, on a synthetic state dict of P float32 (``--dtype``) parameters in T
tensors. The baseline is ``benchmarks/baseline.py``, a faithful port of the released ConDU code
(stack per tensor, one pass per task, bool masks, every earlier expert materialised). The
memory floor of a step is its minimal traffic (each input byte read once, each output byte
written once) at the ``copy_`` bandwidth measured in the same run (1 GiB buffers, read + write
counted). A second floor adds what first-touching the step's fresh output pages costs on this
machine (``fault_cost``: a fill of new pages minus a fill of touched ones, measured in the same
run, split over the threads): every library step and the baseline return new tensors, and on a
VM a 4 KiB page fault with its zeroing can cost more than writing the page. Every measurement is repeated ``--repeat`` times, the variants interleaved (so a burst
of load from elsewhere hits all of them), and the best time of each is kept. Also checks that the
library's masks and ``u`` match the baseline's (bits may differ only where the election sum is
within rounding of zero: the released election is a float32 mean, the library's a float64 sum).

    python benchmarks/bench_core.py                       # 11 tasks x 20M params, 100 tensors
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

from benchmarks.baseline import baseline_add_task, baseline_unify
from benchmarks.memory import trim_heap
from condu_merge import add_task, unify
from condu_merge.backends import available_backends
from condu_merge.kernels import decouple_many


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


def make_deltas(n_tasks: int, n_params: int, n_tensors: int, seed: int = 0, dtype: torch.dtype = torch.float32):
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
            d[f"layer{j}.weight"] = x.to(dtype)
        deltas.append(d)
    return deltas


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of ``dst.copy_(src)`` on buffers larger than the caches (read + write counted), best of 3."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def fault_cost(nbytes: int = 1 << 28) -> float:
    """Seconds per byte that first-touching fresh pages adds to writing an output, best of 3:
    ``torch.empty(..).fill_`` after the heap was trimmed (new pages: a page fault and the kernel's
    zeroing per 4 KiB) minus ``fill_`` of pages already touched. A step that returns fresh tensors
    pays it on every output byte; ``copy_bandwidth`` (warm buffers) does not see it."""
    warm = torch.empty(nbytes // 4)
    warm.fill_(0)
    tw = tf = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        warm.fill_(1)
        tw = min(tw, time.perf_counter() - t0)
        trim_heap()
        t0 = time.perf_counter()
        fresh = torch.empty(nbytes // 4)
        fresh.fill_(1)
        tf = min(tf, time.perf_counter() - t0)
        del fresh
    return max(0.0, tf - tw) / nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=11)
    ap.add_argument("--params", type=float, default=20e6)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", default=None, help="comma list (default: torch, numba and native where available)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and numba threads (default: every core). 1 keeps an oversubscribed machine's "
        "thread hand-offs out of the comparison: the baseline's thousands of small torch ops "
        "each pay one when the cores are shared",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="the deltas' dtype")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    n, n_params = args.tasks, int(args.params)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if "numba" in available_backends():
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    backends = (
        args.backends.split(",")
        if args.backends
        else [b for b in ("torch", "numba", "native") if b in available_backends()]
    )
    dtype = getattr(torch, args.dtype)
    deltas = make_deltas(n, n_params, args.tensors, dtype=dtype)
    N = sum(t.numel() for t in deltas[0].values())
    mb = (N + 7) // 8  # one mask row
    es = torch.empty((), dtype=dtype).element_size()
    in_bytes = n * N * es
    traffic = {
        "unify": n * N * es + N * es + n * mb,  # n deltas in; u and n mask rows out
        "add_task": 2 * N * es + (n - 1) * mb + N * es + n * mb,  # u, delta, n-1 rows in; u, n rows out
        "decouple_many": N * es + n * mb + n * N * es,
    }  # u, n rows in; n experts out
    out_bytes = {"unify": N * es + n * mb, "add_task": N * es + n * mb, "decouple_many": n * N * es}
    mib = 1 / 2**20
    u0, t0 = unify(deltas[:-1], backend=backends[-1])
    lams = [tr.rescaler for tr in t0]
    u_n, t_n = unify(deltas, backend=backends[-1])

    def base_unify():
        return baseline_unify(deltas)

    bool_masks = [{k: tr.mask(k) for k in u0} for tr in t0]  # the released code's stored masks, outside the timing

    def base_add():
        return baseline_add_task(u0, bool_masks, lams, deltas[-1])

    steps = {
        "unify": {be: (lambda be=be: unify(deltas, backend=be)) for be in backends},
        "add_task": {be: (lambda be=be: add_task(u0, t0, deltas[-1], backend=be)) for be in backends},
        "decouple_many": {be: (lambda be=be: decouple_many(u_n, t_n, backend=be)) for be in backends},
    }
    if not args.no_baseline:
        steps["unify"]["baseline"] = base_unify
        steps["add_task"]["baseline"] = base_add
    for fns in steps.values():  # warm-up: compile (or load) every kernel once
        for name, fn in fns.items():
            if name != "baseline":
                fn()
    best: dict[tuple[str, str], float] = {}
    peak: dict[tuple[str, str], int] = {}
    copy_gbs = 0.0
    fault_s_per_byte = float("inf")
    outs = {}
    for _ in range(args.repeat):
        copy_gbs = max(copy_gbs, copy_bandwidth())
        fault_s_per_byte = min(fault_s_per_byte, fault_cost())
        for step, fns in steps.items():
            for name, fn in fns.items():
                out, sec, pk = measure(fn, 1)
                best[step, name] = min(best.get((step, name), float("inf")), sec)
                peak[step, name] = max(peak.get((step, name), 0), pk)
                if step != "decouple_many":
                    outs[step, name] = out
                del out
        copy_gbs = max(copy_gbs, copy_bandwidth())

    # the library agrees with the released algorithm (up to elections within rounding of zero)
    mismatch = {}
    if not args.no_baseline:
        for step in ("unify", "add_task"):
            bu, bm, _ = outs[step, "baseline"]
            lu, lt = outs[step, backends[-1]]
            mismatch[step] = sum(int((lt[i].mask(k) != bm[i][k]).sum()) for i in range(n) for k in lu)
            mismatch[step + " u"] = sum(int((lu[k] != bu[k]).sum()) for k in lu)

    print(f"\n## bench_core: {n} tasks x {n_params / 1e6:.1f}M {args.dtype} params in {args.tensors} tensors")
    print(
        f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"{threads} thread(s); inputs {in_bytes * mib:.0f} MiB; copy bandwidth {copy_gbs:.1f} GB/s (best of the run); "
        f"first touch of fresh output pages {fault_s_per_byte * 2**30:.3f} s per GiB (one thread); best of {args.repeat}\n"
    )
    print(
        "| step | backend | s | x released algorithm | memory floor s | % of copy bandwidth "
        "| floor + output page faults s | % of that | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    result = []
    for (step, name), sec in best.items():
        floor = traffic[step] / (copy_gbs * 1e9)
        # the outputs' first-touch cost, shared by the threads (faults on distinct pages run in parallel)
        ffloor = floor + out_bytes[step] * fault_s_per_byte / threads
        base = best.get((step, "baseline"))
        ratio = f"{base / sec:.1f}x" if base and name != "baseline" else "-"
        print(
            f"| {step} | {name} | {sec:.3f} | {ratio} | {floor:.3f} | {100 * floor / sec:.0f}% | {ffloor:.3f} "
            f"| {100 * ffloor / sec:.0f}% | {peak[step, name] * mib:.0f} |"
        )
        result.append(
            {
                "step": step,
                "backend": name,
                "seconds": sec,
                "x_baseline": (base / sec) if base else None,
                "floor_s": floor,
                "copy_fraction": floor / sec,
                "floor_with_faults_s": ffloor,
                "peak_bytes": peak[step, name],
            }
        )
    if mismatch:
        print(
            f"\nbits / u elements differing from the released algorithm (elections within rounding of zero): {mismatch}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "params": n_params,
                    "tensors": args.tensors,
                    "tasks": n,
                    "copy_GB_per_s": copy_gbs,
                    "fault_s_per_GiB": fault_s_per_byte * 2**30,
                    "rows": result,
                    "mismatch": mismatch,
                    "torch": torch.__version__,
                    "command": " ".join(["python"] + sys.argv),
                },
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
