"""A streaming safetensors writer: the header first, then tensors one at a time.

The safetensors layout is ``u64 little-endian header length N`` + ``N`` bytes of JSON header +
the raw little-endian data of every tensor, back to back. When every tensor's name, dtype and
shape are known before any data exists (they are: a merge keeps shapes), the header's offsets
can be computed up front, so a file of any size is written with one tensor in memory at a time.
The sha256 of the file is computed while writing (no second read).

Files written here are read by ``safetensors.safe_open`` and by
:class:`condu_merge.checkpoints.SafetensorsFile`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

# torch dtype <-> safetensors dtype string
DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = _st
ST_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_ST.items()}

_ALIGN = 8  # safetensors pads the header so the data starts 8-byte aligned


def dtype_to_str(dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype`` (``"F32"``, ``"BF16"``, ``"U8"``, …)."""
    try:
        return DTYPE_TO_ST[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors") from None


def dtype_itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorSpec:
    """What the header needs to know about one tensor before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_itemsize(self.dtype)


def build_header(
    specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header bytes (length prefix + padded JSON) and each tensor's ``(begin, end)`` data offsets.

    Tensors are laid out in the order of ``specs``.
    """
    header: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(v, str):
                raise TypeError(f"safetensors metadata values must be str; {k!r} is {type(v).__name__}")
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for s in specs:
        if s.name in offsets or s.name == "__metadata__":
            raise ValueError(f"tensor name {s.name!r} is repeated or reserved")
        end = pos + s.nbytes
        offsets[s.name] = (pos, end)
        header[s.name] = {
            "dtype": dtype_to_str(s.dtype),
            "shape": [int(d) for d in s.shape],
            "data_offsets": [pos, end],
        }
        pos = end
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-(len(raw) + 8)) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw, offsets


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy little-endian byte view of a contiguous CPU tensor (copies only if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy().data)


class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor, in the order of ``specs``.

    >>> w = StreamingSafetensorsWriter(path, [TensorSpec("a", torch.float32, (3,))])  # doctest: +SKIP
    >>> w.write("a", torch.ones(3)); w.close()                                       # doctest: +SKIP

    Every tensor must be written exactly once, in order, with the declared dtype and shape;
    :meth:`close` fsyncs the file and returns its sha256 and size. ``abort`` removes the file.
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = os.fspath(path)
        self.specs = list(specs)
        head, _ = build_header(self.specs, metadata)
        self._fh = open(self.path, "wb")
        self._hash = hashlib.sha256()
        self._next = 0
        self._size = 0
        self._put(memoryview(head))

    def _put(self, data: memoryview) -> None:
        self._fh.write(data)
        self._hash.update(data)
        self._size += data.nbytes

    @property
    def pending(self) -> list[str]:
        """Names still to be written."""
        return [s.name for s in self.specs[self._next :]]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s data; it must be the next declared tensor with its dtype and numel."""
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: all tensors already written; got {name!r}")
        spec = self.specs[self._next]
        if name != spec.name:
            raise ValueError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        if tensor.dtype != spec.dtype or tensor.numel() != math.prod(spec.shape):
            raise ValueError(
                f"{self.path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"declared {spec.shape} {spec.dtype}"
            )
        self._put(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> tuple[str, int]:
        """Flush and fsync; returns ``(sha256 hex, size in bytes)``."""
        if self._next != len(self.specs):
            raise ValueError(f"{self.path}: closed with tensors not written: {self.pending[:5]}")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._hash.hexdigest(), self._size

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self._fh.close()
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def save_file_streaming(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> tuple[str, int]:
    """Write a whole in-memory mapping (each value is read twice: once for the header, once to
    write it); returns ``(sha256, size)``."""
    specs = []
    for name in tensors:
        t = tensors[name]
        specs.append(TensorSpec(name, t.dtype, tuple(t.shape)))
    with StreamingSafetensorsWriter(path, specs, metadata) as w:
        for name in tensors:
            w.write(name, tensors[name])
        return w.close()
