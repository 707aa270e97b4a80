"""End to end: ``condu-merge add-task`` (the CLI, one process per task) against the I/O floor.

In one run: a base and ``--tasks`` fine-tuned safetensors checkpoints of ``--params`` parameters
in ``--tensors`` tensors are written to ``--dir``; then for task ``t = 1..T``

* **cli**: ``python -m condu_merge add-task STORE --base B --finetuned F_t --name task_t``, timed
  from the parent (process start, imports and exit included), its peak RSS from ``wait4``;
* **floor**: in this process, read every input file of that step once (the base, ``F_t`` and the
  store's current ``u`` and mask files) into one reused buffer and write the new generation's
  bytes (``u`` plus ``t`` mask files, the sizes the CLI writes) once, then ``fsync``; after the
  CLIs in even tries, before them in odd ones (``os.sync`` before each timed run, so neither
  waits on the harness's own dirty pages).

Both read from the page cache (the files were just written), so the ratio is what the CLI costs
over moving its bytes. Each step is run ``--repeat`` times on a copy of the store as it was
before the step (the best time is kept; the store then moves on with one of them). Prints a
markdown table: task count, time, floor, ratio (best time over best floor), the median over the
tries of each try's time over the floor measured right after it (on a VM whose page-cache
writes and fsyncs vary 4x from one second to the next, the pairing keeps both in the same
conditions), peak RSS.

``--variant NAME:VAR=VALUE,...`` (repeatable) runs the CLI once per variant in every try, with
those environment variables (``PYTHONPATH=/old/checkout`` runs another version of the code), each variant on its own store, interleaved with the others and the
floor: a before/after in the same conditions on a shared machine. Without it one variant, ``cli``.

    python benchmarks/bench_e2e.py --params 128e6 --tensors 64 --tasks 4 --dir /tmp/e2e
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

from condu_merge.backends import available_backends

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_BUF = 1 << 24


def llama7b_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Llama-2-7B's tensors (width 4096, MLP 11008, vocab 32000), the first ``layers`` of 32 blocks."""
    w, f = 4096, 11008
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (32000, w)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            s[f"{p}.self_attn.{n}.weight"] = (w, w)
        s[f"{p}.mlp.gate_proj.weight"] = (f, w)
        s[f"{p}.mlp.up_proj.weight"] = (f, w)
        s[f"{p}.mlp.down_proj.weight"] = (w, f)
        s[f"{p}.input_layernorm.weight"] = (w,)
        s[f"{p}.post_attention_layernorm.weight"] = (w,)
    s["model.norm.weight"] = (w,)
    s["lm_head.weight"] = (32000, w)
    return s


def _write(path: str, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, make, shards: int = 1) -> str:
    """A safetensors file tensor by tensor (``make(name, shape)`` gives each): one tensor in
    memory. ``shards > 1``: a folder ``path`` minus its suffix holding that many shards (the
    tensors in order, split evenly) and a ``model.safetensors.index.json``, whose path is returned."""
    from condu_merge.safetensors_writer import StreamingSafetensorsWriter, TensorSpec

    keys = list(shapes)
    if shards > 1:
        folder = path.removesuffix(".safetensors")
        os.makedirs(folder, exist_ok=True)
        per = -(-len(keys) // shards)
        parts = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": keys[i * per : (i + 1) * per] for i in range(shards)}
    else:
        folder, parts = os.path.dirname(path), {os.path.basename(path): keys}
    for name, ks in parts.items():
        with StreamingSafetensorsWriter(os.path.join(folder, name), [TensorSpec(k, dtype, shapes[k]) for k in ks]) as w:
            for k in ks:
                w.write(k, make(k, shapes[k]).to(dtype))
            w.close()
    if shards <= 1:
        return path
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as fh:
        json.dump({"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}, fh)
    return index


def checkpoint_files(path: str) -> list[str]:
    """The files of a checkpoint ``_write`` made: the file, or the index and its shards."""
    if not path.endswith(".index.json"):
        return [path]
    with open(path) as fh:
        names = sorted(set(json.load(fh)["weight_map"].values()))
    return [path] + [os.path.join(os.path.dirname(path), n) for n in names]


def make_checkpoints(
    d: str, shapes: dict[str, tuple[int, ...]], tasks: int, dtype: torch.dtype, shards: int = 1
) -> tuple[str, list[str]]:
    """A base and ``tasks`` fine-tuned checkpoints (base + 1e-3 noise), written tensor by tensor
    (the base tensor is regenerated from its seed, so memory holds one tensor at a time); each in
    ``shards`` safetensors shards with an index when ``shards > 1``."""
    os.makedirs(d, exist_ok=True)
    seeds = {k: i for i, k in enumerate(shapes)}

    def base_t(k, s):
        return torch.randn(s, generator=torch.Generator().manual_seed(seeds[k]))

    bpath = os.path.join(d, "base.safetensors")
    bpath = _write(bpath, shapes, dtype, base_t, shards)
    fts = []
    for t in range(tasks):
        g = torch.Generator().manual_seed(1000 + t)
        p = os.path.join(d, f"ft{t}.safetensors")

        def make(k, s, g=g):
            return base_t(k, s).to(dtype).float() + 1e-3 * torch.randn(s, generator=g)

        fts.append(_write(p, shapes, dtype, make, shards))
    return bpath, fts


def start_time(env: dict, dtype: str = "float32") -> tuple[float, float]:
    """Seconds of a process that only imports torch, and of one that imports what add-task
    imports: for float32, float16 and bfloat16 where the native kernels are built, the store, the
    CLI and the kernels without torch (the torch-free fold, ``condu_merge.native_fold``); else
    torch too, and the numba kernels with their on-disk cache. The part of every add-task that
    does not depend on the model."""
    if dtype in ("float32", "float16", "bfloat16") and "native" in available_backends():
        imports = (
            "import condu_merge.cli, condu_merge.store, condu_merge.native_fold; "
            "from condu_merge.kernels import native_backend as nb; assert nb._lib() is not None"
        )
    else:
        imports = "import torch, condu_merge.cli, condu_merge.store; from condu_merge.kernels import _numba_impl"
    out = []
    for code in ("import torch", imports):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        out.append(time.perf_counter() - t0)
    return out[0], out[1]


def store_files(store: str) -> list[str]:
    """The data files of the store's current generation (empty before the first task)."""
    mpath = os.path.join(store, "manifest.json")
    if not os.path.exists(mpath):
        return []
    with open(mpath) as fh:
        m = json.load(fh)
    gen = os.path.join(store, m["generation_dir"])
    return [os.path.join(gen, rel) for rel in m["files"]]


def run_cli(store: str, base: str, ft: str, name: str, env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one ``add-task`` process.

    The peak comes from GNU ``time`` (``%M``), which starts the command itself: ``ru_maxrss`` of a
    child started straight from this process would include this process's own resident size
    (Linux carries the high-water mark of the address space a child had before ``exec``)."""
    cmd = [
        sys.executable,
        "-m",
        "condu_merge",
        "add-task",
        store,
        "--base",
        base,
        "--finetuned",
        ft,
        "--name",
        name,
        "-q",
    ]
    rss_file = os.path.join(os.path.dirname(store), ".rss")
    timer = shutil.which("time") or "/usr/bin/time"
    wrapped = [timer, "-f", "%M", "-o", rss_file] + cmd if os.path.exists(timer) else cmd
    t0 = time.perf_counter()
    # run from the store's folder: ``python -m`` puts the working directory first on sys.path, so a
    # variant's PYTHONPATH (another checkout of condu_merge) would be shadowed from the repo root
    p = subprocess.run(
        wrapped,
        check=False,
        env=env,
        cwd=os.path.dirname(store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"add-task failed ({p.returncode}): {p.stderr.decode().strip()}")
    peak = 0
    if wrapped is not cmd:
        with open(rss_file) as fh:
            peak = int(fh.read().split()[-1]) * 1024
        os.unlink(rss_file)
    return dt, peak


def io_floor(inputs: list[str], out_sizes: list[int], out_dir: str) -> float:
    """Seconds to read every file of ``inputs`` once and write files of ``out_sizes`` bytes once (fsynced)."""
    buf = bytearray(_BUF)
    mv = memoryview(buf)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    for p in inputs:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(mv):
                pass
    for i, size in enumerate(out_sizes):
        with open(os.path.join(out_dir, f"f{i}"), "wb", buffering=0) as fh:
            left = size
            while left:
                n = min(left, _BUF)
                fh.write(mv[:n])
                left -= n
            os.fsync(fh.fileno())
    fd = os.open(out_dir, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    shutil.rmtree(out_dir)
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--shape",
        choices=["flat", "llama7b"],
        default="flat",
        help="flat: --params in --tensors equal tensors; llama7b: Llama-2-7B tensors, --layers blocks",
    )
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--params", type=float, default=128e6)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument(
        "--shards", type=int, default=1, help="write every checkpoint as this many safetensors shards + index"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/condu_e2e")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and the store")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE,...",
        help="a CLI variant (environment variables for its process); repeat to interleave several",
    )
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    shutil.rmtree(a.dir, ignore_errors=True)
    t0 = time.perf_counter()
    if a.shape == "llama7b":
        shapes = llama7b_shapes(a.layers)
    else:
        shapes = {f"layer{j}.weight": (int(a.params) // a.tensors,) for j in range(a.tensors)}
    base, fts = make_checkpoints(a.dir, shapes, a.tasks, dtype, a.shards)
    largest = max(math.prod(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    print(
        f"checkpoints: {a.tasks + 1} x {sum(os.path.getsize(f) for f in checkpoint_files(base)) / 2**20:.0f} MiB ({a.dtype}, {len(shapes)} tensors, "
        f"largest {largest / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = (
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + env.get("PYTHONPATH", "")
    )
    variants: dict[str, dict[str, str]] = {}
    for v in a.variant or ["cli:"]:
        name, _, assigns = v.partition(":")
        variants[name] = {**env, **dict(x.split("=", 1) for x in assigns.split(",") if x)}
    # bytecode for every variant's checkout, as a pip install writes it: with $PYTHONDONTWRITEBYTECODE
    # (set on the machines this ran on) an editable checkout is otherwise compiled at every start
    for venv in variants.values():
        for root in [p for p in venv.get("PYTHONPATH", "").split(os.pathsep) if p]:
            if os.path.isdir(os.path.join(root, "condu_merge")):
                subprocess.run(
                    [sys.executable, "-m", "compileall", "-q", os.path.join(root, "condu_merge")], check=True
                )
    # a warm-up process per variant: compiles (or loads) the numba kernels once, outside the timings
    for venv in variants.values():
        warm = os.path.join(a.dir, "warm")
        run_cli(warm, base, fts[0], "warm", venv)
        shutil.rmtree(warm)
    rows = []
    for t, ft in enumerate(fts, start=1):
        best: dict[str, tuple[float, int]] = {n: (float("inf"), 0) for n in variants}
        paired: dict[str, list[float]] = {n: [] for n in variants}  # each try's time over its own floor
        best_floor, best_start = float("inf"), (float("inf"), float("inf"))
        out_sizes: list[int] = []
        for r in range(a.repeat):
            line = []
            tries: dict[str, float] = {}
            first = os.path.join(a.dir, f"store-{next(iter(variants))}")
            # odd tries time the floor first: whichever runs second finds the memory the first one
            # freed still mapped (this VM hands freed memory back to its host after a while)
            floor_first = r % 2 == 1 and bool(out_sizes)
            if floor_first:
                ins = checkpoint_files(base) + checkpoint_files(ft) + store_files(first + ".before")
                fl = io_floor(ins, out_sizes, os.path.join(a.dir, "floor"))
            for name, venv in variants.items():
                store = os.path.join(a.dir, f"store-{name}")
                snap = store + ".before"  # the store before this step: every try starts from it
                if r == 0:
                    shutil.rmtree(snap, ignore_errors=True)
                    if os.path.exists(store):
                        shutil.copytree(store, snap, symlinks=True)
                shutil.rmtree(store, ignore_errors=True)
                if os.path.exists(snap):
                    shutil.copytree(snap, store, symlinks=True)
                os.sync()  # the copy's dirty pages written now, not during the timed fsyncs
                dt, peak = run_cli(store, base, ft, f"task{t}", venv)
                tries[name] = dt
                best[name] = (min(best[name][0], dt), max(best[name][1], peak))
                line.append(f"{name} {dt:.2f} s ({peak / 2**20:.0f} MiB)")
            inputs = checkpoint_files(base) + checkpoint_files(ft) + store_files(first + ".before")
            out_sizes = [os.path.getsize(p) for p in store_files(first)]
            if not floor_first:
                os.sync()
                fl = io_floor(inputs, out_sizes, os.path.join(a.dir, "floor"))
            for name in variants:
                paired[name].append(tries[name] / fl)
            st = start_time(env, a.dtype)
            best_floor = min(best_floor, fl)
            best_start = (min(best_start[0], st[0]), min(best_start[1], st[1]))
            print(
                f"  task {t} try {r + 1}: {', '.join(line)}, floor {fl:.2f} s, "
                f"start: import torch {st[0]:.2f} s, all imports {st[1]:.2f} s; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        in_bytes = sum(os.path.getsize(p) for p in inputs)
        for name, (dt, peak) in best.items():
            rows.append(
                {
                    "variant": name,
                    "tasks": t,
                    "cli_s": dt,
                    "floor_s": best_floor,
                    "ratio": dt / best_floor,
                    "paired_ratio": statistics.median(paired[name]),
                    "import_torch_s": best_start[0],
                    "imports_s": best_start[1],
                    "ratio_after_start": (dt - best_start[1]) / best_floor,
                    "peak_rss_MiB": peak / 2**20,
                    "read_MiB": in_bytes / 2**20,
                    "written_MiB": sum(out_sizes) / 2**20,
                }
            )
    print(f"\n`{' '.join(['python'] + sys.argv)}`; {os.cpu_count()} cores, torch {torch.__version__}\n")
    print(
        f"largest tensor {largest / 2**20:.0f} MiB; target peak RSS 1 GiB + largest = {1024 + largest / 2**20:.0f} MiB\n"
    )
    print(
        "| variant | tasks | add-task s | I/O floor s | ratio | median paired ratio | start s (import torch / add-task's imports) "
        "| ratio without start | peak RSS MiB | read MiB | written MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(
        rows, key=lambda r: (r["variant"] != next(iter(variants)), list(variants).index(r["variant"]), r["tasks"])
    ):
        print(
            f"| {r['variant']} | {r['tasks']} | {r['cli_s']:.2f} | {r['floor_s']:.2f} | {r['ratio']:.2f}x | {r['paired_ratio']:.2f}x | "
            f"{r['import_torch_s']:.2f} / {r['imports_s']:.2f} | {r['ratio_after_start']:.2f}x | {r['peak_rss_MiB']:.0f} | "
            f"{r['read_MiB']:.0f} | {r['written_MiB']:.0f} |"
        )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"argv": sys.argv, "rows": rows}, fh, indent=1)
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
