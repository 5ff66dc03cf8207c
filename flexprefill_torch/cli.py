"""Command line ``flexprefill`` (also ``python -m flexprefill_torch``): demo, bench, visualize."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import FlexPrefillConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gamma", type=float, default=0.9, help="coverage threshold γ in (0, 1] (default 0.9)"
    )
    parser.add_argument(
        "--tau", type=float, default=0.1, help="Jensen-Shannon threshold τ >= 0 (default 0.1)"
    )
    parser.add_argument(
        "--block-size", type=int, default=128, help="mask block size: 16..256, power of 2 (default 128)"
    )
    parser.add_argument(
        "--min-budget", type=int, default=1024, help="min tokens per query-block row (default 1024)"
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "reference", "triton"),
        default="auto",
        help="mask backend (default auto)",
    )


def _add_shape_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--seq-len", type=_positive, default=None, help="tokens (default: 4096 CPU, 32768 GPU)"
    )
    parser.add_argument(
        "--q-heads", type=_positive, default=None, help="query heads (default: 8 CPU, 32 GPU)"
    )
    parser.add_argument(
        "--kv-heads", type=_positive, default=None, help="key/value heads (default: 2 CPU, 8 GPU)"
    )
    parser.add_argument(
        "--head-dim", type=_positive, default=None, help="head size >= 32 (default: 64 CPU, 128 GPU)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="default: float32 CPU, bfloat16 GPU"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="flexprefill", description="FlexPrefill sparse prefill on PyTorch FlexAttention."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run FlexPrefill on a structured synthetic input and compare with dense attention",
        description="Builds a synthetic long input with sinks, vertical and slash lines and "
        "query-dependent blocks, runs FlexPrefill and dense attention, and prints per-head "
        "patterns, density, output error and timings. Sized to finish in under a minute on "
        "CPU; larger on a GPU.",
    )
    _add_shape_options(demo)
    _add_config_options(demo)
    demo.add_argument(
        "--method",
        choices=("flexprefill", "flashprefill", "streaming", "vertical_slash", "xattention"),
        default="flexprefill",
        help="mask builder (default flexprefill; the others use their default knobs, see docs/methods.md)",
    )

    bench = commands.add_parser(
        "bench",
        help="time FlexPrefill against dense SDPA and dense FlexAttention over lengths",
        description="Measures dense SDPA, dense FlexAttention, mask build, sparse attention, "
        "density and relative error for each length, workload and gamma; prints a table "
        "and saves JSON. Defaults: GPU sizes (4k..128k, B=1, Hq=32, Hkv=8, D=128, bf16).",
    )
    bench.add_argument("--lengths", type=_positive, nargs="+", default=None, help="sequence lengths")
    bench.add_argument("--workloads", nargs="+", choices=("structured", "random"), default=None)
    bench.add_argument("--gammas", type=float, nargs="+", default=None, help="γ values (default 0.9 0.95)")
    bench.add_argument("--repeats", type=_positive, default=None, help="timed runs per measurement (median)")
    bench.add_argument("--small", action="store_true", help="CPU-sized: 1k and 2k tokens, 8/2 heads, D=64")
    bench.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    bench.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default: benchmarks/results/attention.json; attention_small.json with --small)",
    )

    visualize = commands.add_parser(
        "visualize",
        help="draw block masks of chosen heads and a layer x head map of density and pattern",
        description="Runs FlexPrefill on structured synthetic inputs and saves two PNGs: "
        "masks.png (the active blocks of the chosen heads) and layers.png (density, D_JS "
        "and pattern of every head for --layers inputs drawn with different seeds, standing "
        "in for the layers of a model).",
    )
    _add_shape_options(visualize)
    _add_config_options(visualize)
    visualize.add_argument(
        "--heads", type=int, nargs="+", default=None, help="query heads to draw (default: up to 8)"
    )
    visualize.add_argument(
        "--layers", type=_positive, default=8, help="synthetic 'layers' in layers.png (default 8)"
    )
    visualize.add_argument("--out-dir", type=Path, default=Path("."), help="folder for the PNGs (default .)")
    visualize.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a local transformers checkpoint folder: draw layers.png from one prefill of "
        "--seq-len random tokens through it (attn_implementation='flex_prefill') instead of "
        "synthetic layers",
    )
    return parser


def _settings(args: argparse.Namespace, device: torch.device):
    from .demo import default_settings

    settings = default_settings(device)
    for name in ("seq_len", "q_heads", "kv_heads", "head_dim"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.dtype:
        settings.dtype = _DTYPES[args.dtype]
    return settings


def _config(args: argparse.Namespace) -> FlexPrefillConfig:
    return FlexPrefillConfig(
        gamma=args.gamma, tau=args.tau, block_size=args.block_size, min_budget=args.min_budget, min_seq_len=0
    )


def _visualize_model(args: argparse.Namespace, device: torch.device) -> None:
    """layers.png from the diagnostics of one prefill through a local checkpoint."""
    from transformers import AutoModelForCausalLM

    from .integrations.transformers import collect_diagnostics, patch_model
    from .visualize import plot_layer_heatmap

    if not args.model.is_dir():
        raise ValueError(f"--model must be a local checkpoint folder, got --model {args.model}")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to(device).eval()
    patch_model(model, _config(args))
    seq_len = args.seq_len or 4096
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    with torch.no_grad(), collect_diagnostics(model) as log:
        model(ids, use_cache=False)
    infos = [records[0].info for _, records in sorted(log.by_layer().items(), key=lambda item: item[0] or 0)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_layer_heatmap(infos, args.out_dir / "layers.png")
    print(log.summary())
    print(f"saved {args.out_dir / 'layers.png'}")


def _run_visualize(args: argparse.Namespace, device: torch.device) -> None:
    from tqdm import tqdm

    from .selection import flex_prefill_block_mask
    from .synthetic import structured_qkv
    from .visualize import plot_block_masks, plot_layer_heatmap

    settings, config = _settings(args, device), _config(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    infos = []
    for layer in tqdm(range(args.layers), desc="layers", unit="layer"):
        q, k, _ = structured_qkv(
            1,
            settings.q_heads,
            settings.kv_heads,
            settings.seq_len,
            settings.head_dim,
            block_size=config.block_size,
            dtype=settings.dtype,
            device=device,
            seed=layer,
        )
        block_mask, info = flex_prefill_block_mask(
            q, k, config=config, backend=args.backend, return_info=True
        )
        infos.append(info)
        if layer == 0:
            heads = args.heads if args.heads is not None else list(range(min(8, settings.q_heads)))
            plot_block_masks(block_mask, [(0, h) for h in heads], info, args.out_dir / "masks.png")
    plot_layer_heatmap(infos, args.out_dir / "layers.png")
    print(f"saved {args.out_dir / 'masks.png'} and {args.out_dir / 'layers.png'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flexprefill`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .benchmark import BenchSettings, default_results_path, run_benchmark

        settings = BenchSettings.small() if args.small else BenchSettings()
        for name in ("lengths", "workloads", "gammas", "repeats"):
            if getattr(args, name) is not None:
                setattr(settings, name, getattr(args, name))
        settings.backend = args.backend
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        run_benchmark(settings, args.out or default_results_path(args.small), device)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA GPU is available")
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(device, _settings(args, device), _config(args), args.backend, args.method)
        elif args.model is not None:
            _visualize_model(args, device)
        else:
            _run_visualize(args, device)
    except (ValueError, TypeError, NotImplementedError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
