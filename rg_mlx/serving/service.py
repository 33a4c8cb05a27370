"""`ChatService`: a model, its worker and the sessions chatting with it; what a front end drives.

A front end (the Gradio app in `rg_mlx.app`) turns its requests into calls here and the `Progress`
of a reply into its own updates. Everything that touches MLX runs on the worker; everything that
touches a session holds its lock; nothing here knows about Gradio.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import RGError
from ..memory import rss_bytes
from ..sampling import CHAT, SamplingConfig
from .model import ModelHolder
from .sessions import IDLE_TTL_S, Session, SessionRegistry, now_iso
from .worker import DONE, Job, Worker

if TYPE_CHECKING:
    from ..chat import ChatSession
    from ..generate import GenerationResponse, PrefillCallback, PrefillProgress

    # How a reply begins: the chat, and where its prompt's progress goes.
    Begin = Callable[[ChatSession, PrefillCallback], Iterator[GenerationResponse]]


class NoModel(RGError):
    """The service has no model loaded."""


@dataclass(frozen=True)
class Reply:
    """A reply queued on the worker: its `job`, and the conversation to show above it while it streams
    (ending with the user's message)."""

    job: Job
    shown: list[dict[str, str]]


@dataclass(frozen=True)
class Progress:
    """Where a reply stands.

    Attributes:
        text: the reply so far.
        response: the newest token's `GenerationResponse`; None until the first token.
        ahead: while it waits in the queue, how many replies run or wait before it.
        prefill: while the model reads the prompt (before the first token), how far it has got.
    """

    text: str
    response: GenerationResponse | None
    ahead: int = 0
    prefill: PrefillProgress | None = None


class ChatService:
    """One model on one worker thread, serving many sessions (a chat each), one reply at a time.

    Args:
        model: what `rg_mlx.load` accepts, loaded now; None starts without one (`load` later).
        dtype: compute dtype for `rg_mlx.load`.
        sampling: the settings a new session starts with.
        ttl_s: sessions unused this long are freed when a new one is created (not while a reply of
            theirs runs).
        clock: monotonic seconds, for expiry (tests pass their own).
        loader: `rg_mlx.load` (tests may pass their own).

    Attributes: `worker` (`Worker`), `models` (`ModelHolder`), `sessions` (`SessionRegistry`).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str | None = None,
        sampling: SamplingConfig = CHAT,
        ttl_s: float = IDLE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[..., tuple[Any, Any]] | None = None,
    ):
        self.sampling = sampling
        self.worker = Worker()
        self.sessions = SessionRegistry(ttl_s, clock)
        self.models = ModelHolder(self.worker, self.sessions, dtype=dtype, loader=loader)
        if model is not None:
            self.models.load(model)

    # ---- sessions ------------------------------------------------------------------------
    def session(self, key: str) -> Session:
        """The session of `key`, created with a new chat if it has none (idle sessions expire then).

        Raises `NoModel` when no model is loaded.
        """
        session = self.sessions.get(key)
        if session is None:
            self.sessions.expire()
            # On the worker, like a model switch: a new session never gets the model being replaced.
            session = self.worker.call(lambda: self.sessions.add(key, self._new_chat(), self.sampling))
        session.touch()
        return session

    def close_session(self, key: str) -> None:
        """Free the session of `key` and drop its queued or running reply."""
        if self.sessions.pop(key) is not None:
            self.worker.cancel(key)

    def cancel(self, session: Session) -> None:
        """Stop the session's reply, if one is queued or running, and wait until the worker closed it
        (its partial reply stays)."""
        job = session.job
        if job is not None and not job.done.is_set():
            self.worker.cancel_job(job)
            job.done.wait()

    # ---- conversation --------------------------------------------------------------------
    def send(self, session: Session, text: str, sampling: SamplingConfig, *, system: str | None = None) -> Reply:
        """Queue the reply to `text` (a reply still running is stopped first).

        `system` (None: none) becomes the chat's system prompt if the chat has no messages yet; a
        chat that has some keeps its own (Gemma folds it into the first message).
        """
        self._check(sampling)
        self.cancel(session)
        with session.lock:
            chat = session._chat
            if not chat.history:
                chat.system = system or None
            session._settings = sampling
            session._stamp()
            session._times.append(now_iso())
            shown = session.view().messages + [{"role": "user", "content": text}]

        def begin(chat: ChatSession, progress: PrefillCallback) -> Iterator[GenerationResponse]:
            return chat.send(text, sampling=sampling, prefill_progress=progress)

        return Reply(self._start(session, begin), shown)

    def regenerate(self, session: Session, sampling: SamplingConfig) -> Reply | None:
        """Queue a new reply to the last message (None if there is none yet)."""
        self._check(sampling)
        self.cancel(session)
        with session.lock:
            messages = session.view().messages
            if not messages:
                return None
            session._settings = sampling
            shown = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            session._times = session._times[: len(shown)]

        def begin(chat: ChatSession, progress: PrefillCallback) -> Iterator[GenerationResponse]:
            return chat.regenerate(sampling=sampling, prefill_progress=progress)

        return Reply(self._start(session, begin), shown)

    def undo(self, session: Session) -> str | None:
        """Drop the last exchange; return its user message (None if the chat is empty)."""
        self.cancel(session)

        def undo() -> str | None:
            with session.lock:
                history = session._chat.history
                if not history:
                    return None
                session._chat.undo()
                session._last = None
                session._stamp()
                return next(m["content"] for m in reversed(history) if m["role"] == "user")

        return self.worker.call(undo)

    def clear(self, session: Session, system: str | None = None) -> None:
        """Start a new conversation (stopping a running reply) with `system` as its system prompt."""
        self.cancel(session)
        session.restart(self.worker.call(self._new_chat, system))

    def restore(
        self,
        session: Session,
        messages: list[dict[str, str]],
        *,
        system: str | None = None,
        sampling: SamplingConfig | None = None,
        created: str | None = None,
        times: list[str] | None = None,
    ) -> None:
        """Make the session continue an earlier conversation (e.g. an imported transcript)."""
        from ..chat import ChatSession

        self.cancel(session)

        def replay() -> ChatSession:
            loaded = self._loaded()
            return ChatSession.from_history(loaded.model, loaded.tokenizer, messages, system=system or None)

        chat = self.worker.call(replay)
        with session.lock:
            session.restart(chat, created, times)
            if sampling is not None:
                session._settings = sampling

    def stop(self, key: str) -> Session | None:
        """Stop the reply of `key`'s session; return the session (None if there is none)."""
        session = self.sessions.get(key)
        if session is not None:
            self.cancel(session)
        return session

    def follow(self, reply: Reply, update_every: float = 0.05) -> Iterator[Progress]:
        """The `Progress` of a reply until it ends.

        While it waits in the queue, one `Progress` each time the number ahead of it changes; then,
        while the model reads the prompt and while it generates, at most one every `update_every`
        seconds (progress that arrives faster is merged). Raises the error that ended the reply, if
        one did. Closing this iterator early cancels the reply.
        """
        from ..generate import PrefillProgress

        job = reply.job
        text, ahead, unshown, next_update = "", None, None, 0.0
        try:
            while True:
                wait = max(0.0, next_update - time.monotonic()) if unshown else 0.2
                try:
                    items = [job.events.get(timeout=wait)]
                except queue.Empty:
                    items = []
                if items:
                    while items[-1] is not DONE and not job.events.empty():
                        items.append(job.events.get())
                    if items[-1] is DONE:
                        break
                    text += "".join(r.text for r in items if not isinstance(r, PrefillProgress))
                    unshown = items[-1]
                if unshown is None:  # no token yet: where the reply stands in the queue
                    n = self.worker.ahead(job)
                    if n and n != ahead:
                        ahead = n
                        yield Progress(text, None, n)
                    continue
                if time.monotonic() < next_update:
                    continue
                if isinstance(unshown, PrefillProgress):
                    yield Progress(text, None, prefill=unshown)
                else:
                    yield Progress(text, unshown)
                unshown, next_update = None, time.monotonic() + update_every
            if job.error is not None:
                raise job.error
        finally:
            self.worker.cancel_job(job)

    # ---- model ---------------------------------------------------------------------------
    def load(self, path: str, *, adapter_path: str | None = None) -> None:
        """Switch to the model at `path`, with the LoRA adapter at `adapter_path` if given (see
        `ModelHolder.load`: every session is reset)."""
        self.models.load(path, adapter_path=adapter_path)

    def close(self) -> None:
        """Stop the worker and free every session and the model."""
        self.worker.close()
        self.sessions.clear()
        self.models.close()

    # ---- internals -----------------------------------------------------------------------
    def _loaded(self):
        loaded = self.models.current
        if loaded is None:
            raise NoModel("no model loaded: load one first")
        return loaded

    def _new_chat(self, system: str | None = None) -> ChatSession:
        """Runs on the worker: a new chat with the current model."""
        from ..chat import ChatSession

        loaded = self._loaded()
        return ChatSession(loaded.model, loaded.tokenizer, system=system or None, sampling=self.sampling)

    def _check(self, sampling: SamplingConfig) -> None:
        """The checks of `sampling` that need the model, before anything is queued."""
        sampling.check_vocab(self._loaded().model.args.vocab_size)

    def _start(self, session: Session, begin: Begin) -> Job:
        """Queue `begin(chat, progress)`'s reply as the session's job (any reply of its still running is
        stopped); `progress` puts the prompt's `PrefillProgress` among the job's events."""
        while True:
            self.cancel(session)  # waits outside the session's lock: the worker needs it to stop
            with session.lock:
                if session._job is None or session._job.done.is_set():
                    session._job = self.worker.submit(session.key, lambda: self._reply(session, begin))
                    return session._job

    def _reply(self, session: Session, begin: Begin) -> Iterator[GenerationResponse]:
        """Runs on the worker: stream one reply of the session's chat, timing every token."""
        with session.lock:
            # This job: `_start` set it under this lock, and it stays the session's job until it ends.
            events = session._job.events
            stream = begin(session._chat, events.put)
            session._last = session._ttft = None
        start = last = time.perf_counter()
        first = True
        try:
            while True:
                with session.lock:
                    response = next(stream, None)
                    if response is None:
                        return
                    now = time.perf_counter()
                    if first:
                        session._ttft = now - start
                    else:
                        session._trace.add((now - last) * 1e3, rss_bytes() / 2**20)
                    session._last = response
                first, last = False, now
                yield response
        finally:
            with session.lock:
                stream.close()
                session._stamp()
