"""The released ConDU code's merge algorithm, ported faithfully: the baseline of every benchmark.

Source: ``unify_delta_models`` in ``src/delta_models.py`` and the decoupling loop of
``src/main.py`` of https://github.com/zhangzicong518/ConDU (the paper's released code). Per
tensor it stacks all tasks and takes their mean (the election), then makes **one pass per task**
(a ``bool`` mask ``(d * flag) > 0``, ``|mask * d|``, a running ``torch.where`` maximum, the task's
``mean|d|``), and a second pass per task for ``mean|M ⊙ u|``; the rescaler is
``Σ_t mean|d_i[t]| / Σ_t mean|M_i[t] ⊙ u[t]|`` (the library's default ``tensor_mean``). A
continual step materialises every earlier expert ``u * M_i * λ_i`` and unifies again.

What is *not* ported: the model plumbing around it (the released code loads each expert into a
copy of the model and subtracts the pretrained weights again); this port starts from the deltas,
which only makes the baseline faster. The released code builds every earlier expert of the whole
model before unifying; this port builds them one tensor at a time (same arithmetic, less memory).

Differences in results from the library (both are rounding, not algorithm): the election here is
the released float32 ``mean`` (the library's contract is a float64 sum in task order), so a mask
bit can differ where the sum is within rounding of zero; ``u`` is ``-0.0`` where the released
code writes it. Deliberately not optimised beyond the released code; do not use it for merges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def _unify_tensor(params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], list[float], list[float]]:
    """One tensor, as the released loop body: returns ``u``, ``n`` bool masks, ``mean|d_i|`` and
    ``mean|M_i ⊙ u|`` (the latter two as Python floats, the released code's float32 means)."""
    mean = torch.stack(list(params), 0).mean(0)  # the released election: a float32 mean of the stack
    flag = (mean > 0) * 2 - 1
    param_max = torch.zeros_like(params[0])
    masks, scales = [], []
    for param in params:  # one pass per task
        mask = (param * flag) > 0
        masks.append(mask)
        param_abs = torch.abs(mask * param)
        param_max = torch.where(param_abs > param_max, param_abs, param_max)
        scales.append(torch.mean(torch.abs(param)))
    u = param_max * flag
    new_scales = [torch.mean(torch.abs(u * m)) for m in masks]  # the released second pass
    return u, masks, [float(s) for s in scales], [float(s) for s in new_scales]


def _rescalers(scales: Sequence[float], new_scales: Sequence[float]) -> list[float]:
    return [s / ns if ns > 0 else 0.0 for s, ns in zip(scales, new_scales)]


def baseline_unify(
    deltas: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[float]]:
    """Unify ``n`` task deltas as the released code does.

    Returns ``(unified, masks, rescalers)``: ``unified[key]`` is ``u``; ``masks[i][key]`` a bool
    tensor; ``rescalers[i]`` the task's λ (``Σ_t mean|d_i| / Σ_t mean|M_i ⊙ u|``)."""
    n = len(deltas)
    unified: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    scales, new_scales = [0.0] * n, [0.0] * n
    for key in deltas[0]:
        u, m, s, ns = _unify_tensor([d[key] for d in deltas])
        unified[key] = u
        for i in range(n):
            masks[i][key] = m[i]
            scales[i] += s[i]
            new_scales[i] += ns[i]
    return unified, masks, _rescalers(scales, new_scales)


def baseline_add_task(
    unified: Mapping[str, torch.Tensor],
    bool_masks: Sequence[Mapping[str, torch.Tensor]],
    lambdas: Sequence[float | Mapping[str, float]],
    delta: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[float]]:
    """One continual step as the released code does it: materialise every earlier expert
    ``u * M_i * λ_i`` (``lambdas[i]`` a float or a per-tensor dict), then unify them with
    ``delta``. Returns ``(unified, masks, rescalers)`` for the ``t`` tasks."""
    t = len(bool_masks) + 1
    new_u: dict[str, torch.Tensor] = {}
    masks: list[dict[str, torch.Tensor]] = [{} for _ in range(t)]
    scales, new_scales = [0.0] * t, [0.0] * t
    for key, u in unified.items():
        experts = []
        for m, lam in zip(bool_masks, lambdas):
            lam_k = lam[key] if isinstance(lam, Mapping) else lam
            experts.append(u * m[key] * lam_k)  # the materialised expert, as src/main.py builds it
        uk, m, s, ns = _unify_tensor(experts + [delta[key]])
        new_u[key] = uk
        for i in range(t):
            masks[i][key] = m[i]
            scales[i] += s[i]
            new_scales[i] += ns[i]
    return new_u, masks, _rescalers(scales, new_scales)
