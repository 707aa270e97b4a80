"""CLIP loading (open_clip or Hugging Face, offline from a local path) and the glue between the
training/evaluation loops and the library's adapters.

Everything model-specific comes from :mod:`condu_merge.adapters`: trainable-tensor selection
(:func:`~condu_merge.adapters.select_names`), encoders (:func:`~condu_merge.adapters.clip_encoders`),
differentiable expert forward passes (:func:`~condu_merge.adapters.functional_forward`), expert
application without copies (:func:`~condu_merge.adapters.swap_params`,
:class:`~condu_merge.adapters.ClipExperts`) and LoRA algebra (:class:`~condu_merge.adapters.LoraAdapter`,
:func:`~condu_merge.adapters.dense_delta`, :func:`~condu_merge.adapters.factor_expert`).

Two small pieces stay here because the library has no equivalent (see docs/mtil.md):

* creating the shared LoRA initialisation (``A`` Kaiming-uniform from a seed, ``B = 0``, as PEFT
  does) for arbitrary parameters -- the library reads/merges LoRA factors but never creates them;
* open_clip's fused attention weight ``attn.in_proj_weight`` is a parameter of
  ``nn.MultiheadAttention``, not a ``<module>.weight``: its LoRA "module" is named ``...attn.in_proj``
  and :func:`lora_param_name` maps the dense delta key back, and :class:`LoraExperts` applies
  factor-wise experts (:class:`~condu_merge.adapters.ClipExperts` applies full-weight deltas only).
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from condu_merge.adapters import (
    LoraAdapter,
    clip_encoders,
    clip_flavor,
    dense_delta,
    factor_expert,
    functional_forward,
    select_names,
    swap_params,
)

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
        :func:`functional_forward` so gradients reach the tensors in ``params`` (LoRA training)."""
        if params is None:
            enc_img, enc_txt = self.encoders()
            return enc_img(x) if kind == "image" else enc_txt(x)
        if self.flavor == "open_clip":
            return functional_forward(self.model, params, x, method="encode_image" if kind == "image" else "encode_text")
        if kind == "image":
            out = functional_forward(self.model, params, method="get_image_features", pixel_values=x)
        else:
            out = functional_forward(self.model, params, method="get_text_features", input_ids=x)
        # transformers 5 returns an output object from get_*_features, transformers 4 a tensor
        return out if torch.is_tensor(out) else out.pooler_output


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

        def tokenize(texts: list[str]) -> torch.Tensor:
            # ids only, as the library's HF encoders take them: CLIP's text tower is causal and pools
            # the first EOT token, so the padding after it never changes the features
            return tok(texts, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt")["input_ids"]

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
    return ClipHandle(model.eval(), clip_flavor(model), lambda texts: tok(texts), preprocess, preprocess, name=model_name)


def trainable_params(model: nn.Module, mode: str = "whole") -> list[str]:
    """Parameters full fine-tuning updates in ``mode``: the library's selection
    (:func:`select_names`, ``logit_scale`` excluded) restricted to parameters."""
    params = dict(model.named_parameters())
    return [n for n in select_names(model, mode) if n in params]


# ------------------------------------------------------------------ LoRA (factor-wise)

def lora_param_name(module: str) -> str:
    """The model parameter a LoRA module adapts: ``<module>.weight``, except open_clip's fused
    attention (module ``...attn.in_proj`` -> parameter ``...attn.in_proj_weight``)."""
    return module + "_weight" if module.endswith("attn.in_proj") else module + ".weight"


def lora_modules(model: nn.Module, mode: str = "whole") -> list[str]:
    """LoRA module names of the 2-D attention / MLP projection weights within ``mode``'s towers."""
    params = dict(model.named_parameters())
    out = []
    for n in trainable_params(model, mode):
        if params[n].dim() == 2 and _LORA_TARGET_RE.search(n):
            out.append(n[: -len("_weight")] if n.endswith("attn.in_proj_weight") else n[: -len(".weight")])
    return out


def new_lora_init(model: nn.Module, modules: list[str], *, rank: int, alpha: float, seed: int) -> LoraAdapter:
    """The shared initialisation every task starts from: ``A`` Kaiming-uniform (``a = √5``, as PEFT)
    drawn from ``seed``, ``B = 0`` (float32, CPU)."""
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m in modules:
        out_f, in_f = params[lora_param_name(m)].shape
        bound = math.sqrt(6.0 / ((1 + 5.0) * in_f))  # kaiming_uniform_(a=sqrt(5)) bound
        factors[m] = ((torch.rand(rank, in_f, generator=g) * 2 - 1) * bound, torch.zeros(out_f, rank))
    return LoraAdapter.from_factors(factors, r=rank, lora_alpha=alpha)


def lora_weights(model: nn.Module, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """``{W: W + s · B A}`` for every module of ``adapter`` (the library's :func:`dense_delta`),
    ``W`` read from ``model`` (θ_0). Differentiable in the factors; call it outside any swap."""
    params = dict(model.named_parameters())
    out = {}
    for key, d in dense_delta(adapter).items():
        name = lora_param_name(key[: -len(".weight")])
        w = params[name].detach()
        out[name] = w + d.to(w.device, w.dtype)
    return out


def adapter_to(adapter: LoraAdapter, device: torch.device) -> LoraAdapter:
    """The same adapter with its factors on ``device``."""
    return LoraAdapter(config=adapter.config, path=adapter.path, init_fingerprint=adapter.init_fingerprint,
                       factors={m: (a.to(device), b.to(device)) for m, (a, b) in adapter.factors.items()})


class LoraExperts:
    """Factor-wise ConDU (LoRA) experts of a store, applied to one model: expert ``t`` is
    ``init + δ̃_t`` (:func:`factor_expert`), applied as ``W + s · B A`` with :func:`swap_params`.

    Implements the :class:`condu_merge.routing.ExpertEncoders` protocol (task ``None`` is the
    pretrained model), like :class:`~condu_merge.adapters.ClipExperts` does for full weights.
    At most ``cache_size`` experts' weights are kept (LRU)."""

    def __init__(self, clip: ClipHandle, store: Any, init: LoraAdapter, *, backend: str = "auto", cache_size: int = 1):
        self.clip, self.store, self.init, self.backend = clip, store, init, backend
        self.cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    def params(self, task: str) -> dict[str, torch.Tensor]:
        if task in self._cache:
            self._cache.move_to_end(task)
            return self._cache[task]
        adapter = factor_expert(self.init, self.store.decouple(task, backend=self.backend))
        # W + s·B A in float32 even when called from inside an autocast region
        with torch.no_grad(), torch.autocast(device_type=self.clip.device.type, enabled=False):
            out = lora_weights(self.clip.model, adapter_to(adapter, self.clip.device))
        if self.cache_size:
            self._cache[task] = out
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    @contextmanager
    def applied(self, task: str | None) -> Iterator[nn.Module]:
        if task is None:
            yield self.clip.model
            return
        with swap_params(self.clip.model, self.params(task)):
            yield self.clip.model

    def encode_image(self, task: str | None, images: torch.Tensor) -> torch.Tensor:
        with self.applied(task):
            return self.clip.encode("image", images)

    def encode_text(self, task: str | None, tokens: torch.Tensor) -> torch.Tensor:
        with self.applied(task):
            return self.clip.encode("text", tokens)
