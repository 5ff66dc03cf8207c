"""Draw FlexPrefill block masks of a few heads (like the paper's Fig. 9).

python examples/visualize_masks.py --out masks.png
"""

from __future__ import annotations

import argparse

from flexprefill_torch import flex_prefill_block_mask
from flexprefill_torch.synthetic import structured_qkv
from flexprefill_torch.visualize import plot_block_masks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--out", default="masks.png")
    args = parser.parse_args()
    q, k, _ = structured_qkv(1, 8, 2, args.seq_len, 64)
    block_mask, info = flex_prefill_block_mask(q, k, gamma=args.gamma, return_info=True)
    print(info.summary())
    plot_block_masks(block_mask, [(0, h) for h in range(4)], info, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
