"""Distributed continual merging with ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

Launched with ``torchrun`` (one process per rank, any number of nodes); no networking of our own:
every exchange is a ``torch.distributed`` collective. One call of
:func:`distributed_add_task_from_checkpoints` (or :func:`distributed_add_task`) on every rank folds
one task into a :class:`~condu_merge.store.Store` on a filesystem all ranks share:

1. **plan** (rank 0): take the store's writer lock, load the manifest, choose the tensors and the
   next generation's name, create that generation's data files with their final headers and
   sizes (the safetensors header fixes every tensor's byte offsets up front); broadcast the plan.
2. **shard**: tensors are dealt to ranks by :func:`shard_by_bytes` (greedy, largest first, onto
   the least-loaded rank -- deterministic, so every rank computes the same assignment).
3. **merge** (every rank): read only its tensors of the checkpoints and of the current
   generation, run :func:`~condu_merge.core.unify_tensor` / :func:`~condu_merge.core.add_task_tensor`
   (``backend="auto"``), ``pwrite`` ``u`` and the mask rows at their offsets in the shared files,
   ``fsync``. Meanwhile the current generation's files are checked against their recorded
   digests (each in the algorithm its record names), one file per rank.
4. **reduce**: the rescaler numerators and denominators ``num[i][t]``, ``den[i][t]`` (float64, per
   task ``i`` and tensor ``t``) are all-reduced. Each entry is produced by exactly one rank and is
   zero elsewhere, so the sum is exact and every rank computes the same λ's, bit for bit equal to
   a single process's (:func:`~condu_merge.core.compute_rescalers` then runs on identical input).
5. **hash**: after a barrier (every rank's data fsynced), the new files are hashed, one file per
   rank, in the digest rank 0 chose when planning (:func:`~condu_merge.digests.default_algorithm`
   there, so every rank records the same one), and the hashes gathered on rank 0.
6. **commit** (rank 0): complete the manifest (:meth:`Store.complete_manifest`) and write it last, with
   the store's own atomic switch (:meth:`Store.commit`: fsynced temporary manifest,
   ``os.replace``, fsync of the directory).

Planning (:func:`~condu_merge.pipeline.plan_checkpoint_task` / :func:`~condu_merge.pipeline.plan_mapping_task`), the per-tensor
step (:func:`~condu_merge.store.continual_step_tensor`) and the file layout
(:func:`~condu_merge.store.generation_layout`) are the store's own, not copies.

The files are byte-identical to those a single process writes, so the manifest's digests match
and the store loads in one process. A rank that fails (an exception, or killed) never lets rank 0
commit: every phase ends in a collective that carries each rank's status, a dead rank makes the
collective fail, and the old manifest -- naming the old, complete generation -- stays in place;
the next writer deletes the half-written generation.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as _dt
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

from . import errors as _errors, store as store_mod
from .backends import MergeBackend
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    PeftAdapter,
)
from .core import compute_rescalers
from .digests import check_record, default_algorithm, file_digest, make_record
from .errors import ConduError
from .manifest_check import UNIFIED
from .pipeline import (
    CRASH_ENV,
    KEEP_OPEN_FILES,
    MANIFEST,
    StoreLock,
    StoreLockedError,
    TaskPlan,
    check_add_args,
    fold_tensors,
    fsync_dir,
    open_task_delta,
    open_writer_lock,
    plan_checkpoint_task,
    plan_mapping_task,
    remove_generation_dir,
)
from .safetensors_writer import TensorSpec, build_header, tensor_bytes
from .store import Store, generation_layout
from .strategies.condu import ConDURule
from .strategies.rule import FoldTask

CRASH_RANK_ENV = "CONDU_MERGE_CRASH_RANK"
"""Test hook: with :data:`condu_merge.store.CRASH_ENV` set to a step, only this rank kills itself.

Steps here: ``write:start`` (rank 0, plan made and files created), ``write:tensor`` (a rank's
first tensor written), ``write:data`` (a rank's data fsynced, before the status exchange);
``commit:*`` steps are rank 0's, inside the store's commit."""

TIMEOUT_ENV = "CONDU_MERGE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
RENDEZVOUS_TIMEOUT_ENV = "CONDU_MERGE_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0
"""How long ranks wait for each other to connect (``MASTER_ADDR:MASTER_PORT``) before giving up
with a clear message; the collectives' own timeout (:data:`TIMEOUT_ENV`) applies after that."""
FORCE_ENV = "CONDU_MERGE_DISTRIBUTED"
"""``1``: ``condu-merge add-task`` takes ``WORLD_SIZE``/``RANK``/``MASTER_*`` as a launch without
torchrun's own variables (another launcher that sets them)."""


def launcher_detected(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started as one rank of a multi-process job: ``WORLD_SIZE > 1``
    and torchrun's own variables (``TORCHELASTIC_RUN_ID``, or ``LOCAL_RANK`` with ``GROUP_RANK``),
    or :data:`FORCE_ENV`. A ``WORLD_SIZE`` left over in a shell alone does not count: it would
    make a plain add-task wait for ranks that never come."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    if world <= 1:
        return False
    return (
        bool(env.get("TORCHELASTIC_RUN_ID"))
        or ("LOCAL_RANK" in env and "GROUP_RANK" in env)
        or env.get(FORCE_ENV) == "1"
    )


def stale_world_size(env: Mapping[str, str] | None = None) -> str | None:
    """A one-line note when ``WORLD_SIZE > 1`` is set without a launcher (see :func:`launcher_detected`)."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world > 1 and not launcher_detected(env):
        return (
            f"WORLD_SIZE={world} is set but no torchrun launcher is (no TORCHELASTIC_RUN_ID, LOCAL_RANK+GROUP_RANK); "
            f"running in one process. Start ranks with torchrun, or set {FORCE_ENV}=1 under another launcher"
        )
    return None


class DistributedMergeError(ConduError, RuntimeError):
    """Another rank failed (its error is in the message), or a rank was lost during a collective."""


# ---------------------------------------------------------------------------- sharding


def shard_by_bytes(specs: Sequence[TensorSpec], world_size: int) -> list[list[int]]:
    """Assign tensors to ``world_size`` ranks, balancing bytes (greedy longest-processing-time).

    Tensors are taken by decreasing ``nbytes`` (ties: store order) and each goes to the rank with
    the fewest bytes so far (ties: the lowest rank); the makespan is at most ``4/3`` of the
    optimum plus one tensor. Deterministic: every rank computes the same answer from the same
    specs. Returns, per rank, the indices into ``specs`` in store order (so files are read and
    written front to back).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(specs)), key=lambda j: (-specs[j].nbytes, j)):
        r = min(range(world_size), key=lambda q: (load[q], q))
        out[r].append(i)
        load[r] += specs[i].nbytes
    return [sorted(x) for x in out]


def _assign_files(sizes: Mapping[str, int], world_size: int) -> list[list[str]]:
    """Whole files to ranks for hashing (a digest is sequential within a file), largest first."""
    names = list(sizes)
    specs = [TensorSpec(n, torch.uint8, (int(sizes[n]),)) for n in names]
    return [[names[i] for i in part] for part in shard_by_bytes(specs, world_size)]


# ---------------------------------------------------------------------------- communication


class _Comm:
    """The few collectives we need, over a ``torch.distributed`` group. Objects travel as JSON in
    uint8 tensors (never pickle). A failed collective (a peer died) becomes
    :class:`DistributedMergeError` naming the phase."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        be = str(dist.get_backend(group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in be else torch.device("cpu")
        self.backend = be
        self.broken = False  # a collective failed: the group is unusable

    @contextlib.contextmanager
    def _phase(self, phase: str):
        try:
            yield
        except DistributedMergeError:
            raise
        except Exception as exc:  # gloo/NCCL report a lost peer as RuntimeError (or DistBackendError)
            self.broken = True
            raise DistributedMergeError(
                f"rank {self.rank}: lost contact with the other ranks during {phase} ({type(exc).__name__}: {exc}); "
                "a rank probably died -- the store keeps its previous state"
            ) from exc

    def all_reduce_sum(self, t: torch.Tensor, phase: str) -> torch.Tensor:
        with self._phase(phase):
            x = t.to(self.device)
            self.dist.all_reduce(x, op=self.dist.ReduceOp.SUM, group=self.group)
            return x.cpu()

    def all_gather_json(self, obj: object, phase: str) -> list:
        with self._phase(phase):
            raw = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)
            n = torch.tensor([raw.numel()], dtype=torch.int64, device=self.device)
            sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
            self.dist.all_gather(sizes, n, group=self.group)
            width = max(int(s.item()) for s in sizes)
            buf = torch.zeros(width, dtype=torch.uint8, device=self.device)
            buf[: raw.numel()] = raw.to(self.device)
            bufs = [torch.zeros_like(buf) for _ in range(self.world_size)]
            self.dist.all_gather(bufs, buf, group=self.group)
            return [json.loads(bytes(b[: int(s.item())].cpu().numpy()).decode("utf-8")) for b, s in zip(bufs, sizes)]

    def broadcast_json(self, obj: object, phase: str, src: int = 0) -> object:
        with self._phase(phase):
            n = torch.zeros(1, dtype=torch.int64, device=self.device)
            raw = None
            if self.rank == src:
                raw = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)
                n[0] = raw.numel()
            self.dist.broadcast(n, src=self._global(src), group=self.group)
            buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=self.device)
            if self.rank == src:
                buf.copy_(raw.to(self.device))
            self.dist.broadcast(buf, src=self._global(src), group=self.group)
            return json.loads(bytes(buf.cpu().numpy()).decode("utf-8"))

    def _global(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return self.dist.get_global_rank(self.group, group_rank)


class _LocalComm:
    """World size 1 without a process group: the same code path, collectives are identities."""

    rank = 0
    world_size = 1
    backend = "none"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor, phase: str) -> torch.Tensor:
        return t

    def all_gather_json(self, obj: object, phase: str) -> list:
        return [json.loads(json.dumps(obj))]

    def broadcast_json(self, obj: object, phase: str, src: int = 0) -> object:
        return json.loads(json.dumps(obj))


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


_OWN_GROUP = False
"""Whether the default process group was initialised here (and is kept for later calls)."""


def _destroy_own_group() -> None:
    global _OWN_GROUP
    import torch.distributed as dist

    if _OWN_GROUP and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _OWN_GROUP = False


@contextlib.contextmanager
def _communicator(group=None, timeout_s: float | None = None):
    """The default (or given) process group; initialised from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) when not yet initialised and
    ``WORLD_SIZE > 1`` -- NCCL when CUDA is available, else gloo.

    A group initialised here is kept for this process's later calls and destroyed at exit, or
    as soon as one of its collectives fails. Destroying it after every call would make the next
    call rendezvous again on the same ``MASTER_PORT`` while rank 0 may still be tearing down the
    previous rendezvous' store: a faster rank then joins the dying store and the ranks hang."""
    global _OWN_GROUP
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        comm = _Comm(group)
        try:
            yield comm
        finally:
            if comm.broken and _OWN_GROUP:
                _destroy_own_group()
        return
    if _env_world_size() <= 1:
        yield _LocalComm()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    timeout = timeout_s if timeout_s is not None else float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    rdv = float(os.environ.get(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S))
    use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    who = f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}"
    try:
        # the rendezvous first, with its own (short) timeout: with a stale environment the other
        # ranks never come, and init_process_group alone would wait the whole collective timeout
        store, rank, world = next(dist.rendezvous("env://", timeout=_dt.timedelta(seconds=rdv)))
    except (RuntimeError, ValueError, TimeoutError) as exc:
        raise DistributedMergeError(
            f"rendezvous at {where} as {who} failed after up to {rdv:g} s ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); start every rank (torchrun), or unset WORLD_SIZE for "
            f"one process (${RENDEZVOUS_TIMEOUT_ENV} sets the wait)"
        ) from None
    store.set_timeout(_dt.timedelta(seconds=timeout))
    dist.init_process_group(
        "nccl" if use_nccl else "gloo", store=store, rank=rank, world_size=world, timeout=_dt.timedelta(seconds=timeout)
    )
    if not _OWN_GROUP:
        atexit.register(_destroy_own_group)
    _OWN_GROUP = True
    comm = _Comm(None)
    try:
        yield comm
    finally:
        if comm.broken:
            _destroy_own_group()


# ---------------------------------------------------------------------------- errors across ranks


def _known_error_types() -> dict[str, type]:
    """Exception classes a remote failure is re-raised as (by name), so callers can catch them."""
    out: dict[str, type] = {}
    todo: list[type] = [ConduError]
    while todo:
        c = todo.pop()
        out[c.__name__] = c
        todo.extend(c.__subclasses__())
    for c in (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError, StoreLockedError, CheckpointError):
        out.setdefault(c.__name__, c)
    return out


def _describe(exc: BaseException, rank: int) -> dict:
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return {
        "rank": rank,
        "type": type(exc).__name__,
        "message": msg,
        "remote": bool(getattr(exc, "_condu_remote", False)),
    }


def _raise_first(statuses: Sequence[dict | None], me: int, local: BaseException | None) -> None:
    """If any rank failed, raise: this rank's own exception if it failed (the most precise), else
    the lowest failing rank's error, re-created as the same type where that type is ours."""
    failed = [s for s in statuses if s is not None]
    if not failed:
        return
    if local is not None:
        raise local
    first = min((s for s in failed if not s.get("remote")), key=lambda s: s["rank"], default=failed[0])
    cls = _known_error_types().get(first["type"])
    text = f"rank {first['rank']} failed: {first['message']}"
    try:
        err = cls(text) if cls is not None else DistributedMergeError(f"{text} ({first['type']})")
    except Exception:  # a class whose constructor wants more than a message
        err = DistributedMergeError(f"{text} ({first['type']})")
    err._condu_remote = True
    raise err


def _crash_point(step: str, rank: int) -> None:
    if os.environ.get(CRASH_ENV) != step:
        return
    only = os.environ.get(CRASH_RANK_ENV)
    if only is not None and only.strip() != str(rank):
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _on_rank0(comm, phase: str, step: Callable[[], object]) -> object:
    """Run ``step`` on rank 0 only and broadcast its (JSON) result; if it raised, every rank raises
    (rank 0 its own exception, the others its description)."""
    local, msg = None, None
    if comm.rank == 0:
        try:
            msg = {"ok": True, "value": step()}
        except Exception as exc:
            local = exc
            msg = {"ok": False, "error": _describe(exc, comm.rank)}
    msg = comm.broadcast_json(msg, phase)
    if not msg["ok"]:
        _raise_first([msg["error"]], comm.rank, local)
    return msg["value"]


# ---------------------------------------------------------------------------- file layout


def _file_layout(specs: Sequence[TensorSpec], n_tasks: int) -> dict[str, tuple[bytes, dict[str, tuple[int, int]]]]:
    """``{relative path: (header bytes, {tensor: (absolute begin, end)})}`` of one generation's data
    files, from :func:`condu_merge.store.generation_layout` as :class:`~condu_merge.store.GenerationWriter`
    writes them, so the bytes written here equal a single process's."""
    layout = {}
    for rel, (file_specs, meta) in generation_layout(specs, n_tasks).items():
        head, offsets = build_header(file_specs, meta)
        layout[rel] = (head, {k: (len(head) + b, len(head) + e) for k, (b, e) in offsets.items()})
    return layout


def _file_size(entry: tuple[bytes, dict[str, tuple[int, int]]]) -> int:
    head, offsets = entry
    return max([len(head)] + [e for _, e in offsets.values()])


def _create_files(gen_dir: str, layout: Mapping[str, tuple[bytes, dict]]) -> None:
    """Rank 0: each data file with its header and its final (sparse) size, fsynced, so every rank
    can ``pwrite`` its tensors at their offsets."""
    os.makedirs(os.path.join(gen_dir, "masks"), exist_ok=False)
    for rel, entry in layout.items():
        fd = os.open(os.path.join(gen_dir, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _pwrite_all(fd, memoryview(entry[0]), 0)
            os.ftruncate(fd, _file_size(entry))
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(os.path.join(gen_dir, "masks"))
    fsync_dir(gen_dir)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


class _SliceWriter:
    """One rank's writes into the shared generation files: its tensors, at their offsets."""

    def __init__(self, gen_dir: str, layout: Mapping[str, tuple[bytes, dict]]):
        self.layout = layout
        self.dir = gen_dir
        self.fds: dict[str, int] = {}
        self._parts: dict[tuple[str, str], int] = {}
        # past KEEP_OPEN_FILES files, each write opens its file (thousands of tasks, 1,024 fds)
        self._keep = len(layout) <= KEEP_OPEN_FILES
        try:
            if self._keep:
                for rel in layout:
                    self.fds[rel] = os.open(os.path.join(gen_dir, rel), os.O_WRONLY)
        except BaseException:
            self.close()
            raise

    def write(self, rel: str, key: str, t: torch.Tensor) -> None:
        begin, end = self.layout[rel][1][key]
        data = tensor_bytes(t)
        if data.nbytes != end - begin:
            raise ValueError(f"{rel}: tensor {key!r} has {data.nbytes} bytes, its slot {end - begin}")
        self._pwrite(rel, data, begin)

    def write_part(self, rel: str, key: str, t: torch.Tensor) -> None:
        """The next consecutive piece of tensor ``key`` in file ``rel`` (pieces in order)."""
        begin, end = self.layout[rel][1][key]
        done = self._parts.get((rel, key), 0)
        data = tensor_bytes(t)
        if begin + done + data.nbytes > end:
            raise ValueError(f"{rel}: a piece of tensor {key!r} runs past its slot")
        self._pwrite(rel, data, begin + done)
        self._parts[(rel, key)] = done + data.nbytes

    def _pwrite(self, rel: str, data: memoryview, offset: int) -> None:
        if self._keep:
            _pwrite_all(self.fds[rel], data, offset)
            return
        fd = os.open(os.path.join(self.dir, rel), os.O_WRONLY)
        try:
            _pwrite_all(fd, data, offset)
        finally:
            os.close(fd)

    def fsync(self) -> None:
        if self._keep:
            for fd in self.fds.values():
                os.fsync(fd)
            return
        for rel in self.layout:
            fd = os.open(os.path.join(self.dir, rel), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}


# ---------------------------------------------------------------------------- plans


@dataclass
class _Plan:
    """What rank 0 decided, broadcast to every rank as JSON."""

    specs: list[TensorSpec]
    names: list[str]  # every task, the new one last
    mode: str
    new_gen: str
    manifest_checksum: str | None
    old_lambdas: list  # float or {tensor: float}, per earlier task
    base_identity: dict | None
    selection: dict | None
    source: dict | None
    digest: str = "sha256"  # the algorithm every rank hashes the new files in (rank 0's choice)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["specs"] = [[s.name, s.st, list(s.shape)] for s in self.specs]
        return d

    @classmethod
    def from_json(cls, d: dict) -> _Plan:
        d = dict(d)
        d["specs"] = [TensorSpec(n, dt, tuple(sh)) for n, dt, sh in d["specs"]]
        return cls(**d)


PlanFn = Callable[[Store], tuple[list[TensorSpec], dict | None, dict | None, dict | None]]
"""Rank 0's planning step, under the lock: ``store -> (specs, base identity, selection, source)``."""


@dataclass
class _Source:
    """Where a task's delta comes from, opened on each rank inside the protocol (so a rank that
    cannot open its inputs reports it through the status exchange instead of hanging the others)."""

    plan: PlanFn
    delta: Callable[[str, torch.dtype], torch.Tensor]
    close: Callable[[], None]
    delta_range: Callable[[str, torch.dtype, int, int], torch.Tensor] | None = None
    """Elements ``[start, stop)`` of a delta (checkpoints): large tensors are merged in pieces, as
    the single-process store merges them, so the bytes and λ's are the same."""


# ---------------------------------------------------------------------------- the distributed step


def _plan_tuple(plan: TaskPlan) -> tuple:
    return plan.specs, plan.base_identity, plan.selection, plan.source


def _merge_device(comm) -> torch.device:
    return comm.device if comm.device.type == "cuda" else torch.device("cpu")


def _distributed_stream_add(
    root: str,
    name: str,
    open_source: Callable[[], _Source],
    *,
    rescaler: str | None,
    backend: str | MergeBackend,
    progress: bool,
    comm,
) -> dict:
    """The protocol described in the module docstring. Every rank calls it; returns a summary."""
    rank, world = comm.rank, comm.world_size
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    lock: StoreLock | None = None
    st: Store | None = None
    gen_dir: str | None = None
    src: _Source | None = None
    committed = False

    def make_plan() -> dict:
        nonlocal lock, st, src, gen_dir
        lock = open_writer_lock(root)
        st = Store(root, verify=False)
        st.check_new_task_name(name)
        st.check_rescaler(rescaler)
        src = open_source()
        specs, ident, selection, source = src.plan(st)
        m_old = st.manifest
        new_gen, gen_dir = st.new_generation()
        plan = _Plan(
            specs=list(specs),
            names=st.task_names + [name],
            mode=m_old["rescaler"] if m_old else (rescaler or "tensor_mean"),
            new_gen=new_gen,
            manifest_checksum=m_old["checksum"] if m_old else None,
            old_lambdas=[st.rescaler_of(t) for t in st.task_names],
            base_identity=ident,
            selection=selection,
            source=source,
            digest=default_algorithm(),
        )
        _create_files(gen_dir, _file_layout(plan.specs, len(plan.names)))
        _crash_point("write:start", rank)
        return plan.to_json()

    try:
        # ---- 1. plan (rank 0, under the lock)
        plan = _Plan.from_json(_on_rank0(comm, "planning", make_plan))
        specs, names = plan.specs, plan.names
        t_prev, n_tasks = len(names) - 1, len(names)
        gen_dir = os.path.join(root, plan.new_gen)
        layout = _file_layout(specs, n_tasks)
        shards = shard_by_bytes(specs, world)
        mine = shards[rank]
        timings["plan"] = time.perf_counter() - t0

        # ---- 2-3. merge this rank's tensors, check this rank's share of the old files
        t1 = time.perf_counter()
        num = torch.zeros((n_tasks, len(specs)), dtype=torch.float64)
        den = torch.zeros((n_tasks, len(specs)), dtype=torch.float64)
        bits = torch.zeros(n_tasks, dtype=torch.int64)
        local = None
        writer: _SliceWriter | None = None
        try:
            if st is None:
                st = Store(root, verify=False)
            if src is None:
                src = open_source()
            got = st.manifest["checksum"] if st.manifest else None
            if got != plan.manifest_checksum:
                raise DistributedMergeError(
                    f"{root}: rank {rank} sees another manifest than rank 0 (is the store on a filesystem every rank shares, the same path?)"
                )
            if t_prev:
                old_files = {t["masks"]: int(st.manifest["files"][t["masks"]]["bytes"]) for t in st.manifest["tasks"]}
                old_files = {UNIFIED: int(st.manifest["files"][UNIFIED]["bytes"]), **old_files}
                for rel in _assign_files(old_files, world)[rank]:
                    check_record(os.path.join(st.gen_dir, rel), st.manifest["files"][rel])
            timings["verify_old"] = time.perf_counter() - t1
            if not os.path.isdir(gen_dir):
                raise DistributedMergeError(
                    f"{gen_dir}: rank {rank} cannot see the generation directory rank 0 created; "
                    "the store must be on a filesystem every rank shares, at the same path"
                )
            writer = _SliceWriter(gen_dir, layout)
            rule = ConDURule(rescaler=plan.mode)
            rule.opts["backend"] = backend
            rule.device = _merge_device(comm)
            task = FoldTask(t_prev, name, meta={"rescalers": plan.old_lambdas})
            dtype_of = {s.name: s.dtype for s in specs}
            fold_tensors(
                rule,
                [specs[i] for i in mine],
                lambda k: src.delta(k, dtype_of[k]),
                st.slot_reader() if t_prev else None,
                task,
                writer.write,
                label=f"task {name!r}",
                progress=progress and rank == 0,
                crash=lambda step: _crash_point(step, rank),
                chunk=store_mod.CHUNK_ELEMENTS if src.delta_range is not None else None,
                delta_range_of=(lambda k, a0, a1: src.delta_range(k, dtype_of[k], a0, a1)) if src.delta_range else None,
                write_part=writer.write_part,
            )
            for idx in mine:
                k = specs[idx].name
                num[:, idx] = torch.tensor([task.stats["num"][i][k] for i in range(n_tasks)], dtype=torch.float64)
                den[:, idx] = torch.tensor([task.stats["den"][i][k] for i in range(n_tasks)], dtype=torch.float64)
            if mine:
                bits += torch.tensor(task.stats["bits"], dtype=torch.int64)
            writer.fsync()
            _crash_point("write:data", rank)
        except Exception as exc:
            local = exc
        finally:
            if writer is not None:
                writer.close()
        timings["merge"] = time.perf_counter() - t1 - timings.get("verify_old", 0.0)
        statuses = comm.all_gather_json(None if local is None else _describe(local, rank), "the merge")
        _raise_first(statuses, rank, local)

        # ---- 4. exact all-reduce of the rescaler sums; the same λ's everywhere
        t2 = time.perf_counter()
        packed = comm.all_reduce_sum(torch.cat([num.reshape(-1), den.reshape(-1)]), "the rescaler all-reduce")
        num, den = packed[: num.numel()].reshape(num.shape), packed[num.numel() :].reshape(den.shape)
        bits = comm.all_reduce_sum(bits, "the mask-bit all-reduce")
        numel = {s.name: math.prod(s.shape) for s in specs}
        nl, dl = num.tolist(), den.tolist()
        num_d = [{s.name: nl[i][j] for j, s in enumerate(specs)} for i in range(n_tasks)]
        den_d = [{s.name: dl[i][j] for j, s in enumerate(specs)} for i in range(n_tasks)]
        with warnings.catch_warnings():
            if rank != 0:
                warnings.simplefilter("ignore")  # rank 0 reports vanished experts once
            lambdas = compute_rescalers(num_d, den_d, numel, plan.mode, names)
        timings["reduce"] = time.perf_counter() - t2

        # ---- 5. hash the new files (every rank's data is fsynced: the status exchange was a barrier)
        t3 = time.perf_counter()
        local, hashes = None, {}
        try:
            sizes = {rel: _file_size(entry) for rel, entry in layout.items()}
            for rel in _assign_files(sizes, world)[rank]:
                p = os.path.join(gen_dir, rel)
                size = os.path.getsize(p)
                if size != sizes[rel]:
                    raise _errors.FormatError(f"{p}: has {size} bytes, expected {sizes[rel]}")
                hashes[rel] = make_record(file_digest(p, plan.digest), size, plan.digest)
        except Exception as exc:
            local = exc
        got = comm.all_gather_json(
            {"error": None if local is None else _describe(local, rank), "hashes": hashes}, "hashing"
        )
        _raise_first([g["error"] for g in got], rank, local)
        files: dict[str, dict] = {}
        for g in got:
            files.update(g["hashes"])
        timings["hash"] = time.perf_counter() - t3

        # ---- 6. rank 0 writes the manifest last: the store's atomic switch
        t4 = time.perf_counter()

        def commit() -> dict:
            nonlocal committed
            m = st.complete_manifest(
                gen_dir,
                {rel: files[rel] for rel in layout},
                name=name,
                mode=plan.mode,
                specs=specs,
                lambdas=lambdas,
                mask_bits=bits.tolist(),
                source=plan.source,
                base_identity=plan.base_identity,
                selection=plan.selection,
            )
            st.commit(m, plan.new_gen, gen_dir)
            committed = True
            return {"generation": st.manifest["generation"]}

        result = _on_rank0(comm, "the commit", commit)
        timings["commit"] = time.perf_counter() - t4
        timings["total"] = time.perf_counter() - t0
        return {
            "store": os.path.abspath(root),
            "task": name,
            "tasks": names,
            "rank": rank,
            "world_size": world,
            "generation": result["generation"],
            "rescaler": lambdas[-1],
            "rescalers": lambdas,
            "mask_bits": [int(b) for b in bits],
            "params": sum(numel.values()),
            "tensors_on_rank": len(mine),
            "bytes_on_rank": sum(specs[i].nbytes for i in mine),
            "timings": timings,
        }
    finally:
        if rank == 0:
            if (
                not committed
                and gen_dir is not None
                and os.path.isdir(gen_dir)
                and _current_generation(root) != os.path.basename(gen_dir)
            ):
                remove_generation_dir(gen_dir)  # the next writer would remove it anyway
            if lock is not None:
                lock.release()
        if st is not None:
            st.close()
        if src is not None:
            src.close()


def _current_generation(root: str) -> str | None:
    """The generation ``manifest.json`` names on disk now (``None`` if none or unreadable)."""
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as fh:
            return json.load(fh).get("generation_dir")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------- public API


def distributed_add_task_from_checkpoints(
    store: str | os.PathLike,
    name: str,
    base: str | os.PathLike | Checkpoint,
    finetuned: str | os.PathLike | Checkpoint | PeftAdapter,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    rescaler: str | None = None,
    backend: str | MergeBackend = "auto",
    progress: bool = False,
    check_base: bool = True,
    group=None,
    timeout_s: float | None = None,
) -> dict:
    """:meth:`Store.add_task_from_checkpoints`, split across the ranks of a ``torch.distributed`` job.

    Call it on every rank with the same arguments (the paths must name the same files on every
    rank: a shared filesystem). Uses ``group`` or the default process group if one is initialised;
    otherwise initialises one from torchrun's environment when ``WORLD_SIZE > 1`` (NCCL on CUDA,
    else gloo; ``timeout_s`` or ``$CONDU_MERGE_DIST_TIMEOUT``, default 1800 s) and runs in-process
    when it is not set. Each rank reads only its tensors; the result is byte-identical to the
    single-process store's. Returns this rank's summary (λ's, mask bits, its share, timings).
    """
    check_add_args(name, rescaler)

    def open_source() -> _Source:
        td = open_task_delta(base, finetuned)
        return _Source(
            lambda st: _plan_tuple(plan_checkpoint_task(st.root, st.manifest, td, include, exclude, dtype, check_base)),
            td.delta,
            td.close,
            td.delta_range,
        )

    with _communicator(group, timeout_s) as comm:
        return _distributed_stream_add(
            os.fspath(store), name, open_source, rescaler=rescaler, backend=backend, progress=progress, comm=comm
        )


def distributed_add_task(
    store: str | os.PathLike,
    name: str,
    delta: Mapping[str, torch.Tensor],
    *,
    rescaler: str | None = None,
    backend: str | MergeBackend = "auto",
    progress: bool = False,
    group=None,
    timeout_s: float | None = None,
) -> dict:
    """:meth:`Store.add_task` split across ranks: ``delta`` (on every rank; a lazy mapping is read
    only at this rank's keys) is folded into the store. See :func:`distributed_add_task_from_checkpoints`."""
    check_add_args(name, rescaler)

    def plan(st: Store):
        return plan_mapping_task(st.manifest, delta, name).specs, None, None, None

    with _communicator(group, timeout_s) as comm:
        return _distributed_stream_add(
            os.fspath(store),
            name,
            lambda: _Source(plan, lambda k, dt: delta[k], lambda: None),
            rescaler=rescaler,
            backend=backend,
            progress=progress,
            comm=comm,
        )


# ---------------------------------------------------------------------------- command line

_DTYPES = ("float32", "float16", "bfloat16", "float64")


def build_parser() -> argparse.ArgumentParser:
    """``python -m condu_merge.distributed add-task …``: the options of ``condu-merge add-task``."""
    p = argparse.ArgumentParser(
        prog="python -m condu_merge.distributed",
        description="condu-merge add-task across the ranks of a torchrun job (gloo on CPU, NCCL on GPU)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add-task", help="merge a fine-tuned checkpoint into a store, split across ranks")
    a.add_argument("store", help="store directory on a filesystem every rank sees at the same path")
    a.add_argument("--base", required=True)
    a.add_argument("--finetuned", required=True)
    a.add_argument("--name", required=True)
    a.add_argument("--include", action="append", metavar="GLOB")
    a.add_argument("--exclude", action="append", metavar="GLOB")
    a.add_argument("--rescaler", default="tensor_mean")
    a.add_argument("--dtype", choices=_DTYPES)
    a.add_argument("--backend", default="auto")
    a.add_argument("--no-check-base", action="store_true")
    a.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"collective timeout in seconds (default ${TIMEOUT_ENV} or {DEFAULT_TIMEOUT_S:.0f})",
    )
    for q in (p, a):
        q.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return p


def add_task_from_args(args: argparse.Namespace) -> int:
    """Run ``add-task`` from parsed ``condu-merge add-task`` arguments (the CLI routes here when
    ``WORLD_SIZE > 1``). Rank 0 prints the result; every rank returns 0 on success."""
    t0 = time.perf_counter()
    quiet, as_json = getattr(args, "quiet", False), getattr(args, "json", False)
    out = distributed_add_task_from_checkpoints(
        args.store,
        args.name,
        args.base,
        args.finetuned,
        include=args.include,
        exclude=args.exclude,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        rescaler=args.rescaler,
        backend=args.backend,
        progress=not quiet and not as_json and sys.stderr.isatty(),
        check_base=not args.no_check_base,
        timeout_s=getattr(args, "timeout", None),
    )
    out["seconds"] = time.perf_counter() - t0
    if out["rank"] == 0:
        try:
            if as_json:
                print(json.dumps(out, indent=1, default=str))
            elif not quiet:
                r = out["rescaler"]
                lam = f"{r:.4f}" if isinstance(r, float) else f"per tensor ({len(r)})"
                print(
                    f"added {args.name!r} to {out['store']} ({len(out['tasks'])} tasks, {out['params']:,} params, lambda={lam}) "
                    f"in {out['seconds']:.2f} s on {out['world_size']} rank{'s' if out['world_size'] > 1 else ''}"
                )
            sys.stdout.flush()
        except BrokenPipeError:  # the task is committed; a reader that went away is no failure
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
    return 0


def distributed_add_task_main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m condu_merge.distributed``; errors print one line per failing rank
    (rank 0 always reports) and exit 1."""
    args = build_parser().parse_args(argv)
    try:
        return add_task_from_args(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not getattr(exc, "_condu_remote", False):
            msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            print(f"condu-merge: error: [rank {rank}] {msg}", file=sys.stderr)
        return 1


main = distributed_add_task_main

if __name__ == "__main__":
    sys.exit(distributed_add_task_main())
