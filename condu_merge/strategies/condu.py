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

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..backends import resolve_backend
from ..core import RESCALER_MODES, compute_rescalers, continual_step_tensor
from ..errors import FormatError, MergeInputError
from ..merger import ContinualMerger
from ..pipeline import popcount_bytes as popcount
from ..safetensors_writer import TensorSpec
from ..trigger import TaskTrigger
from .base import ContinualStrategy, StorageReport, backend_option, state_nbytes, tensor_nbytes
from .rule import FoldTask, Slot, TensorRule


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

    # ------------------------------------------------------------------ persistence
    def _options(self) -> dict:
        return {"rescaler": self.merger.rescaler, "backend": backend_option(self.merger.backend)}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``unified/<key>`` (u) and ``mask/<task index>/<key>`` (packed uint8 masks)."""
        if not len(self.merger):
            return {}
        out = {f"unified/{k}": v for k, v in self.merger.unified.items()}
        for i, tr in enumerate(self.merger.triggers):
            out.update({f"mask/{i}/{k}": p for k, p in tr.packed.items()})
        return out

    def _state_meta(self) -> dict:
        """The rescaler mode and each task's rescaler (a float, or ``{key: float}`` per tensor)."""
        return {"rescaler": self.merger.rescaler, "rescalers": [tr.rescaler for tr in self.merger.triggers]}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta["rescaler"] != self.merger.rescaler:
            raise MergeInputError(
                f"condu: the tasks were merged with rescaler {meta['rescaler']!r}; it cannot be changed to "
                f"{self.merger.rescaler!r} when loading (the masks and rescalers depend on it)"
            )
        rescalers = meta["rescalers"]
        if len(rescalers) != len(self._tasks):
            raise FormatError(f"{len(rescalers)} rescalers for {len(self._tasks)} tasks")
        if not self._tasks:
            return
        shapes = {k: tuple(b.shape) for k, b in self._base.items()}
        unified = self._saved_delta(tensors, "unified/")
        triggers = []
        for i, (task, r) in enumerate(zip(self._tasks, rescalers)):
            packed = {}
            for k in self._base:
                p = tensors[f"mask/{i}/{k}"]
                if p.dtype != torch.uint8:
                    raise FormatError(f"mask 'mask/{i}/{k}' of task {task!r} is {p.dtype}, not uint8")
                packed[k] = p
            r = {k: float(r[k]) for k in self._base} if isinstance(r, dict) else float(r)
            triggers.append(TaskTrigger(packed, shapes, r, task))  # checks the mask sizes
        self.merger = ContinualMerger.from_session(unified, triggers, self.merger.rescaler, backend=self.merger.backend)

    def _storage(self) -> StorageReport:
        shared = state_nbytes(self.merger.unified) if len(self.merger) else 0
        per = {}
        for tr in self.merger.triggers:
            masks = sum(tensor_nbytes(p) for p in tr.packed.values())  # uint8, ceil(N/8) bytes each
            resc = 8 * (len(tr.rescaler) if isinstance(tr.rescaler, dict) else 1)
            per[tr.task] = masks + resc
        return StorageReport(
            shared,
            {str(k): v for k, v in per.items()},
            "unified delta u (one model) + per task a 1-bit mask and its rescaler",
        )


class ConDURule(TensorRule):
    """ConDU on disk: ``unified`` (``u``, shared) and ``masks`` (per task, 1-bit packed, all
    rewritten each session since the election moves). One tensor's fold is
    :func:`~condu_merge.core.continual_step_tensor` (``unify_tensor`` of the first task,
    ``add_task_tensor`` of a later one with the earlier λ's from ``task.meta["rescalers"]``); it
    gathers the rescaler sums and each mask's set bits in ``task.stats``, and
    :meth:`finish_task` turns them into every task's λ (:func:`~condu_merge.core.compute_rescalers`).
    The ConDU :class:`~condu_merge.store.Store` runs it; it is not in the registry of
    :class:`~condu_merge.strategy_store.StrategyStore` methods (ConDU has its own store)."""

    method = "condu"
    task_aware = True
    checks_finite = True  # unify_tensor / add_task_tensor refuse NaN/Inf naming the key and task
    elementwise = True  # the election, masks and u are per element; the λ sums add up over pieces
    defaults: ClassVar[dict[str, Any]] = {"rescaler": "tensor_mean", "backend": "auto"}
    meta_keys: ClassVar[tuple[str, ...]] = ("rescalers", "mask_bits")
    device: torch.device | None = None
    """Where the merge runs (inputs are moved there; a distributed rank's GPU); ``None``: in place."""

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        if opts["rescaler"] not in RESCALER_MODES:
            raise ValueError(f"unknown rescaler {opts['rescaler']!r}; choose one of {RESCALER_MODES}")
        return dict(opts)

    def slots(self) -> list[Slot]:
        return [Slot("unified"), Slot("masks", per_task=True, packed=True)]

    def fold(self, key, delta, old, task, shape):
        device = self.device
        spec = TensorSpec(key, delta.dtype, shape)
        label = f"task {task.name!r}"
        be = self.opts["backend"]
        if old is None:
            res = continual_step_tensor(spec, delta, label, backend=be, device=device)
        else:
            masks = [old.get("masks", key, i) for i in range(task.index)]
            lams = task.meta["rescalers"]
            res = continual_step_tensor(
                spec, delta, label, old.get("unified", key), masks, lams, backend=be, device=device
            )
        rows = res.masks.cpu()
        self.record(task, key, res.u.numel(), res.num.tolist(), res.den.tolist(), rows)
        return {"unified": res.u.cpu(), "masks": rows}

    @staticmethod
    def record(task: FoldTask, key: str, numel: int, num: list[float], den: list[float], rows: Any) -> None:
        """Gather one tensor's (or piece's) step in ``task.stats``: its element count, every
        task's L1 sums ``num``/``den`` and the set bits of each mask row (``rows``: ``uint8
        [t, B]``, a tensor or an array). A tensor folded in pieces adds its pieces' sums in order."""
        n = task.index + 1
        nums = task.stats.setdefault("num", [{} for _ in range(n)])
        dens = task.stats.setdefault("den", [{} for _ in range(n)])
        bits = task.stats.setdefault("bits", [0] * n)
        counts = task.stats.setdefault("numel", {})
        counts[key] = counts.get(key, 0) + numel
        for i, (a, b) in enumerate(zip(num, den)):
            nums[i][key] = nums[i].get(key, 0.0) + a
            dens[i][key] = dens[i].get(key, 0.0) + b
            bits[i] += popcount(rows[i])

    def finish_task(self, meta: dict[str, Any], task: FoldTask) -> dict[str, Any]:
        names = [*meta.get("names", []), task.name]
        lams = compute_rescalers(
            task.stats["num"], task.stats["den"], task.stats["numel"], self.opts["rescaler"], names
        )
        return {**meta, "names": names, "rescalers": lams, "mask_bits": list(task.stats["bits"])}

    def merged(self, key, reader, meta, ctx):
        return reader.get("unified", key).reshape(reader.shapes[key])

    def expert(self, key, reader, meta, ctx, task):
        lam = meta["rescalers"][task]
        lam = lam[key] if isinstance(lam, dict) else lam
        u = reader.get("unified", key).reshape(-1)
        be = resolve_backend(self.opts["backend"], u.device)
        return be.decouple_flat(u, reader.get("masks", key, task), lam, None).reshape(reader.shapes[key])
