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


@njit(cache=True)
def _signed(pos, b):
    """``+b`` if ``pos`` else ``-b``, but never ``-0.0``."""
    return b if (pos or b == 0.0) else -b


# ------------------------------------------------------------------ branch-free helpers
@njit(cache=True, inline="always")
def _sum8(x, n8):
    """Σ x[:n8] (``n8`` a multiple of 8) in 8 interleaved float64 chains: independent chains keep
    the adder pipeline full and vectorise without reassociating any one chain (no fastmath)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    for k in range(0, n8, 8):
        s0 += x[k]
        s1 += x[k + 1]
        s2 += x[k + 2]
        s3 += x[k + 3]
        s4 += x[k + 4]
        s5 += x[k + 5]
        s6 += x[k + 6]
        s7 += x[k + 7]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, inline="always")
def _pack_into(bits, out, row, b0, nbytes):
    """``out[row, b0 + b] = Σ_j bits[8b + j] << j`` (``bits`` uint8 0/1, little bit order)."""
    for b in range(nbytes):
        k = 8 * b
        out[row, b0 + b] = np.uint8(
            bits[k]
            | (bits[k + 1] << 1)
            | (bits[k + 2] << 2)
            | (bits[k + 3] << 3)
            | (bits[k + 4] << 4)
            | (bits[k + 5] << 5)
            | (bits[k + 6] << 6)
            | (bits[k + 7] << 7)
        )


@njit(cache=True, inline="always")
def _unpack_from(masks, row, b0, C, bits):
    """``bits[k] = bit k of the chunk's bytes of ``masks[row]`` (uint8 0/1)."""
    for k in range(C):
        bits[k] = (masks[row, b0 + (k >> 3)] >> (k & 7)) & 1


# ------------------------------------------------------------------ unify
@njit(parallel=True, cache=True)
def unify_kernel(deltas, kind, u, masks, num_part, den_part, chunk):
    """One pass over ``n`` deltas: elected sign (float64 sum in task order), ``u``, packed masks
    and per-chunk L1 partial sums ``num_part[c, i] = Σ|d_i|``, ``den_part[c, i] = Σ M_i |u|``."""
    n = len(deltas)
    N = u.shape[0]
    nchunks = (N + chunk - 1) // chunk
    for c in prange(nchunks):
        s = c * chunk
        e = min(N, s + chunk)
        C = e - s
        b0 = s // 8
        nbytes = (C + 7) // 8
        Cp = nbytes * 8  # padded: pad elements stay 0 and select nothing
        total = np.zeros(Cp, np.float64)
        for i in range(n):
            a = deltas[i]
            for k in range(C):
                total[k] += np.float64(_load(a, s + k, kind))
        sgn = np.empty(Cp, np.float64)
        for k in range(Cp):
            sgn[k] = 1.0 if total[k] > 0.0 else -1.0
        best = np.zeros(Cp, np.float64)
        absd = np.zeros(Cp, np.float64)
        agree = np.zeros((n, Cp), np.uint8)
        for i in range(n):
            a = deltas[i]
            ag = agree[i]
            for k in range(C):
                v = np.float64(_load(a, s + k, kind))
                av = abs(v)
                absd[k] = av
                g = v * sgn[k] > 0.0  # exact: sgn is ±1; zeros never agree
                ag[k] = g
                b = best[k]
                best[k] = av if (g and av > b) else b
            num_part[c, i] = _sum8(absd, Cp)
            _pack_into(ag, masks, i, b0, nbytes)
        for k in range(C):
            _store(u, s + k, _signed(sgn[k] > 0.0, best[k]), kind)
        for i in range(n):
            ag = agree[i]
            for k in range(Cp):
                absd[k] = best[k] if ag[k] else 0.0
            den_part[c, i] = _sum8(absd, Cp)


# ------------------------------------------------------------------ continual step
@njit(parallel=True, cache=True)
def add_task_kernel(u, kind, masks, lam_op, delta, u_new, masks_new, absu_part, num_new_part, den_part, chunk):
    """One continual step (see ``TorchBackend.add_task_flat`` for the math). ``lam_op`` holds the
    earlier rescalers rounded to opmath. ``absu_part[c, i] = Σ_{M_ik} |u_k|`` (times λ_i later),
    ``num_new_part[c] = Σ|d|``, ``den_part[c, i]`` for the ``tp + 1`` tasks."""
    tp = masks.shape[0]
    N = u.shape[0]
    nchunks = (N + chunk - 1) // chunk
    for c in prange(nchunks):
        s = c * chunk
        e = min(N, s + chunk)
        C = e - s
        b0 = s // 8
        nbytes = (C + 7) // 8
        Cp = nbytes * 8
        uv = np.zeros(Cp, np.float64)
        absu = np.zeros(Cp, np.float64)
        for k in range(C):
            x = np.float64(_load(u, s + k, kind))
            uv[k] = x
            absu[k] = abs(x)
        lam_sum = np.zeros(Cp, np.float64)
        lam_max = np.zeros(Cp, np.float64)
        bits = np.zeros(Cp, np.uint8)
        tmp = np.zeros(Cp, np.float64)
        for i in range(tp):
            li = lam_op[i]
            lm = li if li > 0.0 else 0.0
            _unpack_from(masks, i, b0, C, bits)
            for k in range(C):
                on = bits[k] != 0
                # adding +0.0 where the bit is clear leaves the task-order sum unchanged
                lam_sum[k] += li if on else 0.0
                m = lam_max[k]
                lam_max[k] = lm if (on and lm > m) else m
                tmp[k] = absu[k] if on else 0.0
            absu_part[c, i] = _sum8(tmp, Cp)
        best = np.zeros(Cp, np.float64)
        agree_u = np.zeros(Cp, np.uint8)
        agree_d = np.zeros(Cp, np.uint8)
        absd = np.zeros(Cp, np.float64)
        for k in range(C):
            x = uv[k]
            dv = np.float64(_load(delta, s + k, kind))
            pos = x * lam_sum[k] > -dv
            sg = 1.0 if pos else -1.0
            ad = dv * sg > 0.0
            au = x * sg > 0.0
            ab = abs(dv)
            absd[k] = ab
            bd = ab if ad else 0.0
            # λ·|u| rounds monotonically in λ: the largest surviving earlier expert uses max λ
            sc = _scale(u, absu[k], lam_max[k], kind)
            bk = sc if (au and sc > bd) else bd
            best[k] = bk
            agree_u[k] = au
            agree_d[k] = ad
            _store(u_new, s + k, _signed(pos, bk), kind)
        num_new_part[c] = _sum8(absd, Cp)
        _pack_into(agree_d, masks_new, tp, b0, nbytes)
        for k in range(Cp):
            tmp[k] = best[k] if agree_d[k] else 0.0
        den_part[c, tp] = _sum8(tmp, Cp)
        for i in range(tp):
            li = lam_op[i]
            alive = li > 0.0
            _unpack_from(masks, i, b0, C, bits)
            for k in range(C):
                on = bits[k] != 0 and agree_u[k] != 0 and alive and _scale(u, absu[k], li, kind) > 0.0
                bits[k] = on
                tmp[k] = best[k] if on else 0.0
            _pack_into(bits, masks_new, i, b0, nbytes)
            den_part[c, i] = _sum8(tmp, Cp)


# ------------------------------------------------------------------ decouple
@njit(parallel=True, cache=True)
def decouple_kernel(u, ukind, packed, lams, base, bkind, has_base, wide, out, chunk):
    """``out[r] = λ_r · M_r ⊙ u`` (``packed`` is ``[K, B]``, ``out`` ``[K, N]``), or
    ``base + λ_r · M_r ⊙ u`` rounded to ``base``'s type, the sum in float64 iff ``wide``."""
    K = packed.shape[0]
    N = u.shape[0]
    nchunks = (N + chunk - 1) // chunk
    for c in prange(nchunks):
        s = c * chunk
        e = min(N, s + chunk)
        for r in range(K):
            lam = lams[r]
            orow = out[r]
            for g in range(s, e):
                val = 0.0
                if (packed[r, g >> 3] >> (g & 7)) & 1:
                    val = _scale(u, _load(u, g, ukind), lam, ukind)
                if has_base:
                    bv = _load(base, g, bkind)
                    if wide:
                        _store(orow, g, np.float64(bv) + val, bkind)
                    else:
                        _store(orow, g, np.float32(bv) + np.float32(val), bkind)
                else:
                    _store(orow, g, val, ukind)
