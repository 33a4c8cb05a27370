"""`rg-mlx mlx-lm TOOL [ARGS...]`: one of mlx-lm's tools, run on rg_mlx's exact model.

rg_mlx (and with it the Linux BLAS fast path) is loaded before MLX, rg_mlx's model is registered
with mlx-lm (`rg_mlx.integration`), and the tool runs in this process with the remaining arguments,
as `python -m mlx_lm TOOL ARGS...` would. For `lora`, the adapter records that rg_mlx's model
trained it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from ..errors import RGError

# mlx-lm's tools that load a model (the others convert, quantize or upload, where the model class
# makes no difference), and what each needs beyond mlx-lm's own dependencies.
TOOLS = ("benchmark", "cache_prompt", "chat", "evaluate", "generate", "lora", "perplexity", "server")
EXTRAS = {"evaluate": "lm-eval"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tool", choices=TOOLS, metavar="TOOL", help=f"the mlx-lm tool: {', '.join(TOOLS)}")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARGS", help="the tool's own arguments (`rg-mlx mlx-lm TOOL --help`)"
    )


def run(args: argparse.Namespace) -> int:
    from .. import integration

    integration.register_with_mlx_lm()
    try:
        tool = importlib.import_module(f"mlx_lm.{args.tool}")
    except ImportError as e:
        package = EXTRAS.get(args.tool, e.name)
        raise RGError(f"mlx_lm.{args.tool} needs {e.name}, which is not installed: pip install {package}") from None
    recording = integration.recording_trained_model() if args.tool == "lora" else contextlib.nullcontext()
    argv = sys.argv
    sys.argv = [f"mlx_lm.{args.tool}", *args.args]
    try:
        with recording:
            tool.main()
    finally:
        sys.argv = argv
    return 0
