"""Triton scoring passes of the FlashPrefill and XAttention masks.

Each kernel computes, for one ``(batch, query head, query block)`` per program, the block
statistics of its PyTorch reference exactly (up to float rounding):

* :func:`flashprefill_scores` ↔ :func:`flexprefill_torch.methods.flashprefill.flashprefill_scores_reference`;
* :func:`xattention_scores` ↔ :func:`flexprefill_torch.methods.xattention.xattention_scores_reference`.

They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before this
module was imported (the tests do that in a subprocess, in float32). Inputs may have any
strides; GQA is handled by indexing (query head ``h`` reads key head ``h // group``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernels._utils import check_device, next_pow2
from ..layout import BlockLayout

# --------------------------------------------------------------------------- FlashPrefill


@triton.jit
def _flashprefill_score_kernel(
    q_ptr,
    kp_ptr,
    m_ptr,
    sc_ptr,
    q_heads,
    group,
    q_len,
    kv_len,
    offset,
    n_q_blocks,
    n_k_blocks,
    dim,
    scale,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    BLOCK: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    batch = bh // q_heads
    head = bh % q_heads
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = kp_ptr + batch.to(tl.int64) * stride_kb + (head // group).to(tl.int64) * stride_kh
    out_base = bh.to(tl.int64) * n_q_blocks * n_k_blocks + blk * n_k_blocks

    rows = blk * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < q_len
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    q = tl.load(
        q_base + rows.to(tl.int64)[:, None] * stride_ql + cols[None, :] * stride_qd,
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    pos = offset + rows
    last_pos = offset + tl.minimum((blk + 1) * BLOCK, q_len) - 1
    n_scan = tl.minimum(n_k_blocks, last_pos // BLOCK + 1)
    j0 = tl.zeros([], dtype=tl.int32)
    while j0 < n_scan:  # a while loop: the interpreter cannot range() over program-id values
        js = j0 + tl.arange(0, TILE_N)
        j_ok = js < n_k_blocks
        kt = tl.load(
            k_base + js.to(tl.int64)[:, None] * stride_kl + cols[None, :] * stride_kd,
            mask=j_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        logits = tl.dot(q, tl.trans(kt.to(q.dtype))).to(tl.float32) * scale
        k_last = tl.minimum(js * BLOCK + BLOCK, kv_len) - 1
        contrib = row_ok[:, None] & j_ok[None, :] & (k_last[None, :] <= pos[:, None])
        logits = tl.where(contrib, logits, float("-inf"))
        mx = tl.max(logits, axis=0)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        p = tl.where(contrib, tl.exp(logits - mx_safe[None, :]), 0.0)
        tl.store(m_ptr + out_base + js, mx, mask=j_ok)
        tl.store(sc_ptr + out_base + js, tl.sum(p, axis=0), mask=j_ok)
        j0 += TILE_N


def flashprefill_scores(
    q: Tensor, k_pool: Tensor, layout: BlockLayout, scale: float
) -> tuple[Tensor, Tensor]:
    """Triton version of ``flashprefill_scores_reference``: block max logits and exponent sums.

    Args:
        q: ``[B, Hq, Lq, D]`` float16/bfloat16/float32.
        k_pool: ``[B, Hkv, nk, D]`` float32 block-mean keys (``reference.pool_blocks``).

    Returns:
        ``m [B, Hq, nq, nk]`` (``-inf`` where no query of the row sees the whole key block)
        and ``sc [B, Hq, nq, nk]`` (``Σ exp(logit - m)`` over those queries, 0 there), float32.
    """
    check_device(q, _flashprefill_score_kernel)
    batch, q_heads, q_len, dim = q.shape
    nq, nk, b = layout.num_q_blocks, layout.num_kv_blocks, layout.block_size
    m = torch.full((batch, q_heads, nq, nk), -math.inf, device=q.device, dtype=torch.float32)
    sc = torch.zeros((batch, q_heads, nq, nk), device=q.device, dtype=torch.float32)
    k_pool = k_pool.to(q.dtype)
    _flashprefill_score_kernel[(batch * q_heads, nq)](
        q,
        k_pool,
        m,
        sc,
        q_heads,
        q_heads // k_pool.shape[1],
        q_len,
        layout.kv_len,
        layout.offset,
        nq,
        nk,
        dim,
        scale,
        *q.stride(),
        *k_pool.stride(),
        BLOCK=b,
        TILE_N=64 if b <= 128 else 32,
        BLOCK_D=next_pow2(dim),
        num_warps=4 if b <= 64 else 8,
    )
    return m, sc


# --------------------------------------------------------------------------- XAttention


@triton.jit
def _xattention_logits(
    q_base,
    k_base,
    gq,
    row_ok,
    p_last,
    g0,
    q_len,
    kv_len,
    n_k_groups,
    dim,
    scale_over_stride,
    stride_ql,
    stride_qd,
    stride_kl,
    stride_kd,
    STRIDE: tl.constexpr,
    ROWS: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``[ROWS, TILE_N]`` antidiagonal logits of query groups ``gq`` and key groups ``g0 + n``."""
    gk = g0 + tl.arange(0, TILE_N)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    acc = tl.zeros([ROWS, TILE_N], dtype=tl.float32)
    for m in range(STRIDE):
        q_rows = gq * STRIDE + (STRIDE - 1 - m)
        qm = tl.load(
            q_base + q_rows.to(tl.int64)[:, None] * stride_ql + cols[None, :] * stride_qd,
            mask=(row_ok & (q_rows < q_len))[:, None] & col_ok[None, :],
            other=0.0,
        )
        k_rows = gk * STRIDE + m
        km = tl.load(
            k_base + k_rows.to(tl.int64)[:, None] * stride_kl + cols[None, :] * stride_kd,
            mask=(k_rows < kv_len)[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += tl.dot(qm, tl.trans(km)).to(tl.float32)
    visible = row_ok[:, None] & (gk < n_k_groups)[None, :] & (gk[None, :] * STRIDE <= p_last[:, None])
    return tl.where(visible, acc * scale_over_stride, float("-inf"))


@triton.jit
def _xattention_score_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
    q_heads,
    group,
    q_len,
    kv_len,
    offset,
    n_q_blocks,
    n_k_blocks,
    dim,
    scale_over_stride,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    BLOCK: tl.constexpr,
    STRIDE: tl.constexpr,
    GROUPS: tl.constexpr,
    ROWS: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    batch = bh // q_heads
    head = bh % q_heads
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + (head // group).to(tl.int64) * stride_kh
    out_base = bh.to(tl.int64) * n_q_blocks * n_k_blocks + blk * n_k_blocks

    r = tl.arange(0, ROWS)
    gq = blk * GROUPS + r
    row_ok = (r < GROUPS) & (gq * STRIDE < q_len)
    p_last = offset + tl.minimum(gq * STRIDE + STRIDE - 1, q_len - 1)
    n_k_groups = tl.cdiv(kv_len, STRIDE)
    block_last = offset + tl.minimum((blk + 1) * BLOCK, q_len) - 1
    n_scan = tl.minimum(n_k_groups, block_last // STRIDE + 1)

    # Pass 1: online softmax statistics of every query group over its visible key groups.
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    g0 = tl.zeros([], dtype=tl.int32)
    while g0 < n_scan:  # a while loop: the interpreter cannot range() over program-id values
        logits = _xattention_logits(
            q_base,
            k_base,
            gq,
            row_ok,
            p_last,
            g0,
            q_len,
            kv_len,
            n_k_groups,
            dim,
            scale_over_stride,
            stride_ql,
            stride_qd,
            stride_kl,
            stride_kd,
            STRIDE,
            ROWS,
            TILE_N,
            BLOCK_D,
        )
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m_i = m_new
        g0 += TILE_N
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)

    # Pass 2: probabilities summed over the rows and over the key groups of each key block.
    g0 = tl.zeros([], dtype=tl.int32)
    while g0 < n_scan:
        logits = _xattention_logits(
            q_base,
            k_base,
            gq,
            row_ok,
            p_last,
            g0,
            q_len,
            kv_len,
            n_k_groups,
            dim,
            scale_over_stride,
            stride_ql,
            stride_qd,
            stride_kl,
            stride_kd,
            STRIDE,
            ROWS,
            TILE_N,
            BLOCK_D,
        )
        p = tl.exp(logits - m_safe[:, None]) * inv_l[:, None]
        per_group = tl.sum(p, axis=0)
        per_block = tl.sum(tl.reshape(per_group, [TILE_N // GROUPS, GROUPS]), axis=1)
        js = g0 // GROUPS + tl.arange(0, TILE_N // GROUPS)
        tl.store(out_ptr + out_base + js, per_block, mask=js < n_k_blocks)
        g0 += TILE_N


def xattention_scores(q: Tensor, k: Tensor, layout: BlockLayout, stride: int, scale: float) -> Tensor:
    """Triton version of ``xattention_scores_reference``: antidiagonal block attention sums.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (one float dtype).
        stride: ``S``, a power of two dividing the block size.

    Returns:
        ``A [B, Hq, nq, nk]`` float32: for query block ``i`` and key block ``j``, the sum over
        the query groups of block ``i`` of their stride-level softmax mass in key block ``j``.
    """
    check_device(q, _xattention_score_kernel)
    batch, q_heads, q_len, dim = q.shape
    nq, nk, b = layout.num_q_blocks, layout.num_kv_blocks, layout.block_size
    groups = b // stride
    out = torch.zeros((batch, q_heads, nq, nk), device=q.device, dtype=torch.float32)
    _xattention_score_kernel[(batch * q_heads, nq)](
        q,
        k,
        out,
        q_heads,
        q_heads // k.shape[1],
        q_len,
        layout.kv_len,
        layout.offset,
        nq,
        nk,
        dim,
        scale / stride,
        *q.stride(),
        *k.stride(),
        BLOCK=b,
        STRIDE=stride,
        GROUPS=groups,
        ROWS=next_pow2(groups),
        TILE_N=max(64, groups),
        BLOCK_D=next_pow2(dim),
        num_warps=4,
    )
    return out
