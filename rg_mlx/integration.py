"""mlx-lm's tools on rg_mlx's model: the module mlx-lm builds for ``model_type: recurrent_gemma``.

mlx-lm finds a model's classes by importing ``mlx_lm.models.<model_type>`` (its `get_model_classes`
hook is not reachable from `mlx_lm.load`, `sharded_load` or the server), so `register_with_mlx_lm`
puts this module in `sys.modules` under that name: from then on every mlx-lm tool in this process
(`server`, `lora`, `perplexity`, `generate`, `cache_prompt`, `benchmark`, ...) builds rg_mlx's
`Model` instead of mlx-lm's own RecurrentGemma. mlx-lm's files are never edited.

The model mlx-lm builds this way finishes its build when mlx-lm has loaded its weights
(`Model.load_weights`): `rg_mlx.load`'s dtype rule (`rg_mlx.loading.cast_parameters`: the compute
dtype, float32 on the CPU and bfloat16 on a GPU, with the stored weights kept where rg_mlx's native
CPU products read them) and, on the CPU, the accelerations of `rg_mlx.cpu.accelerate`. Its logits
are then those of `rg_mlx.load`'s model.

LoRA adapters: `recording_trained_model` makes `mlx_lm.lora` record the class of the model it
trained in `adapter_config.json` (``trained_model``), and `load_adapter` applies an adapter the way
mlx-lm does, warning when it was trained on another model (a plain `mlx_lm.lora` trains mlx-lm's
own RecurrentGemma, whose parameter names match ours but whose numerics do not).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn

from . import cpu
from . import model as _model
from .config import MODEL_TYPE, ModelArgs
from .errors import RGError

__all__ = [
    "Model", "ModelArgs", "adapter_config", "check_adapter", "load_adapter", "recording_trained_model",
    "register_with_mlx_lm", "registered",
]

MODULE_NAME = f"mlx_lm.models.{MODEL_TYPE}"
# The adapter_config.json field naming the class of the model an adapter was trained on.
TRAINED_MODEL_KEY = "trained_model"


class Model(_model.Model):
    """rg_mlx's `Model` as mlx-lm builds it: after mlx-lm loads its weights, the build is finished as
    `rg_mlx.load` finishes it (its dtype rule, then the CPU accelerations where MLX runs on the CPU)."""

    _finished = False

    def load_weights(self, file_or_weights: str | list[tuple[str, mx.array]], strict: bool = True) -> "Model":
        """`nn.Module.load_weights`; the first call (mlx-lm's load of the checkpoint) also finishes the build.

        Later calls (LoRA adapters, a resumed adapter file) load into the finished model.
        """
        super().load_weights(file_or_weights, strict=strict)
        if not self._finished:
            self._finished = True
            from .loading import cast_parameters, default_dtype, keeps_stored_weights

            dtype = default_dtype()
            cast_parameters(self, dtype, keep_stored=keeps_stored_weights(dtype))
            if cpu.wanted():
                cpu.accelerate(self, dtype)
        return self


def register_with_mlx_lm() -> None:
    """Make mlx-lm build rg_mlx's model for ``model_type: recurrent_gemma`` in this process.

    Installs this module as ``mlx_lm.models.recurrent_gemma`` in `sys.modules` (and on the
    `mlx_lm.models` package), so `mlx_lm.load`, `sharded_load`, the server and every tool built on
    them get rg_mlx's exact model. Calling it again changes nothing. Import `rg_mlx` before `mlx`
    for the Linux BLAS fast path (`rg-mlx mlx-lm TOOL` does).
    """
    import mlx_lm.models

    module = sys.modules[__name__]
    sys.modules[MODULE_NAME] = module
    setattr(mlx_lm.models, MODEL_TYPE, module)


def registered() -> bool:
    """Whether mlx-lm builds rg_mlx's model for ``model_type: recurrent_gemma`` in this process."""
    return sys.modules.get(MODULE_NAME) is sys.modules[__name__]


def model_class_name(model: nn.Module) -> str:
    """The qualified name of `model`'s class, as `adapter_config.json` records it."""
    return f"{type(model).__module__}.{type(model).__qualname__}"


@contextlib.contextmanager
def recording_trained_model() -> Iterator[None]:
    """While active, `mlx_lm.lora` records the class of the model it trains in the adapter's
    `adapter_config.json` (field ``trained_model``)."""
    import mlx_lm.lora

    train_model = mlx_lm.lora.train_model

    def recording(args: Any, model: nn.Module, *rest: Any, **kwargs: Any) -> Any:
        setattr(args, TRAINED_MODEL_KEY, model_class_name(model))  # mlx_lm.lora saves vars(args) as the config
        return train_model(args, model, *rest, **kwargs)

    mlx_lm.lora.train_model = recording
    try:
        yield
    finally:
        mlx_lm.lora.train_model = train_model


def adapter_config(adapter_path: str | Path) -> dict[str, Any]:
    """The `adapter_config.json` of an adapter folder written by `mlx_lm.lora`; `RGError` if it is not one."""
    folder = Path(adapter_path).expanduser()
    config_path = folder / "adapter_config.json"
    if not config_path.is_file() or not (folder / "adapters.safetensors").is_file():
        raise RGError(
            f"{adapter_path}: not an adapter folder (adapter_config.json and adapters.safetensors, as written by "
            "`rg-mlx mlx-lm lora --train --adapter-path FOLDER`)"
        )
    from .loading import read_json_object

    return read_json_object(config_path, "adapter config")


def check_adapter(adapter_path: str | Path) -> dict[str, Any]:
    """The `adapter_config.json` of an adapter folder (`adapter_config`), warning (`warnings.warn`) when
    the adapter was not trained on rg_mlx's model."""
    config = adapter_config(adapter_path)
    trained = config.get(TRAINED_MODEL_KEY)
    if not (isinstance(trained, str) and trained.startswith("rg_mlx.")):
        on = trained or "an unrecorded model (a plain `mlx_lm.lora` trains mlx-lm's own RecurrentGemma)"
        warnings.warn(
            f"{adapter_path}: this adapter was trained on {on}, not on rg_mlx's model: its parameter names "
            "match, but it learned that model's numerics; retrain it with `rg-mlx mlx-lm lora`",
            stacklevel=3,
        )
    return config


def load_adapter(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Apply a LoRA (or DoRA, or full) adapter from `mlx_lm.lora` to `model` in place, as mlx-lm's
    `load_adapters` does; returns the model.

    Warns (`warnings.warn`) when the adapter was not trained on rg_mlx's model (`check_adapter`).
    """
    from mlx_lm.tuner.utils import load_adapters

    check_adapter(adapter_path)
    try:
        load_adapters(model, str(Path(adapter_path).expanduser()))
    except (ValueError, KeyError, AttributeError) as e:
        raise RGError(f"{adapter_path}: adapter does not fit this model ({str(e).splitlines()[0]})") from None
    model.eval()
    return model
