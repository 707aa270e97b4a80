"""What a strategy keeps per tensor and how one task folds into it: the :class:`TensorRule` interface.

Every strategy of this package that a store can hold on disk states its state as **slots**
(:class:`Slot`): tensors kept per model tensor, either one shared by all tasks (a running sum,
a merged task vector, ConDU's ``u``) or one per task (a task vector, a 1-bit mask). A rule then
gives three pure per-tensor functions:

* :meth:`TensorRule.fold`: one tensor's new slots from its old slots and the new task's delta
  (plus scalars summed over the tensors, e.g. a squared norm, that :meth:`TensorRule.finish_task`
  turns into the rule's JSON ``meta``, e.g. OPCM's task-vector norms);
* :meth:`TensorRule.prepare`: the global quantities a read needs (TIES' thresholds and majority
  sign, EMR's rescalers, OPCM's norm ratio), computed in passes over the stored tensors, one tensor
  at a time;
* :meth:`TensorRule.merged` and :meth:`TensorRule.expert`: one tensor of the merged delta, or of
  task ``t``'s expert delta.

The generic driver (:class:`~condu_merge.strategy_store.StrategyStore`) reads a task one tensor at
a time, folds it, writes every slot into a new generation and commits it through
:mod:`condu_merge.pipeline`; the in-memory strategies (:mod:`condu_merge.strategies`) compute the
same math from the same pure functions of their modules, and a test holds the two bit-identical.
Continual rules keep O(1) model-sized slots; the non-continual references keep per-task slots
(their task vectors), and say so in :attr:`TensorRule.continual`.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from ..packing import packed_nbytes

__all__ = [
    "FoldTask",
    "Slot",
    "SlotReader",
    "TensorRule",
    "available_rules",
    "get_rule",
    "parse_option_value",
    "register_rule",
]


@dataclass(frozen=True)
class Slot:
    """One tensor a strategy keeps per model tensor.

    ``kind``: its name (the file stem: ``sum`` → ``sum.safetensors``, a per-task ``tau`` →
    ``tau/0003.safetensors``); ``per_task``: one per task; ``packed``: a 1-bit mask (``uint8``,
    ``ceil(N/8)`` bytes, bit ``k`` of byte ``k // 8`` little-endian, as ConDU's triggers);
    ``wide``: kept in ``promote(dtype, float32)`` rather than the tensor's dtype (running sums);
    ``frozen``: a per-task slot written once with its task and carried unchanged (hard-linked)
    into every later generation, so adding a task never rewrites the earlier task vectors."""

    kind: str
    per_task: bool = False
    packed: bool = False
    wide: bool = False
    frozen: bool = False

    def dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.packed:
            return torch.uint8
        return torch.promote_types(dtype, torch.float32) if self.wide else dtype

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (packed_nbytes(math.prod(shape)),) if self.packed else tuple(shape)

    def file(self, task_index: int | None = None) -> str:
        if self.per_task:
            assert task_index is not None
            return f"{self.kind}/{task_index:04d}.safetensors"
        return f"{self.kind}.safetensors"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "per_task": self.per_task,
            "packed": self.packed,
            "wide": self.wide,
            "frozen": self.frozen,
        }


class SlotReader:
    """Read access to the stored slots: ``get(kind, key)`` for a shared slot, ``get(kind, key,
    t)`` for task ``t``'s. ``open_slot(kind, task index or None)`` returns something with
    ``get(key) -> Tensor`` (an open safetensors file, or a dict in memory), asked once per slot
    file and only when first read. ``names``: the stored tasks in order; ``shapes`` and
    ``dtypes``: each tensor's (the store's dtype, that of the deltas)."""

    def __init__(
        self,
        open_slot: Callable[[str, int | None], Any],
        names: Sequence[str],
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, torch.dtype],
        packed: Iterable[str] = (),
    ):
        self._open = open_slot
        self._cache: dict[tuple[str, int | None], Any] = {}
        self.names = list(names)
        self.tasks = len(self.names)
        self.shapes = shapes
        self.dtypes = dtypes
        self.packed = frozenset(packed)
        self._range: tuple[int, int] | None = None

    def _src(self, kind: str, task: int | None) -> Any:
        src = self._cache.get((kind, task))
        if src is None:
            src = self._cache[(kind, task)] = self._open(kind, task)
        return src

    def get(self, kind: str, key: str, task: int | None = None) -> torch.Tensor:
        src = self._src(kind, task)
        if self._range is not None:
            a0, a1 = self._range
            if kind in self.packed:  # 1-bit slots: the bytes of elements [a0, a1); a0 % 8 == 0
                a0, a1 = a0 // 8, (a1 + 7) // 8
            part: torch.Tensor = src.get_range(key, a0, a1)
            return part
        t: torch.Tensor = src.get(key) if hasattr(src, "get") else src[key]
        return t

    def window(self, start: int, stop: int) -> SlotReader:
        """This reader restricted to elements ``[start, stop)`` of every tensor (flattened), for a
        rule that folds element by element (``elementwise``) and a tensor folded in pieces;
        ``start`` is a multiple of 8. It shares the open files."""
        view = SlotReader(self._open, self.names, self.shapes, self.dtypes, self.packed)
        view._cache = self._cache
        view._range = (start, stop)
        return view

    @property
    def opened(self) -> list[tuple[str, int | None]]:
        """The slot files read so far."""
        return list(self._cache)


@dataclass
class FoldTask:
    """The task being folded: its 0-based ``index`` (the number of earlier tasks), its ``name``,
    ``meta`` (the rule's meta before this task, e.g. the earlier tasks' rescalers) and ``stats``,
    what a rule gathers over the tensors during :meth:`TensorRule.fold` (a squared norm, or
    ConDU's per-tensor rescaler sums)."""

    index: int
    name: str
    stats: dict[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


FoldResult = dict[str, "torch.Tensor | list[torch.Tensor]"]


class TensorRule(ABC):
    """A strategy's per-tensor state and fold (see the module docstring).

    Subclasses set ``method`` (the registry name, the in-memory strategy's ``name``),
    ``continual``, ``task_aware`` and ``defaults`` (the option defaults, which are the in-memory
    strategy's constructor defaults; a test holds them equal), implement :meth:`slots`,
    :meth:`fold`, :meth:`merged`, and where they have per-task experts :meth:`expert`.
    Options are validated by :meth:`check_options`; unknown names are refused."""

    method: ClassVar[str] = "?"
    continual: ClassVar[bool] = True
    task_aware: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}
    meta_keys: ClassVar[tuple[str, ...]] = ()
    """The keys of the JSON meta :meth:`finish_task` maintains (kept by the store across tasks)."""
    checks_finite: ClassVar[bool] = False
    """Whether :meth:`fold` itself refuses NaN/Inf (else the driver checks each delta first)."""
    elementwise: ClassVar[bool] = False
    """Whether :meth:`fold` works element by element, so a large tensor may be folded in pieces
    (:func:`~condu_merge.pipeline.fold_tensors` with ``chunk``); its stats must then add up over
    the pieces."""

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"{self.method}: unknown option {unknown[0]!r}; its options are {sorted(self.defaults) or 'none'}"
            )
        merged = {**self.defaults, **options}
        self.opts: dict[str, Any] = self.check_options(merged)
        json.dumps(self.opts, allow_nan=False)  # options are recorded in the manifest

    # ------------------------------------------------------------------ to implement
    def check_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        """The options, validated and normalised (``ValueError`` naming the option)."""
        return opts

    @abstractmethod
    def slots(self) -> list[Slot]:
        """What this rule keeps per tensor."""

    @abstractmethod
    def fold(
        self, key: str, delta: torch.Tensor, old: SlotReader | None, task: FoldTask, shape: tuple[int, ...]
    ) -> FoldResult:
        """Tensor ``key``'s new slots after task ``task`` with ``delta`` (finite, the store's dtype;
        ``old`` is ``None`` for the first task): shared slots by kind; per-task slots that are
        not frozen as a list over every task (``task.index + 1`` tensors); frozen ones as the
        new task's tensor only."""

    def finish_task(self, meta: dict[str, Any], task: FoldTask) -> dict[str, Any]:
        """The rule's JSON meta after ``task`` was folded into every tensor."""
        return meta

    def prepare(self, reader: SlotReader, keys: Sequence[str], meta: Mapping[str, Any]) -> Any:
        """Global quantities :meth:`merged` / :meth:`expert` need (passes over ``reader``)."""
        return None

    @abstractmethod
    def merged(self, key: str, reader: SlotReader, meta: Mapping[str, Any], ctx: Any) -> torch.Tensor:
        """Tensor ``key`` of the merged delta (the task-agnostic model minus θ_0)."""

    def expert(self, key: str, reader: SlotReader, meta: Mapping[str, Any], ctx: Any, task: int) -> torch.Tensor:
        """Tensor ``key`` of task ``task``'s expert delta; default: the merged delta."""
        return self.merged(key, reader, meta, ctx)


_RULES: dict[str, Callable[..., TensorRule]] = {}


def register_rule(method: str, factory: Callable[..., TensorRule], *, overwrite: bool = False) -> None:
    """Make ``method`` available to the on-disk stores and the CLI's ``--method``."""
    if method in _RULES and not overwrite:
        raise ValueError(f"a rule named {method!r} is already registered")
    _RULES[method] = factory


def available_rules() -> list[str]:
    """Every method a :class:`~condu_merge.strategy_store.StrategyStore` can hold (``condu`` is the
    ConDU :class:`~condu_merge.store.Store`'s)."""
    return sorted(_RULES)


def get_rule(method: str, **options: Any) -> TensorRule:
    """The rule of ``method`` with ``options`` (validated)."""
    if method not in _RULES:
        raise ValueError(f"unknown method {method!r}; choose one of {['condu', *sorted(_RULES)]}")
    return _RULES[method](**options)


def parse_option_value(text: str) -> Any:
    """``--set key=value``'s value: JSON where it parses (``0.3``, ``true``, ``null``,
    ``["a"]``), else the text itself (``mean``)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def validate_like(strategy_cls: Any, opts: Mapping[str, Any], *, skip: Sequence[str] = ()) -> None:
    """Validate ``opts`` exactly as the in-memory strategy's constructor does (it is built once
    over a one-element θ_0; options naming tensors, ``skip``, are checked by the caller)."""
    strategy_cls({"x": torch.zeros(1)}, **{k: v for k, v in opts.items() if k not in skip})


def wide(dtype: torch.dtype) -> torch.dtype:
    """``promote(dtype, float32)``: where sums run and running sums are kept."""
    return torch.promote_types(dtype, torch.float32)
