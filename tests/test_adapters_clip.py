"""CLIP full-weight adapter: selection per mode, open_clip <-> HF names, experts without copies."""

from __future__ import annotations

import copy

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402

from condu_merge import ContinualMerger, KeyMismatchError, decouple  # noqa: E402
from condu_merge.adapters.clip import (  # noqa: E402
    ClipAdapterError,
    ClipExperts,
    clip_delta,
    clip_flavor,
    functional_forward,
    hf_config_from_open_clip,
    hf_to_openclip,
    openclip_to_hf,
    pretrained_state,
    select_names,
    swap_params,
)

VOCAB, CTX = 64, 12


_BASES: dict = {}


def tiny_open_clip(seed: int = 0) -> CLIP:
    """A tiny random CLIP, shared per seed across tests (callers must not modify it: deep-copy first)."""
    if seed not in _BASES:
        _BASES[seed] = _tiny_open_clip(seed)
    return _BASES[seed]


def _tiny_open_clip(seed: int) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=32, heads=2, layers=2),
        quick_gelu=True,
    ).eval()


def tiny_hf_from(oc: CLIP, *, load: bool = True):
    hf = transformers.CLIPModel(hf_config_from_open_clip(oc)).eval()
    if load:
        missing, unexpected = hf.load_state_dict(openclip_to_hf(oc.state_dict()), strict=False)
        assert missing == [] and unexpected == []
    return hf


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    """CLIP-like token rows: ids below EOT, EOT (= the largest id) at a varying position, zeros after."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, VOCAB - 2, (n, CTX), generator=g)
    for i in range(n):
        end = 3 + i % (CTX - 4)
        t[i, end] = VOCAB - 1
        t[i, end + 1 :] = 0
    return t


def images(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


_FT_CACHE: dict = {}


def finetune(model: CLIP, mode: str, steps: int = 3, seed: int = 3) -> CLIP:
    """A few AdamW steps of the CLIP contrastive loss on random pairs, training ``mode``'s tensors
    (memoised per model/mode/seed: tests only read the result)."""
    key = (id(model), mode, steps, seed)
    if key not in _FT_CACHE:
        _FT_CACHE[key] = _finetune(model, mode, steps, seed)
    return _FT_CACHE[key]


def _finetune(model: CLIP, mode: str, steps: int, seed: int) -> CLIP:
    ft = copy.deepcopy(model)
    names = set(select_names(ft, mode))
    params = [p for n, p in ft.named_parameters() if n in names]
    for n, p in ft.named_parameters():
        p.requires_grad_(n in names)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, t = images(8, seed), tokens(8, seed)
    for _ in range(steps):
        fi, ft_, scale = ft.encode_image(x, normalize=True), ft.encode_text(t, normalize=True), ft.logit_scale.exp()
        logits = scale * fi @ ft_.t()
        y = torch.arange(8)
        loss = (torch.nn.functional.cross_entropy(logits, y) + torch.nn.functional.cross_entropy(logits.t(), y)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ft.eval()


@pytest.fixture(scope="module")
def base() -> CLIP:
    return tiny_open_clip()


# ---------------------------------------------------------------------------- selection


def test_select_names_per_mode(base):
    whole, image, text = (select_names(base, m) for m in ("whole", "image", "text"))
    assert "logit_scale" not in whole
    assert all(k.startswith("visual.") for k in image) and image
    assert not any(k.startswith("visual.") for k in text)
    assert {"token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight"} <= set(text)
    assert sorted(whole) == sorted(image + text)
    assert set(whole) == {n for n, _ in base.named_parameters()} - {"logit_scale"}

    hf = tiny_hf_from(base, load=False)
    assert {n for n, b in hf.named_buffers() if not b.is_floating_point()}  # position_ids exist …
    hw = select_names(hf, "whole")
    assert not any("position_ids" in k for k in hw) and "logit_scale" not in hw  # … and never take part
    assert all(k.startswith(("vision_model.", "visual_projection.")) for k in select_names(hf, "image"))
    assert all(k.startswith(("text_model.", "text_projection.")) for k in select_names(hf, "text"))

    # float buffers of the tower take part, integer buffers never
    sd = {
        "visual.bn.running_mean": torch.zeros(3),
        "visual.bn.num_batches_tracked": torch.tensor(4),
        "visual.conv1.weight": torch.zeros(2),
        "logit_scale": torch.zeros(()),
    }
    assert select_names(sd, "image") == ["visual.bn.running_mean", "visual.conv1.weight"]
    assert select_names(sd, "text") == []
    with pytest.raises(ValueError, match="mode"):
        select_names(base, "vision")


# ---------------------------------------------------------------------------- name mapping


def test_openclip_to_hf_outputs_match(base):
    hf = tiny_hf_from(base)
    x, t = images(3), tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(
            hf.get_image_features(pixel_values=x).pooler_output, base.encode_image(x), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            hf.get_text_features(input_ids=t).pooler_output, base.encode_text(t), atol=1e-5, rtol=1e-5
        )


def test_hf_to_openclip_outputs_match(base):
    hf = tiny_hf_from(base, load=False)  # its own random init, unrelated to base's
    oc = copy.deepcopy(tiny_open_clip(seed=7))
    missing, unexpected = oc.load_state_dict(hf_to_openclip(hf.state_dict()), strict=False)
    assert missing == [] and unexpected == []
    x, t = images(3), tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(
            oc.encode_image(x), hf.get_image_features(pixel_values=x).pooler_output, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            oc.encode_text(t), hf.get_text_features(input_ids=t).pooler_output, atol=1e-5, rtol=1e-5
        )
    # exact round trip of the names and values, both ways
    sd = base.state_dict()
    back = hf_to_openclip(openclip_to_hf(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    hsd = hf.state_dict()
    again = openclip_to_hf(hf_to_openclip(hsd))
    assert set(again) == set(hsd) and all(torch.equal(again[k], hsd[k]) for k in hsd)
    assert clip_flavor(hf) == "hf" and clip_flavor(base) == "open_clip"


def test_mapping_errors_name_the_key(base):
    with pytest.raises(ClipAdapterError, match="visual.transformer.resblocks.0.ls_1.gamma"):
        openclip_to_hf({"visual.transformer.resblocks.0.ls_1.gamma": torch.zeros(4)})
    hsd = openclip_to_hf(base.state_dict())
    del hsd["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(KeyMismatchError, match=r"transformer.resblocks.1.attn.in_proj_weight.*k_proj"):
        hf_to_openclip(hsd)


# ---------------------------------------------------------------------------- experts


@pytest.mark.parametrize("mode", ["whole", "image", "text"])
def test_round_trip_single_task_matches_finetuned(base, mode):
    theta0 = pretrained_state(base, mode)
    ft = finetune(base, mode)
    delta = clip_delta(theta0, ft, mode)
    assert set(delta) == set(select_names(base, mode))
    assert any(float(d.abs().max()) > 0 for d in delta.values())
    merger = ContinualMerger()
    merger.add_task("t", delta)
    model = copy.deepcopy(base)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    experts = ClipExperts(model, merger.unified, merger.triggers)
    x, t = images(4, seed=11), tokens(5, seed=12)
    with torch.no_grad():
        torch.testing.assert_close(experts.encode_image("t", x), ft.encode_image(x), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(experts.encode_text("t", t), ft.encode_text(t), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(experts.encode_image(None, x), base.encode_image(x))
    # the model is back to θ_0, bit for bit, in its own storage
    for k, v in model.state_dict().items():
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1]), k


def test_store_from_open_clip_applies_to_hf(base):
    ft = finetune(base, "whole")
    merger = ContinualMerger()
    merger.add_task("a", clip_delta(base, ft, "whole"))
    hf = tiny_hf_from(base)
    experts = ClipExperts(hf, merger.unified, merger.triggers)
    x, t = images(3, seed=13), tokens(4, seed=14)
    with torch.no_grad():
        torch.testing.assert_close(experts.encode_image("a", x), ft.encode_image(x), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(experts.encode_text("a", t), ft.encode_text(t), atol=2e-5, rtol=1e-5)


def test_two_tasks_experts_equal_decouple_and_no_copies(base):
    theta0 = pretrained_state(base, "whole")
    fts = [finetune(base, "whole", seed=s) for s in (3, 22)]
    merger = ContinualMerger()
    for i, ft in enumerate(fts):
        merger.add_task(f"t{i}", clip_delta(theta0, ft, "whole"))
    model = copy.deepcopy(base)
    experts = ClipExperts(model, merger.unified, merger.triggers, cache_size=1)
    x = images(3, seed=31)
    for name in ("t0", "t1"):
        ref_sd = decouple(merger.unified, merger.trigger(name), base=model.state_dict())
        ref_model = copy.deepcopy(base)
        ref_model.load_state_dict(ref_sd)
        with torch.no_grad():
            torch.testing.assert_close(experts.encode_image(name, x), ref_model.encode_image(x), atol=1e-6, rtol=1e-6)
            # functional_call path gives the same, and leaves the model alone
            via_func = functional_forward(model, experts.params(name), x, method="encode_image")
            torch.testing.assert_close(via_func, ref_model.encode_image(x), atol=1e-6, rtol=1e-6)
    assert len(experts._cache) == 1  # at most cache_size experts held, never K models
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), base.encode_image(x))


def test_swap_params_restores_on_error(base):
    model = copy.deepcopy(base)
    name = "visual.conv1.weight"
    orig = model.visual.conv1.weight
    ptr, val = orig.data_ptr(), orig.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with swap_params(model, {name: torch.zeros_like(val)}):
            assert float(model.visual.conv1.weight.detach().abs().sum()) == 0
            raise RuntimeError("boom")
    assert model.visual.conv1.weight is orig and orig.data_ptr() == ptr and torch.equal(orig, val)
    with pytest.raises(KeyMismatchError, match="visual.nope"):
        with swap_params(model, {"visual.nope.weight": val}):
            pass
    assert torch.equal(model.visual.conv1.weight, val)


def test_clip_delta_lives_on_the_finetuned_device(base):
    # θ_0 kept on the CPU while the model trains elsewhere (meta stands in for a GPU here)
    theta0 = pretrained_state(base, "image")
    ft = {k: v.to("meta") for k, v in base.state_dict().items()}
    d = clip_delta(theta0, ft, "image")
    assert d and all(t.device.type == "meta" for t in d.values())


def test_clip_features_reads_tensors_and_pooler_output():
    from types import SimpleNamespace

    from condu_merge.adapters.clip import clip_features

    t = torch.randn(2, 4)
    assert clip_features(t) is t
    assert clip_features(SimpleNamespace(pooler_output=t)) is t
    with pytest.raises(ClipAdapterError, match="SimpleNamespace"):
        clip_features(SimpleNamespace(last_hidden_state=t))


@pytest.mark.parametrize("flavor", ["open_clip", "hf"])
def test_clip_encode_plain_and_with_params(base, flavor):
    """clip_encode without params = the model's own encoders; with params = the model with those
    tensors swapped in, differentiable in them, the model untouched."""
    from condu_merge.adapters.clip import clip_encode

    model = copy.deepcopy(base) if flavor == "open_clip" else tiny_hf_from(base)
    x, t = images(3, seed=41), tokens(4, seed=42)
    with torch.no_grad():
        torch.testing.assert_close(clip_encode(model, "image", x), base.encode_image(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clip_encode(model, "text", t), base.encode_text(t), atol=1e-5, rtol=1e-5)
    names = [n for n, p in model.named_parameters() if p.dim() == 2][:6]
    g = torch.Generator().manual_seed(43)
    params = {
        n: (p.detach() + 0.05 * torch.randn(p.shape, generator=g)).requires_grad_(True)
        for n, p in model.named_parameters()
        if n in names
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for kind, inp in (("image", x), ("text", t)):
        got = clip_encode(model, kind, inp, params)
        with torch.no_grad(), swap_params(model, params):
            ref = clip_encode(model, kind, inp)
        torch.testing.assert_close(got.detach(), ref, atol=1e-6, rtol=1e-6)
        got.sum().backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in params.values())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="kind"):
        clip_encode(model, "audio", x)


def test_experts_transform_hook(base, tmp_path):
    """transform= maps each decoupled delta before it is added to θ_0 (here: half the delta)."""
    from condu_merge.store import Store

    theta0 = pretrained_state(base, "whole")
    merger = ContinualMerger()
    merger.add_task("t0", clip_delta(theta0, finetune(base, "whole", seed=3), "whole"))
    half = lambda d: {k: 0.5 * v for k, v in d.items()}  # noqa: E731
    model = copy.deepcopy(base)
    sd = model.state_dict()
    plain = ClipExperts.from_merger(model, merger).params("t0")
    halved = ClipExperts.from_merger(model, merger, transform=half).params("t0")
    with Store(str(tmp_path / "store")) as store:
        store.add_task("t0", merger.decouple("t0"))
        stored = ClipExperts.from_store(model, store, transform=half).params("t0")
    assert set(halved) == set(plain) == set(stored)
    for k in plain:
        torch.testing.assert_close(halved[k], sd[k] + 0.5 * (plain[k] - sd[k]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stored[k], halved[k], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- review fixes


def _two_task_merger(base):
    merger = ContinualMerger()
    for i, s in enumerate((3, 22)):
        merger.add_task(f"t{i}", clip_delta(base, finetune(base, "whole", seed=s)))
    return merger


def test_nested_experts_read_theta0_not_the_applied_expert(base):
    """An expert built while another is swapped in is θ_0 + δ̃ (not θ_0 + δ̃_other + δ̃)."""
    merger = _two_task_merger(base)
    model = copy.deepcopy(base)
    ex = ClipExperts.from_merger(model, merger)
    x = images(2, seed=60)
    with torch.no_grad():
        ref = ClipExperts.from_merger(model, merger).encode_image("t1", x)
        with ex.applied("t0"):
            nested = ex.encode_image("t1", x)
        back = model.encode_image(x)
    torch.testing.assert_close(nested, ref)
    torch.testing.assert_close(back, base.encode_image(x))


def test_expert_params_round_once_in_low_precision(base):
    """θ_0 + δ̃ in a bf16 model is computed wide and rounded once."""
    merger = _two_task_merger(base)
    model = copy.deepcopy(base).to(torch.bfloat16)
    got = ClipExperts.from_merger(model, merger).params("t0")
    d = merger.decouple("t0")
    sd = model.state_dict()
    for k, v in got.items():
        exact = (sd[k].float() + d[k].float()).to(torch.bfloat16)
        assert torch.equal(v, exact), k


def test_functional_forward_refuses_unknown_names_and_shapes(base):
    x = images(2, seed=61)
    bad = {"visual.transformer.resblocks.0.mlp.c_fc.weights": torch.zeros(128, 32)}
    with pytest.raises(KeyMismatchError, match="c_fc.weights"):
        functional_forward(base, bad, x, method="encode_image")
    with pytest.raises(KeyMismatchError, match="c_fc.weights"):
        functional_forward(base, bad, x, tokens(2))
    with pytest.raises(Exception, match="c_fc.weight"):
        functional_forward(
            base, {"visual.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(128, 33)}, x, method="encode_image"
        )


@pytest.mark.parametrize("source", ["merger", "store"])
def test_experts_follow_a_session_that_gains_a_task(base, tmp_path, source):
    """Adding a task changes every expert: the cached expert and the task list must follow the
    merger / store they read from, not stay a snapshot of the construction time."""
    from condu_merge.store import Store

    theta0 = pretrained_state(base, "whole")
    deltas = [clip_delta(theta0, finetune(base, "whole", seed=s), "whole") for s in (3, 22)]
    model = copy.deepcopy(base)
    if source == "merger":
        holder = ContinualMerger()
        holder.add_task("t0", deltas[0])
        ex = ClipExperts.from_merger(model, holder, cache_size=2)
    else:
        holder = Store(str(tmp_path / "store"))
        holder.add_task("t0", deltas[0])
        ex = ClipExperts.from_store(model, holder, cache_size=2)
    before = {k: v.clone() for k, v in ex.params("t0").items()}
    assert ex.tasks == ["t0"]
    holder.add_task("t1", deltas[1])
    assert ex.tasks == ["t0", "t1"]
    after = ex.params("t0")  # re-decoupled from the new session, not the cached one
    ref = ContinualMerger()
    for i, d in enumerate(deltas):
        ref.add_task(f"t{i}", d)
    sd = model.state_dict()
    want = ref.decouple("t0")
    assert any(not torch.equal(before[k], after[k]) for k in after)
    for k in after:
        torch.testing.assert_close(after[k], sd[k] + want[k], atol=1e-6, rtol=1e-5)
    ex.params("t1")
    if source == "store":
        holder.close()
