"""`rg-mlx generate`: stream a completion (or a chat reply) to the terminal.

As in `mlx_lm.generate`, a model with a chat template (instruction-tuned checkpoints, the bundled demo)
gets the prompt as a user turn of its chat format unless `--raw` (`--ignore-chat-template`) says
otherwise; a base model gets it as it is unless `--chat` says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from ..sampling import GENERATE
from . import (
    PrefillBar,
    add_model_arguments,
    add_sampling_arguments,
    flag_error,
    load_model,
    sampling_config,
    stats_line,
)

HELP = "generate text from a prompt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-p", "--prompt", required=True, help="the prompt (not empty); '-' reads it from stdin")
    form = parser.add_mutually_exclusive_group()
    form.add_argument(
        "--chat", action="store_true",
        help="give the prompt as a user turn of Gemma's chat format, also to a model without a chat template "
        "(default: only models with one, instruction-tuned ones and the demo, get it)",
    )
    form.add_argument(
        "--raw", "--ignore-chat-template", dest="raw", action="store_true",
        help="give the prompt as plain text, without the chat format, also to a model with a chat template",
    )
    parser.add_argument("--system", help="system prompt (chat format only: folded into the user turn)")
    parser.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per chunk (default 512)")
    add_sampling_arguments(parser, GENERATE)


def run(args: argparse.Namespace) -> int:
    from ..generate import stream_generate

    sampling = sampling_config(args, GENERATE)
    if args.system and args.raw:
        flag_error(args, "--system needs the chat format: drop --raw")
    if args.prefill_step_size < 1:
        flag_error(args, f"--prefill-step-size {args.prefill_step_size}: must be >= 1")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        where = "nothing came on stdin" if args.prompt == "-" else "give some text"
        flag_error(args, f"--prompt {args.prompt!r}: the prompt is empty ({where})")
    model, tokenizer = load_model(args, sampling)
    chat = args.chat or (not args.raw and tokenizer.is_chat_model)
    if args.system and not chat:
        flag_error(
            args, f"--system needs the chat format: {args.model} has no chat template; add --chat to use Gemma's"
        )
    if chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
    bar = PrefillBar()
    last = None
    try:
        for last in stream_generate(
            model, tokenizer, prompt, sampling=sampling, prefill_step_size=args.prefill_step_size, prefill_progress=bar
        ):
            sys.stdout.write(last.text)
            sys.stdout.flush()
    finally:
        bar.clear()
    sys.stdout.write("\n")
    print(stats_line(last, "chat template" if chat else "raw"), file=sys.stderr)
    return 0
