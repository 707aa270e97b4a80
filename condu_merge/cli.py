"""``condu-merge`` command line: add-task, export, inspect, verify, demo.

User errors print one line (``condu-merge: error: …``) and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _mb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _emit(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    try:
        if getattr(args, "json", False):
            print(json.dumps(data, indent=1, default=str))
        elif not getattr(args, "quiet", False):
            for line in lines:
                print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (``| head``, ``| true``): the work is done and committed, so this is
        # no failure; point stdout at /dev/null so the interpreter's final flush stays quiet too
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and not getattr(args, "json", False) and sys.stderr.isatty()


# ---------------------------------------------------------------------------- add-task

def _add_task(args: argparse.Namespace) -> int:
    from .distributed import add_task_from_args, launcher_detected, stale_world_size

    if launcher_detected():  # started by torchrun: split the step across ranks
        return add_task_from_args(args)
    stale = stale_world_size()
    if stale:
        print(f"condu-merge: note: {stale}", file=sys.stderr)

    import torch

    from .store import Store

    t0 = time.perf_counter()
    with Store(args.store, verify=False) as st:
        st.add_task_from_checkpoints(
            args.name,
            args.base,
            args.finetuned,
            include=args.include,
            exclude=args.exclude,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            rescaler=args.rescaler,
            backend=args.backend,
            progress=_progress(args),
            check_base=not args.no_check_base,
        )
        elapsed = time.perf_counter() - t0
        r = st.rescaler_of(args.name)
        info = st.task_info(args.name)
        data = {
            "store": st.root,
            "task": args.name,
            "tasks": st.task_names,
            "params": sum(math.prod(s.shape) for s in st.specs),
            "rescaler": r,
            "mask_bits": info["mask_bits"],
            "seconds": elapsed,
        }
    lam = f"{r:.4f}" if isinstance(r, float) else f"per tensor ({len(r)})"
    _emit(args, data, [f"added {args.name!r} to {data['store']} ({len(data['tasks'])} tasks, {data['params']:,} params, lambda={lam}) in {elapsed:.2f} s"])
    return 0


# ---------------------------------------------------------------------------- export

def _export(args: argparse.Namespace) -> int:
    from .checkpoints import open_checkpoint
    from .safetensors_writer import StreamingSafetensorsWriter, TensorSpec
    from .store import Store

    t0 = time.perf_counter()
    with Store(args.store, verify=not args.no_verify) as st:
        st._require()
        st.task_info(args.task)  # unknown task: clear error before writing anything
        out = os.path.abspath(args.output)
        check_export_target(st, out, [args.base] if args.base else [], force=getattr(args, "force", False))
        remove_stale_export_tmp(out)
        tmp = f"{out}.tmp-{os.getpid()}"
        meta = {"condu-merge-task": args.task, "condu-merge-store": st.root, "content": "delta" if args.delta else "model"}
        from tqdm.auto import tqdm

        if args.delta:
            specs = st.specs
            source = st.iter_decouple(args.task, backend=args.backend)
            base = None
        else:
            base_path = args.base or ((st.manifest.get("base") or {}).get("path"))
            if not base_path:
                raise ValueError("this store does not record its base checkpoint; pass --base (or use --delta)")
            base = open_checkpoint(base_path)
            if not args.no_check_base:
                st._check_base(base)
            stored = set(st.keys)
            specs = [base.spec(k) for k in base.keys()]
            missing = stored - {s.name for s in specs}
            if missing:
                raise ValueError(f"{base.path}: base lacks stored tensors {sorted(missing)[:5]}")
            merged = st.iter_decouple(args.task, base=base, backend=args.backend)

            def _full():
                pending = dict()
                for s in specs:
                    if s.name in stored:
                        while s.name not in pending:
                            k, v = next(merged)
                            pending[k] = v
                        yield s.name, pending.pop(s.name)
                    else:
                        yield s.name, base.get(s.name)

            source = _full()
        try:
            # create the temporary file ourselves: never through a planted link, never over a file
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644))
            w = StreamingSafetensorsWriter(tmp, [TensorSpec(s.name, s.dtype, tuple(s.shape)) for s in specs], meta)
            with w:
                for k, v in tqdm(source, total=len(specs), desc=f"export {args.task}", disable=not _progress(args), leave=False):
                    w.write(k, v)
                sha, size = w.close()
            os.replace(tmp, out)
        except OSError as exc:
            if exc.filename is None:  # ENOSPC and friends from write(): name the file
                raise type(exc)(exc.errno, exc.strerror or str(exc), out) from exc
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if base is not None:
                base.close()
    elapsed = time.perf_counter() - t0
    data = {"output": out, "task": args.task, "delta": bool(args.delta), "tensors": len(specs), "bytes": size, "sha256": sha, "seconds": elapsed}
    _emit(args, data, [f"wrote {'delta' if args.delta else 'model'} of {args.task!r} to {out} ({len(specs)} tensors, {_mb(size)}) in {elapsed:.2f} s"])
    return 0


def check_export_target(st: Any, out: str, extra_inputs: list[str], *, force: bool) -> None:
    """Refuse an export path inside the store, onto its recorded base or any task's source (or
    ``extra_inputs``), through a symlink to any of them, or onto an existing file without
    ``force``."""
    from .errors import UnsafePathError

    real = os.path.realpath(out)
    m = st.manifest
    guarded = [(st.root, "the store")]
    if (m.get("base") or {}).get("path"):
        guarded.append((m["base"]["path"], "the store's base checkpoint"))
    for t in m["tasks"]:
        src = (t.get("source") or {}).get("path")
        if src:
            guarded.append((src, f"the source of task {t['name']!r}"))
    guarded += [(p, "the base checkpoint") for p in extra_inputs]
    # a sharded checkpoint (an index, or a folder) is its whole folder: the shards are inputs too
    guarded += [(os.path.dirname(p), what) for p, what in guarded[1:] if p.endswith(".index.json")]
    for path, what in guarded:
        g = os.path.realpath(path)
        inside = real == g or (os.path.isdir(g) and os.path.commonpath([g, real]) == g)
        if inside:
            raise UnsafePathError(f"{out}: is {'inside ' if real != g else ''}{what} ({path}); export to another path")
    if os.path.lexists(out):
        if not force:
            raise UnsafePathError(f"{out}: exists; pass --force to replace it")
        if os.path.isdir(out):
            raise UnsafePathError(f"{out}: is a folder")


def remove_stale_export_tmp(out: str) -> None:
    """Delete ``OUT.tmp-PID`` files that a killed export of this program left: regular files
    whose process is gone and whose safetensors header carries the export's metadata."""
    import struct

    from .checkpoints import parse_json
    from .errors import ConduError
    from .store import pid_alive

    folder, prefix = os.path.dirname(out), os.path.basename(out) + ".tmp-"
    with contextlib.suppress(OSError):
        for n in os.listdir(folder):
            pid = n[len(prefix):]
            p = os.path.join(folder, n)
            if not n.startswith(prefix) or not pid.isdigit() or pid_alive(int(pid)) or os.path.islink(p) or not os.path.isfile(p):
                continue
            try:  # the header alone: a killed export's file is truncated after it
                with open(p, "rb") as fh:
                    (size,) = struct.unpack("<Q", fh.read(8))
                    header = parse_json(fh.read(min(size, 1 << 20)), p) if size <= 1 << 20 else {}
                ours = isinstance(header, dict) and "condu-merge-store" in (header.get("__metadata__") or {})
            except (ConduError, OSError, ValueError, struct.error, TypeError):
                ours = False
            if ours:
                os.unlink(p)


# ---------------------------------------------------------------------------- inspect / verify

def _inspect(args: argparse.Namespace) -> int:
    from .store import Store

    with Store(args.store, verify=not args.no_verify) as st:
        m = st._require()
        storage = st.storage()
        stats = None if args.no_overlaps else st.mask_stats(progress=_progress(args))
        tasks = []
        for i, t in enumerate(m["tasks"]):
            r = t["rescaler"]
            tasks.append(
                {
                    "name": t["name"],
                    "added": t.get("added"),
                    "rescaler": r,
                    "mask_bytes": storage["mask_bytes_per_task"][i],
                    "density": t["mask_bits"] / storage["params"] if storage["params"] else 0.0,
                    "source": (t.get("source") or {}).get("path"),
                    "prototypes": bool(t.get("prototypes")),
                }
            )
        data = {
            "store": st.root,
            "generation": m["generation"],
            "rescaler": m["rescaler"],
            "tensors": len(m["tensors"]),
            "base": m.get("base"),
            "tasks": tasks,
            "storage": storage,
            "overlaps": stats,
            "verified": not args.no_verify,
        }
    lines = [
        f"store {data['store']} (generation {data['generation']}, rescaler {data['rescaler']}; "
        + ("every file's sha256 verified)" if data["verified"] else "files not verified: --no-verify)"),
        f"  {storage['params']:,} parameters in {data['tensors']} tensors; base: {(data['base'] or {}).get('path', 'not recorded')}",
        f"  {'task':<20} {'lambda':>10} {'density':>8} {'mask bytes':>12}",
    ]
    for t in tasks:
        lam = f"{t['rescaler']:.4f}" if isinstance(t["rescaler"], float) else "per-tensor"
        lines.append(f"  {t['name']:<20} {lam:>10} {t['density']:>8.3f} {t['mask_bytes']:>12,}")
    if stats and len(tasks) > 1:
        lines.append("  pairwise mask overlap (Jaccard |Mi & Mj| / |Mi | Mj|):")
        w = max(len(t["name"]) for t in tasks)
        for i, t in enumerate(tasks):
            lines.append("    " + t["name"].ljust(w) + " " + " ".join(f"{x:5.2f}" for x in stats["jaccard"][i]))
    s = storage
    lines += [
        f"  storage: unified delta {_mb(s['unified_bytes'])} + masks {_mb(sum(s['mask_bytes_per_task']))} "
        f"({s['mask_bits_per_param']:.3f} bit/param/task) + prototypes {_mb(s['prototype_bytes'])} + manifest {_mb(s['manifest_bytes'])}"
        f" = {_mb(s['store_bytes'])}",
        f"  with the base model ({_mb(s['base_bytes'])}): {_mb(s['condu_total_bytes'])} vs {s['tasks']} individual models: {_mb(s['individual_bytes'])}"
        + (f" ({s['individual_bytes'] / s['condu_total_bytes']:.1f}x)" if s["condu_total_bytes"] else ""),
        "  (the paper, 11 CLIP ViT-B/16 tasks: base 570.86 + unified 570.86 + masks 196.20 + rescalers 0.75 = 1377.92 MB vs 11 x 570.86 = 6279.46 MB)",
    ]
    _emit(args, data, lines)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .store import Store

    t0 = time.perf_counter()
    with Store(args.store, verify=False) as st:
        st._require()
        rep = st.verify()
        data = {"store": st.root, "ok": True, "files": rep.files, "bytes": rep.bytes, "tasks": st.task_names, "seconds": time.perf_counter() - t0}
    _emit(args, data, [f"ok: {rep.files} files, {_mb(rep.bytes)}, {len(data['tasks'])} tasks verified (sha256) in {data['seconds']:.2f} s"])
    return 0


# ---------------------------------------------------------------------------- demo

def _demo(args: argparse.Namespace) -> int:
    """A seeded model family (a base and ``tasks`` fine-tuned variants sharing some direction),
    merged continually through a store in a temporary directory, then every expert decoupled."""
    import torch

    from .safetensors_writer import save_file_streaming
    from .store import Store

    gen = torch.Generator().manual_seed(args.seed)
    shapes = {
        "embed.weight": (512, 64),
        "block.0.attn.weight": (192, 64),
        "block.0.mlp.weight": (256, 64),
        "block.0.norm.bias": (64,),
        "head.weight": (10, 64),
    }
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    shared = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    work = args.keep or tempfile.mkdtemp(prefix="condu-demo-")
    os.makedirs(work, exist_ok=True)
    store_dir = os.path.join(work, "store")
    deltas: dict[str, dict] = {}
    t_merge = 0.0
    save_file_streaming(base, os.path.join(work, "base.safetensors"))
    with Store(store_dir, verify=False) as st:
        for i in range(args.tasks):
            name = f"task{i + 1}"
            finetuned = {k: base[k] + 0.01 * (0.5 * shared[k] + torch.randn(s, generator=gen)) for k, s in shapes.items()}
            deltas[name] = {k: finetuned[k] - base[k] for k in shapes}
            ft = os.path.join(work, f"{name}.safetensors")
            save_file_streaming(finetuned, ft)
            t0 = time.perf_counter()
            st.add_task_from_checkpoints(name, os.path.join(work, "base.safetensors"), ft, rescaler=args.rescaler)
            t_merge += time.perf_counter() - t0
        t0 = time.perf_counter()
        st.verify()
        t_verify = time.perf_counter() - t0
        storage = st.storage()
        rows = []
        t0 = time.perf_counter()
        for name in st.task_names:
            true_delta = {k: deltas[name][k] for k in shapes}  # what the checkpoint holds: ft - base
            rec = st.decouple(name)
            a = torch.cat([true_delta[k].flatten() for k in shapes])
            b = torch.cat([rec[k].flatten() for k in shapes])
            rows.append(
                {
                    "task": name,
                    "rescaler": st.rescaler_of(name),
                    "density": st.task_info(name)["mask_bits"] / storage["params"],
                    "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
                    "rel_l2_error": ((a - b).norm() / a.norm()).item(),
                }
            )
        t_decouple = time.perf_counter() - t0
    data = {
        "workdir": work if args.keep else None,
        "tasks": args.tasks,
        "params": storage["params"],
        "storage": storage,
        "experts": rows,
        "seconds": {"merge": t_merge, "verify": t_verify, "decouple_all": t_decouple},
    }
    lines = [
        f"merged {args.tasks} tasks of {storage['params']:,} parameters through a store in {t_merge * 1e3:.0f} ms "
        f"(verify {t_verify * 1e3:.0f} ms, decouple all {t_decouple * 1e3:.0f} ms)",
        f"stored: unified delta {_mb(storage['unified_bytes'])} + masks {_mb(sum(storage['mask_bytes_per_task']))} "
        f"({storage['mask_bits_per_param']:.3f} bit/param/task) + manifest {_mb(storage['manifest_bytes'])}; "
        f"with the base {_mb(storage['condu_total_bytes'])} vs {args.tasks} individual models {_mb(storage['individual_bytes'])}",
    ]
    for r in rows:
        lines.append(
            f"  {r['task']}: lambda={r['rescaler']:.4f} mask density={r['density']:.3f} cos={r['cosine']:.4f} rel.L2 err={r['rel_l2_error']:.4f}"
        )
    if args.keep:
        lines.append(f"files kept in {work} (try: condu-merge inspect {store_dir})")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    _emit(args, data, lines)
    return 0


# ---------------------------------------------------------------------------- parser

def _common() -> argparse.ArgumentParser:
    # SUPPRESS: flags given before or after the subcommand both count, neither overrides the other
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or messages")
    c.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output on stdout")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return c


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    p = argparse.ArgumentParser(prog="condu-merge", description="Continual model merging (ConDU)", parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("add-task", parents=[common], help="merge a fine-tuned checkpoint into a store (created on first use)")
    a.add_argument("store")
    a.add_argument("--base", required=True, help="pretrained checkpoint (safetensors file, sharded index, folder, .pt/.bin)")
    a.add_argument("--finetuned", required=True, help="fine-tuned checkpoint or PEFT LoRA adapter folder")
    a.add_argument("--name", required=True, help="task name (unique in the store)")
    a.add_argument("--include", action="append", metavar="GLOB", help="tensors taking part (fnmatch on names; repeatable; first task only)")
    a.add_argument("--exclude", action="append", metavar="GLOB", help="tensors left out (carried unchanged from the base)")
    a.add_argument("--rescaler", default=None, help="tensor_mean (default) | l1 | per_tensor (fixed by the first task; a later one may only repeat it)")
    a.add_argument("--dtype", choices=_DTYPES, help="dtype the store keeps u in (fixed by the first task; default: the checkpoint's)")
    a.add_argument("--backend", default="auto")
    a.add_argument("--no-check-base", action="store_true", help="do not compare the base's sha256 with the store's")
    a.set_defaults(func=_add_task)

    e = sub.add_parser("export", parents=[common], help="write one task's reconstructed checkpoint (or delta) as safetensors")
    e.add_argument("store")
    e.add_argument("--task", required=True)
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--delta", action="store_true", help="the delta alone (no base needed)")
    e.add_argument("--base", help="base checkpoint (default: the one recorded in the store)")
    e.add_argument("--backend", default="auto")
    e.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the store")
    e.add_argument("--no-check-base", action="store_true")
    e.add_argument("--force", action="store_true", help="replace an existing output file (never one the store reads)")
    e.set_defaults(func=_export)

    i = sub.add_parser("inspect", parents=[common], help="tasks, sizes, mask density and overlaps, storage vs individual models")
    i.add_argument("store")
    i.add_argument("--no-overlaps", action="store_true", help="skip the pairwise mask overlaps (reads every mask)")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every file (fast; says so in the output)")
    i.set_defaults(func=_inspect)

    v = sub.add_parser("verify", parents=[common], help="check every file of a store against its sha256")
    v.add_argument("store")
    v.set_defaults(func=_verify)

    d = sub.add_parser("demo", parents=[common], help="continual session on a small seeded model family, through a store")
    d.add_argument("--tasks", type=int, default=5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--rescaler", default="tensor_mean")
    d.add_argument("--keep", metavar="DIR", help="work in DIR and keep the files (default: a temporary directory)")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        if debug:
            raise
        print("condu-merge: interrupted", file=sys.stderr)
        return 130
    except (Exception,) as exc:  # noqa: BLE001 -- one clear line for users; --debug for the rest
        from .errors import ConduError

        if debug:
            raise
        expected = isinstance(exc, (ConduError, OSError, ValueError, KeyError, TypeError))
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        if not expected:
            msg = f"{type(exc).__name__}: {msg} (run with --debug for the traceback)"
        print(f"condu-merge: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
