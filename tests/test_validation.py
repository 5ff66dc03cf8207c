"""Bad input raises a clear error naming the argument and its value; configs round-trip.

Every public entry point (``flex_prefill_block_mask`` and ``flex_prefill_attention``)
validates ``q``/``k``/``v`` and the configuration before doing any work; no test here
compiles FlexAttention (errors are raised before the kernel runs).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from flexprefill_torch import (
    FlexPrefillConfig,
    active_from_block_mask,
    flex_prefill_attention,
    flex_prefill_block_mask,
    flex_prefill_reference,
)
from flexprefill_torch.config import resolve_config


def qkv(
    b: int = 1,
    hq: int = 2,
    hkv: int = 1,
    lq: int = 40,
    lk: int = 50,
    d: int = 8,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Small valid inputs (queries are the last ``lq`` of ``lk`` positions)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
    return q, k, v


def call_mask(q: Any, k: Any, v: Any, **kwargs: Any) -> object:
    """``flex_prefill_block_mask`` (ignores ``v``)."""
    return flex_prefill_block_mask(q, k, **{"block_size": 16, "min_budget": 0, **kwargs})


def call_attention(q: Any, k: Any, v: Any, **kwargs: Any) -> object:
    """``flex_prefill_attention`` on the dense path (no compilation needed to reach the checks)."""
    return flex_prefill_attention(q, k, v, **{"block_size": 16, "min_budget": 0, **kwargs})


ENTRY_POINTS = pytest.mark.parametrize("entry", [call_mask, call_attention], ids=["block_mask", "attention"])
Entry = Callable[..., object]


# ------------------------------------------------------------------ tensor checks


@ENTRY_POINTS
@pytest.mark.parametrize(
    ("which", "shape", "pattern"),
    [
        ("q", (2, 40, 8), r"q must have 4 dims.*q\.shape=\(2, 40, 8\)"),
        ("q", (1, 1, 2, 40, 8), r"q must have 4 dims.*q\.shape=\(1, 1, 2, 40, 8\)"),
        ("k", (1, 50, 8), r"k must have 4 dims.*k\.shape=\(1, 50, 8\)"),
    ],
)
def test_wrong_rank(entry: Entry, which: str, shape: tuple[int, ...], pattern: str) -> None:
    """A tensor that is not 4-D is rejected with its name and shape."""
    q, k, v = qkv()
    bad = torch.zeros(shape)
    args = {"q": q, "k": k, "v": v, which: bad}
    with pytest.raises(ValueError, match=pattern):
        entry(args["q"], args["k"], args["v"])


def test_wrong_rank_v() -> None:
    """``v`` must be 4-D as well."""
    q, k, _ = qkv()
    with pytest.raises(ValueError, match=r"v must have 4 dims.*v\.shape=\(1, 50, 8\)"):
        call_attention(q, k, torch.zeros(1, 50, 8))


@ENTRY_POINTS
def test_heads_not_divisible(entry: Entry) -> None:
    """``Hq % Hkv != 0`` names both head counts."""
    q, k, v = qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match=r"multiple of key heads.*q heads=3, k heads=2"):
        entry(q, k, v)


@ENTRY_POINTS
def test_batch_mismatch(entry: Entry) -> None:
    """``q`` and ``k`` with different batch sizes."""
    q, _, _ = qkv(b=2)
    _, k, v = qkv(b=1)
    with pytest.raises(ValueError, match=r"batch size.*q\.shape=\(2, 2, 40, 8\), k\.shape=\(1, 1, 50, 8\)"):
        entry(q, k, v)


@ENTRY_POINTS
def test_head_dim_mismatch(entry: Entry) -> None:
    """``q`` and ``k`` with different head dims."""
    q, _, _ = qkv(d=16)
    _, k, v = qkv(d=8)
    with pytest.raises(ValueError, match=r"head_dim.*q\.shape=\(1, 2, 40, 16\), k\.shape=\(1, 1, 50, 8\)"):
        entry(q, k, v)


@ENTRY_POINTS
def test_dtype_mismatch(entry: Entry) -> None:
    """``q`` and ``k`` of different floating dtypes: TypeError naming both."""
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q\.dtype=torch\.bfloat16 and k\.dtype=torch\.float32"):
        entry(q.bfloat16(), k, v)


def test_v_dtype_and_shape_mismatch() -> None:
    """``v`` must share ``k``'s dtype, batch, heads and length."""
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"v\.dtype=torch\.float16 and k\.dtype=torch\.float32"):
        call_attention(q, k, v.half())
    with pytest.raises(ValueError, match=r"v must match k.*v\.shape=\(1, 1, 49, 8\)"):
        call_attention(q, k, v[:, :, :49])
    with pytest.raises(ValueError, match=r"v must match k.*v\.shape=\(1, 2, 50, 8\)"):
        call_attention(q, k, v.repeat(1, 2, 1, 1))
    with pytest.raises(TypeError, match=r"v must be a torch\.Tensor, got list"):
        call_attention(q, k, [1.0])


@ENTRY_POINTS
def test_query_longer_than_keys(entry: Entry) -> None:
    """``Lq > Lk`` is rejected: queries are the last positions of the keys."""
    q, k, v = qkv(lq=51, lk=50)
    with pytest.raises(ValueError, match=r"q_len <= kv_len.*q_len=51, kv_len=50"):
        entry(q, k, v)


@ENTRY_POINTS
@pytest.mark.parametrize(
    ("which", "shape"),
    [
        ("q", (1, 2, 0, 8)),
        ("q", (0, 2, 40, 8)),
        ("q", (1, 0, 40, 8)),
        ("q", (1, 2, 40, 0)),
        ("k", (1, 1, 0, 8)),
    ],
)
def test_empty_tensors(entry: Entry, which: str, shape: tuple[int, ...]) -> None:
    """Empty tensors (any zero dimension) are rejected with the offending shape."""
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v, which: torch.zeros(shape)}
    pattern = rf"{which} must not be empty.*{which}\.shape={re_shape(shape)}"
    with pytest.raises(ValueError, match=pattern):
        entry(args["q"], args["k"], args["v"])


def re_shape(shape: tuple[int, ...]) -> str:
    """A regex matching ``str(shape)``."""
    return "\\(" + ", ".join(str(s) for s in shape) + "\\)"


@ENTRY_POINTS
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float64])
def test_unsupported_dtypes(entry: Entry, dtype: torch.dtype) -> None:
    """Integer, bool and float64 inputs raise TypeError naming the dtype."""
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"q must be float16, bfloat16 or float32, got q\.dtype={dtype}"):
        entry(q.to(dtype), k.to(dtype), v.to(dtype))
    with pytest.raises(TypeError, match=rf"k\.dtype={dtype}"):
        entry(q, k.to(dtype), v)


@ENTRY_POINTS
def test_not_a_tensor(entry: Entry) -> None:
    """A non-tensor ``q`` or ``k`` is a TypeError naming its type."""
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor, got ndarray"):
        entry(q.numpy(), k, v)
    with pytest.raises(TypeError, match=r"k must be a torch\.Tensor, got NoneType"):
        entry(q, None, v)


@ENTRY_POINTS
def test_device_mismatch(entry: Entry) -> None:
    """``q`` and ``k`` on different devices (``meta`` stands in for a GPU)."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"one device.*q\.device=cpu and k\.device=meta"):
        entry(q, k.to("meta"), v.to("meta"))


# ------------------------------------------------------------ argument checks


@ENTRY_POINTS
@pytest.mark.parametrize(
    ("name", "value", "pattern"),
    [
        ("gamma", 0.0, r"gamma=0\.0"),
        ("gamma", -0.5, r"gamma=-0\.5"),
        ("gamma", 1.5, r"gamma=1\.5"),
        ("gamma", math.nan, r"gamma=nan"),
        ("gamma", True, r"gamma=True"),
        ("gamma", "0.9", r"gamma='0\.9'"),
        ("tau", -0.1, r"tau=-0\.1"),
        ("tau", math.nan, r"tau=nan"),
        ("block_size", 48, r"block_size=48"),
        ("block_size", 512, r"block_size=512"),
        ("block_size", 8, r"block_size=8"),
        ("block_size", 64.0, r"block_size=64\.0"),
        ("min_budget", -1, r"min_budget=-1"),
        ("min_budget", 1.5, r"min_budget=1\.5"),
        ("max_budget", 0, r"max_budget=0"),
        ("max_budget", 10.0, r"max_budget=10\.0"),
        ("query_aware_selection", "rows", r"query_aware_selection='rows'"),
        ("min_seq_len", -1, r"min_seq_len=-1"),
        ("max_density", 0.0, r"max_density=0\.0"),
        ("max_density", 1.5, r"max_density=1\.5"),
        ("attention_kernel", "cuda", r"attention_kernel='cuda'"),
    ],
)
def test_bad_config_keywords(entry: Entry, name: str, value: object, pattern: str) -> None:
    """Out-of-range or mistyped hyper-parameters raise ValueError naming the argument and value."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=pattern):
        entry(q, k, v, **{name: value})
    with pytest.raises(ValueError, match=pattern):
        FlexPrefillConfig(**{name: value})  # type: ignore[arg-type]


def test_max_budget_below_min_budget() -> None:
    """``max_budget < min_budget`` names both the bound and the value."""
    with pytest.raises(
        ValueError, match=r"max_budget must be None or >= .* = 256 tokens, got max_budget=255"
    ):
        FlexPrefillConfig(min_budget=256, max_budget=255)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"max_budget=100"):
        flex_prefill_block_mask(q, k, min_budget=128, max_budget=100)
    assert FlexPrefillConfig(min_budget=256, max_budget=256).max_blocks == 2


@ENTRY_POINTS
@pytest.mark.parametrize("backend", ["cuda", "Reference", ""])
def test_bad_backend(entry: Entry, backend: str) -> None:
    """An unknown backend names itself and the allowed ones."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"backend must be one of .*got backend='{backend}'"):
        entry(q, k, v, backend=backend)


@ENTRY_POINTS
@pytest.mark.parametrize(
    ("scale", "pattern"),
    [(0.0, r"scale=0\.0"), (-1.0, r"scale=-1\.0"), (math.inf, r"scale=inf"), (math.nan, r"scale=nan"),
     (True, r"scale=True"), ("0.1", r"scale='0\.1'")],
)  # fmt: skip
def test_bad_scale(entry: Entry, scale: object, pattern: str) -> None:
    """``scale`` must be None or a positive finite number."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=pattern):
        entry(q, k, v, scale=scale)


@ENTRY_POINTS
@pytest.mark.parametrize("config", [{"gamma": 0.5}, "default", 0.9])
def test_config_of_wrong_type(entry: Entry, config: object) -> None:
    """``config`` must be a FlexPrefillConfig (or None): TypeError naming the type."""
    q, k, v = qkv()
    with pytest.raises(
        TypeError,
        match=rf"config must be a FlexPrefillConfig or None, got config of type {type(config).__name__}",
    ):
        entry(q, k, v, config=config)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_valid_backends_on_cpu_use_the_reference(backend: str) -> None:
    """On CPU tensors ``"auto"`` and ``"reference"`` both give the reference's active map."""
    q, k, _ = qkv(lq=100, lk=130, d=16)
    config = FlexPrefillConfig(gamma=0.5, block_size=16, min_budget=0)
    mask = flex_prefill_block_mask(q * 3.0, k * 3.0, config=config, backend=backend)
    assert torch.equal(active_from_block_mask(mask), flex_prefill_reference(q * 3.0, k * 3.0, config).active)


# ------------------------------------------------------------- configuration


@st.composite
def configs(draw: st.DrawFn) -> FlexPrefillConfig:
    """Any valid configuration."""
    block_size = draw(st.sampled_from((16, 32, 64, 128, 256)))
    min_budget = draw(st.integers(0, 4096))
    max_budget = draw(st.one_of(st.none(), st.integers(max(min_budget, 1), 8192)))
    return FlexPrefillConfig(
        gamma=draw(st.floats(0.0, 1.0, exclude_min=True)),
        tau=draw(st.floats(0.0, 5.0)),
        block_size=block_size,
        min_budget=min_budget,
        max_budget=max_budget,
        query_aware_selection=draw(st.sampled_from(("global", "per_row"))),
        min_seq_len=draw(st.integers(0, 10**6)),
        max_density=draw(st.one_of(st.none(), st.floats(0.0, 1.0, exclude_min=True))),
        attention_kernel=draw(st.sampled_from(("auto", "flex", "fa4"))),
    )


@given(config=configs())
def test_config_round_trips_through_to_dict(config: FlexPrefillConfig) -> None:
    """``FlexPrefillConfig(**c.to_dict()) == c``; the dict is plain and has every field."""
    as_dict = config.to_dict()
    assert set(as_dict) == {f.name for f in dataclasses.fields(FlexPrefillConfig)}
    assert FlexPrefillConfig(**as_dict) == config
    assert config.min_blocks == math.ceil(config.min_budget / config.block_size)
    assert config.replace() is config


@given(config=configs(), other=configs(), data=st.data())
def test_keyword_overrides_win_over_config(
    config: FlexPrefillConfig, other: FlexPrefillConfig, data: st.DataObject
) -> None:
    """Every keyword replaces the config's field; None keeps the config's value, except for
    max_budget/max_density where None switches the cap/check off.

    The merged fields are validated like a fresh config (same error when invalid).
    """
    names = data.draw(st.sets(st.sampled_from([f.name for f in dataclasses.fields(FlexPrefillConfig)])))
    overrides = {name: getattr(other, name) for name in names}
    nullable = {"max_budget", "max_density"}
    merged = {**config.to_dict(), **{n: v for n, v in overrides.items() if v is not None or n in nullable}}
    try:
        expected = FlexPrefillConfig(**merged)
    except ValueError as error:
        with pytest.raises(ValueError, match=re.escape(str(error))):
            resolve_config(config, **overrides)
    else:
        assert resolve_config(config, **overrides) == expected
    assert resolve_config(config) == config
    assert resolve_config(config, gamma=None, tau=None) == config
    assert resolve_config(None) == FlexPrefillConfig()
    assert resolve_config(None, gamma=0.5) == FlexPrefillConfig(gamma=0.5)


def test_frozen_config() -> None:
    """A config cannot be mutated after validation."""
    config = FlexPrefillConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gamma = 2.0  # type: ignore[misc]


def test_keyword_overrides_reach_the_selection() -> None:
    """``flex_prefill_block_mask(config=c, gamma=g, ...)`` selects as ``c`` with those fields."""
    q, k, _ = qkv(hq=2, hkv=1, lq=150, lk=200, d=16)
    q, k = 3.0 * q, 3.0 * k
    base = FlexPrefillConfig(gamma=0.99, tau=0.0, block_size=32, min_budget=512)
    overrides = {
        "gamma": 0.6,
        "tau": 1.0,
        "block_size": 16,
        "min_budget": 0,
        "query_aware_selection": "per_row",
    }
    mask = flex_prefill_block_mask(q, k, config=base, **overrides)
    expected = flex_prefill_reference(q, k, base.replace(**overrides)).active
    assert mask.BLOCK_SIZE == (16, 16)
    assert torch.equal(active_from_block_mask(mask), expected)
    assert expected.shape == (1, 2, 10, 13)  # ceil(150 / 16), ceil(200 / 16): block_size was overridden
    untouched = flex_prefill_block_mask(q, k, config=base)
    assert torch.equal(active_from_block_mask(untouched), flex_prefill_reference(q, k, base).active)


def test_none_keywords_switch_off_nullable_fields_only() -> None:
    """``max_budget=None``/``max_density=None`` turn the cap/check off; other ``None`` keep the config."""
    from flexprefill_torch.config import resolve_config

    config = FlexPrefillConfig(gamma=0.8, max_budget=4096, max_density=0.5)
    assert resolve_config(config, max_budget=None).max_budget is None
    assert resolve_config(config, max_density=None).max_density is None
    assert resolve_config(config).max_budget == 4096 and resolve_config(config).max_density == 0.5
    assert resolve_config(config, gamma=None).gamma == 0.8


_DIMS = st.integers(min_value=0, max_value=3)


@given(
    shapes=st.lists(st.lists(_DIMS, min_size=3, max_size=5), min_size=3, max_size=3),
    dtypes=st.lists(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int32]), min_size=3, max_size=3),
    devices=st.lists(st.sampled_from(["cpu", "meta"]), min_size=3, max_size=3),
    scale=st.sampled_from([None, 0.5, 2, -1.0, 0.0, math.inf, math.nan, True]),
    backend=st.sampled_from(["auto", "triton", "reference", "cuda"]),
)
def test_fast_validation_vouches_only_for_valid_input(shapes, dtypes, devices, scale, backend) -> None:
    """The cheap check of the short path passes only inputs the detailed checks pass."""
    from flexprefill_torch.validation import _plainly_valid, check_qk, check_qkv, check_v

    q, k, v = (torch.empty(s, dtype=t, device=d) for s, t, d in zip(shapes, dtypes, devices, strict=True))
    try:
        check_qk(q, k, scale, backend)
        check_v(k, v)
        valid = True
    except (TypeError, ValueError):
        valid = False
    if _plainly_valid(q, k, v, scale, backend):
        assert valid, "the fast check passed input the detailed checks reject"
    if valid:
        check_qkv(q, k, v, scale, backend)
    else:
        with pytest.raises((TypeError, ValueError)):
            check_qkv(q, k, v, scale, backend)


def test_fast_validation_passes_the_common_call() -> None:
    from flexprefill_torch.validation import _plainly_valid

    q, k, v = qkv(dtype=torch.bfloat16)
    assert _plainly_valid(q, k, v, None, "auto")
    assert _plainly_valid(q, k, v, 0.125, "triton")
    assert not _plainly_valid(q, k, v[..., :-1, :], None, "auto")
    assert not _plainly_valid(q, "k", v, None, "auto")


def test_min_seq_len_none_is_the_kernel_default() -> None:
    config = FlexPrefillConfig()
    assert config.min_seq_len is None
    assert FlexPrefillConfig(**config.to_dict()) == config
    assert resolve_config(config, min_seq_len=None) is config  # the keyword's None leaves it as it is
    with pytest.raises(ValueError, match=r"min_seq_len must be None or >= 0, got min_seq_len=-5"):
        FlexPrefillConfig(min_seq_len=-5)
    with pytest.raises(ValueError, match=r"min_seq_len must be an integer, got min_seq_len=1.5"):
        FlexPrefillConfig(min_seq_len=1.5)


def test_unhashable_override_gets_the_named_error() -> None:
    """Overrides are cached by value; an unhashable one still gets the message naming it."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"gamma must be a real number, got gamma=\[0.9\]"):
        flex_prefill_attention(q, k, v, gamma=[0.9])
    with pytest.raises(ValueError, match=r"gamma must be a real number, got gamma=\[0.9\]"):
        resolve_config(None, gamma=[0.9])
    assert resolve_config(None, gamma=0.5) is resolve_config(None, gamma=0.5)  # cached
