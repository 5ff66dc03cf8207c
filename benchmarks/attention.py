"""FlexPrefill vs dense attention over sequence lengths (B=1, Hq=32, Hkv=8, D=128, bf16).

Columns: dense SDPA, dense flex, mask build, sparse attention, total (build + sparse,
forced sparse), density, relative output error vs dense, speedup; then ``auto``: the
public ``flex_prefill_attention`` with the default crossover rules, the path it took and
its time over SDPA. Structured and random inputs, gamma 0.9 and 0.95.
``--small`` is CPU-sized. Same as ``flexprefill bench``. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexprefill_torch.benchmark import BenchSettings, default_results_path, run_benchmark


def main() -> None:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=defaults.lengths)
    parser.add_argument(
        "--workloads", nargs="+", default=defaults.workloads, choices=["structured", "random"]
    )
    parser.add_argument("--gammas", type=float, nargs="+", default=defaults.gammas)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--small", action="store_true", help="CPU-sized: 1k and 2k tokens, 8/2 heads, D=64")
    parser.add_argument("--out", type=Path, default=None, help="default: results/attention.json (attention_small.json with --small)")
    args = parser.parse_args()
    settings = (
        BenchSettings.small() if args.small else BenchSettings(lengths=args.lengths, repeats=args.repeats)
    )
    settings.workloads, settings.gammas, settings.backend = args.workloads, args.gammas, args.backend
    if not args.small:
        settings.lengths = args.lengths
    run_benchmark(settings, args.out or default_results_path(args.small))


if __name__ == "__main__":
    main()
