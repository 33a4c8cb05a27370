"""Speed and memory of rg_mlx against mlx-lm and Hugging Face transformers, on one random checkpoint and its
conversions to each kind of weights.

    rg-mlx bench            # options: rg-mlx bench --help

Each runtime runs in its own process (`worker.py` beside this file, run as a script) on the same
random-weight checkpoint, written once under --work-dir, and on its conversions by `rg_mlx.convert` to
bfloat16, 8-bit and 4-bit weights (`--weights`; written once beside it). rg_mlx and mlx-lm with the same
BLAS read the same weights on each; transformers reads the checkpoint as written, in float32 and in
bfloat16. Decode is measured again in rounds, taking turns (on a shared machine, bandwidth moves within
minutes): rg_mlx and mlx-lm with the same BLAS on float32 weights, then rg_mlx on every kind of weights.
Configurations: "bench" (the 2B widths, 6 layers R R A R R A, the full 256000 vocabulary, 1.12B
parameters, float32) and "2b" (the real 2B shape, bfloat16, decode only). Prints markdown tables:
absolute numbers with each decode speed as a fraction of its memory-bandwidth bound (bytes read per
token: the weights as stored, and the state), rg_mlx on each kind of weights against rg_mlx on float32,
the ratios of rg_mlx to each peer on the same weights, and the growth of prompt time with length.
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

from .checkpoint import CONFIGS, WEIGHTS, folder_bytes, parameter_count, weights_folder, write_checkpoint

# The worker runs as a script by its path, never as `rg_mlx.bench.worker`: importing the rg_mlx package loads
# its Linux fast path (BLAS, malloc settings), which the peers' processes must run without.
WORKER = Path(__file__).with_name("worker.py")
# runtime name -> (worker runtime; compute dtype: None = the runtime's own, rg_mlx's dtype rule or the folder's for
# mlx-lm; BLAS: None = rg_mlx's fast path as RG_MLX_BLAS says, "none" = MLX as installed, transformers never gets
# the fast path; the weights it runs on: None = every kind asked for, () = the checkpoint as written, in its dtype)
RUNTIMES: dict[str, tuple[str, str | None, str | None, tuple[str, ...] | None]] = {
    "rg_mlx": ("rg_mlx", None, None, None),
    "rg_mlx-bf16": ("rg_mlx", "bfloat16", None, ("bfloat16",)),
    "mlx-lm": ("mlx-lm", None, "none", ("float32",)),
    "mlx-lm+blas": ("mlx-lm", None, None, None),
    "hf-float32": ("hf", "float32", None, ()),
    "hf-bfloat16": ("hf", "bfloat16", None, ()),
}
LABELS = {
    "rg_mlx": "rg_mlx", "rg_mlx-bf16": "rg_mlx", "mlx-lm": "mlx-lm (as installed)",
    "mlx-lm+blas": "mlx-lm (same BLAS)", "hf-float32": "HF transformers", "hf-bfloat16": "HF transformers",
}  # fmt: skip
# What each worker runtime imports beyond rg_mlx's own dependencies (transformers: the `dev` extra).
PEER_MODULES = {"hf": ("torch", "transformers")}
# The runs whose decode is measured in alternating rounds on float32 weights (both read the same weights through
# the same BLAS, so only measuring them side by side tells them apart); rg_mlx's runs on every kind of weights are
# then measured in rounds of their own.
DUEL = ("rg_mlx/float32", "mlx-lm+blas/float32")
OURS = ("rg_mlx", "rg_mlx-bf16")
# How each configuration is stored on disk and run: its dtype, prompt lengths (None = from --prompt-lengths),
# decode tokens (None = --decode-tokens), the weights run when --weights is not given, and whether decode is
# measured in rounds (each round's processes stay up together: too much memory for the 2B shape).
CONFIG_PLAN = {
    "bench": ("float32", None, None, tuple(WEIGHTS), True),
    "2b": ("bfloat16", [], 8, ("bfloat16", "4bit"), False),
}
# Seconds one decode measurement of a round may take (the first, after the prompts, may take --budget).
ROUND_BUDGET = 30.0


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
        kind, dtype, blas, _ = RUNTIMES[runtime]
        cmd = [sys.executable, str(WORKER), "--runtime", kind, "--model", str(model),
               "--prompt-lengths", ",".join(map(str, prompt_lengths)), "--decode-tokens", str(decode_tokens),
               "--budget", str(budget)]
        cmd += ["--dtype", dtype] if dtype else []
        cmd += ["--blas", blas] if blas else []
        cmd += ["--serve", "--round-budget", str(ROUND_BUDGET)] if serve else []
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


def _fmt(x: float | None, digits: int = 1, mark: str = "") -> str:
    if x is None:
        return "-"
    if x >= 100:
        digits = 0
    return f"{mark}{x:.{digits}f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _ok(r: dict | None) -> bool:
    return r is not None and "error" not in r


def _bound(r: dict, bandwidth: float) -> float:
    """tok/s at which decode would read the bytes of one token (`bytes_per_token`) at `bandwidth`."""
    return bandwidth / r["bytes_per_token"]


def tables(config: str, results: dict[str, dict], lengths: list[int], bandwidth: float) -> str:
    """The markdown report of one configuration. `results` maps "runtime/weights" to a worker's report (with
    `bytes_per_token`, and `decode` possibly from rounds); `bandwidth` is the median of the probes of the decode
    rounds, if there were rounds."""
    out, notes = [], set()
    rounds = {k: r["decode"]["rounds"] for k, r in results.items() if _ok(r) and "rounds" in r["decode"]}
    head = ["runtime", "weights", "activations", "BLAS / backend"] + [f"prompt {n} tok/s" for n in lengths]
    head += [f"TTFT {lengths[0]} s"] if lengths else []
    head += ["decode tok/s", "% of bound", "GB / token", "load s", "peak RSS GB", "state MiB"]
    out += [_row(head), _row(["---"] * len(head))]
    for key, r in results.items():
        runtime, weights = key.split("/")
        if not _ok(r):
            out.append(_row([LABELS[runtime], weights, r["error"]] + [""] * (len(head) - 3)))
            continue
        backend = r["blas"]
        if runtime in OURS and weights != "float32" and r.get("native"):  # the native products' instruction set
            backend += f"; native {r['native'].split(',')[0]}"
        cells = [LABELS[runtime], weights, r["dtype"], backend]
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
        cells += [_fmt(d["tok_s"], 2) + ("*" if d.get("fewer_than_asked") else ""),
                  f"{100 * d['tok_s'] / _bound(r, bandwidth):.0f}%", f"{r['bytes_per_token'] / 1e9:.2f}",
                  _fmt(r["load_s"]), _fmt(r["peak_rss_bytes"] / 1e9, 2), _fmt(r["state_bytes"] / 2**20, 2)]
        out.append(_row(cells))
    if rounds:
        notes.add(f"decode of {', '.join(rounds)}: median of {len(next(iter(rounds.values())))} rounds in which they "
                  "take turns, each after a bandwidth probe")
    notes.add("% of bound: decode against the bandwidth over the bytes read per token (the weights as stored, "
              "each once, and the state)")
    notes.add("state: after the longest prompt timed (rg_mlx allocates its full attention window at the start)")
    out += [f"\n{n}" for n in sorted(notes)]
    out.append(f"\nBandwidth {bandwidth / 1e9:.1f} GB/s "
               f"({'median of the probes of the decode rounds' if rounds else 'probed before the first runtime'}).")
    out += _weights_table(results, lengths, bandwidth) + _peer_table(results, lengths)
    if rounds:
        each = [f"{k} {', '.join(_fmt(x, 2) for x in xs)}" for k, xs in rounds.items()]
        out.append(f"Decode rounds, tok/s: {'; '.join(each)}.")
    for key, r in results.items():
        if key.split("/")[0] in OURS and _ok(r):
            timed = [n for n in lengths if "extrapolated_from" not in r["prompt"][str(n)]]
            if len(timed) >= 2:
                a, b = timed[-2], timed[-1]
                ratio = r["prompt"][str(b)]["ttft_s"] / r["prompt"][str(a)]["ttft_s"]
                out.append(f"Prompt time growth, {key}: t({b}) / t({a}) = {ratio:.2f} (linear: {b / a:.2f}).")
    return "\n".join(out)


def _weights_table(results: dict[str, dict], lengths: list[int], bandwidth: float) -> list[str]:
    """rg_mlx on each kind of weights against rg_mlx on float32 weights."""
    base = results.get("rg_mlx/float32")
    ours = {k: r for k, r in results.items() if k.split("/")[0] in OURS and k != "rg_mlx/float32" and _ok(r)}
    if not _ok(base) or not ours:
        return []
    head = ["rg_mlx", "activations"] + [f"prompt {n}" for n in lengths] + ["decode", "% of bound", "GB / token"]
    out = ["\nrg_mlx on each kind of weights against rg_mlx on float32 weights (times faster)\n", _row(head),
           _row(["---"] * len(head))]
    for key, r in ours.items():
        cells = [key.split("/")[1], r["dtype"]]
        cells += [f"{r['prompt'][str(n)]['tok_s'] / base['prompt'][str(n)]['tok_s']:.2f}x" for n in lengths]
        cells += [f"{r['decode']['tok_s'] / base['decode']['tok_s']:.2f}x",
                  f"{100 * r['decode']['tok_s'] / _bound(r, bandwidth):.0f}%", f"{r['bytes_per_token'] / 1e9:.2f}"]
        out.append(_row(cells))
    return out + [""]


def _peer_table(results: dict[str, dict], lengths: list[int]) -> list[str]:
    """rg_mlx against each peer, on the same weights (transformers in bfloat16: against both of rg_mlx's runs on
    bfloat16 weights)."""
    rows = []
    for key, r in results.items():
        runtime, weights = key.split("/")
        if runtime in OURS or not _ok(r):
            continue
        for ours_key in ("rg_mlx/" + weights, "rg_mlx-bf16/" + weights):
            ours = results.get(ours_key)
            if not _ok(ours):
                continue
            decode = (ours["decode"]["tok_s"], r["decode"]["tok_s"])
            if key in DUEL and ours_key in DUEL:  # the same rounds, side by side
                decode = (ours["duel"]["tok_s"], r["decode"]["tok_s"])
            cells = [f"{LABELS[runtime]}, {weights}, {r['dtype']}", f"{ours_key}, {ours['dtype']}"]
            cells += [f"{ours['prompt'][str(n)]['tok_s'] / r['prompt'][str(n)]['tok_s']:.2f}x" for n in lengths]
            if lengths:
                n = str(lengths[0])
                cells.append(f"{r['prompt'][n]['ttft_s'] / ours['prompt'][n]['ttft_s']:.2f}x")
            cells += [f"{decode[0] / decode[1]:.2f}x", f"{r['peak_rss_bytes'] / ours['peak_rss_bytes']:.2f}x",
                      f"{r['state_bytes'] / ours['state_bytes']:.2f}x"]
            rows.append(_row(cells))
    if not rows:
        return []
    head = ["peer", "rg_mlx"] + [f"prompt {n}" for n in lengths] + ([f"TTFT {lengths[0]}"] if lengths else [])
    head += ["decode", "peak RSS", "state"]
    return ["\nrg_mlx compared with each peer on the same weights "
            "(times better: higher speed, shorter TTFT, smaller RSS and state)\n", _row(head),
            _row(["---"] * len(head)), *rows, ""]


def plan(runtimes: list[str], weights: list[str]) -> list[str]:
    """The runs of one configuration, as "runtime/weights": each runtime on each kind of `weights` it runs on
    (transformers: once, on the checkpoint as written, labelled with its dtype). The runs that stay up for decode
    rounds come last (rg_mlx's), the float32 duel first among them."""
    runs = []
    for runtime in runtimes:
        _, dtype, _, kinds = RUNTIMES[runtime]
        if kinds == ():
            runs.append(f"{runtime}/{dtype}")
        else:
            runs += [f"{runtime}/{w}" for w in weights if not kinds or w in kinds]
    first = [r for r in runs if r.split("/")[0] not in OURS and r not in DUEL]
    duel = [r for r in DUEL if r in runs]
    return first + duel + [r for r in runs if r not in first and r not in duel]


def duel_runs(runs: list[str], rounds: int, weight_bytes: int) -> list[str]:
    """The runs whose decode is measured in the float32 rounds: those of DUEL asked for, if both, and only where
    memory holds their idle processes and one more runtime (each needs ~1.3x the weights)."""
    duel = [r for r in runs if r in DUEL]
    free = available_bytes()  # 0: unknown
    if len(duel) < 2 or not rounds or 0 < free < 1.3 * weight_bytes * (len(duel) + 1):
        return []
    return duel


def run_config(config: str, base: Path, folders: dict[str, Path], runs: list[str], args: argparse.Namespace,
               lengths: list[int], decode: int, rounds: bool) -> tuple[dict[str, dict], list[float]]:
    """Every run of one configuration (`plan`), one after the other, on the folders of each kind of weights
    (`folders`; transformers reads the checkpoint as written, `base`). With `rounds`: DUEL's decode is then measured in
    `args.decode_rounds` alternating rounds (`decode_rounds`), and rg_mlx's runs, which stay up, in rounds of their
    own at the end. Returns the results (in `plan`'s order) and the rounds' bandwidth probes."""
    n_rounds = args.decode_rounds if rounds else 0
    duel = duel_runs(runs, n_rounds, folder_bytes(folders["float32"]) if "float32" in folders else 0)
    results, served, probes = {}, {}, []
    probe = None
    try:
        for key in runs:
            runtime, weights = key.split("/")
            peer_dtype = RUNTIMES[runtime][3] == ()  # transformers: the checkpoint as written, in its own dtype
            folder = base if peer_dtype else folders[weights]
            weight_bytes = parameter_count(CONFIGS[config]) * (2 if weights == "bfloat16" else 4) if peer_dtype \
                else folder_bytes(folder)
            need = 1.3 * weight_bytes
            if 0 < available_bytes() < need:  # 0: unknown
                results[key] = {"error": f"skipped: needs about {need / 1e9:.0f} GB of free memory"}
                continue
            print(f"[{config}] {key} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            # rg_mlx always runs in full: its prompt-time growth is one of the results.
            budget = 1e9 if runtime in OURS else args.budget
            if key in duel or (n_rounds and runtime in OURS):
                worker = Worker(folder, runtime, lengths, decode, budget, serve=True)
                results[key] = worker.reply()
                if "error" in results[key]:
                    worker.close()
                else:
                    served[key] = worker  # stays up (idle) until its decode rounds
            else:
                results[key] = run_worker(folder, runtime, lengths, decode, budget)
            if _ok(results[key]):
                results[key]["bytes_per_token"] = weight_bytes + results[key]["state_bytes"]
            print(f"[{config}] {key} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            if duel and key == duel[-1] and all(k in served for k in duel):
                print(f"[{config}] decode, {n_rounds} rounds of {', '.join(duel)} ...", file=sys.stderr, flush=True)
                probe = probe or BandwidthProbe()
                rates, duel_probes = decode_rounds({k: served[k] for k in duel}, n_rounds, probe)
                probes += duel_probes
                for k in duel:
                    if "error" in rates[k]:
                        results[k] = {"error": f"decode rounds: {rates[k]['error']}"}
                    else:
                        results[k]["decode"] = results[k]["duel"] = rates[k]
                    if k.split("/")[0] not in OURS or "error" in rates[k]:
                        served.pop(k).close()
        ours = {k: w for k, w in served.items() if k.split("/")[0] in OURS}
        if len(ours) >= 2:
            print(f"[{config}] decode, {n_rounds} rounds of {', '.join(ours)} ...", file=sys.stderr, flush=True)
            rates, weight_probes = decode_rounds(ours, n_rounds, probe or BandwidthProbe())
            probes += weight_probes
            for k, rate in rates.items():
                if "error" in rate:
                    results[k] = {"error": f"decode rounds: {rate['error']}"}
                else:
                    results[k]["decode"] = rate
    finally:
        for worker in served.values():
            worker.close()
    return {k: results[k] for k in runs if k in results}, probes


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
        disk_dtype, lengths, decode, default_weights, rounds = CONFIG_PLAN[config]
        lengths = args.prompt_lengths if lengths is None else lengths
        decode = args.decode_tokens if decode is None else decode
        weights = args.weights or list(default_weights)
        base = args.work_dir / f"{config}-{disk_dtype}"
        print(f"[{config}] checkpoint {base} ...", file=sys.stderr, flush=True)
        write_checkpoint(config, base, dtype=disk_dtype)
        runs = plan(args.runtimes, weights)
        folders = {disk_dtype: base}
        kinds = {r.split("/")[1] for r in runs if RUNTIMES[r.split("/")[0]][3] != ()}
        for kind in sorted(kinds - {disk_dtype}, key=list(WEIGHTS).index):
            print(f"[{config}] {kind} weights ...", file=sys.stderr, flush=True)
            folders[kind] = weights_folder(config, base, kind)
        bandwidth = BandwidthProbe()()  # the bound where there are no decode rounds
        results, probes = run_config(config, base, folders, runs, args, lengths, decode, rounds)
        params = parameter_count(CONFIGS[config])
        sizes = ", ".join(f"{kind} {folder_bytes(f) / 1e9:.2f} GB" for kind, f in folders.items())
        print(f"## {config}: {params / 1e9:.2f}B parameters; weights {sizes}\n")
        bound_bandwidth = statistics.median(probes) if probes else bandwidth
        print(tables(config, results, lengths, bound_bandwidth) + "\n", flush=True)
        report["configs"][config] = {"params": params, "prompt_lengths": lengths, "results": results,
                                     "bandwidth_at_start": bandwidth, "bandwidth_probes": probes,
                                     "weights_bytes": {kind: folder_bytes(f) for kind, f in folders.items()}}
    total = time.perf_counter() - start
    print(f"Total time {total / 60:.1f} min; load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
