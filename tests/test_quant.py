"""rg_mlx.quant: the spec against what MLX accepts and packs, config.json as mlx-lm writes it, and loading
mlx-lm's quantized folders (modes, per-layer entries)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from rg_mlx import RGError, load_model
from rg_mlx.quant import DEFAULTS, MODES, Quantization, QuantSpec, read

SUPPORTED = [(mode, bits, g) for mode, (all_bits, groups) in MODES.items() for bits in all_bits for g in groups]


def _mlx_accepts(mode: str, bits: int, group_size: int) -> bool:
    try:
        mx.eval(mx.quantize(mx.ones((4, 128)), group_size, bits, mode=mode))
        return True
    except ValueError:
        return False


def test_modes_table_is_what_mx_quantize_accepts():
    for mode in [*MODES, "int4"]:
        for bits in range(1, 9):
            for group_size in (16, 32, 64, 128):
                ours = mode in MODES and bits in MODES[mode][0] and group_size in MODES[mode][1]
                assert _mlx_accepts(mode, bits, group_size) == ours, (mode, bits, group_size)
                if not ours:
                    with pytest.raises(RGError, match="unsupported quantization") as e:
                        QuantSpec(mode, bits, group_size)
                    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode", list(MODES))
def test_defaults_are_mlx_defaults(mode):
    layer = nn.Linear(128, 8).to_quantized(mode=mode)  # MLX fills in its own defaults
    spec = QuantSpec(mode)
    assert (spec.bits, spec.group_size) == (layer.bits, layer.group_size) == DEFAULTS[mode]


@pytest.mark.parametrize("mode, bits, group_size", SUPPORTED)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_packed_shapes_are_what_mlx_packs(mode, bits, group_size, dtype):
    spec = QuantSpec(mode, bits, group_size)
    linear = nn.Linear(256, 24)
    linear.set_dtype(dtype)
    layer = linear.to_quantized(**spec.to_dict())
    params = {f"x.{k}": (tuple(v.shape), v.dtype) for k, v in tree_flatten(layer.parameters()) if k != "bias"}
    planned = {name: (shape, d) for name, shape, d in spec.packed_shapes("x", (24, 256), dtype)}
    assert planned == params
    packed = spec.quantize("x", linear.weight)
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == planned
    assert list(packed) == list(planned)  # the order the converter writes them in


def test_read_config_spellings():
    assert read({"vocab_size": 8}) is None
    q = {"group_size": 32, "bits": 8, "mode": "affine"}
    assert read({"quantization": q}) == read({"quantization_config": q}) == Quantization(QuantSpec("affine", 8, 32))
    assert read({"quantization": {"group_size": 64, "bits": 4}}).spec == QuantSpec("affine", 4, 64)  # older mlx-lm
    entries = {"model.a": {"group_size": 64, "bits": 4}, "model.b": False, "model.c": True}
    per_layer = read({"quantization": {**q, **entries}})
    assert per_layer.layers == {"model.a": QuantSpec("affine", 4, 64), "model.b": None, "model.c": per_layer.spec}
    assert read(per_layer.to_config()) == per_layer
    config = Quantization(QuantSpec("mxfp4")).to_config()
    assert config["quantization"] == config["quantization_config"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method 'awq' is not MLX quantization"),
        ({"quantization": {"group_size": 64, "bits": 7}}, "unsupported quantization bits 7 for mode affine"),
        ({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4", "model.x": {"mode": "q9"}}}, "mode 'q9'"),
        ({"quantization": {"group_size": "many", "bits": 4}}, "unreadable quantization entry"),
        ({"quantization": 4}, "quantization must be an object"),
    ],
)
def test_read_rejects_what_it_cannot_load(config, message):
    with pytest.raises(RGError, match=message) as e:
        read(config)
    assert "\n" not in str(e.value)


def _mlx_lm_quantized(src, dst, **kwargs):
    """A folder quantized and saved by mlx-lm itself (`mlx_lm.utils.quantize_model`, `save_model`)."""
    from mlx_lm.utils import load_model as mlx_lm_load
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, config = mlx_lm_load(src)
    model, config = quantize_model(model, config, **kwargs)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    return dst


def test_loads_mlx_lm_quantized_folders(tiny_model_dir, tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load

    # Mixed precision as mlx-lm's recipes write it: per-layer entries, some layers left in float.
    def recipe(path, module):
        if "mlp_block" in path:
            return {"group_size": 32, "bits": 8, "mode": "affine"}
        return "q_proj" not in path

    cases = {
        "mixed": dict(group_size=64, bits=4, quant_predicate=recipe),
        "mxfp8": dict(group_size=None, bits=None, mode="mxfp8"),
    }
    tokens = mx.array(np.random.RandomState(4).randint(0, 400, size=(2, 12)), dtype=mx.int32)  # T < window 16
    for name, kwargs in cases.items():
        folder = _mlx_lm_quantized(tiny_model_dir, tmp_path / name, **kwargs)
        theirs, _ = mlx_lm_load(folder)
        ours = load_model(folder, dtype="float32")
        # Every layer as mlx-lm built it: the same mode, bits and group size, or left in float.
        kinds = {p: (m.mode, m.bits, m.group_size) for p, m in theirs.named_modules() if hasattr(m, "scales")}
        assert kinds == {p: (m.mode, m.bits, m.group_size) for p, m in ours.named_modules() if hasattr(m, "scales")}
        assert kinds and len(set(kinds.values())) == (2 if name == "mixed" else 1)
        # mlx-lm differs from DeepMind only in its block-norm eps (1e-5 vs 1e-6) this early.
        np.testing.assert_allclose(np.array(theirs(tokens)), np.array(ours(tokens)), atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert config["quantization"]["model.layers.0.mlp_block.up_proj"]["bits"] == 8  # per-layer entries were read


def test_bad_quantized_folder_is_one_line(tiny_model_dir, tmp_path):
    folder = _mlx_lm_quantized(tiny_model_dir, tmp_path / "q", group_size=64, bits=4)
    config = json.loads((folder / "config.json").read_text())

    def broken(name, change):
        bad = tmp_path / name
        shutil.copytree(folder, bad)
        c = json.loads(json.dumps(config))
        change(c)
        (bad / "config.json").write_text(json.dumps(c))
        with pytest.raises(RGError) as e:
            load_model(bad)
        assert "\n" not in str(e.value)
        return str(e.value)

    # The stored spec is what the loader builds: another one does not fit the packed tensors.
    assert "the config implies" in broken("bits", lambda c: c["quantization"].update(bits=8))
    mode = broken("mode", lambda c: c["quantization"].update(mode="mxfp4", group_size=32))
    assert "tensors do not match the config: unknown model." in mode and ".biases" in mode  # mxfp4 has none
    layer = "model.layers.0.mlp_block.down_proj"  # input 96: group size 64 cannot divide it
    assert f"layer {layer} is quantized with group size 64" in broken(
        "group", lambda c: c["quantization"].update({layer: {"group_size": 64, "bits": 4}})
    )
