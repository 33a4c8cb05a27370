"""The README's Python code runs as written: every ```python block, on the bundled demo, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_serve import running  # `rg-mlx serve` on a free port, always stopped

# The serving example talks to `rg-mlx serve` at its default address, serving a model named rg-2b-it:
# the test serves the demo under that name on a free port and points the block there.
SERVE_URL = "http://127.0.0.1:8080"
SERVED_NAME = "rg-2b-it"

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert BLOCKS, "no ```python block found: the pattern no longer matches the README"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(block, tmp_path):
    # Each block on its own, in a fresh interpreter and an empty folder (files it writes land there).
    if SERVE_URL in block:
        with running("--served-model-name", SERVED_NAME) as server:
            run_block(block.replace(SERVE_URL, server.url), tmp_path)
    else:
        run_block(block, tmp_path)


def run_block(block: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RG_MLX_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{result.stderr[-3000:]}"
