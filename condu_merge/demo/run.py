"""The continual-learning benchmark on real digits, every method in one run (one seed, FT or LoRA).

Protocol (the ConDU paper's MTIL protocol at CPU size, through the library's own paths):

1. pre-train a tiny open_clip CLIP on the plain digits with class-name captions
   (:func:`condu_merge.demo.digits.pretrain`), save it as a local safetensors checkpoint, load it
   back: that is θ_0 (reused when the checkpoint exists);
2. per session ``s`` (task domain ``t_s``): fine-tune an expert from θ_0 (the image tower, or
   LoRA factors on its attention/MLP projections; the text tower stays θ_0's, so every model
   classifies with the same zero-shot text head), fold its delta into a ConDU
   :class:`~condu_merge.store.Store` (``add_task``), save the task's prototypes (θ_0 features) in
   the store, take one more continual fine-tuning step, and let every registered strategy of
   :mod:`condu_merge.strategies` fold the task;
3. evaluate every method on every domain (tasks and held-out ones) after every session: the
   accuracy matrix ``A[s][j]``.

Nothing is trained twice: a strategy whose task starts from θ_0 without a training hook folds the
individual expert; one that starts from the previous task's weights without a hook (MagMax)
folds continual FT's step; one with a hook (PAM) trains its own model, from its own start. The
strategy list is the registry's (:func:`~condu_merge.strategies.available_strategies`), so new
strategies join by registering; ``condu`` and ``continual_ft`` of the registry are run by the
script's own paths (the store, and the continual FT baseline).

Task-agnostic inference: ConDU routes every test image with :func:`~condu_merge.routing.route`
(θ_0 features against the stored prototypes, top-K) and averages the selected experts' logits
(:class:`~condu_merge.routing.SemanticAggregator` over :class:`~condu_merge.adapters.ClipExperts`
read from the store); task-aware strategies (EMR, …) are routed the same way over their own
experts; a single-model method's task-agnostic accuracy is its accuracy. Unseen domains (later
tasks, held-out domains) are always routed for ConDU and the task-aware strategies.
"""

from __future__ import annotations

import inspect
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import digits as D
from .metrics import summary_metrics

__all__ = ["BASELINES", "SCRIPT_PATHS", "BenchConfig", "label_of", "run_benchmark", "summary_table"]

BASELINES = ("zeroshot", "individual_ft", "continual_ft", "condu")
"""The script's own methods (ConDU through the store; its task-agnostic variant is a column)."""
SCRIPT_PATHS = ("condu", "continual_ft")
"""Registry names the script runs by its own paths rather than as registry strategies."""
LABELS = {
    "zeroshot": "Zero-shot",
    "individual_ft": "Individual FT (upper bound)",
    "continual_ft": "Continual FT (lower bound)",
    "condu": "ConDU",
    "pam": "PAM",
    "magmax": "MagMax",
    "task_arithmetic": "Task arithmetic",
    "ties": "TIES",
    "emr": "EMR",
    "opcm": "OPCM",
    "dop": "DOP",
    "tall_masks": "TALL masks",
    "dare_task_arithmetic": "DARE + TA",
    "dare_ties": "DARE + TIES",
}
# options that make a strategy meaningful at this size (filtered by what its constructor accepts)
STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {
    "pam": {"align_every": 10},  # the default (100 steps) would never fire within a session
    # DOP's default 200 Adam steps per tensor and task cost ~35 s per task here on 2 cores, more
    # than everything else together; 40 steps keep its ranking on this model (documented deviation)
    "dop": {"num_steps": 40},
}
LORA_TARGETS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def label_of(name: str) -> str:
    return LABELS.get(name, name.upper() if len(name) <= 4 else name.replace("_", " ").capitalize())


@dataclass
class BenchConfig:
    """One run's settings (see :func:`run_benchmark`)."""

    seed: int = 0
    mode: str = "ft"  # "ft" (image tower) | "lora" (its attention/MLP projections)
    tasks: tuple[str, ...] = D.TASKS
    held_out: tuple[str, ...] = D.HELD_OUT
    pretrain_steps: int = 250
    steps: int = 60  # optimizer steps per fine-tuning
    batch_size: int = 64
    lr: float | None = None  # default 3e-3 (FT), 3e-2 (LoRA)
    weight_decay: float = 0.0
    lora_rank: int = 4
    train_per_task: int | None = 600
    shots: int | None = None  # few-shot: this many training images per class and task
    test_per_domain: int | None = None
    top_k: int = 2
    rescaler: str = "tensor_mean"
    backend: str = "torch"  # the store's merge backend (numba's JIT compile would dominate at this size)
    strategies: tuple[str, ...] | None = None  # None: every registered strategy
    workdir: str | None = None  # the store and the checkpoint; None: a temporary directory, removed
    threads: int = 1  # torch threads (tiny ops: one thread is fastest, and fair under load)
    eval_batch: int = 2048

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (3e-3 if self.mode == "ft" else 3e-2)


# ---------------------------------------------------------------------------- helpers


@contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _accepted(cls: Any, wanted: Mapping[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(wanted)
    return {k: v for k, v in wanted.items() if k in params}


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor] | None) -> bool:
    """Equal up to one rounding (a strategy's start ``θ_0 + (θ_{t-1} − θ_0)`` vs ``θ_{t-1}``)."""
    if b is None or a.keys() != b.keys():
        return False
    return all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-6, atol=1e-7) for k in a)


def _cosine_lr(step: int, lr: float, total: int, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class _Space:
    """What is merged and how a state of it becomes model weights: the image tower's tensors
    (FT) or the flat LoRA factor dict ``<module>.lora_A.weight`` / ``.lora_B.weight`` (LoRA)."""

    def __init__(self, model: torch.nn.Module, mode: str, rank: int, seed: int):
        from ..adapters import init_lora, lora_module_name, select_names

        self.model, self.mode = model, mode
        sd = model.state_dict()
        self.names = select_names(model, "image")
        self.theta0 = {k: sd[k].detach().clone() for k in self.names}
        self.lora0 = None
        if mode == "lora":
            params = dict(model.named_parameters())
            mods = [lora_module_name(n) for n in self.names if params[n].dim() == 2 and n.endswith(LORA_TARGETS)]
            self.lora0 = init_lora(model, mods, rank=rank, lora_alpha=float(rank), seed=seed)
            self.base = self.flat(self.lora0.factors)
        elif mode == "ft":
            self.base = dict(self.theta0)
        else:
            raise ValueError(f"mode must be 'ft' or 'lora', got {mode!r}")

    @staticmethod
    def flat(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {n: t for m, ab in factors.items() for n, t in zip((f"{m}.lora_A.weight", f"{m}.lora_B.weight"), ab)}

    def adapter(self, flat: Mapping[str, torch.Tensor]):
        from ..adapters import LoraAdapter

        assert self.lora0 is not None
        return LoraAdapter(
            config=dict(self.lora0.config),
            factors={m: (flat[f"{m}.lora_A.weight"], flat[f"{m}.lora_B.weight"]) for m in self.lora0.modules},
        )

    def weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model weights (the model's names) of a state of the merged space."""
        if self.lora0 is None:
            return dict(state)
        from ..adapters import lora_weights

        with torch.no_grad():
            return lora_weights(self.model, self.adapter(state))

    def transform(self) -> Callable | None:
        """For :meth:`ClipExperts.from_store`: factor deltas -> weight deltas (LoRA); None for FT."""
        if self.lora0 is None:
            return None
        from ..adapters import lora_transform

        return lora_transform(self.lora0, self.model)


def _train(
    space: _Space,
    data: D.DigitsData,
    head: torch.Tensor,
    start: Mapping[str, torch.Tensor],
    cfg: BenchConfig,
    seed: int,
    hook: Any = None,
) -> dict[str, torch.Tensor]:
    """Fine-tune from ``start`` (a state of the merged space) on ``data``: cross-entropy over the
    frozen zero-shot head, ``logit_scale.exp() · n(f(x)) @ headᵀ``; AdamW with warm-up and cosine
    decay. A strategy's ``hook`` adds ``hook.loss(params)`` and runs ``after_step`` after every
    optimizer step (:meth:`TrainingHook.attach`). Returns the trained state (fresh CPU tensors);
    the model is left at θ_0."""
    from ..adapters import clip_encode, lora_weights

    model = space.model
    g = torch.Generator().manual_seed(seed)
    scale = model.logit_scale.detach().exp()
    for p in model.parameters():
        p.requires_grad_(False)
    if space.lora0 is None:
        model.load_state_dict(dict(start), strict=False)
        named = dict(model.named_parameters())
        live = {n: named[n] for n in space.names}
        for p in live.values():
            p.requires_grad_(True)
        encode = model.encode_image
    else:
        live = {k: v.detach().clone().float().requires_grad_(True) for k, v in start.items()}

        def encode(x: torch.Tensor) -> torch.Tensor:
            return clip_encode(model, "image", x, lora_weights(model, space.adapter(live)))

    lr = cfg.resolved_lr()
    opt = torch.optim.AdamW(list(live.values()), lr=lr, weight_decay=cfg.weight_decay)
    handles = hook.attach(live, optimizer=opt) if hook is not None else []
    model.train()
    try:
        n = len(data.train_y)
        for step in range(cfg.steps):
            for grp in opt.param_groups:
                grp["lr"] = _cosine_lr(step, lr, cfg.steps, max(1, cfg.steps // 10))
            idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
            logits = scale * F.normalize(encode(data.train_x[idx]), dim=-1) @ head.t()
            loss = F.cross_entropy(logits, data.train_y[idx])
            if hook is not None:
                loss = loss + hook.loss(live)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(
                    f"fine-tuning on {data.name}: loss became {float(loss)} at step {step}; lower the learning rate"
                )
    finally:
        for h in handles:
            h.remove()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    out = {k: v.detach().clone() for k, v in live.items()}
    if space.lora0 is None:
        model.load_state_dict(space.theta0, strict=False)
    return out


class _StrategyExperts:
    """An :class:`~condu_merge.routing.ExpertEncoders` over a task-aware strategy's experts
    (``model_for_inference(task)``), swapped into the model one at a time (task None: θ_0)."""

    def __init__(self, space: _Space, strat: Any):
        self.space, self.strat = space, strat
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def _weights(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self._cache:
            self._cache[task] = self.space.weights(self.strat.model_for_inference(task))
        return self._cache[task]

    def encode_image(self, task: str | None, images: torch.Tensor) -> torch.Tensor:
        from ..adapters import swap_params

        if task is None:
            return self.space.model.encode_image(images)
        with swap_params(self.space.model, self._weights(task)):
            return self.space.model.encode_image(images)

    def encode_text(self, task: str | None, tokens: torch.Tensor) -> torch.Tensor:
        from ..adapters import swap_params

        if task is None:
            return self.space.model.encode_text(tokens)
        with swap_params(self.space.model, self._weights(task)):
            return self.space.model.encode_text(tokens)


# ---------------------------------------------------------------------------- the run


def _pretrained(
    cfg: BenchConfig, plain: D.DigitsData, prompts: torch.Tensor, workdir: str
) -> tuple[torch.nn.Module, dict]:
    """θ_0: read from ``workdir``'s checkpoint for this seed and length, or pre-trained and saved
    there first (so FT and LoRA runs of a seed share one pre-training)."""
    path = os.path.join(workdir, f"pretrained_digits_clip_seed{cfg.seed}_steps{cfg.pretrain_steps}.safetensors")
    info: dict[str, Any] = {"checkpoint": path}
    if os.path.exists(path):
        info["reused"] = True
        return D.load_checkpoint(path), info
    model = D.build_model(cfg.seed)
    info.update(D.pretrain(model, plain, prompts, steps=cfg.pretrain_steps, seed=cfg.seed), reused=False)
    D.save_checkpoint(model, path)
    return D.load_checkpoint(path), info  # evaluate what was saved: the offline path a user takes


def run_benchmark(cfg: BenchConfig, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every method for one seed and mode; returns a JSON-able dict:

    ``tasks``, ``held_out``, ``domains`` (tasks then held-out), ``acc[method]`` = ``A[s][j]`` over
    every domain (sessions × domains), ``agnostic[method]`` (task-agnostic, same layout),
    ``individual_ft`` (each expert on its task), ``zeroshot_plain``, ``metrics[method]``
    (Transfer/Average/Last/forgetting from the task columns, task-agnostic Average/Last, held-out
    accuracy after the last session), ``storage[method]`` (bytes and × one model), ``merge_s``
    (seconds of merging, summed over sessions), ``trained`` (fine-tunings run per method),
    ``checks`` (the sanity checks), ``timings`` and ``config``."""
    from ..adapters import ClipExperts, swap_params
    from ..packing import packed_nbytes
    from ..routing import SemanticAggregator, compute_prototypes, prototypes_from_store, route
    from ..store import Store
    from ..strategies import available_strategies, state_nbytes

    log = log or (lambda msg: None)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    own_dir = cfg.workdir is None
    workdir = tempfile.mkdtemp(prefix="condu-digits-") if own_dir else cfg.workdir
    os.makedirs(workdir, exist_ok=True)
    names = [
        n for n in (cfg.strategies if cfg.strategies is not None else available_strategies()) if n not in SCRIPT_PATHS
    ]
    tasks, held = list(cfg.tasks), list(cfg.held_out)
    domains = tasks + held
    T, H = len(tasks), len(held)
    try:
        with _threads(cfg.threads), torch.no_grad():
            plain, task_data, held_data = D.load_digits_data(
                cfg.seed,
                tasks=cfg.tasks,
                held_out=cfg.held_out,
                train_per_task=cfg.train_per_task,
                test_per_domain=cfg.test_per_domain,
                shots=cfg.shots,
            )
            data = task_data + held_data
            prompts = D.prompts_of(D.tokenizer())
            with torch.enable_grad():
                model, pre_info = _pretrained(cfg, plain, prompts, workdir)
            log(
                f"[digits] θ_0 {'read from' if pre_info['reused'] else 'pre-trained and saved to'} {pre_info['checkpoint']}"
            )
            head = D.zero_shot_head(model, prompts)
            space = _Space(model, cfg.mode, cfg.lora_rank, cfg.seed)
            one_model = state_nbytes(space.base)

            def acc_of(weights: Mapping[str, torch.Tensor] | None, js: Sequence[int]) -> list[float]:
                """Accuracy (%) of θ_0 with ``weights`` swapped in on domains ``js``, in one batched pass."""
                xs = torch.cat([data[j].test_x for j in js])
                with swap_params(model, weights or {}):
                    f = torch.cat(
                        [model.encode_image(xs[i : i + cfg.eval_batch]) for i in range(0, len(xs), cfg.eval_batch)]
                    )
                pred = (F.normalize(f.float(), dim=-1) @ head.t()).argmax(1)
                out, o = [], 0
                for j in js:
                    n = len(data[j].test_y)
                    out.append(100.0 * float((pred[o : o + n] == data[j].test_y).float().mean()))
                    o += n
                return out

            feats0 = {}
            for j, d in enumerate(data):
                feats0[j] = model.encode_image(d.test_x).float()
            plain_f = model.encode_image(plain.test_x).float()
            zs_plain = 100.0 * float(
                (F.normalize(plain_f, dim=-1) @ head.t()).argmax(1).eq(plain.test_y).float().mean()
            )
            zs_row = acc_of(None, range(T + H))

            def agg_acc(agg: Any, j: int, *, task: str | None = None, protos: Any = None) -> float:
                d = data[j]
                if task is not None:
                    logits = agg.logits(d.test_x, d.name, prompts, task=task)
                else:
                    logits = agg.logits(d.test_x, d.name, prompts, selection=route(feats0[j], protos, cfg.top_k))
                return 100.0 * float((logits.argmax(1) == d.test_y).float().mean())

            store = Store(os.path.join(workdir, f"store_{cfg.mode}_seed{cfg.seed}"))
            if store.exists and store.task_names:
                shutil.rmtree(store.root)
                store = Store(os.path.join(workdir, f"store_{cfg.mode}_seed{cfg.seed}"))
            strats, not_built = {}, {}
            for n in list(names):
                try:
                    strats[n] = _make_strategy(n, space.base)
                except Exception as e:
                    not_built[n] = f"construction: {type(e).__name__}: {e}"
                    names.remove(n)
            methods = ["zeroshot", "individual_ft", "continual_ft", "condu", *names]
            acc: dict[str, list[list[float]]] = {m: [] for m in methods if m != "individual_ft"}
            agn: dict[str, list[list[float]]] = {"condu": []}
            agn.update({n: [] for n in names if strats[n].task_aware})
            merge_s = dict.fromkeys(["condu", *names], 0.0)
            trained = dict.fromkeys(methods, 0)
            individual: list[float] = []
            failed: dict[str, str] = dict(not_built)

            def drop(n: str, why: str) -> None:
                """Take strategy ``n`` out of the run, recording why (reported, never hidden)."""
                failed[n] = why
                log(f"[digits] strategy {n} dropped: {why}")
                for table in (strats, acc, agn, merge_s, trained):
                    table.pop(n, None)
                methods.remove(n)
                names.remove(n)

            cft_state: dict[str, torch.Tensor] | None = None
            t_train = t_eval = 0.0
            proto_bytes = 0
            for s, (task, d) in enumerate(zip(tasks, task_data)):
                t0 = time.perf_counter()
                with torch.enable_grad():
                    indiv = _train(space, d, head, space.base, cfg, seed=1000 * cfg.seed + s)
                trained["individual_ft"] += 1
                individual.append(acc_of(space.weights(indiv), [s])[0])
                delta = {k: indiv[k] - space.base[k] for k in space.base}
                # continual FT: one more step from the previous one (session 1 = the individual expert)
                cft_start = dict(space.base) if cft_state is None else cft_state
                if cft_state is None:
                    cft_state = indiv
                else:
                    with torch.enable_grad():
                        cft_state = _train(space, d, head, cft_start, cfg, seed=1000 * cfg.seed + s)
                    trained["continual_ft"] += 1
                t_train += time.perf_counter() - t0
                # ConDU: fold the delta into the store, then the task's prototypes (θ_0 features)
                t0 = time.perf_counter()
                store.add_task(task, delta, rescaler=cfg.rescaler, backend=cfg.backend)
                merge_s["condu"] += time.perf_counter() - t0
                protos = compute_prototypes(
                    model.encode_image(d.train_x).float(),
                    d.train_y,
                    torch.stack(
                        [F.normalize(model.encode_text(prompts[c]).float(), dim=-1) for c in range(prompts.shape[0])]
                    ),
                )
                proto_bytes += state_nbytes(protos)
                store.save_prototypes(task, protos)
                # the registered strategies: share what is already trained, train only what differs
                for n, strat in list(strats.items()):
                    try:
                        start = strat.begin_task(task)
                        if start.hook is None and _same(start.params, space.base):
                            trained_state = indiv
                        elif start.hook is None and _same(start.params, cft_start):
                            trained_state = cft_state
                        else:
                            t0 = time.perf_counter()
                            with torch.enable_grad():
                                trained_state = _train(
                                    space, d, head, start.params, cfg, seed=1000 * cfg.seed + s, hook=start.hook
                                )
                            trained[n] += 1
                            t_train += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        strat.end_task(task, params=trained_state)
                        strat.model_for_inference()  # the merged model is part of the merge's cost
                        merge_s[n] += time.perf_counter() - t0
                    except Exception as e:
                        drop(n, f"session {s + 1} ({task}), folding: {type(e).__name__}: {e}")
                # evaluation after session s
                t0 = time.perf_counter()
                seen, unseen = list(range(s + 1)), list(range(s + 1, T + H))
                acc["zeroshot"].append(list(zs_row))
                acc["continual_ft"].append(acc_of(space.weights(cft_state), range(T + H)))
                store.reload(verify=False)
                protos_all = prototypes_from_store(store, tasks[: s + 1])
                experts = ClipExperts.from_store(
                    model, store, backend=cfg.backend, cache_size=s + 1, transform=space.transform()
                )
                agg = SemanticAggregator(experts, protos_all, k=cfg.top_k)
                routed = {j: agg_acc(agg, j, protos=protos_all) for j in range(T + H)}
                acc["condu"].append([agg_acc(agg, j, task=tasks[j]) if j <= s else routed[j] for j in range(T + H)])
                agn["condu"].append([routed[j] for j in range(T + H)])
                for n, strat in list(strats.items()):
                    try:
                        row = [float("nan")] * (T + H)
                        merged_js = unseen if strat.task_aware else list(range(T + H))
                        if strat.task_aware:
                            sagg = SemanticAggregator(_StrategyExperts(space, strat), protos_all, k=cfg.top_k)
                            s_routed = {j: agg_acc(sagg, j, protos=protos_all) for j in range(T + H)}
                            for j in seen:
                                row[j] = agg_acc(sagg, j, task=tasks[j])
                            for j in unseen:  # unseen domains routed, as for ConDU
                                row[j] = s_routed[j]
                            agn[n].append([s_routed[j] for j in range(T + H)])
                        else:
                            for j, a in zip(merged_js, acc_of(space.weights(strat.model_for_inference()), merged_js)):
                                row[j] = a
                        acc[n].append(row)
                    except Exception as e:
                        drop(n, f"session {s + 1} ({task}), evaluation: {type(e).__name__}: {e}")
                t_eval += time.perf_counter() - t0
                log(
                    f"[digits] session {s + 1}/{T} {task}: individual FT {individual[-1]:.1f}, ConDU "
                    f"{sum(acc['condu'][-1][: s + 1]) / (s + 1):.1f}, continual FT "
                    f"{sum(acc['continual_ft'][-1][: s + 1]) / (s + 1):.1f} (mean over seen)"
                )

            # ------------------------------------------------------------ metrics, storage
            metrics: dict[str, dict[str, float | None]] = {}
            for m, mat in acc.items():
                sq = [row[:T] for row in mat]
                met = summary_metrics(sq)
                am = agn.get(m, mat)
                asq = [row[:T] for row in am]
                met["agnostic_average"] = summary_metrics(asq)["average"]
                met["agnostic_last"] = summary_metrics(asq)["last"]
                met["held_out"] = (sum(mat[-1][T:]) / H) if H else None
                metrics[m] = met
            metrics["individual_ft"] = {
                "transfer": None,
                "average": None,
                "last": sum(individual) / T,
                "forgetting": 0.0,
                "bwt": 0.0,
                "agnostic_average": None,
                "agnostic_last": None,
                "held_out": None,
            }
            specs = store.specs
            u_bytes = sum(math.prod(sp.shape) * sp.dtype.itemsize for sp in specs)
            per_task = sum(packed_nbytes(math.prod(sp.shape)) for sp in specs) + 8
            storage = {
                "zeroshot": 0,
                "individual_ft": T * one_model,
                "continual_ft": one_model,
                "condu": u_bytes + T * per_task + proto_bytes,
                **{n: strats[n].stored_bytes().total for n in names},
            }
            storage_x = {m: b / one_model for m, b in storage.items()}
            checks = sanity_checks(zs_plain, zs_row[:T], individual, metrics, acc, T)
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "config": {**asdict(cfg), "lr": cfg.resolved_lr(), "strategies": names, "model": D.MODEL_CONFIG},
        "tasks": tasks,
        "held_out": held,
        "domains": domains,
        "domain_what": {d.name: d.what for d in data},
        "methods": methods,
        "labels": {m: label_of(m) for m in methods},
        "task_aware": {"condu": True, **{n: bool(strats[n].task_aware) for n in names}},
        "acc": acc,
        "agnostic": agn,
        "individual_ft": individual,
        "zeroshot_plain": zs_plain,
        "metrics": metrics,
        "storage_bytes": storage,
        "storage_x": storage_x,
        "one_model_bytes": one_model,
        "merge_s": merge_s,
        "trained": trained,
        "checks": checks,
        "pretrain": pre_info,
        "failed": failed,
        "timings": {
            "total_s": time.perf_counter() - t_start,
            "cpu_s": time.process_time() - cpu_start,
            "train_s": t_train,
            "eval_s": t_eval,
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": cfg.threads,
        },
    }


def _make_strategy(name: str, base: Mapping[str, torch.Tensor]) -> Any:
    """Registry strategy ``name`` over ``base`` with the :data:`STRATEGY_OPTIONS` its class accepts."""
    from ..strategies import get_strategy

    strat = get_strategy(name, base)
    opts = _accepted(type(strat), STRATEGY_OPTIONS.get(name, {}))
    return get_strategy(name, base, **opts) if opts else strat


# ---------------------------------------------------------------------------- checks and the table


def sanity_checks(
    zs_plain: float,
    zs_tasks: Sequence[float],
    individual: Sequence[float],
    metrics: Mapping[str, Mapping[str, float | None]],
    acc: Mapping[str, Sequence[Sequence[float]]],
    T: int,
) -> dict[str, dict[str, Any]]:
    """The checks that make the numbers mean something (each ``{"ok": bool, "detail": str}``):

    * ``pretrained``: θ_0's zero-shot accuracy on the plain domain is well above chance (≥ 50 %, chance 10 %);
    * ``individual_beats_zeroshot``: every task's expert beats θ_0's zero-shot accuracy on it;
    * ``continual_ft_forgets``: continual FT forgets ≥ 5 points on average;
    * ``condu_keeps_earlier``: with the task id, ConDU's final accuracy on the earlier tasks
      (all but the last) is ≥ 10 points above continual FT's."""
    gaps = [i - z for i, z in zip(individual, zs_tasks)]
    forg = metrics["continual_ft"]["forgetting"] or 0.0
    earlier = lambda m: sum(acc[m][-1][: T - 1]) / max(1, T - 1)  # noqa: E731
    keep = earlier("condu") - earlier("continual_ft")
    return {
        "pretrained": {"ok": zs_plain >= 50.0, "detail": f"zero-shot on the plain domain {zs_plain:.1f}% (chance 10%)"},
        "individual_beats_zeroshot": {
            "ok": all(g > 0 for g in gaps),
            "detail": f"smallest gain of an expert over zero-shot {min(gaps):+.1f} points",
        },
        "continual_ft_forgets": {"ok": forg >= 5.0, "detail": f"continual FT forgetting {forg:.1f} points"},
        "condu_keeps_earlier": {
            "ok": keep >= 10.0,
            "detail": f"ConDU (task id) on the earlier tasks after the last session: {earlier('condu'):.1f}% "
            f"vs continual FT {earlier('continual_ft'):.1f}% ({keep:+.1f})",
        },
    }


def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def summary_table(res: Mapping[str, Any]) -> str:
    """The at-a-glance table: method | accuracy with task id | task-agnostic | forgetting | held-out | storage | merge."""
    rows = [("Method", "Acc. w/ task id", "Task-agnostic", "Forgetting", "Held-out", "Storage (× model)", "Merge s")]
    for m in res["methods"]:
        met = res["metrics"][m]
        rows.append(
            (
                res["labels"][m],
                _f(met["last"]),
                _f(met.get("agnostic_last")),
                _f(met.get("forgetting")),
                _f(met.get("held_out")),
                _f(res["storage_x"][m], 2),
                _f(res["merge_s"].get(m), 3) if m in res["merge_s"] else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
