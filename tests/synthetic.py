"""Synthetic data for the tests: no downloads, deterministic."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

CLASS_NAMES = ("circle", "square", "star", "heart")


def make_dataset(n: int = 32, num_classes: int = len(CLASS_NAMES), seed: int = 0) -> TensorDataset:
    """Images whose mean colour depends on the class, so there is signal to fit."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randn(n, 3, 32, 32, generator=gen) * 0.5
    images[:, 0] += (labels.float() / num_classes)[:, None, None] * 2 - 1
    return TensorDataset(images, labels)


def batches(dataset: TensorDataset, batch_size: int):
    return list(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False))


_ADJECTIVES = ("red", "blue", "green", "tiny", "giant", "striped", "spotted", "wild", "silver", "golden",
               "wooden", "frozen", "ancient", "modern", "soft", "sharp", "round", "square", "dark", "bright",
               "quiet", "noisy", "heavy", "light", "old")
_NOUNS = ("fox", "owl", "boat", "lamp", "chair", "drum", "kite", "frog", "train", "bell",
          "shark", "tulip", "violin", "rocket", "teapot", "zebra", "cactus", "anchor", "castle", "pepper",
          "spider", "candle", "helmet", "otter", "wagon", "falcon", "piano", "oyster", "tiger", "walrus",
          "lemon", "mitten", "robot", "saddle", "turtle", "yacht", "badger", "cobra", "donkey", "goose")


def many_class_names(n: int) -> list[str]:
    """``n`` distinct multi-word class names (ImageNet-like: 1000 of them fit), deterministic."""
    names = [f"{a} {b}" for b in _NOUNS for a in _ADJECTIVES]
    names += [f"{a} {b} {c}" for c in _NOUNS for b in _NOUNS for a in _ADJECTIVES[:3]]
    if n > len(names):
        raise ValueError(f"at most {len(names)} generated class names")
    return names[:n]
