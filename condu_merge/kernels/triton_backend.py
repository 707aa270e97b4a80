"""Triton backend: one fused kernel per operation, for CUDA tensors.

Each program owns ``BLOCK`` consecutive elements (a multiple of 8, so it owns whole mask bytes).
``unify`` reads the ``n`` deltas of its block (through a table of data pointers, so the deltas are
never stacked), writes ``u``, the ``n`` packed mask bytes and per-block float64 partial sums
``[nblocks, n]`` that the host reduces in float64. ``add_task`` and ``decouple`` likewise. No
``n x N`` intermediate exists anywhere.

With ``TRITON_INTERPRET=1`` set before triton is imported, the very same kernels run in Triton's
interpreter on CPU tensors; that is how CI checks them without a GPU (``backend="triton"``).

Rounding: float32 -> bfloat16 is done with integer round-to-nearest-even (as torch does) rather
than ``.to(tl.bfloat16)``, whose rounding differs between the interpreter and the GPU; launches on
CUDA pass ``enable_fp_fusion=False`` so ``base + λ·u`` is never contracted into an FMA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..backends.base import FlatMergeResult, opmath_dtype, opmath_scalar
from ..packing import packed_nbytes

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
GPU_BLOCK = 1024
INTERPRET_BLOCK = 64  # the interpreter runs numpy per program: small blocks keep it exact and quick


@triton.jit
def _widen(v, OP: tl.constexpr):
    """A loaded value in opmath ``OP``. bfloat16 is widened through its bits (exact everywhere,
    subnormals included; the interpreter's own bf16 conversion mishandles subnormals)."""
    if v.dtype == tl.bfloat16:
        v = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(OP)


@triton.jit
def _narrow(x, DT: tl.constexpr):
    """``x`` (float32 or float64) rounded to ``DT``, round to nearest even (bf16 via its bits)."""
    if DT == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _round_to(x, DT: tl.constexpr):
    """``x`` (float32 or float64) rounded to ``DT`` and widened back to ``x``'s type."""
    return _widen(_narrow(x, DT), x.dtype)


@triton.jit
def _bits_of(byte_ptr, boffs, bmask, BLOCK: tl.constexpr):
    """The ``BLOCK`` mask bits (little bit order) stored in the block's ``BLOCK // 8`` bytes."""
    m = tl.load(byte_ptr + boffs, mask=bmask, other=0).to(tl.int32)
    sh = tl.arange(0, 8)
    return tl.reshape((m[:, None] >> sh[None, :]) & 1, [BLOCK]) != 0


@triton.jit
def _pack(bits, BLOCK: tl.constexpr):
    """``BLOCK`` booleans -> ``BLOCK // 8`` bytes, little bit order."""
    sh = tl.arange(0, 8)
    b = tl.reshape(bits.to(tl.int32), [BLOCK // 8, 8])
    return tl.sum(b << sh[None, :], axis=1).to(tl.uint8)


@triton.jit
def _unify_kernel(
    ptrs, n, u_ptr, masks_ptr, num_part, den_part, N, B, DT: tl.constexpr, OP: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    bmask = boffs < B
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(n):  # the float64 election sum, in task order
        p = tl.load(ptrs + i).to(tl.pointer_type(DT))
        total += _widen(tl.load(p + offs, mask=inb, other=0.0), tl.float64)
    pos = total > 0
    sgn = tl.where(pos, 1.0, -1.0).to(OP)
    best = tl.zeros([BLOCK], dtype=OP)
    mrow = masks_ptr
    for i in range(n):
        p = tl.load(ptrs + i).to(tl.pointer_type(DT))
        d = _widen(tl.load(p + offs, mask=inb, other=0.0), OP)
        ad = tl.abs(d)
        agree = d * sgn > 0  # exact (sgn is ±1); zeros never agree
        best = tl.where(agree & (ad > best), ad, best)
        tl.store(num_part + pid * n + i, tl.sum(ad.to(tl.float64), axis=0))
        tl.store(mrow + boffs, _pack(agree, BLOCK), mask=bmask)
        mrow += B
    u = tl.where(pos | (best == 0), best, -best)  # never -0.0
    tl.store(u_ptr + offs, _narrow(u, DT), mask=inb)
    best64 = best.to(tl.float64)
    for i in range(n):
        p = tl.load(ptrs + i).to(tl.pointer_type(DT))
        d = _widen(tl.load(p + offs, mask=inb, other=0.0), OP)
        tl.store(den_part + pid * n + i, tl.sum(tl.where(d * sgn > 0, best64, 0.0), axis=0))


@triton.jit
def _add_task_kernel(
    u_ptr,
    masks_ptr,
    lam_ptr,
    tp,
    d_ptr,
    unew_ptr,
    mnew_ptr,
    absu_part,
    num_new_part,
    den_part,
    N,
    B,
    DT: tl.constexpr,
    OP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    bmask = boffs < B
    u = _widen(tl.load(u_ptr + offs, mask=inb, other=0.0), OP)
    absu = tl.abs(u)
    absu64 = absu.to(tl.float64)
    lam_sum = tl.zeros([BLOCK], dtype=tl.float64)
    lam_max = tl.zeros([BLOCK], dtype=OP)
    mrow = masks_ptr
    for i in range(tp):  # Λ in float64, task order; the largest live λ per element
        li = tl.load(lam_ptr + i)
        li_op = li.to(OP)
        on = _bits_of(mrow, boffs, bmask, BLOCK)
        lam_sum += tl.where(on, li, 0.0)
        lam_max = tl.where(on & (li_op > lam_max), li_op, lam_max)
        tl.store(absu_part + pid * tp + i, tl.sum(tl.where(on, absu64, 0.0), axis=0))
        mrow += B
    d = _widen(tl.load(d_ptr + offs, mask=inb, other=0.0), OP)
    pos = u.to(tl.float64) * lam_sum > -(d.to(tl.float64))
    sgn = tl.where(pos, 1.0, -1.0).to(OP)
    agree_d = d * sgn > 0
    agree_u = u * sgn > 0
    bd = tl.where(agree_d, tl.abs(d), 0.0)
    # λ·|u| rounds monotonically in λ: the largest surviving earlier expert uses the largest λ
    sc = _round_to(absu * lam_max, DT)
    best = tl.where(agree_u & (sc > bd), sc, bd)
    out = tl.where(pos | (best == 0), best, -best)
    tl.store(unew_ptr + offs, _narrow(out, DT), mask=inb)
    best64 = best.to(tl.float64)
    tl.store(num_new_part + pid, tl.sum(tl.abs(d).to(tl.float64), axis=0))
    tl.store(den_part + pid * (tp + 1) + tp, tl.sum(tl.where(agree_d, best64, 0.0), axis=0))
    mrow = masks_ptr
    nrow = mnew_ptr
    for i in range(tp):
        li_op = tl.load(lam_ptr + i).to(OP)
        on = _bits_of(mrow, boffs, bmask, BLOCK)
        # a dead λ (<= 0) gives a product <= 0, so `> 0` also drops dead experts
        keep = on & agree_u & (_round_to(absu * li_op, DT) > 0)
        tl.store(nrow + boffs, _pack(keep, BLOCK), mask=bmask)
        tl.store(den_part + pid * (tp + 1) + i, tl.sum(tl.where(keep, best64, 0.0), axis=0))
        mrow += B
        nrow += B
    # nrow is now row tp: stepping a pointer row by row never forms the product tp * B, which
    # overflows when both are 32-bit kernel arguments (tp * B >= 2^31 for a big embedding)
    tl.store(nrow + boffs, _pack(agree_d, BLOCK), mask=bmask)


@triton.jit
def _decouple_kernel(
    u_ptr,
    packed_ptr,
    lam_ptr,
    K,
    base_ptr,
    out_ptr,
    N,
    B,
    DT: tl.constexpr,
    OP: tl.constexpr,
    BDT: tl.constexpr,
    SOP: tl.constexpr,
    HAS_BASE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    bmask = boffs < B
    u = _widen(tl.load(u_ptr + offs, mask=inb, other=0.0), OP)
    if HAS_BASE:
        b = _widen(tl.load(base_ptr + offs, mask=inb, other=0.0), SOP)
    prow = packed_ptr
    orow = out_ptr
    for r in range(K):  # u is read once for all K experts
        li = tl.load(lam_ptr + r).to(OP)
        on = _bits_of(prow, boffs, bmask, BLOCK)
        v = tl.where(on, _round_to(u * li, DT), 0.0)
        if HAS_BASE:
            tl.store(orow + offs, _narrow(b + v.to(SOP), BDT), mask=inb)
        else:
            tl.store(orow + offs, _narrow(v, DT), mask=inb)
        prow += B
        orow += N


def interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    # triton.language's own jitted helpers must be interpreted too: setting the variable after
    # triton was imported gives interpreted kernels that cannot run
    return isinstance(_unify_kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


class TritonBackend:
    """Fused Triton kernels (``pip install condu-merge[triton]``): CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1`` (the interpreter; slow, for checking only)."""

    name = "triton"

    def __init__(self, block: int | None = None):
        if block is not None and (block < 8 or block & (block - 1)):
            raise ValueError("block must be a power of two >= 8")
        self.block = block

    def available(self) -> bool:
        return True  # importing this module already required triton

    def supports(self, device: torch.device) -> bool:
        device = torch.device(device)
        if interpreting():
            return device.type == "cpu"
        return device.type == "cuda" and torch.cuda.is_available()

    def _check(self, t: torch.Tensor) -> None:
        if t.dtype not in _TL:
            raise TypeError(f"triton backend: unsupported dtype {t.dtype}")
        if not self.supports(t.device):
            hint = (
                " (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"
                if t.device.type == "cpu"
                else ""
            )
            raise RuntimeError(f"triton backend cannot run on {t.device} tensors here{hint}")

    def _block(self) -> int:
        return self.block or (INTERPRET_BLOCK if interpreting() else GPU_BLOCK)

    def _opts(self) -> dict:
        return {} if interpreting() else {"enable_fp_fusion": False}

    # ------------------------------------------------------------------ unify
    def unify_flat(self, deltas: Sequence[torch.Tensor]) -> FlatMergeResult:
        first = deltas[0]
        self._check(first)
        n, N, dtype, dev = len(deltas), first.numel(), first.dtype, first.device
        flats = [d.reshape(-1).contiguous() for d in deltas]
        BLOCK = self._block()
        nb = triton.cdiv(N, BLOCK)
        B = packed_nbytes(N)
        u = torch.empty(N, dtype=dtype, device=dev)
        masks = torch.empty((n, B), dtype=torch.uint8, device=dev)
        num_part = torch.zeros((nb, n), dtype=torch.float64, device=dev)
        den_part = torch.zeros((nb, n), dtype=torch.float64, device=dev)
        if N:
            ptrs = torch.tensor([f.data_ptr() for f in flats], dtype=torch.int64, device=dev)
            _unify_kernel[(nb,)](
                ptrs,
                n,
                u,
                masks,
                num_part,
                den_part,
                N,
                B,
                DT=_TL[dtype],
                OP=_TL[opmath_dtype(dtype)],
                BLOCK=BLOCK,
                **self._opts(),
            )
        return FlatMergeResult(u, masks, num_part.sum(dim=0), den_part.sum(dim=0))

    # ------------------------------------------------------------------ continual step
    def add_task_flat(
        self, u: torch.Tensor, masks: torch.Tensor, lambdas: Sequence[float], delta: torch.Tensor
    ) -> FlatMergeResult:
        self._check(u)
        tp = masks.shape[0]
        N, dtype, dev = u.numel(), u.dtype, u.device
        BLOCK = self._block()
        nb = triton.cdiv(N, BLOCK)
        B = packed_nbytes(N)
        lam_op = torch.tensor([opmath_scalar(l, dtype) for l in lambdas], dtype=torch.float64, device=dev)
        u_new = torch.empty(N, dtype=dtype, device=dev)
        masks_new = torch.empty((tp + 1, B), dtype=torch.uint8, device=dev)
        absu_part = torch.zeros((nb, max(tp, 1)), dtype=torch.float64, device=dev)
        num_new_part = torch.zeros(nb, dtype=torch.float64, device=dev)
        den_part = torch.zeros((nb, tp + 1), dtype=torch.float64, device=dev)
        if N:
            _add_task_kernel[(nb,)](
                u.reshape(-1).contiguous(),
                masks.contiguous(),
                lam_op,
                tp,
                delta.reshape(-1).contiguous(),
                u_new,
                masks_new,
                absu_part,
                num_new_part,
                den_part,
                N,
                B,
                DT=_TL[dtype],
                OP=_TL[opmath_dtype(dtype)],
                BLOCK=BLOCK,
                **self._opts(),
            )
        lam64 = torch.tensor([float(l) for l in lambdas], dtype=torch.float64, device=dev)
        num = torch.cat([lam64 * absu_part[:, :tp].sum(dim=0), num_new_part.sum().reshape(1)])
        return FlatMergeResult(u_new, masks_new, num, den_part.sum(dim=0))

    # ------------------------------------------------------------------ decouple
    def decouple_many_flat(
        self, u: torch.Tensor, packed: torch.Tensor, lams: Sequence[float], base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``K`` experts at once: ``out[r] = λ_r · M_r ⊙ u`` (``packed`` ``uint8 [K, B]``), or
        ``base + …`` in ``base``'s dtype; ``u`` (and ``base``) read once for all ``K``."""
        self._check(u)
        N, dtype, dev = u.numel(), u.dtype, u.device
        K = packed.shape[0]
        out_dtype = dtype if base is None else base.dtype
        if base is not None:
            if base.dtype not in _TL:
                raise TypeError(f"triton backend: unsupported base dtype {base.dtype}")
            wide = torch.float64 in (dtype, base.dtype)
            if wide and (dtype in (torch.float16, torch.bfloat16) or base.dtype in (torch.float16, torch.bfloat16)):
                # torch rounds a float64 sum to a half type through float32: leave that to the reference
                from ..backends.torch_backend import TorchBackend

                tb = TorchBackend()
                return torch.stack([tb.decouple_flat(u, packed[r], lams[r], base) for r in range(K)])
        sop = torch.float64 if base is not None and torch.float64 in (dtype, base.dtype) else torch.float32
        BLOCK = self._block()
        nb = triton.cdiv(N, BLOCK)
        out = torch.empty((K, N), dtype=out_dtype, device=dev)
        if N and K:
            lam_t = torch.tensor([opmath_scalar(l, dtype) for l in lams], dtype=torch.float64, device=dev)
            uf = u.reshape(-1).contiguous()
            bf = base.reshape(-1).contiguous() if base is not None else uf
            _decouple_kernel[(nb,)](
                uf,
                packed.contiguous(),
                lam_t,
                K,
                bf,
                out,
                N,
                packed_nbytes(N),
                DT=_TL[dtype],
                OP=_TL[opmath_dtype(dtype)],
                BDT=_TL[out_dtype],
                SOP=_TL[sop],
                HAS_BASE=base is not None,
                BLOCK=BLOCK,
                **self._opts(),
            )
        return out

    def decouple_flat(
        self, u: torch.Tensor, packed: torch.Tensor, lam: float, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.decouple_many_flat(u, packed.reshape(1, -1), [lam], base)[0]


if os.environ.get("CONDU_TRITON_DEBUG"):  # pragma: no cover
    pass
