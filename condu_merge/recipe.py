"""Recipes: a YAML or JSON file naming a base, the tasks in order and a store; ``condu-merge run``
adds them in order, skipping tasks already stored with the same name and source hash, so a run
that was killed resumes where it stopped (every task is one crash-safe store commit).

A recipe::

    store: runs/store              # relative paths are relative to the recipe's folder
    base: models/clip-vit-b16      # a checkpoint file or folder
    options:                       # defaults for every task (all optional)
      rescaler: tensor_mean        # fixed when the store is created
      include: ["visual.*"]        # first task only (the store's tensor set)
      exclude: []
      dtype: float16
      backend: auto
      lora: factors                # PEFT adapters: factors | dense
      lora_init: lora-init/        # factor-wise: the adapters' shared initialisation
      check_base: true
    method: ties                   # optional: any strategy of the registry (default condu)
    set: {density: 20}             # that method's options (condu-merge add-task --set)
    tasks:
      - {name: cars, path: ft/cars}
      - {name: dtd, path: ft/dtd, backend: torch}   # per-task options override `options`

YAML needs PyYAML (``pip install condu-merge[recipe]``); JSON always works.

:func:`add_one` is also what ``condu-merge add-task`` runs: the model family's default tensor set
(:mod:`condu_merge.families`), the LoRA route (factor-wise by default for PEFT adapters), and the
refusal of a rescaler other than the store's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Recipe", "RecipeError", "TaskSpec", "add_one", "load_recipe", "plan", "run_recipe", "source_hash"]

TASK_OPTIONS = ("rescaler", "include", "exclude", "dtype", "backend", "lora", "lora_init", "check_base")
_DTYPES = ("float32", "float16", "bfloat16", "float64")


class RecipeError(ValueError):
    """A recipe that cannot be run as written (names the file and the key)."""


@dataclass
class TaskSpec:
    name: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    path: str
    store: str
    base: str
    tasks: list[TaskSpec]
    method: str = "condu"
    method_options: dict[str, Any] = field(default_factory=dict)


CONDU_ONLY = ("rescaler", "lora", "lora_init")
"""Task options that are ConDU's: refused in a recipe of another ``method`` (its options go in ``set``)."""


def _parse_text(path: str, text: str) -> Any:
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise RecipeError(
                f"{path}: YAML recipes need PyYAML (pip install 'condu-merge[recipe]'), or write the recipe as JSON"
            ) from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}: not valid JSON ({exc})") from None


def _check_options(opts: Any, where: str) -> dict[str, Any]:
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise RecipeError(f"{where}: options must be a mapping")
    for k, v in opts.items():
        if k not in TASK_OPTIONS:
            raise RecipeError(f"{where}: unknown option {k!r}; known: {list(TASK_OPTIONS)}")
        if k in ("include", "exclude") and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise RecipeError(f"{where}: {k} must be a list of glob strings")
        if k == "dtype" and v not in _DTYPES:
            raise RecipeError(f"{where}: dtype {v!r} is not one of {list(_DTYPES)}")
        if k == "lora" and v not in ("factors", "dense"):
            raise RecipeError(f"{where}: lora {v!r} is not 'factors' or 'dense'")
        if k == "check_base" and not isinstance(v, bool):
            raise RecipeError(f"{where}: check_base must be true or false")
        if k in ("rescaler", "backend", "lora_init") and not isinstance(v, str):
            raise RecipeError(f"{where}: {k} must be a string")
    return dict(opts)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Parse and check a recipe; relative paths are resolved against the recipe's folder."""
    path = os.path.abspath(os.fspath(path))
    with open(path, encoding="utf-8") as fh:
        raw = _parse_text(path, fh.read())
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with store, base and tasks")
    unknown = set(raw) - {"store", "base", "tasks", "options", "method", "set"}
    if unknown:
        raise RecipeError(
            f"{path}: unknown key(s) {sorted(unknown)}; a recipe has store, base, options, method, set, tasks"
        )
    method = raw.get("method", "condu")
    sets = raw.get("set") or {}
    if not isinstance(method, str) or not isinstance(sets, dict):
        raise RecipeError(f"{path}: 'method' must name a strategy and 'set' be a mapping of its options")
    if method == "condu" and sets:
        raise RecipeError(f"{path}: 'set' gives options of another method; ConDU's are rescaler and dtype in options")
    if method != "condu":
        from .strategies.rule import get_rule

        try:
            get_rule(method, **sets)
        except ValueError as exc:
            raise RecipeError(f"{path}: {exc}") from None
    for k in ("store", "base"):
        if not isinstance(raw.get(k), str) or not raw[k]:
            raise RecipeError(f"{path}: '{k}' must name a path")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise RecipeError(f"{path}: 'tasks' must be a non-empty list")
    here = os.path.dirname(path)
    defaults = _check_options(raw.get("options"), f"{path}: options")

    def res(p: str) -> str:
        return os.path.normpath(os.path.join(here, os.path.expanduser(p)))

    specs, seen = [], set()
    for i, t in enumerate(tasks):
        where = f"{path}: tasks[{i}]"
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("name"), str)
            or not t["name"].strip()
            or not isinstance(t.get("path"), str)
        ):
            raise RecipeError(f"{where}: a task needs a name and a path")
        if t["name"] in seen:
            raise RecipeError(f"{where}: task {t['name']!r} is listed twice")
        seen.add(t["name"])
        opts = {**defaults, **_check_options({k: v for k, v in t.items() if k not in ("name", "path")}, where)}
        condu_only = sorted(k for k in opts if k in CONDU_ONLY)
        if method != "condu" and condu_only:
            raise RecipeError(f"{where}: {condu_only} are ConDU's options; method {method} takes its options in 'set'")
        if "lora_init" in opts:
            opts["lora_init"] = res(opts["lora_init"])
        specs.append(TaskSpec(t["name"], res(t["path"]), opts))
    return Recipe(
        path=path, store=res(raw["store"]), base=res(raw["base"]), tasks=specs, method=method, method_options=dict(sets)
    )


def source_hash(path: str) -> str:
    """sha256 identity of a fine-tuned checkpoint or adapter (of its files; see
    :func:`~condu_merge.checkpoints.checkpoint_identity`)."""
    from .checkpoints import checkpoint_identity, open_checkpoint

    ck = open_checkpoint(path)
    try:
        return str(checkpoint_identity(ck)["sha256"])
    finally:
        ck.close()


# ---------------------------------------------------------------------------- one task


def _is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def lora_route(store, finetuned: str, lora: str | None, lora_init: str | None) -> bool:
    """Whether ``finetuned`` goes in factor-wise: PEFT adapters do unless ``lora="dense"`` or the
    store is dense; a mode that contradicts the store's is refused naming both."""
    from .manifest_check import lora_mode

    adapter = _is_adapter(finetuned)
    have = lora_mode(store) if store.exists else None
    want = lora or (have if have else ("factors" if adapter else "dense"))
    if lora and have and lora != have and (adapter or have == "factors"):
        raise ValueError(f"{store.root}: --lora {lora} given, but this store was created with --lora {have}")
    if want == "factors" and not adapter:
        raise ValueError(f"{finetuned}: --lora factors needs a PEFT adapter folder (adapter_config.json)")
    if lora_init and want != "factors":
        raise ValueError("--lora-init applies to factor-wise LoRA stores only (--lora factors)")
    return want == "factors"


def family_left_out(base: str, finetuned: str) -> tuple[str, list[str]]:
    """The model family's default exclusions among the base's floating-point tensors (the rule
    the Python adapters follow too: :mod:`condu_merge.families`)."""
    from .checkpoints import PeftAdapter, open_checkpoint
    from .families import default_left_out

    if _is_adapter(finetuned):
        return "", []
    ck = open_checkpoint(base)
    try:
        if isinstance(ck, PeftAdapter):
            return "", []
        keys = [k for k in ck.keys() if ck.spec(k).is_floating_point]
    finally:
        ck.close()
    return default_left_out(keys)


def _sized_backend(store, base: str, finetuned: str, backend: str) -> str:
    """``auto`` resolved by the job's size (:func:`~condu_merge.backends.auto_for_size`): the
    store's tensors, or for a new store the base's floating-point tensors (read from the header)."""
    from .backends import auto_for_size

    if backend != "auto":
        return backend
    if store.exists:
        numel = sum(math.prod(s.shape) for s in store.specs)
    elif _is_adapter(finetuned) and os.path.isfile(os.path.join(finetuned, "adapter_model.safetensors")):
        numel = os.path.getsize(os.path.join(finetuned, "adapter_model.safetensors")) // 2  # ≥ the factor elements
    else:
        from .checkpoints import open_checkpoint

        ck = open_checkpoint(base)
        try:
            numel = sum(math.prod(ck.spec(k).shape) for k in ck.keys() if ck.spec(k).is_floating_point)
        finally:
            ck.close()
    return auto_for_size(backend, numel)


def _torch_dtype(name: str | None) -> Any:
    """``--dtype``'s torch dtype (torch is imported only when one is given)."""
    if not name:
        return None
    import torch

    return getattr(torch, name)


def add_one(
    store,
    name: str,
    base: str,
    finetuned: str,
    *,
    rescaler: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    lora: str | None = None,
    lora_init: str | None = None,
    check_base: bool = True,
    progress: bool = False,
    source_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Add one task as ``condu-merge add-task`` does; returns ``{"left_out", "family"}``.

    ``rescaler=None`` means the store's mode (``tensor_mean`` for a new store); another mode than
    an existing store's is refused naming both."""
    if store.exists and rescaler is not None and rescaler != store.rescaler:
        raise ValueError(
            f"{store.root}: --rescaler {rescaler} given, but this store was created with --rescaler {store.rescaler} "
            "(the mode is fixed when a store is created)"
        )
    mode = store.rescaler if store.exists else (rescaler or "tensor_mean")
    backend = _sized_backend(store, base, finetuned, backend)
    # how the base was named (a folder stays a folder: export's default format and hf files)
    source_extra = {"base_arg": os.path.abspath(base), **(source_extra or {})}
    if lora_route(store, finetuned, lora, lora_init):
        from . import lora_store

        lora_store.add_adapter_task(
            store,
            name,
            base,
            finetuned,
            init=lora_init,
            rescaler=mode,
            backend=backend,
            progress=progress,
            source_extra=source_extra,
        )
        return {"left_out": [], "family": "lora"}
    family, left_out = family_left_out(base, finetuned) if not store.exists and not include else ("", [])
    store.add_task_from_checkpoints(
        name,
        base,
        finetuned,
        include=include,
        exclude=list(exclude or []) + left_out or None,
        dtype=_torch_dtype(dtype),
        rescaler=mode,
        backend=backend,
        progress=progress,
        check_base=check_base,
        source_extra=source_extra,
    )
    return {"left_out": left_out, "family": family}


# ---------------------------------------------------------------------------- plan and run


def _status(store, t: TaskSpec) -> tuple[str, str]:
    """``("skip" | "add", source hash)``; a stored task of that name from another source is refused."""
    h = source_hash(t.path)
    if t.name in store.task_names:
        src = store.task_info(t.name).get("source") or {}
        if src.get("sha256") == h or (src.get("sha256") is None and src.get("path") == os.path.abspath(t.path)):
            return "skip", h  # (a task added by add-task records no hash: the same path counts)
        raise RecipeError(
            f"{store.root}: task {t.name!r} is already stored from another source "
            f"({src.get('path')}, sha256 {str(src.get('sha256'))[:12]}…; the recipe's {t.path} is {h[:12]}…); rename the task or use a new store"
        )
    return "add", h


def plan(recipe: Recipe) -> dict[str, Any]:
    """What :func:`run_recipe` would do, without writing: per task skip/add; the tensors and
    bytes taking part; the store's size after the run; peak disk (two generations exist while a
    task commits) and an estimate of peak memory (the largest tensor's streaming work)."""
    from .checkpoints import PeftAdapter, TaskDelta, open_checkpoint, select_keys
    from .safetensors_writer import dtype_itemsize

    with _open_store(recipe) as st:
        rows = [{"name": t.name, "path": t.path, "action": _status(st, t)[0]} for t in recipe.tasks]
        t0 = recipe.tasks[0]
        if st.exists:
            specs = [(s.name, math.prod(s.shape), dtype_itemsize(s.dtype), dtype_itemsize(s.dtype)) for s in st.specs]
            n_before = len(st.task_names)
        else:
            n_before = 0
            base, ft = open_checkpoint(recipe.base), open_checkpoint(t0.path)
            try:
                if isinstance(ft, PeftAdapter) and (t0.options.get("lora") or "factors") == "factors":
                    from .adapters.lora import LoraAdapter

                    ad = LoraAdapter.load(t0.path)
                    specs = [
                        (f"{m}.lora_{x}.weight", t.numel(), t.element_size(), t.element_size())
                        for m, ab in ad.factors.items()
                        for x, t in zip("AB", ab)
                    ]
                else:
                    td = TaskDelta(base, ft)
                    inc, exc = t0.options.get("include"), list(t0.options.get("exclude") or [])
                    if not inc:
                        exc += family_left_out(recipe.base, t0.path)[1]
                    keys = (
                        select_keys(td.candidate_keys(), inc, exc) if inc else select_keys(td.default_keys(), None, exc)
                    )
                    import torch

                    want = getattr(torch, t0.options["dtype"]) if t0.options.get("dtype") else None
                    specs = []
                    for k in keys:
                        bs = base.spec(k)
                        src_dt = ft.spec(k).dtype if not td.is_adapter and k in ft.keys() else bs.dtype
                        specs.append((k, math.prod(bs.shape), dtype_itemsize(want or src_dt), dtype_itemsize(bs.dtype)))
            finally:
                base.close()
                ft.close()
    n_after = n_before + sum(r["action"] == "add" for r in rows)
    params = sum(n for _, n, _, _ in specs)
    u_bytes = sum(n * isz for _, n, isz, _ in specs)
    mask_bytes = sum((n + 7) // 8 for _, n, _, _ in specs)
    store_after = u_bytes + n_after * mask_bytes
    peak_disk = store_after + (u_bytes + (n_after - 1) * mask_bytes if n_after > 1 else 0)
    if recipe.method != "condu":  # the rule's slots: shared ones once, per-task ones per task
        from .strategies.rule import get_rule

        shared = per_task = rewritten = 0
        for slot in get_rule(recipe.method, **recipe.method_options).slots():
            b = sum((n + 7) // 8 if slot.packed else n * (max(isz, 4) if slot.wide else isz) for _, n, isz, _ in specs)
            if slot.per_task:
                per_task += b
                rewritten += 0 if slot.frozen else b
            else:
                shared += b
        store_after = shared + n_after * per_task
        # while a task commits: the old generation, plus the new one's rewritten files (frozen ones are links)
        peak_disk = store_after + (shared + (n_after - 1) * rewritten if n_after > 1 else 0)
    big = max(specs, key=lambda s: s[1]) if specs else ("", 0, 0, 0)
    # one tensor in flight: base and fine-tuned reads, the float32 delta, old and new u, t+1 mask rows
    peak_mem = big[1] * (2 * big[3] + 4 + 2 * big[2]) + 2 * (n_after + 1) * ((big[1] + 7) // 8)
    return {
        "recipe": recipe.path,
        "store": recipe.store,
        "base": recipe.base,
        "tasks": rows,
        "tensors": len(specs),
        "params": params,
        "bytes_per_task": u_bytes,
        "store_bytes_after": store_after,
        "peak_disk_bytes": peak_disk,
        "method": recipe.method,
        "peak_memory_bytes": peak_mem,
        "largest_tensor": big[0],
    }


def _open_store(recipe: Recipe) -> Any:
    """The recipe's store: ConDU's, or a :class:`~condu_merge.strategy_store.StrategyStore` of its
    ``method`` (an existing store of another method is refused naming both)."""
    from .store import Store
    from .strategy_store import StrategyStore, open_any_store

    st = open_any_store(recipe.store, verify=False)
    have = st.method if isinstance(st, StrategyStore) else ("condu" if st.exists else None)
    if have is not None and have != recipe.method:
        st.close()
        raise RecipeError(
            f"{recipe.path}: method {recipe.method} differs from the store's {have} ({recipe.store}); "
            "fix the recipe, or start a new store"
        )
    if recipe.method != "condu" and isinstance(st, Store):
        st.close()
        st = StrategyStore(recipe.store, verify=False)
    return st


def _add_strategy_task(st: Any, recipe: Recipe, t: TaskSpec, h: str) -> None:
    import torch

    o = t.options
    include, exclude = o.get("include"), list(o.get("exclude") or [])
    if not st.exists and not include:
        exclude += family_left_out(recipe.base, t.path)[1]
    st.add_task_from_checkpoints(
        t.name,
        recipe.base,
        t.path,
        method=recipe.method,
        options=recipe.method_options,
        include=include,
        exclude=exclude or None,
        dtype=getattr(torch, o["dtype"]) if o.get("dtype") else None,
        check_base=o.get("check_base", True),
        source_extra={"sha256": h, "base_arg": os.path.abspath(recipe.base)},
    )


def run_recipe(recipe: Recipe, *, progress: bool = False, on_task=None) -> list[dict[str, Any]]:
    """Add the recipe's tasks in order (skipping those already stored from the same source);
    ``progress``: one bar over the tasks. ``on_task(row)`` is called after each task."""
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(recipe.tasks), unit="task", desc="recipe")
    try:
        with _open_store(recipe) as st:
            for t in recipe.tasks:
                if bar is not None:
                    bar.set_description(t.name)
                action, h = _status(st, t)
                row = {
                    "name": t.name,
                    "path": t.path,
                    "action": "skipped" if action == "skip" else "added",
                    "sha256": h,
                }
                if action == "add" and recipe.method != "condu":
                    _add_strategy_task(st, recipe, t, h)
                    row["left_out"] = []
                elif action == "add":
                    o = t.options
                    info = add_one(
                        st,
                        t.name,
                        recipe.base,
                        t.path,
                        rescaler=o.get("rescaler"),
                        include=o.get("include"),
                        exclude=o.get("exclude"),
                        dtype=o.get("dtype"),
                        backend=o.get("backend", "auto"),
                        lora=o.get("lora"),
                        lora_init=o.get("lora_init"),
                        check_base=o.get("check_base", True),
                        source_extra={"sha256": h},
                    )
                    row["left_out"] = info["left_out"]
                rows.append(row)
                if on_task is not None:
                    on_task(row)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows
