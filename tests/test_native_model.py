"""Whole models on rg_mlx's native CPU products: the CPU dtype rule (`rg_mlx.loading.cast_parameters`) and the
acceptance of the kernels on the three tiny DeepMind-reference configurations, quantized and bfloat16.

- float32 activations (the CPU default): a bfloat16 folder keeps its weights in bfloat16 and gives the logits of
  the float32 model with the same weights; a quantized folder keeps its bfloat16 scales and gives the logits of
  MLX's own quantized product with float32 activations; full-model logits within 1e-4, greedy tokens identical.
- bfloat16 products (`dtype="bfloat16"` on the CPU, `rg_mlx.loading.bfloat16_products`): float32 for everything
  but the products, whose activations and results are rounded to bfloat16; against the float32 model of the same
  weights whose products are MLX's float32 ones with the same two roundings (MLX's own CPU quantized product
  accumulates bfloat16 activations in bfloat16, which is less exact than the kernels): within two bfloat16 ulps
  of each row's largest logit, the same argmax everywhere, greedy tokens identical.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from rg_mlx import cpu, load_model, quant
from rg_mlx.cpu import native
from rg_mlx.cpu.native_layers import NativeEmbedding, NativeLinear, NativeQuantizedEmbedding, NativeQuantizedLinear
from rg_mlx.model import Model
from reference import dm_to_hf, reference_model, save_hf_folder

NATIVE = {NativeLinear, NativeEmbedding, NativeQuantizedLinear, NativeQuantizedEmbedding}
needs_native = pytest.mark.skipif(not native.available(), reason=f"native CPU products: {native.status()}")

WINDOW = 8
T = 3 * WINDOW + 6
# tests/test_model.py's three configurations of DeepMind's reference.
CONFIGS = {
    "rra": dict(),
    "lru_width_attention_first": dict(lru_width=96, block_types=("attention", "recurrent", "recurrent")),
    "no_cap_no_scale": dict(soft_cap=0.0, scale_embeddings=False, block_types=("recurrent", "attention")),
}
GROUP = 32  # divides every input width of these configurations (64, 96)
TOKENS = np.random.default_rng(1).integers(0, 97, (2, T))


@contextlib.contextmanager
def native_off():
    """MLX's own products, as where the extension is not built (`RG_MLX_NATIVE=off` read anew)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "_native", None)
        mp.setattr(native, "_status", "off (this test)")
        yield


@pytest.fixture(scope="module", params=list(CONFIGS))
def float32_folder(request, tmp_path_factory) -> Path:
    """A DeepMind-reference configuration as a float32 Hugging Face-layout folder."""
    ref, cfg = reference_model(window=WINDOW, **CONFIGS[request.param])
    return save_hf_folder(tmp_path_factory.mktemp(request.param), cfg, dm_to_hf(ref.state_dict(), cfg))


def converted(float32_folder: Path, folder: Path, bits: int | None) -> Path:
    """The folder as `rg-mlx convert --dtype bfloat16 [-q --q-bits BITS --q-group-size 32]` writes it: bfloat16
    weights, or MLX's affine format with bfloat16 scales and biases (the layers whose width the group divides)."""
    model = load_model(float32_folder, accelerate=False)
    model.set_dtype(mx.bfloat16)
    config = json.loads((float32_folder / "config.json").read_text())
    if bits:
        spec = quant.QuantSpec("affine", bits, GROUP)
        nn.quantize(model, group_size=GROUP, bits=bits, class_predicate=lambda _, m: spec.fits(m))
        config.update(quant.Quantization(spec).to_config())
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


def greedy(model: Model, prompt: np.ndarray, steps: int) -> list[int]:
    """Greedy tokens after `prompt` `[T]`: one prompt pass, then one token at a time (the decode products)."""
    cache = model.make_cache()
    logits = model(mx.array(prompt[None]), cache=cache)[:, -1]
    tokens = []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[:, -1]
    return tokens


def prefill_then_decode(model: Model, tokens: np.ndarray, prefill: int) -> np.ndarray:
    """Logits `[B, T, V]` of a `prefill`-token prompt pass (many rows) and then one token at a time (2 rows)."""
    cache = model.make_cache()
    outs = [model(mx.array(tokens[:, :prefill]), cache=cache)]
    outs += [model(mx.array(tokens[:, t : t + 1]), cache=cache) for t in range(prefill, tokens.shape[1])]
    return np.array(mx.concatenate(outs, axis=1).astype(mx.float32))


def native_layers_of(model: Model) -> set[type]:
    return {type(m) for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear, nn.Embedding,
                                                                        nn.QuantizedEmbedding))}


@needs_native
@pytest.mark.parametrize("bits", [None, 4, 8], ids=["bfloat16", "4-bit", "8-bit"])
def test_float32_activations_on_stored_weights(float32_folder, tmp_path, bits):
    """The default load keeps the stored weights and computes in float32: the logits are those of MLX's float32
    products on the same weights (the bfloat16 weights widened; the quantized product with float32 activations)."""
    folder = converted(float32_folder, tmp_path / "converted", bits)
    ours = load_model(folder)
    assert cpu.accelerated(ours)
    if bits:
        assert native_layers_of(ours) == {NativeQuantizedLinear, NativeQuantizedEmbedding}
    else:
        assert native_layers_of(ours) == {NativeLinear, NativeEmbedding}
    layers = {path for path, m in ours.named_modules() if type(m) in NATIVE}
    for name, p in tree_flatten(ours.parameters()):
        dtype = p.dtype
        layer, _, leaf = name.rpartition(".")
        if layer in layers and leaf in ("weight", "scales", "biases"):
            assert dtype == (mx.uint32 if bits and leaf == "weight" else mx.bfloat16), name  # kept as stored
        else:
            assert dtype == mx.float32, name  # the layers' biases, norms, conv, RG-LRU: the compute dtype
    assert ours.model.embed_tokens(mx.array([[1, 2]])).dtype == mx.float32
    with native_off():
        theirs = load_model(folder)
    assert not native_layers_of(theirs) & NATIVE
    assert {v.dtype for _, v in tree_flatten(theirs.parameters())} <= {mx.float32, mx.uint32}

    expected = np.array(theirs(mx.array(TOKENS)))
    got = ours(mx.array(TOKENS))
    assert got.dtype == mx.float32
    assert np.abs(np.array(got) - expected).max() <= 1e-4
    assert np.abs(prefill_then_decode(ours, TOKENS, 2 * WINDOW + 3) - expected).max() <= 1e-4
    assert greedy(ours, TOKENS[0, :20], 12) == greedy(theirs, TOKENS[0, :20], 12)


class ReferenceLinear(nn.Module):
    """A product computed in float32 by MLX and rounded once to the activations' dtype: the float32-accumulating
    reference of a bfloat16 model's products (quantized: MLX's quantized product; dense: MLX's matmul). With
    `rounding`, the activations are rounded to it first and the result too (bfloat16 products in a float32 model)."""

    def __init__(self, m: nn.Module, rounding: mx.Dtype | None = None):
        super().__init__()
        self.m = m
        self.rounding = rounding

    def _round(self, a: mx.array) -> mx.array:
        return a if self.rounding is None else a.astype(self.rounding)

    def product(self, x: mx.array) -> mx.array:
        m, x32 = self.m, self._round(x).astype(mx.float32)
        if "scales" in m:
            f32 = {k: m[k].astype(mx.float32) for k in ("scales", "biases")}
            return mx.quantized_matmul(x32, m["weight"], **f32, transpose=True, group_size=m.group_size, bits=m.bits)
        return x32 @ m["weight"].astype(mx.float32).T

    def __call__(self, x: mx.array) -> mx.array:
        y = self._round(self.product(x)).astype(x.dtype)
        return y + self.m["bias"] if "bias" in self.m else y


class ReferenceEmbedding(ReferenceLinear):
    def __call__(self, tokens: mx.array) -> mx.array:
        return self.m(tokens)

    def as_linear(self, x: mx.array) -> mx.array:
        return self._round(self.product(x)).astype(x.dtype)


def reference_products(model: Model, rounding: mx.Dtype | None = None) -> Model:
    """`model` with every Linear and the embedding computing through `ReferenceLinear`."""
    def swap(_path: str, m: nn.Module) -> nn.Module | None:
        if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            return ReferenceEmbedding(m, rounding)
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            return ReferenceLinear(m, rounding)
        return None

    assert cpu.swap_layers(model, swap) > 0
    return model


def row_ulps(got: np.ndarray, reference: np.ndarray) -> float:
    """The largest difference, in bfloat16 ulps of each row's largest logit."""
    ulp = 2.0 ** (np.floor(np.log2(np.abs(reference).max(-1, keepdims=True))) - 7)
    return float((np.abs(got - reference) / ulp).max())


@needs_native
@pytest.mark.parametrize("bits", [None, 4, 8], ids=["bfloat16", "4-bit", "8-bit"])
def test_bfloat16_products(float32_folder, tmp_path, bits):
    folder = converted(float32_folder, tmp_path / "converted", bits)
    ours = load_model(folder, dtype="bfloat16")
    assert cpu.accelerated(ours)
    layers = {path: m for path, m in ours.named_modules() if type(m) in NATIVE}
    assert layers and {m.product_dtype for m in layers.values()} == {mx.bfloat16}
    for name, p in tree_flatten(ours.parameters()):
        layer, _, leaf = name.rpartition(".")
        if layer in layers and leaf in ("weight", "scales", "biases"):
            assert p.dtype == (mx.uint32 if bits and leaf == "weight" else mx.bfloat16), name
        else:
            assert p.dtype == mx.float32, name  # norms, conv, RG-LRU, biases: float32
    with native_off():
        reference = reference_products(load_model(folder, dtype="float32"), rounding=mx.bfloat16)
    expected = np.array(reference(mx.array(TOKENS)))
    got = ours(mx.array(TOKENS))
    assert got.dtype == mx.float32
    cache = ours.make_cache()
    ours(mx.array(TOKENS[:, :4]), cache=cache)
    state = tree_flatten([c.state for c in cache])
    assert {a.dtype for _, a in state if a is not None and mx.issubdtype(a.dtype, mx.floating)} == {mx.float32}
    for logits in (np.array(got), prefill_then_decode(ours, TOKENS, 2 * WINDOW + 3)):
        assert row_ulps(logits, expected) <= 2
        assert (logits.argmax(-1) == expected.argmax(-1)).all()
    assert greedy(ours, TOKENS[0, :20], 12) == greedy(reference, TOKENS[0, :20], 12)


@needs_native
def test_bfloat16_products_cast_float32_weights(float32_folder):
    """A float32 folder loaded with `dtype="bfloat16"` runs its products on bfloat16 copies of its dense weights."""
    model = load_model(float32_folder, dtype="bfloat16")
    dense = [m for _, m in model.named_modules() if type(m) in (NativeLinear, NativeEmbedding)]
    assert dense and all(m.weight.dtype == mx.bfloat16 for m in dense)
    assert model.model.final_norm.weight.dtype == mx.float32
    with native_off():
        full = load_model(float32_folder, dtype="bfloat16")  # without the native products: bfloat16 throughout
    assert {p.dtype for _, p in tree_flatten(full.parameters())} == {mx.bfloat16}


def test_dtype_rule_without_the_native_products(float32_folder, tmp_path):
    """Where the native products are not loaded (or the model is not accelerated), every floating parameter is
    cast to the compute dtype, as before they existed."""
    folder = converted(float32_folder, tmp_path / "converted", None)
    with native_off():
        model = load_model(folder)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    model = load_model(folder, accelerate=False)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    model = load_model(folder, dtype="bfloat16", accelerate=False)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}
