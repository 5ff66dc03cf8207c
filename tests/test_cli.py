"""The ``flexprefill`` command line and the pictures it draws."""

from __future__ import annotations

import json

import pytest
import torch

from flexprefill_torch import flex_prefill_block_mask
from flexprefill_torch.cli import main
from flexprefill_torch.synthetic import structured_qkv
from flexprefill_torch.visualize import plot_block_masks, plot_layer_heatmap


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--gamma", "1.5"], "gamma"),
        (["demo", "--seq-len", "0"], "--seq-len"),
        (["demo", "--block-size", "100"], "block_size"),
        (["visualize", "--layers", "-1"], "--layers"),
        (["bench", "--workloads", "nonsense"], "--workloads"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_explains_every_option(capsys) -> None:
    for command in ("demo", "bench", "visualize"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        options = [word for word in text.split() if word.startswith("--") and word != "--help"]
        assert options, f"{command} --help lists no options"
        assert "default" in text


def test_visualize_writes_pictures(tmp_path) -> None:
    main(
        [
            "visualize",
            "--seq-len",
            "1024",
            "--q-heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "32",
            "--block-size",
            "64",
            "--min-budget",
            "64",
            "--layers",
            "2",
            "--out-dir",
            str(tmp_path),
        ]
    )
    for name in ("masks.png", "layers.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_plot_functions_validate_and_mark_inactive_blocks(tmp_path) -> None:
    q, k, _ = structured_qkv(1, 4, 2, 1024, 32, block_size=64)
    block_mask, info = flex_prefill_block_mask(q, k, block_size=64, min_budget=64, return_info=True)
    fig = plot_block_masks(block_mask, [(0, 0), (0, 1)], info, tmp_path / "m.png")
    values = set(torch.as_tensor(fig.axes[0].images[0].get_array()).unique().tolist())
    assert info.density[0, 0] < 1, "the structured input should leave blocks out"
    assert values == {0.0, 0.25, 1.0}, "expected invisible (0), skipped (0.25) and active (1) blocks"
    with pytest.raises(ValueError, match="heads"):
        plot_block_masks(block_mask, [(0, 9)])
    with pytest.raises(ValueError, match="infos"):
        plot_layer_heatmap([])
    fig = plot_layer_heatmap([info, info])
    assert len(fig.axes) == 6  # three panels and their colour bars


@pytest.mark.slow
def test_bench_small_writes_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    main(
        [
            "bench",
            "--small",
            "--lengths",
            "512",
            "--workloads",
            "structured",
            "--gammas",
            "0.9",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["seq_len"] == 512 and 0 < row["density"] <= 1 and row["total_ms"] > 0
    assert data["meta"]["torch"] == torch.__version__


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flexprefill", "streaming"])
def test_demo_runs_each_method(method: str, capsys) -> None:
    main(["demo", "--seq-len", "512", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "32",
          "--block-size", "64", "--min-budget", "64", "--method", method])
    out = capsys.readouterr().out
    assert f"method={method}" in out and "relative output error vs dense" in out and "speedup" in out


@pytest.mark.slow
def test_visualize_a_local_model(tmp_path) -> None:
    """``visualize --model`` draws the layer x head map of one prefill through a checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=100)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    main(["visualize", "--model", str(tmp_path / "model"), "--seq-len", "256", "--block-size", "64",
          "--min-budget", "64", "--out-dir", str(tmp_path)])
    assert (tmp_path / "layers.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit):
        main(["visualize", "--model", str(tmp_path / "missing")])
