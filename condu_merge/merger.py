"""``ContinualMerger``: a continual ConDU session held in memory."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

from .backends import MergeBackend
from .core import RESCALER_MODES, add_task as _add_task, decouple as _decouple
from .errors import DuplicateTaskError, KeyMismatchError, ShapeMismatchError, UnknownTaskError
from .trigger import TaskTrigger


class ContinualMerger:
    """A continual session: the unified delta ``u`` plus one :class:`TaskTrigger` per task.

    Each :meth:`add_task` is one session of the paper (decouple every earlier expert, unify them
    with the new delta), computed without materialising experts. A failed ``add_task`` (bad
    input, NaN, …) leaves the merger exactly as it was.
    """

    def __init__(self, rescaler: str = "tensor_mean", *, backend: str | MergeBackend = "auto"):
        if rescaler not in RESCALER_MODES:
            raise ValueError(f"unknown rescaler {rescaler!r}; choose one of {RESCALER_MODES}")
        self.rescaler = rescaler
        self.backend = backend
        self._unified: dict[str, torch.Tensor] = {}
        self._triggers: list[TaskTrigger] = []
        self._generation = 0
        # add_task reads the session, merges, then commits: two threads interleaving would each
        # commit a session that lacks the other's task
        self._lock = threading.RLock()

    @classmethod
    def from_session(
        cls,
        unified: Mapping[str, torch.Tensor],
        triggers: list[TaskTrigger],
        rescaler: str = "tensor_mean",
        *,
        backend: str | MergeBackend = "auto",
    ) -> ContinualMerger:
        """A merger holding an existing session (``u`` and its triggers, in task order), e.g. one
        read from a file. Checked: named, unique tasks; every trigger covers exactly ``u``'s
        tensors with ``u``'s shapes; no triggers without ``u`` and vice versa."""
        m = cls(rescaler, backend=backend)
        unified = dict(unified)
        triggers = list(triggers)
        if bool(unified) != bool(triggers):
            raise ValueError("a session has both a unified delta and at least one trigger, or neither")
        seen: set[str] = set()
        for i, t in enumerate(triggers):
            if not isinstance(t, TaskTrigger) or t.task is None:
                raise ValueError(f"trigger #{i} must be a TaskTrigger with a task name")
            if t.task in seen:
                raise DuplicateTaskError(f"task {t.task!r} appears twice in the session")
            seen.add(t.task)
            if set(t.names) != set(unified):
                raise KeyMismatchError(f"trigger of task {t.task!r} covers other tensors than the unified delta")
            for k, u in unified.items():
                if tuple(t.shapes[k]) != tuple(u.shape):
                    raise ShapeMismatchError(
                        f"trigger of task {t.task!r}: tensor {k!r} has shape {tuple(t.shapes[k])}, u has {tuple(u.shape)}"
                    )
        m._unified, m._triggers = unified, triggers
        return m

    # ------------------------------------------------------------------ state
    @property
    def task_names(self) -> list[str]:
        """Task names in the order they were added."""
        return [t.task for t in self._triggers]  # type: ignore[misc]

    @property
    def generation(self) -> int:
        """Number of sessions committed by this object (changes whenever every expert may have
        changed: caches of experts key on it)."""
        return self._generation

    @property
    def unified(self) -> dict[str, torch.Tensor]:
        """The unified delta ``u`` (a new dict each call; the tensors are the session's own)."""
        return dict(self._unified)

    @property
    def triggers(self) -> list[TaskTrigger]:
        return list(self._triggers)

    def trigger(self, name: str) -> TaskTrigger:
        return self._triggers[self._index(name)]

    def __len__(self) -> int:
        return len(self._triggers)

    def __contains__(self, name: object) -> bool:
        return name in self.task_names

    def _index(self, name: str) -> int:
        try:
            return self.task_names.index(name)
        except ValueError:
            raise UnknownTaskError(f"no task {name!r} in this session; tasks: {self.task_names}") from None

    # ------------------------------------------------------------------ operations
    def add_task(self, name: str, delta: Mapping[str, torch.Tensor]) -> TaskTrigger:
        """Fold task ``name`` with ``delta`` (``θ_t − θ_0``) into the session; returns its trigger.

        The earlier tasks' masks and rescalers are updated too, as the method prescribes.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("a task name must be a non-empty string")
        with self._lock:
            if name in self.task_names:
                raise DuplicateTaskError(f"task {name!r} is already in this session; task names are unique")
            unified, triggers = _add_task(
                self._unified, self._triggers, delta, rescaler=self.rescaler, backend=self.backend, task_name=name
            )
            # commit only after everything succeeded
            self._unified, self._triggers = unified, triggers
            self._generation += 1
            return triggers[-1]

    def decouple(self, name: str, *, base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Task ``name``'s reconstructed delta ``λ M ⊙ u``; with ``base``, its full expert ``θ_0 + δ̃``."""
        with self._lock:  # one consistent (u, triggers) pair, even while another thread adds a task
            unified, trigger = self._unified, self._triggers[self._index(name)]
        return _decouple(unified, trigger, base=base, backend=self.backend)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the session to a store directory (see :class:`condu_merge.store.Store`), crash-safely:
        the directory then holds either its previous content or this session, never a mix."""
        from .store import Store

        with Store(path, verify=False) as st:
            st.write_session(self._unified, self._triggers, self.rescaler)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, verify: bool = True, backend: str | MergeBackend = "auto"
    ) -> ContinualMerger:
        """Read a store directory into memory; ``verify`` checks every file's recorded digest first.
        For lazy access to a large store use :class:`condu_merge.store.Store` directly."""
        from .store import Store

        with Store(path, verify=verify) as st:
            return cls.from_store(st, backend=backend)

    @classmethod
    def from_store(cls, store: Any, *, backend: str | MergeBackend = "auto") -> ContinualMerger:
        """An in-memory session holding an open :class:`~condu_merge.store.Store`'s ``u`` and
        triggers (eager: the whole session is read)."""
        if not store.exists:
            raise FileNotFoundError(f"{store.root}: no condu-merge store here (no manifest.json); add a task first")
        return cls.from_session(
            {s.name: store.unified_tensor(s.name) for s in store.specs},
            [store.trigger(t) for t in store.task_names],
            store.rescaler,
            backend=backend,
        )

    def __getstate__(self) -> dict[str, Any]:
        # a lock cannot be copied or pickled; copies get their own
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self._unified.values())
        return f"ContinualMerger(tasks={self.task_names}, tensors={len(self._unified)}, params={n}, rescaler={self.rescaler!r})"
