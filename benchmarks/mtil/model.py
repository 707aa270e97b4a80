"""CLIP loading (open_clip or Hugging Face, offline from a local path) and the MTIL run's choice
of LoRA targets.

Everything model-specific comes from :mod:`condu_merge.adapters`: trainable-tensor selection
(:func:`~condu_merge.adapters.select_names`), encoders (:func:`~condu_merge.adapters.clip_encode`,
also differentiable with substituted tensors), expert application without copies
(:func:`~condu_merge.adapters.swap_params`, :class:`~condu_merge.adapters.ClipExperts`, with
:func:`~condu_merge.adapters.lora_transform` for factor-wise LoRA experts) and LoRA
(:func:`~condu_merge.adapters.init_lora`, :func:`~condu_merge.adapters.lora_weights`,
:func:`~condu_merge.adapters.lora_param_name`, :class:`~condu_merge.adapters.LoraAdapter`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from condu_merge.adapters import clip_encode, clip_encoders, clip_flavor, lora_module_name, select_names

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Weights the reference LoRA adapts: attention and MLP projections of every transformer block.
_LORA_TARGET_RE = re.compile(
    r"(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight"
    r"|self_attn\.(q|k|v|out)_proj\.weight|mlp\.fc[12]\.weight)$"
)


class ModelLoadError(RuntimeError):
    """The CLIP model could not be loaded (names the model and the path)."""


@dataclass
class ClipHandle:
    """A CLIP model plus how to tokenize (to a ``[N, L]`` id tensor) and preprocess for it."""

    model: nn.Module
    flavor: str  # "open_clip" | "hf"
    tokenize: Callable[[list[str]], torch.Tensor]
    train_transform: Callable
    test_transform: Callable
    name: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encoders(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """``(encode_image, encode_text)`` of the model as it is now (unnormalised features)."""
        return clip_encoders(self.model)

    def encode(self, kind: str, x: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Image (``kind="image"``) or text features; with ``params``, computed through
        :func:`~condu_merge.adapters.functional_forward` so gradients reach the tensors in ``params``
        (LoRA training). The library's :func:`~condu_merge.adapters.clip_encode`."""
        return clip_encode(self.model, kind, x, params)


def _hf_transforms(size: int):
    from torchvision import transforms as T

    norm = T.Normalize(OPENAI_MEAN, OPENAI_STD)
    rgb = T.Lambda(lambda im: im.convert("RGB"))
    test = T.Compose(
        [rgb, T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(), norm]
    )
    return test, test


def load_clip(model_name: str, pretrained: str | None, device: str | torch.device = "cpu") -> ClipHandle:
    """Load CLIP. ``model_name``: an open_clip architecture (``ViT-B-16``) with ``pretrained`` a tag
    (``openai``: needs the download cache) or a local checkpoint file (safetensors / state dict),
    or ``hf:<local dir or hub id>`` for a Hugging Face ``CLIPModel`` (local dirs load offline).
    Both train and test use the evaluation preprocessing, as the MTIL reference training does."""
    if model_name.startswith("hf:"):
        path = model_name[3:]
        try:
            from transformers import CLIPModel, CLIPTokenizer

            local = os.path.isdir(path)
            model = CLIPModel.from_pretrained(path, local_files_only=local)
            tok = CLIPTokenizer.from_pretrained(path, local_files_only=local)
        except Exception as e:
            raise ModelLoadError(f"cannot load Hugging Face CLIP from {path!r}: {e}") from e
        size = int(model.config.vision_config.image_size)
        ctx = int(model.config.text_config.max_position_embeddings)

        def tokenize(texts: list[str]) -> torch.Tensor:
            # ids only, as the library's HF encoders take them: CLIP's text tower is causal and pools
            # the first EOT token, so the padding after it never changes the features
            return tok(texts, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")["input_ids"]

        train_tf, test_tf = _hf_transforms(size)
        return ClipHandle(model.to(device).eval(), "hf", tokenize, train_tf, test_tf, name=model_name)
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load open_clip {model_name!r} with pretrained={pretrained!r}: {e}. Offline, pass a local "
            "checkpoint file (e.g. open_clip_pytorch_model.bin or .safetensors) as --pretrained"
        ) from e
    tok = open_clip.get_tokenizer(model_name)
    return ClipHandle(
        model.eval(), clip_flavor(model), lambda texts: tok(texts), preprocess, preprocess, name=model_name
    )


def trainable_params(model: nn.Module, mode: str = "whole") -> list[str]:
    """Parameters full fine-tuning updates in ``mode``: the library's selection
    (:func:`select_names`, ``logit_scale`` excluded) restricted to parameters."""
    params = dict(model.named_parameters())
    return [n for n in select_names(model, mode) if n in params]


# ------------------------------------------------------------------ LoRA targets


def lora_modules(model: nn.Module, mode: str = "whole") -> list[str]:
    """LoRA module names of the 2-D attention / MLP projection weights within ``mode``'s towers
    (open_clip's fused ``attn.in_proj_weight`` -> module ``...attn.in_proj``)."""
    params = dict(model.named_parameters())
    return [
        lora_module_name(n) for n in trainable_params(model, mode) if params[n].dim() == 2 and _LORA_TARGET_RE.search(n)
    ]
