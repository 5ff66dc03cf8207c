"""transformers integration: ``attn_implementation="flex_prefill"`` on tiny random models (CPU).

Every family is a 2-layer model (hidden 64, 4 query heads, 2 key/value heads, head_dim 16,
vocab 100) built from its config. Prompts are 150 tokens with ``block_size=16``, so the
FlexPrefill mask has 10 blocks per side. At γ = 1 the logits must equal the reference
implementation's (``sdpa``, or ``eager`` for Gemma2 which has no sdpa); at γ = 0.9 the model
is made *local* (see :func:`make_local`) so that FlexPrefill really drops blocks, which the
diagnostics prove (density < 1).

Compiled FlexAttention on CPU costs seconds per new shape family; the tests share one
(batch 1, 4 heads, head_dim 16, float32, block 16) and the whole file runs in a few minutes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    StaticCache,
)
from transformers.masking_utils import (
    AttentionMaskInterface,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

import flexprefill_torch
from flexprefill_torch import FlexPrefillConfig, collect_diagnostics, get_flex_prefill_config, patch_model
from flexprefill_torch.integrations.transformers import (
    ATTN_IMPLEMENTATION,
    CONFIG_ATTRIBUTE,
    METHOD_ATTRIBUTE,
    flex_prefill_attention_forward,
    flex_prefill_mask,
    to_flex_prefill_config,
)

COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 100,
}
SEQ = 150
PAD = 37  # left padding of the second row in batch tests

FAMILIES: dict[str, Callable[[], tuple[object, str]]] = {
    "llama": lambda: (LlamaConfig(**COMMON), "sdpa"),
    # Mistral's window (64) is shorter than the prompt: every layer runs exact window attention.
    "mistral": lambda: (MistralConfig(**COMMON, sliding_window=64), "sdpa"),
    "qwen2": lambda: (Qwen2Config(**COMMON), "sdpa"),
    "qwen3": lambda: (Qwen3Config(**COMMON), "sdpa"),
    # Gemma2: one sliding (48) and one full layer, query_pre_attn_scalar scaling; softcapping
    # is not supported, so it is switched off (see test_gemma2_softcap_is_rejected).
    "gemma2": lambda: (Gemma2Config(**COMMON, sliding_window=48, attn_logit_softcapping=None), "eager"),
    "gemma3": lambda: (
        Gemma3TextConfig(**COMMON, sliding_window=48, layer_types=["sliding_attention", "full_attention"]),
        "sdpa",
    ),
}
WINDOWED_EVERYWHERE = {"mistral"}  # families where no layer runs FlexPrefill at SEQ tokens

# gamma = 1 with min_seq_len = 0 and no density rule: the sparse machinery runs and keeps all blocks.
DENSE = {"block_size": 16, "flex_prefill_gamma": 1.0, "flex_prefill_min_budget": 32, "min_seq_len": 0,
         "max_density": None}
SPARSE = {**DENSE, "flex_prefill_gamma": 0.9, "flex_prefill_min_budget": 16}
EXACT = {"atol": 2e-5, "rtol": 2e-5}  # float32, same weights, different kernels


@pytest.fixture(autouse=True, scope="module")
def _room_for_recompiles():
    """The families use a few scales and masks; keep the compiled kernel from falling back to eager."""
    config = torch._dynamo.config
    saved = config.recompile_limit
    config.recompile_limit = 64
    yield
    config.recompile_limit = saved


def build(family: str, seed: int = 0) -> tuple[PreTrainedModel, str]:
    """A tiny random model of ``family`` in eval mode, on its reference implementation."""
    config, reference = FAMILIES[family]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=reference).eval(), reference


def tokens(batch: int, length: int, seed: int = 1) -> Tensor:
    """Random ids avoiding 0..2 (pad/eos/bos of some families), ``[batch, length]``."""
    return torch.randint(3, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def make_local(model: PreTrainedModel, strength: float = 400.0) -> PreTrainedModel:
    """Make attention depend mostly on relative position and peak at offset 0.

    Every embedding gets a large shared component, the query projection copies the key
    projection (so ``q ≈ k``, and RoPE makes ``q·k`` largest at offset 0), and the softmax
    scale is multiplied by ``strength``. Attention becomes a sharp slash pattern, which
    FlexPrefill covers with few blocks at γ = 0.9. The reference implementation uses the
    same weights and scale.
    """
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        shared = torch.randn(embedding.shape[1], generator=torch.Generator().manual_seed(7)) * embedding.std()
        embedding.mul_(0.2).add_(5.0 * shared)
        for layer in model.model.layers:
            attn = layer.self_attn
            group = attn.q_proj.out_features // attn.k_proj.out_features
            for name in ("weight", "bias"):
                source = getattr(attn.k_proj, name, None)
                if source is not None:
                    tiled = source.unflatten(0, (-1, attn.head_dim)).repeat_interleave(group, 0).flatten(0, 1)
                    getattr(attn.q_proj, name).copy_(tiled)
            if hasattr(attn, "q_norm"):
                attn.q_norm.weight.copy_(attn.k_norm.weight)
            attn.scaling *= strength
    return model


def left_padded(x: Tensor, pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row 1 of ``x`` left-padded by ``pad``: (ids, attention_mask, position_ids)."""
    ids, mask = x.clone(), torch.ones_like(x)
    ids[1, :pad], mask[1, :pad] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def logits(model: PreTrainedModel, ids: Tensor, **kwargs) -> Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def greedy(model: PreTrainedModel, ids: Tensor, mask: Tensor | None = None, steps: int = 4) -> Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)


def chunked(model: PreTrainedModel, ids: Tensor, split: int, cache: DynamicCache | None = None) -> Tensor:
    """Logits of ``ids`` prefilled in two chunks on one cache."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    with torch.no_grad():
        first = model(ids[:, :split], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, split:], past_key_values=cache, use_cache=True).logits
    return torch.cat([first, second], dim=1)


# --------------------------------------------------------------------------- registration, config


def test_registered_with_transformers() -> None:
    assert ATTN_IMPLEMENTATION in AttentionInterface().valid_keys()
    assert ATTN_IMPLEMENTATION in AttentionMaskInterface._global_mapping
    assert flexprefill_torch.patch_model is patch_model


def test_config_from_paper_keys_and_fields() -> None:
    paper = {
        "block_size": 64,
        "flex_prefill_gamma": 0.95,
        "flex_prefill_tau": 0.2,
        "flex_prefill_min_budget": 512,
        "flex_prefill_max_budget": 4096,
    }
    config = to_flex_prefill_config(paper)
    assert (config.block_size, config.gamma, config.tau, config.min_budget, config.max_budget) == (
        64, 0.95, 0.2, 512, 4096
    )
    assert to_flex_prefill_config({"gamma": 0.5, "min_seq_len": 0}) == FlexPrefillConfig(gamma=0.5, min_seq_len=0)
    assert to_flex_prefill_config({"flex_prefill_min_budget": None}).min_budget == 0
    assert to_flex_prefill_config({"max_density": None}).max_density is None
    assert to_flex_prefill_config(None) == FlexPrefillConfig()
    config = FlexPrefillConfig(gamma=0.8)
    assert to_flex_prefill_config(config) is config


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="flex_prefill_gama"):
        to_flex_prefill_config({"flex_prefill_gama": 0.9})
    with pytest.raises(ValueError, match="conflicts"):
        to_flex_prefill_config({"gamma": 0.9, "flex_prefill_gamma": 0.8})
    with pytest.raises(ValueError, match="gamma"):
        to_flex_prefill_config({"flex_prefill_gamma": 1.5})
    with pytest.raises(TypeError, match="config"):
        to_flex_prefill_config([("gamma", 0.9)])  # type: ignore[arg-type]


def test_patch_model_stores_config_and_round_trips(tmp_path) -> None:
    model, _ = build("llama")
    assert patch_model(model, SPARSE) is model
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    expected = to_flex_prefill_config(SPARSE)
    assert get_flex_prefill_config(model) == expected
    assert isinstance(getattr(model.config, CONFIG_ATTRIBUTE), dict)
    for layer in model.model.layers:  # the attention modules read the same config object
        assert get_flex_prefill_config(layer.self_attn.config) == expected

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION)
    assert loaded.config._attn_implementation == ATTN_IMPLEMENTATION
    assert get_flex_prefill_config(loaded) == expected
    override = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=ATTN_IMPLEMENTATION, **{CONFIG_ATTRIBUTE: {"flex_prefill_gamma": 0.8}}
    )
    assert get_flex_prefill_config(override).gamma == 0.8

    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION


def test_unconfigured_model_uses_defaults() -> None:
    config, _ = FAMILIES["llama"]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert get_flex_prefill_config(model) == FlexPrefillConfig()


def test_attention_reads_the_stored_settings_of_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers parse the stored dicts once, yet a dict replaced on the config (by
    ``patch_model`` or by hand) takes effect at the next call."""
    import flexprefill_torch.integrations.transformers as integration

    model, _ = build("llama")
    seen: list[tuple[float, int, str | None]] = []
    real = integration._attend

    def spy(q: Tensor, k: Tensor, v: Tensor, config: FlexPrefillConfig, *args: object) -> object:
        method = args[-1]
        seen.append((config.gamma, config.block_size, None if method is None else method[0].__name__))
        return real(q, k, v, config, *args)

    monkeypatch.setattr(integration, "_attend", spy)
    layers = COMMON["num_hidden_layers"]
    ids = tokens(1, SEQ)

    def settings_of_a_forward() -> list[tuple[float, int, str | None]]:
        seen.clear()
        logits(model, ids)
        return seen

    model.set_attn_implementation(ATTN_IMPLEMENTATION)  # switched without patch_model: the defaults
    assert settings_of_a_forward() == [(0.9, 128, None)] * layers
    patch_model(model, {**SPARSE, "flex_prefill_gamma": 0.8})
    assert settings_of_a_forward() == [(0.8, 16, None)] * layers
    setattr(model.config, CONFIG_ATTRIBUTE, {**SPARSE, "flex_prefill_gamma": 0.7})  # by hand
    assert settings_of_a_forward() == [(0.7, 16, None)] * layers
    patch_model(model, SPARSE, method="streaming", method_options={"sink_tokens": 16, "local_tokens": 32})
    assert settings_of_a_forward() == [(0.9, 16, "streaming_block_mask")] * layers
    setattr(model.config, METHOD_ATTRIBUTE, {"name": "flexprefill", "options": {}, "takes_scale": False})
    assert settings_of_a_forward() == [(0.9, 16, None)] * layers


@pytest.mark.parametrize("fa4_runs", [False, True])
def test_routing_by_prompt_length(monkeypatch: pytest.MonkeyPatch, fa4_runs: bool) -> None:
    """FlexPrefill from its kernel's crossover; another method only from FlexAttention's
    (its kernel), dense below — never FlexPrefill in place of the chosen method."""
    import flexprefill_torch.attention as attention_module
    import flexprefill_torch.integrations.transformers as integration
    from flexprefill_torch.config import FA4_MIN_SEQ_LEN, FLEX_MIN_SEQ_LEN

    if fa4_runs:
        monkeypatch.setattr(attention_module, "fa4_unusable_reason", lambda *args: None)
    monkeypatch.setattr(integration, "dense_attention", lambda q, *args: "dense")
    monkeypatch.setattr(integration, "flex_prefill_attention", lambda q, *args, **kwargs: "flex_prefill")
    monkeypatch.setattr(integration, "run_flex_attention", lambda q, k, v, mask, scale: mask)
    method = (lambda q, k, **kwargs: ("method", None), {}, False)
    config = FlexPrefillConfig()

    def routes(length: int, builder: object) -> str:
        q, k = torch.empty(1, 4, length, 8, device="meta"), torch.empty(1, 2, length, 8, device="meta")
        return integration._attend(q, k, k, config, None, None, False, builder)[0]

    crossover = FA4_MIN_SEQ_LEN if fa4_runs else FLEX_MIN_SEQ_LEN
    assert [routes(n, None) for n in (1, 512, crossover - 1, crossover)] == ["dense"] * 3 + ["flex_prefill"]
    assert [routes(n, method) for n in (1, 512, FA4_MIN_SEQ_LEN, FLEX_MIN_SEQ_LEN - 1)] == ["dense"] * 4
    assert routes(FLEX_MIN_SEQ_LEN, method) == "method"

# --------------------------------------------------------------------------- masks stay O(S)


def test_mask_function_never_builds_a_square_mask() -> None:
    model, _ = build("gemma2")
    patch_model(model, DENSE)
    embeds = torch.zeros(2, SEQ, COMMON["hidden_size"])
    ones = torch.ones(2, SEQ, dtype=torch.long)
    for create in (create_causal_mask, create_sliding_window_causal_mask):
        assert create(config=model.config, inputs_embeds=embeds, attention_mask=None, past_key_values=None) is None
        assert create(config=model.config, inputs_embeds=embeds, attention_mask=ones, past_key_values=None) is None
        _, mask, _ = left_padded(ones, PAD)
        padding = create(config=model.config, inputs_embeds=embeds, attention_mask=mask, past_key_values=None)
        assert padding.shape == (2, SEQ) and padding.dtype == torch.bool
        assert torch.equal(padding, mask.bool())


def test_mask_function_slices_the_keys_of_a_cache() -> None:
    """A sliding-window cache layer holds keys 13..20 of 21: the mask covers exactly those."""
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, :3] = False  # padding that fell out of the cached window: nothing left to mask
    assert flex_prefill_mask(2, 1, 8, q_offset=20, kv_offset=13, attention_mask=mask) is None
    mask[1, 15] = False
    sliced = flex_prefill_mask(2, 1, 8, q_offset=20, kv_offset=13, attention_mask=mask)
    assert torch.equal(sliced, mask[:, 13:21])
    with pytest.raises(NotImplementedError, match="StaticCache"):
        flex_prefill_mask(2, 5, 64, q_offset=0, kv_offset=0, attention_mask=None)


# --------------------------------------------------------------------------- rejected features


def test_gemma2_softcap_is_rejected() -> None:
    config = Gemma2Config(**COMMON, sliding_window=48, attn_logit_softcapping=50.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    patch_model(model, DENSE)
    with pytest.raises(NotImplementedError, match=r"softcap=50\.0"):
        logits(model, tokens(1, 40))


def test_dropout_is_rejected() -> None:
    config = LlamaConfig(**COMMON, attention_dropout=0.1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    patch_model(model, DENSE)
    with pytest.raises(NotImplementedError, match=r"dropout=0\.1"):
        model(tokens(1, 40))


def test_unsupported_inputs_raise() -> None:
    model, _ = build("llama")
    patch_model(model, DENSE)
    x = tokens(1, 40)
    square = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
    with pytest.raises(NotImplementedError, match="2-D padding mask"):
        logits(model, x, attention_mask=square)
    packed = torch.cat([torch.arange(20), torch.arange(20)])[None]
    with pytest.raises(NotImplementedError, match="packed sequences"):
        logits(model, x, position_ids=packed, use_cache=False)
    with pytest.raises(NotImplementedError, match="StaticCache"):
        logits(model, x, past_key_values=StaticCache(config=model.config, max_cache_len=64), use_cache=True)

    config = Gemma3TextConfig(**COMMON, sliding_window=48, use_bidirectional_attention=True)
    bidirectional = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    patch_model(bidirectional, DENSE)
    with pytest.raises(NotImplementedError, match="causal"):
        logits(bidirectional, x)


def test_unknown_attention_arguments_raise() -> None:
    model, _ = build("llama")
    module = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(NotImplementedError, match="s_aux"):
        flex_prefill_attention_forward(module, q, k, k, None, s_aux=torch.zeros(4))
    with pytest.raises(NotImplementedError, match="causal"):
        flex_prefill_attention_forward(module, q, k, k, None, is_causal=False)


# --------------------------------------------------------------------------- families


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gamma_one_matches_reference(family: str) -> None:
    """γ = 1: logits, one-shot and chunked prefill, and greedy decoding equal the reference."""
    model, reference = build(family)
    x = tokens(1, SEQ)
    ref_logits, ref_tokens = logits(model, x), greedy(model, x)
    ref_chunked = chunked(model, x, split=90)

    patch_model(model, DENSE)
    with collect_diagnostics(model) as log:
        out = logits(model, x)
    expected_path = "sliding_window" if family in WINDOWED_EVERYWHERE else "flex_prefill"
    assert expected_path in {record.path for record in log}
    torch.testing.assert_close(out, ref_logits, **EXACT)
    torch.testing.assert_close(chunked(model, x, split=90), ref_logits, **EXACT)
    torch.testing.assert_close(ref_chunked, ref_logits, **EXACT)
    assert torch.equal(greedy(model, x), ref_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sparse_prefill_is_close_and_sparse(family: str) -> None:
    """γ = 0.9 on a local-attention model: finite, close, and some head drops blocks."""
    model, reference = build(family)
    make_local(model)
    x = tokens(1, SEQ)
    ref = logits(model, x)

    patch_model(model, SPARSE)
    with collect_diagnostics(model) as log:
        out = logits(model, x)
    assert torch.isfinite(out).all()
    if family in WINDOWED_EVERYWHERE:  # exact window attention, whatever γ
        assert {record.path for record in log} == {"sliding_window"}
        torch.testing.assert_close(out, ref, **EXACT)
        return
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    flex = [record for record in log if record.path == "flex_prefill"]
    assert flex, [record.path for record in log]
    assert min(float(record.info.density.min()) for record in flex) < 1.0

    # Prefill on top of a cache: the second chunk runs FlexPrefill with Lq < Lk.
    with collect_diagnostics(model) as log:
        out_chunked = chunked(model, x, split=70)
    assert torch.isfinite(out_chunked).all()
    torch.testing.assert_close(out_chunked, ref, atol=1e-2, rtol=1e-2)
    offset_calls = [r for r in log if r.path == "flex_prefill" and r.info.layout.q_len < r.info.layout.kv_len]
    assert offset_calls and offset_calls[0].info.layout.q_len == SEQ - 70


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_left_padding_equals_rows_alone(family: str) -> None:
    """A left-padded batch: every row's real positions equal running that prompt alone."""
    model, reference = build(family)
    make_local(model)
    ids, mask, positions = left_padded(tokens(2, SEQ), PAD)

    patch_model(model, DENSE)  # γ = 1 against the reference implementation's padded batch
    out = logits(model, ids, attention_mask=mask, position_ids=positions)
    model.set_attn_implementation(reference)
    ref = logits(model, ids, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(out[0], ref[0], **EXACT)
    torch.testing.assert_close(out[1, PAD:], ref[1, PAD:], **EXACT)

    patch_model(model, SPARSE)  # γ = 0.9 against each row alone
    with collect_diagnostics(model) as log:
        out = logits(model, ids, attention_mask=mask, position_ids=positions)
    assert {record.batch_index for record in log} == {0, 1}
    alone = [logits(model, ids[:1]), logits(model, ids[1:, PAD:])]
    torch.testing.assert_close(out[:1], alone[0], **EXACT)
    torch.testing.assert_close(out[1:, PAD:], alone[1], **EXACT)


@pytest.mark.slow
def test_padded_generate_equals_rows_alone() -> None:
    """Greedy decoding of a left-padded batch (masked dense decode) equals each prompt alone."""
    model, _ = build("llama")
    patch_model(model, DENSE)
    ids, mask, _ = left_padded(tokens(2, SEQ), PAD)
    batch = greedy(model, ids, mask, steps=5)
    assert torch.equal(batch[0, SEQ:], greedy(model, ids[:1], steps=5)[0, SEQ:])
    assert torch.equal(batch[1, SEQ:], greedy(model, ids[1:, PAD:], steps=5)[0, SEQ - PAD :])


@pytest.mark.slow
def test_sliding_window_beyond_the_window_in_decode_and_chunks() -> None:
    """A full-length cache (no window cropping): chunked prefill and decode honour the window."""
    model, _ = build("mistral")
    x = tokens(1, SEQ + 3)
    ref = chunked(model, x[:, :SEQ], split=100, cache=DynamicCache())
    with torch.no_grad():
        cache = DynamicCache()
        model(x[:, :SEQ], past_key_values=cache, use_cache=True)
        ref_decode = [model(x[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(SEQ, SEQ + 3)]

    patch_model(model, SPARSE)
    with collect_diagnostics(model) as log:
        out = chunked(model, x[:, :SEQ], split=100, cache=DynamicCache())
    assert {(r.path, r.info.layout.q_len, r.info.layout.kv_len) for r in log} >= {("sliding_window", 50, SEQ)}
    torch.testing.assert_close(out, ref, **EXACT)
    with torch.no_grad():
        cache = DynamicCache()
        model(x[:, :SEQ], past_key_values=cache, use_cache=True)
        for step, i in enumerate(range(SEQ, SEQ + 3)):
            out = model(x[:, i : i + 1], past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(out, ref_decode[step], **EXACT)


def test_dense_prefill_takes_the_projections_as_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """A short prompt's dense attention gets transformers' transposed query view, not a copy
    (SDPA takes it as it is); only the compiled FlexAttention wants one layout. (Keys and
    values come out of the cache contiguous here.)"""
    import flexprefill_torch.integrations.transformers as integration

    model, _ = build("llama")
    patch_model(model)  # defaults: SEQ tokens is a short prompt, dense attention
    seen: list[bool] = []
    real = integration.dense_attention

    def spy(q: Tensor, k: Tensor, v: Tensor, *args: object) -> Tensor:
        seen.append(q.is_contiguous())
        return real(q, k, v, *args)

    monkeypatch.setattr(integration, "dense_attention", spy)
    logits(model, tokens(1, SEQ))
    assert seen == [False] * COMMON["num_hidden_layers"]


@pytest.mark.slow
def test_prompt_lengths_padding_and_chunks_do_not_recompile() -> None:
    """After one warm-up of each kind, new lengths, chunks and padded rows reuse the kernel."""
    from torch._dynamo.utils import counters

    model, _ = build("llama")
    patch_model(model, SPARSE)

    def run(length: int, pad: int = 0, split: int | None = None) -> None:
        ids = tokens(2 if pad else 1, length, seed=length)
        if split is not None:
            chunked(model, ids, split)
        elif pad:
            ids, mask, positions = left_padded(ids, pad)
            logits(model, ids, attention_mask=mask, position_ids=positions)
        else:
            logits(model, ids)

    for kind in ({}, {"split": 100}, {"pad": PAD}):  # warm-up: one graph per kind at most
        run(SEQ, **kind)
    before = counters["stats"]["unique_graphs"]
    for length in (120, 170, 233):
        for kind in ({}, {"split": length // 2}, {"pad": length // 3}):
            run(length, **kind)
    assert counters["stats"]["unique_graphs"] == before


# --------------------------------------------------------------------------- diagnostics


@pytest.mark.slow
def test_collect_diagnostics_reports_every_layer_and_head() -> None:
    model, _ = build("llama")
    make_local(model)
    patch_model(model, SPARSE)
    x = tokens(1, SEQ)
    with collect_diagnostics(model) as log:
        logits(model, x)
        with pytest.raises(RuntimeError, match="already active"), collect_diagnostics(model):
            pass
    assert [record.layer_idx for record in log] == [0, 1]
    assert set(log.by_layer()) == {0, 1}
    for record in log:
        assert record.path == "flex_prefill" and record.batch_index is None
        assert record.info.density.shape == (1, COMMON["num_attention_heads"])
        assert record.info.js_distance.shape == (1, COMMON["num_attention_heads"])
        assert record.info.layout.q_len == SEQ
    assert "flex_prefill" in log.summary()
    logits(model, x)  # outside the context nothing is recorded
    assert len(log) == 2


# --------------------------------------------------------------------------- compile, accelerate


@pytest.mark.slow
def test_torch_compile_whole_model_without_graph_breaks() -> None:
    """Without a cache the whole model (mask function, selection, FlexAttention) is one graph.

    Inductor on CPU cannot lower a FlexAttention whose BlockMask is computed inside the same
    graph (``NoValidChoicesError``), so the compiled run uses ``aot_eager``; the GPU suite
    compiles with inductor. With a DynamicCache, dynamo breaks the graph in transformers'
    cache code (``DynamicLayer.lazy_initialization``), as it does for transformers' own
    ``flex_attention``; the result must still be right.
    """
    model, _ = build("llama")
    make_local(model)
    patch_model(model, SPARSE)
    x = tokens(1, SEQ)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x, use_cache=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    # aot_eager runs FlexAttention unfused (all blocks, mask_mod only): compare at γ = 1.
    patch_model(model, DENSE)
    eager = logits(model, x, use_cache=False)
    eager_cached = logits(model, x, use_cache=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(logits(compiled, x, use_cache=False), eager, **EXACT)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(logits(compiled, x, use_cache=True), eager_cached, **EXACT)
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("device_map", [{"": "cpu"}, "cpu", "auto"])
def test_accelerate_device_map_loading(tmp_path, device_map) -> None:
    model, _ = build("llama")
    x = tokens(1, SEQ)
    ref = logits(model, x)
    patch_model(model, DENSE)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=ATTN_IMPLEMENTATION, device_map=device_map
    ).eval()
    assert loaded.config._attn_implementation == ATTN_IMPLEMENTATION
    assert get_flex_prefill_config(loaded) == to_flex_prefill_config(DENSE)
    assert loaded.device.type == "cpu"
    torch.testing.assert_close(logits(loaded, x), ref, **EXACT)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, options",
    [("flashprefill", {"alpha": 0.1}), ("streaming", {"sink_tokens": 16, "local_tokens": 64}),
     ("xattention", {"threshold": 1.0})],
)
def test_other_methods_selectable_in_the_integration(method: str, options: dict) -> None:
    """patch_model(method=...) prefills with that mask builder; decode stays dense."""
    from flexprefill_torch.methods import MASK_BUILDERS

    model, _ = build("llama")
    make_local(model)
    ids = tokens(1, 160)
    with torch.no_grad():
        reference = model(ids).logits
        patch_model(model, {"block_size": 16, "min_seq_len": 0}, method=method, method_options=options)
        with collect_diagnostics(model) as log:
            logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert {record.path for record in log} == {"method"}
    assert all(record.info.method == method for record in log)
    if method == "xattention":  # threshold 1 keeps every visible block: exactly dense
        torch.testing.assert_close(logits, reference, atol=2e-5, rtol=2e-5)
    else:
        assert any((record.info.density < 1).any() for record in log), "the method pruned nothing"
    assert method in MASK_BUILDERS


def test_method_choice_is_validated() -> None:
    model, _ = build("llama")
    with pytest.raises(ValueError, match="method="):
        patch_model(model, method="nonsense")
    with pytest.raises(ValueError, match="'beta'"):
        patch_model(model, method="flashprefill", method_options={"beta": 1})
