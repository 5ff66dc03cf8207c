"""FlexPrefill sparse prefill on PyTorch FlexAttention.

Public API:

* :func:`flex_prefill_block_mask` — a per-(batch, head) ``BlockMask`` for ``flex_attention``;
* :func:`flex_prefill_attention` — the mask and compiled FlexAttention in one call;
* :class:`FlexPrefillConfig` — the hyper-parameters; :class:`FlexPrefillInfo` — diagnostics;
* :func:`flex_prefill_reference` — the pure-PyTorch reference (the oracle).
"""

from .attention import dense_causal_attention, flex_prefill_attention
from .block_mask import active_from_block_mask, block_mask_from_active
from .config import FlexPrefillConfig
from .info import FlexPrefillInfo
from .integrations.transformers import collect_diagnostics, get_flex_prefill_config, patch_model
from .layout import BlockLayout
from .methods import (
    flash_prefill_block_mask,
    streaming_block_mask,
    vertical_slash_block_mask,
    xattention_block_mask,
)
from .reference import ReferenceSelection, flex_prefill_reference
from .selection import flex_prefill_block_mask

__all__ = [
    "BlockLayout",
    "FlexPrefillConfig",
    "FlexPrefillInfo",
    "ReferenceSelection",
    "active_from_block_mask",
    "block_mask_from_active",
    "collect_diagnostics",
    "dense_causal_attention",
    "flash_prefill_block_mask",
    "flex_prefill_attention",
    "flex_prefill_block_mask",
    "flex_prefill_reference",
    "get_flex_prefill_config",
    "patch_model",
    "streaming_block_mask",
    "vertical_slash_block_mask",
    "xattention_block_mask",
]

__version__ = "0.1.0"
