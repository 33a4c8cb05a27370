"""`rg-mlx bench`: speed and memory against mlx-lm and Hugging Face transformers.

Runs the `benchmarks/` folder of a source checkout (the peers need the `dev` extra:
`pip install -e '.[dev]'`); `python -m benchmarks.bench` takes the same arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import RGError

RUNTIMES = ("rg_mlx", "mlx-lm", "mlx-lm+blas", "hf-float32", "hf-bfloat16")


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by `rg-mlx bench` and `python -m benchmarks.bench`."""
    parser.add_argument(
        "--configs", type=_csv(str), default=["bench", "2b"],
        help="checkpoints to run: bench (2B widths, 6 layers, 1.1B params), 2b (the real 2B shape, decode only)",
    )
    parser.add_argument(
        "--runtimes", type=_csv(str), default=list(RUNTIMES),
        help=f"which to run, comma-separated (default all: {','.join(RUNTIMES)}); "
        "mlx-lm is MLX as installed, mlx-lm+blas runs with rg_mlx's Linux fast path (its BLAS and malloc settings)",
    )
    parser.add_argument(
        "--prompt-lengths", type=_csv(int), default=[512, 2048, 8192], help="prompt lengths (default 512,2048,8192)"
    )
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens generated for the decode speed (default 32)")
    parser.add_argument(
        "--decode-rounds", type=int, default=4,
        help="rg_mlx and mlx-lm+blas measure decode in this many rounds, taking turns, and report the median "
        "(default 4; 0: each once, right after its prompts; also 0 where memory cannot hold both models and one more)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path("~/.cache/rg_mlx/bench").expanduser(),
        help="where the random-weight checkpoints are written once (bench: 4.5 GB, 2b: 5.4 GB)",
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
    memory.add_argument("--memory-plot", type=Path, default=Path("docs/memory.png"), help="PNG plot (default docs/memory.png)")


def _benchmarks_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "bench.py").is_file():
        raise RGError(
            "rg-mlx bench runs the benchmarks/ folder of a source checkout: "
            "clone the repository and install it with pip install -e '.[dev]'"
        )
    return root


def run(args: argparse.Namespace) -> int:
    """Run the speed benchmark (or, with `--memory`, the long-run memory benchmark)."""
    root = _benchmarks_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if args.memory:
        from benchmarks import bench_memory

        return bench_memory.run(args)
    from benchmarks import bench

    return bench.run(args)
