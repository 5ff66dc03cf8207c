"""``flex_prefill_attention``: FlexPrefill mask + compiled FlexAttention in one call."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .block_mask import active_from_block_mask, block_mask_from_active, has_causal_mask_mod
from .config import (
    FA4_MIN_SEQ_LEN,
    FLEX_MIN_SEQ_LEN,
    UNSET,
    AttentionKernel,
    FlexPrefillConfig,
    QueryAwareSelection,
    resolve_config,
)
from .fa4 import fa4_block_sparse_attention, fa4_causal_attention, fa4_unusable_reason
from .info import FlexPrefillInfo
from .layout import BlockLayout
from .reference import masked_attention_reference
from .selection import Backend, build_block_mask, uses_triton
from .validation import check_qkv

_HAS_AUX_REQUEST = "return_aux" in inspect.signature(flex_attention).parameters


# Measured on an H200 (benchmarks/flex_tuning.py, docs/benchmarks.md): the fastest of the
# candidates for dense and sparse causal masks at 32k and 128k tokens, bf16, D=128.
HOPPER_KERNEL_OPTIONS: dict[str, Any] = {
    "BLOCK_M": 128,
    "BLOCK_N": 128,
    "num_warps": 8,
    "num_stages": 3,
    "USE_TMA": True,
}


def default_kernel_options(q: Tensor, block_size: int) -> dict[str, Any] | None:
    """Tuned ``kernel_options`` for Hopper GPUs (16-bit, head_dim <= 128, b % 128 == 0), else None.

    ``None`` lets FlexAttention pick its own defaults. The result depends only on the
    device, dtype, head size and block size, so it never triggers a recompilation.
    """
    if q.device.type != "cuda" or q.dtype == torch.float32 or q.shape[-1] > 128 or block_size % 128:
        return None
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        return None
    return HOPPER_KERNEL_OPTIONS


_COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)  # compiles lazily, on first call


def compiled_flex_attention():
    """The process-wide compiled ``flex_attention`` (sequence lengths are dynamic)."""
    return _COMPILED_FLEX


def run_flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    return_lse: bool = False,
    kernel_options: dict[str, Any] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Compiled FlexAttention with ``block_mask`` (GQA handled); ``(out, lse)`` if ``return_lse``.

    ``kernel_options=None`` uses :func:`default_kernel_options`. Non-contiguous inputs
    (transformers' transposed projections, cache tensors, row slices of padded batches) are
    copied first: one memory layout for every call keeps the compiled kernel from
    recompiling on stride and storage-offset guards; the copy is small next to the
    attention. (The dense paths take such views as they are.)

    Compiled FlexAttention on CPU cannot return the log-sum-exp; there ``return_lse`` runs
    :func:`masked_attention_reference` on the mask's active blocks (dense memory).
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if kernel_options is None:
        kernel_options = default_kernel_options(q, block_mask.BLOCK_SIZE[1])
    kwargs: dict[str, Any] = {
        "block_mask": block_mask,
        "scale": scale,
        "enable_gqa": q.shape[1] != k.shape[1],
        "kernel_options": kernel_options,
    }
    if not return_lse:
        return compiled_flex_attention()(q, k, v, **kwargs)
    if q.device.type == "cpu":
        active = active_from_block_mask(block_mask)
        out, lse = masked_attention_reference(q, k, v, active, block_mask.BLOCK_SIZE[0], scale)
        return out.to(q.dtype), lse
    if _HAS_AUX_REQUEST:
        from torch.nn.attention.flex_attention import AuxRequest

        out, aux = compiled_flex_attention()(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    return compiled_flex_attention()(q, k, v, return_lse=True, **kwargs)


def _uses_fa4(q: Tensor, k: Tensor, v: Tensor, kernel: AttentionKernel, block_size: int | None) -> bool:
    """Whether ``kernel`` runs FA4 here (``"fa4"`` raises, naming the reason, when it cannot)."""
    if kernel == "flex":
        return False
    reason = fa4_unusable_reason(q, k, v, block_size)
    if reason is not None and kernel == "fa4":
        raise ValueError(f"attention_kernel='fa4' cannot run this call: {reason}")
    return reason is None


def run_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    return_lse: bool = False,
    kernel_options: dict[str, Any] | None = None,
    kernel: AttentionKernel = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention on a FlexPrefill ``block_mask`` (causal partial blocks) with ``kernel``.

    FA4's block-sparse forward (:func:`.fa4.fa4_block_sparse_attention`) where ``kernel``
    allows it and it can run, else :func:`run_flex_attention` (``kernel_options`` apply to
    that one only). Same result either way, up to floating-point rounding. FA4 applies the
    causal rule itself, so it runs only masks built by :func:`.block_mask.block_mask_from_active`;
    any other ``mask_mod`` runs with FlexAttention (``"fa4"`` raises).
    """
    if kernel != "flex" and not has_causal_mask_mod(block_mask):
        if kernel == "fa4":
            raise ValueError(
                "attention_kernel='fa4' runs FlexPrefill masks only (built by block_mask_from_active, "
                f"causal partial blocks); this block_mask has mask_mod {block_mask.mask_mod!r}"
            )
        kernel = "flex"
    if _uses_fa4(q, k, v, kernel, block_mask.BLOCK_SIZE[1]):
        out, lse = fa4_block_sparse_attention(q, k, v, block_mask, scale)
        return (out, lse) if return_lse else out
    return run_flex_attention(q, k, v, block_mask, scale, return_lse, kernel_options)


FA4_DENSE_MIN_QUERIES = 2048
"""``"auto"`` runs dense attention with FA4 for calls of at least this many queries. On an
H200 FA4's causal forward (its recorded launch) took less time than SDPA's from 2k tokens
on, from an idle GPU and queued; at 512-1k tokens its host time (~25 µs a call against
SDPA's ~20) outweighs its faster kernel (``benchmarks/dense_crossover.py``,
``docs/kernels.md``). Few queries against a long cache (decode, speculative
verification) are what SDPA's split-KV kernels are for."""


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, kernel: AttentionKernel = "auto"
) -> Tensor:
    """Dense causal attention for the dense paths: FA4 where ``kernel`` allows it, else SDPA.

    ``"auto"`` takes FA4 for calls of at least :data:`FA4_DENSE_MIN_QUERIES` queries;
    single-query (decode) calls always use SDPA.
    """
    (_, q_heads, q_len, _), (_, kv_heads, kv_len, _) = q.shape, k.shape
    fa4 = (q_len > 1 and kernel == "fa4") or (q_len >= FA4_DENSE_MIN_QUERIES and kernel == "auto")
    if fa4 and _uses_fa4(q, k, v, kernel, None):
        return fa4_causal_attention(q, k, v, scale)
    if q_len == kv_len:  # the common case, without a second look at the shapes
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q_heads != kv_heads)
    return dense_causal_attention(q, k, v, scale)


def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Dense attention where query ``i`` sees keys ``<= Lk - Lq + i`` (SDPA, GQA aware)."""
    (_, q_heads, q_len, _), (_, kv_heads, kv_len, _) = q.shape, k.shape
    gqa = q_heads != kv_heads
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    mask = causal_lower_right(q_len, kv_len)
    if gqa:  # the lower-right bias object does not take enable_gqa
        group = q_heads // kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def is_short_prompt(q: Tensor, k: Tensor, v: Tensor, config: FlexPrefillConfig) -> bool:
    """Whether :func:`flex_prefill_attention` runs dense attention for the length alone.

    True for ``Lq == 1`` and for ``Lq`` below ``config.effective_min_seq_len``, which with
    ``min_seq_len=None`` depends on whether FA4 would run this call (looked up only for
    lengths between the two defaults).
    """
    q_len = q.shape[-2]
    if q_len == 1:
        return True
    if config.min_seq_len is not None or not FA4_MIN_SEQ_LEN <= q_len < FLEX_MIN_SEQ_LEN:
        return q_len < config.effective_min_seq_len(fa4=False)
    fa4 = config.attention_kernel != "flex" and fa4_unusable_reason(q, k, v, config.block_size) is None
    return q_len < config.effective_min_seq_len(fa4)


def _density_rule_applies(q: Tensor, config: FlexPrefillConfig, return_lse: bool) -> bool:
    """Whether the ``max_density`` rule runs: set, no lse requested, eager (it syncs the host)."""
    if config.max_density is None or return_lse or torch.compiler.is_compiling():
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


def flex_prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    config: FlexPrefillConfig | None = None,
    gamma: float | None = None,
    tau: float | None = None,
    block_size: int | None = None,
    min_budget: int | None = None,
    max_budget: int | None = UNSET,
    query_aware_selection: QueryAwareSelection | None = None,
    min_seq_len: int | None = None,
    max_density: float | None = UNSET,
    attention_kernel: AttentionKernel | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
    kernel_options: dict[str, Any] | None = None,
    return_lse: bool = False,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Causal attention of the last ``Lq`` positions with FlexPrefill's block sparsity.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``;
            ``Hq % Hkv == 0``, ``Lq <= Lk``, float16/bfloat16/float32, one device.
        config: a :class:`FlexPrefillConfig`. The keywords ``gamma``, ``tau``,
            ``block_size``, ``min_budget``, ``max_budget``, ``query_aware_selection``,
            ``min_seq_len``, ``max_density`` and ``attention_kernel`` override its fields;
            ``None`` leaves a field as it is, except ``max_budget=None``/``max_density=None``,
            which switch the cap/check off.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: mask backend, see :func:`flex_prefill_block_mask`.
        kernel_options: passed to ``flex_attention`` when it runs (default: tuned for
            Hopper, see :func:`default_kernel_options`).
        return_lse: also return the log-sum-exp ``[B, Hq, Lq]`` (float32).
        return_info: also return a :class:`FlexPrefillInfo`.

    Returns:
        ``out [B, Hq, Lq, Dv]``, then ``lse`` if ``return_lse``, then ``info`` if
        ``return_info``. The attention kernel is the config's ``attention_kernel`` (FA4
        where it can run, else compiled FlexAttention and SDPA). The attention is dense
        (FA4's causal forward, or SDPA) when ``Lq == 1`` (always SDPA), when
        ``Lq < min_seq_len`` (``None``: 16384 where FA4 runs the call, else 32768; see
        :func:`is_short_prompt`), or, in eager mode, when the mask would be denser than
        ``max_density``: with the Triton pipeline judged on the pattern stage's forecast
        (``info.predicted_density``; the block selection is then skipped), with the
        reference on the built mask (the info still describes it). With ``return_lse`` the
        short-input path uses compiled flex over all visible blocks and the density rule is
        skipped.
    """
    check_qkv(q, k, v, scale, backend)
    config = resolve_config(
        config,
        gamma=gamma,
        tau=tau,
        block_size=block_size,
        min_budget=min_budget,
        max_budget=max_budget,
        query_aware_selection=query_aware_selection,
        min_seq_len=min_seq_len,
        max_density=max_density,
        attention_kernel=attention_kernel,
    )
    kernel = config.attention_kernel
    q_len = q.shape[-2]
    short = is_short_prompt(q, k, v, config)
    if short and not (return_lse or return_info):  # the common short-prompt call: host time matters
        return dense_attention(q, k, v, scale, kernel)
    layout = BlockLayout(q_len, k.shape[-2], config.block_size)
    info: FlexPrefillInfo | None = None
    if short:
        if return_info:
            info = FlexPrefillInfo.dense(q.shape[0], q.shape[1], layout, config, q.device)
        if return_lse:
            active = layout.visible(q.device).expand(q.shape[0], q.shape[1], -1, -1)
            result = run_sparse_attention(
                q, k, v, block_mask_from_active(active, layout), scale, True, kernel_options, kernel
            )
        else:
            result = dense_attention(q, k, v, scale, kernel)
    else:
        check = _density_rule_applies(q, config, return_lse)
        forecast = check and uses_triton(q, backend)  # else: the built mask's density
        dense_above = config.max_density if forecast else None
        block_mask, info = build_block_mask(
            q, k, config, scale, backend, return_info or (check and not forecast), dense_above
        )
        # None: the forecast said too dense; without a forecast, the built mask's density decides
        judge_mask = check and not forecast and info is not None
        if block_mask is None or (judge_mask and bool(info.density.mean() > config.max_density)):  # host sync
            if info is not None:
                info.sparse = False
            result = dense_attention(q, k, v, scale, kernel)
        else:
            result = run_sparse_attention(q, k, v, block_mask, scale, return_lse, kernel_options, kernel)
    outputs = result if isinstance(result, tuple) else (result,)
    if return_info:
        outputs = (*outputs, info)
    return outputs[0] if len(outputs) == 1 else outputs
