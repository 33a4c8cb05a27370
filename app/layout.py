"""The app's page: the Blocks layout, its look, and which handler each event calls.

`build(app)` lays the page out and wires every event to a handler of `app` (a `ChatApp`, server.py);
the handlers translate between Gradio values and the serving layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from rg_mlx.sampling import APP

from . import settings as panel
from .models import DEMO, list_models

if TYPE_CHECKING:
    from .server import ChatApp

NO_MODEL = (
    "**No model loaded.** Convert a checkpoint, e.g. "
    "`rg-mlx convert google/recurrentgemma-2b-it models/rg-2b-it`, then start "
    "`rg-mlx app --model models/rg-2b-it` (or `--models-dir models`), or pick a converted model in the list above."
)
DEMO_NOTE = (
    "**This is the bundled demo model**: a tiny Griffin that only knows about rg_mlx. For a real model, "
    "`rg-mlx convert google/recurrentgemma-2b-it models/rg-2b-it`, then `rg-mlx app --model models/rg-2b-it`.\n\n"
    "It learned one answer per question and is very sure of it: **Retry** draws a new seed for every reply "
    "(seed -1), yet usually gets the same words back. Raise the temperature to see it vary."
)
SYSTEM_INFO = (
    "Gemma has no system role: this text is folded into your first message. "
    "A change applies to a new chat (Clear)."
)
PLOT_TITLES = ("per-token latency (ms)", "process memory, RSS (MiB)")
PLOT_HEADROOM = 1.25  # the y axis reaches this far above a plot's highest point, so the line never meets the frame

# Button icons as CSS masks painted in the text colour: a glyph (■, ↻) renders as an empty box where the
# browser's fonts lack it (Debian's Liberation fonts lack most of them).
_ICONS = {  # 24 x 24 shapes (the arrows are Material Design's refresh, undo and close icons)
    "stop": "<rect x='4.5' y='4.5' width='15' height='15' rx='2.5'/>",
    "retry": "<path d='M17.65 6.35A7.96 7.96 0 0 0 12 4a8 8 0 1 0 7.73 10h-2.08A6 6 0 1 1 12 6c1.66 0 "
    "3.14.69 4.22 1.78L13 11h7V4z'/>",
    "undo": "<path d='M12.5 8c-2.65 0-5.05.99-6.9 2.6L2 7v9h9l-3.62-3.62c1.39-1.16 3.16-1.88 5.12-1.88 "
    "3.54 0 6.55 2.31 7.6 5.5l2.37-.78C21.08 11.03 17.15 8 12.5 8z'/>",
    "clear": "<path d='M19 6.41 17.59 5 12 10.59 6.41 5 5 6.41 10.59 12 5 17.59 6.41 19 12 13.41 17.59 19 "
    "19 17.59 13.41 12z'/>",
}


def _icon_rule(name: str, shape: str) -> str:
    """CSS that puts `shape` before the text of button `#rg-NAME`, in the button's text colour."""
    svg = f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24'>{shape}</svg>"
    url = f'url("data:image/svg+xml;utf8,{svg}")'
    return (
        f"#rg-{name}::before {{ content: ''; display: inline-block; width: 1.05em; height: 1.05em;"
        f" margin-right: 0.35em; vertical-align: -0.17em; background-color: currentColor;"
        f" -webkit-mask: {url} center / contain no-repeat;"
        f" mask: {url} center / contain no-repeat; }}"
    )


ICON_CSS = "\n".join(_icon_rule(name, shape) for name, shape in _ICONS.items())

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
#rg-plot-ms, #rg-plot-mib { overflow: visible !important; }  /* the x axis title hangs below the plot */
#rg-side .vega-embed svg { overflow: visible; }
#rg-chat .placeholder-content { padding: 28px 36px; max-width: 46rem; margin: auto; line-height: 1.55; }
#rg-chat .placeholder-content p { margin: 0 0 0.8em; }
footer { display: none !important; }
""" + ICON_CSS


def plot_frames(trace: list[tuple[int, float, float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """DataFrames for the latency plot (token, ms) and the memory plot (token, MiB) of a session's trace."""
    df = pd.DataFrame(trace, columns=["token", "ms", "MiB"])
    df = df.astype({"token": "int64", "ms": "float64", "MiB": "float64"})
    return df[["token", "ms"]], df[["token", "MiB"]]


def axis_top(highest: float) -> float:
    """The top of a y axis from 0 that shows `highest` with `PLOT_HEADROOM` above it: the next round value
    (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten) at or above `highest * PLOT_HEADROOM`."""
    target = max(highest, 1e-9) * PLOT_HEADROOM
    power = 10.0 ** math.floor(math.log10(target))
    return next(power * m for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if power * m >= target * (1 - 1e-12))


def plots(trace: list[tuple[int, float, float]]) -> tuple[gr.LinePlot, gr.LinePlot]:
    """The latency and memory plots of a session's trace, each y axis from 0 to `axis_top` of its data."""
    return tuple(
        gr.LinePlot(df, y_lim=[0, axis_top(df[df.columns[1]].max())] if len(df) else [0, None])
        for df in plot_frames(trace)
    )


def _elem_id(name: str) -> str:
    return "rg-" + name.replace("_", "-")


def build(app: ChatApp) -> gr.Blocks:
    """The Blocks UI wired to `app`'s handlers."""
    found = list_models(app.models_dir, app.model_path)
    with gr.Blocks(title="rg-mlx chat", analytics_enabled=False) as demo:
        with gr.Row(equal_height=True):
            with gr.Column(scale=7):
                gr.HTML(
                    "<div id='rg-head'><h1>rg-mlx <span>chat</span></h1>"
                    "<p>RecurrentGemma on MLX · a fixed-size state: memory and per-token speed stay flat "
                    "however long the chat runs</p></div>"
                )
            picker = gr.Dropdown(
                choices=list(found.items()), value=app.model_path, label="Model", scale=3, min_width=340,
                info="from --models-dir and the HF cache, or a folder path", allow_custom_value=True,
                elem_id="rg-model",
            )
        with gr.Row():
            with gr.Column(scale=7):
                chatbot = gr.Chatbot(
                    show_label=False, height=560, editable="user", buttons=["copy"], elem_id="rg-chat",
                    placeholder=NO_MODEL if app.model is None else DEMO_NOTE if app.model_path == DEMO else None,
                )
                with gr.Row(equal_height=True):
                    msg = gr.Textbox(
                        placeholder="Message RecurrentGemma…  (Enter to send, Shift+Enter for a new line)",
                        show_label=False, container=False, lines=1, max_lines=8, scale=8, autofocus=True,
                        elem_id="rg-input",
                    )
                    send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="rg-send")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="rg-stop")
                with gr.Row(elem_id="rg-actions"):
                    retry_btn = gr.Button("Retry", size="sm", elem_id="rg-retry")
                    undo_btn = gr.Button("Undo", size="sm", elem_id="rg-undo")
                    clear_btn = gr.Button("Clear", size="sm", elem_id="rg-clear")
                stats = gr.Markdown(elem_id="rg-stats")
            with gr.Column(scale=3, min_width=340, elem_id="rg-side"):
                with gr.Accordion("Speed & memory over this chat", open=True):
                    latency_plot, memory_plot = (
                        gr.LinePlot(
                            df, x="token", y=df.columns[1], height=170, y_lim=[0, None], show_label=False,
                            title=title, x_title="generated token", y_title=df.columns[1],
                            elem_id=f"rg-plot-{df.columns[1].lower()}",
                        )
                        for df, title in zip(plot_frames([]), PLOT_TITLES)
                    )
                with gr.Accordion("Settings", open=True):
                    system = gr.Textbox(label="System prompt", lines=2, info=SYSTEM_INFO, elem_id="rg-system")
                    controls = [
                        gr.Number(
                            panel.to_panel(APP)[name], precision=0, label=panel.LABELS[name],
                            info=f"{panel.RANDOM_SEED} = random", elem_id=_elem_id(name),
                        )
                        if name == "seed"
                        else gr.Slider(**panel.slider(name), elem_id=_elem_id(name))
                        for name in panel.PANEL
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
            msg.submit(app.send, [msg, *settings], [msg, *view], api_name="send", **streaming),
            send_btn.click(app.send, [msg, *settings], [msg, *view], api_visibility="private", **streaming),
            retry_btn.click(app.retry, controls, view, api_name="retry", **streaming),
            chatbot.edit(app.edit, controls, view, api_visibility="private", **streaming),
        ]
        control = dict(cancels=generating, concurrency_limit=None)
        stop_btn.click(app.stop, None, view, api_name="stop", **control)
        undo_btn.click(app.undo, None, [chatbot, msg, stats], api_name="undo", **control)
        clear_btn.click(app.clear, system, view, api_name="clear", **control)
        chatbot.clear(app.clear, system, view, api_visibility="private", **control)
        json_btn.click(app.export_json, None, download, api_name="export_json")
        md_btn.click(app.export_markdown, None, download, api_name="export_markdown")
        upload.upload(app.import_json, upload, [*view, *settings], api_name="import_json", **control)
        picker.input(app.switch_model, picker, [*view, picker], api_name="switch_model", **control)
        demo.load(app.model_choices, None, picker, api_visibility="private")  # models added since start
        demo.unload(app.close_session)
    return demo


def launch(demo: gr.Blocks, host: str, port: int | None, allowed_paths: list[str], **kwargs) -> None:
    """Serve `demo` on `host:port` in the background: local only by default, no share link, no analytics,
    no web fonts."""
    demo.queue(default_concurrency_limit=None)
    demo.launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=True, theme=THEME, css=CSS,
        footer_links=[], ssr_mode=False, pwa=False, mcp_server=False, enable_monitoring=False,
        show_error=True, allowed_paths=allowed_paths, **kwargs,
    )
