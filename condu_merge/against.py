"""What merging cost each task: the decoupled delta ``d̂ = λ M ⊙ u`` against the task's own delta
``d = θ_t − θ_0`` (``inspect --against``), per tensor group and over the whole model:

* relative L2 ``‖d̂ − d‖ / ‖d‖``;
* cosine ``⟨d̂, d⟩ / (‖d̂‖ ‖d‖)``;
* sign agreement: the fraction of the elements with ``d ≠ 0`` where ``sign d̂ = sign d`` (an
  element the mask drops, ``d̂ = 0``, disagrees).

Sums are float64, one tensor at a time. A tensor group is the name up to its first numeric
component (``transformer.h.0``, ``visual.transformer.resblocks.3``) or its first component
(``embed``, ``logit_scale``). For a store of LoRA factors, ``d`` is the adapter's factors minus
the store's init, compared factor by factor.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

__all__ = ["distance_to_finetuned", "tensor_group"]

_NUM = re.compile(r"^\d+$")


def tensor_group(name: str) -> str:
    """``transformer.h.0.attn.c_attn.weight`` -> ``transformer.h.0``; ``embed.weight`` -> ``embed``."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if _NUM.match(p):
            return ".".join(parts[: i + 1])
    return parts[0]


class _Acc:
    __slots__ = ("aa", "agree", "bb", "diff", "dot", "nonzero")

    def __init__(self) -> None:
        self.dot = self.aa = self.bb = self.diff = 0.0
        self.agree = self.nonzero = 0

    def add(self, dh: torch.Tensor, d: torch.Tensor) -> None:
        dh, d = dh.reshape(-1).to(torch.float64), d.reshape(-1).to(torch.float64)
        self.dot += float(dh @ d)
        self.aa += float(d @ d)
        self.bb += float(dh @ dh)
        self.diff += float(((dh - d) ** 2).sum())
        nz = d != 0
        self.nonzero += int(nz.sum())
        self.agree += int((torch.sign(dh[nz]) == torch.sign(d[nz])).sum())

    def result(self) -> dict[str, float | None]:
        return {
            "rel_l2": math.sqrt(self.diff / self.aa) if self.aa > 0 else None,
            "cosine": self.dot / math.sqrt(self.aa * self.bb) if self.aa > 0 and self.bb > 0 else None,
            "sign_agreement": self.agree / self.nonzero if self.nonzero else None,
        }


def _true_deltas(store, task: str, finetuned: str, base: str | None):
    """``key -> d`` (a function) and a closer, for the store's tensors."""
    from . import lora_store
    from .store import open_task_delta

    if lora_store.is_lora_store(store):
        from .adapters.lora import LoraAdapter

        ad = LoraAdapter.load(finetuned)
        src = store.task_info(task).get("source") or {}
        init = LoraAdapter.load(src["init"]["path"]) if src.get("init") else None

        def of(k: str) -> torch.Tensor:
            m, x = k[: -len(".lora_A.weight")], k[-len("A.weight")]
            t = ad.factors[m][0 if x == "A" else 1]
            return t - init.factors[m][0 if x == "A" else 1] if init is not None else t

        return of, lambda: None
    path = base or (store.manifest.get("base") or {}).get("path")
    if not path:
        raise ValueError(f"{store.root}: the store does not record its base; pass --base")
    td = open_task_delta(path, finetuned)
    return (lambda k: td.delta(k, torch.float32)), td.close


def distance_to_finetuned(
    store, task: str, finetuned: str | os.PathLike, *, base: str | None = None, backend: str = "auto"
) -> dict[str, Any]:
    """``{"task", "finetuned", "total": metrics, "groups": {group: metrics}}`` (see the module docstring)."""
    finetuned = os.fspath(finetuned)
    of, close = _true_deltas(store, task, finetuned, base)
    total, groups = _Acc(), dict[str, _Acc]()
    try:
        for k, dh in store.iter_decouple(task, backend=backend):
            d = of(k)
            if tuple(d.shape) != tuple(dh.shape):
                raise ValueError(
                    f"{finetuned}: tensor {k!r} has shape {tuple(d.shape)}, the store has {tuple(dh.shape)}"
                )
            total.add(dh, d)
            groups.setdefault(tensor_group(k), _Acc()).add(dh, d)
    finally:
        close()
    return {
        "task": task,
        "finetuned": os.path.abspath(finetuned),
        "total": total.result(),
        "groups": {g: a.result() for g, a in groups.items()},
    }
