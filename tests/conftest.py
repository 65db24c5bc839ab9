"""Shared fixtures: small random-init open_clip models and a synthetic labelled set."""

from __future__ import annotations

import pytest
from synthetic import CLASS_NAMES, make_dataset
from torch.utils.data import TensorDataset

import saft

ARCHS = ("saft-tiny-vit", "saft-tiny-rn")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def loaded(arch) -> saft.LoadedModel:
    return saft.load_model(arch, seed=0)


@pytest.fixture
def vit() -> saft.LoadedModel:
    return saft.load_model("saft-tiny-vit", seed=0)


@pytest.fixture
def dataset() -> TensorDataset:
    return make_dataset()


@pytest.fixture
def prompts(loaded) -> saft.ClassPrompts:
    return saft.ClassPrompts.build(loaded.tokenizer, CLASS_NAMES, ["a photo of a {}.", "a drawing of a {}."])


@pytest.fixture
def vit_prompts(vit) -> saft.ClassPrompts:
    return saft.ClassPrompts.build(vit.tokenizer, CLASS_NAMES, ["a photo of a {}."])
