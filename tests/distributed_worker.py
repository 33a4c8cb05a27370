"""One rank of a test run under `mlx.launch` (tests/test_distributed.py starts it; never imported by pytest).

    mlx.launch --backend ring -n 2 --python PY tests/distributed_worker.py check JOB.json OUT
    mlx.launch --backend ring -n 2 --python PY tests/distributed_worker.py cli JOB.json OUT

`check` loads every folder of the job split over the ranks and writes what each rank computed
(logits, tokens, its parameters' shapes, its state, its memory) to OUT/rank{r}.npz. `cli` runs
`rg_mlx.cli.main` with each of this rank's command lines in turn (so one rank can be given a bad
path), writing OUT/pid{r} first and OUT/status{r} (the exit statuses so far) after each. Each rank
writes only its own files: `mlx.launch` exits 0 whatever the ranks do, so the test reads every rank's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for its byte counters


def run_check(job: dict, out: Path) -> None:
    import rg_mlx  # noqa: F401  (first: the Linux BLAS fast path)
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from rg_mlx import cpu, load_model
    from rg_mlx.generate import Sampling, generate_step
    from rg_mlx.state import AttentionState, RecurrentState

    from benchmarks.bench_sharded import count_collectives, tcp_bytes_sent

    group = mx.distributed.init()
    counted = count_collectives(mx)
    tokens = mx.array(np.array(job["tokens"], dtype=np.int32))  # [B, T]
    result: dict[str, np.ndarray] = {}
    for name, folder in job["folders"].items():
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        model = load_model(folder, dtype="float32", group=group)
        result[f"{name}/peak"] = np.array(mx.get_peak_memory() - before)  # what loading this model took at most
        result[f"{name}/accelerated"] = np.array(cpu.accelerated(model))
        result[f"{name}/embedding"] = np.array(type(model.model.embed_tokens.embedding).__name__)
        shapes = {path: p.shape for path, p in tree_flatten(model.parameters())}
        result[f"{name}/shapes"] = np.array(json.dumps(shapes))
        result[f"{name}/full"] = np.array(model(tokens))

        cache = model.make_cache()
        prefill, chunk = job["prefill"], job["chunk"]
        outs = [model(tokens[:, s : min(prefill, s + chunk)], cache=cache) for s in range(0, prefill, chunk)]
        mx.eval(outs)
        before = counted["bytes"], tcp_bytes_sent()
        for t in range(prefill, tokens.shape[1]):
            outs.append(model(tokens[:, t : t + 1], cache=cache))
            mx.eval(outs[-1])
        steps = tokens.shape[1] - prefill
        # What this rank's collectives were given, and what its sockets sent, per decode step (a batch of B rows).
        result[f"{name}/decode_bytes"] = np.array([counted["bytes"] - before[0], tcp_bytes_sent() - before[1]]) / steps
        result[f"{name}/chunked"] = np.array(mx.concatenate(outs, axis=1))
        recurrent = sum(RecurrentState(c).conv.nbytes + RecurrentState(c).h.nbytes
                        for layer, c in zip(model.layers, cache) if layer.temporal_block_type == "recurrent")
        ring = sum(AttentionState(c).keys.nbytes + AttentionState(c).values.nbytes
                   for layer, c in zip(model.layers, cache) if layer.temporal_block_type == "attention")
        result[f"{name}/state"] = np.array([recurrent, ring])

        vocab = model.args.vocab_size
        for kind, temperature in (("greedy", 0.0), ("sampled", 1.0))[: 2 if name == job["sampled"] else 1]:
            sampling = Sampling(vocab_size=vocab, temperature=temperature)  # no seed: rank 0's, from loading
            steps = generate_step(model, tokens[:1, : job["prefill"]], model.make_cache(), sampling, job["generate"])
            result[f"{name}/{kind}"] = np.array([y.item() for y in steps])
        del model, cache, outs

    # mlx-lm's loader building our Model (through its hook for the model classes), then `model.shard`.
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from rg_mlx import Model, ModelArgs

    for name, folder in job["mlx_lm"].items():
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        model, _ = mlx_lm_load_model(Path(folder), lazy=True, get_model_classes=lambda config: (Model, ModelArgs))
        model.shard(group)
        mx.eval(model.parameters())
        result[f"{name}/mlx_lm_peak"] = np.array(mx.get_peak_memory() - before)
        result[f"{name}/mlx_lm"] = np.array(model(tokens))
        del model
    # And mlx-lm's `sharded_load` itself on the model mlx-lm's tools build (`rg_mlx.integration`): it
    # finishes its build (dtype rule, CPU accelerations) when its weights load, before `shard`.
    from mlx_lm.utils import sharded_load

    from rg_mlx.integration import register_with_mlx_lm

    register_with_mlx_lm()
    model, _ = sharded_load(job["sharded_load"])
    result["sharded_load"] = np.array(model(tokens))
    result["sharded_load/accelerated"] = np.array(cpu.accelerated(model))
    np.savez(out / f"rank{group.rank()}.npz", **result)


def run_cli(job: dict, out: Path) -> int:
    rank = int(os.environ.get("MLX_RANK", "0"))
    (out / f"pid{rank}").write_text(str(os.getpid()))
    import rg_mlx.distributed
    from rg_mlx.cli import main

    if "timeout" in job:
        rg_mlx.distributed.TIMEOUT = job["timeout"]
    rg_mlx.distributed.world()  # connected to the others: now a rank that is stuck before loading
    time.sleep(job.get("sleep", {}).get(str(rank), 0))
    statuses = []
    for argv in job["commands"][rank]:
        statuses.append(main(argv))
        (out / f"status{rank}").write_text(json.dumps(statuses))
    return max(statuses)


def main() -> int:
    mode, job_path, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    job = json.loads(job_path.read_text())
    if mode == "check":
        run_check(job, out)
        return 0
    return run_cli(job, out)


if __name__ == "__main__":
    sys.exit(main())
