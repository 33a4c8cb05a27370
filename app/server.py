"""The chat app: one model on one worker thread, one `ChatSession` per browser session, a Blocks UI.

Every browser tab (Gradio session hash) gets its own `ChatSession`, kept in `ChatApp.sessions` and
freed when the tab closes. All MLX work goes through `ChatApp.worker` (see worker.py); the Gradio
handlers only queue work there and turn the streamed responses into UI updates.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from rg_mlx.errors import RGError

from . import transcript
from .models import DEMO, demo_available, list_models, model_label
from .worker import DONE, Job, Worker

NO_MODEL = (
    "**No model loaded.** Convert a checkpoint, e.g. "
    "`rg-mlx convert google/recurrentgemma-2b-it models/rg-2b-it`, then start "
    "`rg-mlx app --model models/rg-2b-it` (or `--models-dir models`), or pick a converted model in the list above."
)
DEMO_NOTE = (
    "**This is the bundled demo model**: a tiny Griffin that only knows about rg_mlx. For a real model, "
    "`rg-mlx convert google/recurrentgemma-2b-it models/rg-2b-it`, then `rg-mlx app --model models/rg-2b-it`."
)
SYSTEM_INFO = (
    "Gemma has no system role: this text is folded into your first message. "
    "A change applies to a new chat (Clear)."
)
# The UI's sampling settings and their defaults, in the order of the controls (after the system prompt).
DEFAULTS: dict[str, Any] = dict(
    temperature=0.7, top_p=0.95, top_k=64, min_p=0.0, repetition_penalty=1.0, max_tokens=512, seed=-1
)
SETTINGS = tuple(DEFAULTS)
IDLE_TTL_S = 6 * 3600  # chats of API clients (no tab to close) are freed after this long unused
PLOT_EVERY_S = 1.0  # live plot refresh period while streaming
PLOT_TITLES = ("per-token latency (ms)", "process memory, RSS (MiB)")

THEME = gr.themes.Soft(
    primary_hue="indigo",
    neutral_hue="slate",
    radius_size="lg",
    # System fonts only: the default theme would fetch web fonts from Google.
    font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
CSS = """
.gradio-container { max-width: 1380px !important; margin: auto; }
#rg-head { padding: 4px 2px 0; }
#rg-head h1 { font-size: 1.45rem; margin: 0; font-weight: 700; letter-spacing: -0.01em; }
#rg-head h1 span { background: linear-gradient(90deg, #6366f1, #0ea5e9); -webkit-background-clip: text;
  background-clip: text; color: transparent; }
#rg-head p { margin: 2px 0 0; color: var(--body-text-color-subdued); font-size: 0.9rem; }
#rg-stats { font-family: var(--font-mono); font-size: 0.82rem; color: var(--body-text-color-subdued);
  min-height: 1.6em; padding: 0 4px; }
#rg-stats p { margin: 0; }
#rg-actions button { min-width: 0; }
#rg-side .block { box-shadow: none; }
#rg-side .vega-embed { padding: 0 0 12px 14px; box-sizing: border-box; }
#rg-side .vega-embed svg { overflow: visible; }
footer { display: none !important; }
"""


def rss_mib() -> float:
    """Resident memory of this process in MiB (the peak where the current value is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class Trace:
    """Per-token latency and process memory over a conversation, at most `limit` points.

    When full, neighbouring points merge in pairs, so the plot always covers the whole conversation.
    """

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.tokens = 0
        self.points: list[tuple[int, float, float]] = []  # (token number, latency ms, RSS MiB)

    def add(self, latency_ms: float, rss: float) -> None:
        self.tokens += 1
        self.points.append((self.tokens, latency_ms, rss))
        if len(self.points) > self.limit:
            p = self.points
            merged = [(b[0], (a[1] + b[1]) / 2, max(a[2], b[2])) for a, b in zip(p[0::2], p[1::2])]
            self.points = merged + p[len(merged) * 2 :]

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """DataFrames for the latency plot (token, ms) and the memory plot (token, MiB)."""
        df = pd.DataFrame(list(self.points), columns=["token", "ms", "MiB"]).astype(
            {"token": "int64", "ms": "float64", "MiB": "float64"}
        )
        return df[["token", "ms"]], df[["token", "MiB"]]


@dataclass
class Slot:
    """One browser session's conversation."""

    chat: Any  # rg_mlx.chat.ChatSession
    settings: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS))
    created: str = field(default_factory=transcript.now_iso)
    times: list[str] = field(default_factory=list)  # one timestamp per message of chat.history
    trace: Trace = field(default_factory=Trace)
    job: Job | None = None
    last: Any = None  # the last GenerationResponse of the last reply
    ttft: float | None = None  # its time to first token (s)
    used: float = field(default_factory=time.monotonic)

    @property
    def busy(self) -> bool:
        """Whether a reply is queued or generating."""
        return self.job is not None and not self.job.done.is_set()

    @property
    def stopped(self) -> bool:
        """Whether the last reply was stopped (Stop, Clear, a closed tab) before it ended."""
        return self.job is not None and self.job.cancelled.is_set()

    def restart(self, chat: Any, created: str | None = None) -> None:
        """Make `chat` this session's conversation, with fresh timestamps, plots and stats."""
        self.chat, self.created = chat, created or transcript.now_iso()
        self.times, self.trace, self.job, self.last = [], Trace(), None, None

    def stamp(self) -> None:
        """Give every message of the history a timestamp (new ones get now)."""
        n = len(self.chat.history)
        self.times = self.times[:n] + [transcript.now_iso()] * (n - len(self.times))


def _text(content: Any) -> str:
    """The text of a chat message value (a string, a part dict or a list of parts, as Gradio 6 sends)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return _text(content.get("text", content.get("content", "")))
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**20:.3f} MiB"


def _messages(history: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in history]


class ChatApp:
    """The app's state and handlers.

    Args:
        model: what `rg_mlx.load` accepts (a folder, a hub repo id, "demo"); None starts without a
            model (the bundled demo if this install has one), showing how to get one.
        models_dir: a folder whose converted model subfolders the model picker lists.
        dtype: compute dtype passed to `rg_mlx.load`.
        update_every: least seconds between two UI updates while a reply streams (tokens that
            arrive faster are shown together, so a fast model does not swamp the browser).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        models_dir: str | None = None,
        dtype: str | None = None,
        update_every: float = 0.05,
    ):
        self.update_every = update_every
        self.worker = Worker()
        self.models_dir = models_dir
        self.dtype = dtype
        self.model = self.tokenizer = None
        self.model_path: str | None = None
        self.sessions: dict[str, Slot] = {}
        self.reset_notice: set[str] = set()  # sessions whose chat a model switch reset
        self.lock = threading.Lock()
        self.exports = tempfile.mkdtemp(prefix="rg-mlx-app-")  # transcripts offered for download
        self._remove_exports = weakref.finalize(self, shutil.rmtree, self.exports, ignore_errors=True)
        if model is None and demo_available():
            model = DEMO
        if model is not None:
            self.load(model)

    # ---- model ---------------------------------------------------------------------------
    def load(self, path: str) -> None:
        """Load `path` on the worker and make it the model of every chat (existing chats are reset)."""
        import rg_mlx

        def swap() -> None:
            model, tokenizer = rg_mlx.load(path, dtype=self.dtype)
            self.worker.cancel()
            with self.lock:
                old, self.sessions = self.sessions, {}
                self.reset_notice |= set(old)
                self.model, self.tokenizer, self.model_path = model, tokenizer, path
            old.clear()  # the old chats are freed here, on the worker

        self.worker.call(swap)

    @property
    def model_name(self) -> str:
        return model_label(self.model_path) if self.model_path else "no model"

    def _new_chat(self, system: str | None) -> Any:
        from rg_mlx.chat import ChatSession

        return self.worker.call(ChatSession, self.model, self.tokenizer, system=system or None)

    def _slot(self, request: gr.Request) -> Slot:
        if self.model is None:
            raise gr.Error(NO_MODEL, title="No model")
        key = request.session_hash
        with self.lock:
            slot = self.sessions.get(key)
        if slot is None:
            if key in self.reset_notice:
                self.reset_notice.discard(key)
                gr.Warning(f"The model was switched to {self.model_name}: this chat was reset.")
            self._free_idle()
            slot = Slot(self._new_chat(None))
            with self.lock:
                slot = self.sessions.setdefault(key, slot)
        slot.used = time.monotonic()
        return slot

    def _free_idle(self) -> None:
        now = time.monotonic()
        with self.lock:
            idle = [k for k, s in self.sessions.items() if now - s.used > IDLE_TTL_S and not s.busy]
            for k in idle:
                del self.sessions[k]

    def close_session(self, request: gr.Request) -> None:
        """Free a session's chat (the tab closed) and drop its queued or running reply."""
        with self.lock:
            slot = self.sessions.pop(request.session_hash, None)
        if slot is not None:
            self.worker.cancel(request.session_hash)

    # ---- streaming a reply ---------------------------------------------------------------
    def _settings(self, slot: Slot, values: tuple) -> dict[str, Any]:
        """Record the UI settings in `slot` and turn them into `ChatSession.send` overrides."""
        s = dict(zip(SETTINGS, values))
        s["top_k"], s["max_tokens"], s["seed"] = int(s["top_k"]), int(s["max_tokens"]), int(s["seed"])
        slot.settings = s
        overrides = dict(s)
        overrides["seed"] = None if s["seed"] < 0 else s["seed"]
        overrides["repetition_penalty"] = None if s["repetition_penalty"] == 1.0 else s["repetition_penalty"]
        return overrides

    def _reply(self, slot: Slot, begin: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        """Runs on the worker: stream one reply, timing every token."""
        start = last = time.perf_counter()
        slot.last = slot.ttft = None
        with contextlib.closing(begin()) as stream:
            for response in stream:
                now = time.perf_counter()
                if slot.ttft is None:
                    slot.ttft = now - start
                else:
                    slot.trace.add((now - last) * 1e3, rss_mib())
                last, slot.last = now, response
                yield response

    def _cancel(self, slot: Slot) -> None:
        """Stop the session's reply (if any) and wait until the worker closed it."""
        if slot.busy:
            self.worker.cancel_job(slot.job)
            slot.job.done.wait()

    def _stream(
        self, slot: Slot, request: gr.Request, begin: Callable[[], Iterator[Any]], shown: list[dict]
    ) -> Iterator[tuple]:
        """Queue a reply on the worker; yield (chatbot, stats, latency plot, memory plot) until it ends."""
        self._cancel(slot)
        job = slot.job = self.worker.submit(request.session_hash, lambda: self._reply(slot, begin))
        reply, ahead, unshown = "", None, None  # unshown: the last response not on screen yet
        next_update, next_plot = 0.0, time.monotonic() + PLOT_EVERY_S
        try:
            yield shown, "⋯ reading the prompt", gr.skip(), gr.skip()
            while True:
                wait = max(0.0, next_update - time.monotonic()) if unshown else 0.2
                try:
                    item = job.events.get(timeout=wait)
                except queue.Empty:
                    item = None
                if item is not None:
                    items = [item]
                    while items[-1] is not DONE and not job.events.empty():
                        items.append(job.events.get())
                    if items[-1] is DONE:
                        break
                    reply += "".join(r.text for r in items)
                    unshown = items[-1]
                if unshown is None:  # no token yet: say where the reply stands in the queue
                    n = self.worker.ahead(job)
                    if n and n != ahead:
                        ahead = n
                        waiting = f"⏳ waiting: {n} ahead of you"
                        yield shown + [{"role": "assistant", "content": waiting}], waiting, gr.skip(), gr.skip()
                    continue
                if time.monotonic() < next_update:
                    continue
                plots = (gr.skip(), gr.skip())
                if time.monotonic() > next_plot:
                    plots, next_plot = slot.trace.frames(), time.monotonic() + PLOT_EVERY_S
                status = f"generating… {unshown.generation_tokens} tokens · {unshown.generation_tps:.1f} tok/s"
                yield (shown + [{"role": "assistant", "content": reply}], status, *plots)
                unshown, next_update = None, time.monotonic() + self.update_every
            if job.error is not None:
                error = job.error
                raise gr.Error(str(error) if isinstance(error, RGError) else f"generation failed: {error!r}")
            slot.stamp()
            yield self._view(slot)
        finally:
            self.worker.cancel_job(job)  # the tab went away or Stop closed this handler

    def _view(self, slot: Slot | None) -> tuple:
        """(chatbot, stats, latency plot, memory plot) for a session's current conversation."""
        if slot is None:
            return [], "", *Trace().frames()
        return _messages(slot.chat.history), self._stats(slot), *slot.trace.frames()

    def _stats(self, slot: Slot) -> str:
        r = slot.last
        if r is None:
            return "⏹ stopped before the first token" if slot.stopped else ""
        end = "⏹ stopped" if slot.stopped else {"length": "✂ max tokens reached"}.get(r.finish_reason, "")
        parts = [
            f"**{r.generation_tokens} tokens**",
            f"{r.generation_tps:.1f} tok/s",
            f"first token {slot.ttft:.2f} s",
            f"prompt {r.prompt_tokens} tokens at {r.prompt_tps:.0f} tok/s",
            f"state **{_mib(slot.chat.state_bytes)}** (fixed)",
            f"{slot.chat.tokens_seen:,} tokens in this chat",
        ]
        return " · ".join(parts + ([end] if end else []))

    # ---- handlers ------------------------------------------------------------------------
    def send(self, request: gr.Request, message: Any, system: str, *settings: Any) -> Iterator[tuple]:
        """Send a user message and stream the reply. Outputs: textbox, chatbot, stats, plots."""
        text = _text(message).strip()
        if not text:
            gr.Warning("Type a message first.")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        slot = self._slot(request)
        self._cancel(slot)
        overrides = self._settings(slot, settings)
        if not slot.chat.history and (slot.chat.system or "") != (system or ""):
            slot.chat = self._new_chat(system)
        elif (slot.chat.system or "") != (system or ""):
            gr.Info("The system prompt is folded into the first message: Clear to start a chat with the new one.")
        slot.stamp()
        slot.times.append(transcript.now_iso())
        shown = _messages(slot.chat.history) + [{"role": "user", "content": text}]
        first = True
        for out in self._stream(slot, request, lambda: slot.chat.send(text, **overrides), shown):
            yield ("" if first else gr.skip()), *out
            first = False

    def retry(self, request: gr.Request, *settings: Any) -> Iterator[tuple]:
        """Regenerate the last reply. Outputs: chatbot, stats, plots."""
        slot = self._slot(request)
        self._cancel(slot)
        history = slot.chat.history
        if not history:
            gr.Warning("Nothing to retry yet.")
            yield self._view(slot)
            return
        overrides = self._settings(slot, settings)
        shown = _messages(history[:-1] if history[-1]["role"] == "assistant" else history)
        slot.times = slot.times[: len(shown)]
        yield from self._stream(slot, request, lambda: slot.chat.regenerate(**overrides), shown)

    def edit(self, request: gr.Request, edit: gr.EditData, *settings: Any) -> Iterator[tuple]:
        """The chatbot's edit event: replace the last user message and regenerate from there."""
        slot = self._slot(request)
        self._cancel(slot)
        history = slot.chat.history
        last_user = max((i for i, m in enumerate(history) if m["role"] == "user"), default=None)
        if edit.index != last_user:
            gr.Warning("Only the last message you sent can be edited.")
            yield self._view(slot)
            return
        self.worker.call(slot.chat.undo)
        slot.stamp()
        text = _text(edit.value).strip()
        for out in self.send(request, text, slot.chat.system or "", *settings):
            yield out[1:]

    def stop(self, request: gr.Request) -> tuple:
        """Stop the reply being generated; the partial reply stays. Outputs: chatbot, stats, plots."""
        slot = self.sessions.get(request.session_hash)
        if slot is not None:
            self._cancel(slot)
            slot.stamp()
        return self._view(slot)

    def undo(self, request: gr.Request) -> tuple:
        """Drop the last exchange; its message goes back to the textbox. Outputs: chatbot, textbox, stats."""
        slot = self._slot(request)
        self._cancel(slot)
        history = slot.chat.history
        if not history:
            gr.Warning("Nothing to undo.")
            return [], gr.skip(), ""
        text = next(m["content"] for m in reversed(history) if m["role"] == "user")
        self.worker.call(slot.chat.undo)
        slot.stamp()
        slot.last = None
        return _messages(slot.chat.history), text, ""

    def clear(self, request: gr.Request, system: str) -> tuple:
        """Start a new chat (cancelling a running reply). Outputs: chatbot, stats, plots."""
        slot = self._slot(request)
        self._cancel(slot)
        slot.restart(self._new_chat(system))
        return self._view(slot)

    def export_json(self, request: gr.Request) -> str:
        """Write the conversation as JSON (messages, settings, model, timestamps); return the file."""
        slot = self._slot(request)
        slot.stamp()
        text = transcript.to_json(
            _messages(slot.chat.history), slot.times, model=self.model_name, system=slot.chat.system,
            settings=slot.settings, created=slot.created,
        )
        return self._write_export(text, "json")

    def export_markdown(self, request: gr.Request) -> str:
        """Write the conversation as Markdown; return the file."""
        slot = self._slot(request)
        slot.stamp()
        text = transcript.to_markdown(
            _messages(slot.chat.history), slot.times, model=self.model_name, system=slot.chat.system
        )
        return self._write_export(text, "md")

    def _write_export(self, text: str, ext: str) -> str:
        folder = Path(tempfile.mkdtemp(dir=self.exports))
        path = folder / f"chat-{datetime.now().strftime('%Y%m%d-%H%M%S')}.{ext}"
        path.write_text(text, encoding="utf-8")
        return str(path)

    def import_json(self, request: gr.Request, file: str) -> tuple:
        """Continue an exported conversation. Outputs: chatbot, stats, plots, system, settings."""
        try:
            doc = transcript.read_json(file)
        except RGError as e:
            raise gr.Error(str(e)) from None
        slot = self._slot(request)
        self._cancel(slot)
        saved = doc.get("settings", {})
        settings = {k: saved[k] if type(saved.get(k)) in (int, float) else d for k, d in DEFAULTS.items()}
        messages = [{"role": m["role"], "content": m["content"]} for m in doc["messages"]]
        slot.restart(self.worker.call(self._replay, doc.get("system"), messages), doc.get("created"))
        slot.settings = settings
        slot.times = [str(m.get("time") or transcript.now_iso()) for m in doc["messages"]][: len(slot.chat.history)]
        slot.stamp()
        gr.Info(f"Imported {len(messages)} messages: continue the conversation.")
        return (*self._view(slot), doc.get("system") or "", *(settings[k] for k in SETTINGS))

    def _replay(self, system: str | None, messages: list[dict[str, str]]) -> Any:
        """Runs on the worker: a new chat whose state has gone through `messages`."""
        from rg_mlx.chat import ChatSession

        return ChatSession.from_history(self.model, self.tokenizer, messages, system=system or None)

    def switch_model(self, request: gr.Request, choice: str) -> tuple:
        """Load the picked model (local only: the app downloads nothing); every chat is reset.

        Outputs: chatbot, stats, plots, picker.
        """
        if not choice or choice == self.model_path:
            return (*self._view(self.sessions.get(request.session_hash)), gr.skip())
        path = choice if choice == DEMO else str(Path(choice).expanduser())
        try:
            if path != DEMO and not Path(path).is_dir():
                raise RGError(f"{choice}: no such model folder (convert one with `rg-mlx convert`)")
            self.load(path)
        except RGError as e:
            gr.Warning(f"Could not load {model_label(choice)}: {e}")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), self.model_path
        self.reset_notice.discard(request.session_hash)
        gr.Info(f"Switched to {self.model_name}: the chat was reset.")
        return (*self._view(None), gr.skip())

    def model_choices(self) -> gr.Dropdown:
        """The model picker, with the models found now."""
        found = list_models(self.models_dir, self.model_path)
        return gr.Dropdown(choices=list(found.items()), value=self.model_path)

    # ---- UI ------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        """The Blocks UI wired to this app's handlers."""
        found = list_models(self.models_dir, self.model_path)
        d = DEFAULTS
        with gr.Blocks(title="rg-mlx chat", analytics_enabled=False) as demo:
            with gr.Row(equal_height=True):
                with gr.Column(scale=7):
                    gr.HTML(
                        "<div id='rg-head'><h1>rg-mlx <span>chat</span></h1>"
                        "<p>RecurrentGemma on MLX · a fixed-size state: memory and per-token speed stay flat "
                        "however long the chat runs</p></div>"
                    )
                picker = gr.Dropdown(
                    choices=list(found.items()), value=self.model_path, label="Model", scale=3, min_width=340,
                    info="from --models-dir and the HF cache, or a folder path", allow_custom_value=True,
                    elem_id="rg-model",
                )
            with gr.Row():
                with gr.Column(scale=7):
                    chatbot = gr.Chatbot(
                        show_label=False, height=560, editable="user", buttons=["copy"], elem_id="rg-chat",
                        placeholder=NO_MODEL if self.model is None else DEMO_NOTE if self.model_path == DEMO else None,
                    )
                    with gr.Row(equal_height=True):
                        msg = gr.Textbox(
                            placeholder="Message RecurrentGemma…  (Enter to send, Shift+Enter for a new line)",
                            show_label=False, container=False, lines=1, max_lines=8, scale=8, autofocus=True,
                            elem_id="rg-input",
                        )
                        send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="rg-send")
                        stop_btn = gr.Button("■ Stop", variant="stop", scale=1, min_width=80, elem_id="rg-stop")
                    with gr.Row(elem_id="rg-actions"):
                        retry_btn = gr.Button("↻ Retry", size="sm", elem_id="rg-retry")
                        undo_btn = gr.Button("↶ Undo", size="sm", elem_id="rg-undo")
                        clear_btn = gr.Button("✕ Clear", size="sm", elem_id="rg-clear")
                    stats = gr.Markdown(elem_id="rg-stats")
                with gr.Column(scale=3, min_width=340, elem_id="rg-side"):
                    with gr.Accordion("Speed & memory over this chat", open=True):
                        latency_plot, memory_plot = (
                            gr.LinePlot(
                                df, x="token", y=df.columns[1], height=170, y_lim=[0, None], show_label=False,
                                title=title, x_title="generated token", y_title=df.columns[1],
                                elem_id=f"rg-plot-{df.columns[1].lower()}",
                            )
                            for df, title in zip(Trace().frames(), PLOT_TITLES)
                        )
                    with gr.Accordion("Settings", open=True):
                        system = gr.Textbox(label="System prompt", lines=2, info=SYSTEM_INFO, elem_id="rg-system")
                        controls = [
                            gr.Slider(0, 2, d["temperature"], step=0.05, label="Temperature", info="0 = greedy",
                                      elem_id="rg-temperature"),
                            gr.Slider(0.05, 1, d["top_p"], step=0.01, label="Top-p", elem_id="rg-top-p"),
                            gr.Slider(0, 200, d["top_k"], step=1, label="Top-k", info="0 = off", elem_id="rg-top-k"),
                            gr.Slider(0, 1, d["min_p"], step=0.01, label="Min-p", elem_id="rg-min-p"),
                            gr.Slider(1, 2, d["repetition_penalty"], step=0.01, label="Repetition penalty",
                                      elem_id="rg-repetition-penalty"),
                            gr.Slider(1, 8192, d["max_tokens"], step=1, label="Max new tokens",
                                      elem_id="rg-max-tokens"),
                            gr.Number(d["seed"], precision=0, label="Seed", info="-1 = random", elem_id="rg-seed"),
                        ]
                    with gr.Accordion("Export / import", open=False, elem_id="rg-files"):
                        with gr.Row():
                            json_btn = gr.Button("Export JSON", size="sm", elem_id="rg-export-json")
                            md_btn = gr.Button("Export Markdown", size="sm", elem_id="rg-export-md")
                        download = gr.File(label="Download", interactive=False, elem_id="rg-download")
                        upload = gr.UploadButton("Import JSON…", file_types=[".json"], size="sm")

            settings = [system, *controls]
            view = [chatbot, stats, latency_plot, memory_plot]
            streaming = dict(show_progress="hidden", concurrency_limit=None)
            generating = [
                msg.submit(self.send, [msg, *settings], [msg, *view], api_name="send", **streaming),
                send_btn.click(self.send, [msg, *settings], [msg, *view], api_visibility="private", **streaming),
                retry_btn.click(self.retry, controls, view, api_name="retry", **streaming),
                chatbot.edit(self.edit, controls, view, api_visibility="private", **streaming),
            ]
            control = dict(cancels=generating, concurrency_limit=None)
            stop_btn.click(self.stop, None, view, api_name="stop", **control)
            undo_btn.click(self.undo, None, [chatbot, msg, stats], api_name="undo", **control)
            clear_btn.click(self.clear, system, view, api_name="clear", **control)
            chatbot.clear(self.clear, system, view, api_visibility="private", **control)
            json_btn.click(self.export_json, None, download, api_name="export_json")
            md_btn.click(self.export_markdown, None, download, api_name="export_markdown")
            upload.upload(self.import_json, upload, [*view, *settings], api_name="import_json", **control)
            picker.input(self.switch_model, picker, [*view, picker], api_name="switch_model", **control)
            demo.load(self.model_choices, None, picker, api_visibility="private")  # models added since start
            demo.unload(self.close_session)
        return demo

    def launch(self, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any) -> gr.Blocks:
        """Serve the app on `host:port` in the background (local only by default; no share link,
        no analytics); return the Blocks, whose `local_url` is the address."""
        demo = self.build()
        demo.queue(default_concurrency_limit=None)
        demo.launch(
            server_name=host, server_port=port, share=False, prevent_thread_lock=True, theme=THEME, css=CSS,
            footer_links=[], ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False,
            show_error=True, allowed_paths=[self.exports], **kwargs,
        )
        return demo

    def close(self) -> None:
        """Stop the worker, free every chat and remove the transcripts written for download."""
        self.worker.close()
        with self.lock:
            self.sessions.clear()
        self._remove_exports()
