"""Loading a model folder (converted, Hugging Face format, or mlx-lm format) or a hub repo."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import cpu, distributed
from .config import ModelArgs
from .errors import RGError
from .model import Model
from .tokenizer import Tokenizer

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def default_dtype() -> mx.Dtype:
    """bfloat16 where a GPU runs MLX, float32 on the CPU (MLX's CPU bfloat16 matmul is slow)."""
    gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    return mx.bfloat16 if gpu and mx.default_device() == mx.gpu else mx.float32


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    """An MLX dtype from a dtype or its name (``"float32"``, ``"bfloat16"``, ``"float16"``); None = default."""
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, mx.Dtype):
        if dtype not in DTYPES.values():
            raise RGError(f"unsupported dtype {dtype}: use one of {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("mlx.core.")
    if name not in DTYPES:
        raise RGError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_config(folder: str | Path) -> ModelArgs:
    """Parse `config.json` in `folder`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise RGError(f"{folder}: no config.json: not a model folder (convert a checkpoint with `rg-mlx convert`)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RGError(f"{path}: unreadable config ({e})") from None
    return ModelArgs.from_dict(config)


def read_weights(folder: str | Path) -> dict[str, mx.array]:
    """All tensors of the `*.safetensors` files in `folder` (shards listed by an index file or globbed)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise RGError(f"{index}: unreadable index ({e})") from None
        files = [str(folder / f) for f in files]
    else:
        files = sorted(glob.glob(str(folder / "*.safetensors")))
    if not files:
        raise RGError(f"{folder}: no *.safetensors weights found")
    weights: dict[str, mx.array] = {}
    for f in files:
        if not os.path.isfile(f):
            raise RGError(f"{f}: weight shard listed in the index is missing")
        try:
            weights.update(mx.load(f))
        except Exception as e:  # MLX raises plain exceptions for truncated/corrupt files
            raise RGError(f"{f}: cannot read safetensors ({str(e).splitlines()[0]}); the file is truncated or corrupt") from None
    return weights


def _check_weights(model: nn.Module, weights: dict[str, mx.array], folder: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unknown:
            parts.append(f"unexpected {_names(unknown)}")
        raise RGError(f"{folder}: tensors do not match config.json: {'; '.join(parts)}")
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise RGError(
                f"{folder}: tensor {name} has shape {tuple(value.shape)}, config.json implies {tuple(expected[name].shape)}"
            )


def _names(names: list[str], n: int = 4) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


@distributed.agreed
def load_model(
    path: str | Path,
    *,
    dtype: str | mx.Dtype | None = None,
    accelerate: bool | None = None,
    group: mx.distributed.Group | None = None,
) -> Model:
    """Load a RecurrentGemma model from a local folder (config.json + safetensors).

    Args:
        path: a folder converted by `rg-mlx convert`, saved by Hugging Face
            (`save_pretrained`), or converted by mlx-lm.
        dtype: compute dtype (an MLX dtype or its name); default float32 on the
            CPU, bfloat16 on a GPU. Quantized weights keep their packing; the
            recurrent state is float32 regardless.
        accelerate: apply the CPU accelerations (`rg_mlx.cpu.accelerate`); default: where MLX runs
            on the CPU, unless ``RG_MLX_ACCELERATE=0``.
        group: an `mx.distributed` group to split the model over (`Model.shard`, tensor
            parallelism): every rank of the group calls this, and each keeps only its share of
            the weights (reading one whole tensor at a time). If loading fails on any rank, it
            raises on every rank (see `rg_mlx.distributed.agree`).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise RGError(f"{path}: no such model folder")
    dtype = parse_dtype(dtype)
    args = read_config(folder)
    if group is not None:
        args.check_split(group.size())
    model = Model(args)
    weights = model.sanitize(read_weights(folder))

    if args.quantization:
        q = args.quantization
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights,
        )
    _check_weights(model, weights, folder)
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }
    model.load_weights(list(weights.items()))
    if group is not None:
        del weights  # the model holds the only references to the lazy tensors: `shard` keeps only the shares
        model.shard(group)
    mx.eval(model.parameters())
    model.eval()
    if cpu.wanted(accelerate):
        cpu.accelerate(model)
    return model


def resolve(path_or_repo: str | Path) -> Path:
    """A local model folder, or the cached snapshot of a Hugging Face hub repo (downloaded if
    online; `HF_HUB_OFFLINE=1` uses the cache only). ``"demo"`` is the bundled demo model."""
    if str(path_or_repo) == "demo":  # the bundled demo model (rg_mlx.demo); a folder named demo: ./demo
        from .demo import model_path

        return model_path()
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    repo = str(path_or_repo)
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or repo.startswith((".", "~")):
        raise RGError(
            f"{repo}: no such model folder (give a converted folder, or a hub repo id like google/recurrentgemma-2b-it)"
        )

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except GatedRepoError:
        raise RGError(
            f"{repo}: gated on the Hugging Face hub: accept its license on huggingface.co and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise RGError(
            f"{repo}: no such repo on the Hugging Face hub (or it is private: log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        raise RGError(
            f"{repo}: not in the Hugging Face cache and the hub is unreachable or offline (HF_HUB_OFFLINE): "
            f"download it online (`hf download {repo}`) or convert a checkpoint to a folder with `rg-mlx convert`"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise RGError(f"{repo}: download failed ({str(e).splitlines()[0]}); retry, or use a local folder") from None


@distributed.agreed
def load(
    path_or_repo: str | Path,
    *,
    dtype: str | mx.Dtype | None = None,
    accelerate: bool | None = None,
    group: mx.distributed.Group | None = None,
) -> tuple[Model, Tokenizer]:
    """Load a model and its tokenizer: `(model, tokenizer)`.

    Args:
        path_or_repo: a model folder (config.json, safetensors, tokenizer.model), a Hugging
            Face hub repo id (fetched through the hub cache; works offline once cached), or
            ``"demo"``: the tiny demo model bundled with rg_mlx.
        dtype: compute dtype, as in `load_model`.
        accelerate: the CPU accelerations, as in `load_model`.
        group: an `mx.distributed` group to split the model over, as in `load_model`.
    """
    folder = resolve(path_or_repo)
    model = load_model(folder, dtype=dtype, accelerate=accelerate, group=group)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    if tokenizer.vocab_size > model.args.vocab_size:
        raise RGError(
            f"{folder}: tokenizer.model has {tokenizer.vocab_size} pieces but the model only {model.args.vocab_size}: "
            "wrong tokenizer for this model"
        )
    return model, tokenizer
