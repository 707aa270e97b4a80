"""Exports that libraries load: ``--format hf`` -> ``from_pretrained``, PEFT adapters stored
factor-wise -> ``--format peft`` -> ``PeftModel`` / ``AutoPeftModelForCausalLM`` (tiny GPT-2,
built offline)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from condu_merge.cli import main
from condu_merge.export import parse_size, plan_shards
from condu_merge.store import Store

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

TARGETS = ["c_attn", "c_proj"]


def _gpt2_base(path) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    m.save_pretrained(str(path))
    return m


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A base folder, three full fine-tunes and three LoRA adapters (shared PEFT init, seed 100)."""
    root = tmp_path_factory.mktemp("gpt2")
    _gpt2_base(root / "base")
    base_sd = load_file(str(root / "base" / "model.safetensors"))
    for t in range(3):
        g = torch.Generator().manual_seed(t)
        ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
        m = GPT2LMHeadModel.from_pretrained(str(root / "base"))
        m.load_state_dict(ft, strict=False)
        m.save_pretrained(str(root / f"ft{t}"))
        torch.manual_seed(100)
        pm = peft.get_peft_model(
            GPT2LMHeadModel.from_pretrained(str(root / "base")),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
        )
        if t == 0:
            pm.save_pretrained(str(root / "init"))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(str(root / f"lora{t}"))
    return root


def _ids():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(7))


def test_hf_export_loads_with_from_pretrained_and_equals_base_plus_delta(gpt2, tmp_path, capsys):
    store = str(tmp_path / "store")
    for t in range(2):
        assert (
            main(
                [
                    "add-task",
                    store,
                    "--base",
                    str(gpt2 / "base"),
                    "--finetuned",
                    str(gpt2 / f"ft{t}"),
                    "--name",
                    f"t{t}",
                    "-q",
                ]
            )
            == 0
        )
    out = tmp_path / "exp"
    assert main(["export", store, "--task", "t1", "-o", str(out), "--json"]) == 0  # default hf: the base is a folder
    rep = json.loads(capsys.readouterr().out)
    assert rep["format"] == "hf" and sorted(os.listdir(out)) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
    model = GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True)
    base = load_file(str(gpt2 / "base" / "model.safetensors"))
    with Store(store) as st:
        delta = st.decouple("t1")
    sd = model.state_dict()
    for k, b in base.items():
        want = b + delta[k].to(b.dtype) if k in delta else b
        assert torch.allclose(sd[k], want, atol=1e-6, rtol=0), k
    # sharded above a limit: index + shards by huggingface_hub's rule, still loads to the same weights
    sh = tmp_path / "sharded"
    assert main(["export", store, "--task", "t1", "-o", str(sh), "--max-shard-size", "40KB", "-q"]) == 0
    idx = json.loads((sh / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    m2 = GPT2LMHeadModel.from_pretrained(str(sh), local_files_only=True)
    assert all(torch.equal(m2.state_dict()[k], sd[k]) for k in sd)
    # an existing output is refused without --force, replaced with it
    assert main(["export", store, "--task", "t0", "-o", str(out), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export", store, "--task", "t0", "-o", str(out), "-q", "--force"]) == 0
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]


def test_safetensors_output_folder_rules_and_all(gpt2, tmp_path, capsys):
    store = str(tmp_path / "store")
    for t in range(2):
        assert (
            main(
                [
                    "add-task",
                    store,
                    "--base",
                    str(gpt2 / "base" / "model.safetensors"),
                    "--finetuned",
                    str(gpt2 / f"ft{t}" / "model.safetensors"),
                    "--name",
                    f"t{t}",
                    "-q",
                ]
            )
            == 0
        )
    # a trailing slash, or an existing folder, is a folder: the file goes inside, named after the task
    assert (
        main(["export", store, "--task", "t0", "--format", "safetensors", "-o", str(tmp_path / "new") + "/", "-q"]) == 0
    )
    assert os.listdir(tmp_path / "new") == ["t0.safetensors"]
    os.mkdir(tmp_path / "d")
    assert main(["export", store, "--task", "t0", "--format", "safetensors", "-o", str(tmp_path / "d"), "-q"]) == 0
    assert os.listdir(tmp_path / "d") == ["t0.safetensors"]
    assert (
        main(
            [
                "export",
                store,
                "--task",
                "t0",
                "--format",
                "safetensors",
                "-o",
                str(tmp_path / "d") + "/",
                "-q",
                "--force",
            ]
        )
        == 0
    )
    with safe_open(str(tmp_path / "d" / "t0.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["condu-merge-task"] == "t0"
    assert main(["export", store, "--all", "--format", "hf", "-o", str(tmp_path / "all"), "-q"]) == 0
    assert sorted(os.listdir(tmp_path / "all")) == ["t0", "t1"]
    for t in ("t0", "t1"):
        GPT2LMHeadModel.from_pretrained(str(tmp_path / "all" / t), local_files_only=True)
    assert main(["export", store, "--task", "t0", "-o", os.path.join(store, "x"), "-q"]) == 1
    assert "inside the store" in capsys.readouterr().err


def test_plan_shards_follows_the_hub_rule():
    got = plan_shards({"a": 3, "b": 3, "c": 9, "d": 2}, 5)
    # huggingface_hub.split_torch_state_dict_into_shards: an oversized tensor is alone; order kept otherwise
    assert got == [["a"], ["c"], ["b", "d"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(10) == 10
    with pytest.raises(ValueError, match="size"):
        parse_size("5 parsecs")


def _hub_split(sizes, limit):
    from huggingface_hub import split_torch_state_dict_into_shards

    sd = {k: torch.zeros(n, dtype=torch.uint8) for k, n in sizes.items()}
    split = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
    return sorted(sorted(v) for v in split.filename_to_tensors.values())


def test_plan_shards_equals_huggingface_hub_on_random_sizes():
    pytest.importorskip("huggingface_hub")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        sizes = {f"t{i}": int(torch.randint(1, 50, (1,), generator=g)) for i in range(12)}
        assert sorted(sorted(s) for s in plan_shards(sizes, 60)) == _hub_split(sizes, 60)


def _expert_logits(gpt2, store, task):
    """The factor-wise expert by hand: W + s (B_0 + δB)(A_0 + δA) with the zero init."""
    from condu_merge.adapters.lora import LoraAdapter, dense_delta

    with Store(store) as st:
        delta = st.decouple(task)
        cfg = st.task_info(task)["source"]["adapter_config"]
    mods = sorted({k[: -len(".lora_A.weight")] for k in delta if k.endswith("lora_A.weight")})
    ad = LoraAdapter(config=cfg, factors={m: (delta[f"{m}.lora_A.weight"], delta[f"{m}.lora_B.weight"]) for m in mods})
    model = GPT2LMHeadModel.from_pretrained(str(gpt2 / "base"))
    sd = model.state_dict()
    for k, d in dense_delta(ad).items():
        sd[k] = sd[k] + d
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(_ids()).logits


def test_peft_adapters_stay_lora_and_export_loads_in_peft(gpt2, tmp_path, capsys):
    store = str(tmp_path / "store")
    for t in range(3):
        assert (
            main(
                [
                    "add-task",
                    store,
                    "--base",
                    str(gpt2 / "base"),
                    "--finetuned",
                    str(gpt2 / f"lora{t}"),
                    "--name",
                    f"t{t}",
                    "-q",
                ]
            )
            == 0
        )
    assert main(["inspect", store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    adapter_bytes = os.path.getsize(gpt2 / "lora0" / "adapter_model.safetensors")
    # u and masks over the factors only: the store is about one adapter, not a model
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in list(Store(store).keys))
    assert info["storage"]["unified_bytes"] < 1.2 * adapter_bytes
    assert info["storage"]["individual_bytes"] == 3 * adapter_bytes
    assert main(["export", store, "--task", "t1", "-o", str(tmp_path / "ad"), "--json"]) == 0  # default peft
    rep = json.loads(capsys.readouterr().out)
    assert rep["format"] == "peft"
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    src = json.loads((gpt2 / "lora1" / "adapter_config.json").read_text())
    for k in ("task_type", "base_model_name_or_path", "target_modules", "r", "lora_alpha", "fan_in_fan_out"):
        assert cfg[k] == src[k], k
    want = _expert_logits(gpt2, store, "t1")
    pm = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(gpt2 / "base")), str(tmp_path / "ad"))
    with torch.no_grad():
        assert torch.allclose(pm(_ids()).logits, want, atol=1e-5)
    cwd = os.getcwd()
    os.chdir(gpt2)  # PEFT wrote base_model_name_or_path relative to where the adapters were trained
    try:
        ap = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ad"), local_files_only=True)
    finally:
        os.chdir(cwd)
    with torch.no_grad():
        assert torch.allclose(ap(_ids()).logits, want, atol=1e-5)
    # the same expert as a from_pretrained folder: W + s B A written into the base's weights
    assert main(["export", store, "--task", "t1", "--format", "hf", "-o", str(tmp_path / "hf"), "-q"]) == 0
    hm = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    with torch.no_grad():
        assert torch.allclose(hm(_ids()).logits, want, atol=1e-5)


def test_factor_store_with_a_shared_init_and_mode_refusals(gpt2, tmp_path, capsys):
    store = str(tmp_path / "store")
    init = str(gpt2 / "init")
    for t in range(2):
        assert (
            main(
                [
                    "add-task",
                    store,
                    "--base",
                    str(gpt2 / "base"),
                    "--finetuned",
                    str(gpt2 / f"lora{t}"),
                    "--name",
                    f"t{t}",
                    "--lora-init",
                    init,
                    "-q",
                ]
            )
            == 0
        )
    with Store(store) as st:
        # deltas are relative to the init: task 0 alone decouples to (A_0 - A_init) exactly
        assert st.task_info("t0")["source"]["init"]["path"] == os.path.abspath(init)
    assert (
        main(
            ["add-task", store, "--base", str(gpt2 / "base"), "--finetuned", str(gpt2 / "lora2"), "--name", "t2", "-q"]
        )
        == 1
    )
    assert "initialisation" in capsys.readouterr().err
    assert (
        main(
            [
                "add-task",
                store,
                "--base",
                str(gpt2 / "base"),
                "--finetuned",
                str(gpt2 / "lora2"),
                "--name",
                "t2",
                "--lora",
                "dense",
                "-q",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "--lora dense" in err and "--lora factors" in err
    assert main(["export", store, "--task", "t1", "-o", str(tmp_path / "ad"), "-q"]) == 0
    pm = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(gpt2 / "base")), str(tmp_path / "ad"))
    assert pm.peft_config["default"].task_type == "CAUSAL_LM"


def test_dense_lora_store_exports_by_svd_with_detected_fan_in_fan_out(gpt2, tmp_path, capsys):
    store = str(tmp_path / "store")
    for t in range(2):
        assert (
            main(
                [
                    "add-task",
                    store,
                    "--base",
                    str(gpt2 / "base"),
                    "--finetuned",
                    str(gpt2 / f"lora{t}"),
                    "--name",
                    f"t{t}",
                    "--lora",
                    "dense",
                    "-q",
                ]
            )
            == 0
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            main(
                [
                    "export",
                    store,
                    "--task",
                    "t1",
                    "--format",
                    "peft",
                    "--rank",
                    "1",
                    "-o",
                    str(tmp_path / "ad"),
                    "--json",
                ]
            )
            == 0
        )
    rep = json.loads(capsys.readouterr().out)
    assert rep["truncation_warning"] is True and rep["truncation_error"] > 0.1
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 1
    peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(gpt2 / "base")), str(tmp_path / "ad"))


def test_export_peft_detects_conv1d_and_warns(tmp_path):
    from condu_merge.adapters.lora import TruncationWarning, export_peft

    model = _gpt2_base(tmp_path / "b")
    g = torch.Generator().manual_seed(0)
    delta = {"transformer.h.0.attn.c_attn.weight": torch.randn(32, 96, generator=g)}  # Conv1D stores [in, out]
    with pytest.warns(TruncationWarning, match="truncation error"):
        rep = export_peft(delta, tmp_path / "ad", 2, model=model, task_type="CAUSAL_LM")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["task_type"] == "CAUSAL_LM" and rep.total > 0.1
    peft.PeftModel.from_pretrained(model, str(tmp_path / "ad"))


def test_exports_never_replace_the_base_or_a_foreign_folder(gpt2, tmp_path, capsys):
    store = str(tmp_path / "store")
    base_file = str(gpt2 / "base" / "model.safetensors")
    assert (
        main(
            [
                "add-task",
                store,
                "--base",
                base_file,
                "--finetuned",
                str(gpt2 / "ft0" / "model.safetensors"),
                "--name",
                "t0",
                "-q",
            ]
        )
        == 0
    )
    # the base was given as a file: the default export is one file
    assert main(["export", store, "--task", "t0", "-o", str(tmp_path / "e.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "safetensors"
    before = open(base_file, "rb").read()
    assert main(["export", store, "--task", "t0", "-o", base_file, "--force", "-q"]) == 1
    assert "base checkpoint" in capsys.readouterr().err and open(base_file, "rb").read() == before
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    assert (
        main(
            [
                "export",
                store,
                "--task",
                "t0",
                "--format",
                "hf",
                "--base",
                str(gpt2 / "base"),
                "-o",
                str(mine),
                "--force",
                "-q",
            ]
        )
        == 1
    )
    assert "does not hold an export" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep"


def test_factor_store_records_the_base_in_its_first_tasks_digest(gpt2, tmp_path, monkeypatch, capsys):
    """A LoRA factor store records the base's identity per task; a later task hashes the base in
    the digest the first task recorded (so they compare), whatever $CONDU_MERGE_DIGEST says now."""
    pytest.importorskip("blake3")
    store = str(tmp_path / "store")

    def add(t, base):
        args = ["add-task", store, "--base", str(base), "--finetuned", str(gpt2 / f"lora{t}"), "--name", f"t{t}"]
        return main([*args, "--lora-init", str(gpt2 / "init"), "-q"])

    monkeypatch.setenv("CONDU_MERGE_DIGEST", "sha256")
    assert add(0, gpt2 / "base") == 0
    monkeypatch.delenv("CONDU_MERGE_DIGEST")  # blake3 from now on
    assert add(1, gpt2 / "base") == 0
    with Store(store) as st:
        b0, b1 = (st.task_info(t)["source"]["base"] for t in ("t0", "t1"))
        assert set(b0) == set(b1) == {"path", "sha256", "bytes"} and b0["sha256"] == b1["sha256"]
        assert st.manifest["version"] == 2  # u and the masks are recorded in blake3 now
    assert add(2, gpt2 / "ft0") == 1  # another base: refused against the sha256 record
    assert "differs from the base" in capsys.readouterr().err
