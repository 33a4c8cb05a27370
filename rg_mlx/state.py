"""The fixed-size state of a batch of sequences, and the one place that knows its layout.

One mlx-lm `ArraysCache` per layer (plain ones: mlx-lm's `load_prompt_cache` rebuilds caches by
class name, and its `merge`/`extract` build plain ones), whose numbered slots are read and
written here by name (`RecurrentState`, `AttentionState`), never by number elsewhere:

- recurrent layer: `conv` `[B, K-1, L]` (the last K-1 conv inputs), `h` `[B, L]` float32 (the
  RG-LRU state), `next_position` `[B]`;
- attention layer: `keys`, `values` `[B, kv_heads, window, D]` (a ring: position p sits in slot
  p % window), `key_slots` `[B, window]` int32, `next_position` `[B]`.

`next_position` is the position within its document of the next token of each row (negative
while the row is still in its left padding). `key_slots` holds `position + 1` of the key in each
ring slot, 0 for an empty slot: an all-zero state (what mlx-lm's `merge` gives a row that has
no state yet) is then a fresh document, with no key at position 0.

Every array is batch-first, so mlx-lm's `merge`, `extend`, `extract` and `filter` work on rows.

Padding. A batch of rows of different lengths is padded, on the left by our own batching
(`make_cache(left_padding=...)`: a negative next position) or on the right by mlx-lm's (0.32): its
batched prefill announces each row's length with `prepare(lengths=...)` on every layer's cache,
and the model counts it down with `advance(T)` after each call (`finalize()` ends it). A padding
token has a negative position (`token_positions`) and leaves the state as it is: the conv keeps
the last K-1 *real* inputs, the RG-LRU steps over it (`padding`), the ring takes only real keys,
and the next position moves by the real tokens only (`advance`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mlx.core as mx

if TYPE_CHECKING:
    from mlx_lm.models.cache import ArraysCache

Caches = list["ArraysCache"]
State = list[list[Any]]  # a snapshot: per layer, its slots' arrays (or None before the first token)

RECURRENT_SLOTS = ("conv", "h", "next_position")
ATTENTION_SLOTS = ("keys", "values", "key_slots", "next_position")


def _slot(index: int, doc: str) -> property:
    def get(self) -> Any:
        return self.cache[index]

    def set(self, value: Any) -> None:
        self.cache[index] = value

    return property(get, set, doc=doc)


def real_lengths(cache: ArraysCache, T: int) -> mx.array | None:
    """How many of a call's `T` tokens are real in each row `[B]` (the rest is right padding), or None
    when every token is: the lengths mlx-lm announced with `prepare(lengths=...)`, counted down by `advance`."""
    lengths = getattr(cache, "lengths", None)
    return None if lengths is None else mx.clip(lengths, 0, T).astype(mx.int32)


class _LayerState:
    __slots__ = ("cache",)

    def __init__(self, cache: ArraysCache):
        self.cache = cache

    def padding(self, positions: mx.array) -> mx.array | None:
        """`[B, T]` bool: this call's right padding (negative positions), or None when it has none."""
        return positions < 0 if getattr(self.cache, "lengths", None) is not None else None


class RecurrentState(_LayerState):
    """A recurrent layer's state, by name."""

    __slots__ = ()

    conv = _slot(0, "The last K-1 inputs of the temporal conv `[B, K-1, L]`, or None.")
    h = _slot(1, "The RG-LRU state `[B, L]`, float32, or None.")
    next_position = _slot(2, "Position of each row's next token `[B]` int32, or None.")

    def write(self, conv_inputs: mx.array, h: mx.array, positions: mx.array) -> None:
        """Keep a call's RG-LRU state `h` and the last K-1 real conv inputs of each row, from the conv's
        inputs `[B, K-1+T, L]` (its old state, then the call's `T` inputs at `positions` `[B, T]`)."""
        T = positions.shape[1]
        real = real_lengths(self.cache, T)
        if real is None:
            self.conv = conv_inputs[:, T:]
        else:  # the K-1 inputs before each row's right padding
            ends = real[:, None] + mx.arange(conv_inputs.shape[1] - T, dtype=mx.int32)  # [B, K-1]
            self.conv = mx.take_along_axis(conv_inputs, ends[..., None], axis=1)
        self.h = h


class AttentionState(_LayerState):
    """An attention layer's ring buffer of the last `window` keys and values, by name."""

    __slots__ = ()

    keys = _slot(0, "`[B, kv_heads, window, D]`, or None.")
    values = _slot(1, "`[B, kv_heads, window, D]`, or None.")
    key_slots = _slot(2, "`[B, window]` int32: position + 1 of the key in each slot, 0 if empty; or None.")
    next_position = _slot(3, "Position of each row's next token `[B]` int32, or None.")

    @property
    def key_positions(self) -> mx.array:
        """The position of the key in each slot `[B, window]`; -1 for an empty slot."""
        return self.key_slots - 1

    @staticmethod
    def slots_of(positions: mx.array) -> mx.array:
        """What `key_slots` holds for keys at `positions` (padding counts as empty)."""
        return mx.maximum(positions, -1).astype(mx.int32) + 1

    def write(self, keys: mx.array, values: mx.array, positions: mx.array, window: int) -> None:
        """Put a call's keys and values `[B, kv_heads, T, D]` at `positions` `[B, T]` into the ring (making it on
        the first call): position p goes to slot p % window; of each row, the last `window` real tokens."""
        B, n_kv, T, D = keys.shape
        if self.keys is None:
            self.keys = mx.zeros((B, n_kv, window, D), keys.dtype)
            self.values = mx.zeros((B, n_kv, window, D), values.dtype)
            self.key_slots = mx.zeros((B, window), mx.int32)
        real = real_lengths(self.cache, T)
        if real is None:
            n = min(T, window)
            pos = positions[:, T - n :]
            slots = mx.remainder(pos, window)[:, None, :, None]  # [B, 1, n, 1], distinct within a row
            self.keys = mx.put_along_axis(self.keys, slots, keys[:, :, T - n :], axis=2)
            self.values = mx.put_along_axis(self.values, slots, values[:, :, T - n :], axis=2)
            self.key_slots = mx.put_along_axis(self.key_slots, slots[:, 0, :, 0], self.slots_of(pos), axis=1)
            return
        # Right padding: each slot takes the last real token of the call that maps to it, if any.
        last = positions[:, :1] + real[:, None] - 1  # [B, 1]: the last real position (the first is real if any is)
        back = mx.remainder(last - mx.arange(window, dtype=mx.int32), window)  # [B, window]: slot s holds last - back
        token = real[:, None] - 1 - back  # [B, window]: the call's token for each slot; < 0: none
        taken = (token >= 0)[:, None, :, None]
        index = mx.maximum(token, 0)[:, None, :, None]
        self.keys = mx.where(taken, mx.take_along_axis(keys, index, axis=2), self.keys)
        self.values = mx.where(taken, mx.take_along_axis(values, index, axis=2), self.values)
        self.key_slots = mx.where(taken[:, 0, :, 0], self.slots_of(last - back), self.key_slots)


def make_cache(layer_types: list[str], left_padding: list[int] | None = None) -> Caches:
    """A fresh state: one `ArraysCache` per layer, its arrays made on the first call.

    With `left_padding`, row i starts its document after `left_padding[i]` padding tokens.
    """
    from mlx_lm.models.cache import ArraysCache  # lazily: mlx_lm pulls in transformers

    caches = []
    for kind in layer_types:
        cache = ArraysCache(len(RECURRENT_SLOTS if kind == "recurrent" else ATTENTION_SLOTS))
        if left_padding is not None:
            cache[-1] = -mx.array(left_padding, dtype=mx.int32)
        caches.append(cache)
    return caches


def next_position(caches: Caches | None, batch: int) -> mx.array:
    """The position of each row's next token `[batch]` (0 for a fresh state)."""
    position = caches[0][-1] if caches is not None else None
    if position is None:
        return mx.zeros((batch,), mx.int32)
    return position if position.shape[0] == batch else mx.broadcast_to(position, (batch,))


def token_positions(caches: Caches | None, start: mx.array, T: int) -> mx.array:
    """The position within its document of each of a call's `T` tokens `[B, T]`, from each row's next
    position `start` `[B]` on; -1 on right padding (so every padding token has a negative position)."""
    positions = start[:, None] + mx.arange(T, dtype=mx.int32)
    real = real_lengths(caches[0], T) if caches else None
    if real is None:
        return positions
    return mx.where(mx.arange(T, dtype=mx.int32) < real[:, None], positions, -1)


def advance(caches: Caches, start: mx.array, T: int) -> None:
    """Close a call of `T` tokens that began at next positions `start` `[B]`: each row moves on by its real
    tokens, and every cache counts its announced lengths down (mlx-lm's `advance`)."""
    real = real_lengths(caches[0], T)
    position = start + (T if real is None else real)
    for cache in caches:
        cache[-1] = position
        cache.advance(T)


def copy_state(caches: Caches) -> State:
    """A snapshot of the state: references to its (immutable) arrays, no copy of the data."""
    return [list(c.cache) for c in caches]


def restore_state(caches: Caches, state: State) -> None:
    """Put a snapshot from `copy_state` back."""
    for cache, arrays in zip(caches, state):
        cache.cache = list(arrays)


def state_bytes(caches: Caches) -> int:
    """Bytes held by the state."""
    return sum(c.nbytes for c in caches)


def eval_state(caches: Caches) -> None:
    """Evaluate every array of the state (the end of a prefill chunk)."""
    mx.eval([c.state for c in caches])
