"""Triton kernels of the mask-building pipeline (``backend="triton"``).

One module per kernel; each names the function of :mod:`flexprefill_torch.reference` it
must match. Import this package lazily: it imports Triton, and under
``TRITON_INTERPRET=1`` (set before the import) the kernels run on CPU tensors.
"""

from .pipeline import TritonSelection, triton_block_mask, triton_select_active_blocks, triton_selection

__all__ = ["TritonSelection", "triton_block_mask", "triton_select_active_blocks", "triton_selection"]
