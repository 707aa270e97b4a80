"""Continual strategies behind one interface (:class:`ContinualStrategy`) and a registry.

>>> from condu_merge.strategies import get_strategy, available_strategies
>>> strat = get_strategy("pam", base=trainable_state_dict)   # doctest: +SKIP

Names: ``condu``, ``pam``, ``magmax``, ``task_arithmetic``, ``ties``, ``emr``, ``continual_ft``,
``opcm``, ``dop``, ``tall_masks``, ``dare_task_arithmetic``, ``dare_ties``.
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
from .dare import DareTaskArithmetic, DareTIES, dare_mask, drop_and_rescale
from .dop import DOP, dop_merge_matrix
from .emr import EMR
from .magmax import MagMax, max_magnitude_update
from .opcm import OPCM, opcm_project
from .pam import (
    PAM,
    PAMAlignment,
    conflict_mask,
    important_signs,
    pam_merge_tensor,
    sign_agreement,
    top_fraction_threshold,
)
from .rule import Slot, SlotReader, TensorRule, available_rules, get_rule, register_rule
from .tall_masks import TALLMasks, consensus_mask, tall_mask
from .task_arithmetic import TaskArithmetic, task_arithmetic_tensor
from .ties import (
    TIES,
    density_fraction,
    disjoint_merge,
    elected_signs,
    kth_smallest_streaming,
    ties_tensor,
    trim_threshold,
)

for _cls in (
    ConDU,
    PAM,
    MagMax,
    TaskArithmetic,
    TIES,
    EMR,
    ContinualFT,
    OPCM,
    DOP,
    TALLMasks,
    DareTaskArithmetic,
    DareTIES,
):
    register_strategy(_cls.name, _cls)
del _cls

__all__ = [
    "DOP",
    "EMR",
    "OPCM",
    "PAM",
    "TIES",
    "ConDU",
    "ContinualFT",
    "ContinualStrategy",
    "DareTIES",
    "DareTaskArithmetic",
    "MagMax",
    "PAMAlignment",
    "Slot",
    "SlotReader",
    "StorageReport",
    "StrategyStateError",
    "TALLMasks",
    "TaskArithmetic",
    "TaskStart",
    "TensorRule",
    "TrainingHook",
    "available_rules",
    "available_strategies",
    "conflict_mask",
    "consensus_mask",
    "dare_mask",
    "density_fraction",
    "disjoint_merge",
    "dop_merge_matrix",
    "drop_and_rescale",
    "elected_signs",
    "get_rule",
    "get_strategy",
    "important_signs",
    "kth_smallest_streaming",
    "load_strategy",
    "max_magnitude_update",
    "opcm_project",
    "pam_merge_tensor",
    "register_rule",
    "register_strategy",
    "sign_agreement",
    "state_nbytes",
    "tall_mask",
    "task_arithmetic_tensor",
    "ties_tensor",
    "top_fraction_threshold",
    "trim_threshold",
]
