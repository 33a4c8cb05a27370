"""`rg-mlx convert SOURCE OUTPUT`: turn a published checkpoint into an MLX folder."""

from __future__ import annotations

import argparse
import signal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="Hugging Face folder, hub repo id (e.g. google/recurrentgemma-2b-it) or DeepMind .pt checkpoint",
    )
    parser.add_argument("output", metavar="OUTPUT", help="folder to create")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize Linear and Embedding weights")
    parser.add_argument("--q-bits", type=int, default=4, help="bits per quantized weight: 4 or 8 (default 4)")
    parser.add_argument("--q-group-size", type=int, default=64, help="quantization group: 32, 64 or 128 (default 64)")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model to copy (default: beside SOURCE)")
    parser.add_argument("--window", type=int, help="attention window (a .pt holds none; default: the preset's, 2048)")
    parser.add_argument("--soft-cap", type=float, help="logits soft cap (a .pt holds none; default: the preset's, 30)")
    parser.add_argument("--upload-repo", metavar="ORG/NAME", help="upload the result to this Hugging Face repo")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")


def run(args: argparse.Namespace) -> int:
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
            tokenizer=args.tokenizer,
            overrides=overrides,
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
    dtype = result.dtype + (f", {q['bits']}-bit quantized (group size {q['group_size']})" if q else "")
    shards = len(result.files)
    print(
        f"converted {args.source} -> {result.path} in {result.seconds:.1f} s\n"
        f"  parameters   {result.parameters / 1e9:.3f} B ({result.parameters:,})\n"
        f"  dtype        {dtype}\n"
        f"  bits/weight  {result.bits_per_weight:.3f}\n"
        f"  size on disk {result.size_bytes / 2**30:.2f} GiB ({result.size_bytes:,} bytes, "
        f"{shards} shard{'s' if shards > 1 else ''})"
    )
    if args.upload_repo:
        print(f"uploaded to https://huggingface.co/{args.upload_repo}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
