"""The chat app, driven in-process through gradio_client against a server on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from rg_mlx.app import models as app_models
from rg_mlx import RGError
from rg_mlx.app.server import NO_MODEL, ChatApp
from rg_mlx.serving import DONE, Worker

PROMPT = "Hello world! How are you today?"
# The UI settings as the app's API takes them (temperature, top-p, top-k, min-p, repetition
# penalty, max new tokens, seed) and the ChatSession overrides they must turn into.
UI = dict(temperature=1.5, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=24, seed=1)
OVERRIDES = dict(UI, repetition_penalty=None)


def ui(**changes) -> list:
    return list({**UI, **changes}.values())


def overrides(**changes) -> dict:
    return {**OVERRIDES, **changes}


def text(content) -> str:
    """A chatbot message's text (Gradio 6 sends a list of parts)."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content)
    return content


def history(chatbot) -> list[dict]:
    """Messages shown by the chatbot (which trims surrounding whitespace)."""
    return [{"role": m["role"], "content": text(m["content"]).strip()} for m in chatbot]


def shown(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"].strip()} for m in messages]


@pytest.fixture(scope="module")
def connections():
    """Every address a socket of this process connects to while the app's tests run."""
    seen = []
    connect = socket.socket.connect

    def recording(self, address):
        seen.append(address)
        return connect(self, address)

    socket.socket.connect = recording
    yield seen
    socket.socket.connect = connect


@pytest.fixture(scope="module")
def served(connections, tiny_model_dir):
    app = ChatApp(str(tiny_model_dir), update_every=0)  # every token batch goes out at once
    demo = app.launch("127.0.0.1", None, quiet=True)
    assert demo.local_url.startswith("http://127.0.0.1:")
    yield app, demo.local_url
    demo.close()
    app.close()


@pytest.fixture
def client(served):
    from gradio_client import Client

    return Client(served[1], verbose=False)


def reference(app: ChatApp, turns: list[tuple[str, dict]], *, cut: int | None = None) -> list[dict]:
    """History of a plain ChatSession given the same turns; `cut` stops the first reply after that many tokens."""
    from rg_mlx.chat import ChatSession

    def run():
        session = ChatSession(app.model, app.tokenizer)
        for i, (message, settings) in enumerate(turns):
            stream = session.send(message, **settings)
            if i == 0 and cut is not None:
                for _ in range(cut):
                    next(stream)
                stream.close()
            else:
                for _ in stream:
                    pass
        return session.history

    return app.worker.call(run)  # MLX runs on the app's worker thread only


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_streams_in_chunks_then_stats(served, client):
    job = client.submit(PROMPT, "", *ui(max_tokens=100), api_name="/send")
    outputs = list(job)
    final_textbox, chatbot, stats, latency, memory = job.outputs()[-1]
    assert outputs[0][0] == ""  # the textbox is cleared at once
    partials = {text(o[1][-1]["content"]) for o in outputs[:-1] if o[1][-1]["role"] == "assistant"}
    assert len(partials) >= 3, f"the reply did not stream: {len(partials)} distinct partial texts"
    assert history(chatbot)[0] == {"role": "user", "content": PROMPT}
    for part in ("100 tokens", "tok/s", "first token", "prompt ", "MiB** (fixed)", "tokens in this chat"):
        assert part in stats
    latency, memory = latency["value"], memory["value"]  # plot updates: the data and the y axis's range
    assert len(latency["data"]) == 99 and len(memory["data"]) == 99  # one point per token after the first
    assert all(row[1] > 0 for row in memory["data"])


def test_second_message_continues_the_same_state(served, client):
    app = served[0]
    client.predict(PROMPT, "", *ui(seed=3), api_name="/send")
    chatbot = client.predict("The quick brown fox", "", *ui(seed=4), api_name="/send")[1]
    expected = reference(app, [(PROMPT, overrides(seed=3)), ("The quick brown fox", overrides(seed=4))])
    assert history(chatbot) == shown(expected)
    assert app.sessions[client.session_hash].chat.history == expected

    # Retry = regenerate; Undo drops the exchange and gives the message back for editing.
    chatbot = client.predict(*ui(seed=9), api_name="/retry")[0]
    expected = reference(app, [(PROMPT, overrides(seed=3)), ("The quick brown fox", overrides(seed=9))])
    assert history(chatbot) == shown(expected)
    chatbot, textbox, stats = client.predict(api_name="/undo")
    assert textbox == "The quick brown fox" and history(chatbot) == shown(expected[:2])
    chatbot = client.predict("Edited question", "", *ui(seed=5), api_name="/send")[1]
    assert app.sessions[client.session_hash].chat.history == reference(
        app, [(PROMPT, overrides(seed=3)), ("Edited question", overrides(seed=5))]
    )
    assert history(chatbot)[-2] == {"role": "user", "content": "Edited question"}


def test_stop_ends_backend_generation_and_keeps_the_session_consistent(served, client):
    app = served[0]
    job = client.submit(PROMPT, "", *ui(max_tokens=5000, seed=7), api_name="/send")
    wait_for(lambda: client.session_hash in app.sessions and app.sessions[client.session_hash].job is not None)
    slot = app.sessions[client.session_hash]
    worker_job = slot.job
    wait_for(lambda: worker_job.items >= 5)
    chatbot, stats, _, _ = client.predict(api_name="/stop")
    assert worker_job.done.is_set() and worker_job.cancelled.is_set()
    assert app.worker.active() is None
    produced = worker_job.items
    assert produced < 5000
    time.sleep(0.3)
    assert worker_job.items == produced, "generation went on after Stop"
    assert "stopped" in stats
    job.cancel()

    # The partial reply stays, and the state matches it: the next turn equals a plain session's.
    expected = reference(app, [(PROMPT, overrides(max_tokens=5000, seed=7))], cut=produced)
    assert history(chatbot) == shown(expected)
    chatbot = client.predict("Go on", "", *ui(seed=2), api_name="/send")[1]
    turns = [(PROMPT, overrides(max_tokens=5000, seed=7)), ("Go on", overrides(seed=2))]
    expected = reference(app, turns, cut=produced)
    assert history(chatbot) == shown(expected)
    assert app.sessions[client.session_hash].chat.history == expected

    # Clear cancels a running reply as well.
    previous = slot.job
    client.submit(PROMPT, "", *ui(max_tokens=5000), api_name="/send")
    wait_for(lambda: slot.job is not previous and slot.job.items >= 2)
    running = slot.job
    chatbot = client.predict("", api_name="/clear")[0]
    assert running.done.is_set() and running.items < 5000 and chatbot == []
    assert app.sessions[client.session_hash].chat.history == []


def test_two_clients_queue_fairly_and_do_not_mix(served):
    from gradio_client import Client

    app, url = served
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    second.predict("", api_name="/clear")  # its session exists before the worker is held below
    long_job = first.submit(PROMPT, "", *ui(max_tokens=60, seed=1), api_name="/send")
    wait_for(lambda: first.session_hash in app.sessions and app.sessions[first.session_hash].job is not None)
    wait_for(lambda: app.sessions[first.session_hash].job.items >= 1)
    # Hold the worker between two tokens of the long reply (a call runs there) until the second client
    # has been told it waits: however fast the machine, the long reply cannot end before that.
    gate = threading.Event()
    holding = threading.Thread(target=app.worker.call, args=(gate.wait,))
    holding.start()
    try:
        short_job = second.submit("The quick brown fox", "", *ui(seed=2), api_name="/send")
        wait_for(lambda: any("ahead of you" in str(o[2]) for o in short_job.outputs()))
    finally:
        gate.set()
        holding.join()
    second_outputs = list(short_job)
    long_job.result()
    waiting = [o[2] for o in second_outputs if isinstance(o[2], str) and "ahead of you" in o[2]]
    assert waiting and waiting[0] == "waiting: 1 ahead of you"

    one = reference(app, [(PROMPT, overrides(max_tokens=60, seed=1))])
    two = reference(app, [("The quick brown fox", overrides(seed=2))])
    assert app.sessions[first.session_hash].chat.history == one
    assert app.sessions[second.session_hash].chat.history == two
    assert history(long_job.outputs()[-1][1]) == shown(one)
    assert history(short_job.outputs()[-1][1]) == shown(two)


def test_export_and_import(served, client, tmp_path):
    from gradio_client import Client, handle_file

    app, url = served
    client.predict(PROMPT, "Answer briefly.", *ui(seed=3), api_name="/send")
    exported = json.loads(Path(client.predict(api_name="/export_json")).read_text())
    assert exported["format"] == "rg-mlx-chat" and exported["model"] == Path(app.model_path).name
    assert exported["system"] == "Answer briefly." and exported["settings"] == {**UI, "seed": 3}
    messages = app.sessions[client.session_hash].chat.history
    assert [{"role": m["role"], "content": m["content"]} for m in exported["messages"]] == messages
    assert all(m["time"].endswith("+00:00") for m in exported["messages"])
    markdown = Path(client.predict(api_name="/export_markdown")).read_text()
    assert PROMPT in markdown and "Answer briefly." in markdown

    path = tmp_path / "chat.json"
    path.write_text(json.dumps(exported))
    other = Client(url, verbose=False)
    out = other.predict(handle_file(str(path)), api_name="/import_json")
    chatbot, system, settings = out[0], out[4], out[5:]
    assert history(chatbot) == shown(messages) and system == "Answer briefly." and list(settings) == ui(seed=3)
    assert app.sessions[other.session_hash].chat.history == messages

    # The imported chat goes on from the state of the imported conversation.
    other.predict("Go on", "Answer briefly.", *ui(seed=8), api_name="/send")

    def continued():
        from rg_mlx.chat import ChatSession

        session = ChatSession.from_history(app.model, app.tokenizer, messages, system="Answer briefly.")
        for _ in session.send("Go on", **overrides(seed=8)):
            pass
        return session.history

    expected = app.worker.call(continued)
    assert expected[-1]["content"].strip()
    assert app.sessions[other.session_hash].chat.history == expected

    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": 3}')
    with pytest.raises(Exception, match="not an rg-mlx conversation"):
        other.predict(handle_file(str(bad)), api_name="/import_json")


def test_switching_models_resets_the_chat(served, client, tmp_path, tiny_tokenizer_path):
    from conftest import write_tiny_model

    app = served[0]
    before = app.model_path
    other = write_tiny_model(tmp_path / "other-model", tiny_tokenizer_path, seed=1)
    try:
        client.predict(PROMPT, "", *ui(), api_name="/send")
        chatbot = client.predict(str(other), api_name="/switch_model")[0]
        assert chatbot == [] and app.model_path == str(other)
        assert client.session_hash not in app.sessions
        picker = client.predict(str(tmp_path / "missing"), api_name="/switch_model")[-1]
        assert picker == str(other) and app.model_path == str(other)  # a failed switch keeps the model
    finally:
        app.load(before)


def test_model_picker_finds_local_and_cached_models(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "rg-tiny")
    (models / "not-a-model").mkdir()
    (models / "other-arch").mkdir()
    (models / "other-arch" / "config.json").write_text('{"model_type": "llama"}')
    assert app_models.models_in_folder(models) == {"rg-tiny": str(models / "rg-tiny")}

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--rg-tiny-mlx" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--someone--rg-tiny-mlx" / "refs").mkdir()
    (cache / "models--someone--rg-tiny-mlx" / "refs" / "main").write_text("a" * 40)
    assert app_models.models_in_hf_cache(cache) == {"someone/rg-tiny-mlx": str(snapshot)}
    assert app_models.models_in_hf_cache(tmp_path / "no-cache-here") == {}  # not an error

    monkeypatch.setattr(app_models, "models_in_hf_cache", lambda: {"someone/rg-tiny-mlx": str(snapshot)})
    found = app_models.list_models(models, current=str(models / "rg-tiny"))
    assert list(found.values())[0] == str(models / "rg-tiny")  # the current model first, once
    assert set(found.values()) >= {str(models / "rg-tiny"), str(snapshot)}
    assert len(found) == len(set(found.values()))


def test_settings_panel_and_sampling_config():
    from rg_mlx.app import settings as panel
    from rg_mlx.sampling import APP, SETTINGS

    config = panel.to_config(ui())
    assert config == APP.replace(**OVERRIDES) and panel.to_panel(config) == UI
    assert panel.to_config(ui(seed=-1)).seed is None and panel.to_panel(APP)["seed"] == -1  # the seed box's "random"
    assert panel.to_config(ui(repetition_penalty=1.2)).repetition_penalty == 1.2
    assert panel.to_panel(APP)["repetition_penalty"] == 1.0  # the slider's "off"
    assert panel.to_config(ui(top_k=64.0, max_tokens=24.0)) == config.replace(top_k=64)  # Gradio sends floats
    for name, value in [("temperature", -1), ("top_p", 0), ("top_k", 1.5), ("max_tokens", 0), ("seed", 2**64)]:
        with pytest.raises(RGError, match=f"^{name}="):
            panel.to_config(ui(**{name: value}))
    # An imported file's settings: the valid ones are taken, the others named and left as they were.
    imported, bad = panel.from_saved({**UI, "top_k": "many", "min_p": 7, "seed": 3, "unknown": 1})
    assert imported == config.replace(top_k=APP.top_k, seed=3) and bad == ["top_k", "min_p"]
    # Every slider's ends are valid values of its field, and it starts at the app preset.
    for name in panel.PANEL[:-1]:
        spec = panel.slider(name)
        assert SETTINGS[name].check(spec["minimum"]) == spec["minimum"] and SETTINGS[name].check(spec["maximum"])
        assert spec["value"] == panel.to_panel(APP)[name]


def test_bad_settings_are_refused_with_the_field_named(served, client):
    with pytest.raises(Exception, match="seed=18446744073709551616: must be in"):
        client.predict(PROMPT, "", *ui(seed=2**64), api_name="/send")
    with pytest.raises(Exception, match="greater than maximum value 200"):  # Gradio checks its sliders' ends
        client.predict(PROMPT, "", *ui(top_k=400), api_name="/send")
    session = served[0].sessions.get(client.session_hash)
    assert session is None or session.view().messages == []


def test_without_a_model_the_app_explains_what_to_do(monkeypatch):
    import gradio as gr

    from rg_mlx.app import settings as panel

    from rg_mlx.cli import build_parser

    monkeypatch.setattr("rg_mlx.app.server.demo_available", lambda: False)
    app = ChatApp(None)
    try:
        demo = app.build()
        placeholders = [b.placeholder for b in demo.blocks.values() if isinstance(b, gr.Chatbot)]
        assert placeholders == [NO_MODEL] and "rg-mlx convert" in NO_MODEL
        sliders = {b.elem_id: (b.minimum, b.maximum, b.value) for b in demo.blocks.values() if isinstance(b, gr.Slider)}
        specs = {f"rg-{n.replace('_', '-')}": panel.slider(n) for n in panel.PANEL[:-1]}
        assert sliders == {k: (s["minimum"], s["maximum"], s["value"]) for k, s in specs.items()}
        with pytest.raises(gr.Error, match="No model loaded"):
            app._session(type("Request", (), {"session_hash": "x"})())
    finally:
        app.close()
    assert not Path(app.exports).exists()  # the download folder goes with the app
    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, None)


def test_worker_runs_calls_between_tokens_and_drops_cancelled_waiters():
    worker = Worker()

    def tokens(n):
        for i in range(n):
            time.sleep(0.005)
            yield i

    try:
        running = worker.submit("a", lambda: tokens(10**6))
        waiting = worker.submit("b", lambda: tokens(3))
        wait_for(lambda: running.items > 0)
        assert worker.ahead(waiting) == 1 and worker.ahead(running) == 0
        assert worker.call(threading.current_thread) is worker._thread  # while "a" is mid-reply
        assert not running.done.is_set()
        worker.cancel("b")  # a waiting job is dropped at once, not when its turn comes
        assert waiting.done.is_set() and waiting.events.get() is DONE and not waiting.started.is_set()
        worker.cancel("a")
        assert running.done.wait(5) and running.error is None and worker.active() is None
    finally:
        worker.close()


def test_nothing_leaves_127_0_0_1(served, connections, client):
    client.predict(PROMPT, "", *ui(max_tokens=4), api_name="/send")
    assert connections, "the socket guard saw no connection at all"
    assert {address[0] for address in connections} == {"127.0.0.1"}


def test_status_line_while_reading_a_long_message(served, client, slow_prefill):
    message = "The quick brown fox jumps over the lazy dog. " * 30
    total = len(served[0].tokenizer.chat_tokens([{"role": "user", "content": message}]))
    outputs = list(client.submit(message, "", *ui(max_tokens=4), api_name="/send"))
    reading = [o[2] for o in outputs if o[2].startswith("reading your message")]
    assert reading[0] == "reading your message…"
    assert f"reading your message: 0 / {total:,} tokens" in reading
    assert any(re.fullmatch(f"reading your message: 512 / {total:,} tokens · [\\d,]+ tok/s", s) for s in reading)
    assert "4 tokens" in outputs[-1][2]  # then the reply's stats


def test_retry_that_gives_the_same_reply_says_why(served, capsys):
    from types import SimpleNamespace

    from rg_mlx.app.server import SAME_REPLY

    app = served[0]
    request = SimpleNamespace(session_hash="same-reply")  # outside Gradio, gr.Info prints its message
    for _ in app.send(request, PROMPT, "", *ui(temperature=0, max_tokens=6)):
        pass
    replies = [app.sessions[request.session_hash].view().messages[-1]["content"]]
    for seed in (1, 2):  # greedy: the same reply again; sampled with another seed: a new one
        capsys.readouterr()
        for _ in app.retry(request, *ui(temperature=0 if seed == 1 else 1.5, seed=seed, max_tokens=6)):
            pass
        replies.append(app.sessions[request.session_hash].view().messages[-1]["content"])
        assert (SAME_REPLY in capsys.readouterr().out) == (replies[-1] == replies[-2]), replies
    assert replies[0] == replies[1] != replies[2]
    app.close_session(request)
