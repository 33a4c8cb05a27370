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


class RecurrentState:
    """A recurrent layer's state, by name."""

    __slots__ = ("cache",)

    def __init__(self, cache: ArraysCache):
        self.cache = cache

    conv = _slot(0, "The last K-1 inputs of the temporal conv `[B, K-1, L]`, or None.")
    h = _slot(1, "The RG-LRU state `[B, L]`, float32, or None.")
    next_position = _slot(2, "Position of each row's next token `[B]` int32, or None.")


class AttentionState:
    """An attention layer's ring buffer of the last `window` keys and values, by name."""

    __slots__ = ("cache",)

    def __init__(self, cache: ArraysCache):
        self.cache = cache

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
        """What `key_slots` holds for keys at `positions` (left padding counts as empty)."""
        return mx.maximum(positions, -1).astype(mx.int32) + 1


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


def set_next_position(caches: Caches, position: mx.array) -> None:
    """Record `position` `[B]` as every layer's next position (after a call fed the tokens before it)."""
    for cache in caches:
        cache[-1] = position


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
