"""Mask-build time of the Triton pipeline, per stage, against dense causal SDPA.

Usage (CUDA GPU)::

    python benchmarks/mask_build.py                  # 8k, 32k, 128k
    python benchmarks/mask_build.py --lengths 32768

Shapes: B=1, Hq=32, Hkv=8, D=128, bfloat16, b=128, default config (γ=0.9, τ=0.1,
min_budget=1024). Inputs are synthetic: Gaussian ``q``, ``k``; query head ``h`` is scaled
by ``1 + 3h/(Hq-1)`` so attention ranges from nearly flat (query-aware heads) to peaked
(vertical-slash heads). Each stage is timed alone with ``triton.testing.do_bench``
(median) as a CUDA-graph replay with its inputs precomputed (GPU time, no launch
overhead); "total graph" is the whole build (``triton_block_mask``: selection and index
emission) replayed as one graph, "total eager" the same called from Python (launch and
dispatch overhead included), "public API eager" ``flex_prefill_block_mask(backend="triton")``
(its indices come from ``block_mask_from_active``), "public API idle" the same call timed
alone from an idle GPU (CUDA events, median of 30; ``do_bench`` runs an L2-flush kernel
before each call, which hides part of the host time), "public API host" its host time
(calls queued behind a busy GPU, so only the Python and launch work is timed). "public
API queued" is the build's marginal cost in a model-like loop: 8 rounds of (build, sparse
attention) queued back to back minus 8 rounds of the sparse attention alone (same mask),
per round: the host work of a build overlaps the GPU work of the attention before it, so
what remains is GPU time. Dense:
SDPA(is_causal=True) with the key/value heads expanded to 32 (same FLOPs as GQA).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from flexprefill_torch.attention import run_flex_attention
from flexprefill_torch.benchmark import save_results
from flexprefill_torch.config import FlexPrefillConfig
from flexprefill_torch.kernels.emit import emit_block_indices
from flexprefill_torch.kernels.logits import block_logits
from flexprefill_torch.kernels.pattern import head_pattern
from flexprefill_torch.kernels.pipeline import triton_block_mask, triton_selection
from flexprefill_torch.kernels.pool import pool_blocks
from flexprefill_torch.kernels.representative import representative_attention
from flexprefill_torch.kernels.select import select_blocks
from flexprefill_torch.selection import flex_prefill_block_mask
from flexprefill_torch.timing import cuda_graph_ms, host_ms, paired_median_ms


def make_inputs(length: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0, heads: int = 32,
                kv_heads: int = 8, dim: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic ``q [1, H, L, D]``, ``k, v [1, Hkv, L, D]`` (see module docstring)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, length, dim, device="cuda", generator=gen)
    q = q * torch.linspace(1.0, 4.0, heads, device="cuda")[None, :, None, None]
    k = torch.randn(1, kv_heads, length, dim, device="cuda", generator=gen)
    v = torch.randn(1, kv_heads, length, dim, device="cuda", generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def bench(fn, rep: int = 200) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def stages(q: torch.Tensor, k: torch.Tensor, config: FlexPrefillConfig) -> dict[str, float]:
    """Milliseconds per stage (each replayed alone as a CUDA graph) and of the whole build."""
    b = config.block_size
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    scale = 1.0 / math.sqrt(dim)
    true_blocks, parts, k_pool = representative_attention(q, k, b, scale)
    est, slash, js, flags, vsel, ssel, _ = head_pattern(
        q, k_pool, true_blocks, parts, b, kv_len, scale, config.tau, config.gamma
    )
    q_pool, q_bad = pool_blocks(q, b, scale, flags)
    n_q = q_pool.shape[2]

    def logits_fn():
        return block_logits(q_pool, k_pool, flags, q_len, kv_len, b)

    logits = logits_fn()

    def select_fn():
        return select_blocks(logits, flags, q_bad, true_blocks, slash, vsel, ssel, q_len, kv_len, b, config.gamma,
                             config.min_blocks, -1, False, config.tau > 0)[0]

    active = select_fn()
    out = {
        "representative+pool k": cuda_graph_ms(lambda: representative_attention(q, k, b, scale)),
        "pattern": cuda_graph_ms(lambda: head_pattern(q, k_pool, true_blocks, parts, b, kv_len, scale,
                                                   config.tau, config.gamma)),
        "pool q (query-aware)": cuda_graph_ms(lambda: pool_blocks(q, b, scale, flags)),
        "logits": cuda_graph_ms(logits_fn),
        "select": cuda_graph_ms(select_fn),
        "emit": cuda_graph_ms(lambda: emit_block_indices(active, q_len, kv_len, b)),
    }
    out["sum of stages"] = sum(out.values())
    out["total graph"] = cuda_graph_ms(lambda: triton_block_mask(q, k, config))
    out["total eager"] = bench(lambda: triton_block_mask(q, k, config))
    def public():
        return flex_prefill_block_mask(q, k, config=config, backend="triton")

    out["public API eager"] = bench(public)
    out["public API idle"] = paired_median_ms([public], q.device, repeats=30)[0]
    out["public API host"] = host_ms(public, q.device)
    out["public API queued"] = queued_marginal_ms(q, k, config)
    out["query-aware heads"] = float(((flags & 1) != 0).sum())
    out["density"] = float(active.float().sum() / (heads * n_q * (n_q + 1) / 2))
    return out


def queued_marginal_ms(q: torch.Tensor, k: torch.Tensor, config: FlexPrefillConfig, rounds: int = 8) -> float:
    """Per round: (build + sparse attention) x rounds minus (sparse attention) x rounds, queued."""
    v = torch.randn_like(k)
    mask = flex_prefill_block_mask(q, k, config=config, backend="triton")

    def attention_only():
        for _ in range(rounds):
            run_flex_attention(q, k, v, mask)

    def with_build():
        for _ in range(rounds):
            run_flex_attention(q, k, v, flex_prefill_block_mask(q, k, config=config, backend="triton"))

    times = paired_median_ms([attention_only, with_build], q.device, repeats=10)
    return (times[1] - times[0]) / rounds


def dense_time(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """Median ms of causal SDPA with the key/value heads expanded to the query heads."""
    group = q.shape[1] // k.shape[1]
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return bench(lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True), rep=500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mask_build.json"))
    args = parser.parse_args()
    saved = []
    torch.backends.cuda.matmul.allow_tf32 = False
    configs = {"default": FlexPrefillConfig(), "tau=0 (all VS)": FlexPrefillConfig(tau=0.0)}
    for length in args.lengths:
        q, k, v = make_inputs(length)
        dense = dense_time(q, k, v)
        print(f"\n=== L = {length}: dense SDPA causal {dense:.3f} ms (2% = {0.02 * dense:.3f} ms) ===")
        results = {name: stages(q, k, cfg) for name, cfg in configs.items()}
        saved.append({"seq_len": length, "sdpa_ms": dense, "configs": results})
        print(f"{'stage':22s}" + "".join(f"{name:>20s}" for name in results))
        for key in next(iter(results.values())):
            row = f"{key:22s}"
            for res in results.values():
                value = res[key]
                if key in ("query-aware heads", "density"):
                    row += f"{value:20.3f}"
                else:
                    row += f"{value:9.3f}ms{100 * value / dense:7.2f}%".rjust(20)
            print(row)
        sel = triton_selection(q, k, FlexPrefillConfig())
        print(f"(default config: {int(sel.query_aware.sum())} query-aware heads of {q.shape[1]}, "
              f"{int((~sel.sparse).sum())} dense fallbacks)")
    save_results(args.out, saved)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
