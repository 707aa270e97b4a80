"""File digests for integrity checks, torch-free (``inspect`` and :mod:`condu_merge.manifest_check`
use them without importing torch): the algorithms a store may record, incremental hashers, whole
files, manifest records, and :class:`OrderedWorker`, which writes and hashes in the background.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .errors import DigestUnavailableError, FormatError

#: Digests a store may record a file under. ``sha256`` is what every store before BLAKE3 records
#: (and what a store writes without the ``blake3`` package, or with ``$CONDU_MERGE_DIGEST=sha256``);
#: ``blake3`` is the default where the package is installed (:func:`default_algorithm`).
#:
#: BLAKE3 is as safe against corruption as sha256: both are 256-bit cryptographic hashes, so an
#: accidental change of a file's bytes (a flipped bit, a torn or misplaced write) keeps its digest
#: with the same ~2^-256 probability, and a deliberate change would need a second preimage, for
#: which no attack better than brute force is known for either (both claim 128-bit collision and
#: 256-bit second-preimage security). Any change is detected as surely as with sha256.
#:
#: It is faster per core, and a continual step hashes every byte it reads (the old generation,
#: the base) and writes: on this project's AMD EPYC host (2 cores; OpenSSL's sha256 uses the SHA
#: extensions, blake3 1.0.11 AVX2), one thread, a 512 MiB buffer: sha256 0.342 s (1.57 GB/s),
#: blake3 0.155 s (3.46 GB/s), 2.2x. ``benchmarks/bench_e2e.py --params 64e6 --tensors 32
#: --tasks 2 --repeat 1`` with ``CONDU_MERGE_DIGEST=sha256`` / ``blake3`` interleaved (noisy,
#: one try each): add-task 8.29 / 6.36 s for the first task, 7.24 / 7.43 s for the second.
HASH_ALGORITHMS = ("sha256", "blake3")


DIGEST_ENV = "CONDU_MERGE_DIGEST"
"""Environment variable choosing the digest a store records for the files it writes (``sha256``
or ``blake3``); unset or empty: :func:`default_algorithm`'s choice."""

_INSTALL = "pip install blake3 (or pip install 'condu-merge[fast]')"


def new_hasher(algo: str = "sha256") -> Any:
    """A fresh incremental hash object (``update(buffer)``, ``hexdigest()``) for ``algo``.

    ``blake3`` needs the ``blake3`` package (``pip install blake3``); without it
    :class:`~condu_merge.errors.DigestUnavailableError` says so (a store that records BLAKE3
    digests cannot be checked without it). BLAKE3 hashes on the calling thread (single-threaded:
    the store's own background thread already overlaps hashing with the merge)."""
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "blake3":
        try:
            from blake3 import blake3
        except ImportError:
            raise DigestUnavailableError(f"the 'blake3' digest needs the blake3 package: {_INSTALL}") from None
        return blake3()
    raise ValueError(f"unknown hash algorithm {algo!r} (known: {', '.join(HASH_ALGORITHMS)})")


def blake3_available() -> bool:
    """Whether the ``blake3`` package can be imported (then :func:`new_hasher` accepts ``"blake3"``)."""
    try:
        import blake3  # noqa: F401
    except ImportError:
        return False
    return True


def default_algorithm() -> str:
    """The digest a store records for files it writes now: ``$CONDU_MERGE_DIGEST`` if set
    (``sha256`` or ``blake3``), else ``"blake3"`` where the package is importable, else
    ``"sha256"``. Read at each call (each write decides once, at its start).

    Raises :class:`~condu_merge.errors.DigestUnavailableError` naming the variable for a value
    it does not know, or for ``blake3`` without the package."""
    v = os.environ.get(DIGEST_ENV, "").strip()
    if not v:
        return "blake3" if blake3_available() else "sha256"
    if v not in HASH_ALGORITHMS:
        raise DigestUnavailableError(
            f"${DIGEST_ENV}={v!r} is not a digest condu-merge knows; set it to one of {', '.join(HASH_ALGORITHMS)} "
            "(or unset it)"
        )
    if v == "blake3" and not blake3_available():
        raise DigestUnavailableError(
            f"${DIGEST_ENV}=blake3, but the blake3 package is not installed: {_INSTALL}, or set {DIGEST_ENV}=sha256"
        )
    return v


class OrderedWorker:
    """One background thread running submitted jobs one at a time, in submission order.

    ``hashlib``'s and ``blake3``'s ``update`` and ``os.write`` release the GIL on large buffers,
    so a job (write a tensor's bytes and hash them) runs while the submitting thread computes the
    next tensor. ``submit`` blocks while more than ``max_pending_bytes`` of earlier jobs wait (one
    job is always accepted, whatever its size), which bounds the memory that waiting buffers hold.
    The first exception a job raises is raised again, in the submitting thread, by the next
    :meth:`submit` or by :meth:`drain`; later jobs are skipped. A job must not be changed by the
    caller until it ran: hand over buffers that nobody writes to any more.
    """

    def __init__(self, max_pending_bytes: int = 1 << 28):
        self.max_pending_bytes = max_pending_bytes
        self._cv = threading.Condition()
        self._jobs: collections.deque[tuple[Callable[[], object], int]] = collections.deque()
        self._pending = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="condu-merge-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if not self._jobs:
                    return
                fn, _ = self._jobs[0]
                skip = self._error is not None
            try:
                if not skip:
                    fn()
            except BaseException as exc:  # handed to the submitting thread
                with self._cv:
                    self._error = exc
            with self._cv:
                _, n = self._jobs.popleft()
                self._pending -= n
                self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def submit(self, fn: Callable[[], object], nbytes: int = 0) -> None:
        """Queue ``fn`` (which holds ``nbytes`` of buffers until it ran)."""
        with self._cv:
            if self._closed:
                raise RuntimeError("OrderedWorker is closed")
            while self._jobs and self._pending + nbytes > self.max_pending_bytes and self._error is None:
                self._cv.wait()
            self._raise()
            self._jobs.append((fn, nbytes))
            self._pending += nbytes
            self._cv.notify_all()

    def drain(self) -> None:
        """Wait until every queued job ran; raise the first error one of them raised."""
        with self._cv:
            while self._jobs:
                self._cv.wait()
            self._raise()

    def close(self) -> None:
        """:meth:`drain` (errors dropped), then stop the thread."""
        with self._cv:
            while self._jobs:
                self._cv.wait()
            self._error = None
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def __enter__(self) -> OrderedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_digest(path: str | os.PathLike, algo: str = "sha256", chunk: int = 1 << 22) -> str:
    """The ``algo`` digest (see :data:`HASH_ALGORITHMS`) of a file, read in 4 MiB blocks."""
    h = new_hasher(algo)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(view)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def record_digest(info: Mapping[str, object], where: str = "file entry") -> tuple[str, str]:
    """``(algorithm, hex digest)`` of a manifest file record: ``{"bytes", "blake3"}`` or the
    older ``{"bytes", "sha256"}`` (a record carrying both is checked by its ``blake3``, the faster).
    Raises :class:`FormatError` naming ``where`` when it carries neither as a string."""
    for algo in ("blake3", "sha256"):
        v = info.get(algo)
        if isinstance(v, str):
            return algo, v
    raise FormatError(f"{where}: records no digest (needs 'sha256' or 'blake3')")


def make_record(digest: str, size: int, algo: str) -> dict[str, object]:
    """A manifest file record: ``{algo: hex digest, "bytes": size}``."""
    if algo not in HASH_ALGORITHMS:
        raise ValueError(f"unknown hash algorithm {algo!r} (known: {', '.join(HASH_ALGORITHMS)})")
    return {algo: digest, "bytes": int(size)}


def record_algorithm(info: Mapping[str, object] | None) -> str | None:
    """The algorithm a record (a file entry or a base identity) names a digest in, ``None`` when it
    names none (a base with no files records ``{"sha256": None}``). Tolerant of any input."""
    if not isinstance(info, Mapping):
        return None
    for algo in ("blake3", "sha256"):
        if isinstance(info.get(algo), str):
            return algo
    return None


def check_record(
    path: str | os.PathLike,
    info: Mapping[str, object],
    *,
    got: str | None = None,
    got_algo: str | None = None,
    data: bytes | bytearray | memoryview | None = None,
) -> None:
    """Check a file (or bytes already in memory) against its manifest record: the one helper
    every check of a store's files goes through.

    The digest is the record's algorithm (:func:`record_digest`). ``got``: the digest a caller
    computed while reading (in ``got_algo``, default the record's; a digest in another algorithm
    is ignored and the file read again); ``data``: the file's bytes; neither: the file is read
    (:func:`file_digest`). A mismatch raises :class:`FormatError` naming the file, the algorithm,
    the expected and the computed digest; a record in BLAKE3 without the package raises
    :class:`~condu_merge.errors.DigestUnavailableError` saying to install it."""
    path = os.fspath(path)
    algo, want = record_digest(info, path)
    if got is not None and (got_algo or algo) != algo:
        got = None
    if got is None:
        if data is not None:
            h = new_hasher(algo)
            h.update(data)
            got = h.hexdigest()
        else:
            got = file_digest(path, algo)
    if got != want:
        raise FormatError(
            f"{path}: {algo} mismatch: the file is damaged (a byte differs from what was written; "
            f"the manifest records {algo} {want}, the file has {got})"
        )


def manifest_algorithms(m: Mapping[str, Any]) -> set[str]:
    """Every digest algorithm a store manifest's records name: its files, its base identity, and
    the base identities tasks record in their source (LoRA stores). Tolerant of any input (it runs
    before the manifest's fields are checked)."""
    recs: list[object] = []
    files = m.get("files")
    if isinstance(files, Mapping):
        recs += list(files.values())
    recs.append(m.get("base"))
    tasks = m.get("tasks")
    for t in tasks if isinstance(tasks, list) else []:
        if isinstance(t, Mapping) and isinstance(t.get("source"), Mapping):
            recs.append(t["source"].get("base"))
    out: set[str] = set()
    for r in recs:
        if isinstance(r, Mapping):
            out.update(a for a in HASH_ALGORITHMS if isinstance(r.get(a), str))
    return out


def require_algorithms(m: Mapping[str, Any], where: str) -> None:
    """Refuse, before anything is read or written, a manifest recording a digest this process
    cannot compute (BLAKE3 without the ``blake3`` package), naming ``where`` and the fix."""
    if "blake3" in manifest_algorithms(m) and not blake3_available():
        raise DigestUnavailableError(
            f"{where}: this store records BLAKE3 digests of its files; reading or writing it needs the blake3 "
            f"package: {_INSTALL}"
        )
