"""The Gemma SentencePiece tokenizer: encoding, chat formatting and streaming decoding.

Special ids are looked up by piece name in `tokenizer.model`, never assumed.
The chat format is Gemma's (see GRIFFIN.md):

    <bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n...

There is no system role: a system prompt is folded into the first user turn.
"""

from __future__ import annotations

import codecs
import functools
import json
from pathlib import Path

import sentencepiece as spm

from .errors import RGError, first_line

ROLES = {"user": "user", "assistant": "model", "model": "model"}
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

# Gemma's chat template, as Hugging Face tokenizers and mlx-lm apply it, formatting a conversation
# exactly as `Tokenizer.chat_tokens` does: `<bos>` first (the template adds it, so the prompt is not
# tokenized with another one), roles alternating from a user turn, "assistant" written as "model",
# contents trimmed, and a leading system message folded into the first user turn (Gemma has no system
# role; Gemma's own template raises on one).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] in ('assistant', 'model') else message['role'] -%}"
    "{%- set content = message['content'] | trim -%}"
    "{%- if loop.first and system -%}{%- set content = system + '\\n\\n' + content -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + content + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def _replace_per_byte(error: UnicodeDecodeError) -> tuple[str, int]:
    # SentencePiece turns every byte of an invalid UTF-8 sequence into one U+FFFD.
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("rg_mlx.per_byte", _replace_per_byte)


class Tokenizer:
    """A SentencePiece `tokenizer.model` (the Gemma file, or any byte-fallback model).

    Args:
        path: the `tokenizer.model` file, or a folder holding one.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise RGError(f"{path}: no tokenizer.model: copy Gemma's tokenizer.model next to the weights")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise RGError(f"{path}: not a SentencePiece model ({first_line(e)})") from None
        self.path = path
        self.vocab_size: int = self.sp.get_piece_size()
        self.pad_id = self._special("<pad>", self.sp.pad_id())
        self.eos_id = self._special("<eos>", self.sp.eos_id())
        self.bos_id = self._special("<bos>", self.sp.bos_id())
        self.start_of_turn_id = self._special("<start_of_turn>")
        self.end_of_turn_id = self._special("<end_of_turn>")
        # The ids that end a reply, `<eos>` first (generation_config.json's `eos_token_id` lists them so).
        self.eos_ids: tuple[int, ...] = tuple(i for i in (self.eos_id, self.end_of_turn_id) if i is not None)
        self.stop_ids: frozenset[int] = frozenset(self.eos_ids)
        self.chat_template: str | None = read_chat_template(path.parent / CONFIG_FILE)

    @property
    def is_chat_model(self) -> bool:
        """Whether the model is instruction-tuned: its folder's `tokenizer_config.json` has a chat template."""
        return self.chat_template is not None

    def hf_files(self, *, chat: bool) -> dict[str, dict]:
        """The Hugging Face tokenizer files of a model folder holding this `tokenizer.model`, so that
        `transformers.AutoTokenizer` and mlx-lm tokenize as `rg_mlx` does: `tokenizer_config.json`
        (`<bos>` added, the special tokens, and for a chat model `CHAT_TEMPLATE`) and
        `special_tokens_map.json`."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id,
                 "unk_token": self.sp.unk_id()}
        special = {key: self.sp.id_to_piece(i) for key, i in names.items() if i is not None and i >= 0}
        turns = [self.sp.id_to_piece(i) for i in (self.start_of_turn_id, self.end_of_turn_id) if i is not None]
        if turns:
            special["additional_special_tokens"] = turns
        config = {
            "tokenizer_class": "GemmaTokenizer",
            **special,
            "add_bos_token": self.bos_id is not None,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "sp_model_kwargs": {},
            "padding_side": "left",
            "model_max_length": 1_000_000,
        }
        if chat:
            config["chat_template"] = CHAT_TEMPLATE
        return {CONFIG_FILE: config, SPECIAL_TOKENS_FILE: special}

    def _special(self, piece: str, fallback: int = -1) -> int | None:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) == piece:
            return i
        return fallback if fallback >= 0 else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with `<bos>` first when `add_bos`."""
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` (control tokens such as `<bos>` and `<eos>` decode to nothing)."""
        return self.sp.decode(list(ids))

    def chat_tokens(
        self,
        messages: list[dict],
        *,
        system: str | None = None,
        add_generation_prompt: bool = True,
        continuation: bool = False,
    ) -> list[int]:
        """Token ids of a conversation in Gemma's chat format.

        Args:
            messages: `{"role": "user" | "assistant" | "model", "content": str}` dicts,
                alternating and starting with a user turn.
            system: a system prompt, folded into the first user turn (Gemma has no system role);
                ignored with `continuation`.
            add_generation_prompt: end with `<start_of_turn>model\\n` so the model replies next.
            continuation: the tokens that follow an existing conversation whose last model
                turn is still open: `<end_of_turn>\\n` first, no `<bos>`.
        """
        if self.start_of_turn_id is None or self.end_of_turn_id is None:
            raise RGError(f"{self.path}: no <start_of_turn>/<end_of_turn> pieces: not a Gemma chat tokenizer")
        newline = self.sp.encode("\n")
        ids = [self.end_of_turn_id, *newline] if continuation else self.encode("")
        for i, message in enumerate(messages):
            role = ROLES.get(message.get("role"))
            if role is None:
                raise RGError(f"message {i}: role {message.get('role')!r}: use 'user' or 'assistant'")
            if role != ("user" if i % 2 == 0 else "model"):
                raise RGError(f"message {i}: roles must alternate user/assistant, starting with user")
            content = str(message.get("content", "")).strip()
            if i == 0 and system and not continuation:
                content = f"{system.strip()}\n\n{content}"
            ids += [self.start_of_turn_id, *self.sp.encode(f"{role}\n{content}"), self.end_of_turn_id, *newline]
        if add_generation_prompt:
            ids += [self.start_of_turn_id, *self.sp.encode("model\n")]
        return ids

    def detokenizer(self) -> "StreamingDetokenizer":
        """A fresh streaming detokenizer for this tokenizer."""
        return StreamingDetokenizer(self)

    @functools.cached_property
    def _surfaces(self) -> list[bytes | None]:
        """Per id, the UTF-8 bytes it decodes to; None for pieces that decode to nothing."""
        sp = self.sp
        surfaces: list[bytes | None] = []
        for i, piece in enumerate(sp.id_to_piece(list(range(self.vocab_size)))):
            special = piece.startswith("<") and piece.endswith(">")  # only these can be special
            if special and sp.is_byte(i):
                surfaces.append(bytes([int(piece[3:5], 16)]))
            elif special and (sp.is_control(i) or sp.is_unused(i) or sp.is_unknown(i)):
                surfaces.append(sp.decode([i]).encode() or None)
            else:
                surfaces.append(piece.replace("\u2581", " ").encode())
        return surfaces

    @functools.cached_property
    def _drops_first_space(self) -> bool:
        """Whether decoding drops the leading "▁" of the first piece (`add_dummy_prefix` models)."""
        for i, piece in enumerate(self.sp.id_to_piece(list(range(self.vocab_size)))):
            if piece.startswith("\u2581") and not self.sp.is_control(i):
                return not self.sp.decode([i]).startswith(" ")
        return False


def read_chat_template(path: Path) -> str | None:
    """The chat template of the `tokenizer_config.json` at `path` (None where there is no file or template)."""
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) and template else None


class StreamingDetokenizer:
    """Turns tokens into text one at a time; the pieces concatenate to `Tokenizer.decode(all ids)`.

    Bytes of a character split over byte-fallback tokens (emoji, CJK, accents) are held back
    until the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._sp = tokenizer.sp
        self._surfaces = tokenizer._surfaces
        self._strip_first_space = tokenizer._drops_first_space
        self._decoder = codecs.getincrementaldecoder("utf-8")("rg_mlx.per_byte")
        self._started = False

    def add_token(self, token: int) -> str:
        """Add one token id; return the text it completes (possibly "")."""
        surface = self._surfaces[token]
        if surface is None:  # control tokens end a byte sequence
            text = self._decoder.decode(b"", final=True)
            self._decoder.reset()
        else:
            pending = self._decoder.getstate()[0]
            if (
                self._strip_first_space
                and not self._started
                and not pending
                and self._sp.id_to_piece(token).startswith("\u2581")
            ):
                surface = surface[1:]
            text = self._decoder.decode(surface)
        self._started = self._started or bool(text)
        return text

    def finalize(self) -> str:
        """The text still held back (an incomplete character decodes to U+FFFD per byte)."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
