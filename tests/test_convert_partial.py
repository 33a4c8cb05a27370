"""Killed conversions: their hidden partial folders are removed by the next conversion into the same
parent folder, never while their owner runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from rg_mlx import load_model
from rg_mlx.convert import convert, partial


def start_conversion(source: Path, output: Path, gate: Path) -> subprocess.Popen:
    """`rg-mlx convert` in a new process that stops after its first tensor until `gate` exists."""
    env = {**os.environ, partial.PAUSE_ENV: str(gate)}
    return subprocess.Popen(
        [sys.executable, "-m", "rg_mlx", "convert", str(source), str(output)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_paused(process: subprocess.Popen, gate: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not Path(f"{gate}.paused").exists():
        if process.poll() is not None:
            raise AssertionError(f"the conversion ended before pausing: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the conversion never paused")
        time.sleep(0.05)


def partials(parent: Path, output: str) -> list[Path]:
    return sorted(parent.glob(f".{output}.*.partial"))


def assert_complete(output: Path, source: Path) -> None:
    """`output` loads and computes what `source` does."""
    tokens = mx.array(np.arange(12)[None] % 50, mx.int32)
    expected = load_model(source, dtype="float32")(tokens)
    np.testing.assert_array_equal(np.array(load_model(output, dtype="float32")(tokens)), np.array(expected))
    assert not (output / partial.OWNER_FILE).exists()


def test_a_killed_conversion_is_cleaned_up_by_the_next(tiny_model_dir, tmp_path):
    parent = tmp_path / "models"
    parent.mkdir()
    live = start_conversion(tiny_model_dir, parent / "live", tmp_path / "release-live")
    killed = None
    try:
        wait_paused(live, tmp_path / "release-live")
        killed = start_conversion(tiny_model_dir, parent / "out", tmp_path / "never")
        wait_paused(killed, tmp_path / "never")
        (stale,) = partials(parent, "out")
        assert any(f.suffix == ".safetensors" for f in stale.iterdir())  # killed mid-write
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert stale.is_dir() and partials(parent, "live")

        # A second conversion beside them: removes the stale folder, keeps the live one.
        second = subprocess.run(
            [sys.executable, "-m", "rg_mlx", "convert", str(tiny_model_dir), str(parent / "out")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert second.returncode == 0, second.stderr
        lines = [line for line in second.stdout.splitlines() if "partial folder" in line]
        assert len(lines) == 1
        assert lines[0].startswith(f"removed 1 partial folder left by killed conversions in {parent}")
        assert stale.name in lines[0]
        assert not stale.exists() and partials(parent, "out") == []
        assert_complete(parent / "out", tiny_model_dir)
        (live_partial,) = partials(parent, "live")
        assert (live_partial / partial.OWNER_FILE).is_file()

        (tmp_path / "release-live").touch()
        _, err = live.communicate(timeout=300)
        assert live.returncode == 0, err
        assert_complete(parent / "live", tiny_model_dir)
        assert sorted(p.name for p in parent.iterdir()) == ["live", "out"]
    finally:
        for process in (live, killed):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_the_python_api_returns_what_it_removed(tiny_model_dir, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".old.1234abcd.partial"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(bytes(3 << 20))
    record = {"host": socket.gethostname(), "pid": int(dead.stdout), "start": "12345"}
    (stale / partial.OWNER_FILE).write_text(json.dumps(record))
    result = convert(tiny_model_dir, tmp_path / "new")
    assert [r.path for r in result.removed_partials] == [stale]
    assert 3 << 20 < result.removed_partials[0].bytes < (3 << 20) + 4096  # the shard and the owner record
    assert partial.describe(result.removed_partials).endswith("(3 MiB): .old.1234abcd.partial")
    assert capsys.readouterr().out == ""  # the library prints nothing


@pytest.mark.parametrize("start_time", [partial._start_linux, partial._start_ps], ids=["linux", "ps (macOS)"])
def test_owner_check(start_time, tmp_path, monkeypatch):
    if start_time is partial._start_linux and not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here")
    monkeypatch.setattr(partial, "process_start", start_time)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": start_time(os.getpid())}
    assert me["start"] and start_time(os.getpid()) == me["start"]  # stable
    assert partial.owner_alive(me)
    assert not partial.owner_alive({**me, "start": "another process under the same pid"})
    assert partial.owner_alive({**me, "host": "another-machine"})  # cannot tell: keep

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # poll() reaped it; a zombie counts as gone too.
    assert start_time(child.pid) is None
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert start_time(zombie.pid) is None
    zombie.wait()


def test_folders_without_a_record_or_of_live_owners_stay(tmp_path):
    unowned = tmp_path / ".a.00000000.partial"
    unowned.mkdir()
    mine = partial.create(tmp_path / "b")
    assert partial.remove_stale(tmp_path) == []
    assert unowned.is_dir() and mine.is_dir()
    assert json.loads((mine / partial.OWNER_FILE).read_text())["pid"] == os.getpid()
    partial.finish(mine)
    assert not (mine / partial.OWNER_FILE).exists()
