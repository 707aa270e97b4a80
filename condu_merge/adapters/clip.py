"""CLIP full-weight adapter: which tensors take part, open_clip <-> Hugging Face names, and
applying a decoupled expert to a model without copying the model.

Two flavours are understood:

* ``"open_clip"``: :class:`open_clip.model.CLIP` (OpenAI-style names: ``visual.*``,
  ``transformer.resblocks.*``, ``token_embedding``, ``positional_embedding``, ``ln_final``,
  ``text_projection``, ``logit_scale``);
* ``"hf"``: :class:`transformers.CLIPModel` (``vision_model.*``, ``text_model.*``,
  ``visual_projection``, ``text_projection``, ``logit_scale``).

Training modes (as in the reference training): ``"whole"`` (both towers), ``"image"``
(the image tower and its projection), ``"text"`` (the text tower, token/position embeddings
and its projection). ``logit_scale`` (and ``logit_bias``) never take part; integer buffers
(``position_ids``, ``num_batches_tracked``) never take part; floating-point persistent
buffers of the selected tower (e.g. BatchNorm statistics of a ResNet tower) do.

Applying an expert ``θ_0 + δ̃`` never deep-copies the model: :func:`swap_params` swaps the
parameters' storage in place and restores it on exit, :func:`functional_forward` calls the model
through :func:`torch.func.functional_call`. :class:`ClipExperts` builds on both so that
evaluating ``K`` experts costs one model plus one expert's trainable tensors at a time.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..core import decouple as _decouple
from ..errors import ConduError, KeyMismatchError, ShapeMismatchError, UnknownTaskError
from ..trigger import TaskTrigger

__all__ = [
    "EXCLUDED_NAMES",
    "MODES",
    "ClipExperts",
    "clip_delta",
    "clip_encode",
    "clip_encoders",
    "clip_features",
    "clip_flavor",
    "functional_forward",
    "hf_config_from_open_clip",
    "hf_to_openclip",
    "open_clip_from_hf_config",
    "openclip_to_hf",
    "pretrained_state",
    "pristine_tensor",
    "select_names",
    "swap_params",
    "tower_of",
]

MODES = ("whole", "image", "text")
EXCLUDED_NAMES = ("logit_scale", "logit_bias")

StateLike = nn.Module | Mapping[str, torch.Tensor]
# a decoupled delta -> the full-weight delta (model names) that ClipExperts adds to θ_0
DeltaTransform = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


class ClipAdapterError(ConduError, ValueError):
    """A CLIP model or state dict cannot be handled as asked (unknown layout, unmappable key)."""


# ---------------------------------------------------------------------------- flavours and modes


def _keys_of(obj: StateLike | Sequence[str]) -> list[str]:
    if isinstance(obj, nn.Module):
        return list(obj.state_dict().keys())
    return list(obj.keys()) if isinstance(obj, Mapping) else list(obj)


def clip_flavor(obj: StateLike | Sequence[str]) -> str:
    """``"open_clip"`` or ``"hf"``, from a model, a state dict or a list of tensor names."""
    keys = _keys_of(obj)
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith(("visual.", "transformer.", "token_embedding.")) for k in keys):
        return "open_clip"
    raise ClipAdapterError(
        "cannot tell the CLIP flavour: expected open_clip names (visual.*, transformer.*) or "
        f"transformers CLIPModel names (vision_model.*, text_model.*); first keys: {keys[:5]}"
    )


def tower_of(name: str, flavor: str) -> str | None:
    """``"image"``, ``"text"``, or ``None`` for names that never take part (``logit_scale``)."""
    if name in EXCLUDED_NAMES:
        return None
    if flavor == "open_clip":
        return "image" if name.startswith("visual.") else "text"
    if flavor == "hf":
        if name.startswith(("vision_model.", "visual_projection.")):
            return "image"
        if name.startswith(("text_model.", "text_projection.")):
            return "text"
        return None
    raise ValueError(f"unknown CLIP flavour {flavor!r}; use 'open_clip' or 'hf'")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; choose one of {MODES}")


def select_names(obj: StateLike, mode: str = "whole", *, flavor: str | None = None) -> list[str]:
    """Names of the tensors that take part in ``mode``: floating-point entries of the state dict
    (parameters and persistent float buffers) of the selected tower(s), minus ``logit_scale``.
    Integer buffers never take part. For a model, only ``requires_grad``-agnostic structure counts:
    the selection is what the reference training would optimise for that mode."""
    _check_mode(mode)
    flavor = flavor or clip_flavor(obj)
    sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
    out = []
    for name, t in sd.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        tower = tower_of(name, flavor)
        if tower is None:
            continue
        if mode == "whole" or mode == tower:
            out.append(name)
    return out


def pretrained_state(model: StateLike, mode: str = "whole") -> dict[str, torch.Tensor]:
    """Detached copies of the tensors taking part in ``mode`` (``θ_0``; keep it before fine-tuning)."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: sd[k].detach().clone() for k in select_names(model, mode)}


def clip_delta(
    pretrained: StateLike, finetuned: StateLike, mode: str = "whole", *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``θ_t − θ_0`` over the tensors taking part in ``mode`` (names of ``finetuned``'s flavour).

    ``pretrained`` may hold only the selected tensors (e.g. from :func:`pretrained_state`).
    The subtraction runs in float32 or wider; the result has ``dtype`` or the fine-tuned dtype.
    """
    ft = finetuned.state_dict() if isinstance(finetuned, nn.Module) else finetuned
    base = pretrained.state_dict() if isinstance(pretrained, nn.Module) else pretrained
    out: dict[str, torch.Tensor] = {}
    for k in select_names(finetuned, mode):
        if k not in base:
            raise KeyMismatchError(f"the pretrained state lacks tensor {k!r} (mode {mode!r})")
        f, b = ft[k].detach(), base[k].detach()
        if tuple(f.shape) != tuple(b.shape):
            raise ShapeMismatchError(f"tensor {k!r}: pretrained shape {tuple(b.shape)} vs fine-tuned {tuple(f.shape)}")
        wide = torch.promote_types(torch.promote_types(f.dtype, b.dtype), torch.float32)
        out[k] = (f.to(wide) - b.to(f.device).to(wide)).to(dtype or f.dtype)
    return out


# ---------------------------------------------------------------------------- name mapping

# per transformer block: open_clip suffix -> HF suffix (same tensor, same layout)
_BLOCK_SAME = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# open_clip fuses q, k, v along dim 0 of in_proj_{weight,bias}, in that order
_BLOCK_QKV = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_TOP_SAME = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# open_clip stores projections as x @ P ([width, embed]); HF as Linear weights ([embed, width])
_TOP_T = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_TOWERS = (
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
)
_OC_BLOCK = re.compile(r"^(visual\.transformer\.resblocks\.|transformer\.resblocks\.)(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^(vision_model\.encoder\.layers\.|text_model\.encoder\.layers\.)(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")


def openclip_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape where the layouts differ) open_clip CLIP tensors to ``transformers``
    ``CLIPModel`` names. Works on full state dicts and on deltas (every step is linear):
    ``in_proj_{weight,bias}`` is split into ``q/k/v_proj`` (rows ``[0:w]``, ``[w:2w]``, ``[2w:3w]``),
    ``visual.proj`` / ``text_projection`` are transposed. A key with no HF equivalent
    (layer scale, attention pooler, …) raises :class:`ClipAdapterError` naming it."""
    out: dict[str, torch.Tensor] = {}
    hf_tower = dict(_TOWERS)
    for k, t in state.items():
        if k in _TOP_SAME:
            out[_TOP_SAME[k]] = t
            continue
        if k in _TOP_T:
            out[_TOP_T[k]] = t.t().contiguous()
            continue
        m = _OC_BLOCK.match(k)
        if m is not None:
            prefix, idx, rest = m.groups()
            new_prefix = f"{hf_tower[prefix]}{idx}."
            if rest in _BLOCK_SAME:
                out[new_prefix + _BLOCK_SAME[rest]] = t
                continue
            if rest in _BLOCK_QKV:
                if t.shape[0] % 3:
                    raise ClipAdapterError(
                        f"open_clip tensor {k!r} has {t.shape[0]} rows, not a multiple of 3 (q, k, v)"
                    )
                kind = _BLOCK_QKV[rest]
                for name, part in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{new_prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
        raise ClipAdapterError(
            f"open_clip tensor {k!r} has no transformers CLIPModel equivalent; only the plain "
            "OpenAI-style ViT CLIP architecture maps (no layer scale, attention pooler, custom towers)"
        )
    return out


def hf_to_openclip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`openclip_to_hf`: ``q/k/v_proj`` are concatenated into ``in_proj_*``
    (all three must be present), projections transposed back. Integer ``position_ids`` buffers
    are dropped (open_clip has none)."""
    inv_same = {v: k for k, v in _TOP_SAME.items()}
    inv_t = {v: k for k, v in _TOP_T.items()}
    inv_block = {v: k for k, v in _BLOCK_SAME.items()}
    oc_tower = {hf: oc for oc, hf in _TOWERS}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, t in state.items():
        if k.endswith("embeddings.position_ids") and not t.is_floating_point():
            continue
        if k in inv_same:
            out[inv_same[k]] = t
            continue
        if k in inv_t:
            out[inv_t[k]] = t.t().contiguous()
            continue
        m = _HF_BLOCK.match(k)
        if m is not None:
            prefix, idx, rest = m.groups()
            new_prefix = f"{oc_tower[prefix]}{idx}."
            if rest in inv_block:
                out[new_prefix + inv_block[rest]] = t
                continue
            q = _HF_QKV.match(rest)
            if q is not None:
                which, kind = q.groups()
                qkv.setdefault((new_prefix, kind), {})[which] = t
                continue
        raise ClipAdapterError(f"transformers CLIPModel tensor {k!r} has no open_clip equivalent")
    for (prefix, kind), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise KeyMismatchError(
                f"cannot fuse {prefix}attn.in_proj_{kind}: the HF state lacks "
                + ", ".join(f"self_attn.{p}_proj.{kind}" for p in missing)
            )
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def convert_names(state: Mapping[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    """Convert ``state`` from flavour ``source`` to ``target`` (identity when they are equal)."""
    if source == target:
        return dict(state)
    if (source, target) == ("open_clip", "hf"):
        return openclip_to_hf(state)
    if (source, target) == ("hf", "open_clip"):
        return hf_to_openclip(state)
    raise ValueError(f"cannot convert CLIP names from {source!r} to {target!r}")


def hf_config_from_open_clip(model: nn.Module) -> Any:
    """A ``transformers.CLIPConfig`` whose ``CLIPModel`` computes the same function as the
    open_clip ``model`` once :func:`openclip_to_hf` weights are loaded.

    The text pooling of open_clip takes the token with the highest id (OpenAI's tokenizer puts
    EOT = the largest id last); the config sets ``eos_token_id = vocab_size - 1`` so that HF picks
    the first EOT, which is the same token whenever EOT is the largest id, as in CLIP's vocabulary.
    """
    from transformers import CLIPConfig

    v = model.visual
    problems = []
    if not hasattr(v, "conv1") or not hasattr(v, "transformer"):
        problems.append("image tower is not a plain ViT")
    if getattr(v, "attn_pool", None) is not None or getattr(v, "pool_type", "tok") != "tok":
        problems.append("image pooling is not the class token")
    if getattr(v, "final_ln_after_pool", False) or getattr(model, "text_pool_type", "argmax") != "argmax":
        problems.append("pooling/LayerNorm order differs from CLIP")
    if getattr(model, "text_projection", None) is None or not isinstance(model.text_projection, nn.Parameter):
        problems.append("text projection is not a plain matrix")
    if problems:
        raise ClipAdapterError("open_clip model has no transformers CLIPModel equivalent: " + "; ".join(problems))
    vb, tb = v.transformer.resblocks[0], model.transformer.resblocks[0]

    def act(block: nn.Module) -> str:
        g = block.mlp.gelu
        if type(g).__name__ == "QuickGELU":
            return "quick_gelu"
        if isinstance(g, nn.GELU) and g.approximate == "none":
            return "gelu"
        raise ClipAdapterError(f"open_clip MLP activation {type(g).__name__} has no CLIPConfig equivalent")

    width_v = v.conv1.out_channels
    vocab = model.token_embedding.num_embeddings
    return CLIPConfig(
        projection_dim=int(model.text_projection.shape[1]),
        vision_config=dict(
            hidden_size=width_v,
            intermediate_size=vb.mlp.c_fc.out_features,
            num_attention_heads=vb.attn.num_heads,
            num_hidden_layers=len(v.transformer.resblocks),
            image_size=int(v.image_size[0]) if isinstance(v.image_size, (tuple, list)) else int(v.image_size),
            patch_size=int(v.conv1.kernel_size[0]),
            hidden_act=act(vb),
            layer_norm_eps=vb.ln_1.eps,
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=model.token_embedding.embedding_dim,
            intermediate_size=tb.mlp.c_fc.out_features,
            num_attention_heads=tb.attn.num_heads,
            num_hidden_layers=len(model.transformer.resblocks),
            max_position_embeddings=int(model.positional_embedding.shape[0]),
            hidden_act=act(tb),
            layer_norm_eps=tb.ln_1.eps,
            eos_token_id=vocab - 1,
            bos_token_id=max(vocab - 2, 0),
        ),
    )


def open_clip_from_hf_config(config: Any, **overrides: Any) -> nn.Module:
    """An ``open_clip.model.CLIP`` that computes the same function as ``transformers.CLIPModel(config)``
    once :func:`hf_to_openclip` weights are loaded (the inverse of :func:`hf_config_from_open_clip`).

    The exact call it makes (for a ``CLIPConfig`` ``c``, vision ``v`` = ``c.vision_config``,
    text ``t`` = ``c.text_config``)::

        CLIP(embed_dim=c.projection_dim,
             vision_cfg=CLIPVisionCfg(layers=v.num_hidden_layers, width=v.hidden_size,
                                      head_width=v.hidden_size // v.num_attention_heads,
                                      mlp_ratio=v.intermediate_size / v.hidden_size,
                                      patch_size=v.patch_size, image_size=v.image_size),
             text_cfg=CLIPTextCfg(context_length=t.max_position_embeddings, vocab_size=t.vocab_size,
                                  width=t.hidden_size, heads=t.num_attention_heads, layers=t.num_hidden_layers,
                                  mlp_ratio=t.intermediate_size / t.hidden_size),
             quick_gelu=(hidden_act == "quick_gelu"))

    ``quick_gelu`` is the trap: OpenAI's CLIP (and every HF ``openai/clip-*`` config) uses
    QuickGELU, open_clip's default is exact GELU, and the outputs then differ. Refused with
    :class:`ClipAdapterError`: towers with different activations, an activation other than
    ``gelu``/``quick_gelu``, a LayerNorm eps other than open_clip's 1e-5. Text pooling: open_clip
    takes the highest token id (EOT in CLIP's vocabulary); HF takes the first ``eos_token_id``
    (or the highest id for the legacy ``eos_token_id == 2``); they agree when EOT is the largest id.
    ``overrides`` go to ``CLIP(...)`` (e.g. ``cast_dtype``)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    v, t = config.vision_config, config.text_config
    acts = {v.hidden_act, t.hidden_act}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise ClipAdapterError(
            f"CLIPConfig activations vision={v.hidden_act!r} text={t.hidden_act!r}: open_clip needs one of "
            "'gelu' / 'quick_gelu' for both towers"
        )
    for name, cfg in (("vision", v), ("text", t)):
        if abs(float(cfg.layer_norm_eps) - 1e-5) > 1e-12:
            raise ClipAdapterError(
                f"CLIPConfig {name} layer_norm_eps={cfg.layer_norm_eps}: open_clip's LayerNorm uses 1e-5"
            )
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ClipAdapterError(f"CLIPConfig {name}: hidden_size {cfg.hidden_size} is not a multiple of the heads")
    return CLIP(
        embed_dim=int(config.projection_dim),
        vision_cfg=CLIPVisionCfg(
            layers=v.num_hidden_layers,
            width=v.hidden_size,
            head_width=v.hidden_size // v.num_attention_heads,
            mlp_ratio=v.intermediate_size / v.hidden_size,
            patch_size=v.patch_size,
            image_size=v.image_size,
        ),
        text_cfg=CLIPTextCfg(
            context_length=t.max_position_embeddings,
            vocab_size=t.vocab_size,
            width=t.hidden_size,
            heads=t.num_attention_heads,
            layers=t.num_hidden_layers,
            mlp_ratio=t.intermediate_size / t.hidden_size,
        ),
        quick_gelu=acts == {"quick_gelu"},
        **overrides,
    )


# ---------------------------------------------------------------------------- applying experts


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        raise KeyMismatchError(f"the model has no submodule {mod_name!r} (for tensor {name!r})") from None
    if attr not in mod._parameters and attr not in mod._buffers:
        raise KeyMismatchError(f"the model has no parameter or buffer {name!r}")
    return mod, attr


def _tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer object ``name`` of ``model`` (``KeyMismatchError`` if none)."""
    mod, attr = _resolve(model, name)
    return mod._parameters[attr] if attr in mod._parameters else mod._buffers[attr]


# attribute set on a tensor object while swap_params has replaced its storage: the storage it
# had before the outermost swap (θ_0), so experts built inside a swap still start from θ_0
_PRISTINE_ATTR = "_condu_pristine_data"


def pristine_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """``model``'s tensor ``name`` as it is outside any :func:`swap_params` block (detached):
    the original values even while an expert is swapped in."""
    cur = _tensor_of(model, name)
    return getattr(cur, _PRISTINE_ATTR, cur).detach()


@contextmanager
def swap_params(model: nn.Module, params: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Within the block, ``model``'s tensors named in ``params`` hold those values; on exit (even
    on error) the original storage is put back, bit for bit. Nothing is copied except a cast when
    a value's dtype/device differs from the model's; ``nn.Parameter`` objects keep their identity
    (``.data`` is swapped), so hooks and optimisers are unaffected. Blocks nest; the values from
    before the outermost block stay readable with :func:`pristine_tensor`. Not thread-safe: one
    model, one expert at a time."""
    saved: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    try:
        for name, value in params.items():
            cur = _tensor_of(model, name)
            if tuple(value.shape) != tuple(cur.shape):
                raise ShapeMismatchError(
                    f"tensor {name!r}: model has shape {tuple(cur.shape)}, the expert {tuple(value.shape)}"
                )
            outermost = not hasattr(cur, _PRISTINE_ATTR)
            saved.append((cur, cur.data, outermost))
            if outermost:
                setattr(cur, _PRISTINE_ATTR, cur.data)
            cur.data = value.detach().to(device=cur.device, dtype=cur.dtype)
        yield model
    finally:
        for cur, data, outermost in reversed(saved):
            cur.data = data
            if outermost:
                delattr(cur, _PRISTINE_ATTR)


class _Method(nn.Module):
    """Calls ``getattr(inner, method)``; lets :func:`torch.func.functional_call` reach methods
    other than ``forward`` (``encode_image``, ``get_text_features`` …)."""

    def __init__(self, inner: nn.Module, method: str):
        super().__init__()
        self.inner = inner
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, self.method)(*args, **kwargs)


def functional_forward(
    model: nn.Module, params: Mapping[str, torch.Tensor], *args: Any, method: str = "forward", **kwargs: Any
) -> Any:
    """``model.<method>(*args, **kwargs)`` computed with ``params`` in place of the named tensors,
    via :func:`torch.func.functional_call` (the model itself is not modified; others keep theirs).
    Every name must be a parameter or buffer of ``model`` with that shape (``functional_call``
    would silently ignore a misspelt name)."""
    for name, value in params.items():
        cur = _tensor_of(model, name)
        if tuple(value.shape) != tuple(cur.shape):
            raise ShapeMismatchError(
                f"tensor {name!r}: model has shape {tuple(cur.shape)}, the given value {tuple(value.shape)}"
            )
    if method == "forward":
        return torch.func.functional_call(model, dict(params), args, kwargs)
    wrapper = _Method(model, method)
    return torch.func.functional_call(wrapper, {f"inner.{k}": v for k, v in params.items()}, args, kwargs)


def clip_features(out: Any) -> torch.Tensor:
    """The feature tensor of a CLIP ``get_image_features`` / ``get_text_features`` /
    ``encode_*`` result: the tensor itself, or its ``pooler_output`` (transformers 5 returns an
    output object from ``get_*_features``, transformers 4 and open_clip a tensor)."""
    if torch.is_tensor(out):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise ClipAdapterError(f"cannot read features from a {type(out).__name__}")
    return pooled


_features = clip_features  # the module's earlier private name


def clip_encode(
    model: nn.Module, kind: str, x: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Unnormalised ``kind="image"`` (pixels) or ``kind="text"`` (token ids ``[N, L]``) features of
    a CLIP model of either flavour. With ``params`` the forward pass runs through
    :func:`functional_forward` with those tensors in place of the model's, so gradients reach
    them (e.g. LoRA training with :func:`condu_merge.adapters.lora_weights`); the model itself
    is not modified."""
    if kind not in ("image", "text"):
        raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
    hf = clip_flavor(model) == "hf"
    if params is None:
        enc_img, enc_txt = clip_encoders(model)
        return enc_img(x) if kind == "image" else enc_txt(x)
    if not hf:
        return functional_forward(model, params, x, method="encode_image" if kind == "image" else "encode_text")
    if kind == "image":
        return clip_features(functional_forward(model, params, method="get_image_features", pixel_values=x))
    return clip_features(functional_forward(model, params, method="get_text_features", input_ids=x))


class ClipExperts:
    """Experts ``θ_0 + λ_t M_t ⊙ u`` of a ConDU session, applied to one CLIP model on demand.

    ``model`` must hold the pretrained weights ``θ_0`` for every merged tensor (they are read from
    it, so no copy of the base is kept). ``unified``/``triggers`` come from a
    :class:`~condu_merge.ContinualMerger` (pass ``merger.unified, merger.triggers``) or a store;
    their names may be of the other flavour: they are converted per expert with
    :func:`openclip_to_hf` / :func:`hf_to_openclip`. :meth:`from_merger` and :meth:`from_store`
    build it from a merger or a persistent store (read lazily). At most ``cache_size`` reconstructed experts
    are kept (LRU): memory for ``K`` experts is one model plus ``cache_size`` experts' trained
    tensors, never ``K`` models. Task ``None`` means the pretrained model.
    """

    def __init__(
        self,
        model: nn.Module,
        unified: Mapping[str, torch.Tensor],
        triggers: Sequence[TaskTrigger],
        *,
        backend: str = "auto",
        cache_size: int = 1,
    ):
        triggers_by_task = {t.task: t for t in triggers}
        if None in triggers_by_task:
            raise ValueError("every trigger needs a task name to be addressed by ClipExperts")
        tasks = list(triggers_by_task)
        self._init(
            model,
            lambda: tasks,
            list(unified.keys()),
            lambda task: _decouple(unified, triggers_by_task[task], backend=backend),
            cache_size,
        )

    @classmethod
    def from_merger(
        cls, model: nn.Module, merger: Any, *, cache_size: int = 1, transform: DeltaTransform | None = None
    ) -> ClipExperts:
        """Experts of an in-memory :class:`~condu_merge.ContinualMerger` (``transform``: as in
        :meth:`from_store`)."""
        self = cls.__new__(cls)
        self._init(
            model,
            lambda: merger.task_names,
            list(merger.unified.keys()),
            merger.decouple,
            cache_size,
            transform,
            version=lambda: merger.generation,
        )
        return self

    @classmethod
    def from_store(
        cls,
        model: nn.Module,
        store: Any,
        *,
        backend: str = "auto",
        cache_size: int = 1,
        transform: DeltaTransform | None = None,
    ) -> ClipExperts:
        """Experts of a :class:`condu_merge.store.Store`, read lazily (``u`` and one task's masks,
        tensor by tensor) when an expert is first needed.

        ``transform`` maps a decoupled delta ``δ̃_t`` to the full-weight delta added to the
        model's tensors (same flavour as the model), for stores that hold something other than
        weight deltas: e.g. :func:`condu_merge.adapters.lora_transform` turns factor-wise LoRA
        deltas into ``s · B A`` per adapted weight, so expert ``t`` is ``W + s · B_t A_t``."""
        self = cls.__new__(cls)
        self._init(
            model,
            lambda: store.task_names,
            store.keys,
            lambda task: dict(store.iter_decouple(task, backend=backend)),
            cache_size,
            transform,
            version=lambda: store.generation,
        )
        return self

    def _init(
        self,
        model: nn.Module,
        tasks_fn: Callable[[], Sequence[str]],
        names: Sequence[str],
        decouple_fn: Callable[[str], Mapping[str, torch.Tensor]],
        cache_size: int,
        transform: DeltaTransform | None = None,
        version: Callable[[], object] | None = None,
    ) -> None:
        self.model = model
        self.flavor = clip_flavor(model)
        # a merger or store that gains a task changes every expert: the task list and the cache
        # follow its generation instead of being a snapshot taken here
        self._tasks_fn = tasks_fn
        self._version_fn = version or (lambda: None)
        self._version = self._version_fn()
        self._tasks = list(tasks_fn())
        if transform is None:
            self.source_flavor = clip_flavor(names) if names else self.flavor
            self._decouple_fn = decouple_fn
        else:
            # the transform speaks the model's names: no flavour conversion afterwards
            self.source_flavor = self.flavor
            self._decouple_fn = lambda task: transform(decouple_fn(task))
        self.cache_size = max(0, int(cache_size))
        self._cache: MutableMapping[str, dict[str, torch.Tensor]] = OrderedDict()

    def _refresh(self) -> None:
        v = self._version_fn()
        if v != self._version:
            self._cache.clear()
            self._tasks = list(self._tasks_fn())
            self._version = v

    @property
    def tasks(self) -> list[str]:
        self._refresh()
        return list(self._tasks)

    def params(self, task: str) -> dict[str, torch.Tensor]:
        """The expert's tensors ``θ_0 + δ̃`` in the model's names and dtypes (cached, LRU; the
        cache is dropped when the merger or store it reads from commits a new session)."""
        self._refresh()
        if task in self._cache:
            self._cache.move_to_end(task)  # type: ignore[attr-defined]
            return self._cache[task]
        if task not in self._tasks:
            raise UnknownTaskError(f"no expert for task {task!r}; tasks: {self.tasks}")
        delta = self._decouple_fn(task)
        delta = convert_names(delta, self.source_flavor, self.flavor)
        out = {}
        for k, d in delta.items():
            try:
                # θ_0 even when called while another expert is swapped in
                b = pristine_tensor(self.model, k)
            except KeyMismatchError:
                raise KeyMismatchError(f"expert {task!r}: the model has no tensor {k!r}") from None
            # one rounding to the model's dtype: θ_0 + δ̃ is summed in float32 or wider
            wide = torch.promote_types(torch.promote_types(b.dtype, d.dtype), torch.float32)
            out[k] = (b.to(wide) + d.to(device=b.device, dtype=wide)).to(b.dtype)
        if self.cache_size:
            self._cache[task] = out
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)  # type: ignore[call-arg]
        return out

    @contextmanager
    def applied(self, task: str | None) -> Iterator[nn.Module]:
        """The model with expert ``task`` swapped in (``None``: unchanged), restored on exit."""
        if task is None:
            yield self.model
            return
        with swap_params(self.model, self.params(task)):
            yield self.model

    def encode_image(self, task: str | None, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features of expert ``task`` (``None``: pretrained)."""
        with self.applied(task) as m:
            if self.flavor == "hf":
                return _features(m.get_image_features(pixel_values=images))
            return m.encode_image(images)

    def encode_text(self, task: str | None, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features of expert ``task`` (``None``: pretrained)."""
        with self.applied(task) as m:
            if self.flavor == "hf":
                return _features(m.get_text_features(input_ids=tokens))
            return m.encode_text(tokens)


def clip_encoders(
    model: nn.Module,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``(encode_image, encode_text)`` callables of a plain CLIP model of either flavour."""
    if clip_flavor(model) == "hf":
        return (
            lambda x: _features(model.get_image_features(pixel_values=x)),
            lambda t: _features(model.get_text_features(input_ids=t)),
        )
    return model.encode_image, model.encode_text
