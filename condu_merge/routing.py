"""Task-agnostic inference: prototypes, semantic routing and aggregation of expert logits.

All features here are those of the **pretrained** model (for prototypes and routing) or of an
expert (for logits); ``n(x) = x / ‖x‖`` is L2 normalisation along the last dimension.

* Prototype of class ``c`` of task ``t`` (:func:`compute_prototypes`)::

      img_c = mean_i n(f(x_i))            over the task's images of class c
      txt_c = mean_j n(g(template_j(c)))  over the prompt templates
      p_c   = n((img_c + txt_c) / 2)      (p_c = n(txt_c) when class c has no images)

* Routing (:func:`route`): for a test image, ``z = n(f(x))``; per task
  ``score_t = max_c z · p_tc``; the ``K`` tasks with the highest scores get weight 1, the others 0
  (``K`` defaults to 5; ties broken by task order).
* Aggregation (:class:`SemanticAggregator`): each selected expert's logits are
  ``100 · n(f_e(x)) @ T_eᵀ`` with ``T_e`` = the expert's normalised class text embeddings of the
  dataset; the output is their mean. ``include_pretrained=True`` adds the pretrained model's
  logits as one more member of that mean (``(Σ_selected + pretrained) / (K + 1)``), as the
  released code does. With a known task id, that task's expert alone gives the logits.

Experts run only on the samples routed to them (grouped by expert), and class text embeddings are
computed once per (expert, dataset) and cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .errors import FormatError, KeyMismatchError, MergeInputError, UnknownTaskError

__all__ = [
    "DEFAULT_K",
    "ExpertEncoders",
    "SemanticAggregator",
    "class_text_embeddings",
    "compute_prototypes",
    "load_prototypes",
    "prototypes_from_encoders",
    "prototypes_from_store",
    "route",
    "route_scores",
    "save_prototypes",
]

DEFAULT_K = 5
LOGIT_SCALE = 100.0


def _n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# ---------------------------------------------------------------------------- prototypes


def compute_prototypes(
    image_features: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor, *, num_classes: int | None = None
) -> dict[str, torch.Tensor]:
    """Prototypes of one task from pretrained features (see the module docstring for the math).

    ``image_features [N, D]`` with integer ``labels [N]`` in ``[0, C)``; ``text_features [C, T, D]``
    (``T`` prompt templates per class; ``[C, D]`` is read as ``T = 1``). Returns plain tensors, as
    the store keeps them: ``{"prototypes": [C, D] float32, "image_counts": [C] int64}``.
    """
    if text_features.dim() == 2:
        text_features = text_features[:, None, :]
    if text_features.dim() != 3:
        raise MergeInputError(f"text_features must be [C, T, D] or [C, D], got {tuple(text_features.shape)}")
    c, _, d = text_features.shape
    num_classes = c if num_classes is None else num_classes
    if num_classes != c:
        raise MergeInputError(f"{c} classes of text features for num_classes={num_classes}")
    if image_features.dim() != 2 or (image_features.shape[0] and image_features.shape[1] != d):
        raise MergeInputError(f"image_features must be [N, {d}], got {tuple(image_features.shape)}")
    labels = labels.reshape(-1).long().to(image_features.device)
    if labels.numel() != image_features.shape[0]:
        raise MergeInputError(f"{labels.numel()} labels for {image_features.shape[0]} image features")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise MergeInputError(f"labels must lie in [0, {c}), got [{int(labels.min())}, {int(labels.max())}]")
    txt = _n(text_features).mean(dim=1)
    sums = torch.zeros(c, d, dtype=torch.float32, device=image_features.device)
    counts = torch.zeros(c, dtype=torch.int64, device=image_features.device)
    if labels.numel():
        sums.index_add_(0, labels, _n(image_features))
        counts.index_add_(0, labels, torch.ones_like(labels))
    txt = txt.to(sums.device)
    img = sums / counts.clamp(min=1)[:, None].float()
    has = (counts > 0)[:, None]
    protos = _n(torch.where(has, (img + txt) / 2, txt))
    return {"prototypes": protos.cpu(), "image_counts": counts.cpu()}


def class_text_embeddings(
    encode_text: Callable[[torch.Tensor], torch.Tensor], prompts: torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """Zero-shot classifier ``[C, D]``: per class, ``n(mean_j n(g(prompt_cj)))``.

    ``prompts`` are tokenised, ``[C, T, L]`` (``T`` templates) or ``[C, L]``."""
    if prompts.dim() == 2:
        prompts = prompts[:, None, :]
    c, t, ell = prompts.shape
    flat = prompts.reshape(c * t, ell)
    with torch.no_grad():
        feats = torch.cat([encode_text(flat[i : i + batch_size]) for i in range(0, flat.shape[0], batch_size)])
    return _n(_n(feats).reshape(c, t, -1).mean(dim=1))


def prototypes_from_encoders(
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    prompts: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Prototypes of one task with the **pretrained** encoders: ``batches`` yields
    ``(images, labels)``; ``prompts`` are the tokenised class prompts ``[C, T, L]``."""
    feats, labs = [], []
    with torch.no_grad():
        for images, labels in batches:
            feats.append(encode_image(images).float().cpu())
            labs.append(labels.reshape(-1).cpu())
        if prompts.dim() == 2:
            prompts = prompts[:, None, :]
        c, t, ell = prompts.shape
        text = encode_text(prompts.reshape(c * t, ell)).float().cpu().reshape(c, t, -1)
    d = text.shape[-1]
    img = torch.cat(feats) if feats else torch.zeros(0, d)
    lab = torch.cat(labs) if labs else torch.zeros(0, dtype=torch.int64)
    return compute_prototypes(img, lab, text)


def prototypes_from_store(store: Any, tasks: Sequence[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{task: tensors}`` saved with ``store.save_prototypes(task, compute_prototypes(...))`` for
    ``tasks`` (default: all of the store's tasks); a task without prototypes raises, naming it."""
    out = {}
    for task in store.task_names if tasks is None else tasks:
        p = store.load_prototypes(task)
        if p is None:
            raise KeyMismatchError(f"store {getattr(store, 'root', store)!r} holds no prototypes for task {task!r}")
        out[task] = p
    return out


def save_prototypes(path: str | os.PathLike[str], prototypes: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Write ``{task: {name: tensor}}`` to one safetensors file (keys ``task/name``), for use without
    a store. Task names must not contain ``/``. With a :class:`condu_merge.store.Store`, use its
    ``save_prototypes(task, tensors)`` and :func:`prototypes_from_store` instead."""
    from safetensors.torch import save_file

    flat = {}
    for task, tensors in prototypes.items():
        if "/" in task:
            raise ValueError(f"task name {task!r} must not contain '/'")
        for name, t in tensors.items():
            flat[f"{task}/{name}"] = t.detach().contiguous().cpu()
    save_file(flat, os.fspath(path), metadata={"format": "condu-merge/prototypes", "version": "1"})


def load_prototypes(path: str | os.PathLike[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Read a file of :func:`save_prototypes` back into ``{task: {name: tensor}}``."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    out: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "condu-merge/prototypes":
                raise FormatError(f"{path}: not a condu-merge prototypes file (format={meta.get('format')!r})")
            if meta.get("version") != "1":
                raise FormatError(f"{path}: unknown prototypes format version {meta.get('version')!r}")
            for key in f.keys():
                task, _, name = key.partition("/")
                out.setdefault(task, {})[name] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: unreadable prototypes file ({e})") from None
    return out


# ---------------------------------------------------------------------------- routing


def _proto_tensor(p: torch.Tensor | Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    t = p["prototypes"] if isinstance(p, Mapping) else p
    if t.dim() != 2 or t.shape[0] == 0:
        raise MergeInputError(f"prototypes of task {task!r} must be [C, D] with C >= 1, got {tuple(t.shape)}")
    return t


def route_scores(
    features: torch.Tensor, prototypes: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]]
) -> torch.Tensor:
    """``scores[i, t] = max_c n(features_i) · n(p_tc)`` over the tasks in ``prototypes`` order.

    ``features`` are the pretrained model's image features ``[N, D]``."""
    if not prototypes:
        raise MergeInputError("no task prototypes to route with")
    z = _n(features)
    cols = []
    for task, p in prototypes.items():
        pt = _proto_tensor(p, task)
        if pt.shape[1] != z.shape[1]:
            raise MergeInputError(f"prototypes of task {task!r} have dimension {pt.shape[1]}, features {z.shape[1]}")
        cols.append((z @ _n(pt).to(z.device).t()).max(dim=1).values)
    return torch.stack(cols, dim=1)


def route(
    features: torch.Tensor, prototypes: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]], k: int = DEFAULT_K
) -> torch.Tensor:
    """Selection ``[N, T]`` (bool): for each sample the ``min(k, T)`` tasks of highest
    :func:`route_scores` (weight 1), the rest 0. Ties go to the earlier task."""
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    scores = route_scores(features, prototypes)
    k = min(k, scores.shape[1])
    # stable descending sort: equal scores keep task order
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    sel = torch.zeros_like(scores, dtype=torch.bool)
    sel.scatter_(1, order, True)
    return sel


# ---------------------------------------------------------------------------- aggregation


class ExpertEncoders(Protocol):
    """What :class:`SemanticAggregator` needs; :class:`condu_merge.adapters.ClipExperts` is one.
    Task ``None`` is the pretrained model."""

    def encode_image(self, task: str | None, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, task: str | None, tokens: torch.Tensor) -> torch.Tensor: ...


class SemanticAggregator:
    """Task-agnostic (or task-given) CLIP classification over decoupled experts.

    ``experts`` encodes with an expert or the pretrained model; ``prototypes[task]`` are that
    task's prototypes (``[C, D]`` or the dict of :func:`compute_prototypes`); an expert exists for
    every task with prototypes. Class text embeddings are cached per ``(expert, dataset)``.
    """

    def __init__(
        self,
        experts: ExpertEncoders,
        prototypes: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]],
        *,
        k: int = DEFAULT_K,
        include_pretrained: bool = False,
    ):
        if k < 1:
            raise ValueError(f"K must be >= 1, got {k}")
        self.experts = experts
        self.prototypes = {t: _proto_tensor(p, t) for t, p in prototypes.items()}
        self.tasks = list(self.prototypes)
        self.k = k
        self.include_pretrained = include_pretrained
        self._text_cache: dict[tuple[str | None, str], torch.Tensor] = {}
        self._prompts_of: dict[str, torch.Tensor] = {}

    def _check_prompts(self, dataset: str, prompts: torch.Tensor) -> None:
        """Drop ``dataset``'s cached embeddings when it comes with other prompts than before
        (another class list or templates under the same name); equal prompts keep them."""
        seen = self._prompts_of.get(dataset)
        if seen is prompts:
            return
        if seen is not None and not (
            seen.shape == prompts.shape and seen.device == prompts.device and torch.equal(seen, prompts)
        ):
            for key in [k for k in self._text_cache if k[1] == dataset]:
                del self._text_cache[key]
        self._prompts_of[dataset] = prompts

    def text_embeddings(self, task: str | None, dataset: str, prompts: torch.Tensor) -> torch.Tensor:
        """Expert ``task``'s normalised class embeddings of ``dataset`` (computed once per
        (expert, dataset, prompts), cached)."""
        self._check_prompts(dataset, prompts)
        key = (task, dataset)
        if key not in self._text_cache:
            self._text_cache[key] = class_text_embeddings(lambda t: self.experts.encode_text(task, t), prompts)
        return self._text_cache[key]

    def clear_cache(self) -> None:
        self._text_cache.clear()
        self._prompts_of.clear()

    def expert_logits(
        self, task: str | None, images: torch.Tensor, dataset: str, prompts: torch.Tensor
    ) -> torch.Tensor:
        """``100 · n(f_task(x)) @ T_taskᵀ`` for all of ``images``."""
        text = self.text_embeddings(task, dataset, prompts)
        with torch.no_grad():
            feats = _n(self.experts.encode_image(task, images))
        return LOGIT_SCALE * feats @ text.to(feats.device).t()

    def select(self, images: torch.Tensor) -> torch.Tensor:
        """Routing selection ``[N, T]`` from the pretrained image features."""
        with torch.no_grad():
            feats = self.experts.encode_image(None, images)
        return route(feats, self.prototypes, self.k)

    def logits(
        self,
        images: torch.Tensor,
        dataset: str,
        prompts: torch.Tensor,
        *,
        task: str | None = None,
        selection: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits ``[N, C]`` of ``images`` for ``dataset`` (tokenised prompts ``[C, T, L]``).

        With ``task``, that expert alone. Otherwise route (or use ``selection [N, T]``) and run each
        expert only on the samples routed to it; the output is the mean over each sample's
        selected experts (plus the pretrained model with ``include_pretrained``). An empty batch
        gives ``[0, C]``; a ``selection`` row with no expert is refused unless ``include_pretrained``."""
        if images.shape[0] == 0:
            if task is not None and task not in self.prototypes:
                raise UnknownTaskError(f"no expert for task {task!r}; tasks: {self.tasks}")
            return torch.zeros(0, prompts.shape[0], dtype=torch.float32, device=images.device)
        if task is not None:
            if task not in self.prototypes:
                raise UnknownTaskError(f"no expert for task {task!r}; tasks: {self.tasks}")
            return self.expert_logits(task, images, dataset, prompts)
        sel = self.select(images) if selection is None else selection.to(torch.bool)
        if sel.shape != (images.shape[0], len(self.tasks)):
            raise MergeInputError(f"selection must be [{images.shape[0]}, {len(self.tasks)}], got {tuple(sel.shape)}")
        count = sel.sum(dim=1).to(torch.float32)
        if not self.include_pretrained and bool((count == 0).any()):
            i = int((count == 0).nonzero()[0, 0])
            raise MergeInputError(f"selection: sample {i} is routed to no expert (and include_pretrained is off)")
        out: torch.Tensor | None = None
        if self.include_pretrained:
            out = self.expert_logits(None, images, dataset, prompts)
            count = count + 1
        for j, t in enumerate(self.tasks):
            idx = sel[:, j].nonzero().reshape(-1)
            if idx.numel() == 0:
                continue
            part = self.expert_logits(t, images[idx.to(images.device)], dataset, prompts)
            if out is None:
                out = torch.zeros(images.shape[0], part.shape[1], dtype=part.dtype, device=part.device)
            out.index_add_(0, idx.to(out.device), part)
        if out is None:
            raise MergeInputError("no sample was routed to any expert")
        return out / count.clamp(min=1).to(out.device)[:, None]
