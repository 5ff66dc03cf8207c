"""Property tests of the pure-PyTorch reference against the guarantees of ``ALGORITHM.md``.

Every test draws a small problem (batch, GQA heads, block size, lengths that need not be
multiples of the block, head dim, dtype, γ, τ, min budget, selection mode) and checks one
guarantee on ``flex_prefill_reference``. Quantities the guarantees are stated on are
recomputed here in float64 from ``q`` and ``k`` wherever that is cheap, so the tests do not
only check the reference against itself. Inputs are sometimes *structured* (peaked,
vertical lines, slash lines) so that the selections are genuinely sparse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from flexprefill_torch import BlockLayout, FlexPrefillConfig, flex_prefill_reference
from flexprefill_torch.reference import ReferenceSelection

SUM_TOL = 1e-6  # sums of the reference's own (float32) scores, accumulated in float64
INDEP_TOL = 1e-4  # reference (float32 math) against this file's float64 recomputation
MASS_TOL = 1e-5  # γ-coverage of the true attention mass recomputed here in float64
SQRT_LN2 = math.sqrt(math.log(2.0))

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STRUCTURES = ("noise", "peaked", "vertical", "slash", "mixed", "uniform")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Case:
    """One drawn problem: shapes, input structure and configuration."""

    batch: int
    kv_heads: int
    group: int
    block_size: int
    kv_len: int
    q_len: int
    head_dim: int
    dtype: torch.dtype
    structure: str
    amplitude: float
    seed: int
    gamma: float
    tau: float
    min_budget: int
    selection: str
    max_budget: int | None = None

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(self.q_len, self.kv_len, self.block_size)

    def config(self, **changes: object) -> FlexPrefillConfig:
        """The case's configuration with ``changes`` applied (``None`` values kept)."""
        fields = {
            "gamma": self.gamma,
            "tau": self.tau,
            "block_size": self.block_size,
            "min_budget": self.min_budget,
            "max_budget": self.max_budget,
            "query_aware_selection": self.selection,
        }
        fields.update(changes)
        return FlexPrefillConfig(**fields)  # type: ignore[arg-type]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """``q [B, Hq, Lq, D]`` and ``k [B, Hkv, Lk, D]`` in the case's dtype."""
        return make_qk(
            self.batch, self.q_heads, self.kv_heads, self.q_len, self.kv_len, self.head_dim,
            self.structure, self.amplitude, self.seed, self.dtype,
        )  # fmt: skip


def rope_like(positions: Tensor, dim: int) -> Tensor:
    """``[L, dim]`` unit-amplitude rotary features; their dot products peak at equal positions."""
    freqs = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * freqs[None, :]
    return torch.stack((angles.cos(), angles.sin()), -1).flatten(-2).float()


def make_qk(
    batch: int,
    q_heads: int,
    kv_heads: int,
    q_len: int,
    kv_len: int,
    dim: int,
    structure: str,
    amplitude: float,
    seed: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Random or structured queries and keys (queries are the last ``q_len`` positions).

    ``peaked`` scales Gaussian inputs up; ``vertical`` makes a few keys (often key 0)
    attract every query; ``slash`` gives each head rotary-like features peaking at a fixed
    offset; ``mixed`` is both; ``uniform`` zeroes the queries (all scores tie).
    """
    gen = torch.Generator().manual_seed(seed)
    group = q_heads // kv_heads
    q = torch.randn(batch, q_heads, q_len, dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    if structure == "peaked":
        q, k = q * amplitude, k * amplitude
    if structure == "uniform":  # every logit 0: uniform attention, ties everywhere
        q = torch.zeros_like(q)
    if structure in ("vertical", "mixed"):
        direction = torch.nn.functional.normalize(torch.randn(batch, kv_heads, 1, dim, generator=gen), dim=-1)
        heavy = torch.rand(batch, kv_heads, kv_len, 1, generator=gen) < 2.0 / max(kv_len, 1)
        heavy[..., 0, :] |= torch.rand(batch, kv_heads, 1, generator=gen) < 0.5
        k = k + heavy * direction * (2.0 * amplitude * math.sqrt(dim))
        q = q + direction.repeat_interleave(group, 1) * (amplitude * math.sqrt(dim))
    if structure in ("slash", "mixed"):
        q, k = 0.5 * q, 0.5 * k  # keep the Gaussian part from hiding the lines
        offset = kv_len - q_len
        for h in range(kv_heads):
            delta = int(torch.randint(0, max(1, kv_len // 2), (1,), generator=gen))
            q_feat = rope_like(torch.arange(offset, kv_len), dim)
            k_feat = rope_like(torch.arange(kv_len) + delta, dim)
            q[:, h * group : (h + 1) * group] += amplitude * 1.5 * q_feat
            k[:, h] += amplitude * 1.5 * k_feat
    return q.to(dtype), k.to(dtype)


@st.composite
def gammas(draw: st.DrawFn, allow_one: bool = True) -> float:
    """γ in ``(0, 1]`` (``(0, 1)`` when ``allow_one`` is false), often a typical value."""
    top = 1.0 if allow_one else 0.999
    typical = [g for g in (0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0) if g <= top]
    return draw(st.one_of(st.sampled_from(typical), st.floats(0.01, top)))


@st.composite
def cases(draw: st.DrawFn, allow_gamma_one: bool = True, max_budget: bool = False) -> Case:
    """A small problem; lengths are often not multiples of the block size."""
    block_size = draw(st.sampled_from((16, 32, 64, 128)))
    full_blocks = draw(st.one_of(st.integers(0, 6), st.integers(3, 6)))
    remainder = draw(st.one_of(st.just(0), st.integers(1, block_size - 1)))
    kv_len = max(1, full_blocks * block_size + remainder)
    q_len = draw(st.one_of(st.just(kv_len), st.integers(1, kv_len)))
    min_budget = draw(st.one_of(st.just(0), st.integers(0, 2 * block_size), st.integers(0, 4 * block_size)))
    cap = None
    if max_budget:
        cap = max(min_budget, 1) + draw(st.integers(0, 3 * block_size))
    return Case(
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.integers(1, 2)),
        group=draw(st.integers(1, 3)),
        block_size=block_size,
        kv_len=kv_len,
        q_len=q_len,
        head_dim=draw(st.sampled_from((8, 16, 32))),
        dtype=draw(st.sampled_from(DTYPES)),
        structure=draw(st.sampled_from(STRUCTURES)),
        amplitude=draw(st.sampled_from((1.0, 2.0, 4.0, 16.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
        gamma=draw(gammas(allow_one=allow_gamma_one)),
        tau=draw(st.one_of(st.sampled_from((0.0, 0.05, 0.1, 0.2, 0.4, 1.0)), st.floats(0.0, 1.2))),
        min_budget=min_budget,
        selection=draw(st.sampled_from(("global", "per_row"))),
        max_budget=cap,
    )


# ------------------------------------------------------- independent float64 recomputation


def block_reduce(x: Tensor, block_size: int, reduce_all: bool) -> Tensor:
    """``[..., Lq, Lk]`` bool -> ``[..., nq, nk]``: any (or all, padding counts False) per block."""
    lq, lk = x.shape[-2:]
    nq, nk = -(-lq // block_size), -(-lk // block_size)
    padded = torch.nn.functional.pad(x, (0, nk * block_size - lk, 0, nq * block_size - lq), value=False)
    blocks = padded.unflatten(-1, (nk, block_size)).unflatten(-3, (nq, block_size))
    return blocks.all(-1).all(-2) if reduce_all else blocks.any(-1).any(-2)


def token_causal(layout: BlockLayout) -> Tensor:
    """``[Lq, Lk]`` bool: query ``i`` (at ``Lk - Lq + i``) may see key ``t``."""
    positions = torch.arange(layout.q_len) + layout.kv_len - layout.q_len
    return torch.arange(layout.kv_len)[None, :] <= positions[:, None]


def token_visible(layout: BlockLayout) -> Tensor:
    """``[nq, nk]`` bool: some query of the row may see some key of the block (token level)."""
    return block_reduce(token_causal(layout), layout.block_size, reduce_all=False)


def token_diagonal(layout: BlockLayout) -> Tensor:
    """``[nq, nk]`` bool: the key blocks holding the row's own absolute positions."""
    diag = torch.zeros(layout.num_q_blocks, layout.num_kv_blocks, dtype=torch.bool)
    for i in range(layout.q_len):
        diag[i // layout.block_size, (layout.kv_len - layout.q_len + i) // layout.block_size] = True
    return diag


def float32_logit_error(q: Tensor, k: Tensor) -> float:
    """Bound on how far float32 logits (hence probabilities, ~2x) may stray from float64 ones.

    ``8 · eps32 · max scale · Σ_d |q_d k_d|``: negligible for ordinary inputs, larger for
    the huge-amplitude draws whose logits reach thousands.
    """
    kf = k.double().abs().repeat_interleave(q.shape[1] // k.shape[1], 1)
    magnitude = (q.double().abs() @ kf.mT).max().item() / math.sqrt(q.shape[-1])
    return 8 * torch.finfo(torch.float32).eps * magnitude


def representative_probs(q: Tensor, k: Tensor, layout: BlockLayout, scale: float) -> Tensor:
    """float64 causal softmax of the last ``min(b, Lq)`` queries: ``[B, Hq, r, Lk]``."""
    r = min(layout.block_size, layout.q_len)
    kf = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    logits = scale * q.double()[..., -r:, :] @ kf.mT
    return torch.softmax(logits.masked_fill(~token_causal(layout)[-r:], -math.inf), -1)


def block_means(x: Tensor, block_size: int) -> Tensor:
    """``[..., L, D]`` -> ``[..., n, D]``: mean of each block's real rows (float64)."""
    n = -(-x.shape[-2] // block_size)
    return torch.stack([x[..., j * block_size : (j + 1) * block_size, :].mean(-2) for j in range(n)], -2)


@dataclass
class Expected:
    """float64 recomputation of steps 1–4 from ``q`` and ``k``."""

    probs: Tensor  # [B, Hq, r, Lk]
    true_blocks: Tensor  # â, [B, Hq, nk]
    slash: Tensor  # pooled slash per offset group, [B, Hq, nk]
    estimated: Tensor  # ā, [B, Hq, nk]
    block_scores: Tensor  # Ā, [B, Hq, nq, nk]
    js: Tensor  # [B, Hq]
    tolerance: float  # float32 rounding of the largest logit magnitude, plus INDEP_TOL


def js64(p: Tensor, q: Tensor) -> Tensor:
    """``sqrt(JSD(p ‖ q))`` in float64 with ``0 log 0 = 0`` (independent of the reference)."""
    p, q = p.double(), q.double()
    mid = 0.5 * (p + q)

    def kl(x: Tensor) -> Tensor:
        return torch.where(x > 0, x * (x.log() - mid.log()), torch.zeros_like(x)).sum(-1)

    return (0.5 * (kl(p) + kl(q))).clamp(min=0).sqrt()


def recompute(q: Tensor, k: Tensor, layout: BlockLayout) -> Expected:
    """Steps 1–4 of ALGORITHM.md in float64, written independently of the reference."""
    b, nk = layout.block_size, layout.num_kv_blocks
    scale = 1.0 / math.sqrt(q.shape[-1])
    probs = representative_probs(q, k, layout, scale)
    r = probs.shape[-2]
    key_block = torch.arange(layout.kv_len) // b
    true_blocks = torch.zeros(*probs.shape[:2], nk, dtype=torch.float64)
    true_blocks.index_add_(-1, key_block, probs.mean(-2))
    positions = torch.arange(layout.kv_len - r, layout.kv_len)
    group = ((positions[:, None] - torch.arange(layout.kv_len)[None, :]).clamp(min=0) // b).expand_as(probs)
    slash = torch.zeros(*probs.shape[:2], r, nk, dtype=torch.float64).scatter_add_(-1, group, probs)
    slash = slash.mean(-2)
    kf = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    k_pool, q_pool = block_means(kf, b), block_means(q.double(), b)
    estimated = torch.softmax(scale * q.double()[..., -r:, :].mean(-2, keepdim=True) @ k_pool.mT, -1)[
        ..., 0, :
    ]
    logits = (scale * q_pool @ k_pool.mT).masked_fill(~token_visible(layout), -math.inf)
    block_scores = torch.softmax(logits, -1)
    # The reference forms logits in float32: each is off by up to ~eps32 * scale * Σ_d |q_d k_d|,
    # and a probability moves by at most about twice the largest logit error.
    tolerance = INDEP_TOL + float32_logit_error(q, k)
    js = js64(estimated, true_blocks)
    return Expected(probs, true_blocks, slash, estimated, block_scores, js, tolerance)


def run(case: Case, **changes: object) -> tuple[Tensor, Tensor, ReferenceSelection]:
    """Draw the tensors of ``case`` and run the reference with ``changes`` to its config."""
    q, k = case.tensors()
    return q, k, flex_prefill_reference(q, k, case.config(**changes))


# ------------------------------------------------------------------------- guarantees


@given(case=cases())
def test_intermediates_match_float64_recomputation(case: Case) -> None:
    """Steps 1–4 (â, pooled slash, ā, Ā, D_JS) agree with an independent float64 computation."""
    q, k, sel = run(case)
    exp = recompute(q, k, case.layout)
    for name, got, want in (
        ("true_blocks", sel.true_blocks, exp.true_blocks),
        ("slash", sel.slash, exp.slash),
        ("estimated_blocks", sel.estimated_blocks, exp.estimated),
        ("block_scores", sel.block_scores, exp.block_scores),
    ):
        torch.testing.assert_close(got.double(), want, atol=exp.tolerance, rtol=0, msg=name)
    for dist in (sel.true_blocks, sel.slash, sel.estimated_blocks):
        torch.testing.assert_close(
            dist.double().sum(-1), torch.ones(dist.shape[:2], dtype=torch.float64), atol=SUM_TOL, rtol=0
        )
    # D_JS of the reference's own distributions, to float32 rounding; and of the exact ones
    # (sqrt amplifies tiny differences near 0, so compare the divergences there).
    torch.testing.assert_close(
        sel.js_distance.double(), js64(sel.estimated_blocks, sel.true_blocks), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(sel.js_distance.double() ** 2, exp.js**2, atol=10 * exp.tolerance, rtol=0)
    assert torch.equal(sel.query_aware, sel.js_distance < case.tau)


@given(case=cases(max_budget=True))
def test_layout_maps_match_token_level_definitions(case: Case) -> None:
    """BlockLayout.visible/diagonal/full agree with their token-level definitions."""
    layout = case.layout
    assert torch.equal(layout.visible("cpu"), token_visible(layout))
    assert torch.equal(layout.diagonal("cpu"), token_diagonal(layout))
    full = block_reduce(token_causal(layout), layout.block_size, reduce_all=True)
    assert torch.equal(layout.full("cpu"), full)
    assert layout.diagonal("cpu").sum(-1).le(2).all()


@given(case=cases(max_budget=True), capped=st.booleans())
def test_causality(case: Case, capped: bool) -> None:
    """Guarantee 1: no active block lies wholly above the causal boundary (any config)."""
    case = case if capped else replace(case, max_budget=None)
    _, _, sel = run(case)
    layout = case.layout
    assert sel.active.shape == (case.batch, case.q_heads, layout.num_q_blocks, layout.num_kv_blocks)
    assert not (sel.active & ~token_visible(layout)).any()


@given(case=cases())
def test_coverage(case: Case) -> None:
    """Guarantee 2: the selected scores reach γ, by pattern and selection mode."""
    _, _, sel = run(case)
    layout, gamma = case.layout, case.gamma
    active = sel.active.double()
    for b in range(case.batch):
        for h in range(case.q_heads):
            if sel.query_aware[b, h]:
                scores = sel.block_scores[b, h].double()
                if case.selection == "global":
                    covered = (scores * active[b, h]).sum() / layout.num_q_blocks
                    assert covered >= gamma - SUM_TOL, (b, h, float(covered))
                else:
                    covered = (scores * active[b, h]).sum(-1)
                    assert (covered >= gamma - SUM_TOL).all(), (b, h, covered)
            else:
                vertical = (sel.true_blocks[b, h].double() * sel.vertical_selected[b, h]).sum()
                slash = (sel.slash[b, h].double() * sel.slash_selected[b, h]).sum()
                assert vertical >= gamma - SUM_TOL, (b, h, float(vertical))
                assert slash >= gamma - SUM_TOL, (b, h, float(slash))


@given(case=cases())
def test_vertical_slash_heads_hold_gamma_of_true_mass(case: Case) -> None:
    """Guarantee 2, consequence: VS heads keep ≥ γ of the representative queries' true mass.

    The mass is recomputed here in float64 from ``q`` and ``k``; representative query ``i``
    reads the active blocks of its own query-block row ``i // b``.
    """
    q, k, sel = run(case, tau=0.0)  # every head vertical-slash
    layout = case.layout
    assert not sel.query_aware.any()
    probs = representative_probs(q, k, layout, 1.0 / math.sqrt(case.head_dim))
    r = probs.shape[-2]
    rows = torch.arange(layout.q_len - r, layout.q_len) // layout.block_size
    key_blocks = torch.arange(layout.kv_len) // layout.block_size
    allowed = sel.active[:, :, rows][..., key_blocks]  # [B, Hq, r, Lk]
    mass = (probs * allowed).sum(-1).mean(-1)
    assert (mass >= case.gamma - MASS_TOL - float32_logit_error(q, k)).all(), mass


def assert_minimal(scores: Tensor, selected: Tensor, optional: Tensor, gamma: float, where: object) -> None:
    """Dropping the smallest selected entry that no rule forces leaves a sum below γ."""
    candidates = selected & optional
    if not candidates.any():
        return
    total = scores[selected].sum()
    smallest = scores[candidates].min()
    assert total - smallest < gamma + SUM_TOL, (where, float(total), float(smallest), gamma)


@given(case=cases())
def test_minimality(case: Case) -> None:
    """Guarantee 3: every unforced selection is the shortest prefix reaching γ."""
    _, _, sel = run(case)
    layout, gamma = case.layout, case.gamma
    visible = token_visible(layout)
    for b in range(case.batch):
        for h in range(case.q_heads):
            if sel.query_aware[b, h]:
                selected = sel.query_aware_selected[b, h] & visible
                optional = ~sel.forced[b, h]
                scores = sel.block_scores[b, h].double()
                if case.selection == "global":
                    assert_minimal(scores / layout.num_q_blocks, selected, optional, gamma, (b, h))
                else:
                    for row in range(layout.num_q_blocks):
                        assert_minimal(scores[row], selected[row], optional[row], gamma, (b, h, row))
            else:
                not_sink = torch.arange(layout.num_kv_blocks) > 0
                vertical = sel.true_blocks[b, h].double()
                assert_minimal(vertical, sel.vertical_selected[b, h], not_sink, gamma, (b, h, "v"))
                slash = sel.slash[b, h].double()
                assert_minimal(slash, sel.slash_selected[b, h], torch.ones_like(not_sink), gamma, (b, h, "s"))


@given(case=cases(allow_gamma_one=False))
def test_active_map_is_the_extended_selection(case: Case) -> None:
    """QA heads activate their selection; VS heads every block a selected column or line meets.

    The VS extension is recomputed at token level: block ``(r, j)`` is active iff ``j`` is
    a selected column, or a causal pair of the block lies on a selected offset group, or a
    rule forces it.
    """
    _, _, sel = run(case)
    layout = case.layout
    visible = token_visible(layout)
    causal = token_causal(layout)
    offsets = (
        torch.arange(layout.q_len)[:, None] + layout.offset - torch.arange(layout.kv_len)[None, :]
    ).clamp(min=0)
    on_line = sel.slash_selected[..., offsets // layout.block_size] & causal  # [B, Hq, Lq, Lk]
    vs_active = (
        block_reduce(on_line, layout.block_size, False) | sel.vertical_selected[..., None, :]
    ) & visible
    vs_active |= sel.forced
    qa_active = sel.query_aware_selected & visible
    expected = torch.where(sel.query_aware[..., None, None], qa_active, vs_active)
    assert torch.equal(sel.active, expected)
    assert not (sel.forced & ~visible).any()


@given(case=cases(max_budget=True), capped=st.booleans())
def test_sink_local_and_min_budget(case: Case, capped: bool) -> None:
    """Guarantee 4: sink, diagonal blocks and the min budget hold in every row of every head."""
    case = case if capped else replace(case, max_budget=None)
    _, _, sel = run(case)
    layout = case.layout
    assert sel.active[..., 0].all()
    assert sel.active[..., token_diagonal(layout)].all()
    visible_per_row = token_visible(layout).sum(-1)
    need = torch.clamp(visible_per_row, max=math.ceil(case.min_budget / case.block_size))
    assert (sel.active.sum(-1) >= need).all()
    assert (sel.forced.sum(-1) >= need).all()
    assert not (sel.forced & ~sel.active).any()


@given(case=cases(allow_gamma_one=False), data=st.data())
def test_monotone_in_gamma(case: Case, data: st.DataObject) -> None:
    """Guarantee 5: the active set at γ₁ < γ₂ is a subset of the one at γ₂; forced blocks fixed."""
    upper = data.draw(st.floats(0.0, 1.0, exclude_min=True), label="fraction")
    gamma_hi = min(1.0, case.gamma + (1.0 - case.gamma) * upper)
    if gamma_hi <= case.gamma:
        gamma_hi = 1.0
    q, k = case.tensors()
    low = flex_prefill_reference(q, k, case.config())
    high = flex_prefill_reference(q, k, case.config(gamma=gamma_hi))
    assert not (low.active & ~high.active).any(), (case.gamma, gamma_hi)
    assert torch.equal(low.forced, high.forced)
    assert torch.equal(low.query_aware, high.query_aware)
    assert not (low.vertical_selected & ~high.vertical_selected).any()
    assert not (low.slash_selected & ~high.slash_selected).any()


@given(case=cases(max_budget=True))
def test_gamma_one_is_dense(case: Case) -> None:
    """γ = 1 activates every causally visible block, for every head (a cap does not apply)."""
    _, _, sel = run(case, gamma=1.0)
    visible = token_visible(case.layout).expand_as(sel.active)
    assert torch.equal(sel.active, visible)


@given(case=cases())
def test_tau_extremes_fix_the_pattern(case: Case) -> None:
    """τ = 0 makes every head vertical-slash; τ >= 1 makes every head query-aware."""
    q, k = case.tensors()
    assert not flex_prefill_reference(q, k, case.config(tau=0.0)).query_aware.any()
    assert flex_prefill_reference(q, k, case.config(tau=1.0)).query_aware.all()
    assert flex_prefill_reference(q, k, case.config(tau=7.5)).query_aware.all()


def assert_js_in_range(js: Tensor) -> None:
    """``D_JS`` is finite and in ``[0, sqrt(ln 2)]`` (the bound rounded to float32)."""
    bound = torch.tensor(SQRT_LN2, dtype=torch.float32)
    assert js.dtype == torch.float32
    assert torch.isfinite(js).all(), js
    assert (js >= 0).all() and (js <= bound).all(), js


@given(case=cases())
def test_js_distance_range(case: Case) -> None:
    """``D_JS`` lies in ``[0, sqrt(ln 2)]`` and is never NaN for finite input."""
    _, _, sel = run(case)
    assert_js_in_range(sel.js_distance)


@given(case=cases(), norm=st.sampled_from((1e2, 1e3, 3e3)))
def test_js_distance_with_underflowing_probabilities(case: Case, norm: float) -> None:
    """Keys with huge norms make probabilities exactly 0; ``D_JS`` stays finite and bounded."""
    q, k = case.tensors()
    k = torch.nn.functional.normalize(k.float(), dim=-1) * norm
    q = torch.nn.functional.normalize(q.float(), dim=-1) * norm
    sel = flex_prefill_reference(q.to(case.dtype), k.to(case.dtype), case.config())
    assert_js_in_range(sel.js_distance)
    assert torch.isfinite(sel.true_blocks).all() and torch.isfinite(sel.estimated_blocks).all()


def test_js_distance_underflow_is_really_exercised() -> None:
    """Crafted ā and â with disjoint support (exact zeros): D_JS = sqrt(ln 2), no NaN.

    Block 0 holds keys that the *mean* query prefers (logit 200); block 1 holds keys
    ``±c·e1`` whose mean is 0 but whose ``+`` keys every query prefers (logit 400).
    """
    dim, b = 8, 16
    root = math.sqrt(dim)
    k = torch.zeros(1, 1, 2 * b, dim)
    k[..., :b, 0] = 200.0 * root
    k[..., b::2, 1] = 400.0 * root
    k[..., b + 1 :: 2, 1] = -400.0 * root
    q = torch.zeros(1, 1, b, dim)
    q[..., :2] = 1.0
    sel = flex_prefill_reference(q, k, FlexPrefillConfig(block_size=b, min_budget=0, gamma=0.9))
    assert sel.estimated_blocks[0, 0, 1] == 0.0 and sel.true_blocks[0, 0, 0] == 0.0
    assert sel.estimated_blocks[0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert sel.true_blocks[0, 0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert_js_in_range(sel.js_distance)
    assert sel.js_distance.item() == pytest.approx(SQRT_LN2, abs=1e-6)


@pytest.mark.parametrize("logit", [-100.0, -100.5, -101.0, -102.0])
def test_js_distance_with_subnormal_probability(logit: float) -> None:
    """A true block mass that is a float32 subnormal (or 0) against ā = 0 keeps D_JS finite.

    Regression: in float32 the midpoint ``(p + q) / 2`` of the smallest subnormal and 0
    rounds to 0, which made ``D_JS = inf`` and silently turned the head dense.
    """
    dim, b = 8, 16
    q = torch.zeros(1, 1, 1, dim)
    q[..., 0] = math.sqrt(dim)  # the logit of a key is its first coordinate
    k = torch.zeros(1, 1, 3 * b, dim)
    k[..., b:, 0] = -1000.0
    k[..., b, 0] = logit  # block 1 gets mass exp(logit): subnormal or 0 in float32
    sel = flex_prefill_reference(q, k, FlexPrefillConfig(block_size=b, min_budget=0, gamma=0.5))
    assert sel.estimated_blocks[0, 0, 1] == 0.0 and sel.true_blocks[0, 0, 1] < 1e-38
    assert_js_in_range(sel.js_distance)
    assert sel.js_distance.item() < 1e-6
    assert sel.active.tolist() == [[[[True, False, True]]]]  # still sparse: block 1 dropped


@given(case=cases(allow_gamma_one=False, max_budget=True))
def test_max_budget_caps_rows(case: Case) -> None:
    """A cap keeps at most ``max(ceil(max_budget / b), forced)`` blocks per row, forced first."""
    assert case.max_budget is not None
    q, k = case.tensors()
    capped = flex_prefill_reference(q, k, case.config())
    free = flex_prefill_reference(q, k, case.config(max_budget=None))
    limit = torch.clamp(capped.forced.sum(-1), min=math.ceil(case.max_budget / case.block_size))
    assert (capped.active.sum(-1) <= limit).all()
    assert not (capped.forced & ~capped.active).any()
    assert not (capped.active & ~free.active).any()
    # Query-aware heads keep their best optional blocks: no dropped one outscores a kept one.
    optional_kept = capped.active & ~capped.forced
    dropped = free.active & ~capped.active
    scores = capped.block_scores.double()
    best_dropped = scores.masked_fill(~dropped, -1.0).amax(-1)
    worst_kept = scores.masked_fill(~optional_kept, 2.0).amin(-1)
    qa = capped.query_aware[..., None].expand_as(best_dropped)
    assert (best_dropped[qa] <= worst_kept[qa]).all()


@given(case=cases(allow_gamma_one=False), data=st.data())
def test_nan_head_keeps_every_visible_block(case: Case, data: st.DataObject) -> None:
    """A NaN in one query head (or key head) makes that head (or its query heads) dense.

    The other heads are unaffected.
    """
    q, k = case.tensors()
    clean = flex_prefill_reference(q, k, case.config())
    b = data.draw(st.integers(0, case.batch - 1), label="batch")
    in_keys = data.draw(st.booleans(), label="in_keys")
    heads = case.kv_heads if in_keys else case.q_heads
    h = data.draw(st.integers(0, heads - 1), label="head")
    length = case.kv_len if in_keys else case.q_len
    t = data.draw(st.integers(0, length - 1), label="position")
    x = (k if in_keys else q).clone()
    x[b, h, t, data.draw(st.integers(0, case.head_dim - 1), label="dim")] = math.nan
    sel = (
        flex_prefill_reference(q, x, case.config())
        if in_keys
        else flex_prefill_reference(x, k, case.config())
    )
    dense = torch.zeros(case.batch, case.q_heads, dtype=torch.bool)
    if in_keys:
        dense[b, h * case.group : (h + 1) * case.group] = True
    else:
        dense[b, h] = True
    visible = token_visible(case.layout)
    assert (sel.active[dense] == visible).all()
    assert torch.equal(sel.active[~dense], clean.active[~dense])


# -------------------------------------------------------------- sparsity is real


SPARSE = Case(
    batch=1, kv_heads=2, group=2, block_size=32, kv_len=400, q_len=350, head_dim=16,
    dtype=torch.float32, structure="mixed", amplitude=4.0, seed=1234,
    gamma=0.9, tau=0.1, min_budget=0, selection="global",
)  # fmt: skip


def density(case: Case, sel: ReferenceSelection) -> Tensor:
    """``[B, Hq]`` active / causally visible blocks."""
    return sel.active.sum((-2, -1)).double() / token_visible(case.layout).sum()


@pytest.mark.parametrize("tau", [0.0, 1.0], ids=["vertical_slash", "query_aware"])
@pytest.mark.parametrize("selection", ["global", "per_row"])
def test_peaked_input_is_sparse(tau: float, selection: str) -> None:
    """On a peaked (sink + slash) input both patterns drop blocks: the properties are not vacuous."""
    case = replace(SPARSE, tau=tau, selection=selection)
    _, _, sel = run(case)
    assert (density(case, sel) < 0.75).all(), density(case, sel)
    assert bool(sel.query_aware.all()) == (tau >= 1.0)
    assert bool(sel.query_aware.any()) == (tau >= 1.0)


@pytest.mark.parametrize(
    ("structure", "amplitude", "tau", "limit"),
    [("vertical", 4.0, 0.0, 0.8), ("slash", 2.0, 0.0, 0.85), ("peaked", 4.0, 1.0, 0.85)],
)
def test_structured_inputs_are_sparse(structure: str, amplitude: float, tau: float, limit: float) -> None:
    """Each structured generator the property tests draw yields sparse selections."""
    case = replace(SPARSE, structure=structure, amplitude=amplitude, tau=tau)
    _, _, sel = run(case)
    assert (density(case, sel) < limit).all(), density(case, sel)
    assert (density(case, sel) > 0).all()
