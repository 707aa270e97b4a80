"""Unit tests of the exact ConDU rules (issue 2), by hand and against tests/reference.py."""

import math
from collections.abc import Mapping

import pytest
import torch
from reference import ref_decouple, ref_unify

from condu_merge import (
    ContinualMerger,
    DtypeMismatchError,
    DuplicateTaskError,
    KeyMismatchError,
    MergeInputError,
    NonFiniteError,
    RescalerWarning,
    ShapeMismatchError,
    TaskTrigger,
    UnknownTaskError,
    add_task,
    apply_delta,
    decouple,
    delta_from_state_dicts,
    pack_mask,
    unify,
)
from condu_merge.backends import TorchBackend


def sd(**kw):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in kw.items()}


# ----------------------------------------------------------------------------- rules by hand


def test_hand_example_sign_mask_max():
    d1 = sd(w=[1.0, -2.0, 3.0, 0.0, 1.0])
    d2 = sd(w=[2.0, 1.0, -1.0, 0.0, -1.0])
    u, (t1, t2) = unify([d1, d2])
    # sums: 3, -1, 2, 0 (-> -1), 0 (-> -1)
    assert u["w"].tolist() == [2.0, -2.0, 3.0, 0.0, -1.0]
    assert t1.mask("w").tolist() == [True, True, True, False, False]
    assert t2.mask("w").tolist() == [True, False, False, False, True]


def test_exact_zero_sum_elects_minus():
    with pytest.warns(RescalerWarning, match="task #0"):
        u, (a, b) = unify([sd(w=[2.0]), sd(w=[-2.0])])
    assert u["w"].item() == -2.0
    assert not a.mask("w").item() and b.mask("w").item()


def test_ties_in_magnitude():
    with pytest.warns(RescalerWarning, match="task #2"):  # the third task never has the elected sign
        u, ts = unify([sd(w=[1.5, -1.5]), sd(w=[1.5, -1.5]), sd(w=[-1.0, 1.0])])
    assert u["w"].tolist() == [1.5, -1.5]
    assert [t.mask("w").tolist() for t in ts] == [[True, True], [True, True], [False, False]]


def test_zeros_never_selected_and_positive_zero_in_u():
    u, (t,) = unify([sd(w=[0.0, -0.0, 1.0])])
    assert t.mask("w").tolist() == [False, False, True]
    assert all(math.copysign(1, x) == 1 for x in u["w"][:2].tolist())  # +0.0, not -0.0


def test_rescalers_by_hand_all_modes():
    d1 = sd(a=[1.0, -2.0], b=[4.0, 0.0, 0.0, 0.0])
    d2 = sd(a=[3.0, 1.0], b=[-1.0, 0.0, 0.0, 2.0])
    # a: sums 4, -1 -> u=[3,-2]; M1=[1,1], M2=[1,0]; b: sums 3,0,0,2 -> u=[4,0,0,2]; M1=[1,0,0,0], M2=[0,0,0,1]
    for mode in ("tensor_mean", "l1", "per_tensor"):
        u, (t1, t2) = unify([d1, d2], rescaler=mode)
        if mode == "l1":
            assert t1.rescaler == pytest.approx((3 + 4) / (5 + 4))
            assert t2.rescaler == pytest.approx((4 + 3) / (3 + 2))
        elif mode == "tensor_mean":
            assert t1.rescaler == pytest.approx((3 / 2 + 4 / 4) / (5 / 2 + 4 / 4))
            assert t2.rescaler == pytest.approx((4 / 2 + 3 / 4) / (3 / 2 + 2 / 4))
        else:
            assert t1.rescaler == pytest.approx({"a": 3 / 5, "b": 1.0})
            assert t2.rescaler == pytest.approx({"a": 4 / 3, "b": 3 / 2})
        assert isinstance(t1.rescaler, dict) == (mode == "per_tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_single_task_round_trip_exact(dtype):
    g = torch.Generator().manual_seed(1)
    d = {"w": torch.randn(37, 5, generator=g).to(dtype), "b": torch.randn(3, generator=g).to(dtype)}
    d["w"][0, :3] = 0
    u, (t,) = unify([d])
    assert t.rescaler == 1.0
    rec = decouple(u, t)
    for k in d:
        assert rec[k].dtype == dtype and torch.equal(rec[k], d[k])


def test_all_zero_deltas_vanish_with_warning():
    with pytest.warns(RescalerWarning, match="task #1"):
        u, ts = unify([sd(w=[1.0, 2.0]), sd(w=[0.0, 0.0])])
    assert ts[1].rescaler == 0.0
    assert torch.equal(decouple(u, ts[1])["w"], torch.zeros(2))


def test_vanished_expert_warning_names_task():
    # task 'small' disagrees everywhere with the elected sign
    with pytest.warns(RescalerWarning, match="'small'"):
        _, ts = unify([sd(w=[5.0, 5.0]), sd(w=[-1.0, -1.0])], task_names=["big", "small"])
    assert ts[1].rescaler == 0.0


def test_one_element_and_empty_tensors():
    ds = [{"one": torch.tensor([v]), "empty": torch.zeros(0), "empty2d": torch.zeros(3, 0)} for v in (1.0, -3.0, 0.5)]
    with pytest.warns(RescalerWarning):  # tasks 0 and 2 lose their only element
        u, ts = unify(ds)
    assert u["one"].tolist() == [-3.0]
    assert u["empty"].shape == (0,) and u["empty2d"].shape == (3, 0)
    assert ts[1].mask("empty2d").shape == (3, 0)
    rec = decouple(u, ts[1])
    assert rec["empty2d"].shape == (3, 0)
    # tensor_mean skips empty tensors instead of dividing by zero
    assert ts[1].rescaler == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_kept_and_exact(dtype):
    g = torch.Generator().manual_seed(2)
    ds = [{"w": torch.randn(1000, generator=g).to(dtype)} for _ in range(4)]
    u, ts = unify(ds, rescaler="l1")
    ru, rm, rl = ref_unify(ds, "l1")
    assert u["w"].dtype == dtype
    assert torch.equal(u["w"], ru["w"].to(dtype))
    for t, m, lam in zip(ts, rm, rl):
        assert torch.equal(t.mask("w"), m["w"])
        assert t.rescaler == pytest.approx(lam, rel=1e-12)


@pytest.mark.parametrize("mode", ["tensor_mean", "l1", "per_tensor"])
def test_unify_matches_reference_random(mode):
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (17, 3), "b": (64,), "c": (5, 5, 2)}
    ds = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(6)]
    ds[2]["b"][:10] = 0
    u, ts = unify(ds, rescaler=mode)
    ru, rm, rl = ref_unify(ds, mode)
    for k in shapes:
        assert torch.equal(u[k], ru[k].float())
        for t, m in zip(ts, rm):
            assert torch.equal(t.mask(k), m[k])
    for t, lam, m in zip(ts, rl, rm):
        if mode == "per_tensor":
            assert t.rescaler == pytest.approx(lam, rel=1e-12)
        else:
            assert t.rescaler == pytest.approx(lam, rel=1e-12)
        rec = decouple(u, t)
        expect = ref_decouple(ru, m, lam)
        for k in shapes:
            torch.testing.assert_close(rec[k].double(), expect[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_chunking_does_not_change_results(n):
    g = torch.Generator().manual_seed(n)
    ds = [{"w": torch.randn(1001, generator=g), "v": torch.randn(7, generator=g)} for _ in range(n)]
    small = TorchBackend(chunk=16)
    u1, t1 = unify(ds, backend=small)
    u2, t2 = unify(ds)
    assert all(torch.equal(u1[k], u2[k]) for k in u1)
    assert all(torch.equal(a.packed[k], b.packed[k]) for a, b in zip(t1, t2) for k in u1)
    assert [a.rescaler for a in t1] == pytest.approx([b.rescaler for b in t2], rel=1e-12)
    # continual step too
    d_new = {"w": torch.randn(1001, generator=g), "v": torch.randn(7, generator=g)}
    a_u, a_t = add_task(u1, t1, d_new, backend=small)
    b_u, b_t = add_task(u2, t2, d_new)
    assert all(torch.equal(a_u[k], b_u[k]) for k in a_u)
    assert all(torch.equal(a.packed[k], b.packed[k]) for a, b in zip(a_t, b_t) for k in a_u)
    dec_small = decouple(a_u, a_t[0], backend=small)
    dec = decouple(b_u, b_t[0])
    assert all(torch.equal(dec_small[k], dec[k]) for k in dec)


def test_masks_are_bit_packed():
    ds = [{"w": torch.randn(1000)} for _ in range(3)]
    _, ts = unify(ds)
    assert ts[0].packed["w"].dtype == torch.uint8 and ts[0].packed["w"].numel() == 125
    assert ts[0].nbytes == 125


# ----------------------------------------------------------------------------- continual step


def naive_session(unified, triggers, delta, mode):
    """decouple every earlier expert, then unify them with the new delta (the definition)."""
    experts = [decouple(unified, t) for t in triggers]
    return unify(experts + [delta], rescaler=mode)


@pytest.mark.parametrize("mode", ["tensor_mean", "l1", "per_tensor"])
def test_add_task_equals_naive_float64_many_sessions(mode):
    g = torch.Generator().manual_seed(4)
    shapes = {"a": (33, 4), "b": (101,)}
    fast_u, fast_t = {}, []
    slow_u, slow_t = None, None
    for s in range(9):
        d = {k: torch.randn(sh, generator=g, dtype=torch.float64) * (1 + s % 3) for k, sh in shapes.items()}
        fast_u, fast_t = add_task(fast_u, fast_t, d, rescaler=mode)
        if slow_u is None:
            slow_u, slow_t = unify([d], rescaler=mode)
        else:
            slow_u, slow_t = naive_session(slow_u, slow_t, d, mode)
        for k in shapes:
            torch.testing.assert_close(fast_u[k], slow_u[k], rtol=1e-12, atol=0)
            for a, b in zip(fast_t, slow_t):
                assert torch.equal(a.packed[k], b.packed[k]), (s, k)
        for a, b in zip(fast_t, slow_t):
            if mode == "per_tensor":
                assert a.rescaler == pytest.approx(b.rescaler, rel=1e-12)
            else:
                assert a.rescaler == pytest.approx(b.rescaler, rel=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_add_task_equals_naive_low_precision(dtype, rtol):
    g = torch.Generator().manual_seed(5)
    ds = [{"w": torch.randn(4000, generator=g).to(dtype)} for _ in range(5)]
    u, ts = unify(ds[:4])
    new = ds[4]
    fu, ft = add_task(u, ts, new)
    nu, nt = naive_session(u, ts, new, "tensor_mean")
    # masks may differ only where the naive election sum is within rounding of zero
    experts = [decouple(u, t)["w"].double() for t in ts] + [new["w"].double()]
    total = torch.stack(experts).sum(0)
    scale = torch.stack(experts).abs().sum(0)
    eps = torch.finfo(dtype).eps
    close = total.abs() <= 4 * eps * scale
    for a, b in zip(ft, nt):
        diff = a.mask("w") != b.mask("w")
        assert not (diff & ~close).any()
    same = ~close
    assert torch.equal(fu["w"][same], nu["w"][same])
    for a, b in zip(ft, nt):
        assert a.rescaler == pytest.approx(b.rescaler, rel=rtol)


def test_add_task_does_not_modify_inputs():
    ds = [{"w": torch.randn(50)} for _ in range(3)]
    u, ts = unify(ds[:2])
    u_copy = {k: v.clone() for k, v in u.items()}
    packed = [{k: p.clone() for k, p in t.packed.items()} for t in ts]
    add_task(u, ts, ds[2])
    assert all(torch.equal(u[k], u_copy[k]) for k in u)
    assert all(torch.equal(t.packed[k], p[k]) for t, p in zip(ts, packed) for k in p)


def test_zero_rescaler_expert_never_selected_again():
    with pytest.warns(RescalerWarning):
        u, ts = unify([sd(w=[5.0, 5.0]), sd(w=[-1.0, -1.0])], task_names=["a", "b"])
    with pytest.warns(RescalerWarning, match="task 'b'"):
        u2, ts2 = add_task(u, ts, sd(w=[-1.0, 1.0]), task_name="c")
    # b's expert is zero: it cannot contribute a mask bit
    assert not ts2[1].mask("w").any()


# ----------------------------------------------------------------------------- merger


def test_merger_order_names_and_decouple():
    m = ContinualMerger()
    ds = {n: {"w": torch.randn(20)} for n in ("z", "a", "m")}
    for n, d in ds.items():
        m.add_task(n, d)
    assert m.task_names == ["z", "a", "m"] and len(m) == 3 and "a" in m
    assert m.trigger("a").task == "a"
    u, ts = unify(list(ds.values()))
    # a continual session differs from one-shot unify in general, but the first expert after one task is exact
    m1 = ContinualMerger()
    m1.add_task("only", ds["z"])
    assert torch.equal(m1.decouple("only")["w"], ds["z"]["w"])
    base = {"w": torch.ones(20), "buf": torch.arange(3)}
    full = m1.decouple("only", base=base)
    assert torch.equal(full["w"], 1 + ds["z"]["w"]) and torch.equal(full["buf"], base["buf"])


def test_merger_errors_leave_state_unchanged():
    m = ContinualMerger()
    m.add_task("a", {"w": torch.randn(8), "v": torch.randn(2, 2)})
    m.add_task("b", {"w": torch.randn(8), "v": torch.randn(2, 2)})
    before_u = {k: v.clone() for k, v in m.unified.items()}
    before_t = [(t.task, t.rescaler, {k: p.clone() for k, p in t.packed.items()}) for t in m.triggers]

    bad_inputs = [
        ("a", {"w": torch.randn(8), "v": torch.randn(2, 2)}, DuplicateTaskError, "'a'"),
        ("c", {"w": torch.randn(8)}, KeyMismatchError, r"missing keys \['v'\]"),
        (
            "c",
            {"w": torch.randn(8), "v": torch.randn(2, 2), "x": torch.randn(1)},
            KeyMismatchError,
            r"extra keys \['x'\]",
        ),
        ("c", {"w": torch.randn(9), "v": torch.randn(2, 2)}, ShapeMismatchError, "'w'"),
        ("c", {"w": torch.randn(8).double(), "v": torch.randn(2, 2)}, DtypeMismatchError, "'w'"),
        ("c", {"w": torch.arange(8), "v": torch.randn(2, 2)}, DtypeMismatchError, "non-floating"),
        ("c", {"w": torch.randn(8), "v": torch.tensor([[1.0, float("nan")], [0, 0]])}, NonFiniteError, "'v'.*NaN"),
        ("c", {"w": torch.tensor([float("inf")] + [0.0] * 7), "v": torch.randn(2, 2)}, NonFiniteError, "task 'c'"),
    ]
    for name, delta, exc, pattern in bad_inputs:
        with pytest.raises(exc, match=pattern):
            m.add_task(name, delta)
        assert m.task_names == ["a", "b"]
        assert all(torch.equal(m.unified[k], before_u[k]) for k in before_u)
        for t, (name0, lam, packed) in zip(m.triggers, before_t):
            assert t.task == name0 and t.rescaler == lam
            assert all(torch.equal(t.packed[k], packed[k]) for k in packed)
    with pytest.raises(UnknownTaskError, match="'nope'"):
        m.decouple("nope")
    with pytest.raises(ValueError):
        m.add_task("", {"w": torch.randn(8), "v": torch.randn(2, 2)})


def test_unify_bad_input_messages():
    with pytest.raises(MergeInputError, match="no tasks"):
        unify([])
    with pytest.raises(MergeInputError, match="no tensors"):
        unify([{}])
    with pytest.raises(MergeInputError, match="sequence of state dicts"):
        unify({"w": torch.zeros(1)})
    with pytest.raises(KeyMismatchError, match=r"task 'b'.*missing keys \['y'\]"):
        unify([{"x": torch.zeros(1), "y": torch.zeros(1)}, {"x": torch.zeros(1)}], task_names=["a", "b"])
    with pytest.raises(ShapeMismatchError, match=r"task #1: tensor 'x' has shape \(2,\)"):
        unify([{"x": torch.zeros(1)}, {"x": torch.zeros(2)}])
    with pytest.raises(DtypeMismatchError, match="'x'.*mixed dtypes"):
        unify([{"x": torch.zeros(1)}, {"x": torch.zeros(1, dtype=torch.float16)}])
    with pytest.raises(NonFiniteError, match=r"task #2: tensor 'x'.*flat index 3"):
        unify([{"x": torch.zeros(5)}, {"x": torch.ones(5)}, {"x": torch.tensor([0, 0, 0, float("nan"), 0])}])
    with pytest.raises(ValueError, match="unknown rescaler"):
        unify([{"x": torch.zeros(1)}], rescaler="mean")


def test_decouple_checks_keys_and_shapes():
    u, (t,) = unify([{"x": torch.ones(4)}])
    with pytest.raises(KeyMismatchError):
        decouple({"y": torch.ones(4)}, t)
    with pytest.raises(ShapeMismatchError):
        decouple({"x": torch.ones(5)}, t)
    with pytest.raises(KeyMismatchError, match="base"):
        decouple(u, t, base={"z": torch.ones(4)})


def test_delta_helpers_skip_integer_buffers():
    base = {"w": torch.ones(3), "pos": torch.arange(3), "h": torch.zeros(2, dtype=torch.float16)}
    ft = {"w": torch.tensor([2.0, 1.0, 0.0]), "pos": torch.arange(3), "h": torch.ones(2, dtype=torch.float16)}
    d = delta_from_state_dicts(base, ft)
    assert set(d) == {"w", "h"} and d["h"].dtype == torch.float16
    assert d["w"].tolist() == [1.0, 0.0, -1.0]
    back = apply_delta(base, d)
    assert torch.equal(back["w"], ft["w"]) and torch.equal(back["pos"], base["pos"])
    with pytest.raises(ShapeMismatchError, match="'w'"):
        delta_from_state_dicts({"w": torch.ones(2)}, ft, keys=["w"])


def test_add_task_exact_zero_sum_elects_minus():
    u, ts = unify([sd(w=[1.0, 2.0])])
    u2, ts2 = add_task(u, ts, sd(w=[-1.0, -1.0]))  # sums 0 and 1
    assert u2["w"].tolist() == [-1.0, 2.0]
    assert ts2[0].mask("w").tolist() == [False, True]
    assert ts2[1].mask("w").tolist() == [True, False]


def test_add_task_expert_rounding_to_zero_is_not_selected():
    tiny = torch.tensor([2.0**-24, 1.0], dtype=torch.float16)  # the smallest fp16 subnormal
    trig = TaskTrigger({"w": pack_mask(torch.tensor([True, True]))}, {"w": (2,)}, 0.4, "a")
    new = {"w": torch.tensor([0.0, 0.0], dtype=torch.float16)}
    with pytest.warns(RescalerWarning, match="#1"):  # the new task's delta is all zero
        u2, ts2 = add_task({"w": tiny}, [trig], new)
    naive_expert = decouple({"w": tiny}, trig)["w"]
    assert naive_expert.tolist()[0] == 0.0  # 0.4 * 2^-24 rounds to zero in fp16
    assert ts2[0].mask("w").tolist() == [False, True]
    assert u2["w"].tolist()[0] == 0.0


# ----------------------------------------------------------------------------- review fixes


def _two_task_session():
    g = torch.Generator().manual_seed(7)
    d = [{"w": torch.randn(4, 6, generator=g), "b": torch.randn(5, generator=g)} for _ in range(2)]
    return unify(d, task_names=["a", "b"])


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_add_task_refuses_trigger_of_other_shape(backend):
    """A trigger whose mask was made for a tensor of another size must be refused, naming the key
    and the task (a compiled backend would otherwise read the masks out of bounds)."""
    unified, trigs = _two_task_session()
    small = TaskTrigger(
        {"w": pack_mask(torch.ones(2, 3, dtype=torch.bool)), "b": trigs[0].packed["b"]},
        {"w": (2, 3), "b": (5,)},
        1.0,
        "a",
    )
    delta = {"w": torch.randn(4, 6), "b": torch.randn(5)}
    with pytest.raises(ShapeMismatchError, match=r"'w'.*'a'|'a'.*'w'"):
        add_task(unified, [small, trigs[1].with_task("b")], delta, backend=backend, task_name="c")
    with pytest.raises(ShapeMismatchError, match=r"'w'.*'a'|'a'.*'w'"):  # one trigger: nothing else catches it
        add_task(unified, [small], delta, backend=backend, task_name="c")
    # same numel, other shape: the mask's element order would be misread
    other = TaskTrigger({"w": trigs[0].packed["w"], "b": trigs[0].packed["b"]}, {"w": (6, 4), "b": (5,)}, 1.0, "a")
    with pytest.raises(ShapeMismatchError, match="'w'"):
        add_task(unified, [other, trigs[1]], delta, backend=backend, task_name="c")


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_deltas_requiring_grad_are_merged_without_autograd(backend):
    """Deltas built from live parameters (requires_grad) merge on every backend, and the stored
    session holds no autograd graph (which would keep every chunk of every task alive)."""
    g = torch.Generator().manual_seed(3)
    plain = [{"w": torch.randn(300, generator=g)} for _ in range(3)]
    grad = [{"w": d["w"].clone().requires_grad_(True) * 1.0} for d in plain]
    u_ref, t_ref = unify(plain[:2], backend=backend)
    u, t = unify(grad[:2], backend=backend)
    assert not u["w"].requires_grad and u["w"].grad_fn is None
    assert torch.equal(u["w"], u_ref["w"]) and t[0] == t_ref[0]
    u2, t2 = add_task(u, t, grad[2], backend=backend)
    u2_ref, _ = add_task(u_ref, t_ref, plain[2], backend=backend)
    assert not u2["w"].requires_grad and torch.equal(u2["w"], u2_ref["w"])
    out = decouple(u2, t2[0], base={"w": torch.zeros(300, requires_grad=True)}, backend=backend)
    assert torch.equal(out["w"].detach(), decouple(u2, t2[0], base={"w": torch.zeros(300)}, backend=backend)["w"])


def test_merger_add_task_is_thread_safe():
    """Two threads adding tasks to one session at once must not lose either task."""
    import threading
    import time

    class Slow(TorchBackend):
        def add_task_flat(self, *a):
            time.sleep(0.05)
            return super().add_task_flat(*a)

    m = ContinualMerger(backend=Slow())
    m.add_task("a", {"w": torch.randn(16)})
    errors = []

    def add(name):
        try:
            m.add_task(name, {"w": torch.randn(16)})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in ("b", "c")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert sorted(m.task_names) == ["a", "b", "c"]
    import copy
    import pickle

    m = ContinualMerger(backend="torch")
    m.add_task("a", {"w": torch.randn(16)})
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):  # the lock does not block copies
        assert twin.task_names == m.task_names and torch.equal(twin.unified["w"], m.unified["w"])
        twin.add_task("d", {"w": torch.randn(16)})
    assert "d" not in m


def test_trigger_equality_compares_masks():
    """Two equal triggers compare equal (not a 'Boolean value of Tensor is ambiguous' error)."""
    _, trigs = _two_task_session()
    copy = TaskTrigger({k: v.clone() for k, v in trigs[0].packed.items()}, dict(trigs[0].shapes), trigs[0].rescaler)
    assert copy == trigs[0]
    assert trigs[0] != trigs[1]
    flipped = {k: v.clone() for k, v in trigs[0].packed.items()}
    flipped["w"][0] ^= 1
    assert TaskTrigger(flipped, dict(trigs[0].shapes), trigs[0].rescaler) != trigs[0]
    assert TaskTrigger(dict(trigs[0].packed), dict(trigs[0].shapes), 2.5) != trigs[0]


def test_delta_from_state_dicts_moves_base_to_finetuned_device():
    """A base on another device is moved (as apply_delta does), not a bare torch device error."""
    base = {"w": torch.zeros(3)}
    ft = {"w": torch.ones(3, device="meta")}
    out = delta_from_state_dicts(base, ft)
    assert out["w"].device.type == "meta" and out["w"].shape == (3,)


def test_0d_tensors_round_trip():
    d = [{"s": torch.tensor(1.5), "w": torch.randn(3)}, {"s": torch.tensor(-0.5), "w": torch.randn(3)}]
    u, t = unify(d)
    assert u["s"].shape == () and float(u["s"]) == 1.5
    assert t[0].mask("s").shape == () and bool(t[0].mask("s")) and not bool(t[1].mask("s"))
    assert decouple(u, t[0])["s"].shape == ()
    u2, t2 = add_task(u, t, {"s": torch.tensor(2.0), "w": torch.randn(3)})
    assert u2["s"].shape == ()


def test_unify_refuses_duplicate_task_names():
    from condu_merge import DuplicateTaskError

    ds = [{"w": torch.randn(4)} for _ in range(3)]
    with pytest.raises(DuplicateTaskError, match="'a'"):
        unify(ds, task_names=["a", "b", "a"])
    _, trig = unify(ds, task_names=["a", "b", "c"])
    assert [t.task for t in trig] == ["a", "b", "c"]


def test_merger_from_session_round_trips_and_checks():
    from condu_merge import ContinualMerger, DuplicateTaskError, KeyMismatchError, ShapeMismatchError

    m = ContinualMerger()
    for i in range(3):
        m.add_task(f"t{i}", {"w": torch.randn(4, 3), "b": torch.randn(5)})
    back = ContinualMerger.from_session(m.unified, m.triggers, m.rescaler)
    assert back.task_names == m.task_names
    for t in m.task_names:
        for k, v in m.decouple(t).items():
            assert torch.equal(back.decouple(t)[k], v)
    nxt = {"w": torch.randn(4, 3), "b": torch.randn(5)}
    m.add_task("t3", nxt)
    back.add_task("t3", nxt)
    assert all(torch.equal(back.unified[k], m.unified[k]) for k in m.unified)
    trig = m.triggers
    with pytest.raises(DuplicateTaskError, match="'t0'"):
        ContinualMerger.from_session(m.unified, [trig[0], trig[0]])
    with pytest.raises(KeyMismatchError, match="'t1'"):
        ContinualMerger.from_session({"w": m.unified["w"]}, [trig[1]])
    with pytest.raises(ShapeMismatchError, match="'b'"):
        ContinualMerger.from_session({"w": m.unified["w"], "b": torch.zeros(6)}, [trig[1]])
    with pytest.raises(ValueError, match="neither"):
        ContinualMerger.from_session(m.unified, [])


class _CountingMapping(Mapping):
    """A lazy state dict (like one backed by safe_open) that counts tensor reads."""

    def __init__(self, data):
        self._data = data
        self.reads = dict.fromkeys(data, 0)

    def __getitem__(self, k):
        self.reads[k] += 1
        return self._data[k]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


def test_lazy_deltas_are_read_once_and_still_checked():
    from condu_merge import ContinualMerger

    g = torch.Generator().manual_seed(1)
    plain = [{"w": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    lazy = [_CountingMapping(d) for d in plain]
    u, trig = unify(lazy, task_names=["a", "b", "c"])
    u_ref, trig_ref = unify(plain, task_names=["a", "b", "c"])
    assert all(torch.equal(u[k], u_ref[k]) for k in u) and trig == trig_ref
    assert all(n == 1 for m in lazy for n in m.reads.values()), [m.reads for m in lazy]
    m = ContinualMerger()
    m.add_task("a", plain[0])
    new = _CountingMapping(plain[1])
    m.add_task("b", new)
    assert new.reads == {"w": 1, "b": 1}
    bad = _CountingMapping({"w": torch.randn(5, 3), "b": torch.randn(6)})
    with pytest.raises(ShapeMismatchError, match="'b'.*shape"):
        unify([plain[0], bad], task_names=["a", "z"])
    with pytest.raises(ShapeMismatchError, match="'b'"):
        m.add_task("z", bad)
    assert m.task_names == ["a", "b"]
