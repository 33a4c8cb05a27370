"""The install without a C/C++ compiler: the wheel builds without the compiled parts, and rg_mlx then says
that MLX's own products run (offline: no build isolation, no index)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_builds_wheels() -> bool:
    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.skipif(not _setuptools_builds_wheels(), reason="this setuptools cannot build wheels (pip install wheel)")
def test_install_without_compiler(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.so", "_native_build.json", "__pycache__", "*.egg-info", ".pytest_cache",
        "artifacts", "docs"))
    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false", "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"),
                            str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("rg_mlx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rg_mlx/cpu/native.py" in names and "rg_mlx/cpu/csrc/products.cpp" in names
    assert not [n for n in names if n.endswith((".so", ".pyd")) or n.endswith("_native_build.json")]

    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], env=env,
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = "import rg_mlx, rg_mlx.cpu.native as n; print(rg_mlx.__file__); print(n.available()); print(n.status())"
    env = {k: v for k, v in os.environ.items() if k not in ("RG_MLX_NATIVE", "RG_MLX_NATIVE_ISA")}
    env["PYTHONPATH"] = str(site)
    ran = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    location, available, status = ran.stdout.strip().splitlines()[-3:]
    assert location.startswith(str(site))
    assert available == "False"
    assert status.startswith("not built (MLX's own products run; reinstall rg-mlx")
