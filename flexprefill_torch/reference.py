"""Pure-PyTorch reference of FlexPrefill, step by step as in the paper.

This is the oracle every faster path is tested against. It favours clarity over speed:
float32 math (float64 for cumulative sums), whole tensors, no custom kernels. It runs on
any device. Step numbers follow ``shared/spec/ALGORITHM.md``; algorithm numbers follow
the paper (Algorithms 2, 3 and 4).

Shapes: ``q`` is ``[B, Hq, Lq, D]``, ``k`` is ``[B, Hkv, Lk, D]``; ``nq``/``nk`` are the
numbers of query/key blocks; every per-head result is indexed by the *query* head.

Choices the spec leaves open (see ``docs/algorithm.md``):

* **Vertical pooling.** The vertical score of key block ``j`` is the representative mass
  on its keys, which equals the true block distribution ``â[j]``.
* **Slash pooling.** Slash offsets are pooled in groups of ``b`` consecutive offsets:
  group ``g`` holds offsets ``g*b .. g*b + b - 1``. A selected group activates, in every
  query-block row, each block that one of its lines passes through (two or three blocks).
* **Forced entries count first.** Blocks forced by the sink, local and min-budget rules
  (and the sink column for vertical lines) are kept unconditionally and their score counts
  towards γ; the remaining entries are then added in descending order until the total
  reaches γ. This keeps the set minimal, monotone in γ and never below γ.
* **Min-budget blocks** are each row's strongest visible blocks by the head's block score:
  ``Ā`` for query-aware heads, ``v[j] + max s[g]`` over the slash groups crossing the block
  for vertical-slash heads. They do not depend on γ.
* **Non-finite input.** A head whose pooled keys or ``D_JS`` are not finite, or a
  query-aware head whose pooled queries are not finite, keeps every visible block, so its
  output is exactly dense attention (NaN included). A vertical-slash head's mask does not
  depend on the pooled queries (a non-finite query only makes its own output row NaN, as
  in dense attention), so those are not checked for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FlexPrefillConfig
from .layout import BlockLayout


@dataclass
class ReferenceSelection:
    """Everything the reference decides for one call (per batch row and query head).

    Attributes:
        active: ``[B, Hq, nq, nk]`` bool, the final active blocks.
        query_aware: ``[B, Hq]`` bool, the pattern (``D_JS < tau``).
        js_distance: ``[B, Hq]`` float32, ``sqrt(JSD(ā ‖ â))``.
        true_blocks: ``[B, Hq, nk]``, ``â`` (also the pooled vertical score).
        estimated_blocks: ``[B, Hq, nk]``, ``ā``.
        slash: ``[B, Hq, nk]``, the pooled slash score of each offset group.
        block_scores: ``[B, Hq, nq, nk]``, ``Ā`` (row softmax over visible blocks, 0 elsewhere).
        forced: ``[B, Hq, nq, nk]`` bool, blocks kept by the sink, local and min-budget rules.
        vertical_selected: ``[B, Hq, nk]`` bool, selected key-block columns.
        slash_selected: ``[B, Hq, nk]`` bool, selected offset groups.
        query_aware_selected: ``[B, Hq, nq, nk]`` bool, Algorithm 4's selection plus forced.
    """

    active: Tensor
    query_aware: Tensor
    js_distance: Tensor
    true_blocks: Tensor
    estimated_blocks: Tensor
    slash: Tensor
    block_scores: Tensor
    forced: Tensor
    vertical_selected: Tensor
    slash_selected: Tensor
    query_aware_selected: Tensor


def flex_prefill_reference(
    q: Tensor, k: Tensor, config: FlexPrefillConfig, scale: float | None = None
) -> ReferenceSelection:
    """Run steps 1–5 and the block rules; returns every intermediate (see :class:`ReferenceSelection`)."""
    layout = BlockLayout(q.shape[-2], k.shape[-2], config.block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    device = q.device
    qf = q.float()
    kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    visible = layout.visible(device)

    # Step 1: representative attention of the last r queries (Algorithm 2, lines 1-2).
    true_blocks, slash_per_offset = representative_attention(qf, kf, layout, scale)
    # Step 2: the block-pooled estimate ā.
    q_pool, k_pool = pool_blocks(qf, layout.block_size), pool_blocks(kf, layout.block_size)
    r = min(layout.block_size, layout.q_len)
    estimated_blocks = torch.softmax(scale * qf[..., -r:, :].mean(-2, keepdim=True) @ k_pool.mT, -1)
    estimated_blocks = estimated_blocks.squeeze(-2)
    # Step 3: the pattern (Algorithm 2, lines 3-4).
    js = js_distance(estimated_blocks, true_blocks)
    query_aware = js < config.tau

    # Step 4 scores: Ā over the key blocks each query block may see (Algorithm 4, line 1).
    logits = (scale * q_pool @ k_pool.mT).masked_fill(~visible, -math.inf)
    block_scores = torch.softmax(logits, -1).nan_to_num(0.0)
    # Step 5 scores: pooled vertical and slash lines (Algorithm 3, line 2).
    vertical = true_blocks
    slash = pool_slash(slash_per_offset, layout)
    vs_scores = vertical_slash_block_scores(vertical, slash, layout)

    # Rules that hold for both patterns: sink, local, min budget (independent of γ).
    scores = torch.where(query_aware[..., None, None], block_scores, vs_scores)
    sink = torch.zeros_like(visible)
    sink[:, 0] = True
    forced = (sink | layout.diagonal(device)) & visible
    forced = forced | strongest_blocks(scores, visible, config.min_blocks)

    # Step 4: query-aware selection (Algorithm 4, or Appendix F.4 per row).
    qa_selected = select_query_aware(block_scores, forced, visible, config)
    # Step 5: vertical-slash selection (Algorithm 3), extended to the whole map.
    first_column = torch.zeros_like(vertical, dtype=torch.bool)
    first_column[..., 0] = True
    vertical_selected = cumulative_select(vertical, first_column, config.gamma)
    slash_selected = cumulative_select(slash, torch.zeros_like(first_column), config.gamma)
    vs_active = extend_lines(vertical_selected, slash_selected, layout) | forced

    active = torch.where(query_aware[..., None, None], qa_selected, vs_active) & visible
    if config.max_blocks is not None:
        active = cap_blocks(active, forced, scores, config.max_blocks)
    # γ = 1 and heads with non-finite input keep every visible block (exactly dense); the
    # pooled queries only matter to the query-aware heads' masks.
    sparse = torch.isfinite(js) & (torch.isfinite(q_pool).all(-1).all(-1) | ~query_aware)
    sparse = sparse & torch.isfinite(k_pool).all(-1).all(-1) & (config.gamma < 1.0)
    active = torch.where(sparse[..., None, None], active, visible)

    return ReferenceSelection(
        active=active,
        query_aware=query_aware,
        js_distance=js,
        true_blocks=true_blocks,
        estimated_blocks=estimated_blocks,
        slash=slash,
        block_scores=block_scores,
        forced=forced,
        vertical_selected=vertical_selected,
        slash_selected=slash_selected,
        query_aware_selected=qa_selected,
    )


def representative_attention(
    q: Tensor, k: Tensor, layout: BlockLayout, scale: float
) -> tuple[Tensor, Tensor]:
    """Causal softmax of the last ``r = min(b, Lq)`` queries against all keys.

    Args:
        q: ``[B, H, Lq, D]`` float32; k: ``[B, H, Lk, D]`` float32 (heads already matched).

    Returns:
        ``â``: ``[B, H, nk]`` mean attention mass per key block, and ``a_s``: ``[B, H, Lk]``
        mean mass per offset ``o = p_i - t``. Both sum to 1.
    """
    r = min(layout.block_size, layout.q_len)
    positions = torch.arange(layout.kv_len - r, layout.kv_len, device=q.device)  # p_i
    keys = torch.arange(layout.kv_len, device=q.device)
    logits = scale * q[..., -r:, :] @ k.mT  # [B, H, r, Lk]
    logits = logits.masked_fill(keys[None, :] > positions[:, None], -math.inf)
    probs = torch.softmax(logits, -1)

    true_blocks = pool_sum(probs.mean(-2), layout.block_size)

    offsets = torch.arange(layout.kv_len, device=q.device)
    key_at_offset = positions[:, None] - offsets[None, :]  # [r, Lk]: key t of row i at offset o
    index = key_at_offset.clamp(min=0).expand(*probs.shape[:2], r, layout.kv_len)
    per_offset = probs.gather(-1, index) * (key_at_offset >= 0)
    return true_blocks, per_offset.mean(-2)


def pool_blocks(x: Tensor, block_size: int) -> Tensor:
    """Mean over each block of ``block_size`` rows: ``[..., L, D] -> [..., ceil(L/b), D]``.

    A short last block is averaged over its real rows.
    """
    length = x.shape[-2]
    n = -(-length // block_size)
    padded = F.pad(x, (0, 0, 0, n * block_size - length))
    sums = padded.unflatten(-2, (n, block_size)).sum(-2)
    counts = torch.clamp(length - torch.arange(n, device=x.device) * block_size, max=block_size)
    return sums / counts[:, None].to(x.dtype)


def pool_sum(x: Tensor, block_size: int) -> Tensor:
    """Sum over each block of ``block_size`` entries: ``[..., L] -> [..., ceil(L/b)]``."""
    n = -(-x.shape[-1] // block_size)
    return F.pad(x, (0, n * block_size - x.shape[-1])).unflatten(-1, (n, block_size)).sum(-1)


def pool_slash(per_offset: Tensor, layout: BlockLayout) -> Tensor:
    """Slash mass per offset group ``g`` (offsets ``g*b .. g*b + b - 1``): ``[..., Lk] -> [..., nk]``."""
    return pool_sum(per_offset, layout.block_size)


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """``sqrt(JSD(p ‖ q))`` over the last dim, natural log, ``0 log 0 = 0``; in ``[0, sqrt(ln 2)]``.

    Computed in float64 and returned as float32: in float32, ``0.5 * (p + q)`` rounds to 0
    when one probability is the smallest subnormal and the other is 0, and
    ``xlogy(p, 0) = -inf`` would make the distance infinite.
    """
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (0.5 * (kl_p + kl_q)).clamp(min=0.0, max=math.log(2.0)).sqrt().float()


def slash_groups_through_blocks(layout: BlockLayout, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and last offset group whose lines pass through each block, ``[nq, nk]`` each.

    Block ``(r, j)`` holds the offsets ``max(0, q_first - k_last) .. q_last - k_first``;
    the groups are those offsets divided by ``b``. Meaningful for visible blocks only.
    """
    q_first, q_last = layout.query_block_positions(device)
    k_first, k_last = layout.key_block_positions(device)
    lowest = (q_first[:, None] - k_last[None, :]).clamp(min=0)
    highest = (q_last[:, None] - k_first[None, :]).clamp(min=0)
    return lowest // layout.block_size, highest // layout.block_size


def vertical_slash_block_scores(vertical: Tensor, slash: Tensor, layout: BlockLayout) -> Tensor:
    """Score of each block for a vertical-slash head: ``v[j] + max s[g]`` over its groups.

    Args:
        vertical: ``[B, H, nk]``; slash: ``[B, H, nk]``. Returns ``[B, H, nq, nk]``.
    """
    first, last = slash_groups_through_blocks(layout, vertical.device)
    best = torch.full((*slash.shape[:2], *first.shape), -math.inf, device=slash.device)
    for step in range(3):  # a block meets at most three offset groups
        group = torch.minimum(first + step, last)
        best = torch.maximum(best, slash[..., group.flatten()].unflatten(-1, group.shape))
    return vertical[..., None, :] + best


def extend_lines(vertical_selected: Tensor, slash_selected: Tensor, layout: BlockLayout) -> Tensor:
    """Blocks met by a selected column or a line of a selected offset group: ``[B, H, nq, nk]``.

    A column is extended to every row; a group activates each block one of its lines crosses.
    """
    first, last = slash_groups_through_blocks(layout, vertical_selected.device)
    selected_so_far = F.pad(slash_selected.long().cumsum(-1), (1, 0))  # [B, H, nk + 1]
    n_hit = selected_so_far[..., (last + 1).flatten()] - selected_so_far[..., first.flatten()]
    slash_blocks = n_hit.unflatten(-1, first.shape) > 0
    return slash_blocks | vertical_selected[..., None, :]


def strongest_blocks(scores: Tensor, visible: Tensor, count: int) -> Tensor:
    """Each row's ``min(count, visible)`` highest-scoring visible blocks: ``[B, H, nq, nk]`` bool."""
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    ranked = scores.masked_fill(~visible, -math.inf).nan_to_num(nan=-math.inf, neginf=-math.inf)
    values, index = ranked.topk(min(count, scores.shape[-1]), dim=-1)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(-1, index, values > -math.inf)
    return chosen & visible


def cumulative_select(scores: Tensor, forced: Tensor, gamma: float) -> Tensor:
    """Forced entries plus the shortest descending prefix of the others reaching ``gamma``.

    Along the last dim: the forced entries' scores count first; then the other entries are
    taken in descending order (stable) while the mass taken *before* each is below ``gamma``
    (so the entry that crosses γ is kept). Scores are non-negative and sum to about 1.
    """
    scores = scores.double()
    base = (scores * forced).sum(-1, keepdim=True)
    candidates = scores.masked_fill(forced, -1.0)  # forced entries sort last, never re-taken
    values, order = candidates.sort(dim=-1, descending=True, stable=True)
    taken_before = base + F.pad(values.clamp(min=0).cumsum(-1)[..., :-1], (1, 0))
    take = (taken_before < gamma) & (values >= 0)
    return torch.zeros_like(forced).scatter(-1, order, take) | forced


def select_query_aware(
    block_scores: Tensor, forced: Tensor, visible: Tensor, config: FlexPrefillConfig
) -> Tensor:
    """Algorithm 4: γ-coverage of the normalised map ``Ā / nq`` (or of each row, per_row)."""
    if config.query_aware_selection == "per_row":
        return cumulative_select(block_scores, forced, config.gamma) & visible
    nq = block_scores.shape[-2]
    flat = cumulative_select((block_scores / nq).flatten(-2), forced.flatten(-2), config.gamma)
    return flat.unflatten(-1, block_scores.shape[-2:]) & visible


def cap_blocks(active: Tensor, forced: Tensor, scores: Tensor, max_blocks: int) -> Tensor:
    """At most ``max(max_blocks, forced)`` blocks per row: forced ones, then the best by score."""
    room = (max_blocks - forced.sum(-1, keepdim=True)).clamp(min=0)
    optional = scores.masked_fill(~(active & ~forced), -math.inf)
    _, order = optional.sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return forced | (active & ~forced & (rank < room))


def masked_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, active: Tensor, block_size: int, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Dense softmax attention restricted to ``active`` blocks and causal positions.

    Materialises the ``[B, Hq, Lq, Lk]`` scores (test-sized inputs only). Rows with no
    allowed key give zeros and ``lse = -inf``, as FlexAttention does.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``; active: ``[B, Hq, nq, nk]`` bool.

    Returns:
        ``out [B, Hq, Lq, Dv]`` in float32 and ``lse [B, Hq, Lq]`` (natural log).
    """
    layout = BlockLayout(q.shape[-2], k.shape[-2], block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    rows = torch.arange(layout.q_len, device=q.device)
    keys = torch.arange(layout.kv_len, device=q.device)
    allowed = active[..., rows // block_size, :][..., keys // block_size]
    allowed = allowed & (keys[None, :] <= rows[:, None] + layout.offset)
    logits = (scale * q.float() @ kf.mT).masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    return probs @ vf, lse
