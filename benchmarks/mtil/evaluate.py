"""Evaluation: zero-shot classifiers, prototypes, semantic routing (top-K aggregation) and accuracy.

* Class text embedding: mean over the task's templates of the normalised text features, normalised.
* Prototype of class ``c`` (pretrained model): ``norm((mean_i norm(f_img(x_i)) + text_c) / 2)`` over the
  class's training images (text alone when a class has no image).
* Routing a test image ``x`` (pretrained feature ``z``): task score ``max_c cos(z, P_t[c])``; the ``K``
  best tasks get weight 1, the others 0; prediction ``argmax mean_{t in top-K} logits_t(x)`` with
  ``logits_t = logit_scale · norm(f_img^t(x)) @ T_tᵀ`` and ``T_t`` the dataset's class embeddings
  under expert ``t``.
* Work is grouped by expert: one expert's parameters exist at a time and it runs only on the
  samples routed to it (plus, for its own task, the whole test set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .datasets import MTILDataset
from .model import ClipHandle, tokens_to


@dataclass
class EvalConfig:
    batch_size: int = 128
    num_workers: int = 4
    amp: bool = True
    progress: bool = True
    top_k: int = 5


def _autocast(clip: ClipHandle, cfg: EvalConfig):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cfg.amp and clip.device.type == "cuda")


@torch.no_grad()
def text_classifier(
    clip: ClipHandle, ds: MTILDataset, cfg: EvalConfig, params: Mapping[str, torch.Tensor] | None = None, chunk: int = 512
) -> torch.Tensor:
    """``[C, D]`` normalised class embeddings: template-averaged normalised text features."""
    prompts = ds.prompts()
    flat = [p for ps in prompts for p in ps]
    owner = torch.tensor([c for c, ps in enumerate(prompts) for _ in ps])
    feats = []
    for i in range(0, len(flat), chunk):
        tok = tokens_to(clip.tokenize(flat[i : i + chunk]), clip.device)
        with _autocast(clip, cfg):
            feats.append(F.normalize(clip.encode_text(tok, params).float(), dim=-1).cpu())
    f = torch.cat(feats)
    out = torch.zeros(len(prompts), f.shape[1]).index_add_(0, owner, f)
    return F.normalize(out, dim=-1)


@torch.no_grad()
def image_features(
    clip: ClipHandle,
    dataset,
    cfg: EvalConfig,
    params: Mapping[str, torch.Tensor] | None = None,
    indices: Sequence[int] | None = None,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features ``[N, D]`` (CPU float32) and labels of ``dataset`` (or a subset)."""
    from tqdm.auto import tqdm

    ds = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, disable=not cfg.progress, leave=False):
        with _autocast(clip, cfg):
            feats.append(F.normalize(clip.encode_image(images.to(clip.device), params).float(), dim=-1).cpu())
        labels.append(torch.as_tensor(y))
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels).long()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if labels.numel() == 0:
        return float("nan")
    return float((logits.argmax(dim=-1) == labels).float().mean() * 100.0)


@torch.no_grad()
def compute_prototypes(
    clip: ClipHandle, ds: MTILDataset, cfg: EvalConfig, text: torch.Tensor, *, max_per_class: int | None = None, seed: int = 0
) -> torch.Tensor:
    """``[C, D]`` prototypes of ``ds`` with the (pretrained) model ``clip`` and its class embeddings ``text``."""
    labels = ds.train_labels
    idx = np.arange(len(labels))
    if max_per_class is not None:
        rng = np.random.default_rng(seed)
        keep = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            keep.append(members if members.size <= max_per_class else rng.choice(members, max_per_class, replace=False))
        idx = np.sort(np.concatenate(keep)) if keep else idx[:0]
    feats, y = image_features(clip, ds.train, cfg, indices=idx.tolist(), desc=f"prototypes {ds.name}")
    c = text.shape[0]
    return prototypes_from_features(feats, y, text, c)


def prototypes_from_features(feats: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``norm((mean image feature + text) / 2)`` per class; text alone for classes without images."""
    d = text.shape[1]
    sums = torch.zeros(n_classes, d)
    counts = torch.zeros(n_classes)
    if feats.numel():
        sums.index_add_(0, labels, feats)
        counts.index_add_(0, labels, torch.ones(labels.numel()))
    has = counts > 0
    img_mean = torch.where(has[:, None], sums / counts.clamp(min=1)[:, None], text)
    return F.normalize((img_mean + text) / 2, dim=-1)


def route(query: torch.Tensor, prototypes: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """``[N, min(k, T)]`` indices of the tasks whose best prototype is most similar to each query
    (cosine; queries and prototypes normalised)."""
    if not prototypes:
        raise ValueError("routing needs at least one task's prototypes")
    scores = torch.stack([(query @ p.t()).max(dim=1).values for p in prototypes], dim=1)
    return scores.topk(min(k, len(prototypes)), dim=1).indices


@dataclass
class SessionEvalPlan:
    """What one session's evaluation computes for each dataset ``j`` (index into ``datasets``)."""

    known: dict[int, int] = field(default_factory=dict)  # j -> expert whose own test set it is
    aggregate: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # variant -> j -> routes [N, k]


@torch.no_grad()
def evaluate_experts(
    clip: ClipHandle,
    datasets: Sequence[MTILDataset],
    n_experts: int,
    expert_params: Callable[[int], Mapping[str, torch.Tensor]],
    plan: SessionEvalPlan,
    cfg: EvalConfig,
    desc: str = "eval",
) -> dict[str, dict[int, float]]:
    """Run the plan grouped by expert. Returns ``{"known": {j: acc}, variant: {j: acc}, ...}``."""
    scale = float(clip.logit_scale().exp())
    sums: dict[str, dict[int, torch.Tensor]] = {}
    labels: dict[int, torch.Tensor] = {}
    known_logits: dict[int, torch.Tensor] = {}
    for variant, per_ds in plan.aggregate.items():
        sums[variant] = {j: torch.zeros(len(datasets[j].test_labels), len(datasets[j].classnames)) for j in per_ds}
    for e in range(n_experts):
        needs: dict[int, np.ndarray] = {}
        for j, owner in plan.known.items():
            if owner == e:
                needs[j] = np.arange(len(datasets[j].test_labels))
        for variant, per_ds in plan.aggregate.items():
            for j, routes in per_ds.items():
                sel = np.flatnonzero((routes == e).any(dim=1).numpy())
                if sel.size:
                    needs[j] = np.union1d(needs.get(j, np.zeros(0, dtype=np.int64)), sel)
        if not needs:
            continue
        params = expert_params(e)
        for j, idx in needs.items():
            ds = datasets[j]
            text = text_classifier(clip, ds, cfg, params)
            feats, y = image_features(clip, ds.test, cfg, params, idx.tolist(), desc=f"{desc} expert {e + 1} on {ds.name}")
            logits = scale * feats @ text.t()
            idx_t = torch.as_tensor(idx, dtype=torch.long)
            if plan.known.get(j) == e:
                known_logits[j] = logits
                labels[j] = y
            for variant, per_ds in plan.aggregate.items():
                if j not in per_ds:
                    continue
                routed = (per_ds[j][idx_t] == e).any(dim=1)
                sums[variant][j].index_add_(0, idx_t[routed], logits[routed])
        del params
    out: dict[str, dict[int, float]] = {"known": {}}
    for j, lg in known_logits.items():
        out["known"][j] = accuracy(lg, labels[j])
    for variant, per_ds in sums.items():
        out[variant] = {}
        for j, s in per_ds.items():
            # mean over the selected experts: a constant factor per sample, irrelevant to argmax
            out[variant][j] = accuracy(s, torch.as_tensor(datasets[j].test_labels))
    return out
