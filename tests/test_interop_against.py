"""``inspect --against``: the decoupled expert against its fine-tuned checkpoint, per tensor group."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import save_file

from condu_merge.against import tensor_group
from condu_merge.cli import main
from condu_merge.store import Store


def test_against_matches_a_direct_computation(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    base = {
        "h.0.w": torch.randn(30, 20, generator=g),
        "h.1.w": torch.randn(40, generator=g),
        "embed.weight": torch.randn(8, 4, generator=g),
    }
    save_file(base, str(tmp_path / "b.safetensors"))
    fts = []
    for i in range(2):
        ft = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(ft, str(tmp_path / f"f{i}.safetensors"))
        fts.append(ft)
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
    assert main(["inspect", store, "--against", "--json", "--no-overlaps"]) == 0
    one = json.loads(capsys.readouterr().out)["against"][0]["total"]
    assert one["rel_l2"] < 1e-7 and abs(one["cosine"] - 1) < 1e-12 and one["sign_agreement"] == 1.0  # one task: d̂ = d
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
                "-q",
            ]
        )
        == 0
    )
    assert main(["inspect", store, "--against", f"b={tmp_path / 'f1.safetensors'}", "--json", "--no-overlaps"]) == 0
    got = json.loads(capsys.readouterr().out)["against"]
    assert [a["task"] for a in got] == ["b"] and sorted(got[0]["groups"]) == ["embed", "h.0", "h.1"]
    with Store(store) as st:
        dh = st.decouple("b")
    for grp, keys in (("h.0", ["h.0.w"]), (None, list(base))):
        a = torch.cat([dh[k].flatten().double() for k in keys])
        d = torch.cat([(fts[1][k] - base[k]).flatten().double() for k in keys])
        m = got[0]["groups"][grp] if grp else got[0]["total"]
        assert math.isclose(m["rel_l2"], float((a - d).norm() / d.norm()), rel_tol=1e-9)
        assert math.isclose(m["cosine"], float(a @ d / (a.norm() * d.norm())), rel_tol=1e-9)
        assert m["sign_agreement"] == float((torch.sign(a) == torch.sign(d)).double().mean())
    assert main(["inspect", store, "--against", "zz=nowhere"]) == 1
    assert "no task 'zz'" in capsys.readouterr().err


def test_tensor_group():
    assert tensor_group("transformer.h.10.attn.c_attn.weight") == "transformer.h.10"
    assert tensor_group("visual.transformer.resblocks.3.ln_1.bias") == "visual.transformer.resblocks.3"
    assert tensor_group("logit_scale") == "logit_scale" and tensor_group("embed.weight") == "embed"
