"""Every strategy through ``condu-merge add-task --method`` on one model: time, peak memory, bytes.

In one run: a base and ``--tasks`` fine-tuned float32 safetensors checkpoints of ``--params``
parameters in ``--tensors`` equal tensors are written to ``--dir``; then for each method one
``python -m condu_merge add-task STORE --method M`` process per task (timed from the parent,
peak RSS of that child from ``wait4``), then ``export --task`` of the last task. Beside it, in
the same run, a process that only imports what add-task imports (``start``), so the merge's own
memory is the peak minus that. Streaming means the part above the imports stays a few times
the largest tensor whatever the number of tasks and tensors; the store's bytes are what the
method keeps (`inspect`).

    python benchmarks/bench_strategy_store.py --params 32e6 --tensors 16 --tasks 3 --dir /tmp/bss
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _run(argv: list[str]) -> tuple[float, float, str]:
    """``(seconds, peak RSS MiB of that child alone, "")`` of one ``python`` child (fork + exec + ``wait4``)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: exec python with stdout to a file
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.execve(sys.executable, [sys.executable, *argv], env)
    _, status, usage = os.wait4(pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv[:6])} failed (exit {os.waitstatus_to_exitcode(status)})")
    return dt, usage.ru_maxrss / 1024, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=32e6)
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/bench_strategy_store")
    ap.add_argument("--methods", default=None, help="comma-separated (default: condu and every registered rule)")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE", help="an option for one method")
    args = ap.parse_args()
    from condu_merge.safetensors_writer import StreamingSafetensorsWriter, TensorSpec
    from condu_merge.strategies.rule import available_rules

    methods = args.methods.split(",") if args.methods else ["condu", *available_rules()]
    sets: dict[str, list[str]] = {"dop": ["num_steps=20"]}  # 200 Adam steps per matrix is a training run
    for s in args.set:
        m, _, kv = s.partition(":")
        sets.setdefault(m, []).append(kv)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    n = int(args.params) // args.tensors
    side = int(n**0.5)
    shape = (side, n // side)
    names = [f"layer{i}.weight" for i in range(args.tensors)]
    g = torch.Generator().manual_seed(0)
    base = os.path.join(args.dir, "base.safetensors")
    specs = [TensorSpec(k, torch.float32, shape) for k in names]
    with StreamingSafetensorsWriter(base, specs) as w:
        for k in names:
            w.write(k, torch.randn(shape, generator=g))
        w.close()
    fts = []
    from safetensors import safe_open

    with safe_open(base, "pt") as b:
        for t in range(args.tasks):
            p = os.path.join(args.dir, f"ft{t}.safetensors")
            with StreamingSafetensorsWriter(p, specs) as w:
                for k in names:
                    w.write(k, b.get_tensor(k) + 0.01 * torch.randn(shape, generator=g))
                w.close()
            fts.append(p)
    largest = shape[0] * shape[1] * 4 / 2**20
    start = _run(
        ["-c", "import torch, condu_merge.cli, condu_merge.store, condu_merge.strategy_store, condu_merge.kernels"]
    )
    print(
        f"{len(names)} float32 tensors of {shape} ({args.params / 1e6:.0f}M params, {largest:.0f} MiB largest), "
        f"{args.tasks} tasks; start (imports only): {start[0]:.2f} s, {start[1]:.0f} MiB\n"
    )
    print(
        "| method | add-task s per task | peak RSS MiB (max) | above imports / largest tensor | store MiB | x one model | export s |"
    )
    print("|---|---|---|---|---|---|---|")
    model_mib = args.params * 4 / 2**20
    for m in methods:
        store = os.path.join(args.dir, f"store_{m}")
        times, peaks = [], []
        for t, ft in enumerate(fts):
            argv = ["-m", "condu_merge", "add-task", store, "--base", base, "--finetuned", ft, "--name", f"t{t}", "-q"]
            if t == 0:
                argv += ["--method", m] + [x for kv in sets.get(m, []) for x in ("--set", kv)]
            dt, rss, _ = _run(argv)
            times.append(dt)
            peaks.append(rss)
        out = os.path.join(args.dir, f"{m}.safetensors")
        dt_e, _, _ = _run(["-m", "condu_merge", "export", store, "--task", f"t{args.tasks - 1}", "-o", out, "-q"])
        os.unlink(out)
        with open(os.path.join(store, "manifest.json")) as fh:
            man = json.load(fh)
        mib = sum(int(f["bytes"]) for f in man["files"].values()) / 2**20
        above = (max(peaks) - start[1]) / largest
        print(
            f"| {m} | {' / '.join(f'{x:.2f}' for x in times)} | {max(peaks):.0f} | {above:.1f}x | "
            f"{mib:.0f} | {mib / model_mib:.2f} | {dt_e:.2f} |"
        )
        shutil.rmtree(store)


if __name__ == "__main__":
    main()
