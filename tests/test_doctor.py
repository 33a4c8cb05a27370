"""`rg-mlx doctor`: the report's text and JSON on this machine (ops path only), and what it says about
kernel paths that work or fail (stand-ins injected as the Metal path)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from kernel_stand_ins import injected, kernel_set

from rg_mlx import doctor
from rg_mlx.cli import main as cli_main
from rg_mlx.cpu import native

SYSTEM_FIELDS = {
    "rg_mlx", "platform", "cpu", "memory_bytes", "python", "mlx", "mlx_lm", "default_device", "device", "blas",
    "native", "bandwidth_bytes_per_second", "paths", "model", "bfloat16_model", "self_check_cache", "seconds", "ok",
}  # fmt: skip


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RG_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RG_MLX_SCAN", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def small(monkeypatch):
    """Smaller speed and bandwidth problems in-process: these tests are about what the report says
    (the full-size run is the new process's)."""
    monkeypatch.setattr(doctor, "SPEED_SHAPE", (1, 256, 64))
    monkeypatch.setattr(doctor, "BANDWIDTH_BYTES", 8 << 20)


def test_doctor_text_in_a_new_process(cache):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rg_mlx", "doctor"], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    headings = ("system", "  cpu ", "  memory ", "  mlx ", "  device ", "  blas ", f"  native      {native.status()}\n",
                "  bandwidth ", "scan paths: ops")
    for heading in headings:
        assert f"\n{heading}" in text, heading
    products = len(native.supported_isas()) * len(doctor.PRODUCTS) if native.available() else 0
    # three dtypes in the first case; the native products on each instruction set; two model checks
    assert text.count("  ok") == len(doctor.BATTERY) + 2 + products + 2
    assert "FAILED" not in text and "everything agrees" in text
    assert seconds < 60
    print(f"rg-mlx doctor: {seconds:.1f} s in a new process")


def test_doctor_json_holds_every_field(cache, small, capsys):
    assert cli_main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == SYSTEM_FIELDS and report["ok"] is True
    assert report["cpu"]["cores"] >= 1 and report["cpu"]["model"]
    if Path("/proc/cpuinfo").exists():
        flags = set(Path("/proc/cpuinfo").read_text().split())
        for feature in ("avx2", "avx512f", "avx512_bf16"):
            assert (feature in report["cpu"]["simd"]) == (feature in flags), feature
    assert report["memory_bytes"] > 2**30 and report["python"].count(".") == 2
    assert report["mlx"] and report["mlx_lm"] and report["default_device"].startswith("Device(")
    assert set(report["blas"]) == {"library", "malloc_reuses_memory"} and report["blas"]["library"]
    assert report["bandwidth_bytes_per_second"] > 1e8

    (ops,) = report["paths"]  # no GPU here
    assert ops["path"] == "ops" and ops["ok"] and ops["self_check"] is None
    assert [(c["name"], c["dtype"]) for c in ops["accuracy"]] == [
        (name, str(d).removeprefix("mlx.core.")) for name, _, _, _, dtypes, _, _ in doctor.BATTERY for d in dtypes
    ]
    for case in ops["accuracy"]:
        assert case["ok"] and 0 <= case["error"] <= case["tolerance"] and case["variant"] == "auto"
    speed = ops["speed"]
    assert speed["seconds"] > 0 and 0 < speed["fraction_of_bandwidth"] and speed["shape"] == list(doctor.SPEED_SHAPE)
    assert [(m["path"], m["dtype"]) for m in report["model"]] == [("ops", "float32")]
    assert report["model"][0]["error"] == 0.0  # the reference itself
    (bf16,) = report["bfloat16_model"]
    assert bf16["dtype"] == "bfloat16" and bf16["state_dtype"] == "float32" and 0 < bf16["error"] <= bf16["tolerance"]
    assert report["self_check_cache"]["file"] == str(cache / "selfcheck.json")
    assert report["native"]["status"] == native.status()
    products = report["native"]["products"]
    if native.available():
        assert [(c["isa"], c["product"].split(",")[0]) for c in products] == [
            (isa, str(w) + ("-bit" if isinstance(w, int) else "")) for isa in native.supported_isas()
            for w, _, _ in doctor.PRODUCTS
        ]
        assert all(c["ok"] and 0 <= c["error"] <= c["tolerance"] for c in products)
    else:
        assert products == []


def test_doctor_fails_on_a_wrong_native_product(monkeypatch):
    """A native product computing something else (here: its weight's rows shifted by one) fails its check."""
    if not native.available():
        pytest.skip("native CPU products not built")
    right = native.matmul
    monkeypatch.setattr(native, "matmul", lambda x, w: right(x, mx.roll(w, 1, axis=0)))
    checks = doctor.native_checks()
    dense = [c for c in checks if not c.product.split(",")[0].endswith("-bit")]
    assert dense and not any(c.ok for c in dense)
    assert all(c.ok for c in checks if c not in dense)


def test_doctor_on_a_working_kernel_path(cache, small, tmp_path):
    with injected("metal", lambda: kernel_set("emulated", tmp_path), "emulated"):
        report = doctor.run()
    assert report.ok, report.to_dict()
    ops, metal = report.paths
    assert metal.path == "metal" and {c.variant for c in metal.accuracy} == {"sequential", "chunked"}
    assert [s.dtypes for s in metal.self_check] == ["float32", "float16", "bfloat16"] and metal.speed is not None
    assert [m.path for m in report.model] == ["ops", "metal"] and all(m.error < 2e-5 for m in report.model)
    assert all(m.state_dtype == "float32" for m in report.bfloat16_model)


@pytest.mark.parametrize("fault", ["wrong-value", "raises"])
def test_doctor_on_a_broken_kernel_path(fault, cache, small, tmp_path, capsys):
    with injected("metal", lambda: kernel_set(fault, tmp_path), f"broken {fault}"):
        assert cli_main(["doctor"]) == 1
    text = capsys.readouterr().out
    assert "SOME CHECKS FAILED" in text and "metal: self-check float32: " in text
    ops_section, metal_section = text.split("\n  metal: against the float64 reference\n")
    assert "FAILED" not in ops_section.split("scan paths")[1]
    assert metal_section.count("FAILED") >= len(doctor.BATTERY) + 3  # the battery, the self-checks, the models
    if fault == "raises":
        assert "Unable to load kernel" in text
    else:
        assert "differs from the ops path" in text


def test_cpu_features_from_linux_and_macos():
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx\n"
    assert doctor.parse_cpuinfo(x86) == ("AMD EPYC 9R14", ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16"])
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm asimdhp bf16 i8mm\nCPU part\t: 0xd40\n"
    assert doctor.parse_cpuinfo(arm) == ("0xd40", ["asimd", "asimdhp", "bf16", "i8mm"])
    mac = {"hw.optional.neon": "1", "hw.optional.arm.FEAT_BF16": "1", "hw.optional.arm.FEAT_I8MM": "0",
           "hw.optional.avx2_0": None}  # fmt: skip
    assert doctor.parse_macos_features(mac) == ["asimd", "bf16"]
