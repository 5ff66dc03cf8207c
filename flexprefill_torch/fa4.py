"""FlashAttention-4 (``flash_attn.cute``) as the attention kernel for FlexPrefill masks.

Optional. With the ``flash-attn-4`` package installed (``pip install
'flexprefill-torch[fa4]'``) on a Hopper or Blackwell GPU, :func:`flex_prefill_attention`
runs FA4's block-sparse forward on the mask's own block indices instead of compiled
FlexAttention: the same attention (``kv_num_blocks``/``kv_indices`` are the blocks cut by
the causal boundary, which get the token-level causal rule; ``full_kv_*`` the blocks
wholly below it), computed by a faster kernel (``docs/benchmarks.md``). Its dense causal
forward replaces SDPA where a large call falls back to dense attention.

Both are registered as ``torch.library`` custom ops with fake implementations, so a
``torch.compile(fullgraph=True)`` caller traces through them; eager calls go to FA4
directly (the custom-op dispatch costs tens of µs of host time). FA4 compiles a kernel the
first time it meets a configuration (seconds); sequence lengths are runtime values and
do not recompile it. Forward only: calls that need gradients use FlexAttention.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .kernels._utils import tracing

BLOCK_SIZES = (128,)
"""Mask block sizes run with FA4 (its 128 × 128 tiles on Hopper; the one measured)."""

COMPUTE_CAPABILITIES = (9, 10)
"""GPU generations (major compute capability) FA4 is used on: Hopper and Blackwell."""


_INSTALLED: list[bool] = []  # filled on the first call


@torch.compiler.assume_constant_result  # a constant to torch.compile, not a graph break
def fa4_installed() -> bool:
    """Whether ``flash_attn.cute`` (the ``flash-attn-4`` package) can be imported (looked up once)."""
    if not _INSTALLED:
        try:
            _INSTALLED.append(importlib.util.find_spec("flash_attn.cute") is not None)
        except (ImportError, ValueError):  # no flash_attn at all, or a broken parent package
            _INSTALLED.append(False)
    return _INSTALLED[0]


def fa4_version() -> str | None:
    """The installed ``flash-attn-4`` version, or None."""
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None


def fa4_unusable_reason(q: Tensor, k: Tensor, v: Tensor, block_size: int | None = None) -> str | None:
    """``None`` if FA4 can run this attention call, else why not (one short sentence).

    ``block_size``: the mask's block size (``None`` for dense attention). Cheap: it runs
    on every attention call that could use FA4.
    """
    if not q.is_cuda:
        return f"FA4 needs CUDA tensors, got device {q.device}"
    if not fa4_installed():
        return "flash-attn-4 is not installed (pip install 'flexprefill-torch[fa4]')"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"FA4 needs float16 or bfloat16 inputs, got {q.dtype}"
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    if head_dim % 16 or head_dim > 128 or value_dim != head_dim:
        return f"FA4 is used for head_dim in 16..128 (a multiple of 16, same for v), got {head_dim} and {value_dim}"
    if block_size is not None and block_size not in BLOCK_SIZES:
        return f"FA4 runs masks of block size {BLOCK_SIZES}, got {block_size}"
    if (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled():
        return "FA4 is used for inference only (an input requires grad)"
    major = _compute_capability(q.get_device())[0]
    if major not in COMPUTE_CAPABILITIES:
        return f"FA4 is used on compute capability {COMPUTE_CAPABILITIES}.x GPUs, this one is {major}.x"
    return None


@torch.compiler.assume_constant_result
@functools.cache
def _compute_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def _causal_mask_mod() -> Callable:
    """The token-level causal rule as a CuTe DSL ``mask_mod``: key ``t`` is visible to query ``i`` iff
    ``t <= i + Lk - Lq`` (queries are the last ``Lq`` positions; the lengths are runtime values)."""
    import cutlass.cute as cute

    @cute.jit
    def causal(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        return kv_idx <= q_idx + (seqlen_info.seqlen_k - seqlen_info.seqlen_q)

    return causal


def _bshd(x: Tensor) -> Tensor:
    """``[B, H, L, D]`` -> the ``[B, L, H, D]`` view FA4 takes."""
    return x.transpose(1, 2)


class _Slot(int):
    """In a launch template: the position of a call's tensor (inputs, then outputs)."""


_LEAF_TYPES = (type(None), bool, int, float, str)
_MAX_PLANS = 64


@dataclass(frozen=True)
class _LaunchPlan:
    """One recorded launch of an FA4 kernel, to repeat with other tensors of the same layout."""

    kernel: Callable[..., object]  # FA4's compiled kernel (a TVM-FFI function)
    args: tuple[object, ...]  # its arguments, the call's tensors replaced by _Slot
    filled: tuple[int, ...]  # positions in args that hold a _Slot, or a tuple with one
    outputs: tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype], ...]  # shape, stride, dtype

    def run(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        device = inputs[0].device
        outputs = tuple(
            torch.empty_strided(shape, stride, dtype=dtype, device=device) for shape, stride, dtype in self.outputs
        )
        tensors = inputs + outputs
        args = list(self.args)
        for position in self.filled:
            slot = args[position]
            args[position] = tensors[slot] if type(slot) is _Slot else _fill(slot, tensors)
        self.kernel(*args)
        return outputs


def _fill(template: object, tensors: tuple[Tensor, ...]) -> object:
    if isinstance(template, _Slot):
        return tensors[template]
    if isinstance(template, tuple):
        items = [_fill(item, tensors) for item in template]
        return type(template)(*items) if hasattr(template, "_fields") else tuple(items)
    return template


def _template(arg: object, slots: dict[tuple, int]) -> object:
    """``arg`` with its tensors replaced by their slots; raises ``LookupError`` where it cannot."""
    if isinstance(arg, Tensor):
        return _Slot(slots[_identity(arg)])
    if isinstance(arg, tuple):
        items = [_template(item, slots) for item in arg]
        return type(arg)(*items) if hasattr(arg, "_fields") else tuple(items)
    if isinstance(arg, _LEAF_TYPES):
        return arg
    raise LookupError(f"unrecognised FA4 kernel argument {type(arg).__name__}")


def _identity(t: Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def _has_slot(template: object) -> bool:
    return isinstance(template, _Slot) or (isinstance(template, tuple) and any(map(_has_slot, template)))


def _plan(calls: list[tuple[Callable, tuple]], tensors: tuple[Tensor, ...], num_outputs: int) -> _LaunchPlan | None:
    """A plan from the kernel launches recorded in one FA4 call, or None where replaying it is unsafe.

    Safe means: exactly one launch, and every tensor it got is one of the call's inputs or
    outputs (no scratch buffers, semaphores, copies or views FA4 made on the way).
    """
    slots = {_identity(t): i for i, t in enumerate(tensors)}
    if len(calls) != 1 or len(slots) != len(tensors):  # two launches, or aliased inputs
        return None
    kernel, args = calls[0]
    try:
        template = tuple(_template(arg, slots) for arg in args)
    except LookupError:
        return None
    outputs = tuple((tuple(t.shape), t.stride(), t.dtype) for t in tensors[len(tensors) - num_outputs :])
    filled = tuple(i for i, arg in enumerate(template) if _has_slot(arg))
    return _LaunchPlan(kernel, template, filled, outputs)


class _RecordingCache:
    """Stands in for FA4's kernel cache during one call and records the kernels it launches."""

    def __init__(self, cache: object, calls: list[tuple[Callable, tuple]]) -> None:
        self._cache, self._calls = cache, calls

    def __contains__(self, key: object) -> bool:
        return key in self._cache

    def __setitem__(self, key: object, kernel: Callable) -> None:
        self._cache[key] = kernel

    def __getitem__(self, key: object) -> Callable:
        kernel = self._cache[key]

        def launch(*args: object) -> object:
            self._calls.append((kernel, args))
            return kernel(*args)

        return launch


_PLANS: dict[tuple, _LaunchPlan | None] = {}


def _launch(key: tuple, inputs: tuple[Tensor, ...], call: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """``call()`` (an FA4 call on ``inputs`` returning its output tensors), cheaply when repeated.

    FA4's Python entry spends about 70 µs of host time per call choosing and checking its
    kernel; its compiled kernel itself takes about 12 µs to launch. The first call under
    ``key`` (which must pin down every shape, stride, alignment, dtype and scalar the
    kernel choice depends on) runs ``call`` and records the launch; later calls repeat it
    with the new tensors, when :func:`_plan` found that safe.
    """
    plan = _PLANS.get(key, False)
    if plan is False:
        from flash_attn.cute.interface import _flash_attn_fwd

        calls: list[tuple[Callable, tuple]] = []
        cache = getattr(_flash_attn_fwd, "compile_cache", None)  # None: an FA4 that works otherwise
        if cache is not None:
            _flash_attn_fwd.compile_cache = _RecordingCache(cache, calls)
        try:
            outputs = call()
        finally:
            if cache is not None:
                _flash_attn_fwd.compile_cache = cache
        if len(_PLANS) >= _MAX_PLANS:
            del _PLANS[next(iter(_PLANS))]
        _PLANS[key] = _plan(calls, inputs + outputs, len(outputs))
        return outputs
    return call() if plan is None else plan.run(inputs)


def layout_key(tensors: tuple[Tensor, ...]) -> tuple:
    """What a launch depends on in ``tensors``: shapes, strides, dtypes and 16-byte alignment."""
    return tuple((t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0) for t in tensors)


def _block_sparse_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    partial_num: Tensor,
    partial_indices: Tensor,
    full_num: Tensor,
    full_indices: Tensor,
    scale: float,
    block_size: int,
) -> tuple[Tensor, Tensor]:
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import _flash_attn_fwd  # the entry torch's FLASH backend calls

    q, k, v = _detached(_bshd(q), _bshd(k), _bshd(v))
    blocks = (partial_num, partial_indices, full_num, full_indices)

    def call() -> tuple[Tensor, Tensor]:
        sparse = BlockSparseTensorsTorch(*blocks, block_size=(block_size, block_size))
        out, lse = _flash_attn_fwd(
            q, k, v, softmax_scale=scale, mask_mod=_causal_mask_mod(), block_sparse_tensors=sparse, return_lse=True
        )[:2]
        return out, lse

    inputs = (q, k, v, *blocks)
    out, lse = _launch(("block_sparse", scale, block_size, q.device, *layout_key(inputs)), inputs, call)
    return _bshd(out), lse


def _causal_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    from flash_attn.cute.interface import _flash_attn_fwd

    inputs = _detached(_bshd(q), _bshd(k), _bshd(v))

    def call() -> tuple[Tensor]:
        return (_flash_attn_fwd(*inputs, softmax_scale=scale, causal=True)[0],)

    return _bshd(_launch(("causal", scale, q.device, *layout_key(inputs)), inputs, call)[0])


def _detached(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors, detached where they require grad (the compiled kernel takes no autograd tensors)."""
    return tuple(t.detach() if t.requires_grad else t for t in tensors)


# Custom ops for tracing (torch.compile, fake tensors); eager calls skip their dispatch (~50 µs)
_block_sparse_op = torch.library.custom_op(
    "flexprefill::fa4_block_sparse_attention", _block_sparse_forward, mutates_args=()
)
_causal_op = torch.library.custom_op("flexprefill::fa4_causal_attention", _causal_forward, mutates_args=())


@_block_sparse_op.register_fake
def _(q, k, v, partial_num, partial_indices, full_num, full_indices, scale, block_size):
    batch, heads, q_len, _ = q.shape
    out = q.new_empty(batch, q_len, heads, v.shape[-1]).transpose(1, 2)
    return out, q.new_empty(batch, heads, q_len, dtype=torch.float32)


@_causal_op.register_fake
def _(q, k, v, scale):
    batch, heads, q_len, _ = q.shape
    return q.new_empty(batch, q_len, heads, v.shape[-1]).transpose(1, 2)


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def fa4_block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Causal attention on the active blocks of a FlexPrefill ``block_mask`` with FA4.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (GQA: ``Hq % Hkv == 0``); float16/bfloat16, CUDA.
        block_mask: built by :func:`.block_mask.block_mask_from_active` (its partial blocks
            get the causal rule, as its ``mask_mod`` does).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``out [B, Hq, Lq, D]`` (a view of a ``[B, Lq, Hq, D]`` tensor) and the log-sum-exp
        ``[B, Hq, Lq]`` float32 (natural log), as ``flex_attention(..., return_lse=True)``.
    """
    forward = _block_sparse_op if tracing() else _block_sparse_forward
    return forward(
        q,
        k,
        v,
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
        _scale(q, scale),
        block_mask.BLOCK_SIZE[1],
    )


def fa4_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Dense causal attention with FA4 (query ``i`` sees keys ``<= Lk - Lq + i``); shapes as above."""
    forward = _causal_op if tracing() else _causal_forward
    return forward(q, k, v, _scale(q, scale))
