"""`rg-mlx app`: the local chat web app."""

from __future__ import annotations

import argparse

from rg_mlx.commands import add_adapter_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder or hub repo id (default: the bundled demo, if installed)")
    parser.add_argument("--models-dir", help="folder of converted models to offer in the model picker")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: float32 on the CPU, bfloat16 on a GPU)",
    )
    add_adapter_argument(parser)


def run(args: argparse.Namespace) -> int:
    from .models import DEMO
    from .server import ChatApp

    app = ChatApp(args.model, models_dir=args.models_dir, dtype=args.dtype, adapter_path=args.adapter_path)
    try:
        demo = app.launch(args.host, args.port, quiet=True)
        if app.model is None:
            print(
                "rg-mlx app: no model loaded: convert a checkpoint with `rg-mlx convert google/recurrentgemma-2b-it "
                "models/rg-2b-it` and pass --model models/rg-2b-it (or pick a model in the app)"
            )
        elif app.model_path == DEMO:
            from rg_mlx.demo import NOTICE

            print(f"rg-mlx app: {NOTICE}")
        else:
            print(f"rg-mlx app: model: {app.model_name}")
        print(f"rg-mlx app: open {demo.local_url} (Ctrl-C to stop)")
        demo.block_thread()
    finally:
        app.close()
    return 0
