"""Layers that run their products on rg_mlx's native CPU products (`rg_mlx.cpu.native`), swapped into a
built model the way `nn.quantize` swaps (`rg_mlx.cpu.accelerate` does it; `swap_native_layers` alone).

Each replacement subclasses the layer it replaces and shares its parameter arrays under the same names,
so `load_weights`, `save_weights`, `freeze` and LoRA (which wraps `nn.Linear` / `nn.QuantizedLinear`)
see the same tree. What the products cannot take (float32 weights, other quantization modes or bit
widths, integer activations, or no extension) falls through to MLX's own operations.

`native_layer` is the one place that decides whether a layer runs on these products (`takes`); the
loader's dtype rule (`rg_mlx.loading.cast_parameters`) asks it which layers keep their stored weights.
A table kept narrower than the activations (a bfloat16 or quantized embedding in a float32 model) is
looked up in the activations' dtype.
"""

from __future__ import annotations

from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn

from . import native, recast, swap_layers

_FLOATS = (mx.float32, mx.bfloat16, mx.float16)
_HALVES = (mx.bfloat16, mx.float16)

L = TypeVar("L", bound=nn.Module)


def _dense_ok(weight: mx.array) -> bool:
    return weight.ndim == 2 and weight.dtype in _HALVES


def _quantized_ok(m: nn.Module) -> bool:
    return (
        getattr(m, "mode", "affine") == "affine"
        and m.bits in (4, 8)
        and m.group_size in (32, 64, 128)
        and m.get("biases") is not None
        and m["weight"].ndim == 2
        and m["scales"].dtype in _FLOATS
    )


def takes(m: nn.Module) -> bool:
    """Whether the native products can run layer `m` as it is (its class and weight dtype and format),
    leaving aside whether the extension is loaded: an `nn.Linear` or `nn.Embedding` with a bfloat16 or
    float16 weight, or their quantized forms in MLX's affine format with 4 or 8 bits."""
    if isinstance(m, _NATIVE):
        return True
    if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return _quantized_ok(m)
    if isinstance(m, (nn.Linear, nn.Embedding)):
        return _dense_ok(m["weight"])
    return False


def _cast(x: mx.array, dtype: mx.Dtype | None) -> mx.array:
    """`x` in `dtype` (None: as it is), without an operation where it already is."""
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def _dense_product(x: mx.array, weight: mx.array, product_dtype: mx.Dtype | None = None) -> mx.array:
    if x.dtype in _FLOATS and native.available():
        return _cast(native.matmul(_cast(x, product_dtype), weight), x.dtype)
    return x @ weight.T


def _quantized_product(m: nn.Module, x: mx.array) -> mx.array:
    if x.dtype in _FLOATS and native.available():
        xp = _cast(x, m.product_dtype)
        return _cast(native.quantized_matmul(xp, m["weight"], m["scales"], m["biases"], m.group_size, m.bits), x.dtype)
    return mx.quantized_matmul(x, m["weight"], scales=m["scales"], biases=m.get("biases"), transpose=True,
                               group_size=m.group_size, bits=m.bits, mode=getattr(m, "mode", "affine"))


class _ProductDtype:
    """A native layer whose products round their activations to `product_dtype` (None: take them as they come)
    and return the activations' dtype (`rg_mlx.cpu.accelerate(..., products=...)` sets it)."""

    product_dtype: mx.Dtype | None = None


class NativeLinear(_ProductDtype, nn.Linear):
    """`nn.Linear` with a bfloat16 or float16 weight `[out, in]`, on the native product."""

    @classmethod
    def from_module(cls, m: nn.Linear) -> NativeLinear:
        """A NativeLinear sharing `m`'s weight and bias."""
        return recast(m, cls)

    def __call__(self, x: mx.array) -> mx.array:
        y = _dense_product(x, self["weight"], self.product_dtype)
        return y + self["bias"] if "bias" in self else y


class NativeQuantizedLinear(_ProductDtype, nn.QuantizedLinear):
    """`nn.QuantizedLinear` (affine, 4 or 8 bits) on the native product."""

    @classmethod
    def from_module(cls, m: nn.QuantizedLinear) -> NativeQuantizedLinear:
        """A NativeQuantizedLinear sharing `m`'s weight, scales, biases and bias."""
        return recast(m, cls)

    def __call__(self, x: mx.array) -> mx.array:
        y = _quantized_product(self, x)
        return y + self["bias"] if "bias" in self else y


class _LookupDtype(_ProductDtype):
    """An embedding whose lookups return `lookup_dtype` (None: its table's or scales' dtype)."""

    lookup_dtype: mx.Dtype | None = None

    @classmethod
    def from_module(cls: type[L], m: nn.Module, lookup_dtype: mx.Dtype | None = None) -> L:
        """A `cls` sharing `m`'s table (and scales and biases), whose lookups return `lookup_dtype`."""
        new = recast(m, cls)
        new.lookup_dtype = lookup_dtype
        return new


class NativeEmbedding(_LookupDtype, nn.Embedding):
    """`nn.Embedding` with a bfloat16 or float16 table whose `as_linear` (a tied output layer) is native;
    its lookups return `lookup_dtype` (None: the table's)."""


    def __call__(self, x: mx.array) -> mx.array:
        return _cast(super().__call__(x), self.lookup_dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return _dense_product(x, self["weight"], self.product_dtype)


class NativeQuantizedEmbedding(_LookupDtype, nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` (affine, 4 or 8 bits) whose `as_linear` (a tied output layer) is native; its
    lookups return `lookup_dtype` (None: the scales')."""


    def __call__(self, x: mx.array) -> mx.array:
        # Dequantized in the lookup dtype: with scales narrower than it, MLX's would round each row to theirs.
        dtype = self.lookup_dtype or self["scales"].dtype
        return mx.dequantize(self["weight"][x], self["scales"][x].astype(dtype), self["biases"][x].astype(dtype),
                             group_size=self.group_size, bits=self.bits, mode=self.mode)

    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized_product(self, x)


_NATIVE = (NativeLinear, NativeQuantizedLinear, NativeEmbedding, NativeQuantizedEmbedding)


def native_layer(m: nn.Module, lookup_dtype: mx.Dtype | None = None) -> nn.Module | None:
    """`m`'s native replacement, or None where it has none (already native, float32, other formats, or the
    native products unavailable). An embedding's lookups return `lookup_dtype` (None: its table's)."""
    if isinstance(m, _NATIVE) or not takes(m) or not native.available():
        return None
    if isinstance(m, nn.QuantizedLinear):
        return NativeQuantizedLinear.from_module(m)
    if isinstance(m, nn.QuantizedEmbedding):
        return NativeQuantizedEmbedding.from_module(m, lookup_dtype)
    if isinstance(m, nn.Linear):
        return NativeLinear.from_module(m)
    return NativeEmbedding.from_module(m, lookup_dtype)


def swap_native_layers(model: nn.Module, lookup_dtype: mx.Dtype | None = None) -> int:
    """Swap every eligible leaf layer of `model` for its native replacement, in place (as `nn.quantize`
    does); returns how many were swapped (0 where the native products are unavailable). Embedding
    lookups return `lookup_dtype` (None: the table's)."""
    return swap_layers(model, lambda _path, m: native_layer(m, lookup_dtype))
