"""The sessions a server keeps: one chat per key (a browser tab, an API client), each behind its own lock.

A `Session` is written by the worker thread (its reply streams, token by token) and by the front
end's threads (settings, timestamps, a new chat); every read and write of its fields holds its
lock, and the front end reads it through `Session.view()`, a snapshot taken under that lock.
Rules: never wait for the worker while holding a session's lock (the worker takes it for every
token), and never take a session's lock while holding the registry's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..sampling import SamplingConfig
from .worker import Job

if TYPE_CHECKING:
    from ..chat import ChatSession
    from ..generate import GenerationResponse

IDLE_TTL_S = 6 * 3600  # chats of API clients (no tab to close) are freed after this long unused


def now_iso() -> str:
    """The current UTC time, ISO 8601 with seconds (the timestamps of messages and transcripts)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Trace:
    """Per-token latency and process memory over a conversation, at most `limit` points.

    When full, neighbouring points merge in pairs, so the trace always covers the whole conversation.
    """

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.tokens = 0
        self.points: list[tuple[int, float, float]] = []  # (token number, latency ms, RSS MiB)

    def add(self, latency_ms: float, rss_mib: float) -> None:
        self.tokens += 1
        self.points.append((self.tokens, latency_ms, rss_mib))
        if len(self.points) > self.limit:
            p = self.points
            merged = [(b[0], (a[1] + b[1]) / 2, max(a[2], b[2])) for a, b in zip(p[0::2], p[1::2])]
            self.points = merged + p[len(merged) * 2 :]


@dataclass(frozen=True)
class SessionView:
    """A snapshot of a session, for the front end.

    Attributes:
        messages: the conversation, `{"role", "content"}` dicts.
        times: one ISO timestamp per message.
        system: the chat's system prompt.
        settings: the sampling settings of the last reply (or the session's first ones).
        created: when this conversation started (ISO).
        last: the last `GenerationResponse` of the last reply (None before one, or after undo).
        ttft: that reply's time to first token, seconds.
        busy: a reply is queued or streaming.
        stopped: the last reply was cancelled before it ended (Stop, a new request, a closed tab).
        state_bytes, tokens_seen: the chat's fixed state size and tokens it went through.
        trace: (token, latency ms, RSS MiB) over the conversation.
    """

    messages: list[dict[str, str]]
    times: list[str]
    system: str | None
    settings: SamplingConfig
    created: str
    last: GenerationResponse | None
    ttft: float | None
    busy: bool
    stopped: bool
    state_bytes: int
    tokens_seen: int
    trace: list[tuple[int, float, float]]


class Session:
    """One conversation of a server: its `ChatSession`, settings, timestamps, last reply and trace.

    The properties and methods here take `lock` (re-entrant) themselves. The fields and methods
    whose names start with `_` belong to `rg_mlx.serving` (the service writes them while a reply
    streams) and are read or written only by a thread that holds `lock`.
    """

    def __init__(
        self, key: str, chat: ChatSession, settings: SamplingConfig, clock: Callable[[], float] = time.monotonic
    ):
        self.key = key
        self.lock = threading.RLock()
        self._clock = clock
        self._chat = chat
        self._settings = settings
        self._created = now_iso()
        self._times: list[str] = []
        self._trace = Trace()
        self._job: Job | None = None
        self._last: GenerationResponse | None = None
        self._ttft: float | None = None
        self._used = clock()

    # ---- reads ---------------------------------------------------------------------------
    @property
    def chat(self) -> ChatSession:
        """The conversation (drive it only on the worker, holding `lock`)."""
        with self.lock:
            return self._chat

    @property
    def job(self) -> Job | None:
        """The worker job of the last reply."""
        with self.lock:
            return self._job

    @property
    def settings(self) -> SamplingConfig:
        """The sampling settings of the last reply (the service's defaults before one)."""
        with self.lock:
            return self._settings

    @property
    def busy(self) -> bool:
        """Whether a reply is queued or generating."""
        with self.lock:
            return self._job is not None and not self._job.done.is_set()

    def idle_for(self) -> float:
        """Seconds since the session was last used."""
        with self.lock:
            return self._clock() - self._used

    def trace(self) -> list[tuple[int, float, float]]:
        """(token, latency ms, RSS MiB) over the conversation."""
        with self.lock:
            return list(self._trace.points)

    def view(self) -> SessionView:
        """A consistent snapshot of the session (messages get their timestamps first)."""
        with self.lock:
            self._stamp()
            chat, job = self._chat, self._job
            return SessionView(
                messages=[{"role": m["role"], "content": m["content"]} for m in chat.history],
                times=list(self._times),
                system=chat.system,
                settings=self._settings,
                created=self._created,
                last=self._last,
                ttft=self._ttft,
                busy=job is not None and not job.done.is_set(),
                stopped=job is not None and job.cancelled.is_set(),
                state_bytes=chat.state_bytes,
                tokens_seen=chat.tokens_seen,
                trace=list(self._trace.points),
            )

    # ---- writes --------------------------------------------------------------------------
    def touch(self) -> None:
        """Mark the session as used now (it expires `ttl_s` after the last use)."""
        with self.lock:
            self._used = self._clock()

    def restart(self, chat: ChatSession, created: str | None = None, times: list[str] | None = None) -> None:
        """Make `chat` this session's conversation, with fresh timestamps (or `times`), trace and stats."""
        with self.lock:
            self._chat, self._created = chat, created or now_iso()
            self._times, self._trace, self._job, self._last, self._ttft = list(times or []), Trace(), None, None, None
            self._stamp()

    def _stamp(self) -> None:
        """Give every message of the history a timestamp (new ones get now; those of dropped ones go)."""
        n = len(self._chat.history)
        self._times = self._times[:n] + [now_iso()] * (n - len(self._times))


class SessionRegistry:
    """The sessions by key, with expiry of idle ones and the keys a model switch reset.

    Args:
        ttl_s: sessions unused this long are freed by `expire` (unless a reply of theirs runs).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, ttl_s: float = IDLE_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._reset: set[str] = set()

    def add(self, key: str, chat: ChatSession, settings: SamplingConfig) -> Session:
        """A new session for `key` with `chat`; the existing one if another thread added one first."""
        session = Session(key, chat, settings, self.clock)
        with self._lock:
            return self._sessions.setdefault(key, session)

    def get(self, key: str) -> Session | None:
        with self._lock:
            return self._sessions.get(key)

    def pop(self, key: str) -> Session | None:
        """Remove and return the session of `key`."""
        with self._lock:
            return self._sessions.pop(key, None)

    def expire(self) -> list[str]:
        """Free the sessions idle for longer than `ttl_s` that have no reply running; return their keys."""
        with self._lock:
            sessions = list(self._sessions.items())
        # Each session's lock is taken outside the registry's: the worker may hold it for a token.
        idle = {k: s for k, s in sessions if s.idle_for() > self.ttl_s and not s.busy}
        with self._lock:
            for k, s in idle.items():
                if self._sessions.get(k) is s:
                    del self._sessions[k]
        return list(idle)

    def reset_all(self) -> list[Session]:
        """Remove every session (a model switch), remembering their keys for `take_reset_notice`."""
        with self._lock:
            old, self._sessions = list(self._sessions.values()), {}
            self._reset |= {s.key for s in old}
        return old

    def take_reset_notice(self, key: str) -> bool:
        """Whether `key`'s session was reset by a model switch since it last asked (asking clears it)."""
        with self._lock:
            if key in self._reset:
                self._reset.discard(key)
                return True
            return False

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._reset.clear()

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def values(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def __contains__(self, key: Any) -> bool:
        with self._lock:
            return key in self._sessions

    def __getitem__(self, key: str) -> Session:
        with self._lock:
            return self._sessions[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __iter__(self):
        return iter(self.keys())
