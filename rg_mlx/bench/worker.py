"""One runtime on one checkpoint, in its own process: prints one JSON line of measurements.

    python PATH/TO/rg_mlx/bench/worker.py --runtime rg_mlx|mlx-lm|hf --model DIR [--dtype bfloat16] [--blas none]
        [--serve]

It runs as a script by its file path, never as the module `rg_mlx.bench.worker`: importing the rg_mlx
package loads its Linux fast path (an optimized BLAS, glibc malloc settings), and the peers must run as
their users run them. So this file imports nothing from rg_mlx at module level; only the rg_mlx runtime
and mlx-lm with the same BLAS load it, before anything imports mlx.core.

Every runtime is timed through its own generation loop, greedy: rg_mlx's (chunked prefill,
logits for the last position only), mlx-lm's `generate_step`, and transformers' `generate`.
Prompts are random token ids. A measurement whose predicted time exceeds `--budget` seconds
is not run: its rate is taken from the longest prompt that was timed and flagged (this
favours the peers, whose rate falls with length); decode runs fewer steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

if __name__ == "__main__":
    # Python put this script's folder (the bench harness) first on sys.path: its modules are not for import
    # by name, and must not shadow what a peer imports.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

# The first prompt timed (it predicts the time of longer ones), and the warm-up lengths.
_PROBE_PROMPT = 32
_WARMUP_PROMPT, _WARMUP_TOKENS = 8, 2
_DECODE_PROMPT = 16


class MLXRunner:
    """rg_mlx or mlx-lm: both follow mlx-lm's model protocol."""

    def __init__(self, runtime: str, model_dir: str, dtype: str | None):
        import mlx.core as mx

        self.mx, self.runtime = mx, runtime
        if runtime == "rg_mlx":
            import rg_mlx

            self.model = rg_mlx.load_model(model_dir, dtype=dtype)  # None: its default (float32 on the CPU)
        else:
            from pathlib import Path

            from mlx.utils import tree_map
            from mlx_lm.utils import load_model

            self.model, _ = load_model(Path(model_dir))  # the folder's dtypes, as mlx-lm's users run it
            if dtype is not None:
                target = getattr(mx, dtype)
                self.model.update(tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                                           self.model.parameters()))
            mx.eval(self.model.parameters())
        self.cache = None
        self.params = sum(p.size for _, p in _flatten(self.model.parameters()))
        # What the layers compute in: the logits' dtype (mlx-lm computes in its weights' dtype; quantized: their
        # scales'; rg_mlx in its compute dtype).
        self.activations = str(self.model(mx.array([[1]])).dtype).removeprefix("mlx.core.")
        products = {str(m.product_dtype).removeprefix("mlx.core.") for _, m in self.model.named_modules()
                    if getattr(m, "product_dtype", None) is not None}  # rg_mlx's bfloat16 products on the CPU
        if products:
            self.activations += f" ({', '.join(sorted(products))} products)"

    def _steps(self, ids, n):
        mx = self.mx
        prompt = mx.array(ids, dtype=mx.int32)
        self.cache = self.model.make_cache()
        if self.runtime == "rg_mlx":
            from rg_mlx import Sampling, generate_step

            sampling = Sampling(vocab_size=self.model.args.vocab_size, temperature=0.0)
            yield from generate_step(self.model, prompt[None], self.cache, sampling, n)
        else:
            from mlx_lm.generate import generate_step

            for y, _ in generate_step(prompt, self.model, max_tokens=n, prompt_cache=self.cache):
                yield y

    def times(self, ids, n) -> list[float]:
        """Wall-clock time at which each of `n` generated tokens was ready (from the call)."""
        t0 = time.perf_counter()
        out = []
        for y in self._steps(ids, n):
            int(y)  # an evaluated array (rg_mlx) or already an int (mlx-lm)
            out.append(time.perf_counter() - t0)
        return out

    def state_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


def _flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


class HFRunner:
    """Hugging Face transformers on PyTorch's CPU backend."""

    def __init__(self, model_dir: str, dtype: str):
        import torch
        from transformers import RecurrentGemmaForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        self.torch = torch
        self.model = RecurrentGemmaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        self.activations = dtype
        self.params = sum(p.numel() for p in self.model.parameters())
        self.out = None

    def times(self, ids, n) -> list[float]:
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Stamps(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        torch = self.torch
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.out = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, streamer=Stamps(), return_dict_in_generate=True, pad_token_id=0,
            )
        return [s - t0 for s in stamps[1:]]  # the first put() is the prompt

    def state_bytes(self) -> int:
        def nbytes(t):
            return t.numel() * t.element_size() if isinstance(t, self.torch.Tensor) else 0

        total = 0
        for layer in getattr(self.out.past_key_values, "layers", []):
            total += nbytes(getattr(layer, "keys", None)) + nbytes(getattr(layer, "values", None))
        for layer in self.model.model.layers:
            block = layer.temporal_block
            total += nbytes(getattr(block, "conv1d_state", None))
            total += nbytes(getattr(getattr(block, "rg_lru", None), "recurrent_states", None))
        return total


def _random_ids(n: int, vocab: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def measure(runner, vocab: int, prompt_lengths: list[int], decode_tokens: int, budget: float) -> dict:
    """Warm up, then time the first token at each prompt length and (unless `decode_tokens` is 0) the decode rate."""
    runner.times(_random_ids(_WARMUP_PROMPT, vocab, 0), _WARMUP_TOKENS)
    prompts, state = {}, runner.state_bytes()
    if prompt_lengths:
        measured = _PROBE_PROMPT  # the longest prompt timed so far, and its rate
        rate = _PROBE_PROMPT / runner.times(_random_ids(_PROBE_PROMPT, vocab, 1), 1)[0]
    for i, n in enumerate(sorted(prompt_lengths)):
        if n / rate > budget:
            prompts[n] = {"tok_s": rate, "ttft_s": n / rate, "extrapolated_from": measured}
            continue
        t = runner.times(_random_ids(n, vocab, 10 + i), 1)[0]
        prompts[n] = {"tok_s": n / t, "ttft_s": t}
        measured, rate = n, n / t
        state = max(state, runner.state_bytes())  # peers' attention caches grow up to the window
    result = {"prompt": prompts}
    if decode_tokens:
        result["decode"] = decode(runner, vocab, decode_tokens, budget, seed=2)
    result["state_bytes"] = max(state, runner.state_bytes())
    return result


def decode(runner, vocab: int, tokens: int, budget: float, seed: int) -> dict:
    """Decode rate after a 16-token prompt: a few steps, then as many as fit the budget (at least 3)."""
    first = runner.times(_random_ids(_DECODE_PROMPT, vocab, seed), 3)
    step = first[-1] - first[-2]
    n = max(3, min(tokens, int(budget / max(step, 1e-6))))
    stamps = runner.times(_random_ids(_DECODE_PROMPT, vocab, seed + 1), n) if n > 3 else first
    result = {"tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "tokens": len(stamps)}
    if len(stamps) < tokens:
        result["fewer_than_asked"] = True
    return result


def serve(runner, vocab: int, tokens: int, budget: float) -> None:
    """Answer each `decode` line on stdin with one JSON line of `decode` (the bench alternates
    runtimes this way, so that they face the same machine); stop at end of input."""
    for k, line in enumerate(sys.stdin):
        if line.strip() != "decode":
            raise SystemExit(f"unknown command {line.strip()!r}: the worker serves 'decode'")
        print(json.dumps(decode(runner, vocab, tokens, budget, seed=100 + 2 * k)), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", choices=["rg_mlx", "mlx-lm", "hf"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype; default: rg_mlx's own rule, mlx-lm's the folder's, transformers float32")
    p.add_argument("--blas", default=None, help="'none': MLX as installed; default: rg_mlx's fast path (RG_MLX_BLAS)")
    p.add_argument("--prompt-lengths", default="", help="comma-separated")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--budget", type=float, default=150.0, help="seconds one measurement may take")
    p.add_argument("--serve", action="store_true",
                   help="leave decode out of the report, then measure it for each 'decode' line on stdin")
    p.add_argument("--round-budget", type=float, default=None,
                   help="seconds each decode measurement on request may take (default: --budget)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    blas = None
    native = None
    if args.runtime == "rg_mlx" or (args.runtime == "mlx-lm" and args.blas != "none"):
        # rg_mlx's fast path, loaded before anything imports mlx.core; never in transformers' process,
        # which runs as its users run it (the fast path's malloc settings would change its speed and memory).
        if args.blas == "none":
            os.environ["RG_MLX_BLAS"] = "off"
        from rg_mlx import _blas

        blas = _blas.active()
        if args.runtime == "rg_mlx":
            from rg_mlx.cpu import native as native_products

            native = native_products.status()
    if args.runtime == "hf":
        # A source checkout on sys.path (PYTHONPATH=.) has a top-level `kernels/` folder (rg_mlx.kernels) that
        # would pass for Hugging Face's `kernels` package, which transformers imports wherever it finds one,
        # and that imports rg_mlx.
        sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.curdir, "rg_mlx", "bench"))]
        runner = HFRunner(args.model, args.dtype or "float32")
        blas = "torch " + __import__("torch").__version__
    else:
        runner = MLXRunner(args.runtime, args.model, args.dtype)
        blas = blas or "reference (MLX as installed)"
    load_s = time.perf_counter() - t0

    config = json.load(open(os.path.join(args.model, "config.json")))
    lengths = [int(x) for x in args.prompt_lengths.split(",") if x]
    vocab = config["vocab_size"]
    result = measure(runner, vocab, lengths, 0 if args.serve else args.decode_tokens, args.budget)
    result.update(
        runtime=args.runtime, dtype=runner.activations, blas=blas, native=native,
        fast_path="rg_mlx._blas" in sys.modules,
        load_s=load_s, params=runner.params,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    print(json.dumps(result), flush=True)
    if args.serve:
        serve(runner, vocab, args.decode_tokens, args.round_budget or args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
