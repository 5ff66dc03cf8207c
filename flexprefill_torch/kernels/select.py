"""Block selection: sink, local and min-budget rules, γ-selection, line extension, budget cap.

Must match, in ``reference.flex_prefill_reference``: the block scores ``Ā`` (softmax over
the visible blocks), ``reference.vertical_slash_block_scores``,
``reference.strongest_blocks`` (min budget), ``reference.select_query_aware`` (global,
Algorithm 4, or per row), ``reference.extend_lines``, ``reference.cap_blocks`` and the
dense fallback of non-sparse heads. Ties at a γ-crossing value are all kept (the
reference keeps the first of them in index order); every other choice is the same.

Kernels (the active map is written once per row, by the rows kernel or by the decide
kernel):

* :func:`_rows_kernel`, one program per (query head, group of query-block rows), the
  rows in registers as a ``[rows, nk]`` tile: scores, forced blocks (top-``m`` by bisection on the float bits, ties by
  index), then the final row for vertical-slash heads, per-row query-aware heads and
  dense heads. For global query-aware heads it writes ``x = Ā/nq`` of the free visible
  blocks (``-2`` forced, ``-1`` invisible) and the forced mass of the row.
* :func:`_threshold_pass_kernel`, launched 8 times: a radix select, weighted by mass,
  of the global γ-crossing of Algorithm 4 over the ``nq·nk`` entries of a head, on the
  float32 bit pattern (non-negative floats order like their bits), 4 bits per pass
  (16 buckets; the last pass 3 bits). Each program reads the visible part of some rows
  of ``x`` and writes a 16-bucket float64 mass histogram of the entries whose higher bits
  equal the prefix found so far; the head's last program to finish (an atomic ticket)
  sums the histograms in a fixed order (deterministic), extends the prefix by the largest
  bucket whose mass-above still reaches γ, and stores it for the next pass. No sort of
  ``nq·nk`` entries; the only atomics are the per-head tickets.
* :func:`_decide_kernel`: the final threshold, the active rows of global query-aware heads
  (forced, or ``x`` at or above the threshold), and the cap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (
    check_device,
    device_op,
    float_key,
    gamma_f64,
    interpreting,
    launch,
    mass_threshold,
    next_pow2,
    split_gamma,
    top_count,
    top_few,
)

PASS_WIDTHS = (4, 4, 4, 4, 4, 4, 4, 3)
"""Bits of the 31-bit key resolved by each threshold pass, most significant first."""

FEW_BLOCKS = 16
"""Min budgets of at most this many blocks use max-extraction (``_utils.top_few``), larger
ones the 31-step bisection (``_utils.top_count``)."""


@triton.jit
def _cap(active, forced, key, max_blocks):
    """Per row: ``forced`` plus the best ``max(max_blocks - #forced, 0)`` other active blocks."""
    room = tl.maximum(max_blocks - tl.sum(forced.to(tl.int32), axis=1), 0)
    return forced | top_count(key, active & ~forced, room)


@triton.jit
def _strongest(key, visible, min_blocks, FEW: tl.constexpr):
    """The min budget: each row's ``min_blocks`` best visible blocks (``reference.strongest_blocks``).

    ``FEW`` is ``min_blocks`` when it is at most :data:`FEW_BLOCKS` (max-extraction), else 0.
    """
    if FEW > 0:
        return top_few(key, visible, FEW)
    return top_count(key, visible, min_blocks)


@triton.jit
def _rows_kernel(
    logits_ptr, flags_ptr, true_ptr, slash_ptr, vsel_ptr, ssel_ptr, active_ptr, x_ptr, base_ptr,
    q_len, kv_len, n_q_blocks, n_kv_blocks, min_blocks, max_blocks, gamma_hi, gamma_lo,
    BLOCK: tl.constexpr, BLOCK_NK: tl.constexpr, ROWS: tl.constexpr, PER_ROW: tl.constexpr,
    CAP: tl.constexpr, FEW: tl.constexpr,
):
    # PER_ROW is also set when the global buffers (x, base) are not allocated
    bh = tl.program_id(1)
    flags = tl.load(flags_ptr + bh)
    offset = kv_len - q_len
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, BLOCK_NK)
    in_map = (i < n_q_blocks)[:, None] & (j < n_kv_blocks)[None, :]
    q_first = (offset + i * BLOCK)[:, None]
    q_last = (offset + tl.minimum((i + 1) * BLOCK, q_len) - 1)[:, None]
    k_first = (j * BLOCK)[None, :]
    k_last = (tl.minimum(j * BLOCK + BLOCK, kv_len) - 1)[None, :]
    visible = in_map & (k_first <= q_last)
    diagonal = (j[None, :] >= q_first // BLOCK) & (j[None, :] <= q_last // BLOCK)
    forced = visible & ((j == 0)[None, :] | diagonal)
    rows = bh.to(tl.int64) * n_q_blocks + i
    cells = rows[:, None] * n_kv_blocks + j[None, :]
    head = bh.to(tl.int64) * n_kv_blocks
    gamma = gamma_f64(gamma_hi, gamma_lo)

    if (flags & 2) == 0:  # dense fallback: every visible block
        tl.store(active_ptr + cells, visible, mask=in_map)
    elif (flags & 1) != 0:  # query-aware: Ā = softmax over the visible blocks
        logits = tl.load(logits_ptr + cells, mask=visible, other=float("-inf"))
        top = tl.max(logits, axis=1)
        e = tl.where(visible, tl.exp(logits - tl.where(top == float("-inf"), 0.0, top)[:, None]), 0.0)
        total = tl.sum(e, axis=1)
        scores = e / tl.where(total == 0.0, 1.0, total)[:, None]
        key = float_key(scores)
        forced = forced | _strongest(key, visible, min_blocks, FEW)
        if PER_ROW:
            base = tl.sum(tl.where(forced, scores, 0.0).to(tl.float64), axis=1)
            free = in_map & ~forced
            kappa = mass_threshold(scores, free, base, gamma)
            active = visible & (forced | (free & (key >= kappa[:, None])))
            if CAP:
                active = _cap(active, forced, key, max_blocks)
            tl.store(active_ptr + cells, active, mask=in_map)
        else:
            x = scores / n_q_blocks
            tl.store(x_ptr + cells, tl.where(forced, -2.0, tl.where(visible, x, -1.0)), mask=in_map)
            base = tl.sum(tl.where(forced, x, 0.0).to(tl.float64), axis=1)
            tl.store(base_ptr + rows, base, mask=i < n_q_blocks)
    else:  # vertical-slash: v[j] + max s[g] over the offset groups crossing the block
        lowest = tl.maximum(q_first - k_last, 0) // BLOCK
        highest = tl.maximum(q_last - k_first, 0) // BLOCK
        g1 = tl.minimum(lowest + 1, highest)
        g2 = tl.minimum(lowest + 2, highest)
        s0 = tl.load(slash_ptr + head + lowest, mask=in_map, other=0.0)
        s1 = tl.load(slash_ptr + head + g1, mask=in_map, other=0.0)
        s2 = tl.load(slash_ptr + head + g2, mask=in_map, other=0.0)
        vertical = tl.load(true_ptr + head + j, mask=j < n_kv_blocks, other=0.0)
        scores = vertical[None, :] + tl.maximum(tl.maximum(s0, s1), s2)
        key = float_key(scores)
        forced = forced | _strongest(key, visible, min_blocks, FEW)
        hit = (tl.load(vsel_ptr + head + j, mask=j < n_kv_blocks, other=0) != 0)[None, :]
        hit = hit | (tl.load(ssel_ptr + head + lowest, mask=in_map, other=0) != 0)
        hit = hit | (tl.load(ssel_ptr + head + g1, mask=in_map, other=0) != 0)
        hit = hit | (tl.load(ssel_ptr + head + g2, mask=in_map, other=0) != 0)
        active = visible & (forced | hit)
        if CAP:
            active = _cap(active, forced, key, max_blocks)
        tl.store(active_ptr + cells, active, mask=in_map)


@triton.jit
def _advance(prefix, above, base, hist_ptr, n_progs, gamma, width, BLOCK_P: tl.constexpr):
    """Extend the key prefix by ``width`` bits: the largest bucket whose mass-above reaches γ.

    ``above`` is the mass of the entries whose key prefix is larger than ``prefix``;
    ``hist_ptr`` points at this head's ``[n_progs, 16]`` histograms, summed in a fixed
    order (read past L1: they were written by other programs).
    """
    progs = tl.arange(0, BLOCK_P)
    buckets = tl.arange(0, 16)
    tile = tl.load(hist_ptr + progs[:, None] * 16 + buckets[None, :], mask=(progs < n_progs)[:, None],
                   other=0.0, cache_modifier=".cg")
    hist = tl.sum(tile, axis=0)
    above_k = tl.sum(tl.where(buckets[None, :] >= buckets[:, None], hist[None, :], 0.0), axis=1)
    reach = (base + above + above_k >= gamma) & (buckets < (1 << width))
    best = tl.max(tl.where(reach, buckets, 0), axis=0)
    above = above + tl.sum(tl.where(buckets > best, hist, 0.0), axis=0)
    return ((prefix << width) + best).to(tl.int32), above


@triton.jit
def _threshold_pass_kernel(
    x_ptr, flags_ptr, base_ptr, state_ptr, hist_ptr, ticket_ptr,
    q_len, kv_len, n_q_blocks, n_kv_blocks, n_progs, gamma_hi, gamma_lo, pass_index, shift, width,
    BLOCK: tl.constexpr, BLOCK_NK: tl.constexpr, BLOCK_NQ: tl.constexpr, BLOCK_P: tl.constexpr,
    ROWS: tl.constexpr, ROW_CHUNK: tl.constexpr, COL_CHUNK: tl.constexpr,
):
    p = tl.program_id(0)
    bh = tl.program_id(1)
    flags = tl.load(flags_ptr + bh)
    if (flags & 3) == 3:  # sparse and query-aware
        state = state_ptr + bh.to(tl.int64) * 4  # prefix, above, base (float64)
        prefix = tl.load(state, mask=pass_index > 0, other=0.0).to(tl.int32)  # 0 before pass 0
        offset = kv_len - q_len
        buckets = tl.arange(0, 16)
        acc = tl.zeros([16], dtype=tl.float64)
        for step in range(ROWS // ROW_CHUNK):  # rows p, p + n_progs, ... (balanced)
            i = p + (step * ROW_CHUNK + tl.arange(0, ROW_CHUNK)) * n_progs
            seen = tl.minimum((offset + tl.minimum((i + 1) * BLOCK, q_len) - 1) // BLOCK + 1, n_kv_blocks)
            seen = tl.where(i < n_q_blocks, seen, 0)
            rows = bh.to(tl.int64) * n_q_blocks + i
            for chunk in range(BLOCK_NK // COL_CHUNK):  # visible blocks only
                j = chunk * COL_CHUNK + tl.arange(0, COL_CHUNK)
                ok = j[None, :] < seen[:, None]
                x = tl.load(x_ptr + rows[:, None] * n_kv_blocks + j[None, :], mask=ok, other=-1.0)
                key = x.to(tl.int32, bitcast=True)
                inside = (key >= 0) & ((key >> (shift + width)) == prefix)
                if tl.sum(inside.to(tl.int32)) > 0:
                    bucket = (key >> shift) & ((1 << width) - 1)
                    hit = inside[:, :, None] & (bucket[:, :, None] == buckets[None, None, :])
                    mass = tl.sum(tl.reshape(tl.where(hit, x[:, :, None], 0.0), [ROW_CHUNK * COL_CHUNK, 16]),
                                  axis=0)
                    acc += mass.to(tl.float64)
        head_hist = hist_ptr + bh.to(tl.int64) * n_progs * 16
        tl.store(head_hist + p * 16 + buckets, acc)
        # the head's last program to finish extends the prefix for the next pass
        if tl.atomic_add(ticket_ptr + bh, 1, sem="acq_rel") == n_progs - 1:
            gamma = gamma_f64(gamma_hi, gamma_lo)
            if pass_index == 0:
                qb = tl.arange(0, BLOCK_NQ)
                base = tl.sum(tl.load(base_ptr + bh.to(tl.int64) * n_q_blocks + qb,
                                      mask=qb < n_q_blocks, other=0.0), axis=0)
                above = tl.zeros([], dtype=tl.float64)
            else:
                base = tl.load(state + 2)
                above = tl.load(state + 1)
            prefix, above = _advance(prefix, above, base, head_hist, n_progs, gamma, width, BLOCK_P)
            tl.store(state, prefix.to(tl.float64))
            tl.store(state + 1, above)
            tl.store(state + 2, base)
            tl.atomic_xchg(ticket_ptr + bh, 0)


@triton.jit
def _decide_kernel(
    x_ptr, flags_ptr, state_ptr, active_ptr, n_q_blocks, n_kv_blocks, max_blocks,
    BLOCK_NK: tl.constexpr, ROWS: tl.constexpr, CAP: tl.constexpr,
):
    bh = tl.program_id(1)
    flags = tl.load(flags_ptr + bh)
    if (flags & 3) == 3:
        kappa = tl.load(state_ptr + bh.to(tl.int64) * 4).to(tl.int32)
        i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        j = tl.arange(0, BLOCK_NK)
        in_map = (i < n_q_blocks)[:, None] & (j < n_kv_blocks)[None, :]
        cells = (bh.to(tl.int64) * n_q_blocks + i)[:, None] * n_kv_blocks + j[None, :]
        x = tl.load(x_ptr + cells, mask=in_map, other=-1.0)
        key = x.to(tl.int32, bitcast=True)
        forced = x == -2.0
        active = forced | (key >= kappa)
        if CAP:
            active = _cap(active, forced, key, max_blocks)
        tl.store(active_ptr + cells, active, mask=in_map)


TUNING: dict[str, int] = {"row_cells": 1024, "num_warps": 4, "pass_cells": 4096, "pass_warps": 8}
"""Launch parameters: map cells per program (whole rows) and warps of :func:`_rows_kernel`
and :func:`_decide_kernel`, and of :func:`_threshold_pass_kernel`. Chosen on an H200 with
``benchmarks/kernel_tuning.py``, which overrides them."""


@device_op("flexprefill::select_blocks")
def select_blocks(
    logits: Tensor,
    flags: Tensor,
    true_blocks: Tensor,
    slash: Tensor,
    vertical_selected: Tensor,
    slash_selected: Tensor,
    q_len: int,
    kv_len: int,
    block_size: int,
    gamma: float,
    min_blocks: int,
    max_blocks: int,
    per_row: bool,
    any_query_aware: bool,
) -> Tensor:
    """The active map of every (batch, query head).

    Args:
        logits: ``[B, Hq, nq, nk]`` float32, ``scale · Q̄ · K̄ᵀ`` (all blocks).
        flags: ``[B, Hq]`` int32 from :func:`.pattern.head_pattern`; true_blocks, slash:
            ``[B, Hq, nk]`` float32 (``â``, pooled slash); vertical_selected,
            slash_selected: ``[B, Hq, nk]`` bool.
        q_len, kv_len, block_size: ``Lq``, ``Lk``, ``b``; gamma: γ; min_blocks: blocks of
            the min budget; max_blocks: cap per row, ``-1`` for none.
        per_row: per-row query-aware selection (else global, Algorithm 4).
        any_query_aware: ``False`` when no head can be query-aware (``τ = 0``): the global
            threshold passes are skipped.

    Returns:
        ``active [B, Hq, nq, nk]`` bool, False outside the causally visible blocks.
    """
    check_device(logits, _rows_kernel)
    batch, heads, n_q, n_kv = logits.shape
    bh = batch * heads
    block_nk = next_pow2(n_kv)
    gamma_hi, gamma_lo = split_gamma(gamma)
    cap = max_blocks >= 0
    dev = logits.device
    active = torch.empty(batch, heads, n_q, n_kv, device=dev, dtype=torch.bool)
    global_qa = any_query_aware and not per_row
    x = torch.empty((batch, heads, n_q, n_kv) if global_qa else (1,), device=dev, dtype=torch.float32)
    base = torch.empty((bh, n_q) if global_qa else (1,), device=dev, dtype=torch.float64)
    interp = interpreting(_rows_kernel)
    # rows per program: whole heads under the interpreter, ~4k cells per program on a GPU
    cells = TUNING["row_cells"]
    rows = next_pow2(n_q, 1) if interp else max(1, min(next_pow2(n_q, 1), cells // block_nk))
    warps = TUNING["num_warps"] if rows * block_nk >= cells else 4
    launch(_rows_kernel)[(-(-n_q // rows), bh)](
        logits, flags, true_blocks, slash, vertical_selected, slash_selected, active, x, base,
        q_len, kv_len, n_q, n_kv, min_blocks, max_blocks, gamma_hi, gamma_lo,
        BLOCK=block_size, BLOCK_NK=block_nk, ROWS=rows, PER_ROW=not global_qa, CAP=cap,
        FEW=min_blocks if min_blocks <= FEW_BLOCKS else 0, num_warps=warps,
    )
    if not global_qa:
        return active

    # threshold passes: ~8k cells per program, rows p, p + n_progs, ... of one head
    pass_cells = TUNING["pass_cells"]
    pass_rows = next_pow2(n_q, 1) if interp else min(next_pow2(n_q, 1), next_pow2(pass_cells // block_nk, 1))
    n_progs = -(-n_q // pass_rows)
    row_chunk = pass_rows if interp else max(1, min(pass_rows, 1024 // block_nk))
    col_chunk = block_nk if interp else min(block_nk, 1024)
    state = torch.empty(bh, 4, device=dev, dtype=torch.float64)
    hist = torch.empty(bh, n_progs, 16, device=dev, dtype=torch.float64)
    ticket = torch.zeros(bh, device=dev, dtype=torch.int32)
    shift = 31
    for index, width in enumerate(PASS_WIDTHS):
        shift -= width
        launch(_threshold_pass_kernel)[(n_progs, bh)](
            x, flags, base, state, hist, ticket, q_len, kv_len, n_q, n_kv, n_progs, gamma_hi, gamma_lo,
            index, shift, width,
            BLOCK=block_size, BLOCK_NK=block_nk, BLOCK_NQ=next_pow2(n_q), BLOCK_P=next_pow2(n_progs),
            ROWS=pass_rows, ROW_CHUNK=row_chunk, COL_CHUNK=col_chunk, num_warps=TUNING["pass_warps"],
        )
    launch(_decide_kernel)[(-(-n_q // rows), bh)](
        x, flags, state, active, n_q, n_kv, max_blocks,
        BLOCK_NK=block_nk, ROWS=rows, CAP=cap, num_warps=warps,
    )
    return active
