"""Evaluate the demo model: `python -m rg_mlx.demo.eval [--model DIR] [--sample N]`.

Greedy answers to every training question and every held-out paraphrase (and, as a check
of multi-turn chat, each held-out paraphrase asked as the second turn after a training
exchange). Reports the share of answers that contain the expected command or fact, and
the share that end at `<end_of_turn>` rather than running on to the token limit.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rg_mlx.generate import Sampling, generate_step, left_padded
from rg_mlx.tokenizer import Tokenizer

from . import corpus as corpus_lib

# Tokens beyond the longest reference answer before a reply counts as runaway.
MARGIN_TOKENS = 24


@dataclass
class Result:
    """The scores of one set of questions, and its failures."""

    name: str
    total: int = 0
    correct: int = 0
    ended: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, reply)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def ended_rate(self) -> float:
        return self.ended / max(self.total, 1)

    def line(self) -> str:
        return (
            f"| {self.name} | {self.total} | {100 * self.accuracy:.1f}% ({self.correct}) "
            f"| {100 * self.ended_rate:.1f}% ({self.ended}) |"
        )


def replies(
    model, tokenizer: Tokenizer, conversations: list[list[dict[str, str]]], max_tokens: int, batch_size: int = 64
) -> list[tuple[str, bool]]:
    """Greedy replies to the last user message of each conversation, and whether each ended at
    `<end_of_turn>` (or `<eos>`). Runs left-padded batches; greedy rows equal single runs."""
    sampling = Sampling(vocab_size=model.args.vocab_size, temperature=0.0)
    out = []
    for start in range(0, len(conversations), batch_size):
        rows = [tokenizer.chat_tokens(m) for m in conversations[start : start + batch_size]]
        tokens, cache = left_padded(model, rows, tokenizer.pad_id or 0)
        generated: list[list[int]] = [[] for _ in rows]
        ended = [False] * len(rows)
        for y in generate_step(model, tokens, cache, sampling, max_tokens):
            for i, token in enumerate(y.tolist()):
                if not ended[i]:
                    ended[i] = token in tokenizer.stop_ids
                    if not ended[i]:
                        generated[i].append(token)
            if all(ended):
                break
        out += [(tokenizer.decode(g), e) for g, e in zip(generated, ended)]
    return out


def score(model, tokenizer: Tokenizer, name: str, items: list[tuple[list[dict[str, str]], str]], max_tokens: int) -> Result:
    """Score conversations `(messages, expected)`: the reply to the last user message must contain `expected`."""
    result = Result(name)
    for (messages, expected), (text, ended) in zip(items, replies(model, tokenizer, [m for m, _ in items], max_tokens)):
        result.total += 1
        result.correct += expected in text
        result.ended += ended
        if expected not in text or not ended:
            result.failures.append((messages[-1]["content"], expected, text))
    return result


def max_reply_tokens(tokenizer: Tokenizer, corpus: corpus_lib.Corpus) -> int:
    """The token limit for a reply: the longest answer plus a margin."""
    return max(len(tokenizer.encode(t.answer, add_bos=False)) for t in corpus.topics) + MARGIN_TOKENS


def question_sets(corpus: corpus_lib.Corpus, sample: int | None = None, seed: int = 0) -> dict[str, list]:
    """The evaluation sets: training questions, held-out paraphrases, held-out as a second turn."""
    rng = random.Random(seed)
    train = corpus.train if sample is None else rng.sample(corpus.train, min(sample, len(corpus.train)))
    held = corpus.held_out if sample is None else rng.sample(corpus.held_out, min(sample, len(corpus.held_out)))
    single = lambda e: ([{"role": "user", "content": e.question}], e.expected)  # noqa: E731

    def second(e: corpus_lib.Example) -> tuple[list[dict[str, str]], str]:
        first = rng.choice(corpus.train)
        messages = [
            {"role": "user", "content": first.question},
            {"role": "assistant", "content": first.answer},
            {"role": "user", "content": e.question},
        ]
        return messages, e.expected

    return {
        "training questions": [single(e) for e in train],
        "held-out paraphrases": [single(e) for e in held],
        "held-out, as a second turn": [second(e) for e in held],
    }


def evaluate(folder: str | Path | None = None, sample: int | None = None, seed: int = 0) -> list[Result]:
    """Evaluate the model in `folder` (default: the bundled demo) on the corpus questions."""
    import rg_mlx

    model, tokenizer = rg_mlx.load(folder or "demo")
    corpus = corpus_lib.build()
    max_tokens = max_reply_tokens(tokenizer, corpus)
    return [score(model, tokenizer, name, items, max_tokens) for name, items in question_sets(corpus, sample, seed).items()]


def report(results: list[Result]) -> str:
    """A Markdown table of the results."""
    lines = ["| questions | n | contain the expected answer | end at <end_of_turn> |", "|---|---|---|---|"]
    return "\n".join(lines + [r.line() for r in results])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rg_mlx.demo.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the bundled demo model)")
    parser.add_argument("--sample", type=int, help="evaluate N random questions of each set instead of all")
    parser.add_argument("--failures", action="store_true", help="list the questions answered wrongly")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = evaluate(args.model, args.sample)
    print(report(results))
    print(f"\n({time.perf_counter() - start:.0f}s)")
    if args.failures:
        for r in results:
            for question, expected, text in r.failures:
                print(f"[{r.name}] {question!r}\n    expected {expected!r}\n    got      {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
