"""``--synthetic``: procedural multi-domain image-text data written in the MTIL folder layout, and a
tiny open_clip CLIP pre-trained on it for a moment, so the whole protocol runs on a CPU in minutes.

Four domains, each stored exactly as torchvision's reader of the real dataset expects it (so the
real loading code is what runs): satellite scenes as ``eurosat/2750/<Class>/``, textures as
``dtd/dtd/{images,labels}``, objects as ``caltech101/101_ObjectCategories/``, food as
``food-101/{images,meta}``. Every class is a procedural family of images (pattern, palette and
jitter drawn from a seeded generator) named by a plain English word the CLIP tokenizer knows.

Pre-training is a short CLIP contrastive run on *other* procedurally drawn images of the same
domains with generic captions, then saved as a local safetensors checkpoint plus an open_clip
model config, loaded back through the same offline path as a real checkpoint. Nothing downloads.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SYN_MODEL_NAME = "mtil-synthetic-tiny-clip"
IMAGE_SIZE = 32

# dataset -> (class folder name, class name) ; folder names follow each dataset's own conventions
DOMAINS: dict[str, list[tuple[str, str]]] = {
    "EuroSAT": [("Forest", "forest"), ("River", "river"), ("Highway", "highway"), ("Farmland", "farmland")],
    "DTD": [("checkered", "checkered"), ("dotted", "dotted"), ("zigzagged", "zigzagged"), ("striped", "striped")],
    "Caltech101": [("circle", "circle"), ("square", "square"), ("triangle", "triangle"), ("cross", "cross")],
    "Food": [("tomato", "tomato"), ("banana", "banana"), ("lettuce", "lettuce"), ("bread", "bread")],
}
SYNTHETIC_ORDER = ("Caltech101", "DTD", "EuroSAT", "Food")

MODEL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


# ------------------------------------------------------------------ procedural images


def _grid(n: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    return y, x


def _palette(rng: np.random.Generator, base: tuple[float, float, float], spread: float = 0.15) -> np.ndarray:
    return np.clip(np.asarray(base, dtype=np.float32) + rng.normal(0, spread, 3), 0, 1)


def draw(domain: str, cls: int, rng: np.random.Generator) -> np.ndarray:
    """One ``[H, W, 3]`` float image in [0, 1] of class ``cls`` of ``domain``."""
    y, x = _grid()
    n = IMAGE_SIZE
    if domain == "EuroSAT":  # satellite: green/brown ground with a class-specific structure
        img = np.ones((n, n, 3), np.float32) * _palette(rng, (0.35, 0.45, 0.25), 0.08)
        img += rng.normal(0, 0.06, (n, n, 1)).astype(np.float32)
        if cls == 0:  # forest: dark green blotches
            for _ in range(12):
                cy, cx, r = rng.random(), rng.random(), rng.uniform(0.05, 0.15)
                m = (y - cy) ** 2 + (x - cx) ** 2 < r * r
                img[m] = _palette(rng, (0.1, 0.3, 0.1), 0.05)
        elif cls == 1:  # river: a blue sinuous band
            ph, amp = rng.uniform(0, 6.28), rng.uniform(0.05, 0.2)
            m = np.abs(x - (0.5 + amp * np.sin(6 * y + ph))) < rng.uniform(0.06, 0.12)
            img[m] = _palette(rng, (0.15, 0.3, 0.7), 0.05)
        elif cls == 2:  # highway: a straight grey line at a random angle
            a = rng.uniform(0, math.pi)
            d = np.abs((x - 0.5) * math.sin(a) - (y - 0.5) * math.cos(a))
            img[d < rng.uniform(0.03, 0.07)] = _palette(rng, (0.55, 0.55, 0.55), 0.05)
        else:  # farmland: rectangular fields in two tones
            k = rng.integers(3, 6)
            f = ((np.floor(x * k) + np.floor(y * k)) % 2).astype(np.float32)[..., None]
            img = f * _palette(rng, (0.7, 0.6, 0.3), 0.05) + (1 - f) * _palette(rng, (0.4, 0.55, 0.2), 0.05)
    elif domain == "DTD":  # grey-scale-ish textures
        c1, c2 = _palette(rng, (0.8, 0.8, 0.75), 0.1), _palette(rng, (0.2, 0.2, 0.25), 0.1)
        f = rng.uniform(3, 7)
        if cls == 0:
            m = (np.floor(x * f) + np.floor(y * f)) % 2 == 0
        elif cls == 1:
            m = ((x * f) % 1 - 0.5) ** 2 + ((y * f) % 1 - 0.5) ** 2 < 0.08
        elif cls == 2:
            m = ((y * f + 0.5 * np.abs(((x * f * 2) % 2) - 1)) % 1) < 0.5
        else:
            a = rng.uniform(0, math.pi)
            m = ((x * math.cos(a) + y * math.sin(a)) * f) % 1 < 0.5
        img = np.where(m[..., None], c1, c2).astype(np.float32)
    elif domain == "Caltech101":  # one coloured shape on a light background
        img = np.ones((n, n, 3), np.float32) * _palette(rng, (0.92, 0.92, 0.9), 0.03)
        col = rng.random(3).astype(np.float32) * 0.8
        cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.18, 0.3)
        if cls == 0:
            m = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        elif cls == 1:
            m = (np.abs(y - cy) < r * 0.85) & (np.abs(x - cx) < r * 0.85)
        elif cls == 2:
            m = (y - cy > -r) & (y - cy < r) & (np.abs(x - cx) < (y - cy + r) / 2)
        else:
            m = ((np.abs(y - cy) < r) & (np.abs(x - cx) < r / 3.5)) | (
                (np.abs(x - cx) < r) & (np.abs(y - cy) < r / 3.5)
            )
        img[m] = col
    elif domain == "Food":  # a white plate with food-coloured blobs
        img = np.ones((n, n, 3), np.float32) * _palette(rng, (0.45, 0.3, 0.2), 0.05)
        plate = (y - 0.5) ** 2 + (x - 0.5) ** 2 < 0.2
        img[plate] = _palette(rng, (0.95, 0.95, 0.95), 0.02)
        base = [(0.85, 0.15, 0.1), (0.95, 0.85, 0.2), (0.3, 0.75, 0.2), (0.7, 0.5, 0.25)][cls]
        shape = [(0.12, 0.12), (0.06, 0.22), (0.16, 0.1), (0.14, 0.18)][cls]
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
            ry, rx = shape[0] * rng.uniform(0.7, 1.3), shape[1] * rng.uniform(0.7, 1.3)
            img[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1] = _palette(rng, base, 0.06)
    else:
        raise ValueError(domain)
    img = img + rng.normal(0, 0.04, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _save(path: str, img: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(path, format="JPEG", quality=95)


# ------------------------------------------------------------------ folder layouts


def write_dataset(root: str, domain: str, n_train: int, n_test: int, seed: int) -> None:
    """Write ``domain``'s images in its torchvision layout (train and test images per class)."""
    rng = np.random.default_rng(seed)
    classes = DOMAINS[domain]
    per_class = n_train + n_test
    if domain == "EuroSAT":  # one folder; the loader's 80/20 split makes train/test
        for ci, (folder, _) in enumerate(classes):
            for i in range(per_class):
                _save(os.path.join(root, "eurosat", "2750", folder, f"{folder}_{i + 1}.jpg"), draw(domain, ci, rng))
    elif domain == "Caltech101":
        # torchvision drops this clutter class; the real archive has it, so the reader expects it
        _save(
            os.path.join(root, "caltech101", "101_ObjectCategories", "BACKGROUND_Google", "image_0001.jpg"),
            rng.random((IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
        )
        for ci, (folder, _) in enumerate(classes):
            for i in range(per_class):
                _save(
                    os.path.join(root, "caltech101", "101_ObjectCategories", folder, f"image_{i + 1:04d}.jpg"),
                    draw(domain, ci, rng),
                )
    elif domain == "DTD":
        base = os.path.join(root, "dtd", "dtd")
        split_lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for ci, (folder, _) in enumerate(classes):
            for i in range(per_class):
                name = f"{folder}_{i + 1:04d}.jpg"
                _save(os.path.join(base, "images", folder, name), draw(domain, ci, rng))
                split_lines["train" if i < n_train else "test"].append(f"{folder}/{name}")
        os.makedirs(os.path.join(base, "labels"), exist_ok=True)
        for split, lines in split_lines.items():
            with open(os.path.join(base, "labels", f"{split}1.txt"), "w") as f:
                f.write("".join(line + "\n" for line in lines))
    elif domain == "Food":
        base = os.path.join(root, "food-101")
        meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
        for ci, (folder, _) in enumerate(classes):
            for i in range(per_class):
                _save(os.path.join(base, "images", folder, f"{i + 1}.jpg"), draw(domain, ci, rng))
                meta["train" if i < n_train else "test"].setdefault(folder, []).append(f"{folder}/{i + 1}")
        os.makedirs(os.path.join(base, "meta"), exist_ok=True)
        for split, m in meta.items():
            with open(os.path.join(base, "meta", f"{split}.json"), "w") as f:
                json.dump(m, f)
    else:
        raise ValueError(f"no synthetic layout for {domain!r}")


def classnames(domain: str) -> list[str]:
    """Class names in the order torchvision's reader numbers the classes (sorted folder names)."""
    pairs = DOMAINS[domain]
    return [name for _, name in sorted(pairs, key=lambda p: p[0])]


def _class_index_in_reader(domain: str, ci: int) -> int:
    folders = sorted(f for f, _ in DOMAINS[domain])
    return folders.index(DOMAINS[domain][ci][0])


# ------------------------------------------------------------------ tiny CLIP


def register_model_config(out_dir: str) -> None:
    """Make ``SYN_MODEL_NAME`` known to open_clip (a JSON config file in ``out_dir``)."""
    import open_clip

    cfg_dir = os.path.join(out_dir, "model_configs")
    os.makedirs(cfg_dir, exist_ok=True)
    path = os.path.join(cfg_dir, f"{SYN_MODEL_NAME}.json")
    with open(path, "w") as f:
        json.dump(MODEL_CONFIG, f)
    open_clip.add_model_config(path)


def pretrain_tiny_clip(out_dir: str, steps: int, seed: int, progress: bool = False) -> str:
    """Pre-train the tiny CLIP contrastively on fresh procedural images with generic captions;
    returns the path of the saved safetensors checkpoint."""
    import open_clip
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    register_model_config(out_dir)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(SYN_MODEL_NAME, pretrained=None)
    tok = open_clip.get_tokenizer(SYN_MODEL_NAME)
    mean = torch.tensor(
        model.visual.preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), dtype=torch.float32
    ).view(1, 3, 1, 1)
    std = torch.tensor(
        model.visual.preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), dtype=torch.float32
    ).view(1, 3, 1, 1)
    rng = np.random.default_rng(seed + 1)
    captions = ["a photo of a {}.", "a picture of the {}.", "{}"]
    pairs = [(d, ci) for d in DOMAINS for ci in range(len(DOMAINS[d]))]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    model.train()
    batch = 48
    for step in tqdm(range(steps), desc="pre-train tiny CLIP", disable=not progress, leave=False):
        picks = rng.integers(len(pairs), size=batch)
        x = torch.from_numpy(np.stack([draw(*pairs[p], rng) for p in picks])).permute(0, 3, 1, 2).float()
        x = ((x - mean) / std).float()
        # one caption per class and step (every class is in the text batch): cheap and contrastive
        cap = captions[int(rng.integers(len(captions)))]
        texts = tok([cap.format(DOMAINS[d][ci][1]) for d, ci in pairs])
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        fi = F.normalize(model.encode_image(x), dim=-1)
        ft = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp() * fi @ ft.t()  # [batch, classes]
        y = torch.as_tensor(picks, dtype=torch.long)
        present = torch.unique(y)
        onehot = F.one_hot(y, len(pairs)).float()[:, present]
        # image -> caption and caption -> its images (multi-positive)
        loss_t = F.cross_entropy(logits[:, present].t(), (onehot / onehot.sum(0, keepdim=True)).t())
        loss = (F.cross_entropy(logits, y) + loss_t) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = os.path.join(out_dir, "tiny_clip_pretrained.safetensors")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
    return path


@dataclass
class SyntheticSetup:
    data_root: str
    model_name: str
    checkpoint: str
    tasks: tuple[str, ...]
    classnames: dict[str, list[str]]


def prepare(
    out_dir: str,
    *,
    n_tasks: int = 4,
    n_train: int = 40,
    n_test: int = 20,
    pretrain_steps: int = 60,
    seed: int = 0,
    progress: bool = False,
) -> SyntheticSetup:
    """Write the synthetic data and the pre-trained tiny CLIP under ``out_dir`` (idempotent: a
    finished preparation, marked by ``READY.json``, is reused as is, so reruns see the same data)."""
    tasks = SYNTHETIC_ORDER[:n_tasks]
    marker = os.path.join(out_dir, "READY.json")
    want = {"tasks": list(tasks), "n_train": n_train, "n_test": n_test, "pretrain_steps": pretrain_steps, "seed": seed}
    ckpt = os.path.join(out_dir, "tiny_clip_pretrained.safetensors")
    data_root = os.path.join(out_dir, "data")
    if os.path.exists(marker):
        with open(marker) as f:
            have = json.load(f)
        if have != want:
            raise ValueError(f"{out_dir!r} holds synthetic data made with {have}, not {want}; use another directory")
        register_model_config(out_dir)
    else:
        for i, d in enumerate(tasks):
            write_dataset(data_root, d, n_train, n_test, seed=seed * 1000 + i)
        pretrain_tiny_clip(out_dir, pretrain_steps, seed, progress)
        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump(want, f)
        os.replace(tmp, marker)
    return SyntheticSetup(data_root, SYN_MODEL_NAME, ckpt, tasks, {d: classnames(d) for d in tasks})
