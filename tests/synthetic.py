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
