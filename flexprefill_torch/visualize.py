"""Pictures: block masks of chosen heads (paper Fig. 9) and layer × head maps (Figs. 8, 10).

Needs matplotlib (``pip install -e ".[docs]"`` or ``pip install matplotlib``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .block_mask import active_from_block_mask
from .info import FlexPrefillInfo

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("drawing needs matplotlib: pip install matplotlib") from error
    return plt


def plot_block_masks(
    mask: BlockMask | Tensor,
    heads: Sequence[tuple[int, int]] | None = None,
    info: FlexPrefillInfo | None = None,
    path: str | Path | None = None,
    columns: int = 4,
) -> Figure:
    """Draw the active blocks of ``(batch, head)`` pairs (default: up to 8 heads of batch 0).

    Args:
        mask: a ``BlockMask`` built by this library, or an active map ``[B, H, nq, nk]``.
        heads: which ``(batch, head)`` pairs to draw.
        info: adds each head's pattern, ``D_JS`` and density to its title.
        path: save the figure there as PNG.
        columns: panels per row.

    Active blocks are dark, causally visible but skipped blocks light, the rest white.
    """
    plt = _pyplot()
    active = active_from_block_mask(mask) if isinstance(mask, BlockMask) else mask
    active = active.detach().bool().cpu()
    if heads is None:
        heads = [(0, h) for h in range(min(8, active.shape[1]))]
    for b, h in heads:
        if not (0 <= b < active.shape[0] and 0 <= h < active.shape[1]):
            raise ValueError(f"heads must index [0, {active.shape[0]}) x [0, {active.shape[1]}), got ({b}, {h})")
    rows = -(-len(heads) // columns)
    cols = min(columns, len(heads))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    visible = None
    if info is not None:
        visible = info.layout.visible("cpu").float()
    for ax in axes.flat[len(heads) :]:
        ax.axis("off")
    for ax, (b, h) in zip(axes.flat, heads, strict=False):
        picture = active[b, h].float()
        if visible is not None:
            picture = torch.where(picture > 0, 1.0, 0.25 * visible)
        ax.imshow(picture.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        title = f"batch {b}, head {h}"
        if info is not None:
            pattern = "query-aware" if bool(info.query_aware[b, h]) else "vertical-slash"
            title += f"\n{pattern}, D_JS {float(info.js_distance[b, h]):.3f}, density {float(info.density[b, h]):.2f}"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("key block", fontsize=7)
        ax.set_ylabel("query block", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_layer_heatmap(
    infos: Sequence[FlexPrefillInfo], path: str | Path | None = None, batch: int = 0
) -> Figure:
    """Layer × head maps of density, ``D_JS`` and pattern, one ``FlexPrefillInfo`` per layer."""
    if not infos:
        raise ValueError("infos must hold at least one FlexPrefillInfo (one per layer)")
    plt = _pyplot()
    density = torch.stack([i.density[batch].float().cpu() for i in infos])
    js = torch.stack([i.js_distance[batch].float().cpu() for i in infos])
    pattern = torch.stack([i.query_aware[batch].float().cpu() for i in infos])
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * len(infos) + 2.5))
    panels = (
        (density, "density (active / visible blocks)", "viridis_r", 0.0, 1.0),
        (js, "Jensen-Shannon distance D_JS", "magma", 0.0, float(js.nan_to_num(0).max().clamp(min=1e-6))),
        (pattern, "pattern (1 = query-aware, 0 = vertical-slash)", "coolwarm", 0.0, 1.0),
    )
    for ax, (values, title, cmap, low, high) in zip(axes, panels, strict=True):
        image = ax.imshow(values.numpy(), cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(0, values.shape[1], max(1, values.shape[1] // 16)))
        ax.set_yticks(range(0, values.shape[0], max(1, values.shape[0] // 16)))
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
