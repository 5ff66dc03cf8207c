"""CPU checks of FA4's recorded launches (``flexprefill_torch.fa4._launch``), FA4 stood in for.

FA4's Python entry chooses and checks a compiled kernel on every call; the library
records the kernel launch of the first call per tensor layout and repeats it for later
calls. A stand-in ``flash_attn.cute.interface`` (a Python "kernel" behind a compile cache,
as FA4 has) checks the record-and-repeat logic without a GPU: repeated calls skip the
entry and give the entry's result on new tensors, and launches that cannot be repeated
safely (scratch tensors, two launches, aliased inputs) keep going through the entry.
"""

from __future__ import annotations

import sys
import types
from typing import NamedTuple

import pytest
import torch

from flexprefill_torch import fa4


class _Entry:
    """A stand-in for ``_flash_attn_fwd``: picks a "compiled kernel" from its cache and launches it."""

    def __init__(self, scratch: bool = False, launches: int = 1, hidden_cache: bool = False) -> None:
        if hidden_cache:  # kernels kept where the library cannot see them
            self._kernels: dict = {}
        else:
            self.compile_cache: dict = {}
        self.entries = 0
        self.scratch, self.launches = scratch, launches

    def __call__(self, q, k, v, softmax_scale, causal=False, **_):
        self.entries += 1
        cache = self.compile_cache if hasattr(self, "compile_cache") else self._kernels
        key = (q.dtype, q.shape[-1], causal)
        if key not in cache:
            cache[key] = _kernel
        out = torch.empty(q.shape, dtype=q.dtype)
        scratch = torch.zeros(1) if self.scratch else None
        for _ in range(self.launches):  # v travels inside a named tuple, as FA4's block tensors do
            cache[key](q, k, Aux(v, scratch), out, None, softmax_scale, causal)
        return out, None


class Aux(NamedTuple):
    values: torch.Tensor
    scratch: torch.Tensor | None


def _kernel(q, k, aux, out, lse, scale, causal):
    """A "kernel" on ``[B, L, H, D]`` views: out = scale * q + the mean of v over the keys (GQA-broadcast)."""
    v = aux.values
    out.copy_(scale * q + v.mean(dim=1, keepdim=True).repeat_interleave(q.shape[2] // v.shape[2], dim=2))


def _expected(q, k, v, scale):
    return scale * q + v.mean(dim=2, keepdim=True).repeat_interleave(q.shape[1] // v.shape[1], dim=1)


@pytest.fixture
def entry(monkeypatch):
    def install(**kwargs) -> _Entry:
        stand_in = _Entry(**kwargs)
        interface = types.ModuleType("flash_attn.cute.interface")
        interface._flash_attn_fwd = stand_in
        for name, module in (
            ("flash_attn", types.ModuleType("flash_attn")),
            ("flash_attn.cute", types.ModuleType("flash_attn.cute")),
            ("flash_attn.cute.interface", interface),
        ):
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(fa4, "_PLANS", {})
        return stand_in

    return install


def _qkv(seed: int, length: int = 64, heads: int = 4, kv_heads: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, length, 16, generator=gen) for h in (heads, kv_heads, kv_heads)]


def test_repeated_calls_skip_the_entry_and_match_it(entry) -> None:
    stand_in = entry()
    q, k, v = _qkv(0)
    torch.testing.assert_close(fa4._causal_forward(q, k, v, 0.25), _expected(q, k, v, 0.25))
    assert stand_in.entries == 1 and len(fa4._PLANS) == 1
    assert next(iter(fa4._PLANS.values())) is not None, "a one-launch call with no scratch tensors was not recorded"
    for seed in (1, 2, 3):  # new tensors, same layout: the recorded launch
        q, k, v = _qkv(seed)
        torch.testing.assert_close(fa4._causal_forward(q, k, v, 0.25), _expected(q, k, v, 0.25))
    assert stand_in.entries == 1, "repeated calls went through FA4's entry"
    q, k, v = _qkv(4, length=80)  # a new length: through the entry once more, and recorded
    torch.testing.assert_close(fa4._causal_forward(q, k, v, 0.25), _expected(q, k, v, 0.25))
    fa4._causal_forward(q, k, v, 0.5)  # a new scale is a new key too
    assert stand_in.entries == 3 and len(fa4._PLANS) == 3


@pytest.mark.parametrize("unsafe", [{"scratch": True}, {"launches": 2}])
def test_unsafe_launches_keep_using_the_entry(entry, unsafe) -> None:
    stand_in = entry(**unsafe)
    for seed in range(3):
        q, k, v = _qkv(seed)
        torch.testing.assert_close(fa4._causal_forward(q, k, v, 0.25), _expected(q, k, v, 0.25))
    assert stand_in.entries == 3
    assert list(fa4._PLANS.values()) == [None]


def test_aliased_inputs_are_not_recorded(entry) -> None:
    stand_in = entry()
    q, k, _ = _qkv(0)
    torch.testing.assert_close(fa4._causal_forward(q, k, k, 0.25), _expected(q, k, k, 0.25))
    q, k, v = _qkv(1)  # same layout, distinct k and v: must not reuse a launch that bound v to k
    torch.testing.assert_close(fa4._causal_forward(q, k, v, 0.25), _expected(q, k, v, 0.25))
    assert stand_in.entries == 2


def test_layout_key_tells_alignment_apart() -> None:
    buffer = torch.zeros(2 * 64 * 16 + 1)
    aligned = buffer[: 64 * 16].view(64, 16)
    shifted = buffer[1 : 64 * 16 + 1].view(64, 16)
    assert fa4.layout_key((aligned,)) != fa4.layout_key((shifted,))
    assert fa4.layout_key((aligned,)) == fa4.layout_key((torch.zeros(64, 16),))


def test_an_fa4_without_a_kernel_cache_still_runs(entry) -> None:
    """An FA4 whose entry keeps its kernels elsewhere: every call goes through the entry."""
    stand_in = entry(hidden_cache=True)
    for seed in range(2):
        q, k, v = _qkv(seed)
        torch.testing.assert_close(fa4._causal_forward(q, k, v, 0.25), _expected(q, k, v, 0.25))
    assert stand_in.entries == 2 and list(fa4._PLANS.values()) == [None]
