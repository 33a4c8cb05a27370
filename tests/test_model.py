"""The model against DeepMind's reference (and Hugging Face's where they agree), and its fixed-size state."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import rg_mlx.cpu.parallel as parallel
import rg_mlx.model as model_mod
from rg_mlx import ModelArgs, RGError, cpu, load_model, preset
from rg_mlx.state import RecurrentState, state_bytes
from reference import dm_to_hf, reference_logits, reference_model, save_hf_folder

WINDOW = 8
T = 3 * WINDOW + 6  # well past the attention window
CONFIGS = {
    "rra": dict(),
    "lru_width_attention_first": dict(lru_width=96, block_types=("attention", "recurrent", "recurrent")),
    "no_cap_no_scale": dict(soft_cap=0.0, scale_embeddings=False, block_types=("recurrent", "attention")),
}


@pytest.fixture(scope="module", params=[(c, a) for c in CONFIGS for a in ("plain", "accelerated")], ids="-".join)
def pair(request, tmp_path_factory):
    """(DeepMind reference, our model loaded from an HF-layout folder, tokens [2, T], reference logits), for
    the plain model and the one with the CPU accelerations applied."""
    name, kind = request.param
    ref, cfg = reference_model(window=WINDOW, **CONFIGS[name])
    folder = save_hf_folder(tmp_path_factory.mktemp(name), cfg, dm_to_hf(ref.state_dict(), cfg))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, T))
    model = load_model(folder, dtype="float32", accelerate=kind == "accelerated")
    assert cpu.accelerated(model) == (kind == "accelerated")
    return ref, model, tokens, reference_logits(ref, tokens)


def test_full_pass_matches_reference(pair):
    _, model, tokens, expected = pair
    got = np.array(model(mx.array(tokens)))
    assert np.abs(got - expected).max() <= 1e-4


def test_blockwise_long_attention_matches_reference(pair, monkeypatch):
    # Long inputs attend in query blocks; force tiny blocks to exercise the block edges.
    monkeypatch.setattr(model_mod, "ATTENTION_BLOCK", 5)
    _, model, tokens, expected = pair
    assert np.abs(np.array(model(mx.array(tokens))) - expected).max() <= 1e-4


@pytest.mark.parametrize("chunk", [1, 3, WINDOW - 1, WINDOW + 1])
def test_chunked_prefill_then_decode_matches_reference(pair, chunk):
    _, model, tokens, expected = pair
    cache = model.make_cache()
    prefill = 2 * WINDOW + 3
    outs = [np.array(model(mx.array(tokens[:, s : min(prefill, s + chunk)]), cache=cache)) for s in range(0, prefill, chunk)]
    outs += [np.array(model(mx.array(tokens[:, t : t + 1]), cache=cache)) for t in range(prefill, T)]
    assert np.abs(np.concatenate(outs, axis=1) - expected).max() <= 1e-4


def test_decode_split_over_cpu_streams_matches_reference(pair, monkeypatch):
    # Decode-sized products of large weights run split over CPU streams; force it for tiny weights.
    split = []
    monkeypatch.setattr(parallel, "MIN_BYTES", 0)
    monkeypatch.setattr(parallel._blas, "threaded_row_products", lambda: False)
    run = parallel._on_streams
    monkeypatch.setattr(parallel, "_on_streams", lambda n, part: split.append(n) or run(n, part))
    _, model, tokens, expected = pair
    cache = model.make_cache()
    prefill = 2 * WINDOW + 3
    outs = [np.array(model(mx.array(tokens[:, :prefill]), cache=cache))]
    outs += [np.array(model(mx.array(tokens[:, t : t + 1]), cache=cache)) for t in range(prefill, T)]
    assert np.abs(np.concatenate(outs, axis=1) - expected).max() <= 1e-4
    assert bool(split) == cpu.accelerated(model)


@pytest.mark.parametrize("chunk", [3, 12])
def test_left_padding_does_not_leak(pair, chunk):
    # Chunks of 3 cross the padding (a row still in it), then attend over a ring that is still
    # filling (its high slots hold the padding's keys), then over a full one.
    _, model, tokens, _ = pair
    pads = [0, 5]
    batch = np.stack([np.pad(tokens[0, :20], (0, 0)), np.pad(tokens[1, :15], (5, 0), constant_values=3)])
    cache = model.make_cache(left_padding=pads)
    parts = [np.array(model(mx.array(batch[:, s : s + chunk]), cache=cache)) for s in range(0, 20, chunk)]
    got = np.concatenate(parts, axis=1)
    alone0 = np.array(model(mx.array(tokens[:1, :20])))
    alone1 = np.array(model(mx.array(tokens[1:, :15])))
    assert np.abs(got[0] - alone0[0]).max() <= 1e-4
    assert np.abs(got[1, 5:] - alone1[0]).max() <= 1e-4
    assert np.isfinite(got).all()


@pytest.mark.parametrize("accelerate", [False, True], ids=["bfloat16 throughout", "bfloat16 products"])
def test_bfloat16_agrees_and_state_stays_float32(tmp_path, accelerate):
    """`dtype="bfloat16"`: the plain model computes in bfloat16 throughout (as on a GPU); on the CPU with the native
    products only the products are bfloat16 (`rg_mlx.loading.bfloat16_products`). Either way the greedy tokens
    agree with the reference and the recurrence runs in float32."""
    from rg_mlx.loading import bfloat16_products

    ref, cfg = reference_model(window=WINDOW, width=128, num_heads=4, mlp_expanded_width=192, vocab_size=211)
    folder = save_hf_folder(tmp_path, cfg, dm_to_hf(ref.state_dict(), cfg))
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 64))
    expected = reference_logits(ref, tokens).argmax(-1)
    model = load_model(folder, dtype="bfloat16", accelerate=accelerate)
    compute = mx.float32 if bfloat16_products(mx.bfloat16, accelerate) else mx.bfloat16
    cache = model.make_cache()
    got = model(mx.array(tokens), cache=cache)
    assert got.dtype == compute
    agreement = (np.array(got.astype(mx.float32)).argmax(-1) == expected).mean()
    assert agreement >= 0.99
    for layer, c in zip(model.layers, cache):
        if layer.temporal_block_type == "recurrent":
            assert RecurrentState(c).h.dtype == mx.float32
            assert RecurrentState(c).conv.dtype == compute  # the model dtype


def test_matches_hugging_face_within_window(tmp_path):
    """Hugging Face's RecurrentGemma agrees with DeepMind while sequences are shorter than the window."""
    import torch
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    config = RecurrentGemmaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, attention_window_size=32, block_types=["recurrent", "recurrent", "attention"],
    )
    torch.manual_seed(0)
    hf = RecurrentGemmaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path)
    tokens = np.random.default_rng(3).integers(0, 101, (2, 20))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    got = np.array(load_model(tmp_path, dtype="float32")(mx.array(tokens)))
    assert np.abs(got - expected).max() <= 1e-4


def test_state_bytes_do_not_grow(tiny_model_dir):
    model = load_model(tiny_model_dir)
    cache = model.make_cache()
    sizes, seen = [], 0
    rng = np.random.default_rng(0)
    for target in (10, 1000, 10000):
        while seen < target:
            n = min(512, target - seen)
            model.model(mx.array(rng.integers(0, 400, (1, n))), cache)
            mx.eval([c.state for c in cache])
            seen += n
        sizes.append(state_bytes(cache))
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_config_spellings():
    base = dict(model_type="recurrent_gemma", vocab_size=10, hidden_size=8, intermediate_size=24,
                num_hidden_layers=3, num_attention_heads=2)
    hub_2b = ModelArgs.from_dict({**base, "_block_types": ["recurrent", "recurrent", "attention"],
                                  "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    tf5 = ModelArgs.from_dict({**base, "block_types": ["recurrent", "recurrent", "attention"],
                               "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}})
    assert hub_2b == tf5
    assert tf5.lru_width == 8 and tf5.mlp_width == 12 and tf5.num_key_value_heads == 1
    assert ModelArgs.from_dict(tf5.to_dict()) == tf5
    assert preset("2b").layer_types.count("attention") == 8
    assert preset("9b").layer_types.count("attention") == 12


def test_parameter_count_of_presets():
    from mlx.utils import tree_flatten

    def count(args):
        return sum(v.size for _, v in tree_flatten(model_mod.Model(args).parameters()))

    # Build shapes only (lazy arrays are never evaluated).
    assert round(count(preset("2b")) / 1e9, 3) == 2.683
    assert round(count(preset("9b")) / 1e9, 2) == 8.58


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(model_type="llama"), "model_type"),
        (lambda c: c.update(hidden_size=96, lru_width=96), "shape"),
        (lambda c: c.update(num_hidden_layers=4), "missing"),
    ],
)
def test_bad_folder_errors(tiny_model_dir, tmp_path, change, message):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    change(config)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(RGError, match=message) as info:
        load_model(bad)
    assert "\n" not in str(info.value)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(RGError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RGError, match="model_type"):
        load_model(tmp_path)


def test_corrupt_safetensors(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RGError, match="truncated or corrupt"):
        load_model(bad)


def test_dtype_names():
    from rg_mlx.loading import parse_dtype

    assert parse_dtype("bfloat16") == mx.bfloat16
    assert parse_dtype(mx.float16) == mx.float16
    assert parse_dtype(None) == mx.float32  # CPU default
    with pytest.raises(RGError, match="float64"):
        parse_dtype("float64")
