"""A structured synthetic long-context workload (no model weights needed).

Real attention heads show four structures (paper Fig. 2): an attention *sink* on the first
tokens, *vertical* lines (keys every query attends to), *slash* lines (fixed offsets, the
local window among them) and *query-dependent blocks*. :func:`structured_qkv` plants all
four in random ``q``, ``k``, ``v`` through disjoint channels of the head dimension:

* sink/vertical channel: key 0 and a few random "heavy" keys per KV head carry a shared
  direction ``u``; queries of vertical-slash heads carry ``u`` too.
* slash channel: rotary-style features ``(cos ω p, sin ω p)`` over several frequencies.
  Keys encode their position ``t``; a query at ``p`` encodes ``p`` (local window) and
  ``p - δ_h`` (a head-specific slash at offset ``δ_h``), so ``q·k`` peaks at offsets 0 and
  ``δ_h``.
* cluster channel: every key block gets one of a few random cluster vectors; every query
  block of a *query-aware* head picks a cluster and attends to the key blocks that share
  it. Block-mean pooling preserves the cluster vectors, so the pooled estimate is accurate
  and FlexPrefill should call these heads query-aware.

Even query heads are vertical-slash heads, odd ones query-aware; Gaussian noise is added
everywhere. The generator is deterministic for a given ``seed``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def structured_qkv(
    batch: int = 1,
    q_heads: int = 8,
    kv_heads: int = 2,
    seq_len: int = 4096,
    head_dim: int = 64,
    q_len: int | None = None,
    block_size: int = 128,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``q [B, Hq, Lq, D]``, ``k``/``v [B, Hkv, L, D]`` with sinks, verticals, slashes and blocks.

    ``q_len`` (default ``seq_len``) takes the last ``q_len`` positions as queries.
    ``head_dim`` must be at least 32.
    """
    if head_dim < 32:
        raise ValueError(f"head_dim must be >= 32 for the structured workload, got head_dim={head_dim}")
    if q_heads % kv_heads:
        raise ValueError(
            f"q_heads must be a multiple of kv_heads, got q_heads={q_heads}, kv_heads={kv_heads}"
        )
    q_len = seq_len if q_len is None else q_len
    if not 1 <= q_len <= seq_len:
        raise ValueError(f"q_len must be in 1..seq_len={seq_len}, got q_len={q_len}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    work = torch.float64 if device.type == "cpu" else torch.float32  # build where it is used
    d = head_dim
    n_freq = 8
    sink_dims, slash_dims = slice(0, 8), slice(8, 8 + 2 * n_freq)
    cluster_dims = slice(8 + 2 * n_freq, d)
    n_clusters = 6
    group = q_heads // kv_heads
    positions = torch.arange(seq_len, dtype=work, device=device)
    q_positions = positions[seq_len - q_len :]
    n_kv_blocks = -(-seq_len // block_size)
    # Logit scales are set so peaks stand out by a few units after the 1/sqrt(d) scaling.
    root = math.sqrt(math.sqrt(d))

    k = 0.5 * torch.randn(batch, kv_heads, seq_len, d, generator=gen, dtype=work, device=device)
    q = 0.5 * torch.randn(batch, q_heads, q_len, d, generator=gen, dtype=work, device=device)
    v = torch.randn(batch, kv_heads, seq_len, d, generator=gen, dtype=work, device=device)

    # Sink and vertical lines.
    u = torch.randn(8, generator=gen, dtype=work, device=device)
    u = u / u.norm()
    n_vertical = max(2, seq_len // 1024)
    heavy = torch.randint(1, seq_len, (batch, kv_heads, n_vertical), generator=gen, device=device)
    k[..., 0, sink_dims] += 4.0 * root * u
    k[..., sink_dims].scatter_add_(
        2, heavy[..., None].expand(-1, -1, -1, 8), (3.0 * root * u).expand(batch, kv_heads, n_vertical, 8)
    )

    # Slash lines: rotary features over geometric wavelengths from 4 tokens to 2 * seq_len.
    wavelengths = torch.logspace(
        math.log10(4.0), math.log10(2.0 * seq_len), n_freq, dtype=work, device=device
    )
    omega = 2 * math.pi / wavelengths

    def rotary(pos: Tensor) -> Tensor:
        angle = pos[:, None] * omega[None, :]
        return torch.cat([angle.cos(), angle.sin()], -1)

    k[..., slash_dims] += 1.2 * root * rotary(positions)
    offsets = torch.randint(
        block_size, max(block_size + 1, seq_len // 2), (q_heads,), generator=gen, device=device
    )

    # Query-dependent blocks: cluster vectors on key blocks and query blocks.
    clusters = torch.randn(
        n_clusters, cluster_dims.stop - cluster_dims.start, generator=gen, dtype=work, device=device
    )
    clusters = clusters / clusters.norm(dim=-1, keepdim=True)
    key_cluster = torch.randint(0, n_clusters, (batch, kv_heads, n_kv_blocks), generator=gen, device=device)
    key_block_of = torch.arange(seq_len, device=device) // block_size
    k[..., cluster_dims] += 1.5 * root * clusters[key_cluster[..., key_block_of]]

    for h in range(q_heads):
        if h % 2 == 0:  # vertical-slash head: sink/vertical and slash channels
            q[:, h, :, sink_dims] += 2.5 * root * u
            q[:, h, :, slash_dims] += 1.2 * root * (rotary(q_positions) + rotary(q_positions - offsets[h]))
        else:  # query-aware head: each query block chooses a cluster
            kv = h // group
            n_q_blocks = -(-q_len // block_size)
            choice = torch.randint(0, n_kv_blocks, (batch, n_q_blocks), generator=gen, device=device)
            wanted = key_cluster[:, kv].gather(1, choice)  # the cluster of a random key block
            q_block_of = torch.arange(q_len, device=device) // block_size
            q[:, h, :, cluster_dims] += 2.5 * root * clusters[wanted[:, q_block_of]]
            q[:, h, :, sink_dims] += 0.5 * root * u
    return (
        q.to(device=device, dtype=dtype),
        k.to(device=device, dtype=dtype),
        v.to(device=device, dtype=dtype),
    )
