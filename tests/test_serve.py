"""`rg-mlx serve`: mlx-lm's OpenAI-compatible server on our model, driven by the official `openai` client and
raw HTTP against a live server (a subprocess on 127.0.0.1, always stopped) on the demo model.

Replies are checked against rg_mlx's own model and chat format (tokens, log-probabilities), batched replies
against the same requests one at a time, and our layer (API key, model name, disconnects, prompt limit)
through what a client sees and the server's token counter (`GET /stats`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import mlx.core as mx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from rg_mlx import ChatSession, generate, load  # noqa: E402
from rg_mlx.cli import main  # noqa: E402
from rg_mlx.demo import model_path as demo_path  # noqa: E402
from test_lora import adapter, data  # noqa: E402,F401  (fixtures: an adapter trained by `rg-mlx mlx-lm lora`)

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
MAX_PROMPT = 600
QUESTION = "How do I convert a checkpoint?"


class Server:
    """A running `rg-mlx serve` subprocess, at `url`."""

    def __init__(self, url: str):
        self.url = url
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def client(self, key: str | None = KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def request(self, method: str, path: str, body: dict | None = None, key: str | None = KEY):
        """(status, parsed JSON body) of one plain HTTP request."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, json.loads(data) if data else None

    def stats(self) -> dict:
        status, body = self.request("GET", "/stats")
        assert status == 200
        return body


@contextlib.contextmanager
def running(*flags: str):
    """`rg-mlx serve FLAGS` on 127.0.0.1 and a free port; yields a `Server`; always stopped."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rg_mlx", "serve", "--host", "127.0.0.1", "--port", "0", *flags],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 240)
        line = proc.stdout.readline() if ready else ""
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if match is None:
            proc.kill()
            log.seek(0)
            pytest.fail(f"rg-mlx serve did not start: {line!r}\n{log.read()[-3000:]}")
        yield Server(match.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server():
    with running("--api-key", KEY, "--max-prompt-tokens", str(MAX_PROMPT)) as s:
        yield s


@pytest.fixture(scope="module")
def ours():
    """rg_mlx's own model and tokenizer for the demo."""
    return load("demo")


@pytest.fixture(scope="module")
def never_stop(ours) -> dict[str, float]:
    """A `logit_bias` that keeps <eos> and <end_of_turn> away: the reply runs to its max_tokens."""
    tokenizer = ours[1]
    return {str(tokenizer.eos_id): -100, str(tokenizer.end_of_turn_id): -100}


def logprobs_alone(model, ids: list[int], reply: list[int]) -> np.ndarray:
    """Log-probabilities of each token of `reply` after `ids`, by rg_mlx's model in one pass."""
    logits = model(mx.array([ids + reply[:-1]]))[0, len(ids) - 1:].astype(mx.float32)
    lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return lp[np.arange(len(reply)), reply]


def token_ids(choice) -> list[int]:
    """The generated token ids (mlx-lm's `id` beside each log-probability entry)."""
    content = getattr(choice.logprobs, "content", None) or choice.logprobs.model_extra["content"]
    return [e["id"] if isinstance(e, dict) else e.model_extra["id"] for e in content]


# -- The API through the openai client -------------------------------------------------------------


def test_models_name_the_served_model(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    # A request naming another model is refused instead of loading it as a path or hub repo.
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    status, body = server.request("POST", "/v1/completions", {"model": "demo", "prompt": "hi", "adapters": "/tmp"})
    assert status == 400 and "adapters" in body["error"]["message"]


def test_chat_is_our_model_in_our_chat_format(server, ours):
    model, tokenizer = ours
    reply = server.client().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": QUESTION}], max_tokens=80, temperature=0,
    )
    expected = "".join(r.text for r in ChatSession(model, tokenizer, max_tokens=80).send(QUESTION))
    choice = reply.choices[0]
    assert reply.model == "demo" and choice.message.role == "assistant"
    assert choice.message.content == expected and choice.finish_reason == "stop"
    prompt = tokenizer.chat_tokens([{"role": "user", "content": QUESTION}])
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(tokenizer.encode(expected, add_bos=False)) + 1  # and <end_of_turn>


def test_chat_streams_the_same_reply_with_usage(server):
    client = server.client()
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=40, temperature=0)
    chunks = list(client.chat.completions.create(
        model="demo", messages=messages, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert {c.model for c in chunks} == {"demo"}


def test_completion_is_our_greedy_generation(server, ours):
    model, tokenizer = ours
    prompt = "To convert a checkpoint"
    reply = server.client().completions.create(model="demo", prompt=prompt, max_tokens=16, temperature=0)
    assert reply.choices[0].text == generate(model, tokenizer, prompt, max_tokens=16)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_seeds_reproduce_samples(server, never_stop):
    client = server.client()

    def sample(seed):
        return client.completions.create(
            model="demo", prompt="The", max_tokens=24, temperature=1.5, seed=seed, logit_bias=never_stop,
        ).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_stop_strings_end_the_reply(server):
    client = server.client()
    prompt = "To convert a checkpoint"
    full = client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    word = full.split()[3]
    stopped = client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0, stop=[f" {word}"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full[: full.index(f" {word}")]


def test_logprobs_are_our_models(server, ours):
    model, tokenizer = ours
    messages = [{"role": "user", "content": QUESTION}]
    reply = server.client().chat.completions.create(
        model="demo", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    ids = token_ids(reply.choices[0])
    assert len(content) == reply.usage.completion_tokens == len(ids)
    expected = logprobs_alone(model, tokenizer.chat_tokens(messages), ids)
    np.testing.assert_allclose([e.logprob for e in content], expected, atol=1e-4)
    for entry, i in zip(content, ids):
        assert entry.token == tokenizer.sp.id_to_piece(i)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the top one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    # The legacy shape of /v1/completions.
    legacy = server.client().completions.create(
        model="demo", prompt="To convert", max_tokens=6, temperature=0, logprobs=2,
    ).choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 6


def test_a_follow_up_continues_from_the_cached_state(server, ours):
    model, tokenizer = ours
    client = server.client()
    first_turn = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(model="demo", messages=first_turn, max_tokens=80, temperature=0)
    answer = first.choices[0].message.content
    follow_up = [*first_turn, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="demo", messages=follow_up, max_tokens=60, temperature=0)
    # The whole first exchange (prompt, reply and its <end_of_turn>) came from the state kept after it.
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens == len(tokenizer.chat_tokens(follow_up))
    session = ChatSession(model, tokenizer, max_tokens=80)
    assert "".join(r.text for r in session.send(QUESTION)) == answer
    session.settings = session.settings.replace(max_tokens=60)
    assert "".join(r.text for r in session.send("And then?")) == second.choices[0].message.content


def test_raw_server_sent_events(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    body = {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 20, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events = [line for line in response.read().decode().split("\n\n") if line.startswith("data: ")]
    conn.close()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert len(chunks) > 2 and len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "demo" for c in chunks)


# -- Batching: concurrent replies are the sequential ones -------------------------------------------


def test_concurrent_requests_give_their_sequential_tokens(server, never_stop):
    client = server.client()
    words = "Griffin mixes gated linear recurrences with local attention so its state stays small".split()
    prompts = [" ".join(words[: 1 + 2 * i]) for i in range(8)]  # 8 prompts of different lengths

    def run(prompt: str) -> list[int]:
        reply = client.completions.create(
            model="demo", prompt=prompt, max_tokens=32, temperature=0, logprobs=1, logit_bias=never_stop,
        )
        return token_ids(reply.choices[0])

    sequential = [run(p) for p in prompts]
    spans, concurrent = [None] * 8, [None] * 8
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        concurrent[i] = run(prompts[i])
        spans[i] = (t0, time.perf_counter())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(s) == 32 for s in sequential)
    assert concurrent == sequential
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # all eight were in flight together


# -- Our layer: disconnects, API key, prompt limit ----------------------------------------------------


def _endless(stream: bool, never_stop: dict) -> bytes:
    body = json.dumps({"model": "demo", "prompt": "The", "max_tokens": 100_000, "stream": stream,
                       "logit_bias": never_stop, "temperature": 0})
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()


def _wait_for(condition, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_a_client_that_goes_stops_its_generation(server, stream, never_stop):
    before = server.stats()
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(_endless(stream, never_stop))
    _wait_for(lambda: server.stats()["generated_tokens"] >= before["generated_tokens"] + 30, what="tokens")
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.0 200")
    at_close = server.stats()["generated_tokens"]
    sock.close()
    _wait_for(lambda: server.stats()["disconnects"] == before["disconnects"] + 1, what="the disconnect")
    time.sleep(0.3)
    stopped = server.stats()["generated_tokens"]
    time.sleep(0.5)
    assert server.stats()["generated_tokens"] == stopped  # nothing more for it
    assert stopped - at_close <= 8, f"{stopped - at_close} tokens generated after the client went"


def test_requests_without_the_api_key_get_401(server):
    for key in (None, "wrong"):
        status, body = server.request("POST", "/v1/chat/completions",
                                      {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}, key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert server.request("GET", "/v1/models", key=key)[0] == 401
        assert server.request("GET", "/stats", key=key)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert server.request("GET", "/health", key=None) == (200, {"status": "ok"})


def test_a_prompt_over_the_limit_gets_400(server):
    with pytest.raises(openai.BadRequestError, match=rf"at most {MAX_PROMPT}"):
        server.client().completions.create(model="demo", prompt="Griffin " * (MAX_PROMPT + 10), max_tokens=2)
    # The server goes on answering.
    assert server.client().completions.create(model="demo", prompt="The", max_tokens=2).choices[0].text


def test_serve_applies_the_adapter(adapter, tiny_model_dir, tmp_path):
    # The tiny model with its tokenizer files (so the server tokenizes as rg_mlx does) and a trained adapter.
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    tuned, tokenizer = load(folder, adapter_path=adapter)
    for name, content in tokenizer.hf_files(chat=False).items():
        (folder / name).write_text(json.dumps(content))
    base, _ = load(folder)
    prompt = "The quick brown fox"
    with running("--model", str(folder), "--adapter-path", str(adapter), "--served-model-name", "tiny") as s:
        reply = s.client().completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=1)
        # Not an instruction-tuned model (no chat template): chat requests are refused, not mis-formatted.
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    ids, ours = token_ids(reply.choices[0]), tokenizer.encode(prompt)
    assert ids == greedy(tuned, ours, len(ids)) != greedy(base, ours, len(ids))
    np.testing.assert_allclose(reply.choices[0].logprobs.token_logprobs, logprobs_alone(tuned, ours, ids), atol=1e-4)


def greedy(model, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids`, whole passes (no cache)."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(mx.argmax(model(mx.array([ids + out]))[0, -1]).item()))
    return out


# -- The command: flags checked before anything loads ------------------------------------------------


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if `rg-mlx serve` gets as far as finding the model."""
    import rg_mlx.loading

    def resolve(path):
        raise AssertionError("the model was looked up")

    monkeypatch.setattr(rg_mlx.loading, "resolve", resolve)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port 70000: must be 0-65535"),
        (["--max-prompt-tokens", "0"], "--max-prompt-tokens 0: must be >= 1"),
        (["--api-key", " "], "--api-key: must not be empty"),
        (["--decode-concurrency", "0"], "--decode-concurrency 0: must be >= 1"),
        (["--top-p", "2"], "--top-p 2.0: must be 0-1"),
        (["--temp", "-1"], "--temp -1.0: must be >= 0"),
        (["--kv-bits", "4"], "--kv-bits: not supported on rg_mlx's model (rg_mlx's state is fixed-size"),
        (["--draft-model", "x"], "--draft-model: not supported on rg_mlx's model (speculative decoding rewinds"),
        (["--prompt-cache-bytes", "2X"], "--prompt-cache-bytes 2X"),
    ],
)
def test_bad_flags_exit_2_with_one_line_before_loading(flags, message, nothing_loads, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rg-mlx serve: error: {message}"), err


def test_unknown_flags_are_refused_by_mlx_lms_parser(nothing_loads, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--decode-concurrency", "4", "--no-such-flag"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "rg-mlx serve: error: unrecognized arguments: --no-such-flag"


def test_a_missing_model_or_adapter_is_one_line(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"rg-mlx serve: error: {tmp_path / 'nowhere'}: no such model folder "
                                                            "(give a converted folder, or a hub repo id like "
                                                            "google/recurrentgemma-2b-it)"]
    assert main(["serve", "--adapter-path", str(tmp_path)]) == 1
    assert "not an adapter folder" in capsys.readouterr().err


def test_what_serve_hands_mlx_lm_and_the_warning_off_loopback(monkeypatch, capsys):
    import rg_mlx.server
    from test_mlx_lm import registration_restored

    served = []
    monkeypatch.setattr(rg_mlx.server, "serve", lambda cli_args, options, ready: served.append((cli_args, options)))
    monkeypatch.setenv("RG_MLX_API_KEY", "from-env")
    with registration_restored():
        assert main(["serve", "--decode-concurrency", "4", "--max-prompt-tokens", "100"]) == 0
        assert main(["serve", "--host", "0.0.0.0", "--api-key", "k", "--served-model-name", "m"]) == 0
    (local, options), (anywhere, named) = served
    assert (local.model, local.host, local.port, local.decode_concurrency) == (str(demo_path()), "127.0.0.1", 8080, 4)
    assert (options.name, options.api_key, options.max_prompt_tokens) == ("demo", "from-env", 100)
    assert options.serves("demo") and options.serves("default_model") and options.serves(str(demo_path()))
    assert (anywhere.host, named.name, named.api_key) == ("0.0.0.0", "m", "k") and not named.serves("demo")
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if "warning" in line]
    assert warnings == ["rg-mlx serve: warning: listening on 0.0.0.0: anyone who can reach this machine can use "
                        "the model, requests need the API key"]


def test_under_mlx_launch_rank_0_serves_the_model_split_over_the_ranks(ours, tmp_path):
    # mlx-lm's server under mlx.launch: `sharded_load` splits rg_mlx's model (`Model.shard`), rank 0
    # answers HTTP and the other rank follows each request; the reply is the one-process reply.
    launch = shutil.which("mlx.launch")
    if launch is None:
        pytest.skip("mlx.launch is not on PATH")
    script = tmp_path / "serve.py"
    script.write_text("import sys\nfrom rg_mlx.cli import main\nsys.exit(main(['serve', '--host', '127.0.0.1', '--port', '0']))\n")
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [launch, "--backend", "ring", "-n", "2", "--python", sys.executable, str(script)],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, start_new_session=True,
    )
    try:
        url, deadline = None, time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 5)
            line = proc.stdout.readline() if ready else ""
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            url = match.group(1) if match else None
            if not line and proc.poll() is not None:
                break
        if url is None:
            log.seek(0)
            pytest.fail(f"rg-mlx serve under mlx.launch did not start:\n{log.read()[-3000:]}")
        reply = Server(url).client(key=None).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": QUESTION}], max_tokens=40, temperature=0,
        )
        model, tokenizer = ours
        expected = "".join(r.text for r in ChatSession(model, tokenizer, max_tokens=40).send(QUESTION))
        assert reply.choices[0].message.content == expected
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # mlx.launch and both ranks
        proc.wait()
        log.close()


# -- Chat prompts encoded turn by turn (rg_mlx.server.TurnTokenizer) ---------------------------------------------


class _CountingEncodes:
    """mlx-lm's tokenizer, counting the characters it is asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, text, **kwargs):
        self.chars += len(text)
        return self.tokenizer.encode(text, **kwargs)


@pytest.fixture(scope="module")
def mlx_lm_tokenizer():
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(demo_path())


def test_turn_by_turn_chat_prompts_are_the_whole_texts_tokens(mlx_lm_tokenizer):
    from rg_mlx.server import TurnTokenizer

    rng = np.random.default_rng(0)
    pieces = ["How do I quantize?", " spaces  ", "\n", "tab\t", "«ü» ✓", "<end_of_turn>", "<start_of_turn>model",
              "rg-mlx convert", "  ", "x"]
    counting = _CountingEncodes(mlx_lm_tokenizer)
    turns = TurnTokenizer(counting)
    messages = []
    for turn in range(12):
        text = "".join(rng.choice(pieces, size=int(rng.integers(0, 8))))
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text})
        if turn % 2:
            continue
        expected = mlx_lm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        before = counting.chars
        assert turns.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == expected
        if turn >= 4:  # the earlier turns come from memory: only the last turns' text is encoded
            rendered = mlx_lm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            assert counting.chars - before < len(rendered) / 2
    assert turns._exact
    # Text, not tokens, is the wrapped tokenizer's as it is.
    assert turns.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        mlx_lm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_turns_are_not_cut_where_the_tokenizer_does_not_split(mlx_lm_tokenizer):
    """Cut at ordinary text (not a special token), the pieces' tokens differ from the whole text's: the check on
    first use notices, and the prompts are encoded whole."""
    from rg_mlx.server import TurnTokenizer

    turns = TurnTokenizer(mlx_lm_tokenizer, marker="n")
    messages = [{"role": "user", "content": "an ordinary question, then another one"}]
    expected = mlx_lm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert turns.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == expected
    assert turns._exact is False
