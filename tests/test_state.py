"""The fixed-size state's layout: named slots, batch-first arrays, and all zeros meaning a fresh document."""

from __future__ import annotations

import copy
import shutil

import mlx.core as mx
import numpy as np
import pytest

from rg_mlx import load_model
from rg_mlx.state import (
    ATTENTION_SLOTS,
    RECURRENT_SLOTS,
    AttentionState,
    RecurrentState,
    copy_state,
    restore_state,
    state_bytes,
)


def test_named_slots_and_batch_first_arrays(tiny_model_dir):
    model = load_model(tiny_model_dir)
    cache = model.make_cache()
    model(mx.array(np.arange(24).reshape(2, 12) % 400), cache=cache)
    for layer, c in zip(model.layers, cache):
        state = RecurrentState(c) if layer.temporal_block_type == "recurrent" else AttentionState(c)
        if isinstance(state, RecurrentState):
            assert state.conv.shape == (2, 3, 64) and state.h.shape == (2, 64) and state.h.dtype == mx.float32
        else:
            window = model.args.attention_window_size
            assert state.keys.shape[:3] == (2, 1, window) and state.key_slots.shape == (2, window)
            assert np.array_equal(np.array(state.key_positions[0, :12]), np.arange(12))
            assert (np.array(state.key_slots[:, 12:]) == 0).all()  # empty slots
        assert np.array_equal(np.array(state.next_position), [12, 12])
    assert state_bytes(cache) == sum(a.nbytes for arrays in copy_state(cache) for a in arrays)


def test_an_all_zero_state_is_a_fresh_document(tiny_model_dir):
    # mlx-lm's `merge` gives a row that has no state yet zeros in every array: that must mean a
    # document start, not "a key at position 0".
    model = load_model(tiny_model_dir)
    tokens = mx.array(np.random.default_rng(0).integers(0, 400, (1, 20)))
    warm = model.make_cache()
    model(tokens[:, :7], cache=warm)
    zeros = model.make_cache()
    restore_state(zeros, [[mx.zeros_like(a) for a in arrays] for arrays in copy_state(warm)])
    assert np.abs(np.array(model(tokens, cache=zeros)) - np.array(model(tokens))).max() <= 1e-5


# -- Padding leaves the state as it is ----------------------------------------------------------


def scan_paths() -> list[str]:
    paths = ["ops", "cpu-ops", "steps"]
    return paths + (["emulated-metal", "emulated-cuda"] if shutil.which("g++") else [])


@pytest.mark.parametrize("path", scan_paths())
def test_a_padding_step_is_the_identity_on_every_scan_path(path, tmp_path):
    """x = 0 and gate_a = -inf (what the model feeds a padding step) leave h exactly as it is."""
    from rg_mlx.cpu import ops as cpu_ops
    from rg_mlx.kernels import rg_lru, rg_lru_step
    from rg_mlx.kernels.source import fused_scan

    rng = np.random.default_rng(0)
    B, T, real, L = 2, 40, 23, 16
    x, gate_x, gate_a = (mx.array(rng.standard_normal((B, T, L)).astype(np.float32)) for _ in range(3))
    a_param = mx.array(rng.uniform(-9, 1, L).astype(np.float32))
    pad = mx.arange(T)[None, :, None] >= real
    x, gate_a = mx.where(pad, 0, x), mx.where(pad, -mx.inf, gate_a)
    reset = mx.zeros((B, T), mx.bool_).at[:, 5].add(True)  # a document start among the real steps
    h0 = mx.array(rng.standard_normal((B, L)).astype(np.float32))
    args = (x, gate_x, gate_a, a_param)
    if path == "ops":
        y, h = rg_lru(*args, reset=reset, h0=h0, path="ops")
    elif path == "cpu-ops":
        y, h = cpu_ops.rg_lru(*args, reset=reset, h0=h0, path="ops")
    elif path == "steps":
        ys, h = [], h0
        for t in range(T):
            y_t, h = rg_lru_step(*(a[:, t : t + 1] for a in args[:3]), a_param, reset[:, t : t + 1], h)
            ys.append(y_t)
        y = mx.concatenate(ys, axis=1)
    else:
        from gpu_emulator import Compiler, emulated_kernels

        kernels = emulated_kernels(path.removeprefix("emulated-"), Compiler(tmp_path))
        y, h = fused_scan(kernels, *args, reset, h0, chunks=1)
        # In chunks, the state entering a chunk comes from the chunk summaries, which group the products
        # of `a` otherwise than the step-by-step pass inside the chunk: equal to float32 rounding.
        y4, h4 = fused_scan(kernels, *args, reset, h0, chunks=4)  # one chunk ends in the padding, one after
        scale = np.abs(np.array(y)).max()
        assert np.abs(np.array(y4) - np.array(y)).max() <= 1e-6 * scale
        assert np.abs(np.array(h4) - np.array(y)[:, real - 1]).max() <= 1e-6 * scale
    y, h = np.array(y), np.array(h)
    assert np.isfinite(y).all()
    assert (y[:, real:] == y[:, real - 1 : real]).all() and (h == y[:, real - 1]).all()
    assert not (y[:, real - 2] == y[:, real - 1]).all()  # the real steps did move h


def right_padded_prefill(model, singles, prompts, chunk):
    """Merge the rows' caches as mlx-lm's batching does, and feed their prompts right-padded, in chunks,
    as its `PromptProcessingBatch.prompt` does (prepare, chunks, finalize). Returns the merged caches."""
    from mlx_lm.models.cache import ArraysCache

    batch = [ArraysCache.merge([copy.deepcopy(s[i]) for s in singles]) for i in range(len(singles[0]))]
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    tokens = mx.array([p + [0] * (longest - len(p)) for p in prompts])
    for c in batch:
        c.prepare(lengths=lengths, right_padding=[longest - n for n in lengths])
    for s in range(0, longest, chunk):
        model(tokens[:, s : s + chunk], cache=batch)
    for c in batch:
        c.finalize()
    return batch


@pytest.mark.parametrize("accelerate", [False, True], ids=["plain", "accelerated"])
def test_right_padding_leaves_every_row_as_alone(accelerate, tmp_path, tiny_tokenizer_path):
    # mlx-lm's batched prefill: rows of 13, 1, 20 and 0 new tokens (two after a history), window 8, in
    # chunks of 6: the conv keeps the last real inputs, h and the ring only the real tokens, the next
    # position moves by the real tokens, and decoding on together matches each row alone.
    from conftest import write_tiny_model

    model = load_model(write_tiny_model(tmp_path, attention_window_size=8), accelerate=accelerate)
    rng = np.random.default_rng(1)
    history = [[], rng.integers(0, 400, 5).tolist(), [], rng.integers(0, 400, 11).tolist()]
    prompts = [rng.integers(0, 400, n).tolist() for n in (13, 1, 20, 0)]
    singles = [model.make_cache() for _ in prompts]
    for cache, past in zip(singles, history):
        if past:
            model(mx.array([past]), cache=cache)
    batch = right_padded_prefill(model, singles, prompts, chunk=6)
    for cache, prompt in zip(singles, prompts):
        if prompt:
            model(mx.array([prompt]), cache=cache)
    for row, single in enumerate(singles):
        for layer, (b, s) in enumerate(zip(batch, single)):
            for name, got, want in zip(RECURRENT_SLOTS if len(s.cache) == 3 else ATTENTION_SLOTS, b.cache, s.cache):
                got = np.array(got[row])
                if name in ("key_slots", "next_position"):
                    assert np.array_equal(got, np.array(want[0])), (row, layer, name)
                else:
                    assert np.abs(got - np.array(want[0])).max() <= 1e-5, (row, layer, name)
    step = rng.integers(0, 400, (4, 1))
    together = np.array(model(mx.array(step), cache=batch))
    for row, single in enumerate(singles):
        alone = np.array(model(mx.array(step[row : row + 1]), cache=single))
        assert np.abs(together[row] - alone[0]).max() <= 1e-4
