"""Diagnostics of one FlexPrefill call."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import FlexPrefillConfig
from .layout import BlockLayout


@dataclass
class FlexPrefillInfo:
    """Per ``(batch, query head)`` diagnostics; every tensor is ``[B, Hq]`` on the input's device.

    Attributes:
        query_aware: bool, the head used the query-aware pattern (else vertical-slash).
        js_distance: float32, ``D_JS`` between estimated and true block distributions
            (NaN when the sparse path was skipped or the input was not finite).
        active_blocks: int64, active ``b × b`` blocks of the mask.
        visible_blocks: int64, blocks a dense causal mask would compute.
        density: float32, ``active_blocks / visible_blocks`` (1.0 means dense).
        sparse: whether sparse attention ran (False: the attention call fell back to dense).
        config: the configuration that produced it.
        layout: the block geometry (lengths and block size).
        predicted_density: float32, set when ``flex_prefill_attention`` skipped the block
            selection because the forecast (``kernels.pipeline.forecast_density``: the
            pattern stage of a few probe heads, each standing for the heads up to the
            next) was denser than ``max_density``; None otherwise.
    """

    query_aware: Tensor
    js_distance: Tensor
    active_blocks: Tensor
    visible_blocks: Tensor
    density: Tensor
    sparse: bool
    config: FlexPrefillConfig
    layout: BlockLayout
    predicted_density: Tensor | None = None

    @classmethod
    def from_selection(
        cls,
        active: Tensor,
        query_aware: Tensor,
        js_distance: Tensor,
        layout: BlockLayout,
        config: FlexPrefillConfig,
    ) -> FlexPrefillInfo:
        """Summarise an active map ``[B, Hq, nq, nk]`` (already restricted to visible blocks)."""
        visible = layout.visible(active.device).sum().expand(query_aware.shape)
        active_blocks = active.sum((-2, -1))
        return cls(
            query_aware=query_aware,
            js_distance=js_distance.float(),
            active_blocks=active_blocks,
            visible_blocks=visible,
            density=active_blocks.float() / visible.float(),
            sparse=True,
            config=config,
            layout=layout,
        )

    @classmethod
    def dense(
        cls, batch: int, heads: int, layout: BlockLayout, config: FlexPrefillConfig, device: torch.device
    ) -> FlexPrefillInfo:
        """Info for a call that ran dense causal attention."""
        visible = layout.visible(device).sum().expand(batch, heads)
        return cls(
            query_aware=torch.zeros(batch, heads, dtype=torch.bool, device=device),
            js_distance=torch.full((batch, heads), float("nan"), device=device),
            active_blocks=visible,
            visible_blocks=visible,
            density=torch.ones(batch, heads, device=device),
            sparse=False,
            config=config,
            layout=layout,
        )

    def summary(self) -> str:
        """A short human-readable table: one line per (batch, head)."""
        lines = [" batch head  pattern         D_JS  density  active/visible"]
        qa, js = self.query_aware.cpu(), self.js_distance.cpu()
        act, vis, den = self.active_blocks.cpu(), self.visible_blocks.cpu(), self.density.cpu()
        for b in range(qa.shape[0]):
            for h in range(qa.shape[1]):
                pattern = "query-aware" if qa[b, h] else "vertical-slash"
                lines.append(
                    f"{b:6d} {h:4d}  {pattern:<14s} {js[b, h]:6.3f}  {den[b, h]:7.3f}  "
                    f"{int(act[b, h])}/{int(vis[b, h])}"
                )
        return "\n".join(lines)
