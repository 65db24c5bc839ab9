"""The methods the embedded world's protocols compare, and their learning-rate grids (light: no torch).

Each trained method's grid spans the rates its kind of training needs on the tiny model
(full fine-tuning and LP-FT's second stage move every weight: small rates; a mask's few
values or LoRA's factors: larger ones); ``saft benchmark synthshift`` chooses each
method's rate from its own grid on the ID validation split. WiSE-FT trains nothing: it
is full fine-tuning's delta at the alpha chosen on the same split.

LP-FT's grid started as full fine-tuning's (1e-5 to 3e-4); its first run chose 3e-4, the
top end, on seed 1's validation split, so the grid moved up half a decade (the rule for
any method whose best rate sits at an end of its grid).
"""

from __future__ import annotations

from saft.steps.configs import WISEFT

DEFAULT_GRIDS = {"full": [1e-5, 3e-5, 1e-4, 3e-4], "saft": [3e-4, 1e-3, 3e-3, 1e-2],
                 "random": [3e-4, 1e-3, 3e-3, 1e-2], "lora": [1e-4, 3e-4, 1e-3, 3e-3],
                 "lpft": [3e-5, 1e-4, 3e-4, 1e-3]}
METHODS = ("full", "saft", "random", "lora", "lpft", WISEFT)
DEFAULT_METHODS = ("full", WISEFT, "lora", "saft", "random")

__all__ = ["DEFAULT_GRIDS", "DEFAULT_METHODS", "METHODS"]
