"""Random-weight benchmark checkpoints in Hugging Face format, loadable by rg_mlx, mlx-lm and transformers, and
their conversions by `rg_mlx.convert` into each kind of weights the bench compares (`weights_folder`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..config import ModelArgs, preset
from ..convert.write import TensorSpec, plan_shards
from ..model import Model, initial_weight

# "bench": the 2B widths with 6 layers (R R A R R A) and the full vocabulary, about 1.1B parameters.
CONFIGS: dict[str, ModelArgs] = {
    "bench": ModelArgs(
        vocab_size=256000,
        hidden_size=2560,
        intermediate_size=2 * 7680,
        num_hidden_layers=6,
        num_attention_heads=10,
        block_types=["recurrent", "recurrent", "attention"],
        attention_window_size=2048,
        logits_soft_cap=30.0,
    ),
    "2b": preset("2b"),
}

_SHARD_BYTES = 2 << 30
# The kinds of weights the bench compares: how `rg_mlx.convert` writes each (dtype, quantization bits); quantized
# weights keep bfloat16 scales and biases (group size 64), as `rg-mlx convert --dtype bfloat16 -q` writes them.
WEIGHTS: dict[str, tuple[str, int | None]] = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "8bit": ("bfloat16", 8),
    "4bit": ("bfloat16", 4),
}


def parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes (conv weight in HF's `[L, 1, 4]` layout)."""
    from mlx.utils import tree_flatten

    shapes = {name: tuple(p.shape) for name, p in tree_flatten(Model(args).parameters())}
    for name, shape in shapes.items():
        if name.endswith("conv_1d.weight"):
            shapes[name] = (shape[0], 1, shape[1])
    return shapes


def write_checkpoint(name: str, folder: Path, *, dtype: str = "float32", seed: int = 0) -> Path:
    """Write the random-weight checkpoint `name` (a key of `CONFIGS`) to `folder` unless it is there.

    The folder holds `config.json` (rg_mlx's normalised spelling, read by all three runtimes)
    and sharded `model-*.safetensors` with an index. It is written under a temporary name and
    renamed at the end, so an interrupted run never leaves a half-written checkpoint.
    """
    import mlx.core as mx

    folder = Path(folder)
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    args = CONFIGS[name]
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx_dtype = getattr(mx, dtype)
    mx.random.seed(seed)

    specs = [TensorSpec(n, s, mx_dtype) for n, s in parameter_shapes(args).items()]
    shards = plan_shards(specs, _SHARD_BYTES)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {t.name: initial_weight(t.name, t.shape, args.num_hidden_layers).astype(mx_dtype) for t in shard}
        mx.save_safetensors(str(tmp / file), tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": sum(t.nbytes for t in specs)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = args.to_dict()
    config["torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(tmp / "tokenizer.model", args.vocab_size)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """A `tokenizer.model` of `vocab_size` pieces, as `rg_mlx.convert` needs beside the weights: the bundled demo
    model's SentencePiece model (Gemma's special tokens and ids) padded with unused pieces. Prompts in the bench
    are random token ids, so what it encodes does not matter."""
    from sentencepiece import sentencepiece_model_pb2

    from ..demo import model_path

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((model_path() / "tokenizer.model").read_bytes())
    unused = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    for i in range(vocab_size - len(proto.pieces)):
        proto.pieces.add(piece=f"<unused{i}>", score=0.0, type=unused)
    path.write_bytes(proto.SerializeToString())
    return path


def weights_folder(name: str, base: Path, weights: str) -> Path:
    """The checkpoint `name` (written at `base` by `write_checkpoint`, its dtype in `base`'s config) with
    `weights` (a key of `WEIGHTS`): `base` itself where it already has them, else its conversion by
    `rg_mlx.convert`, written once beside it (`<name>-<weights>`)."""
    from ..convert import convert

    dtype, bits = WEIGHTS[weights]
    if bits is None and json.loads((base / "config.json").read_text()).get("torch_dtype") == dtype:
        return base
    folder = base.with_name(f"{name}-{weights}")
    if not (folder / "config.json").is_file():  # convert writes the folder whole, or not at all
        if not (base / "tokenizer.model").is_file():  # a checkpoint written before the tokenizer was
            write_tokenizer(base / "tokenizer.model", CONFIGS[name].vocab_size)
        convert(base, folder, dtype=dtype, quantize=bits is not None, q_bits=bits, q_group_size=64, chat=False)
    return folder


def folder_bytes(folder: Path) -> int:
    """Bytes of the weights in `folder` (its safetensors files): what a decode step reads, each weight once."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def parameter_count(args: ModelArgs) -> int:
    """Number of parameters (the tied embedding counted once)."""
    return sum(math.prod(s) for s in parameter_shapes(args).values())
