"""The digits continual-learning benchmark in full: every method, FT and LoRA, several seeds,
mean ± std, tables and plots (what ``docs/results.md`` reports).

    python -m benchmarks.digits.run_digits --out runs/digits                     # 3 seeds, FT + LoRA
    python -m benchmarks.digits.run_digits --out runs/digits --few-shot          # 5 images per class
    python -m benchmarks.digits.run_digits --out runs/digits --docs docs         # also docs/results.md + PNGs

One run per (seed, mode) of :func:`condu_merge.demo.run.run_benchmark` (``python -m condu_merge
demo`` is one seed of it, FT, with fewer test images); a seed's pre-trained checkpoint is shared
by its FT and LoRA runs (``OUT/work``). Every run's result is written to
``OUT/runs/<mode>_seed<k>.json`` as it finishes (atomic), and a rerun skips finished runs.
Exit status 1 when a sanity check fails in any run (the report still says which).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from condu_merge.demo.metrics import mean_std
from condu_merge.demo.run import BenchConfig, run_benchmark, summary_table

from ..mtil.plots import curves_png, matrices_png, metric_bars_png

METRICS = ("average", "last", "transfer", "forgetting", "agnostic_average", "agnostic_last", "held_out")
HEAD = {
    "average": "Average",
    "last": "Last",
    "transfer": "Transfer",
    "forgetting": "Forgetting",
    "agnostic_average": "Task-agnostic Average",
    "agnostic_last": "Task-agnostic Last",
    "held_out": "Held-out",
}


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every method's metrics, storage and merge time, and the mean
    accuracy matrices (task id and task-agnostic)."""
    first = runs[0]
    methods = [m for m in first["methods"] if all(m in r["metrics"] for r in runs)]
    out: dict[str, Any] = {
        "methods": methods,
        "labels": first["labels"],
        "metrics": {},
        "storage_x": {},
        "merge_s": {},
        "acc_mean": {},
        "agnostic_mean": {},
        "seeds": [r["config"]["seed"] for r in runs],
        "checks": {},
        "wall_s": [r["timings"].get("wall_s", r["timings"]["total_s"]) for r in runs],
    }
    out["failed"] = {f"seed {r['config']['seed']}: {n}": why for r in runs for n, why in r.get("failed", {}).items()}
    for m in methods:
        out["metrics"][m] = {k: mean_std([r["metrics"][m].get(k) for r in runs]) for k in METRICS}
        out["storage_x"][m] = mean_std([r["storage_x"][m] for r in runs])
        out["merge_s"][m] = mean_std([r["merge_s"].get(m) for r in runs]) if m in first["merge_s"] else (None, None)
        if m in first["acc"]:
            out["acc_mean"][m] = np.nanmean(np.array([r["acc"][m] for r in runs], dtype=float), axis=0).tolist()
        if m in first["agnostic"]:
            out["agnostic_mean"][m] = np.nanmean(
                np.array([r["agnostic"][m] for r in runs], dtype=float), axis=0
            ).tolist()
    out["individual_ft"] = np.mean([r["individual_ft"] for r in runs], axis=0).tolist()
    for name in first["checks"]:
        out["checks"][name] = {
            "ok": all(r["checks"][name]["ok"] for r in runs),
            "detail": "; ".join(f"seed {r['config']['seed']}: {r['checks'][name]['detail']}" for r in runs),
        }
    out["zeroshot_plain"] = mean_std([r["zeroshot_plain"] for r in runs])
    return out


def _pm(ms: tuple[float | None, float | None], nd: int = 1) -> str:
    m, s = ms
    if m is None:
        return "-"
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def metrics_table(agg: Mapping[str, Any]) -> str:
    """The main table: per method every metric (mean ± std over seeds), storage and merge time."""
    cols = [HEAD[k] for k in METRICS] + ["Storage (× one model)", "Merge s (all sessions)"]
    lines = ["| Method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in agg["methods"]:
        met = agg["metrics"][m]
        cells = [_pm(met[k]) for k in METRICS] + [_pm(agg["storage_x"][m], 2), _pm(agg["merge_s"][m], 3)]
        lines.append(f"| {agg['labels'][m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def matrix_table(columns: Sequence[str], acc: Sequence[Sequence[float]]) -> str:
    lines = ["| after | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for s, row in enumerate(acc):
        lines.append(f"| S{s + 1} | " + " | ".join("-" if not np.isfinite(v) else f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def _model_words(r: Mapping[str, Any]) -> str:
    v = (r["config"].get("model") or {}).get("vision_cfg") or {
        "width": 64,
        "layers": 2,
    }  # runs before the field: width 64
    return f"width {v['width']}, {v['layers']} layers"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits.run_digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (per-run results, plots, report)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modes", default="ft,lora")
    p.add_argument("--few-shot", action="store_true", help="--shots training images per class and task")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--pretrain-steps", type=int, default=250)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--test-per-domain", type=int, help="cap on test images per domain (default: all 539)")
    p.add_argument("--strategies", help="comma list (default: every registered strategy)")
    p.add_argument("--docs", help="also write DOCS/results.md and DOCS/results_*.png (e.g. --docs docs)")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    out = os.path.abspath(a.out)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    tag = f"_fewshot{a.shots}" if a.few_shot else ""
    t_all = time.perf_counter()
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for seed in seeds:
        for mode in modes:
            path = os.path.join(out, "runs", f"{mode}{tag}_seed{seed}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results[mode].append(json.load(f))
                continue
            cfg = BenchConfig(
                seed=seed,
                mode=mode,
                pretrain_steps=a.pretrain_steps,
                steps=a.steps,
                top_k=a.top_k,
                test_per_domain=a.test_per_domain,
                shots=a.shots if a.few_shot else None,
                strategies=tuple(a.strategies.split(",")) if a.strategies else None,
                workdir=os.path.join(out, "work"),
            )
            t0 = time.perf_counter()
            res = run_benchmark(cfg, log=None if a.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True)))
            res["timings"]["wall_s"] = time.perf_counter() - t0
            _atomic_json(path, res)
            results[mode].append(res)
            if not a.quiet:
                print(
                    f"\n{mode.upper()} seed {seed} ({res['timings']['wall_s']:.0f} s)\n{summary_table(res)}\n",
                    file=sys.stderr,
                )
    aggs = {m: aggregate(rs) for m, rs in results.items()}
    wall = time.perf_counter() - t_all
    report = {
        "modes": modes,
        "seeds": seeds,
        "few_shot": a.shots if a.few_shot else None,
        "aggregate": aggs,
        "wall_s_this_invocation": wall,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.digits.run_digits " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
    }
    _atomic_json(os.path.join(out, f"summary{tag}.json"), report)
    docs = os.path.abspath(a.docs) if a.docs else out
    write_report(docs, results, aggs, report, tag)
    ok = all(c["ok"] for agg in aggs.values() for c in agg["checks"].values())
    for m, agg in aggs.items():
        print(f"## {m.upper()}{' few-shot' if a.few_shot else ''} ({len(seeds)} seeds)\n\n{metrics_table(agg)}")
        for name, c in agg["checks"].items():
            print(f"check {'ok  ' if c['ok'] else 'FAIL'} {name}")
    print(f"wall time {wall:.0f} s; report in {docs}")
    return 0 if ok else 1


def write_report(
    docs: str, results: Mapping[str, Sequence[Mapping]], aggs: Mapping[str, Mapping], report: Mapping, tag: str
) -> None:
    """``results{tag}.md`` (for ``--docs docs`` and no few-shot: ``docs/results.md``) and its PNGs."""
    os.makedirs(docs, exist_ok=True)
    first_mode = next(iter(results))
    r0 = results[first_mode][0]
    tasks, _held, domains = r0["tasks"], r0["held_out"], r0["domains"]
    agg0 = aggs[first_mode]
    labels = agg0["labels"]
    methods = list(agg0["methods"])
    pngs: dict[str, str] = {}
    for mode, agg in aggs.items():
        mats = {labels[m]: agg["acc_mean"][m] for m in methods if m in agg["acc_mean"]}
        for m in agg["agnostic_mean"]:
            if m in ("condu",) or r0["task_aware"].get(m):
                mats[f"{labels[m]}, task-agnostic"] = agg["agnostic_mean"][m]
        p = f"results{tag}_{mode}_matrices.png"
        if matrices_png(
            os.path.join(docs, p),
            domains,
            mats,
            n_tasks=len(tasks),
            title=f"{mode.upper()}: accuracy A[s][j] after session s (rows) on domain j (columns), mean of "
            f"{len(agg['seeds'])} seeds; colour: learned tasks; grey italic: not learned yet or held-out "
            "(right of the red line)",
        ):
            pngs[f"{mode}_matrices"] = p
        p = f"results{tag}_{mode}_curves.png"
        if curves_png(
            os.path.join(docs, p),
            tasks,
            {
                labels[m]: [row[: len(tasks)] for row in agg["acc_mean"][m]]
                for m in methods
                if m in agg["acc_mean"] and m != "zeroshot"
            },
            title=f"{mode.upper()}: accuracy on each task after every session (mean of {len(agg['seeds'])} seeds); "
            "a line falling after the dotted mark is forgetting",
        ):
            pngs[f"{mode}_curves"] = p
    values = {
        mode.upper(): {
            labels[m]: {k: agg["metrics"][m][k] for k in METRICS} | {"storage": agg["storage_x"][m]} for m in methods
        }
        for mode, agg in aggs.items()
    }
    p = f"results{tag}_bars.png"
    if metric_bars_png(
        os.path.join(docs, p),
        [labels[m] for m in methods],
        [
            ("average", "Average %"),
            ("last", "Last % (task id)"),
            ("agnostic_last", "Task-agnostic Last %"),
            ("transfer", "Transfer %"),
            ("forgetting", "Forgetting (points)"),
            ("storage", "Storage (× one model)"),
        ],
        values,
        title=f"Digits benchmark, mean ± std over seeds {', '.join(map(str, report['seeds']))}",
    ):
        pngs["bars"] = p
    name = f"results{tag}.md"
    few = report["few_shot"]
    lines = [
        f"# Continual learning on real digits: every strategy side by side{f' ({few}-shot)' if few else ''}",
        "",
        "ConDU's claim, checked on real data: keep every task's accuracy (as individual fine-tuning does) at close to "
        "one model's storage, where continual fine-tuning forgets and naive merging interferes.",
        "",
        f"- **Command**: `{report['command']}`",
        f"- **Date**: {report['date']}; **wall time**: {report['wall_s_this_invocation']:.0f} s this invocation "
        f"(per run: {', '.join(f'{mode.upper()} ' + '/'.join(f'{w:.0f}' for w in aggs[mode]['wall_s']) for mode in aggs)} s)",
        f"- **Machine**: {report['machine']['platform']}, {report['machine']['cpus']} CPU cores (shared with other jobs: "
        f"timings are noisy), Python {report['machine']['python']}, one torch thread per run",
        f"- **Data**: scikit-learn `load_digits` (1,797 real 8x8 handwritten digits, upsampled to 16x16), split per seed "
        "70/30 into a training and a test pool; every domain draws its own training images from the training pool"
        f"{f' ({few} per class)' if few else ' (600 per task)'} and is tested on the whole transformed test pool (539 images).",
        f"- **Model**: a tiny open_clip `CLIP` (ViT 16x16, patch 4, {_model_words(r0)}; 1-layer text tower), pre-trained "
        f"in-process for {r0['config']['pretrain_steps']} steps on the plain domain with class-name captions "
        '("a photo of the digit three."), saved as a local safetensors checkpoint and loaded back as θ_0. Zero-shot '
        f"accuracy of θ_0 on plain test digits: {_pm(agg0['zeroshot_plain'])} % (chance 10 %).",
        f"- **Protocol**: {len(tasks)} sessions, one per task domain, in this order; experts fine-tuned from θ_0 "
        f"({r0['config']['steps']} AdamW steps, batch 64; FT: the image tower, LoRA: rank-{r0['config']['lora_rank']} "
        "factors on its attention and MLP projections), classified with θ_0's zero-shot text head (the text tower is not "
        "trained). ConDU folds each expert into a `Store` (`add_task`), saves the task's prototypes, and routes "
        f"task-agnostic and unseen samples to the top-{r0['config']['top_k']} experts with `SemanticAggregator`. Every "
        f"strategy of the registry runs in the same sessions: {', '.join(labels[m] for m in methods if m not in ('zeroshot', 'individual_ft', 'continual_ft', 'condu'))}.",
        "",
        "| Domain | What | Role |",
        "|---|---|---|",
        *[
            f"| {d} | {r0['domain_what'][d]} | {'task ' + str(tasks.index(d) + 1) if d in tasks else 'held out'} |"
            for d in domains
        ],
        "",
        "**Metrics** (from the accuracy matrix `A[s][j]`, task columns): Transfer = mean over `s < j` (before the task is "
        "learned; ConDU and task-aware strategies route those samples), Average = mean over all sessions, Last = after the "
        "last session, Forgetting = mean over earlier tasks of `A[j][j] − A[T][j]` (= −BWT), task-agnostic Average/Last = "
        "the same without task ids (single-model methods: equal to theirs), Held-out = mean accuracy after the last session "
        "on the two domains no method trains on. Storage: bytes kept beyond θ_0, in units of one fine-tuned model (the "
        "image tower's tensors for FT, the LoRA factors for LoRA; ConDU counts u, the 1-bit masks, the rescalers and the "
        "prototypes). Merge s: time spent merging, summed over the sessions (ConDU: `Store.add_task` with disk writes and "
        "fsyncs, torch backend; strategies: `end_task` plus building the merged model).",
        "",
        "## Sanity checks",
        "",
    ]
    for mode, agg in aggs.items():
        for cname, c in agg["checks"].items():
            lines.append(f"- {mode.upper()} **{cname}**: {'passed' if c['ok'] else '**FAILED**'} ({c['detail']})")
        for n, why in agg.get("failed", {}).items():
            lines.append(f"- {mode.upper()} strategy **dropped** ({n}): {why}")
    lines.append("")
    for mode, agg in aggs.items():
        lines += [
            f"## {mode.upper()}: mean ± std over seeds {', '.join(map(str, agg['seeds']))}",
            "",
            metrics_table(agg),
            "",
        ]
        lines += [
            "Fine-tunings run per seed (nothing trained twice: strategies starting from θ_0 or from continual FT's "
            "start without a hook reuse those models): "
            + ", ".join(f"{labels[m]} {n}" for m, n in results[mode][0]["trained"].items() if n)
            + ".",
            "",
        ]
        if f"{mode}_matrices" in pngs:
            lines += [f"![{mode} accuracy matrices]({pngs[f'{mode}_matrices']})", ""]
        if f"{mode}_curves" in pngs:
            lines += [f"![{mode} forgetting curves]({pngs[f'{mode}_curves']})", ""]
    if "bars" in pngs:
        lines += ["## Method × metric", "", f"![method x metric]({pngs['bars']})", ""]
    lines += [
        "## Accuracy matrices (mean over seeds)",
        "",
        f"Rows: after session S1..S{len(tasks)}; columns: the task domains then the held-out ones.",
        "",
    ]
    for mode, agg in aggs.items():
        for m in methods:
            if m in agg["acc_mean"]:
                lines += [
                    f"<details><summary>{mode.upper()} · {labels[m]}</summary>",
                    "",
                    matrix_table(domains, agg["acc_mean"][m]),
                ]
                if m in agg["agnostic_mean"] and (m == "condu" or r0["task_aware"].get(m)):
                    lines += ["Task-agnostic:", "", matrix_table(domains, agg["agnostic_mean"][m])]
                lines += ["</details>", ""]
        lines += [
            f"Individual FT ({mode.upper()}), each expert on its task: "
            + ", ".join(f"{t} {v:.1f}" for t, v in zip(tasks, agg["individual_ft"])),
            "",
        ]
    with open(os.path.join(docs, name), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
