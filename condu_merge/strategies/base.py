"""The :class:`ContinualStrategy` interface shared by every continual strategy in this package.

A strategy owns the *merged* tensors of a model (all of them for full fine-tuning, or the LoRA
tensors, or whatever subset the caller chooses) and sees tasks one at a time::

    strat = get_strategy("pam", base=trainable_state)      # θ_0 of the merged tensors
    for task in tasks:
        start = strat.begin_task(task)                     # where training starts (+ optional hook)
        load(model, start.params)
        opt = make_optimizer(named_params)
        handles = start.hook.attach(named_params, optimizer=opt) if start.hook else []
        for batch in data[task]:
            loss = task_loss(model, batch)
            if start.hook: loss = loss + start.hook.loss(named_params)
            loss.backward(); opt.step(); opt.zero_grad()  # attach() runs hook.after_step here
        for h in handles: h.remove()
        strat.end_task(task, params=trained_state)         # or delta=θ_t − θ_0
    strat.model_for_inference(task=None)                   # state dict to evaluate
    strat.expert("cars"), strat.stored_bytes().total

Everything is keyed by the names of ``base``; every tensor a strategy returns is a fresh copy, so
the caller may load it into a model and train it in place. Work is tensor by tensor: a strategy
never stacks all tasks of the whole model; the ones that inherently keep every task vector
(task arithmetic, TIES, EMR) say so in :meth:`ContinualStrategy.stored_bytes`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch

from ..core import check_same_keys
from ..errors import (
    DtypeMismatchError,
    DuplicateTaskError,
    MergeInputError,
    NonFiniteError,
    ShapeMismatchError,
    UnknownTaskError,
)

StateDict = Mapping[str, torch.Tensor]


class StrategyStateError(MergeInputError):
    """The strategy's begin/end protocol was broken (end without begin, a second open task, …)."""


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements (what it costs in a checkpoint, ignoring headers)."""
    return t.numel() * t.element_size()


def state_nbytes(sd: StateDict) -> int:
    """Bytes of all tensors of a state dict."""
    return sum(tensor_nbytes(t) for t in sd.values())


# ---------------------------------------------------------------------------- training hooks

class TrainingHook:
    """What a strategy asks of the training loop, in a form any torch loop can use.

    * :meth:`loss` returns a scalar to **add** to the task loss (``0`` tensor if none);
    * :meth:`after_step` acts on the parameters after an optimizer step (PAM's periodic
      re-initialisation of sign-conflicting weights is one); call it after ``opt.step()``,
      or let :meth:`attach` register it on the optimizer;
    * :meth:`attach` registers the hook's gradient hooks on the parameters and, when given the
      ``optimizer``, an optimizer step post-hook calling :meth:`after_step`; it returns their
      handles (call ``h.remove()`` on each when the task's training ends).

    ``params`` maps the strategy's tensor names (the keys of ``base``) to the live
    ``torch.nn.Parameter`` objects being trained; the caller maps its module names to them.
    The base class does nothing; strategies subclass it.
    """

    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        first = next(iter(params.values()), None)
        return torch.zeros((), device=first.device if first is not None else None)

    def after_step(self, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Called once after every optimizer step (no-op here)."""

    def attach(
        self, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
    ) -> list:
        """Register the hook on ``params`` (and on ``optimizer``'s steps when given); returns the
        handles to ``remove()`` when the task's training ends."""
        handles = []
        if optimizer is not None and type(self).after_step is not TrainingHook.after_step:
            live = dict(params)

            def _post(opt, args, kwargs):  # torch's step post-hook signature
                self.after_step(live, opt)

            handles.append(optimizer.register_step_post_hook(_post))
        return handles


@dataclass(frozen=True)
class TaskStart:
    """Where a task's training starts.

    ``params``: values to load into the merged tensors before training (fresh copies, keyed like
    ``base``); ``source``: ``"base"`` (θ_0), ``"previous"`` (the last task's trained weights) or
    ``"merged"`` (the current merged weights); ``hook``: an optional :class:`TrainingHook`.
    """

    params: dict[str, torch.Tensor]
    source: str
    hook: TrainingHook | None = None


@dataclass(frozen=True)
class StorageReport:
    """What a strategy keeps beyond the pretrained weights θ_0, and its cost in bytes.

    ``shared_bytes`` are stored once whatever the number of tasks (a merged model, ConDU's unified
    delta, the last fine-tuned model); ``per_task_bytes[name]`` is what task ``name`` adds (a full
    task vector, a bit-packed mask plus its rescaler, …). ``what`` says it in words.
    """

    shared_bytes: int
    per_task_bytes: dict[str, int]
    what: str

    @property
    def total(self) -> int:
        return self.shared_bytes + sum(self.per_task_bytes.values())


# ---------------------------------------------------------------------------- the interface

class ContinualStrategy(ABC):
    """A continual strategy over the tensors of ``base`` (θ_0).

    Protocol per task: :meth:`begin_task` → train from ``start.params`` (with ``start.hook``) →
    :meth:`end_task` with the trained values (``params``) or the delta ``θ_t − θ_0`` (``delta``).
    A failed :meth:`end_task` (bad keys, shapes, NaN …) leaves the strategy as it was and the
    task still open. Subclasses implement :meth:`_fold`, :meth:`_merged_delta`, :meth:`_storage`
    and, if they keep per-task state, :meth:`_expert_delta`.

    Class attributes: ``name`` (registry key), ``task_aware`` (whether
    :meth:`model_for_inference` uses the task id), ``continual`` (whether it runs with O(1)
    models in the number of tasks, as opposed to a non-continual reference that keeps every
    task vector).
    """

    name: ClassVar[str] = "?"
    task_aware: ClassVar[bool] = False
    continual: ClassVar[bool] = True

    def __init__(self, base: StateDict, *, copy_base: bool = True):
        if isinstance(base, torch.nn.Module):
            raise MergeInputError("base must be a state dict of tensors, not a module (use module.state_dict())")
        if not isinstance(base, Mapping) or len(base) == 0:
            raise MergeInputError("base must be a non-empty mapping of tensor names to tensors")
        clean: dict[str, torch.Tensor] = {}
        for k, v in base.items():
            if not isinstance(v, torch.Tensor):
                raise MergeInputError(f"base: value of key {k!r} is a {type(v).__name__}, not a torch.Tensor")
            if not v.is_floating_point():
                raise DtypeMismatchError(
                    f"base: tensor {k!r} has non-floating dtype {v.dtype}; pass only the merged (float) tensors"
                )
            v = v.detach()
            clean[k] = v.clone() if copy_base else v
        self._base = clean
        self._tasks: list[str] = []
        self._open: str | None = None

    # ------------------------------------------------------------------ public state
    @property
    def base(self) -> dict[str, torch.Tensor]:
        """θ_0 (the strategy's own tensors; do not modify them in place)."""
        return dict(self._base)

    @property
    def task_names(self) -> list[str]:
        """Tasks folded in so far, in order."""
        return list(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={self._tasks}, tensors={len(self._base)})"

    # ------------------------------------------------------------------ protocol
    def begin_task(self, name: str) -> TaskStart:
        """Open task ``name`` and return where its training starts (fresh copies)."""
        if not isinstance(name, str) or not name:
            raise ValueError("a task name must be a non-empty string")
        if name in self._tasks:
            raise DuplicateTaskError(f"{self.name}: task {name!r} was already learned; task names are unique")
        if self._open is not None and self._open != name:
            raise StrategyStateError(
                f"{self.name}: task {self._open!r} is still open; call end_task({self._open!r}, …) first"
            )
        start = self._start(name)
        self._open = name
        return start

    def end_task(
        self,
        name: str,
        *,
        params: StateDict | None = None,
        delta: StateDict | None = None,
    ) -> None:
        """Fold the open task ``name`` in, from its trained values ``params`` (θ_t) or its
        ``delta`` (θ_t − θ_0), exactly one of them, keyed like ``base``."""
        if self._open != name:
            if self._open is None:
                raise StrategyStateError(f"{self.name}: end_task({name!r}) without begin_task({name!r})")
            raise StrategyStateError(f"{self.name}: end_task({name!r}) but the open task is {self._open!r}")
        if (params is None) == (delta is None):
            raise ValueError("end_task takes exactly one of params= (θ_t) or delta= (θ_t − θ_0)")
        who = f"task {name!r}"
        if params is not None:
            self._check_state(params, who + " (params)")
            d = {k: self._sub(params[k], self._base[k]) for k in self._base}
        else:
            assert delta is not None
            self._check_state(delta, who + " (delta)")
            # copy=True: the strategy must not alias tensors the caller may reuse
            d = {k: delta[k].detach().to(device=b.device, dtype=b.dtype, copy=True) for k, b in self._base.items()}
        self._check_finite(d, who)
        self._fold(name, d)  # must commit only on success
        self._tasks.append(name)
        self._open = None

    def expert(self, name: str) -> dict[str, torch.Tensor]:
        """Task ``name``'s model (θ_0 + its delta). Strategies that keep no per-task state return
        their single merged model (the model every task is evaluated with)."""
        self._require(name)
        return self._absolute(self._expert_delta(name))

    def model_for_inference(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """The state dict to evaluate. Task-aware strategies (``task_aware``) return
        :meth:`expert` when ``task`` is given and θ_0 + the merged delta otherwise; the others
        ignore ``task`` (after checking it is known) and return their merged model."""
        if not self._tasks:
            return {k: v.clone() for k, v in self._base.items()}
        if task is not None:
            self._require(task)
            if self.task_aware:
                return self.expert(task)
        return self._absolute(self._merged_delta())

    def stored_bytes(self) -> StorageReport:
        """What the strategy stores beyond θ_0 and the bytes it costs."""
        return self._storage()

    # ------------------------------------------------------------------ for subclasses
    def _start(self, name: str) -> TaskStart:
        """Default: every task starts from θ_0 (non-continual references, ConDU)."""
        return TaskStart({k: v.clone() for k, v in self._base.items()}, "base")

    @abstractmethod
    def _fold(self, name: str, delta: dict[str, torch.Tensor]) -> None:
        """Fold the (validated, finite) ``delta`` of task ``name`` in; commit only on success."""

    @abstractmethod
    def _merged_delta(self) -> dict[str, torch.Tensor]:
        """The merged delta (only called with at least one task)."""

    def _expert_delta(self, name: str) -> dict[str, torch.Tensor]:
        return self._merged_delta()

    @abstractmethod
    def _storage(self) -> StorageReport:
        ...

    # ------------------------------------------------------------------ helpers
    def _require(self, name: str) -> None:
        if name not in self._tasks:
            raise UnknownTaskError(f"{self.name}: no task {name!r}; tasks: {self._tasks}")

    def _absolute(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """θ_0 + delta in θ_0's dtype (the sum runs in float32 or wider)."""
        out = {}
        for k, b in self._base.items():
            wide = torch.promote_types(torch.promote_types(b.dtype, delta[k].dtype), torch.float32)
            out[k] = (b.to(wide) + delta[k].to(device=b.device, dtype=wide)).to(b.dtype)
        return out

    @staticmethod
    def _sub(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return (a.detach().to(device=b.device, dtype=wide) - b.to(wide)).to(b.dtype)

    def _check_state(self, sd: StateDict, who: str) -> None:
        if not isinstance(sd, Mapping):
            raise MergeInputError(f"{self.name}: {who} must be a mapping of tensor names to tensors")
        check_same_keys(self._base.keys(), sd.keys(), f"{self.name}: {who}", "base")
        for k, b in self._base.items():
            t = sd[k]
            if not isinstance(t, torch.Tensor):
                raise MergeInputError(f"{self.name}: {who}: value of key {k!r} is a {type(t).__name__}, not a tensor")
            if not t.is_floating_point():
                raise DtypeMismatchError(f"{self.name}: {who}: tensor {k!r} has non-floating dtype {t.dtype}")
            if tuple(t.shape) != tuple(b.shape):
                raise ShapeMismatchError(
                    f"{self.name}: {who}: tensor {k!r} has shape {tuple(t.shape)}, base has {tuple(b.shape)}"
                )

    def _check_finite(self, d: Mapping[str, torch.Tensor], who: str) -> None:
        for k, t in d.items():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                idx = int(bad.reshape(-1).nonzero()[0, 0])
                raise NonFiniteError(f"{self.name}: {who}: tensor {k!r} contains NaN or Inf (first at flat index {idx})")


# ---------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., ContinualStrategy]] = {}


def register_strategy(name: str, factory: Callable[..., ContinualStrategy], *, overwrite: bool = False) -> None:
    """Register ``factory(base, **kw)`` under ``name``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"strategy {name!r} is already registered")
    _REGISTRY[name] = factory


def available_strategies() -> list[str]:
    """Registered strategy names."""
    return sorted(_REGISTRY)


def get_strategy(name: str, base: StateDict, **kw) -> ContinualStrategy:
    """A new strategy ``name`` over ``base`` (θ_0 of the merged tensors); ``kw`` are its options."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {available_strategies()}") from None
    return factory(base, **kw)

