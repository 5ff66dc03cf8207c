"""XAttention (Xu et al., 2025) as a block mask: antidiagonal scoring plus a per-row threshold.

Rules, per batch row and query head (stride ``S`` divides the block size ``b``):

1. **Strided groups.** Queries are cut into groups of ``S`` from the first query, keys into
   groups of ``S`` from position 0 (zero-padded at the end). Query group ``g`` and key
   group ``h`` are scored by the antidiagonal of their ``S × S`` tile:
   ``l[g, h] = (scale / S) · Σ_{m<S} q[g·S + S-1-m] · k[h·S + m]`` (XAttention's
   "inverse" reshaping: every ``S``-th antidiagonal element, combined in one product).
2. **Softmax per query group** over the key groups it may see: key group ``h`` is visible
   iff its first key ``h·S`` is at or before the group's last query position.
3. **Block score.** ``A[i, j]`` = sum over the query groups of query block ``i`` of their
   softmax mass in the key groups of key block ``j``, then normalised to sum 1 over the
   row's visible blocks.
4. **Threshold per row.** Key block 0 and the diagonal block(s) are always kept and their
   score counts first; the other blocks are added in descending score order (stable) while
   the mass taken before each is ``< threshold`` (``reference.cumulative_select``). This is
   the smallest descending set reaching ``threshold``. ``threshold = 1`` keeps every
   visible block. A head whose scores are not finite keeps every visible block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..layout import BlockLayout
from ..reference import cumulative_select
from ..validation import check_qk
from ._common import (
    Backend,
    MethodInfo,
    check_block_size,
    check_real,
    finish,
    forced_sink_diagonal,
    grouped,
    rows_per_chunk,
    use_triton,
)

STRIDES = (8, 16)


def strided_groups(x: Tensor, stride: int, length: int, antidiagonal: bool) -> Tensor:
    """``[..., L, D] -> [..., length / S, S·D]``: rows zero-padded to ``length``, grouped by ``S``.

    With ``antidiagonal`` the rows of each group are reversed (the query side).
    """
    x = F.pad(x, (0, 0, 0, length - x.shape[-2])).unflatten(-2, (length // stride, stride))
    return (x.flip(-2) if antidiagonal else x).flatten(-2)


def xattention_scores_reference(
    q: Tensor, k: Tensor, layout: BlockLayout, stride: int, scale: float
) -> Tensor:
    """Steps 1-3 before the row normalisation: ``A [B, Hq, nq, nk]`` float32.

    Vectorised over batch and heads; the query groups are cut into chunks of whole query
    blocks so one float32 chunk of logits stays below ``CHUNK_ELEMENTS``.
    """
    batch, q_heads, q_len, _ = q.shape
    kv_heads = k.shape[1]
    nq, nk, b = layout.num_q_blocks, layout.num_kv_blocks, layout.block_size
    per_block = b // stride
    q_groups = strided_groups(q.float(), stride, nq * b, antidiagonal=True)  # [B, Hq, nq*G, S*D]
    k_groups = strided_groups(k.float(), stride, nk * b, antidiagonal=False)  # [B, Hkv, nk*G, S*D]
    key_group = torch.arange(nk * per_block, device=q.device)
    key_ok = key_group * stride < layout.kv_len
    q_grouped = grouped(q_groups, kv_heads)
    group = q_grouped.shape[2]
    step = rows_per_chunk(batch * q_heads, nk * per_block, per_block)
    sums = []
    for start in range(0, nq * per_block, step):
        stop = min(start + step, nq * per_block)
        rows = stop - start
        chunk = q_grouped[..., start:stop, :].reshape(batch, kv_heads, group * rows, -1)
        logits = ((scale / stride) * chunk @ k_groups.mT).unflatten(2, (group, rows))
        query_group = torch.arange(start, stop, device=q.device)
        real = query_group * stride < q_len
        last = layout.offset + torch.clamp(query_group * stride + stride - 1, max=q_len - 1)
        visible = key_ok[None, :] & (key_group[None, :] * stride <= last[:, None])
        probs = torch.softmax(logits.masked_fill(~visible, -math.inf), -1)
        probs = torch.where(real[:, None], probs, 0.0)  # padded query groups: no mass
        blocks = probs.unflatten(-1, (nk, per_block)).sum(-1).unflatten(-2, (rows // per_block, per_block))
        sums.append(blocks.sum(-2).flatten(1, 2))
    return torch.cat(sums, -2)


def xattention_select(scores: Tensor, layout: BlockLayout, threshold: float) -> tuple[Tensor, Tensor]:
    """Step 3's normalisation and step 4: active ``[B, H, nq, nk]`` and dense flag ``[B, H]``."""
    visible = layout.visible(scores.device)
    normalised = scores / scores.sum(-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
    dense = ~torch.isfinite(normalised).all(-1).all(-1)
    if threshold >= 1.0:
        return visible.expand(scores.shape), dense
    forced = forced_sink_diagonal(layout, scores.device).expand(scores.shape)
    active = cumulative_select(normalised.masked_fill(~visible, 0.0), forced, threshold) & visible
    return torch.where(dense[..., None, None], visible, active), dense


def xattention_block_mask(
    q: Tensor,
    k: Tensor,
    *,
    threshold: float = 0.9,
    stride: int = 8,
    block_size: int = 128,
    scale: float | None = None,
    backend: Backend = "auto",
    return_info: bool = False,
) -> BlockMask | tuple[BlockMask, MethodInfo]:
    """The XAttention ``BlockMask`` of ``q`` against ``k`` (rules in the module doc).

    Args:
        q: ``[B, Hq, Lq, D]`` queries, the last ``Lq`` positions of the sequence.
        k: ``[B, Hkv, Lk, D]`` keys, ``Hq % Hkv == 0`` and ``Lq <= Lk``.
        threshold: per-row cumulative score to reach, ``0 <= threshold <= 1``.
        stride: antidiagonal stride ``S``, 8 or 16 (at most ``block_size``).
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
    threshold = check_real("threshold", threshold, 0.0, 1.0)
    if isinstance(stride, bool) or stride not in STRIDES:
        raise ValueError(f"stride must be one of {STRIDES}, got stride={stride!r}")
    block_size = check_block_size(block_size)
    if block_size % stride:
        raise ValueError(
            f"stride must divide block_size, got stride={stride!r} and block_size={block_size!r}"
        )
    layout = BlockLayout(q.shape[-2], k.shape[-2], block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    with torch.no_grad():
        if use_triton(backend, q):
            from ._kernels import xattention_scores

            scores = xattention_scores(q, k, layout, stride, scale)
        else:
            scores = xattention_scores_reference(q, k, layout, stride, scale)
        active, dense = xattention_select(scores, layout, threshold)
    params = {"threshold": threshold, "stride": stride, "block_size": block_size}
    return finish(active, layout, "xattention", params, return_info, {"dense": dense})
