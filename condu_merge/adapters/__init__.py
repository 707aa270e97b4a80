"""Model-aware layers over the framework-agnostic core: CLIP full weights (:mod:`.clip`) and
PEFT LoRA adapters (:mod:`.lora`). Import the submodules directly; they need the ``clip`` /
``peft`` extras only when used with such models."""

from .clip import (
    MODES,
    ClipAdapterError,
    ClipExperts,
    clip_delta,
    clip_encode,
    clip_encoders,
    clip_features,
    clip_flavor,
    convert_names,
    functional_forward,
    hf_config_from_open_clip,
    hf_to_openclip,
    open_clip_from_hf_config,
    openclip_to_hf,
    pretrained_state,
    pristine_tensor,
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
    init_lora,
    lora_module_name,
    lora_param_name,
    lora_transform,
    lora_weights,
    peft_lora_parameters,
    record_init,
)

# everything imported above, and nothing else (the submodules stay reachable as .clip / .lora)
__all__ = sorted(n for n in dir() if not n.startswith("_") and n not in ("clip", "lora"))
