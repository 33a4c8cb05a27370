"""The chat app's handlers: `ChatApp` translates between Gradio's values and the serving layer.

The serving layer (`rg_mlx.serving.ChatService`) holds the model, the one MLX worker thread and
every browser tab's session (keyed by Gradio's session hash, freed when the tab closes); the page
itself is laid out in layout.py and the settings panel is mapped to `SamplingConfig` in settings.py.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import gradio as gr

from rg_mlx.errors import RGError
from rg_mlx.generate import PrefillProgress
from rg_mlx.memory import human_bytes
from rg_mlx.sampling import APP, SamplingConfig
from rg_mlx.serving import ChatService, Reply, Session, SessionRegistry, SessionView, Worker, now_iso

from . import layout, transcript
from . import settings as panel
from .layout import NO_MODEL, plots
from .models import DEMO, demo_available, list_models, model_label

PLOT_EVERY_S = 1.0  # live plot refresh period while streaming
SAME_REPLY = (
    "Retry drew a new seed and the model gave the same reply: it is very sure of this answer (the bundled demo "
    "almost always is). Raise the temperature for more variety."
)

__all__ = ["ChatApp", "NO_MODEL"]


def _text(content: Any) -> str:
    """The text of a chat message value (a string, a part dict or a list of parts, as Gradio 6 sends)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return _text(content.get("text", content.get("content", "")))
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def _reading(p: PrefillProgress) -> str:
    """The status line while the model reads a message: `reading your message: 12,000 / 30,000 tokens · 410 tok/s`."""
    rate = f" · {p.tps:,.0f} tok/s" if p.tps > 0 else ""
    return f"reading your message: {p.done:,} / {p.total:,} tokens{rate}"


def _stats(view: SessionView) -> str:
    """The stats line under the chat: the last reply's speed and the fixed state's size."""
    r = view.last
    if r is None:
        return "stopped before the first token" if view.stopped else ""
    end = "stopped" if view.stopped else {"length": "max tokens reached"}.get(r.finish_reason, "")
    parts = [
        f"**{r.generation_tokens} tokens**",
        f"{r.generation_tps:.1f} tok/s",
        f"first token {view.ttft:.2f} s",
        f"prompt {r.prompt_tokens} tokens at {r.prompt_tps:.0f} tok/s",
        f"state **{human_bytes(view.state_bytes, 'MiB')}** (fixed)",
        f"{view.tokens_seen:,} tokens in this chat",
    ]
    return " · ".join(parts + ([end] if end else []))


class ChatApp:
    """The app: a `ChatService` (`service`) and the Gradio handlers over it.

    Args:
        model: what `rg_mlx.load` accepts (a folder, a hub repo id, "demo"); None starts without a
            model (the bundled demo if this install has one), showing how to get one.
        models_dir: a folder whose converted model subfolders the model picker lists.
        dtype: compute dtype passed to `rg_mlx.load`.
        adapter_path: a LoRA adapter folder for `model` (`rg_mlx.load(adapter_path=...)`); a model
            picked later in the app loads without it.
        update_every: least seconds between two UI updates while a reply streams (tokens that
            arrive faster are shown together, so a fast model does not swamp the browser).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        models_dir: str | None = None,
        dtype: str | None = None,
        adapter_path: str | None = None,
        update_every: float = 0.05,
    ):
        self.update_every = update_every
        self.models_dir = models_dir
        self.service = ChatService(dtype=dtype, sampling=APP)
        self.exports = tempfile.mkdtemp(prefix="rg-mlx-app-")  # transcripts offered for download
        self._remove_exports = weakref.finalize(self, shutil.rmtree, self.exports, ignore_errors=True)
        if model is None and demo_available():
            model = DEMO
        if model is not None:
            self.load(model, adapter_path=adapter_path)

    # ---- the serving layer, as the app's callers know it ---------------------------------
    @property
    def worker(self) -> Worker:
        """The one MLX worker thread (`rg_mlx.serving.Worker`)."""
        return self.service.worker

    @property
    def sessions(self) -> SessionRegistry:
        """Every tab's session by Gradio session hash (`rg_mlx.serving.SessionRegistry`)."""
        return self.service.sessions

    @property
    def model(self) -> Any:
        return self.service.models.model

    @property
    def tokenizer(self) -> Any:
        return self.service.models.tokenizer

    @property
    def model_path(self) -> str | None:
        return self.service.models.path

    @property
    def model_name(self) -> str:
        return model_label(self.model_path) if self.model_path else "no model"

    def load(self, path: str, *, adapter_path: str | None = None) -> None:
        """Load `path` (with the LoRA adapter at `adapter_path`, if given) on the worker and make it the
        model of every chat (existing chats are reset)."""
        self.service.load(path, adapter_path=adapter_path)

    # ---- translation ---------------------------------------------------------------------
    def _session(self, request: gr.Request) -> Session:
        if self.model is None:
            raise gr.Error(NO_MODEL, title="No model")
        if self.sessions.take_reset_notice(request.session_hash):
            gr.Warning(f"The model was switched to {self.model_name}: this chat was reset.")
        try:
            return self.service.session(request.session_hash)
        except RGError as e:
            raise gr.Error(str(e)) from None

    @staticmethod
    def _sampling(values: tuple) -> SamplingConfig:
        try:
            return panel.to_config(values)
        except RGError as e:
            raise gr.Error(str(e), title="Bad setting") from None

    @staticmethod
    def _queue(fn: Callable[..., Reply | None], *args: Any, **kwargs: Any) -> Reply | None:
        """Queue a reply through the service; a setting the model cannot take (top-k) becomes a Gradio error."""
        try:
            return fn(*args, **kwargs)
        except RGError as e:
            raise gr.Error(str(e), title="Bad setting") from None

    @staticmethod
    def _view(session: Session | None) -> tuple:
        """(chatbot, stats, latency plot, memory plot) for a session's current conversation."""
        if session is None:
            return [], "", *plots([])
        view = session.view()
        return view.messages, _stats(view), *plots(view.trace)

    def _stream(self, session: Session, reply: Reply | None) -> Iterator[tuple]:
        """Follow a queued reply: yield (chatbot, stats, latency plot, memory plot) until it ends."""
        if reply is None:
            gr.Warning("Nothing to retry yet.")
            yield self._view(session)
            return
        yield reply.shown, "reading your message…", gr.skip(), gr.skip()
        next_plot = time.monotonic() + PLOT_EVERY_S
        try:
            for p in self.service.follow(reply, self.update_every):
                if p.prefill is not None:
                    yield reply.shown, _reading(p.prefill), gr.skip(), gr.skip()
                    continue
                if p.response is None:
                    waiting = f"waiting: {p.ahead} ahead of you"
                    yield reply.shown + [{"role": "assistant", "content": waiting}], waiting, gr.skip(), gr.skip()
                    continue
                shown = (gr.skip(), gr.skip())
                if time.monotonic() > next_plot:
                    shown, next_plot = plots(session.trace()), time.monotonic() + PLOT_EVERY_S
                status = f"generating… {p.response.generation_tokens} tokens · {p.response.generation_tps:.1f} tok/s"
                yield reply.shown + [{"role": "assistant", "content": p.text}], status, *shown
        except RGError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # the reply failed on the worker: say so, the app keeps serving
            raise gr.Error(f"generation failed: {e!r}") from None
        yield self._view(session)

    # ---- handlers ------------------------------------------------------------------------
    def send(self, request: gr.Request, message: Any, system: str, *settings: Any) -> Iterator[tuple]:
        """Send a user message and stream the reply. Outputs: textbox, chatbot, stats, plots."""
        text = _text(message).strip()
        if not text:
            gr.Warning("Type a message first.")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        session = self._session(request)
        sampling = self._sampling(settings)
        view = session.view()
        if view.messages and (view.system or "") != (system or ""):
            gr.Info("The system prompt is folded into the first message: Clear to start a chat with the new one.")
        reply = self._queue(self.service.send, session, text, sampling, system=system)
        first = True
        for out in self._stream(session, reply):
            yield ("" if first else gr.skip()), *out
            first = False

    def retry(self, request: gr.Request, *settings: Any) -> Iterator[tuple]:
        """Regenerate the last reply. Outputs: chatbot, stats, plots.

        A new reply that is word for word the old one gets a note: a confident model (the bundled demo
        above all) often answers so even with a new seed, and without the note Retry would look broken.
        """
        session = self._session(request)
        before = session.view().messages
        yield from self._stream(session, self._queue(self.service.regenerate, session, self._sampling(settings)))
        after = session.view()
        replied = after.last is not None and not after.stopped
        if replied and before and before[-1]["role"] == "assistant" and after.messages == before:
            gr.Info(SAME_REPLY)

    def edit(self, request: gr.Request, edit: gr.EditData, *settings: Any) -> Iterator[tuple]:
        """The chatbot's edit event: replace the last user message and regenerate from there."""
        session = self._session(request)
        self.service.cancel(session)
        view = session.view()
        last_user = max((i for i, m in enumerate(view.messages) if m["role"] == "user"), default=None)
        if edit.index != last_user:
            gr.Warning("Only the last message you sent can be edited.")
            yield self._view(session)
            return
        self.service.undo(session)
        for out in self.send(request, _text(edit.value).strip(), view.system or "", *settings):
            yield out[1:]

    def stop(self, request: gr.Request) -> tuple:
        """Stop the reply being generated; the partial reply stays. Outputs: chatbot, stats, plots."""
        return self._view(self.service.stop(request.session_hash))

    def undo(self, request: gr.Request) -> tuple:
        """Drop the last exchange; its message goes back to the textbox. Outputs: chatbot, textbox, stats."""
        session = self._session(request)
        text = self.service.undo(session)
        if text is None:
            gr.Warning("Nothing to undo.")
            return [], gr.skip(), ""
        return session.view().messages, text, ""

    def clear(self, request: gr.Request, system: str) -> tuple:
        """Start a new chat (cancelling a running reply). Outputs: chatbot, stats, plots."""
        session = self._session(request)
        self.service.clear(session, system)
        return self._view(session)

    def close_session(self, request: gr.Request) -> None:
        """Free a session's chat (the tab closed) and drop its queued or running reply."""
        self.service.close_session(request.session_hash)

    def export_json(self, request: gr.Request) -> str:
        """Write the conversation as JSON (messages, settings, model, timestamps); return the file."""
        view = self._session(request).view()
        text = transcript.to_json(
            view.messages, view.times, model=self.model_name, system=view.system,
            settings=panel.to_panel(view.settings), created=view.created,
        )
        return self._write_export(text, "json")

    def export_markdown(self, request: gr.Request) -> str:
        """Write the conversation as Markdown; return the file."""
        view = self._session(request).view()
        text = transcript.to_markdown(view.messages, view.times, model=self.model_name, system=view.system)
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
        session = self._session(request)
        sampling, ignored = panel.from_saved(doc.get("settings", {}))
        messages = [{"role": m["role"], "content": m["content"]} for m in doc["messages"]]
        times = [str(m.get("time") or now_iso()) for m in doc["messages"]]
        self.service.restore(
            session, messages, system=doc.get("system"), sampling=sampling, created=doc.get("created"), times=times
        )
        if ignored:
            gr.Warning(f"Settings not valid, left at their defaults: {', '.join(ignored)}.")
        gr.Info(f"Imported {len(messages)} messages: continue the conversation.")
        return (*self._view(session), doc.get("system") or "", *panel.to_panel(sampling).values())

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
        self.sessions.take_reset_notice(request.session_hash)  # this tab is told below
        gr.Info(f"Switched to {self.model_name}: the chat was reset.")
        return (*self._view(None), gr.skip())

    def model_choices(self) -> gr.Dropdown:
        """The model picker, with the models found now."""
        found = list_models(self.models_dir, self.model_path)
        return gr.Dropdown(choices=list(found.items()), value=self.model_path)

    # ---- serving -------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        """The Blocks UI wired to this app's handlers."""
        return layout.build(self)

    def launch(self, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any) -> gr.Blocks:
        """Serve the app on `host:port` in the background (local only by default; no share link,
        no analytics); return the Blocks, whose `local_url` is the address."""
        demo = self.build()
        layout.launch(demo, host, port, [self.exports], **kwargs)
        return demo

    def close(self) -> None:
        """Stop the worker, free every chat and remove the transcripts written for download."""
        self.service.close()
        self._remove_exports()
