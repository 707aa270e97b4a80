"""PAM, continual learning by aligned model merging (Sokar, Dziugaite, Arnab, Iscen, Castro,
Schmid, "Continual Learning in Vision-Language Models via Aligned Model Merging",
arXiv:2506.03189; seed 002).

The method (sources and what is our choice: docs/strategies.md, "PAM"):

* **One global module** ``G`` (the paper: a global LoRA, rank 32, on a frozen VLM) evolves
  over the tasks. The first task trains from θ_0 (the LoRA's initialisation) and ``G_1 = θ_1``.
* **Each new task trains a temporary copy of the global module**: task ``t`` starts from
  ``G_{t−1}`` (``init="merged"``; ``init="base"``, every task from θ_0, is an ablation).
* **Alignment during training** (Parameter Alignment for Merging): every ``align_every``
  optimizer steps, the weights of the task module whose sign conflicts with the *important*
  weights of the global module are re-initialised, to the global module's values
  (``reset_to="global"``) or to zero (``reset_to="zero"``), and training goes on. The important
  weights are the top ``p`` fraction of ``G_{t−1}`` by magnitude (``align_fraction``, the paper's
  default 50%), per tensor (``scope="tensor"``) or over all tensors (``scope="global"``). With
  ``x`` the compared quantity and ``g`` its global counterpart::

      I_k = [|g_k| ≥ q_p]  (q_p: the ⌈pN⌉-th largest |g|; ties kept; g_k = 0 never counts)
      C_k = I_k ∧ (x_k · g_k < 0)                     (a strict sign conflict)
      θ_k ← G_{t−1,k}  (reset_to="global")   or   θ_k ← r_k  (reset_to="zero")     for k ∈ C

  ``align_on="values"`` (the paper's LoRA setting) compares the weights themselves:
  ``x = θ``, ``g = G_{t−1}``, ``r = 0``. ``align_on="task_vector"`` (full fine-tuning, where the
  weights' own signs are the pretrained ones) compares task vectors: ``x = θ − θ_0``,
  ``g = G_{t−1} − θ_0``, ``r = θ_0``. The optimizer's first-moment buffers of the reset entries
  are zeroed (``reset_optimizer="momentum"``; ``"all"`` zeroes every per-entry state, ``"none"``
  keeps them) so momentum does not push a reset weight straight back.
* **Merge** after the task, element-wise::

      G_t = (1 − c_t) G_{t−1} + c_t θ_t,    c_1 = 1,
      c_t = 1/2      (merge_coef=0.5, default: the average of the global and the task module)
      c_t = 1/t      (merge_coef=None: the running mean, every task weighted equally)

  ``G_t`` is the inference model for every task (no task identity at inference) and the next
  task's start.

Stores: the global module (one model-sized delta ``G − θ_0``); nothing per task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..errors import ShapeMismatchError
from .base import ContinualStrategy, StorageReport, TaskStart, TrainingHook, state_nbytes
from .rule import Slot, TensorRule, register_rule, validate_like

PAM_INITS = ("merged", "base")
PAM_RESETS = ("global", "zero")
PAM_ALIGN_ON = ("values", "task_vector")
PAM_SCOPES = ("tensor", "global")
PAM_OPTIMIZER_RESETS = ("momentum", "all", "none")
# optimizer state entries holding a first moment / velocity (AdamW, Adam, SGD, RMSprop, Lion-style)
_MOMENTUM_STATE = ("exp_avg", "momentum_buffer", "grad_avg")


def pam_merge_tensor(merged: torch.Tensor, tau: torch.Tensor, coef: float) -> torch.Tensor:
    """``(1 − c) m + c τ`` computed in float32 or wider, returned in ``m``'s dtype (written so
    that ``c = 1`` gives ``τ`` exactly)."""
    wide = torch.promote_types(torch.promote_types(merged.dtype, tau.dtype), torch.float32)
    return ((1.0 - coef) * merged.to(wide) + coef * tau.to(wide)).to(merged.dtype)


def top_fraction_threshold(abs_values: torch.Tensor, fraction: float) -> float:
    """The magnitude ``q`` with ``|g| ≥ q`` selecting the top ``fraction`` of ``abs_values``:
    the ``⌈fraction·N⌉``-th largest value (``+inf`` when that selects nothing)."""
    n = abs_values.numel()
    keep = min(n, math.ceil(fraction * n - 1e-9))
    if keep <= 0:
        return math.inf
    flat = abs_values.reshape(-1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    return float(flat.kthvalue(n - keep + 1).values)


def important_signs(
    values: Mapping[str, torch.Tensor],
    fraction: float,
    scope: str = "tensor",
    reference: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``sign(g_k)`` as int8 on the important entries (top ``fraction`` of ``|g|``, ties at the
    threshold kept), 0 elsewhere and where ``g_k = 0``, with ``g = values`` or, given a
    ``reference``, ``g = values − reference`` (computed tensor by tensor in float32 or wider).
    ``scope="tensor"`` thresholds each tensor on its own, ``"global"`` once over all of them."""
    if scope not in PAM_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {PAM_SCOPES}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"align_fraction must be in [0, 1], got {fraction}")

    def g_of(k: str) -> torch.Tensor:
        v = values[k].detach()
        if reference is None:
            return v
        wide = torch.promote_types(torch.promote_types(v.dtype, reference[k].dtype), torch.float32)
        return v.to(wide) - reference[k].detach().to(device=v.device, dtype=wide)

    if scope == "global":
        # one model's magnitudes (never several tasks'), as TIES's global trim does
        parts = [g_of(k).reshape(-1).abs() for k in values]
        wide = torch.float32
        for t in parts:
            wide = torch.promote_types(wide, t.dtype)
        flat = torch.cat([t.to(wide) for t in parts])
        del parts
        q_all = top_fraction_threshold(flat, fraction)
        del flat
    out = {}
    for k in values:
        g = g_of(k)
        q = q_all if scope == "global" else top_fraction_threshold(g.abs(), fraction)
        keep = (g.abs().to(torch.promote_types(g.dtype, torch.float32)) >= q) & (g != 0)
        out[k] = torch.where(keep, torch.sign(g), torch.zeros_like(g)).to(torch.int8)
    return out


def conflict_mask(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``[x_k · s_k < 0]``: entries of ``x`` whose sign strictly opposes the int8 sign ``s_k``
    (entries with ``s_k = 0`` or ``x_k = 0`` never conflict)."""
    # s is 0 or ±1, so x·s is exact: negative iff the signs strictly oppose (NaN compares False)
    return (x * signs.to(x.device)) < 0


def sign_agreement(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Fraction of entries, among those nonzero in both, where ``a`` and ``b`` have the same sign
    (1 = no sign conflict when merging ``a`` and ``b``)."""
    same = both = 0
    for k in a:
        x, y = a[k].detach(), b[k].detach().to(a[k].device)
        nz = (x != 0) & (y != 0)
        both += int(nz.sum())
        same += int((nz & ((x > 0) == (y > 0))).sum())
    return same / both if both else 1.0


class PAMAlignment(TrainingHook):
    """PAM's alignment as a training hook: every ``every`` optimizer steps, re-initialise the
    entries of the trained tensors that conflict in sign with the important entries of the
    global module (see the module docstring for the rule).

    Use ``hook.attach(params, optimizer=opt)`` (runs :meth:`after_step` after each ``opt.step()``)
    or call ``hook.after_step(params, opt)`` yourself; :meth:`align` applies one alignment now.
    ``steps``, ``alignments`` and ``resets`` (entries re-initialised per alignment) record
    what happened; :meth:`conflict_fraction` measures the alignment of the current weights.
    """

    def __init__(
        self,
        global_values: Mapping[str, torch.Tensor],
        *,
        reference: Mapping[str, torch.Tensor] | None = None,
        fraction: float = 0.5,
        every: int = 100,
        reset_to: str = "global",
        scope: str = "tensor",
        reset_optimizer: str = "momentum",
    ):
        if reset_to not in PAM_RESETS:
            raise ValueError(f"unknown reset_to {reset_to!r}; choose one of {PAM_RESETS}")
        if reset_optimizer not in PAM_OPTIMIZER_RESETS:
            raise ValueError(f"unknown reset_optimizer {reset_optimizer!r}; choose one of {PAM_OPTIMIZER_RESETS}")
        if int(every) != every or every < 1:
            raise ValueError(f"align_every must be a positive integer, got {every}")
        self.every = int(every)
        self.reset_to = reset_to
        self.reset_optimizer = reset_optimizer
        self._global = dict(global_values)
        self._reference = dict(reference) if reference is not None else None
        if self._reference is not None:
            missing = [k for k in self._global if k not in self._reference]
            if missing:
                raise KeyError(f"PAMAlignment: reference lacks tensors {missing[:8]}")
        self._signs = important_signs(self._global, fraction, scope, self._reference)
        self._device_cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self.steps = 0
        self.alignments = 0
        self.resets: list[int] = []

    @property
    def important_count(self) -> int:
        """Number of important (sign-carrying) entries of the global module."""
        return sum(int((s != 0).sum()) for s in self._signs.values())

    def _on(self, kind: str, k: str, like: torch.Tensor) -> torch.Tensor:
        """``kind`` ("global", "reference") tensor ``k`` on ``like``'s device and dtype, cached."""
        key = (f"{kind}:{k}", like.device, like.dtype)
        t = self._device_cache.get(key)
        if t is None:
            src = self._global[k] if kind == "global" else self._reference[k]  # type: ignore[index]
            t = src.detach().to(device=like.device, dtype=like.dtype)
            self._device_cache[key] = t
        return t

    def _signs_on(self, k: str, device: torch.device) -> torch.Tensor:
        """The int8 signs of tensor ``k`` on ``device`` (moved once, not at every alignment)."""
        s = self._signs[k]
        if s.device != device:
            key = (f"signs:{k}", device, torch.int8)
            cached = self._device_cache.get(key)
            if cached is None:
                cached = self._device_cache[key] = s.to(device)
            s = cached
        return s

    def _compared(self, k: str, p: torch.Tensor) -> torch.Tensor:
        x = p.detach()
        if self._reference is not None:
            x = x - self._on("reference", k, x)
        return x

    def _check(self, params: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in self._signs if k not in params]
        if missing:
            raise KeyError(f"PAMAlignment: params lack tensors {missing[:8]} (keys must match the strategy's base)")
        for k, s in self._signs.items():
            if tuple(params[k].shape) != tuple(s.shape):
                raise ShapeMismatchError(
                    f"PAMAlignment: tensor {k!r} has shape {tuple(params[k].shape)}, the global module has {tuple(s.shape)}"
                )

    def conflict_fraction(self, params: Mapping[str, torch.Tensor]) -> float:
        """Fraction of the global module's important entries whose sign ``params`` oppose
        (0 = fully aligned)."""
        self._check(params)
        n = self.important_count
        if n == 0:
            return 0.0
        bad = sum(
            int(torch.count_nonzero(conflict_mask(self._compared(k, params[k]), self._signs_on(k, params[k].device))))
            for k in self._signs
        )
        return bad / n

    def align(self, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> int:
        """Re-initialise the conflicting entries of ``params`` in place now; returns how many."""
        with torch.no_grad():
            return self._align(params, optimizer)

    def _align(self, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None) -> int:
        self._check(params)
        total = 0
        for k in self._signs:
            p = params[k]
            conflict = conflict_mask(self._compared(k, p), self._signs_on(k, p.device))
            n = int(torch.count_nonzero(conflict))  # (a bool .sum() is several times slower on CPU)
            if n == 0:
                continue
            total += n
            # arithmetic blends instead of where/masked_fill (several times faster on CPU):
            # lerp with a 0/1 weight returns either end exactly
            w = conflict.to(p.dtype)
            if self.reset_to == "global":
                p.lerp_(self._on("global", k, p), w)
            elif self._reference is not None:
                p.lerp_(self._on("reference", k, p), w)
            else:
                p.mul_(1 - w)
            if optimizer is not None and self.reset_optimizer != "none":
                for name, buf in optimizer.state.get(p, {}).items():
                    if not isinstance(buf, torch.Tensor) or tuple(buf.shape) != tuple(p.shape):
                        continue
                    if self.reset_optimizer == "all" or name in _MOMENTUM_STATE:
                        buf.mul_((1 - w).to(device=buf.device, dtype=buf.dtype))
        self.alignments += 1
        self.resets.append(total)
        return total

    def after_step(self, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Count a step; align every ``every`` steps."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.align(params, optimizer)


class PAM(ContinualStrategy):
    """Aligned model merging: train a copy of the global module with periodic sign alignment,
    then average it into the global module."""

    name = "pam"

    def __init__(
        self,
        base,
        *,
        align_fraction: float = 0.5,
        align_every: int = 100,
        reset_to: str = "global",
        align_on: str = "values",
        scope: str = "tensor",
        reset_optimizer: str = "momentum",
        merge_coef: float | None = 0.5,
        init: str = "merged",
        copy_base: bool = True,
    ):
        super().__init__(base, copy_base=copy_base)
        if init not in PAM_INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {PAM_INITS}")
        if merge_coef is not None and not 0.0 < merge_coef <= 1.0:
            raise ValueError(f"merge_coef must be in (0, 1] or None (running mean), got {merge_coef}")
        if not 0.0 <= align_fraction <= 1.0:
            raise ValueError(f"align_fraction must be in [0, 1] (0 turns alignment off), got {align_fraction}")
        if int(align_every) != align_every or align_every < 1:
            raise ValueError(f"align_every must be a positive integer, got {align_every}")
        for opt, val, allowed in (
            ("reset_to", reset_to, PAM_RESETS),
            ("align_on", align_on, PAM_ALIGN_ON),
            ("scope", scope, PAM_SCOPES),
            ("reset_optimizer", reset_optimizer, PAM_OPTIMIZER_RESETS),
        ):
            if val not in allowed:
                raise ValueError(f"unknown {opt} {val!r}; choose one of {allowed}")
        self.align_fraction = float(align_fraction)
        self.align_every = int(align_every)
        self.reset_to = reset_to
        self.align_on = align_on
        self.scope = scope
        self.reset_optimizer = reset_optimizer
        self.merge_coef = merge_coef
        self.init = init
        self._merged: dict[str, torch.Tensor] | None = None

    def coefficient(self, t: int) -> float:
        """``c_t`` for the ``t``-th task (1-based)."""
        if t <= 1:
            return 1.0
        return 1.0 / t if self.merge_coef is None else self.merge_coef

    def global_module(self) -> dict[str, torch.Tensor]:
        """``G`` = θ_0 + the merged delta (θ_0 before the first task)."""
        if self._merged is None:
            return {k: v.clone() for k, v in self._base.items()}
        return self._absolute(self._merged)

    def _start(self, name: str) -> TaskStart:
        if self._merged is None:
            return TaskStart({k: v.clone() for k, v in self._base.items()}, "base")
        hook = None
        glob = self._absolute(self._merged)
        if self.align_fraction > 0:
            hook = PAMAlignment(
                glob,
                reference=self._base if self.align_on == "task_vector" else None,
                fraction=self.align_fraction,
                every=self.align_every,
                reset_to=self.reset_to,
                scope=self.scope,
                reset_optimizer=self.reset_optimizer,
            )
        if self.init == "base":
            return TaskStart({k: v.clone() for k, v in self._base.items()}, "base", hook)
        # the caller trains start.params in place: copy only when the hook reads the same G
        return TaskStart({k: v.clone() for k, v in glob.items()} if hook else glob, "merged", hook)

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        c = self.coefficient(len(self._tasks) + 1)
        if self._merged is None:
            self._merged = {k: pam_merge_tensor(torch.zeros_like(v), v, c) for k, v in delta.items()}
        else:
            self._merged = {k: pam_merge_tensor(self._merged[k], delta[k], c) for k in self._base}

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        assert self._merged is not None
        return self._merged

    def _options(self) -> dict:
        return {
            "align_fraction": self.align_fraction,
            "align_every": self.align_every,
            "reset_to": self.reset_to,
            "align_on": self.align_on,
            "scope": self.scope,
            "reset_optimizer": self.reset_optimizer,
            "merge_coef": self.merge_coef,
            "init": self.init,
        }

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``merged/<key>``: the global module's delta ``G − θ_0``."""
        return {} if self._merged is None else {f"merged/{k}": v for k, v in self._merged.items()}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if self._tasks:
            self._merged = self._saved_delta(tensors, "merged/")

    def _storage(self) -> StorageReport:
        shared = state_nbytes(self._merged) if self._merged is not None else 0
        return StorageReport(shared, dict.fromkeys(self._tasks, 0), "the global module G − θ_0 (one model)")


class PAMRule(TensorRule):
    """On disk: the global module's delta ``G − θ_0`` (shared), folded with ``c_t``. The alignment
    is a training-time hook (:meth:`PAM.begin_task`); a store folds tasks already trained."""

    method = "pam"
    defaults: ClassVar[dict[str, Any]] = {
        "align_fraction": 0.5,
        "align_every": 100,
        "reset_to": "global",
        "align_on": "values",
        "scope": "tensor",
        "reset_optimizer": "momentum",
        "merge_coef": 0.5,
        "init": "merged",
    }

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        validate_like(PAM, opts)
        return dict(opts)

    def slots(self) -> list[Slot]:
        return [Slot("merged")]

    def _coef(self, t: int) -> float:
        if t <= 1:
            return 1.0
        mc = self.opts["merge_coef"]
        return 1.0 / t if mc is None else float(mc)

    def fold(self, key, delta, old, task, shape):
        c = self._coef(task.index + 1)
        prev = old.get("merged", key) if old is not None else torch.zeros_like(delta)
        return {"merged": pam_merge_tensor(prev, delta, c)}

    def merged(self, key, reader, meta, ctx):
        return reader.get("merged", key)


register_rule("pam", PAMRule)
