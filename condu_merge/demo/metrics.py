"""Continual-learning metrics from an accuracy matrix (the MTIL protocol of the ConDU paper).

``A[s][j]`` is the accuracy (percent) on task ``j`` after session ``s`` (0-based, training order,
``T`` sessions and ``T`` tasks). Per task ``j``:

* ``transfer[j] = mean_{s < j} A[s][j]`` -- zero-shot transfer before the task is learned
  (undefined for ``j = 0``);
* ``average[j]  = mean_{s} A[s][j]`` over all ``T`` sessions;
* ``last[j]     = A[T-1][j]``;
* ``forgetting[j] = A[j][j] - A[T-1][j]`` for ``j < T-1`` (accuracy lost between learning the task
  and the end; the backward transfer is ``BWT = -mean_j forgetting[j]``).

The summary numbers are the means over tasks (``transfer`` and ``forgetting`` over the tasks where
they are defined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["check_matrix", "mean_std", "per_task_metrics", "summary_metrics"]


def check_matrix(acc: Sequence[Sequence[float]]) -> np.ndarray:
    """``acc`` as a finite square float64 array, or a ``ValueError`` saying what is wrong."""
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T (sessions x tasks), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("accuracy matrix holds NaN/Inf (an unfinished session?)")
    return a


def per_task_metrics(acc: Sequence[Sequence[float]]) -> dict[str, list[float | None]]:
    """Per-task ``transfer`` (None for the first task), ``average``, ``last`` and ``forgetting``
    (None for the last task)."""
    a = check_matrix(acc)
    t = a.shape[0]
    return {
        "transfer": [None] + [float(a[:j, j].mean()) for j in range(1, t)],
        "average": [float(a[:, j].mean()) for j in range(t)],
        "last": [float(a[t - 1, j]) for j in range(t)],
        "forgetting": [float(a[j, j] - a[t - 1, j]) for j in range(t - 1)] + [None],
    }


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(sum(vals) / len(vals)) if vals else None


def summary_metrics(acc: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """``{"transfer", "average", "last", "forgetting", "bwt"}``: the per-task metrics averaged over
    the tasks where they are defined (``transfer`` is None for one task, ``forgetting``/``bwt``
    too); ``bwt = -forgetting``."""
    per = per_task_metrics(acc)
    forgetting = _mean(per["forgetting"])
    return {
        "transfer": _mean(per["transfer"]),
        "average": _mean(per["average"]),
        "last": _mean(per["last"]),
        "forgetting": forgetting,
        "bwt": None if forgetting is None else -forgetting,
    }


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the non-None values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
