"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
arXiv:2212.04089): a non-continual reference.

Math: every task is fine-tuned from θ_0, ``τ_i = θ_i − θ_0``, and::

    θ = θ_0 + λ · Σ_i τ_i

``λ`` (``scale``) defaults to 0.3, a value commonly used for 8 CLIP tasks; the paper picks it on
held-out data. The sum runs tensor by tensor in float64.

Stores: every task vector τ_i (one full delta per task), so :meth:`expert` gives the individually
fine-tuned model θ_0 + τ_i ("Individual FT") and ``λ`` can be changed after the fact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from .base import ContinualStrategy, StorageReport, state_nbytes
from .rule import Slot, TensorRule, register_rule, validate_like


def task_arithmetic_tensor(taus: list[torch.Tensor], scale: float) -> torch.Tensor:
    """``λ Σ_i τ_i`` for one tensor, accumulated in float64, returned in the tasks' dtype."""
    acc = torch.zeros(taus[0].shape, dtype=torch.float64, device=taus[0].device)
    for t in taus:
        acc += t.to(torch.float64)
    return (acc * scale).to(taus[0].dtype)


class TaskArithmetic(ContinualStrategy):
    """Sum of task vectors times a coefficient."""

    name = "task_arithmetic"
    continual = False

    def __init__(self, base, *, scale: float = 0.3, copy_base: bool = True):
        super().__init__(base, copy_base=copy_base)
        self.scale = float(scale)
        self._taus: dict[str, dict[str, torch.Tensor]] = {}

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        self._taus[name] = delta

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        taus = [self._taus[t] for t in self._tasks]
        return {k: task_arithmetic_tensor([tau[k] for tau in taus], self.scale) for k in self._base}

    def _expert_delta(self, name: str) -> dict[str, torch.Tensor]:
        return self._taus[name]

    def _options(self) -> dict:
        return {"scale": self.scale}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``tau/<task index>/<key>``: every task vector."""
        return {f"tau/{i}/{k}": v for i, t in enumerate(self._tasks) for k, v in self._taus[t].items()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._taus = {t: self._saved_delta(tensors, f"tau/{i}/") for i, t in enumerate(self._tasks)}

    def _storage(self) -> StorageReport:
        return StorageReport(
            0, {t: state_nbytes(self._taus[t]) for t in self._tasks}, "every task vector τ_i (one model per task)"
        )


class TaskArithmeticRule(TensorRule):
    """On disk: every task vector ``τ_i`` (per task, frozen); merged ``λ Σ_i τ_i``; expert ``τ_t``."""

    method = "task_arithmetic"
    continual = False
    defaults: ClassVar[dict[str, Any]] = {"scale": 0.3}

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        validate_like(TaskArithmetic, opts)
        return {"scale": float(opts["scale"])}

    def slots(self) -> list[Slot]:
        return [Slot("tau", per_task=True, frozen=True)]

    def fold(self, key, delta, old, task, shape):
        return {"tau": delta}

    def merged(self, key, reader, meta, ctx):
        return task_arithmetic_tensor([reader.get("tau", key, i) for i in range(reader.tasks)], self.opts["scale"])

    def expert(self, key, reader, meta, ctx, task):
        return reader.get("tau", key, task)


register_rule("task_arithmetic", TaskArithmeticRule)
