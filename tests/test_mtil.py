"""MTIL reference script: metrics on hand-made matrices, dataset errors, and the --synthetic run end to
end on CPU, killed mid-session (SIGKILL) and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.mtil.datasets import DatasetMissingError, few_shot_indices, load_mtil_dataset
from benchmarks.mtil.metrics import csv_text, markdown_table, per_task_metrics, summary_metrics
from benchmarks.mtil.run_mtil import parse_lr_map, resolve_order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A[s][j]: accuracy on task j after session s (3 tasks)
A = [
    [80.0, 30.0, 50.0],
    [70.0, 90.0, 40.0],
    [60.0, 85.0, 95.0],
]


def test_metrics_hand_computed():
    per = per_task_metrics(A)
    # transfer: j=1 -> A[0][1] = 30 ; j=2 -> mean(A[0][2], A[1][2]) = 45
    assert per["transfer"] == [None, 30.0, 45.0]
    assert per["average"] == pytest.approx([70.0, (30 + 90 + 85) / 3, (50 + 40 + 95) / 3])
    assert per["last"] == [60.0, 85.0, 95.0]
    s = summary_metrics(A)
    assert s["transfer"] == pytest.approx(37.5)
    assert s["average"] == pytest.approx((70 + 205 / 3 + 185 / 3) / 3)
    assert s["last"] == pytest.approx(80.0)


def test_metrics_single_task_and_bad_input():
    assert summary_metrics([[42.0]]) == {"transfer": None, "average": 42.0, "last": 42.0}
    with pytest.raises(ValueError, match="square"):
        summary_metrics([[1.0, 2.0]])
    with pytest.raises(ValueError, match="NaN"):
        summary_metrics([[1.0, float("nan")], [1.0, 2.0]])


def test_tables():
    md = markdown_table(["a", "b", "c"], {"M": A}, rows={"Zero-shot": [1.0, 2.0, 3.0]})
    lines = md.strip().splitlines()
    assert lines[0] == "| Metric | Method | a | b | c | Average |"
    assert "| | Zero-shot | 1.0 | 2.0 | 3.0 | 2.0 |" in lines
    assert "| Transfer | M | - | 30.0 | 45.0 | 37.5 |" in lines
    assert "| Last | M | 60.0 | 85.0 | 95.0 | 80.0 |" in lines
    csv = csv_text(["a", "b", "c"], {"M": A}).splitlines()
    assert csv[0] == "method,metric,a,b,c,mean"
    assert csv[1] == "M,transfer,,30.0000,45.0000,37.5000"
    assert "M,A[2],70.0000,90.0000,40.0000," in csv


def test_orders_and_options():
    assert resolve_order("order2", None)[:3] == ["StanfordCars", "Food", "MNIST"]
    assert resolve_order("alphabetical", "MNIST,Aircraft") == ["Aircraft", "MNIST"]
    assert resolve_order("DTD,EuroSAT", None) == ["DTD", "EuroSAT"]
    with pytest.raises(ValueError, match="Imagenet"):
        resolve_order("DTD,Imagenet", None)
    assert parse_lr_map("Aircraft=5e-5, MNIST=1e-4") == {"Aircraft": 5e-5, "MNIST": 1e-4}
    with pytest.raises(ValueError):
        parse_lr_map("Aircraft")


def test_missing_dataset_folder_is_named(tmp_path):
    with pytest.raises(DatasetMissingError, match="fgvc-aircraft-2013b"):
        load_mtil_dataset("Aircraft", str(tmp_path), lambda x: x, lambda x: x)
    (tmp_path / "dtd").mkdir()
    with pytest.raises(DatasetMissingError, match="dtd/images"):
        load_mtil_dataset("DTD", str(tmp_path), lambda x: x, lambda x: x)


def test_few_shot_indices():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    idx = few_shot_indices(labels, 5, seed=1)
    counts = np.bincount(labels[idx])
    assert counts.tolist() == [5, 3, 5]
    assert len(set(idx.tolist())) == idx.size
    assert np.array_equal(idx, few_shot_indices(labels, 5, seed=1))


def _run(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="2")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "benchmarks.mtil.run_mtil", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_synthetic_run_killed_and_resumed(tmp_path):
    out = str(tmp_path / "run")
    args = ["--synthetic", "--out", out, "--synthetic-tasks", "3", "--synthetic-images", "12",
            "--synthetic-pretrain-steps", "15", "--iterations", "8", "--num-workers", "0", "--quiet"]
    # 1) killed (SIGKILL) in session 2, after its task was folded into the store, before evaluation
    p = _run(args, {"MTIL_CRASH_AT": "merged:1"})
    assert p.returncode == -9, p.stderr[-3000:]
    with open(os.path.join(out, "state.json")) as f:
        st = json.load(f)
    assert [s["task"] for s in st["sessions"]] == ["Caltech101"]
    assert st["pending"]["task"] == "DTD"
    row1 = st["sessions"][0]["rows"]
    from condu_merge.store import Store

    with Store(os.path.join(out, "store")) as store:
        assert store.task_names == ["Caltech101", "DTD"]
    # 2) rerun: continues from session 2 without retraining it, and finishes
    p = _run([a for a in args if a != "--quiet"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming: 1 of 3 sessions" in p.stderr
    assert "train DTD" not in p.stderr  # session 2's expert came from the store, not a new training
    assert "train EuroSAT" in p.stderr
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert not res["partial"] and res["sessions_finished"] == 3
    assert res["tasks"] == ["Caltech101", "DTD", "EuroSAT"]
    for m in ("zeroshot", "condu", "agnostic", "continual_ft"):
        acc = res["accuracy"][m]
        assert np.asarray(acc).shape == (3, 3)
        assert np.all((np.asarray(acc) >= 0) & (np.asarray(acc) <= 100))
        assert res["metrics"][m] == pytest.approx(summary_metrics(acc))
    for m, row in row1.items():
        assert res["accuracy"][m][0] == row  # the finished session was not recomputed
    zs = res["accuracy"]["zeroshot"]
    assert zs[0] == zs[1] == zs[2]
    # seen tasks use their own expert: the first session's ConDU accuracy on task 1 is the fresh expert's
    assert res["accuracy"]["condu"][0][0] == pytest.approx(res["individual_ft"][0])
    assert set(res["versions"]) >= {"torch", "condu_merge", "python"}
    assert res["config"]["iterations"] == 8 and res["config"]["top_k"] == 5
    with Store(os.path.join(out, "store")) as store:
        assert store.task_names == ["Caltech101", "DTD", "EuroSAT"]
        assert all(store.load_prototypes(t)["prototypes"].shape[0] == 4 for t in store.task_names)
    for name in ("results.md", "results.csv", "accuracy_heatmap.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # 3) other settings on the same output directory are refused
    p = _run([*args[:-1], "--mode", "lora"])
    assert p.returncode != 0 and "different settings" in p.stderr
