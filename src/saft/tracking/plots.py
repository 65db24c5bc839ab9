"""PNG plots for step runs: training curves and per-layer mask counts.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting neither
needs a display nor switches the backend of a process that uses matplotlib itself.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def loss_curve_png(history: Sequence[Mapping]) -> bytes | None:
    """Training loss (and learning rate on a second axis) against the optimizer step."""
    from matplotlib.figure import Figure

    rows = [h for h in history if isinstance(h.get("loss"), (int, float)) and "step" in h]
    if not rows:
        return None
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in rows], [h["loss"] for h in rows], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    lr_rows = [h for h in rows if isinstance(h.get("lr"), (int, float))]
    if lr_rows:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in lr_rows], [h["lr"] for h in lr_rows], color="tab:orange", alpha=0.7,
                 label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.set_title("training curve")
    return _png(fig)


def mask_counts_png(per_block: Mapping[str, Mapping]) -> bytes | None:
    """Horizontal bars: selected entries per block/layer, in the mask's order."""
    from matplotlib.figure import Figure

    names = list(per_block)
    if not names:
        return None
    counts = [int(per_block[n].get("selected", 0)) for n in names]
    fig = Figure(figsize=(7, max(2.5, 0.22 * len(names) + 1)))
    ax = fig.add_subplot()
    ax.barh(range(len(names)), counts, color="tab:green")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("selected entries")
    ax.set_title(f"mask: selected entries per layer ({sum(counts):,} in total)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)
