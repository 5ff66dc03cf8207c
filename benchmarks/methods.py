"""Sparse-prefill methods side by side: density, error and time on one BlockMask path.

For FlexPrefill (``flex_prefill_block_mask``) and every method of
``flexprefill_torch.methods`` (FlashPrefill, StreamingLLM, fixed-budget vertical-slash,
XAttention), and a sweep of each method's main knob, on the structured synthetic workload
(``flexprefill_torch.synthetic.structured_qkv``) this measures:

* ``density``: active / causally visible blocks (mean over heads);
* ``rel_error``: ``‖out - dense‖ / ‖dense‖`` against ``dense_causal_attention`` (SDPA);
* ``mask_build_ms``: building the BlockMask; ``attention_ms``: compiled ``run_flex_attention``;
* ``total_ms``: build + attention (medians of ``flexprefill_torch.timing.median_ms``).

GPU defaults: 32k and 128k tokens, B=1, Hq=32, Hkv=8, D=128, bf16, block 128. ``--small``
gives a CPU-sized run (2k and 4k tokens, 8/2 heads, D=64, fp32, block 64, knobs scaled to
the length). Prints a table, writes JSON (default ``benchmarks/results/methods.json``) and a
Pareto plot of relative error against total time (``--plot``, default next to the JSON).
It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flexprefill_torch import (
    BlockLayout,
    block_mask_from_active,
    flash_prefill_block_mask,
    flex_prefill_block_mask,
    streaming_block_mask,
    vertical_slash_block_mask,
    xattention_block_mask,
)
from flexprefill_torch.attention import dense_causal_attention, run_flex_attention
from flexprefill_torch.benchmark import save_results
from flexprefill_torch.synthetic import structured_qkv
from flexprefill_torch.timing import median_ms

METHODS = ("flexprefill", "flashprefill", "streaming", "vertical_slash", "xattention")


def sweeps(small: bool) -> dict[str, list[dict[str, Any]]]:
    """The knob settings of every method (``small``: scaled to 2k-4k tokens)."""
    if small:
        streaming = [{"sink_tokens": 64, "local_tokens": n} for n in (256, 512, 1024)]
        vertical_slash = [
            {"vertical_size": v, "slash_size": s, "last_q": 64} for v, s in ((32, 128), (64, 384), (128, 768))
        ]
    else:
        streaming = [{"sink_tokens": 1000, "local_tokens": n} for n in (2000, 4000, 8000, 16000)]
        vertical_slash = [
            {"vertical_size": v, "slash_size": s, "last_q": 64}
            for v, s in ((500, 2000), (1000, 6096), (2000, 12000))
        ]
    return {
        "flexprefill": [{"gamma": g} for g in (0.8, 0.9, 0.95, 0.99)],
        "flashprefill": [{"alpha": a} for a in (0.04, 0.08, 0.12, 0.18, 0.3)],
        "streaming": streaming,
        "vertical_slash": vertical_slash,
        "xattention": [{"threshold": t, "stride": 8} for t in (0.8, 0.9, 0.95)]
        + [{"threshold": 0.9, "stride": 16}],
    }


def builder(method: str, knobs: dict[str, Any], block_size: int, backend: str) -> Callable[..., Any]:
    """``(q, k) -> (BlockMask, info)`` for one method and knob setting."""
    if method == "flexprefill":
        return lambda q, k: flex_prefill_block_mask(
            q, k, block_size=block_size, backend=backend, return_info=True, **knobs
        )
    functions = {
        "flashprefill": flash_prefill_block_mask,
        "streaming": streaming_block_mask,
        "vertical_slash": vertical_slash_block_mask,
        "xattention": xattention_block_mask,
    }
    extra = {"backend": backend} if method in ("flashprefill", "xattention") else {}
    fn = functions[method]
    return lambda q, k: fn(q, k, block_size=block_size, return_info=True, **knobs, **extra)


def bench_length(
    length: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> list[dict]:
    """Dense baselines and every (method, knob) setting for one sequence length; prints rows."""
    q, k, v = structured_qkv(
        1,
        args.q_heads,
        args.kv_heads,
        length,
        args.head_dim,
        block_size=args.block_size,
        dtype=dtype,
        device=device,
    )
    dense = dense_causal_attention(q, k, v).float()
    sdpa_ms = median_ms(lambda: dense_causal_attention(q, k, v), device, args.repeats)
    layout = BlockLayout(length, length, args.block_size)
    dense_mask = block_mask_from_active(layout.visible(device).expand(1, args.q_heads, -1, -1), layout)
    flex_ms = median_ms(lambda: run_flex_attention(q, k, v, dense_mask), device, args.repeats)
    print(f"--- L={length}: dense SDPA {sdpa_ms:.2f} ms, dense flex {flex_ms:.2f} ms")
    rows = []
    for method in args.methods:
        for knobs in sweeps(args.small)[method]:
            build = builder(method, knobs, args.block_size, args.backend)
            block_mask, info = build(q, k)
            out = run_flex_attention(q, k, v, block_mask).float()
            rel_err = ((out - dense).norm() / dense.norm()).item()
            # The calls above were the warm-up (compilation included); --small skips another.
            build_ms = median_ms(lambda build=build: build(q, k), device, args.repeats, args.warmup)
            attn_ms = median_ms(
                lambda bm=block_mask: run_flex_attention(q, k, v, bm), device, args.repeats, args.warmup
            )
            total = build_ms + attn_ms
            knob_text = ",".join(f"{name}={value}" for name, value in knobs.items())
            row = {
                "seq_len": length,
                "method": method,
                "knobs": knobs,
                "density": info.density.mean().item(),
                "rel_error": rel_err,
                "mask_build_ms": build_ms,
                "attention_ms": attn_ms,
                "total_ms": total,
                "sdpa_ms": sdpa_ms,
                "dense_flex_ms": flex_ms,
                "speedup_vs_sdpa": sdpa_ms / total,
            }
            rows.append(row)
            print(
                f"{length:7d} {method:>14s} {knob_text:<40s} {row['density']:7.3f} {rel_err:9.2e}"
                f" {build_ms:9.2f} {attn_ms:9.2f} {total:9.2f} {row['speedup_vs_sdpa']:7.2f}"
            )
            del block_mask, out
    return rows


def pareto_plot(rows: list[dict], path: Path) -> None:
    """Relative error against total time, one marker series per method, one panel per length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    lengths = sorted({row["seq_len"] for row in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    markers = dict(zip(METHODS, ("o", "s", "^", "D", "v"), strict=True))
    for ax, length in zip(axes[0], lengths, strict=True):
        subset = [row for row in rows if row["seq_len"] == length]
        for method in METHODS:
            points = [(r["total_ms"], r["rel_error"]) for r in subset if r["method"] == method]
            if points:  # joined in sweep order, so the line follows the knob
                ax.plot(*zip(*points, strict=True), marker=markers[method], linestyle=":", label=method)
        ax.axvline(subset[0]["sdpa_ms"], color="gray", linestyle="--", label="dense SDPA")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("total time (mask build + attention), ms")
        ax.set_ylabel("relative error vs dense")
        ax.set_title(f"{length // 1024}k tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--small", action="store_true", help="CPU-sized: 2k and 4k tokens, 8/2 heads, D=64, fp32"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/methods.json"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    args = parser.parse_args()
    args.warmup = 0 if args.small else 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.small:
        args.lengths, args.q_heads, args.kv_heads, args.head_dim = [2048, 4096], 8, 2, 64
        args.block_size, args.repeats = 64, 2
        dtype = torch.float32
    print(
        f"{'L':>7s} {'method':>14s} {'knobs':<40s} {'density':>7s} {'rel_err':>9s}"
        f" {'build':>9s} {'attn':>9s} {'total':>9s} {'speedup':>7s}"
    )
    rows = []
    for length in args.lengths:
        rows.extend(bench_length(length, args, device, dtype))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save_results(
        args.out,
        rows,
        device,
        backend=args.backend,
        workload="structured_qkv",
        shape={"batch": 1, "q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim},
        block_size=args.block_size,
        dtype=str(dtype),
        repeats=args.repeats,
    )
    print(f"saved {args.out}")
    pareto_plot(rows, args.plot or args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
