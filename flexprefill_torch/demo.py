"""The main job: FlexPrefill on a structured synthetic long input, against dense attention."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .attention import run_flex_attention, run_sparse_attention
from .benchmark import sdpa_baseline
from .config import FlexPrefillConfig
from .info import FlexPrefillInfo
from .selection import flex_prefill_block_mask
from .synthetic import structured_qkv
from .timing import median_ms


@dataclass
class DemoSettings:
    """Problem size of the demo; :func:`default_settings` picks one per device."""

    seq_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


def default_settings(device: torch.device) -> DemoSettings:
    """CPU: 4k tokens, 8 query heads (under a minute); CUDA: 32k tokens, 32 heads, bf16."""
    if device.type == "cuda":
        return DemoSettings(32768, 32, 8, 128, torch.bfloat16)
    return DemoSettings(4096, 8, 2, 64, torch.float32)


def run_demo(
    device: torch.device,
    settings: DemoSettings,
    config: FlexPrefillConfig,
    backend: str = "auto",
    method: str = "flexprefill",
) -> dict[str, float]:
    """Build the mask, run sparse and dense attention, print a report; returns the figures.

    ``method`` is a key of :data:`flexprefill_torch.methods.MASK_BUILDERS`; methods other
    than FlexPrefill use their default knobs and ``config.block_size``.
    """
    from .methods import MASK_BUILDERS

    q, k, v = structured_qkv(
        1,
        settings.q_heads,
        settings.kv_heads,
        settings.seq_len,
        settings.head_dim,
        block_size=config.block_size,
        dtype=settings.dtype,
        device=device,
    )
    print(
        f"FlexPrefill demo on {device.type}: B=1, Hq={settings.q_heads}, Hkv={settings.kv_heads}, "
        f"L={settings.seq_len}, D={settings.head_dim}, {str(settings.dtype).replace('torch.', '')}, "
        f"method={method}, gamma={config.gamma}, tau={config.tau}, block={config.block_size}, backend={backend}"
    )

    def build():
        if method == "flexprefill":
            return flex_prefill_block_mask(q, k, config=config, backend=backend, return_info=True)
        return MASK_BUILDERS[method](q, k, block_size=config.block_size, return_info=True)

    block_mask, info = build()
    if isinstance(info, FlexPrefillInfo):
        print(info.summary())
    else:
        print(f"method {method}: density per head {[round(d, 3) for d in info.density[0].tolist()]}")
    def attend():  # FlexPrefill masks: FA4 where it runs, else FlexAttention
        if method == "flexprefill":
            return run_sparse_attention(q, k, v, block_mask)
        return run_flex_attention(q, k, v, block_mask)

    begin = time.perf_counter()
    sparse_out = attend()
    if device.type == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - begin
    dense_out = sdpa_baseline(q, k, v)
    error = ((sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm()).item()

    mask_ms = median_ms(build, device)
    sparse_ms = median_ms(attend, device)
    dense_ms = median_ms(lambda: sdpa_baseline(q, k, v), device)
    density = info.density.float().mean().item()
    total_ms = mask_ms + sparse_ms
    patterns = ""
    if isinstance(info, FlexPrefillInfo):
        patterns = f" | query-aware heads {int(info.query_aware.sum())}/{info.query_aware.numel()}"
    print(f"\nmean density {density:.3f}{patterns} | relative output error vs dense {error:.2e}")
    print(f"first sparse call (compiles the attention kernel): {compile_s:.1f} s")
    print(f"{'':24s}{'ms (median)':>12s}")
    print(f"{'mask build':24s}{mask_ms:12.2f}")
    print(f"{'sparse attention':24s}{sparse_ms:12.2f}")
    print(f"{'FlexPrefill total':24s}{total_ms:12.2f}")
    print(f"{'dense SDPA':24s}{dense_ms:12.2f}")
    print(f"speedup over dense SDPA: {dense_ms / total_ms:.2f}x")
    return {
        "density": density,
        "error": error,
        "mask_ms": mask_ms,
        "sparse_ms": sparse_ms,
        "total_ms": total_ms,
        "dense_ms": dense_ms,
    }
