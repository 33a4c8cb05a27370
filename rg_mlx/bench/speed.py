"""Speed and memory of rg_mlx against mlx-lm and Hugging Face transformers, on one random checkpoint.

    rg-mlx bench            # options: rg-mlx bench --help

Each runtime runs in its own process (`worker.py` beside this file, run as a script) on the same
random-weight checkpoint, written once under --work-dir; rg_mlx and mlx-lm with the same BLAS then measure
decode again in rounds, taking turns (on a shared machine, bandwidth moves within minutes).
Configurations: "bench" (the 2B widths, 6 layers
R R A R R A, the full 256000 vocabulary, 1.12B parameters, float32) and "2b" (the real 2B
shape, decode only). Prints markdown tables: absolute numbers, then the ratios of rg_mlx to
each peer, the decode speed as a fraction of the memory-bandwidth bound, and the growth of
prompt time with length.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .checkpoint import CONFIGS, parameter_count, write_checkpoint

# The worker runs as a script by its path, never as `rg_mlx.bench.worker`: importing the rg_mlx package loads
# its Linux fast path (BLAS, malloc settings), which the peers' processes must run without.
WORKER = Path(__file__).with_name("worker.py")
# runtime name -> (worker runtime, dtype, BLAS: None = rg_mlx's fast path as RG_MLX_BLAS says, "none" = MLX as
# installed; transformers never gets the fast path)
RUNTIMES = {
    "rg_mlx": ("rg_mlx", "float32", None),
    "mlx-lm": ("mlx-lm", "float32", "none"),
    "mlx-lm+blas": ("mlx-lm", "float32", None),
    "hf-float32": ("hf", "float32", None),
    "hf-bfloat16": ("hf", "bfloat16", None),
}
# What each worker runtime imports beyond rg_mlx's own dependencies (transformers: the `dev` extra).
PEER_MODULES = {"hf": ("torch", "transformers")}
# How each configuration is stored on disk and run: prompt lengths (None = from --prompt-lengths), decode tokens.
# The runtimes whose decode is measured in alternating rounds (both read the same weights through the same BLAS,
# so only measuring them side by side tells them apart).
DUEL = ("rg_mlx", "mlx-lm+blas")
CONFIG_PLAN = {"bench": ("float32", None, None), "2b": ("bfloat16", [], 8)}


def machine() -> str:
    """CPU model name and core count (from lscpu where available)."""
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


class BandwidthProbe:
    """Read bandwidth in bytes/s: the fastest of `repeats` reads of a `gib` GiB float32 array, each read
    two ways: a max-reduction on one thread per core, and a matrix-vector product through NumPy's
    BLAS (its own threads; the kind of read decode does). The array is allocated once: freeing and
    allocating 2 GiB between measurements slows whatever runs in the next seconds (measured: the
    runtime decoding right after such a probe lost 5-20% against the one after it)."""

    def __init__(self, gib: int = 2):
        import numpy as np

        self.np = np
        self.array = np.ones((gib << 30) // 4, np.float32)
        self.parts = np.array_split(self.array, os.cpu_count() or 1)
        self.matrix, self.vector = self.array.reshape(-1, 4096), np.ones(4096, np.float32)

    def __call__(self, repeats: int = 5) -> float:
        best = 0.0
        for _ in range(repeats):
            threads = [threading.Thread(target=self.np.max, args=(p,)) for p in self.parts]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            best = max(best, self.array.nbytes / (time.perf_counter() - t))
            t = time.perf_counter()
            self.matrix @ self.vector
            best = max(best, self.array.nbytes / (time.perf_counter() - t))
        return best


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return 0


class Worker:
    """One runtime in its own process (`WORKER`). With `serve`, the process stays up after its report
    and measures decode again at each `decode()` call, until `close()`."""

    def __init__(self, model: Path, runtime: str, prompt_lengths: list[int], decode_tokens: int, budget: float,
                 serve: bool = False):
        kind, dtype, blas = RUNTIMES[runtime]
        cmd = [sys.executable, str(WORKER), "--runtime", kind, "--model", str(model), "--dtype", dtype,
               "--prompt-lengths", ",".join(map(str, prompt_lengths)), "--decode-tokens", str(decode_tokens),
               "--budget", str(budget)]
        cmd += ["--blas", blas] if blas else []
        cmd += ["--serve"] if serve else []
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.PIPE if serve else subprocess.DEVNULL)

    def reply(self) -> dict:
        """The worker's next JSON line, or {"error": ...} if it ended without one."""
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        code = self.proc.wait()
        self.stderr.seek(0)
        tail = (self.stderr.read().strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {code}: {tail}"}

    def decode(self) -> dict:
        """One more decode measurement (a served worker only)."""
        try:
            self.proc.stdin.write("decode\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it ended: reply() reports why
        return self.reply()

    def close(self) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        self.proc.wait()
        self.stderr.close()


def run_worker(model: Path, runtime: str, prompt_lengths: list[int], decode_tokens: int, budget: float) -> dict:
    """Run one runtime in its own process; returns its measurements or {"error": ...}."""
    worker = Worker(model, runtime, prompt_lengths, decode_tokens, budget)
    try:
        return worker.reply()
    finally:
        worker.close()


def decode_rounds(workers: dict[str, Worker], rounds: int, probe) -> tuple[dict[str, dict], list[float]]:
    """Decode of the served runtimes, measured in `rounds` rounds in which they take turns, each round
    after a bandwidth `probe()`: the median rate of each (so every runtime faces the same machine; on
    a shared VM, bandwidth moves by a quarter within minutes), and the probes."""
    rates: dict[str, list[dict]] = {name: [] for name in workers}
    probes = []
    for k in range(rounds):
        probes.append(probe())
        for name in list(workers)[:: 1 if k % 2 == 0 else -1]:  # alternate who goes first
            rates[name].append(workers[name].decode())
    out = {}
    for name, runs in rates.items():
        failed = [r for r in runs if "error" in r]
        if failed:
            out[name] = failed[0]
            continue
        median = statistics.median(r["tok_s"] for r in runs)
        out[name] = {"tok_s": median, "tokens": runs[0]["tokens"], "rounds": [r["tok_s"] for r in runs]}
        if any(r.get("fewer_than_asked") for r in runs):
            out[name]["fewer_than_asked"] = True
    return out, probes


def _label(runtime: str, r: dict) -> str:
    if runtime == "mlx-lm":
        return "mlx-lm (as installed)"
    if runtime == "mlx-lm+blas":
        return "mlx-lm (same BLAS)"
    return {"hf-float32": "HF transformers", "hf-bfloat16": "HF transformers"}.get(runtime, runtime)


def _fmt(x: float | None, digits: int = 1, mark: str = "") -> str:
    if x is None:
        return "-"
    if x >= 100:
        digits = 0
    return f"{mark}{x:.{digits}f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def tables(config: str, results: dict[str, dict], lengths: list[int], bandwidth: float, weight_bytes: int) -> str:
    """The markdown report of one configuration; `bandwidth` is the median probe of the decode rounds, if
    some runtimes' decode was measured in rounds."""
    out = []
    rounds = {n: r["decode"]["rounds"] for n, r in results.items() if "rounds" in r.get("decode", {})}
    head = ["runtime", "BLAS / backend", "dtype"] + [f"prompt {n} tok/s" for n in lengths]
    if lengths:
        head.append(f"TTFT {lengths[0]} s")
    head += ["decode tok/s", "load s", "peak RSS GB", "state MiB"]
    out += [_row(head), _row(["---"] * len(head))]
    notes = set()
    for runtime, r in results.items():
        if "error" in r:
            out.append(_row([_label(runtime, r), r["error"]] + [""] * (len(head) - 2)))
            continue
        cells = [_label(runtime, r), r["blas"], r["dtype"]]
        for n in lengths:
            p = r["prompt"].get(str(n))
            mark = ""
            if p and "extrapolated_from" in p:
                mark = "~"
                notes.add("~ too slow to run in full: the rate of the longest prompt that was timed (favours the peer)")
            cells.append(_fmt(p and p["tok_s"], mark=mark))
        if lengths:
            p = r["prompt"].get(str(lengths[0]))
            cells.append(_fmt(p and p["ttft_s"], 2, "~" if p and "extrapolated_from" in p else ""))
        d = r["decode"]
        if d.get("fewer_than_asked"):
            notes.add("* decode measured over fewer tokens (too slow for more)")
        cells += [_fmt(d["tok_s"], 2) + ("*" if d.get("fewer_than_asked") else ""), _fmt(r["load_s"]),
                  _fmt(r["peak_rss_bytes"] / 1e9, 2), _fmt(r["state_bytes"] / 2**20, 2)]
        out.append(_row(cells))
    if rounds:
        notes.add(f"decode of {', '.join(_label(n, results[n]) for n in rounds)}: median of "
                  f"{len(next(iter(rounds.values())))} rounds in which they take turns, each after a bandwidth probe")
    notes.add("state: after the longest prompt timed (rg_mlx allocates its full attention window at the start)")
    out += [f"\n{n}" for n in sorted(notes)]

    ours = results.get("rg_mlx")
    if not ours or "error" in ours:
        return "\n".join(out)
    peers = {runtime: r for runtime, r in results.items() if runtime != "rg_mlx" and "error" not in r}
    if peers:
        out.append("\nrg_mlx compared with each peer "
                   "(times better: higher speed, shorter TTFT, smaller RSS and state)\n")
        head = ["peer"] + [f"prompt {n}" for n in lengths] + ([f"TTFT {lengths[0]}"] if lengths else [])
        head += ["decode", "peak RSS", "state"]
        out += [_row(head), _row(["---"] * len(head))]
    for runtime, r in peers.items():
        cells = [f"{_label(runtime, r)}, {r['dtype']}"]
        for n in lengths:
            cells.append(f"{ours['prompt'][str(n)]['tok_s'] / r['prompt'][str(n)]['tok_s']:.2f}x")
        if lengths:
            cells.append(f"{r['prompt'][str(lengths[0])]['ttft_s'] / ours['prompt'][str(lengths[0])]['ttft_s']:.2f}x")
        cells.append(f"{ours['decode']['tok_s'] / r['decode']['tok_s']:.2f}x")
        cells.append(f"{r['peak_rss_bytes'] / ours['peak_rss_bytes']:.2f}x")
        cells.append(f"{r['state_bytes'] / ours['state_bytes']:.2f}x")
        out.append(_row(cells))

    per_token = weight_bytes + ours["state_bytes"]
    bound = bandwidth / per_token
    out.append(
        f"\nDecode bound: {bandwidth / 1e9:.1f} GB/s read bandwidth"
        f" ({'median of the probes of the decode rounds' if rounds else 'probed before the first runtime'}) / "
        f"{per_token / 1e9:.2f} GB read per token "
        f"(weights + state) = {bound:.2f} tok/s; rg_mlx decodes at {ours['decode']['tok_s']:.2f} tok/s = "
        f"{100 * ours['decode']['tok_s'] / bound:.0f}% of it."
    )
    if rounds:
        each = [f"{_label(n, results[n])} {', '.join(_fmt(x, 2) for x in xs)}" for n, xs in rounds.items()]
        out.append(f"Decode rounds, tok/s: {'; '.join(each)}.")
    timed = [n for n in lengths if "extrapolated_from" not in ours["prompt"][str(n)]]
    if len(timed) >= 2:
        a, b = timed[-2], timed[-1]
        ratio = ours["prompt"][str(b)]["ttft_s"] / ours["prompt"][str(a)]["ttft_s"]
        out.append(f"Prompt time growth: t({b}) / t({a}) = {ratio:.2f} (linear: {b / a:.2f}).")
    return "\n".join(out)


def duel_runtimes(runtimes: list[str], rounds: int, weight_bytes: int) -> list[str]:
    """The runtimes whose decode is measured in rounds: those of DUEL asked for, if at least two, and
    only where memory holds their idle processes and one more runtime (each needs ~1.3x the weights)."""
    duel = [r for r in runtimes if r in DUEL]
    free = available_bytes()  # 0: unknown
    if len(duel) < 2 or not rounds or 0 < free < 1.3 * weight_bytes * (len(duel) + 1):
        return []
    return duel


def run_config(config: str, folder: Path, args: argparse.Namespace, lengths: list[int], decode: int,
               weight_bytes: int) -> tuple[dict[str, dict], list[float]]:
    """Every runtime on one checkpoint, one after the other; the DUEL runtimes' decode is then measured
    in `args.decode_rounds` alternating rounds (`decode_rounds`). Returns the results and the rounds'
    bandwidth probes."""
    duel = duel_runtimes(args.runtimes, args.decode_rounds, weight_bytes)
    results, served, probes = {}, {}, []
    try:
        for runtime in args.runtimes:
            need = 1.3 * weight_bytes * (0.5 if RUNTIMES[runtime][1] == "bfloat16" else 1)
            if 0 < available_bytes() < need:  # 0: unknown
                results[runtime] = {"error": f"skipped: needs about {need / 1e9:.0f} GB of free memory"}
            else:
                print(f"[{config}] {runtime} ...", file=sys.stderr, flush=True)
                t = time.perf_counter()
                # rg_mlx always runs in full: its prompt-time growth is one of the results.
                budget = 1e9 if runtime == "rg_mlx" else args.budget
                if runtime in duel:
                    worker = Worker(folder, runtime, lengths, decode, budget, serve=True)
                    results[runtime] = worker.reply()
                    if "error" in results[runtime]:
                        worker.close()
                    else:
                        served[runtime] = worker  # stays up (idle) until the decode rounds
                else:
                    results[runtime] = run_worker(folder, runtime, lengths, decode, budget)
                print(f"[{config}] {runtime} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            if served and runtime == duel[-1]:
                print(f"[{config}] decode, {args.decode_rounds} rounds of {', '.join(served)} ...", file=sys.stderr,
                      flush=True)
                rates, probes = decode_rounds(served, args.decode_rounds, BandwidthProbe())
                for name, worker in served.items():
                    worker.close()
                    if "error" in rates[name]:
                        results[name] = {"error": f"decode rounds: {rates[name]['error']}"}
                    else:
                        results[name]["decode"] = rates[name]
                served = {}
    finally:
        for worker in served.values():
            worker.close()
    return results, probes


def installed(runtimes: list[str]) -> tuple[list[str], list[str]]:
    """The runtimes whose peer library is installed, and a one-line note for each peer left out."""
    kept, skipped = [], {}
    for runtime in runtimes:
        missing = tuple(m for m in PEER_MODULES.get(RUNTIMES[runtime][0], ()) if importlib.util.find_spec(m) is None)
        if missing:
            skipped.setdefault(missing, []).append(runtime)
        else:
            kept.append(runtime)
    notes = [f"{' and '.join(m)} not installed: skipping {', '.join(r)} (pip install -e '.[dev]' in the rg-mlx clone)"
             for m, r in skipped.items()]
    return kept, notes


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with the options of `rg_mlx.commands.bench.add_arguments` (which checks them);
    print the tables."""
    args.runtimes, notes = installed(args.runtimes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(f"# rg_mlx benchmark\n\nMachine: {machine()}; load average at start {load:.2f}\n")
    report = {"machine": machine(), "configs": {}}
    for config in args.configs:
        disk_dtype, lengths, decode = CONFIG_PLAN[config]
        lengths = args.prompt_lengths if lengths is None else lengths
        decode = args.decode_tokens if decode is None else decode
        folder = args.work_dir / f"{config}-{disk_dtype}"
        print(f"[{config}] checkpoint {folder} ...", file=sys.stderr, flush=True)
        write_checkpoint(config, folder, dtype=disk_dtype)
        bandwidth = BandwidthProbe()()  # the bound where there are no decode rounds
        weight_bytes = 4 * _parameter_count(config)  # float32 compute
        results, probes = run_config(config, folder, args, lengths, decode, weight_bytes)
        params = _parameter_count(config)
        print(f"## {config}: {params / 1e9:.2f}B parameters, float32 weights {weight_bytes / 1e9:.2f} GB\n")
        bound_bandwidth = statistics.median(probes) if probes else bandwidth
        print(tables(config, results, lengths, bound_bandwidth, weight_bytes) + "\n", flush=True)
        report["configs"][config] = {"params": params, "prompt_lengths": lengths, "results": results,
                                     "bandwidth_at_start": bandwidth, "bandwidth_probes": probes}
    total = time.perf_counter() - start
    print(f"Total time {total / 60:.1f} min; load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def _parameter_count(config: str) -> int:
    return parameter_count(CONFIGS[config])
