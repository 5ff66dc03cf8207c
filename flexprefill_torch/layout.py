"""Block geometry of a (possibly offset) causal prefill.

Queries are the last ``q_len`` of ``kv_len`` positions: query ``i`` sits at absolute
position ``offset + i`` with ``offset = kv_len - q_len`` and sees key ``t`` iff
``t <= offset + i``. Query blocks are cut from the start of the queries, key blocks from
position 0, both ``block_size`` long; the last of each may be short.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockLayout:
    """Sizes and causal block maps for one ``(q_len, kv_len, block_size)``."""

    q_len: int
    kv_len: int
    block_size: int

    @property
    def offset(self) -> int:
        """Absolute position of query 0."""
        return self.kv_len - self.q_len

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_size)

    def query_block_positions(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Absolute position of the first and the last query of every query block, ``[nq]`` each."""
        start = torch.arange(self.num_q_blocks, device=device) * self.block_size
        end = torch.clamp(start + self.block_size, max=self.q_len) - 1
        return start + self.offset, end + self.offset

    def key_block_positions(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Position of the first and the last real key of every key block, ``[nk]`` each."""
        start = torch.arange(self.num_kv_blocks, device=device) * self.block_size
        end = torch.clamp(start + self.block_size, max=self.kv_len) - 1
        return start, end

    def visible(self, device: torch.device | str) -> Tensor:
        """``[nq, nk]`` bool: the key block holds a key that some query of the row may see."""
        _, q_last = self.query_block_positions(device)
        k_first, _ = self.key_block_positions(device)
        return k_first[None, :] <= q_last[:, None]

    def full(self, device: torch.device | str) -> Tensor:
        """``[nq, nk]`` bool: every (query, key) pair of the block is in range and visible.

        Blocks that are visible but not full are *partial*: FlexAttention applies the
        token-level causal ``mask_mod`` inside them.
        """
        q_first, _ = self.query_block_positions(device)
        k_first, k_last = self.key_block_positions(device)
        q_complete = torch.arange(self.num_q_blocks, device=device) < self.q_len // self.block_size
        k_complete = torch.arange(self.num_kv_blocks, device=device) < self.kv_len // self.block_size
        below = k_last[None, :] <= q_first[:, None]
        return below & q_complete[:, None] & k_complete[None, :]

    def diagonal(self, device: torch.device | str) -> Tensor:
        """``[nq, nk]`` bool: the key blocks holding the row's own positions (one or two)."""
        q_first, q_last = self.query_block_positions(device)
        j = torch.arange(self.num_kv_blocks, device=device)
        b = self.block_size
        return (j[None, :] >= (q_first // b)[:, None]) & (j[None, :] <= (q_last // b)[:, None])
