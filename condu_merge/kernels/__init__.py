"""Fused merge kernels: a compiled CPU backend (numba) and a Triton backend (CUDA, or CPU under
``TRITON_INTERPRET=1``), plus :func:`decouple_many`, the batched decouple for ``K`` experts.

The backends register themselves lazily in :mod:`condu_merge.backends` as ``"numba"`` and
``"triton"``; importing this package imports neither numba nor triton.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..backends import MergeBackend, resolve_backend
from ..errors import KeyMismatchError, ShapeMismatchError
from ..packing import stack_rows
from ..trigger import TaskTrigger

__all__ = ["decouple_many", "decouple_many_flat"]


def decouple_many_flat(
    u: torch.Tensor,
    packed: torch.Tensor,
    lams: Sequence[float],
    base: torch.Tensor | None = None,
    *,
    backend: str | MergeBackend = "auto",
) -> torch.Tensor:
    """``[K, N]`` experts of one flat tensor: ``out[r] = λ_r · unpack(packed[r]) ⊙ u`` in ``u``'s
    dtype, or ``base + …`` in ``base``'s dtype. Backends with a fused ``decouple_many_flat`` read
    ``u`` once for all ``K``; others fall back to ``K`` calls of ``decouple_flat``."""
    if packed.dim() != 2 or packed.shape[0] != len(lams):
        raise ValueError(f"packed must be [K, B] with K = len(lams) = {len(lams)}, got {tuple(packed.shape)}")
    be = resolve_backend(backend, u.device)
    fused = getattr(be, "decouple_many_flat", None)
    if fused is not None:
        return fused(u, packed, list(lams), base)
    out_dtype = u.dtype if base is None else base.dtype
    if packed.shape[0] == 0:
        return torch.empty((0, u.numel()), dtype=out_dtype, device=u.device)
    return torch.stack([be.decouple_flat(u, packed[r], float(lams[r]), base) for r in range(packed.shape[0])])


def decouple_many(
    unified: Mapping[str, torch.Tensor],
    triggers: Sequence[TaskTrigger],
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    backend: str | MergeBackend = "auto",
) -> list[dict[str, torch.Tensor]]:
    """``[decouple(unified, T) for T in triggers]`` in one sweep: each tensor of ``u`` (and of
    ``base``) is read once for all ``K`` experts (what task-agnostic inference needs).

    Element-wise identical to :func:`condu_merge.decouple` per trigger. With ``base`` each result is
    the expert ``θ_0 + λ_r · M_r ⊙ u`` in ``base``'s dtypes, ``base`` entries not in ``u`` unchanged.
    """
    K = len(triggers)
    outs: list[dict[str, torch.Tensor]] = [{} for _ in range(K)]
    if K == 0:
        return outs
    for r, tr in enumerate(triggers):
        if set(tr.names) != set(unified.keys()):
            who = f"trigger of task {tr.task!r}" if tr.task is not None else f"trigger #{r}"
            missing = sorted(set(unified.keys()) - set(tr.names))[:8]
            extra = sorted(set(tr.names) - set(unified.keys()))[:8]
            raise KeyMismatchError(f"{who} does not match the unified delta: missing {missing}, extra {extra}")
    for key, u in unified.items():
        shape = tuple(u.shape)
        for r, tr in enumerate(triggers):
            if tuple(tr.shapes[key]) != shape:
                who = f"trigger of task {tr.task!r}" if tr.task is not None else f"trigger #{r}"
                raise ShapeMismatchError(f"{who}: tensor {key!r} has shape {tuple(tr.shapes[key])}, u has {shape}")
        b = None
        if base is not None:
            if key not in base:
                raise KeyMismatchError(f"base state dict lacks tensor {key!r}")
            if tuple(base[key].shape) != shape:
                raise ShapeMismatchError(f"base tensor {key!r} has shape {tuple(base[key].shape)}, u has {shape}")
            # detached, as in condu_merge.decouple: compiled backends cannot read a tensor that requires grad
            b = base[key].detach().to(u.device).reshape(-1)
        packed = stack_rows([tr.packed[key] for tr in triggers], u.device)
        lams = [tr.rescaler_for(key) for tr in triggers]
        rows = decouple_many_flat(u.detach().reshape(-1), packed, lams, b, backend=backend)
        for r in range(K):
            outs[r][key] = rows[r].reshape(shape)
    if base is not None:
        for r in range(K):
            for key, v in base.items():
                if key not in outs[r]:
                    outs[r][key] = v
    return outs
