"""rg_mlx: DeepMind's RecurrentGemma (Griffin) on Apple's MLX."""

from . import _blas  # noqa: F401  (first: the Linux BLAS fast path must load before mlx.core)

__version__ = "0.1.0"

from .chat import ChatSession
from .config import ModelArgs, preset
from .errors import RGError
from .generate import (
    GenerationResponse,
    PrefillProgress,
    batch_generate,
    generate,
    generate_step,
    stream_generate,
)
from .integration import register_with_mlx_lm
from .loading import load, load_model
from .model import Model
from .sampling import Sampling, SamplingConfig
from .tokenizer import Tokenizer

__all__ = [
    "ChatSession",
    "GenerationResponse",
    "ModelArgs",
    "Model",
    "PrefillProgress",
    "RGError",
    "Sampling",
    "SamplingConfig",
    "Tokenizer",
    "batch_generate",
    "generate",
    "generate_step",
    "load",
    "load_model",
    "preset",
    "register_with_mlx_lm",
    "stream_generate",
    "__version__",
]
