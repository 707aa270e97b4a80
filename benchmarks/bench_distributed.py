"""Distributed ``add_task`` (issue 9): scaling of one continual step with the number of ranks.

A synthetic transformer-shaped model of P float32 parameters is saved as safetensors (a base and
K+1 fine-tuned checkpoints); a store holding K tasks is prepared once by one process. Then the
(K+1)-th task is added, each time onto a fresh copy of that store, by

* ``store``   -- :meth:`Store.add_task_from_checkpoints` in this process (the single-process baseline);
* ``dist-1``  -- :func:`distributed_add_task_from_checkpoints` in this process, world size 1 (no process group);
* ``dist-N``  -- N ranks on this machine, gloo over 127.0.0.1, each rank a subprocess with the
  environment torchrun gives it.

Every rank gets ``max(1, cores // N)`` torch threads (the baseline and ``dist-1`` get ``cores``),
so the machine is never oversubscribed. Times are best-of-``--repeat`` of the call itself, after a
warm-up (process start, ``import torch``, process-group set-up and the first-call JIT of the
merge backend are not counted; ``launch`` reports the whole subprocess wall time once). Every
variant's manifest must name byte-identical data files (same sha256), which is checked.

    python benchmarks/bench_distributed.py                        # 12M params, 3 tasks + 1, ranks 1,2
    python benchmarks/bench_distributed.py --params 4e6 --ranks 1,2,4 --json out.json

On a multi-GPU machine, run the same script with ``--device cuda`` (NCCL, one GPU per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from condu_merge.distributed import distributed_add_task_from_checkpoints  # noqa: E402
from condu_merge.safetensors_writer import save_file_streaming  # noqa: E402
from condu_merge.store import Store  # noqa: E402


def model_shapes(params: float, d: int = 512) -> dict[str, tuple[int, ...]]:
    """Transformer-like tensors: an embedding, then layers of qkv, proj, fc1, fc2, 2 norms."""
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (2 * d, d)}
    per_layer = 12 * d * d + 4 * d
    for i in range(max(1, round((params - 2 * d * d) / per_layer))):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.qkv.bias": (3 * d,),
                p + "attn.proj.weight": (d, d),
                p + "mlp.fc1.weight": (4 * d, d),
                p + "mlp.fc2.weight": (d, 4 * d),
                p + "ln1.weight": (d,),
                p + "ln2.weight": (d,),
            }
        )
    return shapes


def make_checkpoints(work: str, params: float, n_ft: int, seed: int = 0) -> tuple[str, list[str], int]:
    gen = torch.Generator().manual_seed(seed)
    shapes = model_shapes(params)
    base = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    shared = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    save_file_streaming(base, os.path.join(work, "base.safetensors"))
    fts = []
    for t in range(n_ft):
        ft = {k: base[k] + 1e-3 * (0.5 * shared[k] + torch.randn(s, generator=gen)) for k, s in shapes.items()}
        path = os.path.join(work, f"ft{t}.safetensors")
        save_file_streaming(ft, path)
        fts.append(path)
    return os.path.join(work, "base.safetensors"), fts, sum(v.numel() for v in base.values())


_RANK_WORKER = r"""
import json, os, shutil, sys, time
import torch, torch.distributed as dist
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from condu_merge.core import unify_tensor
from condu_merge.distributed import distributed_add_task_from_checkpoints
dev = spec["device"]
if dev == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl" if dev == "cuda" else "gloo")
rank = dist.get_rank()
unify_tensor([torch.randn(4096, device=dev)])  # first-call JIT of the auto backend
dist.barrier()
runs = []
for i in range(spec["repeat"]):
    target = os.path.join(spec["work"], f"run-{spec['world']}-{i}")
    if rank == 0:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(spec["prepared"], target)
    dist.barrier()
    t0 = time.perf_counter()
    r = distributed_add_task_from_checkpoints(target, spec["name"], spec["base"], spec["ft"], backend=spec["backend"])
    runs.append({"seconds": time.perf_counter() - t0, "timings": r["timings"], "bytes_on_rank": r["bytes_on_rank"], "store": target})
all_runs = [None] * dist.get_world_size()
dist.all_gather_object(all_runs, runs)  # our own benchmark processes: pickle is fine here
if rank == 0:
    print(json.dumps(all_runs))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, spec: dict) -> tuple[list[list[dict]], float]:
    port = _free_port()
    env_base = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS=str(spec["threads"]),
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_WORKER, json.dumps({**spec, "world": world})],
            env=dict(env_base, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    outs = [p.communicate()[0] for p in procs]
    launch = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a rank failed: return codes {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1]), launch


def _files(store: str) -> dict:
    with open(os.path.join(store, "manifest.json"), encoding="utf-8") as fh:
        return json.load(fh)["files"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=12e6)
    ap.add_argument("--tasks", type=int, default=3, help="tasks already in the store (K); the benchmark adds one more")
    ap.add_argument("--ranks", default="1,2", help="comma-separated world sizes for the multi-process runs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()

    cores = os.cpu_count() or 1
    ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    work = args.work or tempfile.mkdtemp(prefix="condu-bench-dist-")
    os.makedirs(work, exist_ok=True)
    try:
        base, fts, n_params = make_checkpoints(work, args.params, args.tasks + 1)
        prepared = os.path.join(work, "prepared")
        with Store(prepared, verify=False) as st:
            for t in range(args.tasks):
                st.add_task_from_checkpoints(f"task{t}", base, fts[t], backend=args.backend)
        name, ft = f"task{args.tasks}", fts[args.tasks]
        rows, reference = [], None

        def fresh(tag: str) -> str:
            target = os.path.join(work, f"run-{tag}")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(prepared, target)
            return target

        torch.set_num_threads(cores)
        if args.device == "cpu":
            from condu_merge.core import unify_tensor

            unify_tensor([torch.randn(4096)])  # warm-up, as in the rank workers
            for tag, fn in (
                (
                    "store",
                    lambda p: Store(p, verify=False).add_task_from_checkpoints(name, base, ft, backend=args.backend),
                ),
                ("dist-1", lambda p: distributed_add_task_from_checkpoints(p, name, base, ft, backend=args.backend)),
            ):
                best, target = float("inf"), None
                for i in range(args.repeat):
                    target = fresh(f"{tag}-{i}")
                    t0 = time.perf_counter()
                    fn(target)
                    best = min(best, time.perf_counter() - t0)
                files = _files(target)
                reference = reference or files
                rows.append(
                    {
                        "variant": tag,
                        "ranks": 1,
                        "threads_per_rank": cores,
                        "seconds": best,
                        "identical": files == reference,
                    }
                )
        for world in ranks:
            spec = {
                "work": work,
                "prepared": prepared,
                "name": name,
                "base": base,
                "ft": ft,
                "repeat": args.repeat,
                "threads": max(1, cores // world),
                "device": args.device,
                "backend": args.backend,
            }
            per_rank, launch = run_ranks(world, spec)
            best_i = min(range(args.repeat), key=lambda i: max(per_rank[r][i]["seconds"] for r in range(world)))
            secs = max(per_rank[r][best_i]["seconds"] for r in range(world))
            files = _files(per_rank[0][best_i]["store"])
            reference = reference or files
            t0 = per_rank[0][best_i]["timings"]
            rows.append(
                {
                    "variant": f"dist-{world} ({'gloo' if args.device == 'cpu' else 'nccl'})",
                    "ranks": world,
                    "threads_per_rank": spec["threads"],
                    "seconds": secs,
                    "identical": files == reference,
                    "launch_seconds": launch,
                    "rank0_phases": {k: round(v, 4) for k, v in t0.items()},
                    "bytes_per_rank": [per_rank[r][best_i]["bytes_on_rank"] for r in range(world)],
                }
            )
        base_s = next((r["seconds"] for r in rows if r["variant"] == "store"), rows[0]["seconds"])
        print(
            f"add_task of task {args.tasks + 1} onto a {args.tasks}-task store: {n_params / 1e6:.1f}M float32 params, "
            f"{len(model_shapes(args.params))} tensors, {cores} cores, torch {torch.__version__}, {platform.processor() or platform.machine()}"
        )
        print("| variant | ranks x threads | time (s) | speed-up vs store | identical files | rank-0 phases (s) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            ph = r.get("rank0_phases")
            phs = ", ".join(f"{k} {v:.2f}" for k, v in ph.items() if k != "total") if ph else "-"
            print(
                f"| {r['variant']} | {r['ranks']} x {r['threads_per_rank']} | {r['seconds']:.3f} | {base_s / r['seconds']:.2f}x | "
                f"{'yes' if r['identical'] else 'NO'} | {phs} |"
            )
        if not all(r["identical"] for r in rows):
            raise SystemExit("error: a variant wrote different data files")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(
                    {
                        "params": n_params,
                        "tasks_before": args.tasks,
                        "cores": cores,
                        "device": args.device,
                        "rows": rows,
                    },
                    fh,
                    indent=1,
                )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
