"""`rg-mlx chat` and `rg-mlx generate` on a real terminal (a pty): line editing and history, multi-line
input, Ctrl-C at the prompt, the prompt's progress bar."""

from __future__ import annotations

import io
import os
import select
import sys
import time
from pathlib import Path

import pytest

from rg_mlx.commands import PrefillBar
from rg_mlx.generate import PrefillProgress

ROOT = Path(__file__).resolve().parents[1]
UP = b"\x1b[A"
CTRL_C = b"\x03"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")


class Terminal:
    """`python -m rg_mlx ARGS` on a pseudo-terminal of its own (its controlling terminal, so Ctrl-C
    is a SIGINT as in a real one), with everything it writes collected in `output`."""

    def __init__(self, args: list[str], env: dict[str, str]):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: nothing of pytest's may run here
            try:
                os.chdir(ROOT)
                os.execve(sys.executable, [sys.executable, "-m", "rg_mlx", *args], env)
            finally:
                os._exit(127)
        self.output = b""
        self.status: int | None = None

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Wait until `text` has been written `count` times in all."""
        deadline = time.monotonic() + timeout
        while self.output.decode(errors="replace").count(text) < count:
            assert time.monotonic() < deadline, f"timed out waiting for {text!r}:\n{self.text}"
            self._read(0.1)

    def _read(self, wait: float) -> None:
        if select.select([self.fd], [], [], wait)[0]:
            try:
                self.output += os.read(self.fd, 65536)
            except OSError:  # the child closed the terminal
                time.sleep(wait)

    def alive(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is None

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.alive():
            assert time.monotonic() < deadline, f"still running:\n{self.text}"
            self._read(0.05)
        return self.status

    def close(self) -> None:
        if self.alive():
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.fd)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")


@pytest.fixture
def terminal(tmp_path):
    env = {
        **os.environ, "TERM": "xterm-256color", "RG_MLX_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    started: list[Terminal] = []

    def start(*args: str) -> Terminal:
        started.append(Terminal(list(args), env))
        return started[-1]

    yield start
    for t in started:
        t.close()


def test_arrow_up_recalls_and_ctrl_c_asks_before_quitting(terminal, tiny_model_dir, tmp_path):
    chat = terminal("chat", "--model", str(tiny_model_dir), "-m", "4")
    chat.expect(">>> ")
    chat.send(b"Hello there\r")
    chat.expect("tok/s")
    chat.expect(">>> ", 2)
    chat.send(UP + b"\r")  # the previous line, sent again
    chat.expect("tok/s", 2)
    chat.expect(">>> ", 3)
    chat.send(b"/history\r")
    chat.expect("assistant: ", 2)
    assert chat.text.count("user: Hello there\n") == 2
    chat.expect(">>> ", 4)

    chat.send(CTRL_C)  # an unsaved exchange: it asks
    chat.expect("the conversation is not saved")
    chat.expect(">>> ", 5)
    time.sleep(0.3)
    assert chat.alive()
    chat.send(CTRL_C)  # the second press quits
    assert chat.wait() == 0
    history = (tmp_path / "cache" / "chat_history").read_text()
    assert "Hello there" in history and "/history" in history  # kept for the next run

    # The next run starts with that history; after /save, Ctrl-C quits at once.
    chat = terminal("chat", "--model", str(tiny_model_dir), "-m", "4")
    chat.expect(">>> ")
    chat.send(UP + UP + b"\r")
    chat.expect("tok/s")
    chat.expect(">>> ", 2)
    chat.send(f"/save {tmp_path / 'talk.safetensors'}\r".encode())
    chat.expect("[saved to")
    chat.expect(">>> ", 3)
    chat.send(CTRL_C)
    assert chat.wait() == 0 and "not saved" not in chat.text
    assert "user: Hello there" not in chat.text  # (no /history this time)


def test_multi_line_messages(terminal, tiny_model_dir, tmp_path):
    chat = terminal("chat", "--model", str(tiny_model_dir), "-m", "2", "--no-history")
    chat.expect(">>> ")
    chat.send(b"first line \\\r")  # a trailing backslash continues the message
    chat.expect("... ")
    chat.send(b"second line\r")
    chat.expect("tok/s")
    chat.expect(">>> ", 2)
    chat.send(b"\x1b[200~pasted one\npasted two\x1b[201~\r")  # a bracketed paste
    chat.expect("tok/s", 2)
    chat.expect(">>> ", 3)
    chat.send(b"typed fast\rall at once\r")  # a paste on a terminal without bracketed paste
    chat.expect("tok/s", 3)
    chat.expect(">>> ", 4)
    chat.send(b"/history\r")
    chat.expect("assistant: ", 3)
    text = chat.text
    for message in ("first line \nsecond line", "pasted one\npasted two", "typed fast\nall at once"):
        assert f"user: {message}\n" in text
    chat.send(b"/quit\r")
    assert chat.wait() == 0
    assert not (tmp_path / "cache" / "chat_history").exists()  # --no-history


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_prefill_bar_shows_after_a_second_and_clears():
    out = FakeTerminal()
    bar = PrefillBar(out)
    bar(PrefillProgress(0, 30_000, 0.0))
    bar(PrefillProgress(512, 30_000, 0.5))
    assert out.getvalue() == ""  # a short prompt never shows a bar
    bar(PrefillProgress(12_000, 30_000, 30.0))
    line = out.getvalue().split("\r\x1b[2K")[-1]
    assert line == "reading the prompt [##########..............] 12,000 / 30,000 tokens · 400 tok/s · 45 s left"
    bar(PrefillProgress(30_000, 30_000, 75.0))
    assert out.getvalue().endswith("\r\x1b[2K") and not bar.shown  # erased: the reply starts on a clean line
    piped = io.StringIO()
    PrefillBar(piped)(PrefillProgress(12_000, 30_000, 30.0))
    assert piped.getvalue() == ""  # only on a terminal


def test_generate_shows_the_bar_on_a_terminal(terminal, tiny_model_dir):
    # One token per chunk makes a prompt of a few thousand tokens take seconds even on the tiny model.
    prompt = "The quick brown fox jumps over the lazy dog. " * 60
    run = terminal("generate", "--model", str(tiny_model_dir), "-m", "2", "--prefill-step-size", "1", "-p", prompt)
    assert run.wait(timeout=180) == 0, run.text
    assert "reading the prompt [" in run.text and " tokens · " in run.text and "tok/s" in run.text
