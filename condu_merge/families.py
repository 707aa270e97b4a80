"""The default set of tensors that take part, per model family -- one rule for the CLI and the
Python adapters, so the same models give the same experts by either route.

* **CLIP** (open_clip or transformers ``CLIPModel`` names): every floating-point tensor of the
  two towers and their projections; ``logit_scale`` / ``logit_bias`` never take part (the
  reference training keeps the temperature of the pretrained model;
  :func:`condu_merge.adapters.clip.select_names` is the same rule).
* **PEFT LoRA adapters**: the adapter's own tensors (its factors, or ``s · B A`` with
  ``--lora dense``).
* **anything else**: every floating-point tensor the base and the fine-tuned checkpoint share.

Integer tensors (``position_ids``, ``num_batches_tracked``) never take part in any family.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["default_left_out", "family_of"]


def family_of(keys: Sequence[str]) -> str:
    """``"clip"`` for open_clip / transformers CLIP names (a ``logit_scale`` beside the towers), else ``"generic"``."""
    names = set(keys)
    if "logit_scale" not in names:
        return "generic"
    towers = ("vision_model.", "text_model.", "visual.", "transformer.", "token_embedding.")
    return "clip" if any(k.startswith(towers) for k in names) else "generic"


def default_left_out(keys: Sequence[str]) -> tuple[str, list[str]]:
    """``(family, names that family's default leaves out)`` among ``keys`` (floating-point
    tensor names of the base)."""
    fam = family_of(keys)
    if fam != "clip":
        return fam, []
    from .adapters.clip import clip_flavor, tower_of

    flavor = clip_flavor(keys)
    return fam, [k for k in keys if tower_of(k, flavor) is None]
