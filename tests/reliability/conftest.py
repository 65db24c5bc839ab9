"""Fixtures for the reliability tests: a small ImageFolder tree with distinct images per file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from image_trees import write_tree

torch.set_num_threads(1)  # the test machine is shared


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "tree", size=(16, 16))
