"""DeepMind's reference implementation for the tests: built tiny, randomised, mapped to HF names."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np


def import_reference():
    """Import `recurrentgemma.torch` without its package `__init__` (which imports JAX)."""
    if "recurrentgemma.torch" in sys.modules:
        return sys.modules["recurrentgemma.torch"]
    spec = importlib.util.find_spec("recurrentgemma")
    if spec is None:
        import pytest

        pytest.skip("DeepMind's recurrentgemma is not installed (pip install -e '.[dev]')")
    pkg = types.ModuleType("recurrentgemma")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["recurrentgemma"] = pkg
    import recurrentgemma.torch as rg_torch  # noqa: E402

    return rg_torch


def reference_model(
    *,
    vocab_size: int = 97,
    width: int = 64,
    mlp_expanded_width: int = 96,
    num_heads: int = 4,
    block_types=("recurrent", "recurrent", "attention"),
    lru_width: int | None = None,
    window: int = 8,
    soft_cap: float = 30.0,
    scale_embeddings: bool = True,
    seed: int = 0,
):
    """A random DeepMind `Griffin` (float32) with every parameter non-zero."""
    import torch

    rg = import_reference()
    from recurrentgemma import common

    config = common.GriffinConfig(
        vocab_size=vocab_size,
        width=width,
        mlp_expanded_width=mlp_expanded_width,
        num_heads=num_heads,
        block_types=tuple(common.TemporalBlockType[t.upper()] for t in block_types),
        embeddings_scale_by_sqrt_dim=scale_embeddings,
        attention_window_size=window,
        logits_soft_cap=soft_cap,
        lru_width=lru_width,
    )
    torch.manual_seed(seed)
    model = rg.Griffin(config, gradient_checkpointing=False, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm scales, biases start at zero: randomise so the test sees them.
            if name.endswith(("scale", ".b", ".bias")) or p.abs().max() == 0:
                p.copy_(torch.randn_like(p) * 0.3)
            if name.endswith("input_embedding"):
                p.copy_(torch.randn_like(p) * 0.5)
    model.eval()
    return model, config


def dm_to_hf(state_dict, config) -> dict[str, np.ndarray]:
    """DeepMind PyTorch state_dict -> Hugging Face tensor names (NumPy float32)."""
    out: dict[str, np.ndarray] = {}
    sd = {k: v.detach().float().numpy() for k, v in state_dict.items()}
    out["model.embed_tokens.weight"] = sd["embedder.input_embedding"]
    out["model.final_norm.weight"] = sd["final_norm.scale"]
    for i, t in enumerate(config.block_types):
        d, h = f"blocks.{i}", f"model.layers.{i}"
        out[f"{h}.temporal_pre_norm.weight"] = sd[f"{d}.temporal_pre_norm.scale"]
        out[f"{h}.channel_pre_norm.weight"] = sd[f"{d}.channel_pre_norm.scale"]
        up_w, up_b = sd[f"{d}.mlp_block.ffw_up.w"], sd[f"{d}.mlp_block.ffw_up.b"]
        out[f"{h}.mlp_block.gate_proj.weight"] = up_w[0].T
        out[f"{h}.mlp_block.gate_proj.bias"] = up_b[0].reshape(-1)
        out[f"{h}.mlp_block.up_proj.weight"] = up_w[1].T
        out[f"{h}.mlp_block.up_proj.bias"] = up_b[1].reshape(-1)
        out[f"{h}.mlp_block.down_proj.weight"] = sd[f"{d}.mlp_block.ffw_down.weight"]
        out[f"{h}.mlp_block.down_proj.bias"] = sd[f"{d}.mlp_block.ffw_down.bias"]
        tb = f"{h}.temporal_block"
        if t.name == "RECURRENT":
            r = f"{d}.recurrent_block"
            for name in ("linear_x", "linear_y", "linear_out"):
                out[f"{tb}.{name}.weight"] = sd[f"{r}.{name}.weight"]
                out[f"{tb}.{name}.bias"] = sd[f"{r}.{name}.bias"]
            out[f"{tb}.conv_1d.weight"] = sd[f"{r}.conv_1d.w"].T[:, None, :]  # HF [L, 1, 4]
            out[f"{tb}.conv_1d.bias"] = sd[f"{r}.conv_1d.b"]
            out[f"{tb}.rg_lru.recurrent_param"] = sd[f"{r}.rg_lru.a_param"]
            out[f"{tb}.rg_lru.input_gate_weight"] = sd[f"{r}.rg_lru.input_gate.w"]
            out[f"{tb}.rg_lru.input_gate_bias"] = sd[f"{r}.rg_lru.input_gate.b"]
            out[f"{tb}.rg_lru.recurrent_gate_weight"] = sd[f"{r}.rg_lru.a_gate.w"]
            out[f"{tb}.rg_lru.recurrent_gate_bias"] = sd[f"{r}.rg_lru.a_gate.b"]
        else:
            a = f"{d}.attention_block"
            out[f"{tb}.q_proj.weight"] = sd[f"{a}.proj_q.weight"]
            out[f"{tb}.k_proj.weight"] = sd[f"{a}.proj_k.weight"]
            out[f"{tb}.v_proj.weight"] = sd[f"{a}.proj_v.weight"]
            out[f"{tb}.o_proj.weight"] = sd[f"{a}.proj_final.weight"]
            out[f"{tb}.o_proj.bias"] = sd[f"{a}.proj_final.bias"]
    return out


def hf_config(config) -> dict:
    """The HF `config.json` (transformers-5 spelling) of a DeepMind config."""
    return {
        "model_type": "recurrent_gemma",
        "vocab_size": config.vocab_size,
        "hidden_size": config.width,
        "intermediate_size": 2 * config.mlp_expanded_width,
        "num_hidden_layers": len(config.block_types),
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": 1,
        "lru_width": config.lru_width or config.width,
        "attention_window_size": config.attention_window_size,
        "logits_soft_cap": config.logits_soft_cap,
        "embeddings_scale_by_sqrt_dim": config.embeddings_scale_by_sqrt_dim,
        "block_types": [t.name.lower() for t in config.block_types],
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"},
        "conv1d_width": 4,
    }


def save_hf_folder(folder: Path, config, weights: dict[str, np.ndarray]) -> Path:
    """Write an HF-format folder (config.json + model.safetensors) for a DeepMind config."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(config)))
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(folder / "model.safetensors"))
    return folder


def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Full-pass float32 logits of the DeepMind model for `tokens` `[B, T]`."""
    import torch

    t = torch.tensor(tokens, dtype=torch.long)
    pos = torch.arange(t.shape[1]).repeat(t.shape[0], 1)
    with torch.no_grad():
        logits, _ = model(t, pos, return_cache=False)
    return logits.numpy()
