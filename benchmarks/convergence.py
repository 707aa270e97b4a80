"""Convergence study of ConDU's continual session loop on synthetic deltas.

Setting 1 (the real process): one new task per session, each session decouples every earlier
expert and unifies them with the new delta (``ContinualMerger.add_task``). Per session ``n`` it
records

* the average change ``c(n) = (1/(n-1)) Σ_{i<n} ||δ̃_i(n) − δ̃_i(n−1)||_1 / ||δ_i||_1`` (Corollary F.6
  says the unnormalised version tends to 0);
* each expert's reconstruction error against its original delta: cosine and relative L2;
* how many pairs of rescalers swapped order (Theorem 1 assumes none) and the mean mask density.

Setting 2 (Lemma 3 / Theorem F.3): the first ``--fixed-tasks`` deltas decoupled and unified again
and again with no new task; records the max element change per iteration.

Scenarios: ``iid`` (N(0,1)), ``same_sign`` (i.i.d. magnitudes, one sign pattern shared by all
tasks: Theorem 1's hypothesis), ``heavy_tailed`` (Student-t, 2 degrees of freedom, log-normal task
scales), ``correlated`` (a shared component plus heavy-tailed task noise, per-row scales, sparse).

Writes ``<out>/convergence.png``, ``<out>/convergence.json`` and prints a table. Usage::

    python benchmarks/convergence.py                   # 50 sessions, all scenarios, l1 rescaler
    python benchmarks/convergence.py --sessions 20 --rescaler tensor_mean --out /tmp/conv
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

from condu_merge import RESCALER_MODES, ContinualMerger, RescalerWarning, decouple, unify

SCENARIOS = ("iid", "same_sign", "heavy_tailed", "correlated")
SHAPES = {"layer.weight": (64, 48), "layer.bias": (64,), "head.weight": (16, 64)}


# ----------------------------------------------------------------------------- synthetic deltas


def make_deltas(scenario: str, sessions: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``sessions`` float32 task deltas over :data:`SHAPES` for one scenario (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    signs = {k: torch.where(torch.rand(s, generator=g) > 0.5, 1.0, -1.0) for k, s in SHAPES.items()}
    shared = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    row_scale = {
        k: torch.exp(0.75 * torch.randn(s[0], generator=g)).reshape((s[0],) + (1,) * (len(s) - 1))
        for k, s in SHAPES.items()
    }

    def t_noise(shape):
        # Student-t, 2 dof, as z / sqrt(chi2_2 / 2): torch's StudentT.sample takes no generator
        z = torch.randn(shape, generator=g)
        chi2 = torch.randn((2,) + tuple(shape), generator=g).pow(2).sum(0)
        return z / torch.sqrt(chi2 / 2.0)

    out = []
    for _ in range(sessions):
        d = {}
        task_scale = math.exp(0.5 * torch.randn((), generator=g).item())
        for k, s in SHAPES.items():
            if scenario == "iid":
                x = torch.randn(s, generator=g)
            elif scenario == "same_sign":
                x = torch.randn(s, generator=g).abs() * signs[k]
            elif scenario == "heavy_tailed":
                x = task_scale * t_noise(s)
            elif scenario == "correlated":
                keep = (torch.rand(s, generator=g) < 0.3).float()  # sparse task-specific part
                x = task_scale * row_scale[k] * (0.6 * shared[k] + 0.8 * keep * t_noise(s))
            else:
                raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
            d[k] = x.to(torch.float32) * 1e-3  # fine-tuning deltas are small
        out.append(d)
    return out


# ----------------------------------------------------------------------------- measurements


def _flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).to(torch.float64) for v in sd.values()])


def _order_inversions(before: list[float], after: list[float]) -> int:
    """Pairs of tasks (present in both) whose rescalers swap strict order."""
    n = len(before)
    return sum(1 for a in range(n) for b in range(n) if before[a] < before[b] and after[a] > after[b])


def run_setting1(deltas, rescaler: str) -> dict:
    """The continual loop; returns per-session series (lists indexed by session - 1)."""
    m = ContinualMerger(rescaler)
    orig = [_flat(d) for d in deltas]
    l1 = [o.abs().sum().item() for o in orig]
    l2 = [o.norm().item() for o in orig]
    prev: list[torch.Tensor] = []
    prev_lam: list[float] = []
    res = {"avg_change": [], "cosine": [], "rel_l2": [], "order_inversions": [], "mask_density": [], "vanished": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RescalerWarning)
        for s, d in enumerate(deltas):
            m.add_task(f"task{s}", d)
            cur = [_flat(m.decouple(n)) for n in m.task_names]
            lam = [float(sum(t.rescaler_for(k) for k in t.names) / len(t.names)) for t in m.triggers]
            res["avg_change"].append(
                sum((cur[i] - prev[i]).abs().sum().item() / l1[i] for i in range(len(prev))) / len(prev)
                if prev
                else None
            )
            res["cosine"].append(
                [torch.nn.functional.cosine_similarity(cur[i], orig[i], dim=0).item() for i in range(s + 1)]
            )
            res["rel_l2"].append([(cur[i] - orig[i]).norm().item() / l2[i] for i in range(s + 1)])
            res["order_inversions"].append(_order_inversions(prev_lam, lam[: len(prev_lam)]) if prev_lam else 0)
            res["mask_density"].append(sum(t.density() for t in m.triggers) / len(m.triggers))
            res["vanished"].append(sum(1 for x in lam if x == 0.0))
            prev, prev_lam = cur, lam
    return res


def run_setting2(deltas, rescaler: str, iters: int) -> list[float]:
    """Max element change of any expert per decouple->unify iteration of a fixed set."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RescalerWarning)
        u, trig = unify([{k: v.double() for k, v in d.items()} for d in deltas], rescaler=rescaler)
        experts = [decouple(u, t) for t in trig]
        for _ in range(iters):
            u, trig = unify(experts, rescaler=rescaler)
            nxt = [decouple(u, t) for t in trig]
            out.append(max((_flat(a) - _flat(b)).abs().max().item() for a, b in zip(nxt, experts)))
            experts = nxt
    return out


# ----------------------------------------------------------------------------- report


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def print_table(results: dict, sessions: int) -> None:
    marks = [n for n in (2, 3, 5, 10, 20, 30, 40, 50) if n <= sessions]
    print("\naverage relative change c(n) per session (Corollary F.6 predicts -> 0)")
    print(f"{'scenario':<14}" + "".join(f"{'n=' + str(n):>9}" for n in marks) + f"{'late avg':>10}")
    for sc, r in results.items():
        c = r["setting1"]["avg_change"]
        late = _mean(c[max(1, sessions - 10) :])
        print(f"{sc:<14}" + "".join(f"{c[n - 1]:>9.4f}" for n in marks) + f"{late:>10.4f}")
    print(f"\nreconstruction after {sessions} sessions (all experts) and over the run")
    print(
        f"{'scenario':<14}{'mean cos':>9}{'min cos':>9}{'cos(1st)':>9}{'mean rL2':>9}{'max rL2':>9}{'density':>9}{'inversions':>11}{'vanished':>9}{'s2 iters->1e-9':>15}"
    )
    for sc, r in results.items():
        s1 = r["setting1"]
        cos, rl2 = s1["cosine"][-1], s1["rel_l2"][-1]
        s2 = r["setting2"]
        conv = next((i + 1 for i, x in enumerate(s2) if x < 1e-9), None)
        print(
            f"{sc:<14}{_mean(cos):>9.3f}{min(cos):>9.3f}{cos[0]:>9.3f}{_mean(rl2):>9.3f}{max(rl2):>9.3f}"
            f"{s1['mask_density'][-1]:>9.3f}{sum(s1['order_inversions']):>11d}{s1['vanished'][-1]:>9d}"
            f"{(str(conv) if conv else '>' + str(len(s2))):>15}"
        )


def plot(results: dict, path: str, rescaler: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(results)
    fig, axes = plt.subplots(rows, 4, figsize=(13, 2.5 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for r, (sc, res) in enumerate(results.items()):
        s1 = res["setting1"]
        n = len(s1["avg_change"])
        xs = list(range(2, n + 1))
        ax = axes[r][0]
        ax.semilogy(xs, s1["avg_change"][1:], "o-", ms=2, label="c(n)")
        ax.semilogy(xs, [s1["avg_change"][1] * 2 / x for x in xs], "k--", lw=0.8, label="∝ 1/n (for scale)")
        ax.set_title(f"{sc}: average change c(n)", fontsize=9)
        ax.set_xlabel("session n")
        ax.legend(fontsize=7)
        for col, key, title in ((1, "cosine", "each expert's cosine"), (2, "rel_l2", "each expert's rel. L2")):
            ax = axes[r][col]
            for i in range(n):
                ys = [s1[key][s][i] for s in range(i, n)]
                ax.plot(range(i + 1, n + 1), ys, color=cmap(i / max(1, n - 1)), lw=0.8)
            ax.set_title(f"{sc}: {title}", fontsize=9)
            ax.set_xlabel("session n (colour: task index)")
        ax = axes[r][3]
        s2 = [max(x, 1e-300) for x in res["setting2"]]
        ax.semilogy(range(1, len(s2) + 1), s2, lw=1)
        ax.set_title(f"{sc}: setting 2, max change", fontsize=9)
        ax.set_xlabel("iteration")
    fig.suptitle(f"ConDU convergence study (rescaler={rescaler})", y=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=48)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=50, help="tasks / sessions in setting 1 (default 50)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list from {SCENARIOS}")
    ap.add_argument("--rescaler", default="l1", choices=RESCALER_MODES, help="default l1 (the paper's text)")
    ap.add_argument("--fixed-tasks", type=int, default=8, help="tasks in the setting-2 iteration (default 8)")
    ap.add_argument("--iters", type=int, default=150, help="setting-2 iterations (default 150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--png", default=None, help="PNG path (default <out>/convergence.png)")
    args = ap.parse_args(argv)
    if args.sessions < 2:
        ap.error("--sessions must be at least 2")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results = {}
    t0 = time.perf_counter()
    for k, sc in enumerate(s.strip() for s in args.scenarios.split(",") if s.strip()):
        deltas = make_deltas(sc, args.sessions, args.seed + 1000 * k)
        results[sc] = {
            "setting1": run_setting1(deltas, args.rescaler),
            "setting2": run_setting2(deltas[: args.fixed_tasks], args.rescaler, args.iters),
        }
        print(f"[{time.perf_counter() - t0:6.1f}s] {sc} done", file=sys.stderr)
    print_table(results, args.sessions)
    png = args.png or os.path.join(args.out, "convergence.png")
    plot(results, png, args.rescaler)
    js = os.path.join(args.out, "convergence.json")
    meta = {
        "sessions": args.sessions,
        "rescaler": args.rescaler,
        "seed": args.seed,
        "shapes": {k: list(v) for k, v in SHAPES.items()},
        "fixed_tasks": args.fixed_tasks,
        "iters": args.iters,
    }
    with open(js, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh)
    print(f"\nwrote {png} ({os.path.getsize(png) // 1024} KiB) and {js}; {time.perf_counter() - t0:.1f}s total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
