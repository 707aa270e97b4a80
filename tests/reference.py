"""A deliberately simple float64 reference of the ConDU rules, written straight from the
definitions (stack everything, bool masks, materialise every expert). Tests only."""

from __future__ import annotations

import torch


def ref_unify(deltas, mode="tensor_mean"):
    """Returns (u: dict[f64], masks: list[dict[bool]], lambdas: list[float | dict])."""
    keys = list(deltas[0])
    u, masks = {}, [dict() for _ in deltas]
    for k in keys:
        D = torch.stack([d[k].to(torch.float64) for d in deltas])
        s = torch.where(D.sum(0) > 0, 1.0, -1.0).to(torch.float64)
        M = D * s > 0
        u[k] = s * (M * D.abs()).amax(0) if D.numel() else torch.zeros(D.shape[1:], dtype=torch.float64)
        u[k] = torch.where(M.any(0), u[k], torch.zeros_like(u[k]))
        for i in range(len(deltas)):
            masks[i][k] = M[i]
    lams = []
    for i, d in enumerate(deltas):
        num = {k: d[k].to(torch.float64).abs().sum().item() for k in keys}
        den = {k: (masks[i][k] * u[k]).abs().sum().item() for k in keys}
        lams.append(ref_lambda(num, den, {k: d[k].numel() for k in keys}, mode))
    return u, masks, lams


def ref_lambda(num, den, numel, mode):
    if mode == "per_tensor":
        return {k: (num[k] / den[k] if den[k] > 0 else 0.0) for k in num}
    if mode == "l1":
        top, bot = sum(num.values()), sum(den.values())
    else:
        top = sum(num[k] / numel[k] for k in num if numel[k])
        bot = sum(den[k] / numel[k] for k in num if numel[k])
    return top / bot if bot > 0 else 0.0


def ref_decouple(u, mask, lam):
    return {k: (lam[k] if isinstance(lam, dict) else lam) * mask[k].to(torch.float64) * u[k] for k in u}
