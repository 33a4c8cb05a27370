"""rg_mlx at two commits (or any two installs), side by side: prompt and decode speed in interleaved rounds.

    python benchmarks/bench_ab.py --python A=/path/to/venv-a/bin/python --python B=/path/to/venv-b/bin/python \\
        --model ~/.cache/rg_mlx/bench/bench [--prompt 2048] [--decode 32] [--rounds 4]

Each install runs in its own process (its interpreter imports its own rg_mlx) and stays up; in every
round each is asked for one prompt measurement and one decode measurement, taking turns (who goes
first alternates), so both face the same machine. Prints each one's medians, every round, and the
ratios B / A. Only the API every version has is used: `load_model`, `make_cache`, the chunked
prefill `rg_mlx.generate.feed`, and greedy decode through the model call.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_WORKER = r"""
import json, sys, time
import rg_mlx
import mlx.core as mx
from rg_mlx.generate import feed

model = rg_mlx.load_model(sys.argv[1])
vocab = model.args.vocab_size

def ids(n, seed):
    return mx.random.randint(3, vocab, (1, n), key=mx.random.key(seed)).astype(mx.int32)

def prompt(n, seed):
    tokens = ids(n, seed)
    mx.eval(tokens)
    t = time.perf_counter()
    mx.eval(feed(model, tokens, model.make_cache(), 512))
    return n / (time.perf_counter() - t)

def decode(n, seed):
    cache = model.make_cache()
    y = feed(model, ids(16, seed), cache, 512).argmax(-1)
    mx.eval(y)
    stamps = []
    for _ in range(n + 1):
        y = model(y[:, None], cache)[:, -1].argmax(-1)
        mx.eval(y)
        stamps.append(time.perf_counter())
    return n / (stamps[-1] - stamps[0])

prompt(64, 0), decode(2, 0)  # warm-up
print(json.dumps({"ready": rg_mlx.__file__}), flush=True)
for k, line in enumerate(sys.stdin):
    what, n = line.split()
    rate = prompt(int(n), 10 + k) if what == "prompt" else decode(int(n), 10 + k)
    print(json.dumps({"tok_s": rate}), flush=True)
"""


class Side:
    def __init__(self, name: str, python: str, model: Path):
        self.name = name
        # Run outside any checkout: `-c` puts the working directory first on sys.path.
        self.proc = subprocess.Popen([python, "-c", _WORKER, str(model)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
        self.origin = self._reply()["ready"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: the worker ended (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, what: str, n: int) -> float:
        self.proc.stdin.write(f"{what} {n}\n")
        self.proc.stdin.flush()
        return self._reply()["tok_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", action="append", required=True, metavar="NAME=PATH",
                   help="an interpreter whose rg_mlx to measure, twice")
    p.add_argument("--model", type=Path, required=True, help="a model folder both can load")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    if len(args.python) != 2:
        p.error("give --python twice")
    sides = [Side(*spec.split("=", 1), args.model) for spec in args.python]
    rates = {s.name: {"prompt": [], "decode": []} for s in sides}
    try:
        for k in range(args.rounds):
            order = sides if k % 2 == 0 else sides[::-1]
            for what, n in (("prompt", args.prompt), ("decode", args.decode)):
                for side in order:
                    rates[side.name][what].append(side.ask(what, n))
    finally:
        for side in sides:
            side.close()
    a, b = (s.name for s in sides)
    print(f"machine: {platform.processor() or platform.machine()}; model {args.model}; {args.rounds} rounds")
    for s in sides:
        print(f"{s.name}: {s.origin}")
    print(f"\n| | {a} | {b} | {b} / {a} | rounds {a} | rounds {b} |\n|---|---|---|---|---|---|")
    for what, n in (("prompt", args.prompt), ("decode", args.decode)):
        ma, mb = (statistics.median(rates[x][what]) for x in (a, b))
        fa, fb = (", ".join(f"{r:.3g}" for r in rates[x][what]) for x in (a, b))
        print(f"| {what} {n} tok/s | {ma:.3g} | {mb:.3g} | {mb / ma:.3f} | {fa} | {fb} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
