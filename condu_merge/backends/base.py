"""The interface every merge backend implements, on flat (1-D) tensors of one state-dict entry.

A backend sees one tensor at a time, flattened: the core handles names, validation and
rescalers; the backend does the element-wise work and returns per-task partial sums, so a
backend can be a chunked torch loop, a compiled CPU loop or a GPU kernel.

Numeric contract (all backends must agree bit for bit on masks and ``u``):

* ``opmath`` is float64 for float64 tensors and float32 otherwise.
* A rescaled element is ``round_to_dtype(opmath(u) * opmath(λ))`` -- what ``u * λ`` gives in torch.
* ``unify``: the elected sign is ``+1`` iff the float64 sum of the task deltas, accumulated in
  task order, is ``> 0``.
* ``add_task``: ``Λ_k = Σ_{i: M_ik} opmath(λ_i)`` accumulated in float64 in task order; the sign is
  ``+1`` iff ``float64(u_k) * Λ_k > -float64(d_k)`` (a comparison, so no fused multiply-add can change it).
* ``u`` holds ``+0.0`` (never ``-0.0``) where no mask bit is set.
* ``num[i]`` is the float64 L1 norm of task ``i``'s input delta; ``den[i]`` is the float64 L1 norm of
  ``M_i ⊙ u``. In ``add_task`` the L1 of an earlier (reconstructed) expert is ``λ_i · Σ M_ik |u_k|``
  in float64 -- exact, where materialising the expert would round every element.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch


@dataclass
class FlatMergeResult:
    """Output of one tensor's merge: ``u`` (1-D, input dtype), ``masks`` (``uint8 [n, ceil(N/8)]``),
    and float64 ``num``/``den`` of shape ``[n]`` (rescaler numerators and denominators)."""

    u: torch.Tensor
    masks: torch.Tensor
    num: torch.Tensor
    den: torch.Tensor


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype element-wise arithmetic runs in for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def opmath_scalar(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to the opmath type of ``dtype`` (returned as a Python float)."""
    if opmath_dtype(dtype) == torch.float64:
        return float(value)
    return float(torch.tensor(value, dtype=torch.float32).item())


def lambdas_f32(lambdas: Sequence[float]) -> np.ndarray:
    """The rescalers rounded to float32, the opmath of float32, float16 and bfloat16 tensors, held
    in float64: what :func:`opmath_scalar` gives each (numpy's float64 -> float32 cast rounds to
    nearest even, as torch's does), without torch."""
    lam64 = np.array([float(v) for v in lambdas], dtype=np.float64).reshape(len(lambdas))
    with np.errstate(over="ignore"):  # beyond float32's range rounds to inf, as in torch
        return lam64.astype(np.float32).astype(np.float64)


@runtime_checkable
class MergeBackend(Protocol):
    """One implementation of the three element-wise operations."""

    name: str

    def available(self) -> bool:
        """Whether the backend can run here at all (its dependencies import)."""

    def supports(self, device: torch.device) -> bool:
        """Whether it runs on tensors of ``device``."""

    def unify_flat(self, deltas: Sequence[torch.Tensor]) -> FlatMergeResult:
        """Unify ``n`` flat deltas of one tensor (same length, dtype, device)."""

    def add_task_flat(
        self, u: torch.Tensor, masks: torch.Tensor, lambdas: Sequence[float], delta: torch.Tensor
    ) -> FlatMergeResult:
        """One continual step on one tensor: earlier experts are ``λ_i · M_i ⊙ u`` (``masks``
        is ``uint8 [t-1, ceil(N/8)]``, ``lambdas`` the ``t-1`` rescalers for this tensor);
        ``delta`` is the new task's. Returns ``t`` rows of masks and sums."""

    def decouple_flat(
        self, u: torch.Tensor, packed: torch.Tensor, lam: float, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``λ · M ⊙ u`` in ``u``'s dtype, or ``base + λ · M ⊙ u`` in ``base``'s dtype."""
