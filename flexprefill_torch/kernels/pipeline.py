"""The Triton mask-building pipeline: ``q, k -> active blocks`` (and BlockMask indices).

Stages (the Triton ones are ``torch.library.triton_op``s, so the pipeline is traceable by
``torch.compile(fullgraph=True)``, and it is capturable in a CUDA graph: no host
synchronisation, no data-dependent Python branch, no loop over batch or heads):

1. :func:`.representative.representative_attention` (``â``, slash parts, and the pooled
   keys: one pass over ``k``);
2. :func:`.pattern.head_pattern` (``ā``, ``D_JS``, pattern, dense fallback, vertical and
   slash γ-selections) — steps 1–2 are :func:`pattern_stage`, whose
   :meth:`PatternStage.predicted_density` is a forecast of the mask density;
   ``flex_prefill_attention`` first runs them on a few probe heads
   (:func:`forecast_density`) and skips the rest when the mask would be too dense to pay;
3. :func:`.pool.pool_blocks` of ``q`` times the scale, for the sparse query-aware heads
   only (no other head uses ``Q̄``: the others are not read);
4. :func:`.logits.block_logits`, ``scale · Q̄ · K̄ᵀ`` (float32) of the sparse query-aware
   heads, on their causally visible blocks only (the cells step 5 reads);
5. :func:`.select.select_blocks` (block rules, query-aware selection, line extension, cap,
   and the dense fallback of query-aware heads with a non-finite pooled query);
6. optionally :func:`.emit.emit_block_indices` (``from_kv_blocks`` inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ..block_mask import block_mask_from_active
from ..config import FlexPrefillConfig
from ..layout import BlockLayout
from .logits import block_logits
from .pattern import QUERY_AWARE, SPARSE, head_pattern
from .pool import pool_blocks
from .representative import representative_attention
from .select import select_blocks


@dataclass
class TritonSelection:
    """Outputs of :func:`triton_selection` (per batch row and query head).

    Attributes:
        active: ``[B, Hq, nq, nk]`` bool, the final active blocks (visible ones only).
        flags: ``[B, Hq]`` int32, :data:`.pattern.QUERY_AWARE` | :data:`.pattern.SPARSE`
            (see :attr:`query_aware`, :attr:`sparse`); js_distance: ``[B, Hq]`` float32.
        true_blocks, estimated_blocks, slash: ``[B, Hq, nk]`` float32 (``â``, ``ā``, slash).
        vertical_selected, slash_selected: ``[B, Hq, nk]`` bool, step 5's selections.
    """

    active: Tensor
    flags: Tensor
    js_distance: Tensor
    true_blocks: Tensor
    estimated_blocks: Tensor
    slash: Tensor
    vertical_selected: Tensor
    slash_selected: Tensor

    @property
    def query_aware(self) -> Tensor:
        """``[B, Hq]`` bool: the head uses the query-aware pattern."""
        return (self.flags & QUERY_AWARE) != 0

    @property
    def sparse(self) -> Tensor:
        """``[B, Hq]`` bool, False for heads that fell back to dense."""
        return (self.flags & SPARSE) != 0


@dataclass
class PatternStage:
    """Steps 1–2 of :func:`triton_selection` (representative attention, pattern).

    Attributes: the queries ``q [B, Hq, Lq, D]`` and softmax ``scale`` (step 3 pools
    them), the pooled keys ``k_pool [B, Hkv, nk, D]``, and :func:`.pattern.head_pattern`'s
    outputs (``estimate``, ``slash``, ``js``, ``flags``, ``vsel``, ``ssel``, ``density``)
    with ``true_blocks`` (``â``).
    """

    layout: BlockLayout
    q: Tensor
    scale: float
    k_pool: Tensor
    true_blocks: Tensor
    estimate: Tensor
    slash: Tensor
    js: Tensor
    flags: Tensor
    vsel: Tensor
    ssel: Tensor
    density: Tensor

    @property
    def query_aware(self) -> Tensor:
        """``[B, Hq]`` bool: the head uses the query-aware pattern."""
        return (self.flags & QUERY_AWARE) != 0

    def predicted_density(self) -> Tensor:
        """``[B, Hq]`` float32: a cheap forecast of each head's mask density.

        The fraction of key blocks in the vertical γ-selection of the representative
        queries, plus that of the slash selection for vertical-slash heads (at most 1);
        1 for heads that fall back to dense (computed by :func:`.pattern.head_pattern`).
        Measured close to the final density on structured and random inputs
        (``tests/test_attention_paths.py``, ``tests/kernels_interp/check_kernels.py``);
        ``flex_prefill_attention`` uses it to skip the selection when the mask would be
        too dense to pay.
        """
        return self.density


def pattern_stage(q: Tensor, k: Tensor, config: FlexPrefillConfig, scale: float | None = None) -> PatternStage:
    """Representative attention and pattern decision (steps 1–2).

    Args: as :func:`triton_selection`.
    """
    b = config.block_size
    layout = BlockLayout(q.shape[-2], k.shape[-2], b)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    true_blocks, parts, k_pool = representative_attention(q, k, b, scale)
    estimate, slash, js, flags, vsel, ssel, density = head_pattern(
        q, k_pool, true_blocks, parts, b, layout.kv_len, scale, config.tau, config.gamma
    )
    return PatternStage(layout, q, scale, k_pool, true_blocks, estimate, slash, js, flags, vsel, ssel, density)


PROBE_HEADS = 8
"""About this many query heads make the density forecast (:func:`forecast_density`)."""


def probe_stride(q_heads: int, kv_heads: int) -> int:
    """Stride ``s`` of the forecast's probe heads ``q[:, ::s]`` (``1``: every head).

    The largest ``s <= q_heads // PROBE_HEADS`` that divides ``q_heads`` and divides, or
    is a multiple of, the GQA group ``q_heads // kv_heads`` (so the probe heads keep their
    own key heads).
    """
    group = q_heads // kv_heads
    stride = max(1, q_heads // PROBE_HEADS)
    while stride > 1 and (q_heads % stride or (group % stride and stride % group)):
        stride -= 1
    return stride


def forecast_density(
    q: Tensor, k: Tensor, config: FlexPrefillConfig, scale: float | None = None
) -> tuple[Tensor, PatternStage | None]:
    """``[B, Hq]`` float32 forecast of each head's mask density, from a few probe heads.

    The pattern stage (:func:`pattern_stage`) of the query heads ``0, s, 2s, ...``
    (``s = probe_stride``; about :data:`PROBE_HEADS` of them) with their own key heads;
    query head ``h`` gets the forecast of probe head ``h - h % s``. A dense verdict then
    costs about ``1/s`` of the pattern stage. With ``s = 1`` the probe is every head and
    its stage is returned for the selection to reuse (else ``None``).
    """
    q_heads, kv_heads = q.shape[1], k.shape[1]
    stride = probe_stride(q_heads, kv_heads)
    if stride == 1:
        stage = pattern_stage(q, k, config, scale)
        return stage.predicted_density(), stage
    group = q_heads // kv_heads
    k_probe = k[:, :: stride // group] if stride > group else k
    probe = pattern_stage(q[:, ::stride], k_probe, config, scale)
    return probe.predicted_density().repeat_interleave(stride, dim=1), None


def selection_from_pattern(stage: PatternStage, config: FlexPrefillConfig) -> TritonSelection:
    """Query pooling, block logits and block selection (steps 3–5) after :func:`pattern_stage`."""
    layout = stage.layout
    q_pool, q_bad = pool_blocks(stage.q, layout.block_size, stage.scale, stage.flags)  # scale * Q̄
    logits = block_logits(q_pool, stage.k_pool, stage.flags, layout.q_len, layout.kv_len, layout.block_size)
    max_blocks = -1 if config.max_blocks is None else config.max_blocks
    active, flags = select_blocks(
        logits,
        stage.flags,
        q_bad,
        stage.true_blocks,
        stage.slash,
        stage.vsel,
        stage.ssel,
        layout.q_len,
        layout.kv_len,
        layout.block_size,
        config.gamma,
        config.min_blocks,
        max_blocks,
        config.query_aware_selection == "per_row",
        config.tau > 0.0,
    )
    return TritonSelection(
        active=active,
        flags=flags,
        js_distance=stage.js,
        true_blocks=stage.true_blocks,
        estimated_blocks=stage.estimate,
        slash=stage.slash,
        vertical_selected=stage.vsel,
        slash_selected=stage.ssel,
    )


def triton_selection(
    q: Tensor, k: Tensor, config: FlexPrefillConfig, scale: float | None = None
) -> TritonSelection:
    """Run the whole pipeline; same decisions as ``reference.flex_prefill_reference``.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (float16/bfloat16/float32, CUDA, or CPU
            under ``TRITON_INTERPRET=1``).
        config: the FlexPrefill configuration; scale: default ``1/sqrt(D)``.
    """
    return selection_from_pattern(pattern_stage(q, k, config, scale), config)


def triton_select_active_blocks(
    q: Tensor, k: Tensor, config: FlexPrefillConfig, scale: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(active [B, Hq, nq, nk] bool, query_aware [B, Hq] bool, js_distance [B, Hq])``."""
    selection = triton_selection(q, k, config, scale)
    return selection.active, selection.query_aware, selection.js_distance


def triton_block_mask(
    q: Tensor, k: Tensor, config: FlexPrefillConfig, scale: float | None = None
) -> BlockMask:
    """The FlexPrefill ``BlockMask`` built entirely on the device (selection + emission).

    Same mask as ``flex_prefill_block_mask(..., backend="triton")``.
    """
    layout = BlockLayout(q.shape[-2], k.shape[-2], config.block_size)
    return block_mask_from_active(triton_selection(q, k, config, scale).active, layout, use_triton=True)
