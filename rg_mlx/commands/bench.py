"""`rg-mlx bench`: speed and memory against mlx-lm and Hugging Face transformers (`rg_mlx.bench`).

The Hugging Face peer needs the `dev` extra (`pip install -e '.[dev]'` in the rg-mlx clone); without it that peer is
skipped with a note.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.checkpoint import CONFIGS, WEIGHTS
from ..bench.speed import RUNTIMES


def _csv(kind, choices=None):
    """A comma-separated list of `kind` values, each one of `choices` if given (argparse exits 2 otherwise)."""

    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}: use {','.join(choices)}")
        return values

    return parse


def _count(text: str) -> int:
    """A whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `rg-mlx bench`."""
    parser.add_argument(
        "--configs", type=_csv(str, CONFIGS), default=["bench", "2b"],
        help="checkpoints to run: bench (2B widths, 6 layers, 1.1B params), 2b (the real 2B shape, decode only)",
    )
    parser.add_argument(
        "--runtimes", type=_csv(str, RUNTIMES), default=list(RUNTIMES),
        help=f"which to run, comma-separated (default all: {','.join(RUNTIMES)}); rg_mlx-bf16 is rg_mlx computing "
        "in bfloat16 (on bfloat16 weights); mlx-lm is MLX as installed (on float32 weights), mlx-lm+blas runs with "
        "rg_mlx's Linux fast path (its BLAS and malloc settings); transformers reads the checkpoint as written",
    )
    parser.add_argument(
        "--weights", type=_csv(str, WEIGHTS), default=None,
        help=f"kinds of weights rg_mlx and mlx-lm run on, comma-separated ({','.join(WEIGHTS)}; quantized: group "
        "size 64, bfloat16 scales), each converted once by rg_mlx.convert beside the checkpoint "
        "(default: all for bench, bfloat16,4bit for 2b)",
    )
    parser.add_argument(
        "--prompt-lengths", type=_csv(int), default=[512, 2048, 8192], help="prompt lengths (default 512,2048,8192)"
    )
    parser.add_argument(
        "--decode-tokens", type=int, default=32, help="tokens generated for the decode speed (default 32)"
    )
    parser.add_argument(
        "--decode-rounds", type=_count, default=4,
        help="rg_mlx and mlx-lm+blas measure decode in this many rounds, taking turns, and report the median "
        "(default 4; 0: each once, right after its prompts; also 0 where memory cannot hold both models and one more)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path("~/.cache/rg_mlx/bench").expanduser(),
        help="where the random-weight checkpoints and their conversions are written once (bench: 4.5 GB, and 3.8 GB "
        "for its bfloat16, 8-bit and 4-bit weights; 2b: 5.4 GB, and 1.5 GB for 4-bit)",
    )
    parser.add_argument(
        "--budget", type=float, default=120.0,
        help="seconds one peer measurement may take; slower ones are extrapolated from a short run and marked "
        "(default 120; rg_mlx always runs in full)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write all measurements to this JSON file")
    memory = parser.add_argument_group("long-run memory benchmark")
    memory.add_argument(
        "--memory", action="store_true",
        help="run it instead: one chat of --memory-tokens generated tokens, RSS and latency every 1,000",
    )
    memory.add_argument("--memory-model", default="demo", help="model folder or hub id (default: the demo model)")
    memory.add_argument("--memory-tokens", type=int, default=32000, help="tokens to generate (default 32000)")
    memory.add_argument("--memory-warmup", type=int, default=2000, help="tokens before RSS is compared (default 2000)")
    memory.add_argument(
        "--memory-plot", type=Path, default=Path("docs/memory.png"), help="PNG plot (default docs/memory.png)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the speed benchmark (or, with `--memory`, the long-run memory benchmark)."""
    if args.memory:
        from ..bench import long_chat

        return long_chat.run(args)
    from ..bench import speed

    return speed.run(args)
