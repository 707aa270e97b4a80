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
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from .._lazy import loaded
from ..backends.base import FlatMergeResult, MergeBackend, lambdas_f32
from ..packing import packed_nbytes
from ..safetensors_writer import DTYPE_TO_ST, ST_ITEMSIZE
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


# the element types of _native.c (CM_F32, CM_F16, CM_BF16), by safetensors dtype name
ST_KIND = {"F32": 0, "F16": 1, "BF16": 2}
NUMPY_OF_ST = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
"""The numpy element type that holds each kind's bits (bfloat16 as its raw 16 bits)."""


def _kind(dtype: Any) -> int | None:
    """The kernels' element type of a torch dtype, or ``None``."""
    return ST_KIND.get(DTYPE_TO_ST.get(dtype, ""))


def default_threads() -> int:
    """Threads the kernels use by default: torch's intra-op count where torch is imported (the
    process's setting), else the CPUs this process may run on. The results do not depend on it."""
    if loaded("torch"):
        return max(1, int(torch.get_num_threads()))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous()


def _call(fn: Any, what: str, detail: str, *args: object) -> None:
    """Call a kernel entry point; its -1 (arguments it does not take) becomes an error naming ``what``."""
    if fn(*args) != 0:
        raise RuntimeError(f"native {what} rejected its arguments ({detail})")


def _subtract_ptrs(lib: Any, f: int, b: int, out: int, N: int, kind: int, be: NativeBackend) -> tuple[int, float]:
    chunk, nc = be._work_items(N)
    nbad = np.zeros(nc, np.int64)
    big = np.zeros(nc, np.float32)
    if N:
        _call(
            lib.cm_sub,
            "subtract",
            f"N={N}",
            f,
            b,
            out,
            N,
            nbad.ctypes.data,
            big.ctypes.data,
            chunk,
            be._nthreads(),
            kind,
        )
    return int(nbad.sum()), float(big.max())


def _unify_ptrs(
    lib: Any, ptrs: np.ndarray, n: int, N: int, u: int, masks: int, kind: int, be: NativeBackend
) -> tuple[np.ndarray, np.ndarray]:
    """``cm_unify`` of ``n`` rows (``ptrs``) into ``u`` and ``masks`` (``[n, ceil(N/8)]``);
    returns the float64 L1 sums ``(num, den)``, the per-item partials added in item order."""
    chunk, nc = be._work_items(N)
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
            u,
            masks,
            packed_nbytes(N),
            num_part.ctypes.data,
            den_part.ctypes.data,
            chunk,
            be._nthreads(),
            kind,
        )
    return num_part.sum(axis=0), den_part.sum(axis=0)


def _add_task_ptrs(
    lib: Any,
    u: int,
    old: int,
    old_stride: int,
    tp: int,
    lambdas: Sequence[float],
    delta: int,
    u_new: int,
    masks_new: int,
    N: int,
    kind: int,
    be: NativeBackend,
) -> tuple[np.ndarray, np.ndarray]:
    """``cm_add_task`` (``tp`` earlier mask rows at ``old``, ``old_stride`` bytes apart) into
    ``u_new`` and ``masks_new`` (``[tp + 1, ceil(N/8)]``); returns ``(num, den)`` in float64."""
    lam_op = lambdas_f32(lambdas)
    nb = packed_nbytes(N)
    chunk, nc = be._work_items(N)
    absu_part = np.zeros((nc, max(tp, 1)), np.float64)
    num_new_part = np.zeros(nc, np.float64)
    den_part = np.zeros((nc, tp + 1), np.float64)
    if N:
        _call(
            lib.cm_add_task,
            "add_task",
            f"tp={tp}, N={N}",
            u,
            old,
            old_stride if tp else nb,
            tp,
            lam_op.ctypes.data,
            delta,
            u_new,
            masks_new,
            nb,
            absu_part.ctypes.data,
            num_new_part.ctypes.data,
            den_part.ctypes.data,
            N,
            chunk,
            be._nthreads(),
            kind,
        )
    lam64 = np.array([float(v) for v in lambdas], dtype=np.float64).reshape(tp)
    num = np.empty(tp + 1, np.float64)
    num[:tp] = lam64 * absu_part[:, :tp].sum(axis=0)  # λ_i · Σ M_ik |u_k|, exact up to summation order
    num[tp] = num_new_part.sum()
    return num, den_part.sum(axis=0)


def subtract(f: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> tuple[int, float] | None:
    """``out = f − b`` for contiguous CPU tensors of one dtype (float32, float16, bfloat16; ``out``
    may be ``f``): the float32 difference rounded once to the dtype, as torch's subtraction gives
    it, on the kernels' threads. Returns how many elements overflowed the dtype (not finite where
    the float32 difference is) and their largest ``|f − b|``, or ``None`` when the native library
    does not take these tensors (then nothing was written)."""
    lib = _lib()
    kind = _kind(f.dtype)
    if (
        lib is None
        or kind is None
        or not f.dtype == b.dtype == out.dtype
        or not f.numel() == b.numel() == out.numel()
        or not all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in (f, b, out))
    ):
        return None
    return _subtract_ptrs(lib, f.data_ptr(), b.data_ptr(), out.data_ptr(), f.numel(), kind, NativeBackend())


# ---------------------------------------------------------------------------- arrays (no torch)


def _check_arrays(what: str, N: int, st: str, *arrays: np.ndarray) -> int:
    kind = ST_KIND.get(st)
    if kind is None:
        raise ValueError(f"native {what}: dtype {st!r} is not one of {sorted(ST_KIND)}")
    want = N * np.dtype(NUMPY_OF_ST[st]).itemsize
    for a in arrays:
        if not a.flags.c_contiguous or a.nbytes != want:
            raise ValueError(f"native {what}: expected contiguous arrays of {N} {st} elements ({want} bytes)")
    return kind


def subtract_arrays(f: np.ndarray, b: np.ndarray, out: np.ndarray, st: str) -> tuple[int, float]:
    """:func:`subtract` on arrays holding ``N`` elements of safetensors dtype ``st`` each
    (``F32``, ``F16``, ``BF16``; any numpy type of that width, e.g. a file's bytes viewed)."""
    lib = _require_lib()
    N = f.nbytes // ST_ITEMSIZE[st]
    kind = _check_arrays("subtract", N, st, f, b, out)
    return _subtract_ptrs(lib, f.ctypes.data, b.ctypes.data, out.ctypes.data, N, kind, NativeBackend())


def _fresh(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, np.uint8)


def unify_one_array(
    delta: np.ndarray, st: str, alloc: Callable[[int], np.ndarray] = _fresh
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first task of a store on one tensor (``unify`` of one delta, ``N`` elements of ``st``):
    returns ``(u, masks [1, ceil(N/8)] uint8, num, den)`` as :meth:`NativeBackend.unify_flat`.
    ``alloc(nbytes)``: where the results go (a contiguous ``uint8`` array of that size)."""
    lib = _require_lib()
    N = delta.nbytes // ST_ITEMSIZE[st]
    kind = _check_arrays("unify", N, st, delta)
    u = alloc(N * ST_ITEMSIZE[st]).view(NUMPY_OF_ST[st])
    masks = alloc(packed_nbytes(N)).reshape(1, packed_nbytes(N))
    ptrs = np.array([delta.ctypes.data], dtype=np.uintp)
    num, den = _unify_ptrs(lib, ptrs, 1, N, u.ctypes.data, masks.ctypes.data, kind, NativeBackend())
    return u, masks, num, den


def add_task_arrays(
    u: np.ndarray,
    masks: np.ndarray,
    lambdas: Sequence[float],
    delta: np.ndarray,
    st: str,
    alloc: Callable[[int], np.ndarray] = _fresh,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`NativeBackend.add_task_flat` on arrays: ``u`` and ``delta`` of ``N`` elements of
    ``st``, ``masks`` the earlier tasks' packed rows ``uint8 [t, ceil(N/8)]`` (at most
    :data:`MAX_EARLIER_TASKS`). Returns ``(u, masks [t + 1, ceil(N/8)], num, den)``."""
    lib = _require_lib()
    N = u.nbytes // ST_ITEMSIZE[st]
    kind = _check_arrays("add_task", N, st, u, delta)
    tp = masks.shape[0]
    nb = packed_nbytes(N)
    if masks.ndim != 2 or masks.dtype != np.uint8 or masks.shape[1] != nb or not masks.flags.c_contiguous:
        raise ValueError(f"native add_task: masks must be contiguous uint8 [t, {nb}], got {masks.dtype} {masks.shape}")
    if not 1 <= tp <= MAX_EARLIER_TASKS or len(lambdas) != tp:
        raise ValueError(f"native add_task: {tp} earlier tasks with {len(lambdas)} rescalers (1..{MAX_EARLIER_TASKS})")
    u_new = alloc(N * ST_ITEMSIZE[st]).view(NUMPY_OF_ST[st])
    masks_new = alloc((tp + 1) * nb).reshape(tp + 1, nb)
    num, den = _add_task_ptrs(
        lib,
        u.ctypes.data,
        masks.ctypes.data,
        nb,
        tp,
        lambdas,
        delta.ctypes.data,
        u_new.ctypes.data,
        masks_new.ctypes.data,
        N,
        kind,
        NativeBackend(),
    )
    return u_new, masks_new, num, den


def _require_lib() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise RuntimeError("the native kernels are not available (extension not built, or no AVX2/F16C)")
    return lib


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
        return max(1, self.threads if self.threads is not None else default_threads())

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
        kind = _kind(first.dtype)
        if lib is None or kind is None or not 1 <= n <= MAX_UNIFY_TASKS or any(d.dtype != first.dtype for d in deltas):
            return self._fallback().unify_flat(deltas)
        rows = [_flat(d) for d in deltas]  # kept alive for the call
        ptrs = np.array([r.data_ptr() for r in rows], dtype=np.uintp)
        u = torch.empty(N, dtype=first.dtype)
        masks = torch.empty((n, packed_nbytes(N)), dtype=torch.uint8)
        num, den = _unify_ptrs(lib, ptrs, n, N, u.data_ptr(), masks.data_ptr(), kind, self)
        return FlatMergeResult(u, masks, torch.from_numpy(num), torch.from_numpy(den))

    # ------------------------------------------------------------------ continual step
    def add_task_flat(
        self, u: torch.Tensor, masks: torch.Tensor, lambdas: Sequence[float], delta: torch.Tensor
    ) -> FlatMergeResult:
        tp = masks.shape[0]
        N = u.numel()
        lib = _lib()
        kind = _kind(u.dtype)
        if lib is None or kind is None or delta.dtype != u.dtype or tp > MAX_EARLIER_TASKS:
            return self._fallback().add_task_flat(u, masks, lambdas, delta)
        uf, df = _flat(u), _flat(delta)
        old = masks.contiguous()
        u_new = torch.empty(N, dtype=u.dtype)
        masks_new = torch.empty((tp + 1, packed_nbytes(N)), dtype=torch.uint8)
        num, den = _add_task_ptrs(
            lib,
            uf.data_ptr(),
            old.data_ptr(),
            old.shape[1] if tp else 0,
            tp,
            lambdas,
            df.data_ptr(),
            u_new.data_ptr(),
            masks_new.data_ptr(),
            N,
            kind,
            self,
        )
        return FlatMergeResult(u_new, masks_new, torch.from_numpy(num), torch.from_numpy(den))

    # ------------------------------------------------------------------ decouple
    def _decouple_rows(
        self, u: torch.Tensor, packed: torch.Tensor, lams: Sequence[float], base: torch.Tensor | None
    ) -> torch.Tensor | None:
        lib = _lib()
        kind = _kind(u.dtype)
        bkind = _kind(base.dtype) if base is not None else 0
        if lib is None or kind is None or bkind is None:
            return None
        N = u.numel()
        K = packed.shape[0]
        uf = _flat(u)
        pk = packed.contiguous()
        bf = _flat(base) if base is not None else None
        lam32 = lambdas_f32(lams).astype(np.float32)
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
