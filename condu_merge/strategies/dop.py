"""DOP, dual orthogonal projections for continual merging ("Continual Model Merging without Data:
Dual Projections for Balancing Stability and Plasticity", NeurIPS 2025), restated from fusion_bench
``fusion_bench/method/dop/dop.py`` (``ContinualDOPForCLIP``: ``run``, ``_layer_wise_optimize``,
``_optimize_weight``, ``cal_loss_i``) and ``dop/min_norm_solvers.py`` (``MinNormSolver``,
``gradient_normalizers``), with the defaults of ``config/method/dop/dop.yaml``.

Every task is fine-tuned from θ_0 on its own and folded in one at a time, with no data. Task 1's
vector is the merged vector. For task ``t ≥ 2``, with the merged vector ``τ_m`` so far and the new
``τ_t``, each projected (2-D) tensor solves, by ``num_steps`` Adam steps (``lr``) from the average
``W = (τ_m + τ_t)/2`` (merging in task-vector space is the code's weight space shifted by θ_0)::

    min_W  c_m L_m(W) + c_t L_t(W),
    L_i(W) = ‖diag(s_i) U_iᵀ (W − τ_i)‖²_F + ‖(W − τ_i) V_i diag(s_i)‖²_F            (``"uv"``)

where ``U_i, s_i, V_i`` are the leading ``r_i`` singular triplets of ``τ_i``, ``r_i`` the number of
cumulative singular-value shares ``cumsum(s)/Σs`` below ``svd_epsilon`` (the code's
``searchsorted``). ``L_i`` keeps W close to τ_i in τ_i's own row and column spaces, weighted by
its singular values: the merged model's input/output behaviour on each task's directions
(stability for ``i = m``, plasticity for ``i = t``). ``svd_proj_space="u"`` / ``"v"`` keep one term.
The fusion_bench documentation writes ``S^{1/2}``; the code (followed here) uses ``diag(s)``.

The weights ``(c_m, c_t)``: with ``mgda`` (default), at every step the two gradients are each
divided by their loss (``normalization_type="loss"``) and the min-norm point of their convex hull
is found in closed form (``MinNormSolver._min_norm_element_from2``: ``γ = 0.999`` if
``⟨g_m,g_t⟩ ≥ ‖g_m‖²``, ``0.001`` if ``⟨g_m,g_t⟩ ≥ ‖g_t‖²``, else
``(‖g_t‖² − ⟨g_m,g_t⟩) / ‖g_m − g_t‖²``; ``(c_m, c_t) = (γ, 1 − γ)``); with ``ema`` (default) these
are smoothed, ``c ← β c + (1 − β)(γ, 1 − γ)`` from ``c = (alpha, 1 − alpha)``. Without ``mgda``,
``(c_m, c_t) = (alpha, 1 − alpha)`` fixed. Adam (torch's update rule, ``betas=(0.9, 0.999)``, ``eps=1e-8``) steps
on ``c_m ∇L_m + c_t ∇L_t``; the gradients are computed in closed form,
``∇L_i = 2 U_i diag(s_i²) U_iᵀ D + 2 D V_i diag(s_i²) V_iᵀ`` with ``D = W − τ_i``, where the code uses
autograd. Every other tensor (biases, norms, embeddings) becomes ``(τ_m + τ_t)/2``, as the code's
``simple_average`` of the previous merged model and the new one.

Defaults (``config/method/dop/dop.yaml``): ``lr=1e-4``, ``num_steps=200``, ``mgda=True``,
``alpha=0.8``, ``ema=True``, ``ema_beta=0.999``, ``svd_epsilon=0.99999``, ``svd_proj_space="uv"``.
Which tensors are optimised: the code takes ``nn.Linear`` weights; here every 2-D tensor, or
exactly ``project_keys``. Deviations, documented: the optimisation runs in float32 or wider (the
deltas' dtype promoted to float32; float64 deltas run in float64); a zero loss (the code divides
its gradient by it, 0/0) gives a zero normalised gradient; an all-zero ``τ_i`` has no subspace
(``r_i = 0``, ``L_i = 0``). Cost: ``num_steps`` × O(mn(m+n)) per matrix per task — the code runs it
on a GPU; on a CPU keep it to small models.

Stores: the merged vector ``τ_m`` (one model): continual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from .base import ContinualStrategy, StorageReport, state_nbytes
from .rule import Slot, TensorRule, register_rule, validate_like

PROJ_SPACES = ("uv", "u", "v")


def leading_rank(s: torch.Tensor, epsilon: float) -> int:
    """The number of cumulative singular-value shares ``cumsum(s)/Σs`` below ``epsilon`` (``ε > 1``
    acts as 1), as the code's ``searchsorted``; 0 for an all-zero ``s``."""
    total = float(s.sum())
    if total == 0.0:
        return 0
    eps = min(float(epsilon), 1.0)
    return int((s.cumsum(0) / total < eps).sum())


def min_norm_2(g1g1: float, g1g2: float, g2g2: float) -> float:
    """``γ`` minimising ``‖γ g_1 + (1 − γ) g_2‖²`` as ``MinNormSolver._min_norm_element_from2``
    (clipped to 0.999 / 0.001 at the ends)."""
    if g1g2 >= g1g1:
        return 0.999
    if g1g2 >= g2g2:
        return 0.001
    return -1.0 * ((g1g2 - g2g2) / (g1g1 + g2g2 - 2 * g1g2))


class _Projector:
    """``L(W)`` and ``∇L(W)`` of one target ``τ_i`` (closed form)."""

    def __init__(self, tau: torch.Tensor, epsilon: float, space: str):
        U, s, Vh = torch.linalg.svd(tau, full_matrices=False)
        r = leading_rank(s, epsilon)
        self.tau, self.space = tau, space
        self.U, self.s2, self.Vh = U[:, :r], s[:r] ** 2, Vh[:r]

    def loss_grad(self, W: torch.Tensor) -> tuple[float, torch.Tensor]:
        D = W - self.tau
        loss = torch.zeros((), dtype=W.dtype, device=W.device)
        grad = torch.zeros_like(W)
        if self.space in ("uv", "u"):
            A = self.U.T @ D  # r × n
            loss = loss + (self.s2[:, None] * A.square()).sum()
            grad = grad + 2 * self.U @ (self.s2[:, None] * A)
        if self.space in ("uv", "v"):
            B = D @ self.Vh.T  # m × r
            loss = loss + (B.square() * self.s2[None, :]).sum()
            grad = grad + 2 * (B * self.s2[None, :]) @ self.Vh
        return float(loss), grad


class _Adam:
    """torch.optim.Adam's update (defaults: betas (0.9, 0.999), eps 1e-8, no weight decay) on
    one tensor, written out: no optimizer object, no autograd."""

    def __init__(self, w: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = torch.zeros_like(w)
        self.v = torch.zeros_like(w)
        self.t = 0

    def step(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.m.lerp_(g, 1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        c1 = 1 - self.b1**self.t
        c2 = 1 - self.b2**self.t
        denom = (self.v.sqrt() / (c2**0.5)).add_(self.eps)
        return w.addcdiv(self.m, denom, value=-self.lr / c1)


def dop_merge_matrix(
    merged: torch.Tensor,
    tau: torch.Tensor,
    *,
    lr: float = 1e-4,
    num_steps: int = 200,
    mgda: bool = True,
    alpha: float = 0.8,
    ema: bool = True,
    ema_beta: float = 0.999,
    svd_epsilon: float = 0.99999,
    svd_proj_space: str = "uv",
) -> torch.Tensor:
    """DOP's merged 2-D tensor from the merged vector so far (``merged``) and the new ``tau``,
    computed in their (common) dtype; see the module docstring for the objective."""
    targets = [_Projector(merged, svd_epsilon, svd_proj_space), _Projector(tau, svd_epsilon, svd_proj_space)]
    W = (merged + tau) / 2
    adam = _Adam(W, lr)
    weights = [alpha, 1.0 - alpha]
    for _ in range(num_steps):
        (l0, g0), (l1, g1) = (p.loss_grad(W) for p in targets)
        if mgda:
            n0 = g0 / l0 if l0 != 0.0 else torch.zeros_like(g0)
            n1 = g1 / l1 if l1 != 0.0 else torch.zeros_like(g1)
            gamma = min_norm_2(float((n0 * n0).sum()), float((n0 * n1).sum()), float((n1 * n1).sum()))
            if ema:
                weights = [
                    ema_beta * weights[0] + (1 - ema_beta) * gamma,
                    ema_beta * weights[1] + (1 - ema_beta) * (1.0 - gamma),
                ]
            else:
                weights = [gamma, 1.0 - gamma]
        W = adam.step(W, weights[0] * g0 + weights[1] * g1)
    return W


class DOP(ContinualStrategy):
    """Continual merging by a dual-projection objective per weight matrix, optimised with Adam."""

    name = "dop"

    def __init__(
        self,
        base,
        *,
        lr: float = 1e-4,
        num_steps: int = 200,
        mgda: bool = True,
        alpha: float = 0.8,
        ema: bool = True,
        ema_beta: float = 0.999,
        svd_epsilon: float = 0.99999,
        svd_proj_space: str = "uv",
        project_keys: list[str] | None = None,
        copy_base: bool = True,
    ):
        super().__init__(base, copy_base=copy_base)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha (the merged model's loss weight) must be in [0, 1], got {alpha}")
        if not 0.0 <= float(svd_epsilon) <= 1.0:
            raise ValueError(f"svd_epsilon (the kept share of singular values) must be in [0, 1], got {svd_epsilon}")
        if svd_proj_space not in PROJ_SPACES:
            raise ValueError(f"unknown svd_proj_space {svd_proj_space!r}; choose one of {PROJ_SPACES}")
        if int(num_steps) != num_steps or num_steps < 0:
            raise ValueError(f"num_steps must be an integer >= 0, got {num_steps}")
        if not float(lr) > 0.0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if project_keys is not None:
            project_keys = list(project_keys)
            unknown = [k for k in project_keys if k not in self._base]
            if unknown:
                raise ValueError(f"project_keys: {unknown[0]!r} is not a tensor of base ({len(unknown)} unknown)")
            bad = [k for k in project_keys if self._base[k].dim() != 2]
            if bad:
                raise ValueError(
                    f"project_keys: tensor {bad[0]!r} is {self._base[bad[0]].dim()}-D; only 2-D weights are optimised"
                )
        self.opt: dict[str, Any] = {
            "lr": float(lr),
            "num_steps": int(num_steps),
            "mgda": bool(mgda),
            "alpha": float(alpha),
            "ema": bool(ema),
            "ema_beta": float(ema_beta),
            "svd_epsilon": float(svd_epsilon),
            "svd_proj_space": svd_proj_space,
        }
        self.project_keys = project_keys
        self._merged: dict[str, torch.Tensor] | None = None

    def projected(self, key: str) -> bool:
        """Whether tensor ``key`` is optimised (else averaged)."""
        return key in self.project_keys if self.project_keys is not None else self._base[key].dim() == 2

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        if self._merged is None:
            self._merged = {k: v.clone() for k, v in delta.items()}
            return
        new = {}
        for k, tau in delta.items():
            wide = torch.promote_types(tau.dtype, torch.float32)
            m, t = self._merged[k].to(wide), tau.to(wide)
            out = dop_merge_matrix(m, t, **self.opt) if self.projected(k) else (m + t) / 2
            new[k] = out.to(tau.dtype)
        self._merged = new

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        assert self._merged is not None
        return self._merged

    def _options(self) -> dict:
        return {**self.opt, "project_keys": self.project_keys}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``merged/<key>``: the merged task vector."""
        return {} if self._merged is None else {f"merged/{k}": v for k, v in self._merged.items()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if self._tasks:
            self._merged = self._saved_delta(tensors, "merged/")

    def _storage(self) -> StorageReport:
        shared = state_nbytes(self._merged) if self._merged is not None else 0
        return StorageReport(shared, dict.fromkeys(self._tasks, 0), "merged task vector (one model)")


class DOPRule(TensorRule):
    """On disk: the merged task vector (shared); each 2-D weight folded by :func:`dop_merge_matrix`,
    every other tensor averaged."""

    method = "dop"
    defaults: ClassVar[dict[str, Any]] = {
        "lr": 1e-4,
        "num_steps": 200,
        "mgda": True,
        "alpha": 0.8,
        "ema": True,
        "ema_beta": 0.999,
        "svd_epsilon": 0.99999,
        "svd_proj_space": "uv",
        "project_keys": None,
    }

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        validate_like(DOP, opts, skip=("project_keys",))
        out = dict(opts)
        out["lr"], out["num_steps"], out["alpha"] = float(opts["lr"]), int(opts["num_steps"]), float(opts["alpha"])
        out["ema_beta"], out["svd_epsilon"] = float(opts["ema_beta"]), float(opts["svd_epsilon"])
        out["mgda"], out["ema"] = bool(opts["mgda"]), bool(opts["ema"])
        if opts["project_keys"] is not None:
            out["project_keys"] = list(opts["project_keys"])
        return out

    def slots(self) -> list[Slot]:
        return [Slot("merged")]

    def _projected(self, key: str, shape: tuple[int, ...]) -> bool:
        pk = self.opts["project_keys"]
        return key in pk if pk is not None else len(shape) == 2

    def fold(self, key, delta, old, task, shape):
        if old is None:
            return {"merged": delta}
        w = torch.promote_types(delta.dtype, torch.float32)
        m, t = old.get("merged", key).reshape(shape).to(w), delta.reshape(shape).to(w)
        opt = {k: v for k, v in self.opts.items() if k != "project_keys"}
        out = dop_merge_matrix(m, t, **opt) if self._projected(key, shape) else (m + t) / 2
        return {"merged": out.to(delta.dtype)}

    def merged(self, key, reader, meta, ctx):
        return reader.get("merged", key)


register_rule("dop", DOPRule)
