"""rg_mlx: DeepMind's RecurrentGemma (Griffin) on Apple's MLX."""

__version__ = "0.1.0"

from .config import ModelArgs, preset
from .errors import RGError
from .loading import load_model
from .model import Model

__all__ = ["ModelArgs", "Model", "RGError", "load_model", "preset", "__version__"]
