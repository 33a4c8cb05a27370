"""Converted folders tokenize the same in rg_mlx, mlx-lm and Hugging Face transformers, chat template included."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rg_mlx import Tokenizer
from rg_mlx.convert import convert, is_chat_checkpoint
from rg_mlx.convert.sources import Checkpoint

TEXTS = [
    "Hello world! How are you today?",
    "Café, naïve 🙂 and 日本語",
    "  leading spaces",
    "Multiple   spaces\tand\nnewlines\n\n",
    "x",
]
SYSTEM = "Be brief."
CHAT = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": " Hi there. "},
    {"role": "user", "content": "What is Griffin?\n"},
    {"role": "assistant", "content": "A model."},
    {"role": "user", "content": "Thanks 🙂"},
]


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory) -> Path:
    # Named like an instruction-tuned checkpoint: the chat template comes by the default rule.
    import shutil

    source = tmp_path_factory.mktemp("src") / "tiny-2b-it"
    shutil.copytree(tiny_model_dir, source)
    return convert(source, tmp_path_factory.mktemp("out") / "tiny").path


def ids(out) -> list[int]:
    return out if isinstance(out, list) else list(out["input_ids"])


def test_folder_has_the_hugging_face_tokenizer_files(converted):
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["bos_token"] == "<bos>" and "chat_template" in config
    assert config["additional_special_tokens"] == ["<start_of_turn>", "<end_of_turn>"]
    special = json.loads((converted / "special_tokens_map.json").read_text())
    assert {special[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")} == {
        "<bos>", "<eos>", "<pad>", "<unk>"}
    tok = Tokenizer(converted)
    assert json.loads((converted / "config.json").read_text())["eos_token_id"] == [tok.eos_id, tok.end_of_turn_id]
    assert tok.is_chat_model
    card = (converted / "README.md").read_text()  # shows the chat format: messages in Python
    assert 'rg_mlx.generate(model, tokenizer, [{"role": "user", "content": "Why is the sky blue?"}])' in card


def test_rg_mlx_mlx_lm_and_transformers_tokenize_alike(converted):
    from mlx_lm.utils import load
    from transformers import AutoTokenizer

    ours = Tokenizer(converted)
    hf = AutoTokenizer.from_pretrained(converted)
    _, mlx_lm = load(str(converted))
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids == mlx_lm.encode(text), text
    for messages, system in [(CHAT[:1], None), (CHAT[:1], SYSTEM), (CHAT, SYSTEM), (CHAT[:3], None)]:
        with_system = ([{"role": "system", "content": system}] if system else []) + messages
        expected = ours.chat_tokens(messages, system=system)
        assert ids(hf.apply_chat_template(with_system, add_generation_prompt=True)) == expected
        assert ids(mlx_lm.apply_chat_template(with_system, add_generation_prompt=True)) == expected
    assert mlx_lm.eos_token_ids == {ours.eos_id, ours.end_of_turn_id}


def _prompt_tokens(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, text
    return int(match.group(1))


# rg-mlx generate's flags -> (mlx_lm.generate's flags, whether the chat template applies). With no flag both
# apply the chat template of a chat model (this one is instruction-tuned).
FORMS = {"": ([], True), "--chat": ([], True), "--raw": (["--ignore-chat-template"], False)}


@pytest.mark.parametrize("flag", ["", "--chat", "--raw"])
def test_mlx_lm_generate_reads_the_prompt_as_rg_mlx_does(converted, flag):
    prompt = "What is Griffin?"
    theirs_flags, chat = FORMS[flag]
    mlx_lm = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(converted), "--prompt", prompt,
              "--max-tokens", "2"] + theirs_flags
    ours = [sys.executable, "-m", "rg_mlx", "generate", "--model", str(converted), "--prompt", prompt,
            "-m", "2"] + ([flag] if flag else [])
    theirs = subprocess.run(mlx_lm, capture_output=True, text=True, timeout=300)
    assert theirs.returncode == 0, theirs.stderr
    mine = subprocess.run(ours, capture_output=True, text=True, timeout=300)
    assert mine.returncode == 0, mine.stderr
    expected = Tokenizer(converted)
    n = len(expected.chat_tokens([{"role": "user", "content": prompt}]) if chat else expected.encode(prompt))
    assert _prompt_tokens(r"Prompt: (\d+) tokens", theirs.stdout) == n
    assert _prompt_tokens(r"prompt: (\d+) tokens", mine.stderr) == n


def test_a_base_model_gets_no_chat_template(tiny_model_dir, tmp_path):
    out = convert(tiny_model_dir, tmp_path / "base", chat=False).path
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and config["add_bos_token"] is True
    assert not Tokenizer(out).is_chat_model


@pytest.mark.parametrize(
    "source, template, expected",
    [
        ("google/recurrentgemma-2b-it", None, True),
        ("google/recurrentgemma-9b", None, False),
        ("models/recurrentgemma_2b_it", None, True),
        ("kaggle/2b-it/2b-it.pt", None, True),
        ("kaggle/2b/2b.pt", None, False),
        ("downloads/my-finetune", "{{ bos_token }}", True),
        ("models/transit", None, False),  # "it" inside a word is not the suffix
    ],
)
def test_which_checkpoints_are_instruction_tuned(source, template, expected):
    checkpoint = Checkpoint(args=None, tensors={}, tokenizer=None, chat_template=template)
    assert is_chat_checkpoint(source, checkpoint) is expected


def test_the_bundled_demo_is_a_chat_model():
    from rg_mlx.demo import model_path

    assert Tokenizer(model_path()).is_chat_model
