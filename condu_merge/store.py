"""A continual session on disk: crash-safe generations, integrity checks, lazy reads.

Layout of a store directory::

    STORE/manifest.json              the current state (replaced atomically)
    STORE/.lock                      writers hold an exclusive flock on it
    STORE/gen-000004/unified.safetensors        u, in the deltas' dtype
    STORE/gen-000004/masks/0000.safetensors     task 0's masks: uint8, 1 bit per element
    STORE/gen-000004/prototypes/0000.safetensors  optional per-task tensors (e.g. prototypes)

``manifest.json`` holds the format version, the rescaler mode, the tensors (name, dtype, shape,
in order), the tasks in order with their rescalers, the base checkpoint's identity, creation
times, the sha256 and size of every data file, and a checksum of itself.

Crash safety: a write (add a task, save a session, save prototypes) builds a complete new
generation directory beside the current one, fsyncs its files and the directory, then
replaces ``manifest.json`` with ``os.replace`` (after fsync) and fsyncs ``STORE``; only then are
older generations deleted. A process killed at any point leaves ``manifest.json`` naming either
the old or the new generation, both complete. Leftovers of a killed writer are removed by the
next writer.

Streaming: :meth:`Store.add_task` reads the current ``u`` and masks one tensor at a time,
computes the continual step with :func:`condu_merge.core.add_task_tensor` and writes the result
into the new generation with :class:`GenerationWriter`, so peak memory is one tensor's work
whatever the model size.

Writer protocol shared with :mod:`condu_merge.distributed` (internal; the caller holds the
writer lock and has reloaded): :func:`check_add_args`, :func:`open_task_delta`,
:meth:`Store._plan_mapping_task` / :meth:`Store._plan_checkpoint_task`,
:meth:`Store._check_new_task`, :meth:`Store._new_generation_dir`, :func:`generation_layout`,
:func:`continual_step_tensor`, :meth:`Store._finish_add`, :meth:`Store._commit`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence, Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .backends import FlatMergeResult, MergeBackend, resolve_backend
from .checkpoints import (
    Checkpoint,
    MemoryCheckpoint,
    PeftAdapter,
    SafetensorsFile,
    TaskDelta,
    checkpoint_identity,
    open_checkpoint,
    parse_json,
    select_keys,
    sha256_file,
)
from .core import RESCALER_MODES, add_task_tensor, compute_rescalers, unify_tensor
from .errors import (
    ConduError,
    DtypeMismatchError,
    DuplicateTaskError,
    FormatError,
    KeyMismatchError,
    MergeInputError,
    OptionMismatchError,
    ShapeMismatchError,
    UnknownTaskError,
    UnsafePathError,
)
from .manifest_check import (
    GENERATION_RE,
    STORE_FILE_RE,
    UNIFIED,
    check_manifest_structure,
    mask_file,
    proto_file,
)
from .packing import packed_nbytes
from .safetensors_writer import (
    DTYPE_TO_ST,
    ST_TO_DTYPE,
    StreamingSafetensorsWriter,
    TensorSpec,
    build_header,
    dtype_itemsize,
    tensor_bytes,
)
from .trigger import Rescaler, TaskTrigger

if TYPE_CHECKING:  # merger imports store lazily; annotations only
    from .merger import ContinualMerger

STORE_FORMAT = "condu-merge/store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
KEEP_OPEN_FILES = 64
"""A store (or a generation being written) with more data files than this opens each file for
each use instead of holding a descriptor per file: thousands of tasks fit the default limit of
1,024 open files."""
CRASH_ENV = "CONDU_MERGE_CRASH_AT"
"""Test hook: when set to a step name, the process SIGKILLs itself on reaching that step.

Steps: ``write:start`` (lock taken, nothing written), ``write:tensor`` (first tensor written),
``write:data`` (every data file written and fsynced, manifest not yet), ``commit:tmp``
(new manifest fsynced beside the old one), ``commit:switched`` (manifest replaced, old
generation still there), ``commit:cleanup`` (old generation partly deleted)."""


class StoreLockedError(ConduError, RuntimeError):
    """Another process is writing the store."""


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second (the manifest's timestamps)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable (new, renamed or removed files). A no-op on Windows,
    where directories cannot be opened for fsync (a rename is durable enough there)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _committed_generation(root: str) -> str | None:
    """The generation ``manifest.json`` names on disk now (``None`` if none or unreadable): a
    failed writer removes its new generation only when this is not it (an error or Ctrl-C after
    the switch must not delete the committed state)."""
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as fh:
            gen: str | None = json.load(fh).get("generation_dir")
            return gen
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _plain_file(path: str) -> bool:
    """A regular file, not a symlink (``lstat``)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _plain_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _owned_generation(path: str) -> bool:
    """Whether ``path`` is a generation folder exactly as a writer of this store leaves it: a real
    folder (not a symlink) holding only ``unified.safetensors``, ``masks/NNNN.safetensors`` and
    ``prototypes/NNNN.safetensors`` (regular files) and the ``masks``/``prototypes`` folders. A
    folder that holds anything else is not ours to delete, whatever its name."""
    if not _plain_dir(path):
        return False
    for n in os.listdir(path):
        p = os.path.join(path, n)
        if n in ("masks", "prototypes"):
            if not _plain_dir(p):
                return False
            for m in os.listdir(p):
                if not _STORE_FILE_RE.fullmatch(f"{n}/{m}") or not _plain_file(os.path.join(p, m)):
                    return False
        elif n != UNIFIED or not _plain_file(p):
            return False
    return True


def remove_generation_dir(path: str, files: Sequence[str] | None = None, *, crash_step: str | None = None) -> None:
    """Delete a generation this store wrote: its data files (``files``, relative; default every
    file of the store's name patterns in it), then the folders if that left them empty. Never
    follows a symlink and never deletes a file of another name: a foreign file keeps its folder."""
    if not _plain_dir(path):
        return
    if files is None:
        files = [UNIFIED] + [
            f"{sub}/{n}"
            for sub in ("masks", "prototypes")
            if _plain_dir(os.path.join(path, sub))
            for n in os.listdir(os.path.join(path, sub))
        ]
    first = True
    for rel in files:
        p = os.path.join(path, rel)
        if _STORE_FILE_RE.fullmatch(rel) and _plain_file(p) and _plain_dir(os.path.dirname(p)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            if first and crash_step:
                _crash_point(crash_step)
            first = False
    for sub in ("masks", "prototypes", ""):
        with contextlib.suppress(OSError):  # not empty (a foreign file), or already gone
            os.rmdir(os.path.join(path, sub) if sub else path)


_MANIFEST_TMP_RE = re.compile(re.escape(MANIFEST) + r"\.tmp-(\d+)")


def foreign_entries(root: str) -> list[str]:
    """Names in ``root`` that a store does not create (anything but ``manifest.json``, ``.lock``,
    ``manifest.json.tmp-PID`` files and generation folders as :func:`_owned_generation` knows them)."""
    out = []
    for n in sorted(os.listdir(root)):
        p = os.path.join(root, n)
        if n in (MANIFEST, LOCK):
            continue
        if _GENERATION_RE.fullmatch(n) and _owned_generation(p):
            continue
        if _MANIFEST_TMP_RE.fullmatch(n) and _plain_file(p):
            continue
        out.append(n)
    return out


def prepare_store_folder(root: str) -> None:
    """Before a writer takes the lock: create ``root`` if needed, and refuse to turn a folder that
    holds other files into a store (its files are not ours, and a later cleanup must never be
    able to mistake them for a store's)."""
    os.makedirs(root, exist_ok=True)
    if os.path.lexists(os.path.join(root, MANIFEST)):
        return
    foreign = foreign_entries(root)
    if foreign:
        raise UnsafePathError(
            f"{root}: this folder is not empty and is not a condu-merge store (it holds {foreign[:5]}); "
            "create the store in a new or empty folder"
        )


def open_writer_lock(root: str) -> StoreLock:
    """:func:`prepare_store_folder`, then the writer lock (the caller releases it)."""
    prepare_store_folder(root)
    return StoreLock(root).acquire()


def _with_path(exc: OSError, path: str) -> OSError:
    """``exc`` naming ``path`` (a failed ``write``, e.g. ENOSPC, names no file by itself)."""
    if exc.filename is None:
        new = type(exc)(exc.errno, exc.strerror or str(exc), path)
        new.__cause__ = exc
        return new
    return exc


def _manifest_checksum(manifest: Mapping[str, object]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def popcount_bytes(packed: torch.Tensor) -> int:
    """Set bits of a packed mask, counted by bitarray (no unpacking)."""
    from bitarray import bitarray

    if packed.numel() == 0:
        return 0
    arr = packed.contiguous().numpy()
    return bitarray(buffer=arr.data, endian="little").count(1)


# the manifest's structure and the store's file names live in a torch-free module, so the CLI's
# light view (store_view) checks a manifest exactly as the store does
_GENERATION_RE = GENERATION_RE
_STORE_FILE_RE = STORE_FILE_RE
_check_manifest_structure = check_manifest_structure
_proto_file = proto_file


# ---------------------------------------------------------------------------- lock


class StoreLock:
    """Exclusive, non-blocking ``flock`` on ``STORE/.lock``; the second writer gets
    :class:`StoreLockedError` naming the holder's pid. Released on close or process death."""

    def __init__(self, root: str):
        self.path = os.path.join(root, LOCK)
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        # never follow a planted symlink, never block on a FIFO, and write (truncate) only a plain
        # single-link file holding at most a pid: what a writer of this store leaves
        flags = (
            os.O_RDWR
            | os.O_CREAT
            | getattr(os, "O_NOFOLLOW", 0)
            | getattr(os, "O_NONBLOCK", 0)
            | getattr(os, "O_CLOEXEC", 0)
        )
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(self.path):
                raise UnsafePathError(
                    f"{self.path}: the store's lock is a symbolic link; refusing to open it (remove it)"
                ) from None
            raise _with_path(exc, self.path) from None
        try:
            st = os.fstat(fd)
            content = os.pread(fd, 64, 0) if stat.S_ISREG(st.st_mode) else b""
        except OSError:
            os.close(fd)
            raise
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_nlink != 1
            or st.st_size > 32
            or (not content.strip().isdigit() and content.strip())
        ):
            os.close(fd)
            raise UnsafePathError(
                f"{self.path}: is not a lock file this store created (a link, not a regular file, or foreign content); "
                "refusing to write it -- remove it if it is not yours"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 64, 0).decode().strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"{os.path.dirname(self.path)}: another process{f' (pid {holder})' if holder else ''} is writing this store; "
                    "try again when it has finished"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------- generation writer


def generation_layout(specs: Sequence[TensorSpec], n_tasks: int) -> dict[str, tuple[list[TensorSpec], dict[str, str]]]:
    """``{relative path: (tensor specs in file order, safetensors metadata)}`` of one generation's
    data files: ``u`` in the deltas' dtypes, then one mask file per task (``uint8``,
    ``ceil(N/8)`` bytes per tensor). Every writer of a generation (:class:`GenerationWriter`, the
    distributed step's shared files) lays files out from this, so their bytes are identical."""
    meta = {"format": STORE_FORMAT, "version": str(STORE_VERSION)}
    mask_specs = [TensorSpec(s.name, torch.uint8, (packed_nbytes(math.prod(s.shape)),)) for s in specs]
    layout = {UNIFIED: (list(specs), {**meta, "content": "unified"})}
    for i in range(n_tasks):
        layout[mask_file(i)] = (mask_specs, {**meta, "content": "masks", "task_index": str(i)})
    return layout


class _ReopeningWriter:
    """:class:`StreamingSafetensorsWriter`'s interface (header first, tensors in order, sha256
    while writing) for a generation of more than :data:`KEEP_OPEN_FILES` files: the file is
    opened for each tensor's append and closed again, so no descriptor is held between passes."""

    def __init__(self, path: str, specs: Sequence[TensorSpec], metadata: Mapping[str, str]):
        self.path = path
        self.specs = list(specs)
        self._next = 0
        self._hash = hashlib.sha256()
        self._size = 0
        head, _ = build_header(self.specs, metadata)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            self._append(fd, memoryview(head))
        finally:
            os.close(fd)

    def _append(self, fd: int, data: memoryview) -> None:
        while data.nbytes:
            n = os.write(fd, data)
            self._hash.update(data[:n])
            self._size += n
            data = data[n:]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is None or name != spec.name or tensor.dtype != spec.dtype or tensor.numel() != math.prod(spec.shape):
            raise ValueError(f"{self.path}: tensor {name!r} is not the next declared one ({spec})")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        try:
            self._append(fd, tensor_bytes(tensor))
        finally:
            os.close(fd)
        self._next += 1

    def close(self) -> tuple[str, int]:
        if self._next != len(self.specs):
            raise ValueError(f"{self.path}: closed with tensors not written")
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self._hash.hexdigest(), self._size

    def abort(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class GenerationWriter:
    """Writes one complete generation, one tensor at a time.

    ``write(key, u, masks)`` appends tensor ``key``'s unified values and its ``t`` mask rows
    (``uint8 [t, ceil(N/8)]``, the layout of :class:`~condu_merge.backends.FlatMergeResult`)
    in the order of ``specs``; :meth:`finish` fsyncs and returns ``{relative path: {"sha256",
    "bytes"}}``. Any caller that produces per-tensor merge results (the store's streaming
    ``add_task``, a distributed merge's gather) writes through this.
    """

    def __init__(self, gen_dir: str, specs: Sequence[TensorSpec], n_tasks: int):
        self.dir = gen_dir
        self.specs = list(specs)
        self.n_tasks = n_tasks
        os.makedirs(os.path.join(gen_dir, "masks"), exist_ok=False)
        self.mask_bits = [0] * n_tasks
        self._writers: dict[str, StreamingSafetensorsWriter | _ReopeningWriter] = {}
        few = n_tasks + 1 <= KEEP_OPEN_FILES
        try:
            for rel, (file_specs, meta) in generation_layout(self.specs, n_tasks).items():
                path = os.path.join(gen_dir, rel)
                try:
                    if few or rel == UNIFIED:
                        self._writers[rel] = StreamingSafetensorsWriter(path, file_specs, meta)
                    else:
                        self._writers[rel] = _ReopeningWriter(path, file_specs, meta)
                except OSError as exc:
                    raise _with_path(exc, path) from None
        except BaseException:
            self.abort()
            raise

    def write(self, key: str, u: torch.Tensor, masks: torch.Tensor) -> None:
        """Append tensor ``key``: ``u`` (any shape, the declared dtype) and ``masks`` (``[t, B]`` uint8)."""
        if masks.dim() != 2 or masks.shape[0] != self.n_tasks:
            raise ValueError(f"tensor {key!r}: expected {self.n_tasks} mask rows, got {tuple(masks.shape)}")
        masks = masks.cpu()
        w = self._writers[UNIFIED]
        try:
            w.write(key, u.reshape(-1))
            for i in range(self.n_tasks):
                row = masks[i]
                self.mask_bits[i] += popcount_bytes(row)
                w = self._writers[mask_file(i)]
                w.write(key, row)
        except OSError as exc:  # ENOSPC, EIO, EDQUOT: say which file
            raise _with_path(exc, w.path) from None

    def finish(self) -> dict[str, dict[str, object]]:
        files = {}
        for rel, w in self._writers.items():
            try:
                sha, size = w.close()
            except OSError as exc:
                raise _with_path(exc, w.path) from None
            files[rel] = {"sha256": sha, "bytes": size}
        fsync_dir(os.path.join(self.dir, "masks"))
        fsync_dir(self.dir)
        return files

    def abort(self) -> None:
        for w in self._writers.values():
            with contextlib.suppress(Exception):
                w.abort()
        remove_generation_dir(self.dir)


def continual_step_tensor(
    spec: TensorSpec,
    delta: torch.Tensor,
    label: str,
    u: torch.Tensor | None = None,
    packed_masks: Sequence[torch.Tensor] = (),
    lambdas: Sequence[Rescaler] = (),
    *,
    backend: str | MergeBackend,
    device: torch.device | None = None,
) -> FlatMergeResult:
    """One tensor of a continual step: ``delta`` is checked against ``spec`` (shape and dtype);
    the first task (``u is None``) is :func:`~condu_merge.core.unify_tensor` of ``[delta]``, a later
    one :func:`~condu_merge.core.add_task_tensor` of ``u``, the earlier tasks' packed masks and
    their λ's at this tensor. ``device``: where the merge runs (inputs are moved there)."""
    if tuple(delta.shape) != tuple(spec.shape):
        raise ShapeMismatchError(
            f"{label}: tensor {spec.name!r} has shape {tuple(delta.shape)}, the store has {spec.shape}"
        )
    if delta.dtype != spec.dtype:
        raise DtypeMismatchError(f"{label}: tensor {spec.name!r} is {delta.dtype}, the store keeps {spec.dtype}")
    if device is not None:
        delta = delta.to(device)
    if u is None:
        return unify_tensor([delta], backend=backend, key=spec.name, labels=[label])
    if device is not None:
        u = u.to(device)
    lams = [lam[spec.name] if isinstance(lam, dict) else lam for lam in lambdas]
    return add_task_tensor(u, list(packed_masks), lams, delta, backend=backend, key=spec.name, label=label)


def _write_prototype_file(path: str, tensors: Mapping[str, torch.Tensor], task: str) -> dict[str, object]:
    specs = []
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise MergeInputError(f"prototypes of task {task!r}: {k!r} is a {type(v).__name__}, not a tensor")
        specs.append(TensorSpec(k, v.dtype, tuple(v.shape)))
    w = StreamingSafetensorsWriter(path, specs, {"format": STORE_FORMAT, "content": "prototypes", "task": task})
    with w:
        for k, v in tensors.items():
            w.write(k, v)
        sha, size = w.close()
    return {"sha256": sha, "bytes": size}


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link an immutable data file into a new generation (copy where links are impossible)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())


# ---------------------------------------------------------------------------- the store


@dataclass
class VerifyReport:
    files: int
    bytes: int


class Store:
    """A store directory. Opening reads ``manifest.json`` and checks every data file's size and
    header (and, with ``verify=True``, its sha256); a missing manifest is an empty store that the
    first :meth:`add_task` creates. Reads are lazy: :meth:`decouple` of one task reads only ``u``
    and that task's masks, tensor by tensor.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True):
        self.root = os.path.abspath(os.fspath(path))
        self.verify_on_load = verify
        self.manifest: dict[str, Any] | None = None
        self._gen_seen: str | None = None  # generation named by the manifest last read
        self._files: dict[str, SafetensorsFile] = {}
        self._load(verify)

    # ------------------------------------------------------------------ loading
    @property
    def exists(self) -> bool:
        return self.manifest is not None

    def _manifest_path(self) -> str:
        return os.path.join(self.root, MANIFEST)

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def close(self) -> None:
        self._close_files()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self, verify: bool) -> None:
        # readers never block: a writer may switch manifest.json and delete the generation we
        # just read about; if the manifest on disk moved on, read again (a few times at most)
        for attempt in range(5):
            try:
                return self._load_once(verify)
            except (FormatError, FileNotFoundError):
                seen = self._gen_seen
                if attempt == 4 or seen is None or _committed_generation(self.root) in (None, seen):
                    raise

    def _load_once(self, verify: bool) -> None:
        self._gen_seen = None
        self._close_files()
        mpath = self._manifest_path()
        if not os.path.exists(mpath):
            # no store yet (a first write killed before its switch leaves only a gen-* leftover,
            # which the next writer removes): an empty store
            self.manifest = None
            return
        with open(mpath, "rb") as fh:
            m = parse_json(fh.read(), mpath, "the store manifest")
        if not isinstance(m, dict) or m.get("format") != STORE_FORMAT:
            raise FormatError(f"{mpath}: not a condu-merge store manifest")
        if type(m.get("version")) is not int or m.get("version") != STORE_VERSION:
            raise FormatError(
                f"{mpath}: store format version {m.get('version')!r} is not supported (this condu-merge reads version {STORE_VERSION})"
            )
        if m.get("checksum") != _manifest_checksum(m):
            raise FormatError(f"{mpath}: manifest checksum mismatch (the manifest was modified or damaged)")
        _check_manifest_structure(m, mpath)
        self._gen_seen = m.get("generation_dir")
        gen = os.path.join(self.root, m["generation_dir"])
        for rel, info in m["files"].items():
            p = os.path.join(gen, rel)
            if not os.path.exists(p):
                raise FormatError(f"{p}: data file is missing from the store")
            size = os.path.getsize(p)
            if size != info["bytes"]:
                raise FormatError(f"{p}: has {size} bytes, the manifest records {info['bytes']} (truncated or damaged)")
            if verify and sha256_file(p) != info["sha256"]:
                raise FormatError(f"{p}: sha256 mismatch: the file is damaged (a byte differs from what was written)")
        self.manifest = m
        files = {UNIFIED: None, **{t["masks"]: None for t in m["tasks"]}}
        keep_open = len(files) <= KEEP_OPEN_FILES
        try:
            for rel in files:
                self._files[rel] = SafetensorsFile(os.path.join(gen, rel), keep_open=keep_open or rel == UNIFIED)
        except BaseException:
            self._close_files()
            raise
        self._check_headers()

    def _check_headers(self) -> None:
        specs = self.specs
        index = {t["masks"]: i for i, t in enumerate(self._require()["tasks"])}
        for rel, f in self._files.items():
            if f.keys() != [s.name for s in specs]:
                raise FormatError(f"{f.path}: its tensors differ from the manifest's")
            if rel in index and f.metadata.get("task_index", str(index[rel])) != str(index[rel]):
                raise FormatError(
                    f"{f.path}: holds the masks of task #{f.metadata['task_index']}, the manifest puts task #{index[rel]} here"
                )
            for s in specs:
                got = f.spec(s.name)
                want = s if rel == UNIFIED else TensorSpec(s.name, torch.uint8, (packed_nbytes(math.prod(s.shape)),))
                if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
                    raise FormatError(
                        f"{f.path}: tensor {s.name!r} is {got.shape} {got.dtype}, the manifest says {want.shape} {want.dtype}"
                    )

    def reload(self, *, verify: bool | None = None) -> None:
        """Re-read ``manifest.json`` (after another process wrote)."""
        self._load(self.verify_on_load if verify is None else verify)

    def verify(self) -> VerifyReport:
        """Check every data file against its recorded size and sha256; :class:`FormatError` naming the first bad file."""
        self._load(True)
        if self.manifest is None:
            return VerifyReport(0, 0)
        return VerifyReport(len(self.manifest["files"]), sum(int(i["bytes"]) for i in self.manifest["files"].values()))

    # ------------------------------------------------------------------ accessors
    def _require(self) -> dict[str, Any]:
        if self.manifest is None:
            raise FileNotFoundError(f"{self.root}: no condu-merge store here (no {MANIFEST}); add a task first")
        return self.manifest

    @property
    def gen_dir(self) -> str:
        return os.path.join(self.root, self._require()["generation_dir"])

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]] if self.manifest else []

    @property
    def generation(self) -> int:
        """The committed generation this object reads (0 for an empty store); it changes with
        every write (a task, a session, prototypes) seen by this object, after :meth:`reload`
        for writes by others."""
        return int(self.manifest.get("generation", 0)) if self.manifest else 0

    @property
    def rescaler(self) -> str | None:
        return self.manifest["rescaler"] if self.manifest else None

    @property
    def specs(self) -> list[TensorSpec]:
        m = self._require()
        return [TensorSpec(t["name"], ST_TO_DTYPE[t["dtype"]], tuple(t["shape"])) for t in m["tensors"]]

    @property
    def keys(self) -> list[str]:
        return [t["name"] for t in self._require()["tensors"]]

    def _task_index(self, task: str) -> int:
        names = self.task_names
        if task not in names:
            raise UnknownTaskError(f"{self.root}: no task {task!r} in this store; tasks: {names}")
        return names.index(task)

    def task_info(self, task: str) -> dict[str, Any]:
        info: dict[str, Any] = self._require()["tasks"][self._task_index(task)]
        return info

    def rescaler_of(self, task: str) -> Rescaler:
        r = self.task_info(task)["rescaler"]
        return {k: float(v) for k, v in r.items()} if isinstance(r, dict) else float(r)

    def unified_tensor(self, key: str) -> torch.Tensor:
        """``u[key]`` read from disk."""
        return self._files[UNIFIED].get(key)

    def packed_mask(self, task: str, key: str) -> torch.Tensor:
        """Task ``task``'s packed mask of tensor ``key`` (``uint8``, 1 bit per element)."""
        return self._files[self.task_info(task)["masks"]].get(key)

    def packed_masks(self, key: str) -> list[torch.Tensor]:
        """Every task's packed mask of tensor ``key``, in task order."""
        return [self._files[t["masks"]].get(key) for t in self._require()["tasks"]]

    def trigger(self, task: str) -> TaskTrigger:
        """Task ``task``'s :class:`TaskTrigger` (its masks read into memory)."""
        rel = self.task_info(task)["masks"]
        specs = self.specs
        return TaskTrigger(
            {s.name: self._files[rel].get(s.name) for s in specs},
            {s.name: tuple(s.shape) for s in specs},
            self.rescaler_of(task),
            task,
        )

    # ------------------------------------------------------------------ lazy reads
    def iter_decouple(
        self,
        task: str,
        *,
        base: Checkpoint | Mapping[str, torch.Tensor] | None = None,
        backend: str | MergeBackend = "auto",
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, λ M ⊙ u)`` per stored tensor (``base + λ M ⊙ u`` in base's dtype with ``base``),
        reading ``u`` and this task's masks one tensor at a time."""
        info = self.task_info(task)
        masks = self._files[info["masks"]]
        resc = self.rescaler_of(task)
        bck = MemoryCheckpoint(base) if isinstance(base, Mapping) else base
        for s in self.specs:
            u = self.unified_tensor(s.name).reshape(-1)
            lam = resc[s.name] if isinstance(resc, dict) else resc
            b = None
            if bck is not None:
                b = bck.get(s.name)
                if tuple(b.shape) != tuple(s.shape):
                    raise ShapeMismatchError(
                        f"{bck.path}: base tensor {s.name!r} has shape {tuple(b.shape)}, the store has {s.shape}"
                    )
                b = b.reshape(-1)
            be = resolve_backend(backend, u.device)
            yield s.name, be.decouple_flat(u, masks.get(s.name), lam, b).reshape(s.shape)

    def decouple(
        self,
        task: str,
        *,
        base: Checkpoint | Mapping[str, torch.Tensor] | None = None,
        backend: str | MergeBackend = "auto",
    ) -> dict[str, torch.Tensor]:
        """Task ``task``'s reconstructed delta (or expert with ``base``; base entries the store does
        not cover are returned unchanged), read lazily -- see :meth:`iter_decouple`."""
        out = dict(self.iter_decouple(task, base=base, backend=backend))
        if isinstance(base, Mapping):
            for k, v in base.items():
                out.setdefault(k, v)
        return out

    def to_merger(self, *, backend: str | MergeBackend = "auto") -> ContinualMerger:
        """An in-memory :class:`~condu_merge.ContinualMerger` holding this session (eager)."""
        from .merger import ContinualMerger

        if self.manifest is None:
            return ContinualMerger(self.rescaler or "tensor_mean", backend=backend)
        return ContinualMerger.from_session(
            {s.name: self.unified_tensor(s.name) for s in self.specs},
            [self.trigger(t) for t in self.task_names],
            self.manifest["rescaler"],
            backend=backend,
        )

    # ------------------------------------------------------------------ prototypes
    def load_prototypes(self, task: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved with :meth:`save_prototypes` for ``task``, or ``None``."""
        rel = self.task_info(task).get("prototypes")
        if rel is None:
            return None
        path = os.path.join(self.gen_dir, rel)
        self._check_file_hash(rel, path)  # small: always checked, whatever verify says
        with SafetensorsFile(path) as f:
            return {k: f.get(k) for k in f.keys()}

    def _check_file_hash(self, rel: str, path: str) -> None:
        if sha256_file(path) != self._require()["files"][rel]["sha256"]:
            raise FormatError(f"{path}: sha256 mismatch: the file is damaged (a byte differs from what was written)")

    def save_prototypes(self, task: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store ``tensors`` (e.g. a task's prototypes) with ``task``, replacing earlier ones, as a new
        generation (crash-safe like every write)."""
        with self._writer_lock():
            self._load(False)
            idx = self._task_index(task)
            new_gen, gen_dir = self._new_generation_dir()
            try:
                os.makedirs(gen_dir)
                _crash_point("write:start")
                m = json.loads(json.dumps(self.manifest))
                files = self._carry_files(gen_dir, skip={_proto_file(idx)})
                rel = _proto_file(idx)
                os.makedirs(os.path.join(gen_dir, "prototypes"), exist_ok=True)
                files[rel] = _write_prototype_file(os.path.join(gen_dir, rel), tensors, task)
                _crash_point("write:tensor")
                fsync_dir(os.path.join(gen_dir, "prototypes"))
                fsync_dir(gen_dir)
                _crash_point("write:data")
                m["tasks"][idx]["prototypes"] = rel
                m["files"] = files
                self._commit(m, new_gen, gen_dir)
            except BaseException:
                if _committed_generation(self.root) != new_gen:
                    remove_generation_dir(gen_dir)
                raise

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        created = not os.path.lexists(self.root)
        lock = open_writer_lock(self.root)
        try:
            yield
        finally:
            if created and not os.path.exists(self._manifest_path()):
                # a first write that failed leaves nothing behind: the lock file and the folder we made
                with contextlib.suppress(OSError):
                    os.unlink(lock.path)
                    os.rmdir(self.root)  # only if empty: never a folder with anything else in it
            lock.release()

    def _new_generation_dir(self) -> tuple[str, str]:
        """Remove leftovers of killed writers (we hold the lock), then name the next generation."""
        current = self.manifest["generation_dir"] if self.manifest else None
        numbers = [0]
        for n in os.listdir(self.root):
            p = os.path.join(self.root, n)
            if _GENERATION_RE.fullmatch(n):
                numbers.append(int(n[4:]))  # a foreign folder of this name is skipped over, never reused
                if n != current and _owned_generation(p):
                    remove_generation_dir(p)
            else:
                tmp = _MANIFEST_TMP_RE.fullmatch(n)
                if tmp and _plain_file(p) and not pid_alive(int(tmp.group(1))):
                    os.unlink(p)
        name = f"gen-{max(numbers) + 1:06d}"
        return name, os.path.join(self.root, name)

    def _carry_files(self, gen_dir: str, skip: AbstractSet[str] = frozenset()) -> dict[str, dict[str, object]]:
        if self.manifest is None:
            return {}
        files = {}
        for rel, info in self.manifest["files"].items():
            if rel in skip:
                continue
            link_or_copy(os.path.join(self.gen_dir, rel), os.path.join(gen_dir, rel))
            files[rel] = dict(info)
        for sub in ("masks", "prototypes"):
            if os.path.isdir(os.path.join(gen_dir, sub)):
                fsync_dir(os.path.join(gen_dir, sub))
        return files

    def _commit(self, manifest: dict[str, Any], gen_name: str, gen_dir: str) -> None:
        """The atomic switch: fsynced manifest replaces the old one; then old generations go."""
        manifest["generation_dir"] = gen_name
        manifest["generation"] = int(gen_name[4:])
        manifest["updated"] = utc_now()
        manifest["checksum"] = _manifest_checksum(manifest)
        mpath = self._manifest_path()
        tmp = f"{mpath}.tmp-{os.getpid()}"
        if os.path.lexists(tmp) and not _plain_file(tmp):
            raise UnsafePathError(f"{tmp}: is not a file this store wrote (a link?); refusing to write through it")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _with_path(exc, tmp) from None
        # the new generation's entry in STORE (and the temporary manifest) must be durable before
        # the manifest that names it can be
        fsync_dir(self.root)
        _crash_point("commit:tmp")
        os.replace(tmp, mpath)
        fsync_dir(self.root)
        _crash_point("commit:switched")
        old = self.manifest["generation_dir"] if self.manifest else None
        old_files = list(self.manifest["files"]) if self.manifest else []
        self.manifest = None
        self._close_files()
        if old and old != gen_name:
            # only the files the old manifest records; a symlinked generation is left alone
            remove_generation_dir(os.path.join(self.root, old), old_files, crash_step="commit:cleanup")
        self._load(False)  # what we just wrote; hashes were computed while writing

    def _base_manifest(self, rescaler: str, specs: Sequence[TensorSpec]) -> dict[str, Any]:
        return {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "created": utc_now(),
            "rescaler": rescaler,
            "tensors": [{"name": s.name, "dtype": DTYPE_TO_ST[s.dtype], "shape": list(s.shape)} for s in specs],
            "tasks": [],
            "base": None,
            "selection": None,
            "files": {},
        }

    def _stream_add(
        self,
        name: str,
        delta_of: Callable[[str], torch.Tensor],
        specs: Sequence[TensorSpec],
        *,
        rescaler: str | None,
        backend: str | MergeBackend,
        progress: bool,
        source: dict[str, Any] | None,
        base_identity: dict[str, Any] | None,
        selection: dict[str, Any] | None,
        after_read: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        """The streaming continual step (caller holds the lock and has reloaded). ``after_read``
        runs once every input was read (the base check on the read's own hash); a dict it
        returns is the base identity to record."""
        self._check_new_task(name)
        m_old = self.manifest
        t_prev = len(m_old["tasks"]) if m_old else 0
        names = self.task_names + [name]
        mode = m_old["rescaler"] if m_old else (rescaler or "tensor_mean")
        label = f"task {name!r}"
        new_gen, gen_dir = self._new_generation_dir()
        writer = GenerationWriter(gen_dir, specs, t_prev + 1)
        committed = False
        try:
            _crash_point("write:start")
            num: list[dict[str, float]] = [{} for _ in names]
            den: list[dict[str, float]] = [{} for _ in names]
            numel: dict[str, int] = {}
            old_lams = [self.rescaler_of(t) for t in self.task_names]
            from tqdm.auto import tqdm

            total = sum(math.prod(s.shape) for s in specs)
            with tqdm(
                total=total, unit="param", unit_scale=True, desc=f"add {name}", disable=not progress, leave=False
            ) as bar:
                for s in specs:
                    if t_prev == 0:
                        res = continual_step_tensor(s, delta_of(s.name), label, backend=backend)
                    else:
                        res = continual_step_tensor(
                            s,
                            delta_of(s.name),
                            label,
                            self.unified_tensor(s.name),
                            self.packed_masks(s.name),
                            old_lams,
                            backend=backend,
                        )
                    writer.write(s.name, res.u, res.masks)
                    numel[s.name] = math.prod(s.shape)
                    for i, (a, b) in enumerate(zip(res.num.tolist(), res.den.tolist())):
                        num[i][s.name] = a
                        den[i][s.name] = b
                    del res
                    _crash_point("write:tensor")
                    bar.update(numel[s.name])
            self._check_read_hashes()
            if after_read is not None:
                base_identity = after_read() or base_identity
            lams = compute_rescalers(num, den, numel, mode, names)
            m = self._finish_add(
                gen_dir,
                writer.finish(),
                name=name,
                mode=mode,
                specs=specs,
                lambdas=lams,
                mask_bits=writer.mask_bits,
                source=source,
                base_identity=base_identity,
                selection=selection,
            )
            _crash_point("write:data")
            self._commit(m, new_gen, gen_dir)
            committed = True
        finally:
            if not committed and _committed_generation(self.root) != new_gen:
                writer.abort()

    def _check_new_task(self, name: str) -> None:
        """Task names are unique within a store."""
        if name in self.task_names:
            raise DuplicateTaskError(f"{self.root}: task {name!r} is already in this store; task names are unique")

    def _finish_add(
        self,
        gen_dir: str,
        files: Mapping[str, dict[str, Any]],
        *,
        name: str,
        mode: str,
        specs: Sequence[TensorSpec],
        lambdas: Sequence[Rescaler],
        mask_bits: Sequence[int],
        source: dict[str, Any] | None,
        base_identity: dict[str, Any] | None,
        selection: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Complete a new generation holding ``u`` and every task's masks (``files``: their
        ``{"sha256", "bytes"}`` in layout order) and return its manifest, ready for :meth:`_commit`:
        earlier tasks' prototypes keep their index, so they are carried by hard link; the new
        task's entry is appended; every task gets its λ and mask bit count. Fsyncs ``gen_dir``."""
        m_old = self.manifest
        files = dict(files)
        protos = {t["prototypes"] for t in m_old["tasks"] if t.get("prototypes")} if m_old else set()
        for rel in sorted(protos):
            # not read by the merge: check before carrying, so damage is refused, not committed
            self._check_file_hash(rel, os.path.join(self.gen_dir, rel))
            link_or_copy(os.path.join(self.gen_dir, rel), os.path.join(gen_dir, rel))
            files[rel] = dict(m_old["files"][rel])  # type: ignore[index]  # protos is empty without m_old
        if protos:
            fsync_dir(os.path.join(gen_dir, "prototypes"))
        fsync_dir(gen_dir)
        m = json.loads(json.dumps(m_old)) if m_old else self._base_manifest(mode, specs)
        if base_identity is not None and m.get("base") is None:
            m["base"] = base_identity
        if selection is not None and m.get("selection") is None:
            m["selection"] = selection
        t_prev = len(m["tasks"])
        m["tasks"].append(
            {"name": name, "masks": mask_file(t_prev), "added": utc_now(), "source": source, "prototypes": None}
        )
        for i, t in enumerate(m["tasks"]):
            t["rescaler"] = lambdas[i]
            t["mask_bits"] = int(mask_bits[i])
        m["files"] = files
        return m

    def _check_read_hashes(self) -> None:
        """The old generation was read front to back while merging; check what was read against the
        manifest, so a damaged store is never merged into a fresh generation with fresh hashes."""
        for rel, f in self._files.items():
            want = self._require()["files"][rel]["sha256"]
            got = f.sequential_sha256()
            if got is None:
                got = sha256_file(f.path)
            if got != want:
                raise FormatError(
                    f"{f.path}: sha256 mismatch: the file is damaged (a byte differs from what was written)"
                )

    def add_task(
        self,
        name: str,
        delta: Mapping[str, torch.Tensor],
        *,
        rescaler: str | None = None,
        backend: str | MergeBackend = "auto",
        progress: bool = False,
        source: dict[str, Any] | None = None,
    ) -> None:
        """Fold task ``name`` with ``delta`` (a mapping; lazy mappings are read one key at a time)
        into the store, as a new generation. ``rescaler`` (default ``tensor_mean``) is fixed when
        the store is created; a later task may repeat it, and is refused if it names another."""
        check_add_args(name, rescaler)
        with self._writer_lock():
            self._load(False)
            self._check_rescaler(rescaler)
            specs = self._plan_mapping_task(delta, name)
            self._stream_add(
                name,
                lambda k: delta[k],
                specs,
                rescaler=rescaler,
                backend=backend,
                progress=progress,
                source=source,
                base_identity=None,
                selection=None,
            )

    def add_task_from_checkpoints(
        self,
        name: str,
        base: str | os.PathLike[str] | Checkpoint,
        finetuned: str | os.PathLike[str] | Checkpoint | PeftAdapter,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        rescaler: str | None = None,
        backend: str | MergeBackend = "auto",
        progress: bool = False,
        check_base: bool = True,
        source_extra: Mapping[str, object] | None = None,
    ) -> None:
        """Fold a fine-tuned checkpoint (or PEFT adapter) into the store, streaming.

        The delta ``finetuned − base`` of each tensor is computed when that tensor is merged.
        On creation the tensors taking part are the ``include``/``exclude`` selection (fnmatch
        globs) of the default set (every floating-point tensor, or the adapter's); later tasks
        use the store's set, and their deltas are cast to the store's dtype per tensor. With
        ``check_base``, a base that differs from the store's (sha256) is refused. Options the
        store records (``rescaler``, ``dtype``, ``include``, ``exclude``) may be repeated on a
        later task; a different value is refused (:class:`OptionMismatchError`, naming both).
        ``source_extra`` is recorded in the task's ``source`` entry (e.g. a recipe's source hash).
        """
        check_add_args(name, rescaler)
        td = open_task_delta(base, finetuned)
        try:
            with self._writer_lock():
                self._load(False)
                creating = self.manifest is None
                self._check_rescaler(rescaler)
                specs, ident, selection, source = self._plan_checkpoint_task(
                    td, include, exclude, dtype, check_base, hash_base=False
                )
                source = {**source, **(source_extra or {})}
                store_dtype = {s.name: s.dtype for s in specs}
                self._stream_add(
                    name,
                    lambda k: td.delta(k, store_dtype[k]),
                    specs,
                    rescaler=rescaler,
                    backend=backend,
                    progress=progress,
                    source=source,
                    base_identity=ident,
                    selection=selection,
                    # a base we opened was read by this merge alone: its running hash is this read's
                    after_read=(
                        lambda: self._base_after_read(td.base, creating, read_hash=isinstance(base, (str, os.PathLike)))
                    )
                    if check_base
                    else None,
                )
        finally:
            td.close()

    # ------------------------------------------------------------------ planning a task (caller holds the lock)
    # Shared with :mod:`condu_merge.distributed`, whose rank 0 plans the same way.
    def _plan_mapping_task(self, delta: Mapping[str, torch.Tensor], name: str) -> list[TensorSpec]:
        """The tensors of task ``name`` given as a mapping: on creation, every key of ``delta``
        (floating point, in its order, dtype and shape); later, exactly the store's keys."""
        if self.manifest is None:
            keys = list(delta.keys())
            if not keys:
                raise MergeInputError(f"task {name!r} has no tensors")
            specs = []
            for k in keys:
                t = delta[k]
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    raise DtypeMismatchError(f"task {name!r}: tensor {k!r} is not a floating-point tensor")
                specs.append(TensorSpec(k, t.dtype, tuple(t.shape)))
            return specs
        specs = self.specs
        have, want = set(delta.keys()), {s.name for s in specs}
        if have != want:
            raise KeyMismatchError(
                f"task {name!r} does not match the store's tensors: missing {sorted(want - have)[:8]}, extra {sorted(have - want)[:8]}"
            )
        return specs

    def _plan_checkpoint_task(
        self,
        td: TaskDelta,
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
        dtype: torch.dtype | None,
        check_base: bool,
        *,
        hash_base: bool = True,
    ) -> tuple[list[TensorSpec], dict[str, Any] | None, dict[str, Any], dict[str, Any]]:
        """The tensors of a checkpoint task -- see :meth:`add_task_from_checkpoints` -- checked
        against ``td``: ``(specs, base identity to record or None, selection, source)``.
        ``hash_base=False``: the base's sha256 is left to :meth:`_base_after_read` (only its size
        is checked here), so the merge's own read of the base is the only one."""
        bck, fck = td.base, td.finetuned
        ident = None
        if self.manifest is None:
            if include:
                keys = select_keys(td.candidate_keys(), include, exclude)
            else:
                keys = select_keys(td.default_keys(), None, exclude)
            if not keys:
                raise KeyMismatchError(
                    f"{fck.path}: no tensor is selected (include={list(include or [])}, exclude={list(exclude or [])})"
                )
            specs = []
            for k in keys:
                if not td.is_adapter and k in fck.keys():  # type: ignore[union-attr]  # not an adapter: a Checkpoint
                    dt = dtype or fck.spec(k).dtype  # type: ignore[union-attr]
                else:
                    dt = dtype or bck.spec(k).dtype
                specs.append(TensorSpec(k, dt, tuple(bck.spec(k).shape)))
            if check_base and bck.files() and hash_base:
                ident = checkpoint_identity(bck)
        else:
            self._check_recorded_options(include=include, exclude=exclude, dtype=dtype)
            specs = self.specs
            if check_base:
                self._check_base(bck, size_only=not hash_base)
        if td.is_adapter:
            sel = {s.name for s in specs}
            outside = [k for k in fck.delta_keys() if k not in sel]  # type: ignore[union-attr]  # an adapter
            if outside:
                raise KeyMismatchError(
                    f"{fck.path}: the adapter changes tensors the store does not hold: {outside[:5]} "
                    "(create the store with --include patterns that cover them)"
                )
        for s in specs:
            td.check(s.name, s.shape)
        source = {"path": os.path.abspath(fck.path), "kind": "peft-lora" if td.is_adapter else "checkpoint"}
        selection = {"include": list(include or []), "exclude": list(exclude or [])}
        return specs, ident, selection, source

    def _check_rescaler(self, rescaler: str | None) -> None:
        """A later task may repeat the store's rescaler mode, not name another."""
        if self.manifest is not None and rescaler is not None and rescaler != self.manifest["rescaler"]:
            raise OptionMismatchError(
                f"{self.root}: --rescaler {rescaler} differs from the store's {self.manifest['rescaler']} (fixed when the store "
                "was created); drop the option, or start a new store"
            )

    def _check_recorded_options(
        self, *, include: Sequence[str] | None, exclude: Sequence[str] | None, dtype: torch.dtype | None
    ) -> None:
        """Options given again on a later task must equal what the manifest records."""
        m = self._require()
        if dtype is not None:
            have = sorted({str(ST_TO_DTYPE[t["dtype"]]).replace("torch.", "") for t in m["tensors"]})
            want = str(dtype).replace("torch.", "")
            if have != [want]:
                raise OptionMismatchError(
                    f"{self.root}: --dtype {want} differs from the store's {', '.join(have)} (fixed when the store was created); "
                    "drop the option, or start a new store"
                )
        sel = m.get("selection")
        if sel is None:
            return
        for opt, given in (("include", include), ("exclude", exclude)):
            if given is not None and list(given) != list(sel.get(opt, [])):
                raise OptionMismatchError(
                    f"{self.root}: --{opt} {list(given)} differs from the store's {list(sel.get(opt, []))} (fixed when the store "
                    "was created); drop the option, or start a new store"
                )

    def _base_after_read(self, bck: Checkpoint, creating: bool, *, read_hash: bool) -> dict[str, Any] | None:
        """After the merge read the base: on creation, its identity to record; later, the check
        against the recorded one. The sha256 is the one hashed while the merge read the file
        (:meth:`SafetensorsFile.sequential_sha256`), a separate pass only where there is none."""
        sha = bck.sequential_sha256() if read_hash and isinstance(bck, SafetensorsFile) else None
        if not creating:
            self._check_base(bck, sha)
            return None
        if not bck.files():
            return None
        if sha is None:
            return checkpoint_identity(bck)
        return {"path": os.path.abspath(bck.path), "sha256": sha, "bytes": os.path.getsize(bck.path)}

    def _check_base(self, bck: Checkpoint, sha256: str | None = None, *, size_only: bool = False) -> None:
        rec = self._require().get("base")
        if not rec or rec.get("sha256") is None or not bck.files():
            return
        files = bck.files()
        same_file = len(files) == 1 and os.path.abspath(files[0]) == rec["path"]
        size = sum(os.path.getsize(f) for f in files)
        if size != rec["bytes"] or (not size_only and (sha256 or checkpoint_identity(bck)["sha256"]) != rec["sha256"]):
            where = "was modified since" if same_file else "differs from the one"
            raise MergeInputError(
                f"{bck.path}: this base checkpoint {where} the store was created with ({rec['path']}, sha256 {rec['sha256'][:12]}…); "
                "deltas against another base cannot be merged"
            )

    def write_session(
        self, unified: Mapping[str, torch.Tensor], triggers: Sequence[TaskTrigger], rescaler: str
    ) -> None:
        """Replace the store's content with an in-memory session (``ContinualMerger.save``).
        Prototypes of tasks that keep their name and position are carried over."""
        names = [t.task for t in triggers]
        if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"a stored session needs unique task names; got {names}")
        with self._writer_lock():
            self._load(False)
            specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in unified.items()]
            new_gen, gen_dir = self._new_generation_dir()
            writer = GenerationWriter(gen_dir, specs, len(triggers))
            committed = False
            try:
                _crash_point("write:start")
                for s in specs:
                    rows = [tr.packed[s.name].reshape(-1) for tr in triggers]
                    masks = (
                        torch.stack(rows)
                        if rows
                        else torch.empty((0, packed_nbytes(math.prod(s.shape))), dtype=torch.uint8)
                    )
                    writer.write(s.name, unified[s.name].detach(), masks)
                    _crash_point("write:tensor")
                files = writer.finish()
                m = self._base_manifest(rescaler, specs)
                if self.manifest is not None:
                    m["created"] = self.manifest.get("created", m["created"])
                    m["base"] = self.manifest.get("base")
                old_tasks = self.manifest["tasks"] if self.manifest else []
                for i, tr in enumerate(triggers):
                    r = tr.rescaler
                    entry = {
                        "name": tr.task,
                        "masks": mask_file(i),
                        "added": utc_now(),
                        "source": None,
                        "prototypes": None,
                        "rescaler": dict(r) if isinstance(r, dict) else float(r),
                        "mask_bits": writer.mask_bits[i],
                    }
                    if i < len(old_tasks) and old_tasks[i]["name"] == tr.task:
                        entry["added"] = old_tasks[i].get("added", entry["added"])
                        entry["source"] = old_tasks[i].get("source")
                        rel = old_tasks[i].get("prototypes")
                        if rel:
                            self._check_file_hash(rel, os.path.join(self.gen_dir, rel))
                            link_or_copy(os.path.join(self.gen_dir, rel), os.path.join(gen_dir, rel))
                            files[rel] = dict(self._require()["files"][rel])
                            entry["prototypes"] = rel
                    m["tasks"].append(entry)
                if os.path.isdir(os.path.join(gen_dir, "prototypes")):
                    fsync_dir(os.path.join(gen_dir, "prototypes"))
                fsync_dir(gen_dir)
                _crash_point("write:data")
                m["files"] = files
                self._commit(m, new_gen, gen_dir)
                committed = True
            finally:
                if not committed and _committed_generation(self.root) != new_gen:
                    writer.abort()

    # ------------------------------------------------------------------ reporting
    def storage(self) -> dict[str, object]:
        """Bytes on disk against storing every fine-tuned model (the paper's Appendix H comparison)."""
        m = self._require()
        params = sum(math.prod(s.shape) for s in self.specs)
        u_bytes = int(m["files"][UNIFIED]["bytes"])
        u_data = sum(math.prod(s.shape) * dtype_itemsize(s.dtype) for s in self.specs)
        mask_bytes = [int(m["files"][t["masks"]]["bytes"]) for t in m["tasks"]]
        mask_data = sum(packed_nbytes(math.prod(s.shape)) for s in self.specs)
        proto_bytes = sum(int(m["files"][t["prototypes"]]["bytes"]) for t in m["tasks"] if t.get("prototypes"))
        manifest_bytes = os.path.getsize(self._manifest_path())
        base_bytes = int(m["base"]["bytes"]) if m.get("base") else None
        model_bytes = base_bytes if base_bytes is not None else u_data
        n = len(m["tasks"])
        store_bytes = u_bytes + sum(mask_bytes) + proto_bytes + manifest_bytes
        return {
            "params": params,
            "tasks": n,
            "unified_bytes": u_bytes,
            "mask_bytes_per_task": mask_bytes,
            "mask_bits_per_param": (mask_data * 8 / params) if params else 0.0,
            "prototype_bytes": proto_bytes,
            "manifest_bytes": manifest_bytes,
            "store_bytes": store_bytes,
            "base_bytes": base_bytes,
            "condu_total_bytes": store_bytes + (base_bytes or 0),
            "individual_bytes": n * model_bytes,
        }

    def mask_stats(self, *, progress: bool = False) -> dict[str, object]:
        """Per-task mask density and pairwise overlaps ``|M_i ∧ M_j|`` (bitarray popcounts), streamed per tensor."""
        from bitarray import bitarray
        from bitarray.util import count_and, count_or

        m = self._require()
        names = self.task_names
        n = len(names)
        inter = [[0] * n for _ in range(n)]
        union = [[0] * n for _ in range(n)]
        from tqdm.auto import tqdm

        for s in tqdm(self.specs, desc="masks", disable=not progress, leave=False):
            bas = []
            for t in m["tasks"]:
                arr = self._files[t["masks"]].get(s.name).numpy()
                bas.append(bitarray(buffer=arr.data, endian="little") if arr.size else bitarray())
            for i in range(n):
                for j in range(i, n):
                    inter[i][j] += count_and(bas[i], bas[j]) if j != i else bas[i].count(1)
                    union[i][j] += count_or(bas[i], bas[j]) if j != i else bas[i].count(1)
        params = sum(math.prod(s.shape) for s in self.specs)
        for i in range(n):
            for j in range(i):
                inter[i][j], union[i][j] = inter[j][i], union[j][i]
        return {
            "density": {names[i]: (inter[i][i] / params if params else 0.0) for i in range(n)},
            "overlap_bits": inter,
            "jaccard": [[(inter[i][j] / union[i][j] if union[i][j] else 0.0) for j in range(n)] for i in range(n)],
        }


def check_task_name(name: object) -> None:
    """A task name is a non-empty string."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a task name must be a non-empty string")


def check_add_args(name: object, rescaler: str | None) -> None:
    """The argument checks every add-task entry point (here and distributed) makes before any I/O
    (``rescaler=None``: the store's mode, ``tensor_mean`` for a new store)."""
    check_task_name(name)
    if rescaler is not None and rescaler not in RESCALER_MODES:
        raise ValueError(f"unknown rescaler {rescaler!r}; choose one of {RESCALER_MODES}")


def open_task_delta(
    base: str | os.PathLike[str] | Checkpoint, finetuned: str | os.PathLike[str] | Checkpoint | PeftAdapter
) -> TaskDelta:
    """``finetuned − base`` per tensor; paths are opened, and closed again if this fails."""
    bck = open_checkpoint(base) if isinstance(base, (str, os.PathLike)) else base
    try:
        fck = open_checkpoint(finetuned) if isinstance(finetuned, (str, os.PathLike)) else finetuned
    except BaseException:
        bck.close()
        raise
    if isinstance(fck, SafetensorsFile):
        fck.no_read_hash()  # nothing asks for the fine-tuned file's sha256: do not compute it
    if isinstance(bck, PeftAdapter):
        bck.close()
        fck.close()
        raise MergeInputError(f"{bck.path}: the base must be a full checkpoint, not an adapter")
    return TaskDelta(bck, fck)
