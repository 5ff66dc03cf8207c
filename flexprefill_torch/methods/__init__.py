"""More sparse-prefill methods on the same BlockMask path as FlexPrefill.

Every builder takes ``q [B, Hq, Lq, D]`` and ``k [B, Hkv, Lk, D]`` (GQA, queries the last
``Lq`` positions) and returns a per-(batch, query head) ``BlockMask`` for compiled
FlexAttention, plus a :class:`MethodInfo` with ``return_info=True``:

* :func:`flash_prefill_block_mask` — FlashPrefill: block search + dynamic threshold;
* :func:`streaming_block_mask` — StreamingLLM / A-shape: sink + local window;
* :func:`vertical_slash_block_mask` — MInference-style fixed-budget vertical-slash lines;
* :func:`xattention_block_mask` — XAttention: antidiagonal scoring + per-row threshold.

Rules and defaults: ``docs/methods.md``.
"""

from collections.abc import Callable
from typing import Any

from ..selection import flex_prefill_block_mask
from ._common import MethodInfo
from .flashprefill import flash_prefill_block_mask
from .streaming import streaming_block_mask
from .vertical_slash import vertical_slash_block_mask
from .xattention import xattention_block_mask

MASK_BUILDERS: dict[str, Callable[..., Any]] = {
    "flexprefill": flex_prefill_block_mask,
    "flashprefill": flash_prefill_block_mask,
    "streaming": streaming_block_mask,
    "vertical_slash": vertical_slash_block_mask,
    "xattention": xattention_block_mask,
}
"""Every mask builder by name: ``builder(q, k, *, block_size=..., scale=..., return_info=..., **knobs)``."""

__all__ = [
    "MASK_BUILDERS",
    "MethodInfo",
    "flash_prefill_block_mask",
    "streaming_block_mask",
    "vertical_slash_block_mask",
    "xattention_block_mask",
]
