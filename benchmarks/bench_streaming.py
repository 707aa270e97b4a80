"""Peak memory of streaming merges: N tasks of a model several times larger than the memory used.

Writes a base checkpoint and ``--tasks`` fine-tuned checkpoints (safetensors, generated tensor by
tensor), then, in a fresh subprocess, folds them one by one into a store with
``Store.add_task_from_checkpoints`` and exports one task's full model; reports the subprocess's
peak RSS (``ru_maxrss``) against the model size, the RSS right after imports (the baseline of the
same run), and the time per task.

    python benchmarks/bench_streaming.py --model-mb 2048 --tasks 5 --workdir /tmp/condu-bench

The eager alternative (load a base and a fine-tuned state dict, merge in memory) needs at least
3x the model size; the target here is a peak under half the model size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def generate(workdir: str, model_mb: int, tensor_mb: int, tasks: int, seed: int) -> dict:
    """Base + fine-tuned checkpoints, one tensor in memory at a time; ft_i = base + δ_i with δ_i
    sharing a component across tasks (so masks overlap as they do for real fine-tunes)."""
    import torch

    from condu_merge.safetensors_writer import StreamingSafetensorsWriter, TensorSpec

    numel = tensor_mb * 2**20 // 4
    n_tensors = max(1, model_mb // tensor_mb)
    specs = [TensorSpec(f"layer.{i}.weight", torch.float32, (numel // 1024, 1024)) for i in range(n_tensors)]
    specs.append(TensorSpec("norm.bias", torch.float32, (1024,)))
    specs.append(TensorSpec("position_ids", torch.int64, (1, 512)))  # carried unchanged (not float)
    paths = {"base": os.path.join(workdir, "base.safetensors")}
    for t in range(tasks):
        paths[f"task{t}"] = os.path.join(workdir, f"task{t}.safetensors")
    writers = {k: StreamingSafetensorsWriter(p, specs) for k, p in paths.items()}
    for i, s in enumerate(specs):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        if s.dtype == torch.int64:
            t = torch.arange(512).reshape(1, 512)
            for w in writers.values():
                w.write(s.name, t)
            continue
        base = torch.randn(s.shape, generator=g)
        writers["base"].write(s.name, base)
        shared = torch.randn(s.shape, generator=g)
        for t in range(tasks):
            ft = torch.randn(s.shape, generator=g)
            ft.add_(shared, alpha=0.5).mul_(0.01).add_(base)
            writers[f"task{t}"].write(s.name, ft)
            del ft
    for w in writers.values():
        w.close()
    return {"paths": paths, "tensors": len(specs), "model_bytes": os.path.getsize(paths["base"])}


def merge(workdir: str, tasks: int, backend: str) -> dict:
    """Runs in a fresh process: everything it allocates counts in its peak RSS."""
    import torch

    from condu_merge.store import Store

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    after_import = _current_rss_mb()
    store = os.path.join(workdir, "store")
    base = os.path.join(workdir, "base.safetensors")
    times = []
    rss_after_task = []
    for t in range(tasks):
        t0 = time.perf_counter()
        with Store(store, verify=False) as st:
            st.add_task_from_checkpoints(
                f"task{t}", base, os.path.join(workdir, f"task{t}.safetensors"), backend=backend
            )
        times.append(time.perf_counter() - t0)
        rss_after_task.append(_rss_mb())
    t0 = time.perf_counter()
    from condu_merge.cli import main

    rc = main(["export", store, "--task", "task0", "-o", os.path.join(workdir, "task0.export.safetensors"), "-q"])
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Store(store, verify=True) as st:
        storage = st.storage()
    verify_s = time.perf_counter() - t0
    return {
        "rss_after_import_mb": after_import,
        "peak_rss_after_each_task_mb": rss_after_task,
        "peak_rss_mb": _rss_mb(),
        "seconds_per_task": times,
        "export_seconds": export_s,
        "export_rc": rc,
        "open_with_verify_seconds": verify_s,
        "storage": storage,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-mb", type=int, default=2048)
    ap.add_argument("--tensor-mb", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--workdir", default="/tmp/condu-bench-streaming")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and store")
    ap.add_argument("--_merge", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._merge:
        print(json.dumps(merge(args.workdir, args.tasks, args.backend)))
        return
    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    t0 = time.perf_counter()
    gen = generate(args.workdir, args.model_mb, args.tensor_mb, args.tasks, args.seed)
    os.sync()  # write back the generated checkpoints now, so the merge's fsyncs do not pay for them
    gen_s = time.perf_counter() - t0
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_merge",
        "--workdir",
        args.workdir,
        "--tasks",
        str(args.tasks),
        "--backend",
        args.backend,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"merge subprocess failed:\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    model_mb = gen["model_bytes"] / 2**20
    report = {
        "model_mb": round(model_mb, 1),
        "tasks": args.tasks,
        "checkpoints_on_disk_mb": round(model_mb * (args.tasks + 1), 1),
        "generate_seconds": round(gen_s, 1),
        **res,
        "peak_rss_over_model": res["peak_rss_mb"] / model_mb,
        "peak_rss_minus_import_over_model": (res["peak_rss_mb"] - res["rss_after_import_mb"]) / model_mb,
    }
    print(json.dumps(report, indent=1))
    print(
        f"\n{args.tasks} tasks of a {model_mb:.0f} MB model merged with peak RSS {res['peak_rss_mb']:.0f} MB "
        f"({report['peak_rss_over_model']:.2f}x the model; {res['rss_after_import_mb']:.0f} MB of it is the interpreter + torch); "
        f"{sum(res['seconds_per_task']):.0f} s in all"
    )
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
