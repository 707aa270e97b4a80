"""One answer whichever route: the CLI and the Python adapters merge the same tensors of a CLIP
model (``logit_scale`` left out by both, and the CLI says so); options recorded in the store are
not silently ignored."""

from __future__ import annotations

import json

import pytest
import torch

from condu_merge import ContinualMerger
from condu_merge.cli import main
from condu_merge.families import default_left_out, family_of
from condu_merge.store import Store

transformers = pytest.importorskip("transformers")


def _tiny_clip():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        projection_dim=8,
        text_config=dict(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=8,
            eos_token_id=31,
            bos_token_id=30,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            image_size=16,
            patch_size=8,
        ),
    )
    return transformers.CLIPModel(cfg)


def test_cli_and_python_adapters_merge_the_same_clip_tensors(tmp_path, capsys):
    from condu_merge.adapters.clip import clip_delta, pretrained_state

    base = _tiny_clip()
    base.save_pretrained(str(tmp_path / "base"))
    theta0 = pretrained_state(base)
    m = ContinualMerger()
    store = str(tmp_path / "store")
    for t in range(2):
        ft = _tiny_clip()
        g = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        ft.save_pretrained(str(tmp_path / f"ft{t}"))
        m.add_task(f"t{t}", clip_delta(theta0, ft))
        assert (
            main(
                [
                    "add-task",
                    store,
                    "--base",
                    str(tmp_path / "base"),
                    "--finetuned",
                    str(tmp_path / f"ft{t}"),
                    "--name",
                    f"t{t}",
                    "--json",
                ]
            )
            == 0
        )
        out = json.loads(capsys.readouterr().out)
        assert out["left_out"] == (["logit_scale"] if t == 0 else [])
    with Store(store) as st:
        assert set(st.keys) == set(theta0) and "logit_scale" not in st.keys
        for t in ("t0", "t1"):
            cli, py = st.decouple(t), m.decouple(t)
            assert all(torch.allclose(cli[k], py[k], atol=1e-7) for k in py), t
    # the text output names what was left out
    assert (
        main(
            [
                "add-task",
                str(tmp_path / "s2"),
                "--base",
                str(tmp_path / "base"),
                "--finetuned",
                str(tmp_path / "ft0"),
                "--name",
                "a",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "left out by the clip default" in text and "logit_scale;" in text


def test_family_rule():
    assert family_of(["visual.conv1.weight", "logit_scale"]) == "clip"
    assert family_of(["h.0.weight", "logit_scale"]) == "generic"
    assert default_left_out(["text_model.x.weight", "logit_scale", "logit_bias"]) == (
        "clip",
        ["logit_scale", "logit_bias"],
    )
    assert default_left_out(["a.weight"]) == ("generic", [])


def test_add_task_refuses_a_rescaler_other_than_the_stores(tmp_path, capsys):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 4, generator=g)}
    save_file(base, str(tmp_path / "b.safetensors"))
    for i in range(2):
        save_file({"w": base["w"] + torch.randn(8, 4, generator=g)}, str(tmp_path / f"f{i}.safetensors"))
    store = str(tmp_path / "s")
    assert (
        main(
            [
                "add-task",
                store,
                "--base",
                str(tmp_path / "b.safetensors"),
                "--finetuned",
                str(tmp_path / "f0.safetensors"),
                "--name",
                "a",
                "-q",
            ]
        )
        == 0
    )
    before = Store(store).manifest
    rc = main(
        [
            "add-task",
            store,
            "--base",
            str(tmp_path / "b.safetensors"),
            "--finetuned",
            str(tmp_path / "f1.safetensors"),
            "--name",
            "b",
            "--rescaler",
            "l1",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "--rescaler l1" in err and "tensor_mean" in err and err.count("\n") == 1
    assert Store(store).manifest == before
    # the store's own mode, given again, is fine
    assert (
        main(
            [
                "add-task",
                store,
                "--base",
                str(tmp_path / "b.safetensors"),
                "--finetuned",
                str(tmp_path / "f1.safetensors"),
                "--name",
                "b",
                "--rescaler",
                "tensor_mean",
                "-q",
            ]
        )
        == 0
    )
