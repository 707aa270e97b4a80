"""CLIP loading (open_clip or Hugging Face, offline from a local path), feature functions that run
any expert through the one model with ``torch.func.functional_call`` (no per-expert model copies),
the trainable-parameter selection of the reference training, and the factor-wise LoRA of ConDU (LoRA).

The LoRA here is this benchmark's own minimal implementation (the library's adapter module is a
separate piece of work): each targeted weight ``W`` becomes ``W + (alpha / r) · B A`` inside the
functional call, ``A`` seeded-random and shared by every task, ``B`` zero. A task's "delta" is
``(A - A_0, B - 0)``, which ConDU unifies element-wise (the paper's ConDU (LoRA)).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Weights that the reference LoRA adapts: attention and MLP projections of every transformer block.
_LORA_TARGET_RE = re.compile(
    r"(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight"
    r"|self_attn\.(q|k|v|out)_proj\.weight|mlp\.fc[12]\.weight)$"
)
_FROZEN_RE = re.compile(r"(^|\.)logit_(scale|bias)$")


class ModelLoadError(RuntimeError):
    """The CLIP model could not be loaded (names the model and the path)."""


@dataclass
class ClipHandle:
    """A CLIP model plus how to tokenize, preprocess and encode with it (open_clip or HF)."""

    model: nn.Module
    family: str  # "open_clip" | "hf"
    tokenize: Callable[[list[str]], object]
    train_transform: Callable
    test_transform: Callable
    name: str = ""
    _wrapper: nn.Module | None = field(default=None, repr=False)

    # -------------------------------------------------------------- encoding
    def _wrap(self) -> nn.Module:
        if self._wrapper is None:
            self._wrapper = _Encoder(self.model, self.family)
        return self._wrapper

    def _call(self, kind: str, x, params: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        w = self._wrap()
        if not params:
            return w(kind, x)
        # keys of the wrapped model live under "m."; missing keys fall back to the module's own
        return torch.func.functional_call(w, {f"m.{k}": v for k, v in params.items()}, (kind, x), strict=False)

    def encode_image(self, images: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Image embeddings (not normalised), optionally with ``params`` replacing the model's."""
        return self._call("image", images, params)

    def encode_text(self, tokens, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self._call("text", tokens, params)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module, family: str):
        super().__init__()
        self.m = model
        self.family = family

    def forward(self, kind: str, x):
        if self.family == "open_clip":
            return self.m.encode_image(x) if kind == "image" else self.m.encode_text(x)
        if kind == "image":
            return self.m.visual_projection(self.m.vision_model(pixel_values=x).pooler_output)
        return self.m.text_projection(self.m.text_model(**x).pooler_output)


def tokens_to(tokens, device: torch.device):
    if isinstance(tokens, Mapping):
        return {k: v.to(device) for k, v in tokens.items()}
    return tokens.to(device)


def _hf_transforms(size: int):
    from torchvision import transforms as T

    norm = T.Normalize(OPENAI_MEAN, OPENAI_STD)
    rgb = T.Lambda(lambda im: im.convert("RGB"))
    test = T.Compose([rgb, T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(), norm])
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
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise ModelLoadError(f"cannot load Hugging Face CLIP from {path!r}: {e}") from e
        size = int(model.config.vision_config.image_size)
        ctx = int(model.config.text_config.max_position_embeddings)

        def tokenize(texts: list[str]):
            out = tok(texts, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")
            return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

        train_tf, test_tf = _hf_transforms(size)
        return ClipHandle(model.to(device).eval(), "hf", tokenize, train_tf, test_tf, name=model_name)
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot load open_clip {model_name!r} with pretrained={pretrained!r}: {e}. Offline, pass a local "
            "checkpoint file (e.g. open_clip_pytorch_model.bin or .safetensors) as --pretrained"
        ) from e
    tok = open_clip.get_tokenizer(model_name)
    return ClipHandle(model.eval(), "open_clip", lambda texts: tok(texts), preprocess, preprocess, name=model_name)


# ------------------------------------------------------------------ parameter selection

def trainable_names(model: nn.Module, mode: str = "whole") -> list[str]:
    """Parameters that full fine-tuning updates: ``whole`` (image + text), ``image`` or ``text``;
    ``logit_scale`` / ``logit_bias`` are always frozen and integer buffers never take part."""
    if mode not in ("whole", "image", "text"):
        raise ValueError(f"unknown train mode {mode!r}; choose whole, image or text")
    out = []
    for name, p in model.named_parameters():
        if not p.is_floating_point() or _FROZEN_RE.search(name):
            continue
        is_image = name.startswith(("visual.", "vision_model.", "visual_projection."))
        if mode == "image" and not is_image or mode == "text" and is_image:
            continue
        out.append(name)
    return out


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU float copy of every parameter and buffer (θ_0)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ LoRA (factor-wise)

@dataclass
class LoRAConfig:
    rank: int = 64
    alpha: float = 64.0
    targets: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def lora_targets(model: nn.Module, mode: str = "whole") -> list[str]:
    """The 2-D attention / MLP projection weights LoRA adapts (within ``mode``'s encoders)."""
    allowed = set(trainable_names(model, mode))
    return [n for n, p in model.named_parameters() if n in allowed and p.dim() == 2 and _LORA_TARGET_RE.search(n)]


def lora_init(model: nn.Module, cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """Shared initial factors: ``A`` Kaiming-uniform (a = √5, as PEFT) from ``cfg.seed``, ``B = 0``.
    Keys ``{weight}.lora_A`` ``[r, in]`` and ``{weight}.lora_B`` ``[out, r]``, float32 on CPU."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for name in cfg.targets:
        w = params[name]
        out_f, in_f = w.shape
        bound = math.sqrt(6.0 / ((1 + 5.0) * in_f))  # kaiming_uniform_(a=sqrt(5)) bound
        out[f"{name}.lora_A"] = (torch.rand(cfg.rank, in_f, generator=g) * 2 - 1) * bound
        out[f"{name}.lora_B"] = torch.zeros(out_f, cfg.rank)
    return out


def lora_params(model: nn.Module, factors: Mapping[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """``{W: W + scaling · B A}`` for every target (differentiable in the factors)."""
    params = dict(model.named_parameters())
    out = {}
    for name in cfg.targets:
        w = params[name]
        a = factors[f"{name}.lora_A"].to(w.device, w.dtype)
        b = factors[f"{name}.lora_B"].to(w.device, w.dtype)
        out[name] = w + cfg.scaling * (b @ a)
    return out
