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


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs (values parsed as JSON where they parse, else kept as text)."""
    from .strategies.rule import parse_option_value

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value (e.g. --set density=0.2)")
        out[key.strip()] = parse_option_value(value)
    return out


def _add_task(args: argparse.Namespace) -> int:
    from .distributed import add_task_from_args, launcher_detected, stale_world_size
    from .manifest_check import store_method

    have = store_method(args.store)
    method = args.method or have or "condu"
    if have is not None and method != have:
        raise ValueError(
            f"{os.path.abspath(args.store)}: --method {method} differs from the store's {have} "
            "(fixed when the store was created); drop the option, or start a new store"
        )
    sets = _parse_sets(args.set)
    if method != "condu":
        return _add_strategy_task(args, method, sets)
    if sets:
        raise ValueError(f"--set {sorted(sets)}: ConDU's options are --rescaler and --dtype, not --set")
    if launcher_detected():  # started by torchrun: split the step across ranks
        return add_task_from_args(args)
    stale = stale_world_size()
    if stale:
        print(f"condu-merge: note: {stale}", file=sys.stderr)

    from .recipe import add_one
    from .store import Store

    t0 = time.perf_counter()
    with Store(args.store, verify=False) as st:
        info = add_one(
            st,
            args.name,
            args.base,
            args.finetuned,
            rescaler=args.rescaler,
            include=args.include,
            exclude=args.exclude,
            dtype=args.dtype,
            backend=args.backend,
            lora=args.lora,
            lora_init=args.lora_init,
            check_base=not args.no_check_base,
            progress=_progress(args),
        )
        left_out, family = info["left_out"], info["family"]
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
            "left_out": left_out,
            "seconds": elapsed,
        }
    lam = f"{r:.4f}" if isinstance(r, float) else f"per tensor ({len(r)})"
    lines = [
        f"added {args.name!r} to {data['store']} ({len(data['tasks'])} tasks, {data['params']:,} params, lambda={lam}) in {elapsed:.2f} s"
    ]
    if left_out:
        lines.append(
            f"  left out by the {family} default (docs/adapters.md): {', '.join(left_out)}; --include to choose yourself"
        )
    _emit(args, data, lines)
    return 0


def _add_strategy_task(args: argparse.Namespace, method: str, sets: dict[str, Any]) -> int:
    """add-task for a store of another strategy than ConDU (:class:`~condu_merge.strategy_store.StrategyStore`)."""
    import torch

    from .distributed import launcher_detected
    from .recipe import family_left_out
    from .strategy_store import StrategyStore

    if launcher_detected():
        raise ValueError(f"distributed add-task (torchrun) merges ConDU stores only, not --method {method}")
    for opt in ("rescaler", "lora", "lora_init"):
        if getattr(args, opt) is not None:
            raise ValueError(
                f"--{opt.replace('_', '-')} is ConDU's; for --method {method} give options with --set key=value"
            )
    t0 = time.perf_counter()
    with StrategyStore(args.store, verify=False) as st:
        family, left_out = (
            family_left_out(args.base, args.finetuned) if not st.exists and not args.include else ("", [])
        )
        st.add_task_from_checkpoints(
            args.name,
            args.base,
            args.finetuned,
            method=method,
            options=sets,
            include=args.include,
            exclude=list(args.exclude or []) + left_out or None,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            check_base=not args.no_check_base,
            progress=_progress(args),
            source_extra={"base_arg": os.path.abspath(args.base)},
        )
        elapsed = time.perf_counter() - t0
        data = {
            "store": st.root,
            "method": method,
            "options": st.options,
            "task": args.name,
            "tasks": st.task_names,
            "params": sum(math.prod(s.shape) for s in st.specs),
            "left_out": left_out,
            "storage": st.storage(),
            "seconds": elapsed,
        }
    lines = [
        f"added {args.name!r} to {data['store']} ({method}, {len(data['tasks'])} tasks, {data['params']:,} params) "
        f"in {elapsed:.2f} s; the store is {data['storage']['models']:.2f}x one model"
    ]
    if left_out:
        lines.append(
            f"  left out by the {family} default (docs/adapters.md): {', '.join(left_out)}; --include to choose yourself"
        )
    _emit(args, data, lines)
    return 0


# ---------------------------------------------------------------------------- export


def _export(args: argparse.Namespace) -> int:
    from . import export as ex

    if bool(args.all) == bool(args.task):
        raise ValueError("name one task with --task, or export every task with --all")
    t0 = time.perf_counter()
    kw = dict(
        fmt=args.format,
        base=args.base,
        delta=args.delta,
        max_shard_size=args.max_shard_size,
        backend=args.backend,
        check_base=not args.no_check_base,
        overwrite=args.force,
        progress=_progress(args),
        peft_rank=args.rank,
        task_type=args.task_type,
    )
    from .strategy_store import open_any_store

    with open_any_store(args.store, verify=not args.no_verify) as st:
        if args.all:
            if not st.exists:
                raise FileNotFoundError(f"{st.root}: no condu-merge store here (no manifest.json)")
            reports = ex.export_all(st, args.output, **kw)
        else:
            reports = [ex.export_task(st, args.task, args.output, **kw)]
    elapsed = time.perf_counter() - t0
    lines = []
    for r in reports:
        what = (
            "delta"
            if r["delta"]
            else {"hf": "model folder", "peft": "PEFT adapter", "safetensors": "model"}[r["format"]]
        )
        lines.append(f"wrote {what} of {r['task']!r} to {r['output']} ({r['tensors']} tensors, {_mb(r['bytes'])})")
        if r.get("truncation_warning"):
            lines.append(
                f"  warning: rank-{r['rank']} truncation error {r['truncation_error']:.3f}; pass a larger --rank"
            )
    lines.append(f"done in {elapsed:.2f} s")
    data: Any = reports[0] if not args.all else {"exports": reports}
    data = {**data, "seconds": elapsed}
    _emit(args, data, lines)
    return 0


# ---------------------------------------------------------------------------- run (recipes)


def _run(args: argparse.Namespace) -> int:
    from . import recipe as rc

    r = rc.load_recipe(args.recipe)
    if args.dry_run:
        p = rc.plan(r)
        lines = [f"plan for {p['recipe']}: store {p['store']}, base {p['base']}"]
        lines += [f"  {t['action']:>4}  {t['name']}  ({t['path']})" for t in p["tasks"]]
        lines += [
            f"  {p['tensors']} tensors, {p['params']:,} params, {_mb(p['bytes_per_task'])} of u per task",
            f"  store after the run {_mb(p['store_bytes_after'])}; peak disk {_mb(p['peak_disk_bytes'])} (two generations while a task commits)",
            f"  peak memory about {_mb(p['peak_memory_bytes'])} (largest tensor {p['largest_tensor']!r}, streamed one tensor at a time)",
        ]
        _emit(args, p, lines)
        return 0
    t0 = time.perf_counter()
    lines = []

    def report(row: dict) -> None:
        if not getattr(args, "json", False) and not getattr(args, "quiet", False) and not _progress(args):
            print(f"{row['action']} {row['name']!r} ({row['path']})", flush=True)

    rows = rc.run_recipe(r, progress=_progress(args), on_task=report)
    data = {"recipe": r.path, "store": r.store, "tasks": rows, "seconds": time.perf_counter() - t0}
    added = sum(x["action"] == "added" for x in rows)
    lines.append(f"{r.store}: {added} task(s) added, {len(rows) - added} already stored, in {data['seconds']:.2f} s")
    _emit(args, data, lines)
    return 0


# ---------------------------------------------------------------------------- inspect / verify


def _inspect_data(st: Any, args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """What ``inspect`` reports, from a :class:`~condu_merge.store.Store` or a torch-free
    :class:`~condu_merge.store_view.StoreView` (same numbers); ``(data, is a LoRA-factor store)``."""
    m = st.manifest
    storage = st.storage()
    lora = all((t.get("source") or {}).get("kind") == "peft-lora-factors" for t in m["tasks"]) and bool(m["tasks"])
    if lora:  # a LoRA-factor store stands against the adapters' own files, not full models
        storage["individual_bytes"] = sum(int(t["source"].get("bytes") or 0) for t in m["tasks"])
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
        "lora_factors": lora,
        "overlaps": stats,
    }
    return data, lora


def _against(args: argparse.Namespace, data: dict[str, Any]) -> list[dict[str, Any]]:
    """``--against [NAME=]PATH ...``: paths without a name go to the tasks in order; none at all
    means every task's recorded source."""
    from .against import distance_to_finetuned
    from .store import Store

    names = [t["name"] for t in data["tasks"]]
    pairs: list[tuple[str, str]] = []
    if not args.against:
        pairs = [(t["name"], t["source"]) for t in data["tasks"]]
        missing = [n for n, p in pairs if not p]
        if missing:
            raise ValueError(f"tasks {missing} record no source checkpoint; name them: --against NAME=PATH")
    else:
        plain = 0
        for spec in args.against:
            name, sep, path = spec.partition("=")
            if not sep or os.path.exists(spec):
                if plain >= len(names):
                    raise ValueError(f"--against: more checkpoints than the store's {len(names)} tasks")
                name, path = names[plain], spec
                plain += 1
            elif name not in names:
                raise ValueError(f"--against {spec}: no task {name!r} in this store; tasks: {names}")
            pairs.append((name, path))
    with Store(args.store, verify=False) as st:
        return [distance_to_finetuned(st, n, p, base=args.base, backend="auto") for n, p in pairs]


def _inspect_strategy(args: argparse.Namespace) -> int:
    """inspect for a store of another strategy: what it keeps (its slots) and their bytes."""
    from .strategy_store import StrategyStore

    if args.against is not None:
        raise ValueError("--against compares ConDU's decoupled experts; this store holds another method")
    with StrategyStore(args.store, verify=not args.no_verify) as st:
        m = st.require()
        rule = st.rule
        storage = st.storage()
        data = {
            "store": st.root,
            "generation": st.generation,
            "method": m["method"],
            "options": m["options"],
            "continual": rule.continual,
            "task_aware": rule.task_aware,
            "slots": [dict(s.to_json(), bytes=storage["slot_bytes"][s.kind]) for s in rule.slots()],
            "tensors": len(m["tensors"]),
            "params": sum(math.prod(s.shape) for s in st.specs),
            "tasks": [
                {"name": t["name"], "added": t.get("added"), "source": (t.get("source") or {}).get("path")}
                for t in m["tasks"]
            ],
            "meta": m.get("meta") or {},
            "base": m.get("base"),
            "storage": storage,
            "verified": not args.no_verify,
        }
    opts = ", ".join(f"{k}={v}" for k, v in data["options"].items()) or "none"
    lines = [
        f"store {data['store']} ({data['method']}, generation {data['generation']}; "
        + ("every file's digest verified)" if data["verified"] else "files not verified: --no-verify)"),
        f"  options: {opts}",
        f"  {data['params']:,} parameters in {data['tensors']} tensors; base: {(data['base'] or {}).get('path', 'not recorded')}",
        f"  tasks: {', '.join(t['name'] for t in data['tasks'])}",
        f"  keeps ({'continual: O(1) models' if data['continual'] else 'non-continual: grows with the tasks'}):",
    ]
    for sl in data["slots"]:
        what = ("per task" if sl["per_task"] else "shared") + (", 1-bit packed" if sl["packed"] else "")
        what += ", float32 or wider" if sl["wide"] else ""
        what += ", written once" if sl["frozen"] else ""
        lines.append(f"    {sl['kind']:<10} {what:<40} {_mb(sl['bytes']):>12}")
    s = storage
    lines.append(
        f"  storage: {_mb(s['store_bytes'])} = {s['models']:.2f}x one model ({_mb(s['model_bytes'])}); "
        f"{s['tasks']} individual models: {_mb(s['individual_bytes'])}"
    )
    _emit(args, data, lines)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .manifest_check import store_method
    from .store_view import StoreView, ViewError

    if store_method(args.store) not in (None, "condu"):
        return _inspect_strategy(args)

    data = None
    try:  # torch-free and fast where the view can answer (by default after checking every field and
        # every file's digest, as verify does); the full Store names any problem it finds
        data, lora = _inspect_data(StoreView(args.store, verify=not args.no_verify), args)
    except ViewError:
        data = None
    if data is None:
        from .store import Store

        with Store(args.store, verify=not args.no_verify) as st:
            st.require()
            data, lora = _inspect_data(st, args)
    data["verified"] = not args.no_verify
    if args.against is not None:
        data["against"] = _against(args, data)
    storage, stats, tasks = data["storage"], data["overlaps"], data["tasks"]
    lines = [
        f"store {data['store']} (generation {data['generation']}, rescaler {data['rescaler']}; "
        + ("every file's digest verified)" if data["verified"] else "files not verified: --no-verify)"),
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
        (
            f"  LoRA factors: {_mb(s['condu_total_bytes'])} vs {s['tasks']} individual adapters: {_mb(s['individual_bytes'])}"
            if lora
            else f"  with the base model ({_mb(s['base_bytes'])}): {_mb(s['condu_total_bytes'])} vs {s['tasks']} individual models: {_mb(s['individual_bytes'])}"
        )
        + (f" ({s['individual_bytes'] / s['condu_total_bytes']:.1f}x)" if s["condu_total_bytes"] else ""),
        "  (the paper, 11 CLIP ViT-B/16 tasks: base 570.86 + unified 570.86 + masks 196.20 + rescalers 0.75 = 1377.92 MB vs 11 x 570.86 = 6279.46 MB)",
    ]
    if data.get("against"):

        def f(x: Any) -> str:
            return "-" if x is None else f"{x:.4f}"

        lines.append(f"  decoupled expert vs its fine-tuned checkpoint:  {'rel. L2':>8} {'cosine':>8} {'sign agr.':>9}")
        for a in data["against"]:
            t = a["total"]
            lines.append(
                f"  {a['task']:<20} (all tensors)              {f(t['rel_l2']):>8} {f(t['cosine']):>8} {f(t['sign_agreement']):>9}"
            )
            for g, m in a["groups"].items():
                lines.append(f"    {g:<44} {f(m['rel_l2']):>8} {f(m['cosine']):>8} {f(m['sign_agreement']):>9}")
    _emit(args, data, lines)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .strategy_store import open_any_store

    t0 = time.perf_counter()
    with open_any_store(args.store, verify=False) as st:
        st.require()
        rep = st.verify()
        files, size = rep.files, rep.bytes
        data = {
            "store": st.root,
            "ok": True,
            "files": files,
            "bytes": size,
            "digests": list(rep.algorithms),
            "tasks": st.task_names,
            "seconds": time.perf_counter() - t0,
        }
    _emit(
        args,
        data,
        [
            f"ok: {files} files, {_mb(size)}, {len(data['tasks'])} tasks verified ({', '.join(data['digests']) or 'no files'}) in {data['seconds']:.2f} s"
        ],
    )
    return 0


# ---------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    """One seed of the digits continual-learning benchmark (FT, every method; docs/results.md), or
    with ``--random-deltas`` the store walk-through on a seeded random model family."""
    if args.random_deltas:
        return _demo_random(args)
    from .demo import digits
    from .demo.run import BenchConfig, run_benchmark, summary_table

    n = digits.TASKS if args.tasks is None else digits.TASKS[: args.tasks]
    if args.tasks is not None and not 2 <= args.tasks <= len(digits.TASKS):
        raise ValueError(f"--tasks: the digits demo has 2 to {len(digits.TASKS)} task domains, got {args.tasks}")
    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    cfg = BenchConfig(
        seed=args.seed,
        mode=args.mode,
        tasks=tuple(n),
        rescaler=args.rescaler,
        workdir=args.keep,
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        test_per_domain=args.test_per_domain or None,
        shots=args.shots,
        top_k=args.top_k,
    )
    log = None if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    res = run_benchmark(cfg, log=log)
    wall = time.perf_counter() - t0
    res["timings"]["wall_s"] = wall
    lines = [
        f"Continual learning on real handwritten digits (scikit-learn load_digits), {len(n)} task domains "
        f"({', '.join(n)}) + held-out {', '.join(res['held_out'])}; {args.mode.upper()}, seed {args.seed}, "
        f"top-{cfg.top_k} routing; {wall:.0f} s",
        "",
        summary_table(res),
        "",
        "Acc. w/ task id: mean accuracy over the tasks after the last session, each with its task id (ConDU, EMR: the task's"
        " expert). Task-agnostic: the same without the task id (ConDU, EMR: routed to top-K experts by prototypes; single-model"
        " methods: their one model). Forgetting: mean drop from just-learned to the end (points). Held-out: domains no model"
        " trained on. Storage: what the method keeps beyond the pretrained model, in units of one fine-tuned model.",
        "",
    ]
    for name, chk in res["checks"].items():
        lines.append(f"check {'ok  ' if chk['ok'] else 'FAIL'} {name}: {chk['detail']}")
    for name, why in res.get("failed", {}).items():
        lines.append(f"strategy {name} dropped from the run: {why}")
    if args.keep:
        lines.append(
            f"files kept in {args.keep} (try: condu-merge inspect {args.keep}/store_{args.mode}_seed{args.seed})"
        )
    _emit(args, res, lines)
    return 0 if all(c["ok"] for c in res["checks"].values()) else 1


def _demo_random(args: argparse.Namespace) -> int:
    """A seeded model family (a base and ``tasks`` fine-tuned variants sharing some direction),
    merged continually through a store in a temporary directory, then every expert decoupled."""
    import torch

    n_tasks = 5 if args.tasks is None else args.tasks

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
        for i in range(n_tasks):
            name = f"task{i + 1}"
            finetuned = {
                k: base[k] + 0.01 * (0.5 * shared[k] + torch.randn(s, generator=gen)) for k, s in shapes.items()
            }
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
        "tasks": n_tasks,
        "params": storage["params"],
        "storage": storage,
        "experts": rows,
        "seconds": {"merge": t_merge, "verify": t_verify, "decouple_all": t_decouple},
    }
    lines = [
        f"merged {n_tasks} tasks of {storage['params']:,} parameters through a store in {t_merge * 1e3:.0f} ms "
        f"(verify {t_verify * 1e3:.0f} ms, decouple all {t_decouple * 1e3:.0f} ms)",
        f"stored: unified delta {_mb(storage['unified_bytes'])} + masks {_mb(sum(storage['mask_bytes_per_task']))} "
        f"({storage['mask_bits_per_param']:.3f} bit/param/task) + manifest {_mb(storage['manifest_bytes'])}; "
        f"with the base {_mb(storage['condu_total_bytes'])} vs {n_tasks} individual models {_mb(storage['individual_bytes'])}",
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

    a = sub.add_parser(
        "add-task", parents=[common], help="merge a fine-tuned checkpoint into a store (created on first use)"
    )
    a.add_argument("store")
    a.add_argument(
        "--base", required=True, help="pretrained checkpoint (safetensors file, sharded index, folder, .pt/.bin)"
    )
    a.add_argument("--finetuned", required=True, help="fine-tuned checkpoint or PEFT LoRA adapter folder")
    a.add_argument("--name", required=True, help="task name (unique in the store)")
    a.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="tensors taking part (fnmatch on names; repeatable; first task only)",
    )
    a.add_argument(
        "--exclude", action="append", metavar="GLOB", help="tensors left out (carried unchanged from the base)"
    )
    a.add_argument(
        "--rescaler",
        default=None,
        help="tensor_mean (default) | l1 | per_tensor (fixed by the first task; a later one may only repeat it)",
    )
    a.add_argument(
        "--dtype",
        choices=_DTYPES,
        help="dtype the store keeps u in (fixed by the first task; default: the checkpoint's)",
    )
    a.add_argument(
        "--method",
        help="merging strategy of the store: condu (default for a new store) or any of docs/strategies.md "
        "(fixed by the first task; a later one may only repeat it)",
    )
    a.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="an option of --method (repeatable; e.g. --set density=0.2 --set merge_func=mean); fixed by the first task",
    )
    a.add_argument("--backend", default="auto")
    a.add_argument("--no-check-base", action="store_true", help="do not compare the base's digest with the store's")
    a.add_argument(
        "--lora",
        choices=("factors", "dense"),
        help="PEFT adapters: merge the A/B factors (default) or dense B A deltas",
    )
    a.add_argument(
        "--lora-init", metavar="DIR", help="PEFT folder of the adapters' shared initialisation (factors; default: zero)"
    )
    a.set_defaults(func=_add_task)

    e = sub.add_parser(
        "export",
        parents=[common],
        help="write a task's expert: a from_pretrained folder, a PEFT adapter or safetensors",
    )
    e.add_argument("store")
    e.add_argument("--task", help="the task to export")
    e.add_argument("--all", action="store_true", help="every task, one subfolder each under -o")
    e.add_argument(
        "-o", "--output", required=True, help="file or folder (an existing folder or a path ending in / is a folder)"
    )
    e.add_argument(
        "--format",
        choices=("hf", "peft", "safetensors"),
        help="hf: save_pretrained folder; peft: adapter folder; safetensors: one file "
        "(default: peft for a LoRA-factor store, hf for a base folder, else safetensors)",
    )
    e.add_argument("--max-shard-size", default="50GB", help="hf: shard above this size (transformers' default 50GB)")
    e.add_argument("--rank", type=int, help="peft from a dense store: LoRA rank (default: the source adapter's)")
    e.add_argument("--task-type", help="peft: task_type to write (default: the source adapter's)")
    e.add_argument("--delta", action="store_true", help="the delta alone (no base needed)")
    e.add_argument("--base", help="base checkpoint (default: the one recorded in the store)")
    e.add_argument("--backend", default="auto")
    e.add_argument("--no-verify", action="store_true", help="skip the digest check of the store's files")
    e.add_argument("--no-check-base", action="store_true")
    e.add_argument("--force", action="store_true", help="replace an existing output file (never one the store reads)")
    e.set_defaults(func=_export)

    r = sub.add_parser(
        "run", parents=[common], help="add a recipe's tasks in order (YAML or JSON), resuming where a run stopped"
    )
    r.add_argument("recipe", help="recipe file (.yaml/.yml needs PyYAML, else JSON); see condu_merge/recipe.py")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (tasks, tensors, bytes, peak memory and disk); write nothing",
    )
    r.set_defaults(func=_run)

    i = sub.add_parser(
        "inspect", parents=[common], help="tasks, sizes, mask density and overlaps, storage vs individual models"
    )
    i.add_argument("store")
    i.add_argument("--no-overlaps", action="store_true", help="skip the pairwise mask overlaps (reads every mask)")
    i.add_argument(
        "--against",
        nargs="*",
        metavar="[NAME=]FT",
        help="per task: the decoupled expert vs its fine-tuned checkpoint (relative L2, cosine, sign agreement per "
        "tensor group); no value: each task's recorded source",
    )
    i.add_argument("--base", help="--against: the base checkpoint (default: the store's recorded one)")
    i.add_argument(
        "--no-verify", action="store_true", help="skip the digest check of every file (fast; says so in the output)"
    )
    i.set_defaults(func=_inspect)

    v = sub.add_parser(
        "verify", parents=[common], help="check every file of a store against its recorded digest (sha256 or blake3)"
    )
    v.add_argument("store")
    v.set_defaults(func=_verify)

    d = sub.add_parser(
        "demo",
        parents=[common],
        help="continual learning on real digits, every strategy side by side (--random-deltas: the store walk-through)",
    )
    d.add_argument(
        "--tasks", type=int, help="number of task domains (digits: 2-6, default 6; --random-deltas: default 5)"
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--mode", choices=("ft", "lora"), default="ft", help="fine-tune the image tower, or LoRA factors")
    d.add_argument("--pretrain-steps", type=int, default=250, help="pre-training steps of the tiny CLIP")
    d.add_argument("--steps", type=int, default=60, help="fine-tuning steps per expert")
    d.add_argument("--test-per-domain", type=int, default=250, help="test images per domain (all: 0)")
    d.add_argument("--shots", type=int, help="few-shot: training images per class and task")
    d.add_argument("--top-k", type=int, default=2, help="experts aggregated for a task-agnostic sample")
    d.add_argument("--rescaler", default="tensor_mean")
    d.add_argument(
        "--random-deltas",
        action="store_true",
        help="instead: merge random deltas of a seeded model family through a store and decouple them",
    )
    d.add_argument("--keep", metavar="DIR", help="work in DIR and keep the files (default: a temporary directory)")
    d.set_defaults(func=_demo)
    return p


def entry() -> int:
    """The ``condu-merge`` program (``python -m condu_merge`` too): :func:`main` in a process of its own.

    numpy's OpenBLAS starts a thread per core when numpy is imported, and the thread spins for a
    while waiting for work (28% of one core over a 0.5 s sleep after ``import numpy`` here). The
    command does no numpy linear algebra, and on a 2-core machine that thread takes a core from
    the merge's kernels and I/O threads; so unless the environment says otherwise, the process's
    OpenBLAS gets one thread (torch's BLAS is its own and unaffected)."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    return main()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # the reader went away (`inspect --json | head`): nothing left to say to it; stop quietly,
        # and point stdout at /dev/null so the interpreter's final flush does not complain either
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("condu-merge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
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
