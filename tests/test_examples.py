"""Every script in examples/ runs on CPU at a small size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_ARGS = {
    "custom_loop.py": ["--seq-len", "1024", "--chunk", "512", "--layers", "1"],
    "visualize_masks.py": ["--seq-len", "1024", "--out", "{tmp}/masks.png"],
    "transformers_generate.py": ["--seq-len", "256", "--new-tokens", "4"],
}
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


def test_every_example_has_small_arguments() -> None:
    assert EXAMPLES and set(EXAMPLES) <= set(SMALL_ARGS), (
        f"add small-size arguments for {set(EXAMPLES) - set(SMALL_ARGS)}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name: str, tmp_path: Path) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in SMALL_ARGS[name]]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the example printed nothing"
