"""Mean pooling of queries or keys per block of ``b`` rows.

Must match ``reference.pool_blocks`` (a short last block is averaged over its real rows).
One memory-bound pass over the input in its own dtype (no float32 copy of ``q``/``k``);
the sums are float32. For 16-bit inputs the column sums of each tile run on the tensor
cores (row 0 of ``ones-row @ tile``: exact products, float32 accumulation), measured 16–21 %
faster than reducing in registers on an H200 (``benchmarks/kernel_tuning.py``). Also counts
the non-finite pooled values per block, which the pipeline uses for the reference's dense
fallback (a query-aware head with a non-finite pooled query keeps every visible block).

The pipeline pools the queries after the pattern decision and passes the heads' ``flags``:
only sparse query-aware heads read their queries (the others get zeros without a load),
since no other head uses ``Q̄``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import as_f32, check_device, device_op, interpreting, launch, next_pow2


@triton.jit
def _pool_kernel(
    x_ptr,
    out_ptr,
    bad_ptr,
    flags_ptr,
    heads,
    length,
    dim,
    n_blocks,
    stride_b,
    stride_h,
    stride_l,
    stride_d,
    scale,
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr,
    DOT_SUM: tl.constexpr,
    GATED: tl.constexpr,
):
    bh = tl.program_id(0)
    # with flags: only sparse query-aware heads are read (the others store zeros)
    wanted = (tl.load(flags_ptr + bh) & 3) == 3 if GATED else True
    batch = bh // heads
    head = bh % heads
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    base = x_ptr + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    scale = as_f32(scale)
    row_zero = (tl.arange(0, 16) == 0)[:, None]  # (rows 1-15 are 0 · tile: NaN where tile is inf)
    first_row = (row_zero & (tl.arange(0, SUB)[None, :] >= 0)).to(x_ptr.dtype.element_ty)
    for step in range(BLOCKS_PER_PROG):
        blk = tl.program_id(1) * BLOCKS_PER_PROG + step
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        if wanted:
            for start in tl.static_range(0, BLOCK, SUB):
                rows = blk * BLOCK + start + tl.arange(0, SUB)
                mask = (rows < length)[:, None] & col_ok[None, :]
                ptrs = base + rows.to(tl.int64)[:, None] * stride_l + cols[None, :] * stride_d
                tile = tl.load(ptrs, mask=mask, other=0.0)
                if DOT_SUM:  # column sums on the tensor cores: row 0 of (ones in row 0) @ tile
                    acc += tl.sum(tl.where(row_zero, tl.dot(first_row, tile), 0.0), axis=0)
                else:
                    acc += tl.sum(tile.to(tl.float32), axis=0)
        count = tl.maximum(tl.minimum(length - blk * BLOCK, BLOCK), 1)
        mean = acc / count.to(tl.float32)
        in_range = blk < n_blocks
        tl.store(out_ptr + (bh.to(tl.int64) * n_blocks + blk) * dim + cols, scale * mean, mask=col_ok & in_range)
        bad = tl.sum((col_ok & ~(tl.abs(mean) < float("inf"))).to(tl.int32), axis=0)
        tl.store(bad_ptr + bh.to(tl.int64) * n_blocks + blk, bad, mask=in_range)


TUNING: dict[str, int] = {"load_elems": 8192, "num_warps": 4, "dot_sum": 1, "blocks_per_prog": 1}
"""Launch parameters of :func:`_pool_kernel`: elements per load (``SUB × BLOCK_D``), warps,
column sums on the tensor cores (16-bit inputs; ``0``: in registers) and blocks per program.
Chosen on an H200 with ``benchmarks/kernel_tuning.py``, which overrides them."""


@device_op("flexprefill::pool_blocks")
def pool_blocks(
    x: Tensor, block_size: int, scale: float = 1.0, flags: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Block means of ``x`` (times ``scale``) and the count of non-finite means per block.

    Args:
        x: ``[B, H, L, D]`` float16/bfloat16/float32, any strides.
        block_size: ``b``; scale: factor applied to the means (the pipeline passes the
            softmax scale, as the reference's ``scale * q_pool``).
        flags: optional ``[B, H]`` int32 from :func:`.pattern.head_pattern`: heads other than
            sparse query-aware ones are not read, their means and counts are 0.

    Returns:
        ``pooled [B, H, n, D]`` float32 with ``n = ceil(L / b)``: ``scale *
        reference.pool_blocks(x)``, and ``bad [B, H, n]`` int32, the number of non-finite
        entries of each (unscaled) mean.
    """
    check_device(x, _pool_kernel)
    batch, heads, length, dim = x.shape
    n_blocks = -(-length // block_size)
    pooled = torch.empty(batch, heads, n_blocks, dim, device=x.device, dtype=torch.float32)
    bad = torch.empty(batch, heads, n_blocks, device=x.device, dtype=torch.int32)
    block_d = next_pow2(dim)
    sub = max(1, min(block_size, TUNING["load_elems"] // block_d))
    # one block per program on a GPU (measured faster than looping); whole heads when interpreted
    interp = interpreting(_pool_kernel)
    per_prog = next_pow2(n_blocks, 1) if interp else TUNING["blocks_per_prog"]
    launch(_pool_kernel)[(batch * heads, -(-n_blocks // per_prog))](
        x,
        pooled,
        bad,
        bad if flags is None else flags,
        heads,
        length,
        dim,
        n_blocks,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        x.stride(3),
        scale,
        BLOCK=block_size,
        SUB=sub,
        BLOCK_D=block_d,
        BLOCKS_PER_PROG=per_prog,
        DOT_SUM=bool(TUNING["dot_sum"]) and x.dtype != torch.float32 and sub >= 16 and not interp,
        GATED=flags is not None,
        num_warps=TUNING["num_warps"],
    )
    return pooled, bad
