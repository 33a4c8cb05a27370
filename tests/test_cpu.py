"""`rg_mlx.cpu.accelerate`: what it swaps, that the model's code is untouched, and how it is turned off."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import rg_mlx.model as model_mod
from rg_mlx import RGError, cpu, load_model
from rg_mlx.cpu import ops, parallel


def test_accelerate_swaps_layers_and_ops_and_keeps_the_parameters(tiny_model_dir):
    plain = load_model(tiny_model_dir, accelerate=False)
    fast = load_model(tiny_model_dir, accelerate=True)
    assert not cpu.accelerated(plain) and cpu.accelerated(fast)
    assert plain.ops == model_mod.Ops()
    kinds = {type(m) for _, m in fast.named_modules()}
    assert nn.Linear not in kinds and nn.Embedding not in kinds
    assert {parallel.SplitLinear, parallel.SplitEmbedding} <= kinds
    assert fast.ops.rg_lru is ops.rg_lru and fast.ops.ring is ops.filled_ring
    # The same parameter tree (names, arrays): checkpoints, LoRA and prompt caches see no difference.
    from mlx.utils import tree_flatten

    a, b = dict(tree_flatten(plain.parameters())), dict(tree_flatten(fast.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    tokens = mx.array(np.random.default_rng(0).integers(0, 400, (2, 40)))
    assert np.abs(np.array(fast(tokens)) - np.array(plain(tokens))).max() <= 1e-4
    cpu.accelerate(fast)  # twice: nothing more changes
    assert {type(m) for _, m in fast.named_modules()} == kinds


def test_the_blocks_share_the_models_op_table(tiny_model_dir):
    model = load_model(tiny_model_dir, accelerate=True)
    tables = {id(m.ops) for _, m in model.named_modules() if hasattr(m, "ops") and isinstance(m, nn.Module)}
    assert tables == {id(model.ops)}


def test_swap_layers_counts_and_keeps_the_rest():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    swapped = cpu.swap_layers(model, lambda path, m: cpu.recast(m, parallel.SplitLinear)
                              if type(m) is nn.Linear else None)
    assert swapped == 2
    assert [type(m) for m in model.layers] == [parallel.SplitLinear, nn.ReLU, parallel.SplitLinear]
    assert "bias" not in model.layers[2]


@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), ("1", True), ("", True)])
def test_environment_switch(monkeypatch, value, expected):
    monkeypatch.setenv(cpu.ENV_VAR, value)
    assert cpu.wanted() is expected  # the tests run on the CPU: unset means on
    assert cpu.wanted(False) is False and cpu.wanted(True) is True


def test_bad_environment_value_is_one_line(monkeypatch):
    monkeypatch.setenv(cpu.ENV_VAR, "fast")
    with pytest.raises(RGError, match=f"{cpu.ENV_VAR}='fast'") as info:
        cpu.wanted()
    assert "\n" not in str(info.value)


def test_cpu_rg_lru_defers_to_the_kernels_for_a_step_and_a_forced_path(monkeypatch):
    from rg_mlx import kernels

    rng = np.random.default_rng(0)
    x, gx, ga = (mx.array(rng.normal(size=(1, 5, 8)).astype(np.float32)) for _ in range(3))
    a_param = mx.array(rng.normal(size=(8,)).astype(np.float32))
    y, h = ops.rg_lru(x, gx, ga, a_param)
    y0, h0 = kernels.rg_lru_ops(x, gx, ga, a_param)
    assert np.allclose(np.array(y), np.array(y0), atol=1e-6) and np.allclose(np.array(h), np.array(h0), atol=1e-6)
    monkeypatch.setenv("RG_MLX_SCAN", "metal")
    with pytest.raises(RGError, match="cannot run here"):
        ops.rg_lru(x, gx, ga, a_param)
