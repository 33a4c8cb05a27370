"""The RG-LRU scan paths against the float64 naive scan, and the dispatch rules.

The fused kernels run here without a GPU (`gpu_emulator`): the Metal source exactly as MLX renders
it, and the CUDA source as MLX's CUDA backend would assemble it (reconstructed), each compiled with
g++ against a small shim header and run thread by thread on the CPU. The same checks run on real
Metal (on a Mac) and CUDA (with MLX's CUDA backend) where those exist.

Accuracy is measured per channel: max over time of |error| / max over time of |reference|, for
every (batch row, channel); y in float16/bfloat16 may add its own rounding. The bar is 1e-6.
On slow channels (a = 1 - 1e-4) over long prompts a plain float32 loop `h = a h + b` cannot
reach it: the rounding of `a` itself (ulp 6e-8 against 1 - a = 1e-4) compounds over the steps
the state remembers. There the bar is relative to that loop's error (the "float32 floor"):
the ops path, which multiplies by a float32 `a` too, must stay within 1.5x of it; the kernels,
which update slow channels as h + ((a - 1) h + b) with a - 1 exact, must beat it 4x.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gpu_emulator import MLX_FOR_EMULATION, Compiler, emulated_kernels, kernel_name
from kernel_stand_ins import injected, recording_kernels
from mlx.utils import tree_flatten

from rg_mlx import kernels
from rg_mlx.errors import RGError
from rg_mlx.kernels import available_paths, rg_lru, rg_lru_ops, rg_lru_step
from rg_mlx.kernels.reference import naive_gates, naive_rg_lru
from rg_mlx.kernels.source import backend_kernels, fused_scan, num_chunks

ROOT = Path(__file__).parent.parent

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# y is the float32 state rounded to its dtype: (relative, absolute) half-spacing, the absolute
# one for float16's subnormals.
ROUNDING = {mx.float32: (0.0, 0.0), mx.float16: (2.0**-11, 2.0**-25), mx.bfloat16: (2.0**-8, 0.0)}
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    return Compiler(tmp_path_factory.mktemp("gpu_emulator"))


@pytest.fixture
def stand_in_cache(tmp_path, monkeypatch):
    """Self-check results of injected kernels go to a fresh cache folder."""
    monkeypatch.setenv("RG_MLX_CACHE", str(tmp_path / "cache"))


def scan_paths() -> list:
    """Every way to run the fused kernels in this process: emulated on the CPU always, on a GPU where present."""
    paths = ["emulated-metal", "emulated-cuda"]
    for backend in ("metal", "cuda"):
        paths.append(
            pytest.param(
                backend,
                id=backend,
                marks=pytest.mark.skipif(backend not in available_paths(), reason=f"no {backend} GPU here"),
            )
        )
    return paths


def kernels_for(backend: str, compiler: Compiler, edit=None) -> dict:
    if backend.startswith("emulated-"):
        if shutil.which("g++") is None:
            pytest.skip("the emulated kernels need g++")
        return emulated_kernels(backend.removeprefix("emulated-"), compiler, edit)
    return backend_kernels(backend)


def a_param_for(a: np.ndarray) -> np.ndarray:
    """The `a_param` that gives recurrence weight `a` where sigmoid(gate_a) = 1/2."""
    return np.log(np.expm1(-np.log(a) / 4.0)).astype(np.float32)


def random_case(rng, B, T, L, dtype, *, h0: bool, resets: bool) -> dict:
    """Random RG-LRU inputs in `dtype`, channels from fast (a ~ 0.005) to slow (a ~ 0.9995)."""

    def cast(v):
        return mx.array(v.astype(np.float32)).astype(dtype)

    case = dict(
        x=cast(rng.standard_normal((B, T, L))),
        gate_x=cast(rng.standard_normal((B, T, L))),
        gate_a=cast(rng.standard_normal((B, T, L))),
        a_param=cast(rng.uniform(-9.0, 1.0, L)),
        reset=None,
        h0=mx.array(rng.standard_normal((B, L)).astype(np.float32)) if h0 else None,
    )
    if resets:
        flags = rng.random((B, T)) < 0.05
        flags[0, 0] = True  # a document starting at the first position
        flags[-1, -1] = True  # and one at the last
        case["reset"] = mx.array(flags)
    return case


def as_numpy(case: dict) -> dict:
    """The values of `case` as NumPy (float32, or bool flags): exactly the kernel's inputs."""
    return {k: None if v is None else np.array(v if v.dtype == mx.bool_ else v.astype(mx.float32)) for k, v in case.items()}


def reference(case: dict) -> tuple[np.ndarray, np.ndarray]:
    """The float64 naive RG-LRU of exactly the values in `case`."""
    return naive_rg_lru(**as_numpy(case))


def float32_floor(case: dict) -> np.ndarray:
    """States of a plain float32 loop over the float64 gates rounded to float32: what float32 can reach."""
    c = as_numpy(case)
    a, b = (g.astype(np.float32) for g in naive_gates(c["x"], c["gate_x"], c["gate_a"], c["a_param"], c["reset"]))
    h = np.zeros(a[:, 0].shape, np.float32) if c["h0"] is None else c["h0"]
    ys = np.empty(a.shape, np.float32)
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        ys[:, t] = h
    return ys


def channel_error(y: np.ndarray, ref: np.ndarray) -> float:
    """Max over (row, channel) of max_t |y - ref| / max_t |ref|."""
    scale = np.abs(ref).max(axis=1)
    return float((np.abs(y.astype(np.float64) - ref).max(axis=1) / scale).max())


def check(case: dict, y: mx.array, h: mx.array, floor_factor: float | None = None) -> tuple[float, float, float]:
    """Assert `y` and the last state `h` match the naive float64 scan to 1e-6, or to `floor_factor` x the
    float32 floor where that is larger. Returns the two errors and the floor."""
    y_ref, h_ref = reference(case)
    dtype = case["x"].dtype
    assert y.dtype == dtype and y.shape == case["x"].shape
    assert h.dtype == mx.float32 and h.shape == h_ref.shape
    y32 = np.array(y.astype(mx.float32)).astype(np.float64)
    h = np.array(h).astype(np.float64)
    assert np.isfinite(y32).all() and np.isfinite(h).all()
    floor = channel_error(float32_floor(case), y_ref)
    bar = TOLERANCE if floor_factor is None else max(TOLERANCE, floor_factor * floor)
    scale = np.abs(y_ref).max(axis=1, keepdims=True)  # [B, 1, L]
    relative, absolute = ROUNDING[dtype]
    y_error = np.abs(y32 - y_ref) - relative * np.abs(y_ref) - absolute
    y_rel = float((np.maximum(y_error, 0.0) / scale).max())
    h_rel = float((np.abs(h - h_ref) / scale[:, 0]).max())
    assert y_rel <= bar and h_rel <= bar, f"error y {y_rel:.3g}, h {h_rel:.3g} above {bar:.3g}"
    return y_rel, h_rel, floor


# ---------------------------------------------------------------- the ops path (and the kernels) on decaying channels

DECAY_T = [1, 7, 64, 1000]


def decay_case(T: int, with_h0: bool) -> dict:
    """Four slow channels (a = 1 - 1e-4) and four fast ones (a = 1e-3)."""
    rng = np.random.default_rng(T)
    B, L = 2, 8
    case = random_case(rng, B, T, L, mx.float32, h0=with_h0, resets=False)
    case["a_param"] = mx.array(a_param_for(np.array([1 - 1e-4] * 4 + [1e-3] * 4)))
    case["gate_a"] = mx.zeros((B, T, L))
    return case


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-state", "h0"])
@pytest.mark.parametrize("T", DECAY_T)
def test_ops_fast_and_slow_channels(T, with_h0):
    """ops vs float64 on fast and slow channels, T = 1 (the compiled step) to 1000."""
    case = decay_case(T, with_h0)
    y, h = rg_lru_ops(**case)
    check(case, y, h, floor_factor=1.5)


@pytest.mark.parametrize("chunks", [1, 3], ids=["sequential", "chunked"])
@pytest.mark.parametrize("backend", scan_paths())
def test_kernels_fast_and_slow_channels(backend, chunks, compiler):
    """The fused kernels on the same decaying channels (T >= 2: T = 1 never launches a kernel)."""
    ks = kernels_for(backend, compiler)
    for T in DECAY_T[1:]:
        for with_h0 in (False, True):
            case = decay_case(T, with_h0)
            check(case, *fused_scan(ks, **case, chunks=chunks), floor_factor=0.25)


def test_ops_document_starts():
    """A document start forgets the state; the multiplier there is 1."""
    rng = np.random.default_rng(1)
    case = random_case(rng, 3, 50, 16, mx.float32, h0=True, resets=True)
    check(case, *rg_lru_ops(**case))


def test_step_matches_scan():
    """T = 1 (decode) through the compiled step equals the naive scan, with and without state/reset."""
    rng = np.random.default_rng(2)
    for h0, resets in [(False, False), (True, False), (True, True)]:
        case = random_case(rng, 3, 1, 16, mx.float32, h0=h0, resets=resets)
        check(case, *rg_lru_step(**case))


# ---------------------------------------------------------------- the fused kernels on random (ragged) shapes

# (B, T, L, chunks): L = 300 leaves a partial threadgroup of 256; chunked T is never a multiple of its chunk.
SHAPES = {
    "sequential": [(1, 2, 1, 1), (2, 37, 300, 1), (3, 300, 37, 1)],
    "chunked": [(1, 2, 5, 2), (2, 37, 300, 4), (1, 300, 37, 7), (3, 101, 9, 10)],
}


@pytest.mark.parametrize("variant", list(SHAPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", scan_paths())
def test_kernels_match_naive(backend, dtype, variant, compiler):
    """Every variant and input dtype against float64, with/without h0 and document starts."""
    rng = np.random.default_rng(3)
    ks = kernels_for(backend, compiler)
    errors = []
    for B, T, L, chunks in SHAPES[variant]:
        for h0, resets in [(False, False), (True, True)]:
            case = random_case(rng, B, T, L, DTYPES[dtype], h0=h0, resets=resets)
            y, h = fused_scan(ks, **case, chunks=chunks)
            errors.append(check(case, y, h))
    if backend.startswith("emulated-"):
        sources = [s for k in ks.values() for s in k.sources]
        assert sources and all(("[[kernel]]" in s) == (backend == "emulated-metal") for s in sources)
    y_err, h_err, floor = np.max(errors, axis=0)
    print(f"{backend} {dtype} {variant}: max error y {y_err:.3g}, h {h_err:.3g} (float32 loop {floor:.3g})")


# A deliberately wrong index in the rendered source must fail the comparison.
WRONG_INDEX = {
    "h0-of-row-0": ("float h = h0[b * L + c];", "float h = h0[c];", 1),
    "stale-reset": ("const bool rn = reset[r + ahead];", "const bool rn = reset[r];", 1),
    "carry-of-channel-0": ("h = chunk_a[q * L + c] * h + chunk_h[q * L + c];", "h = chunk_a[q * L + c] * h + chunk_h[q * L];", 3),
}


@pytest.mark.parametrize("mistake", list(WRONG_INDEX))
def test_negative_control_wrong_index(mistake, compiler):
    old, new, chunks = WRONG_INDEX[mistake]
    edited = []

    def edit(source: str) -> str:
        if old in source:
            edited.append(True)
        return source.replace(old, new)

    case = random_case(np.random.default_rng(4), 2, 37, 20, mx.float32, h0=True, resets=True)
    y, h = fused_scan(kernels_for("emulated-metal", compiler, edit), **case, chunks=chunks)
    assert edited, "the substitution did not apply"
    with pytest.raises(AssertionError, match="error y"):
        check(case, y, h)


# ---------------------------------------------------------------- dispatch


def test_variant_choice():
    assert num_chunks(1, 32768, 2560) > 1  # a long prompt, one row: chunked
    assert num_chunks(8, 32768, 2560) == 1  # enough rows x channels: sequential
    assert num_chunks(1, 300, 2560) == 1  # too short to split


def test_paths_and_errors(monkeypatch):
    assert available_paths()[0] == "ops"
    case = random_case(np.random.default_rng(5), 1, 4, 8, mx.float32, h0=False, resets=False)
    monkeypatch.setenv("RG_MLX_SCAN", "vulkan")
    with pytest.raises(RGError, match="RG_MLX_SCAN"):
        rg_lru(**case)
    monkeypatch.setenv("RG_MLX_SCAN", "ops")
    check(case, *rg_lru(**case))
    for path in ("metal", "cuda"):
        if path not in available_paths():
            with pytest.raises(RGError, match="cannot run here"):
                rg_lru(**case, path=path)


@pytest.mark.skipif(available_paths() != ["ops"], reason="a GPU kernel path exists here")
def test_no_kernel_is_built_without_a_gpu(monkeypatch, tmp_path):
    """On a CPU-only machine the runtime never constructs or launches a Metal or CUDA kernel."""

    def refuse(*args, **kwargs):
        raise AssertionError("a GPU kernel was constructed or launched")

    monkeypatch.setattr(mx.fast, "metal_kernel", refuse)
    monkeypatch.setattr(mx.fast, "cuda_kernel", refuse)
    monkeypatch.setattr(kernels, "fused_scan", refuse)
    backend_kernels.cache_clear()
    monkeypatch.delenv("RG_MLX_SCAN", raising=False)
    for T in (1, 40):
        case = random_case(np.random.default_rng(T), 2, T, 8, mx.float32, h0=True, resets=True)
        check(case, *rg_lru(**case))
    model = tiny_model(tmp_path)
    mx.eval(model(mx.zeros((1, 20), mx.int32)))


def test_decode_step_never_launches_a_kernel(stand_in_cache):
    """T = 1 runs `rg_lru_step` even where a kernel path is chosen."""
    case = random_case(np.random.default_rng(6), 2, 1, 8, mx.float32, h0=True, resets=True)
    with injected("metal", lambda: pytest.fail("kernel built for T = 1"), "test"):
        check(case, *rg_lru(**case, path="metal"))


# ---------------------------------------------------------------- the full model through the kernels


def tiny_model(folder, dtype: str = "float32"):
    from conftest import write_tiny_model

    from rg_mlx import load_model

    return load_model(write_tiny_model(folder / "model"), dtype=dtype)


def model_logits(model, tokens: mx.array) -> mx.array:
    """Logits of a one-pass prefill and of a chunked prefill + decode steps, concatenated."""
    T = tokens.shape[1]
    full = model(tokens)
    cache = model.make_cache()
    parts = [model(tokens[:, :5], cache=cache), model(tokens[:, 5 : T - 2], cache=cache)]
    parts += [model(tokens[:, t : t + 1], cache=cache) for t in (T - 2, T - 1)]
    return mx.concatenate([full, mx.concatenate(parts, axis=1)], axis=1)


@pytest.mark.parametrize("shape", [(2, 40), (1, 600)], ids=["sequential", "chunked"])
def test_model_through_emulated_metal(shape, tmp_path, monkeypatch, compiler, stand_in_cache):
    """The whole tiny model with RG_MLX_SCAN=metal (kernels emulated on the CPU) equals the ops path."""
    model = tiny_model(tmp_path)
    L = model.args.lru_width
    assert (num_chunks(*shape, L) > 1) == (shape[0] == 1)  # both variants really run
    tokens = mx.array(np.random.default_rng(7).integers(0, 400, shape), mx.int32)
    monkeypatch.setenv("RG_MLX_SCAN", "ops")
    expected = model_logits(model, tokens)
    emulated = kernels_for("emulated-metal", compiler)
    monkeypatch.setenv("RG_MLX_SCAN", "metal")
    with injected("metal", lambda: emulated, "emulated"):
        got = model_logits(model, tokens)
    assert emulated["rg_lru_sequential" if shape[0] > 1 else "rg_lru_chunk_apply"].sources
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=0, atol=2e-5 * float(mx.abs(expected).max()))


def test_training_gradients_through_the_kernel_path(tmp_path, monkeypatch, compiler, stand_in_cache):
    """Fault 2: `nn.value_and_grad` through the model with the kernel path selected (the Metal kernels emulated
    on the CPU behind the same wrapper) gives the ops path's loss and gradients."""
    model = tiny_model(tmp_path)
    tokens = mx.array(np.random.default_rng(9).integers(0, 400, (2, 24)), mx.int32)

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    value_and_grad = nn.value_and_grad(model, loss_fn)
    monkeypatch.setenv("RG_MLX_SCAN", "ops")
    loss_ops, grads_ops = value_and_grad(model, tokens)
    emulated = kernels_for("emulated-metal", compiler)
    monkeypatch.setenv("RG_MLX_SCAN", "metal")
    with injected("metal", lambda: emulated, "emulated"):
        loss, grads = value_and_grad(model, tokens)
        mx.eval(loss, grads)
    assert emulated["rg_lru_sequential"].sources  # the forward pass ran the kernel
    assert abs(loss.item() - loss_ops.item()) <= 1e-5 * abs(loss_ops.item())
    flat, flat_ops = dict(tree_flatten(grads)), dict(tree_flatten(grads_ops))
    assert flat.keys() == flat_ops.keys()
    for name, g in flat_ops.items():
        scale = float(mx.abs(g).max())
        assert scale > 0 or "bias" in name, name  # gradients reach every weight
        atol = 1e-4 * max(scale, 1e-6)
        np.testing.assert_allclose(np.array(flat[name]), np.array(g), rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("backend", ["emulated-metal", "emulated-cuda"])
def test_scan_gradient_is_the_ops_paths(backend, compiler):
    """The fused scan's VJP (all inputs, both variants, with h0 and resets) is the ops path's."""
    ks = kernels_for(backend, compiler)
    case = random_case(np.random.default_rng(10), 2, 19, 12, mx.float32, h0=True, resets=True)
    weight = mx.array(np.random.default_rng(11).standard_normal((2, 19, 12)).astype(np.float32))
    names = ["x", "gate_x", "gate_a", "a_param", "h0"]

    def loss(scan, *arrays):
        y, h = scan(**dict(zip(names, arrays)), reset=case["reset"])
        return (y * weight).sum() + (h * h).sum()

    expected = mx.grad(lambda *a: loss(rg_lru_ops, *a), argnums=tuple(range(5)))(*(case[n] for n in names))
    for chunks in (1, 3):
        scan = lambda **k: fused_scan(ks, **k, chunks=chunks)  # noqa: E731
        got = mx.grad(lambda *a: loss(scan, *a), argnums=tuple(range(5)))(*(case[n] for n in names))
        for name, g, e in zip(names, got, expected):
            assert g.shape == e.shape and float(mx.abs(e).max()) > 0, name
            np.testing.assert_allclose(np.array(g), np.array(e), rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------- launch safety: names, shapes, empty inputs, grid


def test_every_input_dtype_names_its_own_kernel():
    """Fault 1: MLX 0.29-0.32.0 cache a CUDA kernel by its name, so every input dtype must be in every launch's name."""
    ks, launches = recording_kernels()
    combos = [(d,) * 4 for d in DTYPES.values()] + [(mx.bfloat16,) * 3 + (mx.float32,)]
    names = {}
    for combo in combos:
        case = random_case(np.random.default_rng(12), 1, 10, 4, mx.float32, h0=True, resets=True)
        for key, dtype in zip(["x", "gate_x", "gate_a", "a_param"], combo):
            case[key] = case[key].astype(dtype)
        launches.clear()
        for chunks in (1, 2):
            fused_scan(ks, **case, chunks=chunks)
        assert sorted(k for k, _ in launches) == ["rg_lru_chunk_apply", "rg_lru_chunk_summary", "rg_lru_sequential"]
        names[combo] = {kernel: kernel_name(kernel, call["template"]) for kernel, call in launches}
    for kernel in ("rg_lru_sequential", "rg_lru_chunk_summary", "rg_lru_chunk_apply"):
        assert len({n[kernel] for n in names.values()}) == len(combos), kernel
    float32 = names[(mx.float32,) * 4]
    assert float32["rg_lru_chunk_summary"] == "custom_kernel_rg_lru_chunk_summary_float_float_float_float"


def test_two_dtypes_in_one_process_get_their_own_cuda_kernels(compiler):
    """Fault 1 end to end: float32 then bfloat16 through the emulated CUDA kernels, both correct, each under its own
    name (the emulator refuses one name for two sources, as MLX < 0.32.1 would silently run the first)."""
    ks = emulated_kernels("cuda", Compiler(compiler.workdir))
    for dtype in (mx.float32, mx.bfloat16):
        case = random_case(np.random.default_rng(13), 1, 40, 6, dtype, h0=True, resets=True)
        check(case, *fused_scan(ks, **case, chunks=3))
    names = {re.search(r"__global__ void (\w+)\(", src).group(1) for k in ks.values() for src in k.sources}
    assert len(names) == 4, names  # two kernels (summary, apply) x two dtypes


BROADCAST = {
    "reset [T]": dict(reset=lambda B, T, L, r: r[0]),
    "reset [1, T]": dict(reset=lambda B, T, L, r: r[:1]),
    "h0 [L]": dict(h0=lambda B, T, L, h: h[0]),
    "gates [T, L]": dict(gate_x=lambda B, T, L, g: g[0], gate_a=lambda B, T, L, g: g[0]),
}


@pytest.mark.parametrize("shapes", list(BROADCAST))
@pytest.mark.parametrize("backend", ["ops", "emulated-metal", "emulated-cuda"])
def test_broadcast_inputs(backend, shapes, compiler):
    """Fault 3: inputs smaller than [B, T, L] / [B, T] / [B, L] broadcast as in the ops path; the kernels read
    nothing past a buffer (they used to read row b >= 1 of a [T] reset from beyond its end)."""
    B, T, L = 3, 21, 10
    case = random_case(np.random.default_rng(14), B, T, L, mx.float32, h0=True, resets=True)
    for key, shrink in BROADCAST[shapes].items():
        case[key] = shrink(B, T, L, case[key])
    full = {k: None if v is None else v for k, v in case.items()}
    for key in BROADCAST[shapes]:
        full[key] = mx.broadcast_to(case[key], (B, T) if key == "reset" else (B, L) if key == "h0" else (B, T, L))
    scan = rg_lru_ops if backend == "ops" else lambda **k: fused_scan(kernels_for(backend, compiler), **k, chunks=2)
    check(full, *scan(**case))


@pytest.mark.parametrize(
    "key, shape",
    [("reset", (2, 4)), ("reset", (3, 5)), ("h0", (2, 6)), ("a_param", (5,)), ("gate_x", (3, 4, 5)), ("x", (12, 6))],
)
def test_bad_input_shapes_raise_one_line(key, shape, stand_in_cache):
    """Shapes that do not broadcast raise an RGError naming the input, on every path, before any launch."""
    case = random_case(np.random.default_rng(15), 3, 4, 6, mx.float32, h0=True, resets=True)
    case[key] = mx.zeros(shape, mx.bool_ if key == "reset" else mx.float32)
    with injected("metal", lambda: pytest.fail("a kernel was built for bad input"), "test"):
        for path in ("ops", "metal"):
            with pytest.raises(RGError, match=("takes x of shape" if key == "x" else f"{key} has shape")) as e:
                rg_lru(**case, path=path)
            assert "\n" not in str(e.value)
        with pytest.raises(RGError):
            fused_scan({}, **case)


@pytest.mark.parametrize("B, T, L", [(2, 0, 5), (0, 7, 5), (2, 7, 0), (0, 0, 0)])
@pytest.mark.parametrize("backend", ["ops", "emulated-metal", "emulated-cuda", "dispatch"])
def test_empty_inputs_return_at_once(backend, B, T, L, compiler, stand_in_cache):
    """Fault 4: T = 0 or B L = 0 returns an empty y and the initial state (the launch arithmetic divided by zero)."""
    rng = np.random.default_rng(16)
    h0 = mx.array(rng.standard_normal((B, L)).astype(np.float32))
    case = dict(
        x=mx.zeros((B, T, L), mx.bfloat16),
        gate_x=mx.zeros((B, T, L), mx.bfloat16),
        gate_a=mx.zeros((B, T, L), mx.bfloat16),
        a_param=mx.zeros((L,), mx.bfloat16),
        reset=mx.zeros((B, T), mx.bool_),
        h0=h0,
    )
    assert num_chunks(B, T, L) == 1
    if backend == "dispatch":
        with injected("metal", lambda: pytest.fail("a kernel was built for an empty input"), "test"):
            y, h = rg_lru(**case, path="metal")
    elif backend == "ops":
        y, h = rg_lru_ops(**case)
    else:
        y, h = fused_scan(kernels_for(backend, compiler), **case)
    assert y.shape == (B, T, L) and y.dtype == mx.bfloat16
    assert h.shape == (B, L) and h.dtype == mx.float32 and np.array_equal(np.array(h), np.array(h0))


def test_batch_beyond_cudas_grid_rows(compiler):
    """Fault 5: 70,000 rows (CUDA caps gridDim.y at 65,535) run in one launch and match the reference."""
    B, T, L = 70_000, 3, 1
    case = random_case(np.random.default_rng(17), B, T, L, mx.float32, h0=True, resets=True)
    ks, launches = recording_kernels()
    fused_scan(ks, **case)
    assert [call["grid"] for _, call in launches] == [(B * L, 1, 1)]
    y, h = fused_scan(kernels_for("emulated-cuda", compiler), **case)
    y_ref, h_ref = reference(case)
    np.testing.assert_allclose(np.array(y), y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(h), h_ref, rtol=1e-5, atol=1e-6)


def test_mlx_floor_covers_the_emulated_kernels():
    """Fault 6: the emulated-Metal tests render through `mx.export_function` without Metal, which needs
    MLX >= 0.32.0; pyproject.toml must not promise an older MLX (each platform's requirement)."""
    floors = re.findall(r'"mlx(?:\[cpu\])?(?:>=|==)([0-9.]+)', (ROOT / "pyproject.toml").read_text())
    assert len(floors) >= 2, floors  # dependencies and build requirements, each platform
    for floor in floors:
        assert tuple(int(p) for p in floor.split(".")) + (0,) * (3 - len(floor.split("."))) >= MLX_FOR_EMULATION
    assert tuple(int(p) for p in mx.__version__.split(".")[:3]) >= MLX_FOR_EMULATION


@pytest.mark.skipif("metal" not in available_paths(), reason="needs an Apple GPU (Metal)")
@pytest.mark.parametrize("dtype, atol", [("float32", 2e-5), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("shape", [(2, 40), (1, 600)], ids=["sequential", "chunked"])
def test_model_metal_parity(shape, dtype, atol, tmp_path, monkeypatch):
    """Mac only: the full model on the Metal kernels equals the ops path (bfloat16: up to y's rounding)."""
    model = tiny_model(tmp_path, dtype)
    tokens = mx.array(np.random.default_rng(8).integers(0, 400, shape), mx.int32)
    monkeypatch.setenv("RG_MLX_SCAN", "ops")
    expected = model_logits(model, tokens).astype(mx.float32)
    monkeypatch.setenv("RG_MLX_SCAN", "metal")
    got = model_logits(model, tokens).astype(mx.float32)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=0, atol=atol * float(mx.abs(expected).max()))
