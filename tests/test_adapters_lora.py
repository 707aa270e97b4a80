"""PEFT LoRA adapter: factor-wise and dense ConDU merges on a tiny transformers CLIP; exports load
with peft.PeftModel.from_pretrained."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from condu_merge import ContinualMerger, FormatError, KeyMismatchError, ShapeMismatchError  # noqa: E402
from condu_merge.adapters.clip import ClipExperts  # noqa: E402
from condu_merge.adapters.lora import (  # noqa: E402
    LoraAdapter,
    LoraCompatibilityError,
    dense_delta,
    export_peft,
    factor_delta,
    factor_expert,
    record_init,
)

VOCAB, CTX = 64, 12
TARGETS = ["q_proj", "v_proj", "fc1"]


def tiny_hf() -> transformers.CLIPModel:
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        projection_dim=16,
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=CTX,
            eos_token_id=VOCAB - 1,
            bos_token_id=VOCAB - 2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
    )
    return transformers.CLIPModel(cfg).eval()


def tokens(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, VOCAB - 2, (n, CTX), generator=g)
    t[:, -1] = VOCAB - 1
    return t


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def feats(model, x, t):
    with torch.no_grad():
        i = model.get_image_features(pixel_values=x)
        s = model.get_text_features(input_ids=t)
    return getattr(i, "pooler_output", i), getattr(s, "pooler_output", s)


def train_lora(pm, init_sd, seed: int, steps: int = 3):
    """Reset the PEFT model's LoRA to the shared init, then a few AdamW steps (A and B both move)."""
    peft.set_peft_model_state_dict(pm, init_sd)
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=2e-2)
    x, t = images(8, seed), tokens(8, seed)
    for _ in range(steps):
        out = pm(input_ids=t, pixel_values=x)
        y = torch.arange(8)
        loss = torch.nn.functional.cross_entropy(out.logits_per_image, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_hf()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    init_sd = {k: v.clone() for k, v in peft.get_peft_model_state_dict(pm).items()}
    pm.save_pretrained(root / "init")
    out = {"base": base, "root": root, "init": LoraAdapter.load(root / "init")}
    x, t = images(3, 99), tokens(4, 98)
    for name, seed in (("a", 1), ("b", 2)):
        train_lora(pm, init_sd, seed)
        pm.save_pretrained(root / name)
        record_init(root / name, out["init"])
        out[name] = LoraAdapter.load(root / name)
        out[f"feats_{name}"] = feats(pm, x, t)
    out["x"], out["t"] = x, t
    return out


def _load_peft(base, path):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def test_load_parses_peft_folder(setup):
    a = setup["a"]
    assert len(a.modules) == 2 * 2 * len(TARGETS)  # 2 towers x 2 layers x targets
    assert all(m.startswith(("text_model.", "vision_model.")) for m in a.modules)
    m = a.modules[0]
    assert a.factors[m][0].shape[0] == 4 and a.scaling(m) == 2.0
    init = setup["init"]
    assert all(float(init.factors[m][1].abs().max()) == 0 for m in init.modules)  # PEFT init: B0 = 0
    assert a.init_fingerprint == init.fingerprint()
    assert any(not torch.equal(a.factors[m][0], init.factors[m][0]) for m in a.modules)
    # training moved the outputs well beyond the tolerances used below
    bi, bt = feats(setup["base"], setup["x"], setup["t"])
    ai, at = setup["feats_a"]
    assert float((ai - bi).abs().max()) > 1e-2 and float((at - bt).abs().max()) > 1e-2


def test_factorwise_single_task_round_trip(setup, tmp_path):
    init, a = setup["init"], setup["a"]
    merger = ContinualMerger()
    merger.add_task("a", factor_delta(a, init))
    expert = factor_expert(init, merger.decouple("a"))
    expert.save(tmp_path / "a_hat")
    for m in a.modules:
        torch.testing.assert_close(expert.factors[m][0], a.factors[m][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(expert.factors[m][1], a.factors[m][1], atol=1e-6, rtol=1e-6)
    loaded = _load_peft(setup["base"], tmp_path / "a_hat")
    fi, ft = feats(loaded, setup["x"], setup["t"])
    ri, rt = setup["feats_a"]
    torch.testing.assert_close(fi, ri, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ft, rt, atol=1e-5, rtol=1e-5)


def test_factorwise_two_tasks_is_the_core_merge(setup):
    init, a, b = setup["init"], setup["a"], setup["b"]
    merger = ContinualMerger()
    merger.add_task("a", factor_delta(a, init))
    merger.add_task("b", factor_delta(b, init))
    for name, ad in (("a", a), ("b", b)):
        exp = factor_expert(init, merger.decouple(name))
        # decoupled factors keep the sign pattern of the true update where the mask is set
        for m in ad.modules[:3]:
            d_true = ad.factors[m][0] - init.factors[m][0]
            d_hat = exp.factors[m][0] - init.factors[m][0]
            nz = d_hat != 0
            assert bool(nz.any()) and bool((torch.sign(d_hat[nz]) == torch.sign(d_true[nz])).all())


def test_factorwise_refusals(setup, tmp_path):
    init, a = setup["init"], setup["a"]
    # different rank
    r2 = LoraAdapter(
        config={**a.config, "r": 2}, factors={m: (A[:2], B[:, :2]) for m, (A, B) in a.factors.items()}, path="r2"
    )
    with pytest.raises(LoraCompatibilityError, match=r"'r2'.*\br=2"):
        factor_delta(r2, init)
    # different targets
    fewer = LoraAdapter(
        config={**a.config, "target_modules": ["q_proj"]},
        factors={m: f for m, f in a.factors.items() if m.endswith("q_proj")},
        path="few",
    )
    with pytest.raises(LoraCompatibilityError, match="target_modules"):
        factor_delta(fewer, init)
    # recorded initialisation differs
    shutil_copy(setup["root"] / "a", tmp_path / "other")
    record_init(tmp_path / "other", "0" * 64)
    other = LoraAdapter.load(tmp_path / "other")
    with pytest.raises(LoraCompatibilityError, match="initialisation"):
        factor_delta(other, init)
    # same shapes but a different scaling
    alpha = LoraAdapter(config={**a.config, "lora_alpha": 16}, factors=a.factors, path="alpha")
    with pytest.raises(LoraCompatibilityError, match="lora_alpha"):
        factor_delta(alpha, init)


def shutil_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)


def test_dense_merge_applies_and_exports(setup, tmp_path):
    base, a = setup["base"], setup["a"]
    dd = dense_delta(a)
    # ΔW equals what PEFT itself merges into the base weights
    merged = _load_peft(base, setup["root"] / "a").merge_and_unload().state_dict()
    bsd = base.state_dict()
    for k, d in dd.items():
        torch.testing.assert_close(merged[k] - bsd[k], d, atol=1e-6, rtol=1e-5)
    merger = ContinualMerger()
    merger.add_task("a", dd)
    experts = ClipExperts(copy.deepcopy(base), merger.unified, merger.triggers)
    x, t = setup["x"], setup["t"]
    ri, rt = setup["feats_a"]
    torch.testing.assert_close(experts.encode_image("a", x), ri, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experts.encode_text("a", t), rt, atol=1e-5, rtol=1e-5)

    # export at the true rank: (near) lossless, and loads in PEFT
    rep = export_peft(merger.decouple("a"), tmp_path / "dense_r4", rank=4)
    assert rep.total < 1e-5 and max(rep.per_module.values()) < 1e-5
    cfg = json.loads((tmp_path / "dense_r4" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == sorted(a.modules)
    loaded = _load_peft(base, tmp_path / "dense_r4")
    fi, ft = feats(loaded, x, t)
    torch.testing.assert_close(fi, ri, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ft, rt, atol=1e-4, rtol=1e-4)

    # export at rank 1: the reported error is the measured one
    rep1 = export_peft(dd, tmp_path / "dense_r1", rank=1, lora_alpha=3.0)
    low = _load_peft(base, tmp_path / "dense_r1").merge_and_unload().state_dict()
    res2 = tot2 = 0.0
    for k, d in dd.items():
        approx = low[k] - bsd[k]
        e2, n2 = float(((d - approx).double() ** 2).sum()), float((d.double() ** 2).sum())
        m = k[: -len(".weight")]
        assert rep1.per_module[m] == pytest.approx((e2 / n2) ** 0.5, rel=1e-3, abs=1e-6)
        res2, tot2 = res2 + e2, tot2 + n2
    assert rep1.total == pytest.approx((res2 / tot2) ** 0.5, rel=1e-3)
    assert 0 < rep1.total < 1


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FormatError, match="adapter_config.json"):
        LoraAdapter.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(FormatError, match="not a LoRA"):
        LoraAdapter.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(
        FormatError, match=os.path.join(str(tmp_path), "adapter_model.safetensors").replace("\\", "\\\\")
    ):
        LoraAdapter.load(tmp_path)


def test_dense_delta_agrees_with_checkpoint_reader(setup):
    """The store's lazy PEFT reader (condu_merge.checkpoints.PeftAdapter) and dense_delta give the
    same ΔW under the same names, so stores built either way are interchangeable."""
    ck = pytest.importorskip("condu_merge.checkpoints")
    if not hasattr(ck, "PeftAdapter"):
        pytest.skip("no PeftAdapter reader in this checkout")
    reader = ck.PeftAdapter(setup["root"] / "a")
    dd = dense_delta(setup["a"])
    assert sorted(reader.delta_keys()) == sorted(dd)
    bsd = setup["base"].state_dict()
    for k, d in dd.items():
        torch.testing.assert_close(reader.delta(k, bsd[k]).float(), d, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- LoRA on a model


def test_lora_param_and_module_names():
    from condu_merge.adapters.lora import lora_module_name, lora_param_name

    assert (
        lora_param_name("vision_model.encoder.layers.0.self_attn.q_proj")
        == "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    )
    assert lora_param_name("transformer.resblocks.0.attn.in_proj") == "transformer.resblocks.0.attn.in_proj_weight"
    assert lora_param_name("backbone.mixer.in_proj") == "backbone.mixer.in_proj.weight"  # a Linear, not attention
    for p in (
        "transformer.resblocks.0.attn.in_proj_weight",
        "self_attn.in_proj_weight",
        "mlp.c_fc.weight",
        "mixer.in_proj.weight",
    ):
        assert lora_param_name(lora_module_name(p)) == p
    with pytest.raises(KeyMismatchError, match="attn.in_proj_bias"):
        lora_module_name("attn.in_proj_bias")


def test_init_lora_is_peft_like_seeded_and_targets_fused_attention(tmp_path):
    """A ~ U(-b, b) with torch's kaiming_uniform_(a=√5) bound, B = 0, same seed -> same bytes;
    nn.MultiheadAttention's fused in_proj_weight is a target; the folder round-trips."""
    import math

    from condu_merge.adapters.lora import init_lora, lora_weights

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=48).eval()
    mods = ["self_attn.in_proj", "linear1", "linear2"]
    init = init_lora(layer, mods, rank=8, lora_alpha=16, seed=5)
    shapes = {"self_attn.in_proj": (96, 32), "linear1": (48, 32), "linear2": (32, 48)}
    for m, (out_f, in_f) in shapes.items():
        a, b = init.factors[m]
        assert a.shape == (8, in_f) and b.shape == (out_f, 8) and a.dtype == b.dtype == torch.float32
        assert float(b.abs().max()) == 0
        bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / in_f)
        assert 0.9 * bound < float(a.abs().max()) <= bound
        assert abs(float(a.mean())) < 0.2 * bound
    assert init.scaling("linear1") == 2.0 and init.config["target_modules"] == sorted(mods)
    assert init_lora(layer, mods, rank=8, lora_alpha=16, seed=5).fingerprint() == init.fingerprint()
    assert init_lora(layer, mods, rank=8, lora_alpha=16, seed=6).fingerprint() != init.fingerprint()
    # B = 0: the adapted weights are exactly θ_0
    w = lora_weights(layer, init)
    assert set(w) == {"self_attn.in_proj_weight", "linear1.weight", "linear2.weight"}
    params = dict(layer.named_parameters())
    assert all(torch.equal(w[n], params[n]) for n in w)
    loaded = LoraAdapter.load(init.save(tmp_path / "init"))
    assert loaded.fingerprint() == init.fingerprint() and loaded.config == init.config
    with pytest.raises(KeyMismatchError, match="self_attn.out_proj.in_proj"):
        init_lora(layer, ["self_attn.out_proj.in_proj"], rank=2, lora_alpha=2, seed=0)
    with pytest.raises(ShapeMismatchError, match="norm1.weight"):
        init_lora(layer, ["norm1"], rank=2, lora_alpha=2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        init_lora(layer, mods, rank=0, lora_alpha=2, seed=0)


def test_lora_weights_fused_attention_is_differentiable():
    from condu_merge.adapters import functional_forward, swap_params
    from condu_merge.adapters.lora import init_lora, lora_weights

    torch.manual_seed(1)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=48, dropout=0.0).eval()
    init = init_lora(layer, ["self_attn.in_proj", "linear1"], rank=4, lora_alpha=8, seed=0)
    g = torch.Generator().manual_seed(2)
    leaf = {
        m: (a.clone().requires_grad_(True), (0.1 * torch.randn(b.shape, generator=g)).requires_grad_(True))
        for m, (a, b) in init.factors.items()
    }
    live = LoraAdapter(config=dict(init.config), factors=leaf)
    w = lora_weights(layer, live)
    params = dict(layer.named_parameters())
    for m, (a, b) in leaf.items():
        name = "self_attn.in_proj_weight" if m == "self_attn.in_proj" else f"{m}.weight"
        torch.testing.assert_close(w[name] - params[name], 2.0 * b.detach() @ a.detach())
    x = torch.randn(5, 3, 32)
    out = functional_forward(layer, w, x)
    with torch.no_grad(), swap_params(layer, {k: v.detach() for k, v in w.items()}):
        ref = layer(x)
    torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=1e-6)
    out.square().sum().backward()
    assert all(float(a.grad.abs().sum()) > 0 and float(b.grad.abs().sum()) > 0 for a, b in leaf.values())
    assert all(params[n].grad is None for n in w)  # θ_0 is read detached: only the factors train


def test_lora_weights_match_peft(setup):
    """W + s·B A swapped into the base model gives the PEFT model's features."""
    from condu_merge.adapters import swap_params
    from condu_merge.adapters.lora import lora_weights

    base = setup["base"]
    with swap_params(base, lora_weights(base, setup["a"])):
        fi, ft = feats(base, setup["x"], setup["t"])
    ri, rt = setup["feats_a"]
    torch.testing.assert_close(fi, ri, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ft, rt, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyMismatchError, match="nope.weight"):
        lora_weights(
            base, LoraAdapter.from_factors({"nope": (torch.zeros(1, 2), torch.zeros(2, 1))}, r=1, lora_alpha=1)
        )


def test_lora_transform_experts_from_merger_and_store(setup, tmp_path):
    """ClipExperts with lora_transform: expert t's tensors are W + s·B_t A_t of
    factor_expert(init, δ̃_t), in float32 even under autocast; one task decouples exactly."""
    from condu_merge.adapters.lora import lora_transform, lora_weights
    from condu_merge.store import Store

    base, init = setup["base"], setup["init"]
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merger = ContinualMerger()
    for name in ("a", "b"):
        merger.add_task(name, factor_delta(setup[name], init))
    experts = ClipExperts.from_merger(base, merger, cache_size=2, transform=lora_transform(init, base))
    for name in ("a", "b"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = experts.params(name)
        want = lora_weights(base, factor_expert(init, merger.decouple(name)))
        assert set(got) == set(want) and all(got[k].dtype == torch.float32 for k in got)
        for k in want:
            torch.testing.assert_close(got[k], want[k].detach(), atol=0, rtol=0)
    with Store(str(tmp_path / "store")) as store:
        store.add_task("a", factor_delta(setup["a"], init))
        one = ClipExperts.from_store(base, store, transform=lora_transform(init, base))
        with torch.no_grad():
            fi, ft = one.encode_image("a", setup["x"]), one.encode_text("a", setup["t"])
        ri, rt = setup["feats_a"]
        torch.testing.assert_close(fi, ri, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ft, rt, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())


# ---------------------------------------------------------------------------- review fixes


def test_load_refuses_two_adapter_names_for_one_module(tmp_path):
    """A file holding ``lora_A.default`` and ``lora_A.other`` of one module must not silently keep
    the last one read."""
    from safetensors.torch import save_file

    from condu_merge.adapters.lora import CONFIG_NAME, WEIGHTS_NAME, _peft_config

    g = torch.Generator().manual_seed(0)
    t = {}
    for name in ("default", "other"):
        t[f"base_model.model.fc.lora_A.{name}.weight"] = torch.randn(2, 4, generator=g)
        t[f"base_model.model.fc.lora_B.{name}.weight"] = torch.randn(3, 2, generator=g)
    save_file(t, str(tmp_path / WEIGHTS_NAME))
    (tmp_path / CONFIG_NAME).write_text(json.dumps(_peft_config(["fc"], r=2, lora_alpha=2)))
    with pytest.raises(FormatError, match="fc"):
        LoraAdapter.load(tmp_path)


def test_dense_delta_refuses_a_config_rank_that_is_not_the_factors():
    """The scaling uses the config's rank: factors of another rank would be scaled wrongly."""
    g = torch.Generator().manual_seed(0)
    ad = LoraAdapter.from_factors(
        {"fc": (torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g))}, r=4, lora_alpha=8
    )
    ad.config["r"] = 8  # e.g. a hand-edited config, or a rank_pattern that was dropped
    with pytest.raises(ShapeMismatchError, match="fc"):
        dense_delta(ad)
    ad.config["rank_pattern"] = {"fc": 4}
    torch.testing.assert_close(dense_delta(ad)["fc.weight"], 2.0 * ad.factors["fc"][1] @ ad.factors["fc"][0])


def test_export_peft_fan_in_fan_out_loads_on_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D stores its weight [in, out]: a dense delta in that layout exports with
    fan_in_fan_out=True, PEFT loads it, and the adapted model equals W + ΔW."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: [in=8, out=24]
    assert tuple(w.shape) == (8, 24)
    g = torch.Generator().manual_seed(1)
    dw = torch.randn(8, 2, generator=g) @ torch.randn(2, 24, generator=g) * 0.1  # rank 2
    rep = export_peft({"transformer.h.0.attn.c_attn.weight": dw}, tmp_path / "ad", rank=2, fan_in_fan_out=True)
    assert rep.total < 1e-6
    assert torch.allclose(
        dense_delta(LoraAdapter.load(tmp_path / "ad"))["transformer.h.0.attn.c_attn.weight"], dw, atol=1e-6
    )
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ad")).eval()
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged.transformer.h[0].attn.c_attn.weight, w + dw, atol=1e-6, rtol=1e-5)
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.transformer.h[0].attn.c_attn.weight += dw
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-4)


def test_pam_on_a_peft_lora_model(tmp_path):
    """PAM in the paper's setting on a real PEFT model: the strategy merges the LoRA factors
    (peft_lora_parameters), each task trains a copy of the global LoRA with the alignment hook
    on the optimizer, and the merged global LoRA loads back into the PEFT model."""
    from condu_merge.adapters import peft_lora_parameters
    from condu_merge.strategies import get_strategy

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    params = peft_lora_parameters(model)
    assert sorted(params) == ["transformer.h.0.attn.c_attn.lora_A.weight", "transformer.h.0.attn.c_attn.lora_B.weight"]
    assert all(p.requires_grad for p in params.values())
    strat = get_strategy("pam", {k: p.detach().clone() for k, p in params.items()}, align_every=2)
    g = torch.Generator().manual_seed(3)
    tasks = {f"t{i}": torch.randint(0, 40, (8, 12), generator=g) for i in range(3)}
    stats = []
    for name, ids in tasks.items():
        start = strat.begin_task(name)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start.params[k])
        opt = torch.optim.AdamW(params.values(), lr=5e-2)
        handles = start.hook.attach(params, optimizer=opt) if start.hook else []
        for _ in range(6):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        for h in handles:
            h.remove()
        if start.hook:
            stats.append((start.hook.steps, start.hook.alignments, start.hook.conflict_fraction(params)))
        strat.end_task(name, params={k: p.detach() for k, p in params.items()})
    assert stats == [(6, 3, 0.0), (6, 3, 0.0)]  # aligned at the last step of tasks 2 and 3
    merged = strat.model_for_inference()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(merged[k])
    model.save_pretrained(tmp_path / "global")
    back = LoraAdapter.load(tmp_path / "global")
    for m, (a, b) in back.factors.items():
        torch.testing.assert_close(a, merged[f"{m}.lora_A.weight"])
        torch.testing.assert_close(b, merged[f"{m}.lora_B.weight"])
    with pytest.raises(KeyMismatchError, match="'other'"):
        peft_lora_parameters(model, "other")
