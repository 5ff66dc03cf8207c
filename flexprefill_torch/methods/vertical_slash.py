"""Fixed-budget vertical-slash attention (MInference-style, Jiang et al., 2024) as a block mask.

Rules, per batch row and query head:

1. **Estimate.** ``Q̂`` = the last ``r = min(last_q, Lq)`` queries; ``P = softmax(scale · Q̂ Kᵀ)``
   over the keys each of them may see (causal). Vertical score of key ``t``:
   ``a_v[t] = Σ_rows P[row, t]``; slash score of offset ``o``:
   ``a_s[o] = Σ_rows P[row, p_row - o]`` (terms with ``o > p_row`` are 0).
2. **Fixed budgets.** Keep the ``min(vertical_size, Lk)`` keys with the largest ``a_v`` and
   the ``min(slash_size, Lk)`` offsets with the largest ``a_s`` (``Lk`` keys and ``Lk``
   offsets ``0 .. Lk - 1`` exist), exactly that many lines per head, whatever the scores.
3. **Extension to blocks** (the FlexPrefill vertical-slash extension, reused from
   :mod:`flexprefill_torch.reference`): a selected key ``t`` marks key-block column
   ``t // b``, active in every query-block row that can see it; a selected offset ``o``
   marks offset group ``o // b`` (offsets ``g·b .. g·b + b - 1``), which activates in every
   row each block that one of the group's lines crosses. The block set is therefore a
   superset of the blocks the selected token lines touch.
4. **Always**: key block 0 and the diagonal block(s) of every row are active (MInference
   keeps the first tokens and the local offsets the same way), and only causally visible
   blocks are active. A head whose scores are not finite keeps every visible block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..layout import BlockLayout
from ..reference import extend_lines, pool_slash, pool_sum
from ..validation import check_qk
from ._common import MethodInfo, check_block_size, check_int, finish, forced_sink_diagonal, grouped


def line_scores(q: Tensor, k: Tensor, last_q: int, scale: float) -> tuple[Tensor, Tensor]:
    """Vertical and slash scores of the last ``r = min(last_q, Lq)`` queries.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``.

    Returns:
        ``a_v [B, Hq, Lk]`` (attention mass on key ``t``) and ``a_s [B, Hq, Lk]`` (mass at
        offset ``o``), float32, each summed over the ``r`` rows (so each sums to ``r``).
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]
    r = min(last_q, q_len)
    q_hat = grouped(q[..., -r:, :].float(), k.shape[1])  # [B, Hkv, G, r, D]
    logits = scale * q_hat @ k.float()[:, :, None].mT  # [B, Hkv, G, r, Lk]
    positions = torch.arange(kv_len - r, kv_len, device=q.device)  # p_row
    keys = torch.arange(kv_len, device=q.device)
    logits = logits.masked_fill(keys[None, :] > positions[:, None], -math.inf)
    probs = torch.softmax(logits, -1).flatten(1, 2)  # [B, Hq, r, Lk]
    vertical = probs.sum(-2)
    key_at_offset = positions[:, None] - keys[None, :]  # [r, Lk]: key of row at offset o
    index = key_at_offset.clamp(min=0).expand(*probs.shape[:2], r, kv_len)
    slash = (probs.gather(-1, index) * (key_at_offset >= 0)).sum(-2)
    return vertical, slash


def top_lines(scores: Tensor, count: int) -> Tensor:
    """``[..., L]`` bool: exactly ``min(count, L)`` entries, the largest ``scores`` (NaN last)."""
    count = min(count, scores.shape[-1])
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if count == 0:
        return chosen
    ranked = scores.nan_to_num(nan=-math.inf)
    _, index = ranked.topk(count, dim=-1)
    return chosen.scatter_(-1, index, True)


def vertical_slash_active(
    q: Tensor,
    k: Tensor,
    layout: BlockLayout,
    vertical_size: int,
    slash_size: int,
    last_q: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Active blocks ``[B, Hq, nq, nk]`` plus the selected keys and offsets ``[B, Hq, Lk]`` and
    the dense-fallback flag ``[B, Hq]`` (non-finite scores)."""
    vertical, slash = line_scores(q, k, last_q, scale)
    keys = top_lines(vertical, vertical_size)
    offsets = top_lines(slash, slash_size)
    columns = pool_sum(keys.float(), layout.block_size) > 0  # [B, Hq, nk]
    groups = pool_slash(offsets.float(), layout) > 0  # [B, Hq, nk]
    active = extend_lines(columns, groups, layout) | forced_sink_diagonal(layout, q.device)
    dense = ~(torch.isfinite(vertical).all(-1) & torch.isfinite(slash).all(-1))
    visible = layout.visible(q.device)
    active = torch.where(dense[..., None, None], visible, active & visible)
    return active, keys, offsets, dense


def vertical_slash_block_mask(
    q: Tensor,
    k: Tensor,
    *,
    vertical_size: int = 1000,
    slash_size: int = 6096,
    last_q: int = 64,
    block_size: int = 128,
    scale: float | None = None,
    return_info: bool = False,
) -> BlockMask | tuple[BlockMask, MethodInfo]:
    """The fixed-budget vertical-slash ``BlockMask`` of ``q`` against ``k`` (see the module doc).

    Args:
        q: ``[B, Hq, Lq, D]`` queries, the last ``Lq`` positions of the sequence.
        k: ``[B, Hkv, Lk, D]`` keys, ``Hq % Hkv == 0`` and ``Lq <= Lk``.
        vertical_size: vertical lines (key tokens) per head, ``>= 0``.
        slash_size: slash lines (offsets) per head, ``>= 0``.
        last_q: queries whose attention picks the lines, ``>= 1``.
        block_size: mask block size ``b``, one of 16..256 (powers of two).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_info: also return a :class:`MethodInfo`; its ``extras`` hold
            ``vertical_lines``/``slash_lines`` (lines selected per head) and ``dense``.

    Returns:
        A ``BlockMask`` with ``B × Hq`` masks over ``(Lq, Lk)``, and the info if requested.
    """
    check_qk(q, k, scale, "auto")
    vertical_size = check_int("vertical_size", vertical_size, 0)
    slash_size = check_int("slash_size", slash_size, 0)
    last_q = check_int("last_q", last_q, 1)
    block_size = check_block_size(block_size)
    layout = BlockLayout(q.shape[-2], k.shape[-2], block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    with torch.no_grad():
        active, keys, offsets, dense = vertical_slash_active(
            q, k, layout, vertical_size, slash_size, last_q, scale
        )
    params = {
        "vertical_size": vertical_size,
        "slash_size": slash_size,
        "last_q": last_q,
        "block_size": block_size,
    }
    extras = {"vertical_lines": keys.sum(-1), "slash_lines": offsets.sum(-1), "dense": dense}
    return finish(active, layout, "vertical_slash", params, return_info, extras)
