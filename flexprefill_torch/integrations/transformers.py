"""Hugging Face transformers integration: ``attn_implementation="flex_prefill"``.

Importing :mod:`flexprefill_torch` registers, under the name ``"flex_prefill"``:

* :func:`flex_prefill_attention_forward` with transformers' ``AttentionInterface``: the
  attention of every layer — FlexPrefill for prefill (also on top of a KV cache), dense SDPA
  for decode and for prompts shorter than ``min_seq_len``, exact sliding-window attention for
  layers whose window is shorter than the keys;
* :func:`flex_prefill_mask` with ``AttentionMaskInterface``: instead of a dense
  ``[B, 1, Lq, Lk]`` mask it returns ``None`` (no padding) or the 2-D padding mask
  ``[B, Lk]`` bool — O(S) memory and time.

The hyper-parameters are stored per model on its config, as the plain dict attribute
``config.flex_prefill_config`` (so they round-trip through ``save_pretrained``); the attention
function reads the config of the module it is called for. See ``docs/transformers.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface
from transformers.configuration_utils import PreTrainedConfig
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
from transformers.utils import logging

from ..attention import dense_attention, flex_prefill_attention, is_short_prompt, run_flex_attention
from ..block_mask import indices_from_map
from ..config import FlexPrefillConfig
from ..info import FlexPrefillInfo
from ..layout import BlockLayout

logger = logging.get_logger(__name__)

ATTN_IMPLEMENTATION = "flex_prefill"
"""The ``attn_implementation`` name registered with transformers."""

CONFIG_ATTRIBUTE = "flex_prefill_config"
METHOD_ATTRIBUTE = "flex_prefill_method"  # {"name": method, "options": {knob: value}}
_METHOD_RESERVED = frozenset({"q", "k", "block_size", "scale", "backend", "return_info", "config"})
"""Name of the model-config attribute (a plain dict) holding the FlexPrefill settings."""

PAPER_KEYS: dict[str, str] = {
    "block_size": "block_size",
    "flex_prefill_gamma": "gamma",
    "flex_prefill_tau": "tau",
    "flex_prefill_min_budget": "min_budget",
    "flex_prefill_max_budget": "max_budget",
}
"""Keys of the paper code's config dict and the :class:`FlexPrefillConfig` field each sets."""

_FIELDS = frozenset(field.name for field in dataclasses.fields(FlexPrefillConfig))

# Attention keyword arguments that do not change the result (the rotary embedding is already
# applied to the states; caching is done by the model before the call).
_IGNORED_KWARGS = frozenset(
    {
        "position_ids",
        "use_cache",
        "cache_position",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)

Path = Literal["flex_prefill", "dense", "sliding_window", "method"]


# --------------------------------------------------------------------------- configuration


def to_flex_prefill_config(config: FlexPrefillConfig | Mapping[str, Any] | None) -> FlexPrefillConfig:
    """A :class:`FlexPrefillConfig` from a config, a dict or ``None`` (the defaults).

    Dict keys are :class:`FlexPrefillConfig` field names or the paper code's keys
    (:data:`PAPER_KEYS`: ``block_size``, ``flex_prefill_gamma``, ``flex_prefill_tau``,
    ``flex_prefill_min_budget``, ``flex_prefill_max_budget``); missing keys keep their
    defaults. ``min_budget=None`` means no minimum budget (``0``); ``None`` for
    ``max_budget``/``max_density`` disables the cap/check. Unknown keys raise ``ValueError``.
    """
    if config is None:
        return FlexPrefillConfig()
    if isinstance(config, FlexPrefillConfig):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config must be a FlexPrefillConfig, a dict or None, got config of type {type(config).__name__}"
        )
    fields: dict[str, Any] = {}
    for key, value in config.items():
        name = PAPER_KEYS.get(key, key)
        if name not in _FIELDS:
            known = sorted(_FIELDS | PAPER_KEYS.keys())
            raise ValueError(f"unknown FlexPrefill config key {key!r}; known keys: {known}")
        if name in fields and fields[name] != value:
            raise ValueError(
                f"FlexPrefill config key {key!r}={value!r} conflicts with {name!r}={fields[name]!r}"
            )
        fields[name] = value
    if "min_budget" in fields and fields["min_budget"] is None:
        fields["min_budget"] = 0
    return FlexPrefillConfig(**fields)


def patch_model(
    model: nn.Module,
    config: FlexPrefillConfig | Mapping[str, Any] | None = None,
    *,
    method: str = "flexprefill",
    method_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Switch ``model`` to ``attn_implementation="flex_prefill"`` with ``config``; returns ``model``.

    ``method`` picks the prefill mask builder (a key of
    :data:`flexprefill_torch.methods.MASK_BUILDERS`: ``"flexprefill"`` (default),
    ``"flashprefill"``, ``"streaming"``, ``"vertical_slash"``, ``"xattention"``) and
    ``method_options`` its knobs (e.g. ``{"alpha": 0.1}``); the config's ``block_size``,
    ``min_seq_len`` and the decode fallback apply to every method. Stored as
    ``config.flex_prefill_method``.

    ``config`` (see :func:`to_flex_prefill_config`) is stored as a plain dict on the config of
    the model and of every sub-model (``config.flex_prefill_config``), where the attention
    function reads it and ``save_pretrained`` saves it.
    """
    resolved = to_flex_prefill_config(config)
    chosen = _check_method(method, method_options)
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"model must be a transformers PreTrainedModel, got model of type {type(model).__name__}"
        )
    stored = resolved.to_dict()
    for model_config in _model_configs(model):
        setattr(model_config, CONFIG_ATTRIBUTE, stored)
        setattr(model_config, METHOD_ATTRIBUTE, chosen)
    for module in model.modules():  # pre-parse, so a compiled forward never parses
        if getattr(getattr(module, "config", None), CONFIG_ATTRIBUTE, None) is stored:
            setattr(module, _SETTINGS_ATTRIBUTE, (stored, chosen, resolved, _mask_builder(chosen)))
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"{type(model).__name__} cannot switch its attention implementation to {ATTN_IMPLEMENTATION!r} "
            "(it does not dispatch through transformers' AttentionInterface)"
        )
    return model


def _check_method(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The stored form ``{"name": ..., "options": {...}}``; ValueError naming a bad name or knob."""
    from ..methods import MASK_BUILDERS

    if method not in MASK_BUILDERS:
        raise ValueError(f"method must be one of {sorted(MASK_BUILDERS)}, got method={method!r}")
    options = dict(options or {})
    allowed = set(inspect.signature(MASK_BUILDERS[method]).parameters) - _METHOD_RESERVED
    for name in options:
        if name not in allowed:
            raise ValueError(
                f"method_options has no knob {name!r} for method={method!r}; allowed: {sorted(allowed)}"
            )
    if method == "flexprefill" and options:
        raise ValueError("method='flexprefill' takes its settings from config, not method_options")
    takes_scale = "scale" in inspect.signature(MASK_BUILDERS[method]).parameters
    return {"name": method, "options": options, "takes_scale": takes_scale}


MaskBuilder = tuple[Callable[..., Any], dict[str, Any], bool]
"""A method's mask builder, its knobs and whether it takes ``scale``."""


def _mask_builder(chosen: dict[str, Any] | None) -> MaskBuilder | None:
    """The mask builder of a stored method (``None``: FlexPrefill itself)."""
    if chosen is None or chosen["name"] == "flexprefill":
        return None
    from ..methods import MASK_BUILDERS

    return MASK_BUILDERS[chosen["name"]], chosen["options"], chosen["takes_scale"]


def get_flex_prefill_config(model: nn.Module | PreTrainedConfig) -> FlexPrefillConfig:
    """The :class:`FlexPrefillConfig` stored on ``model`` (or on a model config); defaults if none."""
    model_config = model.config if isinstance(model, nn.Module) else model
    return to_flex_prefill_config(getattr(model_config, CONFIG_ATTRIBUTE, None))


_SETTINGS_ATTRIBUTE = "_flex_prefill_settings"  # on a module: (config dict, method dict, parsed, builder)


def _module_settings(module: nn.Module) -> tuple[FlexPrefillConfig, MaskBuilder | None]:
    """The config (defaults if none) and mask builder of the model ``module`` belongs to.

    Parsed once per stored pair of dicts, which are treated as immutable (:func:`patch_model`
    replaces them). The parsed settings are cached on the module (not serialised with the
    model config), which keeps their validation out of ``torch.compile`` traces.
    """
    stored_config, stored_method = _stored_settings(getattr(module, "config", None))
    cached = getattr(module, _SETTINGS_ATTRIBUTE, None)  # a module attribute, not id(): traceable
    if cached is None or cached[0] is not stored_config or cached[1] is not stored_method:
        parsed = to_flex_prefill_config(stored_config)
        cached = (stored_config, stored_method, parsed, _mask_builder(stored_method))
        setattr(module, _SETTINGS_ATTRIBUTE, cached)
    return cached[2], cached[3]


def _stored_settings(model_config: Any) -> tuple[Any, Any]:
    """``model_config.flex_prefill_config`` and ``.flex_prefill_method`` (``None`` where unset).

    Eagerly they are read from the instance dict, where ``setattr`` and ``from_pretrained``
    put them: transformers' ``PreTrainedConfig.__getattribute__`` (attribute map, per-layer
    checks) costs 1.5-2 µs a read, a visible share of a short prompt's attention call.
    """
    if torch.compiler.is_compiling():
        return getattr(model_config, CONFIG_ATTRIBUTE, None), getattr(model_config, METHOD_ATTRIBUTE, None)
    try:
        attributes = object.__getattribute__(model_config, "__dict__")
    except AttributeError:  # no instance dict: nothing stored
        return None, None
    return attributes.get(CONFIG_ATTRIBUTE), attributes.get(METHOD_ATTRIBUTE)


def _model_configs(model: nn.Module) -> list[PreTrainedConfig]:
    """The configs of ``model``, of its sub-models and their ``sub_configs`` (each once)."""
    pending = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PreTrainedConfig)]
    found: dict[int, PreTrainedConfig] = {}
    while pending:
        model_config = pending.pop()
        if id(model_config) in found:
            continue
        found[id(model_config)] = model_config
        for key in getattr(model_config, "sub_configs", {}):
            sub = getattr(model_config, key, None)
            if isinstance(sub, PreTrainedConfig):
                pending.append(sub)
    return list(found.values())


# --------------------------------------------------------------------------- mask function

_AND_MASK = "and_masks.<locals>.and_mask"
_WINDOW_OVERLAY = "sliding_window_overlay.<locals>.inner_mask"
_PACKED = "packed_sequence_mask_function.<locals>.inner_mask"
_REMAP = "remap_positions_for_packed_sequence.<locals>.inner_mask"


def flex_prefill_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """The mask transformers hands to :func:`flex_prefill_attention_forward`: ``None`` or ``[B, Lk]``.

    Registered with ``AttentionMaskInterface``. Never builds an ``Lq × Lk`` mask: the causal
    rule is implicit and a sliding window comes from the layer's ``sliding_window`` argument.

    Args:
        batch_size, q_length, kv_length, q_offset, kv_offset: the sizes transformers computed;
            the queries must be the last ``q_length`` of the ``kv_length`` keys (DynamicCache).
        mask_function: transformers' mask pattern; only causal, optionally with a sliding
            window, is accepted (or/and overlays, packed sequences, chunked or bidirectional
            attention raise ``NotImplementedError``).
        attention_mask: the 2-D padding mask ``[B, >= kv_offset + kv_length]`` or ``None``.

    Returns:
        ``None`` when nothing is padded, else the padding mask of the keys, ``[B, Lk]`` bool
        (True: a real token). Checking "nothing is padded" is one host sync per forward,
        skipped under ``torch.compile`` (where the mask is returned as is). A prefill copies
        the mask to the host for it, and its layers read that copy instead of synchronising
        each; a decode step reads one flag (its layers use the mask on the device).
    """
    _check_mask_pattern(mask_function, kwargs)
    if isinstance(q_offset, Tensor) or q_offset + q_length != kv_offset + kv_length:
        raise NotImplementedError(
            "flex_prefill needs the queries to be the last positions of the keys (DynamicCache or no "
            f"cache); got q_offset={q_offset!r}, q_length={q_length}, kv_offset={kv_offset}, "
            f"kv_length={kv_length} (a StaticCache or pre-allocated cache is not supported)"
        )
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] < kv_offset + kv_length:
        raise ValueError(
            f"attention_mask must cover {kv_offset + kv_length} positions, got attention_mask.shape="
            f"{tuple(attention_mask.shape)}"
        )
    padding = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if torch.compiler.is_compiling():
        return padding
    if q_length == 1:  # decode: the layers use the mask on the device
        return None if bool(padding.all()) else padding
    on_host = padding.cpu()  # the one host synchronisation of a padded prefill
    if bool(on_host.all()):
        return None
    if padding.device.type != "cpu":  # every layer gets this tensor: spare each its own copy
        _PADDING_ON_HOST[padding] = on_host
    return padding


_PADDING_ON_HOST: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Host copies of the padding masks :func:`flex_prefill_mask` returned, while they live."""


def _check_mask_pattern(mask_function: Callable, kwargs: dict[str, Any]) -> None:
    """Raise ``NotImplementedError`` unless ``mask_function`` is causal (optionally windowed).

    Eagerly the pattern is unwrapped down to its elementary functions. Under ``torch.compile``
    closures cannot be inspected, so only the outer function and the ``use_vmap`` and
    bidirectional flags are checked (an ``and_masks`` pattern is trusted).
    """
    if torch.compiler.is_compiling():
        names = [getattr(mask_function, "__name__", "?")]
        supported = (
            (mask_function is causal_mask_function or names[0] == "and_mask")
            and not kwargs.get("use_vmap", False)
            and "allow_is_bidirectional_skip" not in kwargs
        )
    else:
        names = [getattr(leaf, "__qualname__", repr(leaf)) for leaf in _mask_leaves(mask_function)]
        allowed = ("causal_mask_function", _WINDOW_OVERLAY)
        supported = "causal_mask_function" in names and all(name in allowed for name in names)
    if not supported:
        raise NotImplementedError(
            "attn_implementation='flex_prefill' supports causal attention (optionally with a sliding "
            f"window) only; the model asked for a mask made of {names} (e.g. bidirectional, chunked, "
            "packed-sequence or image-token masks). Use attn_implementation='sdpa' for this model/input."
        )


def _mask_leaves(mask_function: Callable) -> list[Callable]:
    """The elementary mask functions of a transformers mask (``and_masks`` and packing unwrapped).

    A packed-sequence wrapper means real packing (transformers adds it outside
    ``torch.compile`` only when ``position_ids`` restart inside a row), which raises.
    """
    name = getattr(mask_function, "__qualname__", None)
    if name == _AND_MASK:
        parts = _closure(mask_function).get("mask_functions", ())
        return [leaf for part in parts for leaf in _mask_leaves(part)]
    if name in (_PACKED, _REMAP):
        raise NotImplementedError(
            "attn_implementation='flex_prefill' does not support packed sequences (position_ids that "
            "restart inside a row); pass an attention_mask or use attn_implementation='sdpa'"
        )
    return [mask_function]


def _closure(function: Callable) -> dict[str, Any]:
    """The free variables of a closure, by name."""
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None)
    if code is None or cells is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells, strict=True)}


# --------------------------------------------------------------------------- attention function


def flex_prefill_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function for ``attn_implementation="flex_prefill"``.

    Args:
        module: the attention layer; its ``config.flex_prefill_config`` (dict) configures the
            call, its ``layer_idx`` labels diagnostics.
        query: ``[B, Hq, Lq, D]``, the last ``Lq`` positions; key, value: ``[B, Hkv, Lk, D]``.
        attention_mask: ``None`` or the padding mask ``[B, Lk]`` from :func:`flex_prefill_mask`.
        scaling: softmax scale (default ``1/sqrt(D)``).
        dropout: must be 0 (inference only).
        sliding_window: the layer's window (a query sees the last ``sliding_window`` positions,
            itself included). Honoured exactly: when it is shorter than the keys the layer runs
            exact sliding-window attention (FlexAttention with a window block mask) instead of
            FlexPrefill.
        softcap: must be ``None`` (logit soft-capping is not supported).
        is_causal: must not be ``False``.
        kwargs: ``position_ids``, ``use_cache``, ``cache_position``, ``output_attentions``,
            ``output_hidden_states``, ``return_dict`` are ignored (no attention weights are
            returned); any other argument that is not ``None`` raises ``NotImplementedError``.

    Returns:
        ``(out [B, Lq, Hq, D], None)``. With padding, padded query rows are zeros.
    """
    _check_attention_arguments(module, dropout, softcap, is_causal, kwargs)
    config, method = _module_settings(module)
    records = _COLLECTORS.get(id(getattr(module, "config", None))) if _COLLECTORS else None
    layer_idx = getattr(module, "layer_idx", None)
    padding = _padding_mask(attention_mask, query, key)
    if padding is None:
        out, path, info = _attend(
            query, key, value, config, scaling, sliding_window, records is not None, method
        )
        if records is not None:
            records.append(LayerDiagnostics(layer_idx, None, path, info))
    elif query.shape[2] == 1:
        window = _binding_window(sliding_window, key.shape[2])
        out = decode_attention(query, key, value, scaling, window, padding)
        if records is not None:
            info = _dense_info(query, key, config)
            records.append(LayerDiagnostics(layer_idx, None, "dense", info))
    else:
        out = _attend_rows(
            query,
            key,
            value,
            padding,
            config,
            scaling,
            sliding_window,
            records,
            layer_idx,
            method,
        )
    return out.transpose(1, 2).contiguous(), None


def _check_attention_arguments(
    module: nn.Module, dropout: float, softcap: float | None, is_causal: bool | None, kwargs: dict[str, Any]
) -> None:
    """Reject every argument that would change the result and that flex_prefill cannot honour."""
    if dropout:
        raise NotImplementedError(
            f"attn_implementation='flex_prefill' is for inference: attention dropout is not supported, got "
            f"dropout={dropout!r} (call model.eval() or set attention_dropout=0)"
        )
    if softcap is not None:
        raise NotImplementedError(
            f"attn_implementation='flex_prefill' does not support attention logit soft-capping, got "
            f"softcap={softcap!r} (e.g. Gemma2's config.attn_logit_softcapping; set it to None or use "
            "attn_implementation='eager')"
        )
    if is_causal is False or not getattr(module, "is_causal", True):
        raise NotImplementedError(
            "attn_implementation='flex_prefill' supports causal (decoder) attention only"
        )
    for name, value in kwargs.items():
        if value is not None and name not in _IGNORED_KWARGS:
            shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
            raise NotImplementedError(
                f"attn_implementation='flex_prefill' does not support the attention argument {name}={shown}"
            )
    if kwargs.get("output_attentions"):
        logger.warning_once("attn_implementation='flex_prefill' does not return attention weights")


def _padding_mask(attention_mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor | None:
    """``None`` or the ``[B, Lk]`` bool padding mask; anything else raises."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else None
        raise NotImplementedError(
            f"attn_implementation='flex_prefill' takes a 2-D padding mask [batch, kv_len] only, got "
            f"attention_mask of type {type(attention_mask).__name__} and shape {shape} (custom 4-D masks: "
            "use attn_implementation='sdpa')"
        )
    expected = (query.shape[0], key.shape[2])
    if tuple(attention_mask.shape) != expected:
        raise ValueError(
            f"attention_mask must have shape [batch, kv_len] = {expected}, got {tuple(attention_mask.shape)}"
        )
    return attention_mask.to(device=key.device, dtype=torch.bool)


def _binding_window(sliding_window: int | None, kv_len: int) -> int | None:
    """The window when it excludes some key (``kv_len > sliding_window``), else ``None``."""
    if sliding_window is None or kv_len <= sliding_window:
        return None
    return sliding_window


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: FlexPrefillConfig,
    scale: float | None,
    sliding_window: int | None,
    want_info: bool,
    method: MaskBuilder | None = None,
) -> tuple[Tensor, Path, Any]:
    """Unpadded attention ``[B, Hq, Lq, Dv]`` of the last ``Lq`` positions, its path and info.

    ``method``: another mask builder and its knobs (see :func:`patch_model`), used for
    prefills of at least ``config.effective_min_seq_len(fa4=False)`` queries (the methods run
    with FlexAttention) instead of FlexPrefill; shorter ones run dense attention. Short
    prompts go straight to :func:`.attention.dense_attention`, the dense path of
    :func:`flex_prefill_attention` without its input checks (the model made the tensors;
    a short prompt's host time is a visible share of its attention).
    """
    window = _binding_window(sliding_window, k.shape[2])
    if window is not None and q.shape[2] > 1:
        out, active = sliding_window_attention(q, k, v, window, config.block_size, scale)
        info = _window_info(active, q, k, config) if want_info else None
        return out, "sliding_window", info
    if window is not None:
        out = decode_attention(q, k, v, scale, window, None)
        return out, "dense", _dense_info(q, k, config) if want_info else None
    if method is not None and q.shape[2] > 1 and q.shape[2] >= config.effective_min_seq_len(fa4=False):
        builder, options, takes_scale = method
        if takes_scale:
            options = {**options, "scale": scale}
        mask, info = builder(q, k, block_size=config.block_size, return_info=True, **options)
        return run_flex_attention(q, k, v, mask, scale), "method", info if want_info else None
    if method is not None or is_short_prompt(q, k, v, config):
        out = dense_attention(q, k, v, scale, config.attention_kernel)
        return out, "dense", _dense_info(q, k, config) if want_info else None
    if not want_info:
        return flex_prefill_attention(q, k, v, config=config, scale=scale), "flex_prefill", None
    out, info = flex_prefill_attention(q, k, v, config=config, scale=scale, return_info=True)
    return out, "flex_prefill" if info.sparse else "dense", info


def _attend_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    padding: Tensor,
    config: FlexPrefillConfig,
    scale: float | None,
    sliding_window: int | None,
    records: list[LayerDiagnostics] | None,
    layer_idx: int | None,
    method: MaskBuilder | None = None,
) -> Tensor:
    """Padded batch: each row's real tokens run alone through :func:`_attend`, scattered back.

    A Python loop over the batch rows (not over heads). ``padding`` is read on the host: the
    copy :func:`flex_prefill_mask` made for this forward, else one host sync.
    Padded query rows are zeros. Left (or right) padding slices views; other patterns gather.
    """
    batch, heads, q_len, _ = q.shape
    start = k.shape[2] - q_len  # absolute position of query 0
    out = q.new_zeros(batch, heads, q_len, v.shape[-1])
    on_host = _PADDING_ON_HOST.get(padding)
    for row, keep in enumerate(padding.cpu() if on_host is None else on_host):
        keys = keep.nonzero().flatten()
        n_queries = int((keys >= start).sum())
        if n_queries == 0:
            continue
        first, last = int(keys[0]), int(keys[-1])
        if last - first + 1 == keys.numel():
            key_index: slice | Tensor = slice(first, last + 1)
            query_index: slice | Tensor = slice(last + 1 - n_queries - start, last + 1 - start)
        elif _binding_window(sliding_window, keys.numel()) is not None:
            raise NotImplementedError(
                "attn_implementation='flex_prefill' honours a sliding window only for contiguous real tokens "
                f"(left or right padding); row {row} of attention_mask has holes"
            )
        else:
            key_index = keys.to(q.device)
            query_index = key_index[-n_queries:] - start
        result, path, info = _attend(
            q[row : row + 1, :, query_index],
            k[row : row + 1, :, key_index],
            v[row : row + 1, :, key_index],
            config,
            scale,
            sliding_window,
            records is not None,
            method,
        )
        out[row, :, query_index] = result[0]
        if records is not None:
            records.append(LayerDiagnostics(layer_idx, row, path, info))
    return out


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, block_size: int, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Exact causal sliding-window attention with compiled FlexAttention.

    Query ``i`` (absolute position ``p = Lk - Lq + i``) sees key ``t`` iff
    ``p - window < t <= p`` (transformers' ``sliding_window`` convention). The BlockMask is
    built from block indices (one mask broadcast over batch and heads), never from a token mask.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``; window: ``>= 1`` tokens.

    Returns:
        ``out [B, Hq, Lq, Dv]`` and the active blocks ``[nq, nk]`` bool.
    """
    layout = BlockLayout(q.shape[2], k.shape[2], block_size)
    active, full = _window_blocks(layout, window, q.device)
    kv_num, kv_indices = indices_from_map((active & ~full)[None, None])
    full_num, full_indices = indices_from_map(full[None, None])
    offset = torch.tensor(layout.offset, device=q.device, dtype=torch.int64)
    width = torch.tensor(window, device=q.device, dtype=torch.int64)

    def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        position = q_idx + offset
        return (kv_idx <= position) & (kv_idx > position - width)

    block_mask = BlockMask.from_kv_blocks(
        kv_num,
        kv_indices,
        full_num,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(layout.q_len, layout.kv_len),
        compute_q_blocks=False,
    )
    return run_flex_attention(q, k, v, block_mask, scale), active


def _window_blocks(layout: BlockLayout, window: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``[nq, nk]`` bool maps: blocks holding some in-window key, and blocks wholly in the window."""
    q_first, q_last = layout.query_block_positions(device)
    k_first, k_last = layout.key_block_positions(device)
    active = layout.visible(device) & (k_last[None, :] > q_first[:, None] - window)
    full = layout.full(device) & (k_first[None, :] > q_last[:, None] - window)
    return active, full


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None, window: int | None, padding: Tensor | None
) -> Tensor:
    """Dense attention of one query per row (the last position) with an O(Lk) key mask.

    Args:
        q: ``[B, Hq, 1, D]``; k, v: ``[B, Hkv, Lk, D]``; window: keys older than ``window``
            positions are dropped; padding: ``[B, Lk]`` bool (True: real key) or ``None``.

    Returns:
        ``[B, Hq, 1, Dv]``. The query heads of a key head are packed as rows, so no key is
        repeated for GQA.
    """
    batch, heads, _, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    allowed = torch.ones(1, kv_len, dtype=torch.bool, device=q.device)
    if window is not None:
        allowed = allowed & (torch.arange(kv_len, device=q.device) > kv_len - 1 - window)
    if padding is not None:
        allowed = allowed & padding
    packed = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(packed, k, v, attn_mask=allowed[:, None, None, :], scale=scale)
    return out.reshape(batch, heads, 1, v.shape[-1])


# --------------------------------------------------------------------------- diagnostics


@dataclass(frozen=True)
class LayerDiagnostics:
    """One attention call of one layer.

    Attributes:
        layer_idx: the attention module's ``layer_idx`` (``None`` if it has none).
        batch_index: ``None`` when the whole batch ran in one call; the row of a padded batch
            (each row runs alone) otherwise.
        path: ``"flex_prefill"`` (FlexPrefill's sparse mask), ``"dense"`` (decode, short
            prompt, or γ = 1 dense fallback of the attention entry point) or
            ``"sliding_window"`` (exact window attention of a windowed layer) or ``"method"``
            (another mask builder chosen with ``patch_model(..., method=...)``).
        info: the :class:`FlexPrefillInfo` of the call (a ``MethodInfo`` for ``"method"``),
            tensors ``[B, Hq]`` (``[1, Hq]`` for a row).
    """

    layer_idx: int | None
    batch_index: int | None
    path: Path
    info: FlexPrefillInfo


class DiagnosticsLog(list):
    """The :class:`LayerDiagnostics` of every attention call, in call order (a ``list``)."""

    def by_layer(self) -> dict[int | None, list[LayerDiagnostics]]:
        """The records grouped by ``layer_idx``."""
        grouped: dict[int | None, list[LayerDiagnostics]] = {}
        for record in self:
            grouped.setdefault(record.layer_idx, []).append(record)
        return grouped

    def summary(self) -> str:
        """One line per record: layer, row, path, length and mean density over heads."""
        lines = ["layer   row  path              q_len  kv_len  density"]
        for r in self:
            row = "-" if r.batch_index is None else str(r.batch_index)
            lines.append(
                f"{r.layer_idx!s:>5} {row:>5}  {r.path:<16s} {r.info.layout.q_len:6d} {r.info.layout.kv_len:7d}"
                f"  {float(r.info.density.float().mean()):7.3f}"
            )
        return "\n".join(lines)


_COLLECTORS: dict[int, DiagnosticsLog] = {}


@contextmanager
def collect_diagnostics(model: nn.Module) -> Iterator[DiagnosticsLog]:
    """Record a :class:`LayerDiagnostics` for every flex_prefill attention call of ``model``.

    Example::

        with collect_diagnostics(model) as log:
            model(input_ids)
        for record in log:
            print(record.layer_idx, record.path, record.info.density)

    Collection asks :func:`flex_prefill_attention` for its info (``return_info=True``).
    """
    keys = [id(model_config) for model_config in _model_configs(model)]
    if any(key in _COLLECTORS for key in keys):
        raise RuntimeError("collect_diagnostics is already active for this model")
    log = DiagnosticsLog()
    for key in keys:
        _COLLECTORS[key] = log
    try:
        yield log
    finally:
        for key in keys:
            _COLLECTORS.pop(key, None)


def _dense_info(q: Tensor, k: Tensor, config: FlexPrefillConfig) -> FlexPrefillInfo:
    layout = BlockLayout(q.shape[2], k.shape[2], config.block_size)
    return FlexPrefillInfo.dense(q.shape[0], q.shape[1], layout, config, q.device)


def _window_info(active: Tensor, q: Tensor, k: Tensor, config: FlexPrefillConfig) -> FlexPrefillInfo:
    layout = BlockLayout(q.shape[2], k.shape[2], config.block_size)
    batch, heads = q.shape[0], q.shape[1]
    info = FlexPrefillInfo.from_selection(
        active.expand(batch, heads, -1, -1),
        torch.zeros(batch, heads, dtype=torch.bool, device=q.device),
        torch.full((batch, heads), float("nan"), device=q.device),
        layout,
        config,
    )
    return dataclasses.replace(info, sparse=False)


# --------------------------------------------------------------------------- registration


def register_flex_prefill() -> None:
    """Register ``"flex_prefill"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, flex_prefill_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flex_prefill_mask)


register_flex_prefill()
