"""The GPU kernels check themselves once before first use, and a failure falls back to the ops path.

Nothing of a kernel path's compiler, math library or memory model can be tested away from its GPU,
so the first time a process is about to run a GPU path's kernels on a combination of input dtypes,
`check` runs both variants (sequential and chunked) once on a small fixed problem built to reach
the awkward cases: document starts (at the first step, mid-row, at the last step), an initial
state, slow channels (a near 1, the kernel's other update formula), fast ones, a row count and a
channel count that leave a partial threadgroup, and chunks that do not divide the length. It
compares `y` and the last state with the portable ops path. A compile error, an exception or a
difference beyond `TOLERANCE` (relative to each channel's largest value, plus one rounding of a
16-bit `y`) is a failure.

Results are kept for the process and in ``selfcheck.json`` in the user cache folder
(`rg_mlx.paths.cache_dir`), keyed by the path, its kernel-source digest, the dtypes, the MLX
version and the device name, so later processes skip the check; a new MLX, device or kernel
source checks again.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from rg_mlx.paths import cache_dir

from .ops import rg_lru_ops
from .source import fused_scan

# [B, T, L] of the check problem: B L = 320 threads leave a partial group of 256 and rows that
# straddle groups; 4 chunks of 9 steps leave a last chunk of 6.
SHAPE = (2, 33, 160)
VARIANTS = {"sequential": 1, "chunked": 4}
# Index or formula mistakes are O(1); differences in the last float32 bits are ~1e-7.
TOLERANCE = 1e-4
# One rounding of y in its dtype, relative (and absolute, for float16's subnormals).
_ROUNDING = {mx.float32: (0.0, 0.0), mx.float16: (2.0**-10, 2.0**-24), mx.bfloat16: (2.0**-7, 0.0)}
CACHE_FILE = "selfcheck.json"

Dtypes = tuple[mx.Dtype, mx.Dtype, mx.Dtype, mx.Dtype]  # x, gate_x, gate_a, a_param


@dataclass(frozen=True)
class Result:
    """One self-check: `failure` is None when the kernels agree with the ops path."""

    path: str
    dtypes: str
    failure: str | None
    cached: bool  # read from the cache file rather than run in this process
    seconds: float  # time the check took (0 when cached)

    @property
    def ok(self) -> bool:
        return self.failure is None


def dtype_label(dtypes: Dtypes) -> str:
    """``"bfloat16"``, or each input's dtype where they differ."""
    names = [str(d).removeprefix("mlx.core.") for d in dtypes]
    if len(set(names)) == 1:
        return names[0]
    return ", ".join(f"{n} {d}" for n, d in zip(("x", "gate_x", "gate_a", "a_param"), names))


def problem(dtypes: Dtypes) -> dict[str, mx.array]:
    """The check's inputs: the same values in every process."""
    B, T, L = SHAPE
    keys = mx.random.split(mx.random.key(20), 5)
    x, gate_x, gate_a = (mx.random.normal((B, T, L), key=k).astype(d) for k, d in zip(keys[:3], dtypes[:3]))
    # A quarter of the channels slow (softplus(-9) ~ 1e-4: a ~ 0.9995), the rest from slow to fast.
    a_param = mx.random.uniform(-9.0, 1.0, (L,), key=keys[3])
    a_param = mx.where(mx.arange(L) % 4 == 0, -9.0, a_param).astype(dtypes[3])
    steps = mx.arange(T)
    reset = mx.stack([(steps == 0) | (steps == T - 1), steps == T // 2])  # [B, T]
    h0 = mx.random.normal((B, L), key=keys[4])
    return dict(x=x, gate_x=gate_x, gate_a=gate_a, a_param=a_param, reset=reset, h0=h0)


def _difference(y: mx.array, h: mx.array, y_ops: mx.array, h_ops: mx.array) -> float:
    """The largest difference from the ops path, relative to each channel's largest |y| (NaN counts as inf)."""
    relative, absolute = _ROUNDING[y_ops.dtype]
    y, y_ops = y.astype(mx.float32), y_ops.astype(mx.float32)
    scale = mx.maximum(mx.abs(y_ops).max(axis=1), 1e-30)  # [B, L]
    y_err = mx.maximum(mx.abs(y - y_ops) - relative * mx.abs(y_ops) - absolute, 0.0).max(axis=1) / scale
    h_err = mx.abs(h - h_ops) / scale
    worst = mx.maximum(y_err.max(), h_err.max())
    return float(mx.where(mx.isnan(worst) | ~mx.isfinite(y).all() | ~mx.isfinite(h).all(), mx.inf, worst))


def run(path: str, build: Callable[[], dict[str, Callable]], dtypes: Dtypes) -> Result:
    """Build the kernels and run the check now; any exception is a failure (never raised)."""
    start = time.perf_counter()
    label = dtype_label(dtypes)
    case = problem(dtypes)
    y_ops, h_ops = rg_lru_ops(**case)
    failure = None
    for variant, chunks in VARIANTS.items():
        try:
            y, h = fused_scan(build(), **case, chunks=chunks)
            difference = _difference(y, h, y_ops, h_ops)
        except Exception as e:  # a compile error, a launch error: anything means the kernel cannot be trusted
            lines = str(e).strip().splitlines()
            failure = f"{label}, {variant}: {type(e).__name__}: {lines[0] if lines else 'no message'}"
            break
        if not difference <= TOLERANCE:
            failure = f"{label}, {variant}: differs from the ops path by {difference:.2g} of a channel's scale"
            break
    return Result(path, label, failure, cached=False, seconds=time.perf_counter() - start)


def device_name() -> str:
    """The default device as MLX names it (the GPU's model where there is one)."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return str(info.get("device_name") or platform.processor() or platform.machine())


def cache_file() -> Path:
    """Where self-check results are kept between processes."""
    return cache_dir() / CACHE_FILE


class Checks:
    """This process's self-check results, backed by the cache file; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._results: dict[tuple[str, str, str], Result] = {}

    def clear(self) -> None:
        with self._lock:
            self._results.clear()

    def get(self, path: str, source_id: str, build: Callable[[], dict[str, Callable]], dtypes: Dtypes) -> Result:
        """The check of `path`'s kernels (source digest `source_id`) on `dtypes`: remembered, read or run."""
        label = dtype_label(dtypes)
        with self._lock:
            key = (path, source_id, label)
            if key not in self._results:
                disk_key = f"{path} {source_id} | {label} | mlx {mx.__version__} | {device_name()}"
                stored = _read().get(disk_key)
                if isinstance(stored, dict) and "failure" in stored:
                    result = Result(path, label, stored["failure"], cached=True, seconds=0.0)
                else:
                    result = run(path, build, dtypes)
                    _write(disk_key, {"failure": result.failure, "when": time.strftime("%Y-%m-%d %H:%M:%S")})
                self._results[key] = result
            return self._results[key]

    def failures(self) -> dict[str, Result]:
        """The first failed check of each path in this process."""
        with self._lock:
            failed: dict[str, Result] = {}
            for result in self._results.values():
                if not result.ok:
                    failed.setdefault(result.path, result)
            return failed


def cached_entries() -> dict[str, dict]:
    """Everything the cache file remembers: key -> ``{"failure": text or None, "when": time}``."""
    return _read()


def _read() -> dict:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(key: str, value: dict) -> None:
    """Add one entry; a cache that cannot be written only means the check runs again next time."""
    file = cache_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read(), key: value}
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{CACHE_FILE}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, file)  # whole files only, even with processes checking at the same time
    except OSError:
        Path(tmp).unlink(missing_ok=True)
