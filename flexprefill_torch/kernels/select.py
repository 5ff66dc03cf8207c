"""Block selection: sink, local and min-budget rules, γ-selection, line extension, budget cap.

Must match, in ``reference.flex_prefill_reference``: the block scores ``Ā`` (softmax over
the visible blocks), ``reference.vertical_slash_block_scores``,
``reference.strongest_blocks`` (min budget), ``reference.select_query_aware`` (global,
Algorithm 4, or per row), ``reference.extend_lines``, ``reference.cap_blocks`` and the
dense fallback of non-sparse heads. Ties at a γ-crossing value are all kept (the
reference keeps the first of them in index order); every other choice is the same.

Kernels (the active map is written once per row, by the rows kernel or by the threshold
kernel):

* :func:`_rows_kernel`, one program per (query head, group of query-block rows), the
  rows in registers as a ``[rows, nk]`` tile: scores, forced blocks (the top ``m`` by
  max-extraction, or by bisection on the float bits for large ``m``; ties by index), then
  the final row for vertical-slash heads, per-row query-aware heads and dense heads. For
  global query-aware heads it writes ``x = Ā/nq`` of the free visible blocks (``-2``
  forced, ``-1`` invisible), the forced mass of the row, and the row's free mass per
  octave below ``1/nq`` (exact float64 sums: one exponent per bucket).
* :func:`_threshold_kernel`, one launch: the global γ-crossing of Algorithm 4 over the
  ``nq·nk`` entries of each global query-aware head, then that head's final rows. A radix
  select, weighted by mass, on the float32 bit pattern (non-negative floats order like
  their bits), 4 bits per round (16 buckets; the last round 3 bits), rounds 0–7 for bits
  30..0. The octave sums give the exponent (bits 30..23) at once (:func:`_octave_start`),
  so rounds 0 and 1 are skipped unless the crossing lies below the octaves summed. The grid
  has one program per SM; the kernel counts the heads that need the threshold on the
  device and gives each ``P = programs // heads`` of them (rows ``p, p + P, ...``; one
  program takes several heads in turn when they outnumber the programs). In each round
  every program writes a 16-bucket float64 mass histogram of its entries whose higher bits
  equal the prefix found so far, waits at a per-head barrier (an atomic counter) for the
  others, and sums the head's ``P`` histograms in a fixed order (so all extend the prefix
  alike) by the largest bucket whose mass-above still reaches γ. No sort of ``nq·nk``
  entries. The barrier needs the head's programs on the GPU at the same time, hence at
  most one program per SM (under the interpreter, which runs programs one by one, a
  single program). The scan of round ``keep_round`` (:data:`TUNING`) also lists, per
  program and in scan order, the entries inside its prefix (round 2: those with the
  crossing's sign and exponent; round 3: and its 4 leading mantissa bits); the later
  rounds scan that short list instead of the map (the map again if the list
  outgrew its room). A list round also gathers the head's entries still inside the
  prefix into one shared list (:func:`_share`, slots reserved by an atomic counter);
  once that list is complete (``shared_cells``, 256 entries: at 8k–32k, from the first
  list round on), each program sorts it and reads the crossing off the running mass
  (:func:`_shared_crossing`), which ends the search: the radix rounds left, each with its
  barrier, are skipped (on an H200 at 32k the kernel went from 55 to 44 µs). After the
  last round each program writes its rows: forced, or ``x`` at or above the threshold,
  and the cap. When ``Lq == Lk`` the scan is folded
  (:func:`_unit_cells`): row ``i`` has free blocks ``1..i-1`` only, so rows ``i`` and
  ``nq - 1 - i`` share one tile row, which halves the work of a round.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import (
    check_device,
    device_op,
    float32_exponent,
    float_key,
    gamma_f64,
    interpreting,
    launch,
    mass_threshold,
    next_pow2,
    register_cap,
    split_gamma,
    top_count,
    top_few,
)

ROUNDS = 8
"""Rounds of the radix select: bits 30..3 four at a time, then bits 2..0."""

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
    logits_ptr, flags_ptr, q_bad_ptr, true_ptr, slash_ptr, vsel_ptr, ssel_ptr, active_ptr, flags_out_ptr,
    x_ptr, base_ptr, count_ptr, octave_ptr, shared_count_ptr,
    q_len, kv_len, n_q_blocks, n_kv_blocks, min_blocks, max_blocks, gamma_hi, gamma_lo, top_exponent,
    BLOCK: tl.constexpr, BLOCK_NK: tl.constexpr, BLOCK_NQ: tl.constexpr, ROWS: tl.constexpr,
    PER_ROW: tl.constexpr, CAP: tl.constexpr, FEW: tl.constexpr, OCTAVES: tl.constexpr, ROUNDS: tl.constexpr,
):
    # PER_ROW is also set when the global buffers (x, base) are not allocated
    bh = tl.program_id(1)
    flags = tl.load(flags_ptr + bh)
    if (flags & 3) == 3:  # sparse query-aware: dense fallback if a pooled query is not finite
        qb = tl.arange(0, BLOCK_NQ)
        q_bad = tl.sum(tl.load(q_bad_ptr + bh.to(tl.int64) * n_q_blocks + qb, mask=qb < n_q_blocks, other=0))
        flags = tl.where(q_bad > 0, flags & 1, flags)
    if tl.program_id(0) == 0:
        tl.store(flags_out_ptr + bh, flags)
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
            if tl.program_id(0) == 0:  # the barrier counter and shared-list counters of _threshold_kernel
                tl.store(count_ptr + bh, 0)
                rounds = tl.arange(0, 16)
                tl.store(shared_count_ptr + bh * ROUNDS + rounds, 0, mask=rounds < ROUNDS)
            # the threshold's first step: the mass of the free entries per octave below 2^top_exponent
            octave = tl.minimum(tl.maximum(top_exponent - (float_key(x) >> 23), 0), OCTAVES + 1)
            octave = tl.where(visible & ~forced, octave, OCTAVES + 1)
            mass = x.to(tl.float64)
            buckets = tl.arange(0, 16)[None, :]
            hist = tl.zeros([ROWS, 16], dtype=tl.float64)
            for b in tl.static_range(OCTAVES + 1):  # per row, exact: one exponent per bucket (0: none)
                hist += tl.where(buckets == b, tl.sum(tl.where(octave == b, mass, 0.0), axis=1)[:, None], 0.0)
            tl.store(octave_ptr + rows[:, None] * 16 + buckets, hist, mask=(i < n_q_blocks)[:, None])
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
def _octave_start(octave_ptr, bh, base, gamma, n_rows, top_exponent,
                  ROUNDS: tl.constexpr, OCTAVES: tl.constexpr, OCTAVE_ROWS: tl.constexpr):
    """``(prefix, above, first round)`` of the radix select after the rows kernel's octave sums.

    The rows kernel summed each map row's free mass per octave ``d = top_exponent - exponent``
    (``1..OCTAVES``; ``0``: none, every entry is below ``2^top_exponent``), exactly, since a
    bucket holds one exponent. The largest exponent whose mass-above reaches γ is what
    rounds 0 and 1 (bits 30..23) would find: start at round 2 with it. When the crossing
    lies below the octaves, start at round 0; when ``base`` alone reaches γ, no round runs
    and no free entry is taken (prefix ``0x7FFFFFFF``, above every key).
    """
    buckets = tl.arange(0, 16)
    hist = tl.zeros([16], dtype=tl.float64)
    first = 0
    while first < n_rows:  # the head's map rows, in a fixed order
        r = first + tl.arange(0, OCTAVE_ROWS)
        tile = tl.load(octave_ptr + (bh.to(tl.int64) * n_rows + r)[:, None] * 16 + buckets[None, :],
                       mask=(r < n_rows)[:, None], other=0.0)
        hist += tl.sum(tile, axis=0)
        first += OCTAVE_ROWS
    reach = (base + tl.cumsum(hist, axis=0)) >= gamma
    crossing = tl.min(tl.where(reach, buckets, 16), axis=0)  # the mass-above only grows with d
    found = (crossing >= 1) & (crossing <= OCTAVES)
    above = tl.where(found, tl.sum(tl.where(buckets < crossing, hist, 0.0), axis=0), 0.0)
    prefix = tl.where(found, top_exponent - crossing, 0)
    index = tl.where(found, 2, 0)
    if base >= gamma:
        prefix = bh * 0 + 0x7FFFFFFF
        index = bh * 0 + ROUNDS
    return prefix.to(tl.int32), above, index


@triton.jit
def _advance(prefix, above, base, hist_ptr, n_progs, gamma, width, BLOCK_P: tl.constexpr):
    """Extend the key prefix by ``width`` bits: the largest bucket whose mass-above reaches γ.

    ``above`` is the mass of the entries whose key prefix is larger than ``prefix``;
    ``hist_ptr`` points at this round's ``[n_progs, 16]`` histograms of the head, summed in
    a fixed order (read past L1: other programs wrote them).
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
def _unit_cells(bh, units, lanes, offset, q_len, n_q_blocks, n_kv_blocks, n_units,
                BLOCK: tl.constexpr, FOLD: tl.constexpr):
    """Map cells (int64 index, in-range mask) at ``[units, lanes]`` of the threshold's scan.

    A unit is a row ``i`` (lanes = its visible columns), or with ``FOLD`` (``Lq == Lk``:
    row ``i`` sees columns ``0..i``, of which ``0`` and ``i`` are forced) the rows ``i`` and
    ``nq - 1 - i`` side by side: the free columns ``1..i-1`` of the one, then those of the
    other, ``nq - 3`` lanes in all, so the causal triangle fills the tile.
    """
    if FOLD:
        mirror = n_q_blocks - 1 - units
        first_len = tl.maximum(units - 1, 0)
        second_len = tl.where(mirror > units, tl.maximum(mirror - 1, 0), 0)
        in_first = lanes[None, :] < first_len[:, None]
        row = tl.where(in_first, units[:, None], mirror[:, None])
        col = tl.where(in_first, lanes[None, :] + 1, lanes[None, :] + 1 - first_len[:, None])
        ok = (units < n_units)[:, None] & (lanes[None, :] < (first_len + second_len)[:, None])
    else:
        seen = tl.minimum((offset + tl.minimum((units + 1) * BLOCK, q_len) - 1) // BLOCK + 1, n_kv_blocks)
        row = units[:, None]
        col = lanes[None, :]
        ok = (units < n_units)[:, None] & (col < seen[:, None])
    return (bh.to(tl.int64) * n_q_blocks + row) * n_kv_blocks + col, ok


@triton.jit
def _bucket_sums(x, prefix, shift, width):
    """``([16] float64, inside)``: mass per bucket of key bits ``shift + width - 1 .. shift``.

    Only entries whose higher key bits equal ``prefix`` (``inside``) count; forced ``-2``
    and invisible ``-1`` entries have negative keys and never do. ``x`` of any shape.
    """
    buckets = tl.arange(0, 16)
    acc = tl.zeros([16], dtype=tl.float64)
    key = x.to(tl.int32, bitcast=True)
    inside = (key >= 0) & ((key >> (shift + width)) == prefix)
    if tl.sum(inside.to(tl.int32)) > 0:
        bucket = tl.where(inside, (key >> shift) & ((1 << width) - 1), -1)
        mass = x.to(tl.float64)
        for b in tl.static_range(16):  # one reduction per bucket: no [cells, 16] temporary
            acc += tl.where(buckets == b, tl.sum(tl.where(bucket == b, mass, 0.0)), 0.0)
    return acc, inside


@triton.jit
def _bucket_mass(x_ptr, kept_ptr, bh, units, offset, q_len, n_q_blocks, n_kv_blocks, n_units, prefix, shift, width,
                 n_kept, keep, KEPT_CAP: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_NK: tl.constexpr, COL_CHUNK: tl.constexpr, FOLD: tl.constexpr):
    """:func:`_bucket_sums` over the map entries of ``units``; returns ``(acc, n_kept)``.

    With ``keep`` the entries inside the prefix are also appended, in scan order, to the
    program's list at ``kept_ptr`` (the first ``KEPT_CAP``; ``n_kept`` counts them all).
    """
    acc = tl.zeros([16], dtype=tl.float64)
    for chunk in range(BLOCK_NK // COL_CHUNK):
        lanes = chunk * COL_CHUNK + tl.arange(0, COL_CHUNK)
        cells, ok = _unit_cells(bh, units, lanes, offset, q_len, n_q_blocks, n_kv_blocks, n_units, BLOCK, FOLD)
        x = tl.load(x_ptr + cells, mask=ok, other=-1.0)
        part, inside = _bucket_sums(x, prefix, shift, width)
        acc += part
        if keep:
            flat = tl.reshape(inside, [units.shape[0] * COL_CHUNK]).to(tl.int32)
            slot = n_kept + tl.cumsum(flat, axis=0) - 1
            tl.store(kept_ptr + slot, tl.reshape(x, [units.shape[0] * COL_CHUNK]), mask=(flat > 0) & (slot < KEPT_CAP))
            n_kept += tl.sum(flat, axis=0)
    return acc, n_kept


@triton.jit
def _share(x, inside, shared_ptr, shared_count_ptr, SHARED_CAP: tl.constexpr):
    """Append the entries of ``x`` (1-D) that are ``inside`` to the head's shared list.

    Each call reserves its slots with one atomic on the round's counter, so the list's
    order depends on timing; its reader sorts it. Entries past ``SHARED_CAP`` are dropped,
    and the counter, which still counts them, tells the reader the list is incomplete.
    """
    flat = inside.to(tl.int32)
    n = tl.sum(flat, axis=0)
    if n > 0:
        start = tl.atomic_add(shared_count_ptr, n)
        slot = start + tl.cumsum(flat, axis=0) - 1
        tl.store(shared_ptr + slot, x, mask=(flat > 0) & (slot < SHARED_CAP))


@triton.jit
def _shared_crossing(shared_ptr, shared_count_ptr, reached, gamma, SHARED_CAP: tl.constexpr):
    """The key of the γ-crossing among the head's shared list, or ``-1``.

    The list holds every free entry inside the current prefix (``reached`` being the mass
    forced or above it) when its counter is at most ``SHARED_CAP``: sorted in descending
    order, the crossing is the first entry at which ``reached`` plus the running mass
    reaches γ, and its key is the final threshold (the radix rounds left would find the
    same key, up to the float64 rounding of the sums). Every program of the head reads the
    same list, so all find the same key. ``-1`` when the list is incomplete, or when its
    sums fall short of γ by rounding; the radix rounds then go on.
    """
    total = tl.load(shared_count_ptr, cache_modifier=".cg")
    key = total * 0 - 1
    if total <= SHARED_CAP:
        slots = tl.arange(0, SHARED_CAP)
        x = tl.load(shared_ptr + slots, mask=slots < total, other=-1.0, cache_modifier=".cg")
        x = tl.sort(x, descending=True)
        mass = tl.cumsum(tl.where(x >= 0.0, x, 0.0).to(tl.float64), axis=0)
        at = tl.min(tl.where((x >= 0.0) & (reached + mass >= gamma), slots, SHARED_CAP), axis=0)
        if at < SHARED_CAP:
            key = tl.sum(tl.where(slots == at, x, 0.0), axis=0).to(tl.int32, bitcast=True)
    return key


@triton.jit
def _head_threshold(
    x_ptr, base_ptr, hist_ptr, count_ptr, kept_ptr, active_ptr, octave_ptr, shared_ptr, shared_count_ptr,
    bh, p, n_progs, n_slots, q_len, kv_len, n_q_blocks, n_kv_blocks, max_blocks, gamma, top_exponent,
    BLOCK: tl.constexpr, BLOCK_NK: tl.constexpr, BLOCK_NQ: tl.constexpr, BLOCK_P: tl.constexpr,
    ROW_CHUNK: tl.constexpr, COL_CHUNK: tl.constexpr, DECIDE_ROWS: tl.constexpr, CAP: tl.constexpr,
    ROUNDS: tl.constexpr, FOLD: tl.constexpr, KEEP_ROUND: tl.constexpr, KEPT_CAP: tl.constexpr,
    LIST_CHUNK: tl.constexpr, OCTAVES: tl.constexpr, OCTAVE_ROWS: tl.constexpr, SHARED_CAP: tl.constexpr,
):
    """Part ``p`` of ``n_progs`` of head ``bh``'s threshold and final rows (rows ``p, p + n_progs, ...``).

    ``hist_ptr`` points at this program's ``[16]`` histogram of round 0; round ``r`` of the
    head's ``n_progs`` programs is the ``[n_progs, 16]`` tile ``r * n_slots * 16`` further on,
    starting ``p * 16`` before. The scan of round ``KEEP_ROUND`` lists the entries inside
    its prefix at ``kept_ptr`` (room for ``KEPT_CAP``); later rounds scan that list instead
    of the map when it is complete (each round's prefix extends the last, so later rounds'
    entries are all in it). A list round also appends the entries inside the prefix to the
    head's shared list (``shared_ptr``, room for ``SHARED_CAP``; ``0``: none) and, after
    its barrier, ends the search when that list is complete (:func:`_shared_crossing`).
    """
    offset = kv_len - q_len
    qb = tl.arange(0, BLOCK_NQ)
    base = tl.sum(tl.load(base_ptr + bh.to(tl.int64) * n_q_blocks + qb, mask=qb < n_q_blocks, other=0.0), axis=0)
    round_stride = n_slots * 16
    rows_here = tl.cdiv(n_q_blocks, n_progs)  # at most, rows p, p + n_progs, ... (balanced)
    n_units = (n_q_blocks + 1) // 2 if FOLD else n_q_blocks
    units_here = tl.cdiv(n_units, n_progs)  # scan units p, p + n_progs, ...
    prefix, above, index = _octave_start(octave_ptr, bh, base, gamma, n_q_blocks, top_exponent,
                                         ROUNDS, OCTAVES, OCTAVE_ROWS)
    first_round = index
    n_kept = bh * 0 + KEPT_CAP + 1  # no list yet
    shared_ptr += bh.to(tl.int64) * SHARED_CAP
    shared_count_ptr += bh * ROUNDS
    while index < ROUNDS:  # (while loops: the interpreter takes no tensor range bounds)
        width = 4 - index // (ROUNDS - 1)  # 4 bits, the last round 3
        shift = 27 - 4 * index + index // (ROUNDS - 1)
        acc = tl.zeros([16], dtype=tl.float64)
        first = 0
        from_list = n_kept <= KEPT_CAP  # the list of round KEEP_ROUND holds every entry still inside
        if from_list:
            while first < n_kept:  # (while loops: the interpreter takes no tensor range bounds)
                listed = first + tl.arange(0, LIST_CHUNK)
                x = tl.load(kept_ptr + listed, mask=listed < n_kept, other=-1.0)
                part, inside = _bucket_sums(x, prefix, shift, width)
                acc += part
                if SHARED_CAP > 0:
                    _share(x, inside, shared_ptr, shared_count_ptr + index, SHARED_CAP)
                first += LIST_CHUNK
        else:
            keep = index == KEEP_ROUND
            n_kept = tl.where(keep, 0, n_kept)
            while first < units_here:
                units = p + (first + tl.arange(0, ROW_CHUNK)) * n_progs
                part, n_kept = _bucket_mass(x_ptr, kept_ptr, bh, units, offset, q_len, n_q_blocks, n_kv_blocks,
                                            n_units, prefix, shift, width, n_kept, keep, KEPT_CAP,
                                            BLOCK, BLOCK_NK, COL_CHUNK, FOLD)
                acc += part
                first += ROW_CHUNK
        mine = hist_ptr + index * round_stride
        tl.store(mine + tl.arange(0, 16), acc)
        # barrier of the head's programs: every histogram of this round is written
        tl.debug_barrier()
        tl.atomic_add(count_ptr + bh, 1, sem="release")
        arrived = tl.atomic_add(count_ptr + bh, 0, sem="acquire")
        while arrived < (index + 1 - first_round) * n_progs:
            arrived = tl.atomic_add(count_ptr + bh, 0, sem="acquire")
        tl.debug_barrier()
        crossing = index * 0 - 1
        if SHARED_CAP > 0:  # noqa: SIM102 (a constexpr test: without a shared list nothing below is compiled)
            if from_list:
                crossing = _shared_crossing(shared_ptr, shared_count_ptr + index, base + above, gamma, SHARED_CAP)
        if crossing >= 0:  # the whole key at once: no round left
            prefix = crossing
            index = index * 0 + ROUNDS
        else:
            prefix, above = _advance(prefix, above, base, mine - p * 16, n_progs, gamma, width, BLOCK_P)
            index += 1
    # this program's rows: forced, or at or above the threshold; then the cap
    j = tl.arange(0, BLOCK_NK)
    first = 0
    while first < rows_here:
        i = p + (first + tl.arange(0, DECIDE_ROWS)) * n_progs
        in_map = (i < n_q_blocks)[:, None] & (j < n_kv_blocks)[None, :]
        cells = (bh.to(tl.int64) * n_q_blocks + i)[:, None] * n_kv_blocks + j[None, :]
        x = tl.load(x_ptr + cells, mask=in_map, other=-1.0)
        key = x.to(tl.int32, bitcast=True)
        forced = x == -2.0
        active = forced | (key >= prefix)
        if CAP:
            active = _cap(active, forced, key, max_blocks)
        tl.store(active_ptr + cells, active, mask=in_map)
        first += DECIDE_ROWS


@triton.jit
def _threshold_kernel(
    x_ptr, flags_ptr, base_ptr, hist_ptr, count_ptr, kept_ptr, active_ptr, octave_ptr, shared_ptr, shared_count_ptr,
    n_heads, n_slots, q_len, kv_len, n_q_blocks, n_kv_blocks, max_blocks, gamma_hi, gamma_lo, top_exponent,
    BLOCK: tl.constexpr, BLOCK_NK: tl.constexpr, BLOCK_NQ: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr, ROW_CHUNK: tl.constexpr, COL_CHUNK: tl.constexpr, DECIDE_ROWS: tl.constexpr,
    CAP: tl.constexpr, ROUNDS: tl.constexpr, FOLD: tl.constexpr, KEEP_ROUND: tl.constexpr,
    KEPT_CAP: tl.constexpr, LIST_CHUNK: tl.constexpr, OCTAVES: tl.constexpr, OCTAVE_ROWS: tl.constexpr,
    SHARED_CAP: tl.constexpr,
):
    # the heads that need the global threshold (sparse and query-aware), found on the device:
    # P = programs // heads of them each get P programs (one program per head if they outnumber
    # the programs, which then take several heads one after another)
    g = tl.program_id(0)  # of n_slots
    h = tl.arange(0, BLOCK_H)
    chosen = (tl.load(flags_ptr + h, mask=h < n_heads, other=0) & 3) == 3
    n_chosen = tl.sum(chosen.to(tl.int32), axis=0)
    rank = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    n_progs = tl.maximum(tl.minimum(n_slots // tl.maximum(n_chosen, 1), n_q_blocks), 1)
    p = g % n_progs
    gamma = gamma_f64(gamma_hi, gamma_lo)
    slot = g // n_progs
    while slot < n_chosen:
        bh = tl.sum(tl.where(chosen & (rank == slot), h, 0), axis=0)
        _head_threshold(
            x_ptr, base_ptr, hist_ptr + g * 16, count_ptr, kept_ptr + g.to(tl.int64) * KEPT_CAP, active_ptr,
            octave_ptr, shared_ptr, shared_count_ptr, bh, p, n_progs, n_slots, q_len, kv_len, n_q_blocks,
            n_kv_blocks, max_blocks, gamma, top_exponent,
            BLOCK, BLOCK_NK, BLOCK_NQ, BLOCK_P, ROW_CHUNK, COL_CHUNK, DECIDE_ROWS, CAP, ROUNDS, FOLD,
            KEEP_ROUND, KEPT_CAP, LIST_CHUNK, OCTAVES, OCTAVE_ROWS, SHARED_CAP,
        )
        slot += n_slots // n_progs


TUNING: dict[str, int] = {
    "row_cells": 1024, "num_warps": 4, "row_registers": 80,
    "pass_cells": 8192, "pass_rows": 16, "pass_warps": 8, "pass_programs": 0,
    "fold": 1, "decide_cells": 8192, "keep_round": 3, "kept_cells": 16384, "list_cells": 1024, "octaves": 14,
    "shared_cells": 256,
}
"""Launch parameters: map cells per program (whole rows), warps and register cap
(:func:`._utils.register_cap`) of :func:`_rows_kernel`;
of :func:`_threshold_kernel`, the map cells and (at most) scan units per step, warps,
programs (``0``: one per SM, at most that), the folded scan of ``Lq == Lk`` maps (``1``),
the map cells per step of its final rows, the round that lists the entries still inside,
the room of each program's list (a longer list is not used) and the list entries per step;
the octaves (at most 14) whose mass the rows kernel sums for the threshold's first step;
the room of each head's shared list (a power of two; ``0``: no shared list, every radix
round runs). Chosen on an H200 with
``benchmarks/kernel_tuning.py``, which overrides them."""


@functools.cache
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@device_op("flexprefill::select_blocks")
def select_blocks(
    logits: Tensor,
    flags: Tensor,
    q_bad: Tensor,
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
) -> tuple[Tensor, Tensor]:
    """The active map of every (batch, query head), and the final flags.

    Args:
        logits: ``[B, Hq, nq, nk]`` float32, ``scale · Q̄ · K̄ᵀ`` (all blocks).
        flags: ``[B, Hq]`` int32 from :func:`.pattern.head_pattern`; q_bad: ``[B, Hq, nq]``
            int32, non-finite counts of the pooled queries (read for sparse query-aware
            heads only: one makes the head dense); true_blocks, slash:
            ``[B, Hq, nk]`` float32 (``â``, pooled slash); vertical_selected,
            slash_selected: ``[B, Hq, nk]`` bool.
        q_len, kv_len, block_size: ``Lq``, ``Lk``, ``b``; gamma: γ; min_blocks: blocks of
            the min budget; max_blocks: cap per row, ``-1`` for none.
        per_row: per-row query-aware selection (else global, Algorithm 4).
        any_query_aware: ``False`` when no head can be query-aware (``τ = 0``): the global
            threshold is skipped.

    Returns:
        ``active [B, Hq, nq, nk]`` bool, False outside the causally visible blocks, and
        ``flags [B, Hq]`` int32: the input flags with :data:`.pattern.SPARSE` cleared for
        the query-aware heads whose pooled queries are not finite.
    """
    check_device(logits, _rows_kernel)
    batch, heads, n_q, n_kv = logits.shape
    bh = batch * heads
    block_nk = next_pow2(n_kv)
    gamma_hi, gamma_lo = split_gamma(gamma)
    cap = max_blocks >= 0
    dev = logits.device
    active = torch.empty(batch, heads, n_q, n_kv, device=dev, dtype=torch.bool)
    final_flags = torch.empty_like(flags)
    global_qa = any_query_aware and not per_row
    x = torch.empty((batch, heads, n_q, n_kv) if global_qa else (1,), device=dev, dtype=torch.float32)
    base = torch.empty((bh, n_q) if global_qa else (1,), device=dev, dtype=torch.float64)
    count = torch.empty(bh if global_qa else 1, device=dev, dtype=torch.int32)
    interp = interpreting(_rows_kernel)
    # rows per program: whole heads under the interpreter, ~1k cells per program on a GPU
    cells = TUNING["row_cells"]
    rows = next_pow2(n_q, 1) if interp else max(1, min(next_pow2(n_q, 1), cells // block_nk))
    warps = TUNING["num_warps"] if rows * block_nk >= cells else 4
    n_row_progs = -(-n_q // rows)
    octave_sums = torch.empty((bh, n_q, 16) if global_qa else (1,), device=dev, dtype=torch.float64)
    shared_count = torch.empty((bh, ROUNDS) if global_qa else (1,), device=dev, dtype=torch.int32)
    top_exponent = float32_exponent(1.0 / n_q) + 1  # every x = Ā / nq <= 1 / nq is below 2^top_exponent
    octaves = TUNING["octaves"]
    launch(_rows_kernel)[(n_row_progs, bh)](
        logits, flags, q_bad, true_blocks, slash, vertical_selected, slash_selected, active, final_flags,
        x, base, count, octave_sums, shared_count, q_len, kv_len, n_q, n_kv, min_blocks, max_blocks, gamma_hi,
        gamma_lo, top_exponent,
        BLOCK=block_size, BLOCK_NK=block_nk, BLOCK_NQ=next_pow2(n_q), ROWS=rows, PER_ROW=not global_qa, CAP=cap,
        FEW=min_blocks if min_blocks <= FEW_BLOCKS else 0, OCTAVES=octaves, ROUNDS=ROUNDS, num_warps=warps,
        **register_cap(_rows_kernel, TUNING["row_registers"]),
    )
    if not global_qa:
        return active, final_flags

    # one program per SM (all resident at once: the per-head barrier needs it); one when interpreted
    n_slots = 1 if interp else min(TUNING["pass_programs"] or _sm_count(dev.index), _sm_count(dev.index))
    chunk = TUNING["pass_cells"]
    row_chunk = next_pow2(n_q, 1) if interp else max(1, min(TUNING["pass_rows"], chunk // block_nk))
    col_chunk = block_nk if interp else min(block_nk, chunk)
    decide_rows = next_pow2(n_q, 1) if interp else max(1, TUNING["decide_cells"] // block_nk)
    hist = torch.empty(ROUNDS, n_slots, 16, device=dev, dtype=torch.float64)
    kept_cap = TUNING["kept_cells"]
    kept = torch.empty(n_slots * kept_cap, device=dev, dtype=torch.float32)
    shared_cap = TUNING["shared_cells"]
    shared = torch.empty(max(bh * shared_cap, 1), device=dev, dtype=torch.float32)
    launch(_threshold_kernel)[(n_slots,)](
        x, final_flags, base, hist, count, kept, active, octave_sums, shared, shared_count, bh, n_slots, q_len,
        kv_len, n_q, n_kv,
        max_blocks, gamma_hi, gamma_lo, top_exponent,
        BLOCK=block_size, BLOCK_NK=block_nk, BLOCK_NQ=next_pow2(n_q), BLOCK_H=next_pow2(bh),
        BLOCK_P=next_pow2(n_slots), ROW_CHUNK=row_chunk, COL_CHUNK=col_chunk, DECIDE_ROWS=decide_rows, CAP=cap,
        ROUNDS=ROUNDS, FOLD=bool(TUNING["fold"]) and q_len == kv_len, KEEP_ROUND=TUNING["keep_round"],
        KEPT_CAP=kept_cap,
        LIST_CHUNK=min(TUNING["list_cells"], next_pow2(kept_cap)), OCTAVES=octaves,
        OCTAVE_ROWS=min(next_pow2(n_q), 64), SHARED_CAP=shared_cap, num_warps=TUNING["pass_warps"],
    )
    return active, final_flags
