"""``torch``, imported on first use.

The store's file machinery, the CLI and the torch-free ``add-task`` path
(:mod:`condu_merge.fastpath`) import modules that use torch only inside functions; importing
torch costs 1.5-2 s and about 600 MiB of resident memory on a small machine, more than
folding a 512 MiB checkpoint. Those modules bind ``torch`` to :data:`torch`, a stand-in whose
first attribute access imports the real module and points every condu_merge module's ``torch``
at it; a module imported later still gets the stand-in, which forwards each access.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from types import ModuleType
from typing import Any

TRACE_ENV = "CONDU_MERGE_TRACE_TORCH_IMPORT"
"""When set, the stack of whatever first touches torch through the stand-in is printed to stderr
(to find what pulls torch into a path meant to be torch-free)."""


class _LazyModule:
    __slots__ = ("_mod", "_name")

    def __init__(self, name: str):
        self._name = name
        self._mod: ModuleType | None = None

    def _load(self) -> ModuleType:
        mod = self._mod
        if mod is None:
            if os.environ.get(TRACE_ENV):
                sys.stderr.write(f"condu_merge: importing {self._name} from\n")
                traceback.print_stack(sys._getframe(2), file=sys.stderr)
            mod = self._mod = importlib.import_module(self._name)
            self._rebind(mod)
        return mod

    def _rebind(self, mod: ModuleType) -> None:
        """Point every condu_merge module's ``torch`` at the real module, so later uses skip
        this stand-in (``isinstance(x, torch.Tensor)`` in a loop costs what it costs elsewhere)."""
        for name, m in list(sys.modules.items()):
            if (name == "condu_merge" or name.startswith("condu_merge.")) and getattr(m, "torch", None) is self:
                m.torch = mod  # type: ignore[attr-defined]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "loaded" if self._mod is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"


def loaded(name: str = "torch") -> bool:
    """Whether ``name`` was imported (by anyone) in this process."""
    return name in sys.modules


torch: Any = _LazyModule("torch")
