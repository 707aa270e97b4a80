"""A continual session on disk: crash-safe generations, integrity checks, lazy reads.

Layout of a store directory::

    STORE/manifest.json              the current state (replaced atomically)
    STORE/.lock                      writers hold an exclusive flock on it
    STORE/gen-000004/unified.safetensors        u, in the deltas' dtype
    STORE/gen-000004/masks/0000.safetensors     task 0's masks: uint8, 1 bit per element
    STORE/gen-000004/prototypes/0000.safetensors  optional per-task tensors (e.g. prototypes)

``manifest.json`` holds the format version, the rescaler mode, the tensors (name, dtype, shape,
in order), the tasks in order with their rescalers, the base checkpoint's identity, creation
times, the size and digest of every data file (BLAKE3 where the ``blake3`` package is installed,
else sha256; ``$CONDU_MERGE_DIGEST`` chooses; each record names its algorithm), and a checksum of
itself. A manifest holding a BLAKE3 record has format version 2, one of sha256 records only
keeps version 1 (:data:`~condu_merge.pipeline.STORE_VERSIONS`); both are read.

Crash safety: a write (add a task, save a session, save prototypes) builds a complete new
generation directory beside the current one, fsyncs its files and the directory, then
replaces ``manifest.json`` with ``os.replace`` (after fsync) and fsyncs ``STORE``; only then are
older generations deleted. A process killed at any point leaves ``manifest.json`` naming either
the old or the new generation, both complete. Leftovers of a killed writer are removed by the
next writer.

Streaming: :meth:`Store.add_task` reads the current ``u`` and masks one tensor at a time,
computes the continual step (:func:`condu_merge.core.add_task_tensor`, through
:class:`~condu_merge.strategies.condu.ConDURule`) and writes the result into the new generation,
so peak memory is one tensor's work whatever the model size.

The generic machinery (writer lock, generation folders, the atomic commit, planning a task
against the manifest) is :mod:`condu_merge.pipeline`'s, shared with
:class:`~condu_merge.strategy_store.StrategyStore` (every other strategy) and
:mod:`condu_merge.distributed`; this module holds what is ConDU's: the layout of ``u`` and the
masks (:func:`generation_layout`), the manifest's rescalers and mask statistics; one tensor's
continual step is :class:`~condu_merge.strategies.condu.ConDURule`'s fold, run by
:func:`~condu_merge.pipeline.fold_tensors` as every other strategy's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence, Set as AbstractSet
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

from . import pipeline
from .backends import MergeBackend, resolve_backend
from .checkpoints import (
    Checkpoint,
    MemoryCheckpoint,
    PeftAdapter,
    SafetensorsFile,
    TaskDelta,
)
from .core import continual_step_tensor
from .digests import OrderedWorker, check_record, default_algorithm, make_record, record_digest
from .errors import (
    FormatError,
    MergeInputError,
    OptionMismatchError,
    ShapeMismatchError,
    UnknownTaskError,
)
from .manifest_check import (
    UNIFIED,
    check_manifest_structure,
    mask_file,
    proto_file,
)
from .packing import packed_nbytes, stack_rows
from .pipeline import (
    CRASH_ENV,
    DATA_FILE_VERSION,
    KEEP_OPEN_FILES,
    LOCK,
    MANIFEST,
    STORE_FORMAT,
    STORE_VERSION,
    STORE_VERSION_SHA256,
    STORE_VERSIONS,
    GenerationWriter as _FileWriter,
    NewGeneration,
    StoreDirectory,
    StoreLock,
    StoreLockedError,
    VerifyReport,
    base_after_read,
    check_add_args,
    check_generation_files,
    check_new_task,
    check_read_hashes,
    check_task_name,
    commit_manifest,
    committed_generation,
    fold_tensors,
    foreign_entries,
    fsync_dir,
    hash_base_while_reading,
    hash_reads_as_recorded,
    link_or_copy,
    manifest_specs,
    new_generation_dir,
    open_task_delta,
    open_writer_lock,
    plan_checkpoint_task,
    plan_mapping_task,
    popcount_bytes,
    prepare_store_folder,
    read_manifest,
    remove_generation_dir,
    tensor_entries,
    utc_now,
)
from .safetensors_writer import (
    ST_TORCH_NAMES,
    StreamingSafetensorsWriter,
    TensorSpec,
    dtype_itemsize,
)
from .strategies.condu import ConDURule
from .strategies.rule import FoldTask, SlotReader
from .trigger import Rescaler, TaskTrigger

CHUNK_ELEMENTS = int(os.environ.get("CONDU_MERGE_CHUNK_ELEMENTS", 1 << 22))
"""Tensors of more elements than this are merged in pieces of this size (default 4M elements:
16 MiB of float32; ``$CONDU_MERGE_CHUNK_ELEMENTS`` sets another), so a continual step's working
set stays a few pieces whatever the largest tensor (a 7B model's 250 MiB embedding included);
see ``benchmarks/RESULTS.md`` (Scale)."""

__all__ = [
    "CHUNK_ELEMENTS",
    "CRASH_ENV",
    "KEEP_OPEN_FILES",
    "LOCK",
    "MANIFEST",
    "STORE_FORMAT",
    "STORE_VERSION",
    "STORE_VERSIONS",
    "STORE_VERSION_SHA256",
    "GenerationWriter",
    "Store",
    "StoreLock",
    "StoreLockedError",
    "VerifyReport",
    "check_add_args",
    "check_task_name",
    "continual_step_tensor",
    "foreign_entries",
    "fsync_dir",
    "generation_layout",
    "link_or_copy",
    "open_task_delta",
    "open_writer_lock",
    "popcount_bytes",
    "prepare_store_folder",
    "remove_generation_dir",
    "utc_now",
]


# ---------------------------------------------------------------------------- generation writer


def generation_layout(specs: Sequence[TensorSpec], n_tasks: int) -> dict[str, tuple[list[TensorSpec], dict[str, str]]]:
    """``{relative path: (tensor specs in file order, safetensors metadata)}`` of one generation's
    data files: ``u`` in the deltas' dtypes, then one mask file per task (``uint8``,
    ``ceil(N/8)`` bytes per tensor). Every writer of a generation (:class:`GenerationWriter`, the
    distributed step's shared files) lays files out from this, so their bytes are identical."""
    meta = {"format": STORE_FORMAT, "version": DATA_FILE_VERSION}
    mask_specs = [TensorSpec(s.name, "U8", (packed_nbytes(math.prod(s.shape)),)) for s in specs]
    layout = {UNIFIED: (list(specs), {**meta, "content": "unified"})}
    for i in range(n_tasks):
        layout[mask_file(i)] = (mask_specs, {**meta, "content": "masks", "task_index": str(i)})
    return layout


class GenerationWriter:
    """Writes one complete ConDU generation, one tensor at a time.

    ``write(key, u, masks)`` appends tensor ``key``'s unified values and its ``t`` mask rows
    (``uint8 [t, ceil(N/8)]``, the layout of :class:`~condu_merge.backends.FlatMergeResult`)
    in the order of ``specs`` (files as :func:`generation_layout`, written by the pipeline's
    :class:`~condu_merge.pipeline.GenerationWriter`); :meth:`finish` fsyncs and returns
    ``{relative path: {algorithm, "bytes"}}`` (:func:`~condu_merge.digests.default_algorithm`'s).
    """

    def __init__(self, gen_dir: str, specs: Sequence[TensorSpec], n_tasks: int):
        self.dir = gen_dir
        self.specs = list(specs)
        self.n_tasks = n_tasks
        self.mask_bits = [0] * n_tasks
        layout = generation_layout(self.specs, n_tasks)
        self._files = _FileWriter(gen_dir, layout)
        os.makedirs(os.path.join(gen_dir, "masks"), exist_ok=True)

    def write(self, key: str, u: torch.Tensor, masks: torch.Tensor) -> None:
        """Append tensor ``key``: ``u`` (any shape, the declared dtype) and ``masks`` (``[t, B]`` uint8)."""
        if masks.dim() != 2 or masks.shape[0] != self.n_tasks:
            raise ValueError(f"tensor {key!r}: expected {self.n_tasks} mask rows, got {tuple(masks.shape)}")
        masks = masks.cpu()
        self._files.write(UNIFIED, key, u)
        for i in range(self.n_tasks):
            row = masks[i]
            self.mask_bits[i] += popcount_bytes(row)
            self._files.write(mask_file(i), key, row)

    def finish(self) -> dict[str, dict[str, object]]:
        return self._files.finish()

    def abort(self) -> None:
        self._files.abort()


def _write_prototype_file(path: str, tensors: Mapping[str, torch.Tensor], task: str) -> dict[str, object]:
    specs = []
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise MergeInputError(f"prototypes of task {task!r}: {k!r} is a {type(v).__name__}, not a tensor")
        specs.append(TensorSpec(k, v.dtype, tuple(v.shape)))
    algo = default_algorithm()
    w = StreamingSafetensorsWriter(
        path, specs, {"format": STORE_FORMAT, "content": "prototypes", "task": task}, hash_algo=algo
    )
    with w:
        for k, v in tensors.items():
            w.write(k, v)
        digest, size = w.close()
    return make_record(digest, size, algo)


# ---------------------------------------------------------------------------- the store


class Store(StoreDirectory):
    """A store directory. Opening reads ``manifest.json`` and checks every data file's size and
    header (and, with ``verify=True``, its digest); a missing manifest is an empty store that the
    first :meth:`add_task` creates. Reads are lazy: :meth:`decouple` of one task reads only ``u``
    and that task's masks, tensor by tensor.
    """

    def __enter__(self) -> Store:
        return self

    # ------------------------------------------------------------------ loading
    def _load_once(self, verify: bool) -> None:
        self._gen_seen = None
        self._close_files()
        # no manifest: no store yet (a first write killed before its switch leaves only a gen-*
        # leftover, which the next writer removes), an empty store
        m = read_manifest(self.root, None, STORE_VERSIONS)
        self.manifest = None
        if m is None:
            return
        check_manifest_structure(m, self._manifest_path())
        self._gen_seen = m.get("generation_dir")
        check_generation_files(self.root, m, verify)
        gen = os.path.join(self.root, m["generation_dir"])
        self.manifest = m
        files = {UNIFIED: None, **{t["masks"]: None for t in m["tasks"]}}
        keep_open = len(files) <= KEEP_OPEN_FILES
        try:
            for rel in files:
                self._files[rel] = SafetensorsFile(
                    os.path.join(gen, rel),
                    keep_open=keep_open or rel == UNIFIED,
                    hash_algo=record_digest(m["files"][rel], rel)[0],
                )
        except BaseException:
            self._close_files()
            raise
        self._check_headers()

    def _check_headers(self) -> None:
        specs = self.specs
        index = {t["masks"]: i for i, t in enumerate(self.require()["tasks"])}
        for rel, f in self._files.items():
            if f.keys() != [s.name for s in specs]:
                raise FormatError(f"{f.path}: its tensors differ from the manifest's")
            if rel in index and f.metadata.get("task_index", str(index[rel])) != str(index[rel]):
                raise FormatError(
                    f"{f.path}: holds the masks of task #{f.metadata['task_index']}, the manifest puts task #{index[rel]} here"
                )
            for s in specs:
                got = f.spec(s.name)
                want = s if rel == UNIFIED else TensorSpec(s.name, "U8", (packed_nbytes(math.prod(s.shape)),))
                if got.st != want.st or tuple(got.shape) != tuple(want.shape):
                    raise FormatError(
                        f"{f.path}: tensor {s.name!r} is {got.shape} torch.{ST_TORCH_NAMES[got.st]}, "
                        f"the manifest says {want.shape} torch.{ST_TORCH_NAMES[want.st]}"
                    )

    # ------------------------------------------------------------------ accessors

    @property
    def gen_dir(self) -> str:
        return os.path.join(self.root, self.require()["generation_dir"])

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
        return manifest_specs(self.require())

    @property
    def keys(self) -> list[str]:
        return [t["name"] for t in self.require()["tensors"]]

    def _task_index(self, task: str) -> int:
        names = self.task_names
        if task not in names:
            raise UnknownTaskError(f"{self.root}: no task {task!r} in this store; tasks: {names}")
        return names.index(task)

    def task_info(self, task: str) -> dict[str, Any]:
        info: dict[str, Any] = self.require()["tasks"][self._task_index(task)]
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
        return [self._files[t["masks"]].get(key) for t in self.require()["tasks"]]

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
        check_record(path, self.require()["files"][rel])

    def save_prototypes(self, task: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store ``tensors`` (e.g. a task's prototypes) with ``task``, replacing earlier ones, as a new
        generation (crash-safe like every write)."""
        with self._writer_lock():
            self._load(False)
            idx = self._task_index(task)
            new_gen, gen_dir = self.new_generation()
            try:
                os.makedirs(gen_dir)
                pipeline.crash_point("write:start")
                m = json.loads(json.dumps(self.manifest))
                files = self._carry_files(gen_dir, skip={proto_file(idx)})
                rel = proto_file(idx)
                os.makedirs(os.path.join(gen_dir, "prototypes"), exist_ok=True)
                files[rel] = _write_prototype_file(os.path.join(gen_dir, rel), tensors, task)
                pipeline.crash_point("write:tensor")
                fsync_dir(os.path.join(gen_dir, "prototypes"))
                fsync_dir(gen_dir)
                pipeline.crash_point("write:data")
                m["tasks"][idx]["prototypes"] = rel
                m["files"] = files
                self.commit(m, new_gen, gen_dir)
            except BaseException:
                if committed_generation(self.root) != new_gen:
                    remove_generation_dir(gen_dir)
                raise

    # ------------------------------------------------------------------ writing
    def new_generation(self) -> tuple[str, str]:
        """Remove leftovers of killed writers (we hold the lock), then name the next generation."""
        return new_generation_dir(self.root, self.manifest["generation_dir"] if self.manifest else None)

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

    def commit(self, manifest: dict[str, Any], gen_name: str, gen_dir: str) -> None:
        """The atomic switch (:func:`~condu_merge.pipeline.commit_manifest`), then re-read."""
        old = self.manifest
        self._close_files()
        self.manifest = None
        commit_manifest(self.root, manifest, gen_name, old)
        self._load(False)  # what we just wrote; hashes were computed while writing

    def _base_manifest(self, rescaler: str, specs: Sequence[TensorSpec]) -> dict[str, Any]:
        return {
            "format": STORE_FORMAT,
            "version": STORE_VERSION_SHA256,  # the commit sets the version its records need
            "created": utc_now(),
            "rescaler": rescaler,
            "tensors": tensor_entries(specs),
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
        delta_range_of: Callable[[str, int, int], torch.Tensor] | None = None,
        native_td: TaskDelta | None = None,
    ) -> None:
        """The streaming continual step (caller holds the lock and has reloaded). ``after_read``
        runs once every input was read (the base check on the read's own hash); a dict it
        returns is the base identity to record. With ``delta_range_of(key, start, stop)`` a
        tensor of more than :data:`CHUNK_ELEMENTS` elements is merged in pieces of that size, so
        the working set is a few pieces whatever the largest tensor (the bytes written are the
        same; its λ sums add the pieces' sums, which can round the last bit differently). With
        ``native_td`` (a task :func:`~condu_merge.native_fold.unsupported` accepts) the tensors
        are folded by :class:`~condu_merge.native_fold.NativeFold` from its files, without torch."""
        self.check_new_task_name(name)
        m_old = self.manifest
        t_prev = len(m_old["tasks"]) if m_old else 0
        mode = m_old["rescaler"] if m_old else (rescaler or "tensor_mean")
        label = f"task {name!r}"
        rule = ConDURule(rescaler=mode)
        rule.opts["backend"] = backend  # a name or a backend object, used as given (a store does not record it)
        # the old generation's files are hashed (to check them before the commit) by a background
        # thread as they are read, while the fold computes; tensors read are never changed in place
        hasher = OrderedWorker(pipeline.BACKGROUND_BYTES) if m_old and pipeline.BACKGROUND_BYTES > 0 else None
        if m_old:  # each file in the digest its record names, so the check needs no second read
            hash_reads_as_recorded(self._files, m_old, hasher)
        try:
            current = m_old["generation_dir"] if m_old else None
            with NewGeneration(self.root, current, generation_layout(specs, t_prev + 1)) as gen:
                pipeline.crash_point("write:start")
                task = FoldTask(
                    t_prev,
                    name,
                    meta={"names": self.task_names, "rescalers": [self.rescaler_of(t) for t in self.task_names]},
                )
                if native_td is not None:
                    from .native_fold import NativeFold

                    fold = NativeFold(
                        native_td, self._files if m_old else None, rule, label, CHUNK_ELEMENTS, pipeline.crash_point
                    )
                    fold(specs, task, gen.writer, progress)
                else:
                    fold_tensors(
                        rule,
                        specs,
                        delta_of,
                        self.slot_reader() if m_old else None,
                        task,
                        gen.writer.write,
                        label=label,
                        progress=progress,
                        chunk=CHUNK_ELEMENTS if delta_range_of is not None else None,
                        delta_range_of=delta_range_of,
                        write_part=gen.writer.write_part,
                    )
                self._check_read_hashes()
                if after_read is not None:
                    base_identity = after_read() or base_identity
                meta = rule.finish_task({"names": self.task_names}, task)
                m = self.complete_manifest(
                    gen.dir,
                    gen.writer.finish(),
                    name=name,
                    mode=mode,
                    specs=specs,
                    lambdas=meta["rescalers"],
                    mask_bits=meta["mask_bits"],
                    source=source,
                    base_identity=base_identity,
                    selection=selection,
                )
                old = self.manifest
                self._close_files()
                self.manifest = None
                try:
                    gen.commit(m, old)
                finally:
                    self._load(False)  # the new state, or the old one if the switch did not happen
        finally:
            if hasher is not None:
                hasher.close()

    def slot_reader(self) -> SlotReader:
        """The current generation as the ConDU rule's slots (``unified``, ``masks``)."""
        specs = self.specs
        return SlotReader(
            lambda kind, t: self._files[UNIFIED if t is None else mask_file(t)],
            self.task_names,
            {x.name: tuple(x.shape) for x in specs},
            {x.name: x.dtype for x in specs},
            packed=("masks",),
        )

    def check_new_task_name(self, name: str) -> None:
        check_new_task(self.root, self.manifest, name)

    def complete_manifest(
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
        ``{algorithm, "bytes"}`` in layout order) and return its manifest, ready for :meth:`_commit`:
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
        if self.manifest is not None:
            check_read_hashes(self._files, self.manifest)

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
            self.check_rescaler(rescaler)
            specs = plan_mapping_task(self.manifest, delta, name).specs
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
        ``check_base``, a base that differs from the store's (its recorded digest) is refused. Options the
        store records (``rescaler``, ``dtype``, ``include``, ``exclude``) may be repeated on a
        later task; a different value is refused (:class:`OptionMismatchError`, naming both).
        ``source_extra`` is recorded in the task's ``source`` entry (e.g. a recipe's source hash).
        """
        check_add_args(name, rescaler)
        td = open_task_delta(base, finetuned)
        try:
            hashing = check_base and isinstance(
                base, (str, os.PathLike)
            )  # a base we opened: its hash is ours to choose
            with self._writer_lock(), pipeline.background_hasher(hashing) as base_hasher:
                self._load(False)
                creating = self.manifest is None
                self.check_rescaler(rescaler)
                plan = plan_checkpoint_task(
                    self.root, self.manifest, td, include, exclude, dtype, check_base, hash_base=False
                )
                specs, ident, selection = plan.specs, plan.base_identity, plan.selection
                source = {**(plan.source or {}), **(source_extra or {})}
                spec_of = {s.name: s for s in specs}  # the store's dtype of each tensor, asked on use
                if hashing:
                    hash_base_while_reading(self.manifest, td.base, base_hasher)
                from .native_fold import unsupported

                native = unsupported(backend, td, specs, len(self.task_names)) is None
                self._stream_add(
                    name,
                    lambda k: td.delta(k, spec_of[k].dtype),
                    specs,
                    rescaler=rescaler,
                    backend=backend,
                    progress=progress,
                    source=source,
                    base_identity=ident,
                    selection=selection,
                    # a base we opened was read by this merge alone: its running hash is this read's
                    after_read=(
                        lambda: base_after_read(
                            None if creating else self.manifest, td.base, read_hash=isinstance(base, (str, os.PathLike))
                        )
                    )
                    if check_base
                    else None,
                    delta_range_of=lambda k, a0, a1: td.delta_range(k, spec_of[k].dtype, a0, a1),
                    native_td=td if native else None,
                )
        finally:
            td.close()

    # ------------------------------------------------------------------ planning a task (caller holds the lock)
    def check_rescaler(self, rescaler: str | None) -> None:
        """A later task may repeat the store's rescaler mode, not name another."""
        if self.manifest is not None and rescaler is not None and rescaler != self.manifest["rescaler"]:
            raise OptionMismatchError(
                f"{self.root}: --rescaler {rescaler} differs from the store's {self.manifest['rescaler']} (fixed when the store "
                "was created); drop the option, or start a new store"
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
            new_gen, gen_dir = self.new_generation()
            writer = GenerationWriter(gen_dir, specs, len(triggers))
            committed = False
            try:
                pipeline.crash_point("write:start")
                for s in specs:
                    rows = [tr.packed[s.name].reshape(-1) for tr in triggers]
                    masks = (
                        stack_rows(rows)
                        if rows
                        else torch.empty((0, packed_nbytes(math.prod(s.shape))), dtype=torch.uint8)
                    )
                    writer.write(s.name, unified[s.name].detach(), masks)
                    pipeline.crash_point("write:tensor")
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
                            files[rel] = dict(self.require()["files"][rel])
                            entry["prototypes"] = rel
                    m["tasks"].append(entry)
                if os.path.isdir(os.path.join(gen_dir, "prototypes")):
                    fsync_dir(os.path.join(gen_dir, "prototypes"))
                fsync_dir(gen_dir)
                pipeline.crash_point("write:data")
                m["files"] = files
                self.commit(m, new_gen, gen_dir)
                committed = True
            finally:
                if not committed and committed_generation(self.root) != new_gen:
                    writer.abort()

    # ------------------------------------------------------------------ reporting
    def storage(self) -> dict[str, object]:
        """Bytes on disk against storing every fine-tuned model (the paper's Appendix H comparison)."""
        m = self.require()
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

        m = self.require()
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
