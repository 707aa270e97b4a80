"""PAM, continual learning by aligned model merging (Sokar, Dziugaite, Arnab, Iscen, Castro,
Schmid, "Continual Learning in Vision-Language Models via Aligned Model Merging",
arXiv:2506.03189; seed 002).

What the paper states (abstract and introduction): instead of only updating the weights
sequentially, the newly trained task parameters are **merged** with the previously learned ones,
and a simple mechanism **promotes learning weights aligned with the previous ones**, so the merge
does not interfere; experiments fine-tune LoRA modules of large VLMs. The method section could
not be read for this implementation (see docs/strategies.md), so the rule below is our reading,
every open detail a parameter:

* **Training start / alignment** (``init="merged"``, default): task ``t`` starts from the current
  merged weights θ_m^{t−1} (θ_0 for the first task). Starting every task from the same merged
  point keeps the new weights in the previous ones' basin and, for LoRA, in the same factor
  coordinates (independently initialised LoRA factors are not comparable entry by entry, so
  averaging them would interfere). ``init="base"`` is the unaligned ablation (every task from θ_0).
* **Optional alignment loss** (``align_weight > 0``; off by default, our extension): a training
  hook adding ``w · (1/N) Σ_k relu(−sign(m_k) · (θ_k − θ_0,k))`` with ``m = θ_m^{t−1} − θ_0``,
  which penalises each entry of the new task vector that points against the merged vector
  (the sign conflicts TIES-style merging suffers from).
* **Merge** of the trained θ_t into the merged weights, with task vectors relative to θ_0::

      m_t = m_{t−1} + c_t (τ_t − m_{t−1}),   τ_t = θ_t − θ_0,   c_1 = 1,
      c_t = 1/t   (merge_coef=None, default: the running mean, every task weighted equally)
      c_t = α     (merge_coef=α: an exponential moving average favouring recent tasks)

  θ = θ_0 + m_t is both the inference model and the next task's start.

What is trained is up to the caller: pass the LoRA factors (A, B) as ``base`` (the paper's
setting; θ_0 is then the factors' initial values) or the full weights. Merging acts entry-wise
on whatever tensors ``base`` holds.

Stores: the merged delta ``m`` (one model-sized delta, shared); nothing per task.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import ContinualStrategy, StorageReport, TaskStart, TrainingHook, state_nbytes

PAM_INITS = ("merged", "base")


def pam_merge_tensor(merged: torch.Tensor, tau: torch.Tensor, coef: float) -> torch.Tensor:
    """``m + c (τ − m)`` computed in float32 or wider, returned in ``m``'s dtype."""
    wide = torch.promote_types(torch.promote_types(merged.dtype, tau.dtype), torch.float32)
    m = merged.to(wide)
    return (m + coef * (tau.to(wide) - m)).to(merged.dtype)


def sign_agreement(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Fraction of entries, among those nonzero in both, where ``a`` and ``b`` have the same sign
    (the alignment quantity: 1 = no sign conflict when merging ``a`` and ``b``)."""
    same = both = 0
    for k in a:
        x, y = a[k].detach(), b[k].detach().to(a[k].device)
        nz = (x != 0) & (y != 0)
        both += int(nz.sum())
        same += int((nz & ((x > 0) == (y > 0))).sum())
    return same / both if both else 1.0


class SignAlignmentHook(TrainingHook):
    """``loss = w · (1/N) Σ_k relu(−sign(m_k) · (θ_k − θ_0,k))`` (0 where ``m_k = 0``).

    Its gradient on an entry whose task vector points against the merged vector is
    ``w/N · sign(m_k)`` descent-wise, pulling that entry back towards the merged sign.
    """

    def __init__(self, base: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor], weight: float):
        self.weight = float(weight)
        self._base = dict(base)
        self._sign = {k: torch.sign(v).to(torch.int8) for k, v in merged.items()}
        self._n = max(1, sum(v.numel() for v in merged.values()))

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [k for k in self._sign if k not in params]
        if missing:
            raise KeyError(f"SignAlignmentHook: params lack tensors {missing[:8]} (keys must match the strategy's base)")
        total = None
        for k, s in self._sign.items():
            p = params[k]
            tau = p - self._base[k].to(device=p.device, dtype=p.dtype)
            term = torch.relu(-s.to(device=p.device, dtype=p.dtype) * tau).sum()
            total = term if total is None else total + term
        assert total is not None
        return total * (self.weight / self._n)


class PAM(ContinualStrategy):
    """Aligned model merging: train from the merged weights, then fold into a running average."""

    name = "pam"

    def __init__(
        self,
        base,
        *,
        init: str = "merged",
        merge_coef: float | None = None,
        align_weight: float = 0.0,
        copy_base: bool = True,
    ):
        super().__init__(base, copy_base=copy_base)
        if init not in PAM_INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {PAM_INITS}")
        if merge_coef is not None and not 0.0 < merge_coef <= 1.0:
            raise ValueError(f"merge_coef must be in (0, 1] or None (running mean), got {merge_coef}")
        if align_weight < 0:
            raise ValueError(f"align_weight must be >= 0, got {align_weight}")
        self.init = init
        self.merge_coef = merge_coef
        self.align_weight = float(align_weight)
        self._merged: dict[str, torch.Tensor] | None = None

    def coefficient(self, t: int) -> float:
        """``c_t`` for the ``t``-th task (1-based)."""
        if t <= 1:
            return 1.0
        return 1.0 / t if self.merge_coef is None else self.merge_coef

    def _start(self, name: str) -> TaskStart:
        hook = None
        if self._merged is not None and self.align_weight > 0:
            hook = SignAlignmentHook(self._base, self._merged, self.align_weight)
        if self._merged is None or self.init == "base":
            return TaskStart({k: v.clone() for k, v in self._base.items()}, "base", hook)
        return TaskStart(self._absolute(self._merged), "merged", hook)

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        c = self.coefficient(len(self._tasks) + 1)
        if self._merged is None:
            self._merged = {k: pam_merge_tensor(torch.zeros_like(v), v, c) for k, v in delta.items()}
        else:
            self._merged = {k: pam_merge_tensor(self._merged[k], delta[k], c) for k in self._base}

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        assert self._merged is not None
        return self._merged

    def _storage(self) -> StorageReport:
        shared = state_nbytes(self._merged) if self._merged is not None else 0
        return StorageReport(shared, {t: 0 for t in self._tasks}, "the merged delta m (one model)")
