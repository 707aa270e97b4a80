"""MTIL reference run: ConDU (FT or LoRA), task-agnostic and few-shot variants, with the zero-shot,
individual fine-tuning and continual fine-tuning baselines, resumable session by session.

    python -m benchmarks.mtil.run_mtil --data-root DATA --out runs/mtil_ft            # real run (GPU)
    python -m benchmarks.mtil.run_mtil --synthetic --out /tmp/mtil_syn                # CPU smoke run

Per session ``s`` (task ``t_s``): fine-tune from the pretrained model θ_0 (never from the previous
session); evaluate that fresh expert on its task (Individual FT); compute the task's prototypes
with θ_0; fold the delta into the ConDU store (``Store.add_task``: the store is the checkpoint);
evaluate every dataset -- seen ones with their decoupled expert, unseen ones by top-K aggregation,
and, for the task-agnostic variant, every one by aggregation (``condu_merge.routing``:
``SemanticAggregator`` over ``ClipExperts.from_store`` experts); train the continual-FT baseline one
more session and evaluate it. ``state.json`` records each finished session (atomic replace), so a
rerun after a crash or ``--max-sessions`` continues from the last finished session.

Other continual strategies (``--methods pam,magmax,task_arithmetic,ties,emr``) run through
:mod:`condu_merge.strategies` in the same sessions (see :mod:`benchmarks.mtil.continual`): task
arithmetic, TIES and EMR fold the session's individual delta, MagMax folds continual FT's trained
weights, PAM trains its own model with its alignment hook. PAM and MagMax are saved after folding
their task (``OUT/strategies/<name>.safetensors``, atomic). Task arithmetic, TIES and EMR are never
saved whole: each session's individual delta is written once to
``OUT/strategies/deltas/<session:04d>.safetensors`` (atomic, its sha256 in ``state.json``) and a
rerun rebuilds them by folding those files again (O(T) bytes on disk, shared by the three).
``results.json["storage"]`` and the "Storage" table of ``results.md`` give what every method stores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence

import torch

from condu_merge.adapters import (
    ClipExperts,
    LoraAdapter,
    clip_delta,
    factor_delta,
    init_lora,
    lora_transform,
    lora_weights,
    pretrained_state,
    swap_params,
)
from condu_merge.routing import SemanticAggregator, prototypes_from_store, route
from condu_merge.store import fsync_dir
from condu_merge.strategies import ContinualStrategy, get_strategy, state_nbytes
from condu_merge.strategies.base import load_strategy

from .continual import (
    DEFAULT_METHODS,
    DELTA_STRATEGIES,
    LABELS,
    STRATEGY_METHODS,
    VALID_METHODS,
    condu_store_storage,
    hook_stats_markdown,
    parse_methods,
    report_entry,
    runtime_options,
    storage_csv,
    storage_entry,
    storage_markdown,
    strategy_options,
)
from .datasets import FT_LR, MTIL_ORDER, ORDERS, MTILDataset, load_mtil_dataset
from .evaluate import (
    AutocastExperts,
    EvalConfig,
    aggregator_accuracy,
    image_features,
    model_accuracy,
    task_prototypes,
    text_embeddings,
    zero_shot_accuracy,
)
from .metrics import csv_text, heatmap_png, markdown_table, summary_metrics
from .model import ClipHandle, load_clip, lora_modules, trainable_params
from .train import TrainConfig, finetune_full, finetune_lora, lora_flat_names

LORA_LR: dict[str, float] = {  # the released MTIL_LoRA.sh
    "Aircraft": 1e-3,
    "Caltech101": 5e-4,
    "CIFAR100": 2e-3,
    "DTD": 2e-3,
    "EuroSAT": 1.5e-4,
    "Flowers": 1e-5,
    "Food": 2e-3,
    "MNIST": 1e-3,
    "OxfordPet": 1.5e-4,
    "StanfordCars": 2e-3,
    "SUN397": 1.5e-3,
}
STATE_VERSION = 1
CRASH_ENV = "MTIL_CRASH_AT"  # test hook: "<step>:<session>" kills the process there (SIGKILL)


def _crash_point(step: str, session: int) -> None:
    if os.environ.get(CRASH_ENV) == f"{step}:{session}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _atomic_json(path: str, obj: object) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_sha256(path: str, chunk: int = 1 << 24) -> str:
    """sha256 (hex) of a file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_safetensors(
    path: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], *, digest: bool = False
) -> str | None:
    """Write ``tensors`` to ``path`` atomically (temporary file, fsync, rename, directory fsync);
    with ``digest``, return the sha256 of the bytes written (read back from the temporary file,
    so it covers exactly what was fsynced)."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        sha = _file_sha256(tmp) if digest else None
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return sha


def _load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def parse_lr_map(text: str | None) -> dict[str, float]:
    """``"Aircraft=5e-5,MNIST=5e-5"`` -> dict."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, val = part.partition("=")
        if not val:
            raise ValueError(f"--lr-map entry {part!r} is not NAME=VALUE")
        out[name.strip()] = float(val)
    return out


def resolve_order(order: str, tasks: str | None) -> list[str]:
    """``alphabetical`` / ``order2`` / a comma list; ``tasks`` (comma list) keeps a subset in that order."""
    if order in ORDERS:
        seq = list(ORDERS[order])
    else:
        seq = [t.strip() for t in order.split(",") if t.strip()]
    bad = [t for t in seq if t not in MTIL_ORDER]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; MTIL tasks are {list(MTIL_ORDER)}")
    if len(set(seq)) != len(seq):
        raise ValueError(f"task order {seq} repeats a task")
    if tasks:
        keep = [t.strip() for t in tasks.split(",") if t.strip()]
        bad = [t for t in keep if t not in seq]
        if bad:
            raise ValueError(f"--tasks {bad} not in the order {seq}")
        seq = [t for t in seq if t in keep]
    return seq


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mtil.run_mtil", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (also the resume checkpoint)")
    p.add_argument("--data-root", help="folder holding the MTIL datasets (see docs/mtil.md)")
    p.add_argument(
        "--model", default="ViT-B-16", help="open_clip architecture, or hf:<dir or id> for Hugging Face CLIP"
    )
    p.add_argument("--pretrained", default="openai", help="open_clip tag or a local checkpoint file (offline)")
    p.add_argument("--order", default="alphabetical", help="alphabetical | order2 | comma-separated task list")
    p.add_argument("--tasks", help="comma-separated subset of the order to run")
    p.add_argument("--mode", choices=("ft", "lora"), default="ft")
    p.add_argument("--train-mode", choices=("whole", "image", "text"), default="whole")
    p.add_argument("--few-shot", action="store_true", help="few-shot MTIL: --shots images per class, 500 iterations")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--iterations", type=int, help="default 1000 (500 few-shot)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="one learning rate for every task (overrides the per-dataset table)")
    p.add_argument("--lr-map", help="per-task overrides, e.g. Aircraft=5e-5,MNIST=5e-5")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--label-smoothing", type=float, default=0.2)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, help="default: the rank (scaling 1)")
    p.add_argument("--top-k", type=int, default=5, help="experts aggregated for unseen / task-agnostic samples")
    p.add_argument(
        "--include-pretrained",
        action="store_true",
        help="add the pretrained model's logits to every aggregation (mean over K + 1), as the released code can",
    )
    p.add_argument(
        "--expert-cache",
        type=int,
        help="decoupled experts kept on the device during evaluation (default: all of the session's; "
        "fewer saves memory but re-decouples experts from the store batch after batch)",
    )
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma list of {', '.join(VALID_METHODS)} (individual FT always comes free). "
        "task_arithmetic, ties and emr fold the individual task vectors and keep every one of them "
        "in host memory (T x one model each; on disk the T deltas once, shared); magmax reuses "
        "continual FT's training (run even when continual_ft is not listed); pam trains its own "
        "model every session",
    )
    p.add_argument("--rescaler", default="tensor_mean", help="ConDU's (and EMR's) rescaler")
    s = p.add_argument_group("continual strategies (--methods pam,magmax,task_arithmetic,ties,emr)")
    s.add_argument(
        "--pam-fraction", type=float, default=0.5, help="PAM: important fraction of the global module aligned to"
    )
    s.add_argument("--pam-every", type=int, help="PAM: align every N optimizer steps (default 100; 5 with --synthetic)")
    s.add_argument(
        "--pam-reset",
        choices=("global", "zero"),
        default="global",
        help="PAM: re-initialise conflicting weights to the global module's values or to zero",
    )
    s.add_argument("--pam-merge-coef", type=float, default=0.5, help="PAM: G_t = (1 - c) G_{t-1} + c θ_t")
    s.add_argument(
        "--pam-align-on",
        choices=("values", "task_vector"),
        help="PAM: compare weights (default with --mode lora) or task vectors (default with --mode ft)",
    )
    s.add_argument("--ta-scale", type=float, default=0.3, help="task arithmetic: θ_0 + λ Σ τ_i")
    s.add_argument("--ties-density", type=float, default=0.2, help="TIES: kept fraction k of each task vector")
    s.add_argument("--magmax-scale", type=float, default=1.0, help="MagMax: θ_0 + λ τ_MM")
    p.add_argument("--backend", default="auto")
    p.add_argument("--proto-max-per-class", type=int, help="cap training images per class for prototypes")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-sessions", type=int, help="stop after this many finished sessions (rerun to continue)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    g = p.add_argument_group("synthetic (CPU, no data, no weights)")
    g.add_argument(
        "--synthetic", action="store_true", help="tiny CLIP + procedural data in the MTIL layout under OUT/synthetic"
    )
    g.add_argument("--synthetic-tasks", type=int, default=4)
    g.add_argument("--synthetic-images", type=int, default=40, help="training images per class")
    g.add_argument("--synthetic-pretrain-steps", type=int, default=60)
    return p


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    import condu_merge

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "condu_merge": condu_merge.__version__,
        "platform": platform.platform(),
    }
    for mod in ("open_clip", "transformers", "torchvision"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


class Runner:
    """One MTIL run; all state that must survive a crash lives under ``out``."""

    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.quiet = args.quiet
        try:
            self.methods = parse_methods(args.methods)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        self.strategy_names = [m for m in self.methods if m in STRATEGY_METHODS]
        torch.manual_seed(args.seed)
        if args.synthetic:
            from . import synthetic

            setup = synthetic.prepare(
                os.path.join(self.out, "synthetic"),
                n_tasks=args.synthetic_tasks,
                n_train=args.synthetic_images,
                n_test=max(8, args.synthetic_images // 2),
                pretrain_steps=args.synthetic_pretrain_steps,
                seed=args.seed,
                progress=not args.quiet,
            )
            self.data_root, model_name, pretrained = setup.data_root, setup.model_name, setup.checkpoint
            self.tasks = resolve_order_synthetic(args, setup.tasks)
            self.classnames: dict[str, list[str] | None] = dict(setup.classnames)
        else:
            if not args.data_root:
                raise SystemExit("error: --data-root is required (or --synthetic)")
            self.data_root, model_name, pretrained = args.data_root, args.model, args.pretrained
            self.tasks = resolve_order(args.order, args.tasks)
            self.classnames = dict.fromkeys(self.tasks)
        self.iterations = args.iterations or (500 if args.few_shot else 1000)
        self.lr_table = dict(LORA_LR if args.mode == "lora" else FT_LR)
        self.lr_table.update(parse_lr_map(args.lr_map))
        self.config = {
            "tasks": self.tasks,
            "mode": args.mode,
            "train_mode": args.train_mode,
            "few_shot": args.few_shot,
            "shots": args.shots if args.few_shot else None,
            "iterations": self.iterations,
            "batch_size": args.batch_size,
            "lr": {t: (args.lr if args.lr is not None else self.lr_table.get(t, 1e-5)) for t in self.tasks},
            "weight_decay": args.weight_decay,
            "warmup": args.warmup,
            "label_smoothing": args.label_smoothing,
            "top_k": args.top_k,
            "include_pretrained": args.include_pretrained,
            "rescaler": args.rescaler,
            "methods": self.methods,
            "seed": args.seed,
            "model": model_name,
            "pretrained": pretrained,
            "synthetic": args.synthetic,
            "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha or float(args.lora_rank)}
            if args.mode == "lora"
            else None,
            "proto_max_per_class": args.proto_max_per_class,
            "strategy_options": strategy_options(self.strategy_names, args, args.mode),
        }
        self._check_config()
        _log(f"[mtil] loading {model_name} ({pretrained}) on {args.device}", self.quiet)
        self.clip: ClipHandle = load_clip(model_name, pretrained, args.device)
        # θ_0 of every tensor that any mode trains (CPU), to reset the model between trainings
        self.theta0 = {k: v.cpu() for k, v in pretrained_state(self.clip.model, "whole").items()}
        self.names = trainable_params(self.clip.model, args.train_mode)
        self.eval_cfg = EvalConfig(args.eval_batch_size, args.num_workers, not args.no_amp, not args.quiet)
        self.lora0: LoraAdapter | None = self._shared_lora_init() if args.mode == "lora" else None
        self.datasets: list[MTILDataset] = [
            load_mtil_dataset(
                t,
                self.data_root,
                self.clip.train_transform,
                self.clip.test_transform,
                classnames=self.classnames.get(t),
                few_shot=args.shots if args.few_shot else 0,
                few_shot_seed=args.seed,
            )
            for t in self.tasks
        ]
        from condu_merge.store import Store

        self.store = Store(os.path.join(self.out, "store"))
        self.state = self._load_state()
        self._pre_feats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.strats: dict[str, ContinualStrategy] = {}
        self._strategy_base: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ config / state
    def _check_config(self) -> None:
        path = os.path.join(self.out, "config.json")
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            keys = (
                "tasks",
                "mode",
                "train_mode",
                "few_shot",
                "shots",
                "iterations",
                "batch_size",
                "lr",
                "seed",
                "model",
                "lora",
                "top_k",
                "include_pretrained",
                "methods",
            )
            diff = [k for k in keys if old.get(k) != self.config.get(k)]
            if old.get("strategy_options", {}) != self.config["strategy_options"]:
                diff.append("strategy_options")
            if diff:
                raise SystemExit(
                    f"error: {path} was made with different settings ({', '.join(diff)}); use another --out to start afresh"
                )
        else:
            _atomic_json(path, self.config)

    def _load_state(self) -> dict:
        path = os.path.join(self.out, "state.json")
        if not os.path.exists(path):
            return {"version": STATE_VERSION, "sessions": [], "zeroshot": None, "pending": None}
        with open(path) as f:
            st = json.load(f)
        if st.get("version") != STATE_VERSION:
            raise SystemExit(f"error: {path} has state version {st.get('version')}, expected {STATE_VERSION}")
        return st

    def _save_state(self) -> None:
        _atomic_json(os.path.join(self.out, "state.json"), self.state)

    def _shared_lora_init(self) -> LoraAdapter:
        """The shared LoRA initialisation, as a PEFT folder ``OUT/lora_init`` (written once, atomically)."""
        path = os.path.join(self.out, "lora_init")
        if os.path.isdir(path):
            return LoraAdapter.load(path)
        init = init_lora(
            self.clip.model,
            lora_modules(self.clip.model, self.a.train_mode),
            rank=self.a.lora_rank,
            lora_alpha=self.config["lora"]["alpha"],
            seed=self.a.seed,
        )
        tmp = f"{path}.tmp{os.getpid()}"
        init.save(tmp)
        os.replace(tmp, path)
        return LoraAdapter.load(path)

    # ------------------------------------------------------------------ model helpers
    def reset_model(self) -> None:
        self.clip.model.load_state_dict(self.theta0, strict=False)  # logit_scale never changes

    def train_cfg(self, task: str, session: int) -> TrainConfig:
        a = self.a
        return TrainConfig(
            self.iterations,
            a.batch_size,
            self.config["lr"][task],
            a.weight_decay,
            min(a.warmup, self.iterations // 2),
            a.label_smoothing,
            a.num_workers,
            not a.no_amp,
            a.seed + session,
            not a.quiet,
        )

    def pretrained_feats(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """θ_0's test-set image features and labels of dataset ``j`` (cached: routing and zero-shot)."""
        if j not in self._pre_feats:
            self._pre_feats[j] = image_features(
                self.clip, self.datasets[j].test, self.eval_cfg, desc=f"θ0 features {self.tasks[j]}"
            )
        return self._pre_feats[j]

    def lora_accuracy(self, adapter: LoraAdapter, js: Sequence[int], desc: str) -> list[float]:
        """Accuracy on datasets ``js`` of θ_0 with ``adapter`` applied (``W + s · B A``)."""
        with torch.no_grad():
            weights = lora_weights(self.clip.model, adapter.to(self.clip.device))
        with swap_params(self.clip.model, weights):
            return [
                model_accuracy(self.clip, self.datasets[j], self.eval_cfg, f"{desc} on {self.tasks[j]}") for j in js
            ]

    def experts(self, n_tasks: int):
        """The session's decoupled experts read from the store (an ``ExpertEncoders``)."""
        cache = self.a.expert_cache if self.a.expert_cache is not None else n_tasks
        # factor-wise LoRA: expert t is W + s·B_t A_t, (A_t, B_t) = init + δ̃_t
        transform = None if self.lora0 is None else lora_transform(self.lora0, self.clip.model)
        return ClipExperts.from_store(
            self.clip.model, self.store, backend=self.a.backend, cache_size=cache, transform=transform
        )

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        T = len(self.tasks)
        timings_total = time.perf_counter()
        if "zeroshot" in self.methods and self.state["zeroshot"] is None:
            self.state["zeroshot"] = [
                zero_shot_accuracy(
                    *self.pretrained_feats(j), text_embeddings(self.clip, self.datasets[j], self.eval_cfg)
                )
                for j in range(T)
            ]
            self._save_state()
        done = len(self.state["sessions"])
        if done:
            _log(f"[mtil] resuming: {done} of {T} sessions already finished", self.quiet)
        for s in range(done, T):
            if self.a.max_sessions is not None and s >= self.a.max_sessions:
                _log(f"[mtil] stopping after {s} sessions (--max-sessions); rerun to continue", self.quiet)
                return self.finish(partial=True)
            self.session(s)
        res = self.finish(partial=False)
        res["timings"]["this_invocation_s"] = time.perf_counter() - timings_total
        return res

    def session(self, s: int) -> None:
        task = self.tasks[s]
        T = len(self.tasks)
        tim: dict[str, float] = {}
        _log(f"[mtil] session {s + 1}/{T}: {task}", self.quiet)
        self.store.reload(verify=False)
        have = list(self.store.task_names) if self.store.exists else []
        if have != self.tasks[: len(have)] or len(have) > s + 1:
            raise SystemExit(f"error: the store holds tasks {have}, which do not match the order {self.tasks[: s + 1]}")
        pending = self.state.get("pending") if (self.state.get("pending") or {}).get("task") == task else None
        delta: dict[str, torch.Tensor] | None = None
        if len(have) < s + 1:
            # 1. tune individually, from θ_0
            self.reset_model()
            cfg = self.train_cfg(task, s)
            t0 = time.perf_counter()
            if self.lora0 is None:
                finetune_full(self.clip, self.datasets[s], cfg, self.names, desc=f"train {task}")
                sd = self.clip.model.state_dict()
                delta = clip_delta(self.theta0, {k: sd[k].detach().cpu() for k in self.names}, self.a.train_mode)
                indiv = model_accuracy(self.clip, self.datasets[s], self.eval_cfg, f"individual FT on {task}")
            else:
                adapter = finetune_lora(self.clip, self.datasets[s], cfg, self.lora0, desc=f"train {task}")
                delta = factor_delta(adapter, self.lora0)  # (A_t - A_0, B_t - B_0), checked against the init
                indiv = self.lora_accuracy(adapter, [s], "individual FT")[0]
            tim["train_s"] = time.perf_counter() - t0
            self.reset_model()
            pending = {"task": task, "individual_ft": indiv, "timings": dict(tim)}
            if self._delta_strategies():
                # task arithmetic, TIES and EMR are rebuilt from these files after a restart (the
                # store holds only the unified delta): written once, before the store takes the
                # task, its checksum recorded with the session
                os.makedirs(self.deltas_dir, exist_ok=True)
                pending["delta_sha256"] = _atomic_safetensors(
                    self.delta_path(s), delta, {"session": str(s), "task": task}, digest=True
                )
                _crash_point("delta_written", s)
            self.state["pending"] = pending
            self._save_state()
            _crash_point("trained", s)
            # 2. unify (decoupling every earlier expert is implicit in add_task)
            t0 = time.perf_counter()
            self.store.add_task(task, delta, rescaler=self.a.rescaler, backend=self.a.backend)
            pending["timings"]["merge_s"] = time.perf_counter() - t0
            if not self._delta_strategies():
                delta = None
            _crash_point("merged", s)
        if pending is None:
            raise SystemExit(
                f"error: the store already holds {task!r} but {self.out}/state.json has no record of its "
                "training; the output directory was modified by hand"
            )
        tim = dict(pending["timings"])
        # 3. prototypes with θ_0 (idempotent: recomputed if a crash lost them)
        self.reset_model()
        self.store.reload(verify=False)
        if self.store.load_prototypes(task) is None:
            t0 = time.perf_counter()
            protos = task_prototypes(
                self.clip, self.datasets[s], self.eval_cfg, max_per_class=self.a.proto_max_per_class, seed=self.a.seed
            )
            self.store.save_prototypes(task, protos)
            tim["prototypes_s"] = time.perf_counter() - t0
        _crash_point("prototypes", s)
        # 4. the strategies fold the task (each saved right after; a rerun skips the ones that have it)
        self.fold_individual(s, delta, tim)
        del delta
        cft: dict[str, torch.Tensor] | None = None
        if {"continual_ft", "magmax"} & set(self.methods):
            cft, cft_start, t_cft = self.continual_ft_state(s)
            tim.update(t_cft)
            if "magmax" in self.methods:
                self.fold_magmax(s, cft, cft_start, tim)
        if "pam" in self.methods:
            self.train_pam(s, pending, tim)
        # 5. evaluate ConDU: seen tasks with their expert, unseen by aggregation, agnostic by aggregation
        t0 = time.perf_counter()
        rows: dict[str, list[float]] = {}
        if {"condu", "agnostic"} & set(self.methods):
            self.store.reload(verify=False)
            protos = prototypes_from_store(self.store, self.tasks[: s + 1])
            agg = SemanticAggregator(
                AutocastExperts(self.experts(s + 1), self.clip, self.eval_cfg),
                protos,
                k=self.a.top_k,
                include_pretrained=self.a.include_pretrained,
            )
            known: dict[int, float] = {}
            if "condu" in self.methods:  # task id known: the task's own expert
                for j in range(s + 1):
                    known[j] = aggregator_accuracy(
                        agg,
                        self.clip,
                        self.datasets[j],
                        self.eval_cfg,
                        task=self.tasks[j],
                        desc=f"S{s + 1} expert {self.tasks[j]}",
                    )
            # unseen tasks (ConDU) and every task (task-agnostic): routed aggregation; an unseen task's
            # number is the same for both, so it is computed once
            agg_js = range(T) if "agnostic" in self.methods else range(s + 1, T)
            aggregated = {
                j: aggregator_accuracy(
                    agg,
                    self.clip,
                    self.datasets[j],
                    self.eval_cfg,
                    selection=route(self.pretrained_feats(j)[0], protos, self.a.top_k),
                    desc=f"S{s + 1} aggregated on {self.tasks[j]}",
                )
                for j in agg_js
            }
            if "condu" in self.methods:
                rows["condu"] = [known[j] if j <= s else aggregated[j] for j in range(T)]
            if "agnostic" in self.methods:
                rows["agnostic"] = [aggregated[j] for j in range(T)]
        tim["eval_condu_s"] = time.perf_counter() - t0
        # 6. continual fine-tuning baseline (trained in step 4) and the strategies
        if "continual_ft" in self.methods:
            assert cft is not None
            t0 = time.perf_counter()
            rows["continual_ft"] = self.accuracy_of(cft, range(T), f"continual FT S{s + 1}")
            tim["continual_ft_eval_s"] = time.perf_counter() - t0
        del cft
        for name in self.strategy_names:
            t0 = time.perf_counter()
            rows[name] = self.strategy_row(name, s)
            tim[f"eval_{name}_s"] = time.perf_counter() - t0
        _crash_point("evaluated", s)
        record = {"task": task, "individual_ft": pending["individual_ft"], "rows": rows, "timings": tim}
        if "hook_stats" in pending:
            record["hook_stats"] = pending["hook_stats"]
        if "delta_sha256" in pending:
            record["delta_sha256"] = pending["delta_sha256"]
        self.state["sessions"].append(record)
        self.state["pending"] = None
        self._save_state()
        msg = ", ".join(f"{m} {sum(r[: s + 1]) / (s + 1):.1f}" for m, r in rows.items())
        _log(
            f"[mtil] session {s + 1} done: individual FT {pending['individual_ft']:.1f}; mean over seen: {msg}",
            self.quiet,
        )

    # ------------------------------------------------------------------ continual FT and the strategies
    @property
    def strategies_dir(self) -> str:
        return os.path.join(self.out, "strategies")

    @property
    def deltas_dir(self) -> str:
        return os.path.join(self.strategies_dir, "deltas")

    def delta_path(self, s: int) -> str:
        """Session ``s``'s individual delta (what task arithmetic, TIES and EMR fold)."""
        return os.path.join(self.deltas_dir, f"{s:04d}.safetensors")

    def _recorded_sha(self, s: int) -> str:
        """The sha256 ``state.json`` recorded for session ``s``'s delta file when it was written."""
        sessions = self.state["sessions"]
        rec = sessions[s] if s < len(sessions) else self.state.get("pending") or {}
        sha = rec.get("delta_sha256") if rec.get("task") == self.tasks[s] else None
        if not sha:
            raise SystemExit(
                f"error: {self.out}/state.json records no checksum of {self.delta_path(s)} (session {s + 1}, "
                f"{self.tasks[s]!r}); the output directory was written by an earlier version or modified by hand"
            )
        return sha

    def read_delta(self, s: int) -> dict[str, torch.Tensor]:
        """Session ``s``'s individual delta read back from its file, checked against the sha256
        recorded when it was written (a missing or damaged file is an error naming it)."""
        path, task = self.delta_path(s), self.tasks[s]
        want = self._recorded_sha(s)
        what = f"the individual delta of session {s + 1} ({task!r}) that task arithmetic, TIES and EMR are rebuilt from"
        if not os.path.isfile(path):
            raise SystemExit(
                f"error: {path} is missing: it is {what}; the output directory was modified by hand "
                "(use another --out to start afresh)"
            )
        got = _file_sha256(path)
        if got != want:
            raise SystemExit(
                f"error: {path} is damaged: its sha256 is {got}, but {want} was recorded in state.json when "
                f"it was written; it is {what} (restore it, or use another --out to start afresh)"
            )
        delta, meta = _load_safetensors(path)
        if meta.get("session") != str(s) or meta.get("task") != task:
            raise SystemExit(
                f"error: {path} holds session {meta.get('session')} ({meta.get('task')!r}), not session {s} ({task!r})"
            )
        return delta

    def _replay_deltas(self, names: Sequence[str], s: int) -> None:
        """Build the delta strategies ``names`` afresh and fold the deltas of sessions ``0 … s−1``
        from their files, one file at a time (the strategies keep the task vectors in memory)."""
        for n in names:
            for old in (self.strategy_path(n), os.path.join(self.strategies_dir, "pending_delta.safetensors")):
                if os.path.exists(old):
                    raise SystemExit(
                        f"error: {old} is a checkpoint of an earlier version of this script, which saved "
                        f"{n} whole; finish that run with that version, or use another --out"
                    )
        fresh = {
            n: get_strategy(
                n,
                self.strategy_base(),
                copy_base=False,
                **self.config["strategy_options"][n],
                **runtime_options(n, self.a),
            )
            for n in names
        }
        if s:
            _log(f"[mtil] rebuilding {', '.join(names)} from {s} delta file(s) in {self.deltas_dir}", self.quiet)
        for i in range(s):
            delta = self.read_delta(i)
            for strat in fresh.values():
                strat.begin_task(self.tasks[i])
                strat.end_task(self.tasks[i], delta=delta)  # (copies: each strategy owns its vectors)
            del delta
        self.strats.update(fresh)

    def _delta_strategies(self) -> list[str]:
        return [n for n in self.strategy_names if n in DELTA_STRATEGIES]

    def _flat_lora(self, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
        return {n: t for m, ab in adapter.factors.items() for n, t in zip(lora_flat_names(m), ab)}

    def _lora_from_flat(self, flat: dict[str, torch.Tensor]) -> LoraAdapter:
        assert self.lora0 is not None
        return LoraAdapter(
            config=dict(self.lora0.config),
            factors={m: (flat[a], flat[b]) for m in self.lora0.modules for a, b in [lora_flat_names(m)]},
        )

    def strategy_base(self) -> dict[str, torch.Tensor]:
        """θ_0 of what the strategies merge: the trained tensors restricted from ``theta0`` (FT), or
        the shared LoRA init as a flat factor dict (LoRA)."""
        if self._strategy_base is None:
            self._strategy_base = (
                {k: self.theta0[k] for k in self.names} if self.lora0 is None else self._flat_lora(self.lora0)
            )
        return self._strategy_base

    def strategy_path(self, name: str) -> str:
        return os.path.join(self.strategies_dir, f"{name}.safetensors")

    def strategy(self, name: str, s: int) -> ContinualStrategy:
        """Strategy ``name`` in session ``s``: it holds the first ``s`` tasks (task ``s`` not folded
        yet) or ``s + 1``; read back from its file after a restart."""
        path = self.strategy_path(name)
        strat = self.strats.get(name)
        if strat is None and name in DELTA_STRATEGIES:
            self._replay_deltas(
                sorted({name, *self._delta_strategies()} - set(self.strats), key=DELTA_STRATEGIES.index), s
            )
            strat = self.strats[name]
            path = self.deltas_dir
        if strat is None:
            rt = runtime_options(name, self.a)
            if os.path.exists(path):  # θ_0 is shared, not copied: no strategy modifies its base
                strat = load_strategy(path, base=self.strategy_base(), copy_base=False, **rt)
            else:
                strat = get_strategy(
                    name, self.strategy_base(), copy_base=False, **self.config["strategy_options"][name], **rt
                )
            self.strats[name] = strat
        have = strat.task_names
        if have != self.tasks[: len(have)] or not s <= len(have) <= s + 1:
            raise SystemExit(
                f"error: {name} from {path} holds tasks {have}; session {s + 1} expects {self.tasks[:s]} "
                f"(or with {self.tasks[s] if s < len(self.tasks) else '-'!r}): the output directory was modified by hand"
            )
        return strat

    def _fold(self, name: str, s: int, **kw: dict[str, torch.Tensor]) -> None:
        """``end_task`` of the open task ``s`` then an atomic save (θ_0 left out: it is known)."""
        strat = self.strats[name]
        strat.end_task(self.tasks[s], **kw)
        os.makedirs(self.strategies_dir, exist_ok=True)
        strat.save(self.strategy_path(name), include_base=False)
        _crash_point(f"folded_{name}", s)

    def fold_individual(self, s: int, delta: dict[str, torch.Tensor] | None, tim: dict[str, float]) -> None:
        """Task arithmetic, TIES, EMR: fold the session's individual delta, kept in memory, or read
        back from ``deltas/<s>.safetensors`` (checked against its recorded sha256) after a restart. Nothing is
        saved: a rerun rebuilds them from the delta files."""
        names = self._delta_strategies()
        if not names:
            return
        task = self.tasks[s]
        todo = [n for n in names if len(self.strategy(n, s)) == s]
        t0 = time.perf_counter()
        if todo and delta is None:
            delta = self.read_delta(s)
        for name in todo:
            strat = self.strats[name]
            strat.begin_task(task)
            strat.end_task(task, delta=delta)
            _crash_point(f"folded_{name}", s)
        tim["fold_individual_s"] = time.perf_counter() - t0

    def continual_ft_state(
        self, s: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, float]]:
        """Continual FT's trained tensors after session ``s`` (keys as the strategies' base), the
        start it trained from (``None`` when the checkpoint already held session ``s``), timings."""
        task = self.tasks[s]
        path = os.path.join(self.out, "continual_ft.safetensors")
        tim: dict[str, float] = {}
        prev: dict[str, torch.Tensor] | None = None
        have_session = -1
        if os.path.exists(path):
            prev, meta = _load_safetensors(path)
            have_session = int(meta.get("session", -1))
        if have_session > s:
            raise SystemExit(f"error: {path} is at session {have_session + 1}, ahead of the run's session {s + 1}")
        if have_session == s:
            assert prev is not None
            return prev, None, tim
        if have_session != s - 1:
            raise SystemExit(
                f"error: {path} is at session {have_session + 1}, expected {s} (the output directory was modified by hand)"
            )
        start = prev if prev is not None else {k: v.clone() for k, v in self.strategy_base().items()}
        self.reset_model()
        t0 = time.perf_counter()
        cfg = self.train_cfg(task, s)
        if self.lora0 is None:
            self.clip.model.load_state_dict(start, strict=False)
            finetune_full(self.clip, self.datasets[s], cfg, self.names, desc=f"continual FT {task}")
            sd = self.clip.model.state_dict()
            state = {k: sd[k].detach().to("cpu", copy=True) for k in self.names}
        else:
            adapter = finetune_lora(
                self.clip, self.datasets[s], cfg, self._lora_from_flat(start), desc=f"continual FT {task}"
            )
            state = self._flat_lora(adapter)
        self.reset_model()
        _atomic_safetensors(path, state, {"session": str(s), "task": task})
        tim["continual_ft_train_s"] = time.perf_counter() - t0
        return state, start, tim

    def fold_magmax(
        self, s: int, cft: dict[str, torch.Tensor], cft_start: dict[str, torch.Tensor] | None, tim: dict[str, float]
    ) -> None:
        """MagMax = sequential fine-tuning + max-magnitude merge: fold continual FT's trained weights."""
        strat = self.strategy("magmax", s)
        if len(strat) == s + 1:
            return
        t0 = time.perf_counter()
        task = self.tasks[s]
        start = strat.begin_task(task)
        if cft_start is not None:  # (after a restart with continual FT already trained, its start is gone)
            for k, v in cft_start.items():
                # MagMax's start is θ_0 + (θ_{t-1} − θ_0), rounded once: equal up to an ulp
                if not torch.allclose(start.params[k], v, rtol=1e-6, atol=1e-7):
                    raise RuntimeError(f"MagMax's start of task {task!r} differs from continual FT's at tensor {k!r}")
        self._fold("magmax", s, params=cft)
        tim["fold_magmax_s"] = time.perf_counter() - t0

    def train_pam(self, s: int, pending: dict, tim: dict[str, float]) -> None:
        """PAM: train from ``begin_task(task).params`` with its hook, then fold the trained weights."""
        strat = self.strategy("pam", s)
        if len(strat) == s + 1:
            return
        task = self.tasks[s]
        start = strat.begin_task(task)
        self.reset_model()
        t0 = time.perf_counter()
        cfg = self.train_cfg(task, s)
        if self.lora0 is None:
            self.clip.model.load_state_dict(start.params, strict=False)
            finetune_full(self.clip, self.datasets[s], cfg, self.names, desc=f"PAM {task}", hook=start.hook)
            sd = self.clip.model.state_dict()
            trained = {k: sd[k].detach().to("cpu", copy=True) for k in self.names}
        else:
            adapter = finetune_lora(
                self.clip,
                self.datasets[s],
                cfg,
                self._lora_from_flat(start.params),
                desc=f"PAM {task}",
                hook=start.hook,
            )
            trained = self._flat_lora(adapter)
        self.reset_model()
        tim["pam_train_s"] = time.perf_counter() - t0
        # the hook's statistics are recorded before the fold: a crash in between retrains (same numbers)
        pending["hook_stats"] = {"pam": hook_stats(start.hook)}
        pending["timings"]["pam_train_s"] = tim["pam_train_s"]
        self._save_state()
        self._fold("pam", s, params=trained)

    def accuracy_of(self, state: dict[str, torch.Tensor], js: Sequence[int], desc: str) -> list[float]:
        """Accuracy on datasets ``js`` of θ_0 with ``state`` (trained tensors, or flat LoRA factors) in."""
        js = list(js)
        if self.lora0 is None:
            with swap_params(self.clip.model, state):
                return [
                    model_accuracy(self.clip, self.datasets[j], self.eval_cfg, f"{desc} on {self.tasks[j]}") for j in js
                ]
        return self.lora_accuracy(self._lora_from_flat(state), js, desc)

    def strategy_row(self, name: str, s: int) -> list[float]:
        """Accuracy of strategy ``name`` after session ``s`` on every dataset: seen tasks with
        ``model_for_inference(task)`` (a task-aware strategy's expert), unseen ones with
        ``model_for_inference()``. A strategy that is not task-aware has one model per session,
        evaluated once per dataset."""
        strat = self.strategy(name, s)
        T = len(self.tasks)
        row = [float("nan")] * T
        label = f"{LABELS.get(name, name)} S{s + 1}"
        merged_js = [j for j in range(T) if not (strat.task_aware and j <= s)]
        if merged_js:
            for j, acc in zip(merged_js, self.accuracy_of(strat.model_for_inference(), merged_js, label)):
                row[j] = acc
        if strat.task_aware:
            for j in range(s + 1):
                row[j] = self.accuracy_of(strat.model_for_inference(self.tasks[j]), [j], f"{label} expert")[0]
        return row

    # ------------------------------------------------------------------ outputs
    def storage(self, n: int) -> tuple[dict[str, dict], int]:
        """Storage per reported method (and individual FT) after ``n`` finished sessions, and the
        bytes of one task delta (θ_0 of the merged tensors)."""
        one = state_nbytes(self.strategy_base())
        done = self.tasks[:n]
        out: dict[str, dict] = {}
        for m in self.methods:
            if m == "zeroshot":
                out[m] = storage_entry(0, {}, "nothing beyond θ_0")
            elif m in ("condu", "agnostic"):
                self.store.reload(verify=False)
                out[m] = (
                    condu_store_storage(self.store)
                    if self.store.exists and self.store.task_names
                    else storage_entry(0, {}, "unified delta u + per task a 1-bit mask and its rescaler")
                )
            elif m == "continual_ft":
                out[m] = storage_entry(
                    one if n else 0, dict.fromkeys(done, 0), "the current model's delta θ_t − θ_0 (one model)"
                )
            else:
                out[m] = report_entry(self.strategy(m, n).stored_bytes())
        out["individual_ft"] = storage_entry(
            0, dict.fromkeys(done, one), "every task's fine-tuned delta (one model per task)"
        )
        return out, one

    def finish(self, partial: bool) -> dict:
        T = len(self.tasks)
        sessions = self.state["sessions"]
        n = len(sessions)
        label = "ConDU (LoRA)" if self.lora0 is not None else "ConDU (FT)"
        names = {**LABELS, "condu": label, "agnostic": f"{label}, task-agnostic"}
        matrices: dict[str, list[list[float]]] = {}
        if self.state.get("zeroshot") is not None:
            matrices["zeroshot"] = [list(self.state["zeroshot"]) for _ in range(n)]
        for m in self.methods:
            if m != "zeroshot" and n and m in sessions[0]["rows"]:
                matrices[m] = [sess["rows"][m] for sess in sessions]
        indiv = [sess["individual_ft"] for sess in sessions] + [None] * (T - n)
        result = {
            "partial": partial,
            "sessions_finished": n,
            "tasks": self.tasks,
            "accuracy": dict(matrices.items()),
            "individual_ft": indiv,
            "metrics": {},
            "config": self.config,
            "versions": _versions(),
            "timings": {"sessions": [{"task": s["task"], **s["timings"]} for s in sessions]},
            "store": {"path": os.path.join(self.out, "store")},
        }
        if any("hook_stats" in sess for sess in sessions):
            result["hook_stats"] = [sess.get("hook_stats") for sess in sessions]
        storage, one_model = self.storage(n)
        result["storage"] = storage
        result["one_model_bytes"] = one_model
        try:
            result["store"]["storage"] = self.store.storage()
        except Exception:
            pass
        if n == T:
            result["metrics"] = {m: summary_metrics(mat) for m, mat in matrices.items()}
            if all(x is not None for x in indiv):
                result["metrics"]["individual_ft"] = {"transfer": None, "average": None, "last": sum(indiv) / T}
            display = {names[m]: mat for m, mat in matrices.items() if m != "zeroshot"}
            rows = {}
            if "zeroshot" in matrices:
                rows["Zero-shot"] = matrices["zeroshot"][0]
            rows["Individual FT"] = indiv
            table = markdown_table(self.tasks, display, rows=rows)
            if "agnostic" in matrices:
                table += (
                    "\nTask-agnostic rows: the Transfer line is reported for completeness; the paper's "
                    "Table 2 gives only Average and Last for this setting.\n"
                )
            table += (
                "\n## Storage\n\nBytes kept beyond the pretrained weights θ_0 after the last session; "
                f'"× one model" = total / one task delta ({one_model / 2**20:.3f} MiB: the '
                f"{'LoRA factors' if self.lora0 is not None else 'trained tensors'}).\n\n"
                + storage_markdown(storage, one_model, names)
            )
            if "pam" in self.methods and result.get("hook_stats"):
                table += (
                    "\n## PAM's alignment hook\n\nPer session: optimizer steps the hook saw, alignments it ran "
                    "(every --pam-every steps) and weight entries it re-initialised (summed over the alignments); "
                    '"-": no hook (nothing to align to before the first task is merged).\n\n'
                    + hook_stats_markdown(self.tasks, result["hook_stats"])
                )
            note = (
                "> **Smoke test.** `--synthetic` runs the MTIL code path on procedural images and a tiny CLIP "
                "pre-trained for a moment, to exercise resume, storage and every strategy on a CPU; its accuracies "
                "carry no meaning. The CPU run of this protocol on real data is `python -m benchmarks.digits.run_digits` "
                "(docs/results.md).\n\n"
                if self.a.synthetic
                else ""
            )
            with open(os.path.join(self.out, "results.md"), "w") as f:
                f.write(
                    f"# MTIL results ({label}{', few-shot' if self.a.few_shot else ''})\n\n{note}{table}"
                    "\n![accuracy matrices](accuracy_heatmap.png)\n"
                )
            with open(os.path.join(self.out, "storage.csv"), "w") as f:
                f.write(storage_csv(storage, one_model, names))
            with open(os.path.join(self.out, "results.csv"), "w") as f:
                f.write(csv_text(self.tasks, {names[m]: mat for m, mat in matrices.items()}))
            result["heatmap"] = heatmap_png(
                os.path.join(self.out, "accuracy_heatmap.png"),
                self.tasks,
                {names[m]: mat for m, mat in matrices.items()},
            )
        _atomic_json(os.path.join(self.out, "results.json"), result)
        return result


def hook_stats(hook: object) -> dict[str, int] | None:
    """What a training hook recorded (``steps``, ``alignments``, ``resets`` summed), if it exposes it."""
    if hook is None:
        return None
    out = {}
    for attr in ("steps", "alignments", "resets"):
        v = getattr(hook, attr, None)
        if isinstance(v, (list, tuple)):
            v = sum(int(x) for x in v)
        if isinstance(v, int):
            out[attr] = v
    return out


def resolve_order_synthetic(args: argparse.Namespace, available: Sequence[str]) -> list[str]:
    seq = (
        resolve_order(args.order, args.tasks)
        if args.order not in ORDERS
        else [t for t in ORDERS[args.order] if t in available]
    )
    if args.tasks:
        keep = [t.strip() for t in args.tasks.split(",")]
        seq = [t for t in seq if t in keep]
    bad = [t for t in seq if t not in available]
    if bad:
        raise ValueError(f"synthetic data has tasks {list(available)}; {bad} are not among them")
    return seq


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.synthetic:  # CPU-sized defaults (explicit flags win)
        if args.iterations is None:
            args.iterations = 25
        if args.lr is None and not args.lr_map:
            args.lr = 1e-3 if args.mode == "ft" else 3e-3
        if args.batch_size == 32 and "--batch-size" not in (argv or sys.argv):
            args.batch_size = 16
        if args.lora_rank == 64 and "--lora-rank" not in (argv or sys.argv):
            args.lora_rank = 4
        if args.warmup == 100 and "--warmup" not in (argv or sys.argv):
            args.warmup = 5
        if args.pam_every is None:
            args.pam_every = 5  # so that PAM's alignment fires within the few synthetic steps
    runner = Runner(args)
    res = runner.run()
    if not res["partial"]:
        for m, v in res["metrics"].items():
            vals = ", ".join(f"{k} {x:.1f}" for k, x in v.items() if x is not None)
            print(f"{m}: {vals}")
        print(f"results: {os.path.join(runner.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
