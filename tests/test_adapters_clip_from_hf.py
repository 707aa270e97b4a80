"""``open_clip_from_hf_config``: an open_clip CLIP matching a transformers CLIPConfig (QuickGELU
carried over), same features once the weights are converted."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from condu_merge.adapters.clip import ClipAdapterError, clip_features, hf_to_openclip, open_clip_from_hf_config  # noqa: E402

VOCAB, CTX = 64, 12


def _cfg(act="quick_gelu"):
    return transformers.CLIPConfig(
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
            hidden_act=act,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=96,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            hidden_act=act,
        ),
    )


def _tokens(n):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(1, VOCAB - 2, (n, CTX), generator=g)
    for i in range(n):
        end = 3 + i % (CTX - 4)
        t[i, end] = VOCAB - 1
        t[i, end + 1 :] = 0
    return t


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_same_features_as_the_hf_model(act):
    torch.manual_seed(0)
    hf = transformers.CLIPModel(_cfg(act)).eval()
    oc = open_clip_from_hf_config(hf.config).eval()
    missing, unexpected = oc.load_state_dict(hf_to_openclip(hf.state_dict()), strict=False)
    assert missing == [] and unexpected == []
    x, t = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)), _tokens(3)
    with torch.no_grad():
        assert torch.allclose(
            clip_features(oc.encode_image(x)), clip_features(hf.get_image_features(pixel_values=x)), atol=1e-5
        )
        assert torch.allclose(
            clip_features(oc.encode_text(t)), clip_features(hf.get_text_features(input_ids=t)), atol=1e-5
        )


def test_quick_gelu_matters_and_mismatches_are_refused():
    torch.manual_seed(0)
    hf = transformers.CLIPModel(_cfg("quick_gelu")).eval()
    wrong = open_clip_from_hf_config(_cfg("gelu")).eval()  # what a user gets without quick_gelu=True
    wrong.load_state_dict(hf_to_openclip(hf.state_dict()), strict=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(
            clip_features(wrong.encode_image(x)), clip_features(hf.get_image_features(pixel_values=x)), atol=1e-4
        )
    cfg = _cfg()
    cfg.text_config.hidden_act = "gelu"
    with pytest.raises(ClipAdapterError, match="activations"):
        open_clip_from_hf_config(cfg)
