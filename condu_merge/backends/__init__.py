"""Backend registry and the ``backend="auto"`` dispatch.

A backend implements :class:`~condu_merge.backends.base.MergeBackend` on flat tensors. Register
one with :func:`register_backend`; built-in optional backends are imported lazily, so a missing
optional dependency (triton, numba) only makes that backend unavailable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:  # imported on first use: see condu_merge._lazy
    from .._lazy import torch

from .base import FlatMergeResult, MergeBackend, opmath_dtype, opmath_scalar
from .torch_backend import TorchBackend

__all__ = [
    "AUTO_CPU_MIN_NUMEL",
    "FlatMergeResult",
    "MergeBackend",
    "TorchBackend",
    "auto_for_size",
    "available_backends",
    "get_backend",
    "opmath_dtype",
    "opmath_scalar",
    "register_backend",
    "resolve_backend",
]

# name -> factory, or "module:attr" imported on first use
_FACTORIES: dict[str, Callable[[], MergeBackend] | str] = {
    "torch": TorchBackend,
    # optional fused kernels (condu_merge.kernels): imported on first use only
    "native": "condu_merge.kernels.native_backend:NativeBackend",
    "numba": "condu_merge.kernels.numba_backend:NumbaBackend",
    "triton": "condu_merge.kernels.triton_backend:TritonBackend",
}
_INSTANCES: dict[str, MergeBackend | None] = {}

# What "auto" tries, in order, per device type; the first available one that supports the device wins.
AUTO_ORDER: dict[str, list[str]] = {"cuda": ["triton", "torch"], "cpu": ["native", "numba", "torch"]}


AUTO_CPU_MIN_NUMEL = 16_000_000
"""Below this many elements per job, :func:`auto_for_size` picks torch over numba on the CPU:
numba's per-process kernel load (~0.9 s) is not paid back. Measured on the 2-core machine, quiet,
by ``benchmarks/bench_cli_start.py`` (two add_task calls in a fresh process, numba / torch time):
4.9 at 3M, 2.0 at 10M, 0.78 at 30M, 0.51 at 60M parameters; the threshold sits between 10M and 30M."""


def auto_for_size(backend: str, numel: int, device_type: str = "cpu") -> str:
    """The backend name to run a job of ``numel`` elements with: ``backend`` itself unless it is
    ``"auto"`` on the CPU for a job smaller than :data:`AUTO_CPU_MIN_NUMEL` while numba is not
    loaded yet and the native kernels are not built, which gives ``"torch"`` (the same bits: every
    backend meets one numeric contract). The native kernels load in milliseconds, so ``auto``
    keeps them for any size."""
    if backend != "auto" or device_type != "cpu" or numel >= AUTO_CPU_MIN_NUMEL:
        return backend
    if _INSTANCES.get("numba") is not None or _instance("native") is not None:
        return "auto"
    return "torch"


def register_backend(
    name: str, factory: Callable[[], MergeBackend] | str, *, auto_for: dict[str, int] | None = None
) -> None:
    """Register ``factory`` (a callable or a ``"module:attr"`` string) under ``name``.

    ``auto_for`` maps a device type to the position ``name`` takes in that type's auto order.
    """
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)
    for dev, pos in (auto_for or {}).items():
        order = AUTO_ORDER.setdefault(dev, ["torch"])
        if name in order:
            order.remove(name)
        order.insert(pos, name)


def _instance(name: str) -> MergeBackend | None:
    if name not in _INSTANCES:
        factory = _FACTORIES.get(name)
        if factory is None:
            return None
        try:
            if isinstance(factory, str):
                mod, _, attr = factory.partition(":")
                factory = getattr(importlib.import_module(mod), attr)
            inst = factory()
            _INSTANCES[name] = inst if inst.available() else None
        except ImportError:
            _INSTANCES[name] = None
    return _INSTANCES[name]


def available_backends() -> list[str]:
    """Names of the registered backends that can run in this environment."""
    return [n for n in _FACTORIES if _instance(n) is not None]


def get_backend(name: str) -> MergeBackend:
    """The backend registered as ``name``; a clear error if unknown or unavailable here."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; registered: {sorted(_FACTORIES)}")
    inst = _instance(name)
    if inst is None:
        raise RuntimeError(f"backend {name!r} is not available here (its optional dependency is missing)")
    return inst


def resolve_backend(backend: str | MergeBackend, device: torch.device) -> MergeBackend:
    """Turn a ``backend=`` argument into a backend object for tensors on ``device``."""
    if not isinstance(backend, str):
        supports = getattr(backend, "supports", None)
        if supports is None:
            raise TypeError(f"backend {backend!r} is neither a name nor a backend object (it has no supports())")
        if not supports(device):
            name = getattr(backend, "name", type(backend).__name__)
            raise ValueError(f"backend {name!r} does not run on {device.type} tensors")
        return backend
    if backend != "auto":
        inst = get_backend(backend)
        if not inst.supports(device):
            raise ValueError(f"backend {backend!r} does not run on {device.type} tensors")
        return inst
    for name in AUTO_ORDER.get(device.type, ["torch"]):
        found = _instance(name)
        if found is not None and found.supports(device):
            return found
    return get_backend("torch")
