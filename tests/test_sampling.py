"""SamplingConfig: its checks, text parsing, presets and metadata, and every Python entry point that takes
one (bad values raise RGError before any work; a config and the same keyword arguments give the same tokens)."""

from __future__ import annotations

import copy
import dataclasses

import mlx.core as mx
import pytest

from rg_mlx import ChatSession, RGError, Sampling, SamplingConfig, batch_generate, generate, load, stream_generate
from rg_mlx.sampling import APP, CHAT, GENERATE, PRESETS, SETTINGS, SamplingError

# Bad values of every field, and the range its error message must state.
BAD = [
    ("temperature", -1, ">= 0"),
    ("temperature", float("inf"), ">= 0"),
    ("temperature", "hot", ">= 0"),
    ("temperature", True, ">= 0"),
    ("top_p", 0, "in (0, 1]"),
    ("top_p", 1.5, "in (0, 1]"),
    ("top_k", -1, ">= 0"),
    ("top_k", 2.5, "whole number >= 0"),
    ("min_p", -0.1, "in [0, 1]"),
    ("min_p", float("nan"), "in [0, 1]"),
    ("repetition_penalty", 0, "> 0"),
    ("repetition_context_size", 0, ">= 1"),
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", None, ">= 1"),
    ("seed", -1, "in [0, 2**64)"),
    ("seed", 2**64, "in [0, 2**64)"),
    ("stop", [1], "strings"),
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    tokenizer = copy.copy(tokenizer)
    tokenizer.stop_ids = frozenset()  # every generation runs to max_tokens: longer, sharper comparisons
    return model, tokenizer


@pytest.mark.parametrize("name, value, valid", BAD)
def test_bad_values_name_the_field_the_value_and_the_range(name, value, valid):
    with pytest.raises(SamplingError) as e:
        SamplingConfig(**{name: value})
    message = str(e.value)
    assert isinstance(e.value, RGError) and "\n" not in message
    assert message.startswith(f"{name}={value!r}: ") and valid in message
    assert (e.value.name, e.value.reason) == (name, message.split(": ", 1)[1])
    with pytest.raises(SamplingError, match=f"^{name}="):
        GENERATE.replace(**{name: value})


def test_values_are_normalised_and_frozen():
    config = SamplingConfig(temperature=1, top_k=64.0, seed=2**64 - 1, stop="</s>", repetition_penalty=1)
    assert config.temperature == 1.0 and type(config.temperature) is float
    assert config.top_k == 64 and type(config.top_k) is int
    assert config.stop == ("</s>",) and SamplingConfig(stop=["a", "", "b"]).stop == ("a", "b")
    assert SamplingConfig(stop=None).stop == ()
    assert config.penalty is None and SamplingConfig(repetition_penalty=1.2).penalty == 1.2  # 1 is off
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.temperature = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        SamplingConfig(0.5)  # type: ignore[misc]  (keyword-only)
    assert SamplingConfig(**config.to_dict()) == config and hash(config) == hash(SamplingConfig(**config.to_dict()))
    with pytest.raises(RGError, match="unknown sampling setting 'temprature': use temperature, top_p, top_k"):
        config.replace(temprature=1)
    assert config.replace() is config


def test_text_as_typed_after_set():
    assert CHAT.with_text("temperature", " 0.5 ").temperature == 0.5
    assert CHAT.with_text("max_tokens", "64").max_tokens == 64
    assert CHAT.with_text("max_tokens", "1e2").max_tokens == 100
    assert CHAT.with_text("seed", "18446744073709551615").seed == 2**64 - 1  # exact, not through a float
    assert CHAT.with_text("seed", "7").with_text("seed", "none").seed is None
    assert CHAT.with_text("repetition_penalty", "1.3").with_text("repetition_penalty", "OFF").repetition_penalty is None
    assert CHAT.with_text("stop", "User:").stop == ("User:",) and CHAT.with_text("stop", "off").stop == ()
    for name, text, reason in [
        ("temperature", "-5", "must be >= 0 (0 is greedy)"),
        ("temperature", "none", "not a number >= 0"),  # temperature has no None
        ("top_k", "lots", "not a whole number >= 0"),
        ("max_tokens", "5.5", "must be a whole number >= 1"),
    ]:
        with pytest.raises(SamplingError) as e:
            CHAT.with_text(name, text)
        assert e.value.name == name and e.value.reason.startswith(reason)
    with pytest.raises(RGError, match="unknown sampling setting 'nonsense': use temperature, .*, stop"):
        CHAT.with_text("nonsense", "1")


def test_presets_and_metadata():
    assert list(SETTINGS) == [f.name for f in dataclasses.fields(SamplingConfig)]
    assert all(getattr(SamplingConfig(), s.name) == s.default for s in SETTINGS.values())
    assert SETTINGS["temperature"].flags == ("--temp", "--temperature") and SETTINGS["max_tokens"].flags[0] == "-m"
    flags = [f for s in SETTINGS.values() for f in s.flags]
    assert len(flags) == len(set(flags))
    assert PRESETS == {"generate": GENERATE, "chat": CHAT, "app": APP}
    assert GENERATE == SamplingConfig() and GENERATE.max_tokens == 256 and GENERATE.temperature == 0
    assert CHAT == SamplingConfig(max_tokens=512)
    assert (APP.temperature, APP.top_p, APP.top_k, APP.max_tokens, APP.seed) == (0.7, 0.95, 64, 512, None)
    # Every field's stated range agrees with its check, at both ends.
    for s in SETTINGS.values():
        if s.low is not None:
            ok = s.low if not s.low_open else s.low + 0.5
            assert s.check(ok) == ok
            if not s.low_open:
                with pytest.raises(SamplingError):
                    s.check(s.low - 1)
        if s.high is not None and s.high_open:
            with pytest.raises(SamplingError):
                s.check(s.high)


def test_vocabulary_check_needs_the_model(loaded):
    model, tokenizer = loaded
    vocab = model.args.vocab_size
    SamplingConfig(top_k=vocab - 1).check_vocab(vocab)
    with pytest.raises(SamplingError, match=f"top_k={vocab}: must be < the vocabulary size, {vocab}"):
        SamplingConfig(top_k=vocab).check_vocab(vocab)
    for call in (
        lambda: stream_generate(model, tokenizer, "Hi", top_k=vocab),
        lambda: batch_generate(model, tokenizer, ["Hi"], sampling=SamplingConfig(top_k=vocab)),
        lambda: ChatSession(model, tokenizer, top_k=vocab),
        lambda: Sampling(vocab_size=vocab, top_k=vocab),
    ):
        with pytest.raises(SamplingError, match="top_k"):
            call()


def test_every_api_entry_point_rejects_bad_values(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=4)
    list(session.send("Hi"))
    calls = {
        "stream_generate": lambda **kw: stream_generate(model, tokenizer, "Hi", **kw),
        "generate": lambda **kw: generate(model, tokenizer, "Hi", **kw),
        "batch_generate": lambda **kw: batch_generate(model, tokenizer, ["Hi", "Ho"], **kw),
        "ChatSession": lambda **kw: ChatSession(model, tokenizer, **kw),
        "ChatSession.send": lambda **kw: session.send("x", **kw),
        "ChatSession.regenerate": lambda **kw: session.regenerate(**kw),
        "Sampling": lambda sampling=None, **kw: Sampling(sampling, vocab_size=model.args.vocab_size, **kw),
    }
    for call in calls.values():
        for name, value, _ in BAD:
            with pytest.raises(SamplingError, match=f"^{name}="):
                call(**{name: value})
        with pytest.raises(RGError, match="unknown sampling setting"):
            call(temprature=0.5)
        with pytest.raises(RGError, match="must be a SamplingConfig"):
            call(sampling={"temperature": 0.5})
    assert len(session.history) == 2 and session.settings == CHAT.replace(max_tokens=4)  # untouched
    with pytest.raises(RGError, match="must be a SamplingConfig"):
        session.settings = {"temperature": 0.5}  # type: ignore[assignment]
    with pytest.raises(SamplingError, match="top_k"):
        session.settings = SamplingConfig(top_k=model.args.vocab_size)
    assert session.settings == CHAT.replace(max_tokens=4)


def test_a_config_and_its_keyword_arguments_give_the_same_output(loaded):
    model, tokenizer = loaded
    fields = dict(max_tokens=20, temperature=2.0, top_p=0.95, top_k=100, min_p=0.01, repetition_penalty=2.0,
                  repetition_context_size=6, seed=5)
    config = SamplingConfig(**fields)
    tokens = [r.token for r in stream_generate(model, tokenizer, "Hello", sampling=config)]
    assert len(tokens) == 20 and len(set(tokens)) > 10
    assert [r.token for r in stream_generate(model, tokenizer, "Hello", **fields)] == tokens
    # Keyword arguments replace the config's fields: a different seed, different tokens.
    assert [r.token for r in stream_generate(model, tokenizer, "Hello", sampling=config, seed=6)] != tokens
    assert generate(model, tokenizer, "Hello", sampling=config) == generate(model, tokenizer, "Hello", **fields)
    prompts = ["Hello", "The quick brown fox"]
    batch = batch_generate(model, tokenizer, prompts, sampling=config)
    assert batch == batch_generate(model, tokenizer, prompts, **fields)
    stop = generate(model, tokenizer, "Hello", sampling=config)[5:8]
    assert generate(model, tokenizer, "Hello", sampling=config.replace(stop=stop)) == generate(
        model, tokenizer, "Hello", stop=[stop], **fields
    )

    # Sampling from a config draws what Sampling from keyword arguments draws.
    logits = mx.random.normal((2, model.args.vocab_size), key=mx.random.key(0))
    history = mx.array([[5, 6, 7], [8, 9, 10]])
    a, b = Sampling(config, vocab_size=model.args.vocab_size), Sampling(vocab_size=model.args.vocab_size, **fields)
    assert all(mx.array_equal(a(logits, history), b(logits, history)) for _ in range(5))

    # ChatSession: settings from a config or from keyword arguments, per session or per reply.
    one = ChatSession(model, tokenizer, sampling=config)
    two = ChatSession(model, tokenizer, **fields)
    assert one.settings == two.settings == config
    assert [r.token for r in one.send("Hi")] == [r.token for r in two.send("Hi")]
    per_reply = config.replace(seed=9, max_tokens=7)
    assert [r.token for r in one.send("Go on", sampling=per_reply)] == [
        r.token for r in two.send("Go on", seed=9, max_tokens=7)
    ]
    assert one.history == two.history and one.settings == config  # per-reply settings do not stick
