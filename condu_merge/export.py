"""Exports a library loads: a ``save_pretrained``-style folder, a PEFT adapter folder, or one
safetensors file, per task of a store.

Formats (:data:`FORMATS`):

* ``hf`` -- a folder ``from_pretrained(DIR, local_files_only=True)`` loads: the base folder's
  non-weight files (``config.json``, tokenizer / processor files, ``generation_config.json``, …)
  copied, weights ``θ_0 + λ M ⊙ u`` as ``model.safetensors`` (metadata ``format: pt``), or above
  ``max_shard_size`` (:data:`DEFAULT_MAX_SHARD_SIZE`, transformers' ``save_pretrained`` default)
  shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, split by
  the rule of ``huggingface_hub.split_torch_state_dict_into_shards``.
* ``peft`` -- an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``):
  for a store of LoRA factors (:mod:`condu_merge.lora_store`) the decoupled factors themselves,
  with the source adapter's config; for a dense store, a truncated SVD (:func:`export_peft`).
* ``safetensors`` -- one file (the expert, or with ``delta=True`` the decoupled delta alone).

Every export is written into a temporary sibling (``.NAME.tmp-PID``) and renamed into place;
an existing output is replaced only with ``overwrite=True``, and never one inside the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "FORMATS",
    "WEIGHT_SUFFIXES",
    "default_format",
    "export_all",
    "export_task",
    "parse_size",
    "plan_shards",
    "resolve_output",
]

FORMATS = ("hf", "peft", "safetensors")
DEFAULT_MAX_SHARD_SIZE = 50 * 10**9
"""``save_pretrained``'s default ``max_shard_size="50GB"`` (transformers 5; 4.x used 5GB)."""

# files of a model folder that hold weights (never copied into an hf export: ours replace them)
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".tflite",
    ".index.json",
)
_HF_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB`` / ``500MB`` / ``2GiB`` / ``1000`` (transformers' ``convert_file_size_to_int``
    units: ``GB = 10⁹``, ``GiB = 2³⁰``)."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if m is None or m.group(2).upper() not in _UNITS:
            raise ValueError(f"shard size {size!r} is not a size like 5GB, 500MB, 2GiB or a byte count")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < 1:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return n


def plan_shards(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Tensor names per shard, in order, by huggingface_hub's rule: a tensor larger than the limit
    gets a shard of its own; otherwise a new shard starts when the next tensor would overflow."""
    shards: list[list[str]] = []
    cur: list[str] = []
    cur_size = 0
    for k, n in sizes.items():
        if n > max_shard_size:
            shards.append([k])
            continue
        if cur and cur_size + n > max_shard_size:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(k)
        cur_size += n
    if cur or not shards:
        shards.append(cur)
    return shards


# ---------------------------------------------------------------------------- paths


def _base_folder(path: str | None, *, beside: bool = True) -> str | None:
    """The save_pretrained folder a base path belongs to: the folder itself, or (``beside``) the
    folder of a ``model.safetensors`` / index / ``pytorch_model.bin`` next to a ``config.json``."""
    if not path:
        return None
    p = os.path.abspath(path)
    if os.path.isdir(p):
        return p if os.path.isfile(os.path.join(p, "config.json")) else None
    if not beside:
        return None
    folder = os.path.dirname(p)
    if os.path.basename(p) in _HF_MODEL_FILES and os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    return None


def _is_lora_store(store) -> bool:
    tasks = store.manifest["tasks"] if store.manifest else []
    return bool(tasks) and ((tasks[0].get("source") or {}).get("kind") == "peft-lora-factors")


def _recorded_base(store, task: str) -> str | None:
    """The base as the user named it when the store was created (``base_arg``, recorded by the
    CLI and recipes: a folder stays a folder), else the checkpoint file the store identified."""
    first = (store.manifest["tasks"][0].get("source") or {}) if store.manifest["tasks"] else {}
    if first.get("base_arg") and os.path.exists(first["base_arg"]):
        return first["base_arg"]
    src = store.task_info(task).get("source") or {}
    if src.get("kind") == "peft-lora-factors":
        return (src.get("base") or {}).get("path")
    return (store.manifest.get("base") or {}).get("path")


def default_format(store, task: str, base: str | None = None) -> str:
    """``peft`` for a store of LoRA factors, ``hf`` when the base is a model folder (given, or the
    recorded base file sits in one beside its ``config.json``), else ``safetensors``."""
    if _is_lora_store(store):
        return "peft"
    first = (store.manifest["tasks"][0].get("source") or {}) if store.manifest["tasks"] else {}
    # the base as given decides (a file stays a file); a store without that record: a model file
    # beside its config.json counts as the folder
    beside = base is None and not first.get("base_arg")
    return "hf" if _base_folder(base or _recorded_base(store, task), beside=beside) else "safetensors"


def _check_name(task: str) -> None:
    if task in (".", "..") or "/" in task or os.sep in task or "\0" in task:
        raise ValueError(f"task {task!r} cannot name an output file or folder; export it alone with -o PATH")


def resolve_output(output: str | os.PathLike, fmt: str, task: str) -> str:
    """Where one task's export goes. ``hf``/``peft`` exports are folders: ``output`` itself. For
    ``safetensors``, an ``output`` that is an existing folder or ends in ``/`` is a folder and the
    file is ``output/<task>.safetensors``."""
    out = os.fspath(output)
    if fmt != "safetensors":
        return os.path.abspath(out)
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        _check_name(task)
        return os.path.abspath(os.path.join(out, f"{task}.safetensors"))
    return os.path.abspath(out)


def _looks_exported(folder: str) -> bool:
    names = os.listdir(folder)
    if any(os.path.isdir(os.path.join(folder, n)) for n in names):
        return False
    return bool({"model.safetensors", "model.safetensors.index.json", "adapter_config.json"} & set(names))


def _check_target(out: str, overwrite: bool) -> None:
    """An existing output is replaced only with ``overwrite``, and only if it is an earlier export
    (paths inside the store or onto an input are :func:`check_export_target`'s refusal)."""
    if os.path.islink(out):
        raise ValueError(f"{out}: is a symbolic link; name the real path")
    if os.path.lexists(out):
        empty_dir = os.path.isdir(out) and not os.listdir(out)
        if not empty_dir and not overwrite:
            raise FileExistsError(f"{out}: already exists; pass --force to replace it")
        if os.path.isdir(out) and not empty_dir and not _looks_exported(out):
            # --force replaces an earlier export, never an arbitrary folder (it would be deleted)
            raise FileExistsError(
                f"{out}: is a folder that does not hold an export (no model/adapter files, or sub-folders); "
                "name a new path or remove it yourself"
            )


def check_export_target(st: Any, out: str, extra_inputs: list[str]) -> None:
    """Refuse an export path inside the store, onto its recorded base or any task's source (or
    ``extra_inputs``), or through a symlink to any of them (an existing output is
    :func:`_check_target`'s business)."""
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


def remove_stale_export_tmp(out: str) -> None:
    """Delete ``OUT.tmp-PID`` files that a killed export of this program left: regular files
    whose process is gone and whose safetensors header carries the export's metadata."""
    import struct

    from .checkpoints import parse_json
    from .errors import ConduError
    from .pipeline import pid_alive

    folder, name = os.path.dirname(out), os.path.basename(out)
    with contextlib.suppress(OSError):
        for n in os.listdir(folder):
            # ``.OUT.tmp-PID`` (this module's name) or ``OUT.tmp-PID`` (older releases)
            prefix = next((x for x in (f".{name}.tmp-", f"{name}.tmp-") if n.startswith(x)), None)
            pid = n[len(prefix) :] if prefix else ""
            p = os.path.join(folder, n)
            if prefix is None or not pid.isdigit() or pid_alive(int(pid)) or os.path.islink(p) or not os.path.isfile(p):
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


def _check_not_base(out: str, base: str | None) -> None:
    """An export never replaces its base (nor writes into the base's model folder)."""
    if not base:
        return
    real, b = os.path.realpath(out), os.path.realpath(base)
    folder = b if os.path.isdir(b) else None
    if (
        real == b
        or (folder and os.path.commonpath([folder, real]) == folder)
        or (os.path.isdir(real) and os.path.commonpath([real, b]) == real)
    ):
        raise ValueError(f"{out}: the output would overwrite the base checkpoint {base}; write it elsewhere")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: str, out: str) -> None:
    """Rename the finished ``tmp`` onto ``out`` (an older output is moved aside first, then removed)."""
    parent = os.path.dirname(out)
    old = None
    if os.path.lexists(out):
        if os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        else:
            old = os.path.join(parent, f".{os.path.basename(out)}.old-{os.getpid()}")
            os.rename(out, old)
    os.rename(tmp, out)
    _fsync(parent)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.unlink(old)


# ---------------------------------------------------------------------------- tensors


def _expert_tensors(store, task: str, base_ck, *, backend: str) -> tuple[list, Iterator[tuple[str, Any]]]:
    """``(specs in the base's order, iterator of (key, expert tensor))``: the stored tensors
    decoupled onto the base, every other base tensor unchanged (dense stores)."""
    stored = set(store.keys)
    specs = [base_ck.spec(k) for k in base_ck.keys()]
    missing = stored - {s.name for s in specs}
    if missing:
        raise ValueError(f"{base_ck.path}: base lacks stored tensors {sorted(missing)[:5]}")
    merged = store.iter_decouple(task, base=base_ck, backend=backend)

    def gen():
        pending: dict = {}
        for s in specs:
            if s.name in stored:
                while s.name not in pending:
                    k, v = next(merged)
                    pending[k] = v
                yield s.name, pending.pop(s.name)
            else:
                yield s.name, base_ck.get(s.name)

    return specs, gen()


def _write_file(path: str, specs, items, meta: Mapping[str, str], bar=None) -> tuple[str, int]:
    from .safetensors_writer import StreamingSafetensorsWriter, TensorSpec

    w = StreamingSafetensorsWriter(path, [TensorSpec(s.name, s.dtype, tuple(s.shape)) for s in specs], dict(meta))
    with w:
        for s in specs:
            k, v = next(items)
            if k != s.name:  # the iterators yield in spec order; anything else is a bug here
                raise RuntimeError(f"export: expected tensor {s.name!r}, got {k!r}")
            w.write(k, v)
            if bar is not None:
                bar.update(1)
        return w.close()


def _write_weights(folder: str, specs, items, meta: Mapping[str, str], max_shard_size: int, bar=None) -> dict[str, Any]:
    """``model.safetensors`` or shards + ``model.safetensors.index.json`` into ``folder``."""
    sizes = {s.name: s.nbytes for s in specs}
    by_name = {s.name: s for s in specs}
    shards = plan_shards(sizes, max_shard_size)
    files = {}
    if len(shards) == 1:
        files["model.safetensors"] = _write_file(os.path.join(folder, "model.safetensors"), specs, items, meta, bar)
        return {"files": files, "total_size": sum(sizes.values())}
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        files[fname] = _write_file(os.path.join(folder, fname), [by_name[n] for n in names], items, meta, bar)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return {"files": files, "total_size": sum(sizes.values())}


def _copy_model_files(src: str, dst: str) -> list[str]:
    """Copy the top-level non-weight files of a model folder (config, tokenizer, processor,
    generation config, …); weights, hidden files and sub-folders stay behind."""
    copied = []
    for n in sorted(os.listdir(src)):
        p = os.path.join(src, n)
        if n.startswith(".") or not os.path.isfile(p) or n.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(p, os.path.join(dst, n))  # a symlink (hub cache) is read through, never written
        copied.append(n)
    return copied


# ---------------------------------------------------------------------------- export


def export_task(
    store,
    task: str,
    output: str | os.PathLike,
    *,
    fmt: str | None = None,
    base: str | os.PathLike | None = None,
    delta: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    backend: str = "auto",
    check_base: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    peft_rank: int | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """Write task ``task`` of ``store`` (an open :class:`~condu_merge.store.Store`) to ``output``
    in format ``fmt`` (``None``: :func:`default_format`); returns a report (output, format,
    tensors, bytes, files, and for a ``peft`` export by SVD its truncation error)."""
    if not store.exists:
        raise FileNotFoundError(f"{store.root}: no condu-merge store here (no manifest.json)")
    store.task_info(task)  # unknown task: a clear error before anything is written
    if backend == "auto":  # torch for small jobs, where numba's load cost is not paid back
        import math

        from .backends import auto_for_size

        backend = auto_for_size(backend, sum(math.prod(s.shape) for s in store.specs))
    base = os.fspath(base) if base is not None else None
    fmt = fmt or ("safetensors" if delta else default_format(store, task, base))
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    if delta and fmt != "safetensors":
        raise ValueError(f"--delta writes one safetensors file; it does not combine with --format {fmt}")
    out = resolve_output(output, fmt, task)
    check_export_target(store, out, [os.fspath(base)] if base else [])
    remove_stale_export_tmp(out)
    _check_target(out, overwrite)
    _check_not_base(out, base or (None if delta else _recorded_base(store, task)))
    parent = os.path.dirname(out)
    if os.fspath(output).endswith(("/", os.sep)) and fmt == "safetensors" and not os.path.lexists(parent):
        os.mkdir(parent)  # `-o new/`: a folder the user named; its own parent must exist
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{parent}: the output's folder does not exist")
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    if os.path.lexists(tmp):
        shutil.rmtree(tmp) if os.path.isdir(tmp) and not os.path.islink(tmp) else os.unlink(tmp)
    meta = {
        "format": "pt",
        "condu-merge-task": task,
        "condu-merge-store": store.root,
        "content": "delta" if delta else "model",
    }
    try:
        if fmt == "peft":
            report = _export_peft(store, task, tmp, base=base, rank=peft_rank, task_type=task_type, backend=backend)
        elif fmt == "safetensors":
            report = _export_file(
                store,
                task,
                tmp,
                base=base,
                delta=delta,
                meta=meta,
                backend=backend,
                check_base=check_base,
                progress=progress,
            )
        else:
            report = _export_hf(
                store,
                task,
                tmp,
                base=base,
                meta=meta,
                max_shard_size=parse_size(max_shard_size),
                backend=backend,
                check_base=check_base,
                progress=progress,
            )
        if os.path.isdir(tmp):
            _fsync(tmp)
        _swap_into_place(tmp, out)
    except BaseException as exc:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # ENOSPC and friends from write(): name the output
            raise type(exc)(exc.errno, exc.strerror or str(exc), out) from exc
        raise
    return {"output": out, "task": task, "format": fmt, "delta": bool(delta), **report}


def export_all(store, output_dir: str | os.PathLike, **kw: Any) -> list[dict[str, Any]]:
    """Every task of ``store`` into ``output_dir/<task>/`` (``hf``/``peft`` folders, or
    ``<task>/model.safetensors`` for ``safetensors``); ``output_dir`` is created if missing."""
    out_dir = os.path.abspath(os.fspath(output_dir))
    for t in store.task_names:
        _check_name(t)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(
            f"{out_dir}: exists and is not a folder; --all writes one subfolder per task into a folder"
        )
    os.makedirs(out_dir, exist_ok=True)
    reports = []
    for t in store.task_names:
        fmt = kw.get("fmt") or ("safetensors" if kw.get("delta") else default_format(store, t, kw.get("base")))
        target = os.path.join(out_dir, t)
        if fmt == "safetensors":
            os.makedirs(target, exist_ok=True)
            target = os.path.join(target, "model.safetensors")
        reports.append(export_task(store, t, target, **{**kw, "fmt": fmt}))
    return reports


def _open_base(store, task: str, base, check_base: bool):
    from .checkpoints import PeftAdapter, open_checkpoint
    from .pipeline import check_base_identity

    path = base or _recorded_base(store, task)
    if not path:
        raise ValueError("this store does not record its base checkpoint; pass --base (or use --delta)")
    ck = open_checkpoint(path)
    if isinstance(ck, PeftAdapter):
        ck.close()
        raise ValueError(f"{path}: the base must be a full checkpoint, not an adapter")
    if check_base and not _is_lora_store(store):
        try:
            check_base_identity(store.require(), ck)
        except BaseException:
            ck.close()
            raise
    return ck


def _source_tensors(store, task: str, base, *, delta: bool, backend: str, check_base: bool):
    """``(specs, items, closer)`` for a file/hf export of a dense or LoRA-factor store."""
    if _is_lora_store(store):
        from . import lora_store

        if delta:
            return store.specs, store.iter_decouple(task, backend=backend), lambda: None
        ck = _open_base(store, task, base, check_base)
        specs, items = lora_store.expert_weights(store, task, ck, backend=backend)
        return specs, items, ck.close
    if delta:
        return store.specs, store.iter_decouple(task, backend=backend), lambda: None
    ck = _open_base(store, task, base, check_base)
    specs, items = _expert_tensors(store, task, ck, backend=backend)
    return specs, items, ck.close


def _bar(progress: bool, total: int, task: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"export {task}", leave=False)


def _export_file(store, task, tmp, *, base, delta, meta, backend, check_base, progress) -> dict[str, Any]:
    specs, items, close = _source_tensors(store, task, base, delta=delta, backend=backend, check_base=check_base)
    bar = _bar(progress, len(specs), task)
    try:
        sha, size = _write_file(tmp, specs, iter(items), meta, bar)
    finally:
        close()
        if bar is not None:
            bar.close()
    return {"tensors": len(specs), "bytes": size, "sha256": sha, "files": [os.path.basename(tmp)]}


def _export_hf(store, task, tmp, *, base, meta, max_shard_size, backend, check_base, progress) -> dict[str, Any]:
    folder = _base_folder(base or _recorded_base(store, task))
    if folder is None:
        where = base or _recorded_base(store, task) or "(not recorded)"
        raise ValueError(
            f"{where}: --format hf needs the base as a model folder with config.json (pass --base DIR), "
            "or use --format safetensors"
        )
    specs, items, close = _source_tensors(
        store, task, base or folder, delta=False, backend=backend, check_base=check_base
    )
    os.makedirs(tmp)
    bar = _bar(progress, len(specs), task)
    try:
        copied = _copy_model_files(folder, tmp)
        w = _write_weights(tmp, specs, iter(items), meta, max_shard_size, bar)
    finally:
        close()
        if bar is not None:
            bar.close()
    size = sum(b for _, b in w["files"].values())
    return {
        "tensors": len(specs),
        "bytes": size,
        "files": sorted(copied + list(w["files"]) + (["model.safetensors.index.json"] if len(w["files"]) > 1 else [])),
        "copied": copied,
        "shards": len(w["files"]),
        "base_folder": folder,
    }


def _export_peft(store, task, tmp, *, base, rank, task_type, backend) -> dict[str, Any]:
    from . import lora_store

    if _is_lora_store(store):
        return lora_store.export_adapter(store, task, tmp, task_type=task_type, backend=backend)
    return lora_store.export_dense_adapter(store, task, tmp, rank=rank, task_type=task_type, backend=backend)
