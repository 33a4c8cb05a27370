"""Opening the published checkpoints: Hugging Face folders and hub repos, DeepMind PyTorch `.pt` files.

Every source becomes a `Checkpoint`: the config, and its tensors under our parameter names
(Hugging Face's, conv weight `[L, 4, 1]`), each read only when asked for, so conversion can
stream one tensor at a time. Tensors the mapping does not know keep their source name, so the
caller can report them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import mlx.core as mx

from rg_mlx import hub, quant
from rg_mlx.config import ModelArgs, preset
from rg_mlx.errors import RGError, first_line
from rg_mlx.loading import read_config_json, read_weights
from rg_mlx.model import Model
from rg_mlx.tokenizer import CONFIG_FILE, read_chat_template

# Files that mark a DeepMind Flax/Orbax checkpoint folder.
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint", "commit_success.txt")


class Tensor(NamedTuple):
    """A checkpoint tensor in our layout: its shape now, its data when `load()` is called."""

    shape: tuple[int, ...]
    dtype: mx.Dtype
    load: Callable[[], mx.array]


@dataclass
class Checkpoint:
    """A checkpoint opened for conversion."""

    args: ModelArgs
    tensors: dict[str, Tensor]
    tokenizer: Path | None
    base_model: str | None = None
    chat_template: str | None = None  # the source's own, where it has one (an instruction-tuned model)


def open_checkpoint(source: str | Path) -> Checkpoint:
    """Open `source`: an HF-format folder, a hub repo id, a DeepMind `.pt` file or a folder holding one."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return open_deepmind_pt(path)
        raise RGError(
            f"{source}: not a checkpoint: pass a Hugging Face folder (config.json + *.safetensors), "
            "a hub repo id, or a DeepMind .pt file"
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return open_hf_folder(path)
        pts = sorted(path.glob("*.pt"))
        if len(pts) == 1:
            return open_deepmind_pt(pts[0])
        if any((path / m).exists() for m in ORBAX_MARKERS):
            raise RGError(
                f"{source}: a DeepMind Flax/Orbax checkpoint, which rg-mlx does not read: download the PyTorch "
                "variant of the same model from Kaggle (google/recurrentgemma, framework PyTorch) and convert its "
                ".pt file, or convert the Hugging Face repo (e.g. google/recurrentgemma-2b-it)"
            )
        if pts:
            raise RGError(f"{source}: holds several .pt files ({', '.join(p.name for p in pts)}): pass one of them")
        raise RGError(f"{source}: no config.json and no .pt file: not a RecurrentGemma checkpoint folder")
    if hub.is_repo_id(str(source)):
        checkpoint = open_hf_folder(hub.download(str(source)))
        checkpoint.base_model = str(source)
        return checkpoint
    raise RGError(f"{source}: no such file or folder (and not a hub repo id such as google/recurrentgemma-2b-it)")


def open_hf_folder(folder: Path) -> Checkpoint:
    """A Hugging Face-format folder: `config.json` (any spelling) and safetensors, sharded or not."""
    config = read_config_json(folder)
    args = ModelArgs.from_dict(config)
    if quant.read(config) is not None:
        raise RGError(f"{folder}: already quantized: convert the original checkpoint instead")
    weights = Model(args).sanitize(read_weights(folder))  # lazy: nothing is read yet
    tensors = {name: Tensor(tuple(a.shape), a.dtype, lambda a=a: a) for name, a in weights.items()}
    tokenizer = folder / "tokenizer.model"
    return Checkpoint(args, tensors, tokenizer if tokenizer.is_file() else None,
                      chat_template=read_chat_template(folder / CONFIG_FILE))


# DeepMind names -> ours. Top level, then within `blocks.{i}` -> `model.layers.{i}`; ffw_up and
# conv_1d.w change layout and are handled in `_deepmind_tensors`.
_DM_TOP = {"embedder.input_embedding": "model.embed_tokens.weight", "final_norm.scale": "model.final_norm.weight"}
_DM_BLOCK = {
    "temporal_pre_norm.scale": "temporal_pre_norm.weight",
    "channel_pre_norm.scale": "channel_pre_norm.weight",
    "mlp_block.ffw_down.weight": "mlp_block.down_proj.weight",
    "mlp_block.ffw_down.bias": "mlp_block.down_proj.bias",
    **{
        f"recurrent_block.{n}.{p}": f"temporal_block.{n}.{p}"
        for n in ("linear_x", "linear_y", "linear_out")
        for p in ("weight", "bias")
    },
    "recurrent_block.conv_1d.b": "temporal_block.conv_1d.bias",
    "recurrent_block.rg_lru.a_param": "temporal_block.rg_lru.recurrent_param",
    "recurrent_block.rg_lru.input_gate.w": "temporal_block.rg_lru.input_gate_weight",
    "recurrent_block.rg_lru.input_gate.b": "temporal_block.rg_lru.input_gate_bias",
    "recurrent_block.rg_lru.a_gate.w": "temporal_block.rg_lru.recurrent_gate_weight",
    "recurrent_block.rg_lru.a_gate.b": "temporal_block.rg_lru.recurrent_gate_bias",
    "attention_block.proj_q.weight": "temporal_block.q_proj.weight",
    "attention_block.proj_k.weight": "temporal_block.k_proj.weight",
    "attention_block.proj_v.weight": "temporal_block.v_proj.weight",
    "attention_block.proj_final.weight": "temporal_block.o_proj.weight",
    "attention_block.proj_final.bias": "temporal_block.o_proj.bias",
}
# The released sizes by width: their presets give what the tensors do not tell (window, soft cap).
_PRESETS = {2560: "2b", 4096: "9b"}


def open_deepmind_pt(path: Path) -> Checkpoint:
    """A DeepMind PyTorch state_dict, memory-mapped; the config is inferred from the tensor shapes."""
    try:
        import torch
    except ImportError:
        raise RGError(
            "converting a DeepMind .pt checkpoint needs PyTorch: pip install -e '.[torch]' in the rg-mlx clone"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for bad files; none may escape as a traceback
        raise RGError(f"{path}: cannot read the PyTorch checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RGError(f"{path}: not a state_dict of tensors: not a DeepMind RecurrentGemma checkpoint")
    for key, t in state.items():
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise RGError(f"{path}: tensor {key} has dtype {t.dtype}: expected float32, bfloat16 or float16")
    tokenizer = path.parent / "tokenizer.model"
    return Checkpoint(_deepmind_args(state, path), _deepmind_tensors(state), tokenizer if tokenizer.is_file() else None)


def _deepmind_args(state: dict[str, Any], path: Path) -> ModelArgs:
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise RGError(f"{path}: missing tensor {key}: not a complete DeepMind RecurrentGemma checkpoint")
        return tuple(state[key].shape)

    vocab, width = shape("embedder.input_embedding")
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not layers:
        raise RGError(f"{path}: no blocks.* tensors: not a DeepMind RecurrentGemma checkpoint")
    types = ["recurrent" if f"blocks.{i}.recurrent_block.linear_x.weight" in state else "attention" for i in layers]
    period = next(p for p in range(1, len(types) + 1) if all(t == types[i % p] for i, t in enumerate(types)))
    if "recurrent" in types:
        r = f"blocks.{types.index('recurrent')}.recurrent_block"
        lru_width = shape(f"{r}.linear_x.weight")[0]
        heads = shape(f"{r}.rg_lru.input_gate.w")[0]
    else:
        lru_width = None
        heads = width // shape(f"blocks.{types.index('attention')}.attention_block.proj_k.weight")[0]
    fields = dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * shape("blocks.0.mlp_block.ffw_up.w")[-1],
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        block_types=types[:period],
        lru_width=lru_width,
    )
    if width in _PRESETS:
        return dataclasses.replace(preset(_PRESETS[width], vocab), **fields)
    return ModelArgs(**fields)


def _deepmind_tensors(state: dict[str, Any]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        prefix, rest = (f"model.layers.{m[1]}.", m[2]) if m else ("", key)
        if m and rest == "mlp_block.ffw_up.w":  # [2, W, M], index 0 = the gelu (gate) branch
            out[prefix + "mlp_block.gate_proj.weight"] = _torch_tensor(t[0].T)
            out[prefix + "mlp_block.up_proj.weight"] = _torch_tensor(t[1].T)
        elif m and rest == "mlp_block.ffw_up.b":  # [2, 1, 1, M]
            out[prefix + "mlp_block.gate_proj.bias"] = _torch_tensor(t[0].reshape(-1))
            out[prefix + "mlp_block.up_proj.bias"] = _torch_tensor(t[1].reshape(-1))
        elif m and rest == "recurrent_block.conv_1d.w":  # [K, L] -> [L, K, 1]
            out[prefix + "temporal_block.conv_1d.weight"] = _torch_tensor(t.T[:, :, None])
        elif m and rest in _DM_BLOCK:
            out[prefix + _DM_BLOCK[rest]] = _torch_tensor(t)
        elif not m and key in _DM_TOP:
            out[_DM_TOP[key]] = _torch_tensor(t)
        else:
            out[key] = _torch_tensor(t)  # unknown: reported under its own name
    return out


def _torch_tensor(t) -> Tensor:
    """A view of a memory-mapped torch tensor, copied into MLX only when loaded."""

    def load() -> mx.array:
        import torch

        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: move the bits
            return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
        return mx.array(t.numpy())

    return Tensor(tuple(t.shape), getattr(mx, str(t.dtype).removeprefix("torch.")), load)
