"""mlx-lm's tools on our model (`rg_mlx.integration`): the model mlx-lm builds equals ours, its batching
(`BatchGenerator`, `batch_generate`) gives every row what it gives alone, its generation, prompt-cache files
and prompt-cache copies work on our state, its perplexity is ours, and the cache protocol is the one pinned."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import sys
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import write_tiny_model

import rg_mlx.state
from rg_mlx import cpu, integration, load_model, loading
from rg_mlx.cli import main
from rg_mlx.demo import model_path as demo_path
from rg_mlx.state import state_bytes


@contextlib.contextmanager
def registration_restored():
    """Undo `register_with_mlx_lm` afterwards, so other tests see mlx-lm as installed."""
    import mlx_lm.models

    saved = sys.modules.get(integration.MODULE_NAME), mlx_lm.models.__dict__.get("recurrent_gemma")
    try:
        yield
    finally:
        for value, restore, remove in [
            (saved[0], lambda v: sys.modules.__setitem__(integration.MODULE_NAME, v),
             lambda: sys.modules.pop(integration.MODULE_NAME, None)),
            (saved[1], lambda v: setattr(mlx_lm.models, "recurrent_gemma", v),
             lambda: mlx_lm.models.__dict__.pop("recurrent_gemma", None)),
        ]:
            restore(value) if value is not None else remove()


@pytest.fixture(scope="module")
def registered():
    with registration_restored():
        integration.register_with_mlx_lm()
        yield


def greedy_alone(model, prompt: list[int], steps: int, history: list[int] | None = None):
    """Greedy tokens and the log-probabilities before each, for `prompt` alone (after `history`)."""
    cache = model.make_cache()
    if history:
        model(mx.array([history]), cache=cache)
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    tokens, logprobs = [], []
    for _ in range(steps):
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens.append(int(mx.argmax(lp, axis=-1).item()))
        logprobs.append(np.array(lp[0]))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[:, -1]
    return tokens, logprobs


# -- The model mlx-lm builds --------------------------------------------------------------------

CONFIGS = {
    "rra": dict(),
    "wide_lru_attention_first": dict(lru_width=96, block_types=["attention", "recurrent", "recurrent"]),
    "no_cap_no_scale_window_4": dict(
        logits_soft_cap=0.0, embeddings_scale_by_sqrt_dim=False, attention_window_size=4,
        block_types=["recurrent", "attention"],
    ),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_mlx_lm_builds_our_model_with_our_logits(config, registered, tmp_path):
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as mlx_lm_load_model

    folder = write_tiny_model(tmp_path, **CONFIGS[config])
    theirs, _ = mlx_lm_load_model(folder)
    ours = load_model(folder, dtype="float32")
    assert type(theirs) is integration.Model and cpu.accelerated(theirs) == cpu.wanted()
    tokens = mx.array(np.random.default_rng(0).integers(0, 400, (2, 30)))  # past every window
    np.testing.assert_allclose(np.array(theirs(tokens)), np.array(ours(tokens)), atol=1e-6, rtol=0)
    # mlx-lm's own generation loop (chunked prefill, then decode) on it: our greedy tokens.
    prompt = tokens[0, :21]
    steps = [int(t) for t, _ in itertools.islice(generate_step(prompt, theirs, prefill_step_size=4), 8)]
    assert steps == greedy_alone(ours, prompt.tolist(), 8)[0]


def test_mlx_lm_build_applies_our_dtype_and_acceleration_rules(registered, tmp_path, monkeypatch):
    # A checkpoint stored in bfloat16 computes in float32 on the CPU, as `rg_mlx.load` does; with
    # RG_MLX_ACCELERATE=0 the plain model. Loading an adapter later does not rebuild anything.
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx.utils import tree_flatten

    folder = write_tiny_model(tmp_path)
    weights = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(str(folder / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()})
    tokens = mx.array([[3, 14, 15, 92, 65, 35]])
    # Accelerated, the same dtype rule as `rg_mlx.load`: with the native CPU products, the bfloat16 Linear and
    # embedding weights stay bfloat16 (float32 compute), the rest is float32.
    theirs, _ = mlx_lm_load_model(folder)
    ours = load_model(folder)
    assert cpu.accelerated(theirs) == cpu.wanted()
    dtypes = {k: v.dtype for k, v in tree_flatten(theirs.parameters())}
    assert dtypes == {k: v.dtype for k, v in tree_flatten(ours.parameters())}
    assert (mx.bfloat16 in dtypes.values()) == loading.keeps_stored_weights(mx.float32)
    np.testing.assert_array_equal(np.array(theirs(tokens)), np.array(ours(tokens)))
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    theirs, _ = mlx_lm_load_model(folder)
    assert not cpu.accelerated(theirs)
    assert {v.dtype for _, v in tree_flatten(theirs.parameters())} == {mx.float32}
    np.testing.assert_array_equal(np.array(theirs(tokens)), np.array(load_model(folder, accelerate=False)(tokens)))


# -- Batching: every row as alone --------------------------------------------------------------


@pytest.fixture(scope="module")
def window_8(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("window_8"), attention_window_size=8, seed=3)


@pytest.mark.parametrize("accelerate", [False, True], ids=["plain", "accelerated"])
def test_batch_generator_rows_joining_and_leaving_match_single_runs(window_8, accelerate):
    # mlx-lm's continuous batching, driven directly: three rows start (prompts of 13, 2 and 9 tokens,
    # prefilled right-padded in chunks of 5), two join while those decode (20 tokens, past the window;
    # and one token after a 11-token history, whose cache is merged with fresh ones), rows leave as
    # their budgets run out. Every row's tokens and log-probabilities are those of the row alone.
    from mlx_lm.generate import BatchGenerator

    model = load_model(window_8, accelerate=accelerate)
    rng = np.random.default_rng(5)
    rows = [  # (prompt, budget, history)
        (rng.integers(0, 400, 13).tolist(), 6, None),
        (rng.integers(0, 400, 2).tolist(), 12, None),
        (rng.integers(0, 400, 9).tolist(), 9, None),
        (rng.integers(0, 400, 20).tolist(), 7, None),
        (rng.integers(0, 400, 1).tolist(), 10, rng.integers(0, 400, 11).tolist()),
    ]
    gen = BatchGenerator(model, prefill_step_size=5, prefill_batch_size=3, completion_batch_size=8)
    got: dict[int, list] = {}
    uids = gen.insert([p for p, _, _ in rows[:3]], max_tokens=[b for _, b, _ in rows[:3]])
    for step in range(100):
        if step == 3:
            warm = model.make_cache()
            model(mx.array([rows[4][2]]), cache=warm)
            uids += gen.insert([rows[3][0], rows[4][0]], max_tokens=[rows[3][1], rows[4][1]], caches=[None, warm])
        _, responses = gen.next()
        for r in responses:
            got.setdefault(r.uid, []).append((r.token, np.array(r.logprobs), r.finish_reason))
        if step > 3 and all(got.get(u) and got[u][-1][2] for u in uids):
            break
    gen.close()
    for uid, (prompt, budget, history) in zip(uids, rows):
        tokens, logprobs = greedy_alone(model, prompt, budget, history)
        assert [t for t, _, _ in got[uid]] == tokens, uid
        assert max(np.abs(lp - want).max() for (_, lp, _), want in zip(got[uid], logprobs)) <= 1e-4, uid
        assert [f for _, _, f in got[uid]] == [None] * (budget - 1) + ["length"]


@pytest.fixture(scope="module")
def demo(registered):
    import mlx_lm

    return mlx_lm.load(str(demo_path()))


# Prompts of 7, 1, 20 and 1 tokens, as in the issue.
DEMO_PROMPTS = ["Once upon a time there", "A", "The little dog ran to the park and saw a big red ball", "Hi"]


def test_batch_generate_on_the_demo_model_matches_single_runs(demo, monkeypatch):
    from mlx_lm.generate import batch_generate

    model, tokenizer = demo
    prompts = [tokenizer.encode(p) for p in DEMO_PROMPTS]
    # Rows of different lengths, each <bos> first (tokenizer_config.json).
    assert len({len(p) for p in prompts}) >= 3 and all(p[0] == tokenizer.bos_token_id for p in prompts)

    def run(batch):
        return batch_generate(model, tokenizer, batch, max_tokens=24, return_token_ids=True).token_ids

    alone = [run([p])[0] for p in prompts]
    assert run(prompts) == alone
    # The same batch with the lengths ignored (as before: padding ran through the state) does differ.
    monkeypatch.setattr(rg_mlx.state, "real_lengths", lambda cache, T: None)
    assert run(prompts) != alone


# -- Generation and prompt caches ----------------------------------------------------------------


def test_stream_generate_and_prompt_cache_files_on_our_state(demo, tmp_path):
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    model, tokenizer = demo
    history, follow = tokenizer.encode(DEMO_PROMPTS[2]), tokenizer.encode(" and then")
    tokens = [r.token for r in stream_generate(model, tokenizer, history, max_tokens=12)]
    assert tokens == greedy_alone(model, history, 12)[0]

    cache = make_prompt_cache(model)
    model(mx.array([history]), cache=cache)
    save_prompt_cache(str(tmp_path / "history.safetensors"), cache, {"model": "demo"})
    loaded, metadata = load_prompt_cache(str(tmp_path / "history.safetensors"), return_metadata=True)
    copied = copy.deepcopy(cache)
    assert metadata["model"] == "demo" and state_bytes(loaded) == state_bytes(cache)
    expected = np.array(model(mx.array([history + follow]))[:, -1])
    for state in (loaded, copied, cache):  # the copy and the file are independent of the original
        np.testing.assert_allclose(np.array(model(mx.array([follow]), cache=state)[:, -1]), expected, atol=1e-4)


def test_lru_prompt_cache_hands_out_independent_copies(demo):
    # mlx_lm.server keeps states in an LRUPromptCache and continues requests from deep copies of them.
    from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache

    model, tokenizer = demo
    history, follow = tokenizer.encode(DEMO_PROMPTS[0]), tokenizer.encode(" a dragon")
    cache = make_prompt_cache(model)
    model(mx.array([history]), cache=cache)
    lru = LRUPromptCache(max_size=4)
    lru.insert_cache("demo", history, cache)
    assert lru.nbytes == state_bytes(cache)
    expected = np.array(model(mx.array([history + follow]))[:, -1])
    for _ in range(2):  # continuing from the first copy must not change what the second starts from
        fetched, rest = lru.fetch_nearest_cache("demo", history + follow)
        assert rest == follow
        np.testing.assert_allclose(np.array(model(mx.array([rest]), cache=fetched)[:, -1]), expected, atol=1e-4)


# -- Evaluation ----------------------------------------------------------------------------------


def test_mlx_lm_perplexity_is_ours(window_8, registered):
    from mlx_lm.perplexity import eval_ppl
    from mlx_lm.utils import load_model as mlx_lm_load_model

    data = mx.array(np.random.default_rng(2).integers(0, 400, (5, 24)))
    theirs, _ = mlx_lm_load_model(window_8)
    ppl, _ = eval_ppl(theirs, data, batch_size=2)
    logits = np.array(load_model(window_8)(data[:, :-1])).astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    targets = np.array(data[:, 1:])
    ours = np.exp(-np.take_along_axis(logprobs, targets[..., None], axis=-1).mean())
    assert abs(ppl - ours) <= 1e-5 * ours


# -- The protocol pinned --------------------------------------------------------------------------

# What mlx-lm's generation, batching and prompt cache call on a state (an ArraysCache each layer),
# and the keywords of `prepare`. A new call (or keyword) in another mlx-lm version fails this test:
# check that our state implements it, then update these and the pin in pyproject.toml.
PROTOCOL = {"merge", "prepare", "finalize", "extend", "filter", "extract", "empty", "state", "nbytes", "is_trimmable"}
PREPARE_KEYWORDS = {"lengths", "right_padding"}


def test_mlx_lm_cache_protocol_is_the_one_implemented(window_8, monkeypatch):
    from mlx_lm.generate import BatchGenerator, batch_generate
    from mlx_lm.models.cache import ArraysCache, LRUPromptCache

    major_minor = tuple(int(p) for p in version("mlx-lm").split(".")[:2])
    assert (0, 32) <= major_minor < (0, 33), "pyproject.toml pins mlx-lm>=0.32,<0.33: check the protocol, then the pin"
    calls: Counter = Counter()
    keywords: set = set()

    def code_of(member):
        member = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        return getattr(member, "__code__", None)

    own = {code_of(m) for cls in ArraysCache.__mro__[:-1] for m in vars(cls).values()}  # calls among themselves

    def spy(name, member):
        def called_from_mlx_lm() -> bool:
            caller = sys._getframe(2)
            return caller.f_globals.get("__name__", "").startswith("mlx_lm") and caller.f_code not in own

        if isinstance(member, property):
            def get(self):
                if called_from_mlx_lm():
                    calls[name] += 1
                return member.fget(self)

            return property(get, member.fset)
        function = member.__func__ if isinstance(member, classmethod) else member

        def wrapper(*args, **kwargs):
            if called_from_mlx_lm():
                calls[name] += 1
                if name == "prepare":
                    keywords.update(kwargs)
            return function(*args, **kwargs)

        return classmethod(wrapper) if isinstance(member, classmethod) else wrapper

    for cls in ArraysCache.__mro__[:-1]:
        for name, member in vars(cls).items():
            if not name.startswith("_") and (callable(member) or isinstance(member, (property, classmethod))):
                if name not in ArraysCache.__dict__ or cls is ArraysCache:
                    monkeypatch.setattr(ArraysCache, name, spy(name, member))

    model = load_model(window_8)
    gen = BatchGenerator(model, prefill_step_size=4, prefill_batch_size=2)
    uids = gen.insert([[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]], max_tokens=[3, 5, 2])
    finished, held = {}, 0
    while len(finished) < 2:
        for r in gen.next()[1]:
            if r.finish_reason:
                finished[r.uid] = r.prompt_cache  # extracted as mlx_lm.server keeps it
        held = max(held, gen.prompt_cache_nbytes)
    assert held > 0
    gen.remove([u for u in uids if u not in finished], return_prompt_caches=True)
    gen.close()
    lru = LRUPromptCache()
    lru.insert_cache("m", [1, 2, 3, 4, 5, 6], next(iter(finished.values())))
    lru.fetch_nearest_cache("m", [1, 2, 3, 4, 5, 6, 7])
    batch_generate(model, _NoText(), [[1, 2], [3, 4, 5, 6, 7]], max_tokens=2)
    assert set(calls) == PROTOCOL, f"mlx-lm now calls {sorted(set(calls) - PROTOCOL)}, no longer {sorted(PROTOCOL - set(calls))}"
    assert keywords == PREPARE_KEYWORDS
    # And what our state relies on in ArraysCache itself: the lengths, counted down, then dropped.
    cache = ArraysCache(2)
    cache.prepare(lengths=[3, 1])
    cache.advance(2)
    assert cache.lengths.tolist() == [1, -1]
    cache.finalize()
    assert cache.lengths is None


class _NoText:
    """The tokenizer `batch_generate` needs when only token ids matter."""

    eos_token_ids: list[int] = []

    def decode(self, tokens: list[int]) -> str:
        return ""


# -- The command ---------------------------------------------------------------------------------


def test_rg_mlx_mlx_lm_generate_runs_our_model(capsys):
    import mlx_lm

    prompt = "Once upon a time"
    with registration_restored():
        assert main(["mlx-lm", "generate", "--model", str(demo_path()), "--prompt", prompt, "--max-tokens", "12",
                     "--ignore-chat-template"]) == 0
        assert integration.registered()
        model, tokenizer = mlx_lm.load(str(demo_path()))
    assert type(model) is integration.Model
    tokens, _ = greedy_alone(load_model(demo_path()), tokenizer.encode(prompt), 12)
    out = capsys.readouterr().out
    assert tokenizer.decode(tokens).strip() in out
    assert "Generation: 12 tokens" in out


def test_rg_mlx_mlx_lm_errors(capsys):
    with pytest.raises(SystemExit):
        main(["mlx-lm", "convert"])  # not a tool that runs a model
    assert "invalid choice" in capsys.readouterr().err
    if importlib.util.find_spec("lm_eval") is None:
        with registration_restored():
            assert main(["mlx-lm", "evaluate"]) == 1
        assert "pip install lm-eval" in capsys.readouterr().err
