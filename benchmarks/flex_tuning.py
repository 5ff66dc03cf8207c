"""Choose FlexAttention ``kernel_options`` for the sparse prefill by measurement.

For each candidate it times compiled ``flex_attention`` with a dense causal BlockMask and
with a FlexPrefill mask (structured input, gamma 0.9) at the given lengths, next to
SDPA (B=1, Hq=32, Hkv=8, D=128, bf16), and the relative error of the sparse output
against the same masked attention computed by flex in float32 (the rounding a candidate
adds, e.g. ``PRESCALE_QK``). Prints a table and writes JSON
(default ``benchmarks/results/flex_tuning.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

from flexprefill_torch import block_mask_from_active, flex_prefill_block_mask
from flexprefill_torch.attention import dense_causal_attention
from flexprefill_torch.layout import BlockLayout
from flexprefill_torch.synthetic import structured_qkv
from flexprefill_torch.timing import median_ms

CANDIDATES: dict[str, dict | None] = {
    "default": None,
    "m128n128w8s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "m128n128w8s2tma": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "USE_TMA": True},
    "m128n128w8s2tma_safe": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "USE_TMA": True,
                             "ROWS_GUARANTEED_SAFE": True},
    "m128n128w8s2tma_safe_prescale": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2,
                                      "USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True},
    "m128n128w8s2tma_prescale": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "USE_TMA": True,
                                 "PRESCALE_QK": True},
    "m128n128w8s3tma": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
    "m128n64w8s3tma": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "USE_TMA": True},
    "m128n64w8s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "m128n64w4s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "m64n128w4s3": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
}


def bench_length(length: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time every candidate on one structured input of ``length`` tokens; print rows."""
    q, k, v = structured_qkv(1, 32, 8, length, 128, dtype=torch.bfloat16, device=device)
    layout = BlockLayout(length, length, 128)
    dense_mask = block_mask_from_active(layout.visible(device).expand(1, 32, -1, -1), layout)
    sparse_mask, info = flex_prefill_block_mask(q, k, gamma=0.9, return_info=True)
    sdpa_ms = median_ms(lambda: dense_causal_attention(q, k, v), device, args.repeats)
    torch._dynamo.reset()
    exact = torch.compile(flex_attention, dynamic=True)(
        q.float(), k.float(), v.float(), block_mask=sparse_mask, enable_gqa=True
    )
    rows = []
    for name in args.candidates:
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=True)
        options = CANDIDATES[name]
        try:
            dense_ms, sparse_ms = (
                median_ms(
                    lambda mask=mask, flex=flex, options=options: flex(
                        q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options
                    ),
                    device, args.repeats,
                )
                for mask in (dense_mask, sparse_mask)
            )
            out = flex(q, k, v, block_mask=sparse_mask, enable_gqa=True, kernel_options=options)
        except Exception as error:  # a candidate the compiler rejects is reported, not fatal
            print(f"{name:>24s} {length:7d} failed: {type(error).__name__}: {str(error)[:120]}")
            continue
        error = ((out.float() - exact).norm() / exact.norm()).item()
        row = {"candidate": name, "options": options, "seq_len": length, "sdpa_ms": sdpa_ms,
               "flex_dense_ms": dense_ms, "flex_sparse_ms": sparse_ms, "density": info.density.mean().item(),
               "sparse_rel_error_vs_fp32": error}
        rows.append(row)
        print(f"{name:>24s} {length:7d} {sdpa_ms:8.2f} {dense_ms:10.2f} {sparse_ms:11.2f} {row['density']:7.3f}"
              f" {error:9.2e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/flex_tuning.json"))
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    print(f"{'candidate':>24s} {'L':>7s} {'sdpa':>8s} {'flex_dense':>10s} {'flex_sparse':>11s} {'density':>7s}"
          f" {'err/fp32':>9s}")
    for length in args.lengths:
        rows.extend(bench_length(length, args, device))
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
