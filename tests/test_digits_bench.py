"""The digits continual-learning benchmark (condu_merge.demo): metrics against hand-computed
accuracy matrices, the domains, and a small real run that must pass the sanity checks."""

from __future__ import annotations

import math

import pytest
import torch

from condu_merge.demo.metrics import mean_std, per_task_metrics, summary_metrics

sklearn = pytest.importorskip("sklearn")
pytest.importorskip("open_clip")


# ---------------------------------------------------------------------------- metrics by hand


def test_metrics_hand_computed_3x3():
    a = [[50.0, 20.0, 10.0], [40.0, 80.0, 30.0], [30.0, 60.0, 90.0]]
    per = per_task_metrics(a)
    assert per["transfer"] == [None, 20.0, 20.0]  # task 2: A[0][1]; task 3: (10 + 30) / 2
    assert per["average"] == [40.0, 160.0 / 3, 130.0 / 3]
    assert per["last"] == [30.0, 60.0, 90.0]
    assert per["forgetting"] == [20.0, 20.0, None]  # 50 -> 30, 80 -> 60
    s = summary_metrics(a)
    assert s["transfer"] == pytest.approx(20.0)
    assert s["average"] == pytest.approx((40 + 160 / 3 + 130 / 3) / 3)
    assert s["last"] == pytest.approx(60.0)
    assert s["forgetting"] == pytest.approx(20.0) and s["bwt"] == pytest.approx(-20.0)


def test_metrics_no_forgetting_and_backward_gain():
    a = [[70.0, 5.0], [90.0, 75.0]]  # task 1 improves after task 2: negative forgetting, positive BWT
    s = summary_metrics(a)
    assert s["forgetting"] == pytest.approx(-20.0) and s["bwt"] == pytest.approx(20.0)
    assert s["transfer"] == pytest.approx(5.0) and s["last"] == pytest.approx(82.5)
    one = summary_metrics([[42.0]])
    assert one["transfer"] is None and one["forgetting"] is None and one["last"] == 42.0


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [[1.0, float("nan")], [1.0, 1.0]], []])
def test_metrics_reject_bad_matrices(bad):
    with pytest.raises(ValueError, match="accuracy matrix"):
        summary_metrics(bad)


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std([None, None]) == (None, None)
    m, s = mean_std([1.0, None, 3.0])
    assert m == 2.0 and s == pytest.approx(math.sqrt(2))


# ---------------------------------------------------------------------------- data


def test_domains_are_distinct_and_splits_disjoint():
    from condu_merge.demo import digits as D

    plain, tasks, held = D.load_digits_data(0, train_per_task=200)
    assert len(tasks) >= 6 and len(held) >= 2
    assert plain.train_x.shape[1:] == (3, D.IMAGE_SIZE, D.IMAGE_SIZE)
    assert all(len(t.train_y) == 200 for t in tasks) and all(len(h.train_y) == 0 for h in held)
    # every domain is tested on the same (transformed) test pool, never on training images
    for d in tasks + held:
        assert torch.equal(d.test_y, plain.test_y)
    flat = [d.test_x.flatten(1) for d in [plain, *tasks, *held]]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert (flat[i] - flat[j]).abs().mean() > 0.05, (i, j)
    few = D.load_digits_data(0, shots=5)[1][0]
    assert torch.bincount(few.train_y).tolist() == [5] * 10
    again = D.load_digits_data(0, train_per_task=200)[1][3]
    assert torch.equal(again.train_x, tasks[3].train_x)  # seeded: same data twice
    other = D.load_digits_data(1, train_per_task=200)[0]
    assert not torch.equal(other.test_y, plain.test_y)


# ---------------------------------------------------------------------------- a small real run


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from condu_merge.demo.run import BenchConfig, run_benchmark

    cfg = BenchConfig(
        tasks=("rot90", "inverted", "zoom_shift"),
        held_out=("rot270",),
        pretrain_steps=200,
        steps=40,
        train_per_task=300,
        test_per_domain=150,
        strategies=("magmax", "task_arithmetic", "emr"),
        workdir=str(tmp_path_factory.mktemp("digits")),
    )
    return run_benchmark(cfg)


def test_small_run_passes_the_sanity_checks(small_run):
    res = small_run
    for name, chk in res["checks"].items():
        assert chk["ok"], f"{name}: {chk['detail']}"
    m = res["metrics"]
    assert res["zeroshot_plain"] > 50.0
    zs = res["acc"]["zeroshot"][0]
    assert all(i > z for i, z in zip(res["individual_ft"], zs[:3]))
    assert m["continual_ft"]["forgetting"] >= 5.0
    # ConDU with the task id keeps the earlier tasks clearly above continual FT
    last_condu, last_cft = res["acc"]["condu"][-1], res["acc"]["continual_ft"][-1]
    assert sum(last_condu[:2]) / 2 >= sum(last_cft[:2]) / 2 + 10.0


def test_small_run_shapes_storage_and_sharing(small_run):
    res = small_run
    T, H = 3, 1
    for mat in res["acc"].values():
        assert len(mat) == T and all(len(row) == T + H for row in mat)
        assert all(math.isfinite(v) for row in mat for v in row)
    # nothing trained twice: MagMax reuses continual FT, task arithmetic and EMR the individual experts
    assert res["trained"]["individual_ft"] == T and res["trained"]["continual_ft"] == T - 1
    assert res["trained"]["magmax"] == 0 and res["trained"]["task_arithmetic"] == 0 and res["trained"]["emr"] == 0
    # session 1: continual FT is the first expert, so its row equals ConDU's seen cell and individual FT
    assert res["acc"]["continual_ft"][0][0] == pytest.approx(res["individual_ft"][0])
    st = res["storage_x"]
    assert st["zeroshot"] == 0 and st["continual_ft"] == 1.0 and st["individual_ft"] == T
    assert 1.0 < st["condu"] < 1.5  # u plus T one-bit masks (1/32 of a float32 model each) and prototypes
    assert st["task_arithmetic"] == pytest.approx(T)
    # single-model methods are their own task-agnostic result; ConDU and EMR are routed
    assert set(res["agnostic"]) == {"condu", "emr"}
    assert res["metrics"]["magmax"]["agnostic_last"] == res["metrics"]["magmax"]["last"]


def test_summary_table_lists_every_method(small_run):
    from condu_merge.demo.run import summary_table

    text = summary_table(small_run)
    for label in ("Zero-shot", "Individual FT", "Continual FT", "ConDU", "MagMax", "Task arithmetic", "EMR"):
        assert label in text
    assert "Storage" in text and "Forgetting" in text


def test_plots_small_multiples(tmp_path, small_run):
    pytest.importorskip("matplotlib")
    from benchmarks.mtil.plots import curves_png, matrices_png, metric_bars_png

    res = small_run
    mats = {res["labels"][m]: res["acc"][m] for m in res["acc"]}
    assert matrices_png(str(tmp_path / "m.png"), res["domains"], mats, n_tasks=3)
    assert curves_png(str(tmp_path / "c.png"), res["tasks"], {k: [r[:3] for r in v] for k, v in mats.items()})
    vals = {"FT": {res["labels"][m]: {"last": (res["metrics"][m]["last"], 0.0)} for m in res["methods"]}}
    assert metric_bars_png(
        str(tmp_path / "b.png"), [res["labels"][m] for m in res["methods"]], [("last", "Last")], vals
    )
    for p in ("m.png", "c.png", "b.png"):
        assert (tmp_path / p).stat().st_size > 5000
