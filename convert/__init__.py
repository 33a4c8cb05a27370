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
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from rg_mlx import hub
from rg_mlx.config import ModelArgs
from rg_mlx.errors import RGError
from rg_mlx.loading import check_tensors, dtype_name, parse_dtype
from rg_mlx.model import Model
from rg_mlx.quant import Quantization, QuantSpec, quantized_layers
from rg_mlx.tokenizer import Tokenizer

from . import partial
from .sources import Checkpoint, open_checkpoint
from .write import MAX_SHARD_BYTES, TensorSpec, WeightsWriter, write_generation_config, write_json, write_model_card

__all__ = ["ConvertResult", "convert", "is_chat_checkpoint"]

# progress(tensors_done, tensors_total, bytes_done, bytes_total)
Progress = Callable[[int, int, int, int], None]


@dataclass
class ConvertResult:
    """What `convert` wrote."""

    path: Path
    parameters: int
    dtype: str
    quantization: QuantSpec | None
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
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    tokenizer: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    chat: bool | None = None,
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
        quantize: quantize the Linear and Embedding weights (the embedding stays the tied output
            layer). Layers whose input width the group size does not divide stay unquantized.
        q_bits: bits per quantized weight; default: the mode's (affine: 4). `rg_mlx.quant.MODES`
            lists what each mode takes.
        q_group_size: weights per quantization group; default: the mode's (affine: 64).
        q_mode: MLX's quantization mode: ``"affine"``, ``"mxfp4"``, ``"mxfp8"`` or ``"nvfp4"``.
        tokenizer: the `tokenizer.model` to copy; default: the one beside the checkpoint.
        overrides: config values to set, e.g. ``{"attention_window_size": 2048}`` (a DeepMind
            `.pt` holds no window or soft cap; the released sizes get their presets').
        chat: whether the model is instruction-tuned and gets Gemma's chat template; default
            (`is_chat_checkpoint`): when the source has a chat template of its own, or its name
            ends in ``-it``.
        upload_repo: upload the result to this hub repo (``"org/name"``) when done.
        force: replace an existing `output`.
        max_shard_bytes: the largest safetensors shard.
        progress: called after each tensor with (tensors done, tensors total, bytes done, bytes total).

    Returns:
        A `ConvertResult` (parameters, dtype, bits per weight, size on disk, time).
    """
    start = time.perf_counter()
    output = Path(output).expanduser()
    spec = QuantSpec(q_mode, q_bits, q_group_size) if quantize else None
    target = parse_dtype(dtype) if dtype is not None else None
    if upload_repo is not None:
        hub.check_upload_repo(upload_repo)
    _check_output(source, output, force)

    checkpoint = open_checkpoint(source)
    args = _apply_overrides(checkpoint.args, overrides or {})
    tok_path = Path(tokenizer).expanduser() if tokenizer is not None else checkpoint.tokenizer
    if tok_path is None:
        raise RGError(f"{source}: no tokenizer.model beside the checkpoint: pass --tokenizer PATH")
    tok = Tokenizer(tok_path)
    model = Model(args)  # never evaluated: it only tells the expected names, shapes and dtypes
    params = dict(tree_flatten(model.parameters()))
    check_tensors(checkpoint.tensors, params, source)
    if tok.vocab_size != args.vocab_size:
        raise RGError(
            f"{tok.path}: tokenizer has {tok.vocab_size} pieces but the embedding has {args.vocab_size} rows: "
            "pass the tokenizer.model that belongs to this checkpoint"
        )
    if target is None:
        target = checkpoint.tensors["model.embed_tokens.weight"].dtype
    is_chat = is_chat_checkpoint(source, checkpoint) if chat is None else chat

    expected = {name: tuple(a.shape) for name, a in params.items()}
    quantized = quantized_layers(model, spec) if spec else set()
    specs = _plan(expected, target, quantized, spec)
    parameters = sum(math.prod(s) for s in expected.values())

    output.parent.mkdir(parents=True, exist_ok=True)
    removed_partials = partial.remove_stale(output.parent)
    tmp = partial.create(output)
    progress = partial.pausing(progress)
    writer = WeightsWriter(tmp, specs, max_shard_bytes)
    try:
        _write_weights(writer, checkpoint, expected, target, quantized, spec, progress)
        files = writer.close({"total_parameters": parameters})
        config = args.to_dict()
        if spec:
            config.update(Quantization(spec).to_config())
        # mlx-lm takes its stop ids from config.json (not generation_config.json): both stops.
        ids = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.eos_ids), "pad_token_id": tok.pad_id}
        write_json(tmp / "config.json", {**config, **{k: v for k, v in ids.items() if v is not None}})
        shutil.copyfile(tok.path, tmp / "tokenizer.model")
        for name, content in tok.hf_files(chat=is_chat).items():
            write_json(tmp / name, content)
        write_generation_config(tmp, tok.bos_id, list(tok.eos_ids), tok.pad_id)
        write_model_card(
            tmp,
            name=upload_repo or output.name,
            base_model=checkpoint.base_model,
            description=_describe(checkpoint.base_model or Path(source).name, target, spec),
            chat=is_chat,
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
        dtype=dtype_name(target),
        quantization=spec,
        bits_per_weight=8 * writer.total_bytes / parameters,
        size_bytes=size,
        files=files,
        seconds=time.perf_counter() - start,
        removed_partials=removed_partials,
    )
    if upload_repo is not None:
        hub.upload(output, upload_repo)
    return result


# An instruction-tuned checkpoint's name: google/recurrentgemma-2b-it, 9b-it.pt, recurrentgemma_2b_it, ...
_IT_NAME = re.compile(r"(^|[-_])it$", re.IGNORECASE)


def is_chat_checkpoint(source: str | Path, checkpoint: Checkpoint) -> bool:
    """Whether a checkpoint is instruction-tuned (and its folder gets Gemma's chat template): the source
    has a chat template of its own (Hugging Face's `-it` repos do), or the name of the repo, folder
    or `.pt` file (or of the folder holding it) ends in ``-it``."""
    if checkpoint.chat_template is not None:
        return True
    path = Path(str(source)).expanduser()
    names = [checkpoint.base_model or "", path.stem if path.suffix in (".pt", ".pth") else path.name]
    if path.suffix in (".pt", ".pth"):
        names.append(path.parent.name)
    return any(_IT_NAME.search(name.rsplit("/", 1)[-1]) for name in names if name)


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


def _plan(
    expected: dict[str, tuple[int, ...]], dtype: mx.Dtype, quantized: set[str], spec: QuantSpec | None
) -> list[TensorSpec]:
    """Every output tensor, in writing order: a quantized layer's weight becomes its packed tensors."""
    specs = []
    for name, shape in expected.items():
        layer, _, leaf = name.rpartition(".")
        if layer in quantized and leaf == "weight":
            specs += [TensorSpec(*packed) for packed in spec.packed_shapes(layer, shape, dtype)]
        else:
            specs.append(TensorSpec(name, shape, dtype))
    return specs


def _write_weights(
    writer: WeightsWriter,
    checkpoint: Checkpoint,
    expected: dict[str, tuple[int, ...]],
    dtype: mx.Dtype,
    quantized: set[str],
    spec: QuantSpec | None,
    progress: Progress | None,
) -> None:
    """Read, cast, quantize and write one tensor at a time; nothing outlives its iteration."""
    done = 0
    for i, name in enumerate(expected, 1):
        w = checkpoint.tensors.pop(name).load().astype(dtype)
        layer, _, leaf = name.rpartition(".")
        outputs = spec.quantize(layer, w) if layer in quantized and leaf == "weight" else {name: w}
        del w
        mx.eval(list(outputs.values()))
        for out_name in list(outputs):
            a = outputs.pop(out_name)
            writer.write(out_name, a)
            done += a.nbytes
        mx.clear_cache()
        if progress is not None:
            progress(i, len(expected), done, writer.total_bytes)


def _describe(base: str, dtype: mx.Dtype, spec: QuantSpec | None) -> str:
    what = f"RecurrentGemma ({base}) in {dtype_name(dtype)}"
    return what + (f", quantized with MLX ({spec.describe()})" if spec else "")


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
