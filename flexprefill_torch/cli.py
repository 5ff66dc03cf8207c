"""Command line: ``flexprefill demo`` (also ``python -m flexprefill_torch demo``)."""

from __future__ import annotations

import argparse
import sys

import torch

from .config import FlexPrefillConfig
from .demo import default_settings, run_demo

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexprefill", description="FlexPrefill sparse prefill on PyTorch FlexAttention."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run FlexPrefill on a structured synthetic input and compare with dense attention",
        description="Builds a synthetic long input with sinks, vertical and slash lines and "
        "query-dependent blocks, runs FlexPrefill and dense attention, and prints per-head "
        "patterns, density, output error and timings. CPU by default-sized to finish in "
        "under a minute; larger on a GPU.",
    )
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--seq-len", type=int, default=None, help="tokens (default: 4096 CPU, 32768 GPU)")
    demo.add_argument("--q-heads", type=int, default=None, help="query heads (default: 8 CPU, 32 GPU)")
    demo.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: 2 CPU, 8 GPU)")
    demo.add_argument("--head-dim", type=int, default=None, help="head size, >= 32 (default: 64 CPU, 128 GPU)")
    demo.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: float32 CPU, bfloat16 GPU")
    demo.add_argument("--gamma", type=float, default=0.9, help="coverage threshold γ in (0, 1] (default 0.9)")
    demo.add_argument("--tau", type=float, default=0.1, help="Jensen-Shannon threshold τ >= 0 (default 0.1)")
    demo.add_argument("--block-size", type=int, default=128, help="mask block size (default 128)")
    demo.add_argument("--min-budget", type=int, default=1024, help="min tokens per query block (default 1024)")
    demo.add_argument(
        "--backend", choices=("auto", "reference", "triton"), default="auto", help="mask backend (default auto)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA GPU is available")
    settings = default_settings(device)
    for name in ("seq_len", "q_heads", "kv_heads", "head_dim"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
            setattr(settings, name, value)
    if args.dtype:
        settings.dtype = _DTYPES[args.dtype]
    try:
        config = FlexPrefillConfig(
            gamma=args.gamma, tau=args.tau, block_size=args.block_size, min_budget=args.min_budget, min_seq_len=0
        )
        run_demo(device, settings, config, args.backend)
    except (ValueError, TypeError, NotImplementedError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
