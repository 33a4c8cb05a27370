"""Take the README's screenshot of the chat app (docs/app.png) from a real run.

    python docs/screenshot.py [--model demo|PATH] [--out docs/app.png] [MESSAGE ...]

Starts the app on 127.0.0.1, chats through headless Chromium (Debian's /usr/bin/chromium) with
greedy decoding, and saves the window once the last reply is done.
"""

from __future__ import annotations

import argparse
from pathlib import Path

QUESTIONS = [
    "How do I install rg_mlx?",
    "How is this different from a transformer?",
    "What does the plot in the app show?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("messages", nargs="*", default=QUESTIONS)
    parser.add_argument("--model", default=None, help="model folder or 'demo' (default: the bundled demo)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "app.png"))
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    from rg_mlx.app.server import ChatApp

    app = ChatApp(args.model)
    demo = app.launch("127.0.0.1", None, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
            )
            page = browser.new_page(viewport={"width": 1440, "height": 960}, device_scale_factor=1)
            page.goto(demo.local_url)
            expect(page.locator("#rg-input textarea")).to_be_editable(timeout=60_000)
            for elem_id, value in [("rg-temperature", 0), ("rg-max-tokens", args.max_tokens)]:
                box = page.locator(f"#{elem_id} input[type=number]")
                box.fill(str(value))
                box.press("Tab")
            box = page.locator("#rg-input textarea")
            for i, message in enumerate(args.messages):
                box.fill(message)
                box.press("Enter")
                expect(page.locator("[data-testid=user]")).to_have_count(i + 1, timeout=60_000)
                expect(page.locator("#rg-stats")).to_contain_text("tokens in this chat", timeout=120_000)
            page.wait_for_timeout(1500)  # let the plots settle
            page.locator("#rg-input textarea").blur()
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=args.out)
            browser.close()
    finally:
        demo.close()
        app.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
