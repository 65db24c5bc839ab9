"""The gradient of a weight's selected entries, by the cheapest of three strategies.

For a linear map ``y = x @ W^T`` over T tokens, the gradient of entry (i, j) of W is
``sum_t gy[t, i] * x[t, j]``. A mask selects k entries, which cover R distinct rows and C
distinct columns of W [out, in]. Three ways to form the k sums:

* ``gather``: gather column i of gy and column j of x for every entry, multiply, sum over
  the tokens: T*k pairs of strided reads. Exact in fp32 whatever the input dtype; its cost
  is memory traffic, about a few ns per pair on a CPU.
* ``product``: the weight-gradient product restricted to the selected rows and columns,
  ``gy[:, R]^T @ x[:, C]`` (T*R*C multiply-adds), then the k entries read from that R x C
  block. A matrix product runs at the machine's peak (about 0.02 ns per multiply-add
  on this 2-core CPU in fp32, 4x less in bf16), so it wins unless R*C is hundreds of
  times k. The selected columns of gy and x are copied first (T*R + T*C reads), unless
  they are nearly all of them, where the product takes the whole side instead.
* ``dense``: ``product`` with every row and column: the full dense weight gradient
  ``gy^T @ x`` (what full fine-tuning computes), then a gather of k entries.

A gradient-scored mask is concentrated: in a ViT-B/16 text tower at 1000 classes a
layer's 41,077 entries lie in 474 rows x 833 columns (R*C/k = 9.6), so ``product`` costs
a fraction of ``gather``. A random mask (the ablation) spreads k entries over k rows and
columns, where ``gather`` can be the cheaper one. Every cost is proportional to T, so the
choice depends only on the mask, the layer's shape and the dtype: it is made once per
tensor, deterministically (a resumed run makes the same choices, so it stays
bit-identical), from the per-element costs in :data:`COSTS`.

All strategies return float32 sums. ``product`` and ``dense`` multiply in the inputs'
dtype as the dense weight gradient of the same (autocast) computation does, so under
bf16 autocast their entries carry that gradient's bf16 rounding; ``gather`` multiplies
in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

STRATEGIES = ("gather", "product", "dense")
"""Forcible strategies; ``auto`` (the default) picks the cheapest per tensor."""

# Largest number of activation elements copied or gathered at once (64 MB in fp32): the
# token dimension is cut into chunks so a step's transient memory does not grow with T.
GATHER_BUDGET = 1 << 24


@dataclass(frozen=True)
class Costs:
    """Seconds per unit of work, for the relative cost of the strategies (not a prediction of time)."""

    mac: float  # one multiply-add of a matrix product
    select: float  # one element copied from a column of an activation
    pair: float  # one gathered pair: two strided reads, a multiply and an add


# Measured with torch 2.14.1 on the 2-core AMD EPYC (Zen 4, AVX-512 bf16) this project runs
# its CPU benchmarks on, at T = 1,600 and 11,000 tokens (scripts/profile-saft-step.py
# --calibrate); CUDA figures are the published orders of magnitude of an H100 (bf16
# products at ~400 TFLOP/s, gathers at a few TB/s), not yet measured. Only their ratios
# matter: a factor of two either way moves few choices.
COSTS = {
    ("cpu", torch.float32): Costs(mac=2.0e-11, select=3.0e-9, pair=5.0e-9),
    ("cpu", torch.bfloat16): Costs(mac=5.0e-12, select=3.0e-9, pair=7.0e-9),
    ("cpu", torch.float16): Costs(mac=2.0e-11, select=3.0e-9, pair=7.0e-9),
    ("cuda", torch.float32): Costs(mac=2.0e-14, select=4.0e-12, pair=1.0e-11),
    ("cuda", torch.bfloat16): Costs(mac=2.5e-15, select=3.0e-12, pair=1.0e-11),
    ("cuda", torch.float16): Costs(mac=2.5e-15, select=3.0e-12, pair=1.0e-11),
}


def costs_for(device_type: str, dtype: torch.dtype) -> Costs:
    return COSTS.get((device_type, dtype)) or COSTS[("cuda" if device_type == "cuda" else "cpu", torch.float32)]


@dataclass(frozen=True)
class Choice:
    """How one tensor's value gradient is formed: a strategy and, for a product, which sides are cut."""

    strategy: str  # gather | product | dense
    rows: bool = False  # product: gy[:, R] (else every row)
    cols: bool = False  # product: x[:, C] (else every column)
    cost_per_token: float = 0.0  # the model's estimate, seconds per token

    @property
    def name(self) -> str:
        if self.strategy != "product":
            return self.strategy
        return f"product[{'R' if self.rows else 'all'}x{'C' if self.cols else 'all'}]"


class EntryLayout:
    """A weight's selected entries as rows and columns, and their place in the R x C block (computed once)."""

    def __init__(self, idx: torch.Tensor, out_features: int, in_features: int):
        self.idx, self.out_features, self.in_features = idx, out_features, in_features
        self.rows, self.cols = idx // in_features, idx % in_features
        self.uniq_rows, row_pos = torch.unique(self.rows, return_inverse=True)
        self.uniq_cols, col_pos = torch.unique(self.cols, return_inverse=True)
        self._row_pos, self._col_pos = row_pos, col_pos
        self._block_index: dict[tuple[bool, bool], torch.Tensor] = {}
        self._choices: dict[tuple[str, torch.dtype, str], Choice] = {}

    @property
    def k(self) -> int:
        return self.idx.numel()

    def block_index(self, rows: bool, cols: bool) -> torch.Tensor:
        """Flat positions of the entries in the product's [R or out, C or in] block."""
        key = (rows, cols)
        if key not in self._block_index:
            r = self._row_pos if rows else self.rows
            c = self._col_pos if cols else self.cols
            width = self.uniq_cols.numel() if cols else self.in_features
            self._block_index[key] = r * width + c
        return self._block_index[key]

    def candidates(self, costs: Costs) -> list[Choice]:
        """Every strategy with its modelled cost per token."""
        n_r, n_c = self.uniq_rows.numel(), self.uniq_cols.numel()
        out = [Choice("gather", cost_per_token=costs.pair * self.k)]
        for rows in (True, False):
            for cols in (True, False):
                r = n_r if rows else self.out_features
                c = n_c if cols else self.in_features
                cost = costs.mac * r * c + costs.select * (n_r * rows + n_c * cols)
                strategy = "product" if rows or cols else "dense"
                out.append(Choice(strategy, rows, cols, cost))
        return out

    def choose(self, device_type: str, dtype: torch.dtype, strategy: str = "auto") -> Choice:
        key = (device_type, dtype, strategy)
        if key not in self._choices:
            options = self.candidates(costs_for(device_type, dtype))
            if strategy != "auto":
                options = [c for c in options if c.strategy == strategy]
            self._choices[key] = min(options, key=lambda c: c.cost_per_token)
        return self._choices[key]


_forced: list[str] = ["auto"]


def current_strategy() -> str:
    """The strategy forced by the innermost :func:`forced_strategy` block, else ``auto``."""
    return _forced[0]


@contextlib.contextmanager
def forced_strategy(strategy: str):
    """Use ``strategy`` for every tensor whose forward runs inside this block (benchmarks and tests).

    The strategy is read when the forward runs (the kernels keep it for their backward), so
    a backward outside the block still uses it.
    """
    if strategy not in STRATEGIES + ("auto",):
        raise ValueError(f"value-gradient strategy must be auto or one of {', '.join(STRATEGIES)}, got {strategy!r}")
    previous = _forced[0]
    _forced[0] = strategy
    try:
        yield
    finally:
        _forced[0] = previous


def value_grad(gy2: torch.Tensor, x2: torch.Tensor, layout: EntryLayout, choice: Choice | str | None = None
               ) -> torch.Tensor:
    """float32 [k]: ``sum_t gy2[t, row_n] * x2[t, col_n]`` for each selected entry n.

    ``choice``: a :class:`Choice`, or a strategy name (``auto`` picks by cost), or None for
    the strategy forced now (:func:`forced_strategy`).
    """
    if layout.k == 0:
        return gy2.new_zeros(0, dtype=torch.float32)
    if not isinstance(choice, Choice):
        choice = layout.choose(gy2.device.type, gy2.dtype, choice or _forced[0])
    if choice.strategy == "gather":
        return _gathered(gy2, x2, layout)
    return _block_product(gy2, x2, layout, choice.rows, choice.cols)


def _gathered(gy2, x2, layout: EntryLayout) -> torch.Tensor:
    """Columns gathered a chunk of entries at a time and multiplied in fp32 (no fp32 copy of an activation)."""
    tokens = max(gy2.shape[0], 1)
    chunk = max(1, GATHER_BUDGET // tokens)
    parts = []
    for start in range(0, layout.k, chunk):
        r, c = layout.rows[start:start + chunk], layout.cols[start:start + chunk]
        parts.append((gy2.index_select(1, r).float() * x2.index_select(1, c).float()).sum(dim=0))
    return torch.cat(parts)


def _block_product(gy2, x2, layout: EntryLayout, rows: bool, cols: bool) -> torch.Tensor:
    """``gy2[:, R]^T @ x2[:, C]`` (or the whole side), in token chunks when the copies would be large.

    One chunk (the usual case) is one product in the inputs' dtype, as the dense weight
    gradient is; several chunks are summed in fp32.
    """
    copied = layout.uniq_rows.numel() * rows + layout.uniq_cols.numel() * cols
    tokens = gy2.shape[0]
    step = tokens if tokens * copied <= GATHER_BUDGET else max(1, GATHER_BUDGET // copied)
    block = None
    for start in range(0, tokens, step):
        a, b = gy2[start:start + step], x2[start:start + step]
        if rows:
            a = a.index_select(1, layout.uniq_rows)
        if cols:
            b = b.index_select(1, layout.uniq_cols)
        part = a.t() @ b
        if step >= tokens:
            block = part
        elif block is None:
            block = part.float()
        else:
            block.add_(part)
    return block.reshape(-1).index_select(0, layout.block_index(rows, cols)).float()
