"""Chat sessions: incremental turns equal the whole conversation, undo/regenerate, partial replies,
save/load, other threads."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

from conftest import write_tiny_model
from rg_mlx import ChatSession, RGError, SamplingConfig, load
from rg_mlx.sampling import CHAT
from rg_mlx.state import copy_state, restore_state

MESSAGES = ["Hello!", "How are you today?", "Tell me about RecurrentGemma.", "Thanks, bye."]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_model_dir)


def next_logits(session: ChatSession, probe: list[int]) -> np.ndarray:
    """Logits after the session's state plus its unfed tokens plus `probe` (the session is untouched)."""
    model = session.model
    cache = model.make_cache()
    restore_state(cache, copy_state(session.cache))
    ids = session.tokens[session.tokens_seen :] + probe
    return np.array(model(mx.array([ids]), cache=cache)[0, -1])


def full_logits(session: ChatSession, probe: list[int]) -> np.ndarray:
    return np.array(session.model(mx.array([session.tokens + probe]))[0, -1])


def chat(session: ChatSession, text: str, **overrides) -> str:
    return "".join(r.text for r in session.send(text, **overrides))


def state_arrays(session: ChatSession) -> list[np.ndarray]:
    return [np.array(a) for arrays in copy_state(session.cache) for a in arrays if a is not None]


def assert_same_state(a: ChatSession, b: ChatSession) -> None:
    assert a.tokens == b.tokens and a.tokens_seen == b.tokens_seen
    for x, y in zip(state_arrays(a), state_arrays(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_incremental_turns_equal_the_whole_conversation(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="Be brief.", max_tokens=12)
    seen, sizes = [], set()
    for i, text in enumerate(MESSAGES[:3]):
        before = session.tokens_seen
        responses = list(session.send(text, stop=["xyz"] if i == 1 else None))
        sizes.add(responses[-1].state_bytes)
        # Only the new tokens went through the model at this turn.
        recorded = len(responses) - (responses[-1].token in tokenizer.stop_ids)
        assert responses[0].prompt_tokens == len(session.tokens) - before - recorded
        seen.append(session.tokens_seen)
    assert seen == sorted(seen) and len(sizes) == 1
    assert session.state_bytes == sizes.pop()
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 3
    assert [m["content"] for m in session.history[::2]] == MESSAGES[:3]
    # The conversation is Gemma's chat format, system prompt folded into the first turn.
    first = tokenizer.chat_tokens([{"role": "user", "content": MESSAGES[0]}], system="Be brief.")
    assert session.tokens[: len(first)] == first
    assert session.tokens.count(tokenizer.bos_id) == 1
    assert session.tokens.count(tokenizer.start_of_turn_id) == 6
    # The kept state is exactly the conversation's: same logits as one pass over it.
    probe = tokenizer.chat_tokens([{"role": "user", "content": "Next"}], continuation=True)
    np.testing.assert_allclose(next_logits(session, probe), full_logits(session, probe), atol=1e-4)


def test_stopped_reply_is_kept_and_state_matches(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=40)
    chat(session, MESSAGES[0])
    stream = session.send(MESSAGES[1])
    shown = "".join(next(stream).text for _ in range(3))
    stream.close()  # the app's Stop button
    assert session.history[-1] == {"role": "assistant", "content": shown}
    assert session.tokens_seen == len(session.tokens) - 1  # the last sampled token is fed next turn
    probe = tokenizer.chat_tokens([{"role": "user", "content": "Go on"}], continuation=True)
    np.testing.assert_allclose(next_logits(session, probe), full_logits(session, probe), atol=1e-4)
    chat(session, "Go on")
    assert len(session.history) == 6
    np.testing.assert_allclose(next_logits(session, probe), full_logits(session, probe), atol=1e-4)
    # Dropping a half-read stream (break out of a for loop) closes it too.
    for _ in session.send("More"):
        break
    assert len(session.history) == 8 and session.tokens_seen == len(session.tokens) - 1


def test_undo_then_send_equals_fresh_session(loaded):
    model, tokenizer = loaded
    a = ChatSession(model, tokenizer, system="sys", max_tokens=10)
    for text in MESSAGES[:3]:
        chat(a, text)
    a.undo()
    assert len(a.history) == 4
    reply = chat(a, MESSAGES[3])
    b = ChatSession(model, tokenizer, system="sys", max_tokens=10)
    for text in (MESSAGES[0], MESSAGES[1]):
        chat(b, text)
    assert chat(b, MESSAGES[3]) == reply
    assert a.history == b.history
    assert_same_state(a, b)


def test_undo_beyond_the_kept_snapshots_refeeds(loaded):
    model, tokenizer = loaded
    a = ChatSession(model, tokenizer, max_snapshots=1, max_tokens=10)
    for text in MESSAGES[:3]:
        chat(a, text)
    a.undo()  # from the snapshot
    a.undo()  # beyond it: re-fed from the recorded tokens
    assert len(a.history) == 2
    reply = chat(a, MESSAGES[3])
    b = ChatSession(model, tokenizer, max_tokens=10)
    chat(b, MESSAGES[0])
    assert chat(b, MESSAGES[3]) == reply
    assert_same_state(a, b)
    a.undo()
    a.undo()
    assert a.history == [] and a.tokens_seen == 0 and a.state_bytes == 0
    with pytest.raises(RGError, match="nothing to undo"):
        a.undo()
    with pytest.raises(RGError, match="nothing to regenerate"):
        list(a.regenerate())


def test_regenerate(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=10)
    chat(session, MESSAGES[0])
    first = chat(session, MESSAGES[1])
    state = state_arrays(session)
    again = "".join(r.text for r in session.regenerate())
    assert again == first and len(session.history) == 4  # greedy: same reply, one exchange
    for x, y in zip(state, state_arrays(session), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    # Sampling: a regenerated reply draws anew; the session stays reproducible under its seed.
    sampled = [ChatSession(model, tokenizer, max_tokens=20, temperature=2.0, seed=3) for _ in range(2)]
    replies = []
    for s in sampled:
        replies.append([chat(s, MESSAGES[0])] + ["".join(r.text for r in s.regenerate())])
    assert replies[0] == replies[1]
    assert replies[0][0] != replies[0][1]


def test_regenerate_changes_nothing_until_iterated(loaded, tmp_path):
    """`regenerate()` and `send()` return generators: a reply that is never iterated leaves the conversation,
    and what `save` writes, as it was."""
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=8)
    first = chat(session, MESSAGES[0])
    history, tokens, state = session.history, session.tokens, state_arrays(session)
    session.regenerate()  # not iterated
    session.send("Never sent")  # not iterated either (and it closes the regenerate)
    assert session.history == history and session.tokens == tokens
    session.save(tmp_path / "talk.safetensors")
    restored = ChatSession.load(tmp_path / "talk.safetensors", model, tokenizer)
    assert restored.history == history
    assert history == [{"role": "user", "content": MESSAGES[0]}, {"role": "assistant", "content": first}]
    for x, y in zip(state, state_arrays(restored), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # Iterated, it replaces the reply (greedy: the same one).
    assert "".join(r.text for r in session.regenerate()) == first and session.history == history


def test_regenerate_that_fails_before_its_first_token_keeps_the_old_reply(loaded, monkeypatch):
    import rg_mlx.chat

    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=8)
    chat(session, MESSAGES[0])
    history, tokens, state = session.history, session.tokens, state_arrays(session)

    def broken(*args, **kwargs):
        raise RuntimeError("the model failed")
        yield

    monkeypatch.setattr(rg_mlx.chat, "stream_generate", broken)
    with pytest.raises(RuntimeError, match="the model failed"):
        list(session.regenerate())
    assert session.history == history and session.tokens == tokens
    for x, y in zip(state, state_arrays(session), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_regenerate_after_undoing_the_only_exchange_says_why(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=4)
    with pytest.raises(RGError, match="nothing to regenerate: the conversation is empty"):
        session.regenerate()
    chat(session, MESSAGES[0])
    session.undo()
    with pytest.raises(RGError, match="nothing to regenerate: the conversation is empty"):
        session.regenerate()


def test_prefill_progress_covers_the_new_tokens(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=4)
    calls = []
    reply = session.send(MESSAGES[0], prefill_progress=calls.append)
    assert calls == []  # nothing until iterated
    list(reply)
    new = len(tokenizer.chat_tokens([{"role": "user", "content": MESSAGES[0]}]))
    assert [(c.done, c.total) for c in calls] == [(0, new), (new, new)]
    calls.clear()
    list(session.regenerate(prefill_progress=calls.append))
    assert [(c.done, c.total) for c in calls] == [(0, new), (new, new)]


def test_save_and_load_continue_identically(loaded, tmp_path, tiny_tokenizer_path):
    model, tokenizer = loaded
    a = ChatSession(model, tokenizer, system="sys", max_tokens=12, temperature=1.0, seed=11)
    chat(a, MESSAGES[0])
    stream = a.send(MESSAGES[1])
    next(stream)
    stream.close()  # a partial reply with an unfed token
    a.save(tmp_path / "chat.safetensors")
    b = ChatSession.load(tmp_path / "chat.safetensors", model, tokenizer)
    assert b.history == a.history and b.settings == a.settings and b.system == "sys"
    assert_same_state(a, b)
    assert chat(a, MESSAGES[2]) == chat(b, MESSAGES[2])
    assert_same_state(a, b)
    b.undo()  # no snapshots after a load: re-fed from the saved tokens
    a.undo()
    assert_same_state(a, b)
    # A file for another model is refused; so is a file that is not a session.
    other, _ = load(write_tiny_model(tmp_path / "other", tiny_tokenizer_path, seed=1))
    with pytest.raises(RGError, match="different model"):
        ChatSession.load(tmp_path / "chat.safetensors", other, tokenizer)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(RGError, match="not a chat session"):
        ChatSession.load(tmp_path / "junk.safetensors", model, tokenizer)
    with pytest.raises(RGError, match="no such folder"):
        a.save(tmp_path / "missing" / "chat.safetensors")
    # An empty session saves and loads too.
    ChatSession(model, tokenizer).save(tmp_path / "empty.safetensors")
    assert ChatSession.load(tmp_path / "empty.safetensors", model, tokenizer).history == []


def test_from_history(loaded):
    model, tokenizer = loaded
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there! 🙂"},
        {"role": "user", "content": "How are you?"},
        {"role": "model", "content": "Fine, thanks.\n"},
        {"role": "user", "content": "unanswered"},
    ]
    session = ChatSession.from_history(model, tokenizer, messages, system="sys", max_tokens=6)
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2  # the unanswered turn is dropped
    assert session.history[3]["content"] == "Fine, thanks.\n"
    # The state is the conversation in the chat format, its last model turn still open.
    whole = tokenizer.chat_tokens(messages[:4], system="sys", add_generation_prompt=False)
    assert whole[-2:] == [tokenizer.end_of_turn_id, *tokenizer.encode("\n", add_bos=False)]
    assert session.tokens == whole[:-2] and session.tokens_seen == len(whole) - 2
    probe = tokenizer.chat_tokens([{"role": "user", "content": "Next"}], continuation=True)
    np.testing.assert_allclose(next_logits(session, probe), full_logits(session, probe), atol=1e-4)
    # It goes on like a live session: send, then undo from a prefill snapshot.
    assert len(list(session.send("Next"))) > 0
    session.undo()
    session.undo()
    assert_same_state(session, ChatSession.from_history(model, tokenizer, messages[:2], system="sys"))
    with pytest.raises(RGError, match="alternate"):
        ChatSession.from_history(model, tokenizer, messages[1:])


def test_usable_from_worker_threads(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=8, temperature=1.0, seed=5)
    replies = []

    def in_thread(fn, *args):
        out = []
        t = threading.Thread(target=lambda: out.append(fn(*args)))
        t.start()
        t.join()
        assert out, "the call failed in its thread"
        return out[0]

    replies.append(in_thread(chat, session, MESSAGES[0]))
    # Each step of one reply in a different thread, as a web server's worker pool does.
    stream = in_thread(session.send, MESSAGES[1])
    replies.append("".join(in_thread(lambda: next(stream).text) for _ in range(8)))
    in_thread(stream.close)
    same = ChatSession(model, tokenizer, max_tokens=8, temperature=1.0, seed=5)
    assert replies == [chat(same, text) for text in MESSAGES[:2]]
    assert_same_state(session, same)


def test_settings_and_reset(loaded):
    model, tokenizer = loaded
    with pytest.raises(RGError, match="unknown sampling setting 'temprature'"):
        ChatSession(model, tokenizer, temprature=0.5)
    session = ChatSession(model, tokenizer, max_tokens=5)
    assert session.settings == CHAT.replace(max_tokens=5) and CHAT.max_tokens == 512
    rs = list(session.send(MESSAGES[0], max_tokens=3))
    assert len(rs) <= 3 and session.settings.max_tokens == 5
    with pytest.raises(RGError, match="temperature"):
        session.send("x", temperature=-1)
    with pytest.raises(RGError, match="top_p"):
        session.regenerate(top_p=0)
    assert len(session.history) == 2 and session.tokens_seen > 0
    before = session.history[-1]["content"]
    assert "".join(r.text for r in session.regenerate(max_tokens=3)) == before
    session.settings = session.settings.replace(max_tokens=2)
    assert len(list(session.regenerate())) <= 2
    session.reset()
    assert session.history == [] and session.tokens == [] and session.settings.max_tokens == 2


def test_reply_seeds_derive_from_the_session_seed_unless_given(loaded):
    model, tokenizer = loaded
    sampled = SamplingConfig(temperature=2.0, max_tokens=12, seed=3)
    session = ChatSession(model, tokenizer, sampling=sampled)
    derived = [r.token for r in session.send(MESSAGES[0])]
    # Reply 0 of a session with seed 3 draws with seed 3 * 1_000_003 + 0 (mod 2**31).
    plain = ChatSession(model, tokenizer)
    assert [r.token for r in plain.send(MESSAGES[0], sampling=sampled.replace(seed=3_000_009))] == derived
    # A seed given for one reply (in a config or as a keyword) is used as given, for that reply only.
    given = ChatSession(model, tokenizer, sampling=sampled)
    as_given = [r.token for r in given.send(MESSAGES[0], sampling=sampled)]
    again = ChatSession(model, tokenizer, sampling=sampled)
    assert [r.token for r in again.send(MESSAGES[0], seed=3)] == as_given != derived


def test_sessions_saved_by_format_1_still_load(loaded, tmp_path):
    # Format 1 stored the ring's key positions themselves (-2**30 for an empty slot), and the settings as
    # the previous version wrote them: its own dict, `stop` null when unset.
    import json

    model, tokenizer = loaded
    a = ChatSession(model, tokenizer, max_tokens=6, temperature=1.0, seed=2)
    chat(a, MESSAGES[0])
    a.save(tmp_path / "v2.safetensors")
    arrays, metadata = mx.load(str(tmp_path / "v2.safetensors"), format="safetensors", return_metadata=True)
    meta = json.loads(metadata["rg_mlx_chat"])
    assert meta["format"] == "rg_mlx.chat/2" and meta["settings"] == a.settings.to_dict()
    meta["format"] = "rg_mlx.chat/1"
    meta["settings"] = {"max_tokens": 6, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                        "repetition_penalty": None, "repetition_context_size": 20, "seed": 2, "stop": None}
    for i, kind in enumerate(model.args.layer_types):
        if kind == "attention":
            slots = arrays[f"state.{i}.2"]
            arrays[f"state.{i}.2"] = mx.where(slots == 0, -(2**30), slots - 1).astype(mx.int32)
    mx.save_safetensors(str(tmp_path / "v1.safetensors"), arrays, metadata={"rg_mlx_chat": json.dumps(meta)})
    b = ChatSession.load(tmp_path / "v1.safetensors", model, tokenizer)
    assert b.settings == a.settings and b.history == a.history
    assert_same_state(a, b)
    assert chat(a, MESSAGES[1]) == chat(b, MESSAGES[1])
