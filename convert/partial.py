"""The hidden folder a conversion writes into, and the clean-up after conversions that were killed.

`convert` writes into ``.OUTPUT.<id>.partial`` beside OUTPUT and renames it into place at the end;
an error or Ctrl-C removes it. SIGKILL or a power cut cannot, and a big checkpoint leaves gigabytes
behind. So each partial folder records its owner (host, pid and the process's start time, which
tells a reused pid apart) in `OWNER_FILE`, and the next conversion into the same parent folder
removes the partial folders whose owner is gone (`remove_stale`). A folder whose owner still runs,
was started on another host, or left no record (an older rg_mlx) is never touched.

Process start times: Linux reads ``/proc/PID/stat`` (field 22, clock ticks since boot); elsewhere
(macOS) ``ps -o stat=,lstart= -p PID``. A zombie counts as gone.

Test hook: with ``RG_MLX_TEST_CONVERT_PAUSE=PATH`` set, the conversion stops after writing its first
tensor, creates ``PATH.paused`` and waits until PATH exists, so a test can kill it mid-write or
keep it running while another conversion runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

OWNER_FILE = ".rg_mlx_owner.json"
SUFFIX = ".partial"
PAUSE_ENV = "RG_MLX_TEST_CONVERT_PAUSE"


@dataclass(frozen=True)
class Removed:
    """A partial folder `remove_stale` deleted."""

    path: Path
    bytes: int


def create(output: Path) -> Path:
    """A new, empty partial folder for `output` (beside it: the final rename stays on one filesystem), with
    its owner record. It is written under another name and renamed, so no cleanup ever sees it unowned."""
    folder = output.parent / f".{output.name}.{uuid.uuid4().hex[:8]}{SUFFIX}"
    staging = folder.with_name(folder.name + ".new")
    staging.mkdir()
    (staging / OWNER_FILE).write_text(json.dumps(_owner(os.getpid())))
    os.rename(staging, folder)
    return folder


def finish(folder: Path) -> None:
    """Drop the owner record: the folder is about to become OUTPUT."""
    (folder / OWNER_FILE).unlink(missing_ok=True)


def remove_stale(parent: Path) -> list[Removed]:
    """Delete the partial folders in `parent` whose owner process is gone; returns what was removed."""
    removed = []
    for folder in sorted(parent.glob(f".*{SUFFIX}")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # no record: not ours to judge
        if not isinstance(owner, dict) or owner_alive(owner):
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(Removed(folder, size))
    return removed


def describe(removed: list[Removed]) -> str:
    """One line for the user about `removed` (non-empty)."""
    total = sum(r.bytes for r in removed)
    names = ", ".join(r.path.name for r in removed)
    plural = "s" if len(removed) > 1 else ""
    return (
        f"removed {len(removed)} partial folder{plural} left by killed conversions in {removed[0].path.parent} "
        f"({total / 2**20:.0f} MiB): {names}"
    )


def owner_alive(owner: dict) -> bool:
    """Whether the process that recorded `owner` may still run (True when this host cannot tell)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return True
    return process_start(owner["pid"]) == owner.get("start")


def _owner(pid: int) -> dict:
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid)}


def process_start(pid: int) -> str | None:
    """A token for when process `pid` started (same process, same token); None if it is gone or a zombie."""
    if os.path.isdir("/proc/self"):
        return _start_linux(pid)
    return _start_ps(pid)


def _start_linux(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) onwards
    if fields[0] in ("Z", "X"):
        return None
    return fields[22 - 3]


def _start_ps(pid: int) -> str | None:
    try:
        command = ["ps", "-o", "stat=,lstart=", "-p", str(pid)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    state, _, start = result.stdout.strip().partition(" ")
    if result.returncode or not start or state.startswith("Z"):
        return None
    return " ".join(start.split())


def pausing(progress: Callable[..., None] | None) -> Callable[..., None] | None:
    """`progress`, plus the test hook's one pause after the first tensor when ``RG_MLX_TEST_CONVERT_PAUSE`` is set."""
    gate = os.environ.get(PAUSE_ENV)
    if not gate:
        return progress
    paused = []

    def progress_then_pause(*args) -> None:
        if progress is not None:
            progress(*args)
        if not paused:
            paused.append(True)
            Path(gate + ".paused").touch()
            while not os.path.exists(gate):
                time.sleep(0.02)

    return progress_then_pause
