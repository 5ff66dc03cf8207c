"""GPU: ``attn_implementation="flex_prefill"`` at long context (run with ``pytest -m gpu -s``).

A tiny Llama (2 layers, head_dim 128, bf16) prefills 16k and 32k tokens. The tests print the
prefill time and ``torch.cuda.max_memory_allocated`` next to the ``sdpa`` implementation and
assert correctness only: finite logits, and at γ = 1 logits close to sdpa's (bf16 tolerance).
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from flexprefill_torch import collect_diagnostics, patch_model

LENGTHS = [16384, 32768]
MODEL = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 65536,
}
DENSE = {"block_size": 128, "flex_prefill_gamma": 1.0, "min_seq_len": 0, "max_density": None}
SPARSE = {"block_size": 128, "flex_prefill_gamma": 0.9, "flex_prefill_min_budget": 1024, "min_seq_len": 0, "max_density": None}


def build(device: torch.device) -> PreTrainedModel:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL), attn_implementation="sdpa")
    return model.to(device=device, dtype=torch.bfloat16).eval()


def make_local(model: PreTrainedModel, strength: float = 400.0) -> PreTrainedModel:
    """Sharp relative-position attention (q ≈ k, shared embedding component, larger scale).

    Random weights attend almost uniformly, which FlexPrefill cannot prune; this gives the
    sparse path something to drop (same construction as ``tests/test_transformers.py``).
    """
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        generator = torch.Generator(device=embedding.device).manual_seed(7)
        shared = torch.randn(embedding.shape[1], generator=generator, device=embedding.device)
        embedding.mul_(0.2).add_(5.0 * embedding.float().std() * shared.to(embedding.dtype))
        for layer in model.model.layers:
            attn = layer.self_attn
            group = attn.q_proj.out_features // attn.k_proj.out_features
            tiled = attn.k_proj.weight.unflatten(0, (-1, attn.head_dim)).repeat_interleave(group, 0)
            attn.q_proj.weight.copy_(tiled.flatten(0, 1))
            attn.scaling *= strength
    return model


def prefill(model: PreTrainedModel, ids: Tensor, label: str) -> Tensor:
    """Last-position logits of one prefill; prints time and peak memory (after a warm-up run
    of the same length, so JIT compilation is not timed)."""
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)  # warm-up: compiles flex and the Triton kernels
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model(ids, use_cache=False, logits_to_keep=1).logits
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"{label:<28s} L={ids.shape[1]:6d}  prefill {elapsed * 1e3:8.1f} ms  peak {peak:8.0f} MiB")  # noqa: T201
    return out.float()


def hidden_states(model: PreTrainedModel, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.model(ids, use_cache=False).last_hidden_state.float()


@pytest.mark.gpu
@pytest.mark.parametrize("length", LENGTHS)
def test_long_prefill_gamma_one_matches_sdpa(cuda: torch.device, length: int) -> None:
    model = build(cuda)
    ids = torch.randint(3, MODEL["vocab_size"], (1, length), device=cuda)
    ref_logits = prefill(model, ids, "sdpa")
    ref_hidden = hidden_states(model, ids)
    patch_model(model, DENSE)
    out_logits = prefill(model, ids, "flex_prefill gamma=1")
    out_hidden = hidden_states(model, ids)
    assert torch.isfinite(out_logits).all() and torch.isfinite(out_hidden).all()
    torch.testing.assert_close(out_logits, ref_logits, atol=5e-2, rtol=5e-2)
    scale = ref_hidden.abs().mean()
    assert (out_hidden - ref_hidden).abs().mean() < 2e-2 * scale


@pytest.mark.gpu
@pytest.mark.parametrize("length", LENGTHS)
def test_long_prefill_sparse(cuda: torch.device, length: int) -> None:
    model = make_local(build(cuda))
    ids = torch.randint(3, MODEL["vocab_size"], (1, length), device=cuda)
    ref = prefill(model, ids, "sdpa (local model)")
    patch_model(model, SPARSE)
    out = prefill(model, ids, "flex_prefill gamma=0.9")
    with collect_diagnostics(model) as log, torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
    densities = [float(record.info.density.mean()) for record in log]
    print(f"{'':28s} L={length:6d}  density per layer {[round(d, 3) for d in densities]}")  # noqa: T201
    assert torch.isfinite(out).all()
    assert all(record.path == "flex_prefill" for record in log)
    assert min(densities) < 1.0
    assert (out - ref).abs().max() < 0.25 * ref.abs().max() + 1.0  # close-ish, not equal


@pytest.mark.gpu
def test_whole_model_inductor_compile(cuda: torch.device) -> None:
    """torch.compile(model) with inductor (triton): one graph without cache, result as eager."""
    model = build(cuda)
    patch_model(model, DENSE)
    ids = torch.randint(3, MODEL["vocab_size"], (1, 8192), device=cuda)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits.float()
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(ids, use_cache=False)
        print(f"graphs {explanation.graph_count}, breaks {explanation.graph_break_count}")  # noqa: T201
        compiled = torch.compile(model)
        out = compiled(ids, use_cache=False).logits.float()
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(out, eager, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_padded_generate_gpu(cuda: torch.device) -> None:
    """A left-padded batch generates the same greedy tokens as each prompt alone (γ = 1)."""
    model = build(cuda)
    patch_model(model, DENSE)
    ids = torch.randint(3, MODEL["vocab_size"], (2, 4096), device=cuda)
    mask = torch.ones_like(ids)
    ids[1, :1000], mask[1, :1000] = 0, 0
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kwargs)
        first = model.generate(ids[:1], attention_mask=mask[:1], **kwargs)
        second = model.generate(ids[1:, 1000:], attention_mask=mask[1:, 1000:], **kwargs)
    # bf16 may flip near-ties; compare the first tokens, which depend only on the prefill
    assert torch.equal(batch[0, 4096:4098], first[0, 4096:4098])
    assert torch.equal(batch[1, 4096:4098], second[0, 3096:3098])


@pytest.mark.gpu
def test_padded_prefill_synchronises_once_per_forward(cuda: torch.device) -> None:
    """The padding mask is read on the host once per forward, not once per layer: the host
    synchronisations of a padded prefill do not grow with the number of layers."""
    ids = torch.randint(3, MODEL["vocab_size"], (3, 512), device=cuda)
    mask = torch.ones_like(ids)
    mask[1, :100], mask[2, :300] = 0, 0

    def synchronisations(layers: int) -> int:
        torch.manual_seed(0)
        config = LlamaConfig(**{**MODEL, "num_hidden_layers": layers})
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(cuda, torch.bfloat16).eval()
        patch_model(model)
        with torch.no_grad():
            model(ids, attention_mask=mask)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with pytest.warns(UserWarning) as caught:
                    model(ids, attention_mask=mask)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert synchronisations(4) == synchronisations(1) >= 1


@pytest.mark.gpu
def test_device_map_across_gpus(cuda: torch.device, tmp_path) -> None:
    """accelerate ``device_map="balanced"`` over every visible GPU (an explicit map on one GPU)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**MODEL, "num_hidden_layers": 4})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    gpus = torch.cuda.device_count()
    device_map = "balanced" if gpus > 1 else {"": 0}
    flex = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="flex_prefill", device_map=device_map, dtype=torch.float32
    ).eval()
    patch_model(flex, DENSE)
    used = {d for d in flex.hf_device_map.values()} if hasattr(flex, "hf_device_map") else {0}
    print(f"\n[device_map] {gpus} GPU(s), layers placed on {sorted(map(str, used))}")  # noqa: T201
    if gpus > 1:
        assert len(used) > 1, f"balanced map used one device only: {flex.hf_device_map}"
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa", dtype=torch.float32)
    sdpa = sdpa.to(cuda).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (1, 4096), device=cuda)
    with torch.no_grad():
        expected = sdpa(ids).logits[:, -8:]
        got = flex(ids).logits[:, -8:].to(cuda)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)  # TF32 in flex dots
        tokens = flex.generate(ids[:, :512], max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 516)
