"""`rg-mlx serve` against stock `mlx_lm.server`, as a client sees them (real HTTP, streaming), in one run.

    python benchmarks/bench_serve.py [--work-dir DIR] [--rounds 3] [--json FILE] [--wait-load 1.5 [--wait-minutes 30]]

Servers, each its own process on 127.0.0.1, all up together so that every measurement takes turns
(interleaved rounds, medians):

- ``rg-mlx serve``: mlx-lm's server on rg_mlx's model, with the Linux fast path;
- ``mlx_lm.server`` as installed: mlx-lm's own RecurrentGemma, MLX's reference BLAS (its prompt rate is
  taken from a short prompt, as `rg-mlx bench` does for peers too slow to run in full: "~");
- ``mlx_lm.server`` with the same BLAS: the same, after importing rg_mlx (its fast path) without
  registering rg_mlx's model;
- ``mlx_lm.server`` serving a transformer: mlx-lm's own ``gemma`` with the same widths and depth
  (random weights, same BLAS), as the RecurrentGemma paper compares.

The checkpoint: random weights (DeepMind's initialisation), the 2B widths (2560, MLP 7680, 10 heads,
window 2048) with one R R A group of layers, and the bundled demo's tokenizer (2,048 pieces, with its chat
template), so that replies are text the servers can detokenize. Measured:

1. prompt processing: a fresh prompt of 2k and 8k tokens, tokens over the time to its first token;
2. a conversation grown to 0.5k, 2k, 8k and 32k tokens (each level adds one long user message; the
   model's replies are cut to its end-of-turn token, so every server can continue from its cached
   state): at each level the time to first token of a follow-up, a regenerate (the same follow-up
   again) and an edit (another last message), the decode time per token of the follow-up's reply,
   and the server's resident memory;
3. 1, 4 and 8 concurrent streaming clients: aggregate and per-client generated tokens per second;
4. exactness: the greatest logit error of the model each server builds against DeepMind's reference
   on the same weights (a small configuration, in this process), and whether 8 concurrent greedy
   requests of different lengths get the tokens (and log-probabilities) they get one at a time, on the
   bundled demo model (trained weights: on the random checkpoint, mlx-lm's batching errors change
   nothing a reply shows).

Prints markdown tables (and the targets met or not, with the arithmetic) and writes them as JSON.
Needs the `dev` extra (DeepMind's reference, torch) for the logit errors.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (512, 2048, 8192, 32768)
PROMPTS = (2048, 8192)
CLIENTS = (1, 4, 8)
# The short prompt that times MLX as installed (its prompt rate stands for the long ones).
PROBE = 64
TRANSFORMER = "mlx_lm.server, transformer (gemma)"
WIDTHS = dict(hidden_size=2560, mlp=7680, heads=10, head_dim=256, layers=3, window=2048)


# -- Checkpoints ------------------------------------------------------------------------------------


def write_checkpoints(work: Path) -> tuple[Path, Path]:
    """The Griffin checkpoint and the transformer of the same widths and depth, written once under `work`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from rg_mlx import ModelArgs, Tokenizer
    from rg_mlx.bench import checkpoint
    from rg_mlx.demo import model_path
    from rg_mlx.model import initial_weight

    tokenizer_model = model_path() / "tokenizer.model"
    tokenizer = Tokenizer(tokenizer_model)
    vocab = tokenizer.vocab_size
    w = WIDTHS
    griffin, gemma = work / "griffin", work / "gemma"
    args = ModelArgs(
        vocab_size=vocab, hidden_size=w["hidden_size"], intermediate_size=2 * w["mlp"],
        num_hidden_layers=w["layers"], num_attention_heads=w["heads"],
        block_types=["recurrent", "recurrent", "attention"], attention_window_size=w["window"], logits_soft_cap=30.0,
    )
    checkpoint.CONFIGS.setdefault("serve-bench", args)
    checkpoint.write_checkpoint("serve-bench", griffin)
    if not (gemma / "model.safetensors").is_file():
        from mlx_lm.models import gemma as mlx_lm_gemma

        config = dict(
            model_type="gemma", hidden_size=w["hidden_size"], num_hidden_layers=w["layers"],
            intermediate_size=w["mlp"], num_attention_heads=w["heads"], head_dim=w["head_dim"], rms_norm_eps=1e-6,
            vocab_size=vocab, num_key_value_heads=1, rope_theta=10000.0,
        )
        model = mlx_lm_gemma.Model(mlx_lm_gemma.ModelArgs.from_dict(config))
        mx.random.seed(1)
        weights = {n: initial_weight(n, p.shape, w["layers"]) for n, p in tree_flatten(model.parameters())}
        tmp = gemma.with_name("gemma.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(gemma)
    for folder in (griffin, gemma):  # the demo's tokenizer, its chat template, and the ids a reply stops at
        shutil.copy(tokenizer_model, folder / "tokenizer.model")
        for name, content in tokenizer.hf_files(chat=True).items():
            (folder / name).write_text(json.dumps(content, indent=2))
        config = json.loads((folder / "config.json").read_text())
        config.update(eos_token_id=list(tokenizer.eos_ids), bos_token_id=tokenizer.bos_id)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return griffin, gemma


# -- Servers ----------------------------------------------------------------------------------------

# How mlx_lm.server runs with rg_mlx's fast path but mlx-lm's own model: rg_mlx (and with it its BLAS and
# malloc settings) is imported first, and its model is not registered.
SAME_BLAS = "import rg_mlx, sys; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on 127.0.0.1 and the HTTP calls the bench makes to it."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path):
        self.name, self.port = name, free_port()
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, cwd=tempfile.gettempdir(),  # never the checkout: no rg_mlx by accident
        )
        self.logfile = log

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} ended (exit {self.proc.returncode}): see {self.logfile}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    self.complete("Hello", max_tokens=2)  # loads the model (mlx-lm loads on its first pass)
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} did not start within {timeout:.0f} s: see {self.logfile}")

    def stream(self, path: str, body: dict, on_event: Callable[[], None] | None = None) -> dict:
        """One streaming request; returns the time to the first event, the event times, the usage and
        the text. `on_event` is called at every event (the concurrency runs use it for nothing)."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=24 * 3600)
        t0 = time.perf_counter()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{self.name}: {response.status} {response.read()[:300]!r}")
        times, usage, text, ids = [], None, [], []
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices"):
                times.append(time.perf_counter() - t0)
                choice = chunk["choices"][0]
                text.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
        conn.close()
        return {"ttft": times[0], "times": times, "usage": usage, "text": "".join(text)}

    def complete(self, prompt: str, **body: Any) -> dict:
        """A non-streaming /v1/completions request; the parsed response."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=24 * 3600)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, **body}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read())
        conn.close()
        if response.status != 200:
            raise RuntimeError(f"{self.name}: {response.status} {data}")
        return data

    def rss(self) -> tuple[int, int]:
        """(resident, peak resident) bytes of the server process."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- What the clients send ----------------------------------------------------------------------------


class Texts:
    """Random text from the tokenizer's word pieces (about one token a word), never the same twice."""

    def __init__(self, seed: int = 0):
        from rg_mlx import Tokenizer
        from rg_mlx.demo import model_path

        sp = Tokenizer(model_path() / "tokenizer.model").sp
        self.words = [sp.id_to_piece(i)[1:] for i in range(sp.get_piece_size())
                      if sp.id_to_piece(i).startswith("\u2581") and sp.id_to_piece(i)[1:].isalpha()]
        self.rng = random.Random(seed)

    def __call__(self, tokens: int) -> str:
        return " ".join(self.rng.choice(self.words) for _ in range(tokens))


def never_stop(tokenizer_folder: Path) -> dict[str, float]:
    """A `logit_bias` that keeps <eos> and <end_of_turn> away (a reply runs to its max_tokens)."""
    eos = json.loads((tokenizer_folder / "config.json").read_text())["eos_token_id"]
    return {str(i): -100.0 for i in eos}


def end_turn_now(tokenizer_folder: Path) -> dict[str, float]:
    """A `logit_bias` that makes <end_of_turn> the reply: an empty turn the next request continues from."""
    return {str(json.loads((tokenizer_folder / "config.json").read_text())["eos_token_id"][-1]): 100.0}


# -- Measurements -----------------------------------------------------------------------------------


def interleaved(servers: list[Server], rounds: int, measure: Callable[[Server, int], Any]) -> dict[str, list]:
    """`measure(server, round)` for every server in every round, the order rotating each round."""
    results: dict[str, list] = {s.name: [] for s in servers}
    for r in range(rounds):
        for s in servers[r % len(servers):] + servers[: r % len(servers)]:
            results[s.name].append(measure(s, r))
    return results


def prompt_rates(servers: list[Server], slow: list[Server], texts: Texts, rounds: int) -> dict:
    """Tokens per second of fresh prompts (tokens / time to first token), medians over the rounds; for the
    `slow` servers the rate of a `PROBE`-token prompt stands for every length."""
    out: dict[str, dict] = {}

    def measure(s: Server, r: int) -> dict:
        rates = {}
        for n in ([PROBE] if s in slow else PROMPTS):
            res = s.stream("/v1/completions", {"prompt": texts(n), "max_tokens": 1, "temperature": 0})
            rates[n] = res["usage"]["prompt_tokens"] / res["ttft"]
        return rates

    for name, per_round in interleaved(servers + slow, rounds, measure).items():
        lengths = per_round[0].keys()
        out[name] = {str(n): statistics.median(r[n] for r in per_round) for n in lengths}
    return out


def conversation(servers: list[Server], texts: Texts, folders: dict[str, Path], reps: int, levels) -> dict:
    """Each server's conversation grown level by level (all servers at one level before the next): the
    time to first token of a follow-up, a regenerate and an edit, decode time per token, memory."""
    chats = {s.name: [] for s in servers}
    sizes = {s.name: 0 for s in servers}
    out: dict[str, dict] = {s.name: {} for s in servers}
    for level in levels:
        for s in servers:
            folder = folders[s.name]
            messages = chats[s.name]
            user = {"role": "user", "content": texts(max(16, level - sizes[s.name]))}
            grow = s.stream("/v1/chat/completions", {
                "messages": [*messages, user], "max_tokens": 1, "temperature": 0, "logit_bias": end_turn_now(folder),
            })
            messages += [user, {"role": "assistant", "content": grow["text"]}]
            sizes[s.name] = grow["usage"]["prompt_tokens"] + grow["usage"]["completion_tokens"]
            kinds: dict[str, list] = {"follow-up": [], "regenerate": [], "edit": []}
            decode, cached = [], []
            for _ in range(reps):
                question = [{"role": "user", "content": texts(24)}]
                body = {"max_tokens": 32, "temperature": 0, "logit_bias": never_stop(folder)}
                follow = s.stream("/v1/chat/completions", {"messages": messages + question, **body})
                again = s.stream("/v1/chat/completions", {"messages": messages + question, **body})
                edit = s.stream("/v1/chat/completions",
                                {"messages": messages + [{"role": "user", "content": texts(24)}], **body})
                for kind, res in zip(kinds, (follow, again, edit)):
                    kinds[kind].append(res["ttft"])
                    usage = res["usage"]
                    cached.append(usage["prompt_tokens_details"]["cached_tokens"] / usage["prompt_tokens"])
                n = follow["usage"]["completion_tokens"]
                decode.append((follow["times"][-1] - follow["times"][0]) / max(1, n - 1))
            rss, peak = s.rss()
            out[s.name][str(level)] = {
                "history_tokens": sizes[s.name], "grow_ttft_s": grow["ttft"],
                **{f"ttft_{k}_s": statistics.median(v) for k, v in kinds.items()},
                "cached_fraction_min": min(cached), "decode_ms_per_token": 1000 * statistics.median(decode),
                "rss_bytes": rss, "peak_rss_bytes": peak,
            }
    return out


def concurrent_clients(
    servers: list[Server], texts: Texts, folders: dict[str, Path], rounds: int, tokens: int
) -> dict:
    """Aggregate and per-client generated tokens per second with 1, 4 and 8 streaming clients at once."""

    def measure(s: Server, r: int) -> dict:
        result = {}
        for n in CLIENTS:
            replies: list[dict] = [{}] * n
            start = threading.Barrier(n)

            def client(i: int) -> None:
                start.wait()
                t0 = time.perf_counter()
                res = s.stream("/v1/completions", {"prompt": texts(16 + 8 * i), "max_tokens": tokens,
                                                   "temperature": 0, "logit_bias": never_stop(folders[s.name])})
                res["start"] = t0
                replies[i] = res

            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            first = min(x["start"] + x["times"][0] for x in replies)
            last = max(x["start"] + x["times"][-1] for x in replies)
            total = sum(x["usage"]["completion_tokens"] for x in replies)
            per_client = [(x["usage"]["completion_tokens"] - 1) / (x["times"][-1] - x["times"][0]) for x in replies]
            result[n] = {"aggregate": total / (last - first), "per_client": statistics.median(per_client)}
        return result

    out = {}
    for name, per_round in interleaved(servers, rounds, measure).items():
        out[name] = {str(n): {k: statistics.median(r[n][k] for r in per_round) for k in ("aggregate", "per_client")}
                     for n in CLIENTS}
    return out


def batched_equals_sequential(s: Server, texts: Texts, folder: Path) -> dict:
    """8 greedy requests of different lengths at once against the same one at a time: the rows whose
    tokens differ, and the greatest difference of the log-probabilities of the tokens where they agree
    (random weights rarely let an error flip a greedy token).

    The 8 are sent while the server processes a long prompt, so that they wait together and their
    prompts are processed as one batch (right-padded), as on a busy server; before them, other requests
    push the sequential runs' states out of the server's prompt cache (mlx-lm keeps 10 by default), so
    that the batch starts from nothing (its `cached_tokens` are reported)."""
    prompts = [texts(3 + 9 * i) for i in range(8)]
    cached = []

    def ids(prompt: str) -> list[tuple[int, float]]:
        reply = s.complete(prompt, max_tokens=32, temperature=0, logprobs=True, logit_bias=never_stop(folder))
        cached.append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
        return [(e["id"], e["logprob"]) for e in reply["choices"][0]["logprobs"]["content"]]

    sequential = [ids(p) for p in prompts]
    for _ in range(24):
        s.complete(texts(4), max_tokens=1)
    cached.clear()
    concurrent: list = [None] * 8
    start = threading.Barrier(8)

    def client(i: int) -> None:
        start.wait()
        concurrent[i] = ids(prompts[i])

    busy = threading.Thread(target=s.complete, args=(texts(1500),), kwargs={"max_tokens": 1})
    busy.start()
    time.sleep(0.5)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in [*threads, busy]:
        if t is not busy:
            t.start()
    for t in [*threads, busy]:
        t.join()
    differing = sum([t for t, _ in a] != [t for t, _ in b] for a, b in zip(sequential, concurrent))
    agreeing = [abs(x[1] - y[1]) for a, b in zip(sequential, concurrent) for x, y in zip(a, b) if x[0] == y[0]]
    return {"rows_differing": differing, "rows": 8, "max_logprob_difference": max(agreeing),
            "cached_tokens": max(cached)}


def batching_on_the_demo(work: Path, texts: Texts) -> dict[str, dict]:
    """`batched_equals_sequential` for rg-mlx serve and mlx_lm.server (same BLAS) on the demo model."""
    from rg_mlx.demo import model_path

    demo, out = model_path(), {}
    for name, argv in (("rg-mlx serve", [sys.executable, "-m", "rg_mlx", "serve"]),
                       ("mlx_lm.server (same BLAS)", [sys.executable, "-c", SAME_BLAS])):
        s = Server(name, [*argv, "--model", str(demo)], {}, work / f"demo-{'ours' if 'rg' in name else 'stock'}.log")
        try:
            s.wait_ready()
            out[name] = batched_equals_sequential(s, texts, demo)
        finally:
            s.stop()
    return out


def logit_errors(work: Path) -> dict[str, float]:
    """Greatest |logit - DeepMind's| of the model each server builds, on one small random configuration
    (T = 40 past a window of 8), float32: mlx-lm's own RecurrentGemma and rg_mlx's (as registered)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from reference import dm_to_hf, reference_logits, reference_model, save_hf_folder

    import mlx.core as mx
    from mlx_lm.utils import load_model

    from rg_mlx import integration
    from rg_mlx.loading import read_config

    ref, config = reference_model(window=8, seed=3)
    folder = save_hf_folder(work / "exactness", config, dm_to_hf(ref.state_dict(), config))
    # rg_mlx's normalised spelling of config.json (what `rg-mlx convert` writes), which mlx-lm's own model reads too.
    (folder / "config.json").write_text(json.dumps(read_config(folder).to_dict()))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 40))
    expected = reference_logits(ref, tokens)
    errors = {}
    stock, _ = load_model(folder)  # before registering: mlx-lm's own model
    errors["mlx_lm.server"] = float(np.abs(np.array(stock(mx.array(tokens)).astype(mx.float32)) - expected).max())
    integration.register_with_mlx_lm()
    ours, _ = load_model(folder)
    assert type(ours) is integration.Model
    errors["rg-mlx serve"] = float(np.abs(np.array(ours(mx.array(tokens))) - expected).max())
    return errors


# -- Report -----------------------------------------------------------------------------------------


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(limit: float, patience_s: float) -> None:
    deadline = time.monotonic() + patience_s
    while load_average() > limit and time.monotonic() < deadline:
        print(f"load {load_average():.2f} > {limit}: waiting", file=sys.stderr, flush=True)
        time.sleep(60)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def report(r: dict) -> str:
    ours, stock, same = "rg-mlx serve", "mlx_lm.server (as installed)", "mlx_lm.server (same BLAS)"
    lines = [f"Machine: {r['machine']}; load average {r['load_start']:.2f} at the start, {r['load_end']:.2f} at the "
             f"end; {r['minutes']:.1f} minutes; BLAS: {r['blas']}.", ""]
    p = r["prompt"]
    lines += ["| server | prompt 2k tok/s | prompt 8k tok/s |", "| --- | --- | --- |"]
    for name in (ours, stock, same):
        if name in p:
            row = p[name]
            cells = [f"~{fmt(row[str(PROBE)])}"] * 2 if str(PROBE) in row else [fmt(row[str(n)]) for n in PROMPTS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Time to first token of a new turn (s), by tokens of conversation before it:", ""]
    c = r["conversation"]
    levels = list(next(iter(c.values())))
    lines += ["| server | turn | " + " | ".join(f"{int(lv) / 1024:g}k" for lv in levels) + " |",
              "| --- | --- | " + " | ".join("---" for _ in levels) + " |"]
    for name, by_level in c.items():
        for kind in ("follow-up", "regenerate", "edit"):
            cells = [fmt(by_level[lv][f"ttft_{kind}_s"]) for lv in levels]
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", "| server | " + " | ".join(f"ms/token at {int(lv) / 1024:g}k" for lv in levels)
              + " | " + " | ".join(f"RSS GB at {int(lv) / 1024:g}k" for lv in levels) + " |",
              "| --- | " + " | ".join("---" for _ in levels * 2) + " |"]
    for name, by_level in c.items():
        lines.append(f"| {name} | " + " | ".join(fmt(by_level[lv]["decode_ms_per_token"]) for lv in levels) + " | "
                     + " | ".join(fmt(by_level[lv]["rss_bytes"] / 1e9) for lv in levels) + " |")
    k = r["clients"]
    lines += ["", "| server | " + " | ".join(f"{n} client{'s' * (n > 1)}: total / each tok/s" for n in CLIENTS) + " |",
              "| --- | " + " | ".join("---" for _ in CLIENTS) + " |"]
    for name, by_n in k.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{fmt(by_n[str(n)]['aggregate'])} / {fmt(by_n[str(n)]['per_client'])}" for n in CLIENTS) + " |")
    e, b = r["logit_error"], r["batched"]
    lines += ["", "| server | max logit error vs DeepMind | 8 concurrent = sequential: rows with the same tokens | "
              "max logprob difference |", "| --- | --- | --- | --- |"]
    for name, key in ((ours, "rg-mlx serve"), (same, "mlx_lm.server")):
        rows = b.get(name)
        same_rows = "—" if rows is None else f"{rows['rows'] - rows['rows_differing']} of {rows['rows']}"
        diff = "—" if rows is None else f"{rows['max_logprob_difference']:.2g}"
        lines.append(f"| {name} | {e.get(key, float('nan')):.2g} | {same_rows} | {diff} |")
    lines += ["", "Targets:"] + [f"- {t}" for t in r["targets"]]
    return "\n".join(lines)


def targets(r: dict) -> list[str]:
    ours, stock, same = "rg-mlx serve", "mlx_lm.server (as installed)", "mlx_lm.server (same BLAS)"
    p, c, k, e = r["prompt"], r["conversation"][ours], r["clients"][ours], r["logit_error"]
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"{'met' if ok else 'NOT met'}: {text}")

    if stock in p:
        x = p[ours]["2048"] / p[stock][str(PROBE)]
        check(x >= 20, f"prompt 2k {x:.1f}x mlx_lm.server as installed (>= 20x)")
    if same in p:
        x = p[ours]["2048"] / p[same]["2048"]
        check(x >= 1.1, f"prompt 2k {x:.2f}x mlx_lm.server with the same BLAS (>= 1.1x)")
    first, last = list(c)[0], list(c)[-1]
    for kind in ("follow-up", "regenerate", "edit"):
        x = c[last][f"ttft_{kind}_s"] / c[first][f"ttft_{kind}_s"]
        check(x <= 1.3, f"TTFT of a {kind} after {c[last]['history_tokens']} tokens / after "
                        f"{c[first]['history_tokens']}: {x:.2f} (<= 1.3)")
    x = k[str(CLIENTS[-1])]["aggregate"] / k["1"]["aggregate"]
    check(x >= 3, f"aggregate tok/s with {CLIENTS[-1]} clients / 1 client: {x:.2f} (>= 3)")
    if "rg-mlx serve" in e:
        check(e["rg-mlx serve"] <= 1e-4, f"logit error {e['rg-mlx serve']:.2g} (<= 1e-4; mlx-lm's own: "
                                         f"{e.get('mlx_lm.server', float('nan')):.2g})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "rg_mlx" / "bench_serve"))
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each measurement (default 3)")
    p.add_argument("--reps", type=int, default=2, help="new turns timed at each conversation level (default 2)")
    p.add_argument("--decode-tokens", type=int, default=48, help="tokens each concurrent client asks for")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="conversation lengths (tokens)")
    p.add_argument("--skip", default="", help="comma-separated: installed, transformer, exactness")
    p.add_argument("--wait-load", type=float, default=0.0,
                   help="first wait for the 1-minute load average to fall below this (the machine is shared)")
    p.add_argument("--wait-minutes", type=float, default=30.0, help="how long --wait-load waits at most")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    levels = [int(x) for x in args.levels.split(",")]

    import rg_mlx  # noqa: F401  (this process times nothing itself; its fast path serves the exactness check)
    from rg_mlx import _blas

    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    griffin, gemma = write_checkpoints(work)
    if args.wait_load:
        wait_for_quiet(args.wait_load, 60 * args.wait_minutes)
    t0, load_start = time.monotonic(), load_average()
    from rg_mlx.bench.speed import machine

    r: dict[str, Any] = {"machine": machine(), "load_start": load_start, "blas": _blas.active()}
    r["logit_error"] = {} if "exactness" in skip else logit_errors(work)

    py = sys.executable
    specs = [("rg-mlx serve", [py, "-m", "rg_mlx", "serve", "--model", str(griffin)], {}, griffin),
             ("mlx_lm.server (same BLAS)", [py, "-c", SAME_BLAS, "--model", str(griffin)], {}, griffin)]
    if "installed" not in skip:
        specs.append(("mlx_lm.server (as installed)", [py, "-m", "mlx_lm", "server", "--model", str(griffin)],
                      {"RG_MLX_BLAS": "off"}, griffin))
    if "transformer" not in skip:
        specs.append((TRANSFORMER, [py, "-c", SAME_BLAS, "--model", str(gemma)], {}, gemma))
    servers = [Server(name, argv_, env, work / f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.log")
               for name, argv_, env, _ in specs]
    folders = {name: folder for name, _, _, folder in specs}
    texts = Texts()
    r["batched"] = {} if "exactness" in skip else batching_on_the_demo(work, texts)
    try:
        for s in servers:
            s.wait_ready()
        by = {s.name: s for s in servers}
        main_two = [by["rg-mlx serve"], by["mlx_lm.server (same BLAS)"]]
        slow = [by[n] for n in by if n == "mlx_lm.server (as installed)"]
        r["prompt"] = prompt_rates(main_two, slow, texts, args.rounds)
        r["clients"] = concurrent_clients(main_two, texts, folders, args.rounds, args.decode_tokens)
        talkers = main_two + [by[n] for n in by if n == TRANSFORMER]
        r["conversation"] = conversation(talkers, texts, folders, args.reps, levels)
    finally:
        for s in servers:
            s.stop()
    r["load_end"], r["minutes"] = load_average(), (time.monotonic() - t0) / 60
    r["targets"] = targets(r)
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
