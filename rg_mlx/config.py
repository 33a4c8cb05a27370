"""Model configuration: parsed from every spelling of a RecurrentGemma `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import RGError

MODEL_TYPE = "recurrent_gemma"
BLOCK_TYPES = ("recurrent", "attention")


@dataclass
class ModelArgs:
    """Griffin hyper-parameters, named as in Hugging Face's `config.json`.

    `intermediate_size` is Hugging Face's: twice the MLP hidden width.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    block_types: list[str]
    num_key_value_heads: int = 1
    lru_width: int | None = None
    attention_window_size: int = 2048
    conv1d_width: int = 4
    logits_soft_cap: float = 30.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    embeddings_scale_by_sqrt_dim: bool = True
    model_type: str = MODEL_TYPE
    quantization: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.lru_width is None:
            self.lru_width = self.hidden_size
        self.block_types = list(self.block_types)
        bad = sorted(set(self.block_types) - set(BLOCK_TYPES))
        if bad or not self.block_types:
            raise RGError(f"config: block types must be 'recurrent' or 'attention', got {self.block_types}")
        for name, value in (("hidden_size", self.hidden_size), ("lru_width", self.lru_width)):
            if value % self.num_attention_heads:
                raise RGError(
                    f"config: {name}={value} is not divisible by num_attention_heads={self.num_attention_heads}"
                )
        if self.intermediate_size % 2:
            raise RGError(f"config: intermediate_size={self.intermediate_size} must be even (2 x MLP width)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise RGError("config: num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    @property
    def layer_types(self) -> list[str]:
        """The block type of every layer (the pattern repeats)."""
        p = self.block_types
        return [p[i % len(p)] for i in range(self.num_hidden_layers)]

    def split_problem(self, ranks: int) -> str | None:
        """Why the model cannot be split over `ranks` ranks by `Model.shard`, or None if it can.

        Each rank takes whole heads (RG-LRU and query heads, and key/value heads unless there is
        one), an equal part of the MLP, and in a quantized model whole quantization groups of the
        layers it splits by input (MLP down, recurrent and attention outputs).
        """
        split_by_input = {"the MLP width": self.mlp_width, "lru_width": self.lru_width, "hidden_size": self.hidden_size}
        group = (self.quantization or {}).get("group_size")
        if self.num_attention_heads % ranks:
            return f"num_attention_heads={self.num_attention_heads} is not divisible by {ranks}"
        if self.num_key_value_heads > 1 and self.num_key_value_heads % ranks:
            return f"num_key_value_heads={self.num_key_value_heads} is not divisible by {ranks}"
        for name, width in split_by_input.items():
            if width % ranks:
                return f"{name} ({width}) is not divisible by {ranks}"
            # Layers whose input width the group size divides are the quantized ones (convert's and mlx-lm's rule).
            if group and width % group == 0 and (width // ranks) % group:
                return f"{name} / {ranks} = {width // ranks} is not a whole number of quantization groups of {group}"
        return None

    def check_split(self, ranks: int) -> None:
        """Raise `RGError` (one line, with the rank counts that work) unless `split_problem(ranks)` is None."""
        problem = self.split_problem(ranks) if ranks > 1 else None
        if problem:
            fits = [str(n) for n in range(2, self.num_attention_heads + 1) if self.split_problem(n) is None]
            hint = f"use {' or '.join(fits)} ranks" if fits else "it runs in one process only"
            raise RGError(f"cannot split the model over {ranks} ranks: {problem} ({hint})")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Parse a `config.json` dict, accepting every spelling in use (HF 2B/9B hub, transformers 5, mlx-lm)."""
        c = dict(config)
        model_type = c.get("model_type")
        if model_type != MODEL_TYPE:
            raise RGError(
                f"config: model_type is {model_type!r}, expected {MODEL_TYPE!r}: this is not a RecurrentGemma checkpoint"
            )
        if "block_types" not in c and "_block_types" in c:
            c["block_types"] = c["_block_types"]
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if isinstance(rope, dict):
            c.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            c.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "block_types"]
        missing = [k for k in required if c.get(k) is None]
        if missing:
            raise RGError(f"config: missing {', '.join(missing)}")
        if c.get("num_key_value_heads") is None:
            c["num_key_value_heads"] = 1
        if c.get("logits_soft_cap") is None:
            c["logits_soft_cap"] = 0.0
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in c.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The normalised `config.json` (one spelling, readable by rg_mlx, mlx-lm and transformers)."""
        d = dataclasses.asdict(self)
        if d["quantization"] is None:
            d.pop("quantization")
        d["head_dim"] = self.head_dim
        d["attention_bias"] = False
        d["hidden_activation"] = "gelu_pytorch_tanh"
        d["tie_word_embeddings"] = True
        d["architectures"] = ["RecurrentGemmaForCausalLM"]
        return d


def preset(name: str, vocab_size: int = 256000) -> ModelArgs:
    """The released configurations: ``"2b"`` and ``"9b"``."""
    presets = {
        "2b": dict(hidden_size=2560, intermediate_size=2 * 7680, num_hidden_layers=26, num_attention_heads=10),
        "9b": dict(hidden_size=4096, intermediate_size=2 * 12288, num_hidden_layers=38, num_attention_heads=16),
    }
    key = name.lower().removeprefix("recurrentgemma-")
    if key not in presets:
        raise RGError(f"unknown preset {name!r}: use one of {', '.join(presets)}")
    return ModelArgs(
        vocab_size=vocab_size,
        block_types=["recurrent", "recurrent", "attention"],
        attention_window_size=2048,
        logits_soft_cap=30.0,
        **presets[key],
    )
