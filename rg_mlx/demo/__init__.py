"""The bundled demo model: a tiny Griffin trained by rg_mlx on questions about rg_mlx.

It ships in the package (`model_path()`), so `rg_mlx.load("demo")` and `rg-mlx chat` /
`generate` / `app` without `--model` work offline right after install. `corpus` generates its
training data, `train` trains it (`python -m rg_mlx.demo.train`) and `eval` measures it
(`python -m rg_mlx.demo.eval`).
"""

from __future__ import annotations

from pathlib import Path

NAME = "demo"
NOTICE = (
    "using the bundled demo model (a tiny Griffin that only knows about rg_mlx); for a real model run "
    "`rg-mlx convert google/recurrentgemma-2b-it rg-2b-it` and pass --model rg-2b-it"
)


def model_path() -> Path:
    """The folder of the bundled demo model (config.json, model.safetensors, tokenizer.model)."""
    return Path(__file__).parent / "model"
