"""Core ConDU math on state dicts: :func:`unify`, :func:`add_task` (one continual session) and
:func:`decouple`. Pure functions over ``Mapping[str, Tensor]``: no hidden state.

Notation, per tensor and element ``k``, tasks ``i = 1..n`` with deltas ``d_i``:

* elected sign ``s_k = +1 if Σ_i d_ik > 0 else -1`` (an exact zero sum elects -1);
* mask ``M_ik = [d_ik · s_k > 0]`` (zeros are never selected);
* unified ``u_k = s_k · max_i M_ik |d_ik|`` (0 where no bit is set);
* rescaler ``λ_i`` (see :data:`RESCALER_MODES`); expert ``δ̃_i = λ_i · M_i ⊙ u``.

Work is tensor by tensor; a backend (:mod:`condu_merge.backends`) does the element-wise part of
each tensor in bounded chunks, so nothing ever stacks all tasks of a whole model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from ._lazy import torch

from .backends import FlatMergeResult, MergeBackend, resolve_backend
from .errors import (
    DtypeMismatchError,
    DuplicateTaskError,
    KeyMismatchError,
    MergeInputError,
    NonFiniteError,
    ShapeMismatchError,
)
from .manifest_check import RESCALER_MODES as _RESCALER_MODES
from .packing import packed_nbytes, stack_rows
from .safetensors_writer import TensorSpec
from .trigger import Rescaler, TaskTrigger

RESCALER_MODES = _RESCALER_MODES  # one definition, in the torch-free manifest module
"""Rescaler modes.

* ``"tensor_mean"`` (default; the released code and EMR-Merging):
  ``λ_i = Σ_t mean|d_i[t]| / Σ_t mean|M_i[t] ⊙ u[t]|`` over tensors ``t`` (empty tensors skipped);
* ``"l1"`` (the paper's text): ``λ_i = Σ|d_i| / Σ|M_i ⊙ u|`` over all elements;
* ``"per_tensor"``: one ``λ_i[t] = Σ|d_i[t]| / Σ|M_i[t] ⊙ u[t]|`` per tensor.

A zero denominator gives ``λ = 0`` and a :class:`RescalerWarning` naming the task.
"""


class RescalerWarning(UserWarning):
    """A task's expert vanished (nothing of it survives in ``u``); its rescaler was set to 0."""


# ---------------------------------------------------------------------------- validation


def _label(names: Sequence[str] | None, i: int) -> str:
    return f"task {names[i]!r}" if names is not None else f"task #{i}"


def _check_rescaler(mode: str) -> None:
    if mode not in RESCALER_MODES:
        raise ValueError(f"unknown rescaler {mode!r}; choose one of {RESCALER_MODES}")


def _check_float(key: str, t: torch.Tensor, who: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise MergeInputError(f"{who}: value of key {key!r} is a {type(t).__name__}, not a torch.Tensor")
    if not t.is_floating_point():
        raise DtypeMismatchError(
            f"{who}: tensor {key!r} has non-floating dtype {t.dtype}; deltas must be floating point "
            "(build them with condu_merge.delta_from_state_dicts, which skips integer buffers)"
        )


def check_same_keys(ref: Iterable[str], other: Iterable[str], who: str, ref_who: str) -> None:
    """Raise :class:`KeyMismatchError` listing the missing and extra keys of ``other`` against ``ref``."""
    ref_set, other_set = set(ref), set(other)
    if ref_set != other_set:
        missing = sorted(ref_set - other_set)
        extra = sorted(other_set - ref_set)
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"extra keys {extra[:8]}{' …' if len(extra) > 8 else ''}")
        raise KeyMismatchError(f"{who} does not match {ref_who}: " + "; ".join(parts))


def _validate_structure(deltas: Sequence[Mapping[str, torch.Tensor]], task_names: Sequence[str] | None) -> list[str]:
    """The checks that read no tensor: a sequence, at least one task, names, equal key sets."""
    if isinstance(deltas, Mapping):
        raise MergeInputError("unify takes a sequence of state dicts (one per task), not a single state dict")
    if len(deltas) == 0:
        raise MergeInputError("no tasks given: unify needs at least one delta")
    if task_names is not None and len(task_names) != len(deltas):
        raise ValueError(f"{len(task_names)} task names for {len(deltas)} deltas")
    if task_names is not None:
        seen: set[str] = set()
        for name in task_names:
            if name is not None and name in seen:
                # triggers are looked up by task name: two with one name make one unreachable
                raise DuplicateTaskError(f"task name {name!r} is given twice; task names must be unique")
            seen.add(name)
    keys = list(deltas[0].keys())
    if not keys:
        raise MergeInputError(f"{_label(task_names, 0)} has no tensors")
    for i, d in enumerate(deltas[1:], start=1):
        check_same_keys(keys, d.keys(), _label(task_names, i), _label(task_names, 0))
    return keys


def _check_like(key: str, t: torch.Tensor, ref: torch.Tensor, who: str, ref_who: str, dtype_hint: str) -> None:
    """``t`` (task ``who``'s tensor ``key``) is a float tensor of ``ref``'s shape, dtype and device."""
    _check_float(key, t, who)
    if t.shape != ref.shape:
        raise ShapeMismatchError(f"{who}: tensor {key!r} has shape {tuple(t.shape)}, {ref_who} has {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise DtypeMismatchError(f"{who}: tensor {key!r} has dtype {t.dtype}, {ref_who} has {ref.dtype}; {dtype_hint}")
    if t.device != ref.device:
        raise MergeInputError(f"{who}: tensor {key!r} is on {t.device}, {ref_who}'s is on {ref.device}")


def _check_key_tensors(key: str, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    """Every task's tensor ``key`` is a float tensor of the first task's shape, dtype and device."""
    _check_float(key, tensors[0], labels[0])
    for t, who in zip(tensors[1:], labels[1:]):
        _check_like(
            key,
            t,
            tensors[0],
            who,
            labels[0],
            "mixed dtypes per tensor are refused: cast the deltas to one dtype first",
        )


def _eager(mappings: Sequence[Mapping[str, torch.Tensor]]) -> bool:
    """Plain dicts hold their tensors: validating them up front reads nothing twice."""
    return all(isinstance(d, dict) for d in mappings)


def validate_deltas(deltas: Sequence[Mapping[str, torch.Tensor]], task_names: Sequence[str] | None = None) -> list[str]:
    """Check that ``deltas`` can be unified; return the tensor names in the first task's order.

    Raises :class:`MergeInputError` subclasses naming the key and the task for: no tasks, a task
    with no tensors, differing key sets, shape/dtype/device mismatch, non-float tensors, and
    :class:`DuplicateTaskError` for a task name given twice.
    (NaN/Inf is detected during the merge itself, for free, from the L1 sums.)
    """
    keys = _validate_structure(deltas, task_names)
    labels = [_label(task_names, i) for i in range(len(deltas))]
    for key in keys:
        _check_key_tensors(key, [d[key] for d in deltas], labels)
    return keys


def _check_against_unified(key: str, t: torch.Tensor, ref: torch.Tensor, who: str) -> None:
    _check_like(key, t, ref, who, "the session", "cast the delta first")


def _validate_against_unified(
    unified: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], who: str, *, read: bool = True
) -> list[str]:
    """Key check; with ``read``, also every tensor's dtype, shape and device (a lazy ``delta``
    is better checked tensor by tensor as it is merged: ``read=False``)."""
    keys = list(unified.keys())
    check_same_keys(keys, delta.keys(), who, "the session's tensors")
    if read:
        for key in keys:
            _check_against_unified(key, delta[key], unified[key], who)
    return keys


def _check_finite(
    key: str, result: FlatMergeResult, flats: Sequence[torch.Tensor], rows: Sequence[int], labels: Sequence[str]
) -> None:
    """``num`` is an L1 sum in float64: finite iff the delta is (barring float64 overflow, rechecked)."""
    num = result.num.tolist()
    for row, flat, who in zip(rows, flats, labels):
        if not math.isfinite(num[row]):
            bad = ~torch.isfinite(flat)
            if bool(bad.any()):
                idx = int(bad.nonzero()[0, 0])
                raise NonFiniteError.at(who, key, idx)
            raise NonFiniteError.norm_overflow(who, key)


# ---------------------------------------------------------------------------- rescalers


def compute_rescalers(
    num: Sequence[Mapping[str, float]],
    den: Sequence[Mapping[str, float]],
    numel: Mapping[str, int],
    mode: str,
    task_names: Sequence[str] | None = None,
) -> list[Rescaler]:
    """λ per task from per-tensor L1 sums (``num[i][t] = Σ|d_i[t]|``, ``den[i][t] = Σ|M_i[t] ⊙ u[t]|``).

    Sums are float64 and accumulated in tensor order. See :data:`RESCALER_MODES` for the formulas.
    """
    _check_rescaler(mode)
    out: list[Rescaler] = []
    for i, (n_i, d_i) in enumerate(zip(num, den)):
        who = _label(task_names, i)
        if mode == "per_tensor":
            lam: dict[str, float] = {}
            for key in n_i:
                if d_i[key] > 0:
                    lam[key] = n_i[key] / d_i[key]
                else:
                    lam[key] = 0.0
                    if n_i[key] > 0:
                        warnings.warn(
                            f"{who}: nothing of tensor {key!r} survives in the unified delta; its rescaler is 0",
                            RescalerWarning,
                            stacklevel=3,
                        )
            out.append(lam)
            continue
        top = bot = 0.0
        for key in n_i:
            if mode == "tensor_mean":
                if numel[key] == 0:
                    continue
                top += n_i[key] / numel[key]
                bot += d_i[key] / numel[key]
            else:
                top += n_i[key]
                bot += d_i[key]
        if bot > 0:
            out.append(top / bot)
        else:
            warnings.warn(
                f"{who}: its expert vanished (no element survives in the unified delta); rescaler set to 0",
                RescalerWarning,
                stacklevel=3,
            )
            out.append(0.0)
    return out


# ---------------------------------------------------------------------------- unify / add_task


def _flat(t: torch.Tensor) -> torch.Tensor:
    # detach: the merge is not differentiable (masks are discrete), compiled backends cannot read
    # a tensor that requires grad, and a recorded graph would keep every chunk of every task alive
    return t.detach().reshape(-1)


def unify_tensor(
    tensors: Sequence[torch.Tensor],
    *,
    backend: str | MergeBackend = "auto",
    key: str = "<tensor>",
    labels: Sequence[str] | None = None,
) -> FlatMergeResult:
    """Unify one tensor's ``n`` task deltas (already validated to match): the per-tensor step of
    :func:`unify`, for callers that stream tensors (the store, distributed merging).

    Returns flat ``u``, packed masks ``uint8 [n, ceil(N/8)]`` and float64 L1 sums; raises
    :class:`NonFiniteError` naming ``key`` and the task if a delta holds NaN/Inf.
    """
    labels = list(labels) if labels is not None else [f"task #{i}" for i in range(len(tensors))]
    flats = [_flat(t) for t in tensors]
    be = resolve_backend(backend, flats[0].device)
    res = be.unify_flat(flats)
    _check_finite(key, res, flats, range(len(flats)), labels)
    return res


def add_task_tensor(
    u: torch.Tensor,
    packed_masks: Sequence[torch.Tensor],
    lambdas: Sequence[float],
    delta: torch.Tensor,
    *,
    backend: str | MergeBackend = "auto",
    key: str = "<tensor>",
    label: str = "the new task",
) -> FlatMergeResult:
    """One continual step on one tensor (the per-tensor step of :func:`add_task`): earlier experts
    are ``lambdas[i] · unpack(packed_masks[i]) ⊙ u``; ``delta`` is the new task's. Returns flat
    ``u``, ``t`` rows of packed masks (the new task last) and float64 L1 sums."""
    uf = _flat(u)
    d = _flat(delta)
    if len(packed_masks) == 0:
        return unify_tensor([d], backend=backend, key=key, labels=[label])
    nbytes = packed_nbytes(uf.numel())
    for i, m in enumerate(packed_masks):
        # a compiled backend does not bounds-check: a mask of another tensor would be read past its end
        if m.dtype != torch.uint8 or m.dim() != 1 or m.numel() != nbytes:
            raise ShapeMismatchError(
                f"tensor {key!r}: earlier mask #{i} is {tuple(m.shape)} {m.dtype}, expected 1-D uint8 of "
                f"{nbytes} bytes for {uf.numel()} elements"
            )
    masks = stack_rows(packed_masks, uf.device)
    be = resolve_backend(backend, uf.device)
    res = be.add_task_flat(uf, masks, list(lambdas), d)
    _check_finite(key, res, [d], [len(packed_masks)], [label])
    return res


def continual_step_tensor(
    spec: TensorSpec,
    delta: torch.Tensor,
    label: str,
    u: torch.Tensor | None = None,
    packed_masks: Sequence[torch.Tensor] = (),
    lambdas: Sequence[Rescaler] = (),
    *,
    backend: str | MergeBackend,
    device: torch.device | None = None,
) -> FlatMergeResult:
    """One tensor of a continual step: ``delta`` is checked against ``spec`` (shape and dtype);
    the first task (``u is None``) is :func:`~condu_merge.core.unify_tensor` of ``[delta]``, a later
    one :func:`~condu_merge.core.add_task_tensor` of ``u``, the earlier tasks' packed masks and
    their λ's at this tensor. ``device``: where the merge runs (inputs are moved there)."""
    if tuple(delta.shape) != tuple(spec.shape):
        raise ShapeMismatchError(
            f"{label}: tensor {spec.name!r} has shape {tuple(delta.shape)}, the store has {spec.shape}"
        )
    if delta.dtype != spec.dtype:
        raise DtypeMismatchError(f"{label}: tensor {spec.name!r} is {delta.dtype}, the store keeps {spec.dtype}")
    if device is not None:
        delta = delta.to(device)
    if u is None:
        return unify_tensor([delta], backend=backend, key=spec.name, labels=[label])
    if device is not None:
        u = u.to(device)
    lams = [lam[spec.name] if isinstance(lam, dict) else lam for lam in lambdas]
    return add_task_tensor(u, list(packed_masks), lams, delta, backend=backend, key=spec.name, label=label)


def unify(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    *,
    rescaler: str = "tensor_mean",
    backend: str | MergeBackend = "auto",
    task_names: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], list[TaskTrigger]]:
    """Unify ``n`` task deltas into one delta ``u`` plus one :class:`TaskTrigger` per task.

    Per element ``k``: ``s_k = sign(Σ_i d_ik)`` (``-1`` on an exact zero), ``M_ik = [d_ik s_k > 0]``,
    ``u_k = s_k max_i M_ik |d_ik|``; then ``λ_i`` by ``rescaler`` (see :data:`RESCALER_MODES`).
    ``u`` keeps each tensor's dtype (fp32, fp16, bf16, fp64); the election sum and the rescaler
    sums run in float64. ``deltas`` may be lazy mappings: each tensor is read when merged.

    Returns ``(unified, triggers)``, ``triggers[i]`` for ``deltas[i]``.
    """
    _check_rescaler(rescaler)
    eager = _eager(deltas)
    # eager dicts: every check before any merge work (fail fast); lazy mappings: each tensor is
    # read once and checked just before it is merged (a failure then loses only compute)
    keys = validate_deltas(deltas, task_names) if eager else _validate_structure(deltas, task_names)
    n = len(deltas)
    labels = [_label(task_names, i) for i in range(n)]
    unified: dict[str, torch.Tensor] = {}
    packed: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    num: list[dict[str, float]] = [{} for _ in range(n)]
    den: list[dict[str, float]] = [{} for _ in range(n)]
    shapes: dict[str, tuple[int, ...]] = {}
    numel: dict[str, int] = {}
    for key in keys:
        tensors = [d[key] for d in deltas]
        if not eager:
            _check_key_tensors(key, tensors, labels)
        shape = tuple(tensors[0].shape)
        res = unify_tensor(tensors, backend=backend, key=key, labels=labels)
        unified[key] = res.u.reshape(shape)
        shapes[key] = shape
        numel[key] = res.u.numel()
        nums, dens = res.num.tolist(), res.den.tolist()
        for i in range(n):
            packed[i][key] = res.masks[i]
            num[i][key] = nums[i]
            den[i][key] = dens[i]
    lams = compute_rescalers(num, den, numel, rescaler, task_names)
    triggers = [
        TaskTrigger(packed[i], dict(shapes), lams[i], task_names[i] if task_names is not None else None)
        for i in range(n)
    ]
    return unified, triggers


def add_task(
    unified: Mapping[str, torch.Tensor],
    triggers: Sequence[TaskTrigger],
    delta: Mapping[str, torch.Tensor],
    *,
    rescaler: str = "tensor_mean",
    backend: str | MergeBackend = "auto",
    task_name: str | None = None,
) -> tuple[dict[str, torch.Tensor], list[TaskTrigger]]:
    """One continual session: ``unify([decouple(u, T_1), …, decouple(u, T_{t-1}), delta])``,
    computed directly from ``u``, the packed masks and the rescalers, never materialising an expert.

    Expert ``i`` at element ``k`` is ``λ_i M_ik u_k``, so the election sum is
    ``u_k Σ_{i: M_ik} λ_i + d_k``, an earlier expert survives at ``k`` iff its bit is set,
    ``u_k`` has the elected sign and ``λ_i u_k`` does not round to zero, and the largest earlier magnitude is ``|u_k| max_{i survives} λ_i``.
    Agrees with the naive decouple-then-unify up to floating-point rounding (the election sum
    and the L1 norms here are float64 and exact where the naive route rounds each expert).

    With no earlier triggers this is ``unify([delta])``. Returns the new ``(unified, triggers)``
    (``t`` triggers, the new task's last); the inputs are not modified.
    """
    _check_rescaler(rescaler)
    t_prev = len(triggers)
    names = [tr.task if tr.task is not None else f"#{i}" for i, tr in enumerate(triggers)] + [
        task_name if task_name is not None else f"#{t_prev}"
    ]
    new_who = _label(names, t_prev)
    if t_prev == 0:
        return unify([delta], rescaler=rescaler, backend=backend, task_names=[names[-1]])
    eager = _eager([delta])
    keys = _validate_against_unified(unified, delta, new_who, read=eager)
    for i, tr in enumerate(triggers):
        check_same_keys(keys, tr.names, f"trigger of {_label(names, i)}", "the session's tensors")
        for key in keys:
            if tuple(tr.shapes[key]) != tuple(unified[key].shape):
                raise ShapeMismatchError(
                    f"trigger of {_label(names, i)}: tensor {key!r} has shape {tuple(tr.shapes[key])}, "
                    f"the session's u has {tuple(unified[key].shape)}"
                )
    new_unified: dict[str, torch.Tensor] = {}
    packed: list[dict[str, torch.Tensor]] = [{} for _ in range(t_prev + 1)]
    num: list[dict[str, float]] = [{} for _ in range(t_prev + 1)]
    den: list[dict[str, float]] = [{} for _ in range(t_prev + 1)]
    shapes: dict[str, tuple[int, ...]] = {}
    numel: dict[str, int] = {}
    for key in keys:
        u = unified[key]
        shape = tuple(u.shape)
        d = delta[key]
        if not eager:
            _check_against_unified(key, d, u, new_who)
        res = add_task_tensor(
            u,
            [tr.packed[key] for tr in triggers],
            [tr.rescaler_for(key) for tr in triggers],
            d,
            backend=backend,
            key=key,
            label=new_who,
        )
        new_unified[key] = res.u.reshape(shape)
        shapes[key] = shape
        numel[key] = u.numel()
        nums, dens = res.num.tolist(), res.den.tolist()
        for i in range(t_prev + 1):
            packed[i][key] = res.masks[i]
            num[i][key] = nums[i]
            den[i][key] = dens[i]
    lams_new = compute_rescalers(num, den, numel, rescaler, names)
    out = [
        TaskTrigger(packed[i], dict(shapes), lams_new[i], triggers[i].task if i < t_prev else task_name)
        for i in range(t_prev + 1)
    ]
    return new_unified, out


# ---------------------------------------------------------------------------- decouple


def decouple(
    unified: Mapping[str, torch.Tensor],
    trigger: TaskTrigger,
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    backend: str | MergeBackend = "auto",
) -> dict[str, torch.Tensor]:
    """Rebuild a task's delta ``δ̃ = λ · M ⊙ u`` (``λ[t]`` per tensor in ``per_tensor`` mode).

    Each element is ``round_to_dtype(u_k · λ)`` where its mask bit is set, else 0, in ``u``'s dtype.
    With ``base`` (the pretrained state dict) it returns the expert ``θ_0 + δ̃`` in ``base``'s
    dtypes instead; entries of ``base`` that ``u`` does not cover are returned unchanged (the same
    tensor objects, on their own device). Rebuilt tensors are on ``u``'s device whatever
    ``base``'s: move ``base`` (or ``u``) first to get an expert on one device.
    The rebuilt tensors carry no autograd history (inputs that require grad are read detached).
    """
    who = f"trigger of task {trigger.task!r}" if trigger.task is not None else "trigger"
    check_same_keys(unified.keys(), trigger.names, who, "the unified delta")
    out: dict[str, torch.Tensor] = {}
    for key in trigger.names:
        u = unified[key]
        if tuple(u.shape) != tuple(trigger.shapes[key]):
            raise ShapeMismatchError(
                f"{who}: tensor {key!r} has shape {tuple(trigger.shapes[key])}, u has {tuple(u.shape)}"
            )
        b = None
        if base is not None:
            if key not in base:
                raise KeyMismatchError(f"base state dict lacks tensor {key!r}")
            b = base[key]
            if tuple(b.shape) != tuple(u.shape):
                raise ShapeMismatchError(f"base tensor {key!r} has shape {tuple(b.shape)}, u has {tuple(u.shape)}")
            b = _flat(b.to(u.device))
        uf = _flat(u)
        be = resolve_backend(backend, uf.device)
        out[key] = be.decouple_flat(uf, trigger.packed[key].to(uf.device), trigger.rescaler_for(key), b).reshape(
            u.shape
        )
    if base is not None:
        for key, v in base.items():
            if key not in out:
                out[key] = v
    return out


# ---------------------------------------------------------------------------- state-dict helpers


def delta_from_state_dicts(
    base: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    *,
    keys: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """``finetuned - base`` for every floating-point entry (integer buffers such as position ids
    are skipped). ``keys`` restricts the entries; ``dtype`` casts the result (default: the
    fine-tuned tensor's dtype; the subtraction itself runs in float32 or wider)."""
    wanted = list(keys) if keys is not None else list(finetuned.keys())
    out: dict[str, torch.Tensor] = {}
    for k in wanted:
        if k not in finetuned:
            raise KeyMismatchError(f"fine-tuned state dict lacks tensor {k!r}")
        f = finetuned[k]
        if not f.is_floating_point():
            continue
        if k not in base:
            raise KeyMismatchError(f"base state dict lacks tensor {k!r}")
        b = base[k]
        if tuple(b.shape) != tuple(f.shape):
            raise ShapeMismatchError(f"tensor {k!r}: base shape {tuple(b.shape)} vs fine-tuned {tuple(f.shape)}")
        wide = torch.promote_types(torch.promote_types(f.dtype, b.dtype), torch.float32)
        out[k] = (f.to(wide) - b.to(device=f.device, dtype=wide)).to(dtype or f.dtype)
    return out


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base + delta`` for every key of ``delta`` (in ``base``'s dtype); other entries unchanged."""
    out = dict(base)
    for k, d in delta.items():
        if k not in base:
            raise KeyMismatchError(f"base state dict lacks tensor {k!r}")
        b = base[k]
        out[k] = (b + d.to(b.device)).to(b.dtype)
    return out
