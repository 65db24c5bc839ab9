"""A word-level tokenizer for the embedded tiny CLIP.

With the 49k-token BPE vocabulary most of a tiny model's parameters would sit in a token
embedding whose rows are never used; the embedded world's captions need a few dozen
words. Ids: 0 pad, 1 start, 2 end, then the words in the order given.
"""

from __future__ import annotations

import re

import torch

PAD, SOT, EOT = 0, 1, 2
_WORD = re.compile(r"[a-z0-9]+")


class WordTokenizer:
    def __init__(self, words: list[str], context_length: int = 8):
        if len(set(words)) != len(words):
            raise ValueError("tokenizer words must be unique")
        self.words = list(words)
        self.context_length = context_length
        self.ids = {w: i + 3 for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 3

    def encode(self, text: str) -> list[int]:
        tokens = []
        for word in _WORD.findall(text.lower()):
            if word not in self.ids:
                raise ValueError(
                    f"word {word!r} in {text!r} is not in the tiny model's vocabulary; "
                    f"use prompts made of: {', '.join(self.words)}"
                )
            tokens.append(self.ids[word])
        body = tokens[: self.context_length - 2]
        return [SOT, *body, EOT]

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.full((len(texts), length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)[:length]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
