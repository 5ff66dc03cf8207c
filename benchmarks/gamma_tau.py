"""How γ and τ trade density against error (and time, on a GPU) on the structured workload.

Prints a markdown table (one row per (γ, τ)) and writes JSON (default
``benchmarks/results/gamma_tau.json``). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flexprefill_torch import FlexPrefillConfig, flex_prefill_block_mask
from flexprefill_torch.attention import dense_causal_attention, run_flex_attention
from flexprefill_torch.synthetic import structured_qkv
from flexprefill_torch.timing import median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq-len", type=int, default=None, help="default: 8192 CPU, 65536 GPU")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.8, 0.85, 0.9, 0.95, 0.97, 1.0])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gamma_tau.json"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    length = args.seq_len or (65536 if cuda else 8192)
    heads, kv_heads, dim = (32, 8, 128) if cuda else (8, 2, 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = structured_qkv(1, heads, kv_heads, length, dim, dtype=dtype, device=device)
    dense = dense_causal_attention(q, k, v).float()
    sdpa_ms = median_ms(lambda: dense_causal_attention(q, k, v), device) if cuda else None
    rows = []
    print(f"structured input: L={length}, Hq={heads}, Hkv={kv_heads}, D={dim}, {dtype}, {device.type}")
    print("| γ | τ | query-aware heads | mean density | relative error | total / SDPA time |")
    print("|---|---|---|---|---|---|")
    for gamma in args.gammas:
        for tau in args.taus:
            config = FlexPrefillConfig(gamma=gamma, tau=tau, min_seq_len=0)
            block_mask, info = flex_prefill_block_mask(q, k, config=config, return_info=True)
            out = run_flex_attention(q, k, v, block_mask).float()
            row = {
                "gamma": gamma,
                "tau": tau,
                "seq_len": length,
                "query_aware_fraction": info.query_aware.float().mean().item(),
                "density": info.density.mean().item(),
                "rel_error": ((out - dense).norm() / dense.norm()).item(),
            }
            if cuda:
                build_ms = median_ms(
                    lambda config=config: flex_prefill_block_mask(q, k, config=config), device
                )
                attn_ms = median_ms(lambda bm=block_mask: run_flex_attention(q, k, v, bm), device)
                row["time_ratio_vs_sdpa"] = (build_ms + attn_ms) / sdpa_ms
            rows.append(row)
            ratio = f"{row['time_ratio_vs_sdpa']:.2f}" if cuda else "n/a (CPU)"
            print(
                f"| {gamma} | {tau} | {row['query_aware_fraction']:.2f} | {row['density']:.3f} | "
                f"{row['rel_error']:.2e} | {ratio} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device.type, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
