"""What a store's ``manifest.json`` may hold, checked without torch.

:func:`check_manifest_structure` refuses a manifest whose fields the store would trip over (a
hand-edited one whose checksum was recomputed, or one written by a buggy tool): wrong types,
non-finite or negative rescalers, file names outside the generation folder, tasks pointing at
files the manifest does not list. :class:`~condu_merge.store.Store` and the CLI's torch-free
:class:`~condu_merge.store_view.StoreView` both call it, so ``inspect`` checks what ``verify`` does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NoReturn

from .digests import HASH_ALGORITHMS
from .errors import FormatError

__all__ = [
    "GENERATION_RE",
    "RESCALER_MODES",
    "SAFETENSORS_DTYPES",
    "STORE_FILE_RE",
    "UNIFIED",
    "check_manifest_structure",
    "check_strategy_manifest",
    "mask_file",
    "proto_file",
    "store_method",
]

UNIFIED = "unified.safetensors"
"""The unified delta's file name, relative to a generation directory."""

RESCALER_MODES = ("tensor_mean", "l1", "per_tensor")
"""The rescaler modes a store (and :func:`condu_merge.core.compute_rescalers`) knows."""

ST_ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
"""safetensors dtype names and their item sizes: what a header says, with no torch or numpy (the
store's light view reads them too)."""
SAFETENSORS_DTYPES = frozenset(ST_ITEMSIZE)
"""safetensors dtype names a store may record (the keys of ``safetensors_writer.ST_TO_DTYPE``;
a test keeps the two equal)."""

GENERATION_RE = re.compile(r"gen-\d{6,}")
STORE_FILE_RE = re.compile(r"(unified|masks/\d{4,}|prototypes/\d{4,})\.safetensors")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_common(m: dict[str, Any], bad: Callable[[str], NoReturn], file_re: re.Pattern[str]) -> set[str]:
    """The fields every store manifest shares: generation, its folder, the files (names by
    ``file_re``, each with a size and a digest: ``sha256`` or ``blake3``) and the tensors;
    returns the tensor names."""
    if not _is_int(m.get("generation")) or m["generation"] < 1:
        bad(f"generation {repr(m.get('generation'))[:40]} is not a positive integer")
    gd = m.get("generation_dir")
    if not isinstance(gd, str) or not GENERATION_RE.fullmatch(gd):
        bad(f"generation_dir {gd!r} is not a generation folder name")
    files = m.get("files")
    if not isinstance(files, dict):
        bad("files is not an object")
    for rel, info in files.items():
        if not isinstance(rel, str) or not file_re.fullmatch(rel):
            bad(f"file name {rel!r} is not a store file")
        if (
            not isinstance(info, dict)
            or not _is_int(info.get("bytes"))
            or info["bytes"] < 0
            or not any(isinstance(info.get(a), str) for a in HASH_ALGORITHMS)
        ):
            bad(f"file entry {rel!r} lacks a byte count or a digest ({' or '.join(HASH_ALGORITHMS)})")
    tensors = m.get("tensors")
    if not isinstance(tensors, list) or not tensors:
        bad("it lists no tensors")
    names: set[str] = set()
    for t in tensors:
        ok = (
            isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and t.get("dtype") in SAFETENSORS_DTYPES
            and isinstance(t.get("shape"), list)
            and all(_is_int(x) and x >= 0 for x in t["shape"])
            and math.prod(t["shape"]) <= 2**62
        )
        if not ok:
            bad(f"tensor entry {repr(t)[:200]} needs a name, a dtype of {sorted(SAFETENSORS_DTYPES)} and a shape")
        if t["name"] in names:
            bad(f"tensor {t['name']!r} is listed twice")
        names.add(t["name"])
    return names


def check_manifest_structure(m: dict[str, Any], mpath: str) -> None:
    """Refuse a manifest whose fields the store would trip over (a hand-edited one whose
    checksum was recomputed, or one written by a buggy tool): wrong types, file names outside
    the generation folder, tasks pointing at files the manifest does not list."""

    def bad(what: str) -> NoReturn:
        raise FormatError(f"{mpath}: damaged store manifest ({what})")

    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def is_num(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0

    if m.get("rescaler") not in RESCALER_MODES:
        bad(f"rescaler {repr(m.get('rescaler'))[:40]} is not one of {list(RESCALER_MODES)}")
    base = m.get("base")
    if base is not None and not (
        isinstance(base, dict)
        and isinstance(base.get("path"), str)
        and all(base.get(a) is None or isinstance(base[a], str) for a in HASH_ALGORITHMS)
        and is_int(base.get("bytes"))
        and base["bytes"] >= 0
    ):
        bad("base is not {path, sha256 or blake3, bytes}")
    sel = m.get("selection")
    if sel is not None and not (
        isinstance(sel, dict)
        and all(
            isinstance(sel.get(k, []), list) and all(isinstance(g, str) for g in sel.get(k, []))
            for k in ("include", "exclude")
        )
    ):
        bad("selection is not {include: [globs], exclude: [globs]}")

    names = _check_common(m, bad, STORE_FILE_RE)
    files = m["files"]
    tensors = m["tensors"]
    if UNIFIED not in files:
        bad("files does not list the unified delta")
    tasks = m.get("tasks")
    if not isinstance(tasks, list):
        bad("tasks is not a list")
    params = sum(math.prod(t["shape"]) for t in tensors)
    seen: set[str] = set()
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            bad(f"task #{i} has no name")
        if t["name"] in seen:
            bad(f"task {t['name']!r} is listed twice")
        seen.add(t["name"])
        if t.get("masks") != mask_file(i) or t["masks"] not in files:
            bad(
                f"task {t['name']!r}: its mask file {repr(t.get('masks'))[:80]} is not {mask_file(i)!r} among the files"
            )
        if t.get("prototypes") is not None and (t["prototypes"] != proto_file(i) or t["prototypes"] not in files):
            bad(
                f"task {t['name']!r}: its prototypes file {repr(t['prototypes'])[:80]} is not {proto_file(i)!r} among the files"
            )
        r = t.get("rescaler")
        if m["rescaler"] == "per_tensor":
            ok = isinstance(r, dict) and set(r) == names and all(is_num(x) for x in r.values())
        else:
            ok = is_num(r)
        if not ok:
            want = (
                "a finite non-negative number per tensor"
                if m["rescaler"] == "per_tensor"
                else "a finite non-negative number"
            )
            bad(f"task {t['name']!r}: rescaler {repr(r)[:80]} is not {want}")
        if not is_int(t.get("mask_bits")) or not 0 <= t["mask_bits"] <= params:
            bad(
                f"task {t['name']!r}: mask_bits {repr(t.get('mask_bits'))[:40]} is not a count of set bits (0..{params})"
            )
        if t.get("source") is not None and not (
            isinstance(t["source"], dict) and isinstance(t["source"].get("path", ""), str)
        ):
            bad(f"task {t['name']!r}: source is not {{path, kind}}")
    owned = {UNIFIED} | {t["masks"] for t in tasks} | {t["prototypes"] for t in tasks if t.get("prototypes")}
    stray = [rel for rel in files if rel not in owned]
    if stray:
        bad(f"file {stray[0]!r} belongs to no task")


def mask_file(index: int) -> str:
    """Task ``index``'s mask file, relative to its generation directory."""
    return f"masks/{index:04d}.safetensors"


def proto_file(index: int) -> str:
    """Task ``index``'s prototypes file, relative to its generation directory."""
    return f"prototypes/{index:04d}.safetensors"


DATA_FILE_RE = re.compile(r"[a-z][a-z_]*(/\d{4,})?\.safetensors")
SLOT_KIND_RE = re.compile(r"[a-z][a-z_]*")


def check_strategy_manifest(m: dict[str, Any], mpath: str) -> None:
    """:func:`check_manifest_structure` for a store of another strategy than ConDU (a
    :class:`~condu_merge.strategy_store.StrategyStore`): method, options, slots, tensors, tasks,
    and every slot's files listed with a size and a digest."""

    def bad(what: str) -> NoReturn:
        raise FormatError(f"{mpath}: damaged store manifest ({what})")

    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(m.get("method"), str) or not SLOT_KIND_RE.fullmatch(m["method"]):
        bad(f"method {repr(m.get('method'))[:40]} is not a method name")
    if not isinstance(m.get("options"), dict):
        bad("options is not an object")
    _check_common(m, bad, DATA_FILE_RE)
    files = m["files"]
    tasks = m.get("tasks")
    if not isinstance(tasks, list):
        bad("tasks is not a list")
    seen: set[str] = set()
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t["name"] in seen:
            bad(f"task #{i} has no name or repeats one")
        seen.add(t["name"])
    slots = m.get("slots")
    if not isinstance(slots, list) or not slots:
        bad("it lists no slots")
    want: set[str] = set()
    for s in slots:
        if not isinstance(s, dict) or not isinstance(s.get("kind"), str) or not SLOT_KIND_RE.fullmatch(s["kind"]):
            bad(f"slot {repr(s)[:80]} has no kind")
        if s.get("per_task"):
            want.update(f"{s['kind']}/{i:04d}.safetensors" for i in range(len(tasks)))
        else:
            want.add(f"{s['kind']}.safetensors")
    if want != set(files):
        bad(f"its files {sorted(set(files) ^ want)[:4]} do not match its slots and tasks")
    if not isinstance(m.get("meta", {}), dict):
        bad("meta is not an object")


def store_method(root: str) -> str | None:
    """The method the store at ``root`` records (``"condu"`` for a ConDU store), ``None`` if there
    is no store there yet. A manifest that cannot be read counts as ConDU's: the store's own loader
    then names what is wrong with it."""
    import json
    import os

    mpath = os.path.join(root, "manifest.json")
    if not os.path.isfile(mpath):
        return None
    try:
        with open(mpath, "rb") as fh:
            m = json.loads(fh.read())
    except (OSError, ValueError, RecursionError):
        return "condu"
    method = m.get("method", "condu") if isinstance(m, dict) else "condu"
    return method if isinstance(method, str) else "condu"


# ---------------------------------------------------------------------------- LoRA factor stores

LORA_FACTORS_KIND = "peft-lora-factors"
"""A task ``source`` kind: the task's PEFT adapter was merged factor by factor (:mod:`condu_merge.lora_store`)."""
LORA_MODES = ("factors", "dense")


def is_lora_store(store: Any) -> bool:
    """Whether ``store`` holds LoRA factors (its first task's source is a factor-wise adapter)."""
    tasks = store.manifest["tasks"] if store.manifest else []
    return bool(tasks) and (tasks[0].get("source") or {}).get("kind") == LORA_FACTORS_KIND


def lora_mode(store: Any) -> str | None:
    """``"factors"``, ``"dense"`` or ``None`` (an empty store)."""
    if not store.manifest:
        return None
    return "factors" if is_lora_store(store) else "dense"
