"""The RG-LRU scan behind one function, `rg_lru`, with one dispatch point.

Paths: ``"metal"`` (fused Metal kernel, Apple GPU), ``"cuda"`` (the same kernel through MLX's
CUDA backend), ``"ops"`` (portable MLX ops, every backend). ``auto`` picks the kernel of the
GPU when the default device is a GPU that has one, otherwise ``ops``. A single step (T = 1,
decode) always runs the compiled elementwise `rg_lru_step`, never a kernel launch. Force a path
with the ``path`` argument or the ``RG_MLX_SCAN`` environment variable
(``auto`` | ``ops`` | ``metal`` | ``cuda``). Kernels are only built when their path is chosen.

Before a process first runs a GPU path on a combination of input dtypes, the kernels check
themselves against the ops path (`rg_mlx.kernels.selfcheck`; remembered in the user cache
folder). Under ``auto`` a failure makes the process use the ops path from then on, with one
`KernelFallbackWarning` that names the failure and asks for `rg-mlx doctor`; a forced path
raises `RGError` instead. Every path is differentiable (the kernels' gradient is the ops path's).

Test hook: `use_kernels(path, build)` makes a GPU path available with stand-in kernels (for
instance the CPU emulation in tests/gpu_emulator.py, or a deliberately broken set), so the
dispatch, the self-check and the fallback are tested on machines without that GPU.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Callable

import mlx.core as mx

from rg_mlx.errors import RGError

from . import selfcheck
from .ops import check_inputs, linear_scan, rg_lru_ops, rg_lru_step
from .source import backend_kernels, fused_scan, source_hash, takes_dtypes

__all__ = [
    "KernelFallbackWarning",
    "available_paths",
    "linear_scan",
    "path_kernels",
    "rg_lru",
    "rg_lru_ops",
    "rg_lru_step",
    "select_path",
    "self_check",
    "use_kernels",
]

PATHS = ("ops", "metal", "cuda")
KernelSet = dict[str, Callable]  # kernel name -> object taking MLX's custom-kernel call


class KernelFallbackWarning(RuntimeWarning):
    """A GPU kernel path failed its self-check; the process uses the ops path instead."""


_lock = threading.Lock()
_injected: dict[str, tuple[Callable[[], KernelSet], str]] = {}  # path -> (build, source id)
_built: dict[str, KernelSet] = {}
_checks = selfcheck.Checks()
_warned: set[str] = set()


def _on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def available_paths() -> list[str]:
    """The scan paths that can run in this process (``ops`` always; a kernel when its GPU is the default device)."""
    paths = ["ops"]
    if (mx.metal.is_available() and _on_gpu()) or "metal" in _injected:
        paths.append("metal")
    if (hasattr(mx, "cuda") and mx.cuda.is_available() and _on_gpu()) or "cuda" in _injected:
        paths.append("cuda")
    return paths


def use_kernels(path: str, build: Callable[[], KernelSet] | None, *, source_id: str = "injected") -> None:
    """Test hook: run GPU path `path` with the kernels `build()` returns, as if its GPU were here.

    `build` returns stand-ins taking MLX's custom-kernel call (like `source.backend_kernels`);
    it may raise, or return kernels that raise or compute wrong values, as a broken GPU would.
    `source_id` stands in for the kernel source's digest in the self-check cache's key. `None`
    removes the stand-in. Either way this process forgets its self-check results and warnings.
    """
    if path not in PATHS[1:]:
        raise ValueError(f"use_kernels takes a GPU path ({', '.join(PATHS[1:])}), not {path!r}")
    with _lock:
        if build is None:
            _injected.pop(path, None)
        else:
            _injected[path] = (build, source_id)
        _built.pop(path, None)
        _warned.clear()
    _checks.clear()


def path_kernels(path: str) -> KernelSet:
    """The kernels of GPU path `path` (built once; a `use_kernels` stand-in where one is set), unchecked."""
    with _lock:
        if path not in _built:
            build = _injected[path][0] if path in _injected else lambda: backend_kernels(path)
            _built[path] = build()
        return _built[path]


def _source_id(path: str) -> str:
    return _injected[path][1] if path in _injected else source_hash(path)


def self_check(path: str, dtypes: tuple[mx.Dtype, ...] = (mx.float32,) * 4) -> selfcheck.Result:
    """The self-check of GPU path `path` on input dtypes (x, gate_x, gate_a, a_param): cached, read or run."""
    return _checks.get(path, _source_id(path), lambda: path_kernels(path), tuple(dtypes))


def select_path(path: str | None, *inputs: mx.array) -> str:
    """The scan path `rg_lru` picks for these inputs: `path`, else ``RG_MLX_SCAN``, else automatic (see
    above); a GPU path that fails its self-check later runs as ``ops``."""
    return _select_path(path, *inputs)[0]


def _select_path(path: str | None, *inputs: mx.array) -> tuple[str, bool]:
    """The path to run and whether it was forced (argument or environment) rather than chosen."""
    path = path or os.environ.get("RG_MLX_SCAN") or "auto"
    if path not in ("auto",) + PATHS:
        raise RGError(f"unknown RG-LRU scan path {path!r}: set RG_MLX_SCAN to one of auto, {', '.join(PATHS)}")
    available = available_paths()
    if path == "auto":
        return (available[-1] if takes_dtypes(*inputs) else "ops"), False  # the GPU's kernel, if any
    if path not in available:
        raise RGError(
            f"RG-LRU scan path {path!r} cannot run here (it needs its GPU as the default device): "
            f"set RG_MLX_SCAN to auto or one of {', '.join(available)}"
        )
    return path, True


def _checked_kernels(path: str, forced: bool, dtypes: tuple[mx.Dtype, ...]) -> KernelSet | None:
    """`path`'s kernels once they passed the self-check on `dtypes`; None to fall back; RGError if forced."""
    failed = _checks.failures().get(path) or self_check(path, dtypes)
    if failed.ok:
        return path_kernels(path)
    where = f" (remembered in {selfcheck.cache_file()})" if failed.cached else ""
    if forced:
        raise RGError(
            f"the {path} RG-LRU kernel failed its self-check{where}: {failed.failure}; "
            f"unset RG_MLX_SCAN (auto falls back to the ops path) and run `rg-mlx doctor`"
        )
    with _lock:
        first = path not in _warned
        _warned.add(path)
    if first:
        warnings.warn(
            f"the {path} RG-LRU kernel failed its self-check{where}: {failed.failure}. This process uses the "
            f"portable ops path instead (same results, slower prompts). Please run `rg-mlx doctor` and report "
            f"its output to rg_mlx's issue tracker.",
            KernelFallbackWarning,
            stacklevel=3,  # the caller of rg_lru
        )
    return None


def rg_lru(
    x: mx.array,
    gate_x: mx.array,
    gate_a: mx.array,
    a_param: mx.array,
    *,
    reset: mx.array | None = None,
    h0: mx.array | None = None,
    path: str | None = None,
) -> tuple[mx.array, mx.array]:
    """The RG-LRU of one layer: gate math and the linear recurrence, fused.

    Args:
        x: conv output `[B, T, L]` (model dtype).
        gate_x, gate_a: pre-activations of the input and recurrence gates, broadcastable to `[B, T, L]`.
        a_param: the recurrence parameter `[L]` (before softplus).
        reset: `[B, T]` bool (or broadcastable to it), True at a document start (state restarts, multiplier 1).
        h0: initial state `[B, L]` float32 (or broadcastable to it), or None for zeros.
        path: force a path (``"ops"``, ``"metal"``, ``"cuda"``); default from ``RG_MLX_SCAN`` or automatic.

    Returns:
        `y` `[B, T, L]` in `x.dtype` and the last state `[B, L]` in float32.
    """
    x, gate_x, gate_a, a_param, reset, h0 = check_inputs(x, gate_x, gate_a, a_param, reset, h0)
    path, forced = _select_path(path, x, gate_x, gate_a, a_param)
    if x.shape[1] == 1:
        return rg_lru_step(x, gate_x, gate_a, a_param, reset, h0)
    if path == "ops" or x.size == 0:
        return rg_lru_ops(x, gate_x, gate_a, a_param, reset, h0)
    kernels = _checked_kernels(path, forced, (x.dtype, gate_x.dtype, gate_a.dtype, a_param.dtype))
    if kernels is None:
        return rg_lru_ops(x, gate_x, gate_a, a_param, reset, h0)
    return fused_scan(kernels, x, gate_x, gate_a, a_param, reset, h0)
