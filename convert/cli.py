"""`rg-mlx convert SOURCE OUTPUT`: turn a published checkpoint into an MLX folder."""

from __future__ import annotations

import argparse
import signal
import sys

from rg_mlx.errors import RGError
from rg_mlx.memory import human_bytes, human_count
from rg_mlx.quant import DEFAULTS, MODES, QuantSpec


def _per_mode(index: int) -> str:
    """What each quantization mode takes: its bits (index 0) or its group sizes (1), from `rg_mlx.quant.MODES`."""
    return "; ".join(f"{mode} {'|'.join(map(str, takes[index]))}" for mode, takes in MODES.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="Hugging Face folder, hub repo id (e.g. google/recurrentgemma-2b-it) or DeepMind .pt checkpoint",
    )
    parser.add_argument("output", metavar="OUTPUT", help="folder to create")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize Linear and Embedding weights")
    parser.add_argument("--q-mode", choices=list(MODES), help="MLX quantization mode (default affine)")
    bits, group_size = DEFAULTS["affine"]
    parser.add_argument(
        "--q-bits", type=int, help=f"bits per weight, by mode: {_per_mode(0)} (default {bits} for affine)"
    )
    parser.add_argument(
        "--q-group-size", type=int,
        help=f"weights per quantization group, by mode: {_per_mode(1)} (default {group_size} for affine)",
    )
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model to copy (default: beside SOURCE)")
    parser.add_argument("--window", type=int, help="attention window (a .pt holds none; default: the preset's, 2048)")
    parser.add_argument("--soft-cap", type=float, help="logits soft cap (a .pt holds none; default: the preset's, 30)")
    parser.add_argument(
        "--chat-template", choices=["auto", "on", "off"], default="auto",
        help="give the folder Gemma's chat template (instruction-tuned models): auto = when the source has a chat "
        "template of its own or its name ends in -it (default auto)",
    )
    parser.add_argument("--upload-repo", metavar="ORG/NAME", help="upload the result to this Hugging Face repo")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")


def run(args: argparse.Namespace) -> int:
    # Bad quantization flags fail here, with status 2 like argparse's own errors, before anything is read.
    flags = {"--q-mode": args.q_mode, "--q-bits": args.q_bits, "--q-group-size": args.q_group_size}
    given = [flag for flag, value in flags.items() if value is not None]
    try:
        if given and not args.quantize:
            raise RGError(f"{given[0]} needs -q/--quantize")
        if args.quantize:
            QuantSpec(args.q_mode or "affine", args.q_bits, args.q_group_size)
    except RGError as e:
        print(f"rg-mlx convert: error: {e}", file=sys.stderr)
        return 2

    from huggingface_hub.utils import tqdm

    from rg_mlx.convert import convert, partial

    overrides = {}
    if args.window is not None:
        overrides["attention_window_size"] = args.window
    if args.soft_cap is not None:
        overrides["logits_soft_cap"] = args.soft_cap

    bar = None

    def progress(tensors: int, n_tensors: int, done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting")
        bar.update(done - bar.n)
        bar.set_postfix_str(f"{tensors}/{n_tensors} tensors", refresh=False)

    # `kill` cleans up like Ctrl-C: the partial folder is removed, OUTPUT never appears.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = convert(
            args.source,
            args.output,
            dtype=args.dtype,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_mode=args.q_mode or "affine",
            tokenizer=args.tokenizer,
            overrides=overrides,
            chat={"auto": None, "on": True, "off": False}[args.chat_template],
            upload_repo=args.upload_repo,
            force=args.force,
            progress=progress,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.close()

    if result.removed_partials:
        print(partial.describe(result.removed_partials))
    q = result.quantization
    dtype = result.dtype + (f", quantized {q.describe()}" if q else "")
    shards = len(result.files)
    print(
        f"converted {args.source} -> {result.path} in {result.seconds:.1f} s\n"
        f"  parameters   {human_count(result.parameters)} ({result.parameters:,})\n"
        f"  dtype        {dtype}\n"
        f"  bits/weight  {result.bits_per_weight:.3f}\n"
        f"  size on disk {human_bytes(result.size_bytes)} ({result.size_bytes:,} bytes, "
        f"{shards} shard{'s' if shards > 1 else ''})"
    )
    if args.upload_repo:
        print(f"uploaded to https://huggingface.co/{args.upload_repo}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
