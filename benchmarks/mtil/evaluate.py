"""Evaluation loops over MTIL datasets. The math lives in the library (:mod:`condu_merge.routing`):

* class text embeddings ``n(mean_j n(g(template_j(c))))`` -- :func:`class_text_embeddings`;
* prototypes of a task with the pretrained model -- :func:`prototypes_from_encoders`;
* top-K routing from the pretrained image features -- :func:`route`;
* logits of a known task's expert, or the mean over the routed experts' logits (optionally with
  the pretrained model's), run grouped by expert with cached text embeddings --
  :class:`SemanticAggregator`.

This module only feeds batches through them and counts correct predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from condu_merge.routing import SemanticAggregator, class_text_embeddings, prototypes_from_encoders

from .datasets import MTILDataset
from .model import ClipHandle


@dataclass
class EvalConfig:
    batch_size: int = 128
    num_workers: int = 4
    amp: bool = True
    progress: bool = True


def autocast(clip: ClipHandle, cfg: EvalConfig):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cfg.amp and clip.device.type == "cuda")


def class_prompts(clip: ClipHandle, ds: MTILDataset) -> torch.Tensor:
    """Tokenised prompts ``[C, T, L]`` (every template of every class) on the model's device."""
    prompts = ds.prompts()
    flat = clip.tokenize([p for ps in prompts for p in ps])
    return flat.reshape(len(prompts), len(ds.templates), -1).to(clip.device)


def _batches(dataset, cfg: EvalConfig, indices: Sequence[int] | None = None, desc: str = "") -> Iterable:
    from tqdm.auto import tqdm

    ds = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    return tqdm(loader, desc=desc, disable=not cfg.progress, leave=False)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if labels.numel() == 0:
        return float("nan")
    return float((logits.argmax(dim=-1).cpu() == labels.cpu()).float().mean() * 100.0)


@torch.no_grad()
def image_features(
    clip: ClipHandle, dataset, cfg: EvalConfig, desc: str = "features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised image features ``[N, D]`` (CPU float32) of the model as it is now, and labels."""
    enc_img, _ = clip.encoders()
    feats, labels = [], []
    for images, y in _batches(dataset, cfg, desc=desc):
        with autocast(clip, cfg):
            feats.append(enc_img(images.to(clip.device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def text_embeddings(clip: ClipHandle, ds: MTILDataset, cfg: EvalConfig) -> torch.Tensor:
    """The model's (as it is now) class text embeddings ``[C, D]`` of ``ds`` (CPU float32)."""
    _, enc_txt = clip.encoders()
    with autocast(clip, cfg):
        return class_text_embeddings(enc_txt, class_prompts(clip, ds)).float().cpu()


def zero_shot_accuracy(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> float:
    """Accuracy of ``n(features) @ textᵀ`` (``text`` already normalised)."""
    return accuracy(F.normalize(features, dim=-1) @ text.t(), labels)


def model_accuracy(clip: ClipHandle, ds: MTILDataset, cfg: EvalConfig, desc: str) -> float:
    """Test accuracy of the model as it is now (a fine-tuned model, or an expert swapped in)."""
    f, y = image_features(clip, ds.test, cfg, desc=desc)
    return zero_shot_accuracy(f, y, text_embeddings(clip, ds, cfg))


@torch.no_grad()
def task_prototypes(
    clip: ClipHandle, ds: MTILDataset, cfg: EvalConfig, *, max_per_class: int | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Prototypes of ``ds`` with the model as it is now (call it with θ_0), from its training images
    (at most ``max_per_class`` per class, drawn with ``seed``): ``prototypes_from_encoders``."""
    labels = ds.train_labels
    idx = np.arange(len(labels))
    if max_per_class is not None:
        rng = np.random.default_rng(seed)
        keep = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            keep.append(members if members.size <= max_per_class else rng.choice(members, max_per_class, replace=False))
        idx = np.sort(np.concatenate(keep)) if keep else idx[:0]
    enc_img, enc_txt = clip.encoders()

    def encode_image(x: torch.Tensor) -> torch.Tensor:
        with autocast(clip, cfg):
            return enc_img(x.to(clip.device)).float()

    def encode_text(t: torch.Tensor) -> torch.Tensor:
        with autocast(clip, cfg):
            return enc_txt(t).float()

    return prototypes_from_encoders(
        encode_image,
        encode_text,
        _batches(ds.train, cfg, idx.tolist(), desc=f"prototypes {ds.name}"),
        class_prompts(clip, ds),
    )


class AutocastExperts:
    """An :class:`condu_merge.routing.ExpertEncoders` whose encoders run under bf16 autocast on GPU and
    return float32, so that the aggregator's logits and their mean stay in float32."""

    def __init__(self, experts, clip: ClipHandle, cfg: EvalConfig):
        self.experts, self.clip, self.cfg = experts, clip, cfg

    def encode_image(self, task: str | None, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.clip, self.cfg):
            return self.experts.encode_image(task, images).float()

    def encode_text(self, task: str | None, tokens: torch.Tensor) -> torch.Tensor:
        with autocast(self.clip, self.cfg):
            return self.experts.encode_text(task, tokens).float()


@torch.no_grad()
def aggregator_accuracy(
    agg: SemanticAggregator,
    clip: ClipHandle,
    ds: MTILDataset,
    cfg: EvalConfig,
    *,
    task: str | None = None,
    selection: torch.Tensor | None = None,
    desc: str = "eval",
) -> float:
    """Test accuracy of ``agg.logits``: with ``task``, that expert alone (task id known); otherwise
    aggregated with the routing ``selection [N, T]`` (rows in test-set order; computed once from
    the cached pretrained features with :func:`condu_merge.routing.route`). Wrap the experts in
    :class:`AutocastExperts` for mixed precision."""
    prompts = class_prompts(clip, ds)
    correct, seen = 0, 0
    for images, y in _batches(ds.test, cfg, desc=desc):
        n = images.shape[0]
        if task is not None:
            logits = agg.logits(images.to(clip.device), ds.name, prompts, task=task)
        else:
            logits = agg.logits(images.to(clip.device), ds.name, prompts, selection=selection[seen : seen + n])
        correct += int((logits.float().argmax(dim=-1).cpu() == torch.as_tensor(y)).sum())
        seen += n
    return 100.0 * correct / seen if seen else float("nan")
