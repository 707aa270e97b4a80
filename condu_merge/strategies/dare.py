"""DARE, drop and rescale (Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch", ICML 2024, arXiv:2311.03099), before task
arithmetic (:class:`DareTaskArithmetic`) or TIES (:class:`DareTIES`).

Math, for each task vector ``τ_i = θ_i − θ_0`` and drop rate ``p`` (``sparsity``)::

    m_i ~ Bernoulli(1 − p) elementwise,     τ̃_i = m_i ⊙ τ_i / (1 − p)      (``rescale=True``)

then task arithmetic ``θ = θ_0 + λ Σ_i τ̃_i``, or TIES (:mod:`.ties`, the released code's rules)
on the ``τ̃_i``. As fusion_bench (``fusion_bench/method/dare/utils.py::param_random_drop_``:
``mask = rand_like(param) > sparsity_level``, then ``/ (1 − sparsity_level)``), an element is kept
where a uniform draw ``U ∈ [0, 1)`` exceeds ``p``. Defaults are fusion_bench's
``config/method/dare/task_arithmetic.yaml`` (``sparsity_ratio: 0.5``, ``scaling_factor: 0.3``,
``rescale: true``) and ``config/method/dare/ties_merging.yaml`` (``sparsity_ratio: 0.5``,
``scaling_factor: 0.5``, ``threshold: 20``, ``merge_func: sum``); like their default
``only_on_linear_weights: false`` every tensor is dropped.

Determinism (ours; fusion_bench draws from torch's global generator): the draws of task ``name``
on tensor ``key`` come from a CPU ``torch.Generator`` seeded with the first 8 bytes of
``sha256(f"{seed}/{name}/{key}")``, as float32 ``torch.rand``; so a run is reproducible,
independent of task order, device and of the other tensors. :func:`dare_mask` is that draw.

Stores: :class:`DareTaskArithmetic` keeps only the running sum ``Σ τ̃_i`` (the sum is linear, so
the drop happens as each task is folded in): one model in float32 or wider, continual.
:class:`DareTIES` keeps every dropped vector ``τ̃_i`` (TIES trims and elects over all of them).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..errors import MergeInputError
from .base import ContinualStrategy, StorageReport, state_nbytes
from .rule import Slot, TensorRule, register_rule, validate_like, wide
from .ties import TIES, TIESRule


def dare_seed(seed: int, task: str, key: str) -> int:
    """The generator seed of task ``task``'s draws on tensor ``key``."""
    digest = hashlib.sha256(f"{int(seed)}/{task}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_mask(shape: torch.Size | tuple[int, ...], sparsity: float, seed: int, task: str, key: str) -> torch.Tensor:
    """The kept elements (bool, CPU): ``U > sparsity`` for ``U ~ rand(shape)`` drawn as above."""
    g = torch.Generator(device="cpu").manual_seed(dare_seed(seed, task, key))
    return torch.rand(tuple(shape), generator=g, dtype=torch.float32) > sparsity


def drop_and_rescale(tau: torch.Tensor, keep: torch.Tensor, sparsity: float, rescale: bool = True) -> torch.Tensor:
    """``keep ⊙ τ / (1 − p)`` (float64; without the division when ``rescale`` is False)."""
    out = torch.where(keep.to(tau.device), tau.to(torch.float64), 0.0)
    return out / (1.0 - sparsity) if rescale else out


def _check_sparsity(sparsity: float, rescale: bool) -> float:
    p = float(sparsity)
    if not 0.0 <= p <= 1.0 or (rescale and p == 1.0):
        raise ValueError(
            f"sparsity (the drop rate p) must be in [0, 1){'' if rescale else ' or 1'}, got {sparsity}"
            + (" (p = 1 drops everything and rescales by 1/0)" if rescale and p == 1.0 else "")
        )
    return p


class DareTaskArithmetic(ContinualStrategy):
    """Drop and rescale each task vector, then task arithmetic (a running sum: continual)."""

    name = "dare_task_arithmetic"

    def __init__(
        self,
        base,
        *,
        sparsity: float = 0.5,
        scale: float = 0.3,
        rescale: bool = True,
        seed: int = 0,
        copy_base: bool = True,
    ):
        super().__init__(base, copy_base=copy_base)
        self.rescale = bool(rescale)
        self.sparsity = _check_sparsity(sparsity, self.rescale)
        self.scale = float(scale)
        self.seed = int(seed)
        self._sum: dict[str, torch.Tensor] | None = None

    def _sum_dtype(self, key: str) -> torch.dtype:
        return torch.promote_types(self._base[key].dtype, torch.float32)

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        new = {}
        for k, tau in delta.items():
            d = drop_and_rescale(
                tau, dare_mask(tau.shape, self.sparsity, self.seed, name, k), self.sparsity, self.rescale
            )
            prev = self._sum[k].to(torch.float64) if self._sum is not None else 0.0
            new[k] = (prev + d).to(self._sum_dtype(k))
        self._sum = new

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        assert self._sum is not None
        return {k: (v.to(torch.float64) * self.scale).to(self._base[k].dtype) for k, v in self._sum.items()}

    def _options(self) -> dict:
        return {"sparsity": self.sparsity, "scale": self.scale, "rescale": self.rescale, "seed": self.seed}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``sum/<key>``: the running ``Σ τ̃_i`` (unscaled)."""
        return {} if self._sum is None else {f"sum/{k}": v for k, v in self._sum.items()}

    def _state_meta(self) -> dict:
        """The drop options the sum was built with (loading with others is refused)."""
        return {"sparsity": self.sparsity, "rescale": self.rescale, "seed": self.seed}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        saved = (float(meta["sparsity"]), bool(meta["rescale"]), int(meta["seed"]))
        if self._tasks and saved != (self.sparsity, self.rescale, self.seed):
            raise MergeInputError(
                f"{self.name}: the tasks were dropped with sparsity/rescale/seed {saved}; they cannot be changed to "
                f"{(self.sparsity, self.rescale, self.seed)} when loading (only their sum is kept)"
            )
        if self._tasks:
            self._sum = {k: v.to(self._sum_dtype(k)) for k, v in self._saved_delta(tensors, "sum/").items()}

    def _storage(self) -> StorageReport:
        shared = state_nbytes(self._sum) if self._sum is not None else 0
        return StorageReport(
            shared, dict.fromkeys(self._tasks, 0), "running sum of the dropped, rescaled task vectors (one model)"
        )


class DareTIES(TIES):
    """Drop and rescale each task vector, then TIES (keeps every dropped vector)."""

    name = "dare_ties"

    def __init__(
        self,
        base,
        *,
        sparsity: float = 0.5,
        rescale: bool = True,
        seed: int = 0,
        density: float = 0.2,
        scale: float = 0.5,
        merge_func: str = "sum",
        zero_sign: str = "majority",
        trim_rule: str = "reference",
        trim_scope: str = "global",
        copy_base: bool = True,
    ):
        super().__init__(
            base,
            density=density,
            scale=scale,
            merge_func=merge_func,
            zero_sign=zero_sign,
            trim_rule=trim_rule,
            trim_scope=trim_scope,
            copy_base=copy_base,
        )
        self.rescale = bool(rescale)
        self.sparsity = _check_sparsity(sparsity, self.rescale)
        self.seed = int(seed)

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        dropped = {
            k: drop_and_rescale(
                tau, dare_mask(tau.shape, self.sparsity, self.seed, name, k), self.sparsity, self.rescale
            ).to(tau.dtype)
            for k, tau in delta.items()
        }
        super()._fold(name, dropped)

    def _options(self) -> dict:
        return {**super()._options(), "sparsity": self.sparsity, "rescale": self.rescale, "seed": self.seed}

    def _state_meta(self) -> dict:
        return {**super()._state_meta(), "sparsity": self.sparsity, "rescale": self.rescale, "seed": self.seed}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        saved = (float(meta["sparsity"]), bool(meta["rescale"]), int(meta["seed"]))
        if self._tasks and saved != (self.sparsity, self.rescale, self.seed):
            raise MergeInputError(
                f"{self.name}: the tasks were dropped with sparsity/rescale/seed {saved}; they cannot be changed to "
                f"{(self.sparsity, self.rescale, self.seed)} when loading (the dropped vectors are kept)"
            )
        super()._restore(tensors, meta)

    def _storage(self) -> StorageReport:
        r = super()._storage()
        return StorageReport(
            r.shared_bytes, r.per_task_bytes, "every dropped, rescaled task vector τ̃_i + its trim threshold"
        )


class DareTaskArithmeticRule(TensorRule):
    """On disk: the running sum of the dropped, rescaled task vectors (shared, float32 or wider)."""

    method = "dare_task_arithmetic"
    defaults: ClassVar[dict[str, Any]] = {"sparsity": 0.5, "scale": 0.3, "rescale": True, "seed": 0}

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        validate_like(DareTaskArithmetic, opts)
        rescale = bool(opts["rescale"])
        return {
            "sparsity": _check_sparsity(opts["sparsity"], rescale),
            "scale": float(opts["scale"]),
            "rescale": rescale,
            "seed": int(opts["seed"]),
        }

    def slots(self) -> list[Slot]:
        return [Slot("sum", wide=True)]

    def fold(self, key, delta, old, task, shape):
        o = self.opts
        d = drop_and_rescale(
            delta, dare_mask(delta.shape, o["sparsity"], o["seed"], task.name, key), o["sparsity"], o["rescale"]
        )
        prev = old.get("sum", key).to(torch.float64) if old is not None else 0.0
        return {"sum": (prev + d).to(wide(delta.dtype))}

    def merged(self, key, reader, meta, ctx):
        return (reader.get("sum", key).to(torch.float64) * self.opts["scale"]).to(reader.dtypes[key])


class DareTIESRule(TIESRule):
    """On disk: every dropped, rescaled task vector (per task, frozen); read as TIES."""

    method = "dare_ties"
    defaults: ClassVar[dict[str, Any]] = {
        **TIESRule.defaults,
        "scale": 0.5,
        "sparsity": 0.5,
        "rescale": True,
        "seed": 0,
    }
    strategy_cls: ClassVar[Any] = DareTIES

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        out = super().check_options(opts)
        out["rescale"] = bool(opts["rescale"])
        out["sparsity"] = _check_sparsity(opts["sparsity"], out["rescale"])
        out["seed"] = int(opts["seed"])
        return out

    def fold(self, key, delta, old, task, shape):
        o = self.opts
        keep = dare_mask(delta.shape, o["sparsity"], o["seed"], task.name, key)
        return {"tau": drop_and_rescale(delta, keep, o["sparsity"], o["rescale"]).to(delta.dtype)}


register_rule("dare_task_arithmetic", DareTaskArithmeticRule)
register_rule("dare_ties", DareTIESRule)
