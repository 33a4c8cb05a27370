"""`rg-mlx serve`: mlx-lm's OpenAI-compatible server on rg_mlx's model (`rg_mlx.server`).

Our options are read here; every other option is one of mlx-lm's server options, read by mlx-lm's
own parser. Every flag is checked before the model loads.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import warnings

from . import add_adapter_argument, flag_error

API_KEY_ENV = "RG_MLX_API_KEY"

EPILOG = """\
Any other option is one of mlx-lm's server options (`rg-mlx mlx-lm server --help` lists them), for
example --decode-concurrency, --prompt-concurrency, --prompt-cache-size, --prompt-cache-bytes,
--prefill-step-size, --max-tokens, --temp, --chat-template, --allowed-origins, --log-level."""

# mlx-lm's server options whose values its parser takes as they come: (flag, lowest, highest).
LIMITS = {
    "decode_concurrency": ("--decode-concurrency", 1, None),
    "prompt_concurrency": ("--prompt-concurrency", 1, None),
    "prefill_step_size": ("--prefill-step-size", 1, None),
    "prompt_cache_size": ("--prompt-cache-size", 0, None),
    "prompt_cache_bytes": ("--prompt-cache-bytes", 0, None),
    "max_tokens": ("--max-tokens", 1, None),
    "temp": ("--temp", 0, None),
    "top_p": ("--top-p", 0, 1),
    "top_k": ("--top-k", 0, None),
    "min_p": ("--min-p", 0, 1),
}
# mlx-lm's server options that need what rg_mlx's state is not, and why.
UNSUPPORTED = {
    "draft_model": ("--draft-model", "speculative decoding rewinds the state, and a recurrent state cannot be rewound"),
    "kv_bits": ("--kv-bits", "rg_mlx's state is fixed-size (the attention keeps only its window): nothing to quantize"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # an mlx-lm option must never pass for an abbreviation of ours
    parser.usage = "rg-mlx serve [--model M] [--host H] [--port P] [our options] [mlx-lm's server options]"
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--model", default="demo", help="model folder or Hugging Face repo id (default: the bundled demo model)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    add_adapter_argument(parser)
    parser.add_argument(
        "--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV}, else none)",
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, metavar="N", help="refuse longer prompts with a 400 (default: no limit)"
    )
    parser.add_argument("--served-model-name", metavar="NAME", help="the model's name in the API (default: --model)")
    _pass_other_options(parser, "mlx_lm_args")


def _pass_other_options(parser: argparse.ArgumentParser, dest: str) -> None:
    """Make `parser` keep the options it does not know in `dest` (in order) instead of failing on them:
    they are mlx-lm's, for its parser."""
    parse_known_args = parser.parse_known_args

    def keep_others(args=None, namespace=None):
        namespace, others = parse_known_args(args, namespace)
        setattr(namespace, dest, others)
        return namespace, []

    parser.parse_known_args = keep_others


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(args: argparse.Namespace, cli_args: argparse.Namespace) -> None:
    """Every flag's value, before anything loads: a bad one exits (status 2, one line)."""
    if not 0 <= args.port <= 65535:
        flag_error(args, f"--port {args.port}: must be 0-65535")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        flag_error(args, f"--max-prompt-tokens {args.max_prompt_tokens}: must be >= 1")
    if args.api_key is not None and not args.api_key.strip():
        flag_error(args, "--api-key: must not be empty")
    for name, (flag, why) in UNSUPPORTED.items():
        if getattr(cli_args, name, None) is not None:
            flag_error(args, f"{flag}: not supported on rg_mlx's model ({why})")
    for name, (flag, low, high) in LIMITS.items():
        value = getattr(cli_args, name, None)
        if value is not None and (value < low or (high is not None and value > high)):
            flag_error(args, f"{flag} {value}: must be {f'{low}-{high}' if high is not None else f'>= {low}'}")


def run(args: argparse.Namespace) -> int:
    from .. import integration, server
    from ..loading import read_config, resolve

    mlx_lm_args = ["--host", args.host, "--port", str(args.port), *args.mlx_lm_args]
    try:
        cli_args = server.server_arguments(mlx_lm_args)
    except server.ServerOptionError as e:
        flag_error(args, f"{' '.join(args.mlx_lm_args)}: a value mlx-lm's parser cannot read ({e})")
    _check(args, cli_args)

    folder = resolve(args.model)
    read_config(folder)  # not a model folder: one line now, not a failure on the generation thread
    if args.adapter_path is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            integration.check_adapter(args.adapter_path)
        for w in caught:
            print(f"rg-mlx serve: warning: {w.message}", file=sys.stderr)
    cli_args.model, cli_args.adapter_path = str(folder), args.adapter_path
    integration.register_with_mlx_lm()

    name = args.served_model_name or args.model
    options = server.ServeOptions(
        name=name, aliases=frozenset({str(folder), str(folder.resolve())}), api_key=args.api_key,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    if args.model == "demo":
        from ..demo import NOTICE

        print(f"rg-mlx serve: {NOTICE}", file=sys.stderr)
    if not _loopback(args.host):
        guard = "requests need the API key" if args.api_key else "with no API key (--api-key)"
        print(f"rg-mlx serve: warning: listening on {args.host}: anyone who can reach this machine can use the "
              f"model, {guard}", file=sys.stderr)

    def ready(url: str) -> None:
        print(f"rg-mlx serve: serving {name!r} at {url}/v1 (OpenAI API; Ctrl-C to stop)", flush=True)

    try:
        server.serve(cli_args, options, ready=ready)
    except KeyboardInterrupt:
        print("rg-mlx serve: stopped", file=sys.stderr)
    return 0
