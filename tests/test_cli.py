"""`rg-mlx generate` and `rg-mlx chat`: smoke tests through a real subprocess, errors in-process."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from rg_mlx import ChatSession, generate, load
from rg_mlx.cli import main

ROOT = Path(__file__).resolve().parents[1]


def rg_mlx(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rg_mlx", *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_model_dir)


def test_generate_streams_text_and_prints_stats(tiny_model_dir, loaded):
    out = rg_mlx("generate", "--model", str(tiny_model_dir), "--prompt", "Hello world", "--max-tokens", "12")
    assert out.returncode == 0, out.stderr
    model, tokenizer = loaded
    assert out.stdout == generate(model, tokenizer, "Hello world", max_tokens=12) + "\n"
    stats = out.stderr.strip().splitlines()[-1]
    prompt_tokens = len(tokenizer.encode("Hello world"))
    for part in (f"prompt: {prompt_tokens} tokens", "tok/s", "generation: ", "peak memory: ", "GB", "state: ", "KiB"):
        assert part in stats


def test_generate_chat_prompt_from_stdin(tiny_model_dir, loaded, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is Griffin?"))
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "-", "--chat", "--system", "Be brief.", "-m", "8"]
    assert main(argv + ["--temp", "0.7", "--top-p", "0.9", "--seed", "3"]) == 0
    model, tokenizer = loaded
    ids = tokenizer.chat_tokens([{"role": "user", "content": "What is Griffin?"}], system="Be brief.")
    expected = generate(model, tokenizer, ids, max_tokens=8, temperature=0.7, top_p=0.9, seed=3)
    out = capsys.readouterr()
    assert out.out == expected + "\n"
    assert f"prompt: {len(ids)} tokens" in out.err


def test_chat_session_through_stdin(tiny_model_dir, loaded, tmp_path):
    saved = tmp_path / "talk.safetensors"
    script = "\n".join(
        [
            "/help",
            "Hello!",
            "/retry",
            "How are you?",
            "/undo",
            "/stats",
            f"/save {saved}",
            "/reset",
            f"/load {saved}",
            "/history",
            "/set temperature 0.5",
            "/set nonsense 1",
            "/bogus",
            "/quit",
            "never read",
        ]
    )
    out = rg_mlx("chat", "--model", str(tiny_model_dir), "--system", "Be brief.", "-m", "10", stdin=script + "\n")
    assert out.returncode == 0, out.stderr
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="Be brief.", max_tokens=10)
    reply = "".join(r.text for r in session.send("Hello!"))
    # Three replies (Hello, retry, How are you?), then the history of the reloaded session.
    assert out.stdout.startswith(f"{reply}\n{reply}\n")
    assert out.stdout.endswith(f"user: Hello!\nassistant: {reply}\n")
    err = out.stderr
    stats = [line for line in err.splitlines() if line.startswith("[") and "tok/s" in line]
    assert len(stats) == 3 and all("state " in line and "GB" in line for line in stats)  # after each reply
    assert "/undo" in err  # help
    assert "[undone; 1 exchanges left]" in err
    assert f"[saved to {saved}]" in err and saved.is_file()
    assert f"[loaded {saved}: 1 exchanges" in err
    assert "[temperature = 0.5]" in err
    assert "error: unknown setting 'nonsense'" in err
    assert "error: unknown command /bogus" in err
    assert ChatSession.load(saved, model, tokenizer).history == session.history


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rg-mlx generate: error: ") and "no such model folder" in err
    assert len(err.splitlines()) == 1
    assert main(["chat", "--model", "someone/not-downloaded-model"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "not in the Hugging Face cache" in err and "offline" in err and "rg-mlx convert" in err


def test_bad_flags_are_errors(tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--temp", "-1"]) == 1
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--system", "x"]) == 1
    assert "--system needs --chat" in capsys.readouterr().err


def test_import_and_help_do_not_load_mlx_lm():
    # mlx_lm imports transformers (and torch where installed): seconds that `rg-mlx --help`,
    # `--version` and `convert` must not pay. Generation imports it on first use.
    code = (
        "import sys, rg_mlx, rg_mlx.cli, rg_mlx.convert\n"
        "assert 'mlx_lm' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n"
        "import rg_mlx.commands.generate, rg_mlx.commands.chat\n"
        "assert 'mlx_lm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
