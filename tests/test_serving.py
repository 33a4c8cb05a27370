"""The serving layer without Gradio: sessions sharing one worker, expiry, model switches (tiny models)."""

from __future__ import annotations

import copy

import pytest

from conftest import write_tiny_model
from rg_mlx import RGError, load
from rg_mlx.chat import ChatSession
from rg_mlx.sampling import APP, SamplingConfig
from rg_mlx.serving import ChatService, NoModel, SessionRegistry

PROMPT = "Hello world! How are you today?"
SHORT = SamplingConfig(temperature=1.5, seed=3, max_tokens=12)
LONG = SamplingConfig(max_tokens=100_000)


def endless_loader(path, dtype=None, adapter_path=None):
    """`rg_mlx.load` with a tokenizer that never stops: every reply runs to its `max_tokens`."""
    model, tokenizer = load(path, dtype=dtype)
    tokenizer = copy.copy(tokenizer)
    tokenizer.stop_ids = frozenset()
    return model, tokenizer


@pytest.fixture
def service(tiny_model_dir):
    service = ChatService(str(tiny_model_dir), sampling=APP, loader=endless_loader)
    yield service
    service.close()


def reference(service: ChatService, turns: list[tuple[str, SamplingConfig]]) -> list[dict]:
    """The history of a plain ChatSession given the same turns (run on the service's worker)."""

    def run():
        session = ChatSession(service.models.model, service.models.tokenizer)
        for text, sampling in turns:
            for _ in session.send(text, sampling=sampling):
                pass
        return session.history

    return service.worker.call(run)


def finish(service: ChatService, reply) -> str:
    """Follow a reply to its end; the text it streamed."""
    text = ""
    for progress in service.follow(reply, update_every=0):
        assert progress.response is not None or progress.ahead > 0 or progress.prefill is not None
        text = progress.text
    return text


def test_two_sessions_share_the_worker_in_turn(service):
    a, b = service.session("a"), service.session("b")
    assert a is service.session("a") and a.chat is not b.chat
    running = service.send(a, PROMPT, LONG)
    running.job.started.wait(10)
    assert running.shown == [{"role": "user", "content": PROMPT}]
    with a.lock:  # the worker needs a's lock for its next token: it waits, and so does every other job
        waiting = service.send(b, "The quick brown fox", SHORT)
        assert service.worker.ahead(waiting.job) == 1 and not waiting.job.started.is_set()
        follow_b = service.follow(waiting, update_every=0)
        progress = next(follow_b)  # while b waits: how many are ahead of it
        assert progress.response is None and progress.ahead == 1 and not waiting.job.started.is_set()
        service.worker.cancel_job(running.job)  # Stop for a only
    running.job.done.wait(10)
    assert running.job.cancelled.is_set() and not waiting.job.cancelled.is_set()
    for progress in follow_b:  # b runs once a stopped: it reads its message, then generates
        assert progress.response is not None or progress.prefill is not None
    assert waiting.job.done.is_set() and waiting.job.error is None and waiting.job.items == 12

    # Each has its own conversation: b's equals a plain session's; a kept its partial reply.
    assert b.view().messages == reference(service, [("The quick brown fox", SHORT)])
    view_a = a.view()
    assert [m["role"] for m in view_a.messages] == ["user", "assistant"] and view_a.stopped and not view_a.busy
    assert view_a.last.generation_tokens == running.job.items
    assert len(view_a.trace) == running.job.items - 1 and view_a.ttft > 0  # a point per token after the first
    assert all(ms > 0 and mib > 0 for _, ms, mib in view_a.trace)

    # A waiting reply that is cancelled never starts, and leaves its own session as it was.
    running = service.send(a, "Go on", LONG)
    running.job.started.wait(10)
    with a.lock:
        waiting = service.send(b, "Once more", SHORT)
        service.close_session("b")  # b's tab closed while it waited
        assert waiting.job.done.is_set() and not waiting.job.started.is_set() and "b" not in service.sessions
        assert not running.job.done.is_set()
    service.cancel(a)
    assert running.job.done.is_set() and len(a.view().messages) == 4


def test_a_finished_reply_equals_a_plain_session_and_goes_on(service):
    s = service.session("s")
    text = finish(service, service.send(s, PROMPT, SHORT, system="Be brief."))
    turns = [(PROMPT, SHORT)]
    view = s.view()
    assert view.system == "Be brief." and view.settings == SHORT and text
    assert view.messages[-1]["content"].startswith(text)
    assert len(view.times) == 2 and view.last.generation_tokens == 12 and not view.stopped

    def with_system():
        session = ChatSession(service.models.model, service.models.tokenizer, system="Be brief.")
        for text, sampling in turns:
            list(session.send(text, sampling=sampling))
        return session.history

    assert view.messages == service.worker.call(with_system)
    retry = SHORT.replace(seed=4)
    reply = service.regenerate(s, retry)
    assert reply.shown == view.messages[:1]
    finish(service, reply)
    turns = [(PROMPT, retry)]
    assert s.view().messages == service.worker.call(with_system)
    assert service.undo(s) == PROMPT and s.view().messages == [] and s.view().times == []
    assert service.undo(s) is None and service.regenerate(s, SHORT) is None

    # The checks that need the model come before anything is queued.
    with pytest.raises(RGError, match="top_k=400: must be < the vocabulary size, 400"):
        service.send(s, PROMPT, SHORT.replace(top_k=400))
    assert s.job is None or s.job.done.is_set()

    service.restore(s, view.messages, system="Be brief.", sampling=retry, created="then", times=["t1"])
    restored = s.view()
    assert restored.messages == view.messages and restored.created == "then" and restored.times[0] == "t1"
    assert restored.settings == retry and restored.last is None and restored.trace == []
    service.clear(s, "New system")
    assert s.view().messages == [] and s.view().system == "New system"


def test_idle_sessions_expire(service, tiny_model_dir):
    now = [0.0]
    registry = SessionRegistry(ttl_s=10, clock=lambda: now[0])
    chat = ChatSession(service.models.model, service.models.tokenizer)  # only read here
    a = registry.add("a", chat, APP)
    assert registry.add("a", chat, APP) is a  # the first one stays
    now[0] = 5
    b = registry.add("b", chat, APP)
    now[0] = 12
    assert registry.expire() == ["a"] and "a" not in registry and registry["b"] is b
    now[0] = 14
    b.touch()
    now[0] = 23
    assert registry.expire() == [] and len(registry) == 1  # idle for 9 s since its last use

    # Through the service: a new session frees the idle ones, but never one whose reply still runs.
    service.sessions.clock = lambda: now[0]
    service.sessions.ttl_s = 10
    idle, busy = service.session("idle"), service.session("busy")
    reply = service.send(busy, PROMPT, LONG)
    now[0] = 100
    service.session("new")
    assert service.sessions.keys() == ["busy", "new"]
    service.cancel(busy)
    assert reply.job.done.is_set()
    now[0] = 200
    service.session("newer")
    assert service.sessions.keys() == ["newer"]


def test_switching_the_model_resets_sessions_and_cancels_replies(service, tmp_path, tiny_tokenizer_path):
    first = service.models.current
    a, b = service.session("a"), service.session("b")
    finish(service, service.send(b, PROMPT, SHORT))
    running = service.send(a, PROMPT, LONG)
    while running.job.items < 2:  # no lock held: the switch runs on the worker between two tokens
        running.job.events.get(timeout=10)
    other = write_tiny_model(tmp_path / "other", tiny_tokenizer_path, seed=1)
    service.load(str(other))
    assert running.job.done.wait(10) and running.job.cancelled.is_set() and running.job.items < 100_000
    assert service.models.path == str(other) and service.models.model is not first.model
    assert len(service.sessions) == 0
    assert service.sessions.take_reset_notice("a") and not service.sessions.take_reset_notice("a")
    assert service.sessions.take_reset_notice("b") and not service.sessions.take_reset_notice("new")
    fresh = service.session("a")
    assert fresh is not a and fresh.view().messages == [] and fresh.chat.model is service.models.model

    # A failed load changes nothing.
    with pytest.raises(RGError, match="no such model folder"):
        service.load(str(tmp_path / "missing"))
    assert service.models.path == str(other) and service.sessions["a"] is fresh
    assert not service.sessions.take_reset_notice("a")


def test_without_a_model():
    service = ChatService()
    try:
        assert service.models.current is None
        with pytest.raises(NoModel):
            service.session("x")
        assert len(service.sessions) == 0
    finally:
        service.close()


LONG_MESSAGE = "The quick brown fox jumps over the lazy dog. " * 30  # over 512 tokens: two prefill chunks


def test_follow_reports_how_far_the_prompt_has_been_read(service, slow_prefill):
    session = service.session("reader")
    reply = service.send(session, LONG_MESSAGE, SHORT)
    progress = list(service.follow(reply, update_every=0))
    tokenizer = service.models.tokenizer
    total = len(tokenizer.chat_tokens([{"role": "user", "content": LONG_MESSAGE}]))
    assert total > 512
    reading = [p for p in progress if p.prefill is not None]
    assert [(p.prefill.done, p.prefill.total) for p in reading] == [(d, total) for d in range(0, total, 512)] + [
        (total, total)]
    first_token = next(i for i, p in enumerate(progress) if p.response is not None)
    assert all(p.response is None and p.text == "" for p in progress[:first_token])  # reading comes first
    assert progress.index(reading[-1]) < first_token and reading[-1].prefill.tps > 0
    assert session.view().messages[-1]["content"].startswith(progress[-1].text)
