"""EMR-style one-shot unify (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model
Merging", NeurIPS 2024, arXiv:2405.17461), through the core's :func:`condu_merge.unify`: a
non-continual reference.

Math, with deltas ``d_i = θ_i − θ_0`` (every task fine-tuned from θ_0), per element ``k``:
``s_k = sign(Σ_i d_ik)``, ``M_ik = [d_ik s_k > 0]``, ``u_k = s_k max_i M_ik |d_ik|``,
``λ_i`` = the rescaler (see :data:`condu_merge.RESCALER_MODES`); task ``i``'s expert is
``θ_0 + λ_i M_i ⊙ u``. Unlike ConDU, all stored deltas are unified at once (after the last task,
or whenever the model is asked for), never re-unifying decoupled experts.

Stores: every task delta d_i (one full delta per task); the unified ``u`` and the triggers are a
cache rebuilt from them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..backends import resolve_backend
from ..core import RESCALER_MODES, compute_rescalers, decouple, unify, unify_tensor
from ..trigger import TaskTrigger
from .base import ContinualStrategy, StorageReport, backend_option, state_nbytes
from .rule import Slot, TensorRule, register_rule, validate_like


class EMR(ContinualStrategy):
    """One-shot unify over all stored deltas; task-aware inference with the task's trigger."""

    name = "emr"
    task_aware = True
    continual = False

    def __init__(self, base, *, rescaler: str = "tensor_mean", backend="auto", copy_base: bool = True):
        super().__init__(base, copy_base=copy_base)
        if rescaler not in RESCALER_MODES:
            raise ValueError(f"unknown rescaler {rescaler!r}; choose one of {RESCALER_MODES}")
        self.rescaler = rescaler
        self.backend = backend
        self._deltas: dict[str, dict[str, torch.Tensor]] = {}
        self._cache: tuple[dict[str, torch.Tensor], dict[str, TaskTrigger]] | None = None

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        self._deltas[name] = delta
        self._cache = None

    def _unified(self) -> tuple[dict[str, torch.Tensor], dict[str, TaskTrigger]]:
        if self._cache is None:
            names = list(self._tasks)
            u, triggers = unify(
                [self._deltas[t] for t in names], rescaler=self.rescaler, backend=self.backend, task_names=names
            )
            self._cache = (u, dict(zip(names, triggers)))
        return self._cache

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        return self._unified()[0]

    def _expert_delta(self, name: str) -> dict[str, torch.Tensor]:
        u, triggers = self._unified()
        return decouple(u, triggers[name], backend=self.backend)

    def trigger(self, name: str) -> TaskTrigger:
        """Task ``name``'s trigger from the current one-shot unify."""
        self._require(name)
        return self._unified()[1][name]

    def _options(self) -> dict:
        return {"rescaler": self.rescaler, "backend": backend_option(self.backend)}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``delta/<task index>/<key>``: every task delta (the unified cache is rebuilt on demand)."""
        return {f"delta/{i}/{k}": v for i, t in enumerate(self._tasks) for k, v in self._deltas[t].items()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._deltas = {t: self._saved_delta(tensors, f"delta/{i}/") for i, t in enumerate(self._tasks)}
        self._cache = None

    def _storage(self) -> StorageReport:
        return StorageReport(
            0, {t: state_nbytes(self._deltas[t]) for t in self._tasks}, "every task delta d_i (one model per task)"
        )


class EMRRule(TensorRule):
    """On disk: every task delta (per task, frozen). A read unifies them per tensor twice: once
    for the rescalers' sums over the whole model, once for ``u`` and the masks."""

    method = "emr"
    continual = False
    task_aware = True
    defaults: ClassVar[dict[str, Any]] = {"rescaler": "tensor_mean", "backend": "auto"}

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        validate_like(EMR, opts)
        return {"rescaler": opts["rescaler"], "backend": backend_option(opts["backend"])}

    def slots(self) -> list[Slot]:
        return [Slot("delta", per_task=True, frozen=True)]

    def fold(self, key, delta, old, task, shape):
        return {"delta": delta}

    def _unify(self, key, reader):
        names = reader.names
        return unify_tensor(
            [reader.get("delta", key, t) for t in range(reader.tasks)],
            backend=self.opts["backend"],
            key=key,
            labels=names,
        )

    def prepare(self, reader, keys, meta):
        n = reader.tasks
        num: list[dict[str, float]] = [{} for _ in range(n)]
        den: list[dict[str, float]] = [{} for _ in range(n)]
        numel = {}
        for k in keys:
            res = self._unify(k, reader)
            numel[k] = res.u.numel()
            for i, (a, b) in enumerate(zip(res.num.tolist(), res.den.tolist())):
                num[i][k], den[i][k] = a, b
        return compute_rescalers(num, den, numel, self.opts["rescaler"], reader.names)

    def merged(self, key, reader, meta, ctx):
        return self._unify(key, reader).u.reshape(reader.shapes[key])

    def expert(self, key, reader, meta, ctx, task):
        res = self._unify(key, reader)
        lam = ctx[task]
        lam = lam[key] if isinstance(lam, dict) else lam
        be = resolve_backend(self.opts["backend"], res.u.device)
        return be.decouple_flat(res.u.reshape(-1), res.masks[task], lam, None).reshape(reader.shapes[key])


register_rule("emr", EMRRule)
