"""GPU checks of the FlashAttention-4 kernel path (``pytest -m gpu tests/test_fa4_gpu.py``).

Skipped where FA4 cannot run (no ``flash-attn-4``, or not a Hopper/Blackwell GPU). FA4's
block-sparse forward on a FlexPrefill mask must give compiled FlexAttention's output and
log-sum-exp on the same mask (bfloat16 rounding aside), honour the sparsity, work with
queries shorter than the keys, ragged lengths, GQA and batches; its dense causal forward
must match SDPA; and the public call must use it under ``"auto"``, inside
``torch.compile(fullgraph=True)`` and in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from flexprefill_torch import attention as attention_module
from flexprefill_torch import dense_causal_attention, flex_prefill_attention, flex_prefill_block_mask
from flexprefill_torch import fa4 as fa4_module
from flexprefill_torch.attention import run_flex_attention, run_sparse_attention
from flexprefill_torch.config import FlexPrefillConfig
from flexprefill_torch.fa4 import fa4_block_sparse_attention, fa4_causal_attention, fa4_unusable_reason
from flexprefill_torch.synthetic import structured_qkv

pytestmark = pytest.mark.gpu

CONFIG = FlexPrefillConfig(gamma=0.9, min_seq_len=0, max_density=None)


@pytest.fixture
def fa4(cuda) -> torch.device:
    probe = torch.zeros(1, 1, 1, 128, device=cuda, dtype=torch.bfloat16)
    reason = fa4_unusable_reason(probe, probe, probe, 128)
    if reason is not None:
        pytest.skip(reason)
    return cuda


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _inputs(device, batch, q_heads, kv_heads, seq_len, head_dim, q_len=None, seed=0):
    return structured_qkv(
        batch, q_heads, kv_heads, seq_len, head_dim, q_len=q_len, dtype=torch.bfloat16, device=device, seed=seed
    )


@pytest.mark.parametrize(
    ("batch", "q_heads", "kv_heads", "seq_len", "q_len", "head_dim"),
    [
        (1, 32, 8, 32768, None, 128),  # the benchmark shape
        (2, 8, 2, 4096 + 77, None, 128),  # ragged last block, batch of 2
        (1, 8, 2, 5000, 1100, 128),  # queries are the last 1100 positions
        (1, 4, 4, 3000, None, 64),  # no GQA, D=64
    ],
)
def test_block_sparse_matches_flex(fa4, batch, q_heads, kv_heads, seq_len, q_len, head_dim):
    q, k, v = _inputs(fa4, batch, q_heads, kv_heads, seq_len, head_dim, q_len)
    mask = flex_prefill_block_mask(q, k, config=CONFIG)
    out, lse = fa4_block_sparse_attention(q, k, v, mask)
    ref, ref_lse = run_flex_attention(q, k, v, mask, return_lse=True)
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    assert _rel(out, ref) < 1e-2, "FA4 and FlexAttention disagree on the same mask"
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-2, rtol=0)
    dense = dense_causal_attention(q, k, v)
    assert _rel(out, dense) > 5 * _rel(out, ref), "FA4's output is as close to dense: sparsity not honoured"


def test_causal_matches_sdpa(fa4):
    q, k, v = _inputs(fa4, 1, 8, 2, 6000, 128, q_len=2500, seed=1)
    assert _rel(fa4_causal_attention(q, k, v), dense_causal_attention(q, k, v)) < 1e-2
    q, k, v = _inputs(fa4, 1, 8, 2, 4096, 128, seed=2)
    assert _rel(fa4_causal_attention(q, k, v, scale=0.05), dense_causal_attention(q, k, v, scale=0.05)) < 1e-2


def test_auto_uses_fa4_and_flex_on_request(fa4, monkeypatch):
    q, k, v = _inputs(fa4, 1, 8, 2, 8192, 128, seed=3)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return fa4_block_sparse_attention(*args, **kwargs)

    monkeypatch.setattr(attention_module, "fa4_block_sparse_attention", counted)
    auto = flex_prefill_attention(q, k, v, config=CONFIG)
    assert calls == [1], "attention_kernel='auto' did not run FA4 on a Hopper/Blackwell GPU"
    flex = flex_prefill_attention(q, k, v, config=CONFIG, attention_kernel="flex")
    assert calls == [1], "attention_kernel='flex' ran FA4"
    assert _rel(auto, flex) < 1e-2
    q.requires_grad_(True)
    assert fa4_unusable_reason(q, k, v, 128) is not None  # gradients: FlexAttention
    with pytest.raises(ValueError, match="attention_kernel='fa4'.*grad"):
        flex_prefill_attention(q, k, v, config=CONFIG, attention_kernel="fa4")


def test_dense_fallback_uses_fa4_on_large_calls(fa4):
    q, k, v = _inputs(fa4, 1, 8, 2, 8192, 128, seed=4)
    out, info = flex_prefill_attention(q, k, v, min_seq_len=16384, return_info=True)
    assert not info.sparse
    torch.testing.assert_close(out, fa4_causal_attention(q, k, v), atol=0, rtol=0)
    few = q[:, :, -256:]  # fewer queries than FA4_DENSE_MIN_QUERIES: SDPA
    out = flex_prefill_attention(few, k, v, min_seq_len=16384)
    torch.testing.assert_close(out, dense_causal_attention(few, k, v), atol=0, rtol=0)


def test_default_min_seq_len_is_fa4_s_crossover(fa4):
    """With FA4, a 16k structured prompt runs sparse under the default config (FlexAttention's default: 32k)."""
    q, k, v = _inputs(fa4, 1, 8, 2, 16384, 128, seed=9)
    out, info = flex_prefill_attention(q, k, v, return_info=True)
    assert info.sparse, "the default min_seq_len did not follow FA4's crossover"
    flex, flex_info = flex_prefill_attention(q, k, v, attention_kernel="flex", return_info=True)
    assert not flex_info.sparse
    assert _rel(out, flex) < 0.5  # sparse against dense (γ=0.9 on this input: about 0.25); garbage is > 1


def test_recorded_launches_give_the_entry_s_output(fa4, monkeypatch):
    """Repeated FA4 calls replay the first call's kernel launch: same output as FA4's entry."""
    from flash_attn.cute.interface import _flash_attn_fwd

    monkeypatch.setattr(fa4_module, "_PLANS", {})
    q, k, v = _inputs(fa4, 1, 8, 2, 4096, 128, seed=7)
    first = fa4_causal_attention(q, k, v)
    fa4_block_sparse_attention(q, k, v, flex_prefill_block_mask(q, k, config=CONFIG))
    assert len(fa4_module._PLANS) == 2
    assert all(plan is not None for plan in fa4_module._PLANS.values()), "FA4's launches were not recorded"

    q2, k2, v2 = _inputs(fa4, 1, 8, 2, 4096, 128, seed=8)
    mask2 = flex_prefill_block_mask(q2, k2, config=CONFIG)
    replayed = fa4_causal_attention(q2, k2, v2)
    replayed_sparse, replayed_lse = fa4_block_sparse_attention(q2, k2, v2, mask2)
    assert len(fa4_module._PLANS) == 2, "a repeated layout was recorded again"
    entry = _flash_attn_fwd(*(x.transpose(1, 2) for x in (q2, k2, v2)), softmax_scale=128**-0.5, causal=True)[0]
    torch.testing.assert_close(replayed, entry.transpose(1, 2), atol=0, rtol=0)
    monkeypatch.setattr(fa4_module, "_PLANS", {})  # through the entry again
    entry_sparse, entry_lse = fa4_block_sparse_attention(q2, k2, v2, mask2)
    torch.testing.assert_close(replayed_sparse, entry_sparse, atol=0, rtol=0)
    torch.testing.assert_close(replayed_lse, entry_lse, atol=0, rtol=0)
    ref, ref_lse = run_flex_attention(q2, k2, v2, mask2, return_lse=True)
    assert _rel(replayed_sparse, ref) < 1e-2

    # a query 2 bytes off 16-byte alignment: FA4 copies it, so that launch is not replayed
    buffer = torch.empty(q.numel() + 8, device=fa4, dtype=q.dtype)
    shifted = buffer[1 : q.numel() + 1].view(q.shape).copy_(q)
    for _ in range(2):
        torch.testing.assert_close(fa4_causal_attention(shifted, k, v), first, atol=0, rtol=0)
    assert None in fa4_module._PLANS.values()


def test_compile_fullgraph_and_cuda_graph(fa4):
    q, k, v = _inputs(fa4, 1, 8, 2, 8192, 128, seed=5)
    mask = flex_prefill_block_mask(q, k, config=CONFIG)
    eager = run_sparse_attention(q, k, v, mask, kernel="fa4")
    compiled = torch.compile(lambda q, k, v: flex_prefill_attention(q, k, v, config=CONFIG), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager, atol=0, rtol=0)

    static = [x.clone() for x in (q, k, v)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_sparse_attention(*static, mask, kernel="fa4")
    other = _inputs(fa4, 1, 8, 2, 8192, 128, seed=6)
    static[0].copy_(other[0])
    graph.replay()
    torch.testing.assert_close(captured, run_sparse_attention(other[0], k, v, mask, kernel="fa4"), atol=0, rtol=0)
    static[0].copy_(q)
    graph.replay()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)
