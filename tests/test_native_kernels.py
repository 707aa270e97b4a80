"""The native (C, AVX2) backend against the torch reference: bit-exact masks and u, sums to 1e-6.

float32, float16 and bfloat16 run in ``_native.c``; float64, more than 64 tasks, a base of
another dtype and a CPU without AVX2 are delegated, and must give the same bits too."""

from __future__ import annotations

import os
import platform
import shutil

import numpy as np
import pytest
import torch

import condu_merge as cm
from condu_merge.kernels.conformance import DTYPES, REF, assert_same_result, assert_same_tensor, check_backend
from condu_merge.kernels.native_backend import MAX_EARLIER_TASKS, MAX_UNIFY_TASKS, NativeBackend


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


def test_built_where_it_can_be():
    """On x86-64 Linux with a C compiler and AVX2 the install must have built the extension: a
    broken build would otherwise only show up as a slower run."""
    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None or not _cpu_has_avx2():
        pytest.skip("not a machine the native kernels target")
    assert NativeBackend().available(), "condu_merge.kernels._native is not built: pip install -e . rebuilds it"


if not NativeBackend().available():
    pytest.skip("native kernels not built here", allow_module_level=True)

BE = NativeBackend(chunk=64)  # many chunks and a ragged last one even on small tensors
NATIVE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class _NoFallback(NativeBackend):
    """The native backend with delegation turned into an error: what it is asked runs in C."""

    @staticmethod
    def _fallback():
        raise AssertionError("delegated to another backend")


@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("N", [5, 1000, 70_001])
def test_half_types_run_natively(dtype, N):
    """float16 and bfloat16 are merged by the C kernels themselves (no delegation), bit-exact
    with the reference, with a base of their own dtype too; thread count changes nothing."""
    be = _NoFallback(threads=2)
    check_backend_native = [(4, N), (11, N)]
    for n, size in check_backend_native:
        gen = torch.Generator().manual_seed(n + size)
        from condu_merge.kernels.conformance import make_deltas, make_lambdas

        ds = make_deltas(n, size, dtype, gen, "mixed")
        ref, got = REF.unify_flat(ds), be.unify_flat(ds)
        assert got.u.dtype == dtype
        assert_same_result(ref, got, f"unify {dtype}")
        lams = make_lambdas(n, gen)
        new = make_deltas(1, size, dtype, gen, "mixed")[0]
        step = be.add_task_flat(ref.u, ref.masks, lams, new)
        assert_same_result(REF.add_task_flat(ref.u, ref.masks, lams, new), step, f"add_task {dtype}")
        one = _NoFallback(threads=1).add_task_flat(ref.u, ref.masks, lams, new)
        assert torch.equal(one.num, step.num) and torch.equal(one.den, step.den) and torch.equal(one.masks, step.masks)
        base = torch.randn(size, generator=gen).to(dtype)
        many = be.decouple_many_flat(ref.u, ref.masks, lams, base)
        for r in range(n):
            want = REF.decouple_flat(ref.u, ref.masks[r], lams[r], base)
            assert_same_tensor(want, many[r], f"decouple {dtype} row {r}")
            assert_same_tensor(
                REF.decouple_flat(ref.u, ref.masks[r], lams[r]),
                be.decouple_flat(ref.u, ref.masks[r], lams[r]),
                "no base",
            )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_expert_rounding_to_zero_and_overflow(dtype):
    """λ·|u| that rounds to 0 in the half type (but not in float32) drops the earlier bit; a
    product beyond float16's range rounds to inf, as in torch. SIMD body and tail both."""
    be = _NoFallback(chunk=64)
    info = torch.finfo(dtype)
    tiny = 2.0**-133 if dtype == torch.bfloat16 else 2.0**-24  # the smallest subnormal
    mult = torch.tensor([1.0, 1.0, 2.0, 3.0, 1.0, 1.0, 2.0, 5.0, 1.0, 1.0, 3.0] * 3, dtype=torch.float64)
    u = (mult * tiny).to(dtype)
    assert bool((u > 0).all())
    N = u.numel()
    masks = torch.full((3, (N + 7) // 8), 0xFF, dtype=torch.uint8)
    delta = torch.zeros(N, dtype=dtype)
    for lams in ([0.25, 0.5, 0.5000001], [0.4999, 0.75, 1.0], [0.1, 0.3, 0.2], [0.25, 0.25, 0.25]):
        want, got = REF.add_task_flat(u, masks, lams, delta), be.add_task_flat(u, masks, lams, delta)
        assert_same_result(want, got, f"{dtype} {lams}")
    # rounding to 0 happened: at least one earlier bit was dropped
    assert not torch.equal(REF.add_task_flat(u, masks, [0.25] * 3, delta).masks[:3, :-1], masks[:, :-1])
    big = torch.full((N,), float(info.max) / 2, dtype=dtype)
    big[::2] *= -1
    for lams in ([4.0, 1.0, 3.0], [1e30, 0.5, 2.0]):
        want, got = REF.add_task_flat(big, masks, lams, delta), be.add_task_flat(big, masks, lams, delta)
        assert_same_tensor(want.u, got.u, f"{dtype} overflow {lams}")
        assert torch.equal(want.masks, got.masks)
        for r in range(3):
            assert_same_tensor(
                REF.decouple_flat(big, masks[r], lams[r]), be.decouple_flat(big, masks[r], lams[r]), "dec"
            )


@pytest.mark.parametrize("udt", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("bdt", NATIVE_DTYPES, ids=str)
def test_decouple_onto_a_base_of_another_dtype_runs_natively(udt, bdt):
    """A float32 store exported onto a bf16 base (and every other pair of the three types): the
    expert comes out in the base's dtype, bit-exact with torch's ``base + expert``; float64 is
    delegated."""
    gen = torch.Generator().manual_seed(6)
    N = 1003
    u = (torch.randn(N, generator=gen) * 3).to(udt)
    m = torch.randint(0, 256, (3, (N + 7) // 8), dtype=torch.uint8, generator=gen)
    lams = [0.5, 2.0, 1.0 / 3.0]
    base = torch.randn(N, generator=gen).to(bdt)
    many = _NoFallback(chunk=64).decouple_many_flat(u, m, lams, base)
    assert many.dtype == bdt
    for r in range(3):
        assert_same_tensor(REF.decouple_flat(u, m[r], lams[r], base), many[r], f"{udt} onto {bdt} row {r}")


def test_float64_is_delegated():
    gen = torch.Generator().manual_seed(6)
    u = torch.randn(100, generator=gen, dtype=torch.bfloat16)
    m = torch.randint(0, 256, (2, 13), dtype=torch.uint8, generator=gen)
    wide = torch.randn(100, generator=gen, dtype=torch.float64)
    with pytest.raises(AssertionError, match="delegated"):
        _NoFallback().decouple_many_flat(u, m, [0.5, 2.0], wide)
    assert_same_tensor(REF.decouple_flat(u, m[1], 2.0, wide), BE.decouple_many_flat(u, m, [0.5, 2.0], wide)[1], "f64")
    with pytest.raises(AssertionError, match="delegated"):
        _NoFallback().unify_flat([torch.randn(9, dtype=torch.float64)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,N", [(1, 1), (2, 7), (3, 8), (5, 65), (11, 1000), (12, 523), (64, 130)])
def test_native_matches_torch(dtype, n, N):
    check_backend(BE, dtype, n, N, seed=n * 1000 + N)


@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
@pytest.mark.parametrize("style", ["ties", "tiny"])
@pytest.mark.parametrize("chunk", [8, 64, 1 << 16])
def test_ties_zeros_underflow(style, chunk, dtype):
    check_backend(NativeBackend(chunk=chunk), dtype, 6, 333, seed=7, style=style)


@pytest.mark.parametrize("chunk", [8, 64, 4096])
@pytest.mark.parametrize("n", [1, 12])
def test_chunk_edges(chunk, n):
    for N in (chunk - 1, chunk, chunk + 1, 3 * chunk + 5):
        check_backend(NativeBackend(chunk=chunk), torch.float32, n, N, seed=N * 31 + n)


def test_default_chunk_several_threads():
    check_backend(NativeBackend(threads=3), torch.float32, 4, 3 * (1 << 16) + 13, seed=3)


def test_results_do_not_depend_on_threads():
    """Each chunk writes its own partial sums: 1 thread and 3 give the same sums bit for bit."""
    gen = torch.Generator().manual_seed(5)
    ds = [torch.randn(50_001, generator=gen) for _ in range(5)]
    one, three = NativeBackend(chunk=512, threads=1), NativeBackend(chunk=512, threads=3)
    a, b = one.unify_flat(ds), three.unify_flat(ds)
    assert torch.equal(a.num, b.num) and torch.equal(a.den, b.den) and torch.equal(a.masks, b.masks)
    lams = [0.7, 1.3, 0.2, 2.0, 1.0 / 3.0]
    a2, b2 = one.add_task_flat(a.u, a.masks, lams, ds[0]), three.add_task_flat(a.u, a.masks, lams, ds[0])
    assert torch.equal(a2.num, b2.num) and torch.equal(a2.den, b2.den) and torch.equal(a2.u, b2.u)


def test_default_work_items_split_mid_sized_tensors_without_thread_dependence():
    """A 200K-element tensor is cut into >= 16 items of whole 512-element blocks (not 4 of
    65,536), and the sums still do not depend on the thread count."""
    be = NativeBackend()
    for n in (1, 4095, 4096, 65_536, 200_003, 10_000_000):
        c = be._chunk_for(n)
        assert c % 8 == 0 and c <= be.chunk and (c >= 4096 or c == be.chunk)
        assert -(-n // c) >= min(16, -(-n // 4096)) or c == be.chunk
    assert be._chunk_for(200_003) == 12_800 and be._chunk_for(10_000_000) == be.chunk
    assert NativeBackend(chunk=512)._chunk_for(200_003) == 512  # an explicit chunk stays the upper bound
    gen = torch.Generator().manual_seed(11)
    ds = [torch.randn(200_003, generator=gen) for _ in range(4)]
    outs = [NativeBackend(threads=t).unify_flat(ds) for t in (1, 2, 3)]
    lams = [0.7, 1.3, 0.2, 2.0]
    steps = [NativeBackend(threads=t).add_task_flat(outs[0].u, outs[0].masks, lams, ds[1]) for t in (1, 2, 3)]
    for r in outs[1:]:
        assert torch.equal(r.num, outs[0].num) and torch.equal(r.den, outs[0].den) and torch.equal(r.u, outs[0].u)
    for r in steps[1:]:
        assert (
            torch.equal(r.num, steps[0].num)
            and torch.equal(r.den, steps[0].den)
            and torch.equal(r.masks, steps[0].masks)
        )
    check_backend(NativeBackend(threads=2), torch.float32, 4, 70_001, seed=12)  # 16 items of 4,608


@pytest.mark.parametrize("n", [MAX_UNIFY_TASKS, MAX_UNIFY_TASKS + 1])
def test_task_count_limits(n):
    """64 tasks run natively, 65 are delegated: both must match the reference."""
    check_backend(BE, torch.float32, n, 77, seed=n)


def test_many_earlier_tasks_delegated():
    gen = torch.Generator().manual_seed(2)
    tp = MAX_EARLIER_TASKS + 1
    ds = [torch.randn(90, generator=gen) for _ in range(tp)]
    ref = REF.unify_flat(ds)
    lams = (torch.rand(tp, generator=gen, dtype=torch.float64) + 0.1).tolist()
    new = torch.randn(90, generator=gen)
    assert_same_result(
        REF.add_task_flat(ref.u, ref.masks, lams, new), BE.add_task_flat(ref.u, ref.masks, lams, new), "tp=65"
    )


def test_lambdas_whose_sums_round():
    """Λ = Σ λ_i over set bits must be the float64 task-order sum even where partial sums round."""
    gen = torch.Generator().manual_seed(1)
    lams = [2.0**-50, 2.0**10, 3.0, 2.0**-50, 1.0 / 3.0, 0.0, 2.0**10 + 1.0, 5e-30, 7.0]
    N = 301
    for style in ("mixed", "ties"):
        from condu_merge.kernels.conformance import make_deltas

        ds = make_deltas(len(lams), N, torch.float32, gen, style)
        ref = REF.unify_flat(ds)
        new = make_deltas(1, N, torch.float32, gen, style)[0]
        assert_same_result(
            REF.add_task_flat(ref.u, ref.masks, lams, new), BE.add_task_flat(ref.u, ref.masks, lams, new), style
        )


def test_negative_and_huge_lambdas():
    gen = torch.Generator().manual_seed(4)
    ds = [torch.randn(200, generator=gen) for _ in range(4)]
    ref = REF.unify_flat(ds)
    new = torch.randn(200, generator=gen)
    for lams in ([-0.5, 1.0, 2.0, 0.3], [1e30, 1.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]):
        assert_same_result(
            REF.add_task_flat(ref.u, ref.masks, lams, new), BE.add_task_flat(ref.u, ref.masks, lams, new), str(lams)
        )
        for r in range(4):
            assert_same_tensor(
                REF.decouple_flat(ref.u, ref.masks[r], lams[r]), BE.decouple_flat(ref.u, ref.masks[r], lams[r]), "dec"
            )


# pad bits of the earlier masks: tests/test_kernels_cpu.py::test_add_task_ignores_pad_bits


def test_earlier_expert_rounding_to_zero():
    """λ·u rounding to 0 in float32 drops the bit (subnormal u), in the SIMD body and the tail."""
    tiny = 2.0**-149
    mult = torch.tensor([1.0, 1.0, 2.0, 3.0, 1.0, 1.0, 2.0, 5.0, 1.0, 1.0, 3.0] * 3, dtype=torch.float64)
    u = (mult * tiny).to(torch.float32)
    N = u.numel()
    masks = torch.full((3, (N + 7) // 8), 0xFF, dtype=torch.uint8)
    delta = torch.zeros(N)
    for lams in ([0.25, 0.5, 0.5000001], [0.4999, 0.75, 1.0], [0.1, 0.3, 0.2], [0.25, 0.25, 0.25]):
        want = REF.add_task_flat(u, masks, lams, delta)
        got = BE.add_task_flat(u, masks, lams, delta)
        assert_same_tensor(want.u, got.u, f"u {lams}")
        assert torch.equal(want.masks, got.masks), lams
    assert not torch.equal(REF.add_task_flat(u, masks, [0.25] * 3, delta).masks[:3, :-1], masks[:, :-1])


def test_sums_near_float32_overflow():
    """Values near FLT_MAX: the L1 sums are float64 from the first addition, so they stay finite
    (a float32 partial sum, a tempting shortcut for the SIMD loop, would overflow here)."""
    big = float(np.finfo(np.float32).max) / 2
    gen = torch.Generator().manual_seed(9)
    ds = [(torch.rand(1000, generator=gen) + 0.5) * big for _ in range(3)]
    ds[1][::3] *= -1
    ref, got = REF.unify_flat(ds), BE.unify_flat(ds)
    assert torch.isfinite(got.num).all() and torch.isfinite(got.den).all()
    assert_same_result(ref, got, "unify near FLT_MAX")
    lams = [1.0, 0.5, 0.75]  # no product overflows: only the float32 partial sums would
    new = (torch.rand(1000, generator=gen) + 0.5) * big
    want, res = REF.add_task_flat(ref.u, ref.masks, lams, new), BE.add_task_flat(ref.u, ref.masks, lams, new)
    assert torch.isfinite(res.num).all() and torch.isfinite(res.den).all()
    assert_same_result(want, res, "add_task near FLT_MAX")


def test_nan_and_inf_propagate_to_the_sums():
    """A NaN or Inf delta must reach num (that is how the core reports non-finite input)."""
    ds = [torch.ones(100), torch.ones(100)]
    ds[1][37] = float("nan")
    assert torch.isnan(BE.unify_flat(ds).num[1])
    ds[1][37] = float("inf")
    assert torch.isinf(BE.unify_flat(ds).num[1])
    d = [{"w": torch.ones(10)}, {"w": torch.ones(10)}]
    d[1]["w"][3] = float("nan")
    with pytest.raises(cm.NonFiniteError, match="'w'"):
        cm.unify(d, backend="native")


# the public API on every CPU backend, native included: tests/test_dispatch.py


def test_auto_prefers_native_on_the_cpu():
    from condu_merge.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")).name == "native"


@pytest.mark.skipif(os.cpu_count() == 1, reason="needs two cores to overlap")
def test_gil_is_released_during_a_call():
    """Two Python threads calling the kernel at once both finish with correct results (ctypes
    drops the GIL; the C code keeps no global state)."""
    import threading

    gen = torch.Generator().manual_seed(3)
    ds = [torch.randn(200_003, generator=gen) for _ in range(6)]
    want = REF.unify_flat(ds)
    got: list = [None, None]

    def run(i):
        got[i] = NativeBackend(chunk=4096, threads=2).unify_flat(ds)

    th = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    for g in got:
        assert_same_result(want, g, "concurrent")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_kernels_run_in_a_forked_child():
    """The C code keeps a thread pool; a child of fork() has none of its threads and must start
    its own, not wait on the parent's forever. (The child compares with numpy: torch's own
    OpenMP pool, used by earlier tests in this process, is not usable after fork.)"""
    import time

    gen = torch.Generator().manual_seed(8)
    ds = [torch.randn(100_003, generator=gen) for _ in range(4)]
    be = NativeBackend(chunk=4096, threads=2)
    want = be.unify_flat(ds)  # the pool exists in the parent now
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 iff the same result came back
        ok = False
        try:
            got = NativeBackend(chunk=4096, threads=2).unify_flat(ds)
            ok = np.array_equal(got.u.numpy(), want.u.numpy()) and np.array_equal(got.masks.numpy(), want.masks.numpy())
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the native kernel")
    assert os.waitstatus_to_exitcode(status) == 0
