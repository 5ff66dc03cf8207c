"""``flex_prefill_block_mask``: choose the active blocks with a backend, assemble the BlockMask."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .block_mask import block_mask_from_active
from .config import UNSET, AttentionKernel, FlexPrefillConfig, QueryAwareSelection, resolve_config
from .info import FlexPrefillInfo
from .layout import BlockLayout
from .reference import flex_prefill_reference
from .validation import check_qk

Backend = Literal["auto", "reference", "triton"]


def uses_triton(q: Tensor, backend: Backend) -> bool:
    """Whether ``backend`` runs the Triton pipeline for ``q`` (``"auto"``: on CUDA tensors)."""
    return backend == "triton" or (backend == "auto" and q.is_cuda)


def build_block_mask(
    q: Tensor,
    k: Tensor,
    config: FlexPrefillConfig,
    scale: float | None,
    backend: Backend,
    with_info: bool = False,
    dense_above: float | None = None,
) -> tuple[BlockMask | None, FlexPrefillInfo | None]:
    """Select the active blocks with ``backend`` and assemble the ``BlockMask`` (and its info).

    ``"triton"`` runs the device pipeline of :mod:`flexprefill_torch.kernels` (CUDA tensors,
    or CPU tensors under ``TRITON_INTERPRET=1``); ``"auto"`` uses it for CUDA tensors and the
    pure-PyTorch reference otherwise.

    ``dense_above`` (Triton pipeline only; costs one host synchronisation): when the
    forecast of :func:`.kernels.pipeline.forecast_density` (the pattern stage of a few
    probe heads) exceeds it on average, the rest is skipped and ``(None, info)`` returned,
    ``info`` (if ``with_info``) describing the dense attention to run instead.
    """
    layout = BlockLayout(q.shape[-2], k.shape[-2], config.block_size)
    with torch.no_grad():
        if uses_triton(q, backend):
            from .kernels.pipeline import (  # imports Triton
                forecast_density,
                pattern_stage,
                selection_from_pattern,
            )

            stage = None
            if dense_above is not None:
                predicted, stage = forecast_density(q, k, config, scale)
                if predicted.mean().item() > dense_above:  # host sync
                    if not with_info:
                        return None, None
                    info = FlexPrefillInfo.dense(q.shape[0], q.shape[1], layout, config, q.device)
                    info.predicted_density = predicted
                    return None, info
            if stage is None:
                stage = pattern_stage(q, k, config, scale)
            selection = selection_from_pattern(stage, config)
        else:
            selection = flex_prefill_reference(q, k, config, scale)
        block_mask = block_mask_from_active(selection.active, layout)  # visible blocks only
        if not with_info:  # (no diagnostics: no extra device work)
            return block_mask, None
        info = FlexPrefillInfo.from_selection(
            selection.active, selection.query_aware, selection.js_distance, layout, config
        )
    return block_mask, info


def flex_prefill_block_mask(
    q: Tensor,
    k: Tensor,
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
    return_info: bool = False,
) -> BlockMask | tuple[BlockMask, FlexPrefillInfo]:
    """The FlexPrefill ``BlockMask`` of ``q`` against ``k``: one mask per (batch, query head).

    Args:
        q: ``[B, Hq, Lq, D]`` queries, the last ``Lq`` positions of the sequence.
        k: ``[B, Hkv, Lk, D]`` keys, ``Hq % Hkv == 0`` and ``Lq <= Lk``.
        config: a :class:`FlexPrefillConfig`. The keywords ``gamma``, ``tau``,
            ``block_size``, ``min_budget``, ``max_budget``, ``query_aware_selection``,
            ``min_seq_len``, ``max_density`` and ``attention_kernel`` override its fields
            (the last three only matter to :func:`flex_prefill_attention`); ``None`` leaves a field as it is,
            except ``max_budget=None``/``max_density=None``, which switch the cap/check off.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"reference"`` (pure PyTorch), ``"triton"`` or ``"auto"``.
        return_info: also return a :class:`FlexPrefillInfo`.

    Returns:
        A ``BlockMask`` with ``B × Hq`` masks over ``(Lq, Lk)``, block size ``b``, built from
        block indices (full blocks below the causal boundary, partial blocks on it). Use it
        with a *compiled* ``flex_attention(q, k, v, block_mask=..., enable_gqa=True)``.
    """
    check_qk(q, k, scale, backend)
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
    block_mask, info = build_block_mask(q, k, config, scale, backend, with_info=return_info)
    return (block_mask, info) if return_info else block_mask
