"""The Triton mask-building pipeline: ``q, k -> active blocks`` (and BlockMask indices).

Stages (the Triton ones are ``torch.library.triton_op``s, so the pipeline is traceable by
``torch.compile(fullgraph=True)``, and it is capturable in a CUDA graph: no host
synchronisation, no data-dependent Python branch, no loop over batch or heads):

1. :func:`.pool.pool_blocks` of ``q``, times the scale (one pass over ``q``);
2. :func:`.representative.representative_attention` (``â``, slash parts, and the pooled
   keys: one pass over ``k``);
3. ``scale · Q̄ · K̄ᵀ``: one batched float32 ``torch.matmul`` (cuBLAS; GQA by a view, no
   copy of the keys);
4. :func:`.pattern.head_pattern` (``ā``, ``D_JS``, pattern, dense fallback, vertical and
   slash γ-selections);
5. :func:`.select.select_blocks` (block rules, query-aware selection, line extension, cap);
6. optionally :func:`.emit.emit_block_indices` (``from_kv_blocks`` inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..block_mask import block_mask_from_active
from ..config import FlexPrefillConfig
from ..layout import BlockLayout
from .pattern import QUERY_AWARE, SPARSE, head_pattern
from .pool import pool_blocks
from .representative import representative_attention
from .select import select_blocks


@dataclass
class TritonSelection:
    """Outputs of :func:`triton_selection` (per batch row and query head).

    Attributes:
        active: ``[B, Hq, nq, nk]`` bool, the final active blocks (visible ones only).
        query_aware: ``[B, Hq]`` bool; js_distance: ``[B, Hq]`` float32.
        true_blocks, estimated_blocks, slash: ``[B, Hq, nk]`` float32 (``â``, ``ā``, slash).
        vertical_selected, slash_selected: ``[B, Hq, nk]`` bool, step 5's selections.
        sparse: ``[B, Hq]`` bool, False for heads that fell back to dense.
    """

    active: Tensor
    query_aware: Tensor
    js_distance: Tensor
    true_blocks: Tensor
    estimated_blocks: Tensor
    slash: Tensor
    vertical_selected: Tensor
    slash_selected: Tensor
    sparse: Tensor


def triton_selection(
    q: Tensor, k: Tensor, config: FlexPrefillConfig, scale: float | None = None
) -> TritonSelection:
    """Run the whole pipeline; same decisions as ``reference.flex_prefill_reference``.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (float16/bfloat16/float32, CUDA, or CPU
            under ``TRITON_INTERPRET=1``).
        config: the FlexPrefill configuration; scale: default ``1/sqrt(D)``.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    b = config.block_size
    layout = BlockLayout(q_len, kv_len, b)
    n_q, n_kv = layout.num_q_blocks, layout.num_kv_blocks
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    group = q_heads // kv_heads

    q_pool, q_bad = pool_blocks(q, b, scale)  # scale * Q̄
    true_blocks, parts, k_pool, k_bad = representative_attention(q, k, b, scale)
    logits = torch.matmul(q_pool.view(batch, kv_heads, group * n_q, dim), k_pool.mT)
    logits = logits.view(batch, q_heads, n_q, n_kv)
    estimate, slash, js, flags, vsel, ssel = head_pattern(
        q, k_pool, true_blocks, parts, q_bad, k_bad, b, kv_len, scale, config.tau, config.gamma
    )
    max_blocks = -1 if config.max_blocks is None else config.max_blocks
    active = select_blocks(
        logits,
        flags,
        true_blocks,
        slash,
        vsel,
        ssel,
        q_len,
        kv_len,
        b,
        config.gamma,
        config.min_blocks,
        max_blocks,
        config.query_aware_selection == "per_row",
        config.tau > 0.0,
    )
    return TritonSelection(
        active=active,
        query_aware=(flags & QUERY_AWARE) != 0,
        js_distance=js,
        true_blocks=true_blocks,
        estimated_blocks=estimate,
        slash=slash,
        vertical_selected=vsel,
        slash_selected=ssel,
        sparse=(flags & SPARSE) != 0,
    )


def triton_select_active_blocks(
    q: Tensor, k: Tensor, config: FlexPrefillConfig, scale: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(active [B, Hq, nq, nk] bool, query_aware [B, Hq] bool, js_distance [B, Hq])``."""
    selection = triton_selection(q, k, config, scale)
    return selection.active, selection.query_aware, selection.js_distance


def triton_block_mask(
    q: Tensor, k: Tensor, config: FlexPrefillConfig, scale: float | None = None
) -> BlockMask:
    """The FlexPrefill ``BlockMask`` built entirely on the device (selection + emission).

    Same mask as ``flex_prefill_block_mask(..., backend="triton")``.
    """
    layout = BlockLayout(q.shape[-2], k.shape[-2], config.block_size)
    active, _, _ = triton_select_active_blocks(q, k, config, scale)
    return block_mask_from_active(active, layout, use_triton=True)
