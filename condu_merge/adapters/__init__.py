"""Model-aware layers over the framework-agnostic core: CLIP full weights (:mod:`.clip`) and
PEFT LoRA adapters (:mod:`.lora`). Import the submodules directly; they need the ``clip`` /
``peft`` extras only when used with such models."""

from .clip import (
    MODES,
    ClipAdapterError,
    ClipExperts,
    clip_delta,
    clip_encoders,
    clip_flavor,
    convert_names,
    functional_forward,
    hf_config_from_open_clip,
    hf_to_openclip,
    openclip_to_hf,
    pretrained_state,
    select_names,
    swap_params,
)
from .lora import (
    ExportReport,
    LoraAdapter,
    LoraCompatibilityError,
    check_compatible,
    dense_delta,
    export_peft,
    factor_delta,
    factor_expert,
    record_init,
)

__all__ = [
    "ExportReport",
    "LoraAdapter",
    "LoraCompatibilityError",
    "check_compatible",
    "dense_delta",
    "export_peft",
    "factor_delta",
    "factor_expert",
    "record_init",
    "MODES",
    "ClipAdapterError",
    "ClipExperts",
    "clip_delta",
    "clip_encoders",
    "clip_flavor",
    "convert_names",
    "functional_forward",
    "hf_config_from_open_clip",
    "hf_to_openclip",
    "openclip_to_hf",
    "pretrained_state",
    "select_names",
    "swap_params",
]
