"""The straightforward ConDU implementation, used as the baseline in the benchmarks.

This is what a direct transcription of the paper does (and what peers do): per tensor, stack all
tasks, keep ``bool`` masks, and for a continual step materialise every earlier expert
``λ_i · M_i ⊙ u`` and unify again. It returns the same things as the library so results can be
compared: ``u`` per tensor, ``bool`` masks per task, and the float64 rescaler sums.
Deliberately not optimised; do not use it for real merges.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def _unify_stack(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``D`` is ``[n, ...]`` (one tensor, all tasks). Returns ``u``, bool masks ``[n, ...]``,
    ``num = Σ|d_i|``, ``den = Σ|M_i ⊙ u|`` (float64, shape ``[n]``)."""
    total = D.to(torch.float64).sum(dim=0)  # float64 election sum
    pos = total > 0
    masks = torch.where(pos, D > 0, D < 0)
    best = (D.abs() * masks).amax(dim=0)
    u = torch.where(pos, best, 0 - best)
    n = D.shape[0]
    num = D.abs().to(torch.float64).reshape(n, -1).sum(dim=1)
    den = (masks * u.abs()).to(torch.float64).reshape(n, -1).sum(dim=1)
    return u, masks, num, den


def baseline_unify(
    deltas: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[dict[str, float]], list[dict[str, float]]]:
    """Unify ``n`` task deltas the straightforward way.

    Returns ``(unified, masks, num, den)``: ``unified[key]`` is ``u``; ``masks[i][key]`` a bool
    tensor; ``num[i][key] = Σ|d_i|`` and ``den[i][key] = Σ|M_i ⊙ u|`` as float64 Python floats
    (feed them to :func:`condu_merge.core.compute_rescalers` for the rescalers).
    """
    n = len(deltas)
    unified: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    num: list[dict[str, float]] = [{} for _ in range(n)]
    den: list[dict[str, float]] = [{} for _ in range(n)]
    for key in deltas[0]:
        D = torch.stack([d[key] for d in deltas])  # all tasks of this tensor at once
        u, m, nu, de = _unify_stack(D)
        unified[key] = u
        nu, de = nu.tolist(), de.tolist()
        for i in range(n):
            masks[i][key] = m[i]
            num[i][key] = nu[i]
            den[i][key] = de[i]
    return unified, masks, num, den


def baseline_add_task(
    unified: Mapping[str, torch.Tensor],
    bool_masks: Sequence[Mapping[str, torch.Tensor]],
    lambdas: Sequence[float | Mapping[str, float]],
    delta: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[dict[str, float]], list[dict[str, float]]]:
    """One continual step the straightforward way: materialise every earlier expert
    ``λ_i · M_i ⊙ u`` (``lambdas[i]`` a float or a per-tensor dict), then unify them with ``delta``.
    Returns the same ``(unified, masks, num, den)`` as :func:`baseline_unify` for ``t`` tasks."""
    t = len(bool_masks) + 1
    new_u: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in range(t)]
    num: list[dict[str, float]] = [{} for _ in range(t)]
    den: list[dict[str, float]] = [{} for _ in range(t)]
    for key, u in unified.items():
        experts = []
        for m, lam in zip(bool_masks, lambdas):
            lam_k = lam[key] if isinstance(lam, Mapping) else lam
            experts.append(torch.where(m[key], u * lam_k, 0))  # the materialised expert
        D = torch.stack(experts + [delta[key]])
        uk, m, nu, de = _unify_stack(D)
        new_u[key] = uk
        nu, de = nu.tolist(), de.tolist()
        for i in range(t):
            masks[i][key] = m[i]
            num[i][key] = nu[i]
            den[i][key] = de[i]
    return new_u, masks, num, den
