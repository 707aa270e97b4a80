"""MagMax (Marczak, Twardowski, Trzciński, Cygert, "MagMax: Leveraging Model Merging for
Seamless Continual Learning", ECCV 2024, arXiv:2407.06322).

Math: training is sequential fine-tuning (task ``t`` starts from θ_{t−1}); the task vector is
``τ_t = θ_t − θ_0``. The merged vector takes, per parameter ``k``, the entry of largest magnitude
across tasks::

    τ_MM[k] = τ_{i*}[k],   i* = argmax_i |τ_i[k]|        (the latest task wins an exact tie)
    θ = θ_0 + λ · τ_MM

computed incrementally (``τ_MM ← where(|τ_t| ≥ |τ_MM|, τ_t, τ_MM)``), so it is continual: O(1)
models whatever the number of tasks.

Defaults as the official code (github.com/danielm1405/magmax): the tie rule ``>=`` of
``src/merging/task_vectors.py::merge_max_abs`` (a later task wins an exact magnitude tie, which
shows on bf16 or quantised deltas; fusion_bench's ``fusion_bench/method/magmax/magmax.py`` does
the same), ``tie="earlier"`` gives this library's earlier ``>`` rule; ``λ`` (``scale``) = 0.5 as
``merge_8datasets.py`` (``(merge_max_abs, [0.5])``) and fusion_bench's
``config/method/magmax/magmax.yaml`` (``scaling_factor: 0.5``); the paper tunes it on held-out data.

Stores: the running ``τ_MM`` and the last task's ``τ_t`` (needed to start the next task): two
model-sized deltas, shared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from .base import ContinualStrategy, StorageReport, TaskStart, state_nbytes
from .rule import Slot, TensorRule, register_rule, validate_like

TIE_RULES = ("later", "earlier")


def max_magnitude_update(merged: torch.Tensor, tau: torch.Tensor, later_wins: bool = True) -> torch.Tensor:
    """One incremental step of max-magnitude selection: ``where(|τ| ≥ |merged|, τ, merged)``
    (``later_wins``, the reference rule) or with ``>`` (the earlier task keeps an exact tie)."""
    take = tau.abs() >= merged.abs() if later_wins else tau.abs() > merged.abs()
    return torch.where(take, tau, merged)


class MagMax(ContinualStrategy):
    """Sequential fine-tuning, then per-parameter maximum-magnitude task-vector merging."""

    name = "magmax"

    def __init__(self, base, *, scale: float = 0.5, tie: str = "later", copy_base: bool = True):
        super().__init__(base, copy_base=copy_base)
        if tie not in TIE_RULES:
            raise ValueError(f"unknown tie rule {tie!r}; choose one of {TIE_RULES}")
        self.scale = float(scale)
        self.tie = tie
        self._merged: dict[str, torch.Tensor] | None = None
        self._last: dict[str, torch.Tensor] | None = None

    def _start(self, name: str) -> TaskStart:
        if self._last is None:
            return TaskStart({k: v.clone() for k, v in self._base.items()}, "base")
        return TaskStart(self._absolute(self._last), "previous")

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        if self._merged is None:
            merged = {k: v.clone() for k, v in delta.items()}
        else:
            later = self.tie == "later"
            merged = {k: max_magnitude_update(self._merged[k], delta[k], later) for k in self._base}
        self._merged, self._last = merged, delta

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        assert self._merged is not None
        if self.scale == 1.0:
            return self._merged
        return {k: v * self.scale for k, v in self._merged.items()}

    def _options(self) -> dict:
        return {"scale": self.scale, "tie": self.tie}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``merged/<key>`` (τ_MM, unscaled) and ``last/<key>`` (the last task vector)."""
        if self._merged is None:
            return {}
        out = {f"merged/{k}": v for k, v in self._merged.items()}
        out.update({f"last/{k}": v for k, v in self._last.items()})  # type: ignore[union-attr]
        return out

    def _state_meta(self) -> dict:
        """The tie rule the running τ_MM was built with."""
        return {"tie": self.tie}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if "tie" not in meta:  # written before ">=" became the default: keep folding with ">"
            self.tie = "earlier"
        if self._tasks:
            self._merged = self._saved_delta(tensors, "merged/")
            self._last = self._saved_delta(tensors, "last/")

    def _storage(self) -> StorageReport:
        shared = 0
        if self._merged is not None:
            shared = state_nbytes(self._merged) + state_nbytes(self._last)  # type: ignore[arg-type]
        return StorageReport(
            shared, dict.fromkeys(self._tasks, 0), "running max-magnitude vector τ_MM + last task vector (two models)"
        )


class MagMaxRule(TensorRule):
    """On disk: the running ``τ_MM`` and the last task vector (shared); merged ``λ τ_MM``."""

    method = "magmax"
    defaults: ClassVar[dict[str, Any]] = {"scale": 0.5, "tie": "later"}

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        validate_like(MagMax, opts)
        return {"scale": float(opts["scale"]), "tie": opts["tie"]}

    def slots(self) -> list[Slot]:
        return [Slot("merged"), Slot("last")]

    def fold(self, key, delta, old, task, shape):
        if old is None:
            return {"merged": delta, "last": delta}
        return {
            "merged": max_magnitude_update(old.get("merged", key), delta, self.opts["tie"] == "later"),
            "last": delta,
        }

    def merged(self, key, reader, meta, ctx):
        m = reader.get("merged", key)
        return m if self.opts["scale"] == 1.0 else m * self.opts["scale"]


register_rule("magmax", MagMaxRule)
