"""FlashAttention-4 (``flash_attn.cute``) as the attention kernel for FlexPrefill masks.

Optional. With the ``flash-attn-4`` package installed (``pip install
'flexprefill-torch[fa4]'``) on a Hopper or Blackwell GPU, :func:`flex_prefill_attention`
runs FA4's block-sparse forward on the mask's own block indices instead of compiled
FlexAttention: the same attention (``kv_num_blocks``/``kv_indices`` are the blocks cut by
the causal boundary, which get the token-level causal rule; ``full_kv_*`` the blocks
wholly below it), computed by a faster kernel (``docs/benchmarks.md``). Its dense causal
forward replaces SDPA where a large call falls back to dense attention.

Both are registered as ``torch.library`` custom ops with fake implementations, so a
``torch.compile(fullgraph=True)`` caller traces through them; eager calls go to FA4
directly (the custom-op dispatch costs tens of µs of host time). FA4 compiles a kernel the
first time it meets a configuration (seconds); sequence lengths are runtime values and
do not recompile it. Forward only: calls that need gradients use FlexAttention.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .kernels._utils import tracing

BLOCK_SIZES = (128,)
"""Mask block sizes run with FA4 (its 128 × 128 tiles on Hopper; the one measured)."""

COMPUTE_CAPABILITIES = (9, 10)
"""GPU generations (major compute capability) FA4 is used on: Hopper and Blackwell."""


_INSTALLED: list[bool] = []  # filled on the first call


@torch.compiler.assume_constant_result  # a constant to torch.compile, not a graph break
def fa4_installed() -> bool:
    """Whether ``flash_attn.cute`` (the ``flash-attn-4`` package) can be imported (looked up once)."""
    if not _INSTALLED:
        try:
            _INSTALLED.append(importlib.util.find_spec("flash_attn.cute") is not None)
        except (ImportError, ValueError):  # no flash_attn at all, or a broken parent package
            _INSTALLED.append(False)
    return _INSTALLED[0]


def fa4_version() -> str | None:
    """The installed ``flash-attn-4`` version, or None."""
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None


def fa4_unusable_reason(q: Tensor, k: Tensor, v: Tensor, block_size: int | None = None) -> str | None:
    """``None`` if FA4 can run this attention call, else why not (one short sentence).

    ``block_size``: the mask's block size (``None`` for dense attention).
    """
    if not q.is_cuda:
        return f"FA4 needs CUDA tensors, got device {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"FA4 needs float16 or bfloat16 inputs, got {q.dtype}"
    if q.shape[-1] % 16 or q.shape[-1] > 128 or v.shape[-1] != q.shape[-1]:
        return f"FA4 is used for head_dim in 16..128 (a multiple of 16, same for v), got {q.shape[-1]} and {v.shape[-1]}"
    if block_size is not None and block_size not in BLOCK_SIZES:
        return f"FA4 runs masks of block size {BLOCK_SIZES}, got {block_size}"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "FA4 is used for inference only (an input requires grad)"
    major = torch.cuda.get_device_capability(q.device)[0]
    if major not in COMPUTE_CAPABILITIES:
        return f"FA4 is used on compute capability {COMPUTE_CAPABILITIES}.x GPUs, this one is {major}.x"
    if not fa4_installed():
        return "flash-attn-4 is not installed (pip install 'flexprefill-torch[fa4]')"
    return None


@functools.cache
def _causal_mask_mod() -> Callable:
    """The token-level causal rule as a CuTe DSL ``mask_mod``: key ``t`` is visible to query ``i`` iff
    ``t <= i + Lk - Lq`` (queries are the last ``Lq`` positions; the lengths are runtime values)."""
    import cutlass.cute as cute

    @cute.jit
    def causal(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        return kv_idx <= q_idx + (seqlen_info.seqlen_k - seqlen_info.seqlen_q)

    return causal


def _bshd(x: Tensor) -> Tensor:
    """``[B, H, L, D]`` -> the ``[B, L, H, D]`` view FA4 takes."""
    return x.transpose(1, 2)


def _block_sparse_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    partial_num: Tensor,
    partial_indices: Tensor,
    full_num: Tensor,
    full_indices: Tensor,
    scale: float,
    block_size: int,
) -> tuple[Tensor, Tensor]:
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import _flash_attn_fwd  # the entry torch's FLASH backend calls

    blocks = BlockSparseTensorsTorch(
        partial_num, partial_indices, full_num, full_indices, block_size=(block_size, block_size)
    )
    out, lse = _flash_attn_fwd(
        _bshd(q), _bshd(k), _bshd(v), softmax_scale=scale, mask_mod=_causal_mask_mod(),
        block_sparse_tensors=blocks, return_lse=True,
    )[:2]
    return _bshd(out), lse


def _causal_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    from flash_attn.cute.interface import _flash_attn_fwd

    return _bshd(_flash_attn_fwd(_bshd(q), _bshd(k), _bshd(v), softmax_scale=scale, causal=True)[0])


# Custom ops for tracing (torch.compile, fake tensors); eager calls skip their dispatch (~50 µs)
_block_sparse_op = torch.library.custom_op(
    "flexprefill::fa4_block_sparse_attention", _block_sparse_forward, mutates_args=()
)
_causal_op = torch.library.custom_op("flexprefill::fa4_causal_attention", _causal_forward, mutates_args=())


@_block_sparse_op.register_fake
def _(q, k, v, partial_num, partial_indices, full_num, full_indices, scale, block_size):
    batch, heads, q_len, _ = q.shape
    out = q.new_empty(batch, q_len, heads, v.shape[-1]).transpose(1, 2)
    return out, q.new_empty(batch, heads, q_len, dtype=torch.float32)


@_causal_op.register_fake
def _(q, k, v, scale):
    batch, heads, q_len, _ = q.shape
    return q.new_empty(batch, q_len, heads, v.shape[-1]).transpose(1, 2)


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def fa4_block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Causal attention on the active blocks of a FlexPrefill ``block_mask`` with FA4.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (GQA: ``Hq % Hkv == 0``); float16/bfloat16, CUDA.
        block_mask: built by :func:`.block_mask.block_mask_from_active` (its partial blocks
            get the causal rule, as its ``mask_mod`` does).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``out [B, Hq, Lq, D]`` (a view of a ``[B, Lq, Hq, D]`` tensor) and the log-sum-exp
        ``[B, Hq, Lq]`` float32 (natural log), as ``flex_attention(..., return_lse=True)``.
    """
    forward = _block_sparse_op if tracing() else _block_sparse_forward
    return forward(
        q,
        k,
        v,
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
        _scale(q, scale),
        block_mask.BLOCK_SIZE[1],
    )


def fa4_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Dense causal attention with FA4 (query ``i`` sees keys ``<= Lk - Lq + i``); shapes as above."""
    forward = _causal_op if tracing() else _causal_forward
    return forward(q, k, v, _scale(q, scale))
