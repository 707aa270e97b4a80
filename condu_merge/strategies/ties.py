"""TIES-Merging (Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When
Merging Models", NeurIPS 2023, arXiv:2306.01708): a non-continual reference.

Math, with task vectors ``τ_i = θ_i − θ_0`` (every task fine-tuned from θ_0):

1. **Trim**: keep the top ``k`` fraction (``density``) of each ``τ_i`` by magnitude, zero the
   rest: ``τ̂_i = τ_i ⊙ [|τ_i| ≥ q_i]`` where ``q_i`` is the ``⌈kN⌉``-th largest ``|τ_i|``
   (entries tied with the threshold are kept; ``k = 1`` keeps everything; a nonempty tensor
   keeps at least one entry). The released code's ``kthvalue`` rule keeps ``⌊kN⌋ + 1``
   entries; the difference is one entry per trimmed vector. ``trim_scope="global"`` (default,
   as the paper) takes ``N`` over the whole task vector; ``"tensor"`` thresholds each tensor on
   its own.
2. **Elect**: ``γ[k] = sign(Σ_i τ̂_i[k])`` (sign of the summed mass; an exact zero elects +1).
3. **Disjoint merge**: ``τ_m[k] = Σ_{i∈A_k} τ̂_i[k] / |A_k|`` over
   ``A_k = {i : sign(τ̂_i[k]) = γ[k], τ̂_i[k] ≠ 0}`` (0 where ``A_k`` is empty).

``θ = θ_0 + λ τ_m`` with ``λ`` (``scale``) = 1 and ``k`` = 0.2 by default (the paper's defaults
when no validation set is used). The merge runs tensor by tensor; the global threshold of a task
is computed once when the task is folded in (one task vector's magnitudes at a time).

Stores: every task vector τ_i (one full delta per task) plus one float threshold per task.
"""

from __future__ import annotations

import math

import torch

from .base import ContinualStrategy, StorageReport, state_nbytes

TRIM_SCOPES = ("global", "tensor")


def trim_threshold(abs_values: torch.Tensor, density: float) -> float:
    """The magnitude ``q`` such that ``|τ| ≥ q`` keeps the top ``density`` fraction: the
    ``⌈density·N⌉``-th largest of ``abs_values`` (``+inf`` for an empty tensor)."""
    n = abs_values.numel()
    if n == 0:
        return float("inf")
    keep = min(n, max(1, math.ceil(density * n - 1e-9)))
    flat = abs_values.reshape(-1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    return float(flat.kthvalue(n - keep + 1).values)


def ties_tensor(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """Elect + disjoint mean of one tensor's already-trimmed task vectors, in float64."""
    acc = torch.zeros(trimmed[0].shape, dtype=torch.float64, device=trimmed[0].device)
    for t in trimmed:
        acc += t.to(torch.float64)
    elected = torch.where(acc >= 0, 1.0, -1.0).to(torch.float64)
    total = torch.zeros_like(acc)
    count = torch.zeros_like(acc)
    for t in trimmed:
        t64 = t.to(torch.float64)
        agree = (t64 * elected) > 0
        total += torch.where(agree, t64, 0.0)
        count += agree
    return total / count.clamp(min=1.0)


class TIES(ContinualStrategy):
    """Trim, elect sign, disjoint mean."""

    name = "ties"
    continual = False

    def __init__(
        self,
        base,
        *,
        density: float = 0.2,
        scale: float = 1.0,
        trim_scope: str = "global",
        copy_base: bool = True,
    ):
        super().__init__(base, copy_base=copy_base)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density (the kept fraction k) must be in (0, 1], got {density}")
        if trim_scope not in TRIM_SCOPES:
            raise ValueError(f"unknown trim_scope {trim_scope!r}; choose one of {TRIM_SCOPES}")
        self.density = float(density)
        self.scale = float(scale)
        self.trim_scope = trim_scope
        self._taus: dict[str, dict[str, torch.Tensor]] = {}
        self._thresholds: dict[str, float | dict[str, float]] = {}

    def _thresholds_for(self, delta: dict[str, torch.Tensor]) -> float | dict[str, float]:
        if self.trim_scope == "tensor":
            return {k: trim_threshold(v.abs(), self.density) for k, v in delta.items()}
        # one task's magnitudes at a time, never all tasks of the model
        wide = torch.float32
        for v in delta.values():
            wide = torch.promote_types(wide, v.dtype)
        flat = torch.cat([v.detach().reshape(-1).abs().to(wide) for v in delta.values()])
        return trim_threshold(flat, self.density)

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        q = self._thresholds_for(delta)
        self._taus[name] = delta
        self._thresholds[name] = q

    def _trimmed(self, name: str, key: str) -> torch.Tensor:
        tau = self._taus[name][key]
        q = self._thresholds[name]
        thr = q[key] if isinstance(q, dict) else q
        return torch.where(tau.abs().to(torch.float64) >= thr, tau, torch.zeros_like(tau))

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, b in self._base.items():
            m = ties_tensor([self._trimmed(t, k) for t in self._tasks])
            out[k] = (m * self.scale).to(self._taus[self._tasks[0]][k].dtype)
        return out

    def _expert_delta(self, name: str) -> dict[str, torch.Tensor]:
        return self._taus[name]

    def _options(self) -> dict:
        return {"density": self.density, "scale": self.scale, "trim_scope": self.trim_scope}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``tau/<task index>/<key>``: every task vector."""
        return {f"tau/{i}/{k}": v for i, t in enumerate(self._tasks) for k, v in self._taus[t].items()}

    def _state_meta(self) -> dict:
        """Each task's trim threshold (a float, or ``{key: float}`` with ``trim_scope="tensor"``)
        and the ``density``/``trim_scope`` it was computed with."""
        return {
            "density": self.density,
            "trim_scope": self.trim_scope,
            "thresholds": [self._thresholds[t] for t in self._tasks],
        }

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._taus = {t: self._saved_delta(tensors, f"tau/{i}/") for i, t in enumerate(self._tasks)}
        thresholds = meta["thresholds"]
        if len(thresholds) != len(self._tasks):
            raise ValueError(f"{len(thresholds)} thresholds for {len(self._tasks)} tasks")
        if meta["density"] == self.density and meta["trim_scope"] == self.trim_scope:
            self._thresholds = {
                t: ({k: float(q[k]) for k in self._base} if isinstance(q, dict) else float(q))
                for t, q in zip(self._tasks, thresholds)
            }
        else:  # loaded with another density/trim_scope: trim as if the tasks had been folded with it
            self._thresholds = {t: self._thresholds_for(self._taus[t]) for t in self._tasks}

    def _storage(self) -> StorageReport:
        per = {}
        for t in self._tasks:
            q = self._thresholds[t]
            per[t] = state_nbytes(self._taus[t]) + 8 * (len(q) if isinstance(q, dict) else 1)
        return StorageReport(0, per, "every task vector τ_i (one model per task) + its trim threshold")
