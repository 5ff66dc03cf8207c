"""StreamingLLM / A-shape attention as a block mask (Xiao et al., 2024).

Rule, per query-block row ``i`` (queries at absolute positions ``q_first .. q_last``) and key
block ``j`` (keys ``k_first .. k_last``), identical for every batch row and head:

* **sink**: the block holds a sink token, ``k_first < sink_tokens``;
* **local**: the block holds a key inside the local window of some query of the row. The
  window of the query at ``p`` is the ``local_tokens`` keys ``p - local_tokens + 1 .. p``,
  so the row's windows cover ``q_first - local_tokens + 1 .. q_last`` and the rule is
  ``k_last >= q_first - local_tokens + 1``;

and the block must be causally visible (``k_first <= q_last``). Inside an active block every
causal (query, key) pair is attended: the block granularity makes the window up to
``b - 1`` tokens wider than ``local_tokens`` and the sink up to ``b - 1`` tokens longer.
The FlexPrefill paper's baseline uses 1,000 sink and 8,000 local tokens (the defaults).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..layout import BlockLayout
from ..validation import check_qk
from ._common import MethodInfo, check_block_size, check_int, finish


def streaming_active(
    layout: BlockLayout, sink_tokens: int, local_tokens: int, device: torch.device
) -> Tensor:
    """``[nq, nk]`` bool: the sink and local blocks of every query-block row (visible only)."""
    q_first, _ = layout.query_block_positions(device)
    k_first, k_last = layout.key_block_positions(device)
    sink = (k_first < sink_tokens)[None, :]
    local = k_last[None, :] >= (q_first - local_tokens + 1)[:, None]
    return (sink | local) & layout.visible(device)


def streaming_block_mask(
    q: Tensor,
    k: Tensor,
    *,
    sink_tokens: int = 1000,
    local_tokens: int = 8000,
    block_size: int = 128,
    return_info: bool = False,
) -> BlockMask | tuple[BlockMask, MethodInfo]:
    """The StreamingLLM (sink + local window) ``BlockMask`` of ``q`` against ``k``.

    Args:
        q: ``[B, Hq, Lq, D]`` queries, the last ``Lq`` positions; only its shape is used.
        k: ``[B, Hkv, Lk, D]`` keys, ``Hq % Hkv == 0`` and ``Lq <= Lk``.
        sink_tokens: global tokens at the start of the sequence, ``>= 0``.
        local_tokens: local window per query, including the query's own position, ``>= 1``.
        block_size: mask block size ``b``, one of 16..256 (powers of two).
        return_info: also return a :class:`MethodInfo`.

    Returns:
        A ``BlockMask`` with ``B × Hq`` masks over ``(Lq, Lk)`` (the same map in every head),
        and the info if ``return_info``.
    """
    check_qk(q, k, None, "auto")
    sink_tokens = check_int("sink_tokens", sink_tokens, 0)
    local_tokens = check_int("local_tokens", local_tokens, 1)
    block_size = check_block_size(block_size)
    layout = BlockLayout(q.shape[-2], k.shape[-2], block_size)
    active = streaming_active(layout, sink_tokens, local_tokens, q.device)
    active = active.expand(q.shape[0], q.shape[1], -1, -1)
    params = {"sink_tokens": sink_tokens, "local_tokens": local_tokens, "block_size": block_size}
    return finish(active, layout, "streaming", params, return_info)
