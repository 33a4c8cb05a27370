"""Sampling settings and the sampler.

`SamplingConfig` is the one owner of the sampling settings: their defaults, their valid ranges and
their checks. Every entry point builds or checks one: the Python API (`generate`, `stream_generate`,
`batch_generate`, `ChatSession`), the CLI flags of `rg-mlx generate` and `rg-mlx chat` (built from
`SETTINGS`), chat's `/set NAME VALUE` (`SamplingConfig.with_text`) and the app's settings panel.
Entry points whose defaults differ start from a named preset (`PRESETS`).

`Sampling` turns logits into tokens under a config: mlx-lm's logits processors and filters, then a
draw with an explicit random key.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import mlx.core as mx

from .errors import RGError

_OFF_WORDS = ("none", "off")  # what text may say for None (a field that allows it)


class SamplingError(RGError):
    """A bad sampling setting: `name` (the field), the `value` given and the `reason` it is bad."""

    def __init__(self, name: str, value: Any, reason: str):
        super().__init__(f"{name}={value!r}: {reason}")
        self.name, self.value, self.reason = name, value, reason


@dataclass(frozen=True)
class Setting:
    """What an entry point needs to know about one field of `SamplingConfig`.

    Attributes:
        name: the field (and keyword argument) name.
        default: the field's default.
        kind: `int`, `float` or `str`; `many` fields hold a tuple of `kind`.
        flags: the CLI flags, spelled as in mlx-lm.
        help: one line of help.
        low, high: the ends of the valid range (None: unbounded); `low_open` / `high_open`: that
            end itself is outside it.
        note: what a special value means ("0 is greedy"), for help and error messages.
        nullable: None is a valid value (text spells it `none` or `off`).
        many: the field holds several values (a tuple); a single value is accepted too.
    """

    name: str
    default: Any
    kind: type
    flags: tuple[str, ...]
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""
    nullable: bool = False
    many: bool = False

    @property
    def range(self) -> str:
        """The valid range in words: `>= 0`, `in (0, 1]`, ..."""
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "any value"

    def expects(self) -> str:
        """What a valid value looks like: `a number >= 0 (0 is greedy)`."""
        if self.many:
            return "text (given once or more)"
        what = "a whole number" if self.kind is int else "a number"
        return f"{what} {self.range}" + (f" ({self.note})" if self.note else "")

    def check(self, value: Any) -> Any:
        """`value` in this field's type (int, float, tuple of str or None); SamplingError if it is not valid."""
        if value is None:
            if self.nullable:
                return None
            if self.many:
                return ()
            raise SamplingError(self.name, value, f"needs a value: {self.expects()}")
        if self.many:
            items = (value,) if isinstance(value, str) else value
            try:
                items = tuple(items)
            except TypeError:
                raise SamplingError(self.name, value, f"must be {self.expects()}") from None
            if not all(isinstance(s, str) for s in items):
                raise SamplingError(self.name, value, "must be strings")
            return tuple(s for s in items if s)  # an empty stop string would stop at once
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise SamplingError(self.name, value, f"must be {self.expects()}")
        if self.kind is int:
            if not isinstance(value, numbers.Integral):
                if not (math.isfinite(value) and float(value).is_integer()):
                    raise SamplingError(self.name, value, f"must be {self.expects()}")
            number = int(value)
        else:
            number = float(value)
            if not math.isfinite(number):
                raise SamplingError(self.name, value, f"must be {self.expects()}")
        too_low = self.low is not None and (number < self.low or (self.low_open and number == self.low))
        too_high = self.high is not None and (number > self.high or (self.high_open and number == self.high))
        if too_low or too_high:
            raise SamplingError(self.name, value, f"must be {self.range}" + (f" ({self.note})" if self.note else ""))
        return number

    def parse(self, text: str) -> Any:
        """The value that `text` spells (`none`/`off` for None); SamplingError if it is not one.

        For a `many` field the text is one value; empty, `none` or `off` give none at all.
        """
        word = text.strip()
        if self.many:
            return () if word.lower() in ("", *_OFF_WORDS) else (text,)
        if word.lower() in _OFF_WORDS and self.nullable:
            return None
        try:
            # A whole number stays exact (seeds up to 2**64); anything else is checked as a float.
            return int(word) if self.kind is int and word.lstrip("+-").isdigit() else float(word)
        except (ValueError, OverflowError):
            raise SamplingError(self.name, text, f"not {self.expects()}") from None


def _number(x: float | None) -> str:
    if x is None:
        return ""
    if x >= 2**32 and math.log2(x).is_integer():
        return f"2**{int(math.log2(x))}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _field(default: Any, kind: type, flags: tuple[str, ...], help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"kind": kind, "flags": flags, "help": help, **spec})


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to pick the generated tokens, and when to stop. Frozen; every field is checked on construction.

    Args (all keyword-only; the defaults are those of `rg-mlx generate` and `stream_generate`):
        temperature: 0 is greedy.
        top_p: nucleus filtering, in (0, 1] (1 disables it).
        top_k: keep the k most likely tokens (0 disables it); must also be below the vocabulary
            size, which `check_vocab` tests once the model is known.
        min_p: drop tokens less likely than `min_p` times the most likely one (0 disables it).
        repetition_penalty: mlx-lm's penalty for recently seen tokens, > 0 (None or 1 disables it).
        repetition_context_size: how many recent tokens the penalty looks at.
        max_tokens: the most tokens to generate.
        seed: the random key's seed, in [0, 2**64); None draws one. The same seed gives the same
            tokens in any process, without touching MLX's global random state.
        stop: strings that end generation (never emitted); a single string or any sequence of
            them is accepted and stored as a tuple.

    Raises `SamplingError` (an `RGError`) naming the first bad field, its value and the valid range.
    """

    temperature: float = _field(0.0, float, ("--temp", "--temperature"), "sampling temperature", low=0,
                                note="0 is greedy")
    top_p: float = _field(1.0, float, ("--top-p",), "nucleus sampling threshold", low=0, high=1, low_open=True,
                          note="1 disables it")
    top_k: int = _field(0, int, ("--top-k",), "sample from the k most likely tokens", low=0, note="0 disables it")
    min_p: float = _field(0.0, float, ("--min-p",), "min-p filtering", low=0, high=1, note="0 disables it")
    repetition_penalty: float | None = _field(None, float, ("--repetition-penalty",),
                                              "penalty for recently seen tokens (e.g. 1.1)", low=0, low_open=True,
                                              nullable=True, note="none or 1 disables it")
    repetition_context_size: int = _field(20, int, ("--repetition-context-size",),
                                          "tokens the repetition penalty looks at", low=1)
    max_tokens: int = _field(256, int, ("-m", "--max-tokens"), "most tokens to generate", low=1)
    seed: int | None = _field(None, int, ("--seed",), "random seed: same seed, same output", low=0, high=2**64,
                              high_open=True, nullable=True, note="none draws one")
    stop: tuple[str, ...] = _field((), str, ("--stop",), "stop when this text appears (repeatable)", many=True)

    def __post_init__(self) -> None:
        for setting in SETTINGS.values():
            object.__setattr__(self, setting.name, setting.check(getattr(self, setting.name)))

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with `changes` applied (checked like a new config); RGError for an unknown name."""
        _known(changes)
        return dataclasses.replace(self, **changes) if changes else self

    def with_text(self, name: str, text: str) -> SamplingConfig:
        """A copy with setting `name` set from `text` (as typed after chat's `/set NAME`)."""
        _known([name])
        return self.replace(**{name: SETTINGS[name].parse(text)})

    def check_vocab(self, vocab_size: int) -> None:
        """The checks that need the model: `top_k` must be below the vocabulary size."""
        if self.top_k >= vocab_size:
            raise SamplingError("top_k", self.top_k, f"must be < the vocabulary size, {vocab_size} (0 disables it)")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (stop strings as a list); `SamplingConfig(**d)` reads it back."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        return d

    @property
    def penalty(self) -> float | None:
        """The repetition penalty to apply, None when it is off (None or 1)."""
        return None if self.repetition_penalty in (None, 1.0) else self.repetition_penalty


def _known(names) -> None:
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise RGError(f"unknown sampling setting {unknown[0]!r}: use {', '.join(SETTINGS)}")


def resolve(sampling: SamplingConfig | None, settings: dict[str, Any], default: SamplingConfig) -> SamplingConfig:
    """What an API call that takes `sampling=` and keyword `settings` means: `sampling` (or `default`)
    with `settings` applied on top, checked."""
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise RGError(f"sampling={sampling!r}: must be a SamplingConfig (or pass its fields as keyword arguments)")
    return (sampling or default).replace(**settings)


SETTINGS: dict[str, Setting] = {
    f.name: Setting(name=f.name, default=f.default, **f.metadata) for f in dataclasses.fields(SamplingConfig)
}
"""Every field of `SamplingConfig`, in order, with what the CLI, `/set` and the app need to know about it."""

GENERATE = SamplingConfig()
"""`rg-mlx generate`, `generate`, `stream_generate`, `batch_generate`."""
CHAT = SamplingConfig(max_tokens=512)
"""`rg-mlx chat` and `ChatSession`."""
APP = SamplingConfig(max_tokens=512, temperature=0.7, top_p=0.95, top_k=64)
"""The web app's settings panel."""
PRESETS: dict[str, SamplingConfig] = {"generate": GENERATE, "chat": CHAT, "app": APP}


class Sampling:
    """Turns logits into tokens under a `SamplingConfig`: mlx-lm's logits processors and filters, then a draw.

    Draws use an explicit `mx.random` key advanced at every step, so a seeded generation gives
    the same tokens in any process or thread and leaves MLX's global random state alone.

    Args:
        config: the settings (default `SamplingConfig()`); `max_tokens` and `stop` are the caller's
            to apply (`generate_step` takes `max_tokens`).
        vocab_size: the model's vocabulary size (bounds `top_k`).
        **settings: a convenience: fields of `SamplingConfig` that replace those of `config`
            (`Sampling(vocab_size=V, temperature=0.0)`).
    """

    def __init__(self, config: SamplingConfig | None = None, *, vocab_size: int, **settings: Any):
        config = resolve(config, settings, GENERATE)
        config.check_vocab(vocab_size)
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

        self.config = config
        self.temperature = config.temperature
        # The filter chain of mlx-lm's `make_sampler`, in its order.
        self.filters = []
        if config.top_p < 1:
            self.filters.append(partial(apply_top_p, top_p=config.top_p))
        if config.min_p > 0:
            self.filters.append(partial(apply_min_p, min_p=config.min_p))
        if config.top_k > 0:
            self.filters.append(partial(apply_top_k, top_k=config.top_k))
        self.processors = make_logits_processors(
            repetition_penalty=config.penalty, repetition_context_size=config.repetition_context_size
        )
        self.context_size = config.repetition_context_size
        seed = config.seed
        if seed is None:
            seed = mx.random.randint(0, 2**31 - 1, ()).item()
        self.key = mx.random.key(seed)
        mx.eval(self.key)

    def __call__(self, logits: mx.array, history: mx.array | None) -> mx.array:
        """Tokens `[B]` for `logits` `[B, V]`; `history` `[B, n]`: each row's recent tokens."""
        if self.processors and history is not None:
            rows = []
            for b in range(logits.shape[0]):
                row = logits[b : b + 1]
                for processor in self.processors:
                    row = processor(history[b], row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        if self.temperature == 0:
            return mx.argmax(logits, axis=-1)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for f in self.filters:
            logprobs = f(logprobs)
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1 / self.temperature), key=key)
