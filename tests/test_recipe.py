"""``condu-merge run recipe``: tasks in order, skipping stored ones (same name and source hash),
resuming after a SIGKILL to the same store an uninterrupted run makes; ``--dry-run`` plans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from condu_merge.cli import main
from condu_merge.digests import record_digest
from condu_merge.recipe import RecipeError, load_recipe
from condu_merge.store import CRASH_ENV, Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _models(tmp_path, n=3):
    g = torch.Generator().manual_seed(0)
    base = {
        "a.weight": torch.randn(64, 32, generator=g),
        "b.bias": torch.randn(32, generator=g),
        "ids": torch.arange(5),
    }
    save_file(base, str(tmp_path / "base.safetensors"))
    for i in range(n):
        save_file(
            {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()},
            str(tmp_path / f"ft{i}.safetensors"),
        )


def _recipe(tmp_path, name, store, n=3, fmt="json", **opts):
    r = {
        "store": store,
        "base": "base.safetensors",
        "options": {"rescaler": "l1", **opts},
        "tasks": [{"name": f"t{i}", "path": f"ft{i}.safetensors"} for i in range(n)],
    }
    r["tasks"][-1]["backend"] = "torch"  # a per-task option
    p = tmp_path / f"{name}.{fmt}"
    if fmt == "json":
        p.write_text(json.dumps(r))
    else:
        yaml = pytest.importorskip("yaml")
        p.write_text(yaml.safe_dump(r))
    return str(p)


def _state(store):
    with Store(store) as st:  # verify=True: every hash checked
        m = st.manifest
        return (
            m["rescaler"],
            {k: record_digest(v) for k, v in m["files"].items()},
            [(t["name"], t["rescaler"], t["mask_bits"]) for t in m["tasks"]],
        )


def _run(args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "condu_merge", *args],
        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
        capture_output=True,
        text=True,
    )


def test_run_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    _models(tmp_path)
    ref = _recipe(tmp_path, "ref", "ref_store", fmt="yaml")
    assert main(["run", ref, "-q"]) == 0
    want = _state(str(tmp_path / "ref_store"))
    assert want[0] == "l1" and [t[0] for t in want[2]] == ["t0", "t1", "t2"]
    # a first run stops after one task; the next is SIGKILLed inside its second task; the third resumes
    part = _recipe(tmp_path, "part", "store", n=1)
    assert main(["run", part, "-q"]) == 0
    full = _recipe(tmp_path, "full", "store")
    r = _run(["run", full, "-q"], env={CRASH_ENV: "write:data"})
    assert r.returncode == -signal.SIGKILL
    assert [t[0] for t in _state(str(tmp_path / "store"))[2]] == ["t0"]  # still loadable, the old state
    r = _run(["run", full, "--json"])
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["tasks"]
    assert [x["action"] for x in rows] == ["skipped", "added", "added"]
    assert _state(str(tmp_path / "store")) == want
    assert main(["run", full, "-q"]) == 0 and _state(str(tmp_path / "store")) == want  # all skipped, nothing rewritten


def test_same_name_from_another_source_is_refused(tmp_path, capsys):
    _models(tmp_path)
    assert main(["run", _recipe(tmp_path, "a", "store", n=1), "-q"]) == 0
    r = json.loads((tmp_path / "a.json").read_text())
    r["tasks"][0]["path"] = "ft1.safetensors"
    (tmp_path / "b.json").write_text(json.dumps(r))
    assert main(["run", str(tmp_path / "b.json"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "'t0' is already stored from another source" in err and "ft1.safetensors" in err


def test_dry_run_plans_without_writing(tmp_path, capsys):
    _models(tmp_path)
    rec = _recipe(tmp_path, "r", "store")
    assert main(["run", rec, "--dry-run", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "store").exists()
    assert [t["action"] for t in p["tasks"]] == ["add"] * 3
    assert p["tensors"] == 2 and p["params"] == 64 * 32 + 32 and p["bytes_per_task"] == 4 * p["params"]
    assert p["store_bytes_after"] == p["bytes_per_task"] + 3 * (256 + 4)
    assert main(["run", rec, "-q"]) == 0
    st = Store(str(tmp_path / "store")).storage()
    # the plan's data bytes are the store's, less headers and the manifest
    assert 0 < st["unified_bytes"] + sum(st["mask_bytes_per_task"]) - p["store_bytes_after"] < 2000
    assert main(["run", rec, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.count("skip") == 3 and "peak memory" in text and "peak disk" in text


@pytest.mark.parametrize(
    "edit, msg",
    [
        ({"tasks": []}, "non-empty list"),
        ({"colour": 1}, "unknown key"),
        ({"options": {"rescalr": "l1"}}, "unknown option 'rescalr'"),
        ({"options": {"dtype": "float8"}}, "dtype 'float8'"),
        ({"tasks": [{"name": "x"}]}, "tasks[0]: a task needs a name and a path"),
    ],
)
def test_bad_recipes_are_refused_naming_file_and_key(tmp_path, edit, msg):
    r = {"store": "s", "base": "b", "tasks": [{"name": "x", "path": "p"}], **edit}
    p = tmp_path / "r.json"
    p.write_text(json.dumps(r))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert msg in str(e.value) and str(p) in str(e.value)


def test_recipe_of_another_method_equals_add_task(tmp_path, capsys):
    """``method``/``set`` in a recipe store that strategy exactly as ``add-task --method --set``
    does; a re-run skips every task; a recipe naming another method than the store's, or a ConDU
    option for another method, is refused naming the file."""
    from safetensors.torch import load_file

    from condu_merge.strategies import get_strategy
    from condu_merge.strategy_store import StrategyStore

    _models(tmp_path)
    r = {
        "store": "s",
        "base": "base.safetensors",
        "method": "ties",
        "set": {"density": 20, "merge_func": "mean"},
        "tasks": [{"name": f"t{i}", "path": f"ft{i}.safetensors"} for i in range(3)],
    }
    p = tmp_path / "r.json"
    p.write_text(json.dumps(r))
    assert main(["run", str(p), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "ties" and [t["action"] for t in plan["tasks"]] == ["add"] * 3
    assert plan["store_bytes_after"] == 3 * (64 * 32 + 32) * 4  # three float32 task vectors
    assert main(["run", str(p), "-q"]) == 0
    assert main(["run", str(p), "--json"]) == 0
    assert [t["action"] for t in json.loads(capsys.readouterr().out)["tasks"]] == ["skipped"] * 3
    st = StrategyStore(tmp_path / "s")
    assert st.method == "ties" and st.options["merge_func"] == "mean" and st.task_names == ["t0", "t1", "t2"]
    assert sum(st.storage()["slot_bytes"].values()) - plan["store_bytes_after"] < 3 * 1024  # headers only
    base = load_file(str(tmp_path / "base.safetensors"))
    floats = {k: v for k, v in base.items() if v.is_floating_point()}
    ref = get_strategy("ties", floats, density=20, merge_func="mean")
    for i in range(3):
        ft = load_file(str(tmp_path / f"ft{i}.safetensors"))
        ref.begin_task(f"t{i}")
        ref.end_task(f"t{i}", params={k: ft[k] for k in floats})
    got = st.model("t1", base=floats)
    for k in floats:
        assert torch.equal(got[k], ref.model_for_inference("t1")[k]), k
    r["method"] = "magmax"
    p.write_text(json.dumps({**r, "set": {}}))
    assert main(["run", str(p)]) != 0
    assert "method magmax differs from the store's ties" in capsys.readouterr().err
    p.write_text(json.dumps({**r, "set": {"density": 0.2}}))
    assert main(["run", str(p)]) != 0
    assert "magmax: unknown option 'density'" in capsys.readouterr().err
    p.write_text(json.dumps({**r, "method": "ties", "options": {"rescaler": "l1"}}))
    assert main(["run", str(p)]) != 0
    assert "['rescaler'] are ConDU's options; method ties takes its options in 'set'" in capsys.readouterr().err
