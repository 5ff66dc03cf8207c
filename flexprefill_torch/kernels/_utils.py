"""Helpers shared by the Triton kernels: launching, interpreter detection, in-register selection.

The ``@triton.jit`` helpers here work on one row held in registers and mirror the
selection rules of :mod:`flexprefill_torch.reference`:

* :func:`mass_threshold` finds the γ-crossing of ``reference.cumulative_select`` as a
  threshold on the float bits of the scores (non-negative floats order like their int32
  bit patterns): an in-register sort of each row and a float64 running sum.
* :func:`top_count` keeps the ``m`` largest candidates, ties broken by index (the order of
  a stable descending sort), as ``reference.strongest_blocks`` and ``reference.cap_blocks``.

Both work on ``[R, N]`` tiles (``R`` rows at once): under the interpreter every ``tl.sum``
costs milliseconds, so a program handles many rows per reduction.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode
from triton import knobs
from triton.runtime.jit import JITFunction

P = ParamSpec("P")
R = TypeVar("R")


def tracing() -> bool:
    """True while ``torch.compile``/``make_fx`` trace (fake tensors, proxies, functionalization)."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


class _Launcher:
    """``kernel[grid](...)``: a lean direct launch in eager mode, ``wrap_triton`` when traced.

    ``wrap_triton`` makes a launch traceable, but in eager mode it goes through a
    higher-order op on every call; Triton's own ``kernel[grid](...)`` re-derives the
    specialisation of every argument (17–28 µs per launch on the H200 hosts we measured).
    Here the first launch of each specialisation goes through Triton (which compiles or
    finds the kernel); later ones with the same :func:`_specialisation` call the compiled
    kernel directly (6–10 µs): same binary, same arguments. A registered Triton launch hook
    (e.g. a profiler) disables the shortcut.
    """

    MAX_ENTRIES = 512

    def __init__(self, kernel: JITFunction) -> None:
        self.kernel = kernel
        self.traceable = torch.library.wrap_triton(kernel)
        self.compiled: dict[tuple, tuple[Any, tuple]] = {}

    def __getitem__(self, grid: Any) -> Any:
        if tracing():
            return self.traceable[grid]
        return functools.partial(self._launch, tuple(grid))

    def _launch(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        key = _specialisation(torch.cuda.current_device(), args, kwargs)
        entry = self.compiled.get(key)
        if entry is None or _hooks_installed():
            compiled = self.kernel[grid](*args, **kwargs)
            self._remember(key, compiled, len(args), kwargs)
            return
        compiled, tail = entry
        grid = grid + (1,) * (3 - len(grid))
        stream = torch._C._cuda_getCurrentRawStream(key[0])
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *tail)

    def _remember(self, key: tuple, compiled: Any, n_args: int, kwargs: dict[str, Any]) -> None:
        """Cache ``compiled`` with the values of the parameters passed by keyword, in order."""
        names = self.kernel.arg_names[n_args:]
        if compiled is None or any(name not in kwargs for name in names):
            return
        if hasattr(compiled, "result"):  # asynchronous compilation
            compiled = compiled.result()
        if len(self.compiled) >= self.MAX_ENTRIES:
            self.compiled.clear()
        self.compiled[key] = (compiled, tuple(kwargs[name] for name in names))


def _hooks_installed() -> bool:
    """Whether a Triton launch hook is registered (they need Triton's own launch path)."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(hook is not None and bool(getattr(hook, "calls", True)) for hook in hooks)


def _specialisation(device: int, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """A key that fixes everything Triton specialises a launch on.

    The device; per tensor its dtype and 16-byte alignment; every other argument by type
    and exact value (Triton specialises integers on their range, on being 1 and on
    divisibility by 16); the keyword arguments (constexprs, ``num_warps``, ...) by name,
    value and type.
    """
    positional = tuple(
        [(arg.dtype, arg.data_ptr() % 16 == 0) if isinstance(arg, torch.Tensor) else (type(arg), arg) for arg in args]
    )
    return device, positional, tuple(kwargs.items()), tuple(map(type, kwargs.values()))


_LAUNCHERS: dict[int, _Launcher] = {}


def launch(kernel: Any) -> Any:
    """``kernel`` launched with little host overhead, traceable by ``torch.compile`` / ``make_fx``.

    Interpreted kernels (``TRITON_INTERPRET=1``) are returned unchanged: they run eagerly.
    """
    if not isinstance(kernel, JITFunction):
        return kernel
    launcher = _LAUNCHERS.get(id(kernel))
    if launcher is None:
        launcher = _LAUNCHERS[id(kernel)] = _Launcher(kernel)
    return launcher


def register_cap(kernel: Any, registers: int) -> dict[str, int]:
    """Launch options capping ``kernel``'s registers per thread at ``registers`` (``0``: none).

    Short, latency-bound kernels are limited by how many programs fit on an SM; fewer
    registers per thread fit more. Only direct eager launches take the cap: while
    ``torch.compile`` traces, ``wrap_triton`` does not accept the option, and interpreted
    kernels have no registers (the cap changes the speed, never a result).
    """
    if registers <= 0 or tracing() or not isinstance(kernel, JITFunction):
        return {}
    return {"maxnreg": registers}


def device_op(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Register a launcher as the ``torch.library.triton_op`` ``name``.

    The returned function calls the op (a node ``torch.compile`` can trace into) while
    compiling and the launcher itself in eager mode, which skips the dispatcher's
    per-call overhead.
    """

    def register(fn: Callable[P, R]) -> Callable[P, R]:
        op = torch.library.triton_op(name, mutates_args=())(fn)

        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)

        return call

    return register


def interpreting(kernel: Any) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return not isinstance(kernel, JITFunction)


def check_device(x: torch.Tensor, kernel: Any) -> None:
    """Raise a clear error when ``x`` cannot be handled by the Triton kernels."""
    if x.is_cuda or (x.device.type == "cpu" and interpreting(kernel)):
        return
    raise RuntimeError(
        "backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
        f"the flexprefill_torch Triton kernels are imported), got a tensor on {x.device}"
    )


def split_gamma(gamma: float) -> tuple[float, float]:
    """``gamma`` as two float32 values whose float64 sum is ``gamma`` to ~1e-15.

    Triton passes Python floats as float32; the reference compares float64 sums to the
    float64 ``gamma``, so kernels rebuild it as ``hi.to(fp64) + lo.to(fp64)``.
    """
    hi = _to_float32(gamma)
    return hi, _to_float32(gamma - hi)


def _to_float32(value: float) -> float:
    """``value`` rounded to float32 (pure Python: traceable by ``torch.compile``)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def float32_exponent(value: float) -> int:
    """The biased exponent field of ``value`` rounded to float32 (pure Python)."""
    return struct.unpack("I", struct.pack("f", value))[0] >> 23


def next_pow2(n: int, minimum: int = 16) -> int:
    """The smallest power of two ``>= max(n, minimum)`` (``minimum`` a power of two).

    Plain Python: ``triton.next_power_of_2`` is a ``constexpr_function`` in Triton 3.6, whose
    call wrapper costs a few µs of host time, and the launchers call this two dozen times
    per mask build.
    """
    return max(minimum, 1 << (max(int(n), 1) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b`` (plain Python, see :func:`next_pow2`)."""
    return -(-a // b)


@triton.jit
def as_f32(x):
    """A float scalar argument as float32 (``torch.compile`` passes Python floats as float64)."""
    return (x + tl.zeros([], dtype=tl.float32)).to(tl.float32)


@triton.jit
def gamma_f64(gamma_hi, gamma_lo):
    """float64 ``gamma`` from the two float32 halves of :func:`split_gamma`."""
    zero = tl.zeros([], dtype=tl.float64)
    return (gamma_hi + zero) + (gamma_lo + zero)


@triton.jit
def float_key(x):
    """int32 bit pattern of float32 ``x``: ordered like ``x`` for ``x >= 0``."""
    return x.to(tl.float32).to(tl.int32, bitcast=True)


@triton.jit
def mass_threshold(x, cand, base, gamma):
    """Per row, the largest key ``k >= 0`` with ``base + sum(x[cand & key(x) >= k]) >= gamma``.

    Args:
        x: ``[R, N]`` float32 scores, ``>= 0`` where ``cand``; cand: ``[R, N]`` bool
            (``N`` a power of two).
        base: ``[R]`` float64, the mass already taken (forced entries); gamma: float64 scalar.

    Returns ``[R]`` int32 (0 where even all candidates stay below γ; ``0x7FFFFFFF``, above
    every key, where ``base`` alone reaches γ). The entries ``cand & key(x) >= k`` are
    exactly those ``reference.cumulative_select`` takes, up to ties at the crossing value,
    which are all kept here. As the reference: a descending sort of the candidates' keys
    and a float64 running sum; the crossing is the first sorted entry whose running sum
    reaches γ (sorted keys decrease, so it is the largest key that reaches).
    """
    keys = tl.sort(tl.where(cand, float_key(x), -1), dim=1, descending=True)
    mass = tl.where(keys >= 0, keys.to(tl.float32, bitcast=True), 0.0).to(tl.float64)
    reach = (base[:, None] + tl.cumsum(mass, axis=1)) >= gamma
    kappa = tl.maximum(tl.max(tl.where(reach, keys, -1), axis=1), 0)
    return tl.where(base >= gamma, 0x7FFFFFFF, kappa)


@triton.jit
def top_count(key, cand, m):
    """``[R, N]`` bool: per row the ``m`` candidates with the largest ``key`` (all if fewer).

    ``key`` is ``float_key`` of non-negative scores; ``m`` a scalar or ``[R]``. Equal keys
    are taken in increasing index order, as a stable descending sort would.
    """
    # largest k with #{cand & key >= k} >= m, bit by bit from the top
    count = tl.sum((cand & (key >= (1 << 30))).to(tl.int32), axis=1)
    kappa = tl.where(count >= m, 1 << 30, 0)
    for it in range(1, 31):
        trial = kappa | (0x40000000 >> it)
        count = tl.sum((cand & (key >= trial[:, None])).to(tl.int32), axis=1)
        kappa = tl.where(count >= m, trial, kappa)
    above = cand & (key > kappa[:, None])
    room = m - tl.sum(above.to(tl.int32), axis=1)
    tie = cand & (key == kappa[:, None])
    rank = tl.cumsum(tie.to(tl.int32), axis=1)
    return above | (tie & (rank <= room[:, None]))


@triton.jit
def top_few(key, cand, M: tl.constexpr):
    """Same result as :func:`top_count` for a constant ``M``, by ``M`` max-extractions.

    Cheaper than the 31-step bisection of :func:`top_count` when ``m`` is small (the min
    budget is usually a handful of blocks). Each step takes one int32 max per row and
    removes every entry equal to it; the key at which a row's count reaches ``M`` is its
    crossing ``kappa``. Entries above ``kappa`` are kept, and those equal to it in index
    order while there is room (the index scan runs only when some row has a tie to break).
    """
    keys = tl.where(cand, key, -1)
    work = keys
    kappa = tl.full([key.shape[0]], -1, tl.int32)
    count = tl.zeros([key.shape[0]], dtype=tl.int32)
    for _ in tl.static_range(M):
        best = tl.max(work, axis=1)
        live = count < M
        kappa = tl.where(live, best, kappa)
        hit = work == best[:, None]
        count = tl.where(live & (best >= 0), count + tl.sum(hit.to(tl.int32), axis=1), count)
        work = tl.where(hit, -1, work)
    kappa = tl.where(count < M, -1, kappa)  # fewer than M candidates: all of them
    above = cand & (keys > kappa[:, None])
    tie = cand & (keys == kappa[:, None])
    room = M - tl.sum(above.to(tl.int32), axis=1)
    taken = above | tie
    if tl.max(tl.sum(tie.to(tl.int32), axis=1) - room, axis=0) > 0:
        rank = tl.cumsum(tie.to(tl.int32), axis=1)
        taken = above | (tie & (rank <= room[:, None]))
    return taken
