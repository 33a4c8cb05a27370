"""CPU accelerations, applied to a built model by `accelerate` (the model itself never imports them).

On MLX's CPU backend a product with one row (a decode step) runs on one thread, elementwise
kernels run on one thread and evaluate `tanh`/`exp`/`sigmoid` one libm call at a time, and
attention is an unfused reference. `accelerate` keeps the model's math and changes how it runs:

- layers are swapped as `nn.quantize` swaps them. Where rg_mlx's native CPU products are loaded
  (`native`), every layer they take (`native_layers.takes`: bfloat16/float16 and 4/8-bit affine
  quantized `Linear` layers and the embedding, which is also the tied output layer) runs on them
  (`native_layers`); of the rest, `nn.Linear` -> `parallel.SplitLinear` and `nn.Embedding` ->
  `parallel.SplitEmbedding`, whose decode-sized products of large weights are split over one CPU
  stream per core where the BLAS runs them on one thread;
- entries of the model's `Ops` table are replaced by `rg_mlx.cpu.ops`: GELU gating and the soft cap
  as compiled polynomial math (`fast_math`), the RG-LRU's gate math likewise, a long prompt's
  elementwise passes and attention split over the CPU streams, and a still-filling attention ring
  read only up to its filled slots.

`rg_mlx.load` applies it when the model runs on the CPU; `RG_MLX_ACCELERATE=0` (or
`load(..., accelerate=False)`) keeps the plain model. The Linux BLAS and malloc settings are a
separate, process-wide part of the fast path (`rg_mlx._blas`, `RG_MLX_BLAS`).
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from ..errors import RGError

ENV_VAR = "RG_MLX_ACCELERATE"
M = TypeVar("M", bound=nn.Module)


def wanted(accelerate: bool | None = None) -> bool:
    """Whether to accelerate: `accelerate` if given, else ``RG_MLX_ACCELERATE`` (1/0), else when MLX's
    default device is the CPU."""
    if accelerate is not None:
        return accelerate
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    if value:
        raise RGError(f"{ENV_VAR}={value!r}: use 1 (on) or 0 (off), or unset it (on where MLX runs on the CPU)")
    return mx.default_device().type == mx.DeviceType.cpu


def swap_layers(model: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None]) -> int:
    """Replace leaf modules the way `nn.quantize` does: `replace(path, module)` returns the new module
    or None to keep it. Returns how many were replaced."""
    count = 0

    def visit(path: str, module: nn.Module) -> nn.Module:
        nonlocal count
        new = replace(path, module)
        if new is None:
            return module
        count += 1
        return new

    model.update_modules(tree_map_with_path(visit, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return count


def recast(module: nn.Module, cls: type[M]) -> M:
    """A module of class `cls` (a subclass changing only methods) holding `module`'s parameters (the same
    arrays) and settings, without running `cls.__init__` (which would make, or quantize, new weights)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.__dict__["_no_grad"] = set(module._no_grad)  # its own frozen-set: `freeze` on it must not touch `module`
    dict.update(new, module)
    return new


def accelerate(model: nn.Module, dtype: mx.Dtype | None = None, products: mx.Dtype | None = None) -> nn.Module:
    """Apply the CPU accelerations to a built `rg_mlx.Model` in place (see the module docstring); returns it.

    Args:
        model: the model, its weights loaded (which layers run on the native products depends on them).
        dtype: the compute dtype (the activations'), which an embedding kept narrower returns from its
            lookups; default: the dtype of the model's final norm, which the loader's dtype rule
            (`rg_mlx.loading.cast_parameters`) always casts to the compute dtype.
        products: the dtype the native layers' products take their activations in (rounded to it, the
            result returned in the activations' dtype; `rg_mlx.loading.bfloat16_products`); None: as they come.

    The logits stay those of the plain model (to float32 rounding; with `products`, to its rounding of each
    product's activations and result). Applying it twice changes nothing.
    """
    from . import native_layers, ops, parallel

    dtype = dtype or model.model.final_norm.weight.dtype

    def split(path: str, module: nn.Module) -> nn.Module | None:
        native = native_layers.native_layer(module, dtype)
        if native is not None:
            native.product_dtype = products
            return native
        if type(module) is nn.Linear:
            return recast(module, parallel.SplitLinear)
        if type(module) is nn.Embedding:
            return recast(module, parallel.SplitEmbedding)
        return None

    swap_layers(model, split)
    model.ops.gelu_gate = ops.gelu_gate
    model.ops.soft_cap = ops.soft_cap
    model.ops.attention = ops.attention
    model.ops.rg_lru = ops.rg_lru
    model.ops.ring = ops.filled_ring
    return model


def accelerated(model: nn.Module) -> bool:
    """Whether `accelerate` was applied to `model`."""
    from . import ops

    return model.ops.rg_lru is ops.rg_lru
