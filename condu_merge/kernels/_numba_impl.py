"""Numba kernels behind :mod:`condu_merge.kernels.numba_backend` (imported only when numba is).

Every kernel works chunk by chunk (``prange`` over chunks of ``chunk`` elements, a multiple of 8
so a chunk owns whole mask bytes). Inside a chunk the loops run task-major over data that stays
in cache, so each input byte comes from memory once. Per-chunk partial sums go to
``[nchunks, n]`` float64 arrays that the caller reduces.

Element types: float32 and float64 arrays are used as is; fp16 and bf16 arrays arrive as
``uint16`` bit patterns with ``kind`` saying which (numba has no bf16), and are converted here
exactly as torch converts them (fp16/bf16 -> fp32 exact; fp32 -> fp16/bf16 round to nearest even).
``fastmath`` stays off: the numeric contract (see :mod:`condu_merge.backends.base`) relies on
IEEE float64 sums in task order and on comparisons, which reassociation would break.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

KIND_NATIVE = 0  # float32 / float64 arrays
KIND_F16 = 1  # uint16 holding IEEE binary16
KIND_BF16 = 2  # uint16 holding bfloat16

_TWO_M24 = np.float32(2.0**-24)


# ------------------------------------------------------------------ bit conversions
@njit(cache=True)
def f16_bits_to_f32(h):
    """binary16 bits -> float32 (exact; subnormals, inf and NaN payloads kept)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        bits = sign | 0x7F800000 | (m << 13)
    elif e == 0:
        if m == 0:
            bits = sign
        else:
            v = np.float32(m) * _TWO_M24  # m * 2^-24 is a normal float32: exact
            return -v if sign else v
    else:
        bits = sign | ((e + 112) << 23) | (m << 13)
    return np.uint32(bits).view(np.float32)


@njit(cache=True)
def f32_to_f16_bits(v):
    """float32 -> binary16 bits, round to nearest even (as ``torch.Tensor.half``)."""
    x = np.int64(np.float32(v).view(np.uint32))
    sign = (x >> 16) & 0x8000
    x = x & 0x7FFFFFFF
    if x >= 0x7F800000:  # inf / nan
        return sign | 0x7C00 | (0x200 if x > 0x7F800000 else 0)
    if x >= 0x477FF000:  # >= 65520 rounds to inf
        return sign | 0x7C00
    if x < 0x38800000:  # below the smallest normal half: subnormal or zero
        if x < 0x33000000:  # <= 2^-25 (a tie with 0 goes to even 0)
            return sign
        e = x >> 23
        m = (x & 0x7FFFFF) | 0x800000
        shift = 126 - e  # value / 2^-24 = m >> shift
        q = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (q & 1)):
            q += 1
        return sign | q
    x = x + 0xFFF + ((x >> 13) & 1)
    return sign | ((x - 0x38000000) >> 13)


@njit(cache=True)
def bf16_bits_to_f32(h):
    return np.uint32(np.int64(h) << 16).view(np.float32)


@njit(cache=True)
def f32_to_bf16_bits(v):
    """float32 -> bfloat16 bits, round to nearest even (as torch's ``round_to_nearest_even``)."""
    x = np.int64(np.float32(v).view(np.uint32))
    if (x & 0x7FFFFFFF) > 0x7F800000:
        return 0x7FC0
    return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16) & 0xFFFF


# ------------------------------------------------------------------ typed element access
def _load(a, k, kind):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_load, inline="always")
def _ol_load(a, k, kind):
    """``a[k]`` in its opmath type (float64 for float64 arrays, float32 otherwise)."""
    if a.dtype == types.uint16:

        def impl(a, k, kind):
            if kind == KIND_BF16:
                return bf16_bits_to_f32(a[k])
            return f16_bits_to_f32(a[k])

        return impl
    if a.dtype == types.float64:
        return lambda a, k, kind: a[k]
    if a.dtype == types.float32:
        return lambda a, k, kind: a[k]
    return None


def _round(a, x, kind):  # pragma: no cover
    raise NotImplementedError


@overload(_round, inline="always")
def _ol_round(a, x, kind):
    """``x`` (float64 or float32) rounded to ``a``'s element type, returned as float64.
    For float32/half arrays ``x`` must already be a float32 (opmath) value."""
    if a.dtype == types.uint16:

        def impl(a, x, kind):
            if kind == KIND_BF16:
                return np.float64(bf16_bits_to_f32(f32_to_bf16_bits(np.float32(x))))
            return np.float64(f16_bits_to_f32(f32_to_f16_bits(np.float32(x))))

        return impl
    if a.dtype == types.float64:
        return lambda a, x, kind: np.float64(x)
    if a.dtype == types.float32:
        return lambda a, x, kind: np.float64(np.float32(x))
    return None


def _store(a, k, x, kind):  # pragma: no cover
    raise NotImplementedError


@overload(_store, inline="always")
def _ol_store(a, k, x, kind):
    """``a[k] = x`` for an ``x`` already representable in ``a``'s type (or float32 for halves)."""
    if a.dtype == types.uint16:

        def impl(a, k, x, kind):
            if kind == KIND_BF16:
                a[k] = np.uint16(f32_to_bf16_bits(np.float32(x)))
            else:
                a[k] = np.uint16(f32_to_f16_bits(np.float32(x)))

        return impl
    if a.dtype == types.float64:

        def impl64(a, k, x, kind):
            a[k] = np.float64(x)

        return impl64
    if a.dtype == types.float32:

        def impl32(a, k, x, kind):
            a[k] = np.float32(x)

        return impl32
    return None


def _scale(a, x, lam, kind):  # pragma: no cover
    raise NotImplementedError


@overload(_scale, inline="always")
def _ol_scale(a, x, lam, kind):
    """``round_to_dtype(opmath(x) * opmath(lam))`` for ``a``'s dtype, as float64 (sign kept)."""
    if a.dtype == types.float64:
        return lambda a, x, lam, kind: np.float64(x) * np.float64(lam)

    def impl(a, x, lam, kind):
        return _round(a, np.float32(x) * np.float32(lam), kind)

    return impl


def _survives(a, x, lam, kind):  # pragma: no cover
    raise NotImplementedError


@overload(_survives, inline="always")
def _ol_survives(a, x, lam, kind):
    """``_scale(a, x, lam, kind) > 0`` for ``x, lam >= 0`` without the round trip through a half
    type: rounding to the dtype is monotone, so the rounded product is ``> 0`` iff the opmath
    product exceeds the largest float32 that rounds to ``+0`` (fp16: ``2^-25``, a tie that goes to
    even 0; bf16: the float32 with bits ``0x8000``, likewise; fp32: ``0``). NaN stays false."""
    if a.dtype == types.float64:
        return lambda a, x, lam, kind: np.float64(x) * np.float64(lam) > 0.0
    if a.dtype == types.float32:
        return lambda a, x, lam, kind: np.float32(x) * np.float32(lam) > np.float32(0.0)

    def impl(a, x, lam, kind):
        cut = _BF16_ZERO_CUT if kind == KIND_BF16 else _F16_ZERO_CUT
        return np.float32(x) * np.float32(lam) > cut

    return impl


_F16_ZERO_CUT = np.float32(2.0**-25)
_BF16_ZERO_CUT = np.uint32(0x8000).view(np.float32)


@njit(cache=True)
def _signed(pos, b):
    """``+b`` if ``pos`` else ``-b``, but never ``-0.0``."""
    return b if (pos or b == 0.0) else -b


# ------------------------------------------------------------------ reductions and bit packing
# The two sums below carry ``fastmath={"reassoc"}`` (and nothing else: NaN/Inf must survive, they
# are how non-finite deltas are detected) so LLVM may vectorise them. The numeric contract asks
# the L1 sums for 1e-6 relative only; the flag lives on these non-inlined functions alone, so it
# cannot reach the election sums or comparisons of the kernels that call them.
@njit(cache=True, fastmath={"reassoc"})
def _abs_sum(x, n):
    """Σ_{k<n} |x[k]| in float64 (any summation order)."""
    s = 0.0
    for k in range(n):
        s += abs(np.float64(x[k]))
    return s


@njit(cache=True, fastmath={"reassoc"})
def _masked_sum(x, m, n):
    """Σ_{k<n, m[k]} x[k] in float64 (any summation order)."""
    s = 0.0
    for k in range(n):
        s += np.float64(x[k]) if m[k] else 0.0
    return s


@njit(cache=True, fastmath={"reassoc"})
def _add_abs_sum(total, x, n, first):
    """``total[k] (=|+=) float64(x[k])`` for ``k < n``, returning ``Σ|x[k]|`` (any order).

    ``reassoc`` may reorder the returned sum only: each ``total[k]`` update is a single addition
    of a loaded value and a converted one (no chain of additions it could regroup), so the
    caller's per-element election sum keeps its task order bit for bit."""
    s = 0.0
    if first:
        for k in range(n):
            v = np.float64(x[k])
            total[k] = v
            s += abs(v)
    else:
        for k in range(n):
            v = np.float64(x[k])
            total[k] = total[k] + v
            s += abs(v)
    return s


# 0/1 bytes b_0..b_7 read as one little-endian uint64 x: (x * _PACK) >> 56 = Σ b_j << j. Each
# product term lands on its own bit (positions 56 + 8j - 7m are distinct), so nothing carries
# into the top byte.
_PACK = np.uint64(0x0102040810204080)
# byte b -> 8 bytes holding bit j of b in byte j: broadcast, keep bit j in byte j, then +0x7F
# sets bit 7 of a byte iff it is nonzero (no byte overflows, so nothing carries across bytes)
_BCAST = np.uint64(0x0101010101010101)
_SEL = np.uint64(0x8040201008040201)
_ADD7F = np.uint64(0x7F7F7F7F7F7F7F7F)


@njit(cache=True, inline="always")
def _pack_row(bits, out, nbytes):
    """``out[b] = Σ_j bits[8b + j] << j`` (``bits`` uint8 0/1 of length ``8·nbytes``, little bit
    order): one multiply per byte, vectorisable. Assumes a little-endian host (x86-64, arm64)."""
    w = bits.view(np.uint64)
    for b in range(nbytes):
        out[b] = np.uint8((w[b] * _PACK) >> np.uint64(56))


@njit(cache=True, inline="always")
def _unpack_row(packed, bits, nbytes):
    """``bits[8b + j] = (packed[b] >> j) & 1`` (uint8 0/1), the inverse of :func:`_pack_row`."""
    w = bits.view(np.uint64)
    for b in range(nbytes):
        y = (np.uint64(packed[b]) * _BCAST) & _SEL
        w[b] = ((y + _ADD7F) >> np.uint64(7)) & _BCAST


# ------------------------------------------------------------------ rows and scratch
# A kernel reads each input chunk as a row in its opmath type. For float32/float64 arrays that
# is the array itself (a view: nothing copied, nothing zero-filled); fp16/bf16 bit patterns are
# converted once per chunk into a float32 scratch row (exact) that later passes reuse.
def _half_stage(a, rows, cols):  # pragma: no cover
    raise NotImplementedError


@overload(_half_stage, inline="always")
def _ol_half_stage(a, rows, cols):
    """Uninitialised float32 ``[rows, cols]`` scratch for converted half rows (``[1, 1]`` when
    ``a`` is float32/float64: such rows are read in place)."""
    if a.dtype == types.uint16:
        return lambda a, rows, cols: np.empty((rows, cols), np.float32)
    return lambda a, rows, cols: np.empty((1, 1), np.float32)


def _opm_empty(a, cols):  # pragma: no cover
    raise NotImplementedError


@overload(_opm_empty, inline="always")
def _ol_opm_empty(a, cols):
    """An uninitialised row in ``a``'s opmath type (float64 for float64, float32 otherwise)."""
    if a.dtype == types.float64:
        return lambda a, cols: np.empty(cols, np.float64)
    return lambda a, cols: np.empty(cols, np.float32)


def _convert_row(a, s, e, kind, hst, r):  # pragma: no cover
    raise NotImplementedError


@overload(_convert_row, inline="always")
def _ol_convert_row(a, s, e, kind, hst, r):
    """``a[s:e]`` in opmath: the slice itself, or (halves) converted into ``hst[r]``."""
    if a.dtype == types.uint16:

        def impl(a, s, e, kind, hst, r):
            row = hst[r]
            C = e - s
            if kind == KIND_BF16:
                for k in range(C):
                    row[k] = bf16_bits_to_f32(a[s + k])
            else:
                for k in range(C):
                    row[k] = f16_bits_to_f32(a[s + k])
            return row[:C]

        return impl
    return lambda a, s, e, kind, hst, r: a[s:e]


def _reuse_row(a, s, e, hst, r):  # pragma: no cover
    raise NotImplementedError


@overload(_reuse_row, inline="always")
def _ol_reuse_row(a, s, e, hst, r):
    """The row :func:`_convert_row` gave for the same arguments, without converting again."""
    if a.dtype == types.uint16:
        return lambda a, s, e, hst, r: hst[r][: e - s]
    return lambda a, s, e, hst, r: a[s:e]


@njit(cache=True, fastmath={"reassoc"})
def _bit_sums(x, y, idx, bit, n):
    """``(Σ x[k], Σ y[k])`` over ``k < n`` with ``idx[k] & bit`` set, in float64 (any order)."""
    s = 0.0
    t = 0.0
    for k in range(n):
        on = (idx[k] & bit) != 0
        s += np.float64(x[k]) if on else 0.0
        t += np.float64(y[k]) if on else 0.0
    return s, t


@njit(cache=True, inline="always")
def _transpose8(x):
    """8x8 bit transpose of a uint64 read as bytes (rows) of bits (columns, LSB first): byte
    ``m`` of the result holds bit ``m`` of input byte ``j`` at bit ``j``."""
    t = (x ^ (x >> np.uint64(7))) & np.uint64(0x00AA00AA00AA00AA)
    x = x ^ t ^ (t << np.uint64(7))
    t = (x ^ (x >> np.uint64(14))) & np.uint64(0x0000CCCC0000CCCC)
    x = x ^ t ^ (t << np.uint64(14))
    t = (x ^ (x >> np.uint64(28))) & np.uint64(0x00000000F0F0F0F0)
    return x ^ t ^ (t << np.uint64(28))


@njit(cache=True, inline="always")
def _split(ngroups, nchunks, g):
    """Chunks ``[c0, c1)`` of run ``g`` of ``ngroups`` (consecutive, sizes differing by <= 1)."""
    return g * nchunks // ngroups, (g + 1) * nchunks // ngroups


# ------------------------------------------------------------------ unify
@njit(cache=True)
def _unify_chunk(deltas, kind, u, masks, num_part, den_part, chunk, c, hst, total, best, sg, agree):
    """Chunk ``c`` of :func:`unify_kernel`, in scratch rows owned by the caller (a plain serial
    function: numba's parfor lowering of a ``prange`` body does not vectorise these loops)."""
    n = len(deltas)
    N = u.shape[0]
    s = c * chunk
    e = min(N, s + chunk)
    C = e - s
    b0 = s // 8
    nbytes = (C + 7) // 8
    Cp = nbytes * 8
    # pass 1, task-outer: the election sum in float64 *in task order* per element, and Σ|d_i|,
    # in one sweep per task (see _add_abs_sum)
    for i in range(n):
        x = _convert_row(deltas[i], s, e, kind, hst, i)
        num_part[c, i] = _add_abs_sum(total, x, C, i == 0)
    # the elected sign as an opmath +-1 row: v * sg > 0 is exactly "v has the elected sign"
    # (the product is exact; zeros and NaN never agree), a branch-free compare
    sg[0] = 1.0
    one = sg[0]  # 1 and 0 in the opmath type: no float64 promotion in the loops below
    zero = one - one
    for k in range(C):
        sg[k] = one if total[k] > 0.0 else -one
    # pass 2: agree bytes and the running max magnitude, two tasks per sweep (max is exact and
    # order-free here: a magnitude that does not agree is +0, never NaN), then the packed rows
    x0 = _reuse_row(deltas[0], s, e, hst, 0)
    ag0 = agree[0]
    for k in range(C):
        v = x0[k]
        g = v * sg[k] > zero
        ag0[k] = g
        best[k] = abs(v) if g else zero
    i = 1
    while i + 1 < n:
        x0 = _reuse_row(deltas[i], s, e, hst, i)
        x1 = _reuse_row(deltas[i + 1], s, e, hst, i + 1)
        ag0 = agree[i]
        ag1 = agree[i + 1]
        for k in range(C):
            v0 = x0[k]
            v1 = x1[k]
            sk = sg[k]
            g0 = v0 * sk > zero
            g1 = v1 * sk > zero
            ag0[k] = g0
            ag1[k] = g1
            a0 = abs(v0) if g0 else zero
            a1 = abs(v1) if g1 else zero
            best[k] = max(best[k], max(a0, a1))
        i += 2
    if i < n:
        x0 = _reuse_row(deltas[i], s, e, hst, i)
        ag0 = agree[i]
        for k in range(C):
            v = x0[k]
            g = v * sg[k] > zero
            ag0[k] = g
            av = abs(v) if g else zero
            best[k] = max(best[k], av)
    for i in range(n):
        ag = agree[i]
        for k in range(C, Cp):
            ag[k] = 0  # pad bits of the last byte select nothing
        _pack_row(ag, masks[i, b0 : b0 + nbytes], nbytes)
    uc = u[s:e]
    for k in range(C):
        b = best[k]
        val = b * sg[k] if b != zero else b  # +0.0 where nothing agrees
        _store(uc, k, val, kind)
    for i in range(n):
        den_part[c, i] = _masked_sum(best, agree[i], C)


@njit(cache=True)
def _unify_range(deltas, kind, u, masks, num_part, den_part, chunk, c0, c1):
    """Chunks ``c0 .. c1-1`` of :func:`unify_kernel`; the scratch is allocated once for all of
    them and never zero-filled (every row is written before it is read)."""
    n = len(deltas)
    hst = _half_stage(deltas[0], n, chunk)
    total = np.empty(chunk, np.float64)
    best = _opm_empty(u, chunk)
    sg = _opm_empty(u, chunk)
    agree = np.empty((n, chunk), np.uint8)
    for c in range(c0, c1):
        _unify_chunk(deltas, kind, u, masks, num_part, den_part, chunk, c, hst, total, best, sg, agree)


@njit(parallel=True, cache=True)
def unify_kernel(deltas, kind, u, masks, num_part, den_part, chunk, ngroups):
    """One pass over ``n`` deltas: elected sign (float64 sum in task order), ``u``, packed masks
    and per-chunk L1 partial sums ``num_part[c, i] = Σ|d_i|``, ``den_part[c, i] = Σ M_i |u|``.

    ``prange`` over ``ngroups`` runs of consecutive chunks (a few per thread: each run allocates
    its scratch once); per chunk every loop is task-outer / element-inner over contiguous,
    cache-resident rows, so LLVM vectorises it, while each element's election sum is still
    accumulated in task order."""
    nchunks = (u.shape[0] + chunk - 1) // chunk
    for g in prange(ngroups):
        c0, c1 = _split(ngroups, nchunks, g)
        _unify_range(deltas, kind, u, masks, num_part, den_part, chunk, c0, c1)


@njit(cache=True)
def unify_kernel_serial(deltas, kind, u, masks, num_part, den_part, chunk, ngroups):
    """:func:`unify_kernel` on the calling thread (small tensors: no thread hand-off)."""
    nchunks = (u.shape[0] + chunk - 1) // chunk
    _unify_range(deltas, kind, u, masks, num_part, den_part, chunk, 0, nchunks)


# ------------------------------------------------------------------ continual step
@njit(cache=True)
def lam_tables(lam_op):
    """Per group of 8 earlier tasks, ``sums[g, b] = Σ_{j: bit j of b} λ_{8g+j}`` (float64, task
    order) and ``maxs[g, b] = max(0, max_{j: bit j of b} λ_{8g+j})``. Used only when every
    partial sum of the λ's is exact in float64 (see ``NumbaBackend``), so adding table entries
    gives the task-order sum bit for bit."""
    tp = lam_op.shape[0]
    G = (tp + 7) // 8
    sums = np.zeros((max(G, 1), 256), np.float64)
    maxs = np.zeros((max(G, 1), 256), np.float64)
    for g in range(G):
        for b in range(256):
            s = 0.0
            m = 0.0
            for j in range(min(8, tp - 8 * g)):
                if (b >> j) & 1:
                    li = lam_op[8 * g + j]
                    s += li
                    lm = li if li > 0.0 else 0.0
                    m = lm if lm > m else m
            sums[g, b] = s
            maxs[g, b] = m
    return sums, maxs


@njit(cache=True, inline="always")
def _step_elem(u, kind, x, d, ak, ls, lm, k, best, bestu, agu, agd, nc):
    """Element ``k`` of the continual step: sign from ``float64(u)·Λ > -d``, the new ``u``, the
    agree bytes of ``u`` and ``d``, ``best`` and ``best·[u agrees]`` (for the earlier den's)."""
    pos = x * ls > -d
    ad = (d > 0.0) if pos else (d < 0.0)
    au = (x > 0.0) if pos else (x < 0.0)
    ab = abs(d)
    bd = ab if ad else 0.0
    # λ·|u| rounds monotonically in λ: the largest surviving earlier expert uses max λ
    sc = _scale(u, ak, lm, kind)
    bk = sc if (au and sc > bd) else bd
    best[k] = bk
    bestu[k] = bk if au else 0.0
    agu[k] = au
    agd[k] = ad
    _store(nc, k, _signed(pos, bk), kind)


@njit(cache=True)
def _step_rows(u, kind, uv, dv, absu, lam_sum, lam_max, best, bestu, agu, agd, nc, C):
    """The element loop with ``Λ`` and ``max λ`` from rows."""
    for k in range(C):
        _step_elem(
            u, kind, np.float64(uv[k]), np.float64(dv[k]), absu[k], lam_sum[k], lam_max[k], k, best, bestu, agu, agd, nc
        )


@njit(cache=True)
def _add_task_chunk(
    u,
    kind,
    masks,
    lam_op,
    delta,
    u_new,
    masks_new,
    absu_part,
    num_new_part,
    den_part,
    chunk,
    c,
    use_lut,
    lut_sum,
    lut_max,
    hst,
    absu,
    lam_sum,
    lam_max,
    best,
    bestu,
    agu,
    agd,
    aub,
    idx,
    bits,
):
    """Chunk ``c`` of :func:`add_task_kernel` (serial; see :func:`_unify_chunk` for why)."""
    tp = masks.shape[0]
    G = (tp + 7) // 8
    N = u.shape[0]
    s = c * chunk
    e = min(N, s + chunk)
    C = e - s
    b0 = s // 8
    nbytes = (C + 7) // 8
    Cp = nbytes * 8
    uv = _convert_row(u, s, e, kind, hst, 0)
    dv = _convert_row(delta, s, e, kind, hst, 1)
    # |u|, and the smallest nonzero |u| of the chunk: if it survives λ_i, every nonzero one does
    # (the rounded product is monotone in |u|), so the survival test drops out for task i
    amin = np.inf
    for k in range(C):
        a = abs(uv[k])
        absu[k] = a
        amin = a if (a > 0.0 and a < amin) else amin
    # the earlier masks bit-transposed, 8 tasks per byte: idx[g, k] bit j = M_{8g+j, k}
    for g in range(G):
        w = idx[g].view(np.uint64)
        jn = min(8, tp - 8 * g)
        if jn == 8:  # a full group: the byte gather unrolls
            m0 = masks[8 * g, b0 : b0 + nbytes]
            m1 = masks[8 * g + 1, b0 : b0 + nbytes]
            m2 = masks[8 * g + 2, b0 : b0 + nbytes]
            m3 = masks[8 * g + 3, b0 : b0 + nbytes]
            m4 = masks[8 * g + 4, b0 : b0 + nbytes]
            m5 = masks[8 * g + 5, b0 : b0 + nbytes]
            m6 = masks[8 * g + 6, b0 : b0 + nbytes]
            m7 = masks[8 * g + 7, b0 : b0 + nbytes]
            for b in range(nbytes):
                x = (
                    np.uint64(m0[b])
                    | (np.uint64(m1[b]) << np.uint64(8))
                    | (np.uint64(m2[b]) << np.uint64(16))
                    | (np.uint64(m3[b]) << np.uint64(24))
                    | (np.uint64(m4[b]) << np.uint64(32))
                    | (np.uint64(m5[b]) << np.uint64(40))
                    | (np.uint64(m6[b]) << np.uint64(48))
                    | (np.uint64(m7[b]) << np.uint64(56))
                )
                w[b] = _transpose8(x)
        else:
            for b in range(nbytes):
                x = np.uint64(0)
                for j in range(jn):
                    x |= np.uint64(masks[8 * g + j, b0 + b]) << np.uint64(8 * j)
                w[b] = _transpose8(x)
    # Λ_k = Σ_{i: M_ik} λ_i (float64, task order) and the largest surviving λ: with the tables,
    # one lookup per 8 tasks (a separate loop: fused into the element loop it ran 2x slower)
    if use_lut and G == 2:  # up to 16 earlier tasks: both lookups in one loop (2.2x faster)
        i0 = idx[0]
        i1 = idx[1]
        t0s = lut_sum[0]
        t0m = lut_max[0]
        t1s = lut_sum[1]
        t1m = lut_max[1]
        for k in range(C):
            a = i0[k]
            b = i1[k]
            lam_sum[k] = t0s[a] + t1s[b]  # exact: the grouping cannot change Λ
            x = t0m[a]
            y = t1m[b]
            lam_max[k] = x if x > y else y
    elif use_lut:
        i0 = idx[0]
        t0s = lut_sum[0]
        t0m = lut_max[0]
        for k in range(C):
            lam_sum[k] = t0s[i0[k]]
            lam_max[k] = t0m[i0[k]]
        for g in range(1, G):
            ig = idx[g]
            ts = lut_sum[g]
            tm = lut_max[g]
            for k in range(C):
                lam_sum[k] += ts[ig[k]]
                m = tm[ig[k]]
                lam_max[k] = m if m > lam_max[k] else lam_max[k]
    else:
        for k in range(C):
            lam_sum[k] = 0.0
            lam_max[k] = 0.0
        for i in range(tp):
            li = lam_op[i]
            lm = li if li > 0.0 else 0.0
            ig = idx[i // 8]
            bit = np.uint8(1 << (i % 8))
            for k in range(C):
                on = (ig[k] & bit) != 0
                # adding +0.0 where the bit is clear leaves the task-order sum unchanged
                lam_sum[k] += li if on else 0.0
                m = lam_max[k]
                lam_max[k] = lm if (on and lm > m) else m
    nc = u_new[s:e]
    _step_rows(u, kind, uv, dv, absu, lam_sum, lam_max, best, bestu, agu, agd, nc, C)
    for k in range(C, Cp):
        agu[k] = 0  # pad bits select nothing (the earlier rows' pad bits are not trusted)
        agd[k] = 0
    _pack_row(agd, masks_new[tp, b0 : b0 + nbytes], nbytes)
    _pack_row(agu, aub, nbytes)
    den_part[c, tp] = _masked_sum(best, agd, C)
    num_new_part[c] = _abs_sum(dv, C)
    for i in range(tp):
        li = lam_op[i]
        ig = idx[i // 8]
        bit = np.uint8(1 << (i % 8))
        old = masks[i, b0 : b0 + nbytes]
        new = masks_new[i, b0 : b0 + nbytes]
        if li > 0.0 and _survives(u, amin, li, kind):
            # new bit = old bit & u agrees (agree_u implies u_k != 0, so λ_i|u_k| survives):
            # one AND per mask byte; den_i over the old bits of best·[u agrees]
            for b in range(nbytes):
                new[b] = old[b] & aub[b]
            absu_part[c, i], den_part[c, i] = _bit_sums(absu, bestu, ig, bit, C)
        elif li > 0.0:
            for k in range(C):
                bits[k] = ((ig[k] & bit) != 0) & (agu[k] != 0) & _survives(u, absu[k], li, kind)
            for k in range(C, Cp):
                bits[k] = 0
            _pack_row(bits, new, nbytes)
            absu_part[c, i] = _bit_sums(absu, bestu, ig, bit, C)[0]
            den_part[c, i] = _masked_sum(best, bits, C)
        else:
            for b in range(nbytes):
                new[b] = 0
            absu_part[c, i] = _bit_sums(absu, bestu, ig, bit, C)[0]
            den_part[c, i] = 0.0


@njit(cache=True)
def _add_task_range(
    u,
    kind,
    masks,
    lam_op,
    delta,
    u_new,
    masks_new,
    absu_part,
    num_new_part,
    den_part,
    chunk,
    use_lut,
    lut_sum,
    lut_max,
    c0,
    c1,
):
    """Chunks ``c0 .. c1-1`` of :func:`add_task_kernel` with scratch allocated once."""
    tp = masks.shape[0]
    G = (tp + 7) // 8
    hst = _half_stage(u, 2, chunk)
    absu = _opm_empty(u, chunk)
    lam_sum = np.empty(chunk, np.float64)
    lam_max = np.empty(chunk, np.float64)
    best = np.empty(chunk, np.float64)
    bestu = np.empty(chunk, np.float64)
    agu = np.empty(chunk, np.uint8)
    agd = np.empty(chunk, np.uint8)
    aub = np.empty(chunk // 8, np.uint8)
    idx = np.empty((max(G, 1), chunk), np.uint8)
    bits = np.empty(chunk, np.uint8)
    for c in range(c0, c1):
        _add_task_chunk(
            u,
            kind,
            masks,
            lam_op,
            delta,
            u_new,
            masks_new,
            absu_part,
            num_new_part,
            den_part,
            chunk,
            c,
            use_lut,
            lut_sum,
            lut_max,
            hst,
            absu,
            lam_sum,
            lam_max,
            best,
            bestu,
            agu,
            agd,
            aub,
            idx,
            bits,
        )


@njit(parallel=True, cache=True)
def add_task_kernel(
    u,
    kind,
    masks,
    lam_op,
    delta,
    u_new,
    masks_new,
    absu_part,
    num_new_part,
    den_part,
    chunk,
    ngroups,
    use_lut,
    lut_sum,
    lut_max,
):
    """One continual step (see ``TorchBackend.add_task_flat`` for the math). ``lam_op`` holds the
    earlier rescalers rounded to opmath. ``absu_part[c, i] = Σ_{M_ik} |u_k|`` (times λ_i later),
    ``num_new_part[c] = Σ|d|``, ``den_part[c, i]`` for the ``tp + 1`` tasks.

    Per chunk the earlier masks are bit-transposed once (8 tasks per byte per element), so
    ``Λ_k`` and ``max λ`` come from two table lookups per 8 tasks when ``use_lut`` (exact, see
    :func:`lam_tables`), else from a task-order loop over the transposed bits; the new masks of
    the earlier tasks are one AND per byte with the packed "u agrees" row."""
    nchunks = (u.shape[0] + chunk - 1) // chunk
    for g in prange(ngroups):
        c0, c1 = _split(ngroups, nchunks, g)
        _add_task_range(
            u,
            kind,
            masks,
            lam_op,
            delta,
            u_new,
            masks_new,
            absu_part,
            num_new_part,
            den_part,
            chunk,
            use_lut,
            lut_sum,
            lut_max,
            c0,
            c1,
        )


@njit(cache=True)
def add_task_kernel_serial(
    u,
    kind,
    masks,
    lam_op,
    delta,
    u_new,
    masks_new,
    absu_part,
    num_new_part,
    den_part,
    chunk,
    ngroups,
    use_lut,
    lut_sum,
    lut_max,
):
    """:func:`add_task_kernel` on the calling thread."""
    nchunks = (u.shape[0] + chunk - 1) // chunk
    _add_task_range(
        u,
        kind,
        masks,
        lam_op,
        delta,
        u_new,
        masks_new,
        absu_part,
        num_new_part,
        den_part,
        chunk,
        use_lut,
        lut_sum,
        lut_max,
        0,
        nchunks,
    )


# ------------------------------------------------------------------ decouple
@njit(cache=True)
def _decouple_chunk(u, ukind, packed, lams, base, bkind, has_base, wide, out, chunk, c, hst, bv, bits):
    """Chunk ``c`` of :func:`decouple_kernel` (serial; see :func:`_unify_chunk` for why)."""
    K = packed.shape[0]
    N = u.shape[0]
    s = c * chunk
    e = min(N, s + chunk)
    C = e - s
    b0 = s // 8
    nbytes = (C + 7) // 8
    uv = _convert_row(u, s, e, ukind, hst, 0)
    if has_base:
        bc = base[s:e]
        for k in range(C):
            bv[k] = np.float64(_load(bc, k, bkind))
    for r in range(K):
        lam = lams[r]
        oc = out[r, s:e]
        _unpack_row(packed[r, b0 : b0 + nbytes], bits, nbytes)
        if not has_base:
            for k in range(C):
                sc = _scale(u, uv[k], lam, ukind)
                val = sc if bits[k] else 0.0
                _store(oc, k, val, ukind)
        elif wide:
            for k in range(C):
                sc = _scale(u, uv[k], lam, ukind)
                val = sc if bits[k] else 0.0
                _store(oc, k, bv[k] + val, bkind)
        else:
            for k in range(C):
                sc = _scale(u, uv[k], lam, ukind)
                val = sc if bits[k] else 0.0
                _store(oc, k, np.float32(bv[k]) + np.float32(val), bkind)


@njit(cache=True)
def _decouple_range(u, ukind, packed, lams, base, bkind, has_base, wide, out, chunk, c0, c1):
    hst = _half_stage(u, 1, chunk)
    bv = np.empty(chunk, np.float64)
    bits = np.empty(chunk, np.uint8)
    for c in range(c0, c1):
        _decouple_chunk(u, ukind, packed, lams, base, bkind, has_base, wide, out, chunk, c, hst, bv, bits)


@njit(parallel=True, cache=True)
def decouple_kernel(u, ukind, packed, lams, base, bkind, has_base, wide, out, chunk, ngroups):
    """``out[r] = λ_r · M_r ⊙ u`` (``packed`` is ``[K, B]``, ``out`` ``[K, N]``), or
    ``base + λ_r · M_r ⊙ u`` rounded to ``base``'s type, the sum in float64 iff ``wide``.

    Per chunk ``u`` (and ``base``) are converted once, each row's bits unpacked once, and the
    element loops are branch-free selects (vectorisable); the three cases get separate loops.
    (A conditional expression passed straight to an ``inline="always"`` overload such as
    ``_store`` is miscompiled by numba 0.68 -- it stored zeros here -- hence the ``val`` temporaries.)"""
    nchunks = (u.shape[0] + chunk - 1) // chunk
    for g in prange(ngroups):
        c0, c1 = _split(ngroups, nchunks, g)
        _decouple_range(u, ukind, packed, lams, base, bkind, has_base, wide, out, chunk, c0, c1)


@njit(cache=True)
def decouple_kernel_serial(u, ukind, packed, lams, base, bkind, has_base, wide, out, chunk, ngroups):
    """:func:`decouple_kernel` on the calling thread."""
    nchunks = (u.shape[0] + chunk - 1) // chunk
    _decouple_range(u, ukind, packed, lams, base, bkind, has_base, wide, out, chunk, 0, nchunks)
