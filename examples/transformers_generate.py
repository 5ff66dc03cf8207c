"""transformers with ``attn_implementation="flex_prefill"``: generate and read diagnostics.

No weights can be downloaded here, so this builds a tiny random Llama from its config;
with a real checkpoint, pass its name to ``from_pretrained`` instead. The prefill runs
FlexPrefill (``min_seq_len=0`` forces the sparse path even for this short prompt), the
decode steps run dense SDPA. At γ = 1 the tokens equal those of the ``sdpa`` model.

    python examples/transformers_generate.py --seq-len 512 --new-tokens 8
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import flexprefill_torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--gamma", type=float, default=1.0)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=256,
        max_position_embeddings=max(4096, 2 * args.seq_len),
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), device=device)
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)

        flexprefill_torch.patch_model(
            model,
            {
                "block_size": 64,
                "flex_prefill_gamma": args.gamma,
                "flex_prefill_min_budget": 128,
                "min_seq_len": 0,
                "max_density": None,
            },
        )
        with flexprefill_torch.collect_diagnostics(model) as log:
            tokens = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
    print("sdpa        :", reference[0, -args.new_tokens :].tolist())
    print("flex_prefill:", tokens[0, -args.new_tokens :].tolist())
    print("same tokens :", torch.equal(reference, tokens))
    for record in log:
        if record.path != "dense":
            print(
                f"layer {record.layer_idx}: path={record.path}, density per head "
                f"{[round(d, 3) for d in record.info.density[0].tolist()]}"
            )


if __name__ == "__main__":
    main()
