"""User-facing configuration of FlexPrefill."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

QueryAwareSelection = Literal["global", "per_row"]
AttentionKernel = Literal["auto", "flex", "fa4"]


class _Unset:
    """Type of :data:`UNSET`, the default of keywords whose ``None`` means "off"."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Default of the ``max_budget``/``max_density`` keywords: keep the config's value."""

_NULLABLE = frozenset({"max_budget", "max_density"})

_BLOCK_SIZES = (16, 32, 64, 128, 256)

FLEX_MIN_SEQ_LEN = 32768
"""Default ``min_seq_len`` with compiled FlexAttention: from 32k tokens on the sparse path
(mask build + FlexAttention) beat SDPA on an H200; below, it did not reliably."""

FA4_MIN_SEQ_LEN = 16384
"""Default ``min_seq_len`` where FA4 runs the attention: at 16k tokens the sparse path
(mask build + FA4's block-sparse forward) took 0.47-0.91× SDPA's time on the structured
input, and a near-uniform input goes dense on the forecast (FA4's causal forward); at 8k
the mask build is not repaid (H200, ``docs/benchmarks.md``)."""


@dataclass(frozen=True)
class FlexPrefillConfig:
    """Hyper-parameters of FlexPrefill (paper Section 3 and 4.1).

    Attributes:
        gamma: cumulative-attention threshold γ, ``0 < gamma <= 1``. ``1`` keeps every
            causally visible block (dense causal attention).
        tau: Jensen–Shannon threshold τ, ``>= 0``. A head is query-aware iff
            ``D_JS < tau``; ``0`` makes every head vertical-slash, ``>= 1`` every head
            query-aware.
        block_size: token block size ``b`` of the mask, a power of two in 16..256.
        min_budget: every query-block row keeps at least ``ceil(min_budget / b)`` blocks
            (or all it can see), chosen independently of γ. ``0`` disables the rule.
        max_budget: optional cap, in tokens, on each row's active blocks; the forced
            blocks (sink, local, min budget) are always kept. ``None``: no cap. With a cap
            the coverage guarantee ``>= gamma`` no longer holds.
        query_aware_selection: ``"global"`` (paper Algorithm 4: one γ-prefix over the
            whole normalised block map) or ``"per_row"`` (Appendix F.4: a γ-prefix in
            every query-block row).
        min_seq_len: queries shorter than this use plain dense attention in
            :func:`flex_prefill_attention`; ``0`` forces the sparse path. ``None`` (the
            default): the measured crossover on an H200 of the kernel that runs the
            attention, :data:`FA4_MIN_SEQ_LEN` where FA4 runs it, else
            :data:`FLEX_MIN_SEQ_LEN` (``docs/benchmarks.md``).
        max_density: when the mean density of the built mask exceeds this,
            :func:`flex_prefill_attention` runs dense SDPA instead, because sparse
            FlexAttention would be slower. Checked only in eager mode (one host sync; not
            under ``torch.compile`` or CUDA-graph capture). ``None`` disables the check.
        attention_kernel: what computes the attention in :func:`flex_prefill_attention`.
            ``"flex"``: compiled FlexAttention on the mask, SDPA when dense. ``"fa4"``:
            FlashAttention-4's block-sparse forward on the same mask and its dense causal
            forward when dense (needs the optional ``flash-attn-4`` package, a Hopper or
            Blackwell GPU, 16-bit inputs, block size 128, no gradients; see
            :mod:`flexprefill_torch.fa4`). ``"auto"``: ``"fa4"`` where it can run, else
            ``"flex"``.
    """

    gamma: float = 0.9
    tau: float = 0.1
    block_size: int = 128
    min_budget: int = 1024
    max_budget: int | None = None
    query_aware_selection: QueryAwareSelection = "global"
    min_seq_len: int | None = None
    max_density: float | None = 0.7
    attention_kernel: AttentionKernel = "auto"

    def __post_init__(self) -> None:
        _check_real("gamma", self.gamma)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must satisfy 0 < gamma <= 1, got gamma={self.gamma!r}")
        _check_real("tau", self.tau)
        if self.tau < 0.0:
            raise ValueError(f"tau must be >= 0, got tau={self.tau!r}")
        _check_int("block_size", self.block_size)
        if self.block_size not in _BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {_BLOCK_SIZES}, got block_size={self.block_size!r}")
        _check_int("min_budget", self.min_budget)
        if self.min_budget < 0:
            raise ValueError(f"min_budget must be >= 0 tokens, got min_budget={self.min_budget!r}")
        if self.max_budget is not None:
            _check_int("max_budget", self.max_budget)
            if self.max_budget < max(self.min_budget, 1):
                raise ValueError(
                    f"max_budget must be None or >= max(min_budget, 1) = {max(self.min_budget, 1)} "
                    f"tokens, got max_budget={self.max_budget!r}"
                )
        if self.query_aware_selection not in ("global", "per_row"):
            raise ValueError(
                "query_aware_selection must be 'global' or 'per_row', "
                f"got query_aware_selection={self.query_aware_selection!r}"
            )
        if self.min_seq_len is not None:
            _check_int("min_seq_len", self.min_seq_len)
            if self.min_seq_len < 0:
                raise ValueError(f"min_seq_len must be None or >= 0, got min_seq_len={self.min_seq_len!r}")
        if self.max_density is not None:
            _check_real("max_density", self.max_density)
            if not 0.0 < self.max_density <= 1.0:
                raise ValueError(
                    f"max_density must be None or in (0, 1], got max_density={self.max_density!r}"
                )
        if self.attention_kernel not in ("auto", "flex", "fa4"):
            raise ValueError(
                f"attention_kernel must be 'auto', 'flex' or 'fa4', got attention_kernel={self.attention_kernel!r}"
            )

    @property
    def min_blocks(self) -> int:
        """Blocks per query-block row guaranteed by ``min_budget``."""
        return math.ceil(self.min_budget / self.block_size)

    @property
    def max_blocks(self) -> int | None:
        """Cap on blocks per query-block row from ``max_budget`` (``None``: no cap)."""
        if self.max_budget is None:
            return None
        return math.ceil(self.max_budget / self.block_size)

    def effective_min_seq_len(self, fa4: bool) -> int:
        """``min_seq_len``, or where it is None the crossover of the kernel (FA4 or FlexAttention)."""
        if self.min_seq_len is not None:
            return self.min_seq_len
        return FA4_MIN_SEQ_LEN if fa4 else FLEX_MIN_SEQ_LEN

    def replace(self, **changes: Any) -> FlexPrefillConfig:
        """A copy with ``changes`` applied (validated).

        :data:`UNSET` values are ignored, and so is ``None`` for the fields that do not
        accept it; ``max_budget=None`` / ``max_density=None`` switch the cap / check off.
        """
        kept = {
            name: value
            for name, value in changes.items()
            if value is not UNSET and (value is not None or name in _NULLABLE)
        }
        return dataclasses.replace(self, **kept) if kept else self

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (round-trips through ``FlexPrefillConfig(**d)``)."""
        return dataclasses.asdict(self)


def resolve_config(config: FlexPrefillConfig | None, **overrides: Any) -> FlexPrefillConfig:
    """``config`` (or the defaults) with the keyword ``overrides`` applied (see ``replace``)."""
    if config is None:
        config = _DEFAULT  # frozen: the default instance is shared
    elif not isinstance(config, FlexPrefillConfig):
        raise TypeError(
            f"config must be a FlexPrefillConfig or None, got config of type {type(config).__name__}"
        )
    for name, value in overrides.items():  # the common case, no override, without building a dict
        if value is not UNSET and (value is not None or name in _NULLABLE):
            try:
                return _replaced(config, tuple(overrides.items()))
            except TypeError:  # an unhashable value: the uncached replace names what is wrong
                return config.replace(**overrides)
    return config


@functools.lru_cache(maxsize=64)
def _replaced(config: FlexPrefillConfig, overrides: tuple[tuple[str, Any], ...]) -> FlexPrefillConfig:
    """``config.replace(**dict(overrides))``, cached: a model calls with the same keywords per layer."""
    return config.replace(**dict(overrides))


def _check_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {name}={value!r}")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {name}={value!r}")


_DEFAULT = FlexPrefillConfig()
