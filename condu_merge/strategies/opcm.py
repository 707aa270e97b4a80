"""OPCM, orthogonal projection-based continual merging (Tang, Li, Yang, Tao, Shen, "Merging Models
on the Fly Without Retraining: A Sequential Approach to Scalable Continual Model Merging",
arXiv:2501.09522), restated from fusion_bench ``fusion_bench/method/opcm/opcm.py`` (``OPCMForCLIP``:
``run``, ``merge_linear_weights``, ``merge_other_parameters``) and ``opcm/utils.py``.

Every task is fine-tuned from θ_0 on its own; the task vectors ``τ_t = θ_t − θ_0`` are folded in
one at a time. The code keeps the merged model ``θ_0 + S_t / λ_t`` and ``λ_t``; unrolled, it is an
unnormalised running sum ``S`` and the task-vector norms ``n_t = ‖τ_t‖`` (over every tensor)::

    S_1 = τ_1
    S_t = S_{t−1} + P(S_{t−1}, τ_t)       for each projected (2-D) tensor; S_{t−1} + τ_t otherwise
    merged task vector  τ_m = S_t · n̄_t / ‖S_t‖,     n̄_t = mean(n_1 … n_t)

so the merged vector's norm is the running mean of the task-vector norms. The projection of a
2-D ``τ`` (m × n) against ``S`` with SVD ``S = U Σ Vᵀ`` (singular values ``σ`` descending)::

    r = the first index j with cumsum(σ)_j / Σσ > α           (``split_rank``, 0-based)
    C = Uᵀ τ V;  C_ii ← 0 for every i;  C_ij ← 0 for i, j < r;   P = U C Vᵀ

i.e. τ loses its components in the leading ``r``-dimensional singular subspace of ``S`` (the
top-left block) and along every singular pair ``u_i v_iᵀ`` (the diagonal), as the code does with
``projected_task_tv.diagonal().fill_(0)`` and ``projected_task_tv[:split_rank, :split_rank] = 0``.
We compute it from the thin SVD: ``P = τ − U_r (U_rᵀ τ V_r) V_rᵀ − Σ_{i ≥ r} (u_iᵀ τ v_i) u_i v_iᵀ``,
which equals the code's full-matrix form (the rows/columns beyond ``min(m, n)`` have no diagonal).

Default ``alpha`` = 0.5 (fusion_bench ``config/method/opcm/opcm.yaml``). Which tensors are projected:
the code projects ``nn.Linear`` weights; a state dict has no module types, so by default every 2-D
tensor is (``project_keys`` names them exactly, e.g. to leave an embedding table or a fused
attention ``in_proj_weight`` alone; a fused q/k/v matrix is projected as one matrix, the code's
CLIP has three separate ``nn.Linear``). Deviations, documented: the SVD runs in float64 (the code:
the model dtype); an all-zero ``S`` tensor has no singular subspace, so ``τ`` is added unprojected
(the code's ``0/0`` ratio gives ``r = 0`` and an arbitrary basis); an all-zero ``S`` overall is
returned as is (the code divides by 0). Singular vectors of repeated singular values are not
unique, so on such (non-generic) inputs any two SVD implementations may differ.

Stores: ``S`` (one model, in the deltas' dtype promoted to float32) and one float per task (its
norm): continual, O(1) models.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from .base import ContinualStrategy, StorageReport, state_nbytes
from .rule import Slot, TensorRule, register_rule, validate_like, wide


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """The code's ``(s.cumsum(0) / s.sum() > alpha).float().argmax()``: the first index whose
    cumulative share of the singular values exceeds ``alpha`` (0 if none does)."""
    ratio = s.cumsum(0) / s.sum()
    above = ratio > alpha
    return int(above.to(torch.int64).argmax()) if bool(above.any()) else 0


def opcm_project(merged: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """``P(S, τ)`` of one 2-D tensor (float64): ``τ`` without its components in the leading
    singular subspace of ``S`` (split by ``alpha``) and along each of ``S``'s singular pairs."""
    S = merged.to(torch.float64)
    t = tau.to(torch.float64)
    if not bool(S.any()):
        return t.clone()
    U, s, Vh = torch.linalg.svd(S, full_matrices=False)
    r = split_rank(s, alpha)
    A = U.T @ t  # k × n
    diag = (A * Vh).sum(dim=1)  # u_iᵀ τ v_i
    out = t - U[:, r:] @ (diag[r:, None] * Vh[r:])
    if r:
        block = A[:r] @ Vh[:r].T  # U_rᵀ τ V_r
        out = out - U[:, :r] @ block @ Vh[:r]  # holds the diagonal for i < r too
    return out


class OPCM(ContinualStrategy):
    """Sequential merging by orthogonal projection, the merged norm kept at the mean task-vector norm."""

    name = "opcm"

    def __init__(self, base, *, alpha: float = 0.5, project_keys: list[str] | None = None, copy_base: bool = True):
        super().__init__(base, copy_base=copy_base)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(
                f"alpha (the singular-value share of the projected subspace) must be in [0, 1], got {alpha}"
            )
        if project_keys is not None:
            project_keys = list(project_keys)
            unknown = [k for k in project_keys if k not in self._base]
            if unknown:
                raise ValueError(f"project_keys: {unknown[0]!r} is not a tensor of base ({len(unknown)} unknown)")
            bad = [k for k in project_keys if self._base[k].dim() != 2]
            if bad:
                raise ValueError(
                    f"project_keys: tensor {bad[0]!r} is {self._base[bad[0]].dim()}-D; only 2-D weights are projected"
                )
        self.alpha = float(alpha)
        self.project_keys = project_keys
        self._sum: dict[str, torch.Tensor] | None = None
        self._norms: list[float] = []

    def projected(self, key: str) -> bool:
        """Whether tensor ``key``'s task vectors are projected (else simply added)."""
        return key in self.project_keys if self.project_keys is not None else self._base[key].dim() == 2

    def _dtype(self, key: str) -> torch.dtype:
        return torch.promote_types(self._base[key].dtype, torch.float32)

    @staticmethod
    def _norm(d: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(v.to(torch.float64).square().sum()) for v in d.values()))

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        norm = self._norm(delta)
        if self._sum is None:
            new = {k: v.to(self._dtype(k), copy=True) for k, v in delta.items()}
        else:
            new = {}
            for k, tau in delta.items():
                prev = self._sum[k].to(torch.float64)
                step = opcm_project(prev, tau, self.alpha) if self.projected(k) else tau.to(torch.float64)
                new[k] = (prev + step).to(self._dtype(k))
        self._sum, self._norms = new, self._norms + [norm]

    def rescale_factor(self) -> float:
        """``n̄_t / ‖S_t‖`` (1 when ``S`` is all zero)."""
        assert self._sum is not None
        total = self._norm(self._sum)
        return sum(self._norms) / len(self._norms) / total if total > 0 else 1.0

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        assert self._sum is not None
        c = self.rescale_factor()
        return {k: (v.to(torch.float64) * c).to(self._base[k].dtype) for k, v in self._sum.items()}

    def _options(self) -> dict:
        return {"alpha": self.alpha, "project_keys": self.project_keys}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``sum/<key>``: the unnormalised running sum ``S``."""
        return {} if self._sum is None else {f"sum/{k}": v for k, v in self._sum.items()}

    def _state_meta(self) -> dict:
        """``norms``: each task vector's norm, in task order."""
        return {"norms": list(self._norms)}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        norms = [float(x) for x in meta["norms"]]
        if len(norms) != len(self._tasks):
            raise ValueError(f"{len(norms)} task-vector norms for {len(self._tasks)} tasks")
        self._norms = norms
        if self._tasks:
            self._sum = {k: v.to(self._dtype(k)) for k, v in self._saved_delta(tensors, "sum/").items()}

    def _storage(self) -> StorageReport:
        shared = state_nbytes(self._sum) if self._sum is not None else 0
        return StorageReport(
            shared, dict.fromkeys(self._tasks, 8), "running projected sum S (one model) + each task vector's norm"
        )


class OPCMRule(TensorRule):
    """On disk: the running projected sum ``S`` (shared, float32 or wider) and, in the meta, each
    task vector's norm; merged ``(n̄ / ‖S‖) S``."""

    method = "opcm"
    defaults: ClassVar[dict[str, Any]] = {"alpha": 0.5, "project_keys": None}
    meta_keys: ClassVar[tuple[str, ...]] = ("norms",)

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        validate_like(OPCM, opts, skip=("project_keys",))
        pk = opts["project_keys"]
        return {"alpha": float(opts["alpha"]), "project_keys": list(pk) if pk is not None else None}

    def slots(self) -> list[Slot]:
        return [Slot("sum", wide=True)]

    def _projected(self, key: str, shape: tuple[int, ...]) -> bool:
        pk = self.opts["project_keys"]
        return key in pk if pk is not None else len(shape) == 2

    def fold(self, key, delta, old, task, shape):
        # the task vector's squared norm, summed over tensors in the store's order as OPCM._norm
        task.stats["sq"] = task.stats.get("sq", 0.0) + float(delta.to(torch.float64).square().sum())
        if old is None:
            return {"sum": delta.to(wide(delta.dtype), copy=True)}
        prev = old.get("sum", key).reshape(shape).to(torch.float64)
        tau = delta.reshape(shape)
        step = opcm_project(prev, tau, self.opts["alpha"]) if self._projected(key, shape) else tau.to(torch.float64)
        return {"sum": (prev + step).to(wide(delta.dtype))}

    def finish_task(self, meta, task):
        return {**meta, "norms": [*meta.get("norms", []), math.sqrt(task.stats.get("sq", 0.0))]}

    def prepare(self, reader, keys, meta):
        total = math.sqrt(sum(float(reader.get("sum", k).to(torch.float64).square().sum()) for k in keys))
        norms = meta["norms"]
        return sum(norms) / len(norms) / total if total > 0 else 1.0

    def merged(self, key, reader, meta, ctx):
        s = reader.get("sum", key)
        return (s.to(torch.float64) * ctx).to(reader.dtypes[key])


register_rule("opcm", OPCMRule)
