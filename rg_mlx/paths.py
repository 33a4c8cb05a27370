"""Where rg_mlx keeps files of its own between runs (nothing here imports MLX).

`cache_dir()`: ``RG_MLX_CACHE`` if set; else ``$XDG_CACHE_HOME/rg_mlx`` if that is set; else
``~/Library/Caches/rg_mlx`` on macOS and ``~/.cache/rg_mlx`` elsewhere. Everything in it may be
deleted: it is rebuilt on demand (today: the GPU kernels' self-check results).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VAR = "RG_MLX_CACHE"


def cache_dir() -> Path:
    """The user cache folder of rg_mlx (not created here)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "rg_mlx"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "rg_mlx"
    return Path.home() / ".cache" / "rg_mlx"
