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
    # A model without a chat template gets the prompt as it is; the memory is named: RSS, then MLX's peak.
    for part in (f"prompt: {prompt_tokens} tokens (raw)", "tok/s", "generation: ", "memory: RSS ", "MiB, MLX peak ",
                 "state: ", "KiB"):
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
    assert len(stats) == 3 and all("state " in line and "| RSS " in line and "MLX peak " in line for line in stats)
    assert "/undo" in err  # help
    assert "[undone; 1 exchanges left]" in err
    assert f"[saved to {saved}]" in err and saved.is_file()
    assert f"[loaded {saved}: 1 exchanges" in err
    assert "[temperature = 0.5]" in err
    assert "error: unknown sampling setting 'nonsense': use temperature, top_p" in err
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


BAD_FLAGS = [
    (["--temp", "-1"], "--temp/--temperature -1: must be >= 0"),
    (["--temperature", "abc"], "--temp/--temperature abc: not a number >= 0"),
    (["-m", "0"], "-m/--max-tokens 0: must be >= 1"),
    (["--max-tokens", "2.5"], "-m/--max-tokens 2.5: must be a whole number >= 1"),
    (["--top-p", "2"], "--top-p 2: must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k -1: must be >= 0"),
    (["--min-p", "1.5"], "--min-p 1.5: must be in [0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0: must be > 0"),
    (["--repetition-context-size", "0"], "--repetition-context-size 0: must be >= 1"),
    (["--seed", "-3"], "--seed -3: must be in [0, 2**64)"),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_sampling_flags_exit_2_with_one_line_before_loading(command, monkeypatch, capsys, tmp_path):
    import rg_mlx

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(rg_mlx, "load", no_loading)
    argv = [command, "--model", str(tmp_path / "no-such-model")] + (["--prompt", "hi"] if command == "generate" else [])
    extra = [(["--max-snapshots", "-1"], "--max-snapshots -1: must be >= 0")] if command == "chat" else [
        (["--prefill-step-size", "0"], "--prefill-step-size 0: must be >= 1"),
        (["--system", "x", "--raw"], "--system needs the chat format: drop --raw"),
        (["--prompt", ""], "--prompt '': the prompt is empty (give some text)"),
        (["--prompt", " \n "], "--prompt ' \\n ': the prompt is empty (give some text)"),
    ]
    for flags, message in BAD_FLAGS + extra:
        with pytest.raises(SystemExit) as e:
            main(argv + flags)
        assert e.value.code == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"rg-mlx {command}: error: {message}") and len(err.strip().splitlines()) == 1, err


def test_bad_flags_in_real_processes(tiny_model_dir, tmp_path):
    # Piped chat used to start and fail on every message, exiting 0.
    out = rg_mlx("chat", "--model", str(tmp_path / "missing"), "--temp", "-1", stdin="Hello\n")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "rg-mlx chat: error: --temp/--temperature -1: must be >= 0 (0 is greedy)"
    ]
    out = rg_mlx("generate", "--model", str(tmp_path / "missing"), "-p", "hi", "-m", "0")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["rg-mlx generate: error: -m/--max-tokens 0: must be >= 1"]
    # The check that needs the model comes right after loading it, in the same form.
    out = rg_mlx("chat", "--model", str(tiny_model_dir), "--top-k", "400", stdin="Hello\n")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "rg-mlx chat: error: --top-k 400: must be < the vocabulary size, 400 (0 disables it)"
    ]


def test_set_rejects_bad_values_and_keeps_the_previous_one(tiny_model_dir):
    script = [
        "/set temperature 0.5",
        "/set temperature -5",
        "/set top_k 400",
        "/set max_tokens lots",
        "/set nonsense 1",
        "/set max_tokens 3",
        "/set seed 7",
        "/set seed none",
        "/set stop User:",
        "/set",
        "Hello!",
        "/quit",
    ]
    out = rg_mlx("chat", "--model", str(tiny_model_dir), "--seed", "1", stdin="\n".join(script) + "\n")
    assert out.returncode == 0, out.stderr
    err = out.stderr.splitlines()
    assert "[temperature = 0.5]" in err
    assert "error: temperature=-5.0: must be >= 0 (0 is greedy)" in err
    assert "error: top_k=400: must be < the vocabulary size, 400 (0 disables it)" in err
    assert "error: max_tokens='lots': not a whole number >= 1" in err
    unknown = "error: unknown sampling setting 'nonsense': use temperature, top_p, top_k"
    assert any(line.startswith(unknown) for line in err)
    assert "[max_tokens = 3]" in err and "[seed = 7]" in err and "[seed = None]" in err and "[stop = ('User:',)]" in err
    shown = [line for line in err if line.startswith("[temperature = ")][-1]  # /set alone
    assert shown.startswith("[temperature = 0.5, top_p = 1.0, top_k = 0, ") and "max_tokens = 3, seed = None" in shown
    stats = [line for line in err if "tok/s" in line]
    assert len(stats) == 1 and stats[0].startswith("[") and int(stats[0][1:].split()[0]) <= 3  # the new max_tokens


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


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with the tokenizer files of an instruction-tuned model (Gemma's chat template)."""
    import json
    import shutil

    from rg_mlx import Tokenizer

    folder = tmp_path_factory.mktemp("chat") / "tiny-it"
    shutil.copytree(tiny_model_dir, folder)
    for name, content in Tokenizer(folder).hf_files(chat=True).items():
        (folder / name).write_text(json.dumps(content))
    return folder


def test_generate_uses_the_chat_template_by_default_on_a_chat_model(chat_model_dir, capsys):
    model, tokenizer = load(chat_model_dir)
    assert tokenizer.is_chat_model
    prompt = "What is Griffin?"
    chat_ids = tokenizer.chat_tokens([{"role": "user", "content": prompt}])
    argv = ["generate", "--model", str(chat_model_dir), "--prompt", prompt, "-m", "6"]
    runs = {
        (): (chat_ids, "chat template"),
        ("--chat",): (chat_ids, "chat template"),
        ("--raw",): (tokenizer.encode(prompt), "raw"),
        ("--ignore-chat-template",): (tokenizer.encode(prompt), "raw"),  # mlx-lm's spelling
    }
    for flags, (ids, form) in runs.items():
        assert main(argv + list(flags)) == 0
        out = capsys.readouterr()
        assert out.out == generate(model, tokenizer, ids, max_tokens=6) + "\n", flags
        assert f"prompt: {len(ids)} tokens ({form})" in out.err.splitlines()[-1], flags
    # --system applies to the chat format, the default here.
    assert main(argv + ["--system", "Be brief."]) == 0
    ids = tokenizer.chat_tokens([{"role": "user", "content": prompt}], system="Be brief.")
    assert capsys.readouterr().out == generate(model, tokenizer, ids, max_tokens=6) + "\n"


def test_generate_keeps_a_base_model_raw_and_refuses_system_without_chat(tiny_model_dir, capsys):
    # A model without a chat template (a pretrained checkpoint) continues the text as given.
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "Hello world", "-m", "4"]) == 0
    assert "(raw)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "Hello", "--system", "Be brief."])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"rg-mlx generate: error: --system needs the chat format: {tiny_model_dir} has no chat template; "
                   "add --chat to use Gemma's")


def test_empty_prompt_from_stdin_fails_before_loading(monkeypatch, capsys, tmp_path):
    import rg_mlx

    monkeypatch.setattr(rg_mlx, "load", lambda *a, **k: pytest.fail("the model was loaded for an empty prompt"))
    for stdin in ("", "  \n\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(tmp_path), "--prompt", "-"])
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            "rg-mlx generate: error: --prompt '-': the prompt is empty (nothing came on stdin)"
        ]
