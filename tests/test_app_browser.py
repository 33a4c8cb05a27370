"""End to end in a real browser: headless Debian Chromium driven by Playwright (tiny model).

Types a message, watches the reply stream, stops it, retries, exports JSON, saves a screenshot
(artifacts/app-browser.png) and checks that no request leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)"
)


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from rg_mlx.app.server import ChatApp

    app = ChatApp(str(tiny_model_dir))
    demo = app.launch("127.0.0.1", None, quiet=True)
    yield app, demo.local_url
    demo.close()
    app.close()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def until(page, condition, timeout_ms: int = 30_000) -> None:
    for _ in range(timeout_ms // 50):
        if condition():
            return
        page.wait_for_timeout(50)
    raise AssertionError("timed out")


def test_chat_in_a_real_browser(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    app, url = served
    outside: list[str] = []

    def guard(route):
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:  # never let it out, but remember it
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 940}, accept_downloads=True)
        context.route("**/*", guard)
        page = context.new_page()
        page.on("request", lambda r: None if urlparse(r.url).hostname == "127.0.0.1" else outside.append(r.url))
        page.goto(url)

        stats = page.locator("#rg-stats")
        bot = page.locator("[data-testid=bot]").last
        set_number(page, "rg-temperature", 1.5)
        set_number(page, "rg-seed", 1)
        set_number(page, "rg-max-tokens", 3000)

        # Type a message: the reply streams in.
        box = page.locator("#rg-input textarea")
        box.fill("Hello world! How are you today?")
        box.press("Enter")
        expect(stats).to_contain_text("generating", timeout=30_000)
        expect(page.locator("[data-testid=user]")).to_have_text("Hello world! How are you today?")
        expect(bot).not_to_be_empty(timeout=30_000)
        first = bot.inner_text()
        page.wait_for_function(
            "n => ([...document.querySelectorAll('[data-testid=bot]')].pop()?.innerText.length ?? 0) > n",
            arg=len(first),
            timeout=30_000,
        )
        assert len(bot.inner_text()) > len(first)  # more text arrived: streaming

        # Stop: the server stops generating and keeps the partial reply.
        session = next(iter(app.sessions.values()))
        job = session.job
        page.locator("#rg-stop").click()
        expect(stats).to_contain_text("stopped", timeout=30_000)
        assert job.done.is_set() and job.items < 3000
        produced = job.items
        page.wait_for_timeout(300)
        assert job.items == produced
        history = session.chat.history
        assert [m["role"] for m in history] == ["user", "assistant"] and history[-1]["content"]

        # Retry: a fresh, complete reply replaces it.
        set_number(page, "rg-max-tokens", 30)
        set_number(page, "rg-seed", 2)
        page.locator("#rg-retry").click()
        expect(stats).to_contain_text("30 tokens", timeout=30_000)
        expect(stats).to_contain_text("tokens in this chat")
        assert session.job is not job and session.job.done.is_set()
        assert len(session.chat.history) == 2

        # Edit the last user message: the exchange is redone from the edited text.
        retried = session.job
        page.locator("[data-testid=user]").last.hover()
        page.get_by_role("button", name="Edit").last.click()
        page.locator("#rg-chat textarea").fill("Edited: how are you?")
        page.get_by_role("button", name="Submit").click()
        until(page, lambda: session.job is not retried and session.job.done.is_set())
        expect(page.locator("[data-testid=user]")).to_have_text("Edited: how are you?")
        assert [m["content"] for m in session.chat.history][:1] == ["Edited: how are you?"]
        assert len(session.chat.history) == 2

        # Export JSON: downloaded through the browser.
        page.get_by_text("Export / import").click()
        page.locator("#rg-export-json").click()
        link = page.locator("#rg-download a").first
        expect(link).to_be_visible(timeout=30_000)
        with page.expect_download() as download:
            link.click()
        saved = tmp_path / "chat.json"
        download.value.save_as(saved)
        exported = json.loads(saved.read_text())
        assert [m["content"] for m in exported["messages"]] == [m["content"] for m in session.chat.history]
        assert exported["settings"]["max_tokens"] == 30 and exported["settings"]["seed"] == 2

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-browser.png"), full_page=True)
        assert (ARTIFACTS / "app-browser.png").stat().st_size > 10_000

        # Closing the tab frees its chat.
        assert len(app.sessions) == 1
        page.close()
        deadline = time.monotonic() + 30
        while app.sessions and time.monotonic() < deadline:
            time.sleep(0.05)  # the page is gone: nothing to wait on but the server
        assert not app.sessions, "the session was not freed when its tab closed"
        browser.close()

    assert outside == [], f"requests left 127.0.0.1: {outside}"
