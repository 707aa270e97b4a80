"""Reference backend in plain torch: chunked, vectorised over tasks within a chunk.

Runs anywhere torch runs. Every other backend is tested against it. Temporaries are bounded by
the chunk: a chunk holds about ``WORK_ELEMENTS`` task-elements (``n_tasks * chunk``), and the
temporaries stay around 30 MiB (measured by benchmarks/bench_core.py) whatever the model's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..packing import pack_rows, packed_nbytes, unpack_rows
from .base import FlatMergeResult, opmath_dtype, opmath_scalar

WORK_ELEMENTS = 1 << 18  # task-elements per chunk: bounds the temporaries, amortises per-op overhead
MIN_CHUNK = 1 << 13


def _sum_exact_in_any_order(values: Sequence[float], op: torch.dtype) -> bool:
    """Whether every float64 partial sum of these float32 values is exact, so that the order of
    summation (the contract says task order) cannot change ``Λ``: true when the exponents span
    at most ``53 - 24 - ceil(log2(count))`` bits."""
    if op != torch.float32:
        return False
    nz = [abs(v) for v in values if v != 0]
    if not nz:
        return True
    exps = [math.frexp(v)[1] for v in nz]
    return (max(exps) - min(exps)) + 24 + math.ceil(math.log2(len(nz) + 1)) <= 53


class TorchBackend:
    """Plain torch, chunk by chunk. The reference and the fallback."""

    name = "torch"

    def __init__(self, chunk: int | None = None):
        if chunk is not None and (chunk <= 0 or chunk % 8):
            raise ValueError("chunk must be a positive multiple of 8")
        self.chunk = chunk

    def _chunk(self, n_tasks: int) -> int:
        """Elements per chunk (a multiple of 8, so chunks cut packed masks at byte edges)."""
        if self.chunk is not None:
            return self.chunk
        return max(MIN_CHUNK, (WORK_ELEMENTS // max(1, n_tasks)) // 8 * 8)

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
        step = self._chunk(n)
        for s in range(0, N, step):
            e = min(N, s + step)
            D = torch.stack([d[s:e] for d in deltas])  # [n, C]: one chunk, never a whole tensor
            total = D[0].to(torch.float64, copy=True)  # D[0] itself when D is float64
            for i in range(1, n):  # task order, float64: the documented election sum
                total += D[i]
            pos = total > 0
            sign = torch.where(pos, 1.0, -1.0).to(dtype)
            agree = (D * sign) > 0  # multiplying by ±1 is exact
            absD = D.abs()
            num += absD.sum(dim=1, dtype=torch.float64)
            best = (absD * agree).amax(dim=0)
            u[s:e] = torch.where(pos, best, 0 - best)  # 0 - (+0) is +0: no negative zeros
            # the same reduction as num, so one task gives num == den bit for bit (λ = 1 exactly)
            den += (best.unsqueeze(0) * agree).sum(dim=1, dtype=torch.float64)
            masks[:, s // 8 : (e + 7) // 8] = pack_rows(agree)
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
        lam_op64 = torch.tensor(lam_op, dtype=torch.float64, device=device)
        any_order_exact = _sum_exact_in_any_order(lam_op, op)
        u_new = torch.empty(N, dtype=dtype, device=device)
        masks_new = torch.empty((tp + 1, packed_nbytes(N)), dtype=torch.uint8, device=device)
        num = torch.zeros(tp + 1, dtype=torch.float64, device=device)
        den = torch.zeros(tp + 1, dtype=torch.float64, device=device)
        step = self._chunk(tp + 1)
        for s in range(0, N, step):
            e = min(N, s + step)
            C = e - s
            uc, dc = u[s:e], delta[s:e]
            old = unpack_rows(masks[:, s // 8 : (e + 7) // 8], C)  # bool [tp, C]
            O = old.to(torch.float64)
            if any_order_exact:
                Lam = torch.mv(O.t(), lam_op64)
            else:
                Lam = torch.zeros(C, dtype=torch.float64, device=device)
                for i in range(tp):  # task order, float64
                    Lam += O[i] * lam_op[i]
            p = uc.to(torch.float64) * Lam
            pos = p > -dc.to(torch.float64)
            sign = torch.where(pos, 1.0, -1.0).to(dtype)
            agree_d = (dc * sign) > 0
            absu = uc.abs()
            # An earlier expert's element λ_i·u_k survives iff its bit is set, u_k has the
            # elected sign and λ_i·u_k does not round to zero.
            scaled = (absu.to(op).unsqueeze(0) * lam_col).to(dtype)  # |expert_i|, [tp, C]
            new = old & ((uc * sign) > 0).unsqueeze(0) & (scaled > 0)
            best = dc.abs() * agree_d
            if tp:
                best = torch.maximum(best, (scaled * new).amax(dim=0))
            u_new[s:e] = torch.where(pos, best, 0 - best)
            best64 = best.to(torch.float64)
            if tp:
                num[:tp] += lam64 * torch.mv(O, absu.to(torch.float64))
                den[:tp] += torch.mv(new.to(torch.float64), best64)
            num[tp] += dc.abs().sum(dtype=torch.float64)
            den[tp] += (best * agree_d).sum(dtype=torch.float64)
            b0, b1 = s // 8, (e + 7) // 8
            if tp:
                masks_new[:tp, b0:b1] = pack_rows(new)
            masks_new[tp, b0:b1] = pack_rows(agree_d.unsqueeze(0))[0]
        return FlatMergeResult(u_new, masks_new, num, den)

    # ------------------------------------------------------------------ decouple
    def decouple_flat(
        self, u: torch.Tensor, packed: torch.Tensor, lam: float, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        N, dtype = u.numel(), u.dtype
        op = opmath_dtype(dtype)
        lam_op = opmath_scalar(lam, dtype)
        out = torch.empty(N, dtype=dtype if base is None else base.dtype, device=u.device)
        step = self._chunk(1)
        for s in range(0, N, step):
            e = min(N, s + step)
            bits = unpack_rows(packed[s // 8 : (e + 7) // 8].unsqueeze(0), e - s)[0]
            vals = torch.where(bits, (u[s:e].to(op) * lam_op).to(dtype), 0)  # +0.0 where masked off
            out[s:e] = vals if base is None else base[s:e] + vals
        return out
