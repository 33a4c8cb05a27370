"""The benchmark harness (rg_mlx.bench) end to end on a tiny checkpoint: every runtime's worker runs and reports."""

from __future__ import annotations

import importlib.util

import mlx.core as mx
import pytest

from rg_mlx import ModelArgs
from rg_mlx.bench import checkpoint, long_chat, speed

TINY = ModelArgs(vocab_size=2048, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                 block_types=["recurrent", "recurrent", "attention"], attention_window_size=16, logits_soft_cap=30.0)


@pytest.fixture
def tiny_config(monkeypatch):
    monkeypatch.setitem(checkpoint.CONFIGS, "tiny", TINY)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(checkpoint.CONFIGS, "tiny", TINY)
        return checkpoint.write_checkpoint("tiny", tmp_path_factory.mktemp("bench") / "tiny-float32")


@pytest.fixture(scope="module")
def tiny_folders(tiny_checkpoint):
    """The tiny checkpoint converted to each kind of weights (beside it, as the bench does)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(checkpoint.CONFIGS, "tiny", TINY)
        return {kind: checkpoint.weights_folder("tiny", tiny_checkpoint, kind) for kind in checkpoint.WEIGHTS}


def test_weights_folders_are_the_checkpoint_converted(tiny_checkpoint, tiny_folders):
    import json

    from rg_mlx import load_model

    assert tiny_folders["float32"] == tiny_checkpoint
    assert [f.name for f in tiny_folders.values()] == ["tiny-float32", "tiny-bfloat16", "tiny-8bit", "tiny-4bit"]
    sizes = {kind: checkpoint.folder_bytes(f) for kind, f in tiny_folders.items()}
    params = checkpoint.parameter_count(TINY)
    assert 4 * params <= sizes["float32"] < 4 * params + 2**16  # the weights, and the files' headers
    assert 2 * params <= sizes["bfloat16"] < 2 * params + 2**16
    for kind, bits in (("8bit", 8), ("4bit", 4)):
        config = json.loads((tiny_folders[kind] / "config.json").read_text())
        assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    assert sizes["4bit"] < sizes["8bit"] < sizes["bfloat16"]
    mtime = (tiny_folders["4bit"] / "config.json").stat().st_mtime
    assert checkpoint.weights_folder("tiny", tiny_checkpoint, "4bit") == tiny_folders["4bit"]  # written once
    assert (tiny_folders["4bit"] / "config.json").stat().st_mtime == mtime
    for kind in ("bfloat16", "8bit", "4bit"):
        load_model(tiny_folders[kind])  # rg_mlx loads each


# runtime -> whether rg_mlx's fast path may be in its process
RUNTIMES = {"rg_mlx": True, "rg_mlx-bf16": True, "mlx-lm": False, "mlx-lm+blas": True, "hf-float32": False}


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_worker_measures_each_runtime(tiny_checkpoint, runtime):
    if runtime.startswith("hf") and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers not installed")
    r = speed.run_worker(tiny_checkpoint, runtime, prompt_lengths=[8, 24], decode_tokens=4, budget=60)
    from rg_mlx.loading import bfloat16_products

    bf16 = "float32 (bfloat16 products)" if bfloat16_products(mx.bfloat16) else "bfloat16"
    assert r.get("dtype") == (bf16 if runtime == "rg_mlx-bf16" else "float32"), r
    assert "error" not in r, r
    assert r["params"] == checkpoint.parameter_count(TINY)
    assert set(r["prompt"]) == {"8", "24"} and all(p["tok_s"] > 0 and "extrapolated_from" not in p
                                                  for p in r["prompt"].values())
    assert r["decode"]["tok_s"] > 0 and r["decode"]["tokens"] == 4
    assert r["state_bytes"] > 0 and r["peak_rss_bytes"] > 0
    # MLX as installed and transformers run without rg_mlx's fast path (its BLAS, its malloc settings)
    assert r["fast_path"] == RUNTIMES[runtime]


def test_served_worker_measures_decode_on_request(tiny_checkpoint):
    worker = speed.Worker(tiny_checkpoint, "rg_mlx", [8], decode_tokens=4, budget=60, serve=True)
    try:
        report = worker.reply()
        assert "error" not in report, report
        assert "decode" not in report and set(report["prompt"]) == {"8"}
        for _ in range(2):
            d = worker.decode()
            assert d["tok_s"] > 0 and d["tokens"] == 4, d
    finally:
        worker.close()
    assert worker.proc.returncode == 0


def test_decode_rounds_alternate_and_take_the_median():
    probes = iter([20e9, 30e9, 25e9])

    class Fake:
        """Stands in for a served worker: its decode rates, and the order of the calls."""

        calls: list[str] = []

        def __init__(self, name, rates):
            self.name, self.rates = name, iter(rates)

        def decode(self):
            Fake.calls.append(self.name)
            return {"tok_s": next(self.rates), "tokens": 4}

    workers = {"a": Fake("a", [3.0, 9.0, 4.0]), "b": Fake("b", [5.0, 1.0, 2.0])}
    rates, seen = speed.decode_rounds(workers, 3, probe=lambda: next(probes))
    assert seen == [20e9, 30e9, 25e9]
    assert Fake.calls == ["a", "b", "b", "a", "a", "b"]  # who goes first alternates
    assert rates == {"a": {"tok_s": 4.0, "tokens": 4, "rounds": [3.0, 9.0, 4.0]},
                     "b": {"tok_s": 2.0, "tokens": 4, "rounds": [5.0, 1.0, 2.0]}}


def test_mlx_lm_runs_on_quantized_weights_as_stored(tiny_folders):
    r = speed.run_worker(tiny_folders["4bit"], "mlx-lm+blas", prompt_lengths=[8], decode_tokens=3, budget=60)
    assert "error" not in r, r
    assert r["dtype"] == "bfloat16"  # mlx-lm computes in its scales' dtype, as its users run it


def test_plan_orders_the_runs():
    runtimes = ["rg_mlx", "rg_mlx-bf16", "mlx-lm", "mlx-lm+blas", "hf-float32", "hf-bfloat16"]
    assert speed.plan(runtimes, ["float32", "bfloat16", "4bit"]) == [
        "mlx-lm/float32", "mlx-lm+blas/bfloat16", "mlx-lm+blas/4bit", "hf-float32/float32", "hf-bfloat16/bfloat16",
        "rg_mlx/float32", "mlx-lm+blas/float32", "rg_mlx/bfloat16", "rg_mlx/4bit", "rg_mlx-bf16/bfloat16",
    ]
    assert speed.plan(runtimes, ["4bit"]) == [
        "mlx-lm+blas/4bit", "hf-float32/float32", "hf-bfloat16/bfloat16", "rg_mlx/4bit"]


def test_bench_config_runs_the_rounds_and_reports_them(tiny_checkpoint, tiny_folders, tiny_config, monkeypatch):
    import argparse

    monkeypatch.setattr(speed, "BandwidthProbe", lambda: lambda: 20e9)
    args = argparse.Namespace(decode_rounds=2, budget=60)
    runs = speed.plan(["rg_mlx", "mlx-lm+blas"], ["float32", "4bit"])
    assert runs == ["mlx-lm+blas/4bit", "rg_mlx/float32", "mlx-lm+blas/float32", "rg_mlx/4bit"]
    results, probes = speed.run_config("tiny", tiny_checkpoint, tiny_folders, runs, args, [8], 4, rounds=True)
    assert list(results) == runs
    assert probes == [20e9] * 4  # the float32 duel's two rounds, then rg_mlx's two
    for key in runs:
        assert "error" not in results[key], results[key]
        decode = results[key]["decode"]
        assert decode["tok_s"] > 0 and len(decode.get("rounds", [])) == (0 if key == "mlx-lm+blas/4bit" else 2)
        size = checkpoint.folder_bytes(tiny_folders[key.split("/")[1]])
        assert results[key]["bytes_per_token"] == size + results[key]["state_bytes"]
    assert results["rg_mlx/float32"]["duel"]["rounds"] != results["rg_mlx/float32"]["decode"]["rounds"]
    text = speed.tables("tiny", results, [8], 20e9)
    assert "median of 2 rounds" in text and "(median of the probes of the decode rounds)" in text
    assert "Decode rounds, tok/s: rg_mlx/float32 " in text and "; mlx-lm+blas/float32 " in text
    assert "rg_mlx on each kind of weights against rg_mlx on float32 weights" in text
    assert "| 4bit | float32 | " in text  # rg_mlx's 4-bit run, float32 activations
    assert "| mlx-lm (same BLAS), 4bit, bfloat16 | rg_mlx/4bit, float32 |" in text


def test_memory_run_samples_the_long_chat_and_a_fresh_one_alongside():
    samples = long_chat.run_chat("demo", total=300, every=100, seed=0)
    assert [s["tokens"] for s in samples] == [100, 200, 300]
    assert all(s["rss_bytes"] > 0 and s["mean_ms"] > 0 and s["fresh_mean_ms"] > 0 for s in samples[1:])
    assert samples[-1]["tokens_seen"] >= 300  # the fresh chat's tokens are not the long chat's
    s = long_chat.spread(samples, warmup=100)
    first, last, change = s["relative"]
    assert first == samples[1]["mean_ms"] / samples[1]["fresh_mean_ms"]
    assert last == samples[2]["mean_ms"] / samples[2]["fresh_mean_ms"]
    assert change == last / first - 1 and s["rss_spread"] >= 0


def test_duel_needs_both_runs_rounds_and_the_memory_for_them(monkeypatch):
    gb = 10**9
    monkeypatch.setattr(speed, "available_bytes", lambda: 20 * gb)
    both = ["mlx-lm/float32", "rg_mlx/float32", "mlx-lm+blas/float32", "rg_mlx/4bit"]
    assert speed.duel_runs(both, 4, 4 * gb) == ["rg_mlx/float32", "mlx-lm+blas/float32"]  # 3 x 5.2 GB fit in 20
    assert speed.duel_runs(both, 4, 6 * gb) == []  # 3 x 7.8 GB do not
    assert speed.duel_runs(both, 0, 4 * gb) == []
    assert speed.duel_runs(["rg_mlx/float32", "hf-float32/float32"], 4, 4 * gb) == []
    monkeypatch.setattr(speed, "available_bytes", lambda: 0)  # unknown (no /proc/meminfo)
    assert speed.duel_runs(both, 4, 6 * gb) == ["rg_mlx/float32", "mlx-lm+blas/float32"]


def test_tables_without_peers_or_rounds():
    ours = {"dtype": "float32", "blas": "x", "prompt": {"8": {"tok_s": 80.0, "ttft_s": 0.1}},
            "decode": {"tok_s": 5.0, "tokens": 4}, "load_s": 1.0, "peak_rss_bytes": 10**9, "state_bytes": 2**20,
            "bytes_per_token": 4 * 10**9}
    text = speed.tables("tiny", {"rg_mlx/float32": ours}, [8], 20e9)
    assert "compared with each peer" not in text and "rounds" not in text and "each kind of weights" not in text
    assert "(probed before the first runtime)" in text
    assert "| rg_mlx | float32 | float32 | x | 80.0 | 0.10 | 5.00 | 100% | 4.00 |" in text


def test_peers_not_installed_are_skipped_with_a_note(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    kept, notes = speed.installed(["rg_mlx", "hf-float32", "mlx-lm", "hf-bfloat16"])
    assert kept == ["rg_mlx", "mlx-lm"]
    assert notes == [
        "transformers not installed: skipping hf-float32, hf-bfloat16 (pip install -e '.[dev]' in the rg-mlx clone)"
    ]
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert speed.installed(["rg_mlx", "hf-float32"]) == (["rg_mlx", "hf-float32"], [])


def test_the_package_never_imports_the_checkouts_benchmarks():
    """Nothing installed imports `benchmarks/` (or the tests): `rg-mlx bench` must work from a wheel."""
    import ast
    from pathlib import Path

    packages = ["rg_mlx", "rg_mlx.kernels", "rg_mlx.convert", "rg_mlx.app"]
    folders = [Path(importlib.util.find_spec(p).submodule_search_locations[0]) for p in packages]
    imported = set()
    for file in (f for folder in folders for f in folder.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                imported |= {(file.name, a.name.split(".")[0]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add((file.name, node.module.split(".")[0]))
    assert {(f, m) for f, m in imported if m in ("benchmarks", "tests", "conftest", "reference")} == set()
