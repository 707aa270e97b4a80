"""MTIL script with the continual strategies (condu_merge.strategies) in one run: every method's
accuracy matrix, the storage column (exact byte counts), MagMax folding continual FT's weights,
PAM training with its alignment hook, task arithmetic / TIES / EMR folding the individual task
vectors (persisted as one delta file per session, shared, and rebuilt from those files on resume),
SIGKILLs at the delta and strategy steps resumed to the same numbers as an uninterrupted run, a
damaged or missing delta file refused by name, and bad --methods."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.mtil import run_mtil
from benchmarks.mtil.continual import VALID_METHODS, parse_methods, storage_markdown
from benchmarks.mtil.metrics import summary_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = "zeroshot,condu,continual_ft,pam,magmax,task_arithmetic,ties,emr"
ARGS = [
    "--synthetic",
    "--synthetic-tasks",
    "3",
    "--synthetic-images",
    "8",
    "--synthetic-pretrain-steps",
    "4",
    "--iterations",
    "6",
    "--num-workers",
    "0",
    "--methods",
    METHODS,
    "--pam-every",
    "3",
]
TASKS = ["Caltech101", "DTD", "EuroSAT"]


def _run_capturing(monkeypatch, argv):
    """``main(argv)`` in-process; returns the Runner it used (its live strategies) and results.json."""
    captured = {}

    class Capturing(run_mtil.Runner):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            captured["runner"] = self

    monkeypatch.setattr(run_mtil, "Runner", Capturing)
    assert run_mtil.main(argv) == 0
    out = argv[argv.index("--out") + 1]
    with open(os.path.join(out, "results.json")) as f:
        return captured["runner"], json.load(f)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        out = str(tmp_path_factory.mktemp("mtil_strategies") / "run")
        runner, res = _run_capturing(mp, [*ARGS, "--out", out, "--quiet"])
    finally:
        mp.undo()
    return out, runner, res


def test_bad_methods(tmp_path):
    with pytest.raises(ValueError, match="valid methods: zeroshot, condu, agnostic, continual_ft, pam, magmax"):
        parse_methods("condu,pamm")
    with pytest.raises(ValueError, match="empty"):
        parse_methods(" , ")
    assert parse_methods("ties, condu,ties") == ["ties", "condu"]
    assert set(VALID_METHODS) >= {"pam", "magmax", "task_arithmetic", "ties", "emr"}
    # refused before anything is generated or loaded
    with pytest.raises(SystemExit, match=r"unknown --methods \['bogus'\]; valid methods: .*task_arithmetic, ties, emr"):
        run_mtil.main(["--synthetic", "--out", str(tmp_path / "x"), "--methods", "zeroshot,bogus"])
    assert not os.path.exists(tmp_path / "x" / "synthetic")


def test_every_method_has_a_full_matrix(full_run):
    out, runner, res = full_run
    assert not res["partial"] and res["tasks"] == TASKS
    for m in METHODS.split(","):
        acc = np.asarray(res["accuracy"][m])
        assert acc.shape == (3, 3), m
        assert np.all(np.isfinite(acc) & (acc >= 0) & (acc <= 100)), m
        assert res["metrics"][m] == pytest.approx(summary_metrics(res["accuracy"][m]))
    assert res["config"]["strategy_options"]["pam"]["align_every"] == 3
    assert res["config"]["strategy_options"]["ties"]["density"] == 0.2
    # one task folded: EMR's expert is that task's delta exactly (λ = 1), i.e. the individual FT model
    assert res["accuracy"]["emr"][0][0] == pytest.approx(res["individual_ft"][0])
    md = open(os.path.join(out, "results.md")).read()
    assert "## Storage" in md and "| Task arithmetic | every task vector" in md and "| PAM |" in md
    assert open(os.path.join(out, "storage.csv")).read().startswith("method,what,shared_bytes")
    # PAM's hook statistics per session, as in results.json
    assert "## PAM's alignment hook" in md and "| 1 | Caltech101 | - | - | - |" in md
    for i, t in enumerate(TASKS[1:], start=1):
        st = res["hook_stats"][i]["pam"]
        assert f"| {i + 1} | {t} | {st['steps']} | {st['alignments']} | {st['resets']} |" in md
    # PAM and MagMax are saved whole; task arithmetic, TIES and EMR only as the shared delta files
    sdir = os.path.join(out, "strategies")
    assert sorted(os.listdir(sdir)) == ["deltas", "magmax.safetensors", "pam.safetensors"]
    assert sorted(os.listdir(os.path.join(sdir, "deltas"))) == [f"{i:04d}.safetensors" for i in range(3)]
    with open(os.path.join(out, "state.json")) as f:
        sessions = json.load(f)["sessions"]
    from safetensors.torch import load_file

    for i, t in enumerate(TASKS):
        path = os.path.join(sdir, "deltas", f"{i:04d}.safetensors")
        assert run_mtil._file_sha256(path) == sessions[i]["delta_sha256"]
        # the file is exactly the task vector the strategies folded (EMR's expert of one task is
        # θ_0 + it, compared through task arithmetic's stored vector)
        d = load_file(path)
        assert all(torch.equal(d[k], runner.strats["task_arithmetic"]._taus[t][k]) for k in d)


def test_storage_is_exact(full_run):
    out, runner, res = full_run
    from safetensors.torch import load_file

    cft = load_file(os.path.join(out, "continual_ft.safetensors"))
    one = sum(t.numel() * t.element_size() for t in cft.values())
    assert res["one_model_bytes"] == one == sum(t.numel() * 4 for t in runner.strategy_base().values())
    st = res["storage"]
    T = 3
    masks = sum(math.ceil(t.numel() / 8) for t in cft.values())
    expected = {
        "zeroshot": 0,
        "continual_ft": one,
        "pam": one,
        "magmax": 2 * one,
        "task_arithmetic": T * one,
        "emr": T * one,
        "ties": T * (one + 8),
        "individual_ft": T * one,
        "condu": one + T * (masks + 8),
    }
    assert {m: e["total"] for m, e in st.items()} == expected
    for _m, e in st.items():
        assert e["total"] == e["shared_bytes"] + sum(e["per_task_bytes"].values())
        assert isinstance(e["what"], str) and e["what"]
    assert st["task_arithmetic"]["per_task_bytes"] == dict.fromkeys(TASKS, one)
    assert st["condu"]["shared_bytes"] == one
    # the results.md table
    table = storage_markdown(st, one, {"magmax": "MagMax"})
    assert "| MagMax | running max-magnitude" in table and "| 2.000 |" in table


def test_magmax_folds_continual_ft_and_pam_runs_its_hook(full_run):
    out, runner, res = full_run
    from safetensors.torch import load_file

    cft = load_file(os.path.join(out, "continual_ft.safetensors"))
    base = runner.strategy_base()
    mm, pam, ta, ties = (runner.strats[n] for n in ("magmax", "pam", "task_arithmetic", "ties"))
    assert mm.task_names == pam.task_names == ta.task_names == TASKS
    # MagMax's next start is θ_0 + its last task vector: continual FT's final weights
    nxt = mm.begin_task("probe").params
    for k, v in cft.items():
        assert torch.allclose(nxt[k], v, rtol=1e-6, atol=1e-7), k
    # MagMax's merged vector takes each entry from one of the task vectors: where the last one
    # (continual FT's final delta) is the largest in magnitude, the merged entry is exactly it
    merged = mm.model_for_inference()
    won_somewhere = False
    for k in cft:
        last, tau_mm = cft[k] - base[k], merged[k] - base[k]
        won = last.abs() >= tau_mm.abs() + 1e-6
        assert not bool(won.any()), k  # |τ_MM| is the largest magnitude, the last vector's included
        took = torch.isclose(tau_mm, last, rtol=1e-5, atol=1e-7) & (last != 0)
        won_somewhere |= bool(took.any())
    assert won_somewhere
    # TA and TIES folded the same individual task vectors
    for t in TASKS:
        a, b = ta.expert(t), ties.expert(t)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # PAM trained with its alignment hook: no hook in session 1 (nothing to align to), then every
    # --pam-every steps after every optimizer step
    stats = res["hook_stats"]
    assert stats[0]["pam"] is None
    for s in (1, 2):
        assert stats[s]["pam"]["steps"] == 6 and stats[s]["pam"]["alignments"] == 2
    pam_model = pam.model_for_inference()
    ta_model = ta.model_for_inference()
    assert any(not torch.allclose(pam_model[k], cft[k]) for k in cft)
    assert any(not torch.allclose(pam_model[k], ta_model[k]) for k in cft)


def _subprocess(args, crash):
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="2",
        MTIL_CRASH_AT=crash,
    )
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.mtil.run_mtil", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _state(out):
    with open(os.path.join(out, "state.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_killed_at_delta_and_strategy_steps_and_resumed_gives_the_same_results(full_run, tmp_path, capfd):
    ref_out, _, ref = full_run
    out = str(tmp_path / "run")
    args = [*ARGS, "--out", out, "--quiet"]
    deltas = os.path.join(out, "strategies", "deltas")
    # 1) killed in session 2 right after DTD's delta file was written, before state.json records
    #    it (and before the store takes the task): the rerun trains DTD again and rewrites the file
    p = _subprocess(args, "delta_written:1")
    assert p.returncode == -9, p.stderr[-3000:]
    assert sorted(os.listdir(deltas)) == ["0000.safetensors", "0001.safetensors"]
    st = _state(out)
    assert [s["task"] for s in st["sessions"]] == ["Caltech101"] and st["pending"] is None
    # 2) killed in the rerun after task arithmetic, TIES, EMR folded DTD (in memory only) and PAM
    #    folded and saved it: the next rerun rebuilds the three from deltas/0000 and folds
    #    deltas/0001, without retraining DTD (neither the individual model nor PAM's)
    p = _subprocess(args, "folded_pam:1")
    assert p.returncode == -9, p.stderr[-3000:]
    st = _state(out)
    assert [s["task"] for s in st["sessions"]] == ["Caltech101"] and st["pending"]["hook_stats"]["pam"][
        "alignments"
    ] == 2
    assert st["pending"]["delta_sha256"] == run_mtil._file_sha256(os.path.join(deltas, "0001.safetensors"))
    assert sorted(os.listdir(os.path.join(out, "strategies"))) == ["deltas", "magmax.safetensors", "pam.safetensors"]
    # 3) killed between the folds of session 3 (task arithmetic and TIES have EuroSAT, EMR not)
    p = _subprocess(args, "folded_ties:2")
    assert p.returncode == -9, p.stderr[-3000:]
    st = _state(out)
    assert [s["task"] for s in st["sessions"]] == ["Caltech101", "DTD"] and st["pending"]["task"] == "EuroSAT"
    # 4) the rerun finishes: the three are rebuilt from two delta files and fold the third
    capfd.readouterr()
    assert run_mtil.main([a for a in args if a != "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "resuming: 2 of 3 sessions" in err
    assert "rebuilding task_arithmetic, ties, emr from 2 delta file(s)" in err
    for again in ("train EuroSAT", "train DTD", "PAM DTD", "continual FT DTD"):
        assert again not in err
    assert "PAM EuroSAT" in err
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["accuracy"] == ref["accuracy"]
    assert res["individual_ft"] == ref["individual_ft"]
    assert res["storage"] == ref["storage"]
    assert res["hook_stats"] == ref["hook_stats"]
    # the delta files hold the uninterrupted run's tensors, bit for bit (not the same bytes: the
    # safetensors writer orders the metadata entries differently from one process to another)
    for i in range(3):
        name = f"strategies/deltas/{i:04d}.safetensors"
        got, meta = run_mtil._load_safetensors(os.path.join(out, name))
        want, want_meta = run_mtil._load_safetensors(os.path.join(ref_out, name))
        assert meta == want_meta == {"session": str(i), "task": TASKS[i]}
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_damaged_or_missing_delta_file_is_refused_by_name(full_run, tmp_path):
    """A rerun of a finished run rebuilds task arithmetic, TIES and EMR from the delta files (for
    the storage column): a flipped byte or a missing file stops it with an error naming the file."""
    ref_out = full_run[0]
    out = str(tmp_path / "run")
    shutil.copytree(ref_out, out)
    argv = [*ARGS, "--out", out, "--quiet"]
    path = os.path.join(out, "strategies", "deltas", "0001.safetensors")
    with open(path, "r+b") as f:  # one bit of one tensor element, well past the header
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(
        SystemExit,
        match=rf"{re.escape(path)} is damaged: its sha256 is [0-9a-f]{{64}}, but [0-9a-f]{{64}} was recorded",
    ):
        run_mtil.main(argv)
    os.remove(path)
    with pytest.raises(
        SystemExit, match=rf"{re.escape(path)} is missing: it is the individual delta of session 2 \('DTD'\)"
    ):
        run_mtil.main(argv)
    # a run directory of the earlier layout (whole task-arithmetic checkpoints) is refused by name
    shutil.copy2(os.path.join(ref_out, "strategies", "deltas", "0001.safetensors"), path)
    legacy = os.path.join(out, "strategies", "task_arithmetic.safetensors")
    open(legacy, "wb").close()
    with pytest.raises(SystemExit, match=rf"{re.escape(legacy)} is a checkpoint of an earlier version"):
        run_mtil.main(argv)
    os.remove(legacy)
    # restored, the rerun reproduces the results
    shutil.copy2(os.path.join(ref_out, "strategies", "deltas", "0001.safetensors"), path)
    assert run_mtil.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["storage"] == full_run[2]["storage"]


def test_lora_strategies(tmp_path, monkeypatch):
    """--mode lora: the strategies merge the flat LoRA factor dict with θ_0 = the shared init; PAM's
    hook sees the live factor leaves under those names."""
    out = str(tmp_path / "lora")
    runner, res = _run_capturing(
        monkeypatch,
        [
            "--synthetic",
            "--out",
            out,
            "--synthetic-tasks",
            "2",
            "--synthetic-images",
            "8",
            "--synthetic-pretrain-steps",
            "4",
            "--iterations",
            "4",
            "--num-workers",
            "0",
            "--quiet",
            "--mode",
            "lora",
            "--lora-rank",
            "2",
            "--pam-every",
            "2",
            "--methods",
            "condu,pam,magmax,task_arithmetic",
        ],
    )
    init = runner.lora0
    base = runner.strategy_base()
    assert sorted(base) == sorted(f"{m}.lora_{x}.weight" for m in init.modules for x in "AB")
    for m, (a, b) in init.factors.items():
        assert torch.equal(base[f"{m}.lora_A.weight"], a) and torch.equal(base[f"{m}.lora_B.weight"], b)
    one = sum(t.numel() * t.element_size() for t in base.values())
    assert res["one_model_bytes"] == one
    assert {m: res["storage"][m]["total"] for m in ("pam", "magmax", "task_arithmetic")} == {
        "pam": one,
        "magmax": 2 * one,
        "task_arithmetic": 2 * one,
    }
    assert res["hook_stats"][1]["pam"] == {"steps": 4, "alignments": 2, "resets": res["hook_stats"][1]["pam"]["resets"]}
    assert res["config"]["strategy_options"]["pam"]["align_on"] == "values"
    for m in ("condu", "pam", "magmax", "task_arithmetic"):
        assert np.asarray(res["accuracy"][m]).shape == (2, 2)


def test_condu_storage_from_the_store_matches_the_condu_strategy(tmp_path):
    """The script's ConDU storage (read from the store's specs) is the library's ConDU strategy
    accounting on the same deltas, for a scalar and a per-tensor rescaler."""
    from benchmarks.mtil.continual import condu_store_storage
    from condu_merge.store import Store
    from condu_merge.strategies import get_strategy

    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (13, 7), "b.bias": (5,), "c": (3, 3, 3)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    deltas = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    for rescaler in ("tensor_mean", "per_tensor"):
        strat = get_strategy("condu", base, rescaler=rescaler, backend="torch")
        with Store(str(tmp_path / rescaler)) as store:
            for i, d in enumerate(deltas):
                store.add_task(f"t{i}", d, rescaler=rescaler, backend="torch")
                strat.begin_task(f"t{i}")
                strat.end_task(f"t{i}", delta=d)
            got = condu_store_storage(store)
        rep = strat.stored_bytes()
        assert (got["shared_bytes"], got["per_task_bytes"], got["total"]) == (
            rep.shared_bytes,
            rep.per_task_bytes,
            rep.total,
        )
