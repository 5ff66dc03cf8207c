"""BlockMask index emission straight from the active map.

Must match ``block_mask.indices_from_map`` applied, as ``block_mask.block_mask_from_active``
does, to ``active & visible & ~full`` (partial blocks) and ``active & visible & full``
(full blocks): per row the ``num`` active key blocks in increasing order, followed by the
inactive ones in increasing order (exactly the stable ``argsort`` of the reference, so the
index tensors are identical, not only their first ``num`` entries).

One program per (query head, group of query-block rows); a row prefix sum (``tl.cumsum``)
gives every block its output slot, so each slot is written exactly once (no memset).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import check_device, device_op, interpreting, launch, next_pow2


@triton.jit
def _emit_rows(blocks, j, cell_ok, num_ptr, idx_ptr, row, row_ok, out):
    """Write ``num`` and the ordered indices of ``blocks`` (``[ROWS, BLOCK_NK]`` bool), row by row."""
    count = tl.sum(blocks.to(tl.int32), axis=1)
    taken = tl.cumsum(blocks.to(tl.int32), axis=1) - 1
    skipped = count[:, None] + tl.cumsum((cell_ok & ~blocks).to(tl.int32), axis=1) - 1
    slot = tl.where(blocks, taken, skipped)
    tl.store(idx_ptr + out[:, None] + slot, tl.broadcast_to(j[None, :], slot.shape), mask=cell_ok)
    tl.store(num_ptr + row, count, mask=row_ok)


@triton.jit
def _emit_kernel(
    active_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr, offset_ptr,
    q_len, kv_len, n_q_blocks, n_kv_blocks,
    BLOCK: tl.constexpr, BLOCK_NK: tl.constexpr, ROWS: tl.constexpr,
):
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    bh = tl.program_id(1)
    offset = kv_len - q_len
    j = tl.arange(0, BLOCK_NK)
    row_ok = i < n_q_blocks
    cell_ok = row_ok[:, None] & (j < n_kv_blocks)[None, :]
    row = bh.to(tl.int64) * n_q_blocks + i
    out = row * n_kv_blocks
    q_first = (offset + i * BLOCK)[:, None]
    q_last = (offset + tl.minimum((i + 1) * BLOCK, q_len) - 1)[:, None]
    k_last = (tl.minimum(j * BLOCK + BLOCK, kv_len) - 1)[None, :]
    visible = cell_ok & ((j * BLOCK)[None, :] <= q_last)
    full = (k_last <= q_first) & (i < q_len // BLOCK)[:, None] & (j < kv_len // BLOCK)[None, :]
    active = visible & (tl.load(active_ptr + out[:, None] + j[None, :], mask=cell_ok, other=0) != 0)
    _emit_rows(active & ~full, j, cell_ok, kv_num_ptr, kv_idx_ptr, row, row_ok, out)
    _emit_rows(active & full, j, cell_ok, full_num_ptr, full_idx_ptr, row, row_ok, out)
    if (tl.program_id(0) == 0) & (bh == 0):  # the mask_mod's offset (saves a fill kernel)
        tl.store(offset_ptr, offset.to(tl.int64))


TUNING: dict[str, int] = {"row_cells": 1024, "num_warps": 2}
"""Launch parameters of :func:`_emit_kernel`: map cells per program (whole rows; at least one
row) and warps. Chosen on an H200 with ``benchmarks/kernel_tuning.py``."""


@device_op("flexprefill::emit_block_indices")
def emit_block_indices(
    active: Tensor, q_len: int, kv_len: int, block_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``BlockMask.from_kv_blocks`` inputs of an active map, and the causal offset.

    Args:
        active: ``[B, H, nq, nk]`` bool; blocks outside the causal region are ignored.
        q_len, kv_len, block_size: ``Lq``, ``Lk``, ``b``.

    Returns:
        ``kv_num_blocks [B, H, nq]``, ``kv_indices [B, H, nq, nk]`` (partial blocks: cut by
        the causal boundary or the sequence end), ``full_kv_num_blocks``,
        ``full_kv_indices`` (full blocks), all int32; and ``Lk - Lq`` as an int64 scalar
        tensor (for :func:`..block_mask.causal_mask_mod`).
    """
    check_device(active, _emit_kernel)
    batch, heads, n_q, n_kv = active.shape
    num = torch.empty(batch, heads, n_q, device=active.device, dtype=torch.int32)
    idx = torch.empty(batch, heads, n_q, n_kv, device=active.device, dtype=torch.int32)
    full_num = torch.empty_like(num)
    full_idx = torch.empty_like(idx)
    offset = torch.empty((), device=active.device, dtype=torch.int64)
    block_nk = next_pow2(n_kv)
    rows = next_pow2(n_q, 1) if interpreting(_emit_kernel) else max(1, min(next_pow2(n_q, 1), TUNING["row_cells"] // block_nk))
    launch(_emit_kernel)[(-(-n_q // rows), batch * heads)](
        active.contiguous(), num, idx, full_num, full_idx, offset, q_len, kv_len, n_q, n_kv,
        BLOCK=block_size, BLOCK_NK=block_nk, ROWS=rows, num_warps=8 if block_nk >= 2048 else TUNING["num_warps"],
    )
    return num, idx, full_num, full_idx, offset
