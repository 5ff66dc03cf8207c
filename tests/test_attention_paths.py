"""Which path ``flex_prefill_attention`` takes: sparse, dense by length, dense by density."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from flexprefill_torch import (
    FlexPrefillConfig,
    active_from_block_mask,
    dense_causal_attention,
    flex_prefill_attention,
    flex_prefill_block_mask,
)
from flexprefill_torch import attention as attention_module
from flexprefill_torch.attention import default_kernel_options, dense_attention, run_flex_attention
from flexprefill_torch.block_mask import block_mask_from_active
from flexprefill_torch.fa4 import fa4_unusable_reason
from flexprefill_torch.layout import BlockLayout
from flexprefill_torch.reference import masked_attention_reference
from flexprefill_torch.synthetic import structured_qkv

# One shape family (B=1, Hq=4, Hkv=2, D=32... fp32, block 64) so FlexAttention compiles once.
CONFIG = FlexPrefillConfig(gamma=0.8, tau=0.1, block_size=64, min_budget=64, min_seq_len=0)


def _peaked(q_len: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = structured_qkv(1, 4, 2, kv_len, 32, q_len=q_len, block_size=64, seed=5)
    return q, k, v


@pytest.mark.slow
def test_sparse_path_runs_and_is_not_dense() -> None:
    q, k, v = _peaked(900, 1000)
    out, info = flex_prefill_attention(q, k, v, config=CONFIG, max_density=None, return_info=True)
    assert info.sparse and (info.density < 1).any(), "the structured input should give a sparse mask"
    mask = flex_prefill_block_mask(q, k, config=CONFIG)
    ref, _ = masked_attention_reference(q, k, v, active_from_block_mask(mask), 64)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dense = dense_causal_attention(q, k, v)
    assert (out - dense).abs().max() > 1e-3, "sparse output equals dense: sparsity was not honoured"


@pytest.mark.slow
def test_too_dense_mask_falls_back_to_sdpa() -> None:
    q, k, v = _peaked(900, 1000)
    _, info = flex_prefill_attention(q, k, v, config=CONFIG, max_density=None, return_info=True)
    below = info.density.mean().item() * 0.5
    out, info = flex_prefill_attention(q, k, v, config=CONFIG, max_density=below, return_info=True)
    assert not info.sparse
    torch.testing.assert_close(out, dense_causal_attention(q, k, v))


def test_short_prompt_and_decode_are_dense() -> None:
    q, k, v = _peaked(100, 1000)
    out, info = flex_prefill_attention(q, k, v, config=CONFIG, min_seq_len=101, return_info=True)
    assert not info.sparse and torch.equal(info.density, torch.ones_like(info.density))
    torch.testing.assert_close(out, dense_causal_attention(q, k, v))
    out = flex_prefill_attention(q[..., -1:, :], k, v, config=CONFIG)
    torch.testing.assert_close(out, dense_causal_attention(q[..., -1:, :], k, v))


def test_dense_causal_attention_is_bottom_right_aligned() -> None:
    q, k, v = _peaked(100, 300)
    out = dense_causal_attention(q, k, v)
    ref, _ = masked_attention_reference(q, k, v, torch.ones(1, 4, 2, 5, dtype=torch.bool), 64)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_default_kernel_options_only_on_cuda_16bit() -> None:
    q = torch.randn(1, 1, 8, 64)
    assert default_kernel_options(q, 128) is None
    assert default_kernel_options(q.bfloat16(), 128) is None  # CPU


@pytest.mark.gpu
def test_default_kernel_options_on_hopper(cuda) -> None:
    q = torch.randn(1, 1, 8, 128, device=cuda, dtype=torch.bfloat16)
    options = default_kernel_options(q, 128)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert options is not None and options["USE_TMA"]
    assert default_kernel_options(q, 64) is None and default_kernel_options(q.float(), 128) is None


@pytest.mark.gpu
@pytest.mark.parametrize("workload", ["structured", "random"])
def test_density_forecast_skips_the_selection_on_dense_inputs(workload: str) -> None:
    """32k tokens, 32/8 heads, bf16: the forecast tracks the final density; random input
    (near-uniform attention) goes to dense attention (FA4's or SDPA) on the forecast alone,
    structured input stays sparse."""
    from flexprefill_torch.benchmark import BenchSettings, make_inputs
    from flexprefill_torch.kernels.pipeline import pattern_stage, selection_from_pattern

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v = make_inputs(workload, 32768, BenchSettings(), torch.device("cuda"), torch.bfloat16)
    config = FlexPrefillConfig()
    stage = pattern_stage(q, k, config)
    predicted = stage.predicted_density().mean().item()
    active = selection_from_pattern(stage, config).active
    visible = (32768 // 128) * (32768 // 128 + 1) // 2
    actual = (active.sum((-2, -1)).float() / visible).mean().item()
    assert abs(predicted - actual) < 0.15, (predicted, actual)
    out, info = flex_prefill_attention(q, k, v, config=config, return_info=True)
    if workload == "random":
        assert not info.sparse and info.predicted_density is not None
        torch.testing.assert_close(out, dense_attention(q, k, v), atol=0, rtol=0)
    else:
        assert info.sparse and info.predicted_density is None


def test_fa4_kernel_needs_cuda_and_auto_runs_flex_on_cpu() -> None:
    """``attention_kernel='fa4'`` names why it cannot run; ``'auto'`` then gives FlexAttention's output."""
    q, k, v = _peaked(900, 1000)
    reason = fa4_unusable_reason(q, k, v, 64)
    assert reason is not None and "CUDA" in reason
    with pytest.raises(ValueError, match=r"attention_kernel='fa4' cannot run this call: FA4 needs CUDA"):
        flex_prefill_attention(q, k, v, config=CONFIG, attention_kernel="fa4")
    with pytest.raises(ValueError, match=r"attention_kernel='fa4'.*CUDA"):  # the dense path too
        flex_prefill_attention(q, k, v, config=CONFIG, attention_kernel="fa4", min_seq_len=10**6)
    auto = flex_prefill_attention(q, k, v, config=CONFIG, max_density=None)
    flex = flex_prefill_attention(q, k, v, config=CONFIG, max_density=None, attention_kernel="flex")
    torch.testing.assert_close(auto, flex, atol=0, rtol=0)


def test_fa4_runs_flexprefill_masks_only(monkeypatch) -> None:
    """A mask with another ``mask_mod`` never reaches FA4 (which applies the causal rule itself).

    The routing is checked with FlexAttention stubbed out: one more compiled mask_mod in the
    suite's process would push FlexAttention past dynamo's recompile limit.
    """
    from torch.nn.attention.flex_attention import BlockMask


    q, k, v = _peaked(256, 256)
    mask = flex_prefill_block_mask(q, k, config=CONFIG)
    assert mask.mask_mod.flexprefill_causal
    window = BlockMask.from_kv_blocks(
        mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
        BLOCK_SIZE=64, mask_mod=lambda b, h, q_idx, kv_idx: q_idx - kv_idx < 64, seq_lengths=(256, 256),
        compute_q_blocks=False,
    )
    with pytest.raises(ValueError, match=r"attention_kernel='fa4' runs FlexPrefill masks only"):
        attention_module.run_sparse_attention(q, k, v, window, kernel="fa4")
    routed = []
    monkeypatch.setattr(attention_module, "run_flex_attention", lambda *args: routed.append(args[3]) or q)
    monkeypatch.setattr(attention_module, "fa4_unusable_reason", lambda *args: None)  # as if FA4 could run
    monkeypatch.setattr(attention_module, "fa4_block_sparse_attention", lambda *args: (k, v))
    assert attention_module.run_sparse_attention(q, k, v, window) is q and routed == [window]
    assert attention_module.run_sparse_attention(q, k, v, mask) is k and routed == [window]


def test_fa4_ops_have_fake_implementations() -> None:
    """The FA4 custom ops trace under fake tensors (``torch.compile``) with FA4's output layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flexprefill_torch.fa4 import fa4_block_sparse_attention, fa4_causal_attention

    q, k, v = _peaked(900, 1000)
    mask = flex_prefill_block_mask(q, k, config=CONFIG)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(x.bfloat16()) for x in (q, k, v))
        out, lse = fa4_block_sparse_attention(fq, fk, fv, mask)
        dense = fa4_causal_attention(fq, fk, fv)
    assert out.shape == dense.shape == q.shape and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous() and dense.transpose(1, 2).is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32


def test_dense_attention_routes_by_query_count(monkeypatch) -> None:
    """``"auto"`` takes FA4 (stubbed here) from FA4_DENSE_MIN_QUERIES queries on, SDPA below and for decode."""
    calls: list[int] = []

    def fa4_stub(q, k, v, scale=None):
        calls.append(q.shape[-2])
        return torch.zeros_like(q)

    monkeypatch.setattr(attention_module, "fa4_unusable_reason", lambda *args: None)  # as if FA4 could run
    monkeypatch.setattr(attention_module, "fa4_causal_attention", fa4_stub)
    n = attention_module.FA4_DENSE_MIN_QUERIES
    q, k, v = (torch.randn(1, h, n, 8) for h in (2, 1, 1))
    assert attention_module.dense_attention(q, k, v).abs().sum() == 0 and calls == [n]
    few = q[:, :, 1:]  # one query fewer, same keys: SDPA
    torch.testing.assert_close(attention_module.dense_attention(few, k, v), dense_causal_attention(few, k, v))
    torch.testing.assert_close(attention_module.dense_attention(q, k, v, kernel="flex"), dense_causal_attention(q, k, v))
    attention_module.dense_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], kernel="fa4")  # forced: FA4 at 2 queries
    decode = q[:, :, -1:]
    torch.testing.assert_close(attention_module.dense_attention(decode, k, v, kernel="fa4"), dense_causal_attention(decode, k, v))
    assert calls == [n, 2]


def test_default_min_seq_len_follows_the_kernel(monkeypatch) -> None:
    """``min_seq_len=None``: 16384 where FA4 would run the call (stubbed here), 32768 otherwise."""
    from flexprefill_torch.config import FA4_MIN_SEQ_LEN, FLEX_MIN_SEQ_LEN

    config = FlexPrefillConfig()
    assert config.min_seq_len is None
    mid = torch.empty(1, 2, FA4_MIN_SEQ_LEN, 8, device="meta")
    long = torch.empty(1, 2, FLEX_MIN_SEQ_LEN, 8, device="meta")
    short = torch.empty(1, 2, FA4_MIN_SEQ_LEN - 1, 8, device="meta")
    decode = torch.empty(1, 2, 1, 8, device="meta")
    short_prompt = attention_module.is_short_prompt
    assert short_prompt(mid, mid, mid, config), "FlexAttention (no FA4 on CPU/meta): 32768"
    assert not short_prompt(long, long, long, config)
    monkeypatch.setattr(attention_module, "fa4_unusable_reason", lambda *args: None)  # as if FA4 could run
    assert not short_prompt(mid, mid, mid, config), "where FA4 runs: 16384"
    assert short_prompt(short, short, short, config) and short_prompt(decode, long, long, config)
    assert short_prompt(mid, mid, mid, config.replace(attention_kernel="flex"))
    assert short_prompt(mid, mid, mid, config.replace(min_seq_len=FA4_MIN_SEQ_LEN + 1)), "an explicit value wins"
    assert not short_prompt(short, short, short, config.replace(min_seq_len=0))
    assert config.effective_min_seq_len(fa4=True) == FA4_MIN_SEQ_LEN
    assert config.effective_min_seq_len(fa4=False) == FLEX_MIN_SEQ_LEN
    assert config.replace(min_seq_len=5).effective_min_seq_len(fa4=True) == 5


def test_run_flex_attention_gives_the_compiled_kernel_one_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strided inputs (transposed projections) reach the compiled FlexAttention contiguous,
    so its stride guards never see a second layout; the result is the same."""
    from torch.nn.attention.flex_attention import flex_attention

    seen: list[tuple[bool, ...]] = []

    def spy(q: Tensor, k: Tensor, v: Tensor, **kwargs: object) -> Tensor:
        seen.append((q.is_contiguous(), k.is_contiguous(), v.is_contiguous()))
        return flex_attention(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module, "compiled_flex_attention", lambda: spy)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, heads, 16, generator=gen).transpose(1, 2) for heads in (4, 2, 2))
    layout = BlockLayout(64, 64, 16)
    mask = block_mask_from_active(layout.visible(q.device).expand(1, 4, -1, -1), layout)
    strided = run_flex_attention(q, k, v, mask)
    dense = run_flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask)
    assert seen == [(True, True, True)] * 2
    torch.testing.assert_close(strided, dense, rtol=0, atol=0)
