"""The eleven MTIL datasets in the folder layout the MTIL community uses (ZSCL, MoE-Adapters, ConDU).

Every dataset is read with torchvision's own reader (``download=False``: nothing is ever fetched),
so the folders below are exactly torchvision's::

    DATA_ROOT/
      fgvc-aircraft-2013b/   Aircraft       (split "train" / "test", variant level, as the released code)
      caltech101/            Caltech101     (101_ObjectCategories/; 80/20 random split, seed 42)
      cifar-100-python/      CIFAR100       (train / test)
      dtd/                   DTD            (dtd/images, dtd/labels; partition 1 train / test)
      eurosat/               EuroSAT        (2750/<Class>/*.jpg; 80/20 random split, seed 42)
      flowers-102/           Flowers        (jpg/, imagelabels.mat, setid.mat; train / test)
      food-101/              Food           (images/, meta/{train,test}.json)
      MNIST/                 MNIST          (raw/*-ubyte)
      oxford-iiit-pet/       OxfordPet      (images/, annotations/; trainval / test)
      stanford_cars/         StanfordCars   (cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat)
      SUN397/                SUN397         (<letter>/<scene>/...; 80/20 random split, seed 42)

Class names and CLIP prompt templates are those of the released MTIL code. A missing folder raises
:class:`DatasetMissingError` naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from condu_merge.errors import ConduError

MTIL_ORDER: tuple[str, ...] = (
    "Aircraft",
    "Caltech101",
    "CIFAR100",
    "DTD",
    "EuroSAT",
    "Flowers",
    "Food",
    "MNIST",
    "OxfordPet",
    "StanfordCars",
    "SUN397",
)
"""Order I (alphabetical), the paper's main order."""

ORDER_II: tuple[str, ...] = (
    "StanfordCars",
    "Food",
    "MNIST",
    "OxfordPet",
    "Flowers",
    "SUN397",
    "Aircraft",
    "Caltech101",
    "DTD",
    "EuroSAT",
    "CIFAR100",
)
"""The paper's appendix C order."""

ORDERS = {"alphabetical": MTIL_ORDER, "order1": MTIL_ORDER, "order2": ORDER_II}

FOLDERS: dict[str, str] = {
    "Aircraft": "fgvc-aircraft-2013b",
    "Caltech101": "caltech101",
    "CIFAR100": "cifar-100-python",
    "DTD": "dtd",
    "EuroSAT": "eurosat",
    "Flowers": "flowers-102",
    "Food": "food-101",
    "MNIST": "MNIST",
    "OxfordPet": "oxford-iiit-pet",
    "StanfordCars": "stanford_cars",
    "SUN397": "SUN397",
}

# Per-dataset fine-tuning learning rates of the released scripts (MTIL_FT.sh).
FT_LR: dict[str, float] = {name: (5e-5 if name in ("Aircraft", "MNIST") else 1e-5) for name in MTIL_ORDER}


class DatasetMissingError(ConduError, FileNotFoundError):
    """A dataset folder (or a file inside it) is not where the MTIL layout puts it."""


def _t(*patterns: str) -> list[str]:
    return list(patterns)


CIFAR_TEMPLATES = _t(
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

TEMPLATES: dict[str, list[str]] = {
    "Aircraft": _t("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
    "Caltech101": _t(
        "a photo of a {}.",
        "a painting of a {}.",
        "a plastic {}.",
        "a sculpture of a {}.",
        "a sketch of a {}.",
        "a tattoo of a {}.",
        "a toy {}.",
        "a rendition of a {}.",
        "a embroidered {}.",
        "a cartoon {}.",
        "a {} in a video game.",
        "a plushie {}.",
        "a origami {}.",
        "art of a {}.",
        "graffiti of a {}.",
        "a drawing of a {}.",
        "a doodle of a {}.",
        "a photo of the {}.",
        "a painting of the {}.",
        "the plastic {}.",
        "a sculpture of the {}.",
        "a sketch of the {}.",
        "a tattoo of the {}.",
        "the toy {}.",
        "a rendition of the {}.",
        "the embroidered {}.",
        "the cartoon {}.",
        "the {} in a video game.",
        "the plushie {}.",
        "the origami {}.",
        "art of the {}.",
        "graffiti of the {}.",
        "a drawing of the {}.",
        "a doodle of the {}.",
    ),
    "CIFAR100": CIFAR_TEMPLATES,
    "DTD": _t(
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ),
    "EuroSAT": _t(
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ),
    "Flowers": _t("a photo of a {}, a type of flower."),
    "Food": _t("a photo of a {}, a type of food."),
    "MNIST": _t('a photo of the number: "{}".'),
    "OxfordPet": _t("a photo of a {}, a type of pet."),
    "StanfordCars": _t(
        "a photo of a {}, a type of car.",
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "SUN397": _t("a photo of a {}.", "a photo of the {}."),
}

CALTECH101_CLASSNAMES = [
    "off-center face",
    "centered face",
    "leopard",
    "motorbike",
    "accordion",
    "airplane",
    "anchor",
    "ant",
    "barrel",
    "bass",
    "beaver",
    "binocular",
    "bonsai",
    "brain",
    "brontosaurus",
    "buddha",
    "butterfly",
    "camera",
    "cannon",
    "side of a car",
    "ceiling fan",
    "cellphone",
    "chair",
    "chandelier",
    "body of a cougar cat",
    "face of a cougar cat",
    "crab",
    "crayfish",
    "crocodile",
    "head of a  crocodile",
    "cup",
    "dalmatian",
    "dollar bill",
    "dolphin",
    "dragonfly",
    "electric guitar",
    "elephant",
    "emu",
    "euphonium",
    "ewer",
    "ferry",
    "flamingo",
    "head of a flamingo",
    "garfield",
    "gerenuk",
    "gramophone",
    "grand piano",
    "hawksbill",
    "headphone",
    "hedgehog",
    "helicopter",
    "ibis",
    "inline skate",
    "joshua tree",
    "kangaroo",
    "ketch",
    "lamp",
    "laptop",
    "llama",
    "lobster",
    "lotus",
    "mandolin",
    "mayfly",
    "menorah",
    "metronome",
    "minaret",
    "nautilus",
    "octopus",
    "okapi",
    "pagoda",
    "panda",
    "pigeon",
    "pizza",
    "platypus",
    "pyramid",
    "revolver",
    "rhino",
    "rooster",
    "saxophone",
    "schooner",
    "scissors",
    "scorpion",
    "sea horse",
    "snoopy (cartoon beagle)",
    "soccer ball",
    "stapler",
    "starfish",
    "stegosaurus",
    "stop sign",
    "strawberry",
    "sunflower",
    "tick",
    "trilobite",
    "umbrella",
    "watch",
    "water lilly",
    "wheelchair",
    "wild cat",
    "windsor chair",
    "wrench",
    "yin and yang symbol",
]

EUROSAT_CLASSNAMES = [
    "annual crop land",
    "forest",
    "brushland or shrubland",
    "highway or road",
    "industrial buildings or commercial buildings",
    "pasture land",
    "permanent crop land",
    "residential buildings or homes or apartments",
    "river",
    "lake or sea",
]

FLOWERS_CLASSNAMES = [
    "pink primrose",
    "hard-leaved pocket orchid",
    "canterbury bells",
    "sweet pea",
    "english marigold",
    "tiger lily",
    "moon orchid",
    "bird of paradise",
    "monkshood",
    "globe thistle",
    "snapdragon",
    "colt's foot",
    "king protea",
    "spear thistle",
    "yellow iris",
    "globe-flower",
    "purple coneflower",
    "peruvian lily",
    "balloon flower",
    "giant white arum lily",
    "fire lily",
    "pincushion flower",
    "fritillary",
    "red ginger",
    "grape hyacinth",
    "corn poppy",
    "prince of wales feathers",
    "stemless gentian",
    "artichoke",
    "sweet william",
    "carnation",
    "garden phlox",
    "love in the mist",
    "mexican aster",
    "alpine sea holly",
    "ruby-lipped cattleya",
    "cape flower",
    "great masterwort",
    "siam tulip",
    "lenten rose",
    "barbeton daisy",
    "daffodil",
    "sword lily",
    "poinsettia",
    "bolero deep blue",
    "wallflower",
    "marigold",
    "buttercup",
    "oxeye daisy",
    "common dandelion",
    "petunia",
    "wild pansy",
    "primula",
    "sunflower",
    "pelargonium",
    "bishop of llandaff",
    "gaura",
    "geranium",
    "orange dahlia",
    "pink-yellow dahlia",
    "cautleya spicata",
    "japanese anemone",
    "black-eyed susan",
    "silverbush",
    "californian poppy",
    "osteospermum",
    "spring crocus",
    "bearded iris",
    "windflower",
    "tree poppy",
    "gazania",
    "azalea",
    "water lily",
    "rose",
    "thorn apple",
    "morning glory",
    "passion flower",
    "lotus",
    "toad lily",
    "anthurium",
    "frangipani",
    "clematis",
    "hibiscus",
    "columbine",
    "desert-rose",
    "tree mallow",
    "magnolia",
    "cyclamen",
    "watercress",
    "canna lily",
    "hippeastrum",
    "bee balm",
    "ball moss",
    "foxglove",
    "bougainvillea",
    "camellia",
    "mallow",
    "mexican petunia",
    "bromelia",
    "blanket flower",
    "trumpet creeper",
    "blackberry lily",
]

FIXED_CLASSNAMES: dict[str, list[str]] = {
    "Caltech101": CALTECH101_CLASSNAMES,
    "EuroSAT": EUROSAT_CLASSNAMES,
    "Flowers": FLOWERS_CLASSNAMES,
}


def clean_classname(name: str) -> str:
    """``underline_to_space`` of the released code."""
    return name.replace("_", " ")


@dataclass
class MTILDataset:
    """One task: its train and test sets (items ``(image tensor, label)``), class names and templates."""

    name: str
    train: Dataset
    test: Dataset
    classnames: list[str]
    templates: list[str]
    train_labels: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))
    test_labels: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=np.int64))

    def prompts(self, template_index: int | None = None) -> list[list[str]]:
        """``prompts[c]``: the class's prompts (every template, or only ``template_index``)."""
        temps = self.templates if template_index is None else [self.templates[template_index]]
        return [[t.format(c) for t in temps] for c in self.classnames]


def dataset_labels(ds: Dataset) -> np.ndarray:
    """Labels of a torchvision dataset (or a ``Subset`` of one) without decoding any image."""
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    for attr in ("_labels", "targets", "y"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    if hasattr(ds, "_samples"):  # StanfordCars
        return np.asarray([s[1] for s in ds._samples], dtype=np.int64)
    if hasattr(ds, "samples"):
        return np.asarray([s[1] for s in ds.samples], dtype=np.int64)
    raise TypeError(f"cannot read labels of {type(ds).__name__} without loading images")


def random_split_80_20(ds: Dataset, seed: int = 42) -> tuple[Subset, Subset]:
    """The released code's split of datasets without an official one (80 % train, generator seed 42)."""
    n_train = int(0.8 * len(ds))
    tr, te = torch.utils.data.random_split(
        ds, [n_train, len(ds) - n_train], generator=torch.Generator().manual_seed(seed)
    )
    return tr, te


def few_shot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` training indices per class drawn without replacement (all of a class if it has fewer)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(rng.choice(idx, size=min(shots, idx.size), replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def _require(root: str, name: str, *inner: str) -> str:
    folder = os.path.join(root, FOLDERS[name])
    if not os.path.isdir(folder):
        raise DatasetMissingError(
            f"{name}: folder {folder!r} is missing; MTIL expects {FOLDERS[name]!r} under the data root "
            f"{root!r} (see docs/mtil.md for the layout)"
        )
    for sub in inner:
        p = os.path.join(folder, sub)
        if not os.path.exists(p):
            raise DatasetMissingError(f"{name}: {p!r} is missing inside {folder!r} (see docs/mtil.md for the layout)")
    return folder


def _build(name: str, root: str, train_tf: Callable, test_tf: Callable):
    """(train, test, torchvision classnames or None) with torchvision readers; ``download=False``."""
    from torchvision import datasets as tvd

    if name == "Aircraft":
        _require(root, name, "data")
        # torchvision looks for ROOT/fgvc-aircraft-2013b/data
        return (
            tvd.FGVCAircraft(root, split="train", transform=train_tf),
            tvd.FGVCAircraft(root, split="test", transform=test_tf),
            None,
        )
    if name == "Caltech101":
        _require(root, name, "101_ObjectCategories")
        tr_full = tvd.Caltech101(root, transform=train_tf)
        te_full = tvd.Caltech101(root, transform=test_tf)
        tr, _ = random_split_80_20(tr_full)
        _, te = random_split_80_20(te_full)
        return tr, te, [clean_classname(c) for c in tr_full.categories]
    if name == "CIFAR100":
        _require(root, name, "train", "test", "meta")
        tr = tvd.CIFAR100(root, train=True, transform=train_tf)
        return tr, tvd.CIFAR100(root, train=False, transform=test_tf), None
    if name == "DTD":
        _require(root, name, "dtd/images", "dtd/labels")
        return tvd.DTD(root, split="train", transform=train_tf), tvd.DTD(root, split="test", transform=test_tf), None
    if name == "EuroSAT":
        _require(root, name, "2750")
        tr_full, te_full = tvd.EuroSAT(root, transform=train_tf), tvd.EuroSAT(root, transform=test_tf)
        tr, _ = random_split_80_20(tr_full)
        _, te = random_split_80_20(te_full)
        return tr, te, [re.sub(r"(\w)([A-Z])", r"\1 \2", clean_classname(c)) for c in tr_full.classes]
    if name == "Flowers":
        _require(root, name, "jpg", "imagelabels.mat", "setid.mat")
        return (
            tvd.Flowers102(root, split="train", transform=train_tf),
            tvd.Flowers102(root, split="test", transform=test_tf),
            None,
        )
    if name == "Food":
        _require(root, name, "images", "meta")
        return (
            tvd.Food101(root, split="train", transform=train_tf),
            tvd.Food101(root, split="test", transform=test_tf),
            None,
        )
    if name == "MNIST":
        _require(root, name, "raw")
        return tvd.MNIST(root, train=True, transform=train_tf), tvd.MNIST(root, train=False, transform=test_tf), None
    if name == "OxfordPet":
        _require(root, name, "images", "annotations")
        return (
            tvd.OxfordIIITPet(root, split="trainval", transform=train_tf),
            tvd.OxfordIIITPet(root, split="test", transform=test_tf),
            None,
        )
    if name == "StanfordCars":
        _require(root, name)
        return (
            tvd.StanfordCars(root, split="train", transform=train_tf),
            tvd.StanfordCars(root, split="test", transform=test_tf),
            None,
        )
    if name == "SUN397":
        _require(root, name)
        tr_full, te_full = tvd.SUN397(root, transform=train_tf), tvd.SUN397(root, transform=test_tf)
        tr, _ = random_split_80_20(tr_full)
        _, te = random_split_80_20(te_full)
        return tr, te, [clean_classname(c) for c in tr_full.classes]
    raise ValueError(f"unknown MTIL dataset {name!r}; choose from {list(MTIL_ORDER)}")


def _tv_classes(ds: Dataset) -> list[str]:
    base = ds.dataset if isinstance(ds, Subset) else ds
    return [clean_classname(str(c)) for c in base.classes]


def load_mtil_dataset(
    name: str,
    root: str,
    train_transform: Callable,
    test_transform: Callable,
    *,
    classnames: Sequence[str] | None = None,
    few_shot: int = 0,
    few_shot_seed: int = 0,
) -> MTILDataset:
    """Open dataset ``name`` under ``root`` with its standard splits, class names and templates.

    ``classnames`` overrides the released code's names (the synthetic data has its own classes);
    ``few_shot > 0`` keeps that many training images per class (drawn with ``few_shot_seed``).
    A reader error (a corrupt or incomplete folder) is re-raised naming the dataset and folder.
    """
    if name not in FOLDERS:
        raise ValueError(f"unknown MTIL dataset {name!r}; choose from {list(MTIL_ORDER)}")
    try:
        train, test, tv_names = _build(name, root, train_transform, test_transform)
    except DatasetMissingError:
        raise
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise DatasetMissingError(f"{name}: cannot read {os.path.join(root, FOLDERS[name])!r}: {e}") from e
    if classnames is not None:
        names = list(classnames)
    elif name in FIXED_CLASSNAMES:
        names = list(FIXED_CLASSNAMES[name])
    elif tv_names is not None:
        names = tv_names
    else:
        names = _tv_classes(train)
    train_labels = dataset_labels(train)
    test_labels = dataset_labels(test)
    n_cls = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    if n_cls > len(names):
        raise DatasetMissingError(f"{name}: labels go up to {n_cls - 1} but only {len(names)} class names are known")
    if few_shot > 0:
        idx = few_shot_indices(train_labels, few_shot, few_shot_seed)
        train = Subset(train, idx.tolist())
        train_labels = train_labels[idx]
    return MTILDataset(name, train, test, names, list(TEMPLATES[name]), train_labels, test_labels)
