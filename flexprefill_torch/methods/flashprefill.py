"""FlashPrefill (arXiv 2603.06199) as a block mask: block search plus dynamic thresholding.

Rules, per batch row and query head (``b`` the block size, ``K̄_j`` the mean of the real keys
of key block ``j``, query ``x`` at absolute position ``p_x``):

1. **Block search.** Every query ``x`` of query-block row ``i`` is scored against every
   mean key: ``l[x, j] = scale · q_x · K̄_j``. Query ``x`` *contributes* to key block ``j``
   iff it sees the whole block (``k_last_j <= p_x``; the diagonal block(s) are covered by
   the local window instead). Per ``(i, j)``: the block maximum
   ``m[i, j] = max_x l[x, j]`` and the exponent sum ``sc[i, j] = Σ_x exp(l[x, j] - m[i, j])``
   over the contributing queries (``-inf`` and ``0`` when none contributes).
2. **Normalised score.** With the row maximum ``M_i = max_j m[i, j]``,
   ``s[i, j] = sc[i, j] · exp(m[i, j] - M_i) = Σ_x exp(l[x, j] - M_i)``, divided by
   ``Σ_j s[i, j]`` so each row sums to 1 over its visible blocks.
3. **Dynamic threshold.** Keep ``j`` iff ``s[i, j] >= alpha · max_j s[i, j]``: no sort and no
   cumulative sum. ``alpha = 0`` keeps every visible block.
4. **Always active**: the first ``attention_sink`` key blocks; the local ``window`` blocks
   ending at the row's diagonal, i.e. ``q_first // b - window + 1 <= j <= q_last // b``
   (``window = 1`` is the diagonal block(s) alone); and every visible block of the last
   ``dense_last`` query-block rows. Only causally visible blocks are ever active. A head
   whose scores are not finite keeps every visible block (its output is dense attention).

Published hyperparameters: block 128, sink 2, window 4, last 2 query blocks dense,
``alpha`` about 0.08-0.18 (default 0.12).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..layout import BlockLayout
from ..reference import pool_blocks
from ..validation import check_qk
from ._common import (
    Backend,
    MethodInfo,
    check_block_size,
    check_int,
    check_real,
    finish,
    grouped,
    rows_per_chunk,
    use_triton,
)


def flashprefill_scores_reference(
    q: Tensor, k_pool: Tensor, layout: BlockLayout, scale: float
) -> tuple[Tensor, Tensor]:
    """Block maxima and exponent sums of every query against the mean keys (step 1).

    Vectorised over batch and heads; the query length is cut into chunks of query blocks so
    one float32 chunk of logits stays below ``CHUNK_ELEMENTS``.

    Args:
        q: ``[B, Hq, Lq, D]``; k_pool: ``[B, Hkv, nk, D]`` float32 block-mean keys.

    Returns:
        ``m [B, Hq, nq, nk]`` and ``sc [B, Hq, nq, nk]`` float32 (see the module doc).
    """
    batch, q_heads, q_len, _ = q.shape
    kv_heads, nk, b = k_pool.shape[1], layout.num_kv_blocks, layout.block_size
    _, k_last = layout.key_block_positions(q.device)
    q_grouped = grouped(q, kv_heads)  # [B, Hkv, G, Lq, D]
    group = q_grouped.shape[2]
    step = rows_per_chunk(batch * q_heads, nk, b)
    ms, sums = [], []
    for start in range(0, q_len, step):
        stop = min(start + step, q_len)
        rows = stop - start
        chunk = q_grouped[..., start:stop, :].float().reshape(batch, kv_heads, group * rows, -1)
        logits = (scale * chunk @ k_pool.mT).unflatten(2, (group, rows))  # [B, Hkv, G, rows, nk]
        positions = layout.offset + torch.arange(start, stop, device=q.device)
        contrib = k_last[None, :] <= positions[:, None]
        logits = logits.masked_fill(~contrib, -math.inf)
        padded = -(-rows // b) * b
        logits = F.pad(logits, (0, 0, 0, padded - rows), value=-math.inf).unflatten(-2, (padded // b, b))
        m = logits.amax(-2)  # [B, Hkv, G, blocks, nk]
        m_safe = m.masked_fill(m == -math.inf, 0.0)
        sums.append(torch.exp(logits - m_safe[..., None, :]).sum(-2).flatten(1, 2))
        ms.append(m.flatten(1, 2))
    return torch.cat(ms, -2), torch.cat(sums, -2)


def normalised_scores(m: Tensor, sc: Tensor) -> Tensor:
    """Step 2: ``s[i, j] = sc · exp(m - M_i)`` normalised to sum 1 per row, ``[B, H, nq, nk]``."""
    row_max = m.amax(-1, keepdim=True)
    weight = torch.where(m == -math.inf, 0.0, torch.exp(m - row_max))
    s = sc * weight
    return s / s.sum(-1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)


def forced_blocks(layout: BlockLayout, attention_sink: int, window: int, dense_last: int, device) -> Tensor:
    """Step 4: ``[nq, nk]`` bool, the sink, window and dense-last-row blocks (visible only)."""
    q_first, q_last = layout.query_block_positions(device)
    j = torch.arange(layout.num_kv_blocks, device=device)
    i = torch.arange(layout.num_q_blocks, device=device)
    b = layout.block_size
    sink = (j < attention_sink)[None, :]
    local = (j[None, :] >= (q_first // b - window + 1)[:, None]) & (j[None, :] <= (q_last // b)[:, None])
    last_rows = (i >= layout.num_q_blocks - dense_last)[:, None]
    return (sink | local | last_rows) & layout.visible(device)


def flashprefill_select(
    m: Tensor,
    sc: Tensor,
    layout: BlockLayout,
    alpha: float,
    attention_sink: int,
    window: int,
    dense_last: int,
) -> tuple[Tensor, Tensor]:
    """Steps 2-4 from the block statistics: active ``[B, H, nq, nk]`` and dense flag ``[B, H]``."""
    s = normalised_scores(m, sc)
    keep = s >= alpha * s.amax(-1, keepdim=True)
    visible = layout.visible(m.device)
    active = (keep | forced_blocks(layout, attention_sink, window, dense_last, m.device)) & visible
    dense = ~torch.isfinite(s).all(-1).all(-1)
    return torch.where(dense[..., None, None], visible, active), dense


def flash_prefill_block_mask(
    q: Tensor,
    k: Tensor,
    *,
    alpha: float = 0.12,
    attention_sink: int = 2,
    window: int = 4,
    dense_last: int = 2,
    block_size: int = 128,
    scale: float | None = None,
    backend: Backend = "auto",
    return_info: bool = False,
) -> BlockMask | tuple[BlockMask, MethodInfo]:
    """The FlashPrefill ``BlockMask`` of ``q`` against ``k`` (rules in the module doc).

    Args:
        q: ``[B, Hq, Lq, D]`` queries, the last ``Lq`` positions of the sequence.
        k: ``[B, Hkv, Lk, D]`` keys, ``Hq % Hkv == 0`` and ``Lq <= Lk``.
        alpha: dynamic threshold, ``0 <= alpha <= 1``, relative to the row's best block.
        attention_sink: leading key blocks always active, ``>= 0``.
        window: local blocks ending at (and including) the diagonal, ``>= 1``.
        dense_last: last query-block rows that keep every visible block, ``>= 0``.
        block_size: mask block size ``b``, one of 16..256 (powers of two).
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: scoring pass: ``"reference"`` (PyTorch), ``"triton"``, or ``"auto"``
            (Triton on CUDA tensors, else PyTorch).
        return_info: also return a :class:`MethodInfo` (``extras["dense"]``: heads that
            kept every block because their scores were not finite).

    Returns:
        A ``BlockMask`` with ``B × Hq`` masks over ``(Lq, Lk)``, and the info if requested.
    """
    check_qk(q, k, scale, backend)
    alpha = check_real("alpha", alpha, 0.0, 1.0)
    attention_sink = check_int("attention_sink", attention_sink, 0)
    window = check_int("window", window, 1)
    dense_last = check_int("dense_last", dense_last, 0)
    block_size = check_block_size(block_size)
    layout = BlockLayout(q.shape[-2], k.shape[-2], block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    with torch.no_grad():
        k_pool = pool_blocks(k.float(), block_size)
        if use_triton(backend, q):
            from ._kernels import flashprefill_scores

            m, sc = flashprefill_scores(q, k_pool, layout, scale)
        else:
            m, sc = flashprefill_scores_reference(q, k_pool, layout, scale)
        active, dense = flashprefill_select(m, sc, layout, alpha, attention_sink, window, dense_last)
    params = {
        "alpha": alpha,
        "attention_sink": attention_sink,
        "window": window,
        "dense_last": dense_last,
        "block_size": block_size,
    }
    return finish(active, layout, "flashprefill", params, return_info, {"dense": dense})
