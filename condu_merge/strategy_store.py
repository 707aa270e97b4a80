"""Any strategy on disk: a crash-safe, streaming store of a :class:`~condu_merge.strategies.rule.TensorRule`.

The ConDU :class:`~condu_merge.store.Store` keeps ``u`` and the 1-bit masks; a
:class:`StrategyStore` keeps what another strategy's rule says it keeps (its slots), in the same
store layout, through the same pipeline (:mod:`condu_merge.pipeline`)::

    STORE/manifest.json                    method, options, slots, tensors, tasks, files
    STORE/gen-000003/sum.safetensors       a shared slot (OPCM's running sum)
    STORE/gen-000003/tau/0000.safetensors  a per-task slot (TIES' task vector of task 0)

Adding a task reads the fine-tuned checkpoint (or a mapping) one tensor at a time, folds it into
the old generation's slots of that tensor (:meth:`TensorRule.fold`) and writes the new
generation; frozen per-task slots (task vectors) of earlier tasks are hard-linked, not
rewritten. The first task fixes the method and its options (recorded in the manifest); a later
task naming another method or other options is refused naming both. ``SIGKILL`` at any step
leaves the old or the new generation, as for ConDU. :meth:`StrategyStore.iter_decouple` gives a
task's model for inference (the expert of a task-aware strategy, else the merged model), tensor
by tensor, which :mod:`condu_merge.export` writes as a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

from . import pipeline
from .checkpoints import Checkpoint, MemoryCheckpoint, PeftAdapter, SafetensorsFile
from .digests import record_digest
from .errors import (
    FormatError,
    OptionMismatchError,
    ShapeMismatchError,
    UnknownTaskError,
)
from .manifest_check import check_strategy_manifest, store_method
from .pipeline import (
    KEEP_OPEN_FILES,
    MANIFEST,
    STORE_FORMAT,
    STRATEGY_STORE_VERSION,
    STRATEGY_STORE_VERSION_SHA256,
    STRATEGY_STORE_VERSIONS,
    NewGeneration,
    StoreDirectory,
    TaskPlan,
    base_after_read,
    check_generation_files,
    check_new_task,
    check_read_hashes,
    check_task_name,
    fold_tensors,
    hash_base_while_reading,
    manifest_specs,
    open_task_delta,
    plan_checkpoint_task,
    plan_mapping_task,
    read_manifest,
    slot_tensor,
    tensor_entries,
    utc_now,
)
from .safetensors_writer import TensorSpec
from .strategies.rule import FoldTask, Slot, SlotReader, TensorRule, get_rule

__all__ = [
    "STRATEGY_STORE_VERSION",
    "STRATEGY_STORE_VERSIONS",
    "STRATEGY_STORE_VERSION_SHA256",
    "StrategyStore",
    "open_any_store",
]

# Manifest versions of a store of a method other than ConDU (defined in :mod:`condu_merge.pipeline`,
# whose commit chooses one): 2 while every record is sha256, 3 once one is BLAKE3; both are read.


def _absolute(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """θ_0 + delta in θ_0's dtype, summed in float32 or wider (as the in-memory strategies)."""
    w = torch.promote_types(torch.promote_types(base.dtype, delta.dtype), torch.float32)
    return (base.to(w) + delta.to(device=base.device, dtype=w)).to(base.dtype)


def _layout(
    rule: TensorRule, specs: Sequence[TensorSpec], n_tasks: int, *, carry_frozen: bool
) -> tuple[dict[str, tuple[list[TensorSpec], dict[str, str]]], list[str]]:
    """``(layout, carried)`` of a generation holding ``n_tasks`` tasks: every slot file's tensor
    specs and header metadata, and (``carry_frozen``) the frozen per-task files of the earlier
    tasks, which are hard-linked from the old generation instead of written."""
    layout: dict[str, tuple[list[TensorSpec], dict[str, str]]] = {}
    carried: list[str] = []
    for slot in rule.slots():
        file_specs = [TensorSpec(s.name, slot.dtype(s.dtype), slot.shape(s.shape)) for s in specs]
        meta = {"format": STORE_FORMAT, "method": rule.method, "content": slot.kind}
        if not slot.per_task:
            layout[slot.file()] = (file_specs, meta)
            continue
        for i in range(n_tasks):
            if carry_frozen and slot.frozen and i < n_tasks - 1:
                carried.append(slot.file(i))
            else:
                layout[slot.file(i)] = (file_specs, {**meta, "task_index": str(i)})
    return layout, carried


class StrategyStore(StoreDirectory):
    """A store directory holding one strategy's state (see the module docstring). Opening reads
    ``manifest.json`` and checks every file's size and header (and with ``verify`` its digest);
    a missing manifest is an empty store that the first add creates."""

    def __enter__(self) -> StrategyStore:
        return self

    # ------------------------------------------------------------------ loading
    def _load_once(self, verify: bool) -> None:
        self._gen_seen = None
        self._close_files()
        m = read_manifest(self.root, "any", STRATEGY_STORE_VERSIONS)
        self.manifest = None
        if m is None:
            return
        check_strategy_manifest(m, self._manifest_path())
        self._gen_seen = m["generation_dir"]
        check_generation_files(self.root, m, verify)
        gen = os.path.join(self.root, m["generation_dir"])
        self.manifest = m
        rule = self.rule  # the recorded method must be one this version knows, with valid options
        specs = manifest_specs(m)
        for slot in rule.slots():
            want = [TensorSpec(s.name, slot.dtype(s.dtype), slot.shape(s.shape)) for s in specs]
            for rel in self._slot_files(slot, len(m["tasks"])):
                f = SafetensorsFile(os.path.join(gen, rel), keep_open=False)
                try:
                    got = [f.spec(k) for k in f.keys()]
                finally:
                    f.close()
                if [(g.name, g.dtype, tuple(g.shape)) for g in got] != [
                    (w.name, w.dtype, tuple(w.shape)) for w in want
                ]:
                    raise FormatError(
                        f"{os.path.join(gen, rel)}: its tensors differ from what the manifest's slot {slot.kind!r} holds"
                    )

    # ------------------------------------------------------------------ accessors
    @property
    def method(self) -> str | None:
        return self.manifest["method"] if self.manifest else None

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.require()["options"])

    @property
    def rule(self) -> TensorRule:
        m = self.require()
        try:
            return get_rule(m["method"], **m["options"])
        except ValueError as exc:
            raise FormatError(f"{os.path.join(self.root, MANIFEST)}: {exc}") from None

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]] if self.manifest else []

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"]) if self.manifest else 0

    @property
    def gen_dir(self) -> str:
        return os.path.join(self.root, self.require()["generation_dir"])

    @property
    def specs(self) -> list[TensorSpec]:
        return manifest_specs(self.require())

    @property
    def keys(self) -> list[str]:
        return [s.name for s in self.specs]

    def task_info(self, task: str) -> dict[str, Any]:
        names = self.task_names
        if task not in names:
            raise UnknownTaskError(f"{self.root}: no task {task!r} in this store; tasks: {names}")
        info: dict[str, Any] = self.require()["tasks"][names.index(task)]
        return info

    @staticmethod
    def _slot_files(slot: Slot, n_tasks: int) -> list[str]:
        return [slot.file(i) for i in range(n_tasks)] if slot.per_task else [slot.file()]

    def _file(self, rel: str) -> SafetensorsFile:
        f = self._files.get(rel)
        if f is None:
            many = len(self.require()["files"]) > KEEP_OPEN_FILES
            m = self.require()
            f = self._files[rel] = SafetensorsFile(
                os.path.join(self.gen_dir, rel),
                keep_open=not many,
                hash_algo=record_digest(m["files"][rel], rel)[0],  # the check after the merge uses this read
            )
        return f

    def reader(self) -> SlotReader:
        """The stored slots, each file opened when first read."""
        specs = self.specs
        by_kind = {s.kind: s for s in self.rule.slots()}
        return SlotReader(
            lambda kind, t: self._file(by_kind[kind].file(t)),
            self.task_names,
            {s.name: tuple(s.shape) for s in specs},
            {s.name: s.dtype for s in specs},
        )

    # ------------------------------------------------------------------ reading a model
    def iter_delta(self, task: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, delta)`` of the model for inference: with ``task``, that task's expert if the
        strategy is task-aware (else the merged model, which every task uses); without, the
        merged model. Global passes the strategy needs (thresholds, norms) run first."""
        rule = self.rule
        t = None if task is None else self.task_names.index(self.task_info(task)["name"])
        reader = self.reader()
        keys = self.keys
        meta = self.require().get("meta") or {}
        ctx = rule.prepare(reader, keys, meta)
        for k in keys:
            if t is not None and rule.task_aware:
                yield k, rule.expert(k, reader, meta, ctx, t)
            else:
                yield k, rule.merged(k, reader, meta, ctx)

    def iter_decouple(
        self,
        task: str | None,
        *,
        base: Checkpoint | Mapping[str, torch.Tensor] | None = None,
        backend: str = "auto",
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """:meth:`iter_delta`, onto ``base`` when given (θ_0 + delta in θ_0's dtype) -- the
        interface :mod:`condu_merge.export` reads a store through. ``backend`` is the rule's."""
        bck = MemoryCheckpoint(base) if isinstance(base, Mapping) else base
        for k, d in self.iter_delta(task):
            if bck is None:
                yield k, d
                continue
            b = bck.get(k)
            if tuple(b.shape) != tuple(d.shape):
                raise ShapeMismatchError(
                    f"{bck.path}: base tensor {k!r} has shape {tuple(b.shape)}, the store has {tuple(d.shape)}"
                )
            yield k, _absolute(b, d)

    def model(
        self, task: str | None = None, *, base: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """:meth:`iter_decouple` into a dict (base entries the store does not cover unchanged)."""
        out = dict(self.iter_decouple(task, base=base))
        if base is not None:
            for k, v in base.items():
                out.setdefault(k, v)
        return out

    # ------------------------------------------------------------------ writing
    def _resolve_rule(self, method: str | None, options: Mapping[str, Any] | None) -> TensorRule:
        """The rule of the store (recorded), or of a new one; a given method or options that
        differ from the recorded ones are refused naming both."""
        if self.manifest is None:
            if method is None or method == "condu":
                raise ValueError("a new strategy store needs its method (one of the registered rules, not condu)")
            return get_rule(method, **dict(options or {}))
        have = self.manifest["method"]
        if method is not None and method != have:
            raise OptionMismatchError(
                f"{self.root}: --method {method} differs from the store's {have} (fixed when the store was created); "
                "drop the option, or start a new store"
            )
        rule = self.rule
        if options:
            given = get_rule(have, **{**self.manifest["options"], **dict(options)}).opts
            if given != rule.opts:
                diff = {k: v for k, v in given.items() if rule.opts.get(k) != v}
                was = {k: rule.opts.get(k) for k in diff}
                raise OptionMismatchError(
                    f"{self.root}: options {diff} differ from the store's {was} (fixed when the store was created); "
                    "drop them, or start a new store"
                )
        return rule

    def add_task(
        self,
        name: str,
        delta: Mapping[str, torch.Tensor],
        *,
        method: str | None = None,
        options: Mapping[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        """Fold task ``name`` with ``delta`` (a mapping; a lazy one is read one key at a time) in,
        as a new generation. The first task fixes ``method`` and ``options``."""
        check_task_name(name)
        with self._writer_lock():
            self._load(False)
            rule = self._resolve_rule(method, options)
            plan = plan_mapping_task(self.manifest, delta, name)
            plan.source = source
            self._stream_add(name, rule, plan, lambda k: delta[k], progress=progress, label=f"task {name!r}")

    def add_task_from_checkpoints(
        self,
        name: str,
        base: str | os.PathLike[str] | Checkpoint,
        finetuned: str | os.PathLike[str] | Checkpoint | PeftAdapter,
        *,
        method: str | None = None,
        options: Mapping[str, Any] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        check_base: bool = True,
        progress: bool = False,
        source_extra: Mapping[str, object] | None = None,
    ) -> None:
        """Fold ``finetuned − base`` in, one tensor at a time (see
        :meth:`condu_merge.store.Store.add_task_from_checkpoints` for the selection, dtype and
        base checks, which are the same)."""
        check_task_name(name)
        td = open_task_delta(base, finetuned)
        try:
            read_hash = isinstance(base, (str, os.PathLike))
            with self._writer_lock(), pipeline.background_hasher(check_base and read_hash) as base_hasher:
                self._load(False)
                creating = self.manifest is None
                rule = self._resolve_rule(method, options)
                plan = plan_checkpoint_task(
                    self.root, self.manifest, td, include, exclude, dtype, check_base, hash_base=False
                )
                plan.source = {**(plan.source or {}), **(source_extra or {})}
                store_dtype = {s.name: s.dtype for s in plan.specs}
                if check_base and read_hash:
                    hash_base_while_reading(self.manifest, td.base, base_hasher)
                self._stream_add(
                    name,
                    rule,
                    plan,
                    lambda k: td.delta(k, store_dtype[k]),
                    progress=progress,
                    label=f"task {name!r} ({getattr(td.finetuned, 'path', '?')})",
                    after_read=(
                        lambda: base_after_read(None if creating else self.manifest, td.base, read_hash=read_hash)
                    )
                    if check_base
                    else None,
                )
        finally:
            td.close()

    def _stream_add(
        self,
        name: str,
        rule: TensorRule,
        plan: TaskPlan,
        delta_of: Callable[[str], torch.Tensor],
        *,
        progress: bool,
        label: str,
        after_read: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        """plan → fold each tensor → commit (the caller holds the lock and has reloaded)."""
        check_new_task(self.root, self.manifest, name)
        m_old = self.manifest
        t = len(m_old["tasks"]) if m_old else 0
        specs = plan.specs
        slots = rule.slots()
        layout, carried = _layout(rule, specs, t + 1, carry_frozen=True)
        with NewGeneration(self.root, m_old["generation_dir"] if m_old else None, layout) as gen:
            writer = gen.writer
            pipeline.crash_point("write:start")
            old_reader = self.reader() if m_old else None
            for rel in carried:  # earlier task vectors: immutable, hard-linked with their recorded hash
                writer.carry(self.gen_dir, rel)
            task = FoldTask(t, name, meta=dict(m_old.get("meta") or {}) if m_old else {})
            fold_tensors(rule, specs, delta_of, old_reader, task, writer.write, label=label, progress=progress)
            if m_old is not None and old_reader is not None:
                by_kind = {sl.kind: sl for sl in slots}
                read = {by_kind[k].file(i): self._files[by_kind[k].file(i)] for k, i in old_reader.opened}
                check_read_hashes(read, m_old)
            ident = after_read() if after_read is not None else plan.base_identity
            files = writer.finish()
            for rel in carried:
                files[rel] = dict(m_old["files"][rel])  # type: ignore[index]  # carried only with m_old
            m = self._manifest_after(m_old, rule, plan, name, task, files, ident)
            self._close_files()
            self.manifest = None
            try:
                gen.commit(m, m_old)
            finally:
                self._load(False)  # the new state, or the old one if the switch did not happen

    def _manifest_after(
        self,
        m_old: dict[str, Any] | None,
        rule: TensorRule,
        plan: TaskPlan,
        name: str,
        task: FoldTask,
        files: dict[str, dict[str, object]],
        ident: dict[str, Any] | None,
    ) -> dict[str, Any]:
        if m_old is None:
            m: dict[str, Any] = {
                "format": STORE_FORMAT,
                "version": STRATEGY_STORE_VERSION_SHA256,  # the commit sets the version its records need
                "method": rule.method,
                "options": rule.opts,
                "continual": rule.continual,
                "task_aware": rule.task_aware,
                "slots": [s.to_json() for s in rule.slots()],
                "created": utc_now(),
                "tensors": tensor_entries(plan.specs),
                "tasks": [],
                "meta": {},
                "base": ident,
                "selection": plan.selection,
            }
        else:
            m = json.loads(json.dumps(m_old))
            if ident is not None and m.get("base") is None:
                m["base"] = ident
        m["tasks"].append({"name": name, "added": utc_now(), "source": plan.source})
        m["meta"] = rule.finish_task(dict(m.get("meta") or {}), task)
        m["files"] = files
        return m

    # ------------------------------------------------------------------ in memory <-> on disk
    @classmethod
    def from_strategy(
        cls, strategy: Any, path: str | os.PathLike[str], *, base_identity: dict[str, Any] | None = None
    ) -> StrategyStore:
        """Write an in-memory strategy (:class:`~condu_merge.strategies.ContinualStrategy`, e.g. a
        PAM trained with its alignment hook) as a new store at ``path`` (a new or empty folder),
        so the CLI can add later tasks to it, export and inspect it. Its state tensors are its
        rule's slots (:meth:`ContinualStrategy.state`); ``base_identity`` (``{path, sha256 or
        blake3, bytes}``, e.g. :func:`~condu_merge.checkpoints.checkpoint_identity`) records the base checkpoint for later ``add-task --base`` checks."""
        rule = get_rule(strategy.name, **strategy.options())
        tensors, meta = strategy.state()
        base = strategy.base
        specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in base.items()]
        names = list(strategy.task_names)
        if not names:
            raise ValueError(f"{strategy.name}: no task folded in yet; a store starts with its first task")
        st = cls(path, verify=False)
        with st._writer_lock():
            st._load(False)
            if st.manifest is not None:
                raise ValueError(f"{st.root}: a store already exists here; write the strategy to a new folder")
            layout, _ = _layout(rule, specs, len(names), carry_frozen=False)
            with NewGeneration(st.root, None, layout) as gen:
                writer = gen.writer
                pipeline.crash_point("write:start")
                for slot in rule.slots():
                    for i in range(len(names)) if slot.per_task else [None]:
                        for x in specs:
                            key = f"{slot.kind}/{x.name}" if i is None else f"{slot.kind}/{i}/{x.name}"
                            if key not in tensors:
                                raise ValueError(
                                    f"{strategy.name}: its state has no {key!r} for the rule's slot {slot.kind!r}"
                                )
                            writer.write(slot.file(i), x.name, slot_tensor(rule, slot, x, tensors.pop(key)))
                    pipeline.crash_point("write:tensor")
                if tensors:
                    raise ValueError(f"{strategy.name}: state tensors {sorted(tensors)[:3]} have no slot in its rule")
                files = writer.finish()
                plan = TaskPlan(specs, base_identity, {"include": [], "exclude": []}, None)
                m = st._manifest_after(None, rule, plan, names[0], FoldTask(0, names[0]), files, base_identity)
                m["tasks"] = [{"name": n, "added": utc_now(), "source": {"kind": "in-memory strategy"}} for n in names]
                m["meta"] = {k: meta[k] for k in rule.meta_keys}
                gen.commit(m, None)
            st._load(False)
        return st

    def to_strategy(self, base: Mapping[str, torch.Tensor]) -> Any:
        """The in-memory strategy holding this store's tasks over ``base`` (θ_0: the tensors the
        store covers, same shapes), e.g. to train the next task with its hook; the inverse of
        :meth:`from_strategy`. Reads the whole state into memory."""
        from .strategies.base import strategy_class

        m = self.require()
        specs = self.specs
        missing = [x.name for x in specs if x.name not in base]
        if missing:
            raise ValueError(f"{self.root}: base lacks the store's tensors {missing[:5]}")
        for x in specs:
            if tuple(base[x.name].shape) != tuple(x.shape):
                raise ShapeMismatchError(
                    f"{self.root}: base tensor {x.name!r} has shape {tuple(base[x.name].shape)}, the store has {x.shape}"
                )
        sub = {x.name: base[x.name] for x in specs}
        reader = self.reader()
        tensors: dict[str, torch.Tensor] = {}
        for slot in self.rule.slots():
            for i in range(len(m["tasks"])) if slot.per_task else [None]:
                for x in specs:
                    name = f"{slot.kind}/{x.name}" if i is None else f"{slot.kind}/{i}/{x.name}"
                    tensors[name] = reader.get(slot.kind, x.name, i).reshape(slot.shape(x.shape))
        cls = strategy_class(m["method"])
        opts = dict(m["options"])
        return cls.from_state(sub, self.task_names, tensors, {**opts, **(m.get("meta") or {})}, **opts)

    # ------------------------------------------------------------------ reporting
    def storage(self) -> dict[str, Any]:
        """Bytes on disk per slot (shared, and per task) against storing every fine-tuned model."""
        m = self.require()
        rule = self.rule
        n = len(m["tasks"])
        per_slot: dict[str, int] = {}
        for slot in rule.slots():
            per_slot[slot.kind] = sum(int(m["files"][rel]["bytes"]) for rel in self._slot_files(slot, n))
        model = sum(math.prod(s.shape) * s.dtype.itemsize for s in self.specs)
        total = sum(per_slot.values()) + os.path.getsize(os.path.join(self.root, MANIFEST))
        return {
            "method": m["method"],
            "tasks": n,
            "slot_bytes": per_slot,
            "store_bytes": total,
            "model_bytes": model,
            "models": total / model if model else 0.0,
            "individual_bytes": n * model,
        }


def open_any_store(path: str | os.PathLike[str], *, verify: bool = True) -> Any:
    """The store at ``path``: a ConDU :class:`~condu_merge.store.Store` (also for a folder with no
    store yet) or a :class:`StrategyStore`, by the method its manifest records."""
    if store_method(os.fspath(path)) not in (None, "condu"):
        return StrategyStore(path, verify=verify)
    from .store import Store

    return Store(path, verify=verify)
