"""Launch-parameter sweep of the mask pipeline's Triton kernels (CUDA GPU).

Usage::

    python benchmarks/kernel_tuning.py                    # 32k and 128k
    python benchmarks/kernel_tuning.py --lengths 32768 --out results.json

For every candidate of each kernel's ``TUNING`` dict (``kernels/representative.py``,
``kernels/pool.py``, ``kernels/logits.py``, ``kernels/pattern.py``, ``kernels/select.py``,
``kernels/emit.py``) it replays the kernel as a
CUDA graph (GPU time, no launch overhead), checks that the outputs equal those of the
current defaults, prints a table and saves JSON. Shapes: B=1, Hq=32, Hkv=8, D=128, bf16,
the structured workload (``--workload gaussian``: the input of ``mask_build.py``), default
config (γ=0.9, τ=0.1). It measures and asserts nothing about time; the chosen defaults
are written in the modules.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch
from mask_build import make_inputs

from flexprefill_torch.benchmark import save_results
from flexprefill_torch.config import FlexPrefillConfig
from flexprefill_torch.kernels import emit, logits, pattern, pool, representative, select
from flexprefill_torch.layout import BlockLayout
from flexprefill_torch.synthetic import structured_qkv
from flexprefill_torch.timing import cuda_graph_ms

CANDIDATES = {
    "representative": (
        representative.TUNING,
        {"tile_elems": [8192, 16384], "programs": [512, 1024, 2048], "num_warps": [4], "num_stages": [2, 3]},
    ),
    "pool": (
        pool.TUNING,
        {"load_elems": [8192, 16384, 32768], "num_warps": [4, 8], "dot_sum": [0, 1], "blocks_per_prog": [1, 2, 4]},
    ),
    "logits": (
        logits.TUNING,
        {"block_m": [32, 64], "block_n": [32, 64], "block_k": [32, 64, 128], "num_warps": [4, 8],
         "num_stages": [1, 3]},
    ),
    "mass": (representative.TUNING, {"mass_cells": [2048, 4096, 8192, 16384], "mass_warps": [2, 4, 8]}),
    "pattern": (pattern.TUNING, {"chunk_cells": [8192, 16384, 32768], "num_warps": [4, 8, 16]}),
    "emit": (emit.TUNING, {"row_cells": [256, 1024, 2048, 4096], "num_warps": [1, 2, 4, 8]}),
    "select": (
        select.TUNING,
        {"row_cells": [512, 1024], "num_warps": [2, 4], "row_registers": [0, 80, 128]},
    ),
    "threshold": (
        select.TUNING,
        {"keep_round": [2, 3], "kept_cells": [8, 16384], "list_cells": [512, 1024]},
    ),
    "scan": (
        select.TUNING,
        {"pass_cells": [2048, 4096, 8192], "pass_rows": [4, 8, 16], "pass_warps": [4, 8]},
    ),
}


def stage_fns(q: torch.Tensor, k: torch.Tensor, config: FlexPrefillConfig) -> dict:
    """A zero-argument callable per kernel (its inputs precomputed with the defaults)."""
    b = config.block_size
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    scale = 1.0 / math.sqrt(dim)
    true_blocks, parts, k_pool = representative.representative_attention(q, k, b, scale)
    def pattern_fn():
        return pattern.head_pattern(q, k_pool, true_blocks, parts, b, kv_len, scale, config.tau, config.gamma)

    _, slash, _, flags, vsel, ssel, _ = pattern_fn()
    q_pool, q_bad = pool.pool_blocks(q, b, scale, flags)

    def logits_fn():
        return logits.block_logits(q_pool, k_pool, flags, q_len, kv_len, b)

    block_logits = logits_fn()
    fns = {
        "representative": lambda: representative.representative_attention(q, k, b, scale),
        "mass": lambda: representative.representative_attention(q, k, b, scale),  # tile + mass kernels
        "pattern": pattern_fn,
        "pool": lambda: pool.pool_blocks(q, b, scale),
        "logits": logits_fn,
        "threshold": lambda: select.select_blocks(
            block_logits, flags, q_bad, true_blocks, slash, vsel, ssel, q_len, kv_len, b, config.gamma,
            config.min_blocks, -1, False, config.tau > 0,
        ),
    }
    active, _ = fns["threshold"]()
    fns["emit"] = lambda: emit.emit_block_indices(active, q_len, kv_len, b)
    fns["select"] = fns["scan"] = fns["threshold"]  # the threshold kernel is part of the selection
    return fns


def defined_logits(q: torch.Tensor, k: torch.Tensor, config: FlexPrefillConfig, out: torch.Tensor) -> torch.Tensor:
    """``out`` (block logits) with the cells that ``block_logits`` leaves unwritten set to 0."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    true_blocks, parts, k_pool = representative.representative_attention(q, k, config.block_size, scale)
    flags = pattern.head_pattern(q, k_pool, true_blocks, parts, config.block_size, k.shape[2], scale, config.tau,
                                 config.gamma)[3]
    visible = BlockLayout(q.shape[2], k.shape[2], config.block_size).visible(q.device)
    defined = ((flags & 3) == 3)[:, :, None, None] & visible
    return out.masked_fill(~defined, 0.0)


def same(a, b, atol: float = 1e-9) -> bool:
    """Outputs equal (floats to 1e-5 relative: split-K changes the summation order)."""
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    for x, y in zip(a, b, strict=True):
        if x.dtype.is_floating_point:
            if not torch.allclose(x, y, rtol=1e-5, atol=atol):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--kernels", nargs="+", default=list(CANDIDATES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernel_tuning.json"))
    parser.add_argument("--workload", choices=["structured", "gaussian"], default="structured",
                        help="structured_qkv, or the Gaussian input of mask_build.py")
    args = parser.parse_args()
    config = FlexPrefillConfig()
    rows = []
    for length in args.lengths:
        if args.workload == "structured":
            q, k, _ = structured_qkv(1, 32, 8, length, 128, dtype=torch.bfloat16, device="cuda")
        else:
            q, k, _ = make_inputs(length)
        for name in args.kernels:
            tuning, grid = CANDIDATES[name]
            defaults = dict(tuning)

            def comparable(out, name=name, q=q, k=k):
                return defined_logits(q, k, config, out) if name == "logits" else out

            expected = comparable(stage_fns(q, k, config)[name]())
            for values in itertools.product(*grid.values()):
                tuning.update(zip(grid, values, strict=True))
                fn = stage_fns(q, k, config)[name]
                # (the logits' head-dimension chunks change their rounding: absolute 1e-6)
                ok = same(comparable(fn()), expected, 1e-6 if name == "logits" else 1e-9)
                ms = cuda_graph_ms(fn)
                rows.append({"kernel": name, "seq_len": length, "params": dict(tuning), "ms": ms, "same": ok})
                print(f"{name:15s} {length:7d} {ms:8.4f} ms  same={ok}  {dict(tuning)}", flush=True)
            tuning.clear()
            tuning.update(defaults)
        del q, k
        torch.cuda.empty_cache()
    best = {}
    for row in rows:
        key = (row["kernel"], row["seq_len"])
        if row["same"] and (key not in best or row["ms"] < best[key]["ms"]):
            best[key] = row
    print("\nfastest candidate per kernel and length:")
    for (name, length), row in best.items():
        print(f"{name:15s} {length:7d} {row['ms']:8.4f} ms  {row['params']}")
    save_results(args.out, rows, workload=args.workload)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
