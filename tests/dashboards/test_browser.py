"""`chatforge dashboard` for real: started on 127.0.0.1 on a free port over the fixture store, each page loaded in
headless Chromium (the driver of the chat-page test), its key figures read off the page, no exception text, no
request leaving the machine. Screenshots: test-artifacts/dashboard_<page>.png."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the dashboard test needs a real browser", allow_module_level=True)

pytestmark = pytest.mark.slow
expect = sync_api.expect
SHOTS = ROOT / "test-artifacts"
# Streamlit's client probes a deep link's path before the root for its own endpoints (/run/_stcore/health, then
# /_stcore/health): those 404s are the framework finding its base path, not the app failing.
PROBE = re.compile(r"/[a-z]+/_stcore/(health|host-config)$")


@pytest.fixture(scope="module")
def dashboard(fixture_store, tmp_path_factory):
    """`chatforge dashboard --store <fixture store> --port <free>`; yields its URL (the one it printed)."""
    import httpx

    port = free_port()
    home = tmp_path_factory.mktemp("dashboard-home")
    env = {**os.environ, "CHATFORGE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    log = open(home / "dashboard.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "dashboard", "--store", str(fixture_store.path),
                             "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    first = proc.stdout.readline()
    m = re.match(r"chatforge dashboard: (http://127\.0\.0\.1:\d+)  \(store (.*); Ctrl-C stops it\)$", first.rstrip("\n"))
    assert m and m[1] == f"http://127.0.0.1:{port}" and m[2] == str(fixture_store.path), first + log.read()
    url = m[1]
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        try:
            if httpx.get(f"{url}/_stcore/health", timeout=1).text == "ok":
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        raise AssertionError("the dashboard did not answer /_stcore/health within 60 s")
    yield url
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the CLI stops its Streamlit server
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def load(browser, url: str, path: str):
    """Open a page and wait until its script has finished (the title is drawn and the running indicator gone)."""
    page = browser.new_page(viewport={"width": 1400, "height": 2600})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and not PROBE.search(m.location.get("url", ""))
            and problems.append(f"console: {m.text} ({m.location.get('url')})"))
    page.on("request", lambda r: r.url.startswith(url) or r.url.startswith(("data:", "blob:"))
            or problems.append(f"external request: {r.url}"))
    page.goto(f"{url}/{path}")
    settle(page)
    return page, problems


def settle(page, timeout: float = 90_000) -> None:
    expect(page.locator('[data-testid="stMainBlockContainer"] h1').first).to_be_visible(timeout=timeout)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout)
    page.wait_for_timeout(500)  # charts draw after the script's last message


def cells(page) -> list[str]:
    """The text of every dataframe cell on the page (the grid's accessible table, filled once the grid is drawn)."""
    grids = page.locator('[data-testid="stDataFrame"]')
    expect(grids.first).to_be_visible(timeout=30_000)
    for i in range(grids.count()):
        expect(grids.nth(i).locator('[role="gridcell"]').first).to_be_attached(timeout=30_000)
    return grids.locator('[role="gridcell"]').all_text_contents()


def finish(page, problems: list[str], name: str) -> str:
    text = page.locator("body").inner_text()
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"dashboard_{name}.png"), full_page=True)
    assert page.locator('[data-testid="stException"]').count() == 0, text[:3000]
    assert "Traceback" not in text and "Error:" not in text, text[:3000]
    assert not problems, problems
    page.close()
    return text


def test_runs_page(browser, dashboard, fixture_store):
    fs = fixture_store
    page, problems = load(browser, dashboard, "")
    expect(page.locator("h1")).to_have_text("Runs")
    links = [c for c in cells(page) if c.startswith("./run?run=")]
    assert {c.split("=", 1)[1] for c in links} == {fs.first, fs.cached, fs.longer, fs.failed}
    labels = page.locator('[data-testid="stVegaLiteChart"] [aria-label^="cost ($):"]').evaluate_all(
        "els => els.map(e => e.getAttribute('aria-label'))")
    runs_drawn = {m[1] for m in (re.search(r"run: (\w{8})", s) for s in labels) if m}
    assert runs_drawn == {fs.first[:8], fs.cached[:8], fs.longer[:8]}  # every scored run; the failed one has no score
    on_front = {re.search(r"run: (\w{8})", s)[1] for s in labels if "on the frontier: true" in s}
    assert fs.cached[:8] in on_front and fs.first[:8] not in on_front  # same score as run 1 for $0
    text = finish(page, problems, "runs")
    assert "cost against score · dashed: Pareto frontier" in text and re.search(r"on the Pareto frontier\s+\d of 3 scored", text)


def test_run_page(browser, dashboard, fixture_store):
    fs = fixture_store
    page, problems = load(browser, dashboard, f"run?run={fs.cached}")
    row = json.loads(next(p for p in (fs.path / "ledger" / fs.cached).glob("*-base-*.json")).read_text())
    text = page.locator("body").inner_text()
    assert f"run {fs.cached}" in text and "5 stage executions · 5 cache hits · 0 failed" in text
    assert cells(page).count("cache hit") == 5 and row["key"][:12] in cells(page)
    expect(page.locator("h1", has_text=f"chatforge report card: run {fs.cached}")).to_be_visible()
    expect(page.locator('[data-testid="stGraphVizChart"] svg')).to_be_visible()  # the lineage graph, drawn
    assert page.locator('[data-testid="stGraphVizChart"] svg g.node').count() == 5
    finish(page, problems, "run")


def test_compare_page(browser, dashboard, fixture_store):
    fs = fixture_store
    page, problems = load(browser, dashboard, f"compare?a={fs.first}&b={fs.longer}")
    grid = cells(page)
    i = grid.index("base.num_iterations")
    assert grid[i + 1: i + 3] == ["4", "6"]  # the config diff: A, B
    text = page.locator("body").inner_text()
    assert "tiny · cpu · 0 cache hits · 0 failed · saved $0.00" in text  # A computed everything
    assert re.search(r"tiny · cpu · 3 cache hits · 0 failed · saved \$0\.0\d{3}", text)  # B reused data and tokenizer
    assert "copa" in grid and "centered" in grid
    finish(page, problems, "compare")


def test_chat_page(browser, dashboard, fixture_store):
    page, problems = load(browser, dashboard, "chat")
    expect(page.get_by_text(re.compile(r"^base checkpoint · 2 layers · context 64 tokens"))).to_be_visible(timeout=60_000)
    # record the reply's length at every change of the page: a streamed reply is seen growing, not only whole
    page.evaluate("""() => {
        window.replyLengths = [];
        new MutationObserver(() => {
            const msgs = document.querySelectorAll('[data-testid="stChatMessage"]');
            if (msgs.length < 2) return;
            const md = msgs[1].querySelector('[data-testid="stMarkdownContainer"]');
            if (md) window.replyLengths.push(md.innerText.length);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    box = page.locator('[data-testid="stChatInputTextArea"]')
    box.fill("Doc 1:")
    box.press("Enter")
    reply = page.locator('[data-testid="stChatMessage"]').nth(1)
    expect(reply.get_by_text(re.compile(r"tokens · first after \d"))).to_be_visible(timeout=60_000)
    text = reply.locator('[data-testid="stMarkdownContainer"]').first.inner_text().strip()
    assert text
    lengths = sorted(set(page.evaluate("window.replyLengths")) - {0})
    assert len(lengths) >= 3 and lengths[-1] >= len(text), lengths  # several partial replies before the whole one
    expect(page.locator('[data-testid="stChatMessage"]').first).to_contain_text("Doc 1:")
    finish(page, problems, "chat")
