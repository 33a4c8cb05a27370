"""The one console script: `rg-mlx convert|generate|chat|app|serve|bench ...`.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`; they are imported only when used, so `rg-mlx --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import RGError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("rg_mlx.convert.cli", "convert a Hugging Face, hub or DeepMind checkpoint into an MLX folder"),
    "generate": ("rg_mlx.commands.generate", "generate text from a prompt (streaming, with speed and memory stats)"),
    "chat": ("rg_mlx.commands.chat", "chat in the terminal over a fixed-size state (undo, retry, save, load)"),
    "bench": ("rg_mlx.commands.bench", "measure speed and memory against mlx-lm and Hugging Face"),
    "app": ("rg_mlx.app.cli", "start the local chat web app (streaming, fixed memory you can watch)"),
    "doctor": ("rg_mlx.commands.doctor", "check this machine and every RG-LRU scan path; a report for bug reports"),
    "serve": ("rg_mlx.commands.serve", "serve the model over OpenAI's API (mlx-lm's server, batched)"),
    "mlx-lm": ("rg_mlx.commands.mlx_lm", "run an mlx-lm tool (server, lora, perplexity, generate, ...) on rg_mlx's model"),
}
# The commands that run over several processes under `mlx.launch` (one model split over them, `Model.shard`).
DISTRIBUTED = {"generate", "chat", "serve"}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, _blas
    from .cpu import native

    # Raw text: `--version` names the BLAS in one line, never wrapped to the terminal's width.
    parser = argparse.ArgumentParser(
        prog="rg-mlx", description="RecurrentGemma on MLX", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    malloc = "; malloc reuses freed memory" if _blas.malloc_reuses_memory() else ""
    version = f"rg-mlx {__version__} (BLAS: {_blas.active()}{malloc}; native CPU products: {native.status()})"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from . import distributed

    group = distributed.world()  # the processes mlx.launch started with this one, if any
    where = f" ({distributed.label(group)})" if group is not None else ""
    try:
        with distributed.roles(args.command, args.command in DISTRIBUTED):
            return args._module.run(args) or 0
    except RGError as e:
        print(f"rg-mlx {args.command}: error{where}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
