"""The one write pipeline every store uses: **plan → fold each tensor → commit**.

A write to a store directory (a ConDU :class:`~condu_merge.store.Store`, a
:class:`~condu_merge.strategy_store.StrategyStore` of any other strategy, or a distributed
merge's ranks writing one generation together) goes through the same steps, all here:

1. **plan** (:func:`plan_mapping_task`, :func:`plan_checkpoint_task`): under the writer lock
   (:func:`open_writer_lock`), the tensors of the task (names, dtypes, shapes), checked against
   the manifest (same keys, same recorded options, same base checkpoint);
2. **fold each tensor**: the caller reads one tensor of the task and the current generation's
   state of that tensor, computes the new state and appends it to the new generation with a
   :class:`GenerationWriter` (one safetensors file per slot, every file hashed while written);
3. **commit** (:func:`commit_manifest`): the new generation's files and folder are fsynced, the
   new ``manifest.json`` is written beside the old one, fsynced, and ``os.replace``\\ d over it;
   only then are older generations deleted (:func:`remove_generation_dir`, which deletes only
   files of a store's own names and never follows a symlink).

A process killed at any moment leaves ``manifest.json`` naming either the old or the new
generation, both complete; leftovers of a killed writer are removed by the next writer
(:func:`new_generation_dir`). :data:`CRASH_ENV` makes a test process SIGKILL itself at a named
step, so the tests kill a writer at each of them.

File names inside a generation (:data:`DATA_FILE_RE`): a slot shared by every task is
``<kind>.safetensors`` (ConDU's ``unified.safetensors``), a per-task slot is
``<kind>/<task index:04d>.safetensors`` (ConDU's ``masks/0000.safetensors``). The manifest's
``files`` lists each with its size and digest, ``{"blake3" | "sha256": hex, "bytes": n}``: new
files get :func:`~condu_merge.digests.default_algorithm`'s (BLAKE3 where the ``blake3`` package
is installed, else sha256; ``$CONDU_MERGE_DIGEST`` chooses), and every check uses the algorithm
its record names, so generations of either kind, and stores mixing them, stay readable. A
manifest holding a BLAKE3 record is written with the next format version (:data:`STORE_VERSIONS`),
one with sha256 records only keeps the old number, which older readers read.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

from .checkpoints import (
    Checkpoint,
    PeftAdapter,
    SafetensorsFile,
    ShardedCheckpoint,
    TaskDelta,
    checkpoint_identity,
    open_checkpoint,
    select_keys,
)
from .digests import (
    check_record,
    default_algorithm,
    make_record,
    manifest_algorithms,
    record_algorithm,
    require_algorithms,
)
from .errors import (
    ConduError,
    DtypeMismatchError,
    FormatError,
    KeyMismatchError,
    MergeInputError,
    NonFiniteError,
    OptionMismatchError,
    UnsafePathError,
)
from .manifest_check import GENERATION_RE, RESCALER_MODES
from .safetensors_writer import (
    ST_TORCH_NAMES,
    StreamingSafetensorsWriter,
    TensorSpec,
    build_header,
    numel_of,
    same_dtype,
    tensor_bytes,
)

BACKGROUND_BYTES = int(os.environ.get("CONDU_MERGE_BACKGROUND_BYTES", 1 << 26))
"""How many bytes of finished tensors may wait for the background writer and hasher of a new
generation (default 64 MiB; ``0`` or ``$CONDU_MERGE_BACKGROUND_BYTES=0``: write in the folding
thread). Bounds the memory the overlap costs."""

DATA_FILE_RE = re.compile(r"[a-z][a-z_]*(/\d{4,})?\.safetensors")
"""Data files a store writes in a generation: ``<slot>.safetensors`` or ``<slot>/NNNN.safetensors``."""
SLOT_DIR_RE = re.compile(r"[a-z][a-z_]*")

STORE_FORMAT = "condu-merge/store"
STORE_VERSION_SHA256 = 1
"""Manifest version of a ConDU store whose records are all sha256 (every store before BLAKE3)."""
STORE_VERSION = 2
"""Manifest version of a ConDU store that records a BLAKE3 digest (a reader of version 1 cannot
check it, so it must not try); written only then."""
STORE_VERSIONS = (STORE_VERSION_SHA256, STORE_VERSION)
"""The ConDU manifest versions this condu-merge reads."""
STRATEGY_STORE_VERSION_SHA256 = 2
"""Manifest version of a store of a method other than ConDU, sha256 records only."""
STRATEGY_STORE_VERSION = 3
"""Manifest version of a store of another method that records a BLAKE3 digest."""
STRATEGY_STORE_VERSIONS = (STRATEGY_STORE_VERSION_SHA256, STRATEGY_STORE_VERSION)
DATA_FILE_VERSION = "1"
"""``version`` in a data file's safetensors metadata: the data files' layout did not change with
the manifest's digest, so a file's bytes do not depend on which digest records it."""
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


def crash_point(step: str) -> None:
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


def committed_generation(root: str) -> str | None:
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


def plain_file(path: str) -> bool:
    """A regular file, not a symlink (``lstat``)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def plain_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def owned_generation(path: str) -> bool:
    """Whether ``path`` is a generation folder exactly as a writer of a store leaves it: a real
    folder (not a symlink) holding only data files named as :data:`DATA_FILE_RE` allows
    (``unified.safetensors``, ``masks/0000.safetensors``, a strategy's ``sum.safetensors`` or
    ``tau/0003.safetensors``; regular files) and the folders of the per-task ones. A folder that
    holds anything else is not ours to delete, whatever its name."""
    if not plain_dir(path):
        return False
    for n in os.listdir(path):
        p = os.path.join(path, n)
        if SLOT_DIR_RE.fullmatch(n) and plain_dir(p):
            for m in os.listdir(p):
                if not DATA_FILE_RE.fullmatch(f"{n}/{m}") or not plain_file(os.path.join(p, m)):
                    return False
        elif not DATA_FILE_RE.fullmatch(n) or not plain_file(p):
            return False
    return True


def remove_generation_dir(path: str, files: Sequence[str] | None = None, *, crash_step: str | None = None) -> None:
    """Delete a generation a store wrote: its data files (``files``, relative; default every
    file of the store's name patterns in it), then the folders if that left them empty. Never
    follows a symlink and never deletes a file of another name: a foreign file keeps its folder."""
    if not plain_dir(path):
        return
    subs = sorted(n for n in os.listdir(path) if SLOT_DIR_RE.fullmatch(n) and plain_dir(os.path.join(path, n)))
    if files is None:
        files = [n for n in sorted(os.listdir(path)) if DATA_FILE_RE.fullmatch(n)]
        files += [f"{sub}/{n}" for sub in subs for n in sorted(os.listdir(os.path.join(path, sub)))]
    first = True
    for rel in files:
        p = os.path.join(path, rel)
        if DATA_FILE_RE.fullmatch(rel) and plain_file(p) and plain_dir(os.path.dirname(p)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            if first and crash_step:
                crash_point(crash_step)
            first = False
    for sub in [*subs, *{os.path.dirname(r) for r in files if "/" in r}, ""]:
        with contextlib.suppress(OSError):  # not empty (a foreign file), or already gone
            os.rmdir(os.path.join(path, sub) if sub else path)


_MANIFEST_TMP_RE = re.compile(re.escape(MANIFEST) + r"\.tmp-(\d+)")


def foreign_entries(root: str) -> list[str]:
    """Names in ``root`` that a store does not create (anything but ``manifest.json``, ``.lock``,
    ``manifest.json.tmp-PID`` files and generation folders as :func:`owned_generation` knows them)."""
    out = []
    for n in sorted(os.listdir(root)):
        p = os.path.join(root, n)
        if n in (MANIFEST, LOCK):
            continue
        if GENERATION_RE.fullmatch(n) and owned_generation(p):
            continue
        if _MANIFEST_TMP_RE.fullmatch(n) and plain_file(p):
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


def with_path(exc: OSError, path: str) -> OSError:
    """``exc`` naming ``path`` (a failed ``write``, e.g. ENOSPC, names no file by itself)."""
    if exc.filename is None:
        new = type(exc)(exc.errno, exc.strerror or str(exc), path)
        new.__cause__ = exc
        return new
    return exc


def manifest_checksum(manifest: Mapping[str, object]) -> str:
    """sha256 of the manifest's canonical JSON (without ``checksum``): an identity of the manifest
    that ranks and older readers compare, so it stays sha256 whatever the files' digest."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_version(manifest: Mapping[str, Any]) -> int:
    """The format version a manifest is written with: the next one (:data:`STORE_VERSION`, or
    :data:`STRATEGY_STORE_VERSION` for another method) only when one of its records is BLAKE3, so
    a store of sha256 records stays readable by the condu-merge versions before BLAKE3."""
    blake3 = "blake3" in manifest_algorithms(manifest)
    if manifest.get("method", "condu") == "condu":
        return STORE_VERSION if blake3 else STORE_VERSION_SHA256
    return STRATEGY_STORE_VERSION if blake3 else STRATEGY_STORE_VERSION_SHA256


def popcount_bytes(packed: torch.Tensor | np.ndarray) -> int:
    """Set bits of a packed mask (a uint8 tensor or array), counted by bitarray (no unpacking)."""
    from bitarray import bitarray

    arr = np.ascontiguousarray(packed) if isinstance(packed, np.ndarray) else packed.contiguous().numpy()
    if arr.size == 0:
        return 0
    return bitarray(buffer=arr.data, endian="little").count(1)


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
            raise with_path(exc, self.path) from None
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


class ReopeningWriter:
    """:class:`StreamingSafetensorsWriter`'s interface (header first, tensors in order, the
    ``hash_algo`` digest computed while writing) for a generation of more than
    :data:`KEEP_OPEN_FILES` files: the file is opened for each tensor's append and closed again,
    so no descriptor is held between passes."""

    def __init__(
        self, path: str, specs: Sequence[TensorSpec], metadata: Mapping[str, str], *, hash_algo: str = "sha256"
    ):
        from .digests import new_hasher

        self.path = path
        self.specs = list(specs)
        self.hash_algo = hash_algo
        self._next = 0
        self._filled = 0  # bytes of specs[_next] written so far (write_part)
        self._hash = new_hasher(hash_algo)
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
        if (
            spec is None
            or name != spec.name
            or not same_dtype(spec, tensor)
            or numel_of(tensor) != math.prod(spec.shape)
        ):
            raise ValueError(f"{self.path}: tensor {name!r} is not the next declared one ({spec})")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        try:
            self._append(fd, tensor_bytes(tensor))
        finally:
            os.close(fd)
        self._next += 1

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """The next consecutive elements of tensor ``name`` (as
        :meth:`StreamingSafetensorsWriter.write_part`): the same bytes as one :meth:`write`."""
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        data = tensor_bytes(part)
        want = spec.nbytes if spec is not None else 0
        if spec is None or name != spec.name or not same_dtype(spec, part) or self._filled + data.nbytes > want:
            raise ValueError(f"{self.path}: part of {name!r} does not continue the next declared tensor ({spec})")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        try:
            self._append(fd, data)
        finally:
            os.close(fd)
        self._filled += data.nbytes
        if self._filled == want:
            self._next, self._filled = self._next + 1, 0

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


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link an immutable data file into a new generation (copy where links are impossible)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())


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
    if isinstance(fck, (SafetensorsFile, ShardedCheckpoint)):
        fck.no_read_hash()  # nothing asks for the fine-tuned file's digest: do not compute it
    if isinstance(bck, PeftAdapter):
        bck.close()
        fck.close()
        raise MergeInputError(f"{bck.path}: the base must be a full checkpoint, not an adapter")
    return TaskDelta(bck, fck)


# ---------------------------------------------------------------------------- generations


def new_generation_dir(root: str, current: str | None) -> tuple[str, str]:
    """Remove leftovers of killed writers (the caller holds the lock): generation folders other
    than ``current`` that a store wrote, and temporary manifests of dead processes; then name the
    next generation ``(name, path)``. A foreign folder of a generation's name is skipped over,
    never reused or deleted."""
    numbers = [0]
    for n in os.listdir(root):
        p = os.path.join(root, n)
        if GENERATION_RE.fullmatch(n):
            numbers.append(int(n[4:]))
            if n != current and owned_generation(p):
                remove_generation_dir(p)
        else:
            tmp = _MANIFEST_TMP_RE.fullmatch(n)
            if tmp and plain_file(p) and not pid_alive(int(tmp.group(1))):
                os.unlink(p)
    name = f"gen-{max(numbers) + 1:06d}"
    return name, os.path.join(root, name)


def commit_manifest(root: str, manifest: dict[str, Any], gen_name: str, old: Mapping[str, Any] | None) -> None:
    """The atomic switch to generation ``gen_name`` (its files complete and fsynced): the
    manifest gets its generation, time and checksum, is written to a temporary file beside
    ``manifest.json``, fsynced, and replaces it; then the old generation's recorded files
    (``old``: the manifest being replaced) are deleted."""
    manifest["generation_dir"] = gen_name
    manifest["generation"] = int(gen_name[4:])
    manifest["updated"] = utc_now()
    manifest["version"] = manifest_version(manifest)
    manifest["checksum"] = manifest_checksum(manifest)
    mpath = os.path.join(root, MANIFEST)
    tmp = f"{mpath}.tmp-{os.getpid()}"
    if os.path.lexists(tmp) and not plain_file(tmp):
        raise UnsafePathError(f"{tmp}: is not a file this store wrote (a link?); refusing to write through it")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise with_path(exc, tmp) from None
    # the new generation's entry in STORE (and the temporary manifest) must be durable before
    # the manifest that names it can be
    fsync_dir(root)
    crash_point("commit:tmp")
    os.replace(tmp, mpath)
    fsync_dir(root)
    crash_point("commit:switched")
    old_gen = old["generation_dir"] if old else None
    if old_gen and old_gen != gen_name:
        # only the files the old manifest records; a symlinked generation is left alone
        remove_generation_dir(os.path.join(root, old_gen), list(old["files"]), crash_step="commit:cleanup")  # type: ignore[index]


class GenerationWriter:
    """Writes the data files of one new generation, one tensor at a time.

    ``layout``: ``{relative path: (tensor specs in file order, safetensors metadata)}``; every
    file gets its header first, then :meth:`write` appends tensors in the declared order
    (hashing them while writing, in ``hash_algo``: default :func:`default_algorithm`), and
    :meth:`finish` fsyncs every file and folder and returns ``{relative path: {hash_algo, "bytes"}}``
    for the manifest. With more files than
    :data:`KEEP_OPEN_FILES`, each is reopened per append so no descriptor is held between
    tensors. ``carried``: relative paths the caller hard-links in from the old generation
    (:func:`link_or_copy`) instead of writing; their folders are fsynced with the rest.
    """

    def __init__(
        self,
        gen_dir: str,
        layout: Mapping[str, tuple[Sequence[TensorSpec], Mapping[str, str]]],
        *,
        hash_algo: str | None = None,
    ):
        self.dir = gen_dir
        # chosen before any file exists: a bad $CONDU_MERGE_DIGEST writes nothing
        self.hash_algo = hash_algo or default_algorithm()
        os.makedirs(gen_dir, exist_ok=False)
        self._writers: dict[str, StreamingSafetensorsWriter | ReopeningWriter] = {}
        self._dirs = {os.path.dirname(rel) for rel in layout if "/" in rel}
        few = len(layout) <= KEEP_OPEN_FILES
        # one background thread writes and hashes the files (in order) while the caller folds
        # the next tensor: hashlib and os.write release the GIL; what is handed over is never
        # changed again (fresh kernel outputs and reads), and finish/abort wait for it
        from .digests import OrderedWorker

        self._worker: OrderedWorker | None = OrderedWorker(BACKGROUND_BYTES) if BACKGROUND_BYTES > 0 else None
        try:
            for sub in sorted(self._dirs):
                os.makedirs(os.path.join(gen_dir, sub), exist_ok=True)
            for i, (rel, (specs, meta)) in enumerate(layout.items()):
                path = os.path.join(gen_dir, rel)
                try:
                    if few or i == 0:
                        self._writers[rel] = StreamingSafetensorsWriter(
                            path, list(specs), dict(meta), hash_algo=self.hash_algo, worker=self._worker
                        )
                    else:
                        self._writers[rel] = ReopeningWriter(path, list(specs), dict(meta), hash_algo=self.hash_algo)
                except OSError as exc:
                    raise with_path(exc, path) from None
        except BaseException:
            self.abort()
            raise

    def write(self, rel: str, key: str, tensor: torch.Tensor) -> None:
        """Append tensor ``key`` (contiguous bytes of the declared dtype and size) to file ``rel``."""
        w = self._writers[rel]
        try:
            w.write(key, tensor.reshape(-1))
        except OSError as exc:  # ENOSPC, EIO, EDQUOT: say which file
            raise with_path(exc, w.path) from None

    def write_part(self, rel: str, key: str, part: torch.Tensor) -> None:
        """Append the next consecutive elements of tensor ``key`` to file ``rel`` (a large tensor
        merged in pieces; the bytes are those of one :meth:`write`)."""
        w = self._writers[rel]
        try:
            w.write_part(key, part.reshape(-1))
        except OSError as exc:
            raise with_path(exc, w.path) from None

    def carry(self, src_gen: str, rel: str) -> None:
        """Hard-link ``rel`` (an immutable file of the old generation ``src_gen``) in."""
        link_or_copy(os.path.join(src_gen, rel), os.path.join(self.dir, rel))
        if "/" in rel:
            self._dirs.add(os.path.dirname(rel))

    def finish(self) -> dict[str, dict[str, object]]:
        files: dict[str, dict[str, object]] = {}
        for rel, w in self._writers.items():
            try:
                digest, size = w.close()
            except OSError as exc:
                raise with_path(exc, w.path) from None
            files[rel] = make_record(digest, size, self.hash_algo)
        self._stop_worker()
        for sub in sorted(self._dirs):
            if os.path.isdir(os.path.join(self.dir, sub)):
                fsync_dir(os.path.join(self.dir, sub))
        fsync_dir(self.dir)
        return files

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def abort(self) -> None:
        for w in self._writers.values():
            with contextlib.suppress(Exception):
                w.abort()
        self._stop_worker()
        remove_generation_dir(self.dir)


class NewGeneration:
    """One write's new generation, as a context: named (leftovers of killed writers removed),
    its files written through :attr:`writer`, then :meth:`commit`. Leaving the block without
    committing removes it, unless the manifest on disk already names it (an error or Ctrl-C
    after the switch must not delete the committed state)."""

    def __init__(
        self, root: str, current: str | None, layout: Mapping[str, tuple[Sequence[TensorSpec], Mapping[str, str]]]
    ):
        self.root = root
        self.name, self.dir = new_generation_dir(root, current)
        self.writer = GenerationWriter(self.dir, layout)
        self.committed = False

    def commit(self, manifest: dict[str, Any], old: Mapping[str, Any] | None) -> None:
        """Every data file is complete: fsync them, then the atomic switch (:func:`commit_manifest`)."""
        crash_point("write:data")
        commit_manifest(self.root, manifest, self.name, old)
        self.committed = True

    def __enter__(self) -> NewGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed and committed_generation(self.root) != self.name:
            self.writer.abort()


def fold_tensors(
    rule: Any,
    specs: Sequence[TensorSpec],
    delta_of: Any,
    old: Any,
    task: Any,
    write: Any,
    *,
    label: str,
    progress: bool = False,
    crash: Any = None,
    chunk: int | None = None,
    delta_range_of: Any = None,
    write_part: Any = None,
) -> None:
    """**Fold each tensor**: for every tensor of ``specs`` (in order), read the task's delta
    (``delta_of(key)``), check its shape, dtype and (unless the rule does) finiteness, compute
    the tensor's new slots with ``rule.fold`` (a :class:`~condu_merge.strategies.rule.TensorRule`)
    from the old generation's (``old``, a :class:`~condu_merge.strategies.rule.SlotReader`, or
    ``None`` for the first task) and hand each to ``write(relative path, key, tensor)``; then the
    ``write:tensor`` crash point (``crash``: a rank-aware one for distributed writers). Only one
    tensor's work is in memory at a time; with ``chunk`` (elements), a rule that works element
    by element (``rule.elementwise``) folds a larger tensor in pieces of at most ``chunk``
    elements (multiples of 8, so packed masks split on bytes): ``delta_range_of(key, start,
    stop)`` reads a piece of the delta, ``old.window(start, stop)`` the old slots and
    ``write_part(rel, key, piece)`` appends the result, so one piece is in memory whatever the
    tensor's size. The bytes written are those of the whole-tensor fold."""
    from .errors import ShapeMismatchError

    crash = crash or crash_point
    slots = rule.slots()
    t = task.index
    from tqdm.auto import tqdm

    from .checkpoints import element_ranges

    for s in tqdm(specs, desc=f"add {task.name}", disable=not progress, leave=False):
        n = math.prod(s.shape)
        if chunk is not None and getattr(rule, "elementwise", False) and n > chunk and delta_range_of is not None:
            for a0, a1 in element_ranges(n, chunk):
                part = TensorSpec(s.name, s.dtype, (a1 - a0,))
                d = delta_range_of(s.name, a0, a1)
                if d.dtype != s.dtype:
                    raise DtypeMismatchError(f"{label}: tensor {s.name!r} is {d.dtype}, the store keeps {s.dtype}")
                _check_finite_delta(rule, d, s.name, label, a0)
                try:
                    out = rule.fold(s.name, d, old.window(a0, a1) if old is not None else None, task, (a1 - a0,))
                except NonFiniteError:
                    # a rule that checks itself names the index in the piece: name it in the tensor
                    _check_finite_delta(None, d, s.name, label, a0)
                    raise
                del d
                _write_slots(rule, slots, part, out, t, write_part)
                del out
            crash("write:tensor")
            continue
        d = delta_of(s.name)
        if tuple(d.shape) != tuple(s.shape):
            raise ShapeMismatchError(f"{label}: tensor {s.name!r} has shape {tuple(d.shape)}, the store has {s.shape}")
        if d.dtype != s.dtype:
            raise DtypeMismatchError(f"{label}: tensor {s.name!r} is {d.dtype}, the store keeps {s.dtype}")
        _check_finite_delta(rule, d, s.name, label, 0)
        out = rule.fold(s.name, d, old, task, tuple(s.shape))
        del d
        _write_slots(rule, slots, s, out, t, write)
        del out
        crash("write:tensor")


def _check_finite_delta(rule: Any, d: torch.Tensor, key: str, label: str, offset: int) -> None:
    """Refuse a delta with NaN or Inf, naming its first flat index (``offset`` + its index in
    ``d``, a piece); skipped for a ``rule`` that checks itself (``rule=None``: always checked)."""
    if rule is None or not rule.checks_finite:
        bad = ~torch.isfinite(d)
        if bool(bad.any()):
            idx = offset + int(bad.reshape(-1).nonzero()[0, 0])
            raise NonFiniteError.at(label, key, idx)


def _write_slots(rule: Any, slots: Any, spec: TensorSpec, out: Any, t: int, write: Any) -> None:
    """Hand every slot of one fold's result (``out``) to ``write(rel, key, tensor)``."""
    for slot in slots:
        v = out[slot.kind]
        if not slot.per_task:
            write(slot.file(), spec.name, slot_tensor(rule, slot, spec, v))
        elif slot.frozen:
            write(slot.file(t), spec.name, slot_tensor(rule, slot, spec, v))
        else:
            if not isinstance(v, list) and not (isinstance(v, torch.Tensor) and v.dim() == 2):
                raise RuntimeError(f"{rule.method}: fold returned no rows of {slot.kind!r} for tensor {spec.name!r}")
            if len(v) != t + 1:
                raise RuntimeError(f"{rule.method}: fold returned {len(v)} {slot.kind!r} rows, expected {t + 1}")
            for i in range(t + 1):
                write(slot.file(i), spec.name, slot_tensor(rule, slot, spec, v[i]))


def slot_tensor(rule: Any, slot: Any, spec: TensorSpec, v: Any) -> torch.Tensor:
    """``v`` checked to be slot ``slot`` of tensor ``spec`` (dtype and size), on the CPU, contiguous."""
    want_dtype, want_shape = slot.dtype(spec.dtype), slot.shape(spec.shape)
    if not isinstance(v, torch.Tensor) or v.dtype != want_dtype or v.numel() != math.prod(want_shape):
        got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise RuntimeError(
            f"{rule.method}: slot {slot.kind!r} of tensor {spec.name!r} is {got}, expected {want_dtype} {want_shape}"
        )
    return v.detach().cpu().contiguous()


# ---------------------------------------------------------------------------- planning


@dataclass
class TaskPlan:
    """What a task's write will do, decided under the lock before any data is read: the tensors
    (in the store's order), the base identity to record (creation) and the selection and source
    entries of the manifest."""

    specs: list[TensorSpec]
    base_identity: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    source: dict[str, Any] | None = None


def manifest_specs(manifest: Mapping[str, Any]) -> list[TensorSpec]:
    """The tensors a manifest records, in order."""
    return [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in manifest["tensors"]]


def tensor_entries(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    """The manifest's ``tensors`` list for ``specs``."""
    return [{"name": s.name, "dtype": s.st, "shape": list(s.shape)} for s in specs]


def plan_mapping_task(manifest: Mapping[str, Any] | None, delta: Mapping[str, torch.Tensor], name: str) -> TaskPlan:
    """The tensors of task ``name`` given as a mapping: on creation, every key of ``delta``
    (floating point, in its order, dtype and shape); later, exactly the store's keys."""
    if manifest is None:
        keys = list(delta.keys())
        if not keys:
            raise MergeInputError(f"task {name!r} has no tensors")
        specs = []
        for k in keys:
            t = delta[k]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise DtypeMismatchError(f"task {name!r}: tensor {k!r} is not a floating-point tensor")
            specs.append(TensorSpec(k, t.dtype, tuple(t.shape)))
        return TaskPlan(specs)
    specs = manifest_specs(manifest)
    have, want = set(delta.keys()), {s.name for s in specs}
    if have != want:
        raise KeyMismatchError(
            f"task {name!r} does not match the store's tensors: missing {sorted(want - have)[:8]}, extra {sorted(have - want)[:8]}"
        )
    return TaskPlan(specs)


def plan_checkpoint_task(
    root: str,
    manifest: Mapping[str, Any] | None,
    td: TaskDelta,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    dtype: torch.dtype | None,
    check_base: bool,
    *,
    hash_base: bool = True,
) -> TaskPlan:
    """The tensors of a checkpoint task checked against ``td``: on creation the
    ``include``/``exclude`` selection (fnmatch globs) of the default set (every floating-point
    tensor, or the adapter's) in ``dtype`` (default: the fine-tuned file's); later the store's
    tensors, with the recorded options and base checked. ``hash_base=False``: the base's digest
    is left to :func:`base_after_read` (only its size is checked here), so the merge's own read
    of the base is the only one."""
    bck, fck = td.base, td.finetuned
    ident = None
    if manifest is None:
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
                dt = dtype or fck.spec(k).st  # type: ignore[union-attr]
            else:
                dt = dtype or bck.spec(k).st
            specs.append(TensorSpec(k, dt, tuple(bck.spec(k).shape)))
        if check_base and bck.files() and hash_base:
            ident = checkpoint_identity(bck, default_algorithm())
    else:
        check_recorded_options(root, manifest, include=include, exclude=exclude, dtype=dtype)
        specs = manifest_specs(manifest)
        if check_base:
            check_base_identity(manifest, bck, size_only=not hash_base)
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
    return TaskPlan(specs, ident, selection, source)


def check_recorded_options(
    root: str,
    manifest: Mapping[str, Any],
    *,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    dtype: torch.dtype | None,
) -> None:
    """Options given again on a later task must equal what the manifest records."""
    if dtype is not None:
        have = sorted({ST_TORCH_NAMES[t["dtype"]] for t in manifest["tensors"]})
        want = str(dtype).replace("torch.", "")
        if have != [want]:
            raise OptionMismatchError(
                f"{root}: --dtype {want} differs from the store's {', '.join(have)} (fixed when the store was created); "
                "drop the option, or start a new store"
            )
    sel = manifest.get("selection")
    if sel is None:
        return
    for opt, given in (("include", include), ("exclude", exclude)):
        if given is not None and list(given) != list(sel.get(opt, [])):
            raise OptionMismatchError(
                f"{root}: --{opt} {list(given)} differs from the store's {list(sel.get(opt, []))} (fixed when the store "
                "was created); drop the option, or start a new store"
            )


def base_algorithm(manifest: Mapping[str, Any] | None) -> str:
    """The digest a base checkpoint is hashed in: the one the store's base record names, else (a
    new store, or one that records no base digest) :func:`default_algorithm`'s."""
    return record_algorithm((manifest or {}).get("base")) or default_algorithm()


def hash_base_while_reading(manifest: Mapping[str, Any] | None, bck: Checkpoint, worker: Any = None) -> None:
    """Before the merge reads the base: make its running hash (:meth:`SafetensorsFile.set_hash`)
    the algorithm :func:`base_after_read` will check or record, so the merge's read is the only
    one (a base already read keeps its hash; :func:`base_after_read` then reads it again). With
    ``worker`` (an :class:`~condu_merge.digests.OrderedWorker`, see :func:`background_hasher`)
    the hash runs there, off the merging thread: the base's buffers are only read by the merge."""
    if isinstance(bck, SafetensorsFile):
        algo = base_algorithm(manifest)
        if bck.hash_algo != algo or worker is not None:
            with contextlib.suppress(RuntimeError):
                bck.set_hash(algo, worker)
    elif isinstance(bck, ShardedCheckpoint):  # each shard hashed as read; the identity combines them
        with contextlib.suppress(RuntimeError):
            bck.set_hash(base_algorithm(manifest), worker)


@contextlib.contextmanager
def background_hasher(wanted: bool = True) -> Iterator[Any]:
    """An :class:`~condu_merge.digests.OrderedWorker` for one input's running hash, closed at
    the end (``None``, and no thread, when not ``wanted`` or background work is off:
    ``BACKGROUND_BYTES = 0``)."""
    from .digests import OrderedWorker

    if not wanted or BACKGROUND_BYTES <= 0:
        yield None
        return
    with OrderedWorker(BACKGROUND_BYTES) as worker:
        yield worker


def check_base_identity(
    manifest: Mapping[str, Any],
    bck: Checkpoint,
    digest: str | None = None,
    *,
    size_only: bool = False,
    digest_algo: str | None = None,
) -> None:
    """Refuse a base checkpoint that differs from the one the store was created with (its size,
    and unless ``size_only`` its digest in the algorithm the record names: ``digest`` if the
    caller hashed it while reading, in ``digest_algo``, default the record's; a digest in another
    algorithm is ignored and the base hashed again)."""
    rec = manifest.get("base")
    algo = record_algorithm(rec)
    if not rec or algo is None or not bck.files():
        return  # no base recorded, or one with no files (an in-memory base): nothing to compare
    files = bck.files()
    same_file = len(files) == 1 and os.path.abspath(files[0]) == rec["path"]
    size = sum(os.path.getsize(f) for f in files)
    if digest is not None and (digest_algo or algo) != algo:
        digest = None
    if size != rec["bytes"] or (not size_only and (digest or checkpoint_identity(bck, algo)[algo]) != rec[algo]):
        where = "was modified since" if same_file else "differs from the one"
        raise MergeInputError(
            f"{bck.path}: this base checkpoint {where} the store was created with ({rec['path']}, {algo} {rec[algo][:12]}…); "
            "deltas against another base cannot be merged"
        )


def base_after_read(manifest: Mapping[str, Any] | None, bck: Checkpoint, *, read_hash: bool) -> dict[str, Any] | None:
    """After the merge read the base: on creation (``manifest is None``), its identity to record
    (in :func:`default_algorithm`'s digest); later, the check against the recorded one (in the
    record's digest). The digest is the one hashed while the merge read the file
    (:meth:`SafetensorsFile.sequential_digest`, chosen by :func:`hash_base_while_reading`), a
    separate pass only where there is none."""
    algo = base_algorithm(manifest)
    digest = bck.sequential_digest(algo) if read_hash and isinstance(bck, SafetensorsFile) else None
    if read_hash and isinstance(bck, ShardedCheckpoint):
        ident = bck.identity_from_reads(algo)  # shards not read front to back are hashed again here
        if manifest is None:
            return ident
        digest = ident[algo]  # type: ignore[assignment]
    if manifest is not None:
        check_base_identity(manifest, bck, digest, digest_algo=algo)
        return None
    if not bck.files():
        return None
    if digest is None:
        return checkpoint_identity(bck, algo)
    return {"path": os.path.abspath(bck.path), algo: digest, "bytes": os.path.getsize(bck.path)}


def hash_reads_as_recorded(
    files: Mapping[str, SafetensorsFile], manifest: Mapping[str, Any], worker: Any = None
) -> None:
    """Before the old generation is read: each file's running hash becomes the algorithm its
    record names (and hashes on ``worker``, an :class:`~condu_merge.digests.OrderedWorker`, if
    given), so :func:`check_read_hashes` checks the merge's own read, whatever the digest."""
    from .digests import record_digest

    for rel, f in files.items():
        f.set_hash(record_digest(manifest["files"][rel], f.path)[0], worker)


def check_read_hashes(files: Mapping[str, SafetensorsFile], manifest: Mapping[str, Any]) -> None:
    """The old generation was read front to back while merging; check what was read against the
    manifest (each file in the algorithm its record names: the running hash when it is that one,
    else one more read of the file), so a damaged store is never merged into a fresh generation
    with fresh hashes."""
    from .digests import record_digest

    for rel, f in files.items():
        info = manifest["files"][rel]
        algo, _ = record_digest(info, f.path)
        check_record(f.path, info, got=f.sequential_digest(algo))


def check_new_task(root: str, manifest: Mapping[str, Any] | None, name: str) -> None:
    """Task names are unique within a store."""
    from .errors import DuplicateTaskError

    if manifest is not None and name in [t["name"] for t in manifest["tasks"]]:
        raise DuplicateTaskError(f"{root}: task {name!r} is already in this store; task names are unique")


# ---------------------------------------------------------------------------- the store directory


def read_manifest(root: str, method: str | None, version: int | Sequence[int]) -> dict[str, Any] | None:
    """``manifest.json`` of the store at ``root`` (``None`` if there is none yet), checked for
    the store format, its ``method`` (``None``: ConDU's, where the field is absent), the
    format ``version`` (one of them, given several) and its checksum; a manifest of another
    method names the class to use, one recording a digest this process cannot compute (BLAKE3
    without the package) says what to install."""
    from .checkpoints import parse_json

    mpath = os.path.join(root, MANIFEST)
    if not os.path.exists(mpath):
        return None
    with open(mpath, "rb") as fh:
        m = parse_json(fh.read(), mpath, "the store manifest")
    if not isinstance(m, dict) or m.get("format") != STORE_FORMAT:
        raise FormatError(f"{mpath}: not a condu-merge store manifest")
    have = m.get("method", "condu")
    if method is None and have != "condu":
        raise FormatError(
            f"{mpath}: this store holds the {have!r} strategy, not ConDU; open it with "
            "condu_merge.strategy_store.StrategyStore (the CLI does)"
        )
    if method is not None and have == "condu":
        raise FormatError(f"{mpath}: this is a ConDU store; open it with condu_merge.store.Store")
    versions = (version,) if isinstance(version, int) else tuple(version)
    if type(m.get("version")) is not int or m["version"] not in versions:
        raise FormatError(
            f"{mpath}: store format version {m.get('version')!r} is not supported (this condu-merge reads version "
            f"{' or '.join(str(v) for v in versions)})"
        )
    if m.get("checksum") != manifest_checksum(m):
        raise FormatError(f"{mpath}: manifest checksum mismatch (the manifest was modified or damaged)")
    require_algorithms(m, mpath)
    return m


def check_generation_files(root: str, manifest: Mapping[str, Any], verify: bool) -> None:
    """Every file the manifest lists exists with its recorded size (and, with ``verify``, its
    digest, in the algorithm its record names: :func:`~condu_merge.digests.check_record`)."""
    gen = os.path.join(root, manifest["generation_dir"])
    for rel, info in manifest["files"].items():
        p = os.path.join(gen, rel)
        if not os.path.exists(p):
            raise FormatError(f"{p}: data file is missing from the store")
        size = os.path.getsize(p)
        if size != info["bytes"]:
            raise FormatError(f"{p}: has {size} bytes, the manifest records {info['bytes']} (truncated or damaged)")
        if verify:
            check_record(p, info)


@dataclass
class VerifyReport:
    """What :meth:`verify` checked: the number of data files, their bytes and the digests their
    records name (``("blake3",)``, ``("sha256",)``, or both in a store mixing generations)."""

    files: int
    bytes: int
    algorithms: tuple[str, ...] = ()


class StoreDirectory:
    """What every store object shares: the folder, its manifest, the open data files, the
    context manager, the reader's retry and the writer's lock. Subclasses implement
    :meth:`_load_once` (read and check the manifest and open the files)."""

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True):
        self.root = os.path.abspath(os.fspath(path))
        self.verify_on_load = verify
        self.manifest: dict[str, Any] | None = None
        self._gen_seen: str | None = None  # generation named by the manifest last read
        self._files: dict[str, SafetensorsFile] = {}
        self._load(verify)

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

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require(self) -> dict[str, Any]:
        """The manifest; ``FileNotFoundError`` naming the folder if there is no store yet."""
        if self.manifest is None:
            raise FileNotFoundError(f"{self.root}: no condu-merge store here (no {MANIFEST}); add a task first")
        return self.manifest

    def _load_once(self, verify: bool) -> None:
        raise NotImplementedError

    def _load(self, verify: bool) -> None:
        # readers never block: a writer may switch manifest.json and delete the generation we
        # just read about; if the manifest on disk moved on, read again (a few times at most)
        for attempt in range(5):
            try:
                return self._load_once(verify)
            except (FormatError, FileNotFoundError):
                seen = self._gen_seen
                if attempt == 4 or seen is None or committed_generation(self.root) in (None, seen):
                    raise

    def reload(self, *, verify: bool | None = None) -> None:
        """Re-read ``manifest.json`` (after another process wrote)."""
        self._load(self.verify_on_load if verify is None else verify)

    def verify(self) -> VerifyReport:
        """Check every data file against its recorded size and digest; :class:`FormatError` naming the first bad file."""
        self._load(True)
        if self.manifest is None:
            return VerifyReport(0, 0)
        files = self.manifest["files"]
        algos = tuple(sorted({str(record_algorithm(i)) for i in files.values()}))
        return VerifyReport(len(files), sum(int(i["bytes"]) for i in files.values()), algos)

    @contextlib.contextmanager
    def _writer_lock(self) -> Any:
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
