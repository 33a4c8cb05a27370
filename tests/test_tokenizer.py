"""Tokenizer: special ids from the file, Gemma chat format, streaming detokenization."""

from __future__ import annotations

import random

import pytest
import sentencepiece as spm

from conftest import TOKENIZER_TEXT
from rg_mlx import RGError, Tokenizer
from rg_mlx.demo.train import GEMMA_LAYOUT

TRICKY = [
    "Hello world!",
    " leading space and trailing space ",
    "Multiple   spaces\tand\ttabs",
    "new\nlines\n\n\nand a blank line\n",
    "Café, naïve, über, señor, Ångström, façade",
    "日本語のテキストと中文文本。",
    "Emoji 🙂🚀✨ and a flag 🇯🇵 and a family 👨‍👩‍👧",
    "\n  \n",
    "🦙",
]


def stream(tok: Tokenizer, ids: list[int]) -> tuple[str, list[str]]:
    d = tok.detokenizer()
    pieces = [d.add_token(i) for i in ids]
    pieces.append(d.finalize())
    return "".join(pieces), pieces


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path) -> Tokenizer:
    return Tokenizer(tiny_tokenizer_path)


def train(folder, **options) -> Tokenizer:
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(TOKENIZER_TEXT * 20))
    options = {"byte_fallback": True, "minloglevel": 2, **options}
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), **options)
    return Tokenizer(folder / "tokenizer.model")


def test_special_ids_come_from_the_file(tok, tmp_path):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.sp.id_to_piece(tok.start_of_turn_id) == "<start_of_turn>"
    assert tok.sp.id_to_piece(tok.end_of_turn_id) == "<end_of_turn>"
    assert tok.stop_ids == {tok.eos_id, tok.end_of_turn_id}
    assert tok.vocab_size == 400
    # Another layout: the ids move with the file.
    layout = {**GEMMA_LAYOUT, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3,
              "user_defined_symbols": ["<mask>", "<end_of_turn>", "<start_of_turn>"]}
    other = train(tmp_path, vocab_size=380, character_coverage=0.98, **layout)
    assert (other.pad_id, other.eos_id, other.bos_id) == (3, 2, 1)
    assert (other.start_of_turn_id, other.end_of_turn_id) == (6, 5)
    assert other.stop_ids == {2, 5}


def test_encode_decode(tok):
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.encode("Hello world", add_bos=False) == ids[1:]
    assert tok.decode(ids) == "Hello world"
    assert tok.encode("", add_bos=True) == [tok.bos_id]


def test_chat_format_is_gemma_template(tok):
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": " How are you? \n"},
    ]
    ids = tok.chat_tokens(messages, system="Be brief.")
    template = (
        "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # Same ids as tokenizing the whole template string (special pieces matched in the text).
    assert ids == tok.encode(template)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids.count(tok.start_of_turn_id) == 4 and ids.count(tok.end_of_turn_id) == 3
    # "model" is accepted as the assistant role; no generation prompt when asked.
    alt = [dict(m, role="model") if m["role"] == "assistant" else m for m in messages]
    assert tok.chat_tokens(alt, system="Be brief.") == ids
    no_prompt = tok.chat_tokens(messages[:2], add_generation_prompt=False)
    assert tok.decode(no_prompt).endswith("Hello!<end_of_turn>\n")


def test_chat_continuation_has_no_second_bos(tok):
    first = tok.chat_tokens([{"role": "user", "content": "Hi"}])
    reply = tok.encode("Hello!", add_bos=False)
    more = tok.chat_tokens([{"role": "user", "content": "Again"}], system="ignored", continuation=True)
    assert tok.bos_id not in more
    assert more[0] == tok.end_of_turn_id
    turns = [("user", "Hi"), ("assistant", "Hello!"), ("user", "Again")]
    whole = tok.chat_tokens([{"role": r, "content": c} for r, c in turns])
    assert first + reply + more == whole


def test_chat_rejects_bad_roles(tok):
    with pytest.raises(RGError, match="role"):
        tok.chat_tokens([{"role": "system", "content": "x"}])
    with pytest.raises(RGError, match="alternate"):
        tok.chat_tokens([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(RGError, match="alternate"):
        tok.chat_tokens([{"role": "assistant", "content": "a"}])


@pytest.mark.parametrize("text", TRICKY)
def test_streaming_equals_full_decode(tok, text):
    ids = tok.encode(text, add_bos=False)
    whole, pieces = stream(tok, ids)
    assert whole == tok.decode(ids) == text
    assert "\ufffd" not in whole


def test_streaming_holds_back_incomplete_characters(tok):
    ids = tok.encode("🦙", add_bos=False)
    assert len(ids) == 4 and all(tok.sp.is_byte(i) for i in ids)  # byte fallback
    d = tok.detokenizer()
    assert [d.add_token(i) for i in ids] == ["", "", "", "🦙"]
    assert d.finalize() == ""
    # A sequence cut short is flushed as replacement characters, as SentencePiece decodes it.
    d = tok.detokenizer()
    assert d.add_token(ids[0]) + d.add_token(ids[1]) == ""
    assert d.finalize() == tok.decode(ids[:2]) == "\ufffd\ufffd"


def test_streaming_random_ids_match_sentencepiece(tok):
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        assert stream(tok, ids)[0] == tok.decode(ids), ids


def test_streaming_with_dummy_prefix_tokenizer(tmp_path):
    # Models trained with add_dummy_prefix drop the first leading space when decoding.
    other = train(tmp_path, vocab_size=350, model_type="unigram", character_coverage=0.98)
    assert other.sp.encode("a", out_type=str)[0].startswith("\u2581")
    for text in TRICKY:
        ids = other.encode(text, add_bos=False)
        assert stream(other, ids)[0] == other.decode(ids)
    rng = random.Random(1)
    for _ in range(2000):
        ids = [rng.randrange(other.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert stream(other, ids)[0] == other.decode(ids), ids


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(RGError, match="no tokenizer.model"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(RGError, match="not a SentencePiece model"):
        Tokenizer(tmp_path)
