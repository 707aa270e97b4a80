"""Tests of condu_merge.strategies: every merge rule against a float64 reference written from its
definition and against small hand-computed examples; the begin/end protocol and bad input;
PAM's alignment; all strategies interchangeable in one tiny continual training loop."""

from __future__ import annotations

import math

import pytest
import torch

from condu_merge import DuplicateTaskError, KeyMismatchError, NonFiniteError, ShapeMismatchError, UnknownTaskError
from condu_merge.strategies import (
    PAM,
    TIES,
    ContinualStrategy,
    PAMAlignment,
    StrategyStateError,
    TaskStart,
    available_strategies,
    conflict_mask,
    get_strategy,
    important_signs,
    top_fraction_threshold,
    trim_threshold,
)

ALL = [
    "condu",
    "pam",
    "magmax",
    "task_arithmetic",
    "ties",
    "emr",
    "continual_ft",
    "opcm",
    "dop",
    "tall_masks",
    "dare_task_arithmetic",
    "dare_ties",
]
F64 = torch.float64
# TIES with this library's earlier rules (⌈kN⌉ kept, an exact-zero sum elects +1, disjoint mean)
LEGACY_TIES = {"trim_rule": "ceil", "zero_sign": "positive", "merge_func": "mean"}


# ---------------------------------------------------------------------------- helpers


def rand_state(seed: int, shapes=None, dtype=F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w1": (5, 7), "b1": (7,), "w2": (3, 5)}
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def run_deltas(strat: ContinualStrategy, deltas: list[dict], names=None) -> ContinualStrategy:
    names = names or [f"t{i}" for i in range(len(deltas))]
    for n, d in zip(names, deltas):
        strat.begin_task(n)
        strat.end_task(n, delta=d)
    return strat


def merged_delta(strat: ContinualStrategy) -> dict[str, torch.Tensor]:
    m = strat.model_for_inference()
    return {k: m[k] - strat.base[k] for k in m}


def assert_close(a: dict, b: dict, atol=1e-12):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].to(F64), b[k].to(F64), atol=atol, rtol=0, msg=f"tensor {k}")


# ---------------------------------------------------------------------------- float64 references


def ref_task_arithmetic(taus, lam):
    return {k: lam * torch.stack([t[k].to(F64) for t in taus]).sum(0) for k in taus[0]}


def ref_ties(taus, density, lam, scope):
    """Straight from the definition: stack everything, flatten the whole task vector when global."""
    keys = list(taus[0])

    def keep_mask(v):  # top ceil(density*N) by magnitude, ties at the threshold kept
        a = v.abs().reshape(-1)
        n = a.numel()
        keep = min(n, max(1, math.ceil(density * n - 1e-9)))
        q = torch.sort(a, descending=True).values[keep - 1]
        return v.abs() >= q

    trimmed = []
    for t in taus:
        if scope == "global":
            flat = torch.cat([t[k].reshape(-1) for k in keys]).to(F64)
            mask = keep_mask(flat)
            out, off = {}, 0
            for k in keys:
                n = t[k].numel()
                out[k] = torch.where(mask[off : off + n].reshape(t[k].shape), t[k].to(F64), 0.0)
                off += n
        else:
            out = {k: torch.where(keep_mask(t[k].to(F64)), t[k].to(F64), 0.0) for k in keys}
        trimmed.append(out)
    res = {}
    for k in keys:
        T = torch.stack([tr[k] for tr in trimmed])
        gamma = torch.where(T.sum(0) >= 0, 1.0, -1.0).to(F64)
        agree = T * gamma > 0
        cnt = agree.sum(0)
        res[k] = lam * torch.where(cnt > 0, (T * agree).sum(0) / cnt.clamp(min=1), 0.0)
    return res


def ref_magmax(taus, lam):
    out = {}
    for k in taus[0]:
        T = torch.stack([t[k].to(F64) for t in taus])
        idx = T.abs().argmax(0, keepdim=True)
        out[k] = lam * T.gather(0, idx)[0]
    return out


def ref_unify(deltas):
    """ConDU/EMR unify with the tensor_mean rescaler, float64, experts materialised."""
    keys = list(deltas[0])
    u, masks = {}, [dict() for _ in deltas]
    for k in keys:
        D = torch.stack([d[k].to(F64) for d in deltas])
        s = torch.where(D.sum(0) > 0, 1.0, -1.0).to(F64)
        M = D * s > 0
        u[k] = torch.where(M.any(0), s * (M * D.abs()).amax(0), 0.0)
        for i in range(len(deltas)):
            masks[i][k] = M[i]
    lams = []
    for i, d in enumerate(deltas):
        top = sum(d[k].to(F64).abs().mean().item() for k in keys)
        bot = sum((masks[i][k] * u[k]).abs().mean().item() for k in keys)
        lams.append(top / bot if bot > 0 else 0.0)
    experts = [{k: lams[i] * (masks[i][k].to(F64) * u[k]) for k in keys} for i in range(len(deltas))]
    return u, experts


# ---------------------------------------------------------------------------- registry & protocol


def test_registry_lists_every_strategy():
    assert sorted(ALL) == available_strategies()
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        get_strategy("nope", rand_state(0))


@pytest.mark.parametrize("name", ALL)
def test_protocol_and_bad_input(name):
    base = rand_state(0)
    s = get_strategy(name, base)
    with pytest.raises(StrategyStateError, match="without begin_task"):
        s.end_task("a", delta=rand_state(1))
    start = s.begin_task("a")
    assert isinstance(start, TaskStart) and start.source == "base"
    assert_close(start.params, base, atol=0)
    start.params["w1"].add_(100.0)  # a copy: the strategy's θ_0 is untouched
    assert_close(s.base, base, atol=0)
    with pytest.raises(StrategyStateError, match="still open"):
        s.begin_task("b")
    bad = rand_state(1)
    del bad["b1"]
    with pytest.raises(KeyMismatchError, match="b1"):
        s.end_task("a", delta=bad)
    bad = rand_state(1)
    bad["w2"] = torch.zeros(5, 3, dtype=F64)
    with pytest.raises(ShapeMismatchError, match="'w2'"):
        s.end_task("a", delta=bad)
    bad = rand_state(1)
    bad["w1"][2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"task 'a'.*'w1'.*index 17"):
        s.end_task("a", delta=bad)
    with pytest.raises(ValueError, match="exactly one"):
        s.end_task("a")
    assert s.task_names == []  # failed end_task changed nothing; the task is still open
    s.end_task("a", delta=rand_state(1))
    assert s.task_names == ["a"]
    with pytest.raises(DuplicateTaskError):
        s.begin_task("a")
    with pytest.raises(UnknownTaskError):
        s.expert("zzz")
    with pytest.raises(UnknownTaskError):
        s.model_for_inference("zzz")
    # params= and delta= are the same thing
    s2 = get_strategy(name, base)
    s2.begin_task("a")
    s2.end_task("a", params={k: base[k] + v for k, v in rand_state(1).items()})
    assert_close(s2.model_for_inference(), s.model_for_inference(), atol=1e-12)


def test_params_from_a_module_state_dict_are_copied():
    lin = torch.nn.Linear(3, 2)
    s = get_strategy("continual_ft", lin.state_dict())
    before = {k: v.clone() for k, v in s.base.items()}
    with torch.no_grad():
        lin.weight.add_(1.0)  # training in place must not move θ_0
    assert_close(s.base, before, atol=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_kept_and_no_aliasing(name, dtype):
    base = rand_state(0, dtype=dtype)
    deltas = [rand_state(i, dtype=dtype) for i in (1, 2, 3)]
    keep = [{k: v.clone() for k, v in d.items()} for d in deltas]
    s = run_deltas(get_strategy(name, base), deltas)
    before = s.model_for_inference("t1")
    for d in deltas:  # the caller reuses its buffers: the strategy must not see it
        for v in d.values():
            v.mul_(-7.0)
    after = s.model_for_inference("t1")
    assert_close(after, before, atol=0)
    assert all(v.dtype == dtype for v in after.values())
    ref = run_deltas(get_strategy(name, base), keep).model_for_inference("t1")
    assert_close(after, ref, atol=0)


# ---------------------------------------------------------------------------- merge rules vs float64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_task_arithmetic_matches_reference(seed):
    taus = [rand_state(10 * seed + i) for i in range(4)]
    s = run_deltas(get_strategy("task_arithmetic", rand_state(99), scale=0.3), taus)
    assert_close(merged_delta(s), ref_task_arithmetic(taus, 0.3), atol=1e-12)
    assert_close({k: v - s.base[k] for k, v in s.expert("t2").items()}, taus[2], atol=1e-12)


def test_task_arithmetic_by_hand():
    base = {"w": torch.tensor([1.0, 1.0], dtype=F64)}
    s = run_deltas(
        get_strategy("task_arithmetic", base, scale=0.5),
        [{"w": torch.tensor([2.0, -4.0], dtype=F64)}, {"w": torch.tensor([4.0, 2.0], dtype=F64)}],
    )
    assert s.model_for_inference()["w"].tolist() == [4.0, 0.0]


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_ties_matches_reference(scope, density, seed):
    taus = [rand_state(100 * seed + i) for i in range(5)]
    # this library's earlier rules, kept as options (the reference rules: tests/test_strategies_peers.py)
    s = run_deltas(
        get_strategy("ties", rand_state(7), density=density, scale=1.3, trim_scope=scope, **LEGACY_TIES), taus
    )
    assert_close(merged_delta(s), ref_ties(taus, density, 1.3, scope), atol=1e-12)


def test_ties_by_hand():
    t1 = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=F64)}
    t2 = {"w": torch.tensor([-3.0, 1.0, 0.5, 0.25], dtype=F64)}
    t3 = {"w": torch.tensor([1.0, 1.5, -1.0, 0.0], dtype=F64)}
    base = {"w": torch.zeros(4, dtype=F64)}
    # no trimming: sums [-1, 0.5, 2.5, 0.75] -> signs [-, +, +, +]; disjoint means
    s = run_deltas(TIES(base, density=1.0, scale=1.0, **LEGACY_TIES), [t1, t2, t3])
    assert s.model_for_inference()["w"].tolist() == [-3.0, 1.25, 1.75, 0.375]
    # keep top 2 of 4: t1 -> [0,-2,3,0], t2 -> [-3,1,0,0], t3 (tie at 1.0 kept) -> [1,1.5,-1,0]
    # sums [-2, 0.5, 2, 0] -> signs [-, +, +, + (zero elects +)]
    s = run_deltas(TIES(base, density=0.5, scale=1.0, trim_scope="tensor", **LEGACY_TIES), [t1, t2, t3])
    assert s.model_for_inference()["w"].tolist() == [-3.0, 1.25, 3.0, 0.0]
    assert trim_threshold(torch.tensor([1.0, 2.0, 3.0, 0.5]), 0.5, "ceil") == 2.0
    assert trim_threshold(torch.tensor([1.0, 2.0, 3.0, 0.5]), 0.01, "ceil") == 3.0  # keeps at least one
    assert trim_threshold(torch.tensor([1.0, 2.0, 3.0, 0.5]), 1.0, "ceil") == 0.5
    # the reference rule: the (N - int(N k))-th smallest, i.e. int(N k) + 1 kept
    assert trim_threshold(torch.tensor([1.0, 2.0, 3.0, 0.5]), 0.5) == 1.0
    assert trim_threshold(torch.tensor([1.0, 2.0, 3.0, 0.5]), 0.01) == 3.0
    assert trim_threshold(torch.tensor([1.0, 2.0, 3.0, 0.5]), 1.0) == 0.5
    assert trim_threshold(torch.tensor([1.0, 2.0, 3.0, 0.5]), 50) == 1.0  # a percentage, as the peers' K


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_magmax_matches_reference(seed):
    taus = [rand_state(10 * seed + i) for i in range(4)]
    s = run_deltas(get_strategy("magmax", rand_state(5), scale=0.7, tie="earlier"), taus)
    assert_close(merged_delta(s), ref_magmax(taus, 0.7), atol=1e-12)


def test_magmax_by_hand_and_sequential_start():
    base = {"w": torch.zeros(3, dtype=F64)}
    s = get_strategy("magmax", base, scale=1.0, tie="earlier")
    assert s.begin_task("a").source == "base"
    s.end_task("a", params={"w": torch.tensor([1.0, -3.0, 2.0], dtype=F64)})
    st = s.begin_task("b")
    assert st.source == "previous" and st.params["w"].tolist() == [1.0, -3.0, 2.0]  # sequential FT
    s.end_task("b", params={"w": torch.tensor([-2.0, 2.0, -2.0], dtype=F64)})
    # per entry the larger magnitude; exact tie (2 vs -2) keeps the earlier task's entry
    assert s.model_for_inference()["w"].tolist() == [-2.0, -3.0, 2.0]


@pytest.mark.parametrize("coef", ["default", None, 0.2, 1.0])
def test_pam_merge_matches_reference(coef):
    taus = [rand_state(i) for i in range(5)]
    kw = {} if coef == "default" else {"merge_coef": coef}
    s = run_deltas(PAM(rand_state(9), **kw), taus)
    c_of = {"default": 0.5, 0.2: 0.2, 1.0: 1.0}
    ref = {k: torch.zeros_like(v) for k, v in taus[0].items()}
    for t, tau in enumerate(taus, start=1):
        c = 1.0 if t == 1 else (1.0 / t if coef is None else c_of[coef])
        ref = {k: (1 - c) * ref[k] + c * tau[k] for k in ref}
    assert_close(merged_delta(s), ref, atol=1e-12)
    if coef is None:  # the running mean is the plain mean of the task vectors
        mean = {k: torch.stack([t[k] for t in taus]).mean(0) for k in taus[0]}
        assert_close(merged_delta(s), mean, atol=1e-12)
    if coef == 1.0:  # c = 1: the global module is the last task's model (continual FT's rule)
        assert_close(merged_delta(s), taus[-1], atol=1e-12)


def test_pam_by_hand_and_merged_start():
    base = {"w": torch.tensor([10.0], dtype=F64)}
    s = PAM(base)  # default: G_t = (G_{t-1} + θ_t) / 2
    st = s.begin_task("a")
    assert st.source == "base" and st.hook is None  # no global module yet: nothing to align with
    s.end_task("a", params={"w": torch.tensor([12.0], dtype=F64)})  # G_1 = θ_1 = 12
    st = s.begin_task("b")
    assert st.source == "merged" and st.params["w"].tolist() == [12.0]
    assert isinstance(st.hook, PAMAlignment)
    s.end_task("b", params={"w": torch.tensor([14.0], dtype=F64)})  # (12 + 14) / 2 = 13
    assert s.begin_task("c").params["w"].tolist() == [13.0]
    s.end_task("c", params={"w": torch.tensor([17.0], dtype=F64)})  # (13 + 17) / 2 = 15
    assert s.model_for_inference()["w"].tolist() == [15.0]
    assert s.global_module()["w"].tolist() == [15.0]
    assert s.model_for_inference("a")["w"].tolist() == [15.0]  # one model for every task
    r = PAM(base, merge_coef=None, init="base", align_fraction=0.0)
    run_deltas(r, [{"w": torch.tensor([v], dtype=F64)} for v in (2.0, 4.0, 6.0)])
    assert r.model_for_inference()["w"].tolist() == [14.0]  # running mean of 2, 4, 6
    st = r.begin_task("d")
    assert st.source == "base" and st.hook is None  # ablation; align_fraction=0: no alignment


def test_pam_rejects_bad_options():
    base = rand_state(0)
    for kw in (
        {"align_fraction": 1.5},
        {"align_fraction": -0.1},
        {"align_every": 0},
        {"align_every": 2.5},
        {"reset_to": "random"},
        {"align_on": "grads"},
        {"scope": "layer"},
        {"reset_optimizer": "adam"},
        {"merge_coef": 0.0},
        {"merge_coef": 1.5},
        {"init": "previous"},
    ):
        with pytest.raises(ValueError, match=next(iter(kw))):
            PAM(base, **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_emr_matches_reference(seed):
    deltas = [rand_state(10 * seed + i) for i in range(4)]
    s = run_deltas(get_strategy("emr", rand_state(3)), deltas)
    u, experts = ref_unify(deltas)
    assert_close(merged_delta(s), u, atol=1e-12)
    for i in range(4):
        got = {k: v - s.base[k] for k, v in s.expert(f"t{i}").items()}
        assert_close(got, experts[i], atol=1e-12)
        assert_close(s.model_for_inference(f"t{i}"), s.expert(f"t{i}"), atol=0)


def test_emr_by_hand():
    base = {"w": torch.zeros(2, dtype=F64)}
    s = run_deltas(
        get_strategy("emr", base),
        [{"w": torch.tensor([1.0, -2.0], dtype=F64)}, {"w": torch.tensor([3.0, 1.0], dtype=F64)}],
    )
    # s = [+, -]; M1 = [1, 1], M2 = [1, 0]; u = [3, -2]; λ1 = 1.5/2.5, λ2 = 2/1.5
    assert s.model_for_inference()["w"].tolist() == [3.0, -2.0]
    torch.testing.assert_close(s.expert("t0")["w"], torch.tensor([1.8, -1.2], dtype=F64))
    torch.testing.assert_close(s.expert("t1")["w"], torch.tensor([4.0, 0.0], dtype=F64))


@pytest.mark.parametrize("seed", [0, 1])
def test_condu_matches_naive_decouple_unify(seed):
    deltas = [rand_state(10 * seed + i) for i in range(4)]
    s = run_deltas(get_strategy("condu", rand_state(3)), deltas)
    experts: list[dict] = []
    for d in deltas:  # one session: decouple every earlier expert, unify with the new delta
        u, experts = ref_unify(experts + [d])
    assert_close(merged_delta(s), u, atol=1e-10)
    for i in range(4):
        got = {k: v - s.base[k] for k, v in s.expert(f"t{i}").items()}
        assert_close(got, experts[i], atol=1e-10)
    assert s.begin_task("new").source == "base"  # every ConDU task trains from θ_0


def test_continual_ft_by_hand():
    base = {"w": torch.tensor([1.0], dtype=F64)}
    s = get_strategy("continual_ft", base)
    s.begin_task("a")
    s.end_task("a", params={"w": torch.tensor([3.0], dtype=F64)})
    st = s.begin_task("b")
    assert st.source == "previous" and st.params["w"].tolist() == [3.0]
    s.end_task("b", params={"w": torch.tensor([-5.0], dtype=F64)})
    assert s.model_for_inference()["w"].tolist() == [-5.0]
    assert s.expert("a")["w"].tolist() == [-5.0]  # one model for every task


def test_stored_bytes():
    shapes = {"w": (64, 33), "b": (33,)}
    n = 64 * 33 + 33
    base = rand_state(0, shapes, torch.float32)
    deltas = [rand_state(i, shapes, torch.float32) for i in range(1, 4)]
    got = {}
    for name in ALL:
        got[name] = run_deltas(get_strategy(name, base), deltas).stored_bytes()
        assert got[name].what and got[name].total == got[name].shared_bytes + sum(got[name].per_task_bytes.values())
        assert list(got[name].per_task_bytes) == ["t0", "t1", "t2"]
    assert got["task_arithmetic"].per_task_bytes["t0"] == 4 * n and got["task_arithmetic"].shared_bytes == 0
    assert got["emr"].total == 3 * 4 * n
    assert got["ties"].per_task_bytes["t1"] == 4 * n + 8
    assert got["pam"].total == 4 * n and got["continual_ft"].total == 4 * n
    assert got["magmax"].total == 2 * 4 * n
    masks = math.ceil(64 * 33 / 8) + math.ceil(33 / 8)
    assert got["condu"].shared_bytes == 4 * n and got["condu"].per_task_bytes["t2"] == masks + 8
    assert got["opcm"].shared_bytes == 4 * n and got["opcm"].per_task_bytes["t1"] == 8  # S + each task's norm
    assert got["dop"].total == 4 * n and got["dare_task_arithmetic"].total == 4 * n
    assert got["tall_masks"].shared_bytes == 4 * n and got["tall_masks"].per_task_bytes["t0"] == masks + 4 * n
    assert got["dare_ties"].per_task_bytes["t1"] == 4 * n + 8


# ---------------------------------------------------------------------------- PAM's alignment


def ref_important_signs(values, fraction, scope):
    """From the definition: sort magnitudes, keep those >= the ceil(p N)-th largest, drop zeros."""

    def keep(flat):
        n = flat.numel()
        k = min(n, math.ceil(fraction * n - 1e-9))
        if k == 0:
            return float("inf")
        return float(torch.sort(flat.abs().double(), descending=True).values[k - 1])

    if scope == "global":
        q = keep(torch.cat([v.reshape(-1) for v in values.values()]))
    out = {}
    for name, v in values.items():
        qq = q if scope == "global" else keep(v.reshape(-1))
        out[name] = torch.where((v.abs().double() >= qq) & (v != 0), torch.sign(v), torch.zeros_like(v)).to(torch.int8)
    return out


def test_pam_important_signs_by_hand():
    g = {"a": torch.tensor([3.0, -1.0, 0.0, -5.0, 2.0]), "b": torch.tensor([10.0, -0.5])}
    assert important_signs(g, 0.4)["a"].tolist() == [1, 0, 0, -1, 0]  # top ceil(0.4*5)=2 of a
    assert important_signs(g, 0.4)["b"].tolist() == [1, 0]  # top ceil(0.8)=1 of b
    glob = important_signs(g, 0.3, "global")  # top ceil(2.1)=3 over 7 entries: 10, -5, 3
    assert glob["a"].tolist() == [1, 0, 0, -1, 0] and glob["b"].tolist() == [1, 0]
    assert important_signs(g, 1.0)["a"].tolist() == [1, -1, 0, -1, 1]  # zeros never carry a sign
    assert important_signs(g, 0.0)["a"].tolist() == [0, 0, 0, 0, 0]
    ties = {"t": torch.tensor([2.0, -2.0, 2.0, 1.0])}
    assert important_signs(ties, 0.25)["t"].tolist() == [1, -1, 1, 0]  # ties at the threshold kept
    assert top_fraction_threshold(torch.tensor([1.0, 4.0, 2.0, 3.0]), 0.5) == 3.0
    # relative to a reference (full fine-tuning: task vectors)
    ref = {"a": torch.ones(5), "b": torch.ones(2)}
    # g - 1 = [2, -2, -1, -6, 1]: top 2 are -6 and 2, and -2 ties with 2
    assert important_signs(g, 0.4, reference=ref)["a"].tolist() == [1, -1, 0, -1, 0]


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.77, 1.0])
def test_pam_important_signs_match_reference(scope, fraction):
    g = torch.Generator().manual_seed(3)
    vals = {
        "w": torch.randint(-4, 5, (7, 9), generator=g).float(),
        "v": torch.randn(31, generator=g),
        "e": torch.zeros(3),
    }
    got, ref = important_signs(vals, fraction, scope), ref_important_signs(vals, fraction, scope)
    for k in vals:
        assert torch.equal(got[k], ref[k]), k


def test_pam_conflict_mask_is_strict():
    x = torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0, 0.5])
    s = torch.tensor([-1, 1, 1, 1, 0, 0], dtype=torch.int8)
    assert conflict_mask(x, s).tolist() == [True, True, False, False, False, False]


def test_pam_alignment_resets_by_hand():
    glob = {"w": torch.tensor([3.0, -1.0, 0.0, -5.0, 2.0])}
    x = [-1.0, 2.0, 7.0, 4.0, -3.0]  # conflicts with the important (+3 at 0, -5 at 3) entries 0 and 3
    for reset, want in (("global", [3.0, 2.0, 7.0, -5.0, -3.0]), ("zero", [0.0, 2.0, 7.0, 0.0, -3.0])):
        hook = PAMAlignment(glob, fraction=0.4, reset_to=reset)
        p = {"w": torch.nn.Parameter(torch.tensor(x))}
        assert hook.important_count == 2 and hook.conflict_fraction(p) == 1.0
        assert hook.align(p) == 2 and p["w"].tolist() == want
        assert hook.conflict_fraction(p) == 0.0 and hook.align(p) == 0 and hook.resets == [2, 0]
    # task vectors (full fine-tuning): compare θ - θ_0 with G - θ_0; "zero" resets to θ_0
    theta0 = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])}  # G - θ_0 = [2, -2, -1, -6, 1]
    hook = PAMAlignment(glob, reference=theta0, fraction=0.4, reset_to="zero")
    p = {"w": torch.nn.Parameter(torch.tensor([0.0, 0.0, 0.0, 3.0, 5.0]))}  # θ - θ_0 = [-1, -1, -1, 2, 4]
    # important: 2 (+) at 0, -2 (-) at 1 (tie kept), -6 (-) at 3 -> conflicts at 0 and 3 (entry 1 agrees)
    assert hook.align(p) == 2 and p["w"].tolist() == [1.0, 0.0, 0.0, 1.0, 5.0]
    with pytest.raises(KeyError, match="'w'"):
        hook.align({"v": p["w"]})
    with pytest.raises(ShapeMismatchError, match="'w'"):
        hook.align({"w": torch.zeros(4)})


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("mode", ["momentum", "all", "none"])
def test_pam_alignment_resets_optimizer_state_of_reset_entries(opt_name, mode):
    glob = {"w": torch.tensor([3.0, -1.0, 0.5, -5.0])}
    hook = PAMAlignment(glob, fraction=0.5, reset_optimizer=mode)  # important: 0 (+), 3 (-)
    p = {"w": torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0, -1.0]))}
    opt = (
        torch.optim.AdamW(p.values(), lr=0.1)
        if opt_name == "adamw"
        else torch.optim.SGD(p.values(), lr=0.1, momentum=0.9)
    )
    (p["w"] * torch.tensor([1.0, 1.0, 1.0, -1.0])).sum().backward()  # w0 goes down: -> conflict at 0
    opt.step()
    with torch.no_grad():
        p["w"][0] = -0.5
    before = {k: v.clone() for k, v in opt.state[p["w"]].items() if isinstance(v, torch.Tensor) and v.shape == (4,)}
    assert before and all(v[0].item() != 0.0 for v in before.values())  # first moments exist
    assert hook.align(p, opt) == 1 and p["w"][0].item() == 3.0
    after = opt.state[p["w"]]
    for name, old in before.items():
        zeroed = mode == "all" or (mode == "momentum" and name in ("exp_avg", "momentum_buffer"))
        assert (after[name][0].item() == 0.0) == zeroed, (name, mode)
        assert torch.equal(after[name][1:], old[1:]), name  # other entries untouched


def test_pam_alignment_runs_every_k_steps_through_the_optimizer():
    glob = {"w": torch.tensor([1.0, -1.0, 1.0, -1.0])}
    hook = PAMAlignment(glob, fraction=1.0, every=3)
    p = {"w": torch.nn.Parameter(torch.zeros(4))}
    opt = torch.optim.SGD(p.values(), lr=1.0)
    handles = hook.attach(p, optimizer=opt)
    for step in range(1, 11):
        opt.zero_grad()
        (p["w"] * torch.tensor([1.0, -1.0, -1.0, 1.0])).sum().backward()  # pushes entries 0 and 1 against G
        opt.step()
        assert hook.steps == step and hook.alignments == step // 3
        if step % 3 == 0:
            assert hook.conflict_fraction(p) == 0.0  # just aligned
    for h in handles:
        h.remove()
    opt.step()
    assert hook.steps == 10  # detached


def _lora_task(seed, w_star):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    return x, x @ w_star.T


def _train_lora(w0, factors, task, steps, hook=None, lr=0.02):
    """AdamW on LoRA factors A (r x 8), B (6 x r) of y = (W0 + B A) x, the hook on the optimizer."""
    p = {k: torch.nn.Parameter(v.clone().float()) for k, v in factors.items()}
    opt = torch.optim.AdamW(p.values(), lr=lr, weight_decay=0.0)
    handles = hook.attach(p, optimizer=opt) if hook is not None else []
    x, y = task
    for _ in range(steps):
        loss = ((x @ (w0 + p["B"] @ p["A"]).T - y) ** 2).mean()
        if hook is not None:
            loss = loss + hook.loss(p)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for h in handles:
        h.remove()
    return {k: v.detach() for k, v in p.items()}


def _lora_loss(w0, factors, task):
    x, y = task
    return float(((x @ (w0 + factors["B"] @ factors["A"]).T - y) ** 2).mean())


def test_pam_alignment_trades_plasticity_for_stability_on_a_lora_toy():
    """The paper: re-initialising the new task's weights that conflict in sign with the global
    LoRA's important weights keeps them aligned, so the average interferes less with what the
    global module learned; a higher alignment percentage is more stability, less plasticity.
    Two conflicting regression tasks on a LoRA toy, alignment every 5 steps, p in {0, 0.5, 1}."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 8, generator=g) * 0.1
    init = {"A": torch.randn(4, 8, generator=g) * 0.3, "B": torch.zeros(6, 4)}
    w1 = torch.randn(6, 8, generator=g) * 0.5
    w2 = -w1 + 0.25 * torch.randn(6, 8, generator=g)
    tasks = [_lora_task(1, w1), _lora_task(2, w2)]
    res = {}
    for frac in (0.0, 0.5, 1.0):
        s = PAM(init, align_fraction=frac, align_every=5)
        st = s.begin_task("t1")
        s.end_task("t1", params=_train_lora(w0, st.params, tasks[0], 100))
        st = s.begin_task("t2")
        assert st.source == "merged" and (st.hook is None) == (frac == 0.0)
        p2 = _train_lora(w0, st.params, tasks[1], 100, hook=st.hook)
        probe = PAMAlignment(s.global_module(), fraction=0.5)  # the same yardstick for every run
        resets = sum(st.hook.resets) if st.hook else 0
        s.end_task("t2", params=p2)
        merged = s.model_for_inference()
        res[frac] = dict(
            conflict=probe.conflict_fraction(p2),
            resets=resets,
            plastic=_lora_loss(w0, p2, tasks[1]),
            stable=_lora_loss(w0, merged, tasks[0]),
        )
    assert res[0.0]["conflict"] > 0.3 and res[0.5]["conflict"] == 0.0 and res[1.0]["conflict"] == 0.0, res
    assert 0 < res[0.5]["resets"] < res[1.0]["resets"], res
    # stability: the merged model forgets task 1 less as p grows ...
    assert res[1.0]["stable"] < 0.8 * res[0.5]["stable"] < 0.8 * 0.8 * res[0.0]["stable"], res
    # ... and plasticity: the task-2 module fits task 2 less well
    assert res[0.0]["plastic"] < res[0.5]["plastic"] < res[1.0]["plastic"], res


# ---------------------------------------------------------------------------- interchangeable loop


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _class_task(seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 6, generator=g) * 2.0
    y = torch.randint(0, 3, (192,), generator=g)
    return centers[y] + 0.5 * torch.randn(192, 6, generator=g), y


def _loss(model, state, task):
    model.load_state_dict(state)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(task[0]), task[1]))


def continual_loop(name, model, tasks, steps=40, **kw):
    """The loop an experiment script runs, identical for every strategy."""
    strat = get_strategy(name, model.state_dict(), **kw)
    for tname, (x, y) in tasks.items():
        start = strat.begin_task(tname)
        model.load_state_dict(start.params)
        params = dict(model.named_parameters())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handles = start.hook.attach(params, optimizer=opt) if start.hook else []
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if start.hook:
                loss = loss + start.hook.loss(params)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for h in handles:
            h.remove()
        strat.end_task(tname, params=model.state_dict())
    return strat


@pytest.mark.parametrize("name", ALL)
def test_strategies_interchangeable_in_a_continual_loop(name):
    torch.manual_seed(0)
    model = TinyMLP()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = {f"task{i}": _class_task(i) for i in range(3)}
    kw = {"align_every": 5, "align_on": "task_vector"} if name == "pam" else {}
    strat = continual_loop(name, model, tasks, **kw)
    assert strat.task_names == list(tasks)
    final = strat.model_for_inference()
    assert set(final) == set(theta0)
    for t, _data in tasks.items():
        model.load_state_dict(strat.model_for_inference(t))  # loads into the model as is
        model.load_state_dict(strat.expert(t))
    # every strategy learned something: mean loss over the tasks, with the model each strategy
    # uses for each task, is below the pretrained model's
    used = lambda t: strat.model_for_inference(t)  # noqa: E731
    mean_loss = sum(_loss(model, used(t), d) for t, d in tasks.items()) / 3
    mean_loss0 = sum(_loss(model, theta0, d) for d in tasks.values()) / 3
    assert mean_loss < mean_loss0, (name, mean_loss, mean_loss0)
    rep = strat.stored_bytes()
    assert rep.total > 0 and set(rep.per_task_bytes) == set(tasks)


def test_condu_lora_delta_is_just_a_state_dict():
    """ConDU (LoRA): the caller hands over ΔW = s·B A per target weight; the strategy is the same."""
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(6, 8, generator=g, dtype=F64)}
    s = get_strategy("condu", base)
    experts: list[dict] = []
    for i in range(3):
        assert s.begin_task(f"t{i}").source == "base"  # a fresh LoRA on θ_0
        B, A = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(2, 8, generator=g, dtype=F64)
        d = {"layer.weight": 2.0 * B @ A}
        s.end_task(f"t{i}", delta=d)
        _, experts = ref_unify(experts + [d])
    got = s.expert("t1")["layer.weight"] - base["layer.weight"]
    torch.testing.assert_close(got, experts[1]["layer.weight"], atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "reset,frame", [("global", "values"), ("zero", "values"), ("global", "task_vector"), ("zero", "task_vector")]
)
def test_pam_align_matches_a_plain_reference_exactly(dtype, reset, frame):
    """The fast blend (lerp with a 0/1 weight, multiply by the keep mask) equals the plain
    masked assignment bit for bit, including the optimizer's first moments."""
    g = torch.Generator().manual_seed(5)
    shapes = {"w": (33, 17), "v": (101,), "e": (0,)}
    glob = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    theta0 = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()} if frame == "task_vector" else None
    start = {k: (v + torch.randn(v.shape, generator=g).to(dtype)) for k, v in glob.items()}
    hook = PAMAlignment(glob, reference=theta0, fraction=0.6, reset_to=reset, scope="global")
    p = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = torch.optim.SGD(p.values(), lr=0.1, momentum=0.9)
    for v in p.values():
        v.grad = torch.randn(v.shape, generator=g).to(dtype)
    opt.step()
    bufs = {k: opt.state[v]["momentum_buffer"].clone() for k, v in p.items()}
    now = {k: v.detach().clone() for k, v in p.items()}
    n = hook.align(p, opt)
    # the reference, straight from the definition
    signs = important_signs(glob, 0.6, "global", theta0)
    total = 0
    for k in shapes:
        x = now[k] - theta0[k] if theta0 is not None else now[k]
        c = ((x > 0) & (signs[k] < 0)) | ((x < 0) & (signs[k] > 0))
        total += int(c.sum())
        target = glob[k] if reset == "global" else (theta0[k] if theta0 is not None else torch.zeros_like(now[k]))
        want = now[k].clone()
        want[c] = target[c]
        assert torch.equal(p[k].detach(), want), k
        buf = bufs[k].clone()
        buf[c] = 0
        assert torch.equal(opt.state[p[k]]["momentum_buffer"], buf), k
    assert n == total > 0
