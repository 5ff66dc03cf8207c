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

from ._common import MethodInfo
from .flashprefill import flash_prefill_block_mask
from .streaming import streaming_block_mask
from .vertical_slash import vertical_slash_block_mask
from .xattention import xattention_block_mask

__all__ = [
    "MethodInfo",
    "flash_prefill_block_mask",
    "streaming_block_mask",
    "vertical_slash_block_mask",
    "xattention_block_mask",
]
