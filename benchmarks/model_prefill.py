"""Prefill of a Llama-shaped model: ``attn_implementation="sdpa"`` against ``"flex_prefill"``.

Usage (CUDA GPU)::

    python benchmarks/model_prefill.py                       # 512 .. 32k tokens, 4 layers
    python benchmarks/model_prefill.py --lengths 1024 4096 --layers 2
    python benchmarks/model_prefill.py --batch 4 --padding 0.5   # left-padded batches

What a user switching a model to FlexPrefill sees at each length: the forward of the base
model (no LM head) with random weights and random tokens, Llama-3-8B layer shapes (hidden
4096, 32 query heads, 8 key/value heads, head size 128, MLP 14336), bf16, batch 1 by default. Four
models with the same weights: transformers' SDPA attention, ``flex_prefill`` with the
default config, and ``flex_prefill`` with ``attention_kernel="flex"`` (what a user without
FA4 gets), and a second SDPA model as a control: its ratio to the first is the noise floor
of the comparison. Random tokens give no attention structure, so the long prompts test the dense
forecast, not the sparse speedup (``benchmarks/attention.py`` measures that). Each forward
is timed in alternation with the others (the order rotating) from an idle GPU (host time
counts), median of ``--repeats``. Prints a table, saves JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModel, LlamaConfig

import flexprefill_torch
from flexprefill_torch import FlexPrefillConfig
from flexprefill_torch.benchmark import save_results
from flexprefill_torch.timing import paired_median_ms

CASES = ("sdpa", "sdpa_again", "flex_prefill", "flex_prefill_flex")
SWITCHED = CASES[2:]


def build_models(layers: int, max_len: int) -> dict[str, torch.nn.Module]:
    """The models of :data:`CASES`, with the same random weights.

    Each model gets its own config object: ``from_config`` keeps the one it is given, and
    switching the attention of one model would switch every model sharing it.
    """
    models = {}
    for name in CASES:
        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=layers,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=32000,
            max_position_embeddings=max_len,
        )
        torch.manual_seed(0)
        model = AutoModel.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
        models[name] = model.to("cuda").eval()
    flexprefill_torch.patch_model(models["flex_prefill"])
    flexprefill_torch.patch_model(models["flex_prefill_flex"], FlexPrefillConfig(attention_kernel="flex"))
    implementations = [model.config._attn_implementation for model in models.values()]
    if implementations != ["sdpa", "sdpa", "flex_prefill", "flex_prefill"]:
        raise RuntimeError(f"the models' attention implementations are {implementations}")
    return models


def left_padded(batch: int, length: int, padding: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``[batch, length]`` and the attention mask of rows left-padded by ``padding · length · r / (batch - 1)``."""
    ids = torch.randint(0, 32000, (batch, length), device="cuda", generator=torch.Generator("cuda").manual_seed(length))
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : round(padding * length * row / (batch - 1))] = 0
    return ids, mask


def layer_paths(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, object]:
    """The path each layer's attention took in one forward, and the mean density of the sparse ones."""
    with flexprefill_torch.collect_diagnostics(model) as log, torch.no_grad():
        model(**inputs)
    paths = [record.path for record in log]
    sparse = [float(record.info.density.float().mean()) for record in log if record.path == "flex_prefill"]
    return {"paths": {path: paths.count(path) for path in sorted(set(paths))},
            "sparse_density": sum(sparse) / len(sparse) if sparse else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--padding", type=float, default=0.0, help="left padding of the last row, a fraction of L")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/model_prefill.json"))
    args = parser.parse_args()
    models = build_models(args.layers, max(args.lengths))
    rows = []
    for length in args.lengths:
        ids, mask = left_padded(args.batch, length, args.padding)
        inputs = {"input_ids": ids} if args.padding == 0 else {"input_ids": ids, "attention_mask": mask}
        real = mask.bool()[..., None]
        with torch.no_grad():
            outs = {name: model(**inputs).last_hidden_state.float() * real for name, model in models.items()}
            fns = [lambda model=model, inputs=inputs: model(**inputs) for model in models.values()]
            times = paired_median_ms(fns, torch.device("cuda"), args.repeats)
        scale = outs["sdpa"].norm()
        error = {name: float((out - outs["sdpa"]).norm() / scale) for name, out in outs.items() if name != "sdpa"}
        paths = {name: layer_paths(models[name], inputs) for name in SWITCHED}
        rows.append({"L": length, "ms": dict(zip(CASES, times, strict=True)), "relative_error": error,
                     "layers": paths})
    print(f"{'L':>6s}  {'sdpa ms':>9s}  {'control':>7s}  {'flex_prefill':>12s}  {'ratio':>6s}  {'no FA4':>9s}  "
          f"{'ratio':>6s}  paths")
    for row in rows:
        ms = row["ms"]
        paths = "  ".join(f"{name}: {row['layers'][name]['paths']}" for name in SWITCHED)
        print(f"{row['L']:6d}  {ms['sdpa']:9.3f}  {ms['sdpa_again'] / ms['sdpa']:7.3f}  {ms['flex_prefill']:12.3f}  "
              f"{ms['flex_prefill'] / ms['sdpa']:6.3f}  {ms['flex_prefill_flex']:9.3f}  "
              f"{ms['flex_prefill_flex'] / ms['sdpa']:6.3f}  {paths}")
    save_results(args.out, rows, layers=args.layers, repeats=args.repeats, batch=args.batch, padding=args.padding)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
