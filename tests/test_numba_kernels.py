"""Paths of the numba kernels the conformance sweep does not force: the exact λ tables of
``add_task`` against a task-order loop, the fallback when the λ's are too far apart for the
tables, many earlier tasks (three table groups), and the bit transpose."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from condu_merge.kernels.conformance import REF, assert_same_result, make_deltas
from condu_merge.kernels.numba_backend import NumbaBackend, _lut_exact

BE = NumbaBackend(chunk=64)


def _step(dtype, n, N, lams, seed=0, style="mixed"):
    gen = torch.Generator().manual_seed(seed)
    ds = make_deltas(n, N, dtype, gen, style)
    ref = REF.unify_flat(ds)
    new = make_deltas(1, N, dtype, gen, style)[0]
    assert_same_result(
        REF.add_task_flat(ref.u, ref.masks, lams, new), BE.add_task_flat(ref.u, ref.masks, lams, new), f"{dtype} {lams}"
    )


def test_lut_exact_rule():
    assert _lut_exact([0.5, 1.0, 1.75, 0.0])
    assert not _lut_exact([1e-12, 1e12])  # partial sums would round: the task-order loop runs
    assert not _lut_exact([float("inf"), 1.0]) and not _lut_exact([float("nan")])
    assert not _lut_exact([0.1])  # not a float32 value (a float64 tensor's opmath λ)
    assert _lut_exact([])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_add_task_lambdas_too_far_apart_for_tables(dtype):
    # Λ sums that round in float64 (2^-50 + 2^10 + ...): only the task-order loop is exact. (No
    # expert may overflow fp16 here: the torch reference turns inf·0 into NaN, see the report.)
    lams = [2.0**-50, 2.0**10, 3.0, 2.0**-50, 1.0 / 3.0, 0.0, 2.0**10 + 1.0, 5e-30, 7.0]
    assert not _lut_exact([float(np.float32(v)) for v in lams])
    _step(dtype, len(lams), 301, lams, seed=1)
    _step(dtype, len(lams), 301, lams, seed=2, style="ties")


@pytest.mark.parametrize("tp", [7, 8, 9, 16, 17, 20])
def test_add_task_many_earlier_tasks(tp):
    # one, two and three groups of 8 in the bit transpose and the tables, full and partial
    gen = torch.Generator().manual_seed(tp)
    lams = (torch.rand(tp, generator=gen, dtype=torch.float64) * 2 + 0.05).tolist()
    lams[tp // 2] = 0.0
    assert _lut_exact([float(np.float32(v)) for v in lams])
    _step(torch.float32, tp, 203, lams, seed=tp)
    _step(torch.float32, tp, 203, lams, seed=tp, style="ties")


def test_lam_tables_against_a_loop():
    from condu_merge.kernels import _numba_impl as K

    lam = np.array([0.5, -0.25, 1.5, 0.0, 2.0, 0.75, 1.0, 3.0, 0.125, -1.0], dtype=np.float64)
    sums, maxs = K.lam_tables(lam)
    assert sums.shape == (2, 256)
    for g in range(2):
        for b in range(256):
            on = [lam[8 * g + j] for j in range(8) if 8 * g + j < len(lam) and (b >> j) & 1]
            s = 0.0
            for v in on:
                s += v
            assert sums[g, b] == s
            assert maxs[g, b] == max([0.0] + [max(v, 0.0) for v in on])


def test_transpose8():
    from numba import njit

    from condu_merge.kernels import _numba_impl as K

    @njit
    def tr(x):
        return K._transpose8(x)

    rng = np.random.default_rng(0)
    for x in rng.integers(0, 2**63, 200, dtype=np.uint64).tolist() + [0, 2**64 - 1, 1, 2**63]:
        y = int(tr(np.uint64(x)))
        for m in range(8):
            want = sum((((x >> (8 * j)) >> m) & 1) << j for j in range(8))
            assert (y >> (8 * m)) & 0xFF == want


def test_lam_opmath_is_opmath_scalar():
    from condu_merge.backends.base import opmath_scalar
    from condu_merge.kernels.numba_backend import _lam_opmath

    gen = torch.Generator().manual_seed(5)
    vals = (
        torch.randn(2000, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-40, 40, (2000,), generator=gen)
    ).tolist()
    vals += [0.0, -0.0, 1.0 / 3.0, 3.4028235677973366e38, 1e39, float("inf"), 2.0**-149, 2.0**-150, 1.5 * 2.0**-149]
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        got = _lam_opmath(vals, dt).tolist()
        want = [opmath_scalar(v, dt) for v in vals]
        assert [np.float64(g).tobytes() for g in got] == [np.float64(w).tobytes() for w in want], dt
