"""CLI subcommands (registered in `rg_mlx.cli.COMMANDS`) and the arguments they share.

Nothing heavy is imported here: `rg-mlx --help` must stay fast.
"""

from __future__ import annotations

import argparse
import sys


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` (folder or hub repo id) and `--dtype`."""
    parser.add_argument("--model", default="demo", help="model folder or Hugging Face repo id (default: the bundled demo model)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: float32 on the CPU, bfloat16 on a GPU)",
    )


def load_model(args: argparse.Namespace):
    """`rg_mlx.load(--model, --dtype)`; the bundled demo (the default) says so, and how to get a real model."""
    from .. import load
    from ..distributed import world

    if args.model == "demo":
        from ..demo import NOTICE

        print(f"rg-mlx {args.command}: {NOTICE}", file=sys.stderr)
    return load(args.model, dtype=args.dtype, group=world())


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """The sampling flags, named as in mlx-lm."""
    parser.add_argument(
        "-m", "--max-tokens", type=int, default=max_tokens, help=f"most tokens to generate (default {max_tokens})"
    )
    parser.add_argument(
        "--temp", "--temperature", dest="temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p filtering (default 0: off)")
    parser.add_argument("--repetition-penalty", type=float, help="penalty for recently seen tokens (e.g. 1.1)")
    parser.add_argument(
        "--repetition-context-size", type=int, default=20, help="tokens the repetition penalty looks at (default 20)"
    )
    parser.add_argument("--seed", type=int, help="random seed: same seed, same output")
    parser.add_argument("--stop", action="append", metavar="TEXT", help="stop when this text appears (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The generation keyword arguments from parsed sampling flags."""
    names = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repetition_context_size"]
    return {name: getattr(args, name) for name in [*names, "seed", "stop"]}


def human_bytes(n: int) -> str:
    """`4.1 KiB`, `16.4 MiB`, ..."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def stats_line(r) -> str:
    """One line of generation statistics from the last `GenerationResponse`."""
    return (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory: {r.peak_memory:.3f} GB | state: {human_bytes(r.state_bytes)}"
    )
