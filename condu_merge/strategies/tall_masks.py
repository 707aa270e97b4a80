"""TALL masks and consensus merging (Wang, Dimitriadis, Ortiz-Jiménez, Fleuret, Frossard,
"Localizing Task Information for Improved Model Merging and Compression", ICML 2024,
arXiv:2405.07813), restated from github.com/nik-dim/tall_masks (``src/utils/tallmask_utils.py``:
``generate_task_masks``, ``construct_consensus_mask``; ``src/eval/aggregation.py``) and fusion_bench
``fusion_bench/method/tall_mask/task_arithmetic.py``.

Math, with task vectors ``τ_t = θ_t − θ_0`` (every task fine-tuned from θ_0) and the multi-task
vector of task arithmetic ``τ_MTL = Σ_t τ_t`` (the repository's ``"sum"`` with ``k: 100``, no trim)::

    m_t = [ |θ_0 − θ_t| > λ · |θ_MTL − θ_t| ] = [ |τ_t| > λ · |τ_MTL − τ_t| ]     (TALL mask, strict >)
    expert_t = θ_0 + m_t ⊙ τ_MTL                                                    (coefficient 1)
    consensus:  c = [ Σ_t m_t ≥ k ],   θ = θ_0 + s · (c ⊙ τ_MTL)

``λ`` (``tall_lambda``) = 0.6, fusion_bench's ``config/method/tall_mask/task_arithmetic.yaml``
(``tall_mask_lambda: 0.6``); the repository instead picks, per task, the λ of
{0.2, 0.3, 0.4, 0.5, 0.6} best on that task's validation data (``construct_tall_mask``,
``find_optimal_mask``), which needs data, so here λ is one option. ``k`` (``consensus_k``) = 2,
the repository's ``config/method/consensus.yaml`` (``prun_thre_k: 2``: drops "catastrophic"
(k<1) and "selfish" (k<2) weights). ``s`` (``scale``) = 0.3, task arithmetic's usual value; the
repository chooses it on validation data. :meth:`model_for_inference` without a task is the
consensus model; with a task, that task's TALL expert (``task_aware``). Rounding: the code
compares absolute fp32 weights; we compare float64 deltas.

Continual use: ``τ_MTL`` is a running sum, but every earlier mask depends on it.
``keep_task_vectors=True`` (default) keeps each τ_t and recomputes every mask exactly whenever a
task is added — the paper's rule for the tasks so far, not O(1). ``keep_task_vectors=False`` is
our continual variant (O(1) models + 1 bit per element per task, as ConDU): an earlier task's
mask is recomputed from its reconstructed expert ``τ̂_i = m_i ⊙ τ_MTL^{old}`` in place of τ_i
(``τ_MTL`` itself stays exact); after one task, or with every mask recomputed at once, both agree.

Stores: ``τ_MTL`` (one model, float32 or wider) and, per task, its mask bit-packed
(:mod:`condu_merge.packing`, ``⌈N/8⌉`` bytes per tensor) plus, with ``keep_task_vectors``,
its task vector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..errors import FormatError, MergeInputError
from ..packing import pack_mask, pad_bits_clear, unpack_mask
from .base import ContinualStrategy, StorageReport, state_nbytes, tensor_nbytes
from .rule import Slot, TensorRule, register_rule, validate_like, wide


def tall_mask(tau: torch.Tensor, mtl: torch.Tensor, tall_lambda: float) -> torch.Tensor:
    """``|τ| > λ |τ_MTL − τ|`` (bool, compared in float64)."""
    t = tau.to(torch.float64)
    return t.abs() > tall_lambda * (mtl.to(torch.float64) - t).abs()


def consensus_mask(masks: list[torch.Tensor], k: int) -> torch.Tensor:
    """``Σ_t m_t ≥ k``: the elements at least ``k`` tasks' masks keep."""
    count = torch.zeros(masks[0].shape, dtype=torch.int64, device=masks[0].device)
    for m in masks:
        count += m
    return count >= k


class TALLMasks(ContinualStrategy):
    """TALL masks (task-aware experts) and consensus merging (the task-agnostic model)."""

    name = "tall_masks"
    task_aware = True
    continual = False  # by default; an instance with keep_task_vectors=False is continual

    def __init__(
        self,
        base,
        *,
        tall_lambda: float = 0.6,
        consensus_k: int = 2,
        scale: float = 0.3,
        keep_task_vectors: bool = True,
        copy_base: bool = True,
    ):
        super().__init__(base, copy_base=copy_base)
        if not float(tall_lambda) >= 0.0:
            raise ValueError(f"tall_lambda must be >= 0, got {tall_lambda}")
        if int(consensus_k) != consensus_k or consensus_k < 0:
            raise ValueError(
                f"consensus_k (tasks that must keep an element) must be an integer >= 0, got {consensus_k}"
            )
        self.tall_lambda = float(tall_lambda)
        self.consensus_k = int(consensus_k)
        self.scale = float(scale)
        self.keep_task_vectors = bool(keep_task_vectors)
        self.continual = not self.keep_task_vectors  # type: ignore[misc]  # per instance: depends on keep_task_vectors
        self._mtl: dict[str, torch.Tensor] | None = None
        self._masks: dict[str, dict[str, torch.Tensor]] = {}  # task → key → packed uint8
        self._taus: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ state
    def _dtype(self, key: str) -> torch.dtype:
        return torch.promote_types(self._base[key].dtype, torch.float32)

    def mask(self, name: str) -> dict[str, torch.Tensor]:
        """Task ``name``'s TALL mask (bool, keyed like ``base``)."""
        self._require(name)
        return {k: unpack_mask(p, shape=self._base[k].shape) for k, p in self._masks[name].items()}

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        masks: dict[str, dict[str, torch.Tensor]] = {t: {} for t in [*self._tasks, name]}
        mtl: dict[str, torch.Tensor] = {}
        for k, tau in delta.items():  # tensor by tensor: every task's mask of this tensor
            old = self._mtl[k] if self._mtl is not None else None
            new = (old.to(torch.float64) if old is not None else 0.0) + tau.to(torch.float64)
            for t in self._tasks:
                if self.keep_task_vectors:
                    prev_tau = self._taus[t][k]
                else:  # the expert it serves now stands in for its task vector
                    assert old is not None
                    prev_tau = torch.where(unpack_mask(self._masks[t][k], shape=tau.shape), old.to(torch.float64), 0.0)
                masks[t][k] = pack_mask(tall_mask(prev_tau, new, self.tall_lambda))
            masks[name][k] = pack_mask(tall_mask(tau, new, self.tall_lambda))
            mtl[k] = new.to(self._dtype(k))
        self._mtl, self._masks = mtl, masks
        if self.keep_task_vectors:
            self._taus[name] = delta

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        assert self._mtl is not None
        out = {}
        for k, v in self._mtl.items():
            c = consensus_mask([unpack_mask(self._masks[t][k], shape=v.shape) for t in self._tasks], self.consensus_k)
            out[k] = (torch.where(c, v.to(torch.float64), 0.0) * self.scale).to(self._base[k].dtype)
        return out

    def _expert_delta(self, name: str) -> dict[str, torch.Tensor]:
        assert self._mtl is not None
        return {
            k: torch.where(unpack_mask(self._masks[name][k], shape=v.shape), v.to(torch.float64), 0.0).to(
                self._base[k].dtype
            )
            for k, v in self._mtl.items()
        }

    # ------------------------------------------------------------------ persistence
    def _options(self) -> dict:
        return {
            "tall_lambda": self.tall_lambda,
            "consensus_k": self.consensus_k,
            "scale": self.scale,
            "keep_task_vectors": self.keep_task_vectors,
        }

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``mtl/<key>`` (τ_MTL), ``mask/<task index>/<key>`` (packed uint8) and, with
        ``keep_task_vectors``, ``tau/<task index>/<key>``."""
        if self._mtl is None:
            return {}
        out = {f"mtl/{k}": v for k, v in self._mtl.items()}
        for i, t in enumerate(self._tasks):
            out.update({f"mask/{i}/{k}": p for k, p in self._masks[t].items()})
            if self.keep_task_vectors:
                out.update({f"tau/{i}/{k}": v for k, v in self._taus[t].items()})
        return out

    def _state_meta(self) -> dict:
        """The λ and the task-vector mode the masks were computed with."""
        return {"tall_lambda": self.tall_lambda, "keep_task_vectors": self.keep_task_vectors}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if not self._tasks:
            return
        saved = (float(meta["tall_lambda"]), bool(meta["keep_task_vectors"]))
        if saved != (self.tall_lambda, self.keep_task_vectors):
            raise MergeInputError(
                f"{self.name}: the masks were computed with (tall_lambda, keep_task_vectors) = {saved}; "
                f"they cannot be changed to {(self.tall_lambda, self.keep_task_vectors)} when loading"
            )
        self._mtl = {k: v.to(self._dtype(k)) for k, v in self._saved_delta(tensors, "mtl/").items()}
        self._masks = {}
        for i, t in enumerate(self._tasks):
            packed = {}
            for k, b in self._base.items():
                p = tensors[f"mask/{i}/{k}"]
                if p.dtype != torch.uint8 or p.dim() != 1 or p.numel() != (b.numel() + 7) // 8:
                    raise FormatError(
                        f"mask 'mask/{i}/{k}' of task {t!r} is {p.dtype} {tuple(p.shape)}; expected uint8 ({(b.numel() + 7) // 8},)"
                    )
                if not pad_bits_clear(p, b.numel()):
                    raise FormatError(f"mask 'mask/{i}/{k}' of task {t!r} has pad bits set (damaged)")
                packed[k] = p
            self._masks[t] = packed
        if self.keep_task_vectors:
            self._taus = {t: self._saved_delta(tensors, f"tau/{i}/") for i, t in enumerate(self._tasks)}

    def _storage(self) -> StorageReport:
        shared = state_nbytes(self._mtl) if self._mtl is not None else 0
        per = {}
        for t in self._tasks:
            per[t] = sum(tensor_nbytes(p) for p in self._masks[t].values())
            if self.keep_task_vectors:
                per[t] += state_nbytes(self._taus[t])
        what = "multi-task vector τ_MTL (one model) + per task a 1-bit mask"
        return StorageReport(shared, per, what + (" and its task vector" if self.keep_task_vectors else ""))


class TALLMasksRule(TensorRule):
    """On disk: ``τ_MTL`` (shared, float32 or wider), every task's mask (per task, 1-bit packed,
    recomputed as ``τ_MTL`` moves) and, with ``keep_task_vectors``, every task vector (frozen)."""

    method = "tall_masks"
    continual = False
    task_aware = True
    defaults: ClassVar[dict[str, Any]] = {"tall_lambda": 0.6, "consensus_k": 2, "scale": 0.3, "keep_task_vectors": True}

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        validate_like(TALLMasks, opts)
        return {
            "tall_lambda": float(opts["tall_lambda"]),
            "consensus_k": int(opts["consensus_k"]),
            "scale": float(opts["scale"]),
            "keep_task_vectors": bool(opts["keep_task_vectors"]),
        }

    def slots(self) -> list[Slot]:
        out = [Slot("mtl", wide=True), Slot("mask", per_task=True, packed=True)]
        if self.opts["keep_task_vectors"]:
            out.append(Slot("tau", per_task=True, frozen=True))
        return out

    def fold(self, key, delta, old, task, shape):
        lam, keep = self.opts["tall_lambda"], self.opts["keep_task_vectors"]
        prev_mtl = old.get("mtl", key).reshape(shape).to(torch.float64) if old is not None else None
        new = (prev_mtl if prev_mtl is not None else 0.0) + delta.reshape(shape).to(torch.float64)
        masks = []
        for t in range(task.index):
            assert old is not None and prev_mtl is not None
            if keep:
                prev_tau = old.get("tau", key, t).reshape(shape)
            else:  # the expert it serves now stands in for its task vector
                prev_tau = torch.where(unpack_mask(old.get("mask", key, t), shape=shape), prev_mtl, 0.0)
            masks.append(pack_mask(tall_mask(prev_tau, new, lam)))
        masks.append(pack_mask(tall_mask(delta.reshape(shape), new, lam)))
        out: dict[str, Any] = {"mtl": new.to(wide(delta.dtype)), "mask": masks}
        if keep:
            out["tau"] = delta
        return out

    def merged(self, key, reader, meta, ctx):
        shape = reader.shapes[key]
        v = reader.get("mtl", key).reshape(shape)
        c = consensus_mask(
            [unpack_mask(reader.get("mask", key, t), shape=shape) for t in range(reader.tasks)],
            self.opts["consensus_k"],
        )
        return (torch.where(c, v.to(torch.float64), 0.0) * self.opts["scale"]).to(reader.dtypes[key])

    def expert(self, key, reader, meta, ctx, task):
        shape = reader.shapes[key]
        v = reader.get("mtl", key).reshape(shape)
        m = unpack_mask(reader.get("mask", key, task), shape=shape)
        return torch.where(m, v.to(torch.float64), 0.0).to(reader.dtypes[key])


register_rule("tall_masks", TALLMasksRule)
