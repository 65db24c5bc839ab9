"""Fixture trees in the real layouts of the CoOp benchmark's datasets and of ImageNet.

Each tree uses the dataset's real file names (split_zhou JSON file and image folder,
FGVC-Aircraft's text lists, ImageNet's train/val wnid folders) with made-up classes and
a few tiny images, under a data root in the folders ``saft.eval.suites.DEFAULT_FOLDERS``
names, so suites and adapters find them where they find the real data.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from image_trees import write_image as _patterned
from PIL import Image


def write_image(path: Path, seed: int, fmt: str = "PNG") -> Path:
    """A tiny lossless image unique for every seed below 65536 (``image_trees``' pattern repeats after 256)."""
    _patterned(path, seed % 256, fmt=fmt)
    image = Image.open(path).convert("RGB")
    image.putpixel((0, 0), (seed % 256, seed // 256 % 256, 255))
    image.save(path, format=fmt)
    return path

# name -> (split file, image folder, the prompt its spec gives)
SPLIT_JSON_SETS = {
    "caltech101": ("split_zhou_Caltech101.json", "101_ObjectCategories", "a photo of a {}."),
    "oxford_pets": ("split_zhou_OxfordPets.json", "images", "a photo of a {}, a type of pet."),
    "stanford_cars": ("split_zhou_StanfordCars.json", "", "a photo of a {}."),
    "oxford_flowers": ("split_zhou_OxfordFlowers.json", "jpg", "a photo of a {}, a type of flower."),
    "food101": ("split_zhou_Food101.json", "images", "a photo of a {}, a type of food."),
    "sun397": ("split_zhou_SUN397.json", "SUN397", "a photo of a {}."),
    "dtd": ("split_zhou_DescribableTextures.json", "images", "{} texture."),
    "eurosat": ("split_zhou_EuroSAT.json", "2750", "a centered satellite photo of {}."),
    "ucf101": ("split_zhou_UCF101.json", "UCF-101-midframes", "a photo of a person doing {}."),
}
CLASSES = ("apple", "boat", "chair", "dog")


def write_split_json_set(root: Path, name: str, per_split: dict[str, int], seed: int = 0) -> Path:
    """``name``'s layout with CLASSES, ``per_split[split]`` images per class in each split."""
    split_file, image_dir, _ = SPLIT_JSON_SETS[name]
    records: dict[str, list] = {}
    for split, count in per_split.items():
        records[split] = []
        for label, cls in enumerate(CLASSES):
            for i in range(count):
                rel = f"{cls}/{split}_{i}.png"
                write_image(root / image_dir / rel if image_dir else root / rel, seed)
                records[split].append([rel, label, cls])
                seed += 1
    root.mkdir(parents=True, exist_ok=True)
    (root / split_file).write_text(json.dumps(records))
    return root


def write_aircraft(root: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """FGVC-Aircraft's layout: variants.txt, images_variant_<split>.txt, images/<id>.jpg."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "variants.txt").write_text("\n".join(CLASSES) + "\n")
    number = 1_000_000
    for split, count in per_split.items():
        lines = []
        for cls in CLASSES:
            for _ in range(count):
                write_image(root / "images" / f"{number}.jpg", seed, fmt="JPEG")  # the lists name .jpg files
                lines.append(f"{number} {cls}")
                number, seed = number + 1, seed + 1
        (root / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def imagenet_wnids() -> list[str]:
    return sorted(resources.files("timm.data").joinpath("_info", "imagenet_synsets.txt").read_text().split())


def write_imagenet(root: Path, train_per_class: int, val_wnids: list[str], seed: int = 0) -> Path:
    """ImageNet's layout: train/<wnid>/ for all 1000 classes, val/<wnid>/ for ``val_wnids``."""
    for wnid in imagenet_wnids():
        for i in range(train_per_class):
            write_image(root / "train" / wnid / f"{wnid}_{i}.png", seed)
            seed += 1
    for wnid in val_wnids:
        write_image(root / "val" / wnid / f"ILSVRC2012_val_{seed:08d}.png", seed)
        seed += 1
    return root
