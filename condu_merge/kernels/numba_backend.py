"""Compiled CPU backend (numba): fused, multi-threaded loops over each tensor.

Eager torch on a small CPU is bound by per-op overhead and by the temporaries each op writes
(``n x chunk`` stacks, bool masks, per-task float64 products); one fused loop per chunk reads each
delta once, keeps the per-element work in registers/cache and writes ``u`` and the packed bits
directly. Results are bit-exact with :class:`~condu_merge.backends.torch_backend.TorchBackend`
(masks and ``u``); the float64 L1 sums differ only in summation order (<= 1e-12 relative).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..backends.base import FlatMergeResult, lambdas_f32, opmath_dtype
from ..packing import packed_nbytes
from ._rows import RowsDecoupler

DEFAULT_CHUNK = 1 << 13  # elements per parallel work item: small enough for L1/L2, a multiple of 8

_KIND = {torch.float32: 0, torch.float64: 0, torch.float16: 1, torch.bfloat16: 2}


# numba's default "workqueue" threading layer must not be entered from two Python threads at
# once (it aborts or deadlocks); callers such as a prefetching thread may do exactly that
_LOCK = threading.RLock()


class _Locked:
    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        fn = getattr(self._mod, name)

        def call(*args):
            with _LOCK:
                return fn(*args)

        return call


def _impl():
    from . import _numba_impl

    return _Locked(_numba_impl)


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU float tensor; fp16/bf16 as ``uint16`` bit patterns."""
    t = t.contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _empty(n: int, dtype: torch.dtype, rows: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    shape = (n,) if rows is None else (rows, n)
    t = torch.empty(shape, dtype=dtype)
    return t, _np(t)


def _lam_opmath(lams: Sequence[float], dtype: torch.dtype) -> np.ndarray:
    """The rescalers rounded to ``dtype``'s opmath type, as float64: what ``opmath_scalar`` gives
    (numpy's float64 -> float32 cast rounds to nearest even, as torch's does), without building a
    torch tensor per rescaler."""
    if opmath_dtype(dtype) == torch.float64:
        return np.array([float(v) for v in lams], dtype=np.float64).reshape(len(lams))
    return lambdas_f32(lams)


def _lut_exact(lam_op: Sequence[float]) -> bool:
    """Whether every float64 partial sum of these opmath λ's is exact, in any order and over any
    subset, so that table lookups give ``Λ`` bit for bit as the task-order sum: true when all are
    finite float32 values whose nonzero exponents span at most ``53 - 24 - ceil(log2(count + 1))``
    bits (every partial sum is then an integer multiple of the smallest ulp, below ``2^53`` ulps)."""
    if not all(math.isfinite(v) for v in lam_op):
        return False
    if any(float(np.float32(v)) != v for v in lam_op):  # float64 tensors: opmath is float64
        return False
    nz = [abs(v) for v in lam_op if v != 0]
    if not nz:
        return True
    exps = [math.frexp(v)[1] for v in nz]
    return (max(exps) - min(exps)) + 24 + math.ceil(math.log2(len(nz) + 1)) <= 53


def _list(arrays: Sequence[np.ndarray]):
    from numba.typed import List

    out = List()
    for a in arrays:
        out.append(a)
    return out


class NumbaBackend(RowsDecoupler):
    """Fused CPU kernels compiled by numba (``pip install condu-merge[fast]``).

    Handles float32, float64, float16 and bfloat16 CPU tensors; ``decouple`` with a ``base``
    whose dtype mixes float64 with a half type falls back to the torch reference.
    """

    name = "numba"

    def __init__(self, chunk: int = DEFAULT_CHUNK):
        if chunk <= 0 or chunk % 8:
            raise ValueError("chunk must be a positive multiple of 8")
        self.chunk = chunk

    def available(self) -> bool:
        try:
            import numba  # noqa: F401
        except ImportError:
            return False
        return True

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    def _nchunks(self, N: int) -> int:
        return (N + self.chunk - 1) // self.chunk

    @staticmethod
    def _ngroups(nchunks: int) -> int:
        """Runs of consecutive chunks the ``prange`` shares out: a few per thread (a run allocates
        its scratch once; more runs than threads even out a thread that is descheduled)."""
        import numba

        return max(1, min(nchunks, 4 * numba.get_num_threads()))

    @staticmethod
    def _kernel(name: str, nchunks: int):
        """The parallel kernel, or its serial twin for a one-chunk tensor (nothing to share out;
        on a busy machine waking the second thread costs more than the chunk)."""
        return getattr(_impl(), name if nchunks > 1 else name + "_serial")

    # ------------------------------------------------------------------ unify
    def unify_flat(self, deltas: Sequence[torch.Tensor]) -> FlatMergeResult:
        n = len(deltas)
        first = deltas[0]
        N, dtype = first.numel(), first.dtype
        kind = _KIND[dtype]
        arrays = [_np(d.reshape(-1)) for d in deltas]
        u, u_np = _empty(N, dtype)
        masks = torch.empty((n, packed_nbytes(N)), dtype=torch.uint8)
        nc = self._nchunks(N)
        num_part = np.zeros((nc, n), np.float64)
        den_part = np.zeros((nc, n), np.float64)
        if N:
            self._kernel("unify_kernel", nc)(
                _list(arrays), kind, u_np, masks.numpy(), num_part, den_part, self.chunk, self._ngroups(nc)
            )
        return FlatMergeResult(u, masks, torch.from_numpy(num_part.sum(axis=0)), torch.from_numpy(den_part.sum(axis=0)))

    # ------------------------------------------------------------------ continual step
    def add_task_flat(
        self, u: torch.Tensor, masks: torch.Tensor, lambdas: Sequence[float], delta: torch.Tensor
    ) -> FlatMergeResult:
        tp = masks.shape[0]
        N, dtype = u.numel(), u.dtype
        kind = _KIND[dtype]
        lam_op = _lam_opmath(lambdas, dtype)
        u_new, u_new_np = _empty(N, dtype)
        masks_new = torch.empty((tp + 1, packed_nbytes(N)), dtype=torch.uint8)
        nc = self._nchunks(N)
        absu_part = np.zeros((nc, tp), np.float64)
        num_new_part = np.zeros(nc, np.float64)
        den_part = np.zeros((nc, tp + 1), np.float64)
        use_lut = dtype != torch.float64 and _lut_exact(lam_op.tolist())
        lut_sum, lut_max = _impl().lam_tables(lam_op) if use_lut else (np.zeros((1, 256)), np.zeros((1, 256)))
        if N:
            self._kernel("add_task_kernel", nc)(
                _np(u.reshape(-1)),
                kind,
                masks.contiguous().numpy(),
                lam_op,
                _np(delta.reshape(-1)),
                u_new_np,
                masks_new.numpy(),
                absu_part,
                num_new_part,
                den_part,
                self.chunk,
                self._ngroups(nc),
                use_lut,
                lut_sum,
                lut_max,
            )
        lam64 = np.array([float(l) for l in lambdas], dtype=np.float64).reshape(tp)
        num = np.empty(tp + 1, np.float64)
        num[:tp] = lam64 * absu_part.sum(axis=0)  # λ_i · Σ M_ik |u_k|, exact up to summation order
        num[tp] = num_new_part.sum()
        return FlatMergeResult(u_new, masks_new, torch.from_numpy(num), torch.from_numpy(den_part.sum(axis=0)))

    # ------------------------------------------------------------------ decouple
    def _decouple_rows(
        self, u: torch.Tensor, packed: torch.Tensor, lams: Sequence[float], base: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``[K, N]`` experts, or ``None`` where the dtype mix is left to the torch reference."""
        N, dtype = u.numel(), u.dtype
        K = packed.shape[0]
        out_dtype = dtype if base is None else base.dtype
        wide = False
        if base is not None:
            if base.dtype not in _KIND:
                return None
            wide = torch.float64 in (dtype, base.dtype)
            if wide and opmath_dtype(base.dtype) != torch.float64 and base.dtype != torch.float32:
                return None  # float64 sum rounded straight to a half type: not replicated here
            if wide and dtype in (torch.float16, torch.bfloat16):
                return None
        lam_op = _lam_opmath(lams, dtype)
        out, out_np = _empty(N, out_dtype, rows=K)
        if N and K:
            u_np = _np(u.reshape(-1))
            b_np = _np(base.reshape(-1)) if base is not None else u_np
            nc = self._nchunks(N)
            self._kernel("decouple_kernel", nc)(
                u_np,
                _KIND[dtype],
                packed.contiguous().numpy(),
                lam_op,
                b_np,
                _KIND[out_dtype],
                base is not None,
                wide,
                out_np,
                self.chunk,
                self._ngroups(nc),
            )
        return out
