"""A custom, training-free inference loop with ``flex_prefill_block_mask``.

A toy stack of attention layers (random weights) prefills a long prompt in chunks, the
way a serving loop with a KV cache does: each chunk's queries attend to every key so far
(``Lq <= Lk``). Every layer builds its own FlexPrefill mask and runs compiled
FlexAttention with it. At the end the output is compared with dense causal attention.

    python examples/custom_loop.py                    # CPU-sized
    python examples/custom_loop.py --seq-len 65536    # on a GPU
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention.flex_attention import flex_attention

from flexprefill_torch import FlexPrefillConfig, dense_causal_attention, flex_prefill_block_mask
from flexprefill_torch.synthetic import structured_qkv

flex = torch.compile(flex_attention, dynamic=True)  # compiled: eager flex ignores sparsity


def prefill(q, k, v, config: FlexPrefillConfig, chunk: int):
    """Chunked prefill of one layer; returns the output and the densities of each chunk."""
    outputs, densities = [], []
    for start in range(0, q.shape[-2], chunk):
        end = min(start + chunk, q.shape[-2])
        q_chunk, k_seen, v_seen = q[..., start:end, :], k[..., :end, :], v[..., :end, :]
        block_mask, info = flex_prefill_block_mask(q_chunk, k_seen, config=config, return_info=True)
        outputs.append(flex(q_chunk, k_seen, v_seen, block_mask=block_mask, enable_gqa=True))
        densities.append(info.density.mean().item())
    return torch.cat(outputs, dim=-2), densities


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk length")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--gamma", type=float, default=0.9)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = FlexPrefillConfig(gamma=args.gamma, tau=0.1, block_size=64, min_budget=256)
    for layer in range(args.layers):
        q, k, v = structured_qkv(
            1, 4, 2, args.seq_len, 64, block_size=64, dtype=dtype, device=device, seed=layer
        )
        out, densities = prefill(q, k, v, config, args.chunk)
        dense = dense_causal_attention(q, k, v)
        error = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
        shown = ", ".join(f"{d:.2f}" for d in densities)
        print(f"layer {layer}: chunk densities [{shown}], relative error vs dense {error:.2e}")


if __name__ == "__main__":
    main()
