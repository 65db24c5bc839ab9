"""The methods the embedded world's protocols compare, and their learning-rate grids (light: no torch).

Each trained method's grid spans the rates its kind of training needs on the tiny model
(full fine-tuning and LP-FT's second stage move every weight: small rates; a mask's few
values or LoRA's factors: larger ones); ``saft benchmark synthshift`` chooses each
method's rate from its own grid on the ID validation split. WiSE-FT trains nothing: it
is full fine-tuning's delta at the alpha chosen on the same split.

The rule for a grid: when a method's best rate sits at an end of its grid on most seeds'
validation splits, the grid moves half a decade that way. On synthshift-v1, LP-FT (started
at full fine-tuning's 1e-5 to 3e-4) chose 3e-4 and moved up. On synthshift-v2's first
benchmark (2026-12-05) LoRA chose 3e-3 and the random mask 1e-2 on every seed (the top
ends) and LP-FT 3e-5 on two seeds of three (the bottom): their grids moved, LP-FT's back to
full fine-tuning's. SAFT's and full fine-tuning's choices sat inside their grids. Only
validation accuracy moves a grid, never test numbers.
"""

from __future__ import annotations

from saft.steps.configs import WISEFT

DEFAULT_GRIDS = {"full": [1e-5, 3e-5, 1e-4, 3e-4], "saft": [3e-4, 1e-3, 3e-3, 1e-2],
                 "random": [1e-3, 3e-3, 1e-2, 3e-2], "lora": [3e-4, 1e-3, 3e-3, 1e-2],
                 "lpft": [1e-5, 3e-5, 1e-4, 3e-4]}
METHODS = ("full", "saft", "random", "lora", "lpft", WISEFT)
DEFAULT_METHODS = ("full", WISEFT, "lora", "saft", "random")

__all__ = ["DEFAULT_GRIDS", "DEFAULT_METHODS", "METHODS"]
