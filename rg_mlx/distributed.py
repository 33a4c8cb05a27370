"""One model over several processes: what the ranks of an `mx.distributed` group agree on around `Model.shard`.

`Model.shard(group)` splits the model (tensor parallelism, mlx-lm's convention) and
`rg_mlx.load(..., group=group)` loads each rank's share of the weights. This module holds the rest:

- `world()`: the group a launcher (`mlx.launch`, `mpirun`) started this process in, or None alone.
- `agreed`: loading ends with the same outcome on every rank. A rank that fails still takes part
  in one exchange after loading, so the others learn which rank failed and why instead of
  waiting in their first all-reduce forever; a rank that never arrives (stuck, or not started
  with the others) ends the wait after `TIMEOUT` seconds. The same exchange gives every rank
  rank 0's random seed, so that sampling draws the same token on every rank.
- `SharedStdin`: standard input read by rank 0 and handed to the others (launchers copy stdin to
  every rank, and all ranks must act on the same input in the same order).
- `roles`: the command line's split of work: rank 0 reads and prints, the others print errors only.

A rank that dies is noticed by the others at their next collective (the ring backend reports a
lost peer); `mlx.launch` also stops the other ranks when one exits with an error.
"""

from __future__ import annotations

import functools
import io
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import mlx.core as mx
import numpy as np

from .errors import RGError

# Seconds a rank that finished loading waits for the others to finish (a 9B model from a slow disk takes minutes).
TIMEOUT = 600.0
# Bytes of each rank's report in the exchange after loading: status, rank 0's seed, the error message.
REPORT_BYTES = 1024

F = TypeVar("F", bound=Callable)
_local = threading.local()


@functools.cache
def world() -> mx.distributed.Group | None:
    """The group of the processes a launcher started together with this one; None for a process alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def label(group: mx.distributed.Group | None) -> str:
    """`"rank 1 of 2"` (empty for no group): how messages name a rank."""
    return f"rank {group.rank()} of {group.size()}" if group is not None else ""


def lost_connection(error: BaseException) -> bool:
    """Whether `error` is the ring backend reporting a peer that went away."""
    return isinstance(error, RuntimeError) and "[ring]" in str(error)


def _report(error: BaseException | None, seed: int) -> np.ndarray:
    report = np.zeros(REPORT_BYTES, np.uint8)
    report[0] = error is not None
    report[1:5] = np.frombuffer(np.uint32(seed).tobytes(), np.uint8)
    if error is not None:
        text = str(error) if isinstance(error, RGError) else f"{type(error).__name__}: {error}"
        data = text.encode()[: REPORT_BYTES - 5]
        report[5 : 5 + len(data)] = np.frombuffer(data, np.uint8)
    return report


def _message(report: np.ndarray) -> str:
    return report[5:].tobytes().rstrip(b"\0").decode(errors="ignore") or "unknown error"


def agree(group: mx.distributed.Group, error: BaseException | None, timeout: float | None = None) -> None:
    """Tell every rank of `group` whether this rank succeeded (`error` None) and learn whether they all did.

    Every rank must call it once at the same point. If all succeeded, seeds MLX's random state with
    rank 0's seed on every rank. Otherwise raises on every rank: this rank's own `error`, or an
    `RGError` naming the ranks that failed and why. Raises `RGError` too if the others do not
    arrive within `timeout` seconds (default `TIMEOUT`) or the connection to one is lost.
    """
    timeout = TIMEOUT if timeout is None else timeout
    report = _report(error, int.from_bytes(os.urandom(4), "little") >> 1)
    box: dict[str, object] = {}

    def exchange() -> None:
        try:
            gathered = mx.distributed.all_gather(mx.array(report)[None], group=group, stream=mx.cpu)
            box["reports"] = np.array(gathered)  # [ranks, REPORT_BYTES]
        except Exception as e:  # noqa: BLE001  (re-raised below, in the caller's thread)
            box["error"] = e

    # In a thread of its own so that the wait can end: a collective no peer joins never returns.
    thread = threading.Thread(target=exchange, name="rg_mlx-agree", daemon=True)
    thread.start()
    thread.join(timeout)
    if error is not None and (thread.is_alive() or "error" in box):
        raise error  # this rank's own failure says more than the silence of the others
    if thread.is_alive():
        raise RGError(
            f"no word from the other ranks {timeout:.0f} s after loading: one is stuck or failed without exiting, "
            "or they were not started together"
        )
    if "error" in box:
        raise RGError(f"lost the connection to another rank while loading ({box['error']})")
    reports = box["reports"]
    failed = [r for r in range(group.size()) if reports[r, 0]]
    if failed:
        if error is not None:
            raise error
        raise RGError("; ".join(f"rank {r} of {group.size()} failed: {_message(reports[r])}" for r in failed))
    mx.random.seed(int(np.frombuffer(reports[0, 1:5].tobytes(), np.uint32)[0]))


def agreed(load: F) -> F:
    """Make a loading function that takes `group=` end with the same outcome on every rank (see `agree`).

    Nested calls (`load` calling `load_model`) exchange once, at the outermost.
    """

    @functools.wraps(load)
    def wrapper(*args, group: mx.distributed.Group | None = None, **kwargs):
        if group is None or group.size() == 1 or getattr(_local, "loading", False):
            return load(*args, group=group, **kwargs)
        _local.loading = True
        result, error = None, None
        try:
            result = load(*args, group=group, **kwargs)
        except Exception as e:  # noqa: BLE001  (every rank learns of it in `agree`, which re-raises it here)
            error = e
        finally:
            _local.loading = False
        agree(group, error)
        return result

    return wrapper  # type: ignore[return-value]


class SharedStdin(io.TextIOBase):
    """Standard input as rank 0 reads it, on every rank of `group`: each read is one exchange.

    Rank 0 reads `source` (its real stdin); the other ranks never touch theirs. Every rank must
    make the same reads in the same order, as ranks running the same program on the same input do.
    Reading to the end works only where the launcher closes stdin at the end of its input, which
    `mlx.launch` never does: there `read()` raises `RGError` rather than wait forever.
    """

    def __init__(self, group: mx.distributed.Group, source: io.TextIOBase | None):
        super().__init__()
        self.group = group
        self.source = source if group.rank() == 0 else None

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.source is not None and self.source.isatty()

    def readline(self, size: int | None = -1) -> str:
        return self._shared(lambda source: source.readline())

    def read(self, size: int | None = -1) -> str:
        if "MLX_RANK" in os.environ:  # started by mlx.launch, which never passes the end of input on
            raise RGError("under mlx.launch standard input never ends: give the text itself (e.g. --prompt TEXT)")
        return self._shared(lambda source: source.read())

    def _shared(self, read: Callable[[io.TextIOBase], str]) -> str:
        data = read(self.source).encode() if self.source is not None else b""
        size = mx.distributed.all_sum(mx.array([len(data)], mx.int32), group=self.group, stream=mx.cpu).item()
        if not size:
            return ""
        mine = np.frombuffer(data, np.uint8) if self.source is not None else np.zeros(size, np.uint8)
        shared = mx.distributed.all_sum(mx.array(mine), group=self.group, stream=mx.cpu)
        return np.array(shared).tobytes().decode()


@contextmanager
def roles(command: str, supported: bool) -> Iterator[mx.distributed.Group | None]:
    """Run a command-line command on every rank of the launcher's group (a no-op for a process alone).

    Rank 0 reads standard input and prints; every other rank reads rank 0's input (`SharedStdin`) and
    prints nothing but errors: its stdout and stderr are closed until the command ends. Ctrl-C ends
    every rank (stopping one reply would need the ranks to agree at every token). Raises `RGError` for
    a command that cannot run over several ranks (`supported` False), and turns a lost peer into one.
    """
    group = world()
    if group is None:
        yield None
        return
    if not supported:
        raise RGError(f"rg-mlx {command} runs in one process: start it without mlx.launch")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    saved = sys.stdin, sys.stdout, sys.stderr
    quiet = open(os.devnull, "w") if group.rank() else None
    sys.stdin = SharedStdin(group, sys.stdin)
    if quiet is not None:
        sys.stdout = sys.stderr = quiet
    try:
        yield group
    except RuntimeError as e:
        if not lost_connection(e):
            raise
        raise RGError(f"lost the connection to another rank ({e}): it failed or was stopped (see its message)") \
            from None
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        if quiet is not None:
            quiet.close()
