"""The Triton kernels on CPU, under the Triton interpreter (run in a subprocess).

``TRITON_INTERPRET=1`` must be set before the kernels are imported, and must not leak into
this process (other tests compile FlexAttention), so the checks in
``tests/kernels_interp/check_kernels.py`` run in a child pytest with the variable set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "kernels_interp" / "check_kernels.py"


def test_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error::RuntimeWarning", str(CHECKS)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    report = (proc.stdout + proc.stderr)[-12000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], report


def test_triton_backend_needs_cuda_or_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs CPU tensors")
    from flexprefill_torch import flex_prefill_block_mask

    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        flex_prefill_block_mask(q, k, block_size=16, backend="triton")
    flex_prefill_block_mask(q, k, block_size=16, backend="auto")  # the reference on CPU


def test_launch_key_tells_apart_what_triton_specialises_on():
    """The direct-launch cache key changes with every property Triton specialises a kernel on."""
    from flexprefill_torch.kernels._utils import _specialisation

    x = torch.zeros(64, dtype=torch.float32)
    options = {"BLOCK": 128, "num_warps": 4}
    base = _specialisation(0, (x, 16, 0.5), options)
    assert base == _specialisation(0, (torch.ones(64), 16, 0.5), dict(options))  # same dtype, aligned
    variants = [
        _specialisation(1, (x, 16, 0.5), options),  # device
        _specialisation(0, (x[1:], 16, 0.5), options),  # 4-byte offset: not 16-byte aligned
        _specialisation(0, (x.half(), 16, 0.5), options),  # dtype
        _specialisation(0, (x, 17, 0.5), options),  # divisibility by 16
        _specialisation(0, (x, 1, 0.5), options),  # the value 1
        _specialisation(0, (x, True, 0.5), options),  # 1 == True in Python, not for Triton
        _specialisation(0, (x, 16.0, 0.5), options),  # int vs float
        _specialisation(0, (x, 2**31 + 16, 0.5), options),  # int32 vs int64
        _specialisation(0, (x, 16, 0.5), {"BLOCK": 64, "num_warps": 4}),  # constexpr
        _specialisation(0, (x, 16, 0.5), {"BLOCK": 128, "num_warps": 8}),  # launch option
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert _specialisation(0, (x,), {"CAP": True}) != _specialisation(0, (x,), {"CAP": 1})  # constexpr type


def test_register_cap_only_on_direct_launches():
    """The register cap is a launch option of compiled kernels in eager mode only: no cap
    (``0``), no option while ``make_fx``/``torch.compile`` trace, none when interpreted."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from flexprefill_torch.kernels._utils import interpreting, register_cap
    from flexprefill_torch.kernels.select import _rows_kernel

    expected = {} if interpreting(_rows_kernel) else {"maxnreg": 80}
    assert register_cap(_rows_kernel, 80) == expected
    assert register_cap(_rows_kernel, 0) == {}
    seen = []

    def traced(x):
        seen.append(register_cap(_rows_kernel, 80))
        return x + 1

    make_fx(traced)(torch.zeros(2))
    assert seen == [{}]


@given(st.integers(min_value=-4, max_value=2**40), st.sampled_from([1, 16]), st.integers(min_value=1, max_value=2**12))
def test_launch_arithmetic_matches_triton(n: int, minimum: int, divisor: int):
    """The launchers' plain-Python power of two and ceiling division give Triton's values."""
    import triton

    from flexprefill_torch.kernels._utils import cdiv, next_pow2

    assert next_pow2(n, minimum) == max(minimum, triton.next_power_of_2(max(n, 1)))
    assert cdiv(n, divisor) == triton.cdiv(n, divisor)
