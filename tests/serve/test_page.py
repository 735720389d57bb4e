"""The chat page in a real headless Chromium: send a message, watch the reply stream in, Regenerate, Stop,
Enter to send, Clear. Saves a screenshot to test-artifacts/chat_page.png."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the page test needs a real browser", allow_module_level=True)

expect = sync_api.expect
MESSAGE = "Hello there! What is your name?"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 960, "height": 720})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("request", lambda r: r.url.startswith(url) or r.url.startswith("data:") or problems.append(f"external request: {r.url}"))
    page.goto(url + "/")
    return page, problems


def test_chat_page_streams_a_reply(browser, server):
    page, problems = open_page(browser, server)
    expect(page.locator("#model-name")).to_have_text("base/tiny-test")
    page.click("#settings-toggle")
    page.fill("#seed", "3")  # a fixed seed: the same reply on every run
    page.fill("#max-tokens", "40")
    page.click("#settings-toggle")

    page.fill("#input", MESSAGE)
    page.click("#send")
    reply = page.locator(".msg.assistant").last
    expect(reply).to_have_attribute("data-state", "done", timeout=30_000)
    first = reply.locator(".bubble").inner_text()
    assert first.strip(), "the assistant's reply is empty"
    expect(page.locator(".msg.user .bubble")).to_have_text([MESSAGE])
    expect(page.locator("#input")).to_have_value("")

    # Regenerate: the same question again, one reply in place of the old one (same seed: same text)
    page.click("#regenerate")
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(reply).to_have_attribute("data-state", "done", timeout=30_000)
    assert page.locator(".msg.assistant .bubble").inner_text() == first

    # Enter sends; Shift+Enter would only add a line
    page.fill("#input", "And where do you live?")
    page.press("#input", "Enter")
    expect(page.locator(".msg.user")).to_have_count(2)
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done", timeout=30_000)
    assert page.locator(".msg.assistant .bubble").last.inner_text().strip()

    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    page.screenshot(path=str(out / "chat_page.png"))
    assert page.locator("body").inner_text().count(MESSAGE) == 1

    page.click("#clear")
    expect(page.locator(".msg")).to_have_count(0)
    assert not problems, problems
    page.close()


def test_reply_grows_while_it_streams_and_stop_cuts_it(browser, start_server, slow_engine, tiny_checkpoint):
    from serve.app import create_app
    from serve.workers import WorkerPool

    pool = WorkerPool(tiny_checkpoint, device="cpu", workers=1, engine_factory=slow_engine)
    try:
        with start_server(create_app(pool, model_id="slow")) as s:
            page, problems = open_page(browser, s.url)
            page.fill("#input", "Write a long reply")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant").last
            expect(reply).to_have_attribute("data-state", "streaming")
            expect(reply.locator(".bubble")).to_have_text(re.compile("^a{3,}$"), timeout=10_000)  # text appears before the end
            expect(reply).to_have_attribute("data-state", "streaming")
            expect(page.locator("#send")).to_have_text("Stop")
            page.click("#send")
            expect(reply).to_have_attribute("data-state", "done")
            expect(reply.locator(".meta")).to_have_text("stopped")
            assert 3 <= len(reply.locator(".bubble").inner_text()) < 40
            # the server saw the client leave and freed the worker
            assert _eventually(lambda: pool.stats["cancelled"] == 1 and pool.status()["busy"] == 0), pool.status()
            assert not problems, problems
            page.close()
    finally:
        pool.close()


def _eventually(pred, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False
