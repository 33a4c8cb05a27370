"""Quantization, in one place: the spec (mode, bits, group size), which layers it covers, how a weight is
packed, how it is stored in `config.json`, and applying it to a built model.

The converter writes packed weights with it and the loader rebuilds the same layers from it, so the two
cannot disagree. The layers follow mlx-lm's rule: every `Linear` and `Embedding` (the embedding stays the
tied output layer) whose input width the group size divides; the block-diagonal RG-LRU gates, the conv and
the norms stay in floating point. `config.json` holds the spec as mlx-lm writes it, under both
`quantization` and `quantization_config`, with optional per-layer entries (a layer path mapped to its own
spec, or to false for a layer left unquantized).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn

from .errors import RGError

# What MLX's `mx.quantize` accepts, per mode: (bits, group sizes), and the defaults (bits, group size) that
# `nn.quantize` fills in. MLX 0.32 has no API that lists them; tests/test_quant.py checks this table against
# `mx.quantize` itself, so an MLX that changes them fails there.
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "affine": ((1, 2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "mxfp8": ((8,), (32,)),
    "nvfp4": ((4,), (16,)),
}
DEFAULTS: dict[str, tuple[int, int]] = {"affine": (4, 64), "mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
# The keys of one spec in config.json; any other key whose value is a dict or a bool is a per-layer entry.
_SPEC_KEYS = ("mode", "bits", "group_size")


def _listing(values: tuple) -> str:
    return ", ".join(map(str, values))


@dataclass(frozen=True)
class QuantSpec:
    """One quantization: `mode` (``"affine"``, ``"mxfp4"``, ``"mxfp8"``, ``"nvfp4"``), `bits` per weight and
    `group_size` (weights sharing one scale); None takes MLX's default for the mode. Validated on creation:
    a combination MLX cannot quantize raises `RGError`."""

    mode: str = "affine"
    bits: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RGError(f"unsupported quantization mode {self.mode!r}: use one of {_listing(tuple(MODES))}")
        bits, group_sizes = MODES[self.mode]
        default_bits, default_group = DEFAULTS[self.mode]
        object.__setattr__(self, "bits", default_bits if self.bits is None else self.bits)
        object.__setattr__(self, "group_size", default_group if self.group_size is None else self.group_size)
        if self.bits not in bits:
            raise RGError(f"unsupported quantization bits {self.bits} for mode {self.mode}: use {_listing(bits)}")
        if self.group_size not in group_sizes:
            raise RGError(
                f"unsupported quantization group size {self.group_size} for mode {self.mode}: "
                f"use {_listing(group_sizes)}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantSpec":
        """A spec from its config.json entry (missing keys take MLX's defaults, as `nn.quantize` does)."""
        try:
            return cls(str(d.get("mode", "affine")), _int(d.get("bits")), _int(d.get("group_size")))
        except (TypeError, ValueError):
            raise RGError(f"config: unreadable quantization entry {dict(d)}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config.json entry (mlx-lm's keys)."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    @property
    def has_biases(self) -> bool:
        """Whether packed weights carry `biases` beside `scales` (affine only; the fp modes have none)."""
        return self.mode == "affine"

    def describe(self) -> str:
        """E.g. ``"4-bit affine, group size 64"``."""
        return f"{self.bits}-bit {self.mode}, group size {self.group_size}"

    def fits(self, module: nn.Module) -> bool:
        """Whether `module` is quantized under this spec: a layer MLX can quantize (`Linear`, `Embedding`)
        whose input width the group size divides (mlx-lm's rule)."""
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % self.group_size == 0

    def packed_shapes(self, layer: str, shape: tuple[int, ...], dtype: mx.Dtype) -> list[tuple[str, tuple, mx.Dtype]]:
        """The tensors that replace `layer`'s weight of `shape` (`[*rows, in]`) once quantized, as (name, shape,
        dtype): `weight` (uint32 words), `scales` (the weight's dtype for affine, 8-bit exponents otherwise),
        and for affine `biases`. A layer's own `bias` is unchanged."""
        *rows, cols = shape
        groups = (*rows, cols // self.group_size)
        out = [(f"{layer}.weight", (*rows, cols * self.bits // 32), mx.uint32)]
        out.append((f"{layer}.scales", groups, dtype if self.has_biases else mx.uint8))
        if self.has_biases:
            out.append((f"{layer}.biases", groups, dtype))
        return out

    def quantize(self, layer: str, weight: mx.array) -> dict[str, mx.array]:
        """The packed tensors of `layer`'s `weight`, named as `packed_shapes` names them."""
        parts = mx.quantize(weight, self.group_size, self.bits, mode=self.mode)
        leaves = ("weight", "scales", "biases") if self.has_biases else ("weight", "scales")
        return {f"{layer}.{leaf}": a for leaf, a in zip(leaves, parts)}


def _int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(value)
    return int(value)


@dataclass(frozen=True)
class Quantization:
    """A model's quantization as stored in config.json: the spec of every quantized layer, and per-layer
    entries that override it (`None`: the layer stays unquantized)."""

    spec: QuantSpec
    layers: Mapping[str, QuantSpec | None] = field(default_factory=dict)

    def to_config(self) -> dict[str, Any]:
        """The config.json keys: mlx-lm writes the same dict as `quantization` and `quantization_config`."""
        entry: dict[str, Any] = self.spec.to_dict()
        entry.update({path: s.to_dict() if s else False for path, s in sorted(self.layers.items())})
        return {"quantization": entry, "quantization_config": dict(entry)}


def read(config: Mapping[str, Any]) -> Quantization | None:
    """The quantization of a parsed config.json, or None for a floating-point model.

    Reads `quantization`, else an MLX-style `quantization_config` (mlx-lm writes both); another library's
    `quantization_config` (one with a `quant_method`, such as AWQ or GPTQ) raises `RGError`.
    """
    entry = config.get("quantization")
    if entry is None:
        entry = config.get("quantization_config")
        if isinstance(entry, Mapping) and "quant_method" in entry:
            raise RGError(
                f"config: quantization_config quant_method {entry['quant_method']!r} is not MLX quantization: "
                "convert the original floating-point checkpoint (rg-mlx convert -q quantizes it)"
            )
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise RGError(f"config: quantization must be an object like {QuantSpec().to_dict()}, got {entry!r}")
    spec = QuantSpec.from_dict(entry)
    layers: dict[str, QuantSpec | None] = {}
    for key, value in entry.items():
        if key in _SPEC_KEYS or not isinstance(value, (Mapping, bool)):
            continue  # the spec itself, or other metadata
        if isinstance(value, Mapping):
            layers[key] = QuantSpec.from_dict(value)
        else:
            layers[key] = spec if value else None
    return Quantization(spec, layers)


def quantized_layers(model: nn.Module, spec: QuantSpec) -> set[str]:
    """The paths of the layers of a built (floating-point) model that `spec` quantizes."""
    return {path for path, m in model.named_modules() if spec.fits(m)}


def apply(model: nn.Module, quantization: Quantization, weights: Mapping[str, mx.array]) -> None:
    """Swap the layers of a built model for quantized ones, in place, before its weights are loaded.

    A layer is quantized where its per-layer entry says so, or, without one, where `weights` hold its
    `scales` (as mlx-lm's loader decides); each with its own spec, the stored mode included.
    """
    def predicate(path: str, module: nn.Module) -> dict[str, Any] | bool:
        if not hasattr(module, "to_quantized"):
            return False
        if path in quantization.layers:
            spec = quantization.layers[path]
        else:
            spec = quantization.spec if f"{path}.scales" in weights else None
        if spec is None:
            return False
        if not spec.fits(module):
            raise RGError(
                f"config: layer {path} is quantized with group size {spec.group_size}, which does not divide "
                f"its input width {module.weight.shape[-1]}"
            )
        return spec.to_dict()

    nn.quantize(model, class_predicate=predicate)
