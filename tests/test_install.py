"""A non-editable install: the package built from this checkout and installed into a fresh virtual environment
runs every `rg-mlx` subcommand's --help, and the benchmark workers, from outside the checkout.

The environment sees the installed dependencies (`--system-site-packages`); nothing is downloaded. Skip it
with `-m "not install"`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rg_mlx.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.install


# Run by the new venv's interpreter: why it cannot build the package offline, or nothing.
_CAN_BUILD = """
import importlib.util
if importlib.util.find_spec("setuptools") is None:
    print("setuptools is not installed")
else:
    import setuptools
    version = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:  # later ones build wheels alone
        print(f"setuptools {setuptools.__version__} needs the wheel package to build")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A venv holding the package built from a copy of this checkout; the environment to run it with."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy: building in place would write build/ and *.egg-info into the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "artifacts", "*.so"))
    venv = tmp / "venv"
    # No pip or setuptools of its own: the system's (newer) ones build the wheel, pip installs into the venv.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, timeout=60)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    why = subprocess.run([str(venv / "bin" / "python"), "-c", _CAN_BUILD], capture_output=True, text=True, env=env)
    if why.stdout.strip() or why.returncode:
        pytest.skip(why.stdout.strip() or why.stderr.strip().splitlines()[-1])
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--ignore-installed", str(src)],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    shutil.rmtree(src)  # nothing may run from the copy either
    (tmp / "elsewhere").mkdir()
    return venv, env


def test_every_package_is_listed_for_the_install():
    """pyproject.toml lists the packages explicitly (kernels/, convert/ and app/ install under rg_mlx.): every
    folder with an `__init__.py` must be there, or the installed CLI misses it."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"rg_mlx": ROOT / "rg_mlx", **{name: ROOT / path for name, path in setup["package-dir"].items()}}
    on_disk = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            on_disk.add(".".join((name, *relative)))
    assert set(setup["packages"]) == on_disk


def _run(installed, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    venv, env = installed
    cwd = venv.parent / "elsewhere"
    return subprocess.run(list(argv), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def test_the_installed_package_is_the_one_that_runs(installed):
    venv, _ = installed
    python = str(venv / "bin" / "python")
    modules = ["rg_mlx", "rg_mlx.kernels", "rg_mlx.convert", "rg_mlx.app", "rg_mlx.bench", "rg_mlx.commands"]
    code = "import importlib; print('\\n'.join(importlib.import_module(m).__file__ for m in %r))" % modules
    out = _run(installed, python, "-c", code)
    assert out.returncode == 0, out.stderr
    for module, file in zip(modules, out.stdout.split()):
        assert Path(file).resolve().is_relative_to(venv.resolve()), (module, file)
    assert (venv / "bin" / "rg-mlx").is_file()


def test_every_subcommand_help_runs_from_the_install(installed):
    venv, _ = installed
    rg_mlx = str(venv / "bin" / "rg-mlx")
    runs = {"--help": [rg_mlx, "--help"], "--version": [rg_mlx, "--version"]}
    runs.update({name: [rg_mlx, name, "--help"] for name in COMMANDS})
    procs = {name: _run(installed, *argv) for name, argv in runs.items()}
    for name, out in procs.items():
        assert out.returncode == 0, (name, out.stderr)
    assert all(name in procs["--help"].stdout for name in COMMANDS)
    assert procs["--version"].stdout.startswith("rg-mlx ")
    for name in COMMANDS:
        assert procs[name].stdout.startswith(f"usage: rg-mlx {name}"), procs[name].stdout


def test_bench_workers_run_from_the_install(installed, tmp_path):
    """The harness ships with the package; its worker runs by file path, so MLX as installed stays so."""
    venv, _ = installed
    code = f"""
import json, sys
from rg_mlx import ModelArgs
from rg_mlx.bench import checkpoint, speed
checkpoint.CONFIGS["tiny"] = ModelArgs(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
    num_attention_heads=4, block_types=["recurrent", "recurrent", "attention"], attention_window_size=16)
folder = checkpoint.write_checkpoint("tiny", {str(tmp_path / "tiny")!r})
print(speed.WORKER)
for runtime in ("rg_mlx", "mlx-lm"):
    print(json.dumps(speed.run_worker(folder, runtime, prompt_lengths=[8], decode_tokens=3, budget=60)))
"""
    out = _run(installed, str(venv / "bin" / "python"), "-c", code, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    worker, *reports = out.stdout.strip().splitlines()
    assert Path(worker).resolve().is_relative_to(venv.resolve())
    ours, peer = (json.loads(r) for r in reports)
    assert "error" not in ours and "error" not in peer, (ours, peer)
    assert ours["fast_path"] and not peer["fast_path"]
    assert ours["decode"]["tokens"] == peer["decode"]["tokens"] == 3
