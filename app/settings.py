"""The settings panel's values and `SamplingConfig`, both ways.

The panel shows some of `SamplingConfig`'s fields (`PANEL`, in the order of its controls); their
defaults are the `app` preset, their ranges come from `rg_mlx.sampling.SETTINGS` (a slider needs two
finite ends, so where the config's range is open or unbounded `SLIDERS` picks the end), and every
value is checked by `SamplingConfig`. Two controls need a value for None: the seed box says -1
(any negative number: draw a seed) and the repetition penalty slider 1.0 (off).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

from rg_mlx.errors import RGError
from rg_mlx.sampling import APP, SETTINGS, SamplingConfig

PANEL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed")
LABELS = {
    "temperature": "Temperature", "top_p": "Top-p", "top_k": "Top-k", "min_p": "Min-p",
    "repetition_penalty": "Repetition penalty", "max_tokens": "Max new tokens", "seed": "Seed",
}
# The slider ends the config leaves open (exclusive or unbounded), and each slider's step.
SLIDERS: dict[str, dict[str, Any]] = {
    "temperature": dict(maximum=2, step=0.05),
    "top_p": dict(minimum=0.05, step=0.01),
    "top_k": dict(maximum=200, step=1),
    "min_p": dict(step=0.01),
    "repetition_penalty": dict(minimum=1, maximum=2, step=0.01, info="1 disables it"),  # the slider has no none
    "max_tokens": dict(maximum=8192, step=1),
}
RANDOM_SEED = -1  # the seed box's value for "draw a seed"
NO_PENALTY = 1.0  # the repetition penalty slider's value for "off"


def slider(name: str) -> dict[str, Any]:
    """`gr.Slider` keyword arguments for the field `name`: range, step, default, label and info."""
    s = SETTINGS[name]
    spec = dict(minimum=s.low, maximum=s.high, value=to_panel(APP)[name], label=LABELS[name])
    spec.update(SLIDERS[name])
    if s.note:
        spec["info"] = s.note
    return spec


def to_config(values: Sequence[Any], base: SamplingConfig = APP) -> SamplingConfig:
    """The config the panel's `values` (in `PANEL` order) ask for, on top of `base`; RGError if one is bad."""
    if len(values) != len(PANEL):
        raise RGError(f"expected {len(PANEL)} settings ({', '.join(PANEL)}), got {len(values)}")
    settings = dict(zip(PANEL, values))
    seed, penalty = settings["seed"], settings["repetition_penalty"]
    if seed is None or (isinstance(seed, Real) and not isinstance(seed, bool) and seed < 0):
        settings["seed"] = None
    if penalty == NO_PENALTY:
        settings["repetition_penalty"] = None
    return base.replace(**settings)


def to_panel(config: SamplingConfig) -> dict[str, Any]:
    """The panel's values for `config`, `{name: value}` in `PANEL` order (what an export records)."""
    values = {name: getattr(config, name) for name in PANEL}
    if values["seed"] is None:
        values["seed"] = RANDOM_SEED
    if values["repetition_penalty"] is None:
        values["repetition_penalty"] = NO_PENALTY
    return values


def from_saved(saved: Mapping[str, Any], base: SamplingConfig = APP) -> tuple[SamplingConfig, list[str]]:
    """The config of an exported conversation's settings (`to_panel`'s form), and the names of those
    that were not valid (each left as in `base`)."""
    config, bad = base, []
    for name in PANEL:
        if name in saved:
            values = {**to_panel(config), name: saved[name]}
            try:
                config = to_config(list(values.values()), config)
            except RGError:
                bad.append(name)
    return config, bad
