"""Causal SDPA per backend: which dense attention is there to fall back on (CUDA GPU).

Usage::

    python benchmarks/sdpa_backends.py                 # 4k..128k
    python benchmarks/sdpa_backends.py --lengths 32768

``flex_prefill_attention`` runs ``F.scaled_dot_product_attention`` when the sparse path
cannot pay; this measures what each SDPA backend takes for the same call: the default
choice, flash, memory-efficient and cuDNN, with ``enable_gqa=True`` and with the key/value
heads expanded (B=1, Hq=32, Hkv=8, D=128, bf16, random inputs), and FlashAttention-4's
dense causal forward (``flexprefill_torch.fa4``, the dense path of
``attention_kernel="fa4"``) where it can run. Medians of
``triton.testing.do_bench``; the relative error is against the default backend's output
(expanded heads). A backend that refuses the call is reported with its error. Prints a
table and saves JSON; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from flexprefill_torch.benchmark import save_results
from flexprefill_torch.fa4 import fa4_causal_attention, fa4_unusable_reason

CASES: dict[str, tuple[SDPBackend | None, bool]] = {
    "default gqa": (None, True),
    "default expanded": (None, False),
    "flash gqa": (SDPBackend.FLASH_ATTENTION, True),
    "flash expanded": (SDPBackend.FLASH_ATTENTION, False),
    "efficient expanded": (SDPBackend.EFFICIENT_ATTENTION, False),
    "cudnn gqa": (SDPBackend.CUDNN_ATTENTION, True),
    "cudnn expanded": (SDPBackend.CUDNN_ATTENTION, False),
}
FA4_CASE = "fa4 gqa"


def measure(length: int) -> dict[str, object]:
    """``{case: (ms, relative error) or error text}`` at one sequence length."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k_full, v_full = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    reference = F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True).float()
    rep = 300 if length <= 32768 else 1500
    row: dict[str, object] = {"L": length}
    for name, (backend, gqa) in CASES.items():

        def call(gqa: bool = gqa) -> torch.Tensor:
            if gqa:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

        try:
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                out = call()
                ms = do_bench(call, warmup=10, rep=rep, return_mode="median")
            error = float((out.float() - reference).norm() / reference.norm())
            row[name] = (round(ms, 4), error)
        except RuntimeError as exc:  # the backend cannot take this call
            row[name] = str(exc)[:100]
    reason = fa4_unusable_reason(q, k, v)
    if reason is None:
        out = fa4_causal_attention(q, k, v)
        ms = do_bench(lambda: fa4_causal_attention(q, k, v), warmup=10, rep=rep, return_mode="median")
        row[FA4_CASE] = (round(ms, 4), float((out.float() - reference).norm() / reference.norm()))
    else:
        row[FA4_CASE] = reason[:100]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sdpa_backends.json"))
    args = parser.parse_args()
    rows = [measure(length) for length in args.lengths]
    print(f"{'case':20s}" + "".join(f"{row['L']:>10d}" for row in rows))
    for name in [*CASES, FA4_CASE]:
        cells = [row[name] for row in rows]
        print(f"{name:20s}" + "".join(f"{c[0]:10.3f}" if isinstance(c, tuple) else f"{'n/a':>10s}" for c in cells))
    save_results(args.out, rows, cudnn=torch.backends.cudnn.version())
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
