"""Real data for the continual-learning benchmark: scikit-learn's handwritten digits in several
input domains, and a tiny open_clip CLIP pre-trained on the plain domain with class-name captions.

The digits are the 1,797 8x8 images of the UCI "optical recognition of handwritten digits" test set
that ship inside the scikit-learn wheel (``sklearn.datasets.load_digits``; nothing downloads).
They are upsampled to 16x16 and seen through fixed transformations, one *domain* each: the plain
domain is what the model is pre-trained on; the task domains are what the experts are fine-tuned
on, one continual session per domain; the held-out domains are never trained on (zero-shot
transfer through routing).

Splits: per seed the images are split once, stratified, into a training pool (70 %) and a test
pool (30 %). Pre-training uses the plain domain's training pool; each domain draws its own
training subset from the training pool (its own seeded draw, or ``shots`` per class few-shot)
and is tested on the transformed test pool, so no test image is ever trained on in any domain.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CLASSNAMES",
    "DOMAINS",
    "HELD_OUT",
    "IMAGE_SIZE",
    "MODEL_CONFIG",
    "TASKS",
    "TEMPLATES",
    "DigitsData",
    "Domain",
    "build_model",
    "load_digits_data",
    "pretrain",
    "prompts_of",
    "zero_shot_head",
]

IMAGE_SIZE = 16
CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.")
MODEL_CONFIG = {  # open_clip CLIP(**MODEL_CONFIG): a ViT of 16 patches of 4x4 pixels, a 1-layer text tower
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "layers": 2,
        "width": 48,
        "head_width": 24,
        "patch_size": 4,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _rot90(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 1, dims=(-2, -1))


def _invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def _patch_permutation(seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm((IMAGE_SIZE // 4) ** 2, generator=g)


_PERM = _patch_permutation()


def _patch_shuffle(x: torch.Tensor) -> torch.Tensor:
    """The 16 4x4 patches of each image rearranged by one fixed permutation."""
    n, p = x.shape[0], IMAGE_SIZE // 4
    patches = x.reshape(n, p, 4, p, 4).permute(0, 1, 3, 2, 4).reshape(n, p * p, 4, 4)
    patches = patches[:, _PERM]
    return patches.reshape(n, p, p, 4, 4).permute(0, 1, 3, 2, 4).reshape(n, IMAGE_SIZE, IMAGE_SIZE)


def _blur_noise(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian blur (σ ≈ 1.2 px) then additive Gaussian noise (σ = 0.25), drawn per image from ``seed``."""
    k = torch.tensor([math.exp(-(i * i) / (2 * 1.2**2)) for i in range(-3, 4)])
    k = k / k.sum()
    y = F.conv2d(F.pad(x[:, None], (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7))
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1))[:, 0]
    g = torch.Generator().manual_seed(seed)
    return (y * 1.6 + 0.25 * torch.randn(y.shape, generator=g)).clamp(0, 1)


def _upside_down(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-2,))


def _zoom_shift(x: torch.Tensor) -> torch.Tensor:
    """The digit shrunk to half size and pushed into the bottom-right corner."""
    small = F.interpolate(x[:, None], size=(IMAGE_SIZE // 2, IMAGE_SIZE // 2), mode="area")[:, 0]
    out = torch.zeros_like(x)
    out[:, IMAGE_SIZE // 2 - 1 : IMAGE_SIZE - 1, IMAGE_SIZE // 2 - 1 : IMAGE_SIZE - 1] = small
    return out


def _mirror(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-1,))


@dataclass(frozen=True)
class Domain:
    """A named input domain: ``fn(images [N, 16, 16] in [0, 1], seed) -> images``."""

    name: str
    fn: Callable[[torch.Tensor, int], torch.Tensor]
    what: str

    def __call__(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return self.fn(x, seed)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("plain", lambda x, s: x, "the digits as scanned (pre-training domain)"),
        Domain("rot90", lambda x, s: _rot90(x), "rotated by 90 degrees"),
        Domain("inverted", lambda x, s: _invert(x), "white background, dark strokes"),
        Domain("patches", lambda x, s: _patch_shuffle(x), "the 16 4x4 patches shuffled by one fixed permutation"),
        Domain("blur_noise", _blur_noise, "Gaussian blur then strong additive noise"),
        Domain("upside_down", lambda x, s: _upside_down(x), "flipped vertically"),
        Domain("zoom_shift", lambda x, s: _zoom_shift(x), "half size, pushed into the bottom-right corner"),
        # held out: never trained on
        Domain("rot270", lambda x, s: _rot90(_rot90(_rot90(x))), "rotated by 270 degrees (held out)"),
        Domain("inverted_mirror", lambda x, s: _invert(_mirror(x)), "inverted and mirrored left-right (held out)"),
    )
}
TASKS: tuple[str, ...] = ("rot90", "inverted", "patches", "blur_noise", "upside_down", "zoom_shift")
HELD_OUT: tuple[str, ...] = ("rot270", "inverted_mirror")


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """``[N, 16, 16]`` in [0, 1] -> the model's input ``[N, 3, 16, 16]`` in [-1, 1]."""
    return (x * 2.0 - 1.0)[:, None].expand(-1, 3, -1, -1).contiguous()


@dataclass
class DigitsData:
    """One domain's images (model input, CPU float32) and labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    what: str = ""
    held_out: bool = False
    meta: dict = field(default_factory=dict)


def _stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = round(len(idx) * test_fraction)
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _draw(y: np.ndarray, pool: np.ndarray, n: int | None, shots: int | None, rng: np.random.Generator) -> np.ndarray:
    if shots:
        return np.sort(np.concatenate([rng.choice(pool[y[pool] == c], shots, replace=False) for c in np.unique(y)]))
    if n is None or n >= len(pool):
        return pool
    return np.sort(rng.choice(pool, n, replace=False))


def load_digits_data(
    seed: int = 0,
    *,
    tasks: tuple[str, ...] = TASKS,
    held_out: tuple[str, ...] = HELD_OUT,
    train_per_task: int | None = 600,
    test_per_domain: int | None = None,
    shots: int | None = None,
) -> tuple[DigitsData, list[DigitsData], list[DigitsData]]:
    """``(plain, tasks, held_out)`` domains of the digits for ``seed`` (see the module docstring).

    ``train_per_task`` training images per task domain (drawn from the training pool with the
    domain's own seed; None: the whole pool); ``shots``: instead, that many per class (few-shot);
    ``test_per_domain``: cap on the test pool (None: all of it, 540 images)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits benchmark needs scikit-learn: pip install 'condu-merge[bench]'") from e
    for name in (*tasks, *held_out):
        if name not in DOMAINS:
            raise ValueError(f"unknown domain {name!r}; domains: {sorted(DOMAINS)}")
    d = load_digits()
    y = np.asarray(d.target, dtype=np.int64)
    x = torch.as_tensor(d.images, dtype=torch.float32) / 16.0
    x = F.interpolate(x[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
    rng = np.random.default_rng(seed)
    train_pool, test_pool = _stratified_split(y, 0.3, rng)
    if test_per_domain is not None and test_per_domain < len(test_pool):
        test_pool = np.sort(rng.choice(test_pool, test_per_domain, replace=False))

    def make(name: str, train_idx: np.ndarray, k: int, held: bool) -> DigitsData:
        dom = DOMAINS[name]
        dseed = 1000 * seed + 17 * k + 1
        return DigitsData(
            name,
            to_pixels(dom(x[train_idx], dseed)),
            torch.as_tensor(y[train_idx]),
            to_pixels(dom(x[test_pool], dseed + 7)),
            torch.as_tensor(y[test_pool]),
            dom.what,
            held,
        )

    plain = make("plain", train_pool, 0, False)
    task_data = []
    for k, name in enumerate(tasks, start=1):
        drng = np.random.default_rng([seed, k])
        task_data.append(make(name, _draw(y, train_pool, train_per_task, shots, drng), k, False))
    held_data = [make(name, train_pool[:0], 100 + k, True) for k, name in enumerate(held_out)]
    return plain, task_data, held_data


# ---------------------------------------------------------------------------- model


def build_model(seed: int = 0) -> torch.nn.Module:
    """A freshly initialised tiny open_clip ``CLIP`` (:data:`MODEL_CONFIG`), seeded."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**MODEL_CONFIG)
    return model.eval()


def tokenizer() -> Callable[[list[str]], torch.Tensor]:
    import open_clip

    return open_clip.tokenizer.SimpleTokenizer(context_length=MODEL_CONFIG["text_cfg"]["context_length"])


def prompts_of(tok: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """Tokenised prompts ``[C, T, L]``: every template of every class name."""
    flat = tok([t.format(c) for c in CLASSNAMES for t in TEMPLATES])
    return flat.reshape(len(CLASSNAMES), len(TEMPLATES), -1)


def zero_shot_head(model: torch.nn.Module, prompts: torch.Tensor) -> torch.Tensor:
    """The zero-shot classifier ``[C, D]``: per class the normalised mean of its normalised
    prompt embeddings (CLIP's prompt ensembling)."""
    c, t, l = prompts.shape
    with torch.no_grad():
        e = F.normalize(model.encode_text(prompts.reshape(c * t, l)).float(), dim=-1).reshape(c, t, -1)
    return F.normalize(e.mean(dim=1), dim=-1)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel (pre-training only)."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def pretrain(
    model: torch.nn.Module,
    plain: DigitsData,
    prompts: torch.Tensor,
    *,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """CLIP-style pre-training on the plain domain: both towers trained with a symmetric
    contrastive loss between each image and a caption of its class (a random template), where
    captions of the same class count as one target (``labels`` define the positives). Returns
    the final loss and the seconds it took."""
    g = torch.Generator().manual_seed(seed)
    c, t, _l = prompts.shape
    params = [p for n, p in model.named_parameters() if n != "logit_scale"]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    model.train()
    t0 = time.perf_counter()
    loss_v = float("nan")
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(plain.train_y), (batch_size,), generator=g)
        x, y = _augment(plain.train_x[idx], g), plain.train_y[idx]
        tmpl = torch.randint(0, t, (c,), generator=g)
        tokens = prompts[torch.arange(c), tmpl]  # one caption per class this step
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()  # [B, C]
        loss = F.cross_entropy(logits, y)
        present = torch.unique(y)  # text -> image: each present class's caption picks its images
        loss = loss + 0.5 * F.cross_entropy(
            logits.t()[present],
            (y[None, :] == present[:, None]).float() / (y[None, :] == present[:, None]).sum(1, keepdim=True),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # clipped: without it some seeds' text towers collapse (every caption one embedding, chance accuracy)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_v = float(loss.detach())
    model.eval()
    return {"final_loss": loss_v, "seconds": time.perf_counter() - t0, "steps": steps}


def save_checkpoint(model: torch.nn.Module, path: str) -> None:
    """The pre-trained model as a local safetensors checkpoint (atomic: temporary file + rename)."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        tmp,
        metadata={"format": "pt", "config": "condu_merge.demo.digits.MODEL_CONFIG"},
    )
    os.replace(tmp, path)


def load_checkpoint(path: str) -> torch.nn.Module:
    """A tiny CLIP with the weights of ``path`` (safetensors; no pickle)."""
    from safetensors.torch import load_file

    model = build_model(0)
    model.load_state_dict(load_file(path))
    return model.eval()
