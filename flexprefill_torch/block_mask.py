"""BlockMask assembly: an active-block map becomes a FlexAttention ``BlockMask``.

Built from block indices with ``BlockMask.from_kv_blocks(..., compute_q_blocks=False)``,
never from a dense token mask: blocks wholly below the causal boundary are *full* (no
``mask_mod`` call), the others are *partial* and get the token-level causal ``mask_mod``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .layout import BlockLayout


def causal_mask_mod(offset: Tensor):
    """Token-level causal rule for queries that start at absolute position ``offset``.

    ``offset`` is a 0-d integer tensor (a captured buffer, so a new offset does not make
    ``torch.compile`` specialise again).
    """

    def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx + offset

    mask_mod.flexprefill_causal = True  # other kernels (FA4) may apply the same rule themselves
    return mask_mod


def has_causal_mask_mod(block_mask: BlockMask) -> bool:
    """Whether ``block_mask``'s partial blocks use :func:`causal_mask_mod` (masks built here)."""
    return getattr(block_mask.mask_mod, "flexprefill_causal", False)


def indices_from_map(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., nq, nk]`` bool -> (``num [..., nq]`` int32, ``indices [..., nq, nk]`` int32).

    The first ``num`` indices of each row are its active key blocks in increasing order.
    """
    num = blocks.sum(-1, dtype=torch.int32)
    indices = blocks.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return num, indices


def block_mask_from_active(active: Tensor, layout: BlockLayout, use_triton: bool | None = None) -> BlockMask:
    """A ``BlockMask`` with the active blocks of ``active`` (``[B, H, nq, nk]`` bool).

    Active blocks outside the causal region are dropped; blocks cut by the causal
    boundary or by the end of the sequence are partial. On CUDA the indices come from the
    Triton kernel :func:`flexprefill_torch.kernels.emit.emit_block_indices` (same result as
    :func:`indices_from_map`; ``use_triton`` overrides the choice, e.g. for the CPU
    interpreter); no host synchronisation either way.
    """
    device = active.device
    if active.is_cuda if use_triton is None else use_triton:  # one Triton pass, no argsort
        from .kernels.emit import emit_block_indices

        kv_num, kv_indices, full_num, full_indices, offset = emit_block_indices(
            active, layout.q_len, layout.kv_len, layout.block_size
        )
    else:
        active = active & layout.visible(device)
        full_map = layout.full(device)
        kv_num, kv_indices = indices_from_map(active & ~full_map)
        full_num, full_indices = indices_from_map(active & full_map)
        offset = torch.full((), layout.offset, device=device, dtype=torch.int64)  # no host copy
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_indices,
        full_num,
        full_indices,
        BLOCK_SIZE=layout.block_size,
        mask_mod=causal_mask_mod(offset),
        seq_lengths=(layout.q_len, layout.kv_len),
        compute_q_blocks=False,
    )


def active_from_block_mask(block_mask: BlockMask) -> Tensor:
    """The active-block map of ``block_mask`` (full or partial), ``[B, H, nq, nk]`` bool."""
    return _map_from_indices(block_mask.kv_num_blocks, block_mask.kv_indices) | _map_from_indices(
        block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    )


def _map_from_indices(num: Tensor | None, indices: Tensor | None) -> Tensor:
    if num is None or indices is None:
        raise ValueError("block_mask has no full-block indices; build it with block_mask_from_active")
    nk = indices.shape[-1]
    used = torch.arange(nk, device=num.device) < num[..., None]
    blocks = torch.zeros(indices.shape, dtype=torch.bool, device=num.device)
    return blocks.scatter_(-1, indices.long(), used)
