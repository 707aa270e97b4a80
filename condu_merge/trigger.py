"""Task triggers: a task's bit-packed masks and its rescaler, and their safetensors file format."""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

from .errors import FormatError
from .packing import packed_nbytes, pad_bits_clear, popcount, unpack_mask

TRIGGERS_FORMAT = "condu-merge/triggers"
TRIGGERS_VERSION = 1

Rescaler = float | dict[str, float]


@dataclass(frozen=True)
class TaskTrigger:
    """What it takes to rebuild one task's delta from the unified delta ``u``.

    ``packed[name]`` is the task's mask for tensor ``name``, 1 bit per element in the
    layout of :mod:`condu_merge.packing`; ``shapes[name]`` its shape. ``rescaler`` is a
    float (modes ``tensor_mean`` and ``l1``) or a ``dict[name, float]`` (mode ``per_tensor``).
    The expert's delta is ``rescaler * mask * u`` (see :func:`condu_merge.decouple`).
    """

    packed: Mapping[str, torch.Tensor]
    shapes: Mapping[str, tuple[int, ...]]
    rescaler: Rescaler
    task: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if set(self.packed) != set(self.shapes):
            raise ValueError("TaskTrigger: packed masks and shapes name different tensors")
        for name, p in self.packed.items():
            n = math.prod(self.shapes[name])
            if p.dtype != torch.uint8 or p.dim() != 1 or p.numel() != packed_nbytes(n):
                raise ValueError(
                    f"TaskTrigger{self._who()}: packed mask of {name!r} must be 1-D uint8 of "
                    f"{packed_nbytes(n)} bytes, got {tuple(p.shape)} {p.dtype}"
                )
        if isinstance(self.rescaler, dict):
            missing = set(self.packed) - set(self.rescaler)
            if missing:
                raise ValueError(f"TaskTrigger{self._who()}: per-tensor rescaler lacks {sorted(missing)[:5]}")

    def __eq__(self, other: object) -> bool:
        """Same tensors, shapes, mask bits and rescaler (the task name is not compared). The
        generated ``__eq__`` compared the mask dicts with ``==``, which raises on any mask of
        more than one byte."""
        if not isinstance(other, TaskTrigger):
            return NotImplemented
        if set(self.packed) != set(other.packed):
            return False
        if any(tuple(self.shapes[k]) != tuple(other.shapes[k]) for k in self.packed):
            return False
        if self.rescaler != other.rescaler:
            return False
        return all(torch.equal(p.cpu(), other.packed[k].cpu()) for k, p in self.packed.items())

    __hash__ = None  # type: ignore[assignment]  # holds mutable dicts of tensors

    def _who(self) -> str:
        return f" of task {self.task!r}" if self.task is not None else ""

    @property
    def names(self) -> list[str]:
        return list(self.packed)

    @property
    def per_tensor(self) -> bool:
        return isinstance(self.rescaler, dict)

    def mask(self, name: str) -> torch.Tensor:
        """The unpacked ``torch.bool`` mask of tensor ``name``, in the tensor's shape."""
        return unpack_mask(self.packed[name], shape=self.shapes[name])

    def rescaler_for(self, name: str) -> float:
        """``λ`` that applies to tensor ``name``."""
        if isinstance(self.rescaler, dict):
            return float(self.rescaler[name])
        return float(self.rescaler)

    def with_task(self, task: str | None) -> TaskTrigger:
        return TaskTrigger(self.packed, self.shapes, self.rescaler, task)

    def density(self) -> float:
        """Fraction of elements whose mask bit is set (over all tensors)."""
        total = sum(math.prod(s) for s in self.shapes.values())
        if total == 0:
            return 0.0
        return sum(popcount(p) for p in self.packed.values()) / total

    @property
    def nbytes(self) -> int:
        """Bytes of packed mask data (what storing this trigger costs, rescalers aside)."""
        return sum(p.numel() for p in self.packed.values())


# ---------------------------------------------------------------------------- file format


def _trigger_key(i: int, name: str) -> str:
    return f"{i}:{name}"


def save_triggers(path: str | os.PathLike[str], triggers: Sequence[TaskTrigger]) -> None:
    """Write triggers to one safetensors file: packed masks as ``uint8`` tensors keyed
    ``"{index}:{tensor name}"``; shapes, rescalers and task names in the header metadata as JSON.

    The file is written beside its destination and renamed into place, so a crash leaves
    either the old file or the new one.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta_tasks = []
    for i, trig in enumerate(triggers):
        for name, p in trig.packed.items():
            tensors[_trigger_key(i, name)] = p.detach().to("cpu").contiguous().clone()
        meta_tasks.append(
            {
                "task": trig.task,
                # float(): numpy/torch scalars are not JSON-serialisable
                "rescaler": {k: float(v) for k, v in trig.rescaler.items()}
                if isinstance(trig.rescaler, dict)
                else float(trig.rescaler),
                "shapes": {n: list(s) for n, s in trig.shapes.items()},
                "order": list(trig.packed),
            }
        )
    meta = {"format": TRIGGERS_FORMAT, "version": str(TRIGGERS_VERSION), "tasks": json.dumps(meta_tasks)}
    path = os.fspath(path)
    # pid and thread id: two threads saving the same path must not share a temporary file
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_triggers(path: str | os.PathLike[str]) -> list[TaskTrigger]:
    """Read triggers written by :func:`save_triggers`; refuse corrupt or foreign files clearly."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        fh = safe_open(path, framework="pt", device="cpu")
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from exc
    with fh:
        meta = fh.metadata() or {}
        if meta.get("format") != TRIGGERS_FORMAT:
            raise FormatError(f"{path}: not a condu-merge triggers file (format={meta.get('format')!r})")
        if meta.get("version") != str(TRIGGERS_VERSION):
            raise FormatError(
                f"{path}: triggers format version {meta.get('version')!r} is not supported "
                f"(this condu-merge reads version {TRIGGERS_VERSION})"
            )
        try:
            tasks = json.loads(meta["tasks"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path}: triggers metadata is damaged ({exc})") from exc
        keys = set(fh.keys())
        if not isinstance(tasks, list):
            raise FormatError(f"{path}: triggers metadata is damaged (tasks is a {type(tasks).__name__}, not a list)")
        out = []
        for i, t in enumerate(tasks):
            try:
                label = t.get("task") or i
                order = list(t["order"])
                shapes = {name: tuple(int(s) for s in t["shapes"][name]) for name in order}
                resc = t["rescaler"]
                resc = {k: float(v) for k, v in resc.items()} if isinstance(resc, dict) else float(resc)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise FormatError(
                    f"{path}: triggers metadata of task #{i} is damaged ({type(exc).__name__}: {exc})"
                ) from exc
            packed = {}
            for name in order:
                key = _trigger_key(i, name)
                if key not in keys:
                    raise FormatError(f"{path}: mask of tensor {name!r} for task {label} is missing")
                try:
                    p = fh.get_tensor(key)
                except Exception as exc:
                    raise FormatError(f"{path}: mask {key!r} cannot be read ({exc})") from exc
                packed[name] = p
            try:
                trig = TaskTrigger(packed, shapes, resc, t.get("task"))
            except ValueError as exc:
                raise FormatError(f"{path}: {exc}") from exc
            for name in order:
                n = math.prod(shapes[name])
                if not pad_bits_clear(packed[name], n):
                    raise FormatError(
                        f"{path}: mask of tensor {name!r} for task {label} is damaged "
                        f"(pad bits past its {n} elements are set)"
                    )
            try:
                out.append(trig)
            except ValueError as exc:
                raise FormatError(f"{path}: {exc}") from exc
    return out
