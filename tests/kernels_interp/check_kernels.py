"""Each Triton kernel against its reference function, and the whole pipeline.

Run by ``tests/test_kernels.py`` in a subprocess with ``TRITON_INTERPRET=1`` (CPU tensors,
the Triton interpreter); the name does not match ``test_*.py`` so the main pytest run does
not collect it. It also runs on a CUDA GPU without the interpreter::

    TRITON_INTERPRET=1 python -m pytest tests/kernels_interp/check_kernels.py -q   # CPU
    python -m pytest tests/kernels_interp/check_kernels.py -q                      # GPU

Inputs are random and continuous (no ties): float32 selections must be identical.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexprefill_torch import reference as R
from flexprefill_torch.block_mask import block_mask_from_active, indices_from_map
from flexprefill_torch.config import FlexPrefillConfig
from flexprefill_torch.layout import BlockLayout

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set before import) or a CUDA GPU", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flexprefill_torch.kernels import select, triton_block_mask, triton_selection  # noqa: E402
from flexprefill_torch.kernels._utils import mass_threshold, top_count, top_few  # noqa: E402
from flexprefill_torch.kernels.emit import emit_block_indices  # noqa: E402
from flexprefill_torch.kernels.logits import block_logits  # noqa: E402
from flexprefill_torch.kernels.pattern import head_pattern  # noqa: E402
from flexprefill_torch.kernels.pool import pool_blocks  # noqa: E402
from flexprefill_torch.kernels.representative import representative_attention, slash_from_parts  # noqa: E402
from flexprefill_torch.kernels.select import select_blocks  # noqa: E402
from flexprefill_torch.selection import flex_prefill_block_mask  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")


def _qk(batch, kv_heads, group, q_len, kv_len, dim, dtype=torch.float32, seed=0, spread=2.0):
    """Random q, k; query heads get increasing temperatures (flat to peaked attention)."""
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    temp = torch.linspace(1.0, spread, heads)[None, :, None, None]
    q = torch.randn(batch, heads, q_len, dim, generator=gen) * temp
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


def _reference_rules(logits, flags, true_blocks, slash, vsel, ssel, layout, config):
    """The reference's step 4-5 and block rules, fed with the kernel's intermediates."""
    device = logits.device
    visible = layout.visible(device)
    block_scores = torch.softmax(logits.masked_fill(~visible, -math.inf), -1).nan_to_num(0.0)
    vs_scores = R.vertical_slash_block_scores(true_blocks, slash, layout)
    query_aware = (flags & 1) != 0
    sparse = (flags & 2) != 0
    scores = torch.where(query_aware[..., None, None], block_scores, vs_scores)
    sink = torch.zeros_like(visible)
    sink[:, 0] = True
    forced = (sink | layout.diagonal(device)) & visible
    forced = forced | R.strongest_blocks(scores, visible, config.min_blocks)
    qa_selected = R.select_query_aware(block_scores, forced, visible, config)
    vs_active = R.extend_lines(vsel, ssel, layout) | forced
    active = torch.where(query_aware[..., None, None], qa_selected, vs_active) & visible
    if config.max_blocks is not None:
        active = R.cap_blocks(active, forced, scores, config.max_blocks)
    return torch.where(sparse[..., None, None], active, visible)


# ---------------------------------------------------------------- in-register selection


@triton.jit
def _mass_threshold_kernel(x_ptr, cand_ptr, base_ptr, out_ptr, gamma_hi, gamma_lo,
                           R: tl.constexpr, N: tl.constexpr):
    rows = tl.arange(0, R)
    cells = rows[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + cells)
    cand = tl.load(cand_ptr + cells) != 0
    base = tl.load(base_ptr + rows)
    gamma = (gamma_hi + tl.zeros([], dtype=tl.float64)) + (gamma_lo + tl.zeros([], dtype=tl.float64))
    tl.store(out_ptr + rows, mass_threshold(x, cand, base, gamma))


def _threshold_brute_force(x, cand, base, gamma):
    """Largest key k in [0, 2^31 - 1] with base + Σ x[cand & key >= k] >= γ, else 0."""
    out = []
    keys = x.view(torch.int32)
    for row in range(x.shape[0]):
        best = 0x7FFFFFFF if base[row] >= gamma else 0
        if best == 0:
            for value in sorted(set(keys[row][cand[row]].tolist()), reverse=True):
                taken = x[row][cand[row] & (keys[row] >= value)].double().sum()
                if base[row] + taken >= gamma:
                    best = value
                    break
        out.append(best)
    return out


@settings(max_examples=8 if INTERPRET else 40, deadline=None)
@given(seed=st.integers(0, 2**16), levels=st.sampled_from([3, 50, 10**6]), gamma=st.floats(0.05, 0.99))
def test_mass_threshold_matches_brute_force(seed, levels, gamma):
    """The sort-based γ-crossing: ties (few distinct values), a base that alone reaches γ
    (row 1), candidates that never reach it (row 2), an empty row (row 3)."""
    from flexprefill_torch.kernels._utils import split_gamma

    gen = torch.Generator().manual_seed(seed)
    rows, n = 4, 32
    x = torch.randint(0, levels, (rows, n), generator=gen).float() / levels
    x = x / x.sum(-1, keepdim=True).clamp(min=1e-9)
    cand = torch.rand(rows, n, generator=gen) < 0.7
    cand[3] = False
    base = torch.tensor([0.0, gamma + 0.01, 0.0, 0.0], dtype=torch.float64)
    x[2] = x[2] * (gamma * 0.5)  # sums to γ/2: never reaches
    out = torch.empty(rows, dtype=torch.int32)
    hi, lo = split_gamma(gamma)
    tensors = [t.to(DEVICE) for t in (x, cand.to(torch.int32), base, out)]
    _mass_threshold_kernel[(1,)](*tensors, hi, lo, R=rows, N=n)
    expected = _threshold_brute_force(x, cand, base, hi + lo)
    assert tensors[3].cpu().tolist() == expected


@triton.jit
def _top_kernel(key_ptr, cand_ptr, few_ptr, count_ptr, R: tl.constexpr, N: tl.constexpr, M: tl.constexpr):
    cells = tl.arange(0, R)[:, None] * N + tl.arange(0, N)[None, :]
    key = tl.load(key_ptr + cells)
    cand = tl.load(cand_ptr + cells) != 0
    tl.store(few_ptr + cells, top_few(key, cand, M).to(tl.int32))
    tl.store(count_ptr + cells, top_count(key, cand, M).to(tl.int32))


@settings(max_examples=6 if INTERPRET else 40, deadline=None)
@given(seed=st.integers(0, 2**16), levels=st.sampled_from([2, 5, 10**6]), m=st.sampled_from([1, 3, 8, 16]))
def test_top_few_and_top_count(seed, levels, m):
    """Both keep each row's ``m`` largest candidates, equal keys in index order (a stable
    descending sort), or every candidate where there are fewer: many ties (few levels),
    rows with fewer than ``m`` candidates, an empty row."""
    gen = torch.Generator().manual_seed(seed)
    rows, n = 8, 64
    x = torch.randint(0, levels, (rows, n), generator=gen).float() / levels
    key = x.view(torch.int32)
    cand = torch.rand(rows, n, generator=gen) < 0.8
    cand[1, m // 2 + 1:] = False
    cand[2] = False
    order = torch.sort(torch.where(cand, key, -1), dim=1, descending=True, stable=True).indices
    expected = torch.zeros(rows, n, dtype=torch.int32)
    expected.scatter_(1, order[:, :m], 1)
    expected &= cand.to(torch.int32)
    few, count = torch.empty_like(expected), torch.empty_like(expected)
    tensors = [t.to(DEVICE) for t in (key, cand.to(torch.int32), few, count)]
    _top_kernel[(1,)](*tensors, R=rows, N=n, M=m)
    assert torch.equal(tensors[2].cpu(), expected)
    assert torch.equal(tensors[3].cpu(), expected)


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize(
    ("length", "block", "dtype"),
    [(77, 16, torch.float32), (64, 32, torch.float32), (100, 64, torch.float16), (5, 16, torch.bfloat16)],
)
def test_pool_blocks(length, block, dtype):
    x = torch.randn(2, 5, length, 3, 24).to(DEVICE, dtype)[:, :, :, 1]  # strided
    pooled, bad = pool_blocks(x, block, 0.3)
    expected = 0.3 * R.pool_blocks(x.float(), block)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(pooled, expected, atol=tol, rtol=tol)
    assert int(bad.sum()) == 0
    # with flags, only sparse query-aware heads (flags == 3) are read; the others are zeros
    flags = torch.tensor([[3, 1, 2, 0, 3], [0, 3, 3, 1, 2]], dtype=torch.int32, device=DEVICE)
    gated, gated_bad = pool_blocks(x, block, 0.3, flags)
    wanted = flags == 3
    assert torch.equal(gated[wanted], pooled[wanted])
    assert not bool(gated[~wanted].any()) and not bool(gated_bad.any())
    x = x.clone()
    x[1, 2, length - 1, 7] = float("inf")
    with warnings.catch_warnings():  # the interpreter warns about inf arithmetic
        warnings.simplefilter("ignore", RuntimeWarning)
        _, bad = pool_blocks(x, block)
    assert bad[1, 2, -1] == 1 and int(bad.sum()) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, gated_bad = pool_blocks(x, block, 1.0, flags)
    assert gated_bad[1, 2, -1] == 1 and int(gated_bad.sum()) == 1


# ---------------------------------------------------------------- representative attention


@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "q_len", "kv_len", "block", "dtype"),
    [
        (2, 2, 2, 77, 100, 16, torch.float32),
        (1, 1, 1, 40, 40, 32, torch.float32),
        (1, 2, 3, 10, 90, 16, torch.float32),
        (1, 1, 2, 130, 200, 64, torch.float32),
        (2, 1, 2, 33, 70, 32, torch.float16),
        (1, 2, 1, 5, 300, 16, torch.bfloat16),
    ],
)
def test_representative_attention(batch, kv_heads, group, q_len, kv_len, block, dtype):
    q, k = _qk(batch, kv_heads, group, q_len, kv_len, 24, dtype, spread=3.0)
    scale = 1 / math.sqrt(24)
    true_blocks, parts, k_pool = representative_attention(q, k, block, scale)
    layout = BlockLayout(q_len, kv_len, block)
    ref_true, ref_offsets = R.representative_attention(
        q.float(), k.float().repeat_interleave(group, 1), layout, scale
    )
    torch.testing.assert_close(true_blocks, ref_true, atol=1e-5, rtol=1e-5)
    slash = slash_from_parts(parts, q_len, kv_len, block)
    torch.testing.assert_close(slash, R.pool_slash(ref_offsets, layout), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_pool, R.pool_blocks(k.float(), block), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(true_blocks.sum(-1), torch.ones_like(true_blocks[..., 0]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- pattern, selection


def _stages(q, k, config):
    layout = BlockLayout(q.shape[2], k.shape[2], config.block_size)
    scale = 1 / math.sqrt(q.shape[-1])
    q_pool, q_bad = pool_blocks(q, config.block_size, scale)
    true_blocks, parts, k_pool = representative_attention(q, k, config.block_size, scale)
    group = q.shape[1] // k.shape[1]
    logits = q_pool @ k_pool.repeat_interleave(group, 1).mT
    outs = head_pattern(q, k_pool, true_blocks, parts, config.block_size, k.shape[2], scale,
                        config.tau, config.gamma)
    return layout, scale, q_pool, q_bad, k_pool, true_blocks, logits, outs


@pytest.mark.parametrize(("q_len", "kv_len", "block"), [(100, 100, 32), (90, 130, 16), (20, 300, 16)])
def test_block_logits(monkeypatch, q_len, kv_len, block):
    """``Q̄ · K̄ᵀ`` on the visible blocks of the sparse query-aware heads; the other heads are not written."""
    q, k = _qk(1, 2, 3, q_len, kv_len, 32, seed=q_len)
    layout = BlockLayout(q_len, kv_len, block)
    q_pool, _ = pool_blocks(q, block, 0.25)
    _, _, k_pool = representative_attention(q, k, block, 0.25)
    flags = torch.tensor([[3, 1, 2, 3, 0, 3]], dtype=torch.int32, device=DEVICE)  # heads 0, 3, 5 are read
    sentinel = 12345.0
    shape = (1, 6, layout.num_q_blocks, layout.num_kv_blocks)
    empty = torch.empty

    def filled(*size, **kwargs):  # the kernel's output buffer starts as the sentinel
        return torch.full(shape, sentinel, device=DEVICE) if size == shape else empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", filled)
    out = block_logits(q_pool, k_pool, flags, q_len, kv_len, block)
    monkeypatch.undo()
    k_heads = k_pool.double().repeat_interleave(3, 1)
    expected = q_pool.double() @ k_heads.mT
    bound = q_pool.double().abs() @ k_heads.abs().mT  # Σ|q_d k_d|: a GPU's 3×TF32 product is ~1e-7 of it
    visible = layout.visible(DEVICE)
    for head in range(6):
        if head in (0, 3, 5):
            error = (out[0, head].double() - expected[0, head]).abs() / bound[0, head]
            assert float(error[visible].max()) < 2e-6
        else:
            assert bool((out[0, head] == sentinel).all())


@pytest.mark.parametrize("tau", [0.0, 0.05, 1.0])
def test_head_pattern(tau):
    config = FlexPrefillConfig(block_size=16, min_budget=32, tau=tau, gamma=0.85)
    q, k = _qk(2, 2, 2, 70, 100, 32, spread=4.0, seed=1)
    layout, scale, q_pool, _, k_pool, true_blocks, _, outs = _stages(q, k, config)
    estimate, slash, js, flags, vsel, ssel, density = outs
    r = min(config.block_size, q.shape[2])
    group = q.shape[1] // k.shape[1]
    ref_estimate = torch.softmax(
        scale * q.float()[..., -r:, :].mean(-2, keepdim=True) @ k_pool.repeat_interleave(group, 1).mT, -1
    ).squeeze(-2)
    torch.testing.assert_close(estimate, ref_estimate, atol=1e-6, rtol=1e-5)
    ref_js = R.js_distance(ref_estimate, true_blocks)
    torch.testing.assert_close(js, ref_js, atol=1e-6, rtol=1e-5)
    assert torch.equal((flags & 1) != 0, js < tau)
    assert bool(((flags & 2) != 0).all())
    first = torch.zeros_like(vsel)
    first[..., 0] = True
    assert torch.equal(vsel, R.cumulative_select(true_blocks, first, config.gamma))
    assert torch.equal(ssel, R.cumulative_select(slash, torch.zeros_like(ssel), config.gamma))
    # the density forecast: vertical fraction (+ slash fraction for vertical-slash heads)
    vertical = vsel.sum(-1, dtype=torch.float32) / vsel.shape[-1]
    both = (vertical + ssel.sum(-1, dtype=torch.float32) / ssel.shape[-1]).clamp(max=1.0)
    assert torch.equal(density, torch.where((flags & 1) != 0, vertical, both))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf inputs, on purpose
def test_dense_fallback_flags():
    config = FlexPrefillConfig(block_size=16, min_budget=16)
    q, k = _qk(1, 2, 2, 48, 64, 16)
    k[0, 1, 60, 0] = float("inf")
    *_, outs = _stages(q, k, config)
    sparse = (outs[3] & 2) != 0
    assert sparse.tolist() == [[True, True, False, False]]
    assert outs[6][0, 2:].tolist() == [1.0, 1.0]  # dense heads forecast density 1
    dense = _stages(q, k, config.replace(gamma=1.0))[-1][3]
    assert bool(((dense & 2) == 0).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf input, on purpose
def test_non_finite_pooled_key_makes_heads_dense():
    """An infinite pooled key whose logit is -inf leaves ``ā`` and ``D_JS`` finite: the
    pattern kernel's own count of non-finite pooled keys still makes the heads of that key
    head dense (the reference checks ``isfinite(K̄)``)."""
    config = FlexPrefillConfig(block_size=16, min_budget=16)
    q, k = _qk(1, 2, 2, 48, 64, 16)
    layout, scale, _, _, k_pool, true_blocks, _, _ = _stages(q, k, config)
    _, _, parts = representative_attention(q, k, config.block_size, scale)
    q_mean = q[0, 2, -16:].float().mean(0)  # query head 2 reads key head 1
    k_pool[0, 1, 2, 0] = -math.copysign(float("inf"), float(q_mean[0]))
    _, _, js, flags, _, _, density = head_pattern(q, k_pool, true_blocks, parts, config.block_size, k.shape[2],
                                                  scale, config.tau, config.gamma)
    assert bool(torch.isfinite(js[0, 2]))  # only the count can tell
    assert (((flags & 2) != 0).tolist()) == [[True, True, False, False]]
    assert density[0, 2:].tolist() == [1.0, 1.0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN input, on purpose
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_non_finite_queries_make_query_aware_heads_dense(tau):
    """A NaN query in a middle block: dense for a query-aware head (its mask reads Q̄), not
    for a vertical-slash head (its mask does not), as in the reference."""
    config = FlexPrefillConfig(block_size=16, min_budget=16, tau=tau, gamma=0.6)
    q, k = _qk(1, 2, 2, 96, 128, 16, spread=4.0)
    q[0, 1, 20, 2] = float("nan")
    layout, _, _, q_bad, _, true_blocks, logits, outs = _stages(q, k, config)
    _, slash, _, flags, vsel, ssel, _ = outs
    assert bool(((flags & 2) != 0).all())  # the pattern stage does not read the middle queries
    active, final = select_blocks(
        logits, flags, q_bad, true_blocks, slash, vsel, ssel, layout.q_len, layout.kv_len, 16, config.gamma,
        config.min_blocks, -1, False, tau > 0,
    )
    expected = [True, tau == 0.0, True, True]
    assert ((final & 2) != 0).tolist() == [expected]
    if tau > 0:
        assert torch.equal(active[0, 1], layout.visible(DEVICE))
    selection = triton_selection(q, k, config)
    assert selection.sparse.tolist() == [expected]
    assert torch.equal(selection.active, R.flex_prefill_reference(q, k, config).active)


@pytest.mark.parametrize(
    "config",
    [
        FlexPrefillConfig(block_size=16, min_budget=32, tau=0.1, gamma=0.9),
        FlexPrefillConfig(block_size=16, min_budget=16, tau=1.0, gamma=0.8, query_aware_selection="per_row"),
        FlexPrefillConfig(block_size=16, min_budget=32, tau=0.2, gamma=0.95, max_budget=64),
        FlexPrefillConfig(block_size=32, min_budget=0, tau=0.0, gamma=0.7),
    ],
    ids=["global", "per_row", "cap", "vs_only"],
)
def test_select_blocks(config):
    q, k = _qk(1, 2, 2, 90, 130, 32, spread=4.0, seed=2)
    layout, _, _, q_bad, _, true_blocks, logits, outs = _stages(q, k, config)
    _, slash, _, flags, vsel, ssel, _ = outs
    max_blocks = -1 if config.max_blocks is None else config.max_blocks
    active, final = select_blocks(
        logits, flags, q_bad, true_blocks, slash, vsel, ssel, layout.q_len, layout.kv_len, config.block_size,
        config.gamma, config.min_blocks, max_blocks, config.query_aware_selection == "per_row", config.tau > 0,
    )
    expected = _reference_rules(logits, flags, true_blocks, slash, vsel, ssel, layout, config)
    assert torch.equal(active, expected)
    assert torch.equal(final, flags)  # finite queries: the flags are unchanged
    assert not bool(active[..., ~layout.visible(DEVICE)].any())


@pytest.mark.parametrize(
    ("kept_cells", "gamma", "octaves", "shared_cells"),
    [
        (16384, 0.9, 14, 512), (16384, 0.99, 14, 512), (8, 0.9, 14, 512), (16384, 0.9, 1, 512),
        (16384, 0.05, 14, 512), (16384, 0.9, 14, 0), (16384, 0.99, 14, 0), (16384, 0.9, 14, 16),
    ],
    ids=[
        "listed-0.9", "listed-0.99", "list-too-short", "below-the-octaves", "forced-reach-gamma",
        "no-shared-list-0.9", "no-shared-list-0.99", "shared-list-too-short",
    ],
)
def test_global_threshold_rounds(monkeypatch, kept_cells, gamma, octaves, shared_cells):
    """The global threshold starts from the rows kernel's octave sums (round 2), or from
    round 0 when the crossing lies below the octaves summed, or runs no round when the
    forced blocks alone reach γ; its later radix rounds scan the list of round
    ``keep_round`` (or the map again when the list would be too long), and end early
    when the head's shared list holds every entry still inside (or run to the last bit
    without one, or when it overflows): same map as the reference every way.

    (γ = 0.9 and 0.99 on this input: a list scan with its masses scaled by 0.9 fails both.)"""
    monkeypatch.setitem(select.TUNING, "kept_cells", kept_cells)
    monkeypatch.setitem(select.TUNING, "octaves", octaves)
    monkeypatch.setitem(select.TUNING, "shared_cells", shared_cells)
    config = FlexPrefillConfig(block_size=16, min_budget=16, tau=1.0, gamma=gamma)
    q, k = _qk(1, 2, 2, 512, 512, 32, spread=3.0, seed=5)
    layout, _, _, q_bad, _, true_blocks, logits, outs = _stages(q, k, config)
    _, slash, _, flags, vsel, ssel, _ = outs
    assert bool(((flags & 3) == 3).all())  # every head takes the global threshold
    active, _ = select_blocks(
        logits, flags, q_bad, true_blocks, slash, vsel, ssel, layout.q_len, layout.kv_len, config.block_size,
        config.gamma, config.min_blocks, -1, False, True,
    )
    assert torch.equal(active, _reference_rules(logits, flags, true_blocks, slash, vsel, ssel, layout, config))


# ---------------------------------------------------------------- emission


@pytest.mark.parametrize(("q_len", "kv_len", "block"), [(64, 64, 16), (50, 130, 32), (7, 40, 16)])
def test_emit_block_indices(q_len, kv_len, block):
    layout = BlockLayout(q_len, kv_len, block)
    gen = torch.Generator().manual_seed(q_len)
    active = (torch.rand(2, 3, layout.num_q_blocks, layout.num_kv_blocks, generator=gen) < 0.5).to(DEVICE)
    num, idx, full_num, full_idx, offset = emit_block_indices(active, q_len, kv_len, block)
    assert offset.dtype == torch.int64 and offset.shape == () and offset.item() == kv_len - q_len
    visible, full = layout.visible(DEVICE), layout.full(DEVICE)
    ref_num, ref_idx = indices_from_map(active & visible & ~full)
    ref_full_num, ref_full_idx = indices_from_map(active & visible & full)
    assert torch.equal(num, ref_num) and torch.equal(idx, ref_idx)
    assert torch.equal(full_num, ref_full_num) and torch.equal(full_idx, ref_full_idx)


# ---------------------------------------------------------------- whole pipeline


PIPELINE_CASES = [
    # batch, kv_heads, group, q_len, kv_len, dim, config
    (2, 2, 2, 77, 100, 32, FlexPrefillConfig(block_size=16, min_budget=32, tau=0.1, gamma=0.9)),
    (1, 2, 1, 130, 200, 32, FlexPrefillConfig(block_size=32, min_budget=64, tau=0.0, gamma=0.8)),
    (1, 1, 3, 130, 200, 32, FlexPrefillConfig(block_size=32, min_budget=32, tau=1.0, gamma=0.8)),
    (1, 2, 2, 100, 100, 16, FlexPrefillConfig(block_size=16, min_budget=16, tau=1.0, gamma=0.7,
                                               query_aware_selection="per_row")),
    (1, 2, 2, 100, 160, 32, FlexPrefillConfig(block_size=16, min_budget=16, tau=0.3, gamma=0.9, max_budget=64)),
    (1, 1, 2, 150, 150, 64, FlexPrefillConfig(block_size=64, min_budget=64, tau=0.2, gamma=0.95)),
    (2, 1, 1, 12, 200, 16, FlexPrefillConfig(block_size=16, min_budget=0, tau=0.5, gamma=0.6)),
]


@pytest.mark.parametrize(("batch", "kv_heads", "group", "q_len", "kv_len", "dim", "config"), PIPELINE_CASES)
def test_pipeline_matches_reference(batch, kv_heads, group, q_len, kv_len, dim, config):
    q, k = _qk(batch, kv_heads, group, q_len, kv_len, dim, spread=4.0, seed=q_len + kv_len)
    mine = triton_selection(q, k, config)
    ref = R.flex_prefill_reference(q, k, config)
    assert torch.equal(mine.query_aware, ref.query_aware)
    torch.testing.assert_close(mine.js_distance, ref.js_distance, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mine.true_blocks, ref.true_blocks, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mine.slash, ref.slash, atol=1e-6, rtol=1e-5)
    assert torch.equal(mine.vertical_selected, ref.vertical_selected)
    assert torch.equal(mine.slash_selected, ref.slash_selected)
    assert torch.equal(mine.active, ref.active)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pipeline_low_precision(dtype):
    """The reference upcasts to float32, the kernels accumulate in float32: same blocks."""
    config = FlexPrefillConfig(block_size=16, min_budget=32, tau=0.15)
    q, k = _qk(1, 2, 2, 70, 100, 32, dtype, spread=4.0, seed=5)
    mine = triton_selection(q, k, config)
    ref = R.flex_prefill_reference(q, k, config)
    assert torch.equal(mine.query_aware, ref.query_aware)
    assert (mine.active == ref.active).float().mean() > 0.99


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN input, on purpose
def test_gamma_one_and_non_finite_are_dense():
    q, k = _qk(1, 2, 2, 48, 80, 16, seed=7)
    layout = BlockLayout(48, 80, 16)
    visible = layout.visible(DEVICE).expand(1, 4, -1, -1)
    assert torch.equal(triton_selection(q, k, FlexPrefillConfig(block_size=16, gamma=1.0)).active, visible)
    q[0, 2, 10, 0] = float("nan")
    config = FlexPrefillConfig(block_size=16, min_budget=16, gamma=0.5, tau=1.0)  # query-aware: dense
    mine = triton_selection(q, k, config)
    assert torch.equal(mine.active[0, 2], visible[0, 2])
    assert torch.equal(mine.active, R.flex_prefill_reference(q, k, config).active)


def test_block_mask_and_backend_wiring():
    config = FlexPrefillConfig(block_size=16, min_budget=32, tau=0.1)
    q, k = _qk(1, 2, 2, 70, 100, 32, seed=8)
    layout = BlockLayout(70, 100, 16)
    ref_active = R.flex_prefill_reference(q, k, config).active
    expected = block_mask_from_active(ref_active, layout)
    for mask in (triton_block_mask(q, k, config), flex_prefill_block_mask(q, k, config=config, backend="triton")):
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(mask, name), getattr(expected, name)), name


@settings(max_examples=6, deadline=None)
@given(
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    q_len=st.integers(1, 70),
    extra=st.integers(0, 40),
    block=st.sampled_from([16, 32]),
    gamma=st.floats(0.3, 0.99),
    tau=st.sampled_from([0.0, 0.1, 0.3, 1.0]),
    min_budget=st.sampled_from([0, 16, 64]),
    seed=st.integers(0, 1000),
)
def test_pipeline_property(kv_heads, group, q_len, extra, block, gamma, tau, min_budget, seed):
    config = FlexPrefillConfig(block_size=block, gamma=gamma, tau=tau, min_budget=min_budget)
    q, k = _qk(1, kv_heads, group, q_len, q_len + extra, 16, spread=4.0, seed=seed)
    assert torch.equal(triton_selection(q, k, config).active, R.flex_prefill_reference(q, k, config).active)


@pytest.mark.parametrize("spread", [0.05, 4.0], ids=["flat", "peaked"])
def test_predicted_density_and_early_dense_exit(spread):
    from flexprefill_torch.attention import dense_causal_attention, flex_prefill_attention
    from flexprefill_torch.kernels.pipeline import pattern_stage
    from flexprefill_torch.selection import build_block_mask

    config = FlexPrefillConfig(block_size=16, min_budget=16, gamma=0.9, min_seq_len=0)
    q, k = _qk(1, 2, 2, 128, 128, 16, seed=3, spread=spread)
    layout = BlockLayout(128, 128, 16)
    predicted = pattern_stage(q, k, config).predicted_density()
    actual = triton_selection(q, k, config).active.sum((-2, -1)) / layout.visible(DEVICE).sum()
    assert predicted.shape == (1, 4)
    assert abs(predicted.mean().item() - actual.mean().item()) < 0.15, (predicted, actual)
    # a forecast above dense_above skips the selection; otherwise the usual mask and info
    mask, info = build_block_mask(q, k, config, None, "triton", True, dense_above=predicted.mean().item() - 0.01)
    assert mask is None and not info.sparse and torch.equal(info.predicted_density, predicted)
    mask, info = build_block_mask(q, k, config, None, "triton", True, dense_above=predicted.mean().item() + 0.01)
    assert mask is not None and info.sparse and info.predicted_density is None
    # flex_prefill_attention runs SDPA on the forecast alone
    v = torch.randn_like(k)
    threshold = predicted.mean().item() - 0.01
    out, info = flex_prefill_attention(
        q, k, v, config=config, max_density=threshold, backend="triton", return_info=True
    )
    assert not info.sparse and info.predicted_density is not None
    torch.testing.assert_close(out, dense_causal_attention(q, k, v))


@settings(max_examples=60, deadline=None)
@given(kv_heads=st.integers(1, 16), group=st.integers(1, 12))
def test_probe_stride(kv_heads, group):
    from flexprefill_torch.kernels.pipeline import PROBE_HEADS, probe_stride

    q_heads = kv_heads * group
    stride = probe_stride(q_heads, kv_heads)
    assert 1 <= stride <= max(1, q_heads // PROBE_HEADS) and q_heads % stride == 0
    assert group % stride == 0 or stride % group == 0
    # probe head i (query head i * s) keeps its key head under the probe's own GQA layout
    probes = q_heads // stride
    for i in range(probes):
        own = i * stride // group
        if stride <= group:
            assert i // (probes // kv_heads) == own
        else:
            assert i * (stride // group) == own


@pytest.mark.parametrize("kv_heads, group", [(4, 4), (16, 1), (2, 8)])
def test_forecast_density_probes(kv_heads, group):
    from flexprefill_torch.kernels.pipeline import forecast_density, pattern_stage, probe_stride

    config = FlexPrefillConfig(block_size=16, min_budget=16, gamma=0.9)
    q, k = _qk(1, kv_heads, group, 96, 96, 16, seed=5, spread=3.0)
    stride = probe_stride(q.shape[1], kv_heads)
    assert stride == 2
    predicted, stage = forecast_density(q, k, config)
    assert stage is None and predicted.shape == (1, q.shape[1])
    full = pattern_stage(q, k, config).predicted_density()
    # each probe head's forecast is its own full-stage forecast, shared by the heads it stands for
    assert torch.equal(predicted, full[:, ::stride].repeat_interleave(stride, dim=1))
    # the build decides on the probes' mean
    from flexprefill_torch.selection import build_block_mask

    mean = predicted.mean().item()
    mask, info = build_block_mask(q, k, config, None, "triton", True, dense_above=mean - 0.01)
    assert mask is None and not info.sparse and torch.equal(info.predicted_density, predicted)
    mask, info = build_block_mask(q, k, config, None, "triton", True, dense_above=mean + 0.01)
    assert mask is not None and info.sparse
    assert torch.equal(info.density, triton_selection(q, k, config).active.sum((-2, -1)) / info.visible_blocks)
