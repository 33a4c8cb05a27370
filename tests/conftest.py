"""Shared fixtures: everything offline, tiny models and a tiny real SentencePiece tokenizer."""

from __future__ import annotations

import os

# Nothing in the tests may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import rg_mlx  # noqa: E402,F401  (before any test imports mlx: the Linux BLAS fast path; RG_MLX_BLAS=off disables it)

TOKENIZER_TEXT = [
    "Hello world! How are you today?",
    "RecurrentGemma is a Griffin model with gated linear recurrences and local attention.",
    "Convert a checkpoint with rg-mlx convert, then chat with rg-mlx chat.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Café, naïve, über, señor: accents are fine.",
    "日本語のテキストと中文文本。",
    "Emoji: 🙂 🚀 ✨",
    "Multiple   spaces\tand\nnewlines\n\n are kept.",
]


def train_tiny_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """A real SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and byte fallback."""
    import sentencepiece as spm

    from rg_mlx.demo.train import GEMMA_LAYOUT

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(TOKENIZER_TEXT * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, character_coverage=0.98,
        **GEMMA_LAYOUT,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """Path to a tiny trained `tokenizer.model` (vocab 400)."""
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_tiny_model(folder: Path, tokenizer_path: Path | None = None, *, vocab_size: int = 400, seed: int = 0, **overrides) -> Path:
    """A random tiny RecurrentGemma folder (config.json, model.safetensors, tokenizer.model)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from rg_mlx import Model, ModelArgs

    config = dict(
        model_type="recurrent_gemma",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        block_types=["recurrent", "recurrent", "attention"],
        attention_window_size=16,
        logits_soft_cap=30.0,
    )
    config.update(overrides)
    args = ModelArgs.from_dict(config)
    mx.random.seed(seed)
    model = Model(args)
    weights = {}
    for name, p in tree_flatten(model.parameters()):
        scale = 0.5 if "embed" in name else 0.2
        weights[name] = mx.random.normal(p.shape) * scale
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(args.to_dict(), indent=2))
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_path) -> Path:
    """A tiny random model folder with the tiny tokenizer (vocab 400, window 16)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"), tiny_tokenizer_path)


@pytest.fixture
def slow_prefill(monkeypatch):
    """Every `ChatSession.send` pauses 0.3 s after each prefill progress call, so that a front end following
    the reply sees each one (progress that comes faster than it reads is merged)."""
    import time

    from rg_mlx.chat import ChatSession

    send = ChatSession.send

    def slow_send(self, text, *, prefill_progress=None, **kwargs):
        def progress(p):
            prefill_progress(p)
            time.sleep(0.3)

        return send(self, text, prefill_progress=progress, **kwargs)

    monkeypatch.setattr(ChatSession, "send", slow_send)
