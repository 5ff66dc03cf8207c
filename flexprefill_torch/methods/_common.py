"""Plumbing shared by the sparse-prefill methods: knob checks, backend choice, info, assembly.

Every method turns ``q [B, Hq, Lq, D]`` and ``k [B, Hkv, Lk, D]`` into an active-block map
``[B, Hq, nq, nk]`` bool and hands it to :func:`finish`, which restricts it to the causally
visible blocks and builds the per-(batch, query head) ``BlockMask`` (and the info).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..block_mask import block_mask_from_active
from ..layout import BlockLayout

Backend = Literal["auto", "reference", "triton"]

BLOCK_SIZES = (16, 32, 64, 128, 256)

# Elements of one float32 score chunk in the PyTorch scoring passes (512 MiB): the long
# dimension is cut into chunks of query blocks so 128k-token inputs fit in GPU memory.
CHUNK_ELEMENTS = 1 << 27


@dataclass
class MethodInfo:
    """Per ``(batch, query head)`` diagnostics of one method call; tensors are ``[B, Hq]``.

    Attributes:
        method: ``"flashprefill"``, ``"streaming"``, ``"vertical_slash"`` or ``"xattention"``.
        active_blocks: int64, active ``b × b`` blocks of the mask.
        visible_blocks: int64, blocks a dense causal mask would compute.
        density: float32, ``active_blocks / visible_blocks`` (1.0 means dense).
        layout: the block geometry (lengths and block size).
        params: the knobs the mask was built with (after defaults).
        extras: method-specific ``[B, Hq]`` tensors (for example the number of selected
            vertical and slash lines, or the heads that fell back to dense).
    """

    method: str
    active_blocks: Tensor
    visible_blocks: Tensor
    density: Tensor
    layout: BlockLayout
    params: dict[str, Any]
    extras: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_active(
        cls,
        method: str,
        active: Tensor,
        layout: BlockLayout,
        params: dict[str, Any],
        extras: dict[str, Tensor] | None = None,
    ) -> MethodInfo:
        """Summarise an active map ``[B, Hq, nq, nk]`` (already restricted to visible blocks)."""
        active_blocks = active.sum((-2, -1))
        visible = layout.visible(active.device).sum().expand(active_blocks.shape)
        return cls(
            method=method,
            active_blocks=active_blocks,
            visible_blocks=visible,
            density=active_blocks.float() / visible.float(),
            layout=layout,
            params=dict(params),
            extras=dict(extras or {}),
        )

    def summary(self) -> str:
        """A short human-readable table: one line per (batch, head) (host sync)."""
        lines = [f"{self.method}: " + ", ".join(f"{k}={v}" for k, v in self.params.items())]
        lines.append(" batch head  density  active/visible")
        act, vis, den = self.active_blocks.cpu(), self.visible_blocks.cpu(), self.density.cpu()
        for b in range(act.shape[0]):
            for h in range(act.shape[1]):
                lines.append(f"{b:6d} {h:4d}  {den[b, h]:7.3f}  {int(act[b, h])}/{int(vis[b, h])}")
        return "\n".join(lines)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an ``int >= minimum``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {name}={value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value!r}")
    return value


def check_real(name: str, value: Any, low: float, high: float) -> float:
    """``value`` if it is a real number in ``[low, high]``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {name}={value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must satisfy {low} <= {name} <= {high}, got {name}={value!r}")
    return float(value)


def check_block_size(block_size: Any) -> int:
    """``block_size`` if it is one of :data:`BLOCK_SIZES`."""
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got block_size={block_size!r}")
    return int(block_size)


def use_triton(backend: Backend, q: Tensor) -> bool:
    """Whether the Triton scoring kernel runs: ``"triton"``, or ``"auto"`` on a CUDA tensor."""
    return backend == "triton" or (backend == "auto" and q.is_cuda)


def grouped(q: Tensor, kv_heads: int) -> Tensor:
    """``[B, Hq, L, D] -> [B, Hkv, G, L, D]``: the query heads that share a key head (a view)."""
    return q.unflatten(1, (kv_heads, q.shape[1] // kv_heads))


def rows_per_chunk(batch_heads: int, columns: int, block: int) -> int:
    """Rows (a multiple of ``block``) per chunk so one float32 ``[BH, rows, columns]`` fits the cap."""
    blocks = max(1, CHUNK_ELEMENTS // max(1, batch_heads * columns * block))
    return blocks * block


def forced_sink_diagonal(layout: BlockLayout, device: torch.device) -> Tensor:
    """``[nq, nk]`` bool: key block 0 and the diagonal block(s) of every row, visible only."""
    forced = layout.diagonal(device).clone()
    forced[:, 0] = True
    return forced & layout.visible(device)


def finish(
    active: Tensor,
    layout: BlockLayout,
    method: str,
    params: dict[str, Any],
    return_info: bool,
    extras: dict[str, Tensor] | None = None,
) -> BlockMask | tuple[BlockMask, MethodInfo]:
    """Restrict ``active [B, Hq, nq, nk]`` to visible blocks, build the BlockMask (and info)."""
    active = active & layout.visible(active.device)
    block_mask = block_mask_from_active(active, layout)
    if not return_info:
        return block_mask
    return block_mask, MethodInfo.from_active(method, active, layout, params, extras)
