"""Dense attention for short prompts: SDPA, FA4's causal forward and the public call (CUDA GPU).

Usage::

    python benchmarks/dense_crossover.py                 # 512 .. 32k tokens
    python benchmarks/dense_crossover.py --lengths 4096 8192

Where the sparse path cannot pay, ``flex_prefill_attention`` runs dense attention:
FlashAttention-4's causal forward (``flexprefill_torch.fa4``) for calls of at least
``attention.FA4_DENSE_MIN_QUERIES`` queries where FA4 runs, else SDPA. This measures the public call, with the
default kernel and with ``attention_kernel="flex"`` (what a user without FA4 gets),
against plain causal SDPA and FA4 alone. B=1, Hq=32, Hkv=8, D=128, bf16, random inputs.
Each case is timed in alternation with the others (the order rotating, 30 samples), from an idle GPU (host
time counts) and as 8 back-to-back calls (host time overlaps the previous call's GPU
work, as in a model's loop over layers), plus the host time of one call (a loop of calls
queued behind a busy GPU, so only the host work is timed). Prints a table, saves JSON;
asserts nothing about time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flexprefill_torch import flex_prefill_attention
from flexprefill_torch.benchmark import save_results, sdpa_baseline
from flexprefill_torch.fa4 import fa4_causal_attention, fa4_unusable_reason
from flexprefill_torch.timing import host_ms, paired_median_ms

CASES = ("sdpa", "fa4", "public", "public_flex")


def measure(length: int, repeats: int) -> dict[str, object]:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(1, heads, length, 128, device=device, dtype=torch.bfloat16, generator=gen)
        for heads in (32, 8, 8)
    )
    fns = {
        "sdpa": lambda: sdpa_baseline(q, k, v),
        "fa4": lambda: fa4_causal_attention(q, k, v),
        "public": lambda: flex_prefill_attention(q, k, v),
        "public_flex": lambda: flex_prefill_attention(q, k, v, attention_kernel="flex"),
    }
    idle = paired_median_ms(list(fns.values()), device, repeats)
    queued = paired_median_ms(list(fns.values()), device, repeats, calls=8)
    return {
        "L": length,
        "idle_ms": dict(zip(CASES, idle, strict=True)),
        "queued_ms": dict(zip(CASES, queued, strict=True)),
        "host_ms": {name: host_ms(fn) for name, fn in fns.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dense_crossover.json"))
    args = parser.parse_args()
    probe = torch.zeros(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
    reason = fa4_unusable_reason(probe, probe, probe)
    if reason is not None:
        raise SystemExit(f"FA4 cannot run here: {reason}")
    rows = [measure(length, args.repeats) for length in args.lengths]
    print(f"{'L':>6s}  {'idle: sdpa / fa4 / public / public_flex (ms)':>44s}  {'queued: same':>40s}  "
          f"{'host: same':>34s}")
    for row in rows:
        cells = ["  ".join(f"{row[part][c]:8.3f}" for c in CASES) for part in ("idle_ms", "queued_ms", "host_ms")]
        print(f"{row['L']:6d}  " + "    ".join(cells))
    save_results(args.out, rows, repeats=args.repeats)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
