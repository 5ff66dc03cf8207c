"""The BlockMask and the compiled attention path (guarantee 6 of ``ALGORITHM.md``).

Part 1 (fast) checks ``flex_prefill_block_mask``: its active map is the reference's,
full/partial blocks are split by the causal boundary, indices and info are consistent.

Part 2 (``slow``: compiles FlexAttention on CPU) checks ``flex_prefill_attention``: the
output equals dense softmax attention masked to the active blocks (recomputed here in
float64), equals dense causal attention at γ = 1, and a mask with dropped blocks really
changes the output (eager flex would ignore the block indices; we compile). Each compiled
test uses one fixed shape family — (B, Hq, Hkv, D, dtype, b) — and draws only lengths and
the configuration, because lengths are dynamic and do not recompile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from flexprefill_torch import (
    BlockLayout,
    FlexPrefillConfig,
    active_from_block_mask,
    block_mask_from_active,
    dense_causal_attention,
    flex_prefill_attention,
    flex_prefill_block_mask,
    flex_prefill_reference,
)
from flexprefill_torch.attention import run_flex_attention
from flexprefill_torch.reference import masked_attention_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


# --------------------------------------------------------------------------- helpers


def make_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    dim: int,
    dtype: torch.dtype,
    seed: int,
    amplitude: float = 1.0,
    sink: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian ``q, k, v`` (scaled by ``amplitude``); ``sink`` makes key 0 attract every query."""
    gen = torch.Generator().manual_seed(seed)
    q = amplitude * torch.randn(batch, q_heads, q_len, dim, generator=gen)
    k = amplitude * torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    if sink:
        direction = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0)
        k[..., 0, :] += 3.0 * amplitude * math.sqrt(dim) * direction
        q += amplitude * math.sqrt(dim) * direction
    return q.to(dtype), k.to(dtype), v.to(dtype)


def token_causal(q_len: int, kv_len: int) -> Tensor:
    """``[Lq, Lk]`` bool: query ``i`` (at ``Lk - Lq + i``) may see key ``t``."""
    return torch.arange(kv_len)[None, :] <= (torch.arange(q_len) + kv_len - q_len)[:, None]


def masked_attention64(
    q: Tensor, k: Tensor, v: Tensor, active: Tensor, block_size: int, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """float64 softmax attention over causal pairs of ``active`` blocks: ``(out, lse)``.

    Written independently of the library (token-level mask expanded from the block map).
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    kd, vd = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    rows, keys = torch.arange(q_len) // block_size, torch.arange(kv_len) // block_size
    allowed = active[..., rows, :][..., keys] & token_causal(q_len, kv_len)
    logits = (scale * q.double() @ kd.mT).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(logits, -1)
    return torch.softmax(logits, -1).nan_to_num(0.0) @ vd, lse


def block_set(num: Tensor, indices: Tensor, nk: int) -> Tensor:
    """Decode ``(num [..., nq], indices [..., nq, nk])`` to a bool map, checking the ordering.

    The first ``num`` indices of each row must be distinct, in range and increasing.
    """
    blocks = torch.zeros(*indices.shape[:-1], nk, dtype=torch.bool)
    for position in torch.cartesian_prod(*[torch.arange(s) for s in num.shape]).reshape(-1, num.dim()):
        at = tuple(position.tolist())
        used = indices[at][: int(num[at])].long()
        assert bool((used >= 0).all() and (used < nk).all()), (at, used)
        assert bool((used[1:] > used[:-1]).all()), (at, used)
        blocks[at][used] = True
    return blocks


# ----------------------------------------------------------- Part 1: the BlockMask


@st.composite
def problems(draw: st.DrawFn) -> dict:
    """A small problem for mask tests: shapes, lengths (often not block multiples), config."""
    block_size = draw(st.sampled_from((16, 32, 64, 128)))
    kv_len = max(1, draw(st.integers(0, 6)) * block_size + draw(st.integers(0, block_size - 1)))
    kv_heads = draw(st.integers(1, 2))
    min_budget = draw(st.integers(0, 2 * block_size))
    return {
        "batch": draw(st.integers(1, 2)),
        "kv_heads": kv_heads,
        "q_heads": kv_heads * draw(st.integers(1, 3)),
        "kv_len": kv_len,
        "q_len": draw(st.one_of(st.just(kv_len), st.integers(1, kv_len))),
        "dim": draw(st.sampled_from((8, 16, 32))),
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "amplitude": draw(st.sampled_from((1.0, 3.0))),
        "sink": draw(st.booleans()),
        "config": FlexPrefillConfig(
            gamma=draw(st.sampled_from((0.3, 0.7, 0.9, 0.99, 1.0))),
            tau=draw(st.sampled_from((0.0, 0.1, 0.3, 1.0))),
            block_size=block_size,
            min_budget=min_budget,
            max_budget=draw(st.one_of(st.none(), st.integers(max(1, min_budget), 4 * block_size))),
            query_aware_selection=draw(st.sampled_from(("global", "per_row"))),
        ),
    }


def problem_inputs(p: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v`` of a drawn problem."""
    return make_qkv(
        p["batch"], p["q_heads"], p["kv_heads"], p["q_len"], p["kv_len"], p["dim"], p["dtype"],
        p["seed"], p["amplitude"], p["sink"],
    )  # fmt: skip


@given(p=problems())
def test_block_mask_matches_reference(p: dict) -> None:
    """The BlockMask's blocks are the reference's active map, split into full and partial.

    Full blocks are exactly ``active & BlockLayout.full`` (no ``mask_mod`` needed), the
    others partial; the index tensors have the documented shapes, order and dtype.
    """
    q, k, _ = problem_inputs(p)
    config: FlexPrefillConfig = p["config"]
    layout = BlockLayout(p["q_len"], p["kv_len"], config.block_size)
    nq, nk = layout.num_q_blocks, layout.num_kv_blocks
    mask = flex_prefill_block_mask(q, k, config=config)
    active = flex_prefill_reference(q, k, config).active

    assert mask.shape == (p["batch"], p["q_heads"], p["q_len"], p["kv_len"])
    assert (config.block_size, config.block_size) == mask.BLOCK_SIZE
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        tensor = getattr(mask, name)
        assert tensor.shape == (p["batch"], p["q_heads"], nq) and tensor.dtype == torch.int32, name
    for name in ("kv_indices", "full_kv_indices"):
        tensor = getattr(mask, name)
        assert tensor.shape == (p["batch"], p["q_heads"], nq, nk) and tensor.dtype == torch.int32, name

    full_map = layout.full("cpu")
    partial = block_set(mask.kv_num_blocks, mask.kv_indices, nk)
    full = block_set(mask.full_kv_num_blocks, mask.full_kv_indices, nk)
    assert torch.equal(full, active & full_map)
    assert torch.equal(partial, active & ~full_map)
    assert torch.equal(active_from_block_mask(mask), active)
    assert torch.equal(mask.to_dense().bool(), active)


@given(p=problems())
def test_info_is_consistent(p: dict) -> None:
    """``return_info``: [B, Hq] fields that agree with the mask and the reference."""
    q, k, _ = problem_inputs(p)
    config: FlexPrefillConfig = p["config"]
    mask, info = flex_prefill_block_mask(q, k, config=config, return_info=True)
    ref = flex_prefill_reference(q, k, config)
    shape = (p["batch"], p["q_heads"])
    for name in ("query_aware", "js_distance", "active_blocks", "visible_blocks", "density"):
        assert getattr(info, name).shape == shape, name
    layout = BlockLayout(p["q_len"], p["kv_len"], config.block_size)
    assert torch.equal(info.visible_blocks, layout.visible("cpu").sum().expand(shape))
    assert torch.equal(info.active_blocks, active_from_block_mask(mask).sum((-2, -1)))
    torch.testing.assert_close(info.density, info.active_blocks.float() / info.visible_blocks.float())
    assert ((info.density > 0) & (info.density <= 1)).all()
    assert torch.equal(info.query_aware, ref.query_aware)
    torch.testing.assert_close(info.js_distance, ref.js_distance, equal_nan=True)
    assert info.sparse and info.config == config and info.layout == layout
    if config.gamma == 1.0:
        assert (info.density == 1).all()
    assert len(info.summary().splitlines()) == 1 + p["batch"] * p["q_heads"]


@given(p=problems())
def test_mask_mod_is_token_causal(p: dict) -> None:
    """The partial blocks' ``mask_mod`` is the bottom-right causal rule at token level."""
    q, k, _ = problem_inputs(p)
    mask = flex_prefill_block_mask(q, k, config=p["config"])
    q_idx = torch.arange(p["q_len"])[:, None]
    kv_idx = torch.arange(p["kv_len"])[None, :]
    zero = torch.zeros((), dtype=torch.int64)
    got = mask.mask_mod(zero, zero, q_idx, kv_idx)
    assert torch.equal(got.expand(p["q_len"], p["kv_len"]), token_causal(p["q_len"], p["kv_len"]))


@given(p=problems(), scale=st.sampled_from((0.05, 0.3, 1.0)))
def test_explicit_scale_is_used(p: dict, scale: float) -> None:
    """``scale=`` reaches the selection: the mask equals the reference run with that scale."""
    q, k, _ = problem_inputs(p)
    mask = flex_prefill_block_mask(q, k, config=p["config"], scale=scale)
    assert torch.equal(active_from_block_mask(mask), flex_prefill_reference(q, k, p["config"], scale).active)


def test_block_mask_from_active_drops_invisible_blocks() -> None:
    """Blocks above the causal boundary never reach the BlockMask, even if asked for."""
    layout = BlockLayout(70, 100, 16)
    everything = torch.ones(1, 1, layout.num_q_blocks, layout.num_kv_blocks, dtype=torch.bool)
    mask = block_mask_from_active(everything, layout)
    assert torch.equal(active_from_block_mask(mask)[0, 0], layout.visible("cpu"))
    assert not layout.visible("cpu").all()  # the test would be vacuous otherwise


# ------------------------------------------------- Part 2: compiled FlexAttention


@dataclass(frozen=True)
class Family:
    """A fixed (B, Hq, Hkv, D, dtype, b) so that FlexAttention compiles once per family."""

    batch: int
    q_heads: int
    kv_heads: int
    dim: int
    dtype: torch.dtype
    block_size: int
    min_q_blocks: int = 1  # 2 avoids the extra compile for the size-1 specialisation

    def inputs(self, q_len: int, kv_len: int, seed: int, amplitude: float, sink: bool):
        return make_qkv(
            self.batch,
            self.q_heads,
            self.kv_heads,
            q_len,
            kv_len,
            self.dim,
            self.dtype,
            seed,
            amplitude,
            sink,
        )


FP32_GQA = Family(batch=1, q_heads=4, kv_heads=2, dim=16, dtype=torch.float32, block_size=16)
BF16_B2 = Family(batch=2, q_heads=2, kv_heads=2, dim=32, dtype=torch.bfloat16, block_size=32, min_q_blocks=2)
FP16_GQA = Family(batch=1, q_heads=3, kv_heads=1, dim=16, dtype=torch.float16, block_size=16, min_q_blocks=2)


@st.composite
def family_problems(draw: st.DrawFn, family: Family, gamma_one: bool = False) -> dict:
    """Lengths (often not block multiples, ``Lq <= Lk``), config and input seed for ``family``."""
    b = family.block_size
    q_len = draw(st.integers(max(2, (family.min_q_blocks - 1) * b + 1), 6 * b + b // 2))
    kv_len = q_len + draw(st.one_of(st.just(0), st.integers(0, 2 * b + 7)))
    return {
        "q_len": q_len,
        "kv_len": kv_len,
        "seed": draw(st.integers(0, 2**31 - 1)),
        "amplitude": draw(st.sampled_from((1.0, 2.0, 3.0))),
        "sink": draw(st.booleans()),
        "config": FlexPrefillConfig(
            gamma=1.0 if gamma_one else draw(st.sampled_from((0.3, 0.6, 0.9, 0.97))),
            tau=draw(st.sampled_from((0.0, 0.1, 1.0))),
            block_size=b,
            min_budget=draw(st.sampled_from((0, b, 2 * b))),
            query_aware_selection=draw(st.sampled_from(("global", "per_row"))),
            min_seq_len=0,
            max_density=None,  # always the sparse kernel (no dense crossover)
        ),
    }


def check_sparse_attention(family: Family, p: dict) -> float:
    """Run the compiled path on a drawn problem and compare with the masked references.

    Returns the mean density (so callers can see the draws are not all dense).
    """
    q, k, v = family.inputs(p["q_len"], p["kv_len"], p["seed"], p["amplitude"], p["sink"])
    config: FlexPrefillConfig = p["config"]
    out, info = flex_prefill_attention(q, k, v, config=config, return_info=True)
    assert info.sparse and out.dtype == q.dtype and out.shape == q.shape
    active = flex_prefill_reference(q, k, config).active
    want, _ = masked_attention64(q, k, v, active, family.block_size)
    tol = TOLERANCE[family.dtype]
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    lib, _ = masked_attention_reference(q, k, v, active, family.block_size)
    torch.testing.assert_close(lib.double(), want, atol=2e-5, rtol=2e-5)
    return float(info.density.mean())


@pytest.mark.slow
@settings(max_examples=20)
@given(p=family_problems(FP32_GQA))
def test_compiled_attention_matches_masked_reference_fp32_gqa(p: dict) -> None:
    """Guarantee 6, fp32 + GQA (Hq=4, Hkv=2), Lq <= Lk, lengths not multiples of b."""
    check_sparse_attention(FP32_GQA, p)


@pytest.mark.slow
@settings(max_examples=12)
@given(p=family_problems(BF16_B2))
def test_compiled_attention_matches_masked_reference_bf16_batch2(p: dict) -> None:
    """Guarantee 6, bf16 with B=2 (tolerance 2e-2 against float64)."""
    check_sparse_attention(BF16_B2, p)


@pytest.mark.slow
@settings(max_examples=12)
@given(p=family_problems(FP16_GQA))
def test_compiled_attention_matches_masked_reference_fp16_gqa(p: dict) -> None:
    """Guarantee 6, fp16 with every query head on one key head (tolerance 2e-2)."""
    check_sparse_attention(FP16_GQA, p)


@pytest.mark.slow
@settings(max_examples=12)
@given(p=family_problems(FP32_GQA, gamma_one=True))
def test_gamma_one_equals_dense_causal_attention(p: dict) -> None:
    """γ = 1: the compiled sparse path equals dense causal attention (SDPA and float64)."""
    q, k, v = FP32_GQA.inputs(p["q_len"], p["kv_len"], p["seed"], p["amplitude"], p["sink"])
    out, info = flex_prefill_attention(q, k, v, config=p["config"], return_info=True)
    assert info.sparse and (info.density == 1).all()
    torch.testing.assert_close(out, dense_causal_attention(q, k, v), atol=2e-5, rtol=2e-5)
    everything = torch.ones(1, 1, info.layout.num_q_blocks, info.layout.num_kv_blocks, dtype=torch.bool)
    want, _ = masked_attention64(q, k, v, everything, FP32_GQA.block_size)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def sparse_case() -> tuple[Tensor, Tensor, Tensor, FlexPrefillConfig]:
    """FP32_GQA inputs whose γ = 0.5 mask drops much of the attention mass."""
    q, k, v = FP32_GQA.inputs(q_len=260, kv_len=300, seed=7, amplitude=1.5, sink=False)
    config = FlexPrefillConfig(
        gamma=0.5, tau=1.0, block_size=16, min_budget=0, min_seq_len=0, max_density=None
    )
    return q, k, v, config


@pytest.mark.slow
def test_dropped_blocks_change_the_output() -> None:
    """Sparsity is honoured: a mask with dropped blocks gives a clearly non-dense output.

    Eager FlexAttention would ignore the block indices and return (causal) dense attention;
    the compiled path must instead match the masked reference.
    """
    q, k, v, config = sparse_case()
    out, info = flex_prefill_attention(q, k, v, config=config, return_info=True)
    assert info.sparse and (info.density < 0.8).all(), info.density
    active = flex_prefill_reference(q, k, config).active
    want, _ = masked_attention64(q, k, v, active, 16)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    gap = (out - dense_causal_attention(q, k, v)).abs().max()
    assert gap > 0.1, f"sparse output within {gap:.2e} of dense: the mask was not applied"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_hand_made_block_mask_is_honoured(seed: int) -> None:
    """A random active map (sink + diagonal kept) through the compiled kernel.

    Checks BlockMask assembly and kernel independently of the selection: output equals the
    float64 masked attention, and differs clearly from dense causal attention.
    """
    q_len, kv_len, b = 150, 190, 16
    q, k, v = FP32_GQA.inputs(q_len, kv_len, seed=100 + seed, amplitude=1.0, sink=False)
    layout = BlockLayout(q_len, kv_len, b)
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(1, 4, layout.num_q_blocks, layout.num_kv_blocks, generator=gen) < 0.4
    active |= layout.diagonal("cpu") | (torch.arange(layout.num_kv_blocks) == 0)
    active &= layout.visible("cpu")
    assert (active.sum((-2, -1)) < layout.visible("cpu").sum()).all()
    out = run_flex_attention(q, k, v, block_mask_from_active(active, layout))
    want, _ = masked_attention64(q, k, v, active, b)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    assert (out - dense_causal_attention(q, k, v)).abs().max() > 0.1


@pytest.mark.slow
def test_return_lse_matches_masked_reference() -> None:
    """``return_lse``: output and log-sum-exp of the sparse path match float64 (CPU fallback)."""
    q, k, v, config = sparse_case()
    out, lse, info = flex_prefill_attention(q, k, v, config=config, return_lse=True, return_info=True)
    assert info.sparse and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    active = flex_prefill_reference(q, k, config).active
    want, want_lse = masked_attention64(q, k, v, active, 16)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
    plain = flex_prefill_attention(q, k, v, config=config)  # the compiled kernel, no lse
    torch.testing.assert_close(plain, out, atol=2e-5, rtol=2e-5)
    dense_lse = masked_attention64(q, k, v, torch.ones_like(active), 16)[1]
    assert (dense_lse - lse).abs().max() > 1e-2  # the lse really is of the sparse mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("q_len", "kv_len"), [(40, 100), (100, 100), (1, 77)])
def test_dense_fallback(dtype: torch.dtype, q_len: int, kv_len: int) -> None:
    """``Lq < min_seq_len`` or ``Lq == 1``: dense causal attention, with or without lse."""
    q, k, v = make_qkv(2, 4, 2, q_len, kv_len, 16, dtype, seed=q_len + kv_len, amplitude=2.0)
    min_seq_len = q_len + 1 if q_len > 1 else 0
    config = FlexPrefillConfig(gamma=0.3, block_size=16, min_budget=0, min_seq_len=min_seq_len)
    everything = torch.ones(1, 1, -(-q_len // 16), -(-kv_len // 16), dtype=torch.bool)
    want, want_lse = masked_attention64(q, k, v, everything, 16)
    tol = TOLERANCE[dtype]
    out, info = flex_prefill_attention(q, k, v, config=config, return_info=True)
    assert not info.sparse and (info.density == 1).all()
    torch.testing.assert_close(out, dense_causal_attention(q, k, v))
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    out, lse = flex_prefill_attention(q, k, v, config=config, return_lse=True)
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol, rtol=tol)
    if q_len > 1:  # the sparse selection would have dropped blocks: the fallback ignored it
        sparse = flex_prefill_reference(q, k, config.replace(min_seq_len=0)).active
        assert not sparse.all() or sparse.shape[-1] == 1
