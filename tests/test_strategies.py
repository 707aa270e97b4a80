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
    SignAlignmentHook,
    StrategyStateError,
    TaskStart,
    available_strategies,
    get_strategy,
    sign_agreement,
    trim_threshold,
)

ALL = ["condu", "pam", "magmax", "task_arithmetic", "ties", "emr", "continual_ft"]
F64 = torch.float64


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
    s = run_deltas(get_strategy("task_arithmetic", base, scale=0.5),
                   [{"w": torch.tensor([2.0, -4.0], dtype=F64)}, {"w": torch.tensor([4.0, 2.0], dtype=F64)}])
    assert s.model_for_inference()["w"].tolist() == [4.0, 0.0]


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_ties_matches_reference(scope, density, seed):
    taus = [rand_state(100 * seed + i) for i in range(5)]
    s = run_deltas(get_strategy("ties", rand_state(7), density=density, scale=1.3, trim_scope=scope), taus)
    assert_close(merged_delta(s), ref_ties(taus, density, 1.3, scope), atol=1e-12)


def test_ties_by_hand():
    t1 = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=F64)}
    t2 = {"w": torch.tensor([-3.0, 1.0, 0.5, 0.25], dtype=F64)}
    t3 = {"w": torch.tensor([1.0, 1.5, -1.0, 0.0], dtype=F64)}
    base = {"w": torch.zeros(4, dtype=F64)}
    # no trimming: sums [-1, 0.5, 2.5, 0.75] -> signs [-, +, +, +]; disjoint means
    s = run_deltas(TIES(base, density=1.0), [t1, t2, t3])
    assert s.model_for_inference()["w"].tolist() == [-3.0, 1.25, 1.75, 0.375]
    # keep top 2 of 4: t1 -> [0,-2,3,0], t2 -> [-3,1,0,0], t3 (tie at 1.0 kept) -> [1,1.5,-1,0]
    # sums [-2, 0.5, 2, 0] -> signs [-, +, +, + (zero elects +)]
    s = run_deltas(TIES(base, density=0.5, trim_scope="tensor"), [t1, t2, t3])
    assert s.model_for_inference()["w"].tolist() == [-3.0, 1.25, 3.0, 0.0]
    assert trim_threshold(torch.tensor([1.0, 2.0, 3.0, 0.5]), 0.5) == 2.0
    assert trim_threshold(torch.tensor([1.0, 2.0, 3.0, 0.5]), 0.01) == 3.0  # keeps at least one
    assert trim_threshold(torch.tensor([1.0, 2.0, 3.0, 0.5]), 1.0) == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_magmax_matches_reference(seed):
    taus = [rand_state(10 * seed + i) for i in range(4)]
    s = run_deltas(get_strategy("magmax", rand_state(5), scale=0.7), taus)
    assert_close(merged_delta(s), ref_magmax(taus, 0.7), atol=1e-12)


def test_magmax_by_hand_and_sequential_start():
    base = {"w": torch.zeros(3, dtype=F64)}
    s = get_strategy("magmax", base)
    assert s.begin_task("a").source == "base"
    s.end_task("a", params={"w": torch.tensor([1.0, -3.0, 2.0], dtype=F64)})
    st = s.begin_task("b")
    assert st.source == "previous" and st.params["w"].tolist() == [1.0, -3.0, 2.0]  # sequential FT
    s.end_task("b", params={"w": torch.tensor([-2.0, 2.0, -2.0], dtype=F64)})
    # per entry the larger magnitude; exact tie (2 vs -2) keeps the earlier task's entry
    assert s.model_for_inference()["w"].tolist() == [-2.0, -3.0, 2.0]


@pytest.mark.parametrize("coef", [None, 0.5, 0.2])
def test_pam_merge_matches_reference(coef):
    taus = [rand_state(i) for i in range(5)]
    s = run_deltas(PAM(rand_state(9), merge_coef=coef), taus)
    ref = {k: torch.zeros_like(v) for k, v in taus[0].items()}
    for t, tau in enumerate(taus, start=1):
        c = 1.0 if t == 1 else (1.0 / t if coef is None else coef)
        ref = {k: (1 - c) * ref[k] + c * tau[k] for k in ref}
    assert_close(merged_delta(s), ref, atol=1e-12)
    if coef is None:  # the running mean is the plain mean of the task vectors
        mean = {k: torch.stack([t[k] for t in taus]).mean(0) for k in taus[0]}
        assert_close(merged_delta(s), mean, atol=1e-12)


def test_pam_by_hand_and_merged_start():
    base = {"w": torch.tensor([10.0], dtype=F64)}
    s = PAM(base)
    assert s.begin_task("a").source == "base"
    s.end_task("a", params={"w": torch.tensor([12.0], dtype=F64)})  # τ = 2 -> m = 2
    st = s.begin_task("b")
    assert st.source == "merged" and st.params["w"].tolist() == [12.0]
    s.end_task("b", params={"w": torch.tensor([14.0], dtype=F64)})  # τ = 4 -> m = 3
    s.begin_task("c")
    s.end_task("c", params={"w": torch.tensor([16.0], dtype=F64)})  # τ = 6 -> m = 4
    assert s.model_for_inference()["w"].tolist() == [14.0]
    e = PAM(base, merge_coef=0.5, init="base")
    run_deltas(e, [{"w": torch.tensor([v], dtype=F64)} for v in (2.0, 4.0, 6.0)])
    assert e.model_for_inference()["w"].tolist() == [14.5]  # 2 -> 3 -> 4.5
    assert e.begin_task("d").source == "base"


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
    s = run_deltas(get_strategy("emr", base), [{"w": torch.tensor([1.0, -2.0], dtype=F64)},
                                                {"w": torch.tensor([3.0, 1.0], dtype=F64)}])
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


# ---------------------------------------------------------------------------- PAM's alignment

def _lora_task(seed):
    """A regression task y = W* x (8 -> 6) for the LoRA toy below."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    w_star = torch.randn(6, 8, generator=g) * 0.5
    return x, x @ w_star.T


def _train_lora(w0, factors, task, steps, hook=None, lr=0.05):
    """Plain SGD on LoRA factors A (r x 8), B (6 x r) of y = (W0 + B A) x."""
    p = {k: torch.nn.Parameter(v.clone().float()) for k, v in factors.items()}
    opt = torch.optim.SGD(p.values(), lr=lr)
    x, y = task
    for _ in range(steps):
        loss = ((x @ (w0 + p["B"] @ p["A"]).T - y) ** 2).mean()
        if hook is not None:
            loss = loss + hook.loss(p)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


def _lora_loss(w0, factors, task):
    x, y = task
    return float(((x @ (w0 + factors["B"] @ factors["A"]).T - y) ** 2).mean())


def _cosine(a, b):
    x = torch.cat([a[k].reshape(-1).double() for k in a])
    y = torch.cat([b[k].reshape(-1).double() for k in a])
    return float(x @ y / (x.norm() * y.norm()))


def test_pam_alignment_keeps_new_lora_weights_aligned_and_merge_better():
    """The paper: training aligned with the previous weights avoids interference when merging.
    Measured on a LoRA toy: sign agreement and cosine between the new task vector and the merged
    one, and the merged model's loss on both tasks, aligned (PAM: start from the merged LoRA)
    vs unaligned (a fresh LoRA init for the new task, merged by the same rule)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 8, generator=g) * 0.1
    init = {"A": torch.randn(4, 8, generator=g) * 0.3, "B": torch.zeros(6, 4)}
    tasks = [_lora_task(1), _lora_task(2)]
    res = {}
    for mode in ("aligned", "unaligned"):
        s = PAM(init)
        st = s.begin_task("t1")
        s.end_task("t1", params=_train_lora(w0, st.params, tasks[0], 60))
        m1 = merged_delta(s)
        st = s.begin_task("t2")
        assert st.source == "merged"
        if mode == "unaligned":  # what merging independently trained LoRA modules amounts to
            fresh = {"A": torch.randn(4, 8, generator=torch.Generator().manual_seed(7)) * 0.3, "B": torch.zeros(6, 4)}
            p2 = _train_lora(w0, fresh, tasks[1], 60)
        else:
            p2 = _train_lora(w0, st.params, tasks[1], 60)
        tau2 = {k: p2[k] - init[k] for k in p2}
        s.end_task("t2", params=p2)
        merged = s.model_for_inference()
        res[mode] = (sign_agreement(tau2, m1), _cosine(tau2, m1), sum(_lora_loss(w0, merged, t) for t in tasks))
    (agree_al, cos_al, loss_al), (agree_un, cos_un, loss_un) = res["aligned"], res["unaligned"]
    assert agree_al > agree_un + 0.1, res
    assert cos_al > 0.3 and cos_al > cos_un + 0.4, res
    assert loss_al < 0.85 * loss_un, res


def test_pam_sign_alignment_hook_loss_and_gradient():
    base = {"w": torch.zeros(4)}
    merged = {"w": torch.tensor([1.0, -1.0, 0.0, 2.0])}
    hook = SignAlignmentHook(base, merged, weight=2.0)
    p = {"w": torch.nn.Parameter(torch.tensor([-0.5, -0.3, 5.0, 0.7]))}
    loss = hook.loss(p)
    # only entry 0 points against the merged sign: 2.0 * 0.5 / 4
    assert abs(loss.item() - 0.25) < 1e-7
    loss.backward()
    assert p["w"].grad.tolist() == [-0.5, 0.0, 0.0, 0.0]  # descent pushes entry 0 towards +
    with pytest.raises(KeyError, match="'w'"):
        hook.loss({"v": p["w"]})


def test_pam_alignment_loss_raises_sign_agreement():
    """With init='base' (no alignment by initialisation), the optional loss term reduces sign
    conflicts between the new task vector and the merged one."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 8, generator=g) * 0.1
    init = {"A": torch.randn(4, 8, generator=g) * 0.3, "B": torch.zeros(6, 4)}
    tasks = [_lora_task(1), _lora_task(2)]
    agree = {}
    for w in (0.0, 20.0):
        s = PAM(init, init="base", align_weight=w)
        st = s.begin_task("t1")
        assert st.hook is None  # nothing to align with yet
        s.end_task("t1", params=_train_lora(w0, st.params, tasks[0], 60))
        st = s.begin_task("t2")
        assert (st.hook is None) == (w == 0.0)
        p2 = _train_lora(w0, st.params, tasks[1], 60, hook=st.hook)
        agree[w] = sign_agreement({k: p2[k] - init[k] for k in p2}, merged_delta(s))
    assert agree[20.0] > agree[0.0] + 0.2, agree


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
        handles = start.hook.attach(params) if start.hook else []
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
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
    kw = {"align_weight": 0.5} if name == "pam" else {}
    strat = continual_loop(name, model, tasks, **kw)
    assert strat.task_names == list(tasks)
    final = strat.model_for_inference()
    assert set(final) == set(theta0)
    for t, data in tasks.items():
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
