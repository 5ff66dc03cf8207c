"""Representative attention: the last ``r = min(b, Lq)`` queries against every key.

Must match ``reference.representative_attention`` followed by ``reference.pool_slash``:
``â[j]`` (mean attention mass of key block ``j``) and the slash mass per offset group
``g = (p_i - t) // b``, without materialising the ``r × Lk`` probabilities. The same pass
also pools the keys (``reference.pool_blocks`` of ``k``), since it reads every key tile.

One pass over the keys plus a light combine:

1. :func:`_tile_kernel`, a grid of (query head, range of key blocks; split-K): per key
   block ``j`` and query row ``i`` it keeps the row max ``m`` of the logits in the block
   and the sums of ``exp(logit - m)`` over the keys of each of the (at most three)
   offset groups the ``(r × b)`` tile touches: group ``C - j + d``, ``d = 0, 1, 2``
   (``C`` depends only on the lengths; ``d`` is fixed by ``t - i``, see
   :func:`slash_origin`). It also writes each split's partial log-sum-exp per row and,
   from the programs of the first query head of each GQA group, the pooled keys. The key
   blocks that every row sees whole are one loop with no mask; the last one or two
   blocks, which the causal boundary or the sequence end cuts, a second, masked loop
   (no branch inside either loop, so the compiler pipelines the key loads).
2. :func:`_mass_kernel` combines the partial log-sum-exps (fixed order) and turns the
   per-block statistics into ``â[j]`` and ``parts[j, d]`` (probability mass of block
   ``j`` in group ``C - j + d``). The slash mass of group ``g`` is ``Σ_d parts[C + d - g, d]``,
   a fixed-order gather (fused into :mod:`.pattern`; :func:`slash_from_parts` in torch):
   no atomics, no per-offset array.

GQA: the programs of the query heads sharing a key head are adjacent in the grid (the
head is the fastest grid axis), so a key tile is read from HBM once and from L2 by the
other heads of its group.

Precision: float32 inputs use an IEEE float32 ``tl.dot`` of ``scale * q`` (the reference's
order of operations); float16/bfloat16 inputs use the tensor-core dot (exact products,
float32 accumulation) scaled afterwards. The logits are kept in base 2 (times ``log2 e``):
each exponent is one fused multiply-add, ``raw · scale · log2 e − m`` (``m`` from the
maximum of the raw dot products, the scale being positive), and the exponential an
``exp2``. Under the interpreter the operands are upcast (the CPU interpreter mishandles
low-precision ``tl.dot``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import as_f32, cdiv, check_device, device_op, interpreting, launch, next_pow2

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_queries(q_ptr, bh, q_heads, q_len, dim, r, stride_qb, stride_qh, stride_ql, stride_qd, scale,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr):
    """The last ``r`` queries of head ``bh`` as a ``[BLOCK_R, BLOCK_D]`` tile (rows >= r are 0)."""
    batch = bh // q_heads
    head = bh % q_heads
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ptrs = (q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
            + (q_len - r + rows).to(tl.int64)[:, None] * stride_ql + cols[None, :] * stride_qd)
    q = tl.load(ptrs, mask=(rows < r)[:, None] & (cols < dim)[None, :], other=0.0)
    if FP32_DOT:
        q = as_f32(scale) * q.to(tl.float32)
    return q


@triton.jit
def _key_block(
    m_split, l_split, q, k_base, k_pool_ptr, stats_ptr, bh, bkv, j, pool_here, kv_len, dim, r, rem,
    n_kv_blocks, qk_scale, stride_kl, stride_kd,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32_DOT: tl.constexpr, FULL_D: tl.constexpr, THIRD_GROUP: tl.constexpr, MASKED: tl.constexpr,
):
    """Store the statistics of key block ``j`` (and its pooled key); add it to the split's ``(max, sum)``.

    No reduction across the program's warps: those wait for every warp at each block (the
    pooled key is row 0 of its tensor-core column sums, stored as it lies).

    ``MASKED``: the block may hold keys past the end or later than some row's position
    (only the last block or two); the other blocks skip every mask. ``FULL_D``: ``dim`` is
    ``BLOCK_D``. ``THIRD_GROUP``: tiles can touch a third offset group
    (``rem >= b + 2 - r``).
    """
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    rows = tl.arange(0, BLOCK_R)
    position = kv_len - r + rows
    first_row = (tl.arange(0, 16)[:, None] == 0) & (tl.arange(0, BLOCK_N)[None, :] >= 0)
    first_row = first_row.to(tl.float32 if FP32_DOT else k_base.dtype.element_ty)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    l1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    l2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    k_sum = tl.zeros([16, BLOCK_D], dtype=tl.float32)  # row 0: the column sums (no reduction)
    for c_first in tl.static_range(0, BLOCK, BLOCK_N):
        c = c_first + tl.arange(0, BLOCK_N)
        keys = j * BLOCK + c
        ptrs = k_base + keys.to(tl.int64)[:, None] * stride_kl + cols[None, :] * stride_kd
        if MASKED:
            kt = tl.load(ptrs, mask=(keys < kv_len)[:, None] & col_ok[None, :], other=0.0)
        elif FULL_D:
            kt = tl.load(ptrs)
        else:
            kt = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        if pool_here:  # column sums on the tensor cores: row 0 of ones(0-th row) @ kt
            if FP32_DOT:
                k_sum = tl.dot(first_row, kt.to(tl.float32), k_sum, input_precision="ieee")
            else:
                k_sum = tl.dot(first_row, kt, k_sum)
        if FP32_DOT:
            raw = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            raw = tl.dot(q, tl.trans(kt))
        if MASKED:
            raw = tl.where(keys[None, :] <= position[:, None], raw, float("-inf"))
        # base-2 logits are raw * qk_scale: the scale folds into exp2's argument (one FMA)
        m_new = tl.maximum(m, tl.max(raw, axis=1) * qk_scale)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(raw * qk_scale - m_ref[:, None])
        # offset group of (row i, key j*b + c) is C - j + d: d = 0 iff c - i >= rem,
        # d = 2 iff c - i <= rem - b - 1 (possible only if rem >= b + 2 - r), else d = 1
        low = tl.sum(tl.where(c[None, :] >= rows[:, None] + rem, p, 0.0), axis=1)
        rest = tl.sum(p, axis=1) - low
        if THIRD_GROUP:
            high = tl.sum(tl.where(c[None, :] <= rows[:, None] + (rem - BLOCK - 1), p, 0.0), axis=1)
            rest -= high
            l2 = l2 * alpha + high
        else:
            l2 = l2 * alpha
        l0 = l0 * alpha + low
        l1 = l1 * alpha + tl.maximum(rest, 0.0)
        m = m_new
    out = stats_ptr + ((bh.to(tl.int64) * n_kv_blocks + j) * 4) * BLOCK_R + rows
    tl.store(out, m)
    tl.store(out + BLOCK_R, l0)
    tl.store(out + 2 * BLOCK_R, l1)
    tl.store(out + 3 * BLOCK_R, l2)
    # masked stores, not a branch: a branch here costs the loop its pipelining
    count = tl.maximum(tl.minimum(kv_len - j * BLOCK, BLOCK), 1).to(tl.float32)
    row0 = (tl.arange(0, 16) == 0)[:, None]
    tl.store(k_pool_ptr + (bkv * n_kv_blocks + j) * dim + cols[None, :] + 0 * tl.arange(0, 16)[:, None],
             k_sum / count, mask=row0 & col_ok[None, :] & pool_here)
    # running log-sum-exp (base 2) of the split
    top = tl.maximum(m_split, m)
    top_ref = tl.where(top == float("-inf"), 0.0, top)
    return top, l_split * tl.exp2(m_split - top_ref) + (l0 + l1 + l2) * tl.exp2(m - top_ref)


@triton.jit
def _tile_kernel(
    q_ptr, k_ptr, stats_ptr, lse_ptr, k_pool_ptr,
    q_heads, group, q_len, kv_len, dim, r, n_kv_blocks, n_clean, n_splits, rem, scale,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCKS_PER_SPLIT: tl.constexpr, FP32_DOT: tl.constexpr, FULL_D: tl.constexpr, THIRD_GROUP: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    scale = as_f32(scale)
    # logits in base 2 (exp2 needs no extra multiply); float32 queries come pre-scaled
    qk_scale = LOG2E if FP32_DOT else scale * LOG2E
    q = _load_queries(q_ptr, bh, q_heads, q_len, dim, r, stride_qb, stride_qh, stride_ql, stride_qd,
                      scale, BLOCK_R, BLOCK_D, FP32_DOT)
    batch = bh // q_heads
    k_head = (bh % q_heads) // group
    pool_here = (bh % q_heads) % group == 0  # one query head per key head pools the keys
    bkv = (batch * (q_heads // group) + k_head).to(tl.int64)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + k_head.to(tl.int64) * stride_kh
    m_split = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_split = tl.zeros([BLOCK_R], dtype=tl.float32)
    # blocks j0 .. j0 + clean - 1 need no mask (every key visible to every row), the rest do;
    # two loops without a branch inside, so the compiler pipelines the key loads
    j0 = split * BLOCKS_PER_SPLIT
    j_end = tl.minimum(j0 + BLOCKS_PER_SPLIT, n_kv_blocks)
    j_mid = tl.maximum(tl.minimum(n_clean, j_end), j0)
    if INTERPRETED:  # the interpreter takes no tensor bounds in range(): while loops, same blocks
        j = j0
        while j < j_mid:
            m_split, l_split = _key_block(m_split, l_split, q, k_base, k_pool_ptr, stats_ptr, bh, bkv, j,
                                          pool_here, kv_len, dim, r, rem, n_kv_blocks, qk_scale, stride_kl, stride_kd,
                                          BLOCK, BLOCK_R, BLOCK_N, BLOCK_D, FP32_DOT, FULL_D, THIRD_GROUP, False)
            j += 1
        while j < j_end:
            m_split, l_split = _key_block(m_split, l_split, q, k_base, k_pool_ptr, stats_ptr, bh, bkv, j,
                                          pool_here, kv_len, dim, r, rem, n_kv_blocks, qk_scale, stride_kl, stride_kd,
                                          BLOCK, BLOCK_R, BLOCK_N, BLOCK_D, FP32_DOT, FULL_D, THIRD_GROUP, True)
            j += 1
    else:
        for j in range(j0, j_mid):
            m_split, l_split = _key_block(m_split, l_split, q, k_base, k_pool_ptr, stats_ptr, bh, bkv, j,
                                          pool_here, kv_len, dim, r, rem, n_kv_blocks, qk_scale, stride_kl, stride_kd,
                                          BLOCK, BLOCK_R, BLOCK_N, BLOCK_D, FP32_DOT, FULL_D, THIRD_GROUP, False)
        for j in range(j_mid, j_end):
            m_split, l_split = _key_block(m_split, l_split, q, k_base, k_pool_ptr, stats_ptr, bh, bkv, j,
                                          pool_here, kv_len, dim, r, rem, n_kv_blocks, qk_scale, stride_kl, stride_kd,
                                          BLOCK, BLOCK_R, BLOCK_N, BLOCK_D, FP32_DOT, FULL_D, THIRD_GROUP, True)
    lse = tl.where(l_split > 0.0, m_split + tl.log2(tl.where(l_split > 0.0, l_split, 1.0)), float("-inf"))
    rows = tl.arange(0, BLOCK_R)
    tl.store(lse_ptr + (bh.to(tl.int64) * n_splits + split) * BLOCK_R + rows, lse)


@triton.jit
def _mass_kernel(
    stats_ptr, lse_ptr, true_ptr, parts_ptr,
    r, n_kv_blocks, n_splits, inv_r,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCKS: tl.constexpr,
):
    bh = tl.program_id(0)
    inv_r = as_f32(inv_r)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < r
    # log-sum-exp of each row from the splits' partials (fixed order: deterministic)
    splits = tl.arange(0, BLOCK_S)
    part = tl.load(lse_ptr + (bh.to(tl.int64) * n_splits + splits[:, None]) * BLOCK_R + rows[None, :],
                   mask=(splits < n_splits)[:, None], other=float("-inf"))
    top = tl.max(part, axis=0)
    top_ref = tl.where(top == float("-inf"), 0.0, top)
    total_exp = tl.sum(tl.exp2(part - top_ref[None, :]), axis=0)
    lse = top_ref + tl.log2(tl.where(row_ok, total_exp, 1.0))

    j = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    ok = (j < n_kv_blocks)[:, None] & row_ok[None, :]
    base = stats_ptr + ((bh.to(tl.int64) * n_kv_blocks + j) * 4)[:, None] * BLOCK_R + rows[None, :]
    m = tl.load(base, mask=ok, other=float("-inf"))
    weight = tl.where(ok & (m > float("-inf")), tl.exp2(m - lse[None, :]), 0.0)
    l0 = tl.load(base + BLOCK_R, mask=ok, other=0.0) * weight
    l1 = tl.load(base + 2 * BLOCK_R, mask=ok, other=0.0) * weight
    l2 = tl.load(base + 3 * BLOCK_R, mask=ok, other=0.0) * weight
    out = bh.to(tl.int64) * n_kv_blocks + j
    in_range = j < n_kv_blocks
    tl.store(true_ptr + out, tl.sum(l0 + l1 + l2, axis=1) * inv_r, mask=in_range)
    tl.store(parts_ptr + out * 3, tl.sum(l0, axis=1) * inv_r, mask=in_range)
    tl.store(parts_ptr + out * 3 + 1, tl.sum(l1, axis=1) * inv_r, mask=in_range)
    tl.store(parts_ptr + out * 3 + 2, tl.sum(l2, axis=1) * inv_r, mask=in_range)


def slash_origin(q_len: int, kv_len: int, block_size: int) -> tuple[int, int]:
    """``(rem, C)``: ``rem = (Lk - r + 1) mod b`` and the group ``C`` of ``parts[0, 0]``.

    ``parts[j, d]`` holds the mass of offset group ``C - j + d``.
    """
    r = min(block_size, q_len)
    rem = (kv_len - r + 1) % block_size
    origin = (kv_len - r + 1 - block_size - rem) // block_size
    return rem, origin


TUNING: dict[str, int] = {
    "tile_elems": 16384, "programs": 512, "num_warps": 4, "num_stages": 2, "mass_cells": 4096, "mass_warps": 4,
}
"""Launch parameters of :func:`_tile_kernel`: key-tile size ``BLOCK_R × BLOCK_N`` (elements),
target program count (split-K), warps and pipeline stages; of :func:`_mass_kernel`, the
statistics per program (``blocks × BLOCK_R``) and warps. Chosen on an H200 with
``benchmarks/kernel_tuning.py``, which overrides them to measure candidates."""


@device_op("flexprefill::representative_attention")
def representative_attention(
    q: Tensor, k: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``â``, the per-block slash parts, and the pooled keys.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (same dtype, any strides).
        block_size: ``b``; scale: softmax scale.

    Returns:
        ``true_blocks [B, Hq, nk]`` float32, ``â`` of ``reference.representative_attention``;
        ``parts [B, Hq, nk, 3]`` float32: ``parts[j, d]`` is the mean mass of key block ``j``
        in offset group ``C - j + d`` (see :func:`slash_origin`, :func:`slash_from_parts`);
        ``k_pool [B, Hkv, nk, D]`` float32 (``reference.pool_blocks(k)``; its non-finite
        entries are counted by :func:`.pattern.head_pattern`).
    """
    check_device(q, _tile_kernel)
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    r = min(block_size, q_len)
    n_kv = -(-kv_len // block_size)
    bh = batch * q_heads
    interp = interpreting(_tile_kernel)
    block_r = next_pow2(r)
    block_d = next_pow2(dim)
    block_n = min(block_size, max(16, TUNING["tile_elems"] // max(block_r, block_d)))
    fp32_dot = q.dtype == torch.float32 or interp
    rem, _ = slash_origin(q_len, kv_len, block_size)
    dev = q.device

    # split-K over key blocks: ~1024 programs on a GPU (few, large ones when interpreted)
    splits = max(1, min(n_kv, 2 if interp else 64, -(-TUNING["programs"] // bh)))
    per_split = next_pow2(cdiv(n_kv, splits), 1)
    n_splits = -(-n_kv // per_split)
    n_clean = max(0, (kv_len - r + 1) // block_size)  # blocks every row sees whole
    stats = torch.empty(bh, n_kv, 4, block_r, device=dev, dtype=torch.float32)
    lse = torch.empty(bh, n_splits, block_r, device=dev, dtype=torch.float32)
    k_pool = torch.empty(batch, kv_heads, n_kv, dim, device=dev, dtype=torch.float32)
    launch(_tile_kernel)[(bh, n_splits)](
        q, k, stats, lse, k_pool, q_heads, group, q_len, kv_len, dim, r, n_kv, n_clean, n_splits, rem, scale,
        *q.stride(), *k.stride(),
        BLOCK=block_size, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCKS_PER_SPLIT=per_split, FP32_DOT=fp32_dot, FULL_D=dim == block_d, THIRD_GROUP=rem >= block_size + 2 - r,
        INTERPRETED=interp, num_warps=TUNING["num_warps"] if block_r * block_n >= TUNING["tile_elems"] else 4,
        num_stages=TUNING["num_stages"],
    )
    blocks = next_pow2(n_kv, 1) if interp else max(1, min(next_pow2(n_kv, 1), TUNING["mass_cells"] // block_r))
    true_blocks = torch.empty(batch, q_heads, n_kv, device=dev, dtype=torch.float32)
    parts = torch.empty(batch, q_heads, n_kv, 3, device=dev, dtype=torch.float32)
    launch(_mass_kernel)[(bh, -(-n_kv // blocks))](
        stats, lse, true_blocks, parts, r, n_kv, n_splits, 1.0 / r,
        BLOCK_R=block_r, BLOCK_S=next_pow2(n_splits, 1), BLOCKS=blocks, num_warps=TUNING["mass_warps"],
    )
    return true_blocks, parts, k_pool


def slash_from_parts(parts: Tensor, q_len: int, kv_len: int, block_size: int) -> Tensor:
    """Slash mass per offset group, ``[..., nk, 3] -> [..., nk]`` (``reference.pool_slash``).

    Plain torch gather-and-add (three fixed-order terms); the pipeline fuses the same sum
    into :mod:`.pattern`. Used by the tests.
    """
    _, origin = slash_origin(q_len, kv_len, block_size)
    n = parts.shape[-2]
    groups = torch.arange(n, device=parts.device)
    slash = torch.zeros(parts.shape[:-1], device=parts.device, dtype=parts.dtype)
    for d in range(3):
        j = origin + d - groups
        ok = (j >= 0) & (j < n)
        slash = slash + torch.where(ok, parts[..., j.clamp(0, n - 1), d], 0.0)
    return slash
