"""TIES-Merging (Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When
Merging Models", NeurIPS 2023, arXiv:2306.01708): a non-continual reference.

The default rules are those of the released code, so the same options give the same numbers:
github.com/prateeky2806/ties-merging ``src/utils/merge_utils.py`` (``topk_values_mask``,
``resolve_sign``/``resolve_zero_signs``, ``disjoint_merge``), which fusion_bench
(``fusion_bench/method/ties_merging/ties_merging_utils.py``), the MagMax repository
(``src/merging/ties.py``) and the TALL-masks repository (``src/utils/ties_utils.py``) run unchanged.

Math, with task vectors ``τ_i = θ_i − θ_0`` (every task fine-tuned from θ_0), ``N`` entries:

1. **Trim** (``density`` k, a fraction in (0, 1], or a percentage in (1, 100] as the peers'
   ``K``/``threshold`` are, e.g. ``20`` = 0.2): ``τ̂_i = τ_i ⊙ [|τ_i| ≥ q_i]``.
   ``trim_rule="reference"`` (default): ``q_i`` is the ``(N − ⌊kN⌋)``-th *smallest* ``|τ_i|``
   (``kthvalue``), which keeps ``⌊kN⌋ + 1`` entries when magnitudes are distinct (entries tied
   with ``q_i`` are kept too); ``⌊kN⌋`` is Python's ``int(N * k)`` in float64 exactly as the
   code computes it. ``k = 1`` keeps everything (the released code fails there: ``kthvalue(0)``).
   ``trim_rule="ceil"`` (this library's earlier rule): ``q_i`` is the ``⌈kN⌉``-th largest, which
   keeps exactly ``⌈kN⌉`` distinct magnitudes — one entry fewer per task vector.
   ``trim_scope="global"`` (default, as the code: one flattened vector per task) or ``"tensor"``.
2. **Elect**: ``γ[p] = sign(Σ_i τ̂_i[p])``. Where that sum is exactly 0, ``zero_sign`` decides:
   ``"majority"`` (default, the code's ``resolve_zero_signs``): ``γ[p] = sign(Σ_q γ[q])``, the
   sign of the sum of all elected signs over the *whole* flattened task vector (every tensor);
   ``"minority"``: its negation; ``"positive"``: +1 (this library's earlier rule). If that global
   sum is itself 0 the code leaves ``γ[p] = 0``, and so do we.
3. **Disjoint merge** over ``A_p = {i : τ̂_i[p] > 0}`` if ``γ[p] > 0`` else ``{i : τ̂_i[p] < 0}``
   (so a ``γ[p] = 0`` left by step 2 selects the negative entries, as the code's
   ``where(sign > 0, v > 0, v < 0)`` does), ``merge_func``: ``"sum"`` ``Σ_{A_p} τ̂_i[p]``;
   ``"mean"`` that sum over ``max(|A_p|, 1)``; ``"max"`` ``γ[p] · max_{A_p} |τ̂_i[p]|``. The
   code's ``"dis-mean"`` style names are accepted (the part after the last ``-``).

``θ = θ_0 + λ τ_m``. Defaults ``density=0.2``, ``scale=λ=0.3``, ``merge_func="sum"`` are
fusion_bench's ``config/method/ties_merging.yaml`` (``threshold: 20``, ``scaling_factor: 0.3``,
``merge_func: sum``). The paper's repository demo (``src/ties_minimal.ipynb``: ``K = 20``,
``merge_func = "dis-mean"``, ``lamda = 1``) is ``TIES(base, merge_func="mean", scale=1.0)``.

Rounding: the code sums in the model dtype (fp32); we sum in float64, so on an entry whose fp32
sum rounds to exactly 0 (or whose exact sum is 0 but fp32 is not) the elected sign can differ.

The merge runs tensor by tensor, twice: a first pass counts the elected signs for the majority,
the second merges. A task's global threshold is computed once when it is folded in.

Stores: every task vector τ_i (one full delta per task) plus one float threshold per task (one
per tensor with ``trim_scope="tensor"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from .base import ContinualStrategy, StorageReport, state_nbytes
from .rule import Slot, TensorRule, register_rule, validate_like

TRIM_SCOPES = ("global", "tensor")
TRIM_RULES = ("reference", "ceil")
ZERO_SIGNS = ("majority", "minority", "positive")
MERGE_FUNCS = ("sum", "mean", "max")


def density_fraction(density: float) -> float:
    """The kept fraction from ``density``: a fraction in (0, 1] as is, a percentage in (1, 100]
    divided by 100 (the peers' ``if K > 1: K /= 100``)."""
    d = float(density)
    if not (0.0 < d <= 100.0) or math.isnan(d):
        raise ValueError(f"density (the kept fraction k, or a percentage K) must be in (0, 100], got {density}")
    return d / 100.0 if d > 1.0 else d


def merge_func_name(merge_func: str) -> str:
    """``"dis-mean"`` → ``"mean"`` (the code's ``merge_func.split("-")[-1]``), checked."""
    if not isinstance(merge_func, str):
        raise ValueError(f"merge_func must be one of {MERGE_FUNCS}, got {merge_func!r}")
    f = merge_func.split("-")[-1]
    if f not in MERGE_FUNCS:
        raise ValueError(f"unknown merge_func {merge_func!r}; choose one of {MERGE_FUNCS}")
    return f


def trim_rank(n: int, density: float, rule: str = "reference") -> int:
    """The 1-based rank (in ascending order of magnitude) of the trim threshold among ``n``
    magnitudes: ``max(1, n − int(n·k))`` (``"reference"``) or ``n − ⌈k·n⌉ + 1`` (``"ceil"``)."""
    k = density_fraction(density)
    if rule == "reference":
        return max(1, n - int(n * k))
    if rule == "ceil":
        return n - min(n, max(1, math.ceil(k * n - 1e-9))) + 1
    raise ValueError(f"unknown trim_rule {rule!r}; choose one of {TRIM_RULES}")


def trim_threshold(abs_values: torch.Tensor, density: float, rule: str = "reference") -> float:
    """The magnitude ``q`` such that ``|τ| ≥ q`` is the kept set (``+inf`` for an empty tensor).

    ``rule="reference"``: the ``(N − int(N·k))``-th smallest (at least the 1st) of
    ``abs_values``; ``rule="ceil"``: the ``⌈k·N⌉``-th largest. ``density`` as in
    :func:`density_fraction`."""
    n = abs_values.numel()
    rank = trim_rank(max(n, 1), density, rule)
    if n == 0:
        return float("inf")
    flat = abs_values.reshape(-1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    return float(flat.kthvalue(rank).values)


def kth_smallest_streaming(chunks: Callable[[], Iterable[torch.Tensor]], rank: int, dtype: torch.dtype) -> float:
    """The ``rank``-th smallest (1-based) of the non-negative finite values that ``chunks()``
    yields (cast to ``dtype``, float32 or float64), exactly as ``kthvalue`` over their
    concatenation, without concatenating: a radix select on the IEEE bit patterns (for
    non-negative floats their order is the integer order), 16 bits per pass over the chunks
    (2 passes for float32, 4 for float64), holding one chunk and a 65,536-bin histogram."""
    ibits, width = (torch.int32, 32) if dtype == torch.float32 else (torch.int64, 64)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"kth_smallest_streaming works in float32 or float64, not {dtype}")
    prefix, remaining = 0, int(rank)
    for shift in range(width - 16, -1, -16):
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for c in chunks():
            b = c.reshape(-1).to(dtype).contiguous().view(ibits).to(torch.int64)
            if shift + 16 < width:
                b = b[(b >> (shift + 16)) == prefix]
            hist += torch.bincount((b >> shift) & 0xFFFF, minlength=1 << 16)
        cum = hist.cumsum(0)
        if int(cum[-1]) < remaining:
            raise ValueError(f"rank {rank} exceeds the {int(cum[-1])} values")
        digit = int(torch.searchsorted(cum, torch.tensor(remaining, dtype=torch.int64)))
        remaining -= int(cum[digit - 1]) if digit else 0
        prefix = (prefix << 16) | digit
    return float(torch.tensor([prefix], dtype=torch.int64).to(ibits).view(dtype)[0])


def elected_signs(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """``sign(Σ_i τ̂_i)`` in float64 (0 where the sum is exactly 0)."""
    acc = torch.zeros(trimmed[0].shape, dtype=torch.float64, device=trimmed[0].device)
    for t in trimmed:
        acc += t.to(torch.float64)
    return torch.sign(acc)


def resolve_zero_signs(signs: torch.Tensor, zero_value: float) -> torch.Tensor:
    """``signs`` with its zeros replaced by ``zero_value`` (the majority sign, say)."""
    return torch.where(signs == 0, torch.full_like(signs, float(zero_value)), signs)


def disjoint_merge(trimmed: list[torch.Tensor], signs: torch.Tensor, merge_func: str = "mean") -> torch.Tensor:
    """Disjoint merge of one tensor's trimmed task vectors under the elected ``signs`` (float64):
    entries ``> 0`` where ``signs > 0``, else entries ``< 0``; ``merge_func`` sum / mean / max."""
    f = merge_func_name(merge_func)
    pos = signs > 0
    total = torch.zeros(signs.shape, dtype=torch.float64, device=signs.device)
    count = torch.zeros_like(total)
    best = torch.zeros_like(total)
    for t in trimmed:
        t64 = t.to(torch.float64)
        sel = torch.where(pos, t64 > 0, t64 < 0)
        v = torch.where(sel, t64, 0.0)
        if f == "max":
            best = torch.maximum(best, v.abs())
        else:
            total += v
            count += sel
    if f == "max":
        return best * signs
    if f == "mean":
        return total / count.clamp(min=1.0)
    return total


def ties_tensor(trimmed: list[torch.Tensor], merge_func: str = "mean", zero_sign: float = 1.0) -> torch.Tensor:
    """Elect + disjoint merge of one tensor's already-trimmed task vectors, in float64; an exact
    zero sum elects ``zero_sign`` (pass the whole vector's majority sign for the reference rule)."""
    return disjoint_merge(trimmed, resolve_zero_signs(elected_signs(trimmed), zero_sign), merge_func)


class TIES(ContinualStrategy):
    """Trim, elect sign, disjoint merge (the released code's rules by default)."""

    name = "ties"
    continual = False

    def __init__(
        self,
        base,
        *,
        density: float = 0.2,
        scale: float = 0.3,
        merge_func: str = "sum",
        zero_sign: str = "majority",
        trim_rule: str = "reference",
        trim_scope: str = "global",
        copy_base: bool = True,
    ):
        super().__init__(base, copy_base=copy_base)
        density_fraction(density)
        if trim_scope not in TRIM_SCOPES:
            raise ValueError(f"unknown trim_scope {trim_scope!r}; choose one of {TRIM_SCOPES}")
        if trim_rule not in TRIM_RULES:
            raise ValueError(f"unknown trim_rule {trim_rule!r}; choose one of {TRIM_RULES}")
        if zero_sign not in ZERO_SIGNS:
            raise ValueError(f"unknown zero_sign {zero_sign!r}; choose one of {ZERO_SIGNS}")
        self.density = float(density)
        self.scale = float(scale)
        self.merge_func = merge_func_name(merge_func)
        self.zero_sign = zero_sign
        self.trim_rule = trim_rule
        self.trim_scope = trim_scope
        self._taus: dict[str, dict[str, torch.Tensor]] = {}
        self._thresholds: dict[str, float | dict[str, float]] = {}

    def _thresholds_for(self, delta: dict[str, torch.Tensor]) -> float | dict[str, float]:
        if self.trim_scope == "tensor":
            return {k: trim_threshold(v.abs(), self.density, self.trim_rule) for k, v in delta.items()}
        # one task's magnitudes at a time, never all tasks of the model
        wide = torch.float32
        for v in delta.values():
            wide = torch.promote_types(wide, v.dtype)
        flat = torch.cat([v.detach().reshape(-1).abs().to(wide) for v in delta.values()])
        return trim_threshold(flat, self.density, self.trim_rule)

    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        q = self._thresholds_for(delta)
        self._taus[name] = delta
        self._thresholds[name] = q

    def _trimmed(self, name: str, key: str) -> torch.Tensor:
        tau = self._taus[name][key]
        q = self._thresholds[name]
        thr = q[key] if isinstance(q, dict) else q
        return torch.where(tau.abs().to(torch.float64) >= thr, tau, torch.zeros_like(tau))

    def zero_sign_value(self) -> float:
        """What an exact-zero elected sign becomes: +1 (``"positive"``), or the sign of the sum of
        every elected sign over all tensors (``"majority"``; negated for ``"minority"``). A first
        pass over the tensors, one at a time."""
        if self.zero_sign == "positive":
            return 1.0
        total = 0.0
        for k in self._base:
            total += float(elected_signs([self._trimmed(t, k) for t in self._tasks]).sum())
        majority = float(math.copysign(1.0, total)) if total != 0 else 0.0
        return majority if self.zero_sign == "majority" else -majority

    def _merged_delta(self) -> dict[str, torch.Tensor]:
        z = self.zero_sign_value()
        out = {}
        for k in self._base:
            m = ties_tensor([self._trimmed(t, k) for t in self._tasks], self.merge_func, z)
            out[k] = (m * self.scale).to(self._taus[self._tasks[0]][k].dtype)
        return out

    def _expert_delta(self, name: str) -> dict[str, torch.Tensor]:
        return self._taus[name]

    def _options(self) -> dict:
        return {
            "density": self.density,
            "scale": self.scale,
            "merge_func": self.merge_func,
            "zero_sign": self.zero_sign,
            "trim_rule": self.trim_rule,
            "trim_scope": self.trim_scope,
        }

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """``tau/<task index>/<key>``: every task vector."""
        return {f"tau/{i}/{k}": v for i, t in enumerate(self._tasks) for k, v in self._taus[t].items()}

    def _state_meta(self) -> dict:
        """Each task's trim threshold (a float, or ``{key: float}`` with ``trim_scope="tensor"``)
        and the ``density``/``trim_scope``/``trim_rule`` it was computed with."""
        return {
            "density": self.density,
            "trim_scope": self.trim_scope,
            "trim_rule": self.trim_rule,
            "thresholds": [self._thresholds[t] for t in self._tasks],
        }

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._taus = {t: self._saved_delta(tensors, f"tau/{i}/") for i, t in enumerate(self._tasks)}
        thresholds = meta.get("thresholds")
        if thresholds is None:  # a store (StrategyStore.to_strategy) keeps none: trim as if just folded
            self._thresholds = {t: self._thresholds_for(self._taus[t]) for t in self._tasks}
            return
        if len(thresholds) != len(self._tasks):
            raise ValueError(f"{len(thresholds)} thresholds for {len(self._tasks)} tasks")
        saved_rule = meta.get("trim_rule")
        if saved_rule is None:
            # written before the reference rules became the default (no trim_rule, merge_func or
            # zero_sign recorded): keep the rules it was merged with, so it gives the same numbers
            saved_rule = self.trim_rule = "ceil"
            self.merge_func, self.zero_sign = "mean", "positive"
        if meta["density"] == self.density and meta["trim_scope"] == self.trim_scope and saved_rule == self.trim_rule:
            self._thresholds = {
                t: ({k: float(q[k]) for k in self._base} if isinstance(q, dict) else float(q))
                for t, q in zip(self._tasks, thresholds)
            }
        else:  # loaded with another density/trim_scope/trim_rule: trim as if folded with it
            self._thresholds = {t: self._thresholds_for(self._taus[t]) for t in self._tasks}

    def _storage(self) -> StorageReport:
        per = {}
        for t in self._tasks:
            q = self._thresholds[t]
            per[t] = state_nbytes(self._taus[t]) + 8 * (len(q) if isinstance(q, dict) else 1)
        return StorageReport(0, per, "every task vector τ_i (one model per task) + its trim threshold")


class TIESRule(TensorRule):
    """On disk: every task vector (per task, frozen). A read makes three passes over them: each
    task's global trim threshold (:func:`kth_smallest_streaming`, exactly the in-memory
    ``kthvalue``), the majority sign, then the merge, one tensor at a time."""

    method = "ties"
    continual = False
    defaults: ClassVar[dict[str, Any]] = {
        "density": 0.2,
        "scale": 0.3,
        "merge_func": "sum",
        "zero_sign": "majority",
        "trim_rule": "reference",
        "trim_scope": "global",
    }
    strategy_cls: ClassVar[Any] = TIES

    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        validate_like(self.strategy_cls, opts)
        out = dict(opts)
        out["density"], out["scale"] = float(opts["density"]), float(opts["scale"])
        out["merge_func"] = merge_func_name(opts["merge_func"])
        return out

    def slots(self) -> list[Slot]:
        return [Slot("tau", per_task=True, frozen=True)]

    def fold(self, key, delta, old, task, shape):
        return {"tau": delta}

    def _threshold(self, q: Any, key: str, tau: torch.Tensor) -> float:
        return trim_threshold(tau.abs(), self.opts["density"], self.opts["trim_rule"]) if q is None else q

    def _trimmed(self, reader, key: str, t: int, q: Any) -> torch.Tensor:
        tau = reader.get("tau", key, t)
        thr = self._threshold(q, key, tau)
        return torch.where(tau.abs().to(torch.float64) >= thr, tau, torch.zeros_like(tau))

    def prepare(self, reader, keys, meta):
        o = self.opts
        thresholds: list[float | None] = [None] * reader.tasks
        if o["trim_scope"] == "global":
            w = torch.float32
            for k in keys:
                w = torch.promote_types(w, reader.dtypes[k])
            n = sum(math.prod(reader.shapes[k]) for k in keys)
            for t in range(reader.tasks):
                if n == 0:
                    thresholds[t] = float("inf")
                    continue
                rank = trim_rank(n, o["density"], o["trim_rule"])

                def magnitudes(t: int = t) -> Iterator[torch.Tensor]:
                    return (reader.get("tau", k, t).abs() for k in keys)

                thresholds[t] = kth_smallest_streaming(magnitudes, rank, w)
        if o["zero_sign"] == "positive":
            return thresholds, 1.0
        total = 0.0
        for k in keys:
            total += float(
                elected_signs([self._trimmed(reader, k, t, thresholds[t]) for t in range(reader.tasks)]).sum()
            )
        majority = float(math.copysign(1.0, total)) if total != 0 else 0.0
        return thresholds, (majority if o["zero_sign"] == "majority" else -majority)

    def merged(self, key, reader, meta, ctx):
        thresholds, z = ctx
        trimmed = [self._trimmed(reader, key, t, thresholds[t]) for t in range(reader.tasks)]
        m = ties_tensor(trimmed, self.opts["merge_func"], z)
        return (m * self.opts["scale"]).to(trimmed[0].dtype)

    def expert(self, key, reader, meta, ctx, task):
        return reader.get("tau", key, task)


register_rule("ties", TIESRule)
