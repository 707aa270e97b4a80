"""Exception types. Every message names the key, the task and (where there is one) the file."""

from __future__ import annotations


class ConduError(Exception):
    """Base class of every error raised on purpose by condu-merge."""


class MergeInputError(ConduError, ValueError):
    """The deltas handed to a merge are unusable (empty, mismatched, non-float, non-finite)."""


class KeyMismatchError(MergeInputError):
    """Two tasks (or a task and the session) do not have the same tensor names."""


class ShapeMismatchError(MergeInputError):
    """A tensor's shape differs between tasks."""


class DtypeMismatchError(MergeInputError):
    """A tensor's dtype differs between tasks, or is not floating point."""


class NonFiniteError(MergeInputError):
    """A delta holds NaN or Inf."""

    @classmethod
    def at(cls, who: str, key: str, index: int) -> NonFiniteError:
        """The error for tensor ``key`` of ``who`` (a task label), its first NaN or Inf at flat ``index``."""
        return cls(f"{who}: tensor {key!r} contains NaN or Inf (first at flat index {index})")

    @classmethod
    def norm_overflow(cls, who: str, key: str) -> NonFiniteError:
        """The error for a finite tensor whose float64 L1 norm overflows."""
        return cls(f"{who}: the L1 norm of tensor {key!r} overflows float64")


class DuplicateTaskError(ConduError, ValueError):
    """A task name is already used in the session."""


class UnknownTaskError(ConduError, KeyError):
    """No task of that name in the session."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class FormatError(ConduError, ValueError):
    """A file is corrupt, truncated, of an unknown format version, or not ours."""


class UnsafePathError(ConduError, ValueError):
    """A path the store would write or delete is not one it created (a symlinked or hard-linked
    lock, a folder holding foreign files, an export target inside the store or onto its inputs)."""


class OptionMismatchError(ConduError, ValueError):
    """An option of a later task differs from what the store recorded when it was created."""


class DigestUnavailableError(ConduError, RuntimeError):
    """A digest a store records (or ``$CONDU_MERGE_DIGEST`` asks for) cannot be computed here:
    BLAKE3 without the ``blake3`` package, or an algorithm this version does not know."""
