"""Per-head pattern decision and vertical-slash line selection: one program per query head.

Must match, in ``reference.flex_prefill_reference``: the estimate ``ā`` (softmax of
``scale · mean(Q̂) · K̄ᵀ``), ``reference.pool_slash`` (from the per-block parts of
:mod:`.representative`), ``reference.js_distance`` (in float64, as there), the pattern ``D_JS < τ``, the dense
fallback flag (non-finite ``D_JS`` or pooled keys, counted here as they are read, or
``γ = 1``; the pooled queries
are checked later, by :mod:`.select`, for query-aware heads only) and the two
``reference.cumulative_select`` calls of step 5 (columns with the sink column forced;
offset groups).

Everything is ``O(nk)`` per head, so a whole head lives in one program's registers
(``next_pow2(nk)`` lanes; the ``γ``-selections are :func:`._utils.mass_threshold`, an
in-register sort and running sum). Fusing these steps saves about ten small
torch launches; the memory traffic is negligible either way.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (
    as_f32,
    check_device,
    device_op,
    float_key,
    gamma_f64,
    launch,
    mass_threshold,
    next_pow2,
    split_gamma,
)

QUERY_AWARE = 1
"""Bit of ``flags``: the head is query-aware (``D_JS < τ``)."""
SPARSE = 2
"""Bit of ``flags``: the head is sparse (else it keeps every visible block)."""


@triton.jit
def _pattern_kernel(
    q_ptr, k_pool_ptr, true_ptr, parts_ptr,
    est_ptr, slash_ptr, js_ptr, flags_ptr, vsel_ptr, ssel_ptr, density_ptr,
    q_heads, group, q_len, dim, r, n_kv_blocks, origin, scale, inv_r, tau,
    gamma_hi, gamma_lo, sparse_allowed,
    stride_qb, stride_qh, stride_ql, stride_qd,
    BLOCK_NK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr, LN2: tl.constexpr,
):
    bh = tl.program_id(0)
    scale = as_f32(scale)
    inv_r = as_f32(inv_r)
    tau = as_f32(tau)
    batch = bh // q_heads
    head = bh % q_heads
    bkv = batch * (q_heads // group) + head // group
    j = tl.arange(0, BLOCK_NK)
    j_ok = j < n_kv_blocks
    row = bh.to(tl.int64) * n_kv_blocks

    # ā = softmax_j(scale · mean(last r queries) · K̄_j), one chunk of head dims at a time.
    rows = tl.arange(0, BLOCK_R)
    q_base = (q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
              + (q_len - r + rows).to(tl.int64)[:, None] * stride_ql)
    logits = tl.zeros([BLOCK_NK], dtype=tl.float32)
    k_bad = bh * 0  # non-finite entries of the pooled keys
    for d0 in range(0, BLOCK_D, D_CHUNK):
        cols = d0 + tl.arange(0, D_CHUNK)
        col_ok = cols < dim
        qt = tl.load(q_base + cols[None, :] * stride_qd, mask=(rows < r)[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32)
        q_mean = scale * (tl.sum(qt, axis=0) * inv_r)
        kp = tl.load(k_pool_ptr + (bkv.to(tl.int64) * n_kv_blocks + j[:, None]) * dim + cols[None, :],
                     mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        logits += tl.sum(kp * q_mean[None, :], axis=1)
        k_bad += tl.sum(tl.sum((~(tl.abs(kp) < float("inf"))).to(tl.int32), axis=1), axis=0)
    logits = tl.where(j_ok, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0))
    est = e / tl.sum(e, axis=0)
    tl.store(est_ptr + row + j, est, mask=j_ok)

    # â and the slash mass of group g: Σ_d parts[origin + d - g, d] (fixed order).
    true_blocks = tl.load(true_ptr + row + j, mask=j_ok, other=0.0)
    slash = tl.zeros([BLOCK_NK], dtype=tl.float32)
    for d in tl.static_range(3):
        src = origin + d - j
        ok = j_ok & (src >= 0) & (src < n_kv_blocks)
        slash += tl.load(parts_ptr + (row + src) * 3 + d, mask=ok, other=0.0)
    tl.store(slash_ptr + row + j, slash, mask=j_ok)

    # D_JS = sqrt(JSD(ā ‖ â)), natural log, 0 log 0 = 0, in float64 (reference.js_distance).
    p = est.to(tl.float64)
    t = true_blocks.to(tl.float64)
    mid = 0.5 * (p + t)
    kl = (tl.where(p == 0.0, 0.0, p * (tl.log(tl.where(p == 0.0, 1.0, p)) - tl.log(tl.where(p == 0.0, 1.0, mid))))
          + tl.where(t == 0.0, 0.0, t * (tl.log(tl.where(t == 0.0, 1.0, t)) - tl.log(tl.where(t == 0.0, 1.0, mid)))))
    jsd = 0.5 * tl.sum(tl.where(j_ok, kl, 0.0), axis=0)
    jsd = tl.where(jsd == jsd, tl.minimum(tl.maximum(jsd, 0.0), LN2), jsd)  # clamp, NaN kept
    js = tl.sqrt(jsd).to(tl.float32)
    tl.store(js_ptr + bh, js)

    finite = (tl.abs(js) < float("inf")) & (k_bad == 0) & (sparse_allowed != 0)
    flags = tl.where(js < tau, 1, 0) + tl.where(finite, 2, 0)
    tl.store(flags_ptr + bh, flags.to(tl.int32))

    # Step 5: γ-prefixes of the columns (sink column forced) and of the offset groups.
    gamma = gamma_f64(gamma_hi, gamma_lo)
    # Row 0: columns, the sink column forced (its mass counts first); row 1: offset groups.
    line = tl.arange(0, 2)[:, None]
    scores = tl.where(line == 0, true_blocks[None, :], slash[None, :])
    cand = j_ok[None, :] & ((line == 1) | (j > 0)[None, :])
    first = tl.where(tl.arange(0, 2) == 0, tl.sum(tl.where(j == 0, true_blocks, 0.0)), 0.0)
    kappa = mass_threshold(scores, cand, first.to(tl.float64), gamma)
    chosen = (cand & (float_key(scores) >= kappa[:, None])) | ((line == 0) & (j == 0)[None, :])
    out = tl.where(line == 0, vsel_ptr, ssel_ptr) + row + j[None, :]
    tl.store(out, chosen, mask=j_ok[None, :] & (line < 2))

    # Forecast of the mask density: selected columns (+ offset groups for vertical-slash).
    fraction = tl.sum((chosen & j_ok[None, :]).to(tl.float32), axis=1) / n_kv_blocks
    vertical = tl.sum(tl.where(tl.arange(0, 2) == 0, fraction, 0.0), axis=0)
    both = tl.minimum(tl.sum(fraction, axis=0), 1.0)
    density = tl.where(finite, tl.where(js < tau, vertical, both), 1.0)
    tl.store(density_ptr + bh, density)


TUNING: dict[str, int] = {"chunk_cells": 16384, "num_warps": 8}
"""Launch parameters of :func:`_pattern_kernel`: pooled-key elements per step of ``ā``'s
logits (``nk × D_CHUNK``) and warps. Chosen on an H200 with
``benchmarks/kernel_tuning.py``, which overrides them."""


@device_op("flexprefill::head_pattern")
def head_pattern(
    q: Tensor,
    k_pool: Tensor,
    true_blocks: Tensor,
    parts: Tensor,
    block_size: int,
    kv_len: int,
    scale: float,
    tau: float,
    gamma: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pattern, dense fallback and the vertical/slash selections of every query head.

    Args:
        q: ``[B, Hq, Lq, D]`` (only the last ``r = min(b, Lq)`` rows are read).
        k_pool: ``[B, Hkv, nk, D]`` float32 pooled keys; true_blocks: ``[B, Hq, nk]`` ``â``;
        parts: ``[B, Hq, nk, 3]`` from :func:`.representative.representative_attention`.
        block_size, kv_len: ``b`` and ``Lk``; scale, tau, gamma: as in the config.

    Returns:
        ``estimate [B, Hq, nk]`` (``ā``), ``slash [B, Hq, nk]`` (pooled slash mass per
        offset group), ``js [B, Hq]`` float32, ``flags [B, Hq]`` int32
        (:data:`QUERY_AWARE` | :data:`SPARSE`), ``vertical_selected`` and
        ``slash_selected`` ``[B, Hq, nk]`` bool, and ``predicted_density [B, Hq]`` float32:
        the fraction of key blocks in the vertical selection, plus that of the slash
        selection for vertical-slash heads (at most 1), 1 for dense-fallback heads.
    """
    from .representative import slash_origin

    check_device(q, _pattern_kernel)
    batch, q_heads, q_len, dim = q.shape
    kv_heads, n_kv = k_pool.shape[1], k_pool.shape[2]
    r = min(block_size, q_len)
    _, origin = slash_origin(q_len, kv_len, block_size)
    shape = (batch, q_heads, n_kv)
    estimate = torch.empty(shape, device=q.device, dtype=torch.float32)
    slash = torch.empty(shape, device=q.device, dtype=torch.float32)
    js = torch.empty(batch, q_heads, device=q.device, dtype=torch.float32)
    flags = torch.empty(batch, q_heads, device=q.device, dtype=torch.int32)
    vsel = torch.empty(shape, device=q.device, dtype=torch.bool)
    ssel = torch.empty(shape, device=q.device, dtype=torch.bool)
    density = torch.empty(batch, q_heads, device=q.device, dtype=torch.float32)
    block_nk = next_pow2(n_kv)
    block_d = next_pow2(dim)
    gamma_hi, gamma_lo = split_gamma(gamma)
    launch(_pattern_kernel)[(batch * q_heads,)](
        q, k_pool, true_blocks, parts, estimate, slash, js, flags, vsel, ssel, density,
        q_heads, q_heads // kv_heads, q_len, dim, r, n_kv, origin, scale, 1.0 / r, tau,
        gamma_hi, gamma_lo, int(gamma < 1.0), *q.stride(),
        BLOCK_NK=block_nk, BLOCK_R=next_pow2(r), BLOCK_D=block_d,
        D_CHUNK=max(1, min(block_d, TUNING["chunk_cells"] // block_nk)), LN2=math.log(2.0),
        num_warps=TUNING["num_warps"],
    )
    return estimate, slash, js, flags, vsel, ssel, density
