"""The one thread that runs MLX for a server, with a fair first-come first-served queue.

MLX must not be driven from several threads at once, and a single model instance serves every
session, so all model work (loading, prefill, decoding, undo, import) runs here. Two kinds
of work are queued:

* jobs: streamed generations, run one at a time in arrival order. A job is a generator; the worker
  advances it one item (one token) at a time and checks the job's cancel flag in between, so Stop
  takes effect within a token and the generator is closed (`GeneratorExit`) where it stands.
* calls: short tasks (undo, reset, import, loading a model). They run between two tokens of the
  running job instead of waiting for it to finish, so other users' buttons stay responsive.

What the worker thread and the callers' threads share goes through `Worker`'s lock (the queue, the
running job), a job's own lock (its item count) or a thread-safe queue or event (its items, its end).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

DONE = object()  # the last item of every job's event queue


class Job:
    """A streamed generation queued on the worker: `events` receives its items, then `DONE`.

    `error` (set before `done`) is the exception that ended the job, if one did.
    """

    def __init__(self, owner: str, start: Callable[[], Iterator[Any]]):
        self.owner = owner
        self.start = start
        self.events: queue.Queue = queue.Queue()
        self.started = threading.Event()
        self.done = threading.Event()
        self.cancelled = threading.Event()
        self.error: BaseException | None = None
        self._items = 0
        self._lock = threading.Lock()

    @property
    def items(self) -> int:
        """Items produced so far (tokens, for a chat reply)."""
        with self._lock:
            return self._items

    def cancel(self) -> None:
        """Ask the worker to stop this job at the next token (or drop it if still waiting)."""
        self.cancelled.set()


class Worker:
    """A dedicated thread running jobs (FIFO, one at a time) and calls (between tokens)."""

    def __init__(self, name: str = "rg-mlx-worker"):
        self._cond = threading.Condition()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._waiting: deque[Job] = deque()
        self._active: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---- API used by the UI threads -------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` on the worker thread and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker was closed")
            self._calls.append((lambda: fn(*args, **kwargs), future))
            self._cond.notify()
        return future.result()

    def submit(self, owner: str, start: Callable[[], Iterator[Any]]) -> Job:
        """Queue a generation; `start()` is called on the worker thread and must return an iterator."""
        job = Job(owner, start)
        with self._cond:
            self._waiting.append(job)
            self._cond.notify()
        return job

    def ahead(self, job: Job) -> int:
        """How many jobs run or wait before `job` (0 once it runs or ended)."""
        with self._cond:
            if job not in self._waiting:
                return 0
            return self._waiting.index(job) + (self._active is not None)

    def cancel(self, owner: str | None = None) -> None:
        """Cancel the running job and drop the waiting ones of `owner` (everyone's when None)."""
        self._cancel_where(lambda job: owner in (None, job.owner))

    def cancel_job(self, job: Job) -> None:
        """Cancel `job` if it is running, drop it if it is waiting."""
        self._cancel_where(lambda other: other is job)

    def _cancel_where(self, match: Callable[[Job], bool]) -> None:
        with self._cond:
            if self._active is not None and match(self._active):
                self._active.cancel()
            for job in [j for j in self._waiting if match(j)]:
                self._waiting.remove(job)
                job.cancel()
                job.events.put(DONE)
                job.done.set()
            self._cond.notify()

    def active(self) -> Job | None:
        """The job generating right now, if any."""
        with self._cond:
            return self._active

    def close(self) -> None:
        """Cancel every job, finish pending calls and stop the thread."""
        self.cancel()
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the worker thread ---------------------------------------------------------------
    def _loop(self) -> None:
        stream: Iterator[Any] | None = None
        while True:
            with self._cond:
                while not (self._closed or self._calls or self._waiting or self._active):
                    self._cond.wait()
                if self._closed and not (self._calls or self._active):
                    break
                call = self._calls.popleft() if self._calls else None
                if call is None and self._active is None:
                    self._active = self._waiting.popleft()
                    self._active.started.set()
                job = self._active
            if call is not None:
                fn, future = call
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the caller
                    future.set_exception(e)
                continue
            stream = self._step(job, stream)

    def _step(self, job: Job, stream: Iterator[Any] | None) -> Iterator[Any] | None:
        """Advance `job` by one item; return its open stream, or None once it finished."""
        try:
            if job.cancelled.is_set():
                raise StopIteration
            if stream is None:
                stream = job.start()
            item = next(stream)
            with job._lock:
                job._items += 1
            job.events.put(item)
            return stream
        except StopIteration:
            pass
        except Exception as e:  # reported to the consumer, the worker keeps serving
            job.error = e
        try:
            getattr(stream, "close", lambda: None)()  # GeneratorExit where the generator stands (Stop)
        except Exception as e:
            job.error = job.error or e
        with self._cond:
            self._active = None
        job.events.put(DONE)
        job.done.set()
        return None
