"""The fixed-size state's layout: named slots, batch-first arrays, and all zeros meaning a fresh document."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from rg_mlx import load_model
from rg_mlx.state import AttentionState, RecurrentState, copy_state, restore_state, state_bytes


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
