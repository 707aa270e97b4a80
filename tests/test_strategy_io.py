"""Persistence of continual strategies: ``ContinualStrategy.save`` / ``load_strategy``.

A restored strategy must behave bit for bit like the one that was saved (models, experts, the
next task's start, storage report) and must continue with more tasks exactly like a strategy
that was never saved. Damaged, truncated or foreign files and a wrong θ_0 give clear errors
naming the file (and the key); a save interrupted at any point leaves the previous file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from condu_merge.backends import get_backend
from condu_merge.errors import DtypeMismatchError, FormatError, KeyMismatchError, MergeInputError, ShapeMismatchError
from condu_merge.strategies import TIES, ConDU, MagMax, StrategyStateError, get_strategy
from condu_merge.strategies.base import (
    STRATEGY_FORMAT,
    BaseMismatchError,
    ContinualStrategy,
    load_strategy,
    metadata_sha256,
)

ALL = [
    "condu",
    "magmax",
    "task_arithmetic",
    "ties",
    "emr",
    "continual_ft",
    "pam",
    "opcm",
    "dop",
    "tall_masks",
    "dare_task_arithmetic",
    "dare_ties",
]
SHAPES = {"enc.w": (6, 5), "enc.b": (5,), "head.w": (3, 6), "scalar": ()}


# ---------------------------------------------------------------------------- helpers


def rand_state(seed: int, dtype=torch.float32, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * scale).to(dtype) for k, s in SHAPES.items()}


def run_tasks(strat: ContinualStrategy, seeds, dtype) -> None:
    """Each task: take the start, 'train' by adding a seeded perturbation, hand back the params."""
    for s in seeds:
        name = f"task {s}/odd:name"  # slashes and colons must not reach tensor names
        start = strat.begin_task(name)
        noise = rand_state(1000 + s, dtype, scale=0.1)
        strat.end_task(name, params={k: (start.params[k].float() + noise[k].float()).to(dtype) for k in start.params})


def make(name: str, dtype, n_tasks: int, **kw) -> ContinualStrategy:
    strat = get_strategy(name, rand_state(0, dtype), **kw)
    run_tasks(strat, range(n_tasks), dtype)
    return strat


def assert_same_sd(a: dict, b: dict, what: str) -> None:
    assert list(a) == list(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
        assert torch.equal(a[k], b[k]), f"{what}: tensor {k} differs"


def assert_same_strategy(a: ContinualStrategy, b: ContinualStrategy) -> None:
    assert type(a) is type(b)
    assert a.task_names == b.task_names
    assert_same_sd(a.base, b.base, "base")
    assert_same_sd(a.model_for_inference(), b.model_for_inference(), "model_for_inference()")
    for t in a.task_names:
        assert_same_sd(a.model_for_inference(t), b.model_for_inference(t), f"model_for_inference({t!r})")
        assert_same_sd(a.expert(t), b.expert(t), f"expert({t!r})")
    assert a.stored_bytes() == b.stored_bytes()
    assert_same_sd(a._state_tensors(), b._state_tensors(), "state tensors")
    assert a._state_meta() == b._state_meta()


def read_file(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(src, dst, *, meta=None, drop=(), fix_checksum=True) -> None:
    """Copy a strategy file, editing its metadata or dropping tensors (re-signing the header
    unless told not to, so the edit itself is what the loader sees)."""
    m, t = read_file(src)
    m.update(meta or {})
    for k in drop:
        del t[k]
    if fix_checksum:
        m["header_sha256"] = metadata_sha256(m)
    save_file(t, str(dst), metadata=m)


def header_len(path) -> int:
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("include_base", [True, False], ids=["with_base", "no_base"])
@pytest.mark.parametrize("n_tasks", [0, 1, 3])
@pytest.mark.parametrize("name", ALL)
def test_round_trip(tmp_path, name, n_tasks, include_base, dtype):
    strat = make(name, dtype, n_tasks)
    path = tmp_path / "s.safetensors"
    strat.save(path, include_base=include_base)
    base = None if include_base else rand_state(0, dtype)
    back = load_strategy(path, base)
    assert_same_strategy(strat, back)
    # the class method checks the class and gives the same thing
    assert_same_strategy(strat, type(strat).load(path, base))
    assert_same_strategy(strat, ContinualStrategy.load(path, base))
    meta, tensors = read_file(path)
    assert meta["format"] == STRATEGY_FORMAT and meta["version"] == "1" and meta["strategy"] == name
    assert any(k.startswith("base/") for k in tensors) == include_base
    assert all("task" not in k for k in tensors)  # task indices in tensor names, names in metadata


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ALL)
def test_continue_after_load_equals_never_saved(tmp_path, name, dtype):
    kept = make(name, dtype, 2)
    path = tmp_path / "s.safetensors"
    kept.save(path)
    back = load_strategy(path)
    for s in (2, 3):  # the next task starts from the same place, and folds in the same way
        n = f"task {s}/odd:name"
        a, b = kept.begin_task(n), back.begin_task(n)
        assert a.source == b.source
        assert_same_sd(a.params, b.params, f"start of {n}")
        assert (a.hook is None) == (b.hook is None)
        kept._open = back._open = None  # run_tasks re-opens the task
        run_tasks(kept, [s], dtype)
        run_tasks(back, [s], dtype)
    assert_same_strategy(kept, back)
    # saved again after continuing, and read back: still the same
    back.save(path, include_base=False)
    assert_same_strategy(kept, load_strategy(path, rand_state(0, dtype)))


@pytest.mark.filterwarnings("ignore:.*nothing of tensor 'scalar' survives")
@pytest.mark.parametrize(
    "name,kw",
    [
        ("condu", {"rescaler": "per_tensor"}),
        ("condu", {"rescaler": "l1", "backend": "torch"}),
        ("ties", {"trim_scope": "tensor", "density": 0.5, "scale": 0.7}),
        ("magmax", {"scale": 0.5}),
        ("task_arithmetic", {"scale": 0.25}),
        ("emr", {"rescaler": "per_tensor"}),
    ],
)
def test_round_trip_with_options(tmp_path, name, kw):
    strat = make(name, torch.float32, 3, **kw)
    strat.save(tmp_path / "s.st")
    back = load_strategy(tmp_path / "s.st")
    assert_same_strategy(strat, back)
    run_tasks(strat, [7], torch.float32)
    run_tasks(back, [7], torch.float32)
    assert_same_strategy(strat, back)


def test_condu_triggers_restored(tmp_path):
    strat = make("condu", torch.float32, 3)
    strat.save(tmp_path / "s.st")
    back = ConDU.load(tmp_path / "s.st")
    for t in strat.task_names:
        assert strat.trigger(t) == back.trigger(t)
        assert back.trigger(t).task == t


def test_backend_object_saved_by_name(tmp_path):
    strat = make("condu", torch.float32, 1, backend=get_backend("torch"))
    strat.save(tmp_path / "s.st")
    meta, _ = read_file(tmp_path / "s.st")
    assert '"backend": "torch"' in meta["options"]
    assert load_strategy(tmp_path / "s.st").merger.backend == "torch"


def test_overrides(tmp_path):
    ta = make("task_arithmetic", torch.float32, 3)
    ta.save(tmp_path / "ta.st")
    back = load_strategy(tmp_path / "ta.st", scale=1.0)
    assert back.scale == 1.0
    ref = make("task_arithmetic", torch.float32, 3, scale=1.0)
    assert_same_strategy(ref, back)
    # TIES re-trims with an overridden density, as if folded with it
    ties = make("ties", torch.float32, 3)
    ties.save(tmp_path / "ties.st")
    assert_same_strategy(make("ties", torch.float32, 3, density=0.6), TIES.load(tmp_path / "ties.st", density=0.6))
    # ConDU's masks depend on the rescaler mode: refused
    make("condu", torch.float32, 2).save(tmp_path / "c.st")
    with pytest.raises(MergeInputError, match="rescaler") as ei:
        load_strategy(tmp_path / "c.st", rescaler="l1")
    assert "c.st" in str(ei.value)
    with pytest.raises(MergeInputError, match="no_such_option"):
        load_strategy(tmp_path / "c.st", no_such_option=1)
    with pytest.raises(MergeInputError, match="density") as ei:
        load_strategy(tmp_path / "ties.st", density=200.0)
    assert "ties.st" in str(ei.value)


def test_given_base_is_copied_and_used(tmp_path):
    strat = make("magmax", torch.float32, 2)
    strat.save(tmp_path / "s.st", include_base=False)
    base = rand_state(0)
    back = load_strategy(tmp_path / "s.st", base)
    base["enc.w"].add_(1.0)  # the caller's tensors are not aliased
    assert_same_strategy(strat, back)
    # base given in another key order: the saved order wins
    rev = dict(reversed(list(rand_state(0).items())))
    assert list(load_strategy(tmp_path / "s.st", rev).base) == list(SHAPES)


def test_verify_false_still_loads(tmp_path):
    strat = make("ties", torch.float32, 2)
    strat.save(tmp_path / "s.st")
    assert_same_strategy(strat, load_strategy(tmp_path / "s.st", verify=False))


# ---------------------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path):
    strat = make("condu", torch.float32, 2)
    path = tmp_path / "good.safetensors"
    strat.save(path)
    return strat, path


def test_truncated_file(tmp_path, saved):
    _, path = saved
    data = path.read_bytes()
    h = header_len(path)
    cuts = sorted({0, 1, 7, 8, 9, h // 2, h - 1, h, h + 1, (h + len(data)) // 2, len(data) - 4, len(data) - 1})
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.st"
        bad.write_bytes(data[:cut])
        for base in (None, rand_state(0)):
            with pytest.raises(FormatError) as ei:
                load_strategy(bad, base)
            assert str(bad) in str(ei.value), cut


def test_flipped_header_bytes(tmp_path, saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    h = header_len(path)
    bad = tmp_path / "flip.st"
    positions = list(range(8)) + list(range(8, h, 3))
    for pos in positions:
        for mask in (0x01, 0x20):
            d = bytearray(data)
            d[pos] ^= mask
            bad.write_bytes(bytes(d))
            with pytest.raises(FormatError) as ei:
                load_strategy(bad)
            assert str(bad) in str(ei.value), (pos, mask)


def test_flipped_data_bytes(tmp_path, saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    h = header_len(path)
    bad = tmp_path / "flip.st"
    for pos in range(h, len(data), 11):  # base, unified delta and masks all covered by a sha256
        d = bytearray(data)
        d[pos] ^= 0x10
        bad.write_bytes(bytes(d))
        with pytest.raises(FormatError, match="damaged") as ei:
            load_strategy(bad)
        assert str(bad) in str(ei.value)


def test_wrong_format_and_version(tmp_path, saved):
    _, path = saved
    rewrite(path, tmp_path / "v2.st", meta={"version": "2"})
    with pytest.raises(FormatError, match="version '2'"):
        load_strategy(tmp_path / "v2.st")
    rewrite(path, tmp_path / "fmt.st", meta={"format": "something-else"})
    with pytest.raises(FormatError, match="not a condu-merge strategy file"):
        load_strategy(tmp_path / "fmt.st")
    rewrite(path, tmp_path / "unk.st", meta={"strategy": "nope"})
    with pytest.raises(FormatError, match="unknown strategy 'nope'"):
        load_strategy(tmp_path / "unk.st")
    rewrite(path, tmp_path / "json.st", meta={"tasks": "[not json"})
    with pytest.raises(FormatError, match="'tasks'"):
        load_strategy(tmp_path / "json.st")
    rewrite(path, tmp_path / "resc.st", meta={"state": '{"rescaler": "tensor_mean"}'})
    with pytest.raises(FormatError, match="rescalers"):
        load_strategy(tmp_path / "resc.st")
    # an edit without re-signing the header is caught as damage
    rewrite(path, tmp_path / "unsigned.st", meta={"tasks": '["a", "b"]'}, fix_checksum=False)
    with pytest.raises(FormatError, match="header checksum"):
        load_strategy(tmp_path / "unsigned.st")
    # a plain safetensors file that is not ours
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.st"))
    with pytest.raises(FormatError, match="not a condu-merge strategy file"):
        load_strategy(tmp_path / "plain.st")
    (tmp_path / "text.st").write_text("hello, world")
    with pytest.raises(FormatError, match="text.st"):
        load_strategy(tmp_path / "text.st")
    with pytest.raises(FileNotFoundError):
        load_strategy(tmp_path / "absent.st")


def test_wrong_class(saved):
    _, path = saved
    with pytest.raises(FormatError, match="holds a 'condu' strategy, not 'magmax'") as ei:
        MagMax.load(path)
    assert str(path) in str(ei.value)
    with pytest.raises(FormatError, match="not 'ties'"):
        TIES.load(path)
    assert isinstance(ContinualStrategy.load(path), ConDU)


def test_missing_tensor(tmp_path, saved):
    _, path = saved
    for key in ("mask/1/enc.b", "unified/scalar", "base/head.w"):
        rewrite(path, tmp_path / "m.st", drop=[key])
        with pytest.raises(FormatError, match=f"tensor '{key}' is missing") as ei:
            load_strategy(tmp_path / "m.st")
        assert "m.st" in str(ei.value)
    # an extra tensor is foreign too
    m, t = read_file(path)
    t["junk/x"] = torch.zeros(1)
    save_file(t, str(tmp_path / "x.st"), metadata=m)
    with pytest.raises(FormatError, match="unexpected tensor 'junk/x'"):
        load_strategy(tmp_path / "x.st")


def test_base_mismatch(tmp_path, saved):
    strat, path = saved
    strat.save(tmp_path / "nobase.st", include_base=False)
    for f in (path, tmp_path / "nobase.st"):
        b = rand_state(0)
        b["head.w"] = torch.zeros(6, 3)
        with pytest.raises(ShapeMismatchError, match="'head.w'") as ei:
            load_strategy(f, b)
        assert str(f) in str(ei.value)
        b = rand_state(0)
        b["enc.b"] = b["enc.b"].double()
        with pytest.raises(DtypeMismatchError, match="'enc.b'"):
            load_strategy(f, b)
        b = rand_state(0)
        b["enc.w"][2, 3] += 1e-6
        with pytest.raises(BaseMismatchError, match="'enc.w'") as ei:
            load_strategy(f, b)
        assert str(f) in str(ei.value)
        b = rand_state(0)
        del b["scalar"]
        with pytest.raises(KeyMismatchError, match="'scalar'"):
            load_strategy(f, b)
        b = rand_state(0)
        b["extra"] = torch.zeros(1)
        with pytest.raises(KeyMismatchError, match="'extra'"):
            load_strategy(f, b)
    with pytest.raises(MergeInputError, match="include_base=False"):
        load_strategy(tmp_path / "nobase.st")


def test_save_with_open_task(tmp_path):
    strat = make("task_arithmetic", torch.float32, 1)
    strat.begin_task("open one")
    with pytest.raises(StrategyStateError, match="open one"):
        strat.save(tmp_path / "s.st")
    assert not os.listdir(tmp_path)
    strat.end_task("open one", delta=rand_state(5))
    strat.save(tmp_path / "s.st")
    assert load_strategy(tmp_path / "s.st").task_names == strat.task_names


def test_save_interrupted_before_replace_keeps_old(tmp_path, monkeypatch):
    path = tmp_path / "s.st"
    old = make("ties", torch.float32, 1)
    old.save(path)
    new = make("ties", torch.float32, 3)

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        new.save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["s.st"]  # no temporary file left behind
    assert_same_strategy(old, load_strategy(path))
    new.save(path)  # and a later save replaces it
    assert_same_strategy(new, load_strategy(path))


def test_save_killed_mid_write_keeps_old(tmp_path):
    """A process SIGKILLed in the middle of writing (after half of the tensors) leaves the
    previous file intact and loadable; only a stray temporary file remains."""
    path = tmp_path / "s.st"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_strategy_io import make
        import condu_merge.safetensors_writer as w
        make("emr", torch.float32, 1).save({str(path)!r})
        calls = [0]
        orig = w.StreamingSafetensorsWriter.write
        def write(self, name, t):
            calls[0] += 1
            if calls[0] == 6:
                self._fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, name, t)
        w.StreamingSafetensorsWriter.write = write
        make("emr", torch.float32, 3).save({str(path)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert_same_strategy(make("emr", torch.float32, 1), load_strategy(path))
    leftovers = [f for f in os.listdir(tmp_path) if f != "s.st"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".s.st.tmp-")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["condu", "ties", "magmax"])
def test_round_trip_cuda(tmp_path, name):
    """A strategy over a CUDA θ_0 saves from the device and loads its state onto θ_0's device."""
    base = {k: v.cuda() for k, v in rand_state(0).items()}
    strat = get_strategy(name, base)
    run_tasks(strat, range(2), torch.float32)
    strat.save(tmp_path / "s.st", include_base=False)
    back = load_strategy(tmp_path / "s.st", {k: v.clone() for k, v in base.items()})
    assert all(t.is_cuda for t in back._state_tensors().values())
    assert_same_strategy(strat, back)
    cpu = load_strategy(tmp_path / "s.st", rand_state(0))  # same bytes, other device
    assert_same_sd({k: v.cpu() for k, v in strat.model_for_inference().items()}, cpu.model_for_inference(), "cpu")
