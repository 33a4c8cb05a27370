"""`rg-mlx generate`: stream a completion (or a chat reply) to the terminal."""

from __future__ import annotations

import argparse
import sys

from . import add_model_arguments, add_sampling_arguments, load_model, sampling_kwargs, stats_line

HELP = "generate text from a prompt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-p", "--prompt", required=True, help="the prompt; '-' reads it from stdin")
    parser.add_argument("--chat", action="store_true", help="format the prompt as a user turn of Gemma's chat format")
    parser.add_argument("--system", help="system prompt (with --chat)")
    add_sampling_arguments(parser, max_tokens=256)
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per chunk (default 512)")


def run(args: argparse.Namespace) -> int:
    from ..errors import RGError
    from ..generate import stream_generate

    if args.system and not args.chat:
        raise RGError("--system needs --chat")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_model(args)
    if args.chat:
        prompt = tokenizer.chat_tokens([{"role": "user", "content": prompt}], system=args.system)
    last = None
    for last in stream_generate(
        model, tokenizer, prompt, prefill_step_size=args.prefill_step_size, **sampling_kwargs(args)
    ):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(stats_line(last), file=sys.stderr)
    return 0
