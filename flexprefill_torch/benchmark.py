"""FlexPrefill against dense attention: time, density and error over sequence lengths.

Shared by ``benchmarks/attention.py`` and ``flexprefill bench``. It measures and asserts
nothing; rows are printed as a table and saved as JSON.
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention import (
    flex_prefill_attention,
    is_short_prompt,
    run_flex_attention,
    run_sparse_attention,
)
from .block_mask import block_mask_from_active
from .config import FlexPrefillConfig
from .fa4 import fa4_causal_attention, fa4_unusable_reason, fa4_version
from .info import FlexPrefillInfo
from .layout import BlockLayout
from .selection import flex_prefill_block_mask
from .synthetic import structured_qkv
from .timing import median_ms, paired_median_ms

HEADER = (
    f"{'workload':>10s} {'L':>7s} {'gamma':>5s} {'sdpa':>9s} {'flex':>9s} {'fa4':>9s} {'build':>8s}"
    f" {'sp_flex':>9s} {'sp_fa4':>9s} {'total':>9s} {'density':>7s} {'rel_err':>8s} {'speedup':>7s}"
    f" {'auto':>9s} {'auto_path':>14s} {'auto/sdpa':>9s} {'queued':>7s}"
    f" {'flex/sdpa':>9s} {'queued':>9s}"
)
QUEUED_BELOW = 65536
"""``flex_prefill_attention`` is timed in alternation with SDPA (so clock and thermal drift
affect both alike) from an idle device and, below this length, also as :data:`QUEUED_CALLS`
back-to-back calls (host work hidden behind the device work of the previous call, as in a
model's loop over layers); from it on the two columns are the same measurement."""
QUEUED_CALLS = 8


def default_results_path(small: bool) -> Path:
    """Where a run saves its JSON: the GPU results, or a CPU-sized run's own file (not kept in git)."""
    return Path("benchmarks/results") / ("attention_small.json" if small else "attention.json")


def sdpa_baseline(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal ``F.scaled_dot_product_attention`` as a user calls it (``Lq == Lk``): the baseline.

    Not :func:`~flexprefill_torch.dense_causal_attention`, which skips SDPA's dispatch
    where it can and so is faster than the baseline it would be measured against.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@dataclass
class BenchSettings:
    """What to measure. Times are median milliseconds over ``repeats`` runs."""

    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768, 65536, 131072])
    workloads: list[str] = field(default_factory=lambda: ["structured", "random"])
    gammas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    tau: float = 0.1
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    backend: str = "auto"
    repeats: int = 10

    @classmethod
    def small(cls) -> BenchSettings:
        """A CPU-sized run: 1k and 2k tokens, 8/2 heads, D=64."""
        return cls(lengths=[1024, 2048], q_heads=8, kv_heads=2, head_dim=64, repeats=3)


def make_inputs(
    workload: str, length: int, settings: BenchSettings, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``structured`` (see :mod:`flexprefill_torch.synthetic`) or ``random`` normal q, k, v."""
    if workload == "structured":
        return structured_qkv(
            1, settings.q_heads, settings.kv_heads, length, settings.head_dim, dtype=dtype, device=device
        )
    if workload != "random":
        raise ValueError(f"workload must be 'structured' or 'random', got workload={workload!r}")
    gen = torch.Generator(device=device).manual_seed(0)
    shape_q = (1, settings.q_heads, length, settings.head_dim)
    shape_kv = (1, settings.kv_heads, length, settings.head_dim)
    return (
        torch.randn(shape_q, generator=gen, device=device, dtype=dtype),
        torch.randn(shape_kv, generator=gen, device=device, dtype=dtype),
        torch.randn(shape_kv, generator=gen, device=device, dtype=dtype),
    )


def bench_one(
    workload: str, length: int, settings: BenchSettings, device: torch.device, dtype: torch.dtype
) -> list[dict]:
    """Dense SDPA, dense flex, dense FA4 and FlexPrefill at every gamma for one input: one row per gamma.

    The sparse attention is timed with compiled FlexAttention and, where it can run, FA4;
    ``total``, ``rel_error`` and ``speedup`` use the kernel ``attention_kernel="auto"`` picks.
    """
    q, k, v = make_inputs(workload, length, settings, device, dtype)
    layout = BlockLayout(length, length, 128)
    dense_mask = block_mask_from_active(layout.visible(device).expand(1, settings.q_heads, -1, -1), layout)
    dense = sdpa_baseline(q, k, v)
    sdpa_ms = median_ms(lambda: sdpa_baseline(q, k, v), device, settings.repeats)
    flex_ms = median_ms(lambda: run_flex_attention(q, k, v, dense_mask), device, settings.repeats)
    fa4 = fa4_unusable_reason(q, k, v, 128) is None
    fa4_ms = median_ms(lambda: fa4_causal_attention(q, k, v), device, settings.repeats) if fa4 else None
    rows = []
    for gamma in settings.gammas:
        config = FlexPrefillConfig(gamma=gamma, tau=settings.tau, min_seq_len=0)
        block_mask, info = flex_prefill_block_mask(
            q, k, config=config, backend=settings.backend, return_info=True
        )
        build_ms = median_ms(
            lambda config=config: flex_prefill_block_mask(q, k, config=config, backend=settings.backend),
            device,
            settings.repeats,
        )
        flex_sparse_ms = median_ms(
            lambda bm=block_mask: run_flex_attention(q, k, v, bm), device, settings.repeats
        )
        fa4_sparse_ms = None
        if fa4:
            fa4_sparse_ms = median_ms(
                lambda bm=block_mask: run_sparse_attention(q, k, v, bm, kernel="fa4"), device, settings.repeats
            )
        out = run_sparse_attention(q, k, v, block_mask)  # the kernel "auto" picks
        rel_err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
        sparse_ms = fa4_sparse_ms if fa4 else flex_sparse_ms
        total = build_ms + sparse_ms
        # the public call with the default crossover rules (min_seq_len, max_density)
        auto_config = FlexPrefillConfig(gamma=gamma, tau=settings.tau)
        _, auto_info = flex_prefill_attention(
            q, k, v, config=auto_config, backend=settings.backend, return_info=True
        )
        def auto(c: FlexPrefillConfig = auto_config) -> torch.Tensor:
            return flex_prefill_attention(q, k, v, config=c, backend=settings.backend)

        # the differences are of the size of host overhead and drift: alternation, more samples when short
        fns = [lambda: sdpa_baseline(q, k, v), auto]
        if fa4:  # the same call without FA4 (FlexAttention and SDPA's kernels): what users without it get
            flex_config = auto_config.replace(attention_kernel="flex")
            fns.append(lambda c=flex_config: auto(c))
        repeats = 3 * settings.repeats if length < QUEUED_BELOW else 2 * settings.repeats
        idle = paired_median_ms(fns, device, repeats)
        queued = paired_median_ms(fns, device, repeats, calls=QUEUED_CALLS) if length < QUEUED_BELOW else idle
        rows.append(
            {
                "workload": workload,
                "seq_len": length,
                "gamma": gamma,
                "kernel": "fa4" if fa4 else "flex",
                "sdpa_ms": sdpa_ms,
                "dense_flex_ms": flex_ms,
                "dense_fa4_ms": fa4_ms,
                "mask_build_ms": build_ms,
                "sparse_flex_ms": flex_sparse_ms,
                "sparse_fa4_ms": fa4_sparse_ms,
                "sparse_attention_ms": sparse_ms,
                "total_ms": total,
                "density": info.density.mean().item(),
                "rel_error": rel_err,
                "speedup_vs_sdpa": sdpa_ms / total,
                "auto_ms": idle[1],
                "auto_path": _path(auto_info, is_short_prompt(q, k, v, auto_config)),
                "auto_vs_sdpa": idle[1] / idle[0],
                "auto_vs_sdpa_queued": queued[1] / queued[0],
                "flex_kernel_vs_sdpa": idle[2] / idle[0] if fa4 else None,
                "flex_kernel_vs_sdpa_queued": queued[2] / queued[0] if fa4 else None,
            }
        )
    return rows


def _path(info: FlexPrefillInfo, short: bool) -> str:
    """Which attention ``flex_prefill_attention`` ran, from its info (``short``: the prompt was)."""
    if info.sparse:
        return "sparse"
    if info.predicted_density is not None:
        return "dense:forecast"
    return "dense:short" if short else "dense:density"


def _ms(value: float | None, width: int = 9) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.2f}"


def format_row(row: dict) -> str:
    """One table line under :data:`HEADER`."""
    return (
        f"{row['workload']:>10s} {row['seq_len']:7d} {row['gamma']:5.2f} {row['sdpa_ms']:9.2f}"
        f" {row['dense_flex_ms']:9.2f} {_ms(row['dense_fa4_ms'])} {row['mask_build_ms']:8.2f}"
        f" {row['sparse_flex_ms']:9.2f} {_ms(row['sparse_fa4_ms'])} {row['total_ms']:9.2f}"
        f" {row['density']:7.3f} {row['rel_error']:8.2e} {row['speedup_vs_sdpa']:7.2f}"
        f" {row['auto_ms']:9.2f} {row['auto_path']:>14s} {row['auto_vs_sdpa']:9.3f} {row['auto_vs_sdpa_queued']:7.3f}"
        f" {_ratio(row['flex_kernel_vs_sdpa'])} {_ratio(row['flex_kernel_vs_sdpa_queued'])}"
    )


def _ratio(value: float | None) -> str:
    return f"{'-':>9s}" if value is None else f"{value:9.3f}"


def run_benchmark(
    settings: BenchSettings, out: Path | None, device: torch.device | None = None, progress: bool = True
) -> list[dict]:
    """Measure every (workload, length, gamma), print the table, save JSON to ``out``."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases: Iterable[tuple[str, int]] = [(w, n) for w in settings.workloads for n in settings.lengths]
    write = print
    if progress:
        from tqdm import tqdm

        cases, write = tqdm(list(cases), desc="bench", unit="input", leave=False), tqdm.write
    rows: list[dict] = []
    write(HEADER)
    for workload, length in cases:
        for row in bench_one(workload, length, settings, device, dtype):
            rows.append(row)
            write(format_row(row))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if out is not None:
        save_results(out, rows, device, dtype=str(dtype), settings=asdict(settings))
        print(f"saved {out}")
    return rows


def save_results(out: Path, rows: list, device: torch.device | None = None, **meta: object) -> None:
    """Write ``{"meta": ..., "rows": rows}`` as JSON to ``out`` (its folder is created).

    The meta holds the date, the device's name (the current CUDA device when ``device``
    is None), the torch and FA4 versions, then ``meta``.
    """
    device = device or torch.device("cuda")
    header = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "flash_attn_4": fa4_version(),
        **meta,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": header, "rows": rows}, indent=1))
