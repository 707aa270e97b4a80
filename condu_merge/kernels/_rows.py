"""``decouple_flat`` / ``decouple_many_flat`` for a backend whose kernel rebuilds ``K`` rows at once
and may decline a dtype mix (shared by the numba and native backends)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..backends.base import MergeBackend


class RowsDecoupler:
    """Mixin: subclasses give ``_decouple_rows`` (``[K, N]`` experts, or ``None`` where the kernel
    does not take the dtypes) and ``_decouple_fallback`` (the backend that takes them)."""

    def _decouple_rows(
        self, u: torch.Tensor, packed: torch.Tensor, lams: Sequence[float], base: torch.Tensor | None
    ) -> torch.Tensor | None:
        raise NotImplementedError

    def _decouple_fallback(self) -> MergeBackend:
        from ..backends.torch_backend import TorchBackend

        return TorchBackend()

    def decouple_flat(
        self, u: torch.Tensor, packed: torch.Tensor, lam: float, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self._decouple_rows(u, packed.reshape(1, -1), [lam], base)
        if out is None:
            return self._decouple_fallback().decouple_flat(u, packed, lam, base)
        return out[0]

    def decouple_many_flat(
        self, u: torch.Tensor, packed: torch.Tensor, lams: Sequence[float], base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``K`` experts at once: ``out[r] = λ_r · M_r ⊙ u`` (``packed`` ``uint8 [K, B]``), or
        ``base + …`` in ``base``'s dtype; ``u`` is read once per chunk for all ``K``."""
        out = self._decouple_rows(u, packed, lams, base)
        if out is not None:
            return out
        fb = self._decouple_fallback()
        many = getattr(fb, "decouple_many_flat", None)
        if many is not None:
            return many(u, packed, lams, base)
        return torch.stack([fb.decouple_flat(u, packed[r], lams[r], base) for r in range(packed.shape[0])])
