"""FlexPrefill vs dense attention: time, density and error over sequence lengths.

Run on a GPU (defaults: B=1, Hq=32, Hkv=8, D=128, bf16, 4k..128k, structured and random
inputs, gamma 0.9 and 0.95). ``--small`` gives a CPU-sized run. Prints a table and writes
JSON (default ``benchmarks/results/attention.json``). It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from flexprefill_torch import FlexPrefillConfig, block_mask_from_active, flex_prefill_block_mask
from flexprefill_torch.attention import dense_causal_attention, run_flex_attention
from flexprefill_torch.layout import BlockLayout
from flexprefill_torch.synthetic import structured_qkv
from flexprefill_torch.timing import median_ms


def make_inputs(workload: str, length: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    if workload == "structured":
        return structured_qkv(1, args.q_heads, args.kv_heads, length, args.head_dim, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    shape_q, shape_kv = (1, args.q_heads, length, args.head_dim), (1, args.kv_heads, length, args.head_dim)
    return (
        torch.randn(shape_q, generator=gen, device=device, dtype=dtype),
        torch.randn(shape_kv, generator=gen, device=device, dtype=dtype),
        torch.randn(shape_kv, generator=gen, device=device, dtype=dtype),
    )


def bench_length(
    workload: str, length: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> list[dict]:
    """Time dense SDPA, dense flex and FlexPrefill at every gamma for one input; print rows."""
    q, k, v = make_inputs(workload, length, args, device, dtype)
    layout = BlockLayout(length, length, 128)
    dense_mask = block_mask_from_active(layout.visible(device).expand(1, args.q_heads, -1, -1), layout)
    dense = dense_causal_attention(q, k, v)
    sdpa_ms = median_ms(lambda: dense_causal_attention(q, k, v), device, args.repeats)
    flex_ms = median_ms(lambda: run_flex_attention(q, k, v, dense_mask), device, args.repeats)
    rows = []
    for gamma in args.gammas:
        config = FlexPrefillConfig(gamma=gamma, tau=args.tau, min_seq_len=0)
        block_mask, info = flex_prefill_block_mask(q, k, config=config, backend=args.backend, return_info=True)
        out = run_flex_attention(q, k, v, block_mask)
        rel_err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
        build_ms = median_ms(
            lambda config=config: flex_prefill_block_mask(q, k, config=config, backend=args.backend),
            device, args.repeats,
        )
        sparse_ms = median_ms(lambda bm=block_mask: run_flex_attention(q, k, v, bm), device, args.repeats)
        total = build_ms + sparse_ms
        row = {
            "workload": workload, "seq_len": length, "gamma": gamma, "sdpa_ms": sdpa_ms,
            "dense_flex_ms": flex_ms, "mask_build_ms": build_ms, "sparse_attention_ms": sparse_ms,
            "total_ms": total, "density": info.density.mean().item(), "rel_error": rel_err,
            "speedup_vs_sdpa": sdpa_ms / total,
        }
        rows.append(row)
        print(
            f"{workload:>10s} {length:7d} {gamma:5.2f} {sdpa_ms:9.2f} {flex_ms:9.2f} {build_ms:8.2f}"
            f" {sparse_ms:9.2f} {total:9.2f} {row['density']:7.3f} {rel_err:8.2e} {row['speedup_vs_sdpa']:7.2f}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--workloads", nargs="+", default=["structured", "random"], choices=["structured", "random"])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="CPU-sized: 1k and 2k tokens, 8/2 heads, D=64, fp32")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.small:
        args.lengths, args.q_heads, args.kv_heads, args.head_dim, args.repeats = [1024, 2048], 8, 2, 64, 3
    rows = []
    header = (
        f"{'workload':>10s} {'L':>7s} {'gamma':>5s} {'sdpa':>9s} {'flex':>9s} {'build':>8s} {'sparse':>9s}"
        f" {'total':>9s} {'density':>7s} {'rel_err':>8s} {'speedup':>7s}"
    )
    print(header)
    for workload in args.workloads:
        for length in args.lengths:
            rows.extend(bench_length(workload, length, args, device, dtype))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "backend": args.backend,
        "shape": {"batch": 1, "q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim},
        "dtype": str(dtype),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
