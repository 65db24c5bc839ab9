"""The embedded tiny CLIP: its architecture, vocabulary and the checkpoint shipped with it.

``load_model("tiny")`` loads the checkpoint pre-trained on the embedded world (see
``saft pretrain``); ``saft-tiny-clip@random`` is the same architecture, untrained.
"""

from __future__ import annotations

from pathlib import Path

from saft.models.tokenizer import WordTokenizer

ARCH = "saft-tiny-clip"
TINY_DIR = Path(__file__).parent / "tiny"
CHECKPOINT = TINY_DIR / "saft-tiny-clip.safetensors"
CONTEXT_LENGTH = 8
# Caption words of the embedded world plus common prompt words. The order fixes the
# token ids: append, never reorder (the shipped checkpoint depends on it).
VOCABULARY = ["a", "an", "the", "of", "photo", "sketch", "cartoon", "drawing", "picture", "image",
              "blue", "cyan", "green", "orange", "pink", "purple", "red", "yellow",
              "circle", "square", "triangle", "star", "cross", "heart", "ring", "hexagon", "arrow", "crescent"]


def tiny_tokenizer() -> WordTokenizer:
    return WordTokenizer(VOCABULARY, CONTEXT_LENGTH)
