"""CLI subcommands (registered in `rg_mlx.cli.COMMANDS`) and the arguments they share.

Nothing heavy is imported here: `rg-mlx --help` must stay fast.

Flags are checked before anything loads: a bad one exits with status 2 and one line naming it
(`flag_error`), as argparse does for flags it can check itself.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, NoReturn, TextIO

from ..memory import human_bytes, rss_bytes
from ..sampling import SETTINGS, SamplingConfig, SamplingError

if TYPE_CHECKING:
    from ..generate import GenerationResponse, PrefillProgress


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` (folder or hub repo id), `--dtype` and `--adapter-path`."""
    parser.add_argument(
        "--model", default="demo", help="model folder or Hugging Face repo id (default: the bundled demo model)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: float32 on the CPU, bfloat16 on a GPU); on the CPU, bfloat16 means "
        "bfloat16 products with float32 for the rest",
    )
    add_adapter_argument(parser)


def add_adapter_argument(parser: argparse.ArgumentParser) -> None:
    """`--adapter-path`: a LoRA adapter for `rg_mlx.load(adapter_path=...)`."""
    parser.add_argument("--adapter-path", metavar="FOLDER", help="a LoRA adapter trained with `rg-mlx mlx-lm lora`")


def flag_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Exit with status 2 and one line, `rg-mlx COMMAND: error: MESSAGE`: a flag is wrong."""
    print(f"rg-mlx {args.command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_model(args: argparse.Namespace, sampling: SamplingConfig | None = None):
    """`rg_mlx.load(--model, --dtype, --adapter-path)`, then the checks of `sampling` that need the model (`--top-k`
    below the vocabulary size). The bundled demo (the default) says so, and how to get a real model."""
    from .. import load
    from ..distributed import world

    if args.model == "demo":
        from ..demo import NOTICE

        print(f"rg-mlx {args.command}: {NOTICE}", file=sys.stderr)
    model, tokenizer = load(args.model, dtype=args.dtype, adapter_path=getattr(args, "adapter_path", None), group=world())
    if sampling is not None:
        try:
            sampling.check_vocab(model.args.vocab_size)
        except SamplingError as e:
            _sampling_flag_error(args, e)
    return model, tokenizer


def add_sampling_arguments(parser: argparse.ArgumentParser, preset: SamplingConfig) -> None:
    """One flag per field of `SamplingConfig` (named as in mlx-lm), its defaults those of `preset`.

    The values stay text until `sampling_config` reads them, so that every bad value, even one that
    is not a number, gets the same one-line error.
    """
    group = parser.add_argument_group("sampling")
    for s in SETTINGS.values():
        if s.many:
            group.add_argument(*s.flags, dest=s.name, action="append", metavar="TEXT", help=s.help)
            continue
        default = getattr(preset, s.name)
        group.add_argument(
            *s.flags, dest=s.name, metavar="N" if s.kind is int else "X",
            help=f"{s.help}: {s.expects()}; default {'none' if default is None else default}",
        )


def sampling_config(args: argparse.Namespace, preset: SamplingConfig) -> SamplingConfig:
    """`preset` with the sampling flags given applied; a bad flag exits (status 2, one line naming it)."""
    values = {}
    try:
        for s in SETTINGS.values():
            given = getattr(args, s.name)
            if given is not None:
                values[s.name] = tuple(given) if s.many else s.parse(given)
        return preset.replace(**values)
    except SamplingError as e:
        _sampling_flag_error(args, e)


def _sampling_flag_error(args: argparse.Namespace, e: SamplingError) -> NoReturn:
    given = getattr(args, e.name, None)
    flag_error(args, f"{'/'.join(SETTINGS[e.name].flags)} {e.value if given is None else given}: {e.reason}")


def memory_text(r: GenerationResponse) -> str:
    """The process's resident memory now (what the OS counts) and MLX's allocator peak (what MLX's
    arrays used at most), named as such: `RSS 290.1 MiB, MLX peak 16.2 MiB`."""
    return f"RSS {human_bytes(rss_bytes())}, MLX peak {human_bytes(r.peak_memory * 1e9)}"


def stats_line(r: GenerationResponse, prompt_format: str) -> str:
    """One line of generation statistics from the last `GenerationResponse`; `prompt_format` says how
    the prompt was given to the model (`chat template`, `raw`)."""
    return (
        f"prompt: {r.prompt_tokens} tokens ({prompt_format}), {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"memory: {memory_text(r)} | state: {human_bytes(r.state_bytes)}"
    )


class PrefillBar:
    """A progress bar on a terminal for a long prompt: pass it as `prefill_progress`.

    Drawn on `stream` (stderr) only when that is a terminal, and only once the prompt has taken
    longer than `after` seconds; erased when the prompt is done (or by `clear`), so the reply starts
    on a clean line.
    """

    def __init__(self, stream: TextIO | None = None, *, after: float = 1.0, width: int = 24):
        self.stream = stream or sys.stderr
        self.after = after
        self.width = width
        self.enabled = self.stream.isatty()
        self.shown = False

    def __call__(self, p: PrefillProgress) -> None:
        if not self.enabled:
            return
        if p.done >= p.total:
            self.clear()
        elif p.seconds >= self.after:
            self.stream.write("\r\x1b[2K" + self.text(p))
            self.stream.flush()
            self.shown = True

    def text(self, p: PrefillProgress) -> str:
        """The bar's line: `reading the prompt [#####.....] 12,000 / 30,000 tokens · 420 tok/s · 43 s left`."""
        filled = round(self.width * p.done / max(p.total, 1))
        left = f" · {(p.total - p.done) / p.tps:.0f} s left" if p.tps > 0 else ""
        return (
            f"reading the prompt [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{p.done:,} / {p.total:,} tokens · {p.tps:,.0f} tok/s{left}"
        )

    def clear(self) -> None:
        """Erase the bar if it is shown."""
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.shown = False
