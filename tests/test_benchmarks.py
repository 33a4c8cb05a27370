"""The benchmark harness end to end on a tiny checkpoint: every runtime's worker runs and reports."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

from rg_mlx import ModelArgs

TINY = ModelArgs(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                 block_types=["recurrent", "recurrent", "attention"], attention_window_size=16, logits_soft_cap=30.0)


@pytest.fixture(scope="module")
def harness():
    """`benchmarks.bench` and `benchmarks.checkpoint` (the checkout's root is on sys.path only for the import)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).resolve().parents[1]))
        return importlib.import_module("benchmarks.bench"), importlib.import_module("benchmarks.checkpoint")


@pytest.fixture(scope="module")
def tiny_checkpoint(harness, tmp_path_factory):
    _, checkpoint = harness
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(checkpoint.CONFIGS, "tiny", TINY)
        return checkpoint.write_checkpoint("tiny", tmp_path_factory.mktemp("bench") / "tiny-float32")


# runtime -> whether rg_mlx's fast path may be in its process
RUNTIMES = {"rg_mlx": True, "mlx-lm": False, "mlx-lm+blas": True, "hf-float32": False}


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_worker_measures_each_runtime(harness, tiny_checkpoint, runtime):
    bench, checkpoint = harness
    if runtime.startswith("hf") and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers not installed")
    r = bench.run_worker(tiny_checkpoint, runtime, prompt_lengths=[8, 24], decode_tokens=4, budget=60)
    assert "error" not in r, r
    assert r["params"] == checkpoint.parameter_count(TINY)
    assert set(r["prompt"]) == {"8", "24"} and all(p["tok_s"] > 0 and "extrapolated_from" not in p
                                                  for p in r["prompt"].values())
    assert r["decode"]["tok_s"] > 0 and r["decode"]["tokens"] == 4
    assert r["state_bytes"] > 0 and r["peak_rss_bytes"] > 0
    # MLX as installed and transformers run without rg_mlx's fast path (its BLAS, its malloc settings)
    assert r["fast_path"] == RUNTIMES[runtime]
