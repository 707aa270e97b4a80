"""Lazy checkpoint readers and per-tensor task deltas, for merging without loading a model.

Readers (all lazy, one tensor in memory at a time):

* :class:`SafetensorsFile` -- one ``.safetensors`` file. The header is parsed here and each tensor
  (or a range of its elements, :meth:`SafetensorsFile.get_range`) is read with ``readinto`` into
  a fresh buffer (no ``mmap``), so what a merge keeps resident is exactly the tensors it is
  working on, and a truncated file is reported before any data is used.
* :class:`ShardedCheckpoint` -- a ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``)
  and its shards.
* :class:`TorchCheckpoint` -- ``.pt``/``.bin``/``.pth`` through ``torch.load(weights_only=True)``
  (never unpickling arbitrary objects), memory-mapped where the file format allows.
* :class:`PeftAdapter` -- a PEFT LoRA adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``); its delta of ``module.weight`` is ``s · B A`` with
  ``s = α / r`` (``α / √r`` with rsLoRA), transposed for embeddings and ``fan_in_fan_out``;
  ``modules_to_save`` entries are full weights, whose delta is ``w − base``.

:func:`open_checkpoint` picks the reader from a path; :class:`TaskDelta` turns a base and a
fine-tuned checkpoint (or adapter) into ``delta(key)``, computed when asked.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

from .digests import (
    HASH_ALGORITHMS as HASH_ALGORITHMS,
    OrderedWorker,
    blake3_available as blake3_available,
    check_record as check_record,
    default_algorithm as default_algorithm,
    file_digest as file_digest,
    new_hasher,
    record_digest as record_digest,
)
from .errors import ConduError, DtypeMismatchError, FormatError, KeyMismatchError, NonFiniteError, ShapeMismatchError
from .safetensors_writer import DTYPE_TO_ST, ST_ITEMSIZE, ST_TORCH_NAMES, TensorSpec, dtype_itemsize

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_MAX_DIM = 2**62  # a dimension (and the product of the non-zero ones) beyond this is no real tensor


class CheckpointError(ConduError, ValueError):
    """A checkpoint cannot be used (unknown layout, unsupported adapter type, …)."""


def parse_json(raw: bytes | str, where: str, what: str = "JSON") -> object:
    """``json.loads`` of untrusted text, every failure a :class:`FormatError` naming ``where``:
    invalid JSON, bad UTF-8, nesting deep enough to exhaust the recursion limit, integers of more
    digits than Python converts."""
    try:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8")
        return json.loads(raw)
    except RecursionError:
        raise FormatError(f"{where}: {what} is nested too deeply to be read") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError and the int digit limit are ValueErrors
        raise FormatError(f"{where}: {what} is not valid JSON ({str(exc).splitlines()[0][:200]})") from None


def read_json(path: str, what: str = "JSON") -> object:
    """:func:`parse_json` of a file's content."""
    with open(path, "rb") as fh:
        return parse_json(fh.read(), path, what)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def looks_like_safetensors(path: str) -> bool:
    """Whether ``path`` starts like a safetensors file (a u64 header length that fits the file,
    then ``{``), whatever its extension -- a ``.bin`` may well be one."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= min(_MAX_HEADER, size - 8) and head[8:9] == b"{"


class Checkpoint(Protocol):
    """What a merge needs from a checkpoint: names, specs and one tensor at a time."""

    path: str

    def keys(self) -> list[str]: ...

    def spec(self, key: str) -> TensorSpec: ...

    def get(self, key: str) -> torch.Tensor: ...

    def files(self) -> list[str]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------- safetensors


def _bytes_tensor(buf: np.ndarray) -> torch.Tensor:
    """A uint8 array's tensor (its memory): an empty one is made fresh, since numpy gives an
    empty array a stride torch cannot view as another dtype."""
    return torch.from_numpy(buf) if buf.size else torch.empty(0, dtype=torch.uint8)


class SafetensorsFile:
    """One safetensors file, read lazily without mmap.

    ``get(key)`` costs one ``seek`` + ``readinto`` of that tensor's bytes. Every structural
    problem (bad header, offsets past the end of the file, unknown dtype) raises
    :class:`FormatError` naming the file.

    While reads go front to back, the file's digest (``hash_algo``: ``"sha256"`` or
    ``"blake3"``) is computed from the bytes read (:meth:`sequential_digest`). ``hash_worker``:
    an :class:`OrderedWorker` that hashes in the background while the caller computes; a tensor
    :meth:`get` returns must then not be changed in place until :meth:`sequential_digest` (a
    change would make the digest differ: a false "damaged", never a damaged file accepted).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        keep_open: bool = True,
        hash_algo: str = "sha256",
        hash_worker: OrderedWorker | None = None,
    ):
        self.path = os.fspath(path)
        self.hash_algo = hash_algo
        self._worker = hash_worker
        self._fh = open(self.path, "rb")  # FileNotFoundError names the path itself
        try:
            self._parse()
        except BaseException:
            self._fh.close()
            raise
        # keep_open=False: the handle is closed now and each get() opens the file for its read, so
        # a store of thousands of mask files never holds thousands of descriptors
        self._keep_open = keep_open
        st = os.fstat(self._fh.fileno())
        self._identity = (st.st_dev, st.st_ino)
        if not keep_open:
            self._fh.close()

    def _parse(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        raw = self._fh.read(8)
        if len(raw) < 8:
            raise FormatError(f"{self.path}: not a safetensors file (only {size} bytes; truncated?)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise FormatError(
                f"{self.path}: safetensors header length {n} does not fit a {size}-byte file (truncated or not safetensors)"
            )
        self._header_bytes = self._fh.read(n)
        header = parse_json(self._header_bytes, self.path, "the safetensors header")
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{self.path}: safetensors __metadata__ must map names to strings")
        self.metadata: dict[str, str] = meta
        self._data_start = 8 + n
        self._size = size
        # running digest of what was read, valid while reads go front to back (see sequential_digest)
        self._seq: Any = new_hasher(self.hash_algo)
        self._seq.update(raw + self._header_bytes)
        self._seq_pos = 8 + n
        self._read_any = False  # whether a tensor's bytes were read (set_hash is refused after)
        self._entries: dict[str, tuple[TensorSpec, int, int]] = {}
        data_len = size - self._data_start
        for name, e in header.items():
            if not isinstance(e, dict):
                raise FormatError(f"{self.path}: header entry of tensor {name!r} is not an object")
            dt, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
            if not isinstance(dt, str) or dt not in ST_ITEMSIZE:
                raise FormatError(f"{self.path}: tensor {name!r} has an unsupported dtype {str(dt)[:40]!r}")
            if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
                raise FormatError(f"{self.path}: tensor {name!r}: shape {str(shape)[:80]} is not a list of integers")
            if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(x) for x in offs):
                raise FormatError(f"{self.path}: tensor {name!r}: data_offsets {str(offs)[:80]} is not two integers")
            dtype, shape = dt, tuple(shape)  # the safetensors name: no torch needed to plan
            begin, end = offs
            if any(d < 0 for d in shape):
                raise FormatError(f"{self.path}: tensor {name!r} has a negative dimension in shape {shape}")
            if (
                any(d > _MAX_DIM for d in shape)
                or math.prod(max(d, 1) for d in shape) * dtype_itemsize(dtype) > _MAX_DIM
            ):
                raise FormatError(f"{self.path}: tensor {name!r} has an impossible shape {str(list(shape))[:80]}")
            spec = TensorSpec(name, dtype, shape)
            if end - begin != spec.nbytes or begin < 0:
                raise FormatError(
                    f"{self.path}: tensor {name!r} has {end - begin} bytes of data for shape {shape} {ST_TORCH_NAMES[dt]}"
                )
            if end > data_len:
                raise FormatError(
                    f"{self.path}: tensor {name!r} ends at byte {self._data_start + end} but the file has {size} bytes (truncated)"
                )
            self._entries[name] = (spec, begin, end)
        # file order: reading keys() in turn reads the file front to back
        self._entries = dict(sorted(self._entries.items(), key=lambda kv: (kv[1][1], kv[1][2])))
        prev_name, prev_end = None, 0
        for name, (_, begin, end) in self._entries.items():
            if begin < prev_end:
                raise FormatError(f"{self.path}: the data of tensors {prev_name!r} and {name!r} overlap (byte offsets)")
            prev_name, prev_end = name, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def spec(self, key: str) -> TensorSpec:
        try:
            return self._entries[key][0]
        except KeyError:
            raise KeyMismatchError(f"{self.path}: no tensor {key!r}") from None

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as a fresh CPU tensor (owned memory, not a view of the file)."""
        spec = self.spec(key)
        buf = _bytes_tensor(self.get_bytes(key))
        if spec.st == "U8":
            return buf.reshape(spec.shape)
        return buf.view(spec.dtype).reshape(spec.shape)

    def get_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of tensor ``key`` flattened (row-major), as a fresh 1-D tensor.

        Reads only those bytes, so a tensor larger than memory can be worked through in pieces;
        consecutive ranges in file order keep :meth:`sequential_digest` valid."""
        spec = self.spec(key)
        buf = _bytes_tensor(self.get_bytes(key, start, stop))
        return buf if spec.st == "U8" else buf.view(spec.dtype)

    def get_bytes(
        self, key: str, start: int = 0, stop: int | None = None, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The bytes of elements ``[start, stop)`` (default: all) of tensor ``key`` as a fresh
        ``uint8`` array: :meth:`get` and :meth:`get_range` without torch (the dtype is
        :meth:`spec`'s ``st``), hashed as they are. ``out``: a contiguous ``uint8`` array of that
        many bytes to read into instead (e.g. one row of a stack), returned; with a background
        hash it must not be changed afterwards, as a returned buffer."""
        spec, begin, _ = self._entries.get(key, (None, 0, 0))
        if spec is None:
            raise KeyMismatchError(f"{self.path}: no tensor {key!r}")
        n = math.prod(spec.shape)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ValueError(f"{self.path}: range [{start}, {stop}) is outside tensor {key!r} of {n} elements")
        isz = ST_ITEMSIZE[spec.st]
        nbytes = (stop - start) * isz
        if out is not None and (out.dtype != np.uint8 or out.nbytes != nbytes or not out.flags.c_contiguous):
            raise ValueError(f"{self.path}: tensor {key!r}: out must be contiguous uint8 of {nbytes} bytes")
        got = self._read_span(key, begin + start * isz, nbytes, out)
        return got if out is None else out

    def _read_span(self, key: str, begin: int, nbytes: int, out: np.ndarray | None = None) -> np.ndarray:
        """``nbytes`` at data offset ``begin`` into a fresh uint8 array (or ``out``), hashed if in order."""
        buf = np.empty(nbytes, dtype=np.uint8) if out is None else out.reshape(-1)
        if nbytes:
            self._read_any = True
            got = self._read_into(buf.data, self._data_start + begin)
            if got != nbytes:
                raise FormatError(f"{self.path}: tensor {key!r} is truncated ({got} of {nbytes} bytes)")
            if self._seq is not None:
                self._hash_to(self._data_start + begin)
                if self._seq is not None:
                    self._update(buf.data)
                    self._seq_pos += nbytes
        return buf

    def _update(self, view: memoryview) -> None:
        seq = self._seq
        if self._worker is None:
            seq.update(view)
        else:  # the view keeps its tensor alive until hashed
            self._worker.submit(lambda: seq.update(view), view.nbytes)

    def _read_into(self, view: memoryview, offset: int) -> int:
        if self._keep_open:
            self._fh.seek(offset)
            return self._fh.readinto(view)
        with open(self.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if (st.st_dev, st.st_ino) != self._identity:
                raise FormatError(
                    f"{self.path}: the file was replaced since it was opened (another writer?); open it again"
                )
            fh.seek(offset)
            return fh.readinto(view)

    def _hash_to(self, pos: int) -> None:
        """Bring the running hash up to byte ``pos``: bytes :meth:`get` skipped (tensors not read,
        the tail) are read and hashed here; a read behind the hash ends it (``None``)."""
        if self._seq is None or pos == self._seq_pos:
            return
        if pos < self._seq_pos:
            self._seq = None
            return
        if self._worker is not None:
            self._worker.drain()  # the block below is reused: hash it here, after what is queued
        block = bytearray(min(pos - self._seq_pos, 1 << 22))
        while self._seq_pos < pos:
            n = min(pos - self._seq_pos, len(block))
            view = memoryview(block)[:n]
            got = self._read_into(view, self._seq_pos)
            if got != n:
                raise FormatError(f"{self.path}: truncated at byte {self._seq_pos + max(got, 0)} while hashing")
            self._seq.update(view)
            self._seq_pos += n

    def set_hash(self, algo: str, worker: OrderedWorker | None = None) -> None:
        """Choose the digest :meth:`sequential_digest` gives (and the background ``worker``, or
        none) before any tensor was read, e.g. once a store's manifest said which digest it records.
        Raises ``RuntimeError`` after a read (what was read was hashed with the old choice)."""
        if self._read_any or self._seq_pos != self._data_start:
            raise RuntimeError(f"{self.path}: the digest can only be chosen before the first read")
        seq = new_hasher(algo)
        seq.update(struct.pack("<Q", len(self._header_bytes)) + self._header_bytes)  # the bytes read at open
        self.hash_algo, self._seq, self._worker = algo, seq, worker

    @property
    def reads_are_private(self) -> bool:
        """Whether a tensor :meth:`get` returns may be changed in place by the caller (no
        background hash still reads it)."""
        return self._worker is None or self._seq is None

    def no_read_hash(self) -> None:
        """Stop hashing what :meth:`get` reads (for a file whose digest nobody will ask for)."""
        if self._worker is not None:
            self._worker.drain()
        self._seq = None

    def sequential_digest(self, algo: str | None = None) -> str | None:
        """The ``hash_algo`` digest of the whole file, if :meth:`get` read front to back (bytes it
        skipped are read and hashed now), else ``None``; also ``None`` after :meth:`no_read_hash`,
        and when ``algo`` (the digest a record names) is not the ``hash_algo`` this file was
        hashed with (choose it with :meth:`set_hash` before reading, so it is).

        Lets a streaming reader check a file's integrity while it uses it: each byte is read once."""
        if self._seq is None or (algo is not None and algo != self.hash_algo):
            return None
        self._hash_to(self._size)
        if self._worker is not None:
            self._worker.drain()
        return self._seq.hexdigest() if self._seq is not None else None

    def sequential_sha256(self) -> str | None:
        """``sequential_digest("sha256")`` (older name; a store's checks pass the recorded algorithm
        to :meth:`sequential_digest` instead)."""
        return self.sequential_digest("sha256")

    def files(self) -> list[str]:
        return [self.path]

    def close(self) -> None:
        if self._worker is not None:
            with contextlib.suppress(Exception):
                self._worker.drain()  # no queued hash outlives the file object's use
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardedCheckpoint:
    """A sharded checkpoint: ``{"weight_map": {tensor: shard file}}`` plus the shards, opened on first use."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = os.fspath(index_path)
        index = read_json(self.path, "the checkpoint index")
        if not isinstance(index, dict) or "weight_map" not in index:
            raise FormatError(f"{self.path}: not a checkpoint index (needs an object with a 'weight_map')")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise FormatError(f"{self.path}: 'weight_map' must map tensor names to shard file names")
        folder = os.path.dirname(os.path.abspath(self.path))
        self._map = {}
        for k, v in weight_map.items():
            shard = os.path.normpath(os.path.join(folder, v))
            # an index names shards inside its folder; never follow it elsewhere on the disk
            if os.path.isabs(v) or shard == folder or os.path.commonpath([folder, shard]) != folder:
                raise FormatError(f"{self.path}: tensor {k!r} is mapped to {v!r}, outside the index's folder")
            self._map[k] = shard
        for shard in sorted(set(self._map.values())):
            if not os.path.exists(shard):
                raise FileNotFoundError(f"{self.path}: shard {os.path.basename(shard)} is missing")
        self._open: dict[str, Checkpoint] = {}
        # what the shards hash while read (set_hash): by default nothing, since a sharded
        # checkpoint's identity is a digest over its files (checkpoint_identity), not one stream
        self._hash_algo: str | None = None
        self._hash_worker: OrderedWorker | None = None

    @property
    def all_safetensors(self) -> bool:
        """Whether every shard is a safetensors file (read by :class:`SafetensorsFile`)."""
        return all(f.endswith(".safetensors") or looks_like_safetensors(f) for f in set(self._map.values()))

    def no_read_hash(self) -> None:
        """Shards opened from now on (and those open) do not hash what they read (a fine-tuned
        checkpoint: nothing asks for its digest)."""
        self._hash_algo = None
        for ck in self._open.values():
            if isinstance(ck, SafetensorsFile):
                ck.no_read_hash()

    def set_hash(self, algo: str, worker: OrderedWorker | None = None) -> None:
        """Hash every safetensors shard in ``algo`` while it is read (on ``worker`` if given), so
        that :meth:`identity_from_reads` needs no second pass over the shards read front to back.
        Before any tensor was read (a shard read already raises ``RuntimeError``)."""
        self._hash_algo, self._hash_worker = algo, worker
        for ck in self._open.values():
            if isinstance(ck, SafetensorsFile):
                ck.set_hash(algo, worker)

    def identity_from_reads(self, algo: str) -> dict[str, object]:
        """:func:`checkpoint_identity` in ``algo``, each shard's digest taken from its read where
        it was hashed front to back in ``algo`` (:meth:`set_hash`), else from the file."""

        def digest(path: str) -> str:
            ck = self._open.get(path)
            got = ck.sequential_digest(algo) if isinstance(ck, SafetensorsFile) else None
            return got if got is not None else file_digest(path, algo)

        return checkpoint_identity(self, algo, digest)

    def _shard(self, key: str) -> Checkpoint:
        try:
            f = self._map[key]
        except KeyError:
            raise KeyMismatchError(f"{self.path}: no tensor {key!r}") from None
        ck = self._open.get(f)
        if ck is None:
            ck = SafetensorsFile(f) if f.endswith(".safetensors") or looks_like_safetensors(f) else TorchCheckpoint(f)
            if key not in ck.keys():
                raise FormatError(f"{self.path}: the index puts {key!r} in {os.path.basename(f)}, which lacks it")
            if isinstance(ck, SafetensorsFile):
                if self._hash_algo is not None:
                    ck.set_hash(self._hash_algo, self._hash_worker)
                else:  # see __init__: nothing asks for a shard's own running digest
                    ck.no_read_hash()
            self._open[f] = ck
        return ck

    def keys(self) -> list[str]:
        return list(self._map)

    def spec(self, key: str) -> TensorSpec:
        return self._shard(key).spec(key)

    def get(self, key: str) -> torch.Tensor:
        return self._shard(key).get(key)

    def get_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of ``key`` flattened (see :func:`read_range`)."""
        return read_range(self._shard(key), key, start, stop)

    def get_bytes(
        self, key: str, start: int = 0, stop: int | None = None, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`SafetensorsFile.get_bytes` of the shard holding ``key`` (safetensors shards only)."""
        ck = self._shard(key)
        if not isinstance(ck, SafetensorsFile):
            raise TypeError(f"{self.path}: tensor {key!r} is in {ck.files()[0]}, not a safetensors shard")
        return ck.get_bytes(key, start, stop, out=out)

    def files(self) -> list[str]:
        return [self.path] + sorted(set(self._map.values()))

    def close(self) -> None:
        for ck in self._open.values():
            ck.close()
        self._open.clear()


class TorchCheckpoint:
    """A ``torch.save`` file read with ``weights_only=True`` (tensors and plain containers only).

    A top-level ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper is unwrapped; entries
    that are not tensors are ignored. Zip-format files are memory-mapped, so tensors are paged
    in when used.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such checkpoint")
        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc).lower():
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy format
        except Exception as exc:
            raise FormatError(
                f"{self.path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "only plain state dicts of tensors are accepted -- convert it to safetensors"
            ) from exc
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping) and len(obj) <= 4:
                obj = obj[wrapper]
                break
        if not isinstance(obj, Mapping):
            raise FormatError(f"{self.path}: holds a {type(obj).__name__}, not a state dict")
        self._sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not self._sd:
            raise FormatError(f"{self.path}: holds no tensors")

    def keys(self) -> list[str]:
        return list(self._sd)

    def spec(self, key: str) -> TensorSpec:
        t = self._tensor(key)
        return TensorSpec(key, t.dtype, tuple(t.shape))

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._sd[key]
        except KeyError:
            raise KeyMismatchError(f"{self.path}: no tensor {key!r}") from None

    def get(self, key: str) -> torch.Tensor:
        return self._tensor(key).clone()

    def files(self) -> list[str]:
        return [self.path]

    def close(self) -> None:
        self._sd = {}


class MemoryCheckpoint:
    """An in-memory state dict behind the :class:`Checkpoint` interface (tests, the demo, the API)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], path: str = "<memory>"):
        self.path = path
        self._sd = dict(state_dict)

    def keys(self) -> list[str]:
        return list(self._sd)

    def spec(self, key: str) -> TensorSpec:
        if key not in self._sd:
            raise KeyMismatchError(f"{self.path}: no tensor {key!r}")
        t = self._sd[key]
        return TensorSpec(key, t.dtype, tuple(t.shape))

    def get(self, key: str) -> torch.Tensor:
        if key not in self._sd:
            raise KeyMismatchError(f"{self.path}: no tensor {key!r}")
        return self._sd[key]

    def files(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- PEFT adapters

_PEFT_PREFIX = "base_model.model."
_PATTERN_TIMEOUT_S = 0.25  # per match; PEFT patterns are short, so only a pathological one gets near it


def _compile_pattern(pattern: str, where: str):
    r"""PEFT's pattern rule ``(.*\.)?(PATTERN)$``, compiled by the ``regex`` engine, whose matches
    take a timeout (Python's ``re`` cannot be interrupted: an untrusted ``(.*.*)*x`` would run for
    minutes). ``regex`` reads Python ``re`` syntax the same way (its VERSION0 mode)."""
    import regex

    if not isinstance(pattern, str):
        raise CheckpointError(f"{where}: pattern {pattern!r} is not a string")
    try:
        return regex.compile(rf"(.*\.)?({pattern})$", regex.VERSION0)
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise CheckpointError(f"{where}: pattern {pattern!r} is not a valid regular expression ({exc})") from None


def peft_pattern_key(patterns: Iterable[str], module: str, where: str) -> str | None:
    r"""The first of ``patterns`` (``rank_pattern``/``alpha_pattern`` keys, in order) that matches
    ``module`` by PEFT's rule (``peft.utils.other.get_pattern_key``: ``re.match(rf"(.*\.)?({key})$",
    module)``), or ``None``. A match that runs past a short timeout is refused with
    :class:`CheckpointError` naming ``where`` and the pattern instead of hanging."""
    for pat in patterns:
        try:
            hit = _compile_pattern(pat, where).match(module, timeout=_PATTERN_TIMEOUT_S)
        except TimeoutError:
            raise CheckpointError(
                f"{where}: pattern {pat!r} takes too long to match module {module[:80]!r} (catastrophic backtracking); "
                "simplify it"
            ) from None
        if hit:
            return pat
    return None


def _check_number(value: object, what: str, where: str, *, integer: bool = False, minimum: float = 0.0) -> None:
    if value is None:
        return
    if integer:
        ok = _is_int(value) and value >= minimum
    else:
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= minimum
        )
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise CheckpointError(f"{where}: {what} is {repr(value)[:40]}; it must be {kind} >= {minimum:g}")


def check_lora_config(cfg: object, where: str) -> None:
    """Refuse an ``adapter_config.json`` whose fields the merge would trip over: not an object, a
    rank below 1, a non-numeric or non-finite ``lora_alpha``, patterns that are not
    ``{regex: number}`` mappings or do not compile."""
    if not isinstance(cfg, dict):
        raise FormatError(f"{where}: not a JSON object")
    _check_number(cfg.get("r"), "r (the LoRA rank)", where, integer=True, minimum=1)
    _check_number(cfg.get("lora_alpha"), "lora_alpha", where)
    for field, integer, minimum in (("rank_pattern", True, 1), ("alpha_pattern", False, 0)):
        pats = cfg.get(field)
        if pats is None:
            continue
        if not isinstance(pats, dict):
            raise CheckpointError(f"{where}: {field} must be an object mapping patterns to numbers")
        for pat, v in pats.items():
            _compile_pattern(pat, where)
            _check_number(v, f"{field}[{pat!r}]", where, integer=integer, minimum=minimum)


class PeftAdapter:
    """A PEFT LoRA adapter folder, seen as deltas of the base model's tensors.

    ``delta_keys()`` are base-model tensor names (``"enc.weight"``); ``delta(key, base)`` returns
    ``s · B A`` for LoRA targets (``(B A)ᵀ`` for embeddings and ``fan_in_fan_out`` layers) and
    ``w − base`` for ``modules_to_save`` weights. DoRA, convolution LoRA and non-LoRA adapter
    types are refused with :class:`CheckpointError`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = os.fspath(folder)
        cfg_path = os.path.join(self.path, "adapter_config.json")
        self.config_path = cfg_path
        self.config = read_json(cfg_path, "the adapter config")
        if not isinstance(self.config, dict):
            raise FormatError(f"{cfg_path}: not a JSON object")
        ptype = str(self.config.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise CheckpointError(f"{cfg_path}: adapter type {ptype} is not supported (only LoRA)")
        if self.config.get("use_dora"):
            raise CheckpointError(f"{cfg_path}: DoRA adapters are not supported (their delta is not B·A)")
        check_lora_config(self.config, cfg_path)
        st = os.path.join(self.path, "adapter_model.safetensors")
        binf = os.path.join(self.path, "adapter_model.bin")
        if os.path.exists(st):
            self._ck: Checkpoint = SafetensorsFile(st)
        elif os.path.exists(binf):
            self._ck = SafetensorsFile(binf) if looks_like_safetensors(binf) else TorchCheckpoint(binf)
        else:
            raise FileNotFoundError(f"{self.path}: no adapter_model.safetensors (or adapter_model.bin)")
        self._lora: dict[str, tuple[str, str, bool]] = {}  # base key -> (A key, B key, transpose)
        self._full: dict[str, str] = {}  # base key -> adapter key
        for k in self._ck.keys():
            name = k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k
            for a_suffix, b_suffix, emb in (
                (".lora_A.weight", ".lora_B.weight", False),
                (".lora_embedding_A", ".lora_embedding_B", True),
            ):
                if name.endswith(a_suffix):
                    module = name[: -len(a_suffix)]
                    b_key = k[: -len(a_suffix)] + b_suffix
                    if b_key not in self._ck.keys():
                        raise FormatError(f"{self._ck.path}: {k!r} has no matching {b_key!r}")
                    a_spec, b_spec = self._ck.spec(k), self._ck.spec(b_key)
                    if len(a_spec.shape) != 2:
                        raise CheckpointError(
                            f"{self._ck.path}: LoRA of {module!r} is not 2-D (convolution LoRA is not supported)"
                        )
                    if not (a_spec.dtype.is_floating_point and b_spec.dtype.is_floating_point):
                        raise DtypeMismatchError(
                            f"{self._ck.path}: LoRA factors of {module!r} are {a_spec.dtype}/{b_spec.dtype}, not floating point"
                        )
                    if a_spec.shape[0] < 1:
                        raise CheckpointError(
                            f"{self._ck.path}: LoRA of {module!r} has rank 0 ({k!r} is {a_spec.shape})"
                        )
                    if len(b_spec.shape) != 2 or b_spec.shape[1] != a_spec.shape[0]:
                        raise ShapeMismatchError(
                            f"{self._ck.path}: {b_key!r} has shape {b_spec.shape}, which does not fit {k!r} {a_spec.shape} "
                            f"(lora_B must be [out, {a_spec.shape[0]}])"
                        )
                    # PEFT: embeddings store (B A)ᵀ; fan_in_fan_out layers (GPT-2 Conv1D) store W transposed
                    self._lora[module + ".weight"] = (k, b_key, emb or bool(self.config.get("fan_in_fan_out")))
                    break
            else:
                if ".lora_" in name:
                    if ".lora_B." in name or name.endswith(".lora_embedding_B"):
                        continue
                    raise CheckpointError(
                        f"{self._ck.path}: adapter tensor {k!r} is not supported (only LoRA A/B pairs)"
                    )
                self._full[name] = k
        self.path_files = self._ck.files() + [cfg_path]

    def _scaling(self, module: str, rank: int) -> float:
        alpha = float(self.config.get("lora_alpha", rank))
        pats = self.config.get("alpha_pattern") or {}
        pat = peft_pattern_key(pats, module, self.config_path)
        if pat is not None:
            alpha = float(pats[pat])
        if self.config.get("use_rslora"):
            return alpha / math.sqrt(rank)
        return alpha / rank

    def delta_keys(self) -> list[str]:
        return list(self._lora) + [k for k in self._full if k not in self._lora]

    def covers(self, key: str) -> bool:
        return key in self._lora or key in self._full

    def delta_shape(self, key: str) -> tuple[int, ...] | None:
        """The shape the adapter's delta of ``key`` has (``None`` when it does not change ``key``)."""
        if key in self._lora:
            a_key, b_key, transpose = self._lora[key]
            shape = (self._ck.spec(b_key).shape[0], self._ck.spec(a_key).shape[1])
            return shape[::-1] if transpose else shape
        if key in self._full:
            spec = self._ck.spec(self._full[key])
            if not spec.dtype.is_floating_point:
                raise DtypeMismatchError(f"{self._ck.path}: {self._full[key]!r} is {spec.dtype}, not floating point")
            return tuple(spec.shape)
        return None

    def delta(self, key: str, base: torch.Tensor) -> torch.Tensor:
        """The adapter's delta of base tensor ``key`` in float32 or wider (``base`` gives shape/dtype)."""
        wide = torch.promote_types(base.dtype, torch.float32)
        if key in self._lora:
            a_key, b_key, transpose = self._lora[key]
            A = self._ck.get(a_key).to(wide)
            B = self._ck.get(b_key).to(wide)
            d = (B @ A) * self._scaling(key[: -len(".weight")], A.shape[0])
            if transpose:
                d = d.T
            if tuple(d.shape) != tuple(base.shape):
                raise ShapeMismatchError(
                    f"{self.path}: LoRA delta of {key!r} has shape {tuple(d.shape)}, the base tensor has {tuple(base.shape)}"
                )
            return d.contiguous()
        if key in self._full:
            w = self._ck.get(self._full[key])
            if tuple(w.shape) != tuple(base.shape):
                raise ShapeMismatchError(
                    f"{self.path}: {key!r} has shape {tuple(w.shape)}, the base tensor has {tuple(base.shape)}"
                )
            return w.to(wide) - base.to(wide)
        return torch.zeros(base.shape, dtype=wide)

    def files(self) -> list[str]:
        return list(self.path_files)

    def close(self) -> None:
        self._ck.close()


# ---------------------------------------------------------------------------- dispatch


def open_checkpoint(path: str | os.PathLike) -> Checkpoint | PeftAdapter:
    """Open ``path`` with the right lazy reader.

    A folder may hold ``adapter_config.json`` (PEFT), ``model.safetensors.index.json``,
    ``model.safetensors``, ``pytorch_model.bin.index.json`` or ``pytorch_model.bin``; a file may be
    ``*.safetensors``, ``*.index.json`` or a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``).
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        if os.path.exists(os.path.join(p, "adapter_config.json")):
            return PeftAdapter(p)
        for name in (
            "model.safetensors.index.json",
            "model.safetensors",
            "pytorch_model.bin.index.json",
            "pytorch_model.bin",
        ):
            q = os.path.join(p, name)
            if os.path.exists(q):
                return open_checkpoint(q)
        singles = [f for f in sorted(os.listdir(p)) if f.endswith(".safetensors")]
        if len(singles) == 1:
            return SafetensorsFile(os.path.join(p, singles[0]))
        raise CheckpointError(
            f"{p}: no checkpoint found in this folder (looked for adapter_config.json, model.safetensors[.index.json], pytorch_model.bin[.index.json])"
        )
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such checkpoint")
    if p.endswith(".index.json"):
        return ShardedCheckpoint(p)
    if p.endswith(".safetensors") or looks_like_safetensors(p):  # a .bin may be safetensors inside
        return SafetensorsFile(p)
    with open(p, "rb") as fh:
        magic = fh.read(2)
    if magic == b"PK" or p.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return TorchCheckpoint(p)
    return SafetensorsFile(p)  # last resort: a safetensors file without the extension


# ---------------------------------------------------------------------------- selection


def select_keys(
    keys: Iterable[str], include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[str]:
    """Names matching any ``include`` glob (all when ``include`` is empty) and no ``exclude`` glob.

    Globs are :mod:`fnmatch` patterns on the full tensor name (``"*.attn.*"``, ``"visual.*"``).
    """
    inc = list(include or [])
    exc = list(exclude or [])
    out = []
    for k in keys:
        if inc and not any(fnmatch.fnmatchcase(k, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(k, p) for p in exc):
            continue
        out.append(k)
    return out


# ---------------------------------------------------------------------------- task deltas

_DELTA_BLOCK = 1 << 22  # elements per block of TaskDelta.delta
# elements per block of a half-type delta: few large ops (on a busy 2-core machine each of torch's
# two-thread ops waits for a descheduled thread: 256K-element blocks ran 3.5x slower than 4M ones)
_HALF_BLOCK = 1 << 22
# float16 / bfloat16 bits of the exponent field: all ones is inf or nan
HALF_EXPONENT = {"F16": 0x7C00, "BF16": 0x7F80}  # the all-ones exponent: Inf or NaN


def _subtract(f: torch.Tensor, b: torch.Tensor, own: bool) -> torch.Tensor:
    """``f − b`` (same dtype), into ``f`` when ``own``. On the CPU through the native kernel
    (float32, where built: its own threads) or numpy (one thread): the same IEEE rounding as
    torch's kernel, bit for bit, but no OpenMP team, whose barrier waits for a descheduled
    worker while the merge's I/O threads and kernel pool hold the cores (6x slower on 2 cores in
    ``condu-merge add-task``; docs/kernels.md)."""
    if f.device.type != "cpu" or b.device.type != "cpu" or f.requires_grad or b.requires_grad or f.shape != b.shape:
        return f.sub_(b) if own else f - b
    out = f if own else torch.empty(f.shape, dtype=f.dtype)
    if _native_subtract(f, b, out) is None:  # the same bits on the kernels' threads, where built
        with np.errstate(all="ignore"):  # as torch: an overflow is an inf, refused later with the tensor's name
            np.subtract(f.numpy(), b.numpy(), out=out.numpy())
    return out


def _native_subtract(f: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> tuple[int, float] | None:
    from .kernels.native_backend import subtract  # imported late: the kernels load only when merging

    return subtract(f, b, out)


def element_ranges(numel: int, max_elements: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``(start, stop)`` ranges covering ``range(numel)``, each at most
    ``max_elements`` long (rounded down to a multiple of 8, at least 8), every ``start`` a
    multiple of 8 so that a packed 1-bit mask splits on byte boundaries (bytes
    ``[start // 8, ceil(stop / 8))``). One range ``(0, 0)`` for an empty tensor."""
    step = max(8, max_elements - max_elements % 8)
    if numel == 0:
        yield 0, 0
        return
    for s in range(0, numel, step):
        yield s, min(s + step, numel)


def read_range(ck: Checkpoint, key: str, start: int, stop: int) -> torch.Tensor:
    """Elements ``[start, stop)`` of ``ck``'s tensor ``key`` flattened, 1-D: read alone from a
    safetensors file (:meth:`SafetensorsFile.get_range`, also through a sharded index), else a
    slice of the whole tensor (a view: never change it in place)."""
    get_range = getattr(ck, "get_range", None)
    if get_range is not None:
        return get_range(key, start, stop)
    return ck.get(key).reshape(-1)[start:stop]


class TaskDelta:
    """``delta(key) = finetuned[key] − base[key]`` (or an adapter's delta), computed per call.

    The subtraction runs in float32 or wider and the result is cast to ``dtype`` (the store's
    dtype for that tensor). ``default_keys()`` is what takes part when nothing is selected:
    every floating-point tensor of the base that the fine-tuned checkpoint also has, or for an
    adapter the tensors it changes.
    """

    def __init__(self, base: Checkpoint, finetuned: Checkpoint | PeftAdapter):
        self.base = base
        self.finetuned = finetuned

    @property
    def is_adapter(self) -> bool:
        return isinstance(self.finetuned, PeftAdapter)

    def default_keys(self) -> list[str]:
        base_keys = self.base.keys()
        if isinstance(self.finetuned, PeftAdapter):
            have = set(base_keys)
            missing = [k for k in self.finetuned.delta_keys() if k not in have]
            if missing:
                raise KeyMismatchError(
                    f"{self.finetuned.path}: the adapter changes tensors the base {self.base.path} lacks: {missing[:5]}"
                )
            order = {k: i for i, k in enumerate(base_keys)}
            return sorted(self.finetuned.delta_keys(), key=order.__getitem__)
        ft = set(self.finetuned.keys())
        return [k for k in base_keys if k in ft and self.base.spec(k).is_floating_point]

    def candidate_keys(self) -> list[str]:
        """Every name a selection may pick from (the base's floating-point tensors)."""
        return [k for k in self.base.keys() if self.base.spec(k).is_floating_point]

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Refuse (naming key and file) a tensor the base or fine-tuned checkpoint lacks or shapes differently."""
        bspec = self.base.spec(key)
        if tuple(bspec.shape) != tuple(shape):
            raise ShapeMismatchError(
                f"{self.base.path}: base tensor {key!r} has shape {bspec.shape}, the store has {tuple(shape)}"
            )
        if not bspec.is_floating_point:
            raise KeyMismatchError(
                f"{self.base.path}: tensor {key!r} is {bspec.dtype}, not floating point; it cannot take part"
            )
        if isinstance(self.finetuned, PeftAdapter):
            dshape = self.finetuned.delta_shape(key)
            if dshape is not None and tuple(dshape) != tuple(shape):
                raise ShapeMismatchError(
                    f"{self.finetuned.path}: the adapter's delta of {key!r} has shape {tuple(dshape)}, the base tensor has {tuple(shape)}"
                )
            return
        if key not in self.finetuned.keys():
            raise KeyMismatchError(f"{self.finetuned.path}: fine-tuned checkpoint lacks tensor {key!r}")
        fspec = self.finetuned.spec(key)
        if tuple(fspec.shape) != tuple(shape):
            raise ShapeMismatchError(
                f"{self.finetuned.path}: tensor {key!r} has shape {fspec.shape}, the base has {tuple(shape)}"
            )
        if not fspec.is_floating_point:
            # an integer tensor against a float base is no fine-tuned weight (a cast gone wrong)
            raise DtypeMismatchError(
                f"{self.finetuned.path}: tensor {key!r} is {fspec.dtype} but {bspec.dtype} in the base {self.base.path}; "
                "a fine-tuned weight must be floating point like the base's"
            )

    def delta(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        b = self.base.get(key)
        if isinstance(self.finetuned, PeftAdapter):
            return self.finetuned.delta(key, b).to(dtype)
        return self._difference(key, self.finetuned.get(key), b, dtype, self._private_reads())

    def delta_range(self, key: str, dtype: torch.dtype, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of ``delta(key, dtype)`` flattened (row-major), 1-D.

        The values are those of :meth:`delta` (element-wise arithmetic); only that range of both
        checkpoints is read when they are safetensors files (single or sharded), so a tensor is
        worked through in pieces with one piece in memory. Other checkpoints (``torch.save``
        files, which are memory-mapped, and in-memory ones) are sliced; an adapter's ``B A``
        product is computed whole and sliced."""
        if isinstance(self.finetuned, PeftAdapter):
            return self.delta(key, dtype).reshape(-1)[start:stop]
        b = read_range(self.base, key, start, stop)
        f = read_range(self.finetuned, key, start, stop)
        return self._difference(key, f, b, dtype, self._private_reads())

    def _private_reads(self) -> bool:
        # a tensor just read from a safetensors file is our own buffer: the delta may overwrite
        # it (any other checkpoint may hand out the caller's own tensor: never in place there)
        return isinstance(self.finetuned, SafetensorsFile) and self.finetuned.reads_are_private

    def _difference(self, key: str, f: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, own: bool) -> torch.Tensor:
        """``f − b`` in float32 or wider, cast to ``dtype``; in place into ``f`` when ``own``."""
        wide = torch.promote_types(torch.promote_types(f.dtype, b.dtype), torch.float32)
        own = own and f.dtype == dtype
        if f.dtype == b.dtype == wide == dtype:
            return _subtract(f, b, own)
        if f.dtype == b.dtype == dtype and DTYPE_TO_ST.get(dtype) in HALF_EXPONENT and f.device.type == "cpu":
            return self._half_difference(key, f, b, own)
        # in blocks: no whole-tensor temporaries in the wide type (a bf16 embedding's fp32
        # copies would be 4x the tensor); element-wise, so the values are the same
        d = f if own else torch.empty(f.shape, dtype=dtype, device=f.device)
        df, ff, bf = d.view(-1), f.reshape(-1), b.reshape(-1)
        narrowing = d.is_floating_point() and torch.finfo(dtype).bits < torch.finfo(wide).bits
        for s in range(0, ff.numel(), _DELTA_BLOCK):
            e = s + _DELTA_BLOCK
            w = ff[s:e].to(wide) - bf[s:e].to(wide)
            df[s:e] = w
            if narrowing and not bool(torch.isfinite(df[s:e]).all()) and bool(torch.isfinite(w).all()):
                big = float(w.abs().max())
                raise NonFiniteError(
                    f"{self.finetuned.path}: the delta of tensor {key!r} (fine-tuned − base, up to {big:.6g} in magnitude) "
                    f"overflows {str(dtype).replace('torch.', '')} though both checkpoints are finite; store it wider with "
                    "--dtype float32"
                )
        return d

    def _half_difference(self, key: str, f: torch.Tensor, b: torch.Tensor, own: bool) -> torch.Tensor:
        """``f − b`` of two float16/bfloat16 tensors in their own dtype: torch's CPU kernel computes
        a half-type subtraction in float32 and rounds once, so the values are those of the wide
        path (``tests/test_checkpoints_io.py`` checks it bit for bit), in one pass without
        float32 temporaries. Blocks of :data:`_HALF_BLOCK` elements go through one scratch
        buffer, checked for overflow there (an all-ones exponent, tested on the bits) before
        they are stored; the inputs of a block stay intact, so an overflow is told apart from a
        non-finite input. Where the native kernels are built, one pass of ``cm_sub`` does the same
        (it counts the overflowed elements itself, before its output replaces the inputs)."""
        d = f if own else torch.empty(f.shape, dtype=f.dtype)
        done = _native_subtract(f, b, d)
        if done is not None:  # one pass on the kernels' threads, the same bits; overflow counted there
            if done[0]:
                raise self._overflow_error(key, done[1], f.dtype)
            return d
        df, ff, bf = d.view(-1), f.reshape(-1), b.reshape(-1)
        n = ff.numel()
        scratch = torch.empty(min(n, _HALF_BLOCK), dtype=f.dtype)
        bits = scratch.view(torch.int16).numpy()
        test = np.empty(bits.shape, dtype=np.int16)
        mask = HALF_EXPONENT[DTYPE_TO_ST[f.dtype]]
        for s in range(0, n, _HALF_BLOCK):
            e = min(s + _HALF_BLOCK, n)
            k = e - s
            out = scratch[:k]
            torch.sub(ff[s:e], bf[s:e], out=out)
            np.bitwise_and(bits[:k], mask, out=test[:k])
            if (test[:k] == mask).any():
                self._check_overflow(key, ff[s:e], bf[s:e], out)
            df[s:e].copy_(out)
        return d

    def _check_overflow(self, key: str, f: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> None:
        """Refuse a delta that is non-finite where both inputs are finite (it overflowed the dtype)."""
        wide = f.float() - b.float()
        bad = ~torch.isfinite(d) & torch.isfinite(wide)
        if bool(bad.any()):
            raise self._overflow_error(key, float(wide[bad].abs().max()), d.dtype)

    def _overflow_error(self, key: str, big: float, dtype: torch.dtype | str) -> NonFiniteError:
        return NonFiniteError(
            f"{self.finetuned.path}: the delta of tensor {key!r} (fine-tuned − base, up to {big:.6g} in magnitude) "
            f"overflows {str(dtype).replace('torch.', '')} though both checkpoints are finite; store it wider with "
            "--dtype float32"
        )

    def close(self) -> None:
        self.base.close()
        self.finetuned.close()


# ---------------------------------------------------------------------------- identity


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    return file_digest(path, "sha256", chunk)


def checkpoint_identity(
    ck: Checkpoint | PeftAdapter, algo: str = "sha256", digest: Callable[[str], str] | None = None
) -> dict[str, object]:
    """``{"path", algo, "bytes"}`` (``algo``: ``"sha256"``, the default, or ``"blake3"``): the
    digest of the file, or the same digest of the sorted ``"name digest"`` lines of every file for
    a multi-file checkpoint. ``digest(path)``: a file's digest in ``algo`` (default: read it)."""
    digest = digest or (lambda f: file_digest(f, algo))
    files = ck.files()
    if not files:
        return {"path": ck.path, algo: None, "bytes": 0}
    if len(files) == 1:
        return {
            "path": os.path.abspath(files[0]),
            algo: digest(files[0]),
            "bytes": os.path.getsize(files[0]),
        }
    lines = sorted(f"{os.path.basename(f)} {digest(f)}" for f in files)
    h = new_hasher(algo)
    h.update("\n".join(lines).encode())
    return {"path": os.path.abspath(ck.path), algo: h.hexdigest(), "bytes": sum(os.path.getsize(f) for f in files)}


def iter_tensors(ck: Checkpoint, keys: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` one at a time."""
    for k in keys if keys is not None else ck.keys():
        yield k, ck.get(k)
