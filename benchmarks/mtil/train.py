"""One MTIL training session: fine-tune CLIP on one task (whole model or LoRA factors).

Loss (the reference training): cross-entropy with label smoothing over
``logit_scale.exp() · norm(f_img(x)) @ norm(f_txt(prompt(c)))ᵀ`` for every class ``c`` of the task,
prompts from the task's first template, text features recomputed each step (the text encoder
trains too). AdamW, cosine schedule with linear warm-up, ``logit_scale`` frozen.

A continual strategy's :class:`~condu_merge.strategies.TrainingHook` (``hook=``) takes part in
the generic protocol: ``hook.loss(params)`` is added to the task loss, and ``hook.attach(params,
optimizer=opt)`` registers ``hook.after_step`` on the optimizer (it runs after every step); the
handles are removed when training ends. ``params`` maps the strategy's tensor names to the live
tensors the optimizer updates (parameter names for full fine-tuning, ``<module>.lora_A.weight`` /
``<module>.lora_B.weight`` for the LoRA factor leaves).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from condu_merge.adapters import LoraAdapter, lora_weights
from condu_merge.strategies import TrainingHook

from .datasets import MTILDataset
from .model import ClipHandle


@dataclass
class TrainConfig:
    iterations: int = 1000
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: int = 100
    label_smoothing: float = 0.2
    num_workers: int = 4
    amp: bool = True
    seed: int = 0
    progress: bool = True


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then half a cosine down to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span)) * base_lr


def _batches(ds: MTILDataset, cfg: TrainConfig, seed: int) -> Iterator:
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        ds.train,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=g,
        num_workers=cfg.num_workers,
        drop_last=len(ds.train) > cfg.batch_size,
        persistent_workers=cfg.num_workers > 0,
    )
    while True:
        yield from loader


def _loop(
    clip: ClipHandle,
    ds: MTILDataset,
    cfg: TrainConfig,
    trainables: list[torch.Tensor],
    params_fn: Callable[[], Mapping[str, torch.Tensor] | None],
    desc: str,
    hook: TrainingHook | None = None,
    hook_params: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    opt = torch.optim.AdamW(trainables, lr=cfg.lr, weight_decay=cfg.weight_decay)
    handles: list = []
    if hook is not None:
        if hook_params is None:
            raise ValueError(f"{desc}: a training hook needs the live tensors keyed by the strategy's names")
        handles = hook.attach(hook_params, optimizer=opt)  # after_step then runs after every opt.step()
    try:
        return _steps(clip, ds, cfg, opt, params_fn, desc, hook, hook_params)
    finally:
        for h in handles:
            h.remove()


def _steps(
    clip: ClipHandle,
    ds: MTILDataset,
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    params_fn: Callable[[], Mapping[str, torch.Tensor] | None],
    desc: str,
    hook: TrainingHook | None,
    hook_params: Mapping[str, torch.Tensor] | None,
) -> dict:
    dev = clip.device
    tokens = clip.tokenize([p[0] for p in ds.prompts(0)]).to(dev)
    scale = clip.model.logit_scale.detach().exp().float()
    use_amp = cfg.amp and dev.type == "cuda"
    it = _batches(ds, cfg, cfg.seed)
    from tqdm.auto import tqdm

    bar = tqdm(range(cfg.iterations), desc=desc, disable=not cfg.progress, leave=False)
    t0 = time.perf_counter()
    loss_v = float("nan")
    clip.model.train()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.lr, cfg.warmup, cfg.iterations)
        images, labels = next(it)
        images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            params = params_fn()
            img = F.normalize(clip.encode("image", images, params).float(), dim=-1)
            txt = F.normalize(clip.encode("text", tokens, params).float(), dim=-1)
            logits = scale * img @ txt.t()
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        if hook is not None:
            loss = loss + hook.loss(hook_params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == cfg.iterations - 1:
            loss_v = float(loss.detach())
            bar.set_postfix(loss=f"{loss_v:.3f}")
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{desc}: loss became {float(loss)} at step {step}; lower the learning rate")
    clip.model.eval()
    return {"seconds": time.perf_counter() - t0, "final_loss": loss_v, "iterations": cfg.iterations}


def finetune_full(
    clip: ClipHandle,
    ds: MTILDataset,
    cfg: TrainConfig,
    names: list[str],
    desc: str = "train",
    hook: TrainingHook | None = None,
) -> dict:
    """Fine-tune the parameters ``names`` of ``clip.model`` in place from whatever it holds now
    (with a strategy's ``hook``, keyed by those parameter names)."""
    params = dict(clip.model.named_parameters())
    wanted = set(names)
    for n, p in params.items():
        p.requires_grad_(n in wanted)
    try:
        return _loop(clip, ds, cfg, [params[n] for n in names], lambda: None, desc, hook, {n: params[n] for n in names})
    finally:
        for p in params.values():
            p.requires_grad_(False)


def lora_flat_names(module: str) -> tuple[str, str]:
    """The flat names of a LoRA module's factors (the keys of a factor delta and of a strategy's base)."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def finetune_lora(
    clip: ClipHandle,
    ds: MTILDataset,
    cfg: TrainConfig,
    init: LoraAdapter,
    desc: str = "train",
    hook: TrainingHook | None = None,
) -> LoraAdapter:
    """Train LoRA factors starting from ``init`` (the model stays frozen at θ_0). Returns the trained
    adapter (CPU, ``init``'s config) recording ``init``'s fingerprint, ready for
    :func:`condu_merge.adapters.factor_delta`. A strategy's ``hook`` sees the factor leaves under
    their flat names (:func:`lora_flat_names`)."""
    for p in clip.model.parameters():
        p.requires_grad_(False)
    start = init.to(clip.device)
    factors = {
        m: (a.float().clone().requires_grad_(True), b.float().clone().requires_grad_(True))
        for m, (a, b) in start.factors.items()
    }
    live = LoraAdapter(config=dict(init.config), factors=factors)  # holds the leaves the optimiser updates
    flat = {n: t for m, ab in factors.items() for n, t in zip(lora_flat_names(m), ab)}
    _loop(
        clip,
        ds,
        cfg,
        [t for ab in factors.values() for t in ab],
        lambda: lora_weights(clip.model, live),
        desc,
        hook,
        flat,
    )
    return LoraAdapter(
        config=dict(init.config),
        init_fingerprint=init.fingerprint(),
        factors={m: (a.detach().cpu(), b.detach().cpu()) for m, (a, b) in factors.items()},
    )
