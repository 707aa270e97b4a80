"""condu-merge: continual model merging (ConDU) on state-dict tensors.

>>> from condu_merge import unify, decouple
>>> unified, triggers = unify([delta_a, delta_b])          # doctest: +SKIP
>>> delta_a_hat = decouple(unified, triggers[0])            # doctest: +SKIP
"""

from .backends import available_backends, get_backend, register_backend
from .core import (
    RESCALER_MODES,
    RescalerWarning,
    add_task,
    add_task_tensor,
    apply_delta,
    compute_rescalers,
    decouple,
    delta_from_state_dicts,
    unify,
    unify_tensor,
    validate_deltas,
)
from .errors import (
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
from .merger import ContinualMerger
from .packing import pack_mask, packed_nbytes, popcount, unpack_mask
from .trigger import TaskTrigger, load_triggers, save_triggers

__version__ = "0.1.0"

__all__ = [
    "ContinualMerger",
    "ConduError",
    "DtypeMismatchError",
    "DuplicateTaskError",
    "FormatError",
    "KeyMismatchError",
    "MergeInputError",
    "NonFiniteError",
    "RESCALER_MODES",
    "RescalerWarning",
    "ShapeMismatchError",
    "TaskTrigger",
    "UnknownTaskError",
    "add_task",
    "add_task_tensor",
    "apply_delta",
    "available_backends",
    "compute_rescalers",
    "decouple",
    "delta_from_state_dicts",
    "get_backend",
    "load_triggers",
    "pack_mask",
    "packed_nbytes",
    "popcount",
    "register_backend",
    "save_triggers",
    "unify",
    "unify_tensor",
    "unpack_mask",
    "validate_deltas",
]
