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
    strat.save("run.strategy.safetensors")                 # between tasks; atomic
    strat = load_strategy("run.strategy.safetensors")      # resume: bit-identical behaviour

Everything is keyed by the names of ``base``; every tensor a strategy returns is a fresh copy, so
the caller may load it into a model and train it in place. Work is tensor by tensor: a strategy
never stacks all tasks of the whole model; the ones that inherently keep every task vector
(task arithmetic, TIES, EMR) say so in :meth:`ContinualStrategy.stored_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    import torch
    from torch.utils.hooks import RemovableHandle
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..core import check_same_keys
from ..errors import (
    ConduError,
    DtypeMismatchError,
    DuplicateTaskError,
    FormatError,
    KeyMismatchError,
    MergeInputError,
    NonFiniteError,
    ShapeMismatchError,
    UnknownTaskError,
)
from ..pipeline import fsync_dir
from ..safetensors_writer import (
    ST_ITEMSIZE,
    StreamingSafetensorsWriter,
    TensorSpec,
    dtype_to_str,
    tensor_bytes,
)

StateDict = Mapping[str, "torch.Tensor"]
_S = TypeVar("_S", bound="ContinualStrategy")

STRATEGY_FORMAT = "condu-merge-strategy"
STRATEGY_VERSION = 1


class StrategyStateError(MergeInputError):
    """The strategy's begin/end protocol was broken (end without begin, a second open task, …)."""


class BaseMismatchError(MergeInputError):
    """The θ_0 handed to :func:`load_strategy` is not the one the strategy file was saved with
    (different values; different names, shapes or dtypes raise the key/shape/dtype errors)."""


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
    ) -> list[RemovableHandle]:
        """Register the hook on ``params`` (and on ``optimizer``'s steps when given); returns the
        handles to ``remove()`` when the task's training ends."""
        handles: list[RemovableHandle] = []
        if optimizer is not None and type(self).after_step is not TrainingHook.after_step:
            live = dict(params)

            # torch's step post-hook signature
            def _post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
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

    **Persistence.** :meth:`save` writes the whole strategy to one safetensors file and
    :func:`load_strategy` / :meth:`load` read it back (format: :data:`STRATEGY_FORMAT`, see
    docs/strategies.md). A subclass supports it by implementing four small methods:

    * ``_options() -> dict``: the constructor keyword arguments that re-create it over the same
      θ_0 (JSON values only; never ``copy_base``);
    * ``_state_tensors() -> dict[str, Tensor]``: every tensor of its state, under names of the
      form ``<kind>/<key>`` or ``<kind>/<task index>/<key>`` (task *indices* into
      :attr:`task_names`, never task names; the prefix ``base/`` is reserved);
    * ``_state_meta() -> dict``: the rest of its state as JSON (floats round-trip exactly);
    * ``_restore(tensors, meta) -> None``: called on a freshly constructed instance (built with
      the stored options plus the loader's overrides) whose :attr:`task_names` are already set;
      ``tensors`` holds what ``_state_tensors`` returned (verified, on θ_0's device), ``meta``
      what ``_state_meta`` returned. It must leave the strategy behaving bit for bit like the
      saved one. Missing entries may raise ``KeyError`` (reported as a damaged file).
      :meth:`_saved_delta` reads one ``<prefix><key>`` delta per base key and checks its shape.
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

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, include_base: bool = True) -> None:
        """Write the strategy to the safetensors file ``path``, atomically.

        The file holds the options, the task list, θ_0's fingerprint (names, shapes, dtypes and
        sha256 of every tensor), the strategy's state and, with ``include_base``, θ_0 itself
        (without it, :func:`load_strategy` needs the same θ_0 back). It is written to a temporary
        file in the same directory, fsynced and renamed over ``path`` (then the directory is
        fsynced), so a crash at any moment leaves either the previous file or the new one.
        Saving while a task is open raises :class:`StrategyStateError` (its training is not
        part of any state yet: save before ``begin_task`` or after ``end_task``).
        """
        if self._open is not None:
            raise StrategyStateError(
                f"{self.name}: cannot save to {os.fspath(path)!r} while task {self._open!r} is open; "
                f"call end_task({self._open!r}, …) first (or save before begin_task)"
            )
        if type(self)._options is ContinualStrategy._options:
            raise NotImplementedError(
                f"strategy {self.name!r} ({type(self).__name__}) does not support save(): it must implement "
                "_options, _state_tensors, _state_meta and _restore (see ContinualStrategy)"
            )
        path = os.fspath(path)
        options = dict(self._options())
        for k, v in options.items():
            try:
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise MergeInputError(
                    f"{self.name}: cannot save to {path!r}: option {k}={v!r} is not JSON ({exc})"
                ) from None
        state = dict(self._state_tensors())
        for k, t in state.items():
            if not isinstance(k, str) or k.startswith("base/") or "/" not in k:
                raise ValueError(
                    f"{self.name}: state tensor name {k!r} must look like '<kind>/<key>' and not start with 'base/'"
                )
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{self.name}: state entry {k!r} is a {type(t).__name__}, not a tensor")
        tensors: dict[str, torch.Tensor] = {}
        if include_base:
            tensors.update({f"base/{k}": v for k, v in self._base.items()})
        tensors.update(state)
        fingerprint = base_fingerprint(self._base)
        from .. import __version__

        meta = {
            "format": STRATEGY_FORMAT,
            "version": str(STRATEGY_VERSION),
            "writer": f"condu-merge {__version__}",
            "strategy": self.name,
            "options": json.dumps(options),
            "tasks": json.dumps(list(self._tasks)),
            "base": json.dumps(fingerprint),
            "base_sha256": fingerprint_sha256(fingerprint),
            "base_included": "1" if include_base else "0",
            "state": _dumps_state(self.name, path, self._state_meta()),
            "checksums": json.dumps({k: tensor_sha256(t) for k, t in state.items()}),
        }
        meta["header_sha256"] = metadata_sha256(meta)
        _write_atomic(path, tensors, meta)

    def to_store(self, path: str | os.PathLike[str]) -> Any:
        """Write this strategy as a new crash-safe store at ``path`` (see
        :meth:`condu_merge.strategy_store.StrategyStore.from_strategy`): ``condu-merge add-task``,
        ``export`` and ``inspect`` go on from it, and :func:`load_strategy` reads it back."""
        from ..strategy_store import StrategyStore

        return StrategyStore.from_strategy(self, path)

    def options(self) -> dict[str, Any]:
        """The constructor options (JSON) that re-create this strategy over the same θ_0."""
        return dict(self._options())

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, meta)``: the state :meth:`save` writes -- tensors named ``<kind>/<key>``
        or ``<kind>/<task index>/<key>`` (the slots of the strategy's on-disk rule), and the rest
        as JSON. Refused while a task is open."""
        if self._open is not None:
            raise StrategyStateError(
                f"{self.name}: task {self._open!r} is open; call end_task({self._open!r}, …) first"
            )
        return dict(self._state_tensors()), dict(self._state_meta())

    @classmethod
    def from_state(
        cls: type[_S],
        base: StateDict,
        tasks: list[str],
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        **options: Any,
    ) -> _S:
        """A strategy over ``base`` holding ``tasks`` whose state is ``(tensors, meta)`` as
        :meth:`state` returns it (e.g. read from a :class:`~condu_merge.strategy_store.StrategyStore`);
        missing or malformed entries raise :class:`FormatError`."""
        strat = cls(base, **options)
        if not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
            raise FormatError(f"{cls.name}: task names must be unique non-empty strings: {tasks!r}")
        strat._tasks = list(tasks)
        try:
            strat._restore(tensors, meta)
        except KeyError as exc:
            raise FormatError(f"{cls.name} state: entry {exc} is missing") from None
        except (TypeError, ValueError, IndexError, AttributeError) as exc:
            raise FormatError(f"{cls.name} state is damaged ({type(exc).__name__}: {exc})") from None
        return strat

    @classmethod
    def load(
        cls: type[_S],
        path: str | os.PathLike[str],
        base: StateDict | None = None,
        *,
        verify: bool = True,
        **overrides: Any,
    ) -> _S:
        """Read a strategy saved by :meth:`save`; the file must hold a strategy of this class
        (``ContinualStrategy.load`` accepts any). See :func:`load_strategy`."""
        return _load(path, base, verify=verify, overrides=overrides, expect=None if cls is ContinualStrategy else cls)  # type: ignore[return-value]

    def _options(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON) re-creating this strategy over the same θ_0."""
        raise NotImplementedError

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state, named ``<kind>/<key>`` or ``<kind>/<task index>/<key>``."""
        raise NotImplementedError

    def _state_meta(self) -> dict[str, Any]:
        """The non-tensor state, as JSON."""
        return {}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Rebuild the state from :meth:`_state_tensors` / :meth:`_state_meta` output."""
        raise NotImplementedError

    def _saved_delta(self, tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """``{key: tensors[prefix + key]}`` over the base keys, each checked to have the base's shape
        and a floating dtype (a ``FormatError`` otherwise)."""
        out = {}
        for k, b in self._base.items():
            t = tensors[prefix + k]
            if tuple(t.shape) != tuple(b.shape) or not t.is_floating_point():
                raise FormatError(
                    f"tensor {prefix + k!r} is {tuple(t.shape)} {t.dtype}; expected a float tensor of shape {tuple(b.shape)}"
                )
            out[k] = t
        return out

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
    def _storage(self) -> StorageReport: ...

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
                raise NonFiniteError.at(f"{self.name}: {who}", k, idx)


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


def get_strategy(name: str, base: StateDict, **kw: Any) -> ContinualStrategy:
    """A new strategy ``name`` over ``base`` (θ_0 of the merged tensors); ``kw`` are its options."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {available_strategies()}") from None
    return factory(base, **kw)


def strategy_class(name: str) -> type[ContinualStrategy]:
    """The class registered as ``name`` (``ValueError`` if unknown, or registered as a factory
    function rather than a :class:`ContinualStrategy` subclass)."""
    factory = _REGISTRY.get(name)
    if not (isinstance(factory, type) and issubclass(factory, ContinualStrategy)):
        raise ValueError(f"no strategy class registered as {name!r}; registered: {available_strategies()}")
    return factory


# ---------------------------------------------------------------------------- persistence


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw little-endian element bytes (row-major; on CPU)."""
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def base_fingerprint(base: StateDict) -> list[dict[str, Any]]:
    """θ_0's identity, tensor by tensor, in key order: ``[{"key", "dtype", "shape", "sha256"}]``
    (dtype as safetensors names it, sha256 over the tensor's bytes). Never concatenates tensors."""
    return [
        {"key": k, "dtype": dtype_to_str(v.dtype), "shape": [int(d) for d in v.shape], "sha256": tensor_sha256(v)}
        for k, v in base.items()
    ]


def fingerprint_sha256(fingerprint: list[dict[str, Any]]) -> str:
    """One sha256 for all of θ_0: over the canonical JSON of :func:`base_fingerprint` (which
    holds every tensor's name, dtype, shape and byte hash, in order)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def metadata_sha256(meta: Mapping[str, str]) -> str:
    """sha256 over the canonical JSON of every metadata entry except ``header_sha256`` itself, so a
    damaged header is reported as such instead of as, e.g., a base mismatch."""
    body = {k: v for k, v in meta.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def backend_option(backend: Any) -> str:
    """A ``backend=`` argument as saved: its name. Every backend gives bit-identical results (the
    numeric contract of :mod:`condu_merge.backends.base`), so the backend is a speed choice, not
    state: an object that is not a registered, available backend is saved as ``"auto"``; pass
    ``backend=`` to :func:`load_strategy` to use it again."""
    if isinstance(backend, str):
        return backend
    from ..backends import available_backends

    name = getattr(backend, "name", None)
    return name if isinstance(name, str) and name in available_backends() else "auto"


def _dumps_state(name: str, path: str, state: Any) -> str:
    try:
        return json.dumps(state)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: cannot save to {path!r}: _state_meta() is not JSON ({exc})") from None


def _write_atomic(path: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    """Write ``tensors`` (one at a time, moved to CPU as written) to a temporary file beside
    ``path``, fsync it, rename it over ``path`` and fsync the directory. On any error the
    temporary file is removed and ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    try:
        with StreamingSafetensorsWriter(tmp, specs, meta) as w:
            for k, t in tensors.items():
                w.write(k, t)
            w.close()  # flush + fsync
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def _json_field(path: str, meta: Mapping[str, str], field: str, kind: type) -> Any:
    if field not in meta:
        raise FormatError(f"{path}: strategy file metadata lacks {field!r}")
    try:
        value = json.loads(meta[field])
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: strategy file metadata {field!r} is not valid JSON ({exc})") from None
    if not isinstance(value, kind):
        raise FormatError(
            f"{path}: strategy file metadata {field!r} is a {type(value).__name__}, not a {kind.__name__}"
        )
    return value


def _check_base_against(
    path: str, fingerprint: list[dict[str, Any]], base: StateDict, *, given: bool, values: bool = True
) -> None:
    """Check ``base`` (the caller's when ``given``, else the file's own) against the stored
    fingerprint; the first mismatching key is named."""
    what = "the given base" if given else "the base stored in the file"
    err_key, err_shape, err_dtype, err_value = (
        (KeyMismatchError, ShapeMismatchError, DtypeMismatchError, BaseMismatchError) if given else (FormatError,) * 4
    )
    want = [e["key"] for e in fingerprint]
    missing = [k for k in want if k not in base]
    extra = [k for k in base if k not in set(want)]
    if missing or extra:
        first = f"lacks tensor {missing[0]!r}" if missing else f"has tensor {extra[0]!r} that the file does not"
        raise err_key(f"{path}: {what} {first} ({len(missing)} missing, {len(extra)} extra)")
    for e in fingerprint:
        k = e["key"]
        t = base[k]
        if not isinstance(t, torch.Tensor):
            raise MergeInputError(f"{path}: {what}: value of key {k!r} is a {type(t).__name__}, not a torch.Tensor")
        try:
            dt = dtype_to_str(t.dtype)
        except TypeError:
            dt = str(t.dtype)
        if dt != e["dtype"]:
            raise err_dtype(f"{path}: {what}: tensor {k!r} has dtype {dt}, the strategy was saved with {e['dtype']}")
        if [int(d) for d in t.shape] != list(e["shape"]):
            raise err_shape(
                f"{path}: {what}: tensor {k!r} has shape {tuple(t.shape)}, the strategy was saved with {tuple(e['shape'])}"
            )
        if values and tensor_sha256(t) != e["sha256"]:
            if not given:
                raise FormatError(f"{path}: tensor 'base/{k}' is damaged (sha256 differs from the saved fingerprint)")
            raise err_value(
                f"{path}: {what}: tensor {k!r} has different values than the θ_0 the strategy was saved with (sha256 differs)"
            )


def _load(
    path: str | os.PathLike[str],
    base: StateDict | None,
    *,
    verify: bool,
    overrides: Mapping[str, Any],
    expect: type[ContinualStrategy] | None,
) -> ContinualStrategy:
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such strategy file")
    try:
        fh = safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own types for bad or truncated headers
        raise FormatError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    with fh:
        meta = dict(fh.metadata() or {})
        if meta.get("format") != STRATEGY_FORMAT:
            raise FormatError(
                f"{path}: not a condu-merge strategy file (format={meta.get('format')!r}, expected {STRATEGY_FORMAT!r})"
            )
        if meta.get("version") != str(STRATEGY_VERSION):
            raise FormatError(
                f"{path}: strategy file format version {meta.get('version')!r} is not supported "
                f"(this condu-merge reads version {STRATEGY_VERSION})"
            )
        if meta.get("header_sha256") != metadata_sha256(meta):
            raise FormatError(f"{path}: the strategy file's metadata is damaged (header checksum mismatch)")
        name = meta.get("strategy")
        if expect is not None and name != expect.name:
            raise FormatError(
                f"{path}: holds a {name!r} strategy, not {expect.name!r} ({expect.__name__}); "
                "use load_strategy(path) to load whatever strategy a file holds"
            )
        factory: Callable[..., ContinualStrategy] | None = expect or _REGISTRY.get(name)  # type: ignore[arg-type]
        if factory is None:
            raise FormatError(f"{path}: unknown strategy {name!r}; registered: {available_strategies()}")
        options = _json_field(path, meta, "options", dict)
        tasks = _json_field(path, meta, "tasks", list)
        fingerprint = _json_field(path, meta, "base", list)
        state_meta = _json_field(path, meta, "state", dict)
        checksums = _json_field(path, meta, "checksums", dict)
        if not all(isinstance(t, str) and t for t in tasks) or len(set(tasks)) != len(tasks):
            raise FormatError(f"{path}: the task list is damaged (names must be unique non-empty strings): {tasks!r}")
        try:
            fp_keys = [e["key"] for e in fingerprint]
            for e in fingerprint:
                if e["dtype"] not in ST_ITEMSIZE or not isinstance(e["sha256"], str):
                    raise ValueError(e)
                [int(d) for d in e["shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{path}: the base fingerprint is damaged ({exc!r})") from None
        if meta.get("base_sha256") != fingerprint_sha256(fingerprint):
            raise FormatError(f"{path}: the base fingerprint does not match its checksum (damaged file)")
        included = meta.get("base_included")
        if included not in ("0", "1"):
            raise FormatError(f"{path}: metadata 'base_included' is {included!r}, expected '0' or '1'")

        expected = ([f"base/{k}" for k in fp_keys] if included == "1" else []) + list(checksums)
        present = set(fh.keys())
        for k in expected:
            if k not in present:
                raise FormatError(f"{path}: tensor {k!r} is missing")
        unexpected = sorted(present - set(expected))
        if unexpected:
            raise FormatError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")

        def get(key: str) -> torch.Tensor:
            try:
                tensor: torch.Tensor = fh.get_tensor(key)
                return tensor
            except Exception as exc:
                raise FormatError(f"{path}: tensor {key!r} cannot be read ({type(exc).__name__}: {exc})") from None

        kw = {**options}
        if base is None:
            if included != "1":
                raise MergeInputError(
                    f"{path}: the file was saved without θ_0 (include_base=False); pass the same base= to load it"
                )
            base = {k: get(f"base/{k}") for k in fp_keys}
            _check_base_against(path, fingerprint, base, given=False, values=verify)
            kw["copy_base"] = False  # fresh tensors, nobody else holds them
        else:
            if isinstance(base, torch.nn.Module):
                raise MergeInputError(
                    f"{path}: base must be a state dict of tensors, not a module (use module.state_dict())"
                )
            if not isinstance(base, Mapping):
                raise MergeInputError(f"{path}: base must be a mapping of tensor names to tensors")
            _check_base_against(path, fingerprint, base, given=True)
            base = {k: base[k] for k in fp_keys}  # the saved key order: the strategy iterates in it
        devices = {t.device for t in base.values()}
        device = devices.pop() if len(devices) == 1 else torch.device("cpu")

        state: dict[str, torch.Tensor] = {}
        for k, digest in checksums.items():
            t = get(k)
            if verify and tensor_sha256(t) != digest:
                raise FormatError(f"{path}: tensor {k!r} is damaged (sha256 differs from the one saved)")
            state[k] = t.to(device)

    kw.update(overrides)
    try:
        strat = factory(base, **kw)
    except (TypeError, ValueError) as exc:
        raise MergeInputError(f"{path}: cannot re-create strategy {name!r} with options {kw!r} ({exc})") from None
    strat._tasks = list(tasks)
    try:
        strat._restore(state, state_meta)
    except FormatError as exc:
        raise FormatError(f"{path}: {name} state: {exc}") from None
    except KeyError as exc:
        raise FormatError(f"{path}: {name} state: entry {exc} is missing") from None
    except ConduError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    except (TypeError, ValueError, IndexError, AttributeError) as exc:
        raise FormatError(f"{path}: {name} state is damaged ({type(exc).__name__}: {exc})") from None
    return strat


def load_strategy(
    path: str | os.PathLike[str], base: StateDict | None = None, *, verify: bool = True, **overrides: Any
) -> ContinualStrategy:
    """Re-create the strategy saved in ``path`` by :meth:`ContinualStrategy.save` (the class is
    looked up by its registered name), or the strategy a store directory holds
    (:meth:`ContinualStrategy.to_store`, ``condu-merge add-task --method``).

    ``base``: θ_0; required when the file was saved with ``include_base=False``, optional
    otherwise; either way it must match the saved fingerprint (names, shapes, dtypes and bytes),
    else a :class:`KeyMismatchError` / :class:`ShapeMismatchError` / :class:`DtypeMismatchError`
    / :class:`BaseMismatchError` names the first mismatching key. ``verify`` checks every state
    tensor's sha256 (and the stored θ_0's). ``overrides`` replace saved constructor options
    (e.g. ``backend=``, or ``scale=`` of task arithmetic). A damaged, truncated or foreign
    file raises :class:`condu_merge.errors.FormatError` naming the file.
    """
    if os.path.isdir(path):  # a store (StrategyStore / ContinualStrategy.to_store)
        return _load_store(os.fspath(path), base, verify=verify, overrides=overrides)
    return _load(path, base, verify=verify, overrides=overrides, expect=None)


def _load_store(path: str, base: StateDict | None, *, verify: bool, overrides: Mapping[str, Any]) -> ContinualStrategy:
    """:func:`load_strategy` of a store directory: θ_0 is ``base`` or the store's recorded base
    checkpoint (its tensors the store covers); options are the store's (fixed when it was made)."""
    from ..strategy_store import StrategyStore

    if overrides:
        raise MergeInputError(f"{path}: a store's options are fixed ({sorted(overrides)} given); load it without them")
    with StrategyStore(path, verify=verify) as st:
        if base is None:
            rec = (st.require().get("base") or {}).get("path")
            if not rec:
                raise MergeInputError(f"{path}: the store records no base checkpoint; pass base=")
            from ..checkpoints import PeftAdapter, open_checkpoint

            ck = open_checkpoint(rec)
            try:
                if isinstance(ck, PeftAdapter):
                    raise MergeInputError(f"{rec}: the recorded base is not a full checkpoint")
                base = {k: ck.get(k) for k in st.keys}
            finally:
                ck.close()
        return st.to_strategy(base)  # type: ignore[no-any-return]
