"""Block logits ``scale · Q̄ · K̄ᵀ`` of the query-aware heads, causally visible tiles only.

Must match ``scale * q_pool @ k_pool.mT`` of ``reference.flex_prefill_reference`` (the
logits before the softmax of ``Ā``) on the cells the selection reads: the causally visible
blocks of the sparse query-aware heads. The other heads are not written (a vertical-slash
or dense head never reads its logits), nor are the tiles wholly above the causal boundary
(cells above it inside a tile that crosses it are written, and never read). A dense
float32 GEMM of every head does more than twice the work at 32k (23 query-aware heads of
32 in ``benchmarks/mask_build.py``, lower triangle).

One program per (query head, tile of ``BLOCK_M`` query blocks, tile of ``BLOCK_N`` key
blocks); a program whose head is not a sparse query-aware one, or whose tile lies wholly
above the causal boundary, returns at once.

Precision (:data:`PRECISION`): on GPUs the product runs on the tensor cores as three TF32
products (``input_precision="tf32x3"``: each float32 operand split into a high and a low
TF32 part, the low × low term dropped), float32 accumulation: close to float32, within
about 1e-6 relative. Measured on an H200 at 32k: 12 µs, against 17 µs for a cuBLAS float32
GEMM of every head and 30 µs for the fastest IEEE float32 ``tl.dot`` (FMA) tiling; the
masks equalled the cuBLAS pipeline's at 32k and differed in 2 of 32,768 rows at 128k
(near-ties at a γ-crossing). Under the interpreter, and before compute capability 8.0,
IEEE float32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import cdiv, check_device, device_op, interpreting, launch, next_pow2

PRECISION = "tf32x3"
"""``tl.dot`` input precision of the logits on GPUs of compute capability 8.0 or more."""


@triton.jit
def _logits_kernel(
    q_pool_ptr, k_pool_ptr, flags_ptr, logits_ptr,
    q_heads, group, q_len, kv_len, dim, n_q_blocks, n_kv_blocks,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(2)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # the last query of the tile sees key blocks up to last_seen (causal, lower right)
    last_row = tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, n_q_blocks)
    last_seen = (kv_len - q_len + tl.minimum(last_row * BLOCK, q_len) - 1) // BLOCK
    wanted = (tl.load(flags_ptr + bh) & 3) == 3  # sparse and query-aware
    if wanted & (tl.program_id(1) * BLOCK_N <= last_seen):
        bkv = (bh // q_heads) * (q_heads // group) + (bh % q_heads) // group
        q_rows = q_pool_ptr + (bh.to(tl.int64) * n_q_blocks + i)[:, None] * dim
        k_rows = k_pool_ptr + (bkv.to(tl.int64) * n_kv_blocks + j)[:, None] * dim
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, BLOCK_D, BLOCK_K):
            cols = d0 + tl.arange(0, BLOCK_K)
            qt = tl.load(q_rows + cols[None, :], mask=(i < n_q_blocks)[:, None] & (cols < dim)[None, :], other=0.0)
            kt = tl.load(k_rows + cols[None, :], mask=(j < n_kv_blocks)[:, None] & (cols < dim)[None, :], other=0.0)
            acc = tl.dot(qt, tl.trans(kt), acc, input_precision=PRECISION)
        out = logits_ptr + (bh.to(tl.int64) * n_q_blocks + i)[:, None] * n_kv_blocks + j[None, :]
        tl.store(out, acc, mask=(i < n_q_blocks)[:, None] & (j < n_kv_blocks)[None, :])


TUNING: dict[str, int] = {"block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}
"""Launch parameters of :func:`_logits_kernel`: query blocks and key blocks per tile, head
dimensions per step, warps, pipeline stages. Chosen on an H200 with
``benchmarks/kernel_tuning.py``, which overrides them."""


@functools.cache
def _capability(device: int) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _precision(x: Tensor) -> str:
    """:data:`PRECISION` where the tensor cores take TF32, else ``"ieee"`` (and when interpreted)."""
    if interpreting(_logits_kernel):  # (otherwise check_device has seen a CUDA tensor)
        return "ieee"
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return PRECISION if _capability(index) >= 8 else "ieee"


@device_op("flexprefill::block_logits")
def block_logits(q_pool: Tensor, k_pool: Tensor, flags: Tensor, q_len: int, kv_len: int, block_size: int) -> Tensor:
    """``q_pool · k_pool^T`` per query head, on the visible blocks of sparse query-aware heads.

    Args:
        q_pool: ``[B, Hq, nq, D]`` float32, the pooled queries times the softmax scale
            (:func:`.pool.pool_blocks`); k_pool: ``[B, Hkv, nk, D]`` float32 pooled keys.
        flags: ``[B, Hq]`` int32 from :func:`.pattern.head_pattern`.
        q_len, kv_len, block_size: ``Lq``, ``Lk``, ``b``.

    Returns:
        ``logits [B, Hq, nq, nk]`` float32, defined on the causally visible blocks of the
        heads with :data:`.pattern.QUERY_AWARE` and :data:`.pattern.SPARSE` set (the only
        cells :func:`.select.select_blocks` reads); the other heads are not written.
    """
    check_device(q_pool, _logits_kernel)
    batch, q_heads, n_q, dim = q_pool.shape
    kv_heads, n_kv = k_pool.shape[1], k_pool.shape[2]
    q_pool, k_pool = q_pool.contiguous(), k_pool.contiguous()
    logits = torch.empty(batch, q_heads, n_q, n_kv, device=q_pool.device, dtype=torch.float32)
    block_m = min(TUNING["block_m"], next_pow2(n_q))
    block_n = min(TUNING["block_n"], next_pow2(n_kv))
    block_d = next_pow2(dim)
    grid = (cdiv(n_q, block_m), cdiv(n_kv, block_n), batch * q_heads)
    launch(_logits_kernel)[grid](
        q_pool, k_pool, flags, logits, q_heads, q_heads // kv_heads, q_len, kv_len, dim, n_q, n_kv,
        BLOCK=block_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(TUNING["block_k"], block_d),
        BLOCK_D=block_d, PRECISION=_precision(q_pool), num_warps=TUNING["num_warps"],
        num_stages=TUNING["num_stages"],
    )
    return logits
