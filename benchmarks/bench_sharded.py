"""The model split over two processes (tensor parallelism) against one process, on this machine.

    python -m benchmarks.bench_sharded [--rounds 3] [--prompt 512] [--decode 32] [--json FILE]

The "bench" checkpoint (the 2B widths, 6 layers, the full vocabulary, float32; written once
under --work-dir, shared with benchmarks/bench.py) runs as:

- 1 process: one rg_mlx process using every core (its BLAS threads and CPU streams);
- 1 process, one core: the same pinned to one core with one BLAS thread (what one rank has);
- 2 processes: `mlx.launch --backend ring -n 2` over 127.0.0.1, each rank pinned to one core
  (`sched_setaffinity`, which also sets rg_mlx's CPU streams to one) with one BLAS thread
  (`OPENBLAS_NUM_THREADS`, `MKL_NUM_THREADS`, `OMP_NUM_THREADS` = 1).

Each run loads the model (each rank its share), times a greedy prompt of --prompt tokens and
--decode tokens after it, and counts what its collectives send: the bytes of the arrays its
`all_sum` / `all_gather` calls are given, and the bytes its TCP sockets sent (the kernel's
`tcpi_bytes_sent`). The two set-ups take turns for --rounds rounds (bandwidth on a shared machine
moves within minutes); the tables give medians, the load average, and the on-paper figures
(`paper`) beside the measured ones. Each rank also times its own share of one MLP projection
through the sharded layer and through plain `nn.Linear` / rg_mlx's `SplitLinear` with the same
weight, to show the sharded layers' products cost what a plain product costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "bench"
SETUPS = ("1 process", "1 process, one core", "2 processes")
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def paper(args, ranks: int, dtype_bytes: int) -> dict[str, float]:
    """What each rank sends per decoded token when the model is split over `ranks` ranks (ring backend).

    Per layer, two all-reduces of one `width` vector (the temporal block's and the MLP's output);
    per token, one more for the embedding lookup and the gather of the logits (`V / ranks` from each
    rank). A ring all-reduce sends `2 (ranks - 1) / ranks` times the vector from each rank, a
    gather `ranks - 1` times the rank's part (for two ranks: the vector, and the rank's half).
    """
    vector = args.hidden_size * dtype_bytes
    reduce = 2 * (ranks - 1) / ranks * vector
    layers = 2 * args.num_hidden_layers * reduce
    gather = (ranks - 1) * -(-args.vocab_size // ranks) * dtype_bytes
    return {"per_layer": 2 * reduce, "layers": layers, "lookup": reduce, "logits": gather,
            "total": layers + reduce + gather, "collectives": 2 * args.num_hidden_layers + 2}


# -- One run (a process alone, or one rank) ------------------------------------------------------------


def tcp_bytes_sent() -> int:
    """Bytes this process's TCP sockets have sent, each once (the kernel's `tcpi_bytes_sent` less
    `tcpi_bytes_retrans`)."""
    import socket
    import struct

    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                if len(info) >= 216:
                    sent, retransmitted = struct.unpack_from("QQ", info, 200)
                    total += sent - retransmitted
    return total


def count_collectives(mx) -> dict[str, int]:
    """Wrap `mx.distributed.all_sum` / `all_gather` to add up the bytes of the arrays they are given."""
    counted = {"bytes": 0, "calls": 0}
    for name in ("all_sum", "all_gather"):
        op = getattr(mx.distributed, name)

        def counting(x, *args, _op=op, **kwargs):
            counted["bytes"] += x.nbytes
            counted["calls"] += 1
            return _op(x, *args, **kwargs)

        setattr(mx.distributed, name, counting)
    return counted


def _layer_products(model, mx, rounds: int = 9) -> dict[str, float]:
    """ms per call (median of `rounds`, the layers taking turns) of this rank's gate projection through its
    own layer, and through `nn.Linear` and rg_mlx's `SplitLinear` holding the same weight."""
    import mlx.nn as nn

    from rg_mlx.cpu.parallel import SplitLinear

    layer = model.layers[0].mlp_block.gate_proj
    out_dims, in_dims = layer.weight.shape
    layers = {type(layer).__name__: layer, "Linear": nn.Linear(in_dims, out_dims),
              "SplitLinear": SplitLinear(in_dims, out_dims)}
    for same in list(layers.values())[1:]:
        same.update({"weight": layer.weight, "bias": layer.bias})
    timings = {}
    for rows, repeats in ((1, 10), (512, 1)):
        x = mx.random.normal((1, rows, in_dims))
        runs: dict[str, list[float]] = {name: [] for name in layers}
        for _ in range(rounds):
            for name, module in layers.items():
                mx.eval(module(x))
                t = time.perf_counter()
                for _ in range(repeats):
                    mx.eval(module(x))
                runs[name].append((time.perf_counter() - t) / repeats * 1e3)
        timings.update({f"{name} x{rows}": statistics.median(r) for name, r in runs.items()})
    return timings


def worker(folder: Path, out: Path, prompt_tokens: int, decode_tokens: int) -> None:
    """Load `folder` (split over the launcher's ranks, if any), time a prompt and decode; write OUT/rank{r}.json."""
    import rg_mlx  # noqa: I001  (first: the Linux BLAS fast path loads before mlx.core)
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from rg_mlx.distributed import world

    group = world()
    counted = count_collectives(mx)
    t = time.perf_counter()
    model = rg_mlx.load_model(folder, dtype="float32", group=group)
    load_seconds = time.perf_counter() - t
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, prompt_tokens)

    def snapshot() -> np.ndarray:  # counted bytes, collective calls, TCP bytes sent, CPU seconds of this process
        return np.array([counted["bytes"], counted["calls"], tcp_bytes_sent(), time.process_time()], dtype=np.float64)

    def run(prompt, n: int) -> tuple[list[float], list[np.ndarray]]:
        """Greedy generation of `n` tokens: seconds to each token, and the counts when each was ready."""
        sampling = rg_mlx.Sampling(vocab_size=model.args.vocab_size)
        steps = rg_mlx.generate_step(model, mx.array(prompt, mx.int32)[None], model.make_cache(), sampling, n)
        times, marks, t0 = [], [], time.perf_counter()
        for y in steps:
            y.item()
            times.append(time.perf_counter() - t0)
            marks.append(snapshot())
        return times, marks

    run(ids[:16], 3)  # warm-up: compiled kernels, the BLAS's buffers
    start = snapshot()
    times, marks = run(ids, 1)
    prompt = (marks[0] - start) / prompt_tokens
    prompt_seconds = times[0]
    times, marks = run(ids[:16], decode_tokens + 1)  # the steps between the first token and the last
    decode = (marks[-1] - marks[0]) / decode_tokens
    result = {
        "rank": group.rank() if group else 0,
        "ranks": group.size() if group else 1,
        "load_seconds": load_seconds,
        "weight_bytes": sum(p.nbytes for _, p in tree_flatten(model.parameters())),
        "peak_memory": mx.get_peak_memory(),
        "prompt_tps": prompt_tokens / prompt_seconds,
        "decode_tps": decode_tokens / (times[-1] - times[0]),
        "prompt_sent": {"counted": prompt[0], "calls": prompt[1], "tcp": prompt[2]},
        "decode_sent": {"counted": decode[0], "calls": decode[1], "tcp": decode[2]},
        "prompt_cpu_ms": prompt[3] * 1e3,
        "decode_cpu_ms": decode[3] * 1e3,
        "load_average": os.getloadavg()[0],
    }
    if group is not None:
        result["layer_products_ms"] = _layer_products(model, mx)
        vector = mx.zeros((1, 1, model.args.hidden_size))
        for _ in range(10):
            mx.eval(mx.distributed.all_sum(vector, group=group))
        t = time.perf_counter()
        for _ in range(200):  # one layer's all-reduce, alone: the link's latency as a collective sees it
            mx.eval(mx.distributed.all_sum(vector, group=group))
        result["all_sum_ms"] = (time.perf_counter() - t) / 200 * 1e3
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result))


# -- The comparison --------------------------------------------------------------------------------------


def run_setup(setup: str, folder: Path, args: argparse.Namespace) -> list[dict]:
    """One run of `setup` (a key of SETUPS); each rank's result."""
    out = Path(tempfile.mkdtemp(prefix="rg_mlx-sharded-"))
    command = ["-m", "benchmarks.bench_sharded", "--worker", str(folder), str(out),
               "--prompt", str(args.prompt), "--decode", str(args.decode)]
    env = dict(os.environ)
    if setup == "1 process":
        command, ranks = [sys.executable, *command], 1
    elif setup == "1 process, one core":
        env.update(ONE_THREAD)
        command, ranks = [sys.executable, *command, "--one-core"], 1
    else:
        env.update(ONE_THREAD)
        ranks = 2
        command = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())",
                   "--backend", "ring", "-n", str(ranks), "--python", sys.executable, "--", *command, "--one-core"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    results = []
    for r in range(ranks):  # mlx.launch exits 0 whatever the ranks do: read each rank's own result
        path = out / f"rank{r}.json"
        if not path.is_file():
            raise RuntimeError(f"{setup}: rank {r} wrote no result:\n{proc.stdout}\n{proc.stderr}")
        results.append(json.loads(path.read_text()))
        path.unlink()
    out.rmdir()
    return results


def _median(runs: list[list[dict]], key: str, sub: str | None = None) -> float:
    return statistics.median(r[0][key] if sub is None else r[0][key][sub] for r in runs)


def tables(runs: dict[str, list[list[dict]]], model_args, loads: list[float]) -> str:
    """Markdown: speed and bytes per setup (medians over rounds), the layer products, the on-paper bytes."""
    lines = [
        "| setup | prompt tok/s | decode tok/s | CPU ms per decoded token, all processes | weights per process | "
        "read per token, all processes | sent per decoded token (TCP) | counted | on paper | collectives per token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setup, rs in runs.items():
        ranks = rs[0][0]["ranks"]
        weights = rs[0][0]["weight_bytes"]
        decode = _median(rs, "decode_tps")
        on_paper = paper(model_args, ranks, 4)["total"] if ranks > 1 else 0
        cpu = statistics.median(sum(rank["decode_cpu_ms"] for rank in run) for run in rs)
        lines.append(
            f"| {setup} | {_median(rs, 'prompt_tps'):.1f} | {decode:.2f} | {cpu:.0f} | {weights / 1e9:.2f} GB | "
            f"{ranks * weights * decode / 1e9:.1f} GB/s | {_median(rs, 'decode_sent', 'tcp') / 1e3:.1f} KB | "
            f"{_median(rs, 'decode_sent', 'counted') / 1e3:.1f} KB | {on_paper / 1e3:.1f} KB | "
            f"{_median(rs, 'decode_sent', 'calls'):.0f} |"
        )
    sharded = runs.get("2 processes")
    if sharded:
        prompt = _median(sharded, "prompt_sent", "tcp")
        layers = [k.removesuffix(" x1") for k in sharded[0][0]["layer_products_ms"] if k.endswith(" x1")]
        lines += ["", f"Prompt: {prompt / 1e3:.1f} KB sent per prompt token by each rank (TCP). One all-reduce of "
                  f"one vector alone: {_median(sharded, 'all_sum_ms'):.3f} ms.", "",
                  "Each rank's share of one MLP gate projection (ms per call, one core, medians of 9 turns):", "",
                  "| rows | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
        for rows in (1, 512):
            cells = [statistics.median(r[0]["layer_products_ms"][k] for r in sharded)
                     for k in sharded[0][0]["layer_products_ms"] if k.endswith(f"x{rows}")]
            lines.append(f"| {rows} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines += ["", f"Load average during the runs: {min(loads):.1f} to {max(loads):.1f}."]
    return "\n".join(lines)


def paper_table() -> str:
    """The bytes each of two ranks sends per decoded token for the released models in bfloat16."""
    from rg_mlx.config import preset

    lines = ["| model | per layer | all layers | embedding lookup | logits gather | total | collectives |",
             "|---|---|---|---|---|---|---|"]
    for name in ("2b", "9b"):
        p = paper(preset(name), 2, 2)
        lines.append(f"| {name.upper()} | {p['per_layer'] / 1e3:.1f} KB | {p['layers'] / 1e3:.0f} KB | "
                     f"{p['lookup'] / 1e3:.1f} KB | {p['logits'] / 1e3:.0f} KB | {p['total'] / 1e3:.0f} KB | "
                     f"{p['collectives']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/rg_mlx/bench").expanduser())
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running both set-ups (default 3)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--decode", type=int, default=32, help="decoded tokens (default 32)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take (default 900)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--one-core", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.prompt, args.decode)
        return 0

    from rg_mlx.bench.checkpoint import CONFIGS, write_checkpoint
    from rg_mlx.bench.speed import machine

    folder = write_checkpoint(CONFIG, args.work_dir / f"{CONFIG}-float32", dtype="float32")
    print(f"# Tensor parallelism on one machine\n\nMachine: {machine()}\n")
    runs: dict[str, list[list[dict]]] = {s: [] for s in SETUPS}
    loads = []
    for i in range(args.rounds):
        for setup in SETUPS if i % 2 == 0 else reversed(SETUPS):  # in turns, the order reversed every other round
            loads.append(os.getloadavg()[0])
            runs[setup].append(run_setup(setup, folder, args))
            r = runs[setup][-1][0]
            print(f"[round {i + 1}] {setup}: prompt {r['prompt_tps']:.1f} tok/s, decode {r['decode_tps']:.2f} tok/s, "
                  f"load {loads[-1]:.1f}", file=sys.stderr, flush=True)
    print(f"## {CONFIG}: {args.prompt}-token prompt, {args.decode} decoded tokens, medians of {args.rounds} rounds\n")
    print(tables(runs, CONFIGS[CONFIG], loads) + "\n")
    print("## On paper: bytes each of two ranks sends per decoded token, bfloat16\n\n" + paper_table())
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "runs": runs, "loads": loads}, indent=2))
    return 0


def _pin_to_one_core() -> None:
    """Run this rank on one core of its own (before MLX and the BLAS start their threads)."""
    rank = int(os.environ.get("MLX_RANK", "0"))
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]})


if __name__ == "__main__":
    if "--one-core" in sys.argv:
        _pin_to_one_core()
    sys.exit(main())
