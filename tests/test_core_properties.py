"""Hypothesis: unify / decouple / add_task against the float64 reference in tests/reference.py."""

import warnings

import pytest
import torch
from hypothesis import given, strategies as st
from reference import ref_decouple, ref_unify

from condu_merge import ContinualMerger, add_task, decouple, unify
from condu_merge.backends import TorchBackend
from condu_merge.core import RescalerWarning

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


@st.composite
def task_deltas(draw, max_tasks=6):
    n = draw(st.integers(1, max_tasks))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    n_tensors = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=2))) for _ in range(n_tensors)]
    seed = draw(st.integers(0, 2**31 - 1))
    zero_frac = draw(st.sampled_from([0.0, 0.3, 0.9]))
    quantised = draw(st.booleans())  # small integers: many ties and exact-zero sums
    g = torch.Generator().manual_seed(seed)
    deltas = []
    for _ in range(n):
        d = {}
        for j, s in enumerate(shapes):
            x = torch.randn(s, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
            if quantised:
                x = torch.round(x.clamp(-3, 3) * 2) / 2
            x[torch.rand(s, generator=g) < zero_frac] = 0
            d[f"t{j}"] = x.to(dtype)
        deltas.append(d)
    return deltas


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RescalerWarning)
        return fn(*a, **kw)


@given(task_deltas(), st.sampled_from(["tensor_mean", "l1", "per_tensor"]), st.sampled_from([8, 64, 1 << 18]))
def test_unify_matches_reference(deltas, mode, chunk):
    u, ts = _quiet(unify, deltas, rescaler=mode, backend=TorchBackend(chunk))
    ru, rm, rl = _quiet(ref_unify, deltas, mode)
    for k in u:
        dtype = deltas[0][k].dtype
        assert u[k].dtype == dtype
        assert torch.equal(u[k], ru[k].to(dtype))  # u is an input element: exact in every dtype
        for t, m in zip(ts, rm):
            assert torch.equal(t.mask(k), m[k])
    for t, lam, m in zip(ts, rl, rm):
        assert t.rescaler == pytest.approx(lam, rel=1e-9, abs=0)
        rec = decouple(u, t)
        expect = ref_decouple(ru, m, lam)
        for k in u:
            tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[u[k].dtype]
            torch.testing.assert_close(rec[k].double(), expect[k], rtol=tol, atol=0)


@given(task_deltas(max_tasks=5))
def test_single_task_decouple_is_identity(deltas):
    d = deltas[0]
    u, (t,) = _quiet(unify, [d])
    rec = decouple(u, t)
    for k in d:
        # -0.0 inputs come back as +0.0; equal compares them equal
        assert torch.equal(rec[k], d[k])


@given(task_deltas(max_tasks=6), st.sampled_from(["tensor_mean", "l1", "per_tensor"]))
def test_add_task_matches_naive_session(deltas, mode):
    """add_task == unify(decoupled earlier experts + new delta), up to rounding, in float64."""
    deltas = [{k: v.double() for k, v in d.items()} for d in deltas]
    u, ts = {}, []
    for i, d in enumerate(deltas):
        prev_u, prev_t = u, ts
        u, ts = _quiet(add_task, u, ts, d, rescaler=mode, task_name=f"t{i}")
        if not prev_t:
            continue
        experts = [decouple(prev_u, t) for t in prev_t] + [d]
        ru, rm, rl = _quiet(ref_unify, experts, mode)
        for k in u:
            stack = torch.stack([e[k] for e in experts])
            near_zero = stack.sum(0).abs() <= 1e-12 * stack.abs().sum(0)
            assert torch.equal(u[k][~near_zero], ru[k][~near_zero])
            for t, m in zip(ts, rm):
                assert torch.equal(t.mask(k)[~near_zero], m[k][~near_zero])
        if not any(
            bool(
                (
                    torch.stack([e[k] for e in experts]).sum(0).abs()
                    <= 1e-12 * torch.stack([e[k] for e in experts]).abs().sum(0)
                ).any()
            )
            for k in u
        ):
            for t, lam in zip(ts, rl):
                assert t.rescaler == pytest.approx(lam, rel=1e-9, abs=1e-300)


@given(task_deltas(max_tasks=4))
def test_merger_equals_functional_chain(deltas):
    m = ContinualMerger()
    u, ts = {}, []
    for i, d in enumerate(deltas):
        _quiet(m.add_task, f"t{i}", d)
        u, ts = _quiet(add_task, u, ts, d, task_name=f"t{i}")
    assert m.task_names == [f"t{i}" for i in range(len(deltas))]
    for k in u:
        assert torch.equal(m.unified[k], u[k])
    for i, t in enumerate(ts):
        assert m.trigger(f"t{i}").rescaler == t.rescaler
        assert all(torch.equal(m.decouple(f"t{i}")[k], decouple(u, t)[k]) for k in u)
