"""GPU checks of the core at 8k–32k tokens in bf16 (run with ``pytest -m gpu`` on a CUDA machine)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flexprefill_torch import (
    BlockLayout,
    FlexPrefillConfig,
    active_from_block_mask,
    dense_causal_attention,
    flex_prefill_attention,
    flex_prefill_block_mask,
    flex_prefill_reference,
)
from flexprefill_torch.attention import run_flex_attention
from flexprefill_torch.synthetic import structured_qkv
from flexprefill_torch.timing import median_ms

pytestmark = pytest.mark.gpu


def chunked_masked_attention(q, k, v, active, block_size, chunk=2048):
    """Dense attention restricted to ``active`` blocks, a chunk of queries at a time (float32)."""
    layout = BlockLayout(q.shape[-2], k.shape[-2], block_size)
    group = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    keys = torch.arange(layout.kv_len, device=q.device)
    outs = []
    for start in range(0, layout.q_len, chunk):
        rows = torch.arange(start, min(start + chunk, layout.q_len), device=q.device)
        allowed = active[..., rows // block_size, :][..., keys // block_size]
        allowed = allowed & (keys[None, :] <= rows[:, None] + layout.offset)
        outs.append(F.scaled_dot_product_attention(q[..., rows, :].float(), kf, vf, attn_mask=allowed))
    return torch.cat(outs, dim=-2)


@pytest.mark.parametrize("seq_len,q_len", [(8192, 8192), (16384, 12000), (32768, 32768)])
def test_properties_and_output_long(cuda, seq_len, q_len):
    config = FlexPrefillConfig(gamma=0.9, tau=0.1, min_seq_len=0)
    q, k, v = structured_qkv(1, 8, 2, seq_len, 128, q_len=q_len, dtype=torch.bfloat16, device=cuda, seed=1)
    layout = BlockLayout(q_len, seq_len, config.block_size)
    sel = flex_prefill_reference(q, k, config)
    visible = layout.visible(cuda)
    assert not (sel.active & ~visible).any(), "active block above the causal boundary"
    assert sel.active[..., 0].all(), "sink block missing"
    assert (sel.active | ~layout.diagonal(cuda)).all(), "diagonal block missing"
    rows_need = torch.clamp(visible.sum(-1), max=config.min_blocks)
    assert (sel.active.sum(-1) >= rows_need).all(), "min budget violated"
    vs = ~sel.query_aware
    v_cov = (sel.true_blocks.double() * sel.vertical_selected).sum(-1)
    s_cov = (sel.slash.double() * sel.slash_selected).sum(-1)
    assert (v_cov[vs] >= config.gamma - 1e-6).all() and (s_cov[vs] >= config.gamma - 1e-6).all()
    nq = layout.num_q_blocks
    qa_cov = (sel.block_scores.double() / nq * sel.active).sum((-2, -1))
    assert (qa_cov[sel.query_aware] >= config.gamma - 1e-6).all()
    looser = flex_prefill_reference(q, k, config.replace(gamma=0.95))
    assert not (sel.active & ~looser.active).any(), "not monotone in gamma"
    density = (sel.active.sum((-2, -1)).float() / visible.sum()).mean().item()
    assert density < 0.9, f"expected real sparsity on the structured input, got density {density:.3f}"

    block_mask = flex_prefill_block_mask(q, k, config=config, backend="reference")
    assert torch.equal(active_from_block_mask(block_mask), sel.active)
    out = run_flex_attention(q, k, v, block_mask)
    ref = chunked_masked_attention(q, k, v, sel.active, config.block_size)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"sparse flex differs from the block-masked reference: {rel:.2e}"
    dense = dense_causal_attention(q, k, v).float()
    assert ((out.float() - dense).norm() / dense.norm()).item() > 10 * rel, "sparsity not honoured"


def test_gamma_one_equals_dense(cuda):
    q, k, v = structured_qkv(1, 8, 2, 8192, 128, dtype=torch.bfloat16, device=cuda, seed=2)
    block_mask = flex_prefill_block_mask(q, k, gamma=1.0)
    out = run_flex_attention(q, k, v, block_mask).float()
    dense = dense_causal_attention(q, k, v).float()
    assert ((out - dense).norm() / dense.norm()).item() < 1e-2


@pytest.mark.parametrize("seq_len", [8192, 16384, 32768])
def test_timing_report(cuda, seq_len):
    """Prints mask build and attention times against SDPA (a measurement, not a timed assertion)."""
    q, k, v = structured_qkv(1, 32, 8, seq_len, 128, dtype=torch.bfloat16, device=cuda, seed=3)
    block_mask, info = flex_prefill_block_mask(q, k, return_info=True)
    build_ms = median_ms(lambda: flex_prefill_block_mask(q, k), cuda, repeats=10, warmup=2)
    sparse_ms = median_ms(lambda: run_flex_attention(q, k, v, block_mask), cuda, repeats=10, warmup=2)
    sdpa_ms = median_ms(lambda: dense_causal_attention(q, k, v), cuda, repeats=10, warmup=2)
    density = info.density.mean().item()
    print(
        f"\n[timing] L={seq_len} density={density:.3f} mask_build={build_ms:.2f}ms "
        f"sparse_attn={sparse_ms:.2f}ms sdpa={sdpa_ms:.2f}ms speedup={sdpa_ms / (build_ms + sparse_ms):.2f}x"
    )
    assert math.isfinite(build_ms) and math.isfinite(sparse_ms)


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_short_prompt_is_sdpa_bit_for_bit(cuda, kv_heads):
    """A prompt below min_seq_len runs SDPA's causal kernel itself: the same bits, gradients kept."""
    gen = torch.Generator(device=cuda).manual_seed(0)
    q, k, v = (torch.randn(1, h, 1024, 128, device=cuda, dtype=torch.bfloat16, generator=gen) for h in (8, kv_heads, kv_heads))
    gqa = kv_heads != 8
    for scale in (None, 0.05):
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        out = flex_prefill_attention(q, k, v, scale=scale, attention_kernel="flex")
        torch.testing.assert_close(out, sdpa, atol=0, rtol=0)
        torch.testing.assert_close(dense_causal_attention(q, k, v, scale), sdpa, atol=0, rtol=0)
    q.requires_grad_(True)
    assert flex_prefill_attention(q, k, v, attention_kernel="flex").grad_fn is not None
