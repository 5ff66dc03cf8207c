"""Tests of the other sparse-prefill methods (``flexprefill_torch.methods``).

Per method, the rules it promises are checked as hypothesis properties over small shapes
(batch 1-2, key heads 1-2, GQA group 1-3, block 16/32/64, lengths that need not be
multiples of the block, ``Lq <= Lk``). Scores the rules are stated on are recomputed here in
float64 with independent formulas (token-level masks, one-hot pooling, explicit gathers),
so the tests do not only check the implementation against itself. The compiled
FlexAttention checks use one fixed shape family (B=1, Hq=4, Hkv=2, D=32, fp32, block 64).
The Triton scoring kernels are compared with their PyTorch references under
``TRITON_INTERPRET=1`` in a subprocess (float32).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from flexprefill_torch import (
    BlockLayout,
    active_from_block_mask,
    flash_prefill_block_mask,
    streaming_block_mask,
    vertical_slash_block_mask,
    xattention_block_mask,
)
from flexprefill_torch.attention import dense_causal_attention, run_flex_attention
from flexprefill_torch.methods import MethodInfo
from flexprefill_torch.methods.flashprefill import flashprefill_scores_reference, normalised_scores
from flexprefill_torch.methods.vertical_slash import line_scores, vertical_slash_active
from flexprefill_torch.methods.xattention import xattention_scores_reference
from flexprefill_torch.reference import masked_attention_reference, pool_blocks

TOL = 1e-5  # float32 implementation against the float64 recomputation here


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Shape:
    batch: int
    kv_heads: int
    group: int
    block_size: int
    kv_len: int
    q_len: int
    head_dim: int
    amplitude: float
    seed: int
    clustered: bool = True

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(self.q_len, self.kv_len, self.block_size)


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    block = draw(st.sampled_from((16, 32, 64)))
    kv_len = draw(st.integers(1, 5 * block + 7))
    q_len = draw(st.integers(1, kv_len))
    return Shape(
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.integers(1, 3)),
        block_size=block,
        kv_len=kv_len,
        q_len=q_len,
        head_dim=draw(st.sampled_from((16, 32))),
        amplitude=draw(st.sampled_from((1.0, 4.0))),
        seed=draw(st.integers(0, 2**16)),
        clustered=draw(st.booleans()),
    )


def make_qk(shape: Shape) -> tuple[Tensor, Tensor]:
    """Random ``q``/``k`` (float32); a large amplitude makes the attention peaked (sparse).

    ``clustered`` adds one random vector per key block to its keys, so block means differ
    and the block-level scores (FlashPrefill, XAttention) are far from uniform.
    """
    gen = torch.Generator().manual_seed(shape.seed)
    q = shape.amplitude * torch.randn(shape.batch, shape.q_heads, shape.q_len, shape.head_dim, generator=gen)
    k = torch.randn(shape.batch, shape.kv_heads, shape.kv_len, shape.head_dim, generator=gen)
    if shape.clustered:
        n_blocks = shape.layout.num_kv_blocks
        centres = 1.5 * torch.randn(shape.batch, shape.kv_heads, n_blocks, shape.head_dim, generator=gen)
        k = k + centres[..., torch.arange(shape.kv_len) // shape.block_size, :]
    return q, k


def active_of(block_mask) -> Tensor:
    return active_from_block_mask(block_mask)


def token_causal(layout: BlockLayout) -> Tensor:
    """``[Lq, Lk]`` bool: query ``i`` (at ``offset + i``) may see key ``t``."""
    rows = torch.arange(layout.q_len)[:, None] + layout.offset
    return torch.arange(layout.kv_len)[None, :] <= rows


def pool_any(token_map: Tensor, layout: BlockLayout) -> Tensor:
    """``[..., Lq, Lk]`` bool -> ``[..., nq, nk]``: some pair of the block is set."""
    b = layout.block_size
    qi, kj = torch.arange(layout.q_len) // b, torch.arange(layout.kv_len) // b
    rows = torch.zeros(*token_map.shape[:-2], layout.num_q_blocks, layout.kv_len)
    rows = rows.index_add(-2, qi, token_map.double().to(rows.dtype))
    blocks = torch.zeros(*token_map.shape[:-2], layout.num_q_blocks, layout.num_kv_blocks)
    return blocks.index_add(-1, kj, rows) > 0


def visible_tokens(layout: BlockLayout) -> Tensor:
    """Visible blocks recomputed from the token-level causal mask."""
    return pool_any(token_causal(layout), layout)


def diagonal_blocks(layout: BlockLayout) -> Tensor:
    """``[nq, nk]`` bool: the key blocks that hold a position of the row's own queries."""
    b = layout.block_size
    positions = torch.arange(layout.q_len) + layout.offset
    own = torch.zeros(layout.num_q_blocks, layout.num_kv_blocks, dtype=torch.bool)
    own[torch.arange(layout.q_len) // b, positions // b] = True
    return own


def check_common(active: Tensor, info: MethodInfo, shape: Shape) -> None:
    """Shape, causality and the info's counts."""
    layout = shape.layout
    assert active.shape == (shape.batch, shape.q_heads, layout.num_q_blocks, layout.num_kv_blocks)
    visible = visible_tokens(layout)
    assert not (active & ~visible).any(), "an active block lies wholly above the causal boundary"
    assert torch.equal(info.active_blocks, active.sum((-2, -1)))
    assert torch.equal(info.visible_blocks, visible.sum().expand(shape.batch, shape.q_heads))
    torch.testing.assert_close(info.density, active.sum((-2, -1)).float() / visible.sum())


# --------------------------------------------------------------------------- StreamingLLM


@given(shape=shapes(), sink=st.integers(0, 200), local=st.integers(1, 300))
def test_streaming_matches_token_rule(shape: Shape, sink: int, local: int) -> None:
    q, k = make_qk(shape)
    block_mask, info = streaming_block_mask(
        q, k, sink_tokens=sink, local_tokens=local, block_size=shape.block_size, return_info=True
    )
    active = active_of(block_mask)
    check_common(active, info, shape)
    layout = shape.layout
    positions = torch.arange(layout.q_len)[:, None] + layout.offset
    keys = torch.arange(layout.kv_len)[None, :]
    wanted = token_causal(layout) & ((keys < sink) | (positions - keys < local))
    expected = pool_any(wanted, layout)
    assert torch.equal(active, expected.expand_as(active))


def test_streaming_huge_window_is_dense() -> None:
    shape = Shape(2, 2, 2, 32, 150, 100, 16, 1.0, 0)
    q, k = make_qk(shape)
    active = active_of(streaming_block_mask(q, k, sink_tokens=0, local_tokens=150, block_size=32))
    assert torch.equal(active, visible_tokens(shape.layout).expand_as(active))
    active = active_of(streaming_block_mask(q, k, sink_tokens=150, local_tokens=1, block_size=32))
    assert torch.equal(active, visible_tokens(shape.layout).expand_as(active))


# --------------------------------------------------------------------------- FlashPrefill


def flashprefill_scores64(q: Tensor, k: Tensor, layout: BlockLayout, scale: float) -> Tensor:
    """``s [B, Hq, nq, nk]`` of the module doc, in float64 from scratch (one-hot pooling)."""
    b = layout.block_size
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    owner = torch.nn.functional.one_hot(torch.arange(layout.kv_len) // b, layout.num_kv_blocks).double()
    k_mean = (owner.T @ k) / owner.sum(0)[:, None]
    logits = scale * q.double() @ k_mean.mT  # [B, H, Lq, nk]
    k_last = torch.clamp(torch.arange(1, layout.num_kv_blocks + 1) * b, max=layout.kv_len) - 1
    positions = torch.arange(layout.q_len) + layout.offset
    logits = logits.masked_fill(k_last[None, :] > positions[:, None], -math.inf)
    row_of = torch.arange(layout.q_len) // b
    row_max = torch.full((*q.shape[:2], layout.num_q_blocks), -math.inf, dtype=torch.float64)
    row_max = row_max.scatter_reduce(-1, row_of.expand(*q.shape[:2], -1), logits.amax(-1), "amax")
    safe_max = row_max.masked_fill(row_max == -math.inf, 0.0)
    terms = torch.exp(logits - safe_max[..., row_of, None])
    s = torch.zeros(*q.shape[:2], layout.num_q_blocks, layout.num_kv_blocks, dtype=torch.float64)
    s = s.index_add(-2, row_of, terms)
    return s / s.sum(-1, keepdim=True).clamp(min=1e-300)


@given(
    shape=shapes(),
    alpha=st.sampled_from((0.0, 0.05, 0.12, 0.3, 1.0)),
    sink=st.integers(0, 3),
    window=st.integers(1, 3),
    dense_last=st.integers(0, 2),
)
def test_flashprefill_rules(shape: Shape, alpha: float, sink: int, window: int, dense_last: int) -> None:
    q, k = make_qk(shape)
    layout = shape.layout
    b = layout.block_size
    block_mask, info = flash_prefill_block_mask(
        q,
        k,
        alpha=alpha,
        attention_sink=sink,
        window=window,
        dense_last=dense_last,
        block_size=b,
        backend="reference",
        return_info=True,
    )
    active = active_of(block_mask)
    check_common(active, info, shape)
    visible = visible_tokens(layout)
    nq, nk = layout.num_q_blocks, layout.num_kv_blocks
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    q_first = i * b + layout.offset
    q_last = torch.clamp((i + 1) * b, max=layout.q_len) - 1 + layout.offset
    forced = (j < sink) | ((j >= q_first // b - window + 1) & (j <= q_last // b)) | (i >= nq - dense_last)
    forced = forced & visible
    assert active[..., forced].all(), "a sink, window or dense-last block is missing"
    last_rows = torch.arange(nq) >= nq - dense_last
    assert torch.equal(active[..., last_rows, :], visible[last_rows].expand(*active.shape[:2], -1, -1))
    # The normalised scores, then the dynamic threshold on them away from the boundary.
    scale = 1.0 / math.sqrt(shape.head_dim)
    s = flashprefill_scores64(q, k, layout, scale)
    s_impl = normalised_scores(*flashprefill_scores_reference(q, pool_blocks(k, b), layout, scale))
    torch.testing.assert_close(s_impl.double(), s, atol=TOL, rtol=TOL)
    bound = alpha * s.amax(-1, keepdim=True)
    free = visible & ~forced
    assert active[(s > bound + TOL) & free].all(), "a block above alpha * max was dropped"
    assert not active[(s < bound - TOL) & free].any(), "a block below alpha * max was kept"
    if alpha == 0.0:
        assert torch.equal(active, visible.expand_as(active))


@given(shape=shapes(), alphas=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)))
def test_flashprefill_monotone_in_alpha(shape: Shape, alphas: tuple[float, float]) -> None:
    q, k = make_qk(shape)
    low, high = sorted(alphas)
    kw = {"block_size": shape.block_size, "backend": "reference"}
    more = active_of(flash_prefill_block_mask(q, k, alpha=low, **kw))
    fewer = active_of(flash_prefill_block_mask(q, k, alpha=high, **kw))
    assert not (fewer & ~more).any()


# --------------------------------------------------------------------------- vertical-slash


def line_scores64(q: Tensor, k: Tensor, last_q: int, scale: float) -> tuple[Tensor, Tensor]:
    """Vertical ``[B, H, Lk]`` and slash ``[B, H, Lk]`` scores in float64, by explicit offsets."""
    q_len, kv_len = q.shape[-2], k.shape[-2]
    r = min(last_q, q_len)
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    positions = torch.arange(kv_len - r, kv_len)
    keys = torch.arange(kv_len)
    logits = (scale * q[..., -r:, :].double() @ k.mT).masked_fill(keys > positions[:, None], -math.inf)
    probs = torch.softmax(logits, -1)
    offsets = positions[:, None] - keys[None, :]  # offset of (row, key)
    slash = torch.zeros(*q.shape[:2], kv_len, dtype=torch.float64)
    slash = slash.index_add(-1, offsets.clamp(min=0).flatten(), (probs * (offsets >= 0)).flatten(-2))
    return probs.sum(-2), slash


@given(
    shape=shapes(),
    vertical_size=st.integers(0, 40),
    slash_size=st.integers(0, 40),
    last_q=st.integers(1, 80),
)
def test_vertical_slash_budgets_and_lines(
    shape: Shape, vertical_size: int, slash_size: int, last_q: int
) -> None:
    q, k = make_qk(shape)
    layout = shape.layout
    block_mask, info = vertical_slash_block_mask(
        q,
        k,
        vertical_size=vertical_size,
        slash_size=slash_size,
        last_q=last_q,
        block_size=shape.block_size,
        return_info=True,
    )
    active = active_of(block_mask)
    check_common(active, info, shape)
    scale = 1.0 / math.sqrt(shape.head_dim)
    # Exactly min(budget, available) lines per head.
    n_heads = (shape.batch, shape.q_heads)
    assert torch.equal(info.extras["vertical_lines"], torch.full(n_heads, min(vertical_size, shape.kv_len)))
    assert torch.equal(info.extras["slash_lines"], torch.full(n_heads, min(slash_size, shape.kv_len)))
    _, keys, offsets, _ = vertical_slash_active(q, k, layout, vertical_size, slash_size, last_q, scale)
    # The lines chosen are the strongest ones (ties within TOL may go either way).
    vertical, slash = line_scores64(q, k, last_q, scale)
    for impl, expected in zip(line_scores(q, k, last_q, scale), (vertical, slash), strict=True):
        torch.testing.assert_close(impl.double(), expected, atol=TOL, rtol=TOL)
    for chosen, score in ((keys, vertical), (offsets, slash)):
        lowest_in = score.masked_fill(~chosen, math.inf).amin(-1)
        highest_out = score.masked_fill(chosen, -math.inf).amax(-1)
        assert (lowest_in >= highest_out - TOL).all()
    # Every (query, key) pair on a selected line lies in an active block.
    positions = torch.arange(layout.q_len)[:, None] + layout.offset
    key_idx = torch.arange(layout.kv_len)[None, :]
    offset_of = (positions - key_idx).clamp(min=0)
    on_line = keys[..., None, :] | offsets[..., offset_of]
    needed = pool_any(on_line & token_causal(layout), layout)
    assert not (needed & ~active).any(), "a selected line crosses an inactive block"
    # Block 0 and the diagonal blocks are always active.
    forced = diagonal_blocks(layout).clone()
    forced[:, 0] = True
    assert active[..., forced].all()


def test_vertical_slash_huge_budget_is_dense() -> None:
    shape = Shape(1, 2, 2, 16, 150, 90, 16, 4.0, 3)
    q, k = make_qk(shape)
    active = active_of(vertical_slash_block_mask(q, k, vertical_size=10**6, slash_size=0, block_size=16))
    assert torch.equal(active, visible_tokens(shape.layout).expand_as(active))
    active = active_of(vertical_slash_block_mask(q, k, vertical_size=0, slash_size=10**6, block_size=16))
    assert torch.equal(active, visible_tokens(shape.layout).expand_as(active))


# --------------------------------------------------------------------------- XAttention


def xattention_scores64(q: Tensor, k: Tensor, layout: BlockLayout, stride: int, scale: float) -> Tensor:
    """Row-normalised antidiagonal block scores ``[B, Hq, nq, nk]`` in float64, by gathers."""
    b, s = layout.block_size, stride
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    n_qg, n_kg = -(-layout.q_len // s), -(-layout.kv_len // s)
    q_pad = torch.nn.functional.pad(q.double(), (0, 0, 0, n_qg * s - layout.q_len))
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, n_kg * s - layout.kv_len))
    m = torch.arange(s)
    q_rows = torch.arange(n_qg)[:, None] * s + (s - 1 - m)[None, :]  # [n_qg, S]
    k_rows = torch.arange(n_kg)[:, None] * s + m[None, :]  # [n_kg, S]
    logits = (scale / s) * torch.einsum("bhgmd,bhnmd->bhgn", q_pad[..., q_rows, :], k_pad[..., k_rows, :])
    last = torch.clamp(torch.arange(n_qg) * s + s - 1, max=layout.q_len - 1) + layout.offset
    visible = torch.arange(n_kg)[None, :] * s <= last[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, -math.inf), -1)
    q_owner = torch.nn.functional.one_hot(torch.arange(n_qg) * s // b, layout.num_q_blocks).double()
    k_owner = torch.nn.functional.one_hot(torch.arange(n_kg) * s // b, layout.num_kv_blocks).double()
    blocks = q_owner.T @ probs @ k_owner
    return blocks / blocks.sum(-1, keepdim=True)


@given(shape=shapes(), threshold=st.sampled_from((0.0, 0.5, 0.8, 0.9, 0.97)), stride=st.sampled_from((8, 16)))
def test_xattention_threshold_rules(shape: Shape, threshold: float, stride: int) -> None:
    q, k = make_qk(shape)
    layout = shape.layout
    block_mask, info = xattention_block_mask(
        q,
        k,
        threshold=threshold,
        stride=stride,
        block_size=shape.block_size,
        backend="reference",
        return_info=True,
    )
    active = active_of(block_mask)
    check_common(active, info, shape)
    forced = diagonal_blocks(layout).clone()
    forced[:, 0] = True
    assert active[..., forced].all(), "block 0 or a diagonal block is missing"
    scale = 1.0 / math.sqrt(shape.head_dim)
    scores = xattention_scores64(q, k, layout, stride, scale)
    impl = xattention_scores_reference(q, k, layout, stride, scale)
    torch.testing.assert_close((impl / impl.sum(-1, keepdim=True)).double(), scores, atol=TOL, rtol=TOL)
    covered = (scores * active).sum(-1)
    assert (covered >= threshold - TOL).all(), "a row does not reach the threshold"
    chosen = active & ~forced
    smallest = scores.masked_fill(~chosen, math.inf).amin(-1)
    has_choice = chosen.any(-1)
    assert (covered - smallest < threshold + TOL)[has_choice].all(), "a row is not minimal"


@given(shape=shapes(), thresholds=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)))
def test_xattention_monotone_and_one_is_dense(shape: Shape, thresholds: tuple[float, float]) -> None:
    q, k = make_qk(shape)
    low, high = sorted(thresholds)
    kw = {"block_size": shape.block_size, "backend": "reference"}
    fewer = active_of(xattention_block_mask(q, k, threshold=low, **kw))
    more = active_of(xattention_block_mask(q, k, threshold=high, **kw))
    assert not (fewer & ~more).any()
    dense = active_of(xattention_block_mask(q, k, threshold=1.0, **kw))
    assert torch.equal(dense, visible_tokens(shape.layout).expand_as(dense))


def test_xattention_stride_16_and_tiny_blocks() -> None:
    shape = Shape(1, 1, 2, 16, 70, 45, 16, 4.0, 5)
    q, k = make_qk(shape)
    active = active_of(xattention_block_mask(q, k, threshold=0.6, stride=16, block_size=16))
    scores = xattention_scores64(q, k, shape.layout, 16, 0.25)
    assert ((scores * active).sum(-1) >= 0.6 - TOL).all()


# --------------------------------------------------------------------------- non-finite input


@pytest.mark.parametrize("method", ["flashprefill", "vertical_slash", "xattention"])
def test_non_finite_head_keeps_every_block(method: str) -> None:
    shape = Shape(1, 2, 2, 16, 100, 80, 16, 4.0, 9)
    q, k = make_qk(shape)
    q[0, 1, 5, 0] = math.nan
    builder = {
        "flashprefill": lambda: flash_prefill_block_mask(q, k, block_size=16, return_info=True),
        "vertical_slash": lambda: vertical_slash_block_mask(
            q, k, vertical_size=1, slash_size=1, last_q=80, block_size=16, return_info=True
        ),
        "xattention": lambda: xattention_block_mask(q, k, threshold=0.5, block_size=16, return_info=True),
    }[method]
    block_mask, info = builder()
    active = active_of(block_mask)
    visible = visible_tokens(shape.layout)
    assert torch.equal(active[0, 1], visible)
    assert info.extras["dense"][0, 1] and not info.extras["dense"][0, 0]


# --------------------------------------------------------------------------- bad knobs


BAD_KNOBS = [
    (flash_prefill_block_mask, {"alpha": -0.1}, r"alpha.*alpha=-0\.1"),
    (flash_prefill_block_mask, {"alpha": 1.5}, r"alpha=1\.5"),
    (flash_prefill_block_mask, {"alpha": math.nan}, r"alpha=nan"),
    (flash_prefill_block_mask, {"alpha": "0.1"}, r"alpha='0\.1'"),
    (flash_prefill_block_mask, {"attention_sink": -1}, r"attention_sink=-1"),
    (flash_prefill_block_mask, {"window": 0}, r"window=0"),
    (flash_prefill_block_mask, {"window": 2.0}, r"window=2\.0"),
    (flash_prefill_block_mask, {"dense_last": -2}, r"dense_last=-2"),
    (flash_prefill_block_mask, {"block_size": 48}, r"block_size=48"),
    (flash_prefill_block_mask, {"backend": "cuda"}, r"backend='cuda'"),
    (flash_prefill_block_mask, {"scale": -1.0}, r"scale=-1\.0"),
    (streaming_block_mask, {"sink_tokens": -1}, r"sink_tokens=-1"),
    (streaming_block_mask, {"local_tokens": 0}, r"local_tokens=0"),
    (streaming_block_mask, {"local_tokens": True}, r"local_tokens=True"),
    (streaming_block_mask, {"block_size": 8}, r"block_size=8"),
    (vertical_slash_block_mask, {"vertical_size": -5}, r"vertical_size=-5"),
    (vertical_slash_block_mask, {"slash_size": 1.5}, r"slash_size=1\.5"),
    (vertical_slash_block_mask, {"last_q": 0}, r"last_q=0"),
    (vertical_slash_block_mask, {"block_size": 512}, r"block_size=512"),
    (xattention_block_mask, {"threshold": 1.01}, r"threshold=1\.01"),
    (xattention_block_mask, {"threshold": -0.5}, r"threshold=-0\.5"),
    (xattention_block_mask, {"stride": 4}, r"stride=4"),
    (xattention_block_mask, {"stride": 16, "block_size": 16}, None),  # allowed
    (xattention_block_mask, {"backend": "fast"}, r"backend='fast'"),
]


@pytest.mark.parametrize(("builder", "knobs", "message"), BAD_KNOBS)
def test_bad_knobs_are_rejected(builder, knobs: dict, message: str | None) -> None:
    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 1, 50, 16)
    if message is None:
        builder(q, k, **knobs)
        return
    with pytest.raises(ValueError, match=message):
        builder(q, k, **knobs)


@pytest.mark.parametrize(
    "builder",
    [flash_prefill_block_mask, streaming_block_mask, vertical_slash_block_mask, xattention_block_mask],
)
def test_bad_shapes_are_rejected(builder) -> None:
    with pytest.raises(ValueError, match="multiple of key heads"):
        builder(torch.randn(1, 3, 40, 16), torch.randn(1, 2, 50, 16))
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        builder(torch.randn(1, 2, 60, 16), torch.randn(1, 2, 50, 16))


# --------------------------------------------------------------------------- compiled flex

# One shape family for every compiled call: B=1, Hq=4, Hkv=2, D=32, fp32, block 64.
FLEX = {"batch": 1, "q_heads": 4, "kv_heads": 2, "head_dim": 32, "block_size": 64}
FLEX_Q_LEN, FLEX_KV_LEN = 200, 300  # not multiples of 64; queries are the last 200 positions

EXTREMES = [
    (flash_prefill_block_mask, {"alpha": 0.0, "backend": "reference"}),
    (streaming_block_mask, {"sink_tokens": 0, "local_tokens": FLEX_KV_LEN}),
    (vertical_slash_block_mask, {"vertical_size": 10**6, "slash_size": 0}),
    (xattention_block_mask, {"threshold": 1.0, "backend": "reference"}),
]

SPARSE = [
    (flash_prefill_block_mask, {"alpha": 0.5, "attention_sink": 1, "window": 1, "dense_last": 0}),
    (streaming_block_mask, {"sink_tokens": 1, "local_tokens": 1}),
    (vertical_slash_block_mask, {"vertical_size": 3, "slash_size": 3, "last_q": 16}),
    (xattention_block_mask, {"threshold": 0.3}),
]


def flex_inputs(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = 3.0 * torch.randn(1, 4, FLEX_Q_LEN, 32, generator=gen)
    k = torch.randn(1, 2, FLEX_KV_LEN, 32, generator=gen)
    k = k + 1.5 * torch.randn(1, 2, 5, 32, generator=gen)[..., torch.arange(FLEX_KV_LEN) // 64, :]
    v = torch.randn(1, 2, FLEX_KV_LEN, 32, generator=gen)
    return q, k, v


@pytest.mark.slow
@pytest.mark.parametrize(("builder", "knobs"), EXTREMES, ids=lambda x: getattr(x, "__name__", ""))
def test_extreme_knobs_give_dense_causal_attention(builder, knobs: dict) -> None:
    q, k, v = flex_inputs(0)
    block_mask = builder(q, k, block_size=64, **knobs)
    layout = BlockLayout(FLEX_Q_LEN, FLEX_KV_LEN, 64)
    active = active_of(block_mask)
    assert torch.equal(active, layout.visible("cpu").expand_as(active))
    out = run_flex_attention(q, k, v, block_mask)
    torch.testing.assert_close(out, dense_causal_attention(q, k, v), atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("builder", "knobs"), SPARSE, ids=lambda x: getattr(x, "__name__", ""))
def test_sparse_mask_output_is_faithful(builder, knobs: dict) -> None:
    q, k, v = flex_inputs(1)
    block_mask = builder(q, k, block_size=64, **knobs)
    active = active_of(block_mask)
    layout = BlockLayout(FLEX_Q_LEN, FLEX_KV_LEN, 64)
    assert active.sum() < layout.visible("cpu").sum() * 4, "the mask should drop blocks"
    out = run_flex_attention(q, k, v, block_mask)
    expected, _ = masked_attention_reference(q, k, v, active, 64)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    dense = dense_causal_attention(q, k, v)
    assert (out - dense).abs().max() > 1e-3, "dropping blocks should change the output"


# --------------------------------------------------------------------------- Triton kernels

TRITON_SCRIPT = textwrap.dedent(
    """
    import math, torch
    from flexprefill_torch.layout import BlockLayout
    from flexprefill_torch.reference import pool_blocks
    from flexprefill_torch.methods import _kernels as K
    from flexprefill_torch.methods import flash_prefill_block_mask, xattention_block_mask
    from flexprefill_torch.methods.flashprefill import flashprefill_scores_reference
    from flexprefill_torch.methods.xattention import xattention_scores_reference
    from flexprefill_torch.block_mask import active_from_block_mask
    cases = [(1, 2, 2, 150, 230, 32, 32, 8), (2, 1, 3, 37, 37, 48, 16, 16), (1, 1, 1, 200, 333, 32, 64, 8)]
    for seed, (B, Hkv, G, Lq, Lk, D, b, S) in enumerate(cases):
        gen = torch.Generator().manual_seed(seed)
        q = 2.0 * torch.randn(B, Hkv * G, Lq, D, generator=gen)
        k = torch.randn(B, Hkv, Lk, D, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)
        layout, scale = BlockLayout(Lq, Lk, b), 1 / math.sqrt(D)
        k_pool = pool_blocks(k, b)
        m1, s1 = K.flashprefill_scores(q, k_pool, layout, scale)
        m2, s2 = flashprefill_scores_reference(q, k_pool, layout, scale)
        assert torch.equal(m1 == -math.inf, m2 == -math.inf)
        fin = m2 > -math.inf
        torch.testing.assert_close(m1[fin], m2[fin], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-5)
        a1, a2 = K.xattention_scores(q, k, layout, S, scale), xattention_scores_reference(q, k, layout, S, scale)
        torch.testing.assert_close(a1, a2, atol=1e-5, rtol=1e-5)
        for fn, kw in ((flash_prefill_block_mask, {}), (xattention_block_mask, {"stride": S})):
            t = active_from_block_mask(fn(q, k, block_size=b, backend="triton", **kw))
            r = active_from_block_mask(fn(q, k, block_size=b, backend="reference", **kw))
            assert torch.equal(t, r), fn.__name__
    print("triton-ok")
    """
)


@pytest.mark.slow
def test_triton_kernels_match_references_interpreted() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "triton-ok" in result.stdout


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_no_host_sync_and_triton_agrees(cuda: torch.device) -> None:
    from flexprefill_torch.methods.flashprefill import flashprefill_select
    from flexprefill_torch.methods.streaming import streaming_active
    from flexprefill_torch.methods.xattention import xattention_select

    gen = torch.Generator(device=cuda).manual_seed(0)
    q = torch.randn(2, 8, 1000, 64, device=cuda, generator=gen)
    k = torch.randn(2, 2, 1300, 64, device=cuda, generator=gen)
    layout, scale = BlockLayout(1000, 1300, 128), 0.125
    from flexprefill_torch.methods import _kernels

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        k_pool = pool_blocks(k.float(), 128)
        m, sc = _kernels.flashprefill_scores(q, k_pool, layout, scale)
        flashprefill_select(m, sc, layout, 0.12, 2, 4, 2)
        scores = _kernels.xattention_scores(q, k, layout, 8, scale)
        xattention_select(scores, layout, 0.9)
        vertical_slash_active(q, k, layout, 100, 300, 64, scale)
        streaming_active(layout, 256, 512, cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    m_ref, sc_ref = flashprefill_scores_reference(q, k_pool, layout, scale)
    fin = m_ref > -math.inf
    torch.testing.assert_close(m[fin], m_ref[fin], atol=5e-2, rtol=1e-2)  # TF32 dot on the GPU
    torch.testing.assert_close(
        scores, xattention_scores_reference(q, k, layout, 8, scale), atol=5e-2, rtol=5e-2
    )


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs CPU tensors")
@pytest.mark.parametrize("builder", [flash_prefill_block_mask, xattention_block_mask])
def test_triton_backend_on_cpu_explains_itself(builder) -> None:
    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 1, 50, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        builder(q, k, block_size=16, backend="triton")
