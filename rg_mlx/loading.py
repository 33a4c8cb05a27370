"""Loading a model folder (converted, Hugging Face format, or mlx-lm format) or a hub repo."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import cpu, distributed, hub, quant
from .config import ModelArgs
from .errors import RGError, first_line
from .model import Model
from .tokenizer import Tokenizer

# The compute dtypes, and the floating-point dtypes a checkpoint may store.
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class TensorLike(Protocol):
    """What `check_tensors` compares: an `mx.array`, or a checkpoint tensor not yet read."""

    shape: Sequence[int]
    dtype: mx.Dtype


def default_dtype() -> mx.Dtype:
    """bfloat16 where a GPU runs MLX, float32 on the CPU (MLX's CPU bfloat16 matmul is slow)."""
    gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    return mx.bfloat16 if gpu and mx.default_device() == mx.gpu else mx.float32


def dtype_name(dtype: mx.Dtype | str) -> str:
    """``"bfloat16"`` for `mx.bfloat16` (or its str)."""
    return str(dtype).removeprefix("mlx.core.")


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    """An MLX dtype from a dtype or its name (``"float32"``, ``"bfloat16"``, ``"float16"``); None = default."""
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, mx.Dtype):
        if dtype not in DTYPES.values():
            raise RGError(f"unsupported dtype {dtype}: use one of {', '.join(DTYPES)}")
        return dtype
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise RGError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def keeps_stored_weights(dtype: mx.Dtype, accelerate: bool | None = None) -> bool:
    """Whether the dtype rule (`cast_parameters`) keeps the stored weights of the layers that rg_mlx's
    native CPU products take: for float32 compute, where the CPU accelerations apply (`accelerate`, as
    in `load_model`) and the native products are loaded."""
    from .cpu import native

    return dtype == mx.float32 and cpu.wanted(accelerate) and native.available()


def bfloat16_products(dtype: mx.Dtype, accelerate: bool | None = None) -> bool:
    """Whether the compute dtype `dtype` means bfloat16 products and float32 for everything else: for bfloat16 on
    the CPU, where the accelerations apply (`accelerate`, as in `load_model`) and rg_mlx's native products are
    loaded. MLX's CPU norms, elementwise math and attention run slower in bfloat16 than in float32, while the
    products' bfloat16 dot products (AVX512_BF16) run twice as fast as float32 ones."""
    from .cpu import native

    return (dtype == mx.bfloat16 and mx.default_device().type == mx.DeviceType.cpu and cpu.wanted(accelerate)
            and native.available())


def cast_parameters(model: nn.Module, dtype: mx.Dtype, *, keep_stored: bool, products: mx.Dtype | None = None) -> None:
    """The dtype rule, in place: every floating-point parameter of `model` in the compute dtype `dtype`,
    except, with `keep_stored` (`keeps_stored_weights`), those of the layers the native CPU products
    take (`rg_mlx.cpu.native_layers.takes`: bfloat16/float16 `Linear` and `Embedding` weights, and the
    scales and biases of 4/8-bit affine quantized ones; not their own `bias`), which stay as stored.
    Those products read the narrower weights with float32 activations and sum in float32, so the
    logits are those of the float32 model with the same weights, from fewer bytes;
    `rg_mlx.cpu.accelerate` swaps them in. With `products` (`bfloat16_products`), the weights of the dense
    `Linear` and `Embedding` layers are cast to it first (and then kept, with `keep_stored`)."""
    from .cpu import native_layers

    if products is not None:
        dense = [(f"{path}.weight", m["weight"].astype(products)) for path, m in model.named_modules()
                 if type(m) in (nn.Linear, nn.Embedding) and m["weight"].dtype != products]
        model.update(tree_unflatten(dense), strict=False)
    layers = {path for path, m in model.named_modules() if native_layers.takes(m)} if keep_stored else set()
    kept = {f"{layer}.{name}" for layer in layers for name in ("weight", "scales", "biases")}
    cast = [
        (name, p.astype(dtype))
        for name, p in tree_flatten(model.parameters())
        if mx.issubdtype(p.dtype, mx.floating) and p.dtype != dtype and name not in kept
    ]
    model.update(tree_unflatten(cast), strict=False)


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """The parsed `config.json` in `folder`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise RGError(f"{folder}: no config.json: not a model folder (convert a checkpoint with `rg-mlx convert`)")
    return read_json_object(path, "config")


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in the file `path` (a `what`: "config", "adapter config", ...); `RGError` if
    it cannot be read or holds something else."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RGError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(value, dict):
        raise RGError(f"{path}: not a valid {what} (a JSON object expected)")
    return value


def read_config(folder: str | Path) -> ModelArgs:
    """The model configuration in `folder`'s `config.json`."""
    return ModelArgs.from_dict(read_config_json(folder))


def read_weights(folder: str | Path) -> dict[str, mx.array]:
    """All tensors of the `*.safetensors` files in `folder` (shards listed by an index file or globbed).

    The arrays are lazy: their data is read when they are evaluated."""
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
            raise RGError(f"{f}: cannot read safetensors ({first_line(e)}); the file is truncated or corrupt") from None
    return weights


def check_tensors(tensors: Mapping[str, TensorLike], expected: Mapping[str, TensorLike], source: str | Path) -> None:
    """Check a checkpoint's tensors against a built model's parameters (`tree_flatten(model.parameters())`).

    The names must match exactly, and every shape; a floating-point parameter needs a float32, bfloat16 or
    float16 tensor (it is cast when loaded), any other (packed quantized weights, 8-bit scales) its own dtype.
    Anything else raises one `RGError` naming `source` and the first tensors that differ.
    """
    missing = [n for n in expected if n not in tensors]
    unknown = [n for n in tensors if n not in expected]
    if missing or unknown:
        parts = [f"missing {_names(missing)}"] if missing else []
        parts += [f"unknown {_names(unknown)}"] if unknown else []
        raise RGError(f"{source}: tensors do not match the config: {'; '.join(parts)}")
    for name, want in expected.items():
        have = tensors[name]
        if tuple(have.shape) != tuple(want.shape):
            raise RGError(
                f"{source}: tensor {name} has shape {tuple(have.shape)}, the config implies {tuple(want.shape)}"
            )
        if mx.issubdtype(want.dtype, mx.floating):
            if have.dtype not in DTYPES.values():
                raise RGError(
                    f"{source}: tensor {name} has dtype {dtype_name(have.dtype)}: expected one of {', '.join(DTYPES)}"
                )
        elif have.dtype != want.dtype:
            raise RGError(
                f"{source}: tensor {name} has dtype {dtype_name(have.dtype)}: expected {dtype_name(want.dtype)}"
            )


def _names(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


@distributed.agreed
def load_model(
    path: str | Path,
    *,
    dtype: str | mx.Dtype | None = None,
    accelerate: bool | None = None,
    adapter_path: str | Path | None = None,
    group: mx.distributed.Group | None = None,
) -> Model:
    """Load a RecurrentGemma model from a local folder (config.json + safetensors).

    Args:
        path: a folder converted by `rg-mlx convert`, saved by Hugging Face
            (`save_pretrained`), or converted by mlx-lm (quantized ones included).
        dtype: compute dtype, the activations' (an MLX dtype or its name); default float32
            on the CPU, bfloat16 on a GPU. Parameters are cast to it (`cast_parameters`), except
            that for float32 compute with rg_mlx's native CPU products loaded (`rg_mlx.cpu.native`;
            on the CPU, with the accelerations), bfloat16/float16 and quantized `Linear` and
            embedding weights stay as stored: those products take float32 activations with the
            narrower weights and sum in float32, so a bfloat16 or quantized folder gives the logits
            of the float32 model with the same weights while reading fewer bytes per token.
            ``"bfloat16"`` computes in bfloat16 throughout on a GPU. On the CPU with the native
            products (`bfloat16_products`) it means bfloat16 products and float32 for the rest: the
            dense weights in bfloat16, each product's activations rounded to bfloat16 (float32 sums,
            the result rounded to bfloat16; on a CPU with AVX512_BF16, bfloat16 dot products, about
            twice as fast as float32 on prompts), and the norms, recurrence, attention, residual
            stream and logits in float32, which MLX's CPU runs faster than bfloat16 and which is more
            exact. Quantized weights keep their packing; the recurrent state is float32 regardless.
        accelerate: apply the CPU accelerations (`rg_mlx.cpu.accelerate`); default: where MLX runs
            on the CPU, unless ``RG_MLX_ACCELERATE=0``.
        adapter_path: a LoRA adapter folder written by `rg-mlx mlx-lm lora` (`mlx_lm.lora` on our
            model), applied as mlx-lm applies it (`rg_mlx.integration.load_adapter`; warns when the
            adapter was trained on another model).
        group: an `mx.distributed` group to split the model over (`Model.shard`, tensor
            parallelism): every rank of the group calls this, and each keeps only its share of
            the weights (reading one whole tensor at a time). If loading fails on any rank, it
            raises on every rank (see `rg_mlx.distributed.agree`).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise RGError(f"{path}: no such model folder")
    if adapter_path is not None:
        if group is not None and group.size() > 1:
            raise RGError(f"{adapter_path}: a LoRA adapter on a model split over ranks is not supported (fuse it first: rg-mlx mlx-lm fuse)")
        from .integration import adapter_config

        adapter_config(adapter_path)  # a wrong path fails before the weights load
    dtype = parse_dtype(dtype)
    config = read_config_json(folder)
    args = ModelArgs.from_dict(config)
    quantization = quant.read(config)
    if group is not None:
        args.check_split(group.size())
    model = Model(args)
    weights = model.sanitize(read_weights(folder))

    if quantization is not None:
        quant.apply(model, quantization, weights)
    check_tensors(weights, dict(tree_flatten(model.parameters())), folder)
    model.load_weights(list(weights.items()))
    products = mx.bfloat16 if bfloat16_products(dtype, accelerate) else None
    if products is not None:
        dtype = mx.float32  # the compute dtype; the products' is `products`
    cast_parameters(model, dtype, keep_stored=keeps_stored_weights(dtype, accelerate), products=products)
    if group is not None:
        del weights  # the model holds the only references to the lazy tensors: `shard` keeps only the shares
        model.shard(group)
    mx.eval(model.parameters())
    model.eval()
    if cpu.wanted(accelerate):
        cpu.accelerate(model, dtype, products=products)
    if adapter_path is not None:
        from .integration import load_adapter

        load_adapter(model, adapter_path)
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
    if not hub.is_repo_id(str(path_or_repo)):
        raise RGError(
            f"{path_or_repo}: no such model folder (give a converted folder, or a hub repo id like "
            "google/recurrentgemma-2b-it)"
        )
    return hub.download(str(path_or_repo))


@distributed.agreed
def load(
    path_or_repo: str | Path,
    *,
    dtype: str | mx.Dtype | None = None,
    accelerate: bool | None = None,
    adapter_path: str | Path | None = None,
    group: mx.distributed.Group | None = None,
) -> tuple[Model, Tokenizer]:
    """Load a model and its tokenizer: `(model, tokenizer)`.

    Args:
        path_or_repo: a model folder (config.json, safetensors, tokenizer.model), a Hugging
            Face hub repo id (fetched through the hub cache; works offline once cached), or
            ``"demo"``: the tiny demo model bundled with rg_mlx.
        dtype: compute dtype, as in `load_model`.
        accelerate: the CPU accelerations, as in `load_model`.
        adapter_path: a LoRA adapter folder, as in `load_model`.
        group: an `mx.distributed` group to split the model over, as in `load_model`.
    """
    folder = resolve(path_or_repo)
    model = load_model(folder, dtype=dtype, accelerate=accelerate, adapter_path=adapter_path, group=group)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    if tokenizer.vocab_size > model.args.vocab_size:
        raise RGError(
            f"{folder}: tokenizer.model has {tokenizer.vocab_size} pieces but the model only {model.args.vocab_size}: "
            "wrong tokenizer for this model"
        )
    return model, tokenizer
