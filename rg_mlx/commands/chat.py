"""`rg-mlx chat`: a terminal chat over a fixed-size state, with undo, retry, save and load."""

from __future__ import annotations

import argparse
import sys

from ..memory import human_bytes
from ..sampling import CHAT, SETTINGS
from . import add_model_arguments, add_sampling_arguments, flag_error, load_model, sampling_config

HELP = "chat with a model in the terminal"

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
  /quit            leave (also Ctrl-D); Ctrl-C stops a reply"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt")
    parser.add_argument(
        "--max-snapshots", type=int, default=16, help="per-turn state snapshots kept for /undo and /retry (default 16)"
    )
    add_sampling_arguments(parser, CHAT)


def _stream(responses) -> None:
    last = None
    try:
        for last in responses:
            sys.stdout.write(last.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        responses.close()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None:
        print(
            f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"prompt {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"state {human_bytes(last.state_bytes)} | peak {last.peak_memory:.3f} GB]",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    from ..chat import ChatSession
    from ..errors import RGError

    sampling = sampling_config(args, CHAT)
    if args.max_snapshots < 0:
        flag_error(args, f"--max-snapshots {args.max_snapshots}: must be >= 0")
    model, tokenizer = load_model(args, sampling)
    session = ChatSession(model, tokenizer, args.system, sampling=sampling, max_snapshots=args.max_snapshots)
    interactive = sys.stdin.isatty()
    print("rg-mlx chat: type a message; /help for commands, /quit to leave", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        command, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        try:
            if not line.startswith("/"):
                _stream(session.send(line))
            elif command in ("quit", "exit", "q"):
                return 0
            elif command == "help":
                print(COMMANDS_HELP, file=sys.stderr)
            elif command == "undo":
                session.undo()
                print(f"[undone; {len(session.history) // 2} exchanges left]", file=sys.stderr)
            elif command in ("retry", "regenerate"):
                _stream(session.regenerate())
            elif command == "reset":
                session.reset()
                print("[new conversation]", file=sys.stderr)
            elif command == "save":
                if not arg:
                    raise RGError("/save needs a file name")
                session.save(arg)
                print(f"[saved to {arg}]", file=sys.stderr)
            elif command == "load":
                if not arg:
                    raise RGError("/load needs a file name")
                session = ChatSession.load(arg, model, tokenizer)
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
                print(f"[state {human_bytes(session.state_bytes)}, {session.tokens_seen} tokens seen]", file=sys.stderr)
            else:
                raise RGError(f"unknown command /{command}: /help lists them")
        except RGError as e:
            print(f"error: {e}", file=sys.stderr)
