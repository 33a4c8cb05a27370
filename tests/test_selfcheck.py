"""The GPU kernels' self-check and the fallback to the ops path, tested without a GPU.

Broken kernel sets (tests/kernel_stand_ins.py: a source that does not compile, one that computes a
wrong value, one that raises at launch) are injected as the Metal path's with
`rg_mlx.kernels.use_kernels`; a working one computes with the ops path. Generation must give the
ops path's tokens with exactly one warning per process, a later process must take the result from
the cache without checking again, and a forced path must raise one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from kernel_stand_ins import FAULTS, Counting, injected, kernel_set

from rg_mlx import kernels, paths
from rg_mlx.errors import RGError
from rg_mlx.kernels import KernelFallbackWarning, rg_lru, rg_lru_ops, selfcheck

HERE = Path(__file__).parent
FAILURE_TEXT = {
    "no-compile": "RuntimeError: g++ failed on the kernel source",
    "wrong-value": "differs from the ops path",
    "raises": "Unable to load kernel",
}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("RG_MLX_CACHE", str(folder))
    monkeypatch.delenv("RG_MLX_SCAN", raising=False)
    return folder


def scan_case(T: int = 40, dtype=mx.float32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    B, L = 2, 24

    def cast(shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    return dict(
        x=cast((B, T, L)),
        gate_x=cast((B, T, L)),
        gate_a=cast((B, T, L)),
        a_param=mx.array(rng.uniform(-9.0, 1.0, L).astype(np.float32)).astype(dtype),
        reset=mx.array(rng.random((B, T)) < 0.1),
        h0=mx.array(rng.standard_normal((B, L)).astype(np.float32)),
    )


class Build:
    """Builds kernel set `kind` once, counting builds and launches."""

    def __init__(self, kind: str, workdir: Path):
        self.kind, self.workdir = kind, workdir
        self.log = workdir / f"{kind}.log"
        self.builds = 0

    def __call__(self) -> dict:
        self.builds += 1
        return {n: Counting(k, self.log) for n, k in kernel_set(self.kind, self.workdir).items()}

    @property
    def launches(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0


def assert_same(got: tuple, expected: tuple) -> None:
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(e.astype(mx.float32)), rtol=1e-5, atol=1e-5)


def test_working_kernels_pass_once_and_cost_nothing_after(cache, tmp_path):
    """Kernels that agree pass; the check runs once per dtype combination, then every call is just the scan."""
    build = Build("ops", tmp_path)
    case = scan_case()
    with injected("metal", build, "ops stand-in"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.available_paths() == ["ops", "metal"]
        assert_same(rg_lru(**case), rg_lru_ops(**case))
        result = kernels.self_check("metal")
        assert result.ok and not result.cached and result.path == "metal" and result.dtypes == "float32"
        checked = build.launches
        assert checked == 1 + 2 + 1  # the check: sequential, chunked (2 launches); then the scan (sequential)
        for _ in range(3):
            assert_same(rg_lru(**case), rg_lru_ops(**case))
        assert build.launches == checked + 3 and build.builds == 1
        bf16 = scan_case(dtype=mx.bfloat16)
        assert_same(rg_lru(**bf16), rg_lru_ops(**bf16))  # a new dtype: checked once more
        assert build.launches == checked + 3 + 3 + 1  # the check on bfloat16, then the scan
    stored = json.loads((cache / "selfcheck.json").read_text())
    assert len(stored) == 2 and all(v["failure"] is None for v in stored.values())
    assert any("ops stand-in | bfloat16 | mlx " in key for key in stored)
    print(f"self-check {selfcheck.SHAPE} with the ops path standing in for the kernel: {result.seconds * 1e3:.0f} ms")


@pytest.mark.parametrize("fault", FAULTS)
def test_broken_kernels_fall_back_with_one_warning(fault, cache, tmp_path):
    """Each failure: the ops path's results, one warning naming the failure, from the cache in a later process;
    a forced path raises one line."""
    build = Build(fault, tmp_path)
    cases = [scan_case(T) for T in (40, 300)] + [scan_case(40, mx.bfloat16)]
    with injected("metal", build, f"broken {fault}"):
        with pytest.warns(KernelFallbackWarning) as caught:
            for case in cases * 2:
                assert_same(rg_lru(**case), rg_lru_ops(**case))
        assert len(caught) == 1
        message = str(caught[0].message)
        assert FAILURE_TEXT[fault] in message and "`rg-mlx doctor`" in message and "\n" not in message
        assert "float32, sequential" in message  # the first variant of the first dtype
        with pytest.raises(RGError, match="failed its self-check") as forced:
            rg_lru(**cases[0], path="metal")
        assert "\n" not in str(forced.value) and "RG_MLX_SCAN" in str(forced.value)
        launches = build.launches

    # A new process (here: this one, forgetting) with the same cache: no check, still one warning.
    build_again = Build(fault, tmp_path / "again")
    (tmp_path / "again").mkdir()
    with injected("metal", build_again, f"broken {fault}"):
        with pytest.warns(KernelFallbackWarning, match="remembered in") as caught:
            for case in cases:
                assert_same(rg_lru(**case), rg_lru_ops(**case))
        assert len(caught) == 1 and FAILURE_TEXT[fault] in str(caught[0].message)
        assert build_again.builds == 0 and build_again.launches == 0
    assert launches > 0


def test_a_changed_source_is_checked_again(cache, tmp_path):
    """The cache key holds the kernel source's digest (and MLX's version, the device): new kernels are checked."""
    build = Build("ops", tmp_path)
    case = scan_case()
    with injected("metal", build, "source A"):
        rg_lru(**case)
    assert build.launches == 3 + 1  # checked, then run
    with injected("metal", build, "source A"):
        rg_lru(**case)
    assert build.launches == 4 + 1  # only run
    with injected("metal", build, "source B"):
        rg_lru(**case)
    assert build.launches == 5 + 3 + 1
    key = next(iter(json.loads((cache / "selfcheck.json").read_text())))
    assert f"mlx {mx.__version__}" in key and selfcheck.device_name() in key
    assert kernels.source.source_hash("metal") != kernels.source.source_hash("cuda")


def test_an_unwritable_cache_only_means_checking_again(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RG_MLX_CACHE", str(blocker / "cache"))
    build = Build("ops", tmp_path)
    with injected("metal", build, "ops stand-in"), warnings.catch_warnings():
        warnings.simplefilter("error")
        case = scan_case()
        assert_same(rg_lru(**case), rg_lru_ops(**case))
        assert kernels.self_check("metal").ok


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("RG_MLX_CACHE", str(tmp_path / "mine"))
    assert paths.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("RG_MLX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "rg_mlx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert paths.cache_dir() == Path.home() / "Library" / "Caches" / "rg_mlx"
    monkeypatch.setattr(sys, "platform", "linux")
    assert paths.cache_dir() == Path.home() / ".cache" / "rg_mlx"


# ---------------------------------------------------------------- `rg-mlx generate`, one process at a time

PROMPT = "The quick brown fox jumps over the lazy dog, then converts a checkpoint with rg-mlx convert."


def generate(model: Path, cache: Path, fault: str | None, log: Path, *, forced: bool = False):
    """`rg-mlx generate` in a new process, with the Metal path replaced by kernel set `fault` (None: plain)."""
    env = {**os.environ, "RG_MLX_CACHE": str(cache)}
    env.pop("RG_MLX_SCAN", None)
    if forced:
        env["RG_MLX_SCAN"] = "metal"
    args = ["generate", "--model", str(model), "-p", PROMPT, "-m", "12", "--prefill-step-size", "16"]
    if fault is None:
        command = [sys.executable, "-m", "rg_mlx", *args]
    else:
        command = [sys.executable, str(HERE / "kernel_stand_ins.py"), fault, str(log), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> subprocess.CompletedProcess:
    """Plain `rg-mlx generate` (the ops path: no GPU here)."""
    folder = tmp_path_factory.mktemp("reference")
    result = generate(tiny_model_dir, folder / "cache", None, folder / "unused.log")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "KernelFallbackWarning" not in result.stderr
    return result


@pytest.mark.parametrize("fault", FAULTS)
def test_generate_with_a_broken_kernel(fault, reference, tiny_model_dir, tmp_path):
    """`rg-mlx generate` on the tiny model with each broken kernel: the reference tokens, one warning per process,
    no second check in a later process with the same cache, and a forced path's one-line error."""
    cache, log = tmp_path / "cache", tmp_path / "launches.log"
    first = generate(tiny_model_dir, cache, fault, log)
    assert first.returncode == 0, first.stderr
    assert first.stdout == reference.stdout
    assert first.stderr.count("KernelFallbackWarning") == 1 and first.stderr.count("rg-mlx doctor") == 1
    assert FAILURE_TEXT[fault] in first.stderr
    assert log.read_text()  # the check launched the kernels
    assert (cache / "selfcheck.json").is_file()

    log.unlink(missing_ok=True)
    second = generate(tiny_model_dir, cache, fault, log)
    assert second.returncode == 0, second.stderr
    assert second.stdout == reference.stdout
    assert second.stderr.count("KernelFallbackWarning") == 1 and "remembered in" in second.stderr
    assert not log.exists()  # not checked again, and never run

    forced = generate(tiny_model_dir, cache, fault, log, forced=True)
    assert forced.returncode == 1 and forced.stdout == ""
    assert forced.stderr.startswith("rg-mlx generate: error: the metal RG-LRU kernel failed its self-check")
    assert forced.stderr.count("\n") == 1 and FAILURE_TEXT[fault] in forced.stderr
