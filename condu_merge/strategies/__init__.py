"""Continual strategies behind one interface (:class:`ContinualStrategy`) and a registry.

>>> from condu_merge.strategies import get_strategy, available_strategies
>>> strat = get_strategy("pam", base=trainable_state_dict)   # doctest: +SKIP

Names: ``condu``, ``pam``, ``magmax``, ``task_arithmetic``, ``ties``, ``emr``, ``continual_ft``.
See docs/strategies.md.
"""

from .base import (
    ContinualStrategy,
    StorageReport,
    StrategyStateError,
    TaskStart,
    TrainingHook,
    available_strategies,
    get_strategy,
    load_strategy,
    register_strategy,
    state_nbytes,
)
from .condu import ConDU
from .continual_ft import ContinualFT
from .emr import EMR
from .magmax import MagMax, max_magnitude_update
from .pam import PAM, PAMAlignment, conflict_mask, important_signs, pam_merge_tensor, sign_agreement, top_fraction_threshold
from .task_arithmetic import TaskArithmetic, task_arithmetic_tensor
from .ties import TIES, ties_tensor, trim_threshold

for _cls in (ConDU, PAM, MagMax, TaskArithmetic, TIES, EMR, ContinualFT):
    register_strategy(_cls.name, _cls)
del _cls

__all__ = [
    "ConDU",
    "ContinualFT",
    "ContinualStrategy",
    "EMR",
    "MagMax",
    "PAM",
    "PAMAlignment",
    "StorageReport",
    "StrategyStateError",
    "TIES",
    "TaskArithmetic",
    "TaskStart",
    "TrainingHook",
    "available_strategies",
    "conflict_mask",
    "get_strategy",
    "important_signs",
    "load_strategy",
    "max_magnitude_update",
    "pam_merge_tensor",
    "register_strategy",
    "sign_agreement",
    "state_nbytes",
    "task_arithmetic_tensor",
    "ties_tensor",
    "top_fraction_threshold",
    "trim_threshold",
]
