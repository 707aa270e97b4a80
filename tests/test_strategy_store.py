"""Every strategy on disk (:class:`condu_merge.strategy_store.StrategyStore`) and through the CLI
(``condu-merge add-task --method NAME --set k=v``, ``export``, ``inspect``, ``verify``): equal, bit
for bit, to the same strategy in memory; refusals that name both sides; SIGKILL at every step of
a non-ConDU add leaves the old or the new generation."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from condu_merge.cli import main
from condu_merge.digests import default_algorithm
from condu_merge.errors import FormatError, NonFiniteError, OptionMismatchError
from condu_merge.store import Store
from condu_merge.strategies import get_strategy
from condu_merge.strategies.rule import available_rules, get_rule
from condu_merge.strategies.ties import kth_smallest_streaming
from condu_merge.strategy_store import StrategyStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"enc.w": (6, 5), "enc.b": (5,), "head.w": (3, 4), "conv": (2, 3, 2)}
OPTS = {"dop": {"num_steps": 5}}  # DOP's 200 Adam steps per matrix are the slow part; 5 show the rule


def _family(n: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    deltas = [{k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in SHAPES.items()} for _ in range(n)]
    for d in deltas:  # exact zeros and exact ties: where the rules differ
        d["enc.b"][0] = 0.0
    if n >= 2:
        deltas[1]["enc.b"][1] = deltas[0]["enc.b"][1]
        deltas[1]["head.w"][0, 0] = -deltas[0]["head.w"][0, 0]
    if n >= 3:
        deltas[2]["enc.b"][2] = -deltas[0]["enc.b"][2]
    return base, deltas


def _in_memory(method, base, deltas, opts, names=None):
    s = get_strategy(method, base, **opts)
    for i, d in enumerate(deltas):
        name = names[i] if names else f"t{i}"
        s.begin_task(name)
        s.end_task(name, delta=d)
    return s


def _assert_equal_models(ref, got, what):
    assert set(ref) == set(got), what
    for k in ref:
        assert ref[k].dtype == got[k].dtype, (what, k)
        assert torch.equal(ref[k], got[k]), (what, k, (ref[k].double() - got[k].double()).abs().max())


@pytest.mark.parametrize("method", available_rules())
def test_every_strategy_on_disk_equals_it_in_memory(tmp_path, method):
    base, deltas = _family(3)
    opts = OPTS.get(method, {})
    ref = _in_memory(method, base, deltas, opts)
    st = StrategyStore(tmp_path / "s")
    for i, d in enumerate(deltas):
        st.add_task(f"t{i}", d, method=method if i == 0 else None, options=opts if i == 0 else None)
    st = StrategyStore(tmp_path / "s", verify=True)
    assert st.task_names == ["t0", "t1", "t2"] and st.method == method
    for task in (None, "t0", "t1", "t2"):
        _assert_equal_models(ref.model_for_inference(task), st.model(task, base=base), (method, task))
    # what it keeps: O(1) models for the continual rules, per-task files for the others
    rule = get_rule(method, **opts)
    per_task = [s for s in rule.slots() if s.per_task]
    assert rule.continual == ref.continual
    if rule.continual:
        assert not per_task or all(s.packed for s in per_task)
    files = set(st.manifest["files"])
    for s in rule.slots():
        assert (s.file(2) if s.per_task else s.file()) in files


def test_rule_defaults_are_the_in_memory_defaults():
    """A store created without --set holds exactly what get_strategy(method) would compute."""
    for method in available_rules():
        cls = type(get_strategy(method, {"x": torch.zeros(1)}))
        sig = inspect.signature(cls.__init__).parameters
        want = {k: p.default for k, p in sig.items() if k not in ("self", "base", "copy_base")}
        assert get_rule(method).defaults == want, method


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_kth_equals_kthvalue_with_ties(dtype):
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(n, generator=g).to(dtype).abs() for n in (1, 700, 33, 0, 4096)]
    chunks[2][:10] = chunks[1][5]  # exact ties across chunks
    chunks[4][:100] = 0.0
    flat = torch.cat(chunks)
    for rank in (1, 2, 50, 101, flat.numel() // 2, flat.numel() - 1, flat.numel()):
        want = float(flat.kthvalue(rank).values)
        assert kth_smallest_streaming(lambda: iter(chunks), rank, dtype) == want, rank


def test_first_task_fixes_method_and_options(tmp_path):
    base, deltas = _family(3)
    st = StrategyStore(tmp_path / "s")
    st.add_task("t0", deltas[0], method="ties", options={"density": 20, "merge_func": "dis-mean"})
    assert st.options["density"] == 20.0 and st.options["merge_func"] == "mean"
    with pytest.raises(OptionMismatchError, match="--method magmax differs from the store's ties"):
        st.add_task("t1", deltas[1], method="magmax")
    with pytest.raises(OptionMismatchError, match=r"options \{'scale': 1.0\} differ from the store's \{'scale': 0.3\}"):
        st.add_task("t1", deltas[1], options={"scale": 1.0})
    st.add_task("t1", deltas[1], method="ties", options={"merge_func": "mean"})  # repeating is fine
    with pytest.raises(ValueError, match="unknown option 'densty'"):
        StrategyStore(tmp_path / "n").add_task("t0", deltas[0], method="ties", options={"densty": 0.2})
    with pytest.raises(ValueError, match="unknown method 'tiez'"):
        StrategyStore(tmp_path / "n").add_task("t0", deltas[0], method="tiez")
    assert not os.path.exists(tmp_path / "n")  # a refused first write leaves nothing behind
    assert StrategyStore(tmp_path / "s").task_names == ["t0", "t1"]


def test_bad_input_is_refused_and_loses_nothing(tmp_path):
    base, deltas = _family(2)
    st = StrategyStore(tmp_path / "s")
    st.add_task("t0", deltas[0], method="opcm")
    before = json.loads((tmp_path / "s" / "manifest.json").read_text())
    bad = {k: v.clone() for k, v in deltas[1].items()}
    bad["head.w"][1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"task 'bad'.*'head.w'.*flat index 6"):
        st.add_task("bad", bad)
    with pytest.raises(Exception, match="missing"):
        st.add_task("bad", {k: v for k, v in deltas[1].items() if k != "conv"})
    assert json.loads((tmp_path / "s" / "manifest.json").read_text()) == before
    assert sorted(os.listdir(tmp_path / "s")) == [".lock", before["generation_dir"], "manifest.json"]
    # the ConDU store and a strategy store refuse each other, naming the class to use
    with pytest.raises(FormatError, match="holds the 'opcm' strategy, not ConDU"):
        Store(tmp_path / "s")
    Store(tmp_path / "c").add_task("t0", deltas[0])
    with pytest.raises(FormatError, match="this is a ConDU store"):
        StrategyStore(tmp_path / "c")


def test_damage_is_found_and_never_carried_into_a_fresh_hash(tmp_path):
    base, deltas = _family(3)
    st = StrategyStore(tmp_path / "s")
    st.add_task("t0", deltas[0], method="magmax")
    st.add_task("t1", deltas[1])
    path = os.path.join(st.gen_dir, "merged.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x40
    open(path, "wb").write(bytes(data))
    algo = default_algorithm()  # the digest the store records
    with pytest.raises(FormatError, match=f"{algo} mismatch"):
        StrategyStore(tmp_path / "s", verify=True)
    with pytest.raises(FormatError, match=f"merged.safetensors: {algo} mismatch"):
        StrategyStore(tmp_path / "s", verify=False).add_task("t2", deltas[2])
    assert StrategyStore(tmp_path / "s", verify=False).task_names == ["t0", "t1"]


def _ckpts(tmp_path, n=3, seed=0):
    base, deltas = _family(n, seed)
    save_file(base, str(tmp_path / "base.safetensors"))
    fts = []
    for i, d in enumerate(deltas):
        p = tmp_path / f"ft{i}.safetensors"
        save_file({k: base[k] + d[k] for k in base}, str(p))
        fts.append(str(p))
    return str(tmp_path / "base.safetensors"), fts


CLI_SETS = {  # a non-default option for most, to show --set reaches the rule
    "ties": ["density=20", "merge_func=mean", "scale=1.0"],
    "dare_ties": ["sparsity=0.3", "zero_sign=minority"],
    "tall_masks": ["tall_lambda=0.4", "keep_task_vectors=false"],
    "emr": ["rescaler=l1"],
    "dare_task_arithmetic": ["seed=7"],
    "dop": ["num_steps=5", "alpha=0.6"],
    "magmax": ["tie=earlier"],
    "pam": ["merge_coef=null"],
    "task_arithmetic": ["scale=0.5"],
    "opcm": ["alpha=0.3"],
}


@pytest.mark.parametrize("method", available_rules())
def test_cli_add_task_export_equals_in_memory(tmp_path, capsys, method):
    sets = CLI_SETS.get(method, [])
    base_path, fts = _ckpts(tmp_path)
    store = str(tmp_path / "store")
    for i, ft in enumerate(fts):
        argv = ["add-task", store, "--base", base_path, "--finetuned", ft, "--name", f"t{i}", "-q"]
        if i == 0:
            argv += ["--method", method] + [x for s in sets for x in ("--set", s)]
        assert main(argv) == 0
    base = load_file(base_path)
    opts = get_rule(method, **StrategyStore(store).options).opts
    ref = _in_memory(method, base, [{k: load_file(f)[k] - base[k] for k in base} for f in fts], opts)
    for task in ("t0", "t2"):
        out = tmp_path / f"{task}.safetensors"
        assert main(["export", store, "--task", task, "-o", str(out), "-q"]) == 0
        _assert_equal_models(ref.model_for_inference(task), load_file(str(out)), (method, task))
    capsys.readouterr()
    assert main(["inspect", store, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == method and [t["name"] for t in data["tasks"]] == ["t0", "t1", "t2"]
    assert {s["kind"] for s in data["slots"]} == {s.kind for s in get_rule(method, **opts).slots()}
    assert sum(s["bytes"] for s in data["slots"]) == sum(data["storage"]["slot_bytes"].values()) > 0
    assert main(["verify", store, "-q"]) == 0
    # another method, or ConDU-only options, on this store: refused naming both
    argv = ["add-task", store, "--base", base_path, "--finetuned", fts[0], "--name", "x", "-q"]
    assert main(argv + ["--method", "condu"]) != 0
    assert f"--method condu differs from the store's {method}" in capsys.readouterr().err
    assert main(argv + ["--rescaler", "l1"]) != 0
    assert "--rescaler is ConDU's" in capsys.readouterr().err


def test_cli_set_on_a_condu_store_is_refused(tmp_path, capsys):
    base_path, fts = _ckpts(tmp_path, 1)
    argv = ["add-task", str(tmp_path / "s"), "--base", base_path, "--finetuned", fts[0], "--name", "a"]
    assert main(argv + ["--set", "density=0.2"]) != 0
    assert "ConDU's options are --rescaler and --dtype" in capsys.readouterr().err
    assert main(argv + ["--method", "ties", "--set", "density"]) != 0
    assert "expected key=value" in capsys.readouterr().err


# ---------------------------------------------------------------------------- SIGKILL at each step

ZYGOTE = """
import json, os, sys, torch
from condu_merge.pipeline import CRASH_ENV
from condu_merge.strategy_store import StrategyStore
SHAPES = __SHAPES__
def delta(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in SHAPES.items()}
status = {}
for method, step, root in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os.environ[CRASH_ENV] = step
        try:
            StrategyStore(root).add_task("new", delta(99))
        except BaseException as exc:
            print(repr(exc), file=sys.stderr)
            os._exit(1)
        os._exit(0)
    _, st = os.waitpid(pid, 0)
    status[root] = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
print(json.dumps(status))
""".replace("__SHAPES__", repr(SHAPES))

STEPS = ["write:start", "write:tensor", "write:data", "commit:tmp", "commit:switched", "commit:cleanup"]


@pytest.mark.parametrize("method", ["ties", "tall_masks"])  # carried task vectors; rewritten masks + carried
def test_sigkill_at_each_step_leaves_old_or_new(tmp_path, method):
    g = torch.Generator().manual_seed(1)
    old = [{k: torch.randn(s, generator=g) * 0.1 for k, s in SHAPES.items()} for _ in range(2)]
    cases = []
    for step in STEPS:
        root = str(tmp_path / step.replace(":", "_"))
        st = StrategyStore(root)
        st.add_task("a", old[0], method=method)
        st.add_task("b", old[1])
        cases.append((method, step, root))
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run(
        [sys.executable, "-c", ZYGOTE, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
    status = json.loads(p.stdout.strip().splitlines()[-1])
    g99 = torch.Generator().manual_seed(99)
    new = {k: torch.randn(s, generator=g99) * 0.1 for k, s in SHAPES.items()}
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    for _, step, root in cases:
        assert status[root] == -9, (step, status[root])
        st = StrategyStore(root, verify=True)  # every hash checked
        names = st.task_names
        assert names == (["a", "b"] if step in STEPS[:4] else ["a", "b", "new"]), step
        leftovers = [n for n in os.listdir(root) if n.startswith("gen-")]
        assert st.manifest["generation_dir"] in leftovers
        if names == ["a", "b"]:  # the next writer cleans up and carries on
            st.add_task("new", new)
            assert sorted(n for n in os.listdir(root) if n.startswith("gen-")) == [st.manifest["generation_dir"]]
        ref = _in_memory(method, base, [*old, new], {}, ["a", "b", "new"])
        for t in ("a", "new"):
            _assert_equal_models(ref.model_for_inference(t), StrategyStore(root).model(t, base=base), (step, t))


@pytest.mark.parametrize("method", available_rules())
def test_in_memory_strategy_to_store_and_back(tmp_path, method):
    """``StrategyStore.from_strategy`` writes an in-memory strategy as a store the CLI can go on
    with; ``to_strategy`` reads it back; both continue bit-identically to never leaving memory."""
    base, deltas = _family(3)
    opts = OPTS.get(method, {})
    names = ["t0", "t1", "t2"]
    mem = _in_memory(method, base, deltas[:2], opts, names[:2])
    st = StrategyStore.from_strategy(mem, tmp_path / "s")
    st.add_task("t2", deltas[2])  # continued on disk
    ref = _in_memory(method, base, deltas, opts, names)
    back = StrategyStore(tmp_path / "s", verify=True).to_strategy(base)
    assert back.task_names == names
    for task in (None, "t0", "t2"):
        _assert_equal_models(ref.model_for_inference(task), st.model(task, base=base), (method, "disk", task))
        _assert_equal_models(ref.model_for_inference(task), back.model_for_inference(task), (method, "back", task))
    # the one read back trains the next task from the same start and folds it the same way
    more = _family(4, seed=5)[1][3]
    for s in (ref, back):
        start = s.begin_task("t3")
        s.end_task("t3", delta=more)
    _assert_equal_models(ref.model_for_inference("t3"), back.model_for_inference("t3"), (method, "t3"))
    assert start.source in ("base", "previous", "merged")
    with pytest.raises(ValueError, match="a store already exists here"):
        StrategyStore.from_strategy(mem, tmp_path / "s")


def test_load_strategy_reads_a_cli_store_with_its_recorded_base(tmp_path):
    from condu_merge.strategies import load_strategy

    base_path, fts = _ckpts(tmp_path, 2)
    store = str(tmp_path / "store")
    for i, ft in enumerate(fts):
        argv = ["add-task", store, "--base", base_path, "--finetuned", ft, "--name", f"t{i}", "-q"]
        assert main(argv + (["--method", "magmax", "--set", "scale=1.0"] if i == 0 else [])) == 0
    strat = load_strategy(store)  # θ_0 from the checkpoint the store recorded
    assert strat.name == "magmax" and strat.scale == 1.0 and strat.task_names == ["t0", "t1"]
    base = load_file(base_path)
    ref = _in_memory("magmax", base, [{k: load_file(f)[k] - base[k] for k in base} for f in fts], {"scale": 1.0})
    _assert_equal_models(ref.model_for_inference(), strat.model_for_inference(), "load_strategy")
    # training the next task starts where sequential fine-tuning left off (MagMax: the last model)
    _assert_equal_models(ref.begin_task("t2").params, strat.begin_task("t2").params, "start")
    with pytest.raises(Exception, match="options are fixed"):
        load_strategy(store, scale=0.5)
