"""MTIL reference script: metrics on hand-made matrices, dataset errors, the script's LoRA glue over the
library's adapters (open_clip and HF), the --synthetic run end to end on CPU killed mid-session
(SIGKILL) and resumed, and a ConDU (LoRA) run with --include-pretrained."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

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


def _tiny_openclip(tmp_path):
    import open_clip

    from benchmarks.mtil import synthetic
    from benchmarks.mtil.model import ClipHandle

    synthetic.register_model_config(str(tmp_path))
    torch.manual_seed(0)
    model = open_clip.create_model(synthetic.SYN_MODEL_NAME, pretrained=None).eval()
    return ClipHandle(model, "open_clip", lambda t: t, None, None)


def _tiny_hf():
    from transformers import CLIPConfig, CLIPModel

    from benchmarks.mtil.model import ClipHandle

    torch.manual_seed(0)
    cfg = CLIPConfig(
        projection_dim=16,
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=100,
            max_position_embeddings=16,
            eos_token_id=99,
            bos_token_id=98,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=1,
            image_size=32,
            patch_size=8,
        ),
    )
    return ClipHandle(CLIPModel(cfg).eval(), "hf", lambda t: t, None, None)


@pytest.mark.parametrize("flavor", ["open_clip", "hf"])
def test_lora_glue_matches_library_and_swap(flavor, tmp_path):
    """The script's LoRA targets (open_clip's fused in_proj included) with the library's LoRA
    pieces as the script uses them: W + s·B A (lora_weights), a functional forward that equals
    swapping the weights in, gradients reaching the factors, and ClipExperts with lora_transform
    applying init + decoupled factor deltas from a store."""
    from benchmarks.mtil.model import lora_modules
    from condu_merge.adapters import (
        ClipExperts,
        factor_delta,
        init_lora,
        lora_param_name,
        lora_transform,
        lora_weights,
        swap_params,
    )
    from condu_merge.store import Store

    clip = _tiny_openclip(tmp_path) if flavor == "open_clip" else _tiny_hf()
    mods = lora_modules(clip.model, "whole")
    suffixes = {m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1] for m in mods}
    if flavor == "open_clip":
        assert suffixes == {"attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"}
        assert len(mods) == 4 * 4  # 2 image + 2 text blocks
        assert sum(lora_param_name(m).endswith("attn.in_proj_weight") for m in mods) == 4
    else:
        assert suffixes == {
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
        }
    assert lora_modules(clip.model, "image") == [m for m in mods if m.startswith(("visual.", "vision_model."))]
    init = init_lora(clip.model, mods, rank=2, lora_alpha=4.0, seed=3)
    assert all(float(b.abs().sum()) == 0 for _, b in init.factors.values())
    g = torch.Generator().manual_seed(1)
    trained = type(init)(
        config=dict(init.config),
        init_fingerprint=init.fingerprint(),
        factors={
            m: (a + 0.1 * torch.randn(a.shape, generator=g), 0.1 * torch.randn(b.shape, generator=g))
            for m, (a, b) in init.factors.items()
        },
    )
    params = dict(clip.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    w = lora_weights(clip.model, trained)
    assert set(w) == {lora_param_name(m) for m in mods} <= set(params)
    for m, (a, b) in trained.factors.items():
        name = lora_param_name(m)
        assert torch.allclose(w[name] - params[name], 2.0 * b @ a, atol=1e-6)  # s = alpha / r = 2
    images = torch.randn(3, 3, 32, 32)
    tokens = torch.randint(1, 90, (2, 16))
    tokens[:, 6] = 99 if flavor == "hf" else tokens.max() + 1  # the EOT token both flavours pool
    with torch.no_grad(), swap_params(clip.model, w):
        ref_img, ref_txt = clip.encode("image", images), clip.encode("text", tokens)
    assert torch.allclose(clip.encode("image", images, w), ref_img, atol=1e-5)
    assert torch.allclose(clip.encode("text", tokens, w), ref_txt, atol=1e-5)
    assert not torch.allclose(clip.encode("image", images), ref_img, atol=1e-3)  # the LoRA changes something
    leaf = {
        m: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for m, (a, b) in trained.factors.items()
    }
    live = type(init)(config=dict(init.config), factors=leaf)
    clip.encode("image", images, lora_weights(clip.model, live)).sum().backward()
    assert any(float(b.grad.abs().sum()) > 0 for m, (a, b) in leaf.items() if m.startswith(("visual", "vision")))
    # one task in a store decouples exactly (λ = 1): the experts reproduce the trained adapter
    with Store(str(tmp_path / "store")) as store:
        store.add_task("t0", factor_delta(trained, init))
        experts = ClipExperts.from_store(clip.model, store, cache_size=1, transform=lora_transform(init, clip.model))
        with torch.no_grad():
            assert torch.allclose(experts.encode_image("t0", images), ref_img, atol=1e-5)
            assert torch.allclose(experts.encode_image(None, images), clip.encode("image", images))
    assert all(torch.equal(before[n], p) for n, p in clip.model.named_parameters())  # nothing left swapped in


def _run(args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="2")
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.mtil.run_mtil", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_synthetic_run_killed_and_resumed(tmp_path, capfd):
    out = str(tmp_path / "run")
    args = [
        "--synthetic",
        "--out",
        out,
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
        "--quiet",
    ]
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
    # 2) rerun (in-process: no second interpreter start-up): continues from session 2 without
    # retraining it, and finishes
    from benchmarks.mtil.run_mtil import main

    capfd.readouterr()
    assert main([a for a in args if a != "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "resuming: 1 of 3 sessions" in err
    assert "train DTD" not in err  # session 2's expert came from the store, not a new training
    assert "train EuroSAT" in err
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
    # after session 1 there is one expert: aggregation over it equals that expert with the task id
    assert res["accuracy"]["agnostic"][0] == pytest.approx(res["accuracy"]["condu"][0])
    assert set(res["versions"]) >= {"torch", "condu_merge", "python"}
    assert res["config"]["iterations"] == 6 and res["config"]["top_k"] == 5
    with Store(os.path.join(out, "store")) as store:
        assert store.task_names == ["Caltech101", "DTD", "EuroSAT"]
        assert all(store.load_prototypes(t)["prototypes"].shape[0] == 4 for t in store.task_names)
    for name in ("results.md", "results.csv", "accuracy_heatmap.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # 3) other settings on the same output directory are refused (before any model is loaded)
    for extra in (["--mode", "lora"], ["--include-pretrained"]):
        with pytest.raises(SystemExit, match="different settings"):
            main([*args, *extra])


def test_synthetic_lora_run_through_library(tmp_path, monkeypatch):
    """ConDU (LoRA) end to end in-process: factor-wise deltas in the store, the shared init saved as
    a PEFT folder, --include-pretrained reaching the library's SemanticAggregator."""
    from benchmarks.mtil import run_mtil
    from condu_merge.adapters import LoraAdapter
    from condu_merge.routing import SemanticAggregator
    from condu_merge.store import Store

    seen = []

    class Recording(SemanticAggregator):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append((self.k, self.include_pretrained, list(self.tasks)))

    monkeypatch.setattr(run_mtil, "SemanticAggregator", Recording)
    out = str(tmp_path / "lora")
    assert (
        run_mtil.main(
            [
                "--synthetic",
                "--out",
                out,
                "--synthetic-tasks",
                "2",
                "--synthetic-images",
                "8",
                "--synthetic-pretrain-steps",
                "5",
                "--iterations",
                "4",
                "--num-workers",
                "0",
                "--quiet",
                "--mode",
                "lora",
                "--lora-rank",
                "2",
                "--top-k",
                "1",
                "--include-pretrained",
            ]
        )
        == 0
    )
    assert seen == [(1, True, ["Caltech101"]), (1, True, ["Caltech101", "DTD"])]
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert not res["partial"] and res["config"]["include_pretrained"] is True
    assert res["config"]["lora"] == {"rank": 2, "alpha": 2.0}
    init = LoraAdapter.load(os.path.join(out, "lora_init"))
    assert init.config["r"] == 2 and len(init.modules) == 16
    with Store(os.path.join(out, "store")) as store:
        assert sorted(store.keys) == sorted(f"{m}.lora_{x}.weight" for m in init.modules for x in "AB")
        assert store.load_prototypes("DTD")["image_counts"].tolist() == [8, 8, 8, 8]
    # one task in the store decouples exactly: its expert is the freshly trained adapter
    assert res["accuracy"]["condu"][0][0] == pytest.approx(res["individual_ft"][0])
    for m in ("condu", "agnostic", "continual_ft"):
        assert res["metrics"][m] == pytest.approx(summary_metrics(res["accuracy"][m]))
