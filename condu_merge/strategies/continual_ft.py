"""Continual fine-tuning (no merging): the lower baseline.

Math: task ``t`` starts from θ_{t−1} (θ_0 for the first) and its trained weights replace the
model: ``θ = θ_t``. Nothing per task is kept, so earlier tasks are forgotten as much as training
on later ones moves the weights ("Continual FT" in the ConDU and MTIL papers; e.g. Zheng et al.,
"Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language Models",
ICCV 2023).

Stores: one delta ``θ_t − θ_0`` (the current model), shared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from .base import ContinualStrategy, StorageReport, TaskStart, state_nbytes
from .rule import Slot, TensorRule, register_rule


class ContinualFT(ContinualStrategy):
    """Sequential fine-tuning; the model after the last task is used for every task."""

    name = "continual_ft"

    def __init__(self, base, *, copy_base: bool = True):
        super().__init__(base, copy_base=copy_base)
        self._delta: dict[str, torch.Tensor] | None = None

    def _start(self, name: str) -> TaskStart:
        if self._delta is None:
            return TaskStart({k: v.clone() for k, v in self._base.items()}, "base")
        return TaskStart(self._absolute(self._delta), "previous")

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        self._delta = delta

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        assert self._delta is not None
        return self._delta

    def _options(self) -> dict:
        return {}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``delta/<key>``: the current model's delta."""
        return {} if self._delta is None else {f"delta/{k}": v for k, v in self._delta.items()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._delta = self._saved_delta(tensors, "delta/") if self._tasks else None

    def _storage(self) -> StorageReport:
        shared = state_nbytes(self._delta) if self._delta is not None else 0
        return StorageReport(shared, dict.fromkeys(self._tasks, 0), "the current model's delta θ_t − θ_0 (one model)")


class ContinualFTRule(TensorRule):
    """On disk: the current model's delta (shared); every task's model is it."""

    method = "continual_ft"
    defaults: ClassVar[dict[str, Any]] = {}

    def slots(self) -> list[Slot]:
        return [Slot("delta")]

    def fold(self, key, delta, old, task, shape):
        return {"delta": delta}

    def merged(self, key, reader, meta, ctx):
        return reader.get("delta", key)


register_rule("continual_ft", ContinualFTRule)
