"""Native CPU backend: the float32, float16 and bfloat16 kernels in ``_native.c`` (AVX2), via ctypes.

Why a C kernel beside numba: per element and task, unify needs a float64 task-order sum, a
sign test, a max and one mask bit. numba's loops over ``[chunk]`` rows spend most of their time
storing and reloading those rows and packing bytes into bits; the C loop keeps two 8-lane
blocks of every task in registers, packs a mask byte with one ``movemask`` and keeps the L1 sums
in float64 lanes (see ``_native.c``, ``docs/kernels.md`` and ``benchmarks/RESULTS.md``).

Half types are widened to float32 as they are loaded and every computation runs as for float32
(the contract's opmath); a rescaled value is rounded to the tensor's dtype (nearest even, as in
torch) before it is compared or stored.

What it does not take -- float64 (a float64 base included), more than 64 tasks, a CPU without AVX2
and F16C -- goes to the numba backend (or torch), with the same bits: every backend meets one
numeric contract (:mod:`condu_merge.backends.base`).

The library is the extension module ``condu_merge.kernels._native`` built by ``setup.py``
(optional: without a compiler the package installs without it and this backend is unavailable).
ctypes releases the GIL for the call; the C code runs its own threads (a persistent pool, rebuilt
after ``fork``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..backends.base import FlatMergeResult, MergeBackend
from ..packing import packed_nbytes
from ._rows import RowsDecoupler

DEFAULT_CHUNK = 1 << 16  # elements per work item handed to a thread: a multiple of 8
MIN_PIECES = 16  # a tensor large enough is cut into at least this many work items
MAX_UNIFY_TASKS = 64  # CM_MAXT in _native.c
MAX_EARLIER_TASKS = 64  # the same bound on add_task's earlier tasks
_ABI = 3

_P = ctypes.c_void_p
_I = ctypes.c_int
_L = ctypes.c_int64


def _load() -> ctypes.CDLL | None:
    """The kernel library, or ``None`` when the extension is not built or the CPU lacks AVX2."""
    try:
        from . import _native  # type: ignore[attr-defined]  # a C extension without stubs
    except ImportError:
        return None
    lib = ctypes.CDLL(_native.__file__)
    lib.cm_abi.restype = _I
    lib.cm_have_avx2.restype = _I
    if lib.cm_abi() != _ABI or not lib.cm_have_avx2():
        return None
    lib.cm_unify.restype = _I
    lib.cm_unify.argtypes = [_P, _I, _L, _P, _P, _L, _P, _P, _L, _I, _I]
    lib.cm_add_task.restype = _I
    lib.cm_add_task.argtypes = [_P, _P, _L, _I, _P, _P, _P, _P, _L, _P, _P, _P, _L, _L, _I, _I]
    lib.cm_decouple.restype = _I
    lib.cm_decouple.argtypes = [_P, _P, _L, _P, _I, _P, _P, _L, _L, _I, _I, _I]
    lib.cm_sub.restype = _I
    lib.cm_sub.argtypes = [_P, _P, _P, _L, _P, _P, _L, _I, _I]
    return lib


_LIB: list[ctypes.CDLL | None] = []


def _lib() -> ctypes.CDLL | None:
    if not _LIB:
        _LIB.append(_load())
    return _LIB[0]


# the element types of _native.c (CM_F32, CM_F16, CM_BF16)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous()


def _call(fn: Any, what: str, detail: str, *args: object) -> None:
    """Call a kernel entry point; its -1 (arguments it does not take) becomes an error naming ``what``."""
    if fn(*args) != 0:
        raise RuntimeError(f"native {what} rejected its arguments ({detail})")


def subtract(f: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> tuple[int, float] | None:
    """``out = f − b`` for contiguous CPU tensors of one dtype (float32, float16, bfloat16; ``out``
    may be ``f``): the float32 difference rounded once to the dtype, as torch's subtraction gives
    it, on the kernels' threads. Returns how many elements overflowed the dtype (not finite where
    the float32 difference is) and their largest ``|f − b|``, or ``None`` when the native library
    does not take these tensors (then nothing was written)."""
    lib = _lib()
    kind = _KIND.get(f.dtype)
    if (
        lib is None
        or kind is None
        or not f.dtype == b.dtype == out.dtype
        or not f.numel() == b.numel() == out.numel()
        or not all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in (f, b, out))
    ):
        return None
    N = f.numel()
    be = NativeBackend()
    chunk, nc = be._work_items(N)
    nbad = np.zeros(nc, np.int64)
    big = np.zeros(nc, np.float32)
    if N:
        _call(
            lib.cm_sub,
            "subtract",
            f"N={N}",
            f.data_ptr(),
            b.data_ptr(),
            out.data_ptr(),
            N,
            nbad.ctypes.data,
            big.ctypes.data,
            chunk,
            be._nthreads(),
            kind,
        )
    return int(nbad.sum()), float(big.max())


class NativeBackend(RowsDecoupler):
    """float32, float16 and bfloat16 kernels in C (``condu_merge.kernels._native``); everything else is delegated."""

    name = "native"

    def __init__(self, chunk: int = DEFAULT_CHUNK, threads: int | None = None):
        if chunk <= 0 or chunk % 8:
            raise ValueError("chunk must be a positive multiple of 8")
        self.chunk = chunk
        self.threads = threads

    def available(self) -> bool:
        return _lib() is not None

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    def _chunk_for(self, N: int) -> int:
        """Elements per work item for a tensor of ``N``: ``chunk``, or less so that a tensor of
        more than :data:`MIN_PIECES` x 4096 elements is cut into at least that many items. With
        a few items per thread the last one left most threads idle (200K elements in 65,536s: 4
        items for 2 threads, 1.5x the balanced time); the size depends on ``N`` alone, so the
        partial sums (and the results) still do not depend on the thread count."""
        piece = -(-N // MIN_PIECES)
        piece = -(-piece // 512) * 512  # whole cache lines of mask bytes per item
        return min(self.chunk, max(piece, 4096))

    def _work_items(self, N: int) -> tuple[int, int]:
        """``(_chunk_for(N), the number of items)``: the per-item partial sums are sized by it."""
        chunk = self._chunk_for(N)
        return chunk, max(1, -(-N // chunk))

    def _nthreads(self) -> int:
        return max(1, self.threads if self.threads is not None else torch.get_num_threads())

    @staticmethod
    def _fallback() -> MergeBackend:
        """Where a job the C kernels do not take goes: what ``auto`` picks without this backend
        (numba where installed, else torch)."""
        from ..backends import AUTO_ORDER, _instance, get_backend

        for name in AUTO_ORDER.get("cpu", []):
            if name != NativeBackend.name:
                found = _instance(name)
                if found is not None and found.supports(torch.device("cpu")):
                    return found
        return get_backend("torch")

    # ------------------------------------------------------------------ unify
    def unify_flat(self, deltas: Sequence[torch.Tensor]) -> FlatMergeResult:
        n = len(deltas)
        first = deltas[0]
        N = first.numel()
        lib = _lib()
        kind = _KIND.get(first.dtype)
        if lib is None or kind is None or not 1 <= n <= MAX_UNIFY_TASKS or any(d.dtype != first.dtype for d in deltas):
            return self._fallback().unify_flat(deltas)
        rows = [_flat(d) for d in deltas]  # kept alive for the call
        ptrs = np.array([r.data_ptr() for r in rows], dtype=np.uintp)
        nb = packed_nbytes(N)
        u = torch.empty(N, dtype=first.dtype)
        masks = torch.empty((n, nb), dtype=torch.uint8)
        chunk, nc = self._work_items(N)
        num_part = np.zeros((nc, n), np.float64)
        den_part = np.zeros((nc, n), np.float64)
        if N:
            _call(
                lib.cm_unify,
                "unify",
                f"n={n}, N={N}",
                ptrs.ctypes.data,
                n,
                N,
                u.data_ptr(),
                masks.data_ptr(),
                nb,
                num_part.ctypes.data,
                den_part.ctypes.data,
                chunk,
                self._nthreads(),
                kind,
            )
        return FlatMergeResult(u, masks, torch.from_numpy(num_part.sum(axis=0)), torch.from_numpy(den_part.sum(axis=0)))

    # ------------------------------------------------------------------ continual step
    def add_task_flat(
        self, u: torch.Tensor, masks: torch.Tensor, lambdas: Sequence[float], delta: torch.Tensor
    ) -> FlatMergeResult:
        tp = masks.shape[0]
        N = u.numel()
        lib = _lib()
        kind = _KIND.get(u.dtype)
        if lib is None or kind is None or delta.dtype != u.dtype or tp > MAX_EARLIER_TASKS:
            return self._fallback().add_task_flat(u, masks, lambdas, delta)
        from .numba_backend import _lam_opmath  # torch-free helper; does not import numba

        lam_op = np.ascontiguousarray(_lam_opmath(lambdas, torch.float32), dtype=np.float64)
        uf, df = _flat(u), _flat(delta)
        old = masks.contiguous()
        nb = packed_nbytes(N)
        u_new = torch.empty(N, dtype=u.dtype)
        masks_new = torch.empty((tp + 1, nb), dtype=torch.uint8)
        chunk, nc = self._work_items(N)
        absu_part = np.zeros((nc, max(tp, 1)), np.float64)
        num_new_part = np.zeros(nc, np.float64)
        den_part = np.zeros((nc, tp + 1), np.float64)
        if N:
            _call(
                lib.cm_add_task,
                "add_task",
                f"tp={tp}, N={N}",
                uf.data_ptr(),
                old.data_ptr(),
                old.shape[1] if tp else nb,
                tp,
                lam_op.ctypes.data,
                df.data_ptr(),
                u_new.data_ptr(),
                masks_new.data_ptr(),
                nb,
                absu_part.ctypes.data,
                num_new_part.ctypes.data,
                den_part.ctypes.data,
                N,
                chunk,
                self._nthreads(),
                kind,
            )
        lam64 = np.array([float(l) for l in lambdas], dtype=np.float64).reshape(tp)
        num = np.empty(tp + 1, np.float64)
        num[:tp] = lam64 * absu_part[:, :tp].sum(axis=0)  # λ_i · Σ M_ik |u_k|, exact up to summation order
        num[tp] = num_new_part.sum()
        return FlatMergeResult(u_new, masks_new, torch.from_numpy(num), torch.from_numpy(den_part.sum(axis=0)))

    # ------------------------------------------------------------------ decouple
    def _decouple_rows(
        self, u: torch.Tensor, packed: torch.Tensor, lams: Sequence[float], base: torch.Tensor | None
    ) -> torch.Tensor | None:
        lib = _lib()
        kind = _KIND.get(u.dtype)
        bkind = _KIND.get(base.dtype) if base is not None else 0
        if lib is None or kind is None or bkind is None:
            return None
        from .numba_backend import _lam_opmath  # torch-free helper; does not import numba

        N = u.numel()
        K = packed.shape[0]
        uf = _flat(u)
        pk = packed.contiguous()
        bf = _flat(base) if base is not None else None
        lam32 = _lam_opmath(lams, torch.float32).astype(np.float32)
        out = torch.empty((K, N), dtype=u.dtype if base is None else base.dtype)
        chunk, _ = self._work_items(N)
        if N and K:
            _call(
                lib.cm_decouple,
                "decouple",
                f"K={K}, N={N}",
                uf.data_ptr(),
                pk.data_ptr(),
                pk.shape[1],
                lam32.ctypes.data,
                K,
                bf.data_ptr() if bf is not None else None,
                out.data_ptr(),
                N,
                chunk,
                self._nthreads(),
                kind,
                bkind,
            )
        return out

    def _decouple_fallback(self) -> MergeBackend:
        return self._fallback()
