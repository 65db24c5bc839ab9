"""The embedded tiny CLIP: its architecture, vocabulary and the checkpoint shipped with it.

``load_model("tiny")`` loads the checkpoint pre-trained on the embedded world (see
``saft pretrain``); ``saft-tiny-clip@random`` is the same architecture, untrained.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCH = "saft-tiny-clip"
TINY_DIR = Path(__file__).parent / "tiny"
CHECKPOINT = TINY_DIR / "saft-tiny-clip.safetensors"
# The learning rates `saft benchmark synthshift` chose on the world's ID validation split: this
# model's default rates everywhere (saft.sparse.trainer.default_lr).
RECIPE = TINY_DIR / "recipe.json"
CONTEXT_LENGTH = 8
# Caption words of the embedded world plus common prompt words. The order fixes the
# token ids: append, never reorder (the shipped checkpoint depends on it).
VOCABULARY = ["a", "an", "the", "of", "photo", "sketch", "cartoon", "drawing", "picture", "image",
              "blue", "cyan", "green", "orange", "pink", "purple", "red", "yellow",
              "circle", "square", "triangle", "star", "cross", "heart", "ring", "hexagon", "arrow", "crescent"]


def tiny_tokenizer():
    from saft.models.tokenizer import WordTokenizer

    return WordTokenizer(VOCABULARY, CONTEXT_LENGTH)


def recipe_lr(model_spec) -> dict[str, float] | None:
    """The shipped model's learning rates per method, when ``model_spec`` names the shipped checkpoint."""
    text = str(model_spec).strip()
    if text != "tiny" and not text.endswith("@" + str(CHECKPOINT)):
        return None
    try:
        return {m: float(v) for m, v in json.loads(RECIPE.read_text())["chosen_lr"].items()}
    except (OSError, ValueError, KeyError):
        return None
