"""Lazy checkpoint readers and per-tensor task deltas, for merging without loading a model.

Readers (all lazy, one tensor in memory at a time):

* :class:`SafetensorsFile` -- one ``.safetensors`` file. The header is parsed here and each tensor
  is read with ``readinto`` into a fresh buffer (no ``mmap``), so what a merge keeps resident is
  exactly the tensors it is working on, and a truncated file is reported before any data is used.
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

import fnmatch
import hashlib
import json
import math
import os
import re
import struct
from typing import Iterable, Iterator, Mapping, Protocol, Sequence

import torch

from .errors import ConduError, FormatError, KeyMismatchError, ShapeMismatchError
from .safetensors_writer import ST_TO_DTYPE, TensorSpec

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class CheckpointError(ConduError, ValueError):
    """A checkpoint cannot be used (unknown layout, unsupported adapter type, …)."""


class Checkpoint(Protocol):
    """What a merge needs from a checkpoint: names, specs and one tensor at a time."""

    path: str

    def keys(self) -> list[str]: ...

    def spec(self, key: str) -> TensorSpec: ...

    def get(self, key: str) -> torch.Tensor: ...

    def files(self) -> list[str]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------- safetensors

class SafetensorsFile:
    """One safetensors file, read lazily without mmap.

    ``get(key)`` costs one ``seek`` + ``readinto`` of that tensor's bytes. Every structural
    problem (bad header, offsets past the end of the file, unknown dtype) raises
    :class:`FormatError` naming the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fh = open(self.path, "rb")  # FileNotFoundError names the path itself
        try:
            self._parse()
        except BaseException:
            self._fh.close()
            raise

    def _parse(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        raw = self._fh.read(8)
        if len(raw) < 8:
            raise FormatError(f"{self.path}: not a safetensors file (only {size} bytes; truncated?)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise FormatError(f"{self.path}: safetensors header length {n} does not fit a {size}-byte file (truncated or not safetensors)")
        self._header_bytes = self._fh.read(n)
        try:
            header = json.loads(self._header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{self.path}: safetensors header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._size = size
        # running sha256 of what was read, valid while reads go front to back (see sequential_sha256)
        self._seq: "hashlib._Hash | None" = hashlib.sha256(raw + self._header_bytes)
        self._seq_pos = 8 + n
        self._entries: dict[str, tuple[TensorSpec, int, int]] = {}
        data_len = size - self._data_start
        for name, e in header.items():
            try:
                dtype = ST_TO_DTYPE[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise FormatError(f"{self.path}: header entry of tensor {name!r} is malformed or has an unsupported dtype ({exc})") from exc
            spec = TensorSpec(name, dtype, shape)
            if any(d < 0 for d in shape):
                raise FormatError(f"{self.path}: tensor {name!r} has a negative dimension in shape {shape}")
            if end - begin != spec.nbytes or begin < 0:
                raise FormatError(f"{self.path}: tensor {name!r} has {end - begin} bytes of data for shape {shape} {dtype}")
            if end > data_len:
                raise FormatError(
                    f"{self.path}: tensor {name!r} ends at byte {self._data_start + end} but the file has {size} bytes (truncated)"
                )
            self._entries[name] = (spec, begin, end)
        # file order: reading keys() in turn reads the file front to back
        self._entries = dict(sorted(self._entries.items(), key=lambda kv: (kv[1][1], kv[1][2])))

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
        spec, begin, end = self._entries.get(key, (None, 0, 0))
        if spec is None:
            raise KeyMismatchError(f"{self.path}: no tensor {key!r}")
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            self._fh.seek(self._data_start + begin)
            got = self._fh.readinto(memoryview(buf.numpy()))
            if got != end - begin:
                raise FormatError(f"{self.path}: tensor {key!r} is truncated ({got} of {end - begin} bytes)")
            if self._seq is not None:
                self._hash_to(self._data_start + begin)
                if self._seq is not None:
                    self._seq.update(memoryview(buf.numpy()))
                    self._seq_pos += end - begin
        if spec.dtype == torch.uint8:
            return buf.reshape(spec.shape)
        return buf.view(spec.dtype).reshape(spec.shape)

    def _hash_to(self, pos: int) -> None:
        """Bring the running hash up to byte ``pos``: bytes :meth:`get` skipped (tensors not read,
        the tail) are read and hashed here; a read behind the hash ends it (``None``)."""
        if pos < self._seq_pos:
            self._seq = None
            return
        if pos == self._seq_pos:
            return
        here = self._fh.tell()
        self._fh.seek(self._seq_pos)
        left = pos - self._seq_pos
        while left:
            block = self._fh.read(min(left, 1 << 22))
            if not block:
                raise FormatError(f"{self.path}: truncated at byte {pos - left} while hashing")
            self._seq.update(block)
            left -= len(block)
        self._seq_pos = pos
        self._fh.seek(here)

    def no_read_hash(self) -> None:
        """Stop hashing what :meth:`get` reads (for a file whose sha256 nobody will ask for)."""
        self._seq = None

    def sequential_sha256(self) -> str | None:
        """sha256 of the whole file, if :meth:`get` read front to back (bytes it skipped are read
        and hashed now), else ``None``; also ``None`` after :meth:`no_read_hash`.

        Lets a streaming reader check a file's integrity while it uses it: each byte is read once."""
        if self._seq is None:
            return None
        self._hash_to(self._size)
        return self._seq.hexdigest() if self._seq is not None else None

    def files(self) -> list[str]:
        return [self.path]

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardedCheckpoint:
    """A sharded checkpoint: ``{"weight_map": {tensor: shard file}}`` plus the shards, opened on first use."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = os.fspath(index_path)
        try:
            with open(self.path, encoding="utf-8") as fh:
                index = json.load(fh)
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FormatError(f"{self.path}: not a checkpoint index (needs a 'weight_map'; {exc})") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
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

    def _shard(self, key: str) -> Checkpoint:
        try:
            f = self._map[key]
        except KeyError:
            raise KeyMismatchError(f"{self.path}: no tensor {key!r}") from None
        ck = self._open.get(f)
        if ck is None:
            ck = SafetensorsFile(f) if f.endswith(".safetensors") else TorchCheckpoint(f)
            if key not in ck.keys():
                raise FormatError(f"{self.path}: the index puts {key!r} in {os.path.basename(f)}, which lacks it")
            self._open[f] = ck
        return ck

    def keys(self) -> list[str]:
        return list(self._map)

    def spec(self, key: str) -> TensorSpec:
        return self._shard(key).spec(key)

    def get(self, key: str) -> torch.Tensor:
        return self._shard(key).get(key)

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
        try:
            with open(cfg_path, encoding="utf-8") as fh:
                self.config = json.load(fh)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{cfg_path}: not valid JSON ({exc})") from exc
        ptype = str(self.config.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise CheckpointError(f"{cfg_path}: adapter type {ptype} is not supported (only LoRA)")
        if self.config.get("use_dora"):
            raise CheckpointError(f"{cfg_path}: DoRA adapters are not supported (their delta is not B·A)")
        st = os.path.join(self.path, "adapter_model.safetensors")
        binf = os.path.join(self.path, "adapter_model.bin")
        if os.path.exists(st):
            self._ck: Checkpoint = SafetensorsFile(st)
        elif os.path.exists(binf):
            self._ck = TorchCheckpoint(binf)
        else:
            raise FileNotFoundError(f"{self.path}: no adapter_model.safetensors (or adapter_model.bin)")
        self._lora: dict[str, tuple[str, str, bool]] = {}  # base key -> (A key, B key, transpose)
        self._full: dict[str, str] = {}  # base key -> adapter key
        for k in self._ck.keys():
            name = k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k
            for a_suffix, b_suffix, emb in ((".lora_A.weight", ".lora_B.weight", False), (".lora_embedding_A", ".lora_embedding_B", True)):
                if name.endswith(a_suffix):
                    module = name[: -len(a_suffix)]
                    b_key = k[: -len(a_suffix)] + b_suffix
                    if b_key not in self._ck.keys():
                        raise FormatError(f"{self._ck.path}: {k!r} has no matching {b_key!r}")
                    if len(self._ck.spec(k).shape) != 2:
                        raise CheckpointError(f"{self._ck.path}: LoRA of {module!r} is not 2-D (convolution LoRA is not supported)")
                    # PEFT: embeddings store (B A)ᵀ; fan_in_fan_out layers (GPT-2 Conv1D) store W transposed
                    self._lora[module + ".weight"] = (k, b_key, emb or bool(self.config.get("fan_in_fan_out")))
                    break
            else:
                if ".lora_" in name:
                    if ".lora_B." in name or name.endswith(".lora_embedding_B"):
                        continue
                    raise CheckpointError(f"{self._ck.path}: adapter tensor {k!r} is not supported (only LoRA A/B pairs)")
                self._full[name] = k
        self.path_files = self._ck.files() + [cfg_path]

    def _scaling(self, module: str, rank: int) -> float:
        alpha = float(self.config.get("lora_alpha", rank))
        for pat, val in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?{pat}$", module):
                alpha = float(val)
                break
        if self.config.get("use_rslora"):
            return alpha / math.sqrt(rank)
        return alpha / rank

    def delta_keys(self) -> list[str]:
        return list(self._lora) + [k for k in self._full if k not in self._lora]

    def covers(self, key: str) -> bool:
        return key in self._lora or key in self._full

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
                raise ShapeMismatchError(f"{self.path}: {key!r} has shape {tuple(w.shape)}, the base tensor has {tuple(base.shape)}")
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
        for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"):
            q = os.path.join(p, name)
            if os.path.exists(q):
                return open_checkpoint(q)
        singles = [f for f in sorted(os.listdir(p)) if f.endswith(".safetensors")]
        if len(singles) == 1:
            return SafetensorsFile(os.path.join(p, singles[0]))
        raise CheckpointError(f"{p}: no checkpoint found in this folder (looked for adapter_config.json, model.safetensors[.index.json], pytorch_model.bin[.index.json])")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such checkpoint")
    if p.endswith(".index.json"):
        return ShardedCheckpoint(p)
    if p.endswith(".safetensors"):
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
                raise KeyMismatchError(f"{self.finetuned.path}: the adapter changes tensors the base {self.base.path} lacks: {missing[:5]}")
            order = {k: i for i, k in enumerate(base_keys)}
            return sorted(self.finetuned.delta_keys(), key=order.__getitem__)
        ft = set(self.finetuned.keys())
        return [k for k in base_keys if k in ft and self.base.spec(k).dtype.is_floating_point]

    def candidate_keys(self) -> list[str]:
        """Every name a selection may pick from (the base's floating-point tensors)."""
        return [k for k in self.base.keys() if self.base.spec(k).dtype.is_floating_point]

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Refuse (naming key and file) a tensor the base or fine-tuned checkpoint lacks or shapes differently."""
        bspec = self.base.spec(key)
        if tuple(bspec.shape) != tuple(shape):
            raise ShapeMismatchError(f"{self.base.path}: base tensor {key!r} has shape {bspec.shape}, the store has {tuple(shape)}")
        if not bspec.dtype.is_floating_point:
            raise KeyMismatchError(f"{self.base.path}: tensor {key!r} is {bspec.dtype}, not floating point; it cannot take part")
        if isinstance(self.finetuned, PeftAdapter):
            return
        if key not in self.finetuned.keys():
            raise KeyMismatchError(f"{self.finetuned.path}: fine-tuned checkpoint lacks tensor {key!r}")
        fspec = self.finetuned.spec(key)
        if tuple(fspec.shape) != tuple(shape):
            raise ShapeMismatchError(f"{self.finetuned.path}: tensor {key!r} has shape {fspec.shape}, the base has {tuple(shape)}")

    def delta(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        b = self.base.get(key)
        if isinstance(self.finetuned, PeftAdapter):
            d = self.finetuned.delta(key, b)
        else:
            f = self.finetuned.get(key)
            wide = torch.promote_types(torch.promote_types(f.dtype, b.dtype), torch.float32)
            # a tensor just read from a safetensors file is our own buffer: the delta may overwrite
            # it (any other checkpoint may hand out the caller's own tensor: never in place there)
            own = isinstance(self.finetuned, SafetensorsFile) and f.dtype == dtype
            if f.dtype == b.dtype == wide == dtype:
                return f.sub_(b) if own else f - b
            # in blocks: no whole-tensor temporaries in the wide type (a bf16 embedding's fp32
            # copies would be 4x the tensor); element-wise, so the values are the same
            d = f if own else torch.empty(f.shape, dtype=dtype, device=f.device)
            df, ff, bf = d.view(-1), f.reshape(-1), b.reshape(-1)
            for s in range(0, ff.numel(), _DELTA_BLOCK):
                e = s + _DELTA_BLOCK
                df[s:e] = ff[s:e].to(wide) - bf[s:e].to(wide)
            return d
        return d.to(dtype)

    def close(self) -> None:
        self.base.close()
        self.finetuned.close()


# ---------------------------------------------------------------------------- identity

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(view)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def checkpoint_identity(ck: Checkpoint | PeftAdapter) -> dict[str, object]:
    """``{"path", "sha256", "bytes"}``: the sha256 is of the file, or of the sorted
    ``"name sha256"`` lines of every file for a multi-file checkpoint."""
    files = ck.files()
    if not files:
        return {"path": ck.path, "sha256": None, "bytes": 0}
    if len(files) == 1:
        return {"path": os.path.abspath(files[0]), "sha256": sha256_file(files[0]), "bytes": os.path.getsize(files[0])}
    lines = sorted(f"{os.path.basename(f)} {sha256_file(f)}" for f in files)
    return {
        "path": os.path.abspath(ck.path),
        "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
        "bytes": sum(os.path.getsize(f) for f in files),
    }


def iter_tensors(ck: Checkpoint, keys: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` one at a time."""
    for k in keys if keys is not None else ck.keys():
        yield k, ck.get(k)
