"""Conversation export (JSON and Markdown) and JSON import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rg_mlx.errors import RGError
from rg_mlx.serving import now_iso

FORMAT = "rg-mlx-chat"
VERSION = 1


def to_json(
    messages: list[dict[str, str]],
    times: list[str],
    *,
    model: str,
    system: str | None,
    settings: dict[str, Any],
    created: str,
) -> str:
    """The conversation as a JSON document that `read_json` (and the app's Import) reads back."""
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "created": created,
        "exported": now_iso(),
        "system": system,
        "settings": settings,
        "messages": [{**m, "time": t} for m, t in zip(messages, times)],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False)


def to_markdown(messages: list[dict[str, str]], times: list[str], *, model: str, system: str | None) -> str:
    """The conversation as readable Markdown."""
    lines = [f"# Chat with {model}", "", f"*Exported {now_iso()} from rg-mlx*", ""]
    if system:
        lines += ["> **System prompt:** " + system.replace("\n", "\n> "), ""]
    for m, t in zip(messages, times):
        who = "You" if m["role"] == "user" else model
        lines += [f"### {who} <sub>{t}</sub>", "", m["content"], ""]
    return "\n".join(lines)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read and check an exported conversation; RGError naming the problem if it is not one."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RGError(f"{Path(path).name}: not a readable JSON file ({e}); import a file made by Export JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("messages"), list):
        raise RGError(f"{Path(path).name}: not an rg-mlx conversation; import a file made by Export JSON")
    for i, m in enumerate(doc["messages"]):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != expected or not isinstance(m.get("content"), str):
            raise RGError(f"{Path(path).name}: message {i} should be a {expected} message with text content")
    if not isinstance(doc.get("settings", {}), dict) or not isinstance(doc.get("system") or "", str):
        raise RGError(f"{Path(path).name}: malformed settings or system prompt")
    return doc
