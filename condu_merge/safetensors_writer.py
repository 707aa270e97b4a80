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
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

from .digests import (
    HASH_ALGORITHMS as HASH_ALGORITHMS,
    OrderedWorker as OrderedWorker,
    blake3_available as blake3_available,
    new_hasher as new_hasher,
)
from .manifest_check import ST_ITEMSIZE as ST_ITEMSIZE

ST_FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
ST_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}


class _DtypeTable(Mapping):
    """``DTYPE_TO_ST`` / ``ST_TO_DTYPE``: built (importing torch) on first use, so that a module
    importing the tables stays torch-free until a torch dtype is needed."""

    def __init__(self, to_st: bool):
        self._to_st = to_st
        self._d: dict | None = None

    def _table(self) -> dict:
        if self._d is None:
            pairs = {
                getattr(torch, name): st for st, name in ST_TORCH_NAMES.items() if hasattr(torch, name)
            }  # older torch lacks some of the small types
            self._d = pairs if self._to_st else {v: k for k, v in pairs.items()}
        return self._d

    def __getitem__(self, key):
        return self._table()[key]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __contains__(self, key: object) -> bool:
        return key in self._table()


DTYPE_TO_ST: Mapping[torch.dtype, str] = _DtypeTable(True)
"""torch dtype -> safetensors dtype name."""
ST_TO_DTYPE: Mapping[str, torch.dtype] = _DtypeTable(False)
"""safetensors dtype name -> torch dtype."""

_ALIGN = 8  # safetensors pads the header so the data starts 8-byte aligned


# ---------------------------------------------------------------------------- dtypes and layout


def dtype_to_str(dtype: torch.dtype | str) -> str:
    """The safetensors name of ``dtype`` (``"F32"``, ``"BF16"``, ``"U8"``, …); a name is returned as is."""
    if isinstance(dtype, str):
        if dtype not in ST_ITEMSIZE:
            raise TypeError(f"{dtype!r} is not a safetensors dtype")
        return dtype
    try:
        return DTYPE_TO_ST[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors") from None


def dtype_itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or a safetensors dtype name."""
    if isinstance(dtype, str):
        return ST_ITEMSIZE[dtype]
    return int(dtype.itemsize)


class TensorSpec:
    """What the header needs to know about one tensor before its data exists: name, dtype,
    shape. ``dtype`` may be given as a torch dtype or a safetensors name (``"F32"``); specs read
    from a header or a manifest keep the name (:attr:`st`), so planning a store write needs no
    torch, and :attr:`dtype` gives the torch dtype when asked. Specs compare by name, safetensors
    dtype and shape."""

    __slots__ = ("_dtype", "name", "shape", "st")

    def __init__(self, name: str, dtype: torch.dtype | str, shape: tuple[int, ...]):
        self.name = name
        self.st = dtype_to_str(dtype)
        self.shape = tuple(shape)
        self._dtype = None if isinstance(dtype, str) else dtype

    @property
    def dtype(self) -> torch.dtype:
        if self._dtype is None:
            self._dtype = ST_TO_DTYPE[self.st]
        return self._dtype

    @property
    def is_floating_point(self) -> bool:
        return self.st in ST_FLOATING

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_ITEMSIZE[self.st]

    def _key(self) -> tuple[str, str, tuple[int, ...]]:
        return (self.name, self.st, self.shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorSpec) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __setattr__(self, attr: str, value: object) -> None:
        if attr != "_dtype" and hasattr(self, attr):
            raise AttributeError(f"TensorSpec is immutable: cannot set {attr!r}")
        object.__setattr__(self, attr, value)

    def __repr__(self) -> str:
        return f"TensorSpec(name={self.name!r}, dtype={self.st}, shape={self.shape})"


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
            "dtype": s.st,
            "shape": [int(d) for d in s.shape],
            "data_offsets": [pos, end],
        }
        pos = end
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-(len(raw) + 8)) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw, offsets


def tensor_bytes(t: torch.Tensor | np.ndarray) -> memoryview:
    """A zero-copy little-endian byte view of a contiguous CPU tensor or numpy array (copies only if needed)."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t).reshape(-1).view(np.uint8).data if t.size else memoryview(b"")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy().data)


def same_dtype(spec: TensorSpec, x: torch.Tensor | np.ndarray) -> bool:
    """Whether ``x`` holds elements of ``spec``'s dtype: a tensor of that dtype, or a numpy array
    of that element width (the raw elements; bfloat16 as 16-bit integers)."""
    if isinstance(x, np.ndarray):
        return x.dtype.itemsize == ST_ITEMSIZE[spec.st]
    return bool(x.dtype == spec.dtype)


def numel_of(x: torch.Tensor | np.ndarray) -> int:
    return int(x.size) if isinstance(x, np.ndarray) else x.numel()


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
        if self._filled or not same_dtype(spec, tensor) or numel_of(tensor) != math.prod(spec.shape):
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
        if not same_dtype(spec, part) or self._filled + data.nbytes > spec.nbytes:
            raise ValueError(
                f"{self.path}: part of tensor {name!r} ({numel_of(part)} {part.dtype}) does not fit its remaining "
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
