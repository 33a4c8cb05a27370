"""The model a server runs: loaded on the worker, switched there (cancelling every job and resetting
every session), read under a lock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from .sessions import SessionRegistry
from .worker import Worker


class Loaded(NamedTuple):
    """A loaded model: what `rg_mlx.load` returned for `path` (with the LoRA adapter at `adapter_path`)."""

    model: Any
    tokenizer: Any
    path: str
    adapter_path: str | None = None


class ModelHolder:
    """The one model of a server.

    Args:
        worker: the MLX worker (loading runs there, between two tokens of a running reply).
        sessions: the sessions to reset when the model changes.
        dtype: compute dtype for `rg_mlx.load`.
        loader: `rg_mlx.load` (tests may pass their own, taking its `dtype` and `adapter_path`).
    """

    def __init__(
        self,
        worker: Worker,
        sessions: SessionRegistry,
        *,
        dtype: str | None = None,
        loader: Callable[..., tuple[Any, Any]] | None = None,
    ):
        self.worker = worker
        self.sessions = sessions
        self.dtype = dtype
        self._loader = loader
        self._lock = threading.Lock()
        self._current: Loaded | None = None

    @property
    def current(self) -> Loaded | None:
        """The loaded model, tokenizer and path (None before the first load)."""
        with self._lock:
            return self._current

    @property
    def model(self) -> Any:
        current = self.current
        return None if current is None else current.model

    @property
    def tokenizer(self) -> Any:
        current = self.current
        return None if current is None else current.tokenizer

    @property
    def path(self) -> str | None:
        current = self.current
        return None if current is None else current.path

    def load(self, path: str, *, adapter_path: str | None = None) -> None:
        """Load `path` (with the LoRA adapter at `adapter_path`, if given) and make it the model: cancel
        every job, reset every session (their keys are remembered, `SessionRegistry.take_reset_notice`).
        A load that fails (RGError) changes nothing."""

        def swap() -> None:
            if self._loader is None:
                from .. import load

                self._loader = load
            model, tokenizer = self._loader(path, dtype=self.dtype, adapter_path=adapter_path)
            self.worker.cancel()
            with self._lock:
                self._current = Loaded(model, tokenizer, str(path), adapter_path)
            old = self.sessions.reset_all()
            old.clear()  # the old chats (and their states) are freed here, on the worker

        self.worker.call(swap)

    def close(self) -> None:
        """Drop the model (the worker must be closed, or idle)."""
        with self._lock:
            self._current = None
