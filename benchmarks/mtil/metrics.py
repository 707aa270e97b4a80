"""MTIL metrics from an accuracy matrix, and the tables written from them.

``A[s][j]`` is the accuracy (percent) on task ``j`` after session ``s`` (both 0-based here, in the
training order; ``T`` sessions and ``T`` tasks). Per task ``j``:

* ``transfer[j] = mean_{s < j} A[s][j]`` (zero-shot transfer before the task is learned; undefined for j = 0);
* ``average[j]  = mean_{s} A[s][j]`` over all ``T`` sessions;
* ``last[j]     = A[T-1][j]``.

The summary numbers are the means of those over tasks (``Transfer`` over ``j >= 1``, i.e. the
paper's ``j >= 2`` in 1-based numbering).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np


def _check(acc: Sequence[Sequence[float]]) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T (sessions x tasks), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("accuracy matrix holds NaN/Inf (an unfinished session?)")
    return a


def per_task_metrics(acc: Sequence[Sequence[float]]) -> dict[str, list[float | None]]:
    """Per-task ``transfer`` (None for the first task), ``average`` and ``last``."""
    a = _check(acc)
    t = a.shape[0]
    transfer: list[float | None] = [None] + [float(a[:j, j].mean()) for j in range(1, t)]
    return {
        "transfer": transfer,
        "average": [float(a[:, j].mean()) for j in range(t)],
        "last": [float(a[t - 1, j]) for j in range(t)],
    }


def summary_metrics(acc: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """``Transfer`` (None with a single task), ``Average`` and ``Last``: means of the per-task values."""
    p = per_task_metrics(acc)
    tr = [x for x in p["transfer"] if x is not None]
    return {
        "transfer": float(np.mean(tr)) if tr else None,
        "average": float(np.mean(p["average"])),
        "last": float(np.mean(p["last"])),
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def markdown_table(
    tasks: Sequence[str],
    methods: Mapping[str, Sequence[Sequence[float]]],
    *,
    rows: Mapping[str, Sequence[float | None]] | None = None,
    metrics: Sequence[str] = ("transfer", "average", "last"),
) -> str:
    """A table laid out like the paper's Tables 1-3: single rows (``rows``: e.g. zero-shot and
    individual FT, one value per task) then one block per metric with a line per method."""
    head = "| Metric | Method | " + " | ".join(tasks) + " | Average |"
    sep = "|" + "---|" * (len(tasks) + 3)
    lines = [head, sep]
    for name, vals in (rows or {}).items():
        v = [x for x in vals if x is not None]
        lines.append(
            f"| | {name} | " + " | ".join(_fmt(x) for x in vals) + f" | {_fmt(float(np.mean(v)) if v else None)} |"
        )
    for metric in metrics:
        for i, (method, acc) in enumerate(methods.items()):
            per = per_task_metrics(acc)[metric]
            summ = summary_metrics(acc)[metric]
            label = metric.capitalize() if i == 0 else ""
            lines.append(f"| {label} | {method} | " + " | ".join(_fmt(x) for x in per) + f" | {_fmt(summ)} |")
    return "\n".join(lines) + "\n"


def csv_text(tasks: Sequence[str], methods: Mapping[str, Sequence[Sequence[float]]]) -> str:
    """Long-form CSV: one line per (method, metric) with per-task values and the mean, then the
    raw accuracy matrix lines (``metric = A[s]``)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "metric", *tasks, "mean"])
    for method, acc in methods.items():
        per, summ = per_task_metrics(acc), summary_metrics(acc)
        for metric in ("transfer", "average", "last"):
            w.writerow(
                [
                    method,
                    metric,
                    *["" if x is None else f"{x:.4f}" for x in per[metric]],
                    "" if summ[metric] is None else f"{summ[metric]:.4f}",
                ]
            )
        for s, row in enumerate(np.asarray(acc, dtype=np.float64)):
            w.writerow([method, f"A[{s + 1}]", *[f"{x:.4f}" for x in row], ""])
    return buf.getvalue()


def heatmap_png(path: str, tasks: Sequence[str], methods: Mapping[str, Sequence[Sequence[float]]]) -> bool:
    """The accuracy matrices ``A[s][j]`` of every method as small multiples (a grid of at most 4
    columns, seen cells in colour, not-yet-learned cells grey; :func:`benchmarks.mtil.plots.matrices_png`)
    into ``path``; False when matplotlib is not installed."""
    from .plots import matrices_png

    return matrices_png(path, tasks, methods, n_tasks=len(tasks))
