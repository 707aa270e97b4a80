"""The numba backend against the torch reference: bit-exact masks and u, sums to 1e-6."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

import condu_merge as cm
from condu_merge.kernels import decouple_many
from condu_merge.kernels.conformance import DTYPES, REF, assert_same_tensor, check_backend
from condu_merge.kernels.numba_backend import NumbaBackend

BE = NumbaBackend(chunk=64)  # many chunks and a ragged last one even on small tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,N", [(1, 1), (2, 7), (3, 8), (5, 65), (11, 1000), (12, 523)])
def test_numba_matches_torch(dtype, n, N):
    check_backend(BE, dtype, n, N, seed=n * 1000 + N)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style", ["ties", "tiny"])
def test_numba_ties_zeros_underflow(dtype, style):
    check_backend(BE, dtype, 6, 333, seed=7, style=style)


def test_default_chunk_large_tensor():
    check_backend(NumbaBackend(chunk=4096), torch.float32, 4, 20_003, seed=3)


def test_empty_tensor():
    res = BE.unify_flat([torch.empty(0), torch.empty(0)])
    assert res.u.numel() == 0 and res.masks.shape == (2, 0) and res.num.tolist() == [0.0, 0.0]


# ------------------------------------------------------------------ half conversions
def _impl():
    from condu_merge.kernels import _numba_impl

    return _impl_cache.setdefault("m", _numba_impl)


_impl_cache: dict = {}


def test_f16_to_f32_exhaustive():
    from numba import njit

    m = _impl()

    @njit
    def conv(h, out):
        for k in range(h.shape[0]):
            out[k] = m.f16_bits_to_f32(h[k])

    h = np.arange(65536, dtype=np.uint16)
    out = np.empty(65536, np.float32)
    conv(h, out)
    ref = torch.from_numpy(h.view(np.int16).copy()).view(torch.float16).float()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.from_numpy(out)[finite].view(torch.int32), ref[finite].view(torch.int32))
    assert torch.equal(torch.isnan(torch.from_numpy(out)), torch.isnan(ref))


@pytest.mark.parametrize("target", [torch.float16, torch.bfloat16], ids=str)
def test_f32_to_half_rounding(target):
    from numba import njit

    m = _impl()
    fn = m.f32_to_f16_bits if target == torch.float16 else m.f32_to_bf16_bits

    @njit
    def conv(x, out):
        for k in range(x.shape[0]):
            out[k] = fn(x[k])

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    # plus every float32 near the half's rounding edges: ties, subnormals, overflow
    special = np.array(
        [
            0x477FEFFF,
            0x477FF000,
            0x477FF001,
            0x33000000,
            0x33000001,
            0x387FC000,
            0x387FE000,
            0x7F800000,
            0x7F7FFFFF,
            0x00000001,
            0x80000000,
            0x3F808000,
            0x3F818000,
        ],
        dtype=np.uint32,
    )
    raw = np.concatenate([raw, special, special | 0x80000000])
    x = raw.view(np.float32)
    x = x[np.isfinite(x)]
    out = np.empty(x.shape[0], np.int64)
    conv(x, out)
    ref = torch.from_numpy(x.copy()).to(target).view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    bad = np.nonzero(out != ref)[0]
    assert bad.size == 0, [(hex(int(x[i].view(np.uint32))), hex(int(out[i])), hex(int(ref[i]))) for i in bad[:5]]


# ------------------------------------------------------------------ through the public API
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_public_api_numba_equals_torch():
    gen = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (17, 9), "a.bias": (17,), "b": (3, 5, 7), "c": (1,)}
    deltas = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(5)]
    for mode in ("tensor_mean", "l1", "per_tensor"):
        u_ref, t_ref = cm.unify(deltas[:4], rescaler=mode, backend="torch")
        u_nb, t_nb = cm.unify(deltas[:4], rescaler=mode, backend="numba")
        for k in shapes:
            assert_same_tensor(u_ref[k], u_nb[k], f"unify {k}")
            for a, b in zip(t_ref, t_nb):
                assert torch.equal(a.packed[k], b.packed[k])
                assert a.rescaler_for(k) == pytest.approx(b.rescaler_for(k), rel=1e-9)
        u2_ref, t2_ref = cm.add_task(u_ref, t_ref, deltas[4], rescaler=mode, backend="torch")
        u2_nb, t2_nb = cm.add_task(u_ref, t_ref, deltas[4], rescaler=mode, backend="numba")
        for k in shapes:
            assert_same_tensor(u2_ref[k], u2_nb[k], f"add_task {k}")
        for tr in t2_ref:
            d_ref = cm.decouple(u2_ref, tr, backend="torch")
            d_nb = cm.decouple(u2_ref, tr, backend="numba")
            for k in shapes:
                assert_same_tensor(d_ref[k], d_nb[k], f"decouple {k}")
        many = decouple_many(u2_ref, t2_ref, backend="numba")
        for tr, got in zip(t2_ref, many):
            ref = cm.decouple(u2_ref, tr, backend="torch")
            for k in shapes:
                assert_same_tensor(ref[k], got[k], f"decouple_many {k}")


def test_nan_is_reported_through_numba():
    d = [{"w": torch.ones(10)}, {"w": torch.ones(10)}]
    d[1]["w"][3] = float("nan")
    with pytest.raises(cm.NonFiniteError, match="'w'"):
        cm.unify(d, backend="numba")


# ------------------------------------------------------------------ chunk edges of the blocked loops
def _edge_lengths(chunk: int) -> list[int]:
    return [chunk - 1, chunk, chunk + 1, 3 * chunk + 5]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 12])
@pytest.mark.parametrize("chunk", [64, 4096])
def test_chunk_edges(dtype, n, chunk):
    """Lengths around the per-chunk staging rows (chunk-1, chunk, chunk+1, several + a ragged tail)."""
    be = NumbaBackend(chunk=chunk)
    for N in _edge_lengths(chunk):
        check_backend(be, dtype, n, N, seed=N * 31 + n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_chunk_edges_unify(dtype):
    """The backend's default chunk, both ops, a ragged tail (odd length, not a multiple of 8)."""
    be = NumbaBackend()
    check_backend(be, dtype, 3, 2 * be.chunk + 13, seed=5)


def _fused_backend(name: str):
    if name == "numba":
        return BE
    from condu_merge.kernels.native_backend import NativeBackend

    be = NativeBackend(chunk=64)
    if not be.available():
        pytest.skip("native kernels not built here")
    return be


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["numba", "native"])
def test_add_task_ignores_pad_bits(dtype, backend):
    """Set pad bits in the last mask byte must neither change the result nor reach the new masks."""
    BE = _fused_backend(backend)
    gen = torch.Generator().manual_seed(11)
    N = 64 + 5  # 3 pad bits in the last byte of each chunk-of-64 row tail
    ds = [torch.randn(N, generator=gen).to(dtype) for _ in range(4)]
    ref = REF.unify_flat(ds)
    dirty = ref.masks.clone()
    dirty[:, -1] |= 0xE0  # bits 5..7 of the last byte lie past element N-1
    new = torch.randn(N, generator=gen).to(dtype)
    lams = [0.5, 1.25, 2.0, 1.0 / 3.0]
    got = BE.add_task_flat(ref.u, dirty, lams, new)
    want = REF.add_task_flat(ref.u, ref.masks, lams, new)
    assert_same_tensor(want.u, got.u, "u")
    assert torch.equal(want.masks, got.masks)
    assert int((got.masks[:, -1] & 0xE0).sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_add_task_earlier_expert_rounding_to_zero(dtype):
    """An earlier expert dies where ``λ·u`` rounds to 0 in the dtype although the float32 product
    is > 0: the survival test must use the dtype's own zero cut (fp16 2^-25, bf16 bits 0x8000)."""
    tiny = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133, torch.float32: 2.0**-149}[dtype]
    # u: multiples of the smallest positive value; λ's around the point where λ·u rounds to 0
    mult = torch.tensor([1.0, 1.0, 2.0, 3.0, 1.0, 1.0, 2.0, 5.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    u = (mult * tiny).to(dtype)
    N = u.numel()
    masks = torch.full((3, (N + 7) // 8), 0xFF, dtype=torch.uint8)
    masks[:, -1] = 0x07
    delta = torch.zeros(N, dtype=dtype)
    for lams in ([0.25, 0.5, 0.5000001], [0.4999, 0.75, 1.0], [0.1, 0.3, 0.2]):
        want = REF.add_task_flat(u, masks, lams, delta)
        got = BE.add_task_flat(u, masks, lams, delta)
        assert_same_tensor(want.u, got.u, f"u {lams}")
        assert torch.equal(want.masks, got.masks), (lams, want.masks, got.masks)
    # the case is live: with λ = 0.25 a set bit is dropped where the float32 product is still > 0
    dropped = REF.add_task_flat(u, masks, [0.25, 0.25, 0.25], delta).masks
    assert not torch.equal(dropped[:3], masks)
