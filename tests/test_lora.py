"""LoRA on our model: `rg-mlx mlx-lm lora` trains it (and says so in the adapter), `rg_mlx.load(adapter_path=...)`
applies the adapter as mlx-lm does, and an adapter trained on mlx-lm's own RecurrentGemma warns."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import TOKENIZER_TEXT
from test_mlx_lm import greedy_alone, registration_restored

from rg_mlx import ChatSession, RGError, integration, load
from rg_mlx.cli import main

LORA_FLAGS = ["--train", "--batch-size", "2", "--num-layers", "2", "--learning-rate", "2e-3", "--val-batches", "1",
              "--steps-per-report", "100", "--steps-per-eval", "100", "--save-every", "100"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny dataset in mlx-lm's jsonl format (`{"text": ...}` per line)."""
    folder = tmp_path_factory.mktemp("lora_data")
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TOKENIZER_TEXT))
    return folder


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, data, tmp_path_factory) -> Path:
    """An adapter trained by `rg-mlx mlx-lm lora` on the tiny model."""
    out = tmp_path_factory.mktemp("adapter")
    with registration_restored():
        argv = ["mlx-lm", "lora", "--model", str(tiny_model_dir), "--data", str(data), "--iters", "12"]
        assert main([*argv, "--adapter-path", str(out), *LORA_FLAGS]) == 0
    return out


def mean_loss(model, tokenizer) -> float:
    """Mean next-token loss of `model` over the dataset's texts."""
    losses = []
    for text in TOKENIZER_TEXT:
        ids = tokenizer.encode(text)
        logits = model(mx.array([ids[:-1]]))[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        losses.append(-np.array(lp)[np.arange(len(ids) - 1), ids[1:]].mean())
    return float(np.mean(losses))


def test_rg_mlx_mlx_lm_lora_trains_our_model(adapter, tiny_model_dir):
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config[integration.TRAINED_MODEL_KEY] == "rg_mlx.integration.Model"
    trained = mx.load(str(adapter / "adapters.safetensors"))
    assert trained and all(k.startswith("model.layers.") and k.endswith(("lora_a", "lora_b")) for k in trained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own adapter: no warning
        tuned, tokenizer = load(tiny_model_dir, adapter_path=adapter)
    base, _ = load(tiny_model_dir)
    assert mean_loss(tuned, tokenizer) < 0.8 * mean_loss(base, tokenizer)


def test_our_adapter_loads_as_mlx_lm_applies_it(adapter, tiny_model_dir):
    import mlx_lm

    ours, _ = load(tiny_model_dir, adapter_path=adapter)
    with registration_restored():
        integration.register_with_mlx_lm()
        theirs, tokenizer = mlx_lm.load(str(tiny_model_dir), adapter_path=str(adapter))
    assert type(theirs) is integration.Model
    prompt = tokenizer.encode("The quick brown fox")
    np.testing.assert_allclose(np.array(ours(mx.array([prompt]))), np.array(theirs(mx.array([prompt]))), atol=1e-6)
    text = mlx_lm.generate(theirs, tokenizer, prompt, max_tokens=12)
    assert text == tokenizer.decode(greedy_alone(ours, prompt, 12)[0])


def test_an_adapter_trained_on_mlx_lms_own_model_warns(tiny_model_dir, data, tmp_path, monkeypatch):
    # A plain `mlx_lm.lora` trains mlx-lm's own RecurrentGemma: same parameter names, other numerics.
    import importlib

    import mlx.nn as nn
    import mlx_lm.lora

    out = tmp_path / "foreign"
    with registration_restored():
        sys.modules.pop(integration.MODULE_NAME, None)
        vars(sys.modules["mlx_lm.models"]).pop("recurrent_gemma", None)
        theirs = importlib.import_module(integration.MODULE_NAME)
        # mlx-lm 0.32's own Model.__init__ skips nn.Module.__init__, so its `freeze` (the first thing
        # mlx_lm.lora does) fails on MLX 0.32; initialise the module first, as any other model does.
        init = theirs.Model.__init__
        monkeypatch.setattr(theirs.Model, "__init__", lambda self, config: (nn.Module.__init__(self), init(self, config))[1])
        argv = ["--model", str(tiny_model_dir), "--data", str(data), "--iters", "2", "--adapter-path", str(out)]
        monkeypatch.setattr(sys, "argv", ["mlx_lm.lora", *argv, *LORA_FLAGS])
        mlx_lm.lora.main()
        assert Path(theirs.__file__).parent.parent == Path(mlx_lm.__file__).parent  # mlx-lm's own module
    assert integration.TRAINED_MODEL_KEY not in json.loads((out / "adapter_config.json").read_text())
    with pytest.warns(UserWarning, match="not on rg_mlx's model.*retrain it with `rg-mlx mlx-lm lora`"):
        model, _ = load(tiny_model_dir, adapter_path=out)
    assert np.isfinite(np.array(model(mx.array([[5, 6, 7]])))).all()


def test_a_wrong_adapter_path_fails_first(tiny_model_dir, tmp_path):
    with pytest.raises(RGError, match="not an adapter folder"):
        load(tiny_model_dir, adapter_path=tmp_path)


@pytest.fixture(scope="module")
def tiny_with_tokenizer_files(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its Hugging Face tokenizer files: mlx-lm tokenizes text as rg_mlx does."""
    import shutil

    from rg_mlx import Tokenizer

    folder = tmp_path_factory.mktemp("tiny_hf") / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    for name, content in Tokenizer(folder / "tokenizer.model").hf_files(chat=True).items():
        (folder / name).write_text(json.dumps(content))
    return folder


def test_generate_and_chat_take_the_adapter(adapter, tiny_with_tokenizer_files, capsys, monkeypatch):
    # `rg-mlx generate --adapter-path` gives what mlx-lm's generate gives with the same adapter (and not
    # what the base model gives); `rg-mlx chat --adapter-path` chats with the tuned model.
    import io

    import mlx_lm

    folder, prompt = str(tiny_with_tokenizer_files), "The quick brown fox"
    # --raw: the prompt as text, as mlx_lm.generate's Python function takes it (the folder has a chat template).
    assert main(["generate", "--model", folder, "--adapter-path", str(adapter), "--prompt", prompt, "-m", "12",
                 "--raw"]) == 0
    ours = capsys.readouterr().out
    with registration_restored():
        integration.register_with_mlx_lm()
        theirs, tokenizer = mlx_lm.load(folder, adapter_path=str(adapter))
        base, _ = mlx_lm.load(folder)
    assert ours == mlx_lm.generate(theirs, tokenizer, prompt, max_tokens=12) + "\n"
    assert ours != mlx_lm.generate(base, tokenizer, prompt, max_tokens=12) + "\n"

    tuned, our_tokenizer = load(folder, adapter_path=adapter)
    expected = "".join(r.text for r in ChatSession(tuned, our_tokenizer, max_tokens=10).send("Hello!"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n/quit\n"))
    assert main(["chat", "--model", folder, "--adapter-path", str(adapter), "-m", "10"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_the_app_loads_its_model_with_the_adapter(adapter, tiny_model_dir):
    from rg_mlx.app.server import ChatApp

    app = ChatApp(str(tiny_model_dir), adapter_path=str(adapter))
    try:
        assert app.service.models.current.adapter_path == str(adapter)
        tuned, _ = load(tiny_model_dir, adapter_path=adapter)
        tokens = mx.array([[5, 6, 7, 8]])
        served = app.worker.call(lambda: np.array(app.model(tokens)))  # on the worker: its model's streams live there
        np.testing.assert_array_equal(served, np.array(tuned(tokens)))
    finally:
        app.close()
