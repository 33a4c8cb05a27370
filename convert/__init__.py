"""Checkpoint conversion: HF safetensors, DeepMind .pt (and Flax) -> MLX folders, with quantization.

`convert(source, output)` streams the checkpoint one tensor at a time into a temporary folder
beside `output` and renames it into place at the end, so a failed or interrupted conversion
leaves no `output` behind; the folders of killed conversions are removed by the next conversion
into the same parent folder (`partial`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from rg_mlx.config import ModelArgs
from rg_mlx.errors import RGError
from rg_mlx.loading import parse_dtype
from rg_mlx.model import Model

from . import partial
from .sources import Checkpoint, Tensor, first_line, open_checkpoint, tokenizer_info
from .write import MAX_SHARD_BYTES, TensorSpec, WeightsWriter, write_generation_config, write_json, write_model_card

__all__ = ["ConvertResult", "convert"]

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)

# progress(tensors_done, tensors_total, bytes_done, bytes_total)
Progress = Callable[[int, int, int, int], None]


@dataclass
class ConvertResult:
    """What `convert` wrote."""

    path: Path
    parameters: int
    dtype: str
    quantization: dict[str, Any] | None
    bits_per_weight: float
    size_bytes: int  # the safetensors files on disk
    files: list[str]
    seconds: float
    removed_partials: list[partial.Removed] = field(default_factory=list)  # left by killed conversions


def convert(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    tokenizer: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    upload_repo: str | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Progress | None = None,
) -> ConvertResult:
    """Convert a RecurrentGemma checkpoint into an MLX folder that `rg_mlx` and mlx-lm load.

    Args:
        source: a Hugging Face-format folder, a hub repo id (downloaded into the HF cache;
            `HF_TOKEN` honoured), or a DeepMind PyTorch `.pt` file (or a folder holding one).
        output: the folder to create.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default: the checkpoint's own.
        quantize: quantize the Linear and Embedding weights (MLX affine; the embedding stays
            the tied output layer). Layers whose input width `q_group_size` does not divide stay
            unquantized.
        q_bits: bits per quantized weight (2, 3, 4, 5, 6 or 8).
        q_group_size: weights per quantization group (32, 64 or 128).
        tokenizer: the `tokenizer.model` to copy; default: the one beside the checkpoint.
        overrides: config values to set, e.g. ``{"attention_window_size": 2048}`` (a DeepMind
            `.pt` holds no window or soft cap; the released sizes get their presets').
        upload_repo: upload the result to this hub repo (``"org/name"``) when done.
        force: replace an existing `output`.
        max_shard_bytes: the largest safetensors shard.
        progress: called after each tensor with (tensors done, tensors total, bytes done, bytes total).

    Returns:
        A `ConvertResult` (parameters, dtype, bits per weight, size on disk, time).
    """
    start = time.perf_counter()
    output = Path(output).expanduser()
    if quantize and q_bits not in Q_BITS:
        raise RGError(f"unsupported --q-bits {q_bits}: use one of {', '.join(map(str, Q_BITS))}")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise RGError(f"unsupported --q-group-size {q_group_size}: use one of {', '.join(map(str, Q_GROUP_SIZES))}")
    target = parse_dtype(dtype) if dtype is not None else None
    if upload_repo is not None:
        _check_upload_repo(upload_repo)
    _check_output(source, output, force)

    checkpoint = open_checkpoint(source)
    args = _apply_overrides(checkpoint.args, overrides or {})
    tok_path = Path(tokenizer).expanduser() if tokenizer is not None else checkpoint.tokenizer
    if tok_path is None:
        raise RGError(f"{source}: no tokenizer.model beside the checkpoint: pass --tokenizer PATH")
    tok = tokenizer_info(tok_path)
    model = Model(args)  # never evaluated: it only tells the expected names and shapes
    expected = {name: tuple(a.shape) for name, a in tree_flatten(model.parameters())}
    _check_tensors(checkpoint.tensors, expected, source)
    if tok.vocab_size != args.vocab_size:
        raise RGError(
            f"{tok_path}: tokenizer has {tok.vocab_size} pieces but the embedding has {args.vocab_size} rows: "
            "pass the tokenizer.model that belongs to this checkpoint"
        )
    if target is None:
        target = checkpoint.tensors["model.embed_tokens.weight"].dtype

    quantized = _quantized_layers(model, q_group_size) if quantize else set()
    if quantize:
        args = dataclasses.replace(args, quantization={"group_size": q_group_size, "bits": q_bits, "mode": "affine"})
    specs = _plan(expected, target, quantized, q_bits, q_group_size)
    parameters = sum(math.prod(s) for s in expected.values())

    output.parent.mkdir(parents=True, exist_ok=True)
    removed_partials = partial.remove_stale(output.parent)
    tmp = partial.create(output)
    progress = partial.pausing(progress)
    writer = WeightsWriter(tmp, specs, max_shard_bytes)
    try:
        _write_weights(writer, checkpoint, expected, target, quantized, q_bits, q_group_size, progress)
        files = writer.close({"total_parameters": parameters})
        config = args.to_dict()
        if args.quantization:
            config["quantization_config"] = args.quantization  # mlx-lm writes both spellings
        write_json(tmp / "config.json", config)
        shutil.copyfile(tok.path, tmp / "tokenizer.model")
        write_generation_config(tmp, tok.bos_id, tok.eos_ids, tok.pad_id)
        write_model_card(
            tmp,
            name=upload_repo or output.name,
            base_model=checkpoint.base_model,
            description=_describe(checkpoint.base_model or Path(source).name, target, args.quantization),
        )
        partial.finish(tmp)
        _replace(tmp, output)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    size = sum((output / f).stat().st_size for f in files)
    result = ConvertResult(
        path=output,
        parameters=parameters,
        dtype=str(target).removeprefix("mlx.core."),
        quantization=args.quantization,
        bits_per_weight=8 * writer.total_bytes / parameters,
        size_bytes=size,
        files=files,
        seconds=time.perf_counter() - start,
        removed_partials=removed_partials,
    )
    if upload_repo is not None:
        _upload(output, upload_repo)
    return result


def _check_output(source: str | Path, output: Path, force: bool) -> None:
    if (output.exists() or output.is_symlink()) and not force:
        raise RGError(f"{output} already exists: pass --force to replace it, or choose another OUTPUT")
    src = Path(source).expanduser()
    if src.exists() and (src.resolve() == output.resolve() or output.resolve() in src.resolve().parents):
        raise RGError(f"OUTPUT {output} must not be or contain SOURCE {source}: choose another OUTPUT")


def _apply_overrides(args: ModelArgs, overrides: dict[str, Any]) -> ModelArgs:
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise RGError(f"unknown config override {', '.join(unknown)}: use ModelArgs field names")
    return ModelArgs.from_dict({**args.to_dict(), **overrides}) if overrides else args


def _check_tensors(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str | Path) -> None:
    missing = [n for n in expected if n not in tensors]
    unknown = [n for n in tensors if n not in expected]
    if missing or unknown:
        parts = [f"missing {_names(missing)}"] if missing else []
        parts += [f"unknown {_names(unknown)}"] if unknown else []
        raise RGError(f"{source}: tensors do not match a RecurrentGemma checkpoint: {'; '.join(parts)}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise RGError(f"{source}: tensor {name} has shape {tensors[name].shape}, the config implies {shape}")
        if tensors[name].dtype not in (mx.float32, mx.bfloat16, mx.float16):
            raise RGError(f"{source}: tensor {name} has dtype {tensors[name].dtype}: expected a float checkpoint")


def _names(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _quantized_layers(model: Model, group_size: int) -> set[str]:
    """The Linear and Embedding layers whose input width the group size divides (mlx-lm's rule)."""
    return {
        path
        for path, m in model.named_modules()
        if hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0
    }


def _plan(
    expected: dict[str, tuple[int, ...]], dtype: mx.Dtype, quantized: set[str], bits: int, group_size: int
) -> list[TensorSpec]:
    """Every output tensor, in writing order: a quantized weight becomes `weight` (packed), `scales`, `biases`."""
    specs = []
    for name, shape in expected.items():
        layer, _, leaf = name.rpartition(".")
        if layer in quantized and leaf == "weight":
            *rows, cols = shape
            specs.append(TensorSpec(name, (*rows, cols * bits // 32), mx.uint32))
            specs.append(TensorSpec(f"{layer}.scales", (*rows, cols // group_size), dtype))
            specs.append(TensorSpec(f"{layer}.biases", (*rows, cols // group_size), dtype))
        else:
            specs.append(TensorSpec(name, shape, dtype))
    return specs


def _write_weights(
    writer: WeightsWriter,
    checkpoint: Checkpoint,
    expected: dict[str, tuple[int, ...]],
    dtype: mx.Dtype,
    quantized: set[str],
    bits: int,
    group_size: int,
    progress: Progress | None,
) -> None:
    """Read, cast, quantize and write one tensor at a time; nothing outlives its iteration."""
    done = 0
    for i, name in enumerate(expected, 1):
        w = checkpoint.tensors.pop(name).load().astype(dtype)
        layer, _, leaf = name.rpartition(".")
        if layer in quantized and leaf == "weight":
            q, scales, biases = mx.quantize(w, group_size, bits)
            outputs = {name: q, f"{layer}.scales": scales, f"{layer}.biases": biases}
        else:
            outputs = {name: w}
        del w
        mx.eval(list(outputs.values()))
        for out_name in list(outputs):
            a = outputs.pop(out_name)
            writer.write(out_name, a)
            done += a.nbytes
        mx.clear_cache()
        if progress is not None:
            progress(i, len(expected), done, writer.total_bytes)


def _describe(base: str, dtype: mx.Dtype, quantization: dict[str, Any] | None) -> str:
    what = f"RecurrentGemma ({base}) in {str(dtype).removeprefix('mlx.core.')}"
    if quantization:
        what += f", {quantization['bits']}-bit quantized (MLX affine, group size {quantization['group_size']})"
    return what


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished folder into place; a replaced `output` is removed only once the new one is there."""
    if not (output.exists() or output.is_symlink()):
        os.rename(tmp, output)
        return
    old = tmp.with_name(tmp.name + ".old")
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _check_upload_repo(repo: str) -> None:
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise RGError(f"--upload-repo {repo!r} is not a valid hub repo id: use ORG/NAME") from None
    if "/" not in repo:
        raise RGError(f"--upload-repo {repo!r} needs an owner: use ORG/NAME (or YOUR_USER/NAME)")
    if constants.HF_HUB_OFFLINE:
        raise RGError("--upload-repo needs the network but HF_HUB_OFFLINE is set: unset it, or upload later")


def _upload(folder: Path, repo: str) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except (HfHubHTTPError, OSError) as e:
        raise RGError(
            f"upload to {repo} failed ({first_line(e)}); the converted folder is at {folder}: "
            f"retry with `hf upload {repo} {folder}`"
        ) from None
