"""rg_mlx: DeepMind's RecurrentGemma (Griffin) on Apple's MLX."""

from . import _blas  # noqa: F401  (first: the Linux BLAS fast path must load before mlx.core)

__version__ = "0.1.0"

from .config import ModelArgs, preset
from .errors import RGError
from .loading import load_model
from .model import Model

__all__ = ["ModelArgs", "Model", "RGError", "load_model", "preset", "__version__"]
