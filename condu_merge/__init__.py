"""condu-merge: continual model merging (ConDU) on state-dict tensors.

>>> from condu_merge import unify, decouple
>>> unified, triggers = unify([delta_a, delta_b])          # doctest: +SKIP
>>> delta_a_hat = decouple(unified, triggers[0])            # doctest: +SKIP
"""

# Public names and the submodule each lives in. They are imported on first use (PEP 562), so
# `import condu_merge` -- and the `condu-merge` CLI's start -- does not pay for torch or numba.
_LAZY = {
    "available_backends": "backends",
    "get_backend": "backends",
    "register_backend": "backends",
    "RESCALER_MODES": "core",
    "RescalerWarning": "core",
    "add_task": "core",
    "add_task_tensor": "core",
    "apply_delta": "core",
    "compute_rescalers": "core",
    "decouple": "core",
    "delta_from_state_dicts": "core",
    "unify": "core",
    "unify_tensor": "core",
    "validate_deltas": "core",
    "ConduError": "errors",
    "DtypeMismatchError": "errors",
    "DuplicateTaskError": "errors",
    "FormatError": "errors",
    "KeyMismatchError": "errors",
    "MergeInputError": "errors",
    "NonFiniteError": "errors",
    "ShapeMismatchError": "errors",
    "UnknownTaskError": "errors",
    "ContinualMerger": "merger",
    "pack_mask": "packing",
    "packed_nbytes": "packing",
    "popcount": "packing",
    "unpack_mask": "packing",
    "TaskTrigger": "trigger",
    "load_triggers": "trigger",
    "save_triggers": "trigger",
}


__version__ = "0.1.0"

__all__ = [
    "RESCALER_MODES",
    "ConduError",
    "ContinualMerger",
    "DtypeMismatchError",
    "DuplicateTaskError",
    "FormatError",
    "KeyMismatchError",
    "MergeInputError",
    "NonFiniteError",
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


def __getattr__(name: str) -> object:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'condu_merge' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
