"""Reference backend in plain torch: chunked, vectorised over tasks within a chunk.

Runs anywhere torch runs. Every other backend is tested against it. Temporaries are bounded by
the chunk: about ``n_tasks * chunk * 10`` bytes whatever the tensor's size.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..packing import packed_nbytes
from .base import FlatMergeResult, opmath_dtype, opmath_scalar

DEFAULT_CHUNK = 1 << 18  # elements; a multiple of 8 so chunks cut packed masks at byte edges


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def _unpack_rows(packed: torch.Tensor, n_elem: int) -> torch.Tensor:
    """``uint8 [t, B]`` -> ``uint8 [t, n_elem]`` of 0/1 (row-wise little bit order)."""
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :n_elem]


def _pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """``bool/uint8 [t, n]`` -> ``uint8 [t, ceil(n/8)]``."""
    t, n = bits.shape
    bits = bits.to(torch.uint8)
    pad = (-n) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(t, pad)], dim=1)
    return (bits.view(t, -1, 8) << _shifts(bits.device)).sum(dim=2, dtype=torch.uint8)


class TorchBackend:
    """Plain torch, chunk by chunk. The reference and the fallback."""

    name = "torch"

    def __init__(self, chunk: int = DEFAULT_CHUNK):
        if chunk <= 0 or chunk % 8:
            raise ValueError("chunk must be a positive multiple of 8")
        self.chunk = chunk

    def available(self) -> bool:
        return True

    def supports(self, device: torch.device) -> bool:
        return True

    # ------------------------------------------------------------------ unify
    def unify_flat(self, deltas: Sequence[torch.Tensor]) -> FlatMergeResult:
        n = len(deltas)
        first = deltas[0]
        N, dtype, device = first.numel(), first.dtype, first.device
        u = torch.empty(N, dtype=dtype, device=device)
        masks = torch.empty((n, packed_nbytes(N)), dtype=torch.uint8, device=device)
        num = torch.zeros(n, dtype=torch.float64, device=device)
        den = torch.zeros(n, dtype=torch.float64, device=device)
        for s in range(0, N, self.chunk):
            e = min(N, s + self.chunk)
            D = torch.stack([d[s:e] for d in deltas])  # [n, C]: one chunk, never a whole tensor
            total = D[0].to(torch.float64, copy=True)  # D[0] itself when D is float64
            for i in range(1, n):  # task order, float64: the documented election sum
                total += D[i]
            pos = (total > 0).unsqueeze(0)
            agree = torch.where(pos, D > 0, D < 0)
            absD = D.abs()
            num += absD.sum(dim=1, dtype=torch.float64)
            best = torch.where(agree, absD, 0).amax(dim=0)
            u[s:e] = torch.where(pos[0], best, 0 - best)  # 0 - (+0) is +0: no negative zeros
            den += (agree.to(torch.float64) * best.to(torch.float64)).sum(dim=1)
            masks[:, s // 8 : (e + 7) // 8] = _pack_rows(agree)
        return FlatMergeResult(u, masks, num, den)

    # ------------------------------------------------------------------ continual step
    def add_task_flat(
        self, u: torch.Tensor, masks: torch.Tensor, lambdas: Sequence[float], delta: torch.Tensor
    ) -> FlatMergeResult:
        tp = masks.shape[0]
        N, dtype, device = u.numel(), u.dtype, u.device
        op = opmath_dtype(dtype)
        lam_op = [opmath_scalar(l, dtype) for l in lambdas]
        lam_col = torch.tensor(lam_op, dtype=op, device=device).unsqueeze(1)  # [tp, 1]
        lam64 = torch.tensor([float(l) for l in lambdas], dtype=torch.float64, device=device)
        alive = torch.tensor([l > 0 for l in lam_op], dtype=torch.bool, device=device).unsqueeze(1)
        u_new = torch.empty(N, dtype=dtype, device=device)
        masks_new = torch.empty((tp + 1, packed_nbytes(N)), dtype=torch.uint8, device=device)
        num = torch.zeros(tp + 1, dtype=torch.float64, device=device)
        den = torch.zeros(tp + 1, dtype=torch.float64, device=device)
        for s in range(0, N, self.chunk):
            e = min(N, s + self.chunk)
            C = e - s
            uc, dc = u[s:e], delta[s:e]
            old = _unpack_rows(masks[:, s // 8 : (e + 7) // 8], C)  # uint8 0/1 [tp, C]
            Lam = torch.zeros(C, dtype=torch.float64, device=device)
            for i in range(tp):  # task order, float64
                Lam.add_(old[i], alpha=lam_op[i])
            p = uc.to(torch.float64) * Lam
            pos = p > -dc.to(torch.float64)
            agree_d = torch.where(pos, dc > 0, dc < 0)
            absu = uc.abs()
            # An earlier expert's element λ_i·u_k survives iff its bit is set, it has the
            # elected sign and it does not round to zero.
            agree_u = torch.where(pos, uc > 0, uc < 0).unsqueeze(0)
            new = old.bool() & agree_u & alive
            scaled = (absu.to(op).unsqueeze(0) * lam_col).to(dtype)  # |expert_i| per task, [tp, C]
            new &= scaled > 0
            best = torch.where(agree_d, dc.abs(), 0)
            if tp:
                best = torch.maximum(best, torch.where(new, scaled, 0).amax(dim=0))
            uc_new = torch.where(pos, best, 0 - best)
            u_new[s:e] = uc_new
            absu64 = absu.to(torch.float64)
            best64 = best.to(torch.float64)
            if tp:
                num[:tp] += lam64 * torch.mv(old.to(torch.float64), absu64)
                den[:tp] += torch.mv(new.to(torch.float64), best64)
            num[tp] += dc.abs().sum(dtype=torch.float64)
            den[tp] += (agree_d.to(torch.float64) * best64).sum()
            b0, b1 = s // 8, (e + 7) // 8
            if tp:
                masks_new[:tp, b0:b1] = _pack_rows(new)
            masks_new[tp, b0:b1] = _pack_rows(agree_d.unsqueeze(0))[0]
        return FlatMergeResult(u_new, masks_new, num, den)

    # ------------------------------------------------------------------ decouple
    def decouple_flat(
        self, u: torch.Tensor, packed: torch.Tensor, lam: float, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        N, dtype = u.numel(), u.dtype
        op = opmath_dtype(dtype)
        lam_op = opmath_scalar(lam, dtype)
        out = torch.empty(N, dtype=dtype if base is None else base.dtype, device=u.device)
        for s in range(0, N, self.chunk):
            e = min(N, s + self.chunk)
            bits = _unpack_rows(packed[s // 8 : (e + 7) // 8].unsqueeze(0), e - s)[0].bool()
            vals = torch.where(bits, (u[s:e].to(op) * lam_op).to(dtype), 0)
            out[s:e] = vals if base is None else base[s:e] + vals
        return out
