"""The bundled demo model: its corpus, its training pieces, and the shipped weights' answers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from rg_mlx import loading
from rg_mlx.demo import corpus as corpus_lib
from rg_mlx.demo import eval as demo_eval
from rg_mlx.demo import model_path
from rg_mlx.demo import train as demo_train
from rg_mlx.kernels.ops import rg_lru_ops
from rg_mlx.kernels.reference import naive_rg_lru

# Training questions checked against the shipped weights (a fixed sample; every held-out
# paraphrase is checked). The full evaluation is `python -m rg_mlx.demo.eval`, in the README.
SAMPLE = 256


@pytest.fixture(scope="module")
def corpus():
    return corpus_lib.build()


@pytest.fixture(scope="module")
def demo():
    import rg_mlx

    return rg_mlx.load("demo")


def test_corpus_held_out_is_never_trained_on(corpus):
    norm = corpus_lib._norm
    trained = {norm(m["content"]) for conv in corpus.conversations for m in conv if m["role"] == "user"}
    assert trained == {norm(e.question) for e in corpus.train}
    held = [norm(e.question) for e in corpus.held_out]
    assert len(set(held)) == len(held)
    assert not set(held) & trained
    # Every topic is trained and held out, and the corpus is deterministic.
    assert {e.topic for e in corpus.held_out} == {t.name for t in corpus.topics} == {e.topic for e in corpus.train}
    again = corpus_lib.build()
    assert again.conversations == corpus.conversations and again.held_out == corpus.held_out


def test_corpus_answers_hold_their_expected_string(corpus):
    for e in corpus.train + corpus.held_out:
        assert e.expected in e.answer
    with pytest.raises(ValueError, match="not in its answer"):
        corpus_lib.Topic("bad", "an answer", "missing")
    with pytest.raises(ValueError, match="control token"):
        corpus_lib.Topic("bad", "stop at <end_of_turn> now", "stop")


def test_loss_covers_exactly_the_model_turns(tmp_path, corpus):
    tokenizer = demo_train.train_tokenizer(corpus.texts(), tmp_path)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
    assert tokenizer.sp.id_to_piece(3) == "<unk>"
    assert tokenizer.start_of_turn_id is not None and tokenizer.end_of_turn_id is not None
    conversation = next(c for c in corpus.conversations if len(c) == 4)
    ids, trained, question = demo_train.encode(tokenizer, conversation)

    def spans(flags):
        out, start = [], None
        for i, f in enumerate(flags + [False]):
            if f and start is None:
                start = i
            elif not f and start is not None:
                out.append(ids[start:i])
                start = None
        return out

    replies = spans(trained)
    assert len(replies) == 2
    for span, message in zip(replies, conversation[1::2]):
        assert span[-1] == tokenizer.end_of_turn_id
        assert tokenizer.decode(span[:-1]) == message["content"]
    # The question tokens (dropped out at random in training) are exactly the user messages.
    assert [tokenizer.decode(span) for span in spans(question)] == [m["content"] for m in conversation[::2]]


def _numeric_grad(f, arrays, i, direction, eps=1e-4):
    plus = [a.copy() for a in arrays]
    minus = [a.copy() for a in arrays]
    plus[i] += eps * direction
    minus[i] -= eps * direction
    return (f(*plus) - f(*minus)) / (2 * eps)


@pytest.mark.parametrize("T", [9, 50])  # the per-step loop and the chunked scan
def test_scan_gradients_match_finite_differences(T):
    """Training differentiates the portable RG-LRU (kernels/ops.py): its gradients are right."""
    rng = np.random.default_rng(T)
    B, L = 2, 8
    x, gate_x, gate_a = (rng.normal(size=(B, T, L)) for _ in range(3))
    a_param = rng.normal(size=(L,)) - 1.0
    reset = np.zeros((B, T), bool)
    reset[:, 0] = True
    reset[1, T // 2] = True  # a document start mid-sequence
    weight = rng.normal(size=(B, T, L))

    def f64(x, gate_x, gate_a, a_param):
        return float((naive_rg_lru(x, gate_x, gate_a, a_param, reset)[0] * weight).sum())

    def f32(x, gate_x, gate_a, a_param):
        y, _ = rg_lru_ops(x, gate_x, gate_a, a_param, mx.array(reset))
        return (y * mx.array(weight, mx.float32)).sum()

    arrays = [x, gate_x, gate_a, a_param]
    grads = mx.grad(f32, argnums=(0, 1, 2, 3))(*[mx.array(a, mx.float32) for a in arrays])
    for i, g in enumerate(grads):
        direction = rng.normal(size=arrays[i].shape)
        expected = _numeric_grad(f64, arrays, i, direction)
        got = float((np.array(g) * direction).sum())
        assert abs(got - expected) <= 1e-3 * max(1.0, abs(expected)), (i, got, expected)


def test_training_step_lowers_the_loss(tmp_path, corpus):
    """A few steps on a small batch through the whole model (scan included) reduce the loss."""
    tokenizer = demo_train.train_tokenizer(corpus.texts(), tmp_path)
    examples = [demo_train.encode(tokenizer, c) for c in corpus.conversations[:8]]
    args = demo_train.ModelArgs(vocab_size=tokenizer.vocab_size, **{**demo_train.CONFIG, "hidden_size": 64, "intermediate_size": 128})
    mx.random.seed(0)
    model = demo_train.Model(args)
    demo_train.init_weights(model, args)
    batch = demo_train.batches(examples, random.Random(0))[0]
    value_and_grad = nn.value_and_grad(model, demo_train.loss_fn)
    optimizer = optim.Adam(learning_rate=1e-2)
    losses = []
    for _ in range(5):
        loss, grads = value_and_grad(model, *batch)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # Gradients reach the RG-LRU parameters (through the scan) and the attention layer.
    _, grads = value_and_grad(model, *batch)
    lru = grads["model"]["layers"][0]["temporal_block"]["rg_lru"]
    assert float(mx.abs(lru["recurrent_param"]).sum()) > 0
    assert float(mx.abs(lru["input_gate_weight"]).sum()) > 0
    assert float(mx.abs(grads["model"]["layers"][2]["temporal_block"]["q_proj"]["weight"]).sum()) > 0


def test_shipped_model_folder():
    folder = model_path()
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size <= 15 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "recurrent_gemma"
    assert config["block_types"] == ["recurrent", "recurrent", "attention"]
    generation = json.loads((folder / "generation_config.json").read_text())
    from rg_mlx import Tokenizer

    tokenizer = Tokenizer(folder)
    assert generation["eos_token_id"] == [tokenizer.eos_id, tokenizer.end_of_turn_id]
    assert (folder / "README.md").read_text().startswith("---")


def test_load_demo(demo):
    model, tokenizer = demo
    assert model.args.vocab_size == tokenizer.vocab_size
    # float16 on disk, float32 compute on the CPU; the weights stay float16 where rg_mlx's native products read them
    embed = model.model.embed_tokens
    assert embed(mx.array([[1]])).dtype == model(mx.array([[1]])).dtype == mx.float32
    assert embed.weight.dtype == (mx.float16 if loading.keeps_stored_weights(mx.float32) else mx.float32)


def test_shipped_model_answers_a_fixed_sample(demo, corpus):
    model, tokenizer = demo
    max_tokens = demo_eval.max_reply_tokens(tokenizer, corpus)
    sample = demo_eval.question_sets(corpus, sample=SAMPLE, seed=0)["training questions"]
    train = demo_eval.score(model, tokenizer, "train", sample, max_tokens)
    held = demo_eval.score(model, tokenizer, "held out", demo_eval.question_sets(corpus)["held-out paraphrases"], max_tokens)
    assert train.accuracy >= 0.95, train.failures
    assert held.accuracy >= 0.5, held.failures
    assert train.ended_rate >= 0.95 and held.ended_rate >= 0.95, train.failures + held.failures


def test_batched_evaluation_equals_single_replies(demo, corpus):
    """The evaluation answers in left-padded batches: each reply is the one `generate` gives alone."""
    import rg_mlx

    model, tokenizer = demo
    conversations = [m for m, _ in demo_eval.question_sets(corpus, sample=6, seed=1)["held-out, as a second turn"]]
    max_tokens = demo_eval.max_reply_tokens(tokenizer, corpus)
    batched = demo_eval.replies(model, tokenizer, conversations, max_tokens, batch_size=4)
    for messages, (text, ended) in zip(conversations, batched):
        responses = list(rg_mlx.stream_generate(model, tokenizer, tokenizer.chat_tokens(messages), max_tokens=max_tokens))
        assert text == "".join(r.text for r in responses)
        assert ended == (responses[-1].token == tokenizer.end_of_turn_id)


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rg_mlx", *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
    )


def test_chat_without_model_uses_the_demo():
    """`rg-mlx chat` with no --model answers offline, and says it is the bundled demo."""
    result = _cli("chat", stdin="How do I install rg_mlx?\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert "pip install -e ." in result.stdout and "not on PyPI" in result.stdout  # from a clone
    assert "bundled demo" in result.stderr and "rg-mlx convert" in result.stderr


def test_generate_without_model_uses_the_demo():
    result = _cli("generate", "--chat", "--prompt", "What does --q-bits do?")
    assert result.returncode == 0, result.stderr
    assert "--q-bits 8" in result.stdout
    assert "bundled demo" in result.stderr


def test_generate_answers_a_plain_prompt_in_the_chat_format():
    """The first command many people type: no flags. The demo has a chat template, so the prompt is a user turn."""
    result = _cli("generate", "--prompt", "How do I quantize a model?")
    assert result.returncode == 0, result.stderr
    assert "rg-mlx convert google/recurrentgemma-2b-it rg-2b-4bit -q" in result.stdout
    assert "(chat template)" in result.stderr.splitlines()[-1]
    raw = _cli("generate", "--raw", "--prompt", "How do I quantize a model?", "-m", "8")
    assert raw.returncode == 0 and "(raw)" in raw.stderr.splitlines()[-1]


def test_app_without_model_serves_the_demo():
    from rg_mlx.app.server import ChatApp

    app = ChatApp()
    try:
        assert app.model_path == "demo"
        assert app.model is not None and app.model.args.vocab_size == app.tokenizer.vocab_size
    finally:
        app.close()
