"""`rg-mlx chat`: a terminal chat over a fixed-size state, with undo, retry, save and load.

On a terminal the input line has readline's editing and history (kept between runs in the user
cache folder unless `--no-history`), a line ending in a backslash continues on the next one, and
several lines pasted at once arrive as one message. Ctrl-C at the prompt asks before quitting while
the conversation is unsaved. Piped input is read one message per line, as it comes.
"""

from __future__ import annotations

import argparse
import select
import sys
from pathlib import Path

from ..memory import human_bytes
from ..sampling import CHAT, SETTINGS
from . import (
    PrefillBar,
    add_model_arguments,
    add_sampling_arguments,
    flag_error,
    load_model,
    memory_text,
    sampling_config,
)

HELP = "chat with a model in the terminal"
HISTORY_FILE = "chat_history"  # in `rg_mlx.paths.cache_dir()`
HISTORY_LENGTH = 1000
PASTE_WAIT_S = 0.03  # lines that arrive this soon after Enter were pasted with it

COMMANDS_HELP = f"""\
commands:
  /undo            drop the last exchange
  /retry           regenerate the last reply
  /reset           start over
  /save FILE       save the conversation and its state
  /load FILE       load a saved conversation
  /system [TEXT]   show, or set (and start over with) the system prompt
  /set NAME VALUE  change a setting (none/off where it allows none); /set alone shows them:
                   {', '.join(SETTINGS)}
  /history         show the conversation
  /stats           show the state size and tokens seen
  /help            this help
  /quit            leave (also Ctrl-D)
input:
  a line ending in \\ continues on the next line; pasted lines are sent as one message;
  the arrow keys edit the line and recall earlier ones; Ctrl-C stops a reply, and at the prompt
  quits (asking first while the conversation is unsaved)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt (folded into the first user turn: Gemma has no system role)")
    parser.add_argument(
        "--max-snapshots", type=int, default=16, help="per-turn state snapshots kept for /undo and /retry (default 16)"
    )
    parser.add_argument(
        "--no-history", action="store_true",
        help=f"keep no input history between runs (default: kept in the user cache folder, {HISTORY_FILE})",
    )
    add_sampling_arguments(parser, CHAT)


class LineReader:
    """Reads the user's messages.

    On a terminal (`interactive`): readline's line editing and history (read from and written to
    `history`, if given), a trailing backslash continues the message on the next line, and lines
    pasted together arrive as one message (readline's bracketed paste where the terminal has it;
    otherwise the lines already waiting when Enter is read). Otherwise one line is one message.
    """

    def __init__(self, interactive: bool, history: Path | None):
        self.interactive = interactive
        self.history = history
        self.readline = None
        if interactive:
            try:
                import readline
            except ImportError:  # Python built without it: plain input() still works
                return
            self.readline = readline
            if "libedit" not in (readline.__doc__ or ""):
                readline.parse_and_bind("set enable-bracketed-paste on")
            readline.set_history_length(HISTORY_LENGTH)
            if history is not None and history.is_file():
                try:
                    readline.read_history_file(history)
                except OSError:
                    pass  # an unreadable history is no reason not to chat

    def read(self) -> str:
        """The next message (raises EOFError at the end of input, KeyboardInterrupt on Ctrl-C)."""
        if not self.interactive:
            return input("")
        lines = [input(">>> ")]
        while True:
            if lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1]
                lines.append(input("... "))
            elif self._waiting():
                lines.append(input("... "))
            else:
                return "\n".join(lines)

    @staticmethod
    def _waiting() -> bool:
        """Whether more input is already waiting (the rest of a paste, on a terminal without bracketed paste)."""
        try:
            return bool(select.select([sys.stdin], [], [], PASTE_WAIT_S)[0])
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        """Write the history file (the last `HISTORY_LENGTH` lines)."""
        if self.readline is None or self.history is None:
            return
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(self.history)
        except OSError as e:
            print(f"rg-mlx chat: could not write the history file {self.history}: {e.strerror}", file=sys.stderr)


def _stream(responses, bar: PrefillBar) -> None:
    """Print a reply as it streams (`bar`: its prompt's progress bar), then its stats line."""
    last = None
    try:
        for last in responses:
            bar.clear()
            sys.stdout.write(last.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        responses.close()
        bar.clear()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None:
        print(
            f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"prompt {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"state {human_bytes(last.state_bytes)} | {memory_text(last)}]",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    from ..chat import ChatSession
    from ..errors import RGError
    from ..paths import cache_dir

    sampling = sampling_config(args, CHAT)
    if args.max_snapshots < 0:
        flag_error(args, f"--max-snapshots {args.max_snapshots}: must be >= 0")
    model, tokenizer = load_model(args, sampling)
    session = ChatSession(model, tokenizer, args.system, sampling=sampling, max_snapshots=args.max_snapshots)
    interactive = sys.stdin.isatty()
    reader = LineReader(interactive, None if args.no_history else cache_dir() / HISTORY_FILE)
    saved: list[dict] = []  # the history as last saved or loaded
    asked = False  # Ctrl-C at the prompt was pressed once, and we asked
    print("rg-mlx chat: type a message; /help for commands, /quit to leave", file=sys.stderr)
    try:
        while True:
            try:
                line = reader.read().strip()
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                unsaved = session.history and session.history != saved
                if interactive and unsaved and not asked:
                    asked = True
                    print(
                        "\n[the conversation is not saved: /save FILE keeps it; Ctrl-C again or Ctrl-D quits]",
                        file=sys.stderr,
                    )
                    continue
                print(file=sys.stderr)
                return 0
            asked = False
            if not line:
                continue
            command, _, arg = line[1:].partition(" ")
            arg = arg.strip()
            try:
                if not line.startswith("/"):
                    bar = PrefillBar()
                    _stream(session.send(line, prefill_progress=bar), bar)
                elif command in ("quit", "exit", "q"):
                    return 0
                elif command == "help":
                    print(COMMANDS_HELP, file=sys.stderr)
                elif command == "undo":
                    session.undo()
                    print(f"[undone; {len(session.history) // 2} exchanges left]", file=sys.stderr)
                elif command in ("retry", "regenerate"):
                    bar = PrefillBar()
                    _stream(session.regenerate(prefill_progress=bar), bar)
                elif command == "reset":
                    session.reset()
                    print("[new conversation]", file=sys.stderr)
                elif command == "save":
                    if not arg:
                        raise RGError("/save needs a file name")
                    session.save(arg)
                    saved = session.history
                    print(f"[saved to {arg}]", file=sys.stderr)
                elif command == "load":
                    if not arg:
                        raise RGError("/load needs a file name")
                    session = ChatSession.load(arg, model, tokenizer)
                    saved = session.history
                    exchanges = len(session.history) // 2
                    print(f"[loaded {arg}: {exchanges} exchanges, {session.tokens_seen} tokens]", file=sys.stderr)
                elif command == "system":
                    if arg:
                        session.system = arg
                        session.reset()
                        print("[system prompt set; new conversation]", file=sys.stderr)
                    else:
                        print(session.system or "[no system prompt]", file=sys.stderr)
                elif command == "set":
                    name, _, value = arg.partition(" ")
                    if name:  # a bad name or value raises: the settings stay as they were
                        session.settings = session.settings.with_text(name, value.strip())
                        print(f"[{name} = {getattr(session.settings, name)!r}]", file=sys.stderr)
                    else:
                        shown = ", ".join(f"{k} = {v!r}" for k, v in session.settings.to_dict().items())
                        print(f"[{shown}]", file=sys.stderr)
                elif command == "history":
                    for m in session.history:
                        print(f"{m['role']}: {m['content']}")
                elif command == "stats":
                    state = human_bytes(session.state_bytes)
                    print(f"[state {state}, {session.tokens_seen} tokens seen]", file=sys.stderr)
                else:
                    raise RGError(f"unknown command /{command}: /help lists them")
            except RGError as e:
                print(f"error: {e}", file=sys.stderr)
    finally:
        reader.close()
