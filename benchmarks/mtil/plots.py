"""Plots that stay readable with 10+ methods (matplotlib, Agg; every function returns False when
matplotlib is not installed):

* :func:`matrices_png` -- the accuracy matrix ``A[s][j]`` of every method as small multiples
  (a grid, not one strip), seen cells (task learned: ``j <= s``) in colour, unseen cells (later
  tasks, held-out domains) in grey, every cell with its number;
* :func:`metric_bars_png` -- method × metric bars (one panel per metric, methods on the y axis,
  one bar per setting such as FT and LoRA, with ± std error bars);
* :func:`curves_png` -- each task's accuracy across sessions (forgetting curves), one panel per task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

_STYLES = ("-", "--", "-.", ":")


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def matrices_png(
    path: str,
    columns: Sequence[str],
    methods: Mapping[str, Sequence[Sequence[float]]],
    *,
    n_tasks: int | None = None,
    ncols: int = 4,
    title: str | None = None,
) -> bool:
    """Small multiples of ``methods[label] = A`` (sessions × columns). Cell ``(s, j)`` is *seen*
    when ``j <= s`` and ``j < n_tasks`` (default: every column is a task); seen cells use the
    colour scale, unseen ones grey, so zero-shot transfer and learned accuracy are told apart."""
    plt = _plt()
    if plt is None:
        return False
    from matplotlib.colors import Normalize

    n = len(methods)
    cols = len(columns)
    nt = cols if n_tasks is None else n_tasks
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    cw, ch = 0.42 * cols + 1.2, 0.36 * max(len(m) for m in methods.values()) + 1.6
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(cw * ncols, (ch + 0.9) * nrows + 0.6),
        squeeze=False,
        gridspec_kw={"hspace": 0.85, "wspace": 0.3},
    )  # room for the rotated domain names
    norm = Normalize(0, 100)
    seen_cmap, unseen_cmap = plt.get_cmap("viridis"), plt.get_cmap("Greys")
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (label, acc) in zip(axes.flat, methods.items()):
        a = np.asarray(acc, dtype=np.float64)
        rows = a.shape[0]
        rgba = np.zeros((rows, cols, 4))
        for s in range(rows):
            for j in range(cols):
                v = a[s, j]
                seen = j <= s and j < nt
                if not np.isfinite(v):
                    rgba[s, j] = (1, 1, 1, 1)
                else:
                    rgba[s, j] = seen_cmap(norm(v)) if seen else unseen_cmap(0.15 + 0.5 * norm(v))
                if np.isfinite(v):
                    dark = seen and v < 60
                    ax.text(
                        j,
                        s,
                        f"{v:.0f}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if dark else "black",
                        style="normal" if seen else "italic",
                    )
        ax.imshow(rgba, aspect="auto", interpolation="nearest")
        if nt < cols:
            ax.axvline(nt - 0.5, color="red", lw=1.2)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(cols), columns, rotation=55, ha="right", fontsize=6.5)
        ax.set_yticks(range(rows), [f"S{s + 1}" for s in range(rows)], fontsize=6.5)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=seen_cmap)
    fig.colorbar(sm, ax=axes, fraction=0.015, pad=0.01, label="accuracy % (seen cells)")
    fig.suptitle(
        title
        or (
            "Accuracy after each session (rows) on each task (columns); colour: learned, "
            "grey italic: not learned yet" + (" / held-out (right of the red line)" if nt < cols else "")
        ),
        fontsize=9,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def metric_bars_png(
    path: str,
    methods: Sequence[str],
    metrics: Sequence[tuple[str, str]],
    values: Mapping[str, Mapping[str, Mapping[str, tuple[float | None, float | None]]]],
    *,
    title: str | None = None,
) -> bool:
    """``values[setting][method][metric] = (mean, std)``; ``metrics = [(key, axis label)]``.
    One panel per metric, methods top to bottom, one bar per setting (with its std)."""
    plt = _plt()
    if plt is None:
        return False
    settings = list(values)
    m = len(methods)
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(3.3 * len(metrics) + 1.5, 0.32 * m * max(1, len(settings)) + 1.4),
        sharey=True,
        squeeze=False,
    )
    h = 0.8 / max(1, len(settings))
    colors = plt.get_cmap("tab10")
    y = np.arange(m)
    for ax, (key, lab) in zip(axes[0], metrics):
        for k, st in enumerate(settings):
            mean = [values[st].get(meth, {}).get(key, (None, None))[0] for meth in methods]
            std = [values[st].get(meth, {}).get(key, (None, None))[1] for meth in methods]
            mv = np.array([np.nan if v is None else v for v in mean], dtype=float)
            sv = np.array([0.0 if v is None else v for v in std], dtype=float)
            pos = y - 0.4 + h * (k + 0.5)
            ax.barh(
                pos, np.nan_to_num(mv), height=h, xerr=sv, color=colors(k), label=st, capsize=2, error_kw={"lw": 0.8}
            )
            for p, v in zip(pos, mv):
                ax.text(
                    (0 if np.isnan(v) else v),
                    p,
                    " -" if np.isnan(v) else f" {v:.1f}" if v < 100 or key != "storage" else f" {v:.0f}",
                    va="center",
                    fontsize=6,
                )
        ax.set_title(lab, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].set_yticks(y, methods, fontsize=8)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def curves_png(
    path: str,
    tasks: Sequence[str],
    methods: Mapping[str, Sequence[Sequence[float]]],
    *,
    ncols: int = 3,
    title: str | None = None,
) -> bool:
    """Per task ``j`` (a panel), ``A[s][j]`` against the session ``s`` for every method, with the
    session that learns the task marked: after it, a falling line is forgetting."""
    plt = _plt()
    if plt is None:
        return False
    t = len(tasks)
    ncols = max(1, min(ncols, t))
    nrows = math.ceil(t / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 2.6, 2.6 * nrows + 0.6), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab20")
    for ax in axes.flat[t:]:
        ax.axis("off")
    for j, (ax, task) in enumerate(zip(axes.flat, tasks)):
        for i, (label, acc) in enumerate(methods.items()):
            a = np.asarray(acc, dtype=np.float64)
            ax.plot(
                np.arange(1, a.shape[0] + 1),
                a[:, j],
                _STYLES[(i // 10) % 4],
                marker=".",
                ms=3,
                lw=1.1,
                color=cmap((2 * i) % 20 + (i // 10) % 2),
                label=label,
            )
        ax.axvline(j + 1, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{task} (learned in S{j + 1})", fontsize=8.5)
        ax.set_xticks(range(1, len(tasks) + 1), [f"S{s + 1}" for s in range(len(tasks))], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7.5)
    fig.suptitle(title or "Accuracy on each task after every session (forgetting curves)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
