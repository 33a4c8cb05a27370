"""The model split over two processes (`Model.shard`, `load(..., group=)`, the CLI under `mlx.launch`)
against the same model in one process.

Two ranks run on this machine: `mlx.launch --backend ring` over 127.0.0.1, each rank writing its own
results (tests/distributed_worker.py), since `mlx.launch` exits 0 whatever its ranks do. Every
launch runs in a session of its own and is killed, with all its ranks, when the test ends.
"""

from __future__ import annotations

import functools
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from rg_mlx import Model, ModelArgs, RGError, distributed, load_model
from rg_mlx.cli import main
from rg_mlx.cpu import native
from rg_mlx.generate import Sampling, generate_step
from rg_mlx.model import initial_weight
from rg_mlx.state import AttentionState, RecurrentState
from reference import dm_to_hf, reference_model, save_hf_folder
from test_model import CONFIGS, WINDOW

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
LAUNCH = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]
# A full pass past the attention window; prefill in chunks that cross it, then decode; a few generated tokens.
T, PREFILL, CHUNK, GENERATE = 3 * WINDOW + 6, 3 * WINDOW + 1, WINDOW - 1, 5
# The quantized models' widths: every layer split by input keeps whole groups of 32 on each rank (96 / 2 would not).
QUANTIZED_WIDTHS = dict(mlp_expanded_width=128)


def free_ports(n: int = 2) -> int:
    """A port P such that P .. P+n-1 were free a moment ago (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for p in range(port, port + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise AssertionError("no free ports")


def start(*command: str, stdin: str | None = None) -> subprocess.Popen:
    """`mlx.launch` of `command` on two local ranks, in a session of its own (see `stop`)."""
    args = [*LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(free_ports()), "--python", sys.executable]
    return subprocess.Popen(
        [*args, "--", *command], cwd=HERE.parent, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    """Kill the launcher and every rank it started (they share its session's process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def launch(*command: str, stdin: str | None = None, timeout: float = 240) -> tuple[str, str, float]:
    """Run `command` on two ranks to the end; (stdout, stderr, seconds)."""
    proc = start(*command, stdin=stdin)
    t = time.perf_counter()
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    finally:
        stop(proc)
    return out, err, time.perf_counter() - t


def quantize_folder(source: Path, folder: Path, group_size: int = 32, bits: int = 4) -> Path:
    """`source` with its Linear and Embedding layers quantized (MLX affine), as `rg-mlx convert -q` writes it."""
    model = load_model(source, dtype="float32", accelerate=False)
    nn.quantize(model, group_size, bits, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % group_size == 0)
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def initialised_folder(folder: Path, **overrides) -> Path:
    """A random model with DeepMind's initialisation, its biases and norm scales random too (as `reference_model`)."""
    config = dict(model_type="recurrent_gemma", vocab_size=97, hidden_size=64, intermediate_size=192,
                  num_hidden_layers=3, num_attention_heads=4, block_types=["recurrent", "recurrent", "attention"],
                  attention_window_size=WINDOW)
    config.update(overrides)
    args = ModelArgs.from_dict(config)
    mx.random.seed(3)
    weights = {}
    for name, p in tree_flatten(Model(args).parameters()):
        w = initial_weight(name, p.shape, args.num_hidden_layers)
        weights[name] = w if mx.any(w != 0).item() else mx.random.normal(p.shape) * 0.3
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(args.to_dict()))
    return folder


def replicated(path: str, kv_heads: int) -> bool:
    """Whether every rank holds `path` whole: the norms, the biases added after an all-reduce, the one
    key/value head (with its quantization scales)."""
    return path.endswith(("norm.weight", "o_proj.bias", "down_proj.bias", "linear_out.bias")) or (
        kv_heads == 1 and any(f".{p}_proj." in path for p in "kv"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The three DeepMind-reference configurations (float32; vocabulary 97, so one rank holds a padding row),
    the same 4-bit quantized (MLP width 128), two key/value heads, and one big enough to see the loading peak."""
    root = tmp_path_factory.mktemp("sharded")
    found = {}
    for name, overrides in CONFIGS.items():
        ref, cfg = reference_model(window=WINDOW, **overrides)
        found[name] = save_hf_folder(root / name, cfg, dm_to_hf(ref.state_dict(), cfg))
        widths = {**overrides, **QUANTIZED_WIDTHS, **({"lru_width": 128} if "lru_width" in overrides else {})}
        ref, cfg = reference_model(window=WINDOW, **widths)
        source = save_hf_folder(root / f"{name}-float", cfg, dm_to_hf(ref.state_dict(), cfg))
        found[f"{name}-q4"] = quantize_folder(source, root / f"{name}-q4")
    found["kv2"] = initialised_folder(root / "kv2", num_key_value_heads=2)
    found["memory"] = initialised_folder(root / "memory", vocab_size=2048, hidden_size=256, intermediate_size=2048)
    return found


@pytest.fixture(scope="module")
def ranks(folders, tiny_model_dir, tmp_path_factory) -> list[dict[str, np.ndarray]]:
    """What each of two ranks computed for every folder (tests/distributed_worker.py `check`)."""
    out = tmp_path_factory.mktemp("ranks")
    tokens = np.random.default_rng(1).integers(0, 97, (2, T))
    job = {
        "folders": {name: str(f) for name, f in folders.items()},
        "mlx_lm": {name: str(folders[name]) for name in ("rra", "rra-q4", "memory")},
        "sampled": "rra",
        "sharded_load": str(tiny_model_dir),
        "tokens": tokens.tolist(), "prefill": PREFILL, "chunk": CHUNK, "generate": GENERATE,
    }
    (out / "job.json").write_text(json.dumps(job))
    stdout, stderr, _ = launch(str(WORKER), "check", str(out / "job.json"), str(out))
    results = []
    for r in range(2):
        assert (out / f"rank{r}.npz").is_file(), f"rank {r} wrote no result:\n{stdout}\n{stderr}"
        results.append(dict(np.load(out / f"rank{r}.npz")))
    return [{**res, "tokens": tokens} for res in results]


@functools.cache
def single(folder: Path, tokens: tuple) -> dict[str, np.ndarray]:
    """The worker's computations for `tokens` (`[B, T]` as nested tuples), in this one process."""
    model = load_model(folder, dtype="float32")
    x = mx.array(np.array(tokens))
    cache = model.make_cache()
    outs = [model(x[:, s : min(PREFILL, s + CHUNK)], cache=cache) for s in range(0, PREFILL, CHUNK)]
    outs += [model(x[:, t : t + 1], cache=cache) for t in range(PREFILL, T)]
    greedy = generate_step(model, x[:1, :PREFILL], model.make_cache(), Sampling(vocab_size=model.args.vocab_size),
                           GENERATE)
    recurrent = sum(RecurrentState(c).conv.nbytes + RecurrentState(c).h.nbytes
                    for layer, c in zip(model.layers, cache) if layer.temporal_block_type == "recurrent")
    ring = sum(AttentionState(c).keys.nbytes + AttentionState(c).values.nbytes
               for layer, c in zip(model.layers, cache) if layer.temporal_block_type == "attention")
    return {
        "full": np.array(model(x)), "chunked": np.array(mx.concatenate(outs, axis=1)),
        "greedy": np.array([y.item() for y in greedy]), "state": np.array([recurrent, ring]),
        "shapes": {path: p.shape for path, p in tree_flatten(model.parameters())},
    }


NAMES = [*CONFIGS, *(f"{c}-q4" for c in CONFIGS), "kv2", "memory"]


@pytest.mark.parametrize("name", NAMES)
def test_sharded_logits_and_tokens_equal_the_single_process(name, folders, ranks):
    expected = single(folders[name], tuple(map(tuple, ranks[0]["tokens"])))
    # Float32 logits to 1e-5. In a quantized model the ranks' output layer (the embedding's rows, kept
    # whole per rank) runs on rg_mlx's native products and the reference's on MLX's quantized_matmul:
    # the same float32 sums in another order, so 1e-5 of the logits' scale there.
    tol = 1e-5 * (max(1.0, float(np.abs(expected["full"]).max())) if name.endswith("-q4") else 1.0)
    for r, got in enumerate(ranks):
        assert np.abs(got[f"{name}/full"] - expected["full"]).max() <= tol, f"rank {r}: full pass"
        assert np.abs(got[f"{name}/chunked"] - expected["chunked"]).max() <= tol, f"rank {r}: chunked + decode"
        assert got[f"{name}/greedy"].tolist() == expected["greedy"].tolist(), f"rank {r}: greedy tokens"
        assert got[f"{name}/accelerated"], "the CPU accelerations apply after sharding"
    # Every rank sees the same logits (an all-reduce or a gather made them) and draws the same tokens
    # with no seed given: rank 0's, handed out when loading.
    for key in ("full", "chunked", "greedy", "sampled"):
        if f"{name}/{key}" in ranks[0]:
            assert np.array_equal(ranks[0][f"{name}/{key}"], ranks[1][f"{name}/{key}"]), key
    assert "rra/sampled" in ranks[0]


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_half_the_weights_and_the_recurrent_state(name, folders, ranks):
    full = single(folders[name], tuple(map(tuple, ranks[0]["tokens"])))
    quantized = name.endswith("-q4")
    for r, got in enumerate(ranks):
        shapes = {path.replace("embed_tokens.embedding.", "embed_tokens."): tuple(shape)
                  for path, shape in json.loads(str(got[f"{name}/shapes"])).items()}
        assert shapes.keys() == full["shapes"].keys()
        for path, shape in shapes.items():
            whole = full["shapes"][path]
            if replicated(path, kv_heads=2 if name == "kv2" else 1):
                assert shape == whole, path
            elif "embed_tokens" in path:
                assert shape == ((whole[0] + 1) // 2, *whole[1:]), path  # half the vocabulary (rounded up)
            else:
                halved = [i for i, (a, b) in enumerate(zip(shape, whole)) if a != b]
                assert len(halved) == 1 and shape[halved[0]] * 2 == whole[halved[0]], (path, shape, whole)
        # The accelerations after sharding: rg_mlx's native products take the quantized embedding where
        # they are built, MLX's stream-split products the float32 one.
        native_q = "NativeQuantizedEmbedding" if native.available() else "QuantizedEmbedding"
        assert str(got[f"{name}/embedding"]) == (native_q if quantized else "SplitEmbedding")
        recurrent, ring = got[f"{name}/state"]
        assert recurrent * 2 == full["state"][0], "each rank holds its heads' share of the recurrent state"
        assert ring == full["state"][1] / (2 if name == "kv2" else 1), "the ring of the one key/value head is whole"


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_sends_per_token_what_the_readme_says(name, folders, ranks, monkeypatch):
    # Two all-reduces of one `width` vector per layer, one for the embedding lookup, and the gather of
    # the logits (this rank's half of the vocabulary), for each of the batch's 2 rows, in float32.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # the checkout's benchmarks/ (not installed)
    from benchmarks.bench_sharded import paper

    args = ModelArgs.from_dict(json.loads((folders[name] / "config.json").read_text()))
    expected = 2 * paper(args, ranks=2, dtype_bytes=4)["total"]
    for got in ranks:
        counted, sent = got[f"{name}/decode_bytes"]
        assert counted == expected
        assert expected <= sent <= expected * 1.1  # what the sockets sent: the payload and a few bytes of the ring


@pytest.mark.parametrize("loader", ["rg_mlx", "mlx_lm"])
def test_loading_keeps_only_each_ranks_share(loader, folders, ranks):
    # Each rank reads one whole layer at a time and keeps its share: the peak is its share plus the
    # largest tensor, far below the whole model (13 MB here), through rg_mlx.load and mlx-lm's loader.
    weights = mx.load(str(folders["memory"] / "model.safetensors"))
    whole, largest = sum(w.nbytes for w in weights.values()), max(w.nbytes for w in weights.values())
    for got in ranks:
        shapes = json.loads(str(got["memory/shapes"]))
        share = sum(4 * int(np.prod(s)) for s in shapes.values())
        peak = got["memory/peak" if loader == "rg_mlx" else "memory/mlx_lm_peak"]
        assert share < 0.55 * whole
        assert peak <= share + largest + (64 << 10), (peak, share, largest)


@pytest.mark.parametrize("name", ["rra", "rra-q4"])
def test_mlx_lm_loader_and_shard_give_the_same_logits(name, folders, ranks):
    # mlx-lm's `load_model` (lazy) with our Model class, then `model.shard`, as mlx-lm's `sharded_load` does.
    for got in ranks:
        assert np.abs(got[f"{name}/mlx_lm"] - got[f"{name}/full"]).max() <= 1e-5


def test_mlx_lm_sharded_load_builds_our_sharded_model(tiny_model_dir, ranks):
    expected = single(tiny_model_dir, tuple(map(tuple, ranks[0]["tokens"])))["full"]
    for got in ranks:
        assert np.abs(got["sharded_load"] - expected).max() <= 1e-5
        assert got["sharded_load/accelerated"], "mlx-lm's build accelerates on the CPU, and shard keeps it"


@dataclass
class Group:
    """What `Model.shard` and the CLI's `roles` ask of a group before any communication."""

    size_: int
    rank_: int

    def size(self) -> int:
        return self.size_

    def rank(self) -> int:
        return self.rank_


def test_split_problems_are_one_line_with_the_rank_counts_that_work():
    args = ModelArgs(vocab_size=97, hidden_size=2560, intermediate_size=2 * 7680, num_hidden_layers=3,
                     num_attention_heads=10, block_types=["recurrent", "recurrent", "attention"])
    args.check_split(2)
    with pytest.raises(RGError, match=r"^cannot split the model over 3 ranks: num_attention_heads=10 is not "
                                      r"divisible by 3 \(use 2 or 5 or 10 ranks\)$"):
        args.check_split(3)
    with pytest.raises(RGError, match="over 4 ranks: num_attention_heads=10"):
        Model(args).shard(Group(4, 0))
    q = ModelArgs(vocab_size=97, hidden_size=64, intermediate_size=192, num_hidden_layers=1, num_attention_heads=4,
                  block_types=["recurrent"], quantization={"group_size": 32, "bits": 4})
    with pytest.raises(RGError, match=r"the MLP width / 2 = 48 is not a whole number of quantization groups of 32"):
        q.check_split(2)


def test_commands_that_run_in_one_process_refuse_several(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "world", lambda: Group(2, 1))
    assert main(["convert", "nothing", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert err == ("rg-mlx convert: error (rank 1 of 2): rg-mlx convert runs in one process: "
                   "start it without mlx.launch\n")


def cli_job(tmp_path: Path, commands: list[list[list[str]]], **extra) -> tuple[str, str, str, str]:
    """The worker's `cli` arguments for running `commands[rank]` (command lines) on each rank."""
    (tmp_path / "job.json").write_text(json.dumps({"commands": commands, **extra}))
    return str(WORKER), "cli", str(tmp_path / "job.json"), str(tmp_path)


def statuses(out: Path) -> list[list[int] | None]:
    """Each rank's own exit statuses; None for a rank that was stopped before it could write one."""
    return [json.loads((out / f"status{r}").read_text()) if (out / f"status{r}").is_file() else None for r in range(2)]


def test_generate_and_chat_under_mlx_launch_print_once_what_one_process_prints(tiny_model_dir, tmp_path,
                                                                                monkeypatch, capsys):
    generate = ["generate", "--model", str(tiny_model_dir), "--prompt", "Hello world", "--max-tokens", "12"]
    chat = ["chat", "--model", str(tiny_model_dir), "--max-tokens", "6"]
    lines = "Hello\n/retry\n/undo\nHow are you\n/quit\n"  # rank 0 reads them and hands them to rank 1
    stdout, stderr, _ = launch(*cli_job(tmp_path, [[generate, chat]] * 2), stdin=lines)
    assert statuses(tmp_path) == [[0, 0], [0, 0]], stderr
    # The same commands in this one process: rank 0 printed what it prints, rank 1 nothing.
    assert main(generate) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert main(chat) == 0
    alone = capsys.readouterr().out
    assert stdout == alone and alone.count("\n") > 4, stderr
    assert stderr.count("prompt: ") == 1 and stderr.count("[undone;") == 1 and stderr.count("[6 tokens") == 3, stderr


def test_a_bad_path_on_one_rank_ends_every_rank_naming_it(tiny_model_dir, tmp_path):
    command = ["generate", "--prompt", "Hello", "--max-tokens", "4", "--model"]
    missing = tmp_path / "missing"
    commands = [[[*command, str(tiny_model_dir)]], [[*command, str(missing)]]]  # rank 1's path does not exist
    stdout, stderr, seconds = launch(*cli_job(tmp_path, commands))
    assert f"error (rank 1 of 2): {missing}: no such model folder" in stderr, stderr
    assert statuses(tmp_path)[1] == [1] and statuses(tmp_path)[0] in ([1], None), stderr  # None: stopped by mlx.launch
    assert stdout == ""


def test_a_rank_stuck_before_loading_ends_the_wait(tiny_model_dir, tmp_path):
    argv = ["generate", "--prompt", "Hello", "--max-tokens", "4", "--model", str(tiny_model_dir)]
    stdout, stderr, seconds = launch(*cli_job(tmp_path, [[argv]] * 2, timeout=2, sleep={"1": 600}))
    assert "error (rank 0 of 2): no word from the other ranks 2 s after loading" in stderr, stderr
    assert statuses(tmp_path) == [[1], None]  # rank 1 was stopped by mlx.launch in its sleep
    assert seconds < 60


def test_a_killed_rank_ends_the_run_within_seconds(tiny_model_dir, tmp_path):
    argv = ["generate", "--prompt", "Hello", "--max-tokens", "1000000", "--model", str(tiny_model_dir)]
    proc = start(*cli_job(tmp_path, [[argv]] * 2))
    try:
        # Wait for the first generated text (rank 0 prints it), then kill rank 1 mid-generation.
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.read(1), "rank 0 printed nothing"
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)
        t = time.perf_counter()
        _, stderr = proc.communicate(timeout=30)
        assert time.perf_counter() - t < 10
    finally:
        stop(proc)
    assert "rank 1 exited with code -9" in stderr, stderr  # the launcher names it
    assert statuses(tmp_path)[0] in ([1], None) and statuses(tmp_path)[1] is None  # None: killed
