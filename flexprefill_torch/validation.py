"""Input checks shared by the public entry points (shape, dtype and device only: no host sync)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "reference", "triton")


def check_qk(q: Tensor, k: Tensor, scale: float | None, backend: str) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument when ``q``/``k`` are unusable."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims [batch, heads, seq_len, head_dim], got {name}.shape={tuple(x.shape)}"
            )
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {name}.dtype={x.dtype}")
        if 0 in x.shape:
            raise ValueError(f"{name} must not be empty, got {name}.shape={tuple(x.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share a dtype, got q.dtype={q.dtype} and k.dtype={k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got q.device={q.device} and k.device={k.device}")
    (qb, qh, ql, qd), (kb, kh, kl, kd) = q.shape, k.shape
    if qb != kb:
        raise ValueError(f"q and k must share the batch size, got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    if qd != kd:
        raise ValueError(f"q and k must share head_dim, got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    if qh % kh != 0:
        raise ValueError(f"query heads must be a multiple of key heads (GQA), got q heads={qh}, k heads={kh}")
    if ql > kl:
        raise ValueError(
            f"queries are the last positions of the keys, so q_len <= kv_len is required, got q_len={ql}, kv_len={kl}"
        )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or scale == float("inf")):
        raise ValueError(f"scale must be None or a positive finite float, got scale={scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")


def check_v(k: Tensor, v: Tensor) -> None:
    """Raise when ``v`` does not pair with ``k``."""
    if not isinstance(v, Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 4:
        raise ValueError(f"v must have 4 dims [batch, heads, seq_len, head_dim], got v.shape={tuple(v.shape)}")
    if v.dtype != k.dtype:
        raise TypeError(f"v must share the dtype of k, got v.dtype={v.dtype} and k.dtype={k.dtype}")
    if v.device != k.device:
        raise ValueError(f"v must be on the device of k, got v.device={v.device} and k.device={k.device}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must match k in batch, heads and seq_len, got v.shape={tuple(v.shape)}, k.shape={tuple(k.shape)}"
        )


def check_qkv(q: Tensor, k: Tensor, v: Tensor, scale: float | None, backend: str) -> None:
    """:func:`check_qk` and :func:`check_v` in one, cheap for valid input.

    The detailed checks (and their messages) run only when :func:`_plainly_valid` cannot
    vouch for the inputs: on short prompts the host time of the checks is a measurable
    share of the whole call.
    """
    if not _plainly_valid(q, k, v, scale, backend):
        check_qk(q, k, scale, backend)
        check_v(k, v)


def _plainly_valid(q: Tensor, k: Tensor, v: Tensor, scale: float | None, backend: str) -> bool:
    """A sufficient (not necessary) condition for ``check_qk`` and ``check_v`` to pass."""
    try:
        (qb, qh, ql, qd), (kb, kh, kl, kd), (vb, vh, vl, vd) = q.shape, k.shape, v.shape
        dtype = q.dtype
    except (AttributeError, TypeError, ValueError):  # not tensors, or not 4 dims
        return False
    return (
        isinstance(q, Tensor)
        and isinstance(k, Tensor)
        and isinstance(v, Tensor)
        and dtype in SUPPORTED_DTYPES
        and dtype == k.dtype == v.dtype
        and q.device == k.device == v.device
        and qb == kb == vb > 0
        and qd == kd > 0
        and vd > 0
        and kh == vh > 0
        and qh % kh == 0
        and qh > 0
        and 0 < ql <= kl == vl
        and (scale is None or (type(scale) is float and 0.0 < scale < math.inf))
        and backend in BACKENDS
    )
