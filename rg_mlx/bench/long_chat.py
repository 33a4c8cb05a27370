"""Memory and latency over one long chat: 32,000 generated tokens in one `ChatSession`.

    rg-mlx bench --memory        # options: --memory-model, --memory-tokens, --memory-warmup, --memory-plot

Every 1,000 generated tokens it records the process's resident memory (RSS) and the mean and
median time per generated token (the gaps between tokens of a reply; each reply's first
token, which includes its prompt, is left out), and the same for a fresh chat that answers
each question alongside: the machine's speed at that moment, to tell a trend of the
long chat from the drift of a shared machine. It prints the samples and the spread after
warm-up, and plots them to docs/memory.png. The default model is the bundled demo model, whose
attention window (128) fills within the first reply, so every later token runs on a full state.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

QUESTIONS = [
    "How do I install rg_mlx?",
    "How do I convert a checkpoint?",
    "What does the chat command do?",
    "How much memory does a long conversation need?",
    "Can I quantize the model?",
    "How do I start the app?",
    "Tell me more.",
    "Why is the state a fixed size?",
]


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _gaps(replies) -> list[float]:
    """Times between consecutive tokens of one reply (its first token, which includes the prompt, is left out)."""
    stamps = [time.perf_counter() for _ in replies]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _ms(gaps: list[float], stat) -> float | None:
    return 1000 * stat(gaps) if gaps else None


def run_chat(model_path: str, total: int, every: int, seed: int) -> list[dict]:
    """Chat until `total` tokens were generated; one sample per `every` tokens.

    After each reply a fresh chat (reset each time) answers the same question: measured
    alongside, its latency is what the machine gives a chat without history at that moment.
    On a shared machine speed moves by 10-20% within minutes, which would hide or fake a trend
    in the long chat's own latency; the ratio of the two does not move with the machine.
    """
    from .. import ChatSession, load

    model, tokenizer = load(model_path)
    chat = ChatSession(model, tokenizer, max_tokens=1000, temperature=0.8, seed=seed)
    fresh = ChatSession(model, tokenizer, max_tokens=1000, temperature=0.8, seed=seed + 1)
    samples, gaps, fresh_gaps, generated, turn = [], [], [], 0, 0
    start = time.perf_counter()
    while generated < total:
        question = QUESTIONS[turn % len(QUESTIONS)]
        last = None
        for r in chat.send(question):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            generated += 1
            if generated % every == 0:
                samples.append({
                    "tokens": generated,
                    "turns": turn + 1,
                    "seconds": now - start,
                    "rss_bytes": rss_bytes(),
                    "state_bytes": r.state_bytes,
                    "mean_ms": _ms(gaps, statistics.fmean),
                    "median_ms": _ms(gaps, statistics.median),
                    "fresh_mean_ms": _ms(fresh_gaps, statistics.fmean),
                    "tokens_seen": chat.tokens_seen,
                })
                gaps, fresh_gaps = [], []
            if generated >= total:
                break
        turn += 1
        if generated < total:
            fresh.reset()
            fresh_gaps += _gaps(fresh.send(question))
    return samples


def spread(samples: list[dict], warmup: int) -> dict:
    """RSS variation after warm-up, and latency change from the first window after warm-up to the last:
    the long chat's own, and relative to the fresh chat measured alongside."""
    after = [s for s in samples if s["tokens"] > warmup]
    rss = [s["rss_bytes"] for s in after]
    first, last = after[0], after[-1]
    out = {
        "rss_min": min(rss),
        "rss_max": max(rss),
        "rss_spread": (max(rss) - min(rss)) / min(rss),
        "state_bytes": sorted({s["state_bytes"] for s in samples}),
    }
    for key in ("mean_ms", "median_ms", "fresh_mean_ms"):
        if first[key] and last[key]:
            out[key] = (first[key], last[key], last[key] / first[key] - 1)
    if "fresh_mean_ms" in out:
        a, b = (s["mean_ms"] / s["fresh_mean_ms"] for s in (first, last))
        out["relative"] = (a, b, b / a - 1)
    return out


def plot(samples: list[dict], path: Path, title: str) -> None:
    """RSS and per-token latency against generated tokens (PNG; needs matplotlib, in the `dev` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = [s["tokens"] / 1000 for s in samples]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    rss = [s["rss_bytes"] / 2**20 for s in samples]
    a.plot(k, rss, marker="o", markersize=3)
    a.set_ylabel("resident memory (MiB)")
    a.set_ylim(0, 1.2 * max(rss))
    a.set_title(title)
    a.grid(alpha=0.3)
    b.plot(k, [s["mean_ms"] for s in samples], marker="o", markersize=3, label="mean")
    b.plot(k, [s["median_ms"] for s in samples], marker=".", markersize=3, label="median")
    fresh = [s["fresh_mean_ms"] or float("nan") for s in samples]
    b.plot(k, fresh, linestyle="--", label="a fresh chat, alongside (mean)")
    b.set_ylabel("ms per generated token")
    b.set_xlabel("generated tokens (thousands), one chat")
    b.set_ylim(0, 1.2 * max(s["mean_ms"] for s in samples))
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run the long chat with `args.memory_*` options; print the samples and the spread."""
    from .. import _blas

    samples = run_chat(args.memory_model, args.memory_tokens, 1000, seed=0)
    s = spread(samples, args.memory_warmup)
    print(f"# one chat, {samples[-1]['tokens']} generated tokens in {samples[-1]['turns']} replies "
          f"(model {args.memory_model}, BLAS {_blas.active()})\n")
    print("| tokens | replies | RSS MiB | state KiB | mean ms/token | median ms/token | fresh chat mean ms/token |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for x in samples:
        fresh = "-" if x["fresh_mean_ms"] is None else f"{x['fresh_mean_ms']:.2f}"
        print(f"| {x['tokens']} | {x['turns']} | {x['rss_bytes'] / 2**20:.1f} | {x['state_bytes'] / 1024:.1f} | "
              f"{x['mean_ms']:.2f} | {x['median_ms']:.2f} | {fresh} |")
    print(f"\nRSS after the first {args.memory_warmup} tokens: {s['rss_min'] / 2**20:.1f} to "
          f"{s['rss_max'] / 2**20:.1f} MiB (spread {100 * s['rss_spread']:.2f}%)")
    print("Per-token latency, first 1,000 tokens after warm-up -> the last 1,000:")
    kinds = [("mean_ms", "mean"), ("median_ms", "median"), ("fresh_mean_ms", "a fresh chat's mean, alongside")]
    for key, what in kinds:
        if key in s:
            a, b, change = s[key]
            print(f"- {what}: {a:.2f} -> {b:.2f} ms ({100 * change:+.1f}%)")
    if "relative" in s:
        a, b, change = s["relative"]
        print(f"- the long chat's mean over the fresh chat's: {a:.3f} -> {b:.3f} ({100 * change:+.1f}%)")
    print(f"State bytes: {', '.join(str(b) for b in s['state_bytes'])}")
    if importlib.util.find_spec("matplotlib") is None:
        print("note: matplotlib not installed: no plot (pip install -e '.[dev]' in the rg-mlx clone)", file=sys.stderr)
    else:
        plot(samples, args.memory_plot, f"rg_mlx, one chat of {samples[-1]['tokens']} generated tokens")
        print(f"Plot: {args.memory_plot}")
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "spread": s}, indent=2))
    return 0
