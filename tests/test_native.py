"""rg_mlx's native CPU products (rg_mlx/cpu/native.py, rg_mlx/cpu/csrc): every product against a float64
NumPy reference of the same product and against MLX's own, on each instruction set this CPU has; the
gradient against MLX's; the layer swap on a tiny model; and the fallback when the extension is absent."""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import rg_mlx
from rg_mlx.cpu import native
from rg_mlx.cpu.native_layers import (
    NativeEmbedding,
    NativeLinear,
    NativeQuantizedEmbedding,
    NativeQuantizedLinear,
    native_layer,
    swap_native_layers,
)

from conftest import write_tiny_model

needs_native = pytest.mark.skipif(not native.available(), reason=f"native products: {native.status()}")

ISAS = ("avx512bf16", "avx512", "avx2", "portable")
FLOATS = (mx.float32, mx.bfloat16, mx.float16)
# Relative rounding of one final conversion to the output dtype (half an ulp, with margin).
OUTPUT_ROUNDING = {mx.float32: 0.0, mx.bfloat16: 2.0**-8, mx.float16: 2.0**-11}


@pytest.fixture(params=ISAS)
def isa(request):
    """Each instruction set in turn, where this CPU has it (the products pick the best one otherwise)."""
    if not native.available():
        pytest.skip(f"native products: {native.status()}")
    if request.param not in native.supported_isas():
        pytest.skip(f"this CPU has no {request.param}")
    previous = native.set_isa(request.param)
    yield request.param
    native.set_isa(previous)


def promote(*dtypes: mx.Dtype) -> mx.Dtype:
    """MLX's type promotion (as its products apply it)."""
    total = mx.zeros((1,), dtypes[0])
    for dt in dtypes[1:]:
        total = total + mx.zeros((1,), dt)
    return total.dtype


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def unpack(w: mx.array, bits: int) -> np.ndarray:
    """MLX's packing, written independently: value k of a row sits in bits [bits * (k % (8 / bits)), ...)
    of byte k * bits / 8, the bytes of each uint32 little-endian."""
    b = np.array(w).view(np.uint8)
    if bits == 8:
        return b.astype(np.float64)
    return np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[0], -1).astype(np.float64)


def dequantize64(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> np.ndarray:
    return unpack(w, bits) * np.repeat(f64(scales), group_size, 1) + np.repeat(f64(biases), group_size, 1)


def check(y: mx.array, x: mx.array, weight64: np.ndarray, expected_dtype: mx.Dtype, mlx_y: mx.array | None = None):
    """y equals x @ weight64.T up to float32 accumulation (and the rounding to its dtype), and MLX's y too."""
    assert y.dtype == expected_dtype
    assert y.shape == (*x.shape[:-1], weight64.shape[0])
    K = x.shape[-1]
    x64 = f64(x).reshape(-1, K)
    exact = x64 @ weight64.T
    accumulation = 2 * (K + 2) * 2.0**-24 * (np.abs(x64) @ np.abs(weight64).T)
    bound = accumulation + OUTPUT_ROUNDING[y.dtype] * np.abs(exact) + 1e-30
    err = np.abs(f64(y).reshape(exact.shape) - exact)
    assert (err <= bound).all(), f"{(err / bound).max():.2f}x the float32-accumulation bound"
    if mlx_y is not None:  # MLX rounds its own float32 sums to the same dtype: at most one ulp apart
        diff = np.abs(f64(y).reshape(exact.shape) - f64(mlx_y).reshape(exact.shape))
        assert (diff <= 2 * accumulation + 2 * OUTPUT_ROUNDING[y.dtype] * np.abs(exact) + 1e-30).all()


def quantized(rng: np.random.Generator, N: int, K: int, group_size: int, bits: int, dtype: mx.Dtype):
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(dtype)
    return mx.quantize(w, group_size=group_size, bits=bits)


def test_reference_unpacking_is_mlxs():
    """The reference's own reading of the packing agrees with mx.dequantize (so the reference is right)."""
    rng = np.random.default_rng(0)
    for bits in (4, 8):
        w, s, b = quantized(rng, 5, 128, 32, bits, mx.float32)
        np.testing.assert_allclose(dequantize64(w, s, b, 32, bits), f64(mx.dequantize(w, s, b, 32, bits)), rtol=1e-6,
                                   atol=1e-6)


# Row counts: 1-8 decode (the weight read once), 13 and 70 the prompt path.
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 13, 70)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("x_dtype", FLOATS, ids=str)
def test_quantized_product(isa, bits, group_size, x_dtype):
    rng = np.random.default_rng(bits * 1000 + group_size)
    for i, M in enumerate(ROWS):
        N = int(rng.integers(1, 80)) | 1  # odd widths: rows left over after the 4-row passes
        K = group_size * int(rng.integers(1, 5))
        s_dtype = FLOATS[i % 3]
        w, scales, biases = quantized(rng, N, K, group_size, bits, s_dtype)
        if i == 4:  # scales and biases of different dtypes
            biases = biases.astype(FLOATS[(i + 1) % 3])
        x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(x_dtype)
        y = native.quantized_matmul(x, w, scales, biases, group_size, bits)
        expected = promote(x_dtype, scales.dtype, biases.dtype)
        mlx_y = mx.quantized_matmul(x.astype(mx.float32), w, scales.astype(mx.float32), biases.astype(mx.float32),
                                    transpose=True, group_size=group_size, bits=bits).astype(expected)
        check(y, x, dequantize64(w, scales, biases, group_size, bits), expected, mlx_y)


@pytest.mark.parametrize("w_dtype", [mx.bfloat16, mx.float16], ids=str)
@pytest.mark.parametrize("x_dtype", FLOATS, ids=str)
def test_dense_product(isa, w_dtype, x_dtype):
    rng = np.random.default_rng(7)
    for i, M in enumerate(ROWS):
        N = int(rng.integers(1, 70))
        K = (1, 7, 16, 33, 100, 517)[i % 6]  # odd widths and tails shorter than a vector
        w = mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(w_dtype)
        x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(x_dtype)
        y = native.matmul(x, w)
        expected = promote(x_dtype, w_dtype)
        check(y, x, f64(w), expected, (x.astype(mx.float32) @ w.astype(mx.float32).T).astype(expected))


@pytest.mark.parametrize("M", [1, 2, 3, 8])
def test_decode_blocks(isa, M):
    """Decode products in several row blocks and k blocks (x read from L1 one block at a time; for one or two
    rows, each group's sum scaled once, over several blocks of groups)."""
    rng = np.random.default_rng(M)
    N = 150
    for bits in (4, 8):
        w, scales, biases = quantized(rng, N, 5120, 32, bits, mx.bfloat16)
        x = mx.array(rng.standard_normal((M, 5120)).astype(np.float32))
        check(native.quantized_matmul(x, w, scales, biases, 32, bits), x, dequantize64(w, scales, biases, 32, bits),
              mx.float32)
    for w_dtype in (mx.bfloat16, mx.float16):
        w = mx.array(rng.standard_normal((N, 2565)).astype(np.float32)).astype(w_dtype)
        x = mx.array(rng.standard_normal((M, 2565)).astype(np.float32))
        for xd in (mx.float32, w_dtype):
            check(native.matmul(x.astype(xd), w), x.astype(xd), f64(w), promote(xd, w_dtype))


@pytest.mark.parametrize("K", [2560, 517])
def test_bfloat16_prompt_blocks(isa, K):
    """Prompt-sized bfloat16 products: several row panels, row and weight blocks, k blocks, an odd K."""
    rng = np.random.default_rng(K)
    M, N = 300, 203
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(mx.bfloat16)
    x = mx.array(rng.standard_normal((2, M // 2, K)).astype(np.float32)).astype(mx.bfloat16)
    check(native.matmul(x, w), x, f64(w), mx.bfloat16)
    check(native.matmul(x.astype(mx.float32), w), x, f64(w), mx.float32)


def test_batched_and_strided_inputs(isa):
    """Leading axes, and inputs that are views (transposed, sliced) rather than row-contiguous."""
    rng = np.random.default_rng(3)
    w, scales, biases = quantized(rng, 24, 128, 64, 4, mx.bfloat16)
    x = mx.array(rng.standard_normal((128, 3, 2)).astype(np.float32)).transpose(1, 2, 0)  # [3, 2, 128], strided
    check(native.quantized_matmul(x, w, scales, biases, 64, 4), x, dequantize64(w, scales, biases, 64, 4), mx.float32)
    wd = mx.array(rng.standard_normal((40, 96)).astype(np.float32)).astype(mx.float16)[::2]  # every other row
    check(native.matmul(x[..., :96], wd), x[..., :96], f64(wd), mx.float32)


@needs_native
def test_large_products_split_over_threads_are_exact():
    """Weights large enough to be split over the pool give bit-identical results on one thread."""
    rng = np.random.default_rng(5)
    w, scales, biases = quantized(rng, 1031, 1024, 64, 4, mx.float32)
    wd = mx.array(rng.standard_normal((517, 1024)).astype(np.float32)).astype(mx.bfloat16)
    results = []
    threads = native.threads()
    try:
        for n in (1, max(2, threads)):
            native.set_threads(n)
            for M in (1, 8, 100):
                x = mx.array(rng.standard_normal((M, 1024)).astype(np.float32))
                xb = x.astype(mx.bfloat16)
                results.append((native.quantized_matmul(x, w, scales, biases, 64, 4), native.matmul(xb, wd)))
                mx.eval(results[-1])
            rng = np.random.default_rng(5)
            w, scales, biases = quantized(rng, 1031, 1024, 64, 4, mx.float32)
            wd = mx.array(rng.standard_normal((517, 1024)).astype(np.float32)).astype(mx.bfloat16)
    finally:
        native.set_threads(threads)
    half = len(results) // 2
    for (a, b), (c, d) in zip(results[:half], results[half:]):
        assert mx.array_equal(a, c).item() and mx.array_equal(b, d).item()


@needs_native
def test_concurrent_streams():
    """Products on several MLX CPU streams at once (as rg_mlx.parallel splits work) share the pool safely."""
    rng = np.random.default_rng(11)
    w, scales, biases = quantized(rng, 2048, 512, 32, 8, mx.bfloat16)
    xs = [mx.array(rng.standard_normal((2, 512)).astype(np.float32)) for _ in range(4)]
    streams = [mx.new_stream(mx.cpu) for _ in range(4)]
    outs = []
    for _ in range(3):
        for s, x in zip(streams, xs):
            with mx.stream(s):
                outs.append(native.quantized_matmul(x, w, scales, biases, 32, 8))
    mx.eval(outs)
    weight64 = dequantize64(w, scales, biases, 32, 8)
    for i, y in enumerate(outs):
        check(y, xs[i % 4], weight64, mx.float32)


@needs_native
@pytest.mark.parametrize("x_dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("x_shape", [(1, 128), (3, 5, 128)], ids=["one row", "15 rows"])
def test_gradients_match_mlx(x_dtype, x_shape):
    """The activations' gradient (computed on the native products too: x @ w for the backward of x @ w.T)."""
    rng = np.random.default_rng(13)
    w, scales, biases = quantized(rng, 48, 128, 32, 4, mx.bfloat16 if len(x_shape) == 2 else mx.float32)
    wd = mx.array(rng.standard_normal((48, 128)).astype(np.float32)).astype(mx.bfloat16)
    x = mx.array(rng.standard_normal(x_shape).astype(np.float32)).astype(x_dtype)
    c = mx.array(rng.standard_normal((*x_shape[:-1], 48)).astype(np.float32))

    def ours(x):
        return (native.quantized_matmul(x, w, scales, biases, 32, 4) * c).sum()

    def mlxs(x):
        return (mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=32, bits=4) * c).sum()

    def dense_ours(x, w):
        return (native.matmul(x, w) * c).sum()

    def dense_mlx(x, w):
        return ((x @ w.T) * c).sum()

    # The same dtypes on both sides, so the cotangents are rounded alike: equal up to float32 sums
    # (float32), or to a couple of ulps of the largest value (bfloat16).
    def close(a: mx.array, b: mx.array):
        assert a.dtype == b.dtype
        a, b = f64(a), f64(b)
        tol = 1e-5 * np.abs(b).max() if x_dtype == mx.float32 else 2.0**-6 * np.abs(b).max()
        assert np.abs(a - b).max() <= tol

    close(mx.grad(ours)(x), mx.grad(mlxs)(x))
    (dx, dw), (ex, ew) = mx.grad(dense_ours, argnums=(0, 1))(x, wd), mx.grad(dense_mlx, argnums=(0, 1))(x, wd)
    close(dx, ex)
    close(dw, ew)
    # Forward mode (jvp), and the frozen quantized weight.
    _, (jv,) = mx.jvp(lambda x: native.quantized_matmul(x, w, scales, biases, 32, 4), [x], [x])
    np.testing.assert_allclose(f64(jv), f64(native.quantized_matmul(x, w, scales, biases, 32, 4)), rtol=1e-6)
    with pytest.raises(ValueError, match="frozen"):
        mx.grad(lambda s: native.quantized_matmul(x, w, s, biases, 32, 4).sum())(scales)


@needs_native
def test_invalid_arguments_say_what():
    w, scales, biases = mx.quantize(mx.zeros((8, 64)), group_size=32, bits=4)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        native.quantized_matmul(mx.zeros((1, 64)), w, scales, biases, 32, 3)
    with pytest.raises(ValueError, match="last axis"):
        native.quantized_matmul(mx.zeros((1, 32)), w, scales, biases, 32, 4)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        native.matmul(mx.zeros((1, 64)), mx.zeros((8, 64)))
    with pytest.raises(ValueError, match="not available"):
        native.set_isa("sse1")


# ---------------------------------------------------------------------------------------------- layers


def tiny_model(tmp_path, *, bits: int | None, dtype: mx.Dtype, seed: int = 0):
    folder = write_tiny_model(tmp_path / f"m{bits}{dtype}{seed}", seed=seed)
    model = rg_mlx.load_model(folder, dtype="float32")
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    model.set_dtype(dtype)
    return model


TOKENS = mx.array([[2, 17, 45, 301, 9, 77, 5, 120, 64, 33, 8, 250]])


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_swapped_quantized_model_float32(tmp_path, bits):
    model = tiny_model(tmp_path, bits=bits, dtype=mx.float32)
    expected = model(TOKENS)
    before = {k: id(v) for k, v in tree_flatten(model.parameters())}
    eligible = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert len(eligible) == 20  # 3 MLP products per layer, 3 per recurrent block, 4 for attention, the embedding
    assert swap_native_layers(model) == len(eligible)
    after = {k: id(v) for k, v in tree_flatten(model.parameters())}
    assert after == before  # same names, same arrays
    assert isinstance(model.model.embed_tokens, NativeQuantizedEmbedding)
    got = model(TOKENS)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-4)
    # One token at a time through the cache (the decode products) gives the same logits.
    cache = model.make_cache()
    steps = [model(TOKENS[:, t : t + 1], cache=cache) for t in range(TOKENS.shape[1])]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(expected), rtol=1e-4, atol=1e-4)


def row_ulps(got: np.ndarray, reference: np.ndarray) -> float:
    """The largest difference in bfloat16 ulps of each row's largest logit."""
    ulp = 2.0 ** (np.floor(np.log2(np.abs(reference).max(-1, keepdims=True))) - 7)
    return float((np.abs(got - reference) / ulp).max())


@needs_native
@pytest.mark.parametrize("bits", [4, 8, None])
def test_swapped_model_bfloat16(tmp_path, bits):
    """bfloat16 activations (quantized or bfloat16 weights): the swapped model is at least as close to the
    float32-activation model as MLX's own bfloat16 products are (MLX's CPU quantized product accumulates
    bfloat16 activations in bfloat16, ours in float32), and picks the same tokens. Each product alone
    is within an ulp of MLX's float32 product (test_quantized_product); through the model's bfloat16
    layers the logits of the two drift several ulps apart, so that is not a criterion here."""
    reference = np.array(tiny_model(tmp_path, bits=bits, dtype=mx.float32)(TOKENS))
    model = tiny_model(tmp_path, bits=bits, dtype=mx.bfloat16)
    mlxs = model(TOKENS)
    swap_native_layers(model)
    ours = model(TOKENS)
    assert ours.dtype == mlxs.dtype == mx.bfloat16
    assert row_ulps(f64(ours), reference) <= row_ulps(f64(mlxs), reference) + 1
    assert (f64(ours).argmax(-1) == f64(mlxs).argmax(-1)).all()
    assert (f64(ours).argmax(-1) == reference.argmax(-1)).all()


@needs_native
def test_swapped_dense_model(tmp_path):
    model = tiny_model(tmp_path, bits=None, dtype=mx.bfloat16)
    assert swap_native_layers(model) > 0
    assert isinstance(model.model.embed_tokens, NativeEmbedding)
    assert all(isinstance(m, NativeLinear) for _, m in model.named_modules() if isinstance(m, nn.Linear))
    # The tied output layer's product.
    h = mx.random.normal((2, 64)).astype(mx.bfloat16)
    emb = model.model.embed_tokens
    check(emb.as_linear(h), h, f64(emb.weight), mx.bfloat16)


@needs_native
def test_training_through_swapped_layers(tmp_path):
    """nn.value_and_grad through a swapped quantized model (base frozen, norms trainable, as with LoRA)."""
    grads = []
    for swap in (False, True):
        model = tiny_model(tmp_path, bits=4, dtype=mx.float32, seed=1)
        if swap:
            swap_native_layers(model)
        model.freeze()
        model.apply_to_modules(lambda _, m: m.unfreeze() if m.__class__.__name__ == "RMSNorm" else None)

        def loss(model):
            return nn.losses.cross_entropy(model(TOKENS[:, :-1]), TOKENS[:, 1:]).mean()

        value, g = nn.value_and_grad(model, loss)(model)
        grads.append((value, dict(tree_flatten(g))))
    (v0, g0), (v1, g1) = grads
    assert g0.keys() == g1.keys() and g0
    np.testing.assert_allclose(v1.item(), v0.item(), rtol=1e-5)
    for k in g0:
        np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), rtol=1e-3, atol=1e-5, err_msg=k)


@needs_native
def test_layer_replacements():
    q = nn.QuantizedLinear(64, 16, bias=True, group_size=32, bits=8)
    n = native_layer(q)
    assert isinstance(n, NativeQuantizedLinear) and isinstance(n, nn.QuantizedLinear)
    assert n.weight is q.weight and n.scales is q.scales and n.bias is q.bias
    assert not n.trainable_parameters()  # frozen like the original
    n.unfreeze(keys=["bias"])
    assert not q.trainable_parameters()  # its own frozen set
    x = mx.random.normal((3, 64))
    np.testing.assert_allclose(np.array(n(x)), np.array(q(x)), rtol=1e-5, atol=1e-5)
    assert native_layer(n) is None  # already native
    assert native_layer(nn.Linear(8, 8)) is None  # float32: the BLAS's
    assert native_layer(nn.QuantizedLinear(64, 16, group_size=32, bits=3)) is None  # 3 bits: MLX's
    assert native_layer(nn.QuantizedLinear(64, 16, group_size=32, bits=4, mode="mxfp4")) is None


@needs_native
def test_instruction_set_from_environment(monkeypatch):
    previous = native.isa()
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_native", None)
    try:
        monkeypatch.setenv(native.ISA_ENV_VAR, "portable")
        assert native.isa() == "portable" and native.status().startswith("portable, ")
        monkeypatch.setenv(native.ISA_ENV_VAR, "sse1")
        monkeypatch.setattr(native, "_status", None)
        assert native.status().endswith(f"; {native.ISA_ENV_VAR}=sse1 ignored: this CPU has "
                                        f"{', '.join(native.supported_isas())}")
    finally:
        native.set_isa(previous)


def test_fallback_when_turned_off(monkeypatch):
    """RG_MLX_NATIVE=off: not loaded, one status line, no swap, and the layers still compute (with MLX)."""
    monkeypatch.setenv(native.ENV_VAR, "off")
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_native", None)
    assert not native.available()
    assert native.status() == "off (RG_MLX_NATIVE=off; MLX's own products run)"
    q = nn.QuantizedLinear(64, 16, group_size=32, bits=4)
    model = nn.Sequential(q)
    assert swap_native_layers(model) == 0 and model.layers[0] is q
    layer = NativeQuantizedLinear.from_module(q)
    x = mx.random.normal((2, 64))
    assert mx.array_equal(layer(x), q(x)).item()
    with pytest.raises(RuntimeError, match="unavailable: off"):
        native.matmul(x, mx.zeros((4, 64), mx.bfloat16))


def test_fallback_when_absent_or_built_for_another_mlx(monkeypatch):
    monkeypatch.delenv(native.ENV_VAR, raising=False)
    monkeypatch.setattr(native, "_native", None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setitem(sys.modules, "rg_mlx.cpu._native", None)  # as after an install without a compiler
    assert not native.available()
    assert native.status().startswith("not built (MLX's own products run; reinstall rg-mlx")
    monkeypatch.delitem(sys.modules, "rg_mlx.cpu._native")
    if native._BUILD_INFO.exists():
        monkeypatch.setattr(native, "_status", None)
        monkeypatch.setattr(mx, "__version__", "0.0.1")
        assert not native.available()
        assert native.status().startswith("not loaded: built for MLX ")
        assert "this is MLX 0.0.1" in native.status()
