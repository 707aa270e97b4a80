"""ConDU, continual decoupling-unifying (seed 001: "Continual Decoupling-Unifying", code at
github.com/zhangzicong518/ConDU), wrapping :class:`condu_merge.ContinualMerger`.

Math: every task is fine-tuned from θ_0 (full weights or LoRA: either way the caller hands over
its delta ``d_t = θ_t − θ_0`` as a state dict, e.g. ``scale · B A`` per LoRA target weight).
Session ``t`` decouples the earlier experts ``δ̃_i = λ_i M_i ⊙ u`` and unifies them with ``d_t``::

    s_k = sign(Σ_{i<t} δ̃_ik + d_tk),  M_ik = [δ_ik s_k > 0],  u_k = s_k max_i M_ik |δ_ik|,
    λ_i = rescaler (see condu_merge.RESCALER_MODES)

computed without materialising the experts (:func:`condu_merge.add_task`). Inference with a
task id uses its expert θ_0 + λ_t M_t ⊙ u; without one, θ_0 + u. (The paper's prototype-weighted
aggregation of experts for unknown tasks acts on predictions, so it belongs to the evaluation
loop, which can call :meth:`expert` for each task.)

Stores: the unified delta ``u`` (one model, shared) plus, per task, a bit-packed mask (1 bit
per element) and its rescaler (8 bytes, or 8 per tensor in ``per_tensor`` mode).
"""

from __future__ import annotations

import torch

from ..merger import ContinualMerger
from ..trigger import TaskTrigger
from .base import ContinualStrategy, StorageReport, state_nbytes, tensor_nbytes


class ConDU(ContinualStrategy):
    """ConDU (FT or LoRA: the delta is a state dict either way)."""

    name = "condu"
    task_aware = True

    def __init__(self, base, *, rescaler: str = "tensor_mean", backend="auto", copy_base: bool = True):
        super().__init__(base, copy_base=copy_base)
        self.merger = ContinualMerger(rescaler, backend=backend)

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        self.merger.add_task(name, delta)  # commits only on success

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        return self.merger.unified

    def _expert_delta(self, name: str) -> dict[str, torch.Tensor]:
        return self.merger.decouple(name)

    def trigger(self, name: str) -> TaskTrigger:
        self._require(name)
        return self.merger.trigger(name)

    def _storage(self) -> StorageReport:
        shared = state_nbytes(self.merger.unified) if len(self.merger) else 0
        per = {}
        for tr in self.merger.triggers:
            masks = sum(tensor_nbytes(p) for p in tr.packed.values())  # uint8, ceil(N/8) bytes each
            resc = 8 * (len(tr.rescaler) if isinstance(tr.rescaler, dict) else 1)
            per[tr.task] = masks + resc
        return StorageReport(shared, per, "unified delta u (one model) + per task a 1-bit mask and its rescaler")
