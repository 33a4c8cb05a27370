"""Generation: greedy equals DeepMind's reference, chunked prefill, streaming text, stops, seeds,
batches, bounded memory, and mlx-lm's generation and prompt-cache functions on our model."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import write_tiny_model
from rg_mlx import RGError, Tokenizer, batch_generate, generate, load, stream_generate
from rg_mlx.generate import feed
from rg_mlx.state import copy_state

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer_path):
    """DeepMind's reference model (random, with block outputs scaled up so greedy decoding does
    not just repeat the last token) and the same weights loaded by rg_mlx."""
    import torch

    from reference import dm_to_hf, reference_model, save_hf_folder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many times faster for these tiny passes on a busy machine
    ref, config = reference_model(vocab_size=400, window=8, mlp_expanded_width=128, scale_embeddings=False, seed=0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if any(k in name for k in ("linear_out", "ffw_down", "proj_final")):
                p.mul_(10)
    folder = save_hf_folder(tmp_path_factory.mktemp("ref"), config, dm_to_hf(ref.state_dict(), config))
    shutil.copy(tiny_tokenizer_path, folder / "tokenizer.model")
    model, tokenizer = load(folder)
    yield ref, model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mini(tmp_path_factory, tiny_tokenizer_path):
    """The smallest model with both block types (fast per token)."""
    folder = write_tiny_model(
        tmp_path_factory.mktemp("mini"),
        tiny_tokenizer_path,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        block_types=["recurrent", "attention"],
        attention_window_size=4,
    )
    return load(folder)


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(6, 400, length - 1).tolist() for _ in range(n)]


def tokens_of(model, tokenizer, prompt, **kwargs) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, prompt, **kwargs)]


def no_stop(tokenizer: Tokenizer) -> Tokenizer:
    t = copy.copy(tokenizer)
    t.stop_ids = frozenset()
    return t


def test_greedy_matches_deepmind_reference(reference):
    from reference import reference_logits

    ref, model, tokenizer = reference
    tokenizer = no_stop(tokenizer)
    for seed in (3, 7):  # prompts for which this random model's greedy output varies
        prompt = prompts(1, 12, seed)[0]
        ours = tokens_of(model, tokenizer, prompt, max_tokens=50)
        seq = list(prompt)
        for _ in range(50):  # the reference's own full pass at every step
            seq.append(int(reference_logits(ref, np.array([seq]))[0, -1].argmax()))
        assert ours == seq[len(prompt) :]
        assert len(set(ours)) > 5  # the test model does not just repeat one token


def test_prefill_step_size_does_not_change_output(reference):
    _, model, tokenizer = reference
    tokenizer = no_stop(tokenizer)
    prompt = prompts(1, 40, seed=1)[0]
    runs, states = [], []
    for step in (1, 7, 16, 512):
        cache = model.make_cache()
        runs.append(tokens_of(model, tokenizer, prompt, max_tokens=30, prefill_step_size=step, cache=cache))
        states.append(copy_state(cache))
    assert all(r == runs[0] for r in runs)
    for state in states[1:]:
        for a, b in zip(sum(state, []), sum(states[0], [])):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_responses_and_length_finish(reference):
    _, model, tokenizer = reference
    rs = list(stream_generate(model, no_stop(tokenizer), "Hello world", max_tokens=6))
    assert [r.finish_reason for r in rs] == [None] * 5 + ["length"]
    assert [r.generation_tokens for r in rs] == list(range(1, 7))
    last = rs[-1]
    assert last.prompt_tokens == len(tokenizer.encode("Hello world"))
    assert last.prompt_time > 0 and last.prompt_tps > 0 and last.generation_tps > 0
    assert last.peak_memory > 0
    assert last.state_bytes == rs[0].state_bytes > 0
    assert "".join(r.text for r in rs) == tokenizer.decode([r.token for r in rs])


def test_streamed_text_equals_decode_of_sampled_tokens(reference):
    # Sampling at a high temperature emits byte-fallback tokens, CJK, emoji pieces, spaces.
    _, model, tokenizer = reference
    rs = list(stream_generate(model, no_stop(tokenizer), "Emoji: ", max_tokens=300, temperature=3.0, seed=0))
    tokens = [r.token for r in rs]
    assert any(tokenizer.sp.is_byte(t) for t in tokens)
    assert "".join(r.text for r in rs) == tokenizer.decode(tokens)


def test_stops_on_stop_tokens(reference):
    _, model, tokenizer = reference
    prompt = prompts(1, 12)[0]
    tokens = tokens_of(model, no_stop(tokenizer), prompt, max_tokens=20)
    stopper = copy.copy(tokenizer)
    stopper.stop_ids = frozenset({tokens[4]})  # pretend the 5th token is <end_of_turn>
    rs = list(stream_generate(model, stopper, prompt, max_tokens=20))
    k = tokens.index(tokens[4])
    assert [r.token for r in rs] == tokens[: k + 1]
    assert rs[-1].finish_reason == "stop"
    assert "".join(r.text for r in rs) == tokenizer.decode(tokens[:k])


def test_stop_strings(reference):
    _, model, tokenizer = reference
    tokenizer = no_stop(tokenizer)
    prompt = prompts(1, 12, seed=3)[0]
    full = generate(model, tokenizer, prompt, max_tokens=40)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and full.index(stop) > 0
    rs = list(stream_generate(model, tokenizer, prompt, max_tokens=40, stop=["never appears", stop]))
    text = "".join(r.text for r in rs)
    assert text == full[: full.index(stop)]
    assert rs[-1].finish_reason == "stop"
    # A stop string that never completes releases the held-back text at the end.
    assert generate(model, tokenizer, prompt, max_tokens=40, stop=[full[-1] + "\x00"]) == full


def test_closing_early_leaves_a_consistent_state(reference):
    _, model, tokenizer = reference
    tokenizer = no_stop(tokenizer)
    prompt = prompts(1, 12, seed=4)[0]
    cache = model.make_cache()
    stream = stream_generate(model, tokenizer, prompt, max_tokens=50, cache=cache)
    got = [next(stream).token for _ in range(3)]
    stream.close()
    # The state holds the prompt and every yielded token but the last one.
    probe = mx.array([[got[-1]]])
    fresh = model.make_cache()
    expected = model(mx.array([prompt + got]), cache=fresh)[0, -1]
    np.testing.assert_allclose(np.array(model(probe, cache=cache)[0, -1]), np.array(expected), atol=1e-4)


def test_seeded_sampling_is_reproducible_across_processes(reference, tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    kwargs = dict(max_tokens=30, temperature=1.5, top_p=0.95, top_k=100, min_p=0.01, seed=7)
    ours = tokens_of(model, no_stop(tokenizer), "Hello", **kwargs)
    script = (
        "import copy, json, sys; from rg_mlx import load, stream_generate; "
        f"m, t = load({str(tiny_model_dir)!r}); t = copy.copy(t); t.stop_ids = frozenset(); "
        f"print(json.dumps([r.token for r in stream_generate(m, t, 'Hello', **{kwargs!r})]))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(out.stdout) == ours
    assert tokens_of(model, no_stop(tokenizer), "Hello", **dict(kwargs, seed=8)) != ours
    # A seeded generation neither reads nor moves MLX's global random state.
    mx.random.seed(1)
    generate(model, tokenizer, "Hello", **kwargs)
    after = mx.random.uniform(shape=(4,))
    mx.random.seed(1)
    assert mx.array_equal(after, mx.random.uniform(shape=(4,)))


def test_batch_equals_single_runs(reference):
    _, model, tokenizer = reference
    tokenizer = no_stop(tokenizer)
    batch = [prompts(1, n, seed=n)[0] for n in (1, 17, 40)]
    singles = [generate(model, tokenizer, p, max_tokens=24) for p in batch]
    assert batch_generate(model, tokenizer, batch, max_tokens=24) == singles
    assert len(set(singles)) == 3
    # Per-row stops: a row that stops early does not cut the others.
    stop = singles[1][5:8]
    cut = batch_generate(model, tokenizer, batch, max_tokens=24, stop=stop)
    assert cut[1] == singles[1][: singles[1].index(stop)]
    for text, single in zip(cut, singles):
        assert text == (single[: single.index(stop)] if stop in single else single)
    one = generate(model, tokenizer, "Hello", max_tokens=5)
    assert batch_generate(model, tokenizer, ["Hello"], max_tokens=5) == [one]


def test_state_bytes_constant_over_5000_tokens(mini):
    model, tokenizer = mini
    sizes = {r.state_bytes for r in stream_generate(model, no_stop(tokenizer), "Hello", max_tokens=5000)}
    assert len(sizes) == 1 and sizes.pop() > 0


def test_long_prompt_memory_is_bounded(mini):
    model, _ = mini
    peaks = {}
    for n in (2_000, 50_000):
        ids = mx.random.randint(6, 400, (1, n), key=mx.random.key(n)).astype(mx.int32)
        mx.eval(ids)
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()  # weights and the ids
        mx.eval(feed(model, ids, model.make_cache(), 512))
        peaks[n] = mx.get_peak_memory() - before
    # The work memory of a 50,000-token prompt is that of a 2,000-token one (logits for every
    # position alone would be 80 MB here, one unchunked pass several hundred MB).
    assert peaks[50_000] < peaks[2_000] + 1_000_000


def test_mlx_lm_generate_step_on_our_model(reference):
    from mlx_lm.generate import generate_step

    _, model, tokenizer = reference
    prompt = prompts(1, 12, seed=5)[0]
    theirs = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=30)]
    assert theirs == tokens_of(model, no_stop(tokenizer), prompt, max_tokens=30)


def test_mlx_lm_prompt_cache_round_trip(reference, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    _, model, tokenizer = reference
    tokenizer = no_stop(tokenizer)
    prompt, more = prompts(2, 12, seed=6)
    cache = model.make_cache()
    tokens_of(model, tokenizer, prompt, max_tokens=10, cache=cache)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache, {"note": "test"})
    loaded, meta = load_prompt_cache(str(tmp_path / "cache.safetensors"), return_metadata=True)
    assert meta == {"note": "test"}
    assert sum(c.nbytes for c in loaded) == sum(c.nbytes for c in cache)
    after_load = tokens_of(model, tokenizer, more[1:], max_tokens=20, cache=loaded)
    assert after_load == tokens_of(model, tokenizer, more[1:], max_tokens=20, cache=cache)


def test_bad_arguments(reference):
    _, model, tokenizer = reference
    bad = [
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_k=400),
        dict(min_p=2.0),
        dict(repetition_penalty=0.0),
        dict(max_tokens=0),
        dict(prefill_step_size=0),
    ]
    for kwargs in bad:
        with pytest.raises(RGError):
            stream_generate(model, tokenizer, "Hello", **kwargs)
    with pytest.raises(RGError, match="empty prompt"):
        generate(model, tokenizer, [])
    with pytest.raises(RGError, match="empty prompt"):  # not a generation from <bos> alone
        generate(model, tokenizer, "")
    with pytest.raises(RGError, match="needs a user message"):
        generate(model, tokenizer, [{"role": "system", "content": "Be brief."}])
    with pytest.raises(RGError, match="roles must alternate"):
        generate(model, tokenizer, [{"role": "assistant", "content": "Hi"}])
    with pytest.raises(RGError, match="outside the vocabulary"):
        generate(model, tokenizer, [2, 400])


def test_repetition_penalty_changes_greedy_output(reference):
    _, model, tokenizer = reference
    tokenizer = no_stop(tokenizer)
    prompt = prompts(1, 12)[0]
    plain = tokens_of(model, tokenizer, prompt, max_tokens=30)
    penalised = tokens_of(model, tokenizer, prompt, max_tokens=30, repetition_penalty=5.0, repetition_context_size=8)
    assert len(set(penalised)) > len(set(plain))


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(RGError, match="no such model folder"):
        load(tmp_path / "missing")
    with pytest.raises(RGError, match="not in the Hugging Face cache.*rg-mlx convert"):
        load("google/no-such-model-for-rg-mlx-tests")
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(RGError, match="no tokenizer.model"):
        load(folder)


def test_chat_messages_prompt_is_the_chat_format(reference):
    """Text stays raw (as in mlx-lm); chat messages are put in Gemma's format by `Tokenizer.chat_tokens`,
    a leading system message folded in as `system=` does."""
    _, model, tokenizer = reference
    messages = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "What is Griffin?"}]
    ids = tokenizer.chat_tokens(messages, system="Be brief.")
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    responses = list(stream_generate(model, tokenizer, with_system, max_tokens=8))
    assert responses[-1].prompt_tokens == len(ids)
    assert "".join(r.text for r in responses) == generate(model, tokenizer, ids, max_tokens=8)
    assert generate(model, tokenizer, messages[:1], max_tokens=8) == generate(
        model, tokenizer, tokenizer.chat_tokens(messages[:1]), max_tokens=8)
    assert list(stream_generate(model, tokenizer, "Hello!", max_tokens=1))[0].prompt_tokens == len(
        tokenizer.encode("Hello!"))
    assert batch_generate(model, tokenizer, [with_system, "Hello"], max_tokens=6) == [
        generate(model, tokenizer, ids, max_tokens=6), generate(model, tokenizer, "Hello", max_tokens=6)]


def test_prefill_progress_reports_every_chunk(reference):
    """`prefill_progress` is called before the first chunk and after each one, the last when the prompt is done,
    and changes nothing in what is generated."""
    _, model, tokenizer = reference
    ids = [tokenizer.bos_id] + [int(t) for t in np.random.default_rng(0).integers(4, 400, 45)]
    calls = []
    with_progress = generate(model, tokenizer, ids, max_tokens=6, prefill_step_size=16, prefill_progress=calls.append)
    assert with_progress == generate(model, tokenizer, ids, max_tokens=6, prefill_step_size=16)
    assert [(c.done, c.total) for c in calls] == [(0, 46), (16, 46), (32, 46), (46, 46)]
    assert calls[0].seconds == 0 and calls[0].tps == 0
    assert all(a.seconds <= b.seconds for a, b in zip(calls, calls[1:])) and calls[-1].tps > 0
    # A prompt of one chunk: the start and the end.
    calls.clear()
    generate(model, tokenizer, "Hello", max_tokens=2, prefill_progress=calls.append)
    n = len(tokenizer.encode("Hello"))
    assert [(c.done, c.total) for c in calls] == [(0, n), (n, n)]
