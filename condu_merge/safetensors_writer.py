"""A streaming safetensors writer: the header first, then tensors one at a time.

The safetensors layout is ``u64 little-endian header length N`` + ``N`` bytes of JSON header +
the raw little-endian data of every tensor, back to back. When every tensor's name, dtype and
shape are known before any data exists (they are: a merge keeps shapes), the header's offsets
can be computed up front, so a file of any size is written with one tensor in memory at a time
(or one part of a tensor: :meth:`StreamingSafetensorsWriter.write_part`). The file's digest
(sha256, or BLAKE3 with ``hash_algo="blake3"``) is computed while writing (no second read); with
an :class:`OrderedWorker`, writing and hashing run in a background thread while the caller
computes the next tensor.

Files written here are read by ``safetensors.safe_open`` and by
:class:`condu_merge.checkpoints.SafetensorsFile`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .digests import (
    HASH_ALGORITHMS as HASH_ALGORITHMS,
    OrderedWorker as OrderedWorker,
    blake3_available as blake3_available,
    new_hasher as new_hasher,
)

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


# ---------------------------------------------------------------------------- dtypes and layout


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

    Every tensor must be written exactly once, in order, with the declared dtype and shape --
    whole (:meth:`write`) or in consecutive parts (:meth:`write_part`); :meth:`close` fsyncs the
    file and returns its digest (``hash_algo``: ``"sha256"`` or ``"blake3"``) and size. ``abort``
    removes the file.

    ``worker``: an :class:`OrderedWorker` (it may be shared by the files of one generation) that
    writes and hashes each buffer in the background; the caller must not change a tensor after
    handing it to :meth:`write` (a merge's fresh results are never changed). An I/O error of a
    background write is raised by a later :meth:`write` or by :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Iterable[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        *,
        hash_algo: str = "sha256",
        worker: OrderedWorker | None = None,
    ):
        self.path = os.fspath(path)
        self.specs = list(specs)
        self.hash_algo = hash_algo
        head, _ = build_header(self.specs, metadata)
        self._hash = new_hasher(hash_algo)
        self._fh = open(self.path, "wb")
        self._worker = worker
        self._next = 0
        self._filled = 0  # bytes of specs[_next] written so far (write_part)
        self._size = 0
        self._submit(memoryview(head))

    def _put(self, data: memoryview) -> None:
        self._fh.write(data)
        self._hash.update(data)
        self._size += data.nbytes

    def _submit(self, data: memoryview) -> None:
        if self._worker is None:
            self._put(data)
        else:
            self._worker.submit(lambda: self._put(data), data.nbytes)

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
        if self._filled or tensor.dtype != spec.dtype or tensor.numel() != math.prod(spec.shape):
            raise ValueError(
                f"{self.path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"declared {spec.shape} {spec.dtype}" + (" (and partly written already)" if self._filled else "")
            )
        self._submit(tensor_bytes(tensor))
        self._next += 1

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Append the next consecutive elements of tensor ``name`` (flattened, the declared dtype);
        the tensor is complete, and the next one may start, once all its elements are written.

        Lets a caller handle a large tensor in pieces (one piece in memory at a time); the bytes on
        disk are those :meth:`write` of the whole tensor gives."""
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: all tensors already written; got {name!r}")
        spec = self.specs[self._next]
        if name != spec.name:
            raise ValueError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        data = tensor_bytes(part)
        if part.dtype != spec.dtype or self._filled + data.nbytes > spec.nbytes:
            raise ValueError(
                f"{self.path}: part of tensor {name!r} ({part.numel()} {part.dtype}) does not fit its remaining "
                f"{(spec.nbytes - self._filled) // dtype_itemsize(spec.dtype)} elements of {spec.dtype}"
            )
        self._submit(data)
        self._filled += data.nbytes
        if self._filled == spec.nbytes:
            self._next += 1
            self._filled = 0

    def close(self) -> tuple[str, int]:
        """Flush and fsync; returns ``(hex digest in hash_algo, size in bytes)``."""
        if self._next != len(self.specs):
            raise ValueError(f"{self.path}: closed with tensors not written: {self.pending[:5]}")
        if self._worker is not None:
            self._worker.drain()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._hash.hexdigest(), self._size

    def abort(self) -> None:
        """Close and delete the partial file (after any of its background writes ran)."""
        try:
            if self._worker is not None:
                try:
                    self._worker.drain()
                except Exception:  # the file is being thrown away
                    pass
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
