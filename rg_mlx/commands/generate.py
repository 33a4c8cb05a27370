"""`rg-mlx generate`: stream a completion (or a chat reply) to the terminal."""

from __future__ import annotations

import argparse
import sys

from ..sampling import GENERATE
from . import add_model_arguments, add_sampling_arguments, flag_error, load_model, sampling_config, stats_line

HELP = "generate text from a prompt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-p", "--prompt", required=True, help="the prompt; '-' reads it from stdin")
    parser.add_argument("--chat", action="store_true", help="format the prompt as a user turn of Gemma's chat format")
    parser.add_argument("--system", help="system prompt (with --chat)")
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per chunk (default 512)")
    add_sampling_arguments(parser, GENERATE)


def run(args: argparse.Namespace) -> int:
    from ..generate import stream_generate

    sampling = sampling_config(args, GENERATE)
    if args.system and not args.chat:
        flag_error(args, "--system needs --chat")
    if args.prefill_step_size < 1:
        flag_error(args, f"--prefill-step-size {args.prefill_step_size}: must be >= 1")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load_model(args, sampling)
    if args.chat:
        prompt = tokenizer.chat_tokens([{"role": "user", "content": prompt}], system=args.system)
    last = None
    for last in stream_generate(model, tokenizer, prompt, sampling=sampling, prefill_step_size=args.prefill_step_size):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(stats_line(last), file=sys.stderr)
    return 0
