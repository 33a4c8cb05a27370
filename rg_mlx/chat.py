"""Chat sessions over Griffin's fixed-size state.

A session keeps the model state of the conversation so far and feeds only the new tokens of
each turn, so a reply costs the same at turn 100 as at turn 1 and memory never grows. Undo and
regenerate restore per-turn snapshots of the state (references to its immutable arrays, so a
snapshot costs one state's memory and no copy); beyond the bounded snapshot history they
re-feed the recorded conversation tokens.

The state always equals the recorded conversation's tokens, except for at most one token at
the end: the last token of a reply that was cut short (length limit, stop string, or the
consumer closing the stream), which the next turn feeds first. A reply that ends with
`<end_of_turn>` or `<eos>` is closed by the next turn's `<end_of_turn>\\n` prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import RGError
from .generate import GenerationResponse, PrefillCallback, feed, stream_generate
from .sampling import CHAT, SamplingConfig, resolve
from .state import AttentionState, copy_state, eval_state, restore_state, state_bytes
from .tokenizer import Tokenizer

# Format 2 stores the attention ring's `AttentionState.key_slots` (position + 1, 0 for an empty slot);
# format 1 stored the key positions themselves (a large negative number for an empty slot). Both store
# the settings as a dict of SamplingConfig's fields (`stop`: a list, or null in older files).
FORMAT = "rg_mlx.chat/2"
FORMAT_V1 = "rg_mlx.chat/1"


@dataclass
class _Exchange:
    """The tokens one exchange (user turn + reply) added to the conversation."""

    tokens: list[int]
    unfed: int  # how many of the conversation's last tokens the state does not hold yet (0 or 1)


def model_fingerprint(model: nn.Module, tokenizer: Tokenizer) -> str:
    """A short hash identifying the model and tokenizer a state belongs to.

    Covers the architecture, every norm scale (distinct for each trained checkpoint, never
    quantized; hashed as bfloat16 so the compute dtype does not matter) and the tokenizer.
    """
    h = hashlib.sha256()
    args = model.args
    arch = [args.vocab_size, args.hidden_size, args.lru_width, args.layer_types, args.attention_window_size]
    h.update(json.dumps(arch).encode())
    norms = [model.model.final_norm.weight]
    for layer in model.layers:
        norms += [layer.temporal_pre_norm.weight, layer.channel_pre_norm.weight]
    for w in norms:
        h.update(np.array(w.astype(mx.bfloat16).view(mx.uint16)).tobytes())
    h.update(tokenizer.sp.serialized_model_proto())
    return h.hexdigest()[:16]


class ChatSession:
    """A conversation with the model, kept as a fixed-size state.

    Args:
        model, tokenizer: from `rg_mlx.load`.
        system: a system prompt (folded into the first user turn).
        sampling: the session's generation settings, `settings` (default: the `chat` preset,
            greedy, 512 tokens). With a seed, the whole session is reproducible and each reply
            (a regenerated one too) draws with its own seed, derived from it and the reply's number.
        max_snapshots: per-turn state snapshots kept for undo/regenerate.
        **settings: a convenience: fields of `SamplingConfig` that replace those of `sampling`.

    A session may be used from any one thread at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        system: str | None = None,
        *,
        sampling: SamplingConfig | None = None,
        max_snapshots: int = 16,
        **settings: Any,
    ):
        if max_snapshots < 0:
            raise RGError(f"max_snapshots={max_snapshots}: must be >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.max_snapshots = max_snapshots
        self.settings = resolve(sampling, settings, CHAT)
        self._active = None
        self.reset()

    @property
    def settings(self) -> SamplingConfig:
        """The session's generation settings; assign a new `SamplingConfig` to change them."""
        return self._settings

    @settings.setter
    def settings(self, config: SamplingConfig) -> None:
        if not isinstance(config, SamplingConfig):
            raise RGError(f"settings={config!r}: must be a SamplingConfig")
        config.check_vocab(self.model.args.vocab_size)
        self._settings = config

    # -- conversation -------------------------------------------------------------------

    def send(
        self,
        text: str,
        *,
        sampling: SamplingConfig | None = None,
        prefill_progress: PrefillCallback | None = None,
        **overrides: Any,
    ) -> Iterator[GenerationResponse]:
        """Stream the reply to a user message.

        `sampling` (a whole config) and/or `overrides` (some of its fields) change the settings
        for this reply only; bad ones raise `RGError` here, before anything changes. The reply's
        seed is derived from the session's seed (see the class) unless this call gives one, in
        `sampling` or `seed=`: that one is used as given. `prefill_progress` is called as the new
        tokens go through the model (see `stream_generate`).

        Only the new tokens go through the model. The returned generator does the work: nothing
        happens until it is iterated. The exchange is recorded once iteration starts; if iteration
        stops early, the partial reply stays in `history`.
        """
        self._close_active()
        reply = self._exchange(text, self._reply_settings(sampling, overrides), prefill_progress)
        self._active = weakref.ref(reply)
        return reply

    def regenerate(
        self,
        *,
        sampling: SamplingConfig | None = None,
        prefill_progress: PrefillCallback | None = None,
        **overrides: Any,
    ) -> Iterator[GenerationResponse]:
        """Stream a new reply to the last user message, in place of the last reply (arguments as in `send`).

        Like `send`, it returns a generator and changes nothing until that is iterated: the last reply
        is dropped when iteration starts (and put back if the new reply fails before its first token).
        A regenerate that is never iterated leaves the conversation as it was. Raises `RGError` if the
        conversation is empty (after `undo` of the only exchange, too).
        """
        self._close_active()
        if not self._exchanges:
            raise RGError("nothing to regenerate: the conversation is empty (send a message first)")
        reply = self._regenerated(self._reply_settings(sampling, overrides), prefill_progress)
        self._active = weakref.ref(reply)
        return reply

    def undo(self) -> None:
        """Drop the last exchange (user message and reply)."""
        self._close_active()
        if not self._exchanges:
            raise RGError("nothing to undo: the conversation is empty")
        self._rewind(len(self._exchanges) - 1)

    def reset(self) -> None:
        """Start over (keeps the system prompt and settings)."""
        self._close_active()
        self._cache = self.model.make_cache()
        self._messages: list[dict] = []
        self._exchanges: list[_Exchange] = []
        self._snapshots: OrderedDict[int, list] = OrderedDict()
        self._replies = 0

    @property
    def history(self) -> list[dict]:
        """The messages so far: `{"role": "user" | "assistant", "content": str}`."""
        return [dict(m) for m in self._messages]

    @property
    def state_bytes(self) -> int:
        """Bytes of the kept state (fixed once the first token went through)."""
        return state_bytes(self._cache)

    @property
    def tokens(self) -> list[int]:
        """The conversation as token ids; the state holds the first `tokens_seen` of them."""
        return [t for e in self._exchanges for t in e.tokens]

    @property
    def tokens_seen(self) -> int:
        """Tokens of the conversation held in the state."""
        return sum(len(e.tokens) for e in self._exchanges) - len(self._unfed())

    @property
    def cache(self) -> list:
        """The live state (mlx-lm `ArraysCache` per layer); read it, do not modify it."""
        return self._cache

    # -- files --------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the session (state, messages, settings) to one safetensors file."""
        self._close_active()
        path = Path(path)
        arrays, layout = {}, []
        for i, arrays_i in enumerate(copy_state(self._cache)):
            names = []
            for j, a in enumerate(arrays_i):
                names.append(None if a is None else f"state.{i}.{j}")
                if a is not None:
                    arrays[names[-1]] = a
            layout.append(names)
        meta = {
            "format": FORMAT,
            "fingerprint": model_fingerprint(self.model, self.tokenizer),
            "system": self.system,
            "settings": self.settings.to_dict(),
            "max_snapshots": self.max_snapshots,
            "messages": self._messages,
            "exchanges": [[e.tokens, e.unfed] for e in self._exchanges],
            "replies": self._replies,
            "layout": layout,
        }
        if not path.parent.is_dir():
            raise RGError(f"{path}: no such folder {path.parent}")
        tmp = path.with_name(f".{path.name}.tmp.safetensors")  # no half-written file under `path`
        try:
            mx.save_safetensors(str(tmp), arrays, metadata={"rg_mlx_chat": json.dumps(meta)})
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            tmp.unlink(missing_ok=True)
            raise RGError(f"{path}: cannot write the session ({getattr(e, 'strerror', None) or e})") from None

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, tokenizer: Tokenizer) -> "ChatSession":
        """Read a session written by `save`; it continues exactly where it was saved."""
        path = Path(path)
        if not path.is_file():
            raise RGError(f"{path}: no such session file")
        try:
            arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
            meta = json.loads(metadata["rg_mlx_chat"])
            if meta.get("format") not in (FORMAT, FORMAT_V1):
                raise ValueError(meta.get("format"))
        except Exception:
            raise RGError(f"{path}: not a chat session saved by rg_mlx") from None
        if meta["fingerprint"] != model_fingerprint(model, tokenizer):
            raise RGError(f"{path}: saved with a different model or tokenizer: load it with the model it was made with")
        settings = CHAT.replace(**meta["settings"])  # null stop strings (older files) read as none
        session = cls(model, tokenizer, meta["system"], sampling=settings, max_snapshots=meta["max_snapshots"])
        state = [[None if n is None else arrays[n] for n in names] for names in meta["layout"]]
        if meta["format"] == FORMAT_V1:
            for kind, slots in zip(model.args.layer_types, state):
                if kind == "attention" and slots[2] is not None:
                    slots[2] = AttentionState.slots_of(slots[2])
        restore_state(session._cache, state)
        session._messages = meta["messages"]
        session._exchanges = [_Exchange(list(tokens), unfed) for tokens, unfed in meta["exchanges"]]
        session._replies = meta["replies"]
        return session

    @classmethod
    def from_history(
        cls,
        model: nn.Module,
        tokenizer: Tokenizer,
        messages: list[dict],
        *,
        system: str | None = None,
        sampling: SamplingConfig | None = None,
        max_snapshots: int = 16,
        **settings: Any,
    ) -> "ChatSession":
        """A session that has gone through `messages` (e.g. an imported transcript).

        The messages alternate user/assistant; a trailing user message without a reply is
        dropped. The state is that of the conversation in Gemma's chat format, one prefill
        chunk per exchange. The other arguments are those of `ChatSession`.
        """
        tokenizer.chat_tokens(messages, add_generation_prompt=False)  # checks the roles
        session = cls(model, tokenizer, system, sampling=sampling, max_snapshots=max_snapshots, **settings)
        for k in range(len(messages) // 2):
            user, reply = (str(m.get("content", "")) for m in messages[2 * k : 2 * k + 2])
            prompt = tokenizer.chat_tokens(
                [{"role": "user", "content": user}], system=system if k == 0 else None, continuation=k > 0
            )
            tokens = prompt + tokenizer.encode(reply.strip(), add_bos=False)
            session._remember(k, copy_state(session._cache))
            feed(model, mx.array([tokens], dtype=mx.int32), session._cache)
            eval_state(session._cache)
            session._exchanges.append(_Exchange(tokens, 0))
            session._messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        session._replies = len(session._exchanges)
        return session

    # -- internals ----------------------------------------------------------------------

    def _remember(self, k: int, state: list) -> None:
        """Keep the state from before exchange `k` (the empty state needs no snapshot)."""
        if k > 0 and self.max_snapshots > 0:
            self._snapshots[k] = state
            while len(self._snapshots) > self.max_snapshots:
                self._snapshots.popitem(last=False)

    def _reply_settings(self, sampling: SamplingConfig | None, overrides: dict[str, Any]) -> SamplingConfig:
        """The checked settings of the next reply, its seed derived from the session's (see the class)."""
        settings = resolve(sampling, overrides, self.settings)
        settings.check_vocab(self.model.args.vocab_size)
        if sampling is None and "seed" not in overrides and settings.seed is not None:
            settings = settings.replace(seed=(settings.seed * 1_000_003 + self._replies) % 2**31)
        return settings

    def _exchange(
        self, text: str, settings: SamplingConfig, progress: PrefillCallback | None
    ) -> Iterator[GenerationResponse]:
        """The reply to `text` after the conversation so far (runs as it is iterated)."""
        first = not self._exchanges
        prompt = self.tokenizer.chat_tokens(
            [{"role": "user", "content": text}], system=self.system if first else None, continuation=not first
        )
        stream = stream_generate(
            self.model, self.tokenizer, self._unfed() + prompt, sampling=settings, cache=self._cache,
            prefill_progress=progress,
        )
        yield from self._reply(text, prompt, stream)

    def _regenerated(self, settings: SamplingConfig, progress: PrefillCallback | None) -> Iterator[GenerationResponse]:
        """A new reply in place of the last one (runs as it is iterated; see `regenerate`)."""
        text = self._messages[-2]["content"]
        kept = (copy_state(self._cache), list(self._exchanges), list(self._messages), OrderedDict(self._snapshots))
        self._rewind(len(self._exchanges) - 1)
        replied = False
        try:
            for r in self._exchange(text, settings, progress):
                replied = True
                yield r
        finally:
            if not replied:  # failed before its first token: the old reply stays
                state, self._exchanges, self._messages, self._snapshots = kept
                restore_state(self._cache, state)

    def _reply(
        self, text: str, prompt: list[int], stream: Iterator[GenerationResponse]
    ) -> Iterator[GenerationResponse]:
        k = len(self._exchanges)
        before = copy_state(self._cache)
        self._messages += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        self._replies += 1
        tokens, stopped = [], False
        try:
            for r in stream:
                tokens.append(r.token)
                stopped = r.finish_reason == "stop" and r.token in self.tokenizer.stop_ids
                self._messages[-1]["content"] += r.text
                yield r
        finally:
            stream.close()  # rolls the state back to every yielded token but the last
            if tokens:
                self._remember(k, before)
                if stopped:  # the end-of-turn token is replaced by the next turn's prefix
                    self._exchanges.append(_Exchange(prompt + tokens[:-1], 0))
                else:
                    self._exchanges.append(_Exchange(prompt + tokens, 1))
            else:  # failed before the first token: undo everything
                restore_state(self._cache, before)
                del self._messages[-2:]

    def _unfed(self) -> list[int]:
        if not self._exchanges or not self._exchanges[-1].unfed:
            return []
        return self._exchanges[-1].tokens[-self._exchanges[-1].unfed :]

    def _rewind(self, k: int) -> None:
        """Go back to the conversation before exchange `k`."""
        snapshot = self._snapshots.get(k)
        for j in [j for j in self._snapshots if j >= k]:
            del self._snapshots[j]
        self._exchanges = self._exchanges[:k]
        del self._messages[2 * k :]
        self._cache = self.model.make_cache()
        if snapshot is not None:
            restore_state(self._cache, snapshot)
        elif k > 0:  # beyond the kept snapshots: re-feed the recorded tokens
            tokens = self.tokens[: self.tokens_seen]
            feed(self.model, mx.array([tokens], dtype=mx.int32), self._cache)
            eval_state(self._cache)

    def _close_active(self) -> None:
        reply = self._active() if self._active is not None else None
        self._active = None
        if reply is not None:
            try:
                reply.close()
            except ValueError:
                raise RGError("a reply is still streaming in another thread: stop it first") from None

