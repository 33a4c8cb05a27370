"""Text generation: streaming, whole-text and batched, with chunked prefill and a fixed-size state.

The sampling settings are a `SamplingConfig` and the sampler is `Sampling` (both in sampling.py:
mlx-lm's logits processors and filters, a draw with an explicit random key, so seeds are
reproducible and never touch MLX's global random state). Prompt processing runs in chunks of
`prefill_step_size` tokens and evaluates only the state after each chunk, so a long prompt needs no
more memory than a short one; logits are computed for the last position only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .errors import RGError
from .sampling import GENERATE, Sampling, SamplingConfig, resolve
from .state import copy_state, eval_state, restore_state, state_bytes
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from mlx_lm.models.cache import ArraysCache

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
"""A prompt: text (`<bos>` added), token ids (used as given), or chat messages (Gemma's chat format)."""


class PrefillProgress(NamedTuple):
    """How far prompt processing has got: `done` of `total` prompt tokens, after `seconds`."""

    done: int
    total: int
    seconds: float

    @property
    def tps(self) -> float:
        """Prompt tokens per second so far (0 before the first chunk)."""
        return self.done / self.seconds if self.seconds > 0 else 0.0


PrefillCallback = Callable[[PrefillProgress], None]

@dataclass
class GenerationResponse:
    """One step of `stream_generate`.

    Attributes:
        text: the new piece of text (may be empty while a character or a possible stop
            string is held back).
        token: the token sampled at this step.
        finish_reason: None while generating, "stop" (end of turn, `<eos>` or a stop string)
            or "length" (`max_tokens` reached) on the last response.
        prompt_tokens: tokens in the prompt.
        prompt_tps: prompt tokens per second.
        prompt_time: seconds to process the prompt (time to the first token).
        generation_tokens: tokens generated so far.
        generation_tps: generated tokens per second.
        peak_memory: the most memory MLX's arrays have held so far, GB (`mx.get_peak_memory`, as in
            mlx-lm): its allocator's peak, not the process's resident memory (`rg_mlx.memory.rss_bytes`).
        state_bytes: bytes of the fixed-size state (constant once generation started).
    """

    text: str
    token: int
    finish_reason: str | None
    prompt_tokens: int
    prompt_tps: float
    prompt_time: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    state_bytes: int


# mlx_lm is imported on first use, not with rg_mlx: it imports transformers (and torch where
# installed), seconds that `rg-mlx --help` or `rg-mlx convert` should not pay.
@cache
def generation_stream() -> mx.Stream:
    """mlx-lm's generation stream (generation runs on it, as in mlx-lm)."""
    from mlx_lm.generate import generation_stream

    return generation_stream


def wired_limit(model: nn.Module, streams: list[mx.Stream]):
    """mlx-lm's context manager that wires the model's memory on Apple silicon."""
    from mlx_lm.generate import wired_limit

    return wired_limit(model, streams)


def feed(
    model: nn.Module,
    tokens: mx.array,
    cache: list[ArraysCache],
    step: int = 512,
    progress: PrefillCallback | None = None,
) -> mx.array:
    """Run `tokens` `[B, T]` through the model in chunks of `step`, updating `cache` in place.

    Only the state is evaluated after each chunk. Returns the logits `[B, V]` of the last
    position (lazy, unless `progress` is given).

    `progress`, if given, is called with a `PrefillProgress` before the first chunk (0 done) and
    after every chunk, the last one included (its logits are then evaluated here, so that the
    last call comes when the work is done). It runs on the calling thread, between chunks.
    """
    if step < 1:
        raise RGError(f"prefill_step_size={step}: must be >= 1")
    total = tokens.shape[1]
    starts = range(0, total, step)
    tic = time.perf_counter()
    if progress is not None:
        progress(PrefillProgress(0, total, 0.0))
    with mx.stream(generation_stream()):
        for start in starts[:-1]:
            model.model(tokens[:, start : start + step], cache)
            eval_state(cache)
            mx.clear_cache()
            if progress is not None:
                progress(PrefillProgress(start + step, total, time.perf_counter() - tic))
        hidden = model.model(tokens[:, starts[-1] :], cache)
        logits = model.logits(hidden[:, -1, :])
    if progress is not None:
        mx.eval(logits, [c.state for c in cache])
        progress(PrefillProgress(total, total, time.perf_counter() - tic))
    return logits


def generate_step(
    model: nn.Module,
    prompt: mx.array,
    cache: list[ArraysCache],
    sampling: Sampling,
    max_tokens: int,
    prefill_step_size: int = 512,
    prefill_progress: PrefillCallback | None = None,
) -> Iterator[mx.array]:
    """The token loop under `stream_generate` and `batch_generate`: yields the sampled tokens
    `[B]` (evaluated) of each step, for `prompt` ids `[B, T]` fed into `cache`
    (`prefill_progress`: see `feed`).

    On a GPU the next step is computed while the caller looks at the current token (as in
    mlx-lm); on the CPU that only adds thread hand-offs, so steps run one after the other.
    However this generator ends (exhausted, closed, or an exception), the state holds the
    prompt and every yielded token except the last one.
    """
    pipeline = mx.default_device().type == mx.DeviceType.gpu
    history = prompt[:, -sampling.context_size :] if sampling.processors else None

    def step(y: mx.array) -> mx.array:
        nonlocal history
        if history is not None:
            history = mx.concatenate([history, y[:, None]], axis=1)[:, -sampling.context_size :]
        with mx.stream(generation_stream()):
            return sampling(model(y[:, None], cache)[:, -1, :], history)

    def pending(y: mx.array) -> list:
        # Everything a step leaves lazy: nothing unevaluated may cross a `yield`, since the
        # consumer may resume this generator from another thread (with its own MLX streams).
        return [y, sampling.key, history, [c.state for c in cache]]

    y = sampling(feed(model, prompt, cache, prefill_step_size, prefill_progress), history)
    if pipeline:
        mx.async_eval(pending(y))
    next_y = None
    before_last = None  # the state before the last yielded token went in
    try:
        for n in range(1, max_tokens + 1):
            before = copy_state(cache)
            if pipeline and n < max_tokens:
                next_y = step(y)
                mx.async_eval(pending(next_y))
            mx.eval(y if pipeline else pending(y))
            before_last = before
            yield y
            if n == max_tokens:
                break
            if n % 256 == 0:
                mx.clear_cache()
            y = next_y if pipeline else step(y)
    finally:
        if before_last is not None:
            restore_state(cache, before_last)


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt, vocab_size: int) -> list[int]:
    """Token ids of a prompt: a string gets `<bos>` first, a list of ids is used as given, and a list
    of chat messages (`{"role", "content"}` dicts; a leading "system" message is folded into the first
    user turn) is put in Gemma's chat format by `Tokenizer.chat_tokens`, ending where the model replies."""
    if isinstance(prompt, str):
        if not prompt:
            raise RGError("empty prompt: give some text, token ids or chat messages")
        ids = tokenizer.encode(prompt)
    elif len(prompt) > 0 and isinstance(prompt[0], Mapping):
        messages, system = list(prompt), None
        if messages[0].get("role") == "system":
            system, messages = str(messages[0].get("content", "")), messages[1:]
        if not messages:
            raise RGError("chat prompt: a system message needs a user message after it")
        ids = tokenizer.chat_tokens(messages, system=system)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise RGError("empty prompt: give some text, token ids or chat messages")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RGError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


class _TextStream:
    """Detokenizes one sequence, holding back text that may be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.detokenizer = tokenizer.detokenizer()
        self.stop_ids = tokenizer.stop_ids
        self.stop = stop
        self.held = ""

    def add(self, token: int, last: bool) -> tuple[str, bool]:
        """Add a token (`last`: no more will come); return (text to emit, whether to stop)."""
        stopped = token in self.stop_ids
        if stopped:
            text = self.held + self.detokenizer.finalize()
        else:
            text = self.held + self.detokenizer.add_token(token)
            if last:
                text += self.detokenizer.finalize()
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.held = ""
            return text[: min(found)], True
        keep = 0
        if not (stopped or last):
            for s in self.stop:
                keep = max([keep] + [n for n in range(1, len(s)) if text.endswith(s[:n])])
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], stopped


def _stream(
    model: nn.Module,
    tokenizer: Tokenizer,
    ids: list[int],
    cache: list[ArraysCache],
    sampling: Sampling,
    prefill_step_size: int,
    prefill_progress: PrefillCallback | None,
) -> Iterator[GenerationResponse]:
    max_tokens = sampling.config.max_tokens
    text_stream = _TextStream(tokenizer, sampling.config.stop)
    tic = time.perf_counter()
    prompt_time = prompt_tps = 0.0
    prompt = mx.array([ids], dtype=mx.int32)
    steps = generate_step(model, prompt, cache, sampling, max_tokens, prefill_step_size, prefill_progress)
    with wired_limit(model, [generation_stream()]):
        try:
            for n, y in enumerate(steps, start=1):
                token = y.item()
                if n == 1:
                    prompt_time = time.perf_counter() - tic
                    prompt_tps = len(ids) / prompt_time
                    tic = time.perf_counter()
                text, stopped = text_stream.add(token, last=n == max_tokens)
                finish = "stop" if stopped else ("length" if n == max_tokens else None)
                elapsed = time.perf_counter() - tic
                yield GenerationResponse(
                    text=text,
                    token=token,
                    finish_reason=finish,
                    prompt_tokens=len(ids),
                    prompt_tps=prompt_tps,
                    prompt_time=prompt_time,
                    generation_tokens=n,
                    generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
                    peak_memory=mx.get_peak_memory() / 1e9,
                    state_bytes=state_bytes(cache),
                )
                if finish is not None:
                    break
        finally:
            steps.close()


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Prompt,
    *,
    sampling: SamplingConfig | None = None,
    cache: list[ArraysCache] | None = None,
    prefill_step_size: int = 512,
    prefill_progress: PrefillCallback | None = None,
    **settings: Any,
) -> Iterator[GenerationResponse]:
    """Generate text for `prompt`, one `GenerationResponse` per token.

    Args:
        model: a model from `rg_mlx.load` / `rg_mlx.load_model`.
        tokenizer: its `Tokenizer`.
        prompt: text, used as it is (`<bos>` is added; no chat format, as in mlx-lm's
            `stream_generate`); token ids, used as given; or chat messages
            (`[{"role": "user", "content": "Hi"}]`, optionally a "system" message first), put in
            Gemma's chat format (`Tokenizer.chat_tokens`) for instruction-tuned models.
        sampling: the sampling settings and limits (`max_tokens`, `stop`, `seed`, ...); default
            `SamplingConfig()`: greedy, 256 tokens.
        cache: a state to continue from (`model.make_cache()`), updated in place; when
            generation ends it holds the prompt and every generated token but the last.
        prefill_step_size: prompt tokens processed per chunk.
        prefill_progress: called with a `PrefillProgress` (tokens done, total, seconds) before
            the prompt's first chunk and after each chunk, so a caller can show how far a long
            prompt has got; it runs on the generating thread.
        **settings: a convenience: fields of `SamplingConfig` (`max_tokens=20, temperature=0.8,
            seed=0`) that replace those of `sampling`; the same tokens as passing the config.

    Generation stops at `<eos>`, `<end_of_turn>`, a stop string (never emitted), or `max_tokens`.
    Closing the iterator early is safe. Bad settings raise `RGError` before any work.
    """
    config = resolve(sampling, settings, GENERATE)
    if prefill_step_size < 1:
        raise RGError(f"prefill_step_size={prefill_step_size}: must be >= 1")
    vocab_size = model.args.vocab_size
    ids = prompt_ids(tokenizer, prompt, vocab_size)
    return _stream(
        model,
        tokenizer,
        ids,
        model.make_cache() if cache is None else cache,
        Sampling(config, vocab_size=vocab_size),
        prefill_step_size,
        prefill_progress,
    )


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: Prompt, **kwargs: Any) -> str:
    """The whole generated text; takes the arguments of `stream_generate` (a `sampling` config, or its fields)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def left_padded(model: nn.Module, rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[mx.array, list[ArraysCache]]:
    """Prompts of different lengths as one left-padded batch `[B, T]`, and a fresh state in which
    each row's document starts after its padding (so the padding never reaches it)."""
    width = max(len(r) for r in rows)
    padding = [width - len(r) for r in rows]
    tokens = mx.array([[pad_id] * p + list(r) for p, r in zip(padding, rows)], dtype=mx.int32)
    return tokens, model.make_cache(left_padding=padding)


def batch_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    *,
    sampling: SamplingConfig | None = None,
    prefill_step_size: int = 512,
    **settings: Any,
) -> list[str]:
    """Generate for several prompts at once; returns one text per prompt.

    Prompts of different lengths are left-padded; the padding never reaches the state
    (each row starts its document after its padding), so greedy output of every row equals
    what `generate` gives for that prompt alone. Arguments as in `stream_generate`: a
    `sampling` config and/or its fields as keyword arguments.
    """
    config = resolve(sampling, settings, GENERATE)
    if not prompts:
        return []
    vocab_size = model.args.vocab_size
    rows = [prompt_ids(tokenizer, p, vocab_size) for p in prompts]
    sampler = Sampling(config, vocab_size=vocab_size)
    tokens, cache = left_padded(model, rows, tokenizer.pad_id or 0)
    streams = [_TextStream(tokenizer, config.stop) for _ in rows]
    texts = [""] * len(rows)
    done = [False] * len(rows)
    max_tokens = config.max_tokens
    with wired_limit(model, [generation_stream()]):
        steps = generate_step(model, tokens, cache, sampler, max_tokens, prefill_step_size)
        try:
            for n, y in enumerate(steps, start=1):
                for i, token in enumerate(y.tolist()):
                    if not done[i]:
                        text, done[i] = streams[i].add(token, last=n == max_tokens)
                        texts[i] += text
                if all(done):
                    break
        finally:
            steps.close()
    return texts
