"""client.html in real headless Chromium, against ``python server.py`` subprocesses.

A few tests talk to a tiny scripted WebSocket server instead (a real server
on a real socket, in a thread), to send what the real one only sends in rare
moments: a 1012 close, a 16-digit value, an ack held back, an op refused as
out of order, a new epoch, a state older than the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import http.server
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    FloatRect,
    Page,
    WebSocketRoute,
    expect,
    sync_playwright,
)
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from testkit.processes import IN_CI, ROOT, TIMEOUT, ServerProcess
from tests.conftest import StartProcess
from tests.helpers import require_binary

PAGE_FILE = ROOT / "client.html"
AXE_SCRIPT = ROOT / "tests" / "a11y" / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = ROOT / "tests" / "screenshots"  # git-ignored
# Playwright's own browser download is not used: Debian's chromium is.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = TIMEOUT * 1000
# The page's timings (see its <script>), which the tests move its clock past.
QUIET_BEFORE_SYNC_MS = 15_000
SYNC_ANSWER_TIMEOUT_MS = 5_000
RESTART_DELAY_MS = (1_000, 5_000)
ANNOUNCE_EVERY_MS = 5_000
LARGEST = 2**53 - 1  # the largest counter value: 16 digits
MAX_PENDING = 100  # clicks the page queues at most
MINUS = "\N{MINUS SIGN}"  # the page's sign for minus clicks waiting

NewPage = Callable[..., Page]
OpenPage = Callable[..., Page]

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium for the whole module; each test gets fresh contexts."""
    chromium = require_binary("chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[NewPage]:
    """Open a blank page in its own context, like a separate browser; all closed afterwards."""
    contexts: list[BrowserContext] = []

    def new(**options: Any) -> Page:
        # A fixed locale: the page groups digits the reader's way.
        context = browser.new_context(locale="en-US", **options)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        return context.new_page()

    yield new
    for context in contexts:
        context.close()


@pytest.fixture
def open_page(new_page: NewPage) -> OpenPage:
    """Open a URL in a new page of its own context."""

    def open_(url: str, **options: Any) -> Page:
        page = new_page(**options)
        page.goto(url)
        return page

    return open_


def served(process: ServerProcess, path: str = "/") -> str:
    return f"http://127.0.0.1:{process.port}{path}"


def from_disk(**query: str) -> str:
    url = PAGE_FILE.as_uri()
    return f"{url}?{urlencode(query)}" if query else url


def joined(url: str) -> str:
    """Where a page's WebSocket goes: its URL without the query (session, token)."""
    return urlsplit(url)._replace(query="").geturl()


def session_of(url: str) -> str:
    """The session a page's WebSocket URL names."""
    return parse_qs(urlsplit(url).query)["session"][0]


def expect_connected(page: Page) -> None:
    expect(page.locator("body")).to_have_attribute("data-status", "connected")
    expect(page.locator("#status")).to_have_text("connected")


def expect_reconnecting(page: Page) -> None:
    expect(page.locator("body")).to_have_attribute("data-status", "reconnecting")
    expect(page.locator("#status")).to_have_text("reconnecting…")


def retry_now(page: Page) -> None:
    """Make a disconnected page try at once, as when the browser comes back online.

    After a restart the page's backoff may have grown to seconds; a test
    about what happens once it is back need not wait it out.
    """
    page.evaluate("window.dispatchEvent(new Event('online'))")


def is_sync(payload: str | bytes) -> bool:
    return isinstance(payload, str) and json.loads(payload) == {"action": "sync"}


def count_sockets(page: Page) -> None:
    """Make the page count the WebSockets it creates, in ``window.sockets``."""
    page.add_init_script(
        """
        window.sockets = 0;
        window.WebSocket = class extends WebSocket {
          constructor(...args) { super(...args); window.sockets += 1; }
        };
        """
    )


def sockets_created(page: Page) -> int:
    return int(page.evaluate("window.sockets"))


# --- A scripted WebSocket server and a plain HTTP server, in threads ----------------


class ScriptedServer:
    """A tiny WebSocket server on a real socket, which says only what the test tells it.

    Each client gets ``users`` and ``state`` (value, seq, epoch), and a
    session client then the ack of the last op ``done`` holds for its session
    (0 for a new one), as the real server does. It acknowledges nothing else
    by itself: the test sends acks and errors with :meth:`send`. Every message
    a client sends is kept, in order, in ``received``.

    It runs an event loop in a thread; the test reaches its connections by
    their index, in the order they came.
    """

    def __init__(self, *, users: int = 1, value: int = 0, seq: int = 1, epoch: str = "e1") -> None:
        self.users = users
        self.value = value
        self.seq = seq
        self.epoch = epoch
        self.done: dict[str, int] = {}  # session -> the last op the "store" holds as done
        self.ack_on_connect = True  # False: the test sends the first ack itself
        self.connections: list[ServerConnection] = []
        self.sessions: list[str | None] = []  # each connection's session
        self.received: list[tuple[int, dict[str, Any]]] = []  # (connection index, message)
        self.changed = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Server = self.run(self.start())
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    async def start(self) -> Server:
        return await serve(self.handler, "127.0.0.1", 0)

    async def handler(self, websocket: ServerConnection) -> None:
        assert websocket.request is not None
        session = parse_qs(urlsplit(websocket.request.path).query).get("session", [None])[0]
        with self.changed:
            index = len(self.connections)
            self.connections.append(websocket)
            self.sessions.append(session)
            self.changed.notify_all()
        await websocket.send(json.dumps({"type": "users", "count": self.users}))
        await websocket.send(json.dumps(self.state()))
        if session is not None and self.ack_on_connect:
            await websocket.send(json.dumps({"type": "ack", "op": self.done.get(session, 0)}))
        with contextlib.suppress(ConnectionClosed):  # however the page leaves
            async for message in websocket:
                with self.changed:
                    self.received.append((index, json.loads(message)))
                    self.changed.notify_all()

    def state(self) -> dict[str, Any]:
        return {"type": "state", "value": self.value, "seq": self.seq, "epoch": self.epoch}

    def send(self, index: int, event: dict[str, Any]) -> None:
        """Send one event to connection ``index``."""
        self.run(self.connections[index].send(json.dumps(event)))

    def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds, checked after each connection and message."""
        with self.changed:
            assert self.changed.wait_for(condition, TIMEOUT), (
                f"not met; connections: {self.sessions}, received: {self.received}"
            )

    def ops(self, index: int) -> list[dict[str, Any]]:
        """The ops connection ``index`` received, in order."""
        with self.changed:
            return [message for i, message in self.received if i == index and "op" in message]

    def wait_for_ops(self, index: int, count: int) -> list[dict[str, Any]]:
        """Wait until connection ``index`` has received ``count`` ops; return them."""
        self.wait_for(lambda: len(self.ops(index)) >= count)
        return self.ops(index)

    def wait_for_connections(self, count: int) -> None:
        self.wait_for(lambda: len(self.connections) >= count)

    def close_connection(self, index: int, code: int, reason: str) -> None:
        self.run(self.connections[index].close(code, reason))

    def stop(self) -> None:
        """Stop listening and close every connection (1001, going away)."""

        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        self.run(stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@contextlib.contextmanager
def scripted_server(**options: Any) -> Iterator[ScriptedServer]:
    server = ScriptedServer(**options)
    try:
        yield server
    finally:
        server.close()


class StaticSite:
    """A plain HTTP server's address, and the paths it was asked for, in order."""

    def __init__(self) -> None:
        self.url = ""
        self.requested: list[str] = []
        self.changed = threading.Condition()

    def record(self, path: str) -> None:
        with self.changed:
            self.requested.append(path)
            self.changed.notify_all()

    def wait_for(self, path: str) -> None:
        """Return once ``path`` was asked for; fail after the test timeout."""
        with self.changed:
            assert self.changed.wait_for(lambda: path in self.requested, TIMEOUT), (
                f"{path} never requested: {self.requested}"
            )


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args: Any, site: StaticSite, **kwargs: Any) -> None:
        self.site = site  # before super(): it handles the request
        super().__init__(*args, **kwargs)

    def send_head(self) -> Any:
        self.site.record(self.path)
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def static_site(directory: Path) -> Iterator[StaticSite]:
    """Serve ``directory`` over HTTP on a free port: a site of another origin."""
    site = StaticSite()
    handler = functools.partial(QuietHandler, directory=str(directory), site=site)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        site.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        try:
            yield site
        finally:
            httpd.shutdown()
            thread.join(TIMEOUT)


# --- Checks run inside the page --------------------------------------------------------

# Every visible text's contrast with what is behind it, as WCAG computes it:
# the colour (with its alpha and every ancestor's opacity) over the composited
# backgrounds. Disabled controls are included: the page keeps them readable.
CONTRAST_SCRIPT = """
() => {
  const parse = (css) => {
    const [r, g, b, a = 1] = css.match(/[\\d.]+/g).map(Number);
    return { r, g, b, a };
  };
  const over = (top, bottom) => {
    const mix = (k) => top[k] * top.a + bottom[k] * (1 - top.a);
    return { r: mix("r"), g: mix("g"), b: mix("b"), a: 1 };
  };
  const luminance = ({ r, g, b }) => {
    const f = (v) => ((v /= 255) <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const ancestry = (el) => {
    const chain = [];
    for (let e = el; e; e = e.parentElement) chain.unshift(e);
    return chain;
  };
  const results = [];
  for (const el of document.body.querySelectorAll("*")) {
    const text = [...el.childNodes]
      .filter((node) => node.nodeType === Node.TEXT_NODE)
      .map((node) => node.data)
      .join("")
      .trim();
    const box = el.getBoundingClientRect();
    // Visually hidden text (1 px, clipped) has no contrast to speak of.
    if (!text || !el.checkVisibility() || box.width <= 1 || box.height <= 1) continue;
    let background = { r: 255, g: 255, b: 255, a: 1 };
    let opacity = 1;
    for (const e of ancestry(el)) {
      const style = getComputedStyle(e);
      background = over(parse(style.backgroundColor), background);
      opacity *= Number(style.opacity);
    }
    const color = parse(getComputedStyle(el).color);
    color.a *= opacity;
    const [light, dark] = [luminance(over(color, background)), luminance(background)].sort(
      (a, b) => b - a
    );
    results.push({ text, ratio: (light + 0.05) / (dark + 0.05) });
  }
  return results;
}
"""

AXE_RUN = """
async () => {
  const results = await axe.run(document, { resultTypes: ["violations"] });
  return results.violations.map((v) => ({
    id: v.id,
    impact: v.impact,
    help: v.help,
    nodes: v.nodes.map((node) => node.target.join(" ")),
  }));
}
"""


def text_contrast(page: Page) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = page.evaluate(CONTRAST_SCRIPT)
    return results


def expect_readable(page: Page) -> None:
    results = text_contrast(page)
    assert results, "no visible text found"
    low = [(r["text"], round(r["ratio"], 2)) for r in results if r["ratio"] < 4.5]
    assert not low, f"text below 4.5:1 contrast: {low}"


def require_axe() -> Path:
    """axe-core from tests/a11y (npm ci there): skip without it locally, fail in CI."""
    if AXE_SCRIPT.is_file():
        return AXE_SCRIPT
    reason = "axe-core is not installed (cd tests/a11y && npm ci)"
    if IN_CI:
        pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
    pytest.skip(reason)


def serious_axe_violations(page: Page) -> list[dict[str, Any]]:
    page.add_script_tag(path=require_axe())
    violations: list[dict[str, Any]] = page.evaluate(AXE_RUN)
    return [v for v in violations if v["impact"] in ("serious", "critical")]


def http_get(process: ServerProcess, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One plain GET to the server: status, headers, body."""
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def healthz(process: ServerProcess) -> dict[str, Any]:
    """The server's /healthz answer: ``value`` is the default counter's."""
    status, _, body = http_get(process, "/healthz")
    assert status == 200
    answer: dict[str, Any] = json.loads(body)
    return answer


def box(page: Page, selector: str) -> FloatRect:
    box = page.locator(selector).bounding_box()
    assert box is not None, f"{selector} is not rendered"
    return box


def lines(page: Page, selector: str) -> int:
    """How many lines the text in ``selector`` takes (one rectangle per line box)."""
    count: int = page.locator(selector).evaluate(
        """el => {
          const range = document.createRange();
          range.selectNodeContents(el);
          return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
        }"""
    )
    return count


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


# --- Sync between pages -------------------------------------------------------


def test_click_in_one_page_shows_in_every_page(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    first = open_page(served(process))
    second = open_page(served(process))
    for page in (first, second):
        expect_connected(page)
        expect(page.locator("#value")).to_have_text("0")

    first.locator("#plus").click()
    first.locator("#plus").click()
    for page in (first, second):
        expect(page.locator("#value")).to_have_text("2")

    second.locator("#minus").click()
    for page in (first, second):
        expect(page.locator("#value")).to_have_text("1")


def test_user_count_drops_when_a_page_closes(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    staying = open_page(served(process))
    leaving = open_page(served(process))
    expect(staying.locator("#users")).to_have_text("2")
    expect(leaving.locator("#users")).to_have_text("2")
    expect(staying.locator(".users")).to_have_text("2 users online")

    leaving.close()
    expect(staying.locator("#users")).to_have_text("1")
    expect(staying.locator(".users")).to_have_text("1 user online")


# --- Rooms ------------------------------------------------------------------------


def test_pages_in_different_rooms_do_not_see_each_others_clicks(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    red = open_page(served(process, "/c/red"))
    blue = open_page(served(process, "/c/blue"))
    default = open_page(served(process))
    for page in (red, blue, default):
        expect_connected(page)
        expect(page.locator("#value")).to_have_text("0")
        expect(page.locator(".users")).to_have_text("1 user online")

    red.locator("#plus").click()
    red.locator("#plus").click()
    blue.locator("#minus").click()
    expect(red.locator("#value")).to_have_text("2")
    expect(blue.locator("#value")).to_have_text("-1")
    # The default counter got one more click than the others would have shown.
    default.locator("#plus").click()
    expect(default.locator("#value")).to_have_text("1")
    expect(red.locator("#value")).to_have_text("2")
    expect(blue.locator("#value")).to_have_text("-1")


def test_page_at_a_room_path_shows_its_name_and_joins_it(
    server_process: StartProcess, new_page: NewPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    with page.expect_websocket() as websocket:
        page.goto(served(process, "/c/Team_42-x"))
    assert joined(websocket.value.url) == f"ws://127.0.0.1:{process.port}/c/Team_42-x"
    # A random 128-bit id per tab, as counter_sync.client makes (docs/protocol.md).
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", session_of(websocket.value.url))
    expect_connected(page)
    expect(page.get_by_role("heading", level=1)).to_have_text("Team_42-x")
    expect(page).to_have_title("Team_42-x · counter-sync")


def test_page_at_the_root_shows_the_main_counter(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = open_page(served(process))
    expect_connected(page)
    expect(page.get_by_role("heading", level=1)).to_have_text("Main counter")
    expect(page.get_by_role("link", name="Main counter")).to_be_hidden()


def test_page_from_disk_joins_the_room_in_its_query(
    server_process: StartProcess, new_page: NewPage, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    with page.expect_websocket() as websocket:
        page.goto(from_disk(server=process.url, room="green"))
    assert joined(websocket.value.url) == f"ws://127.0.0.1:{process.port}/c/green"
    expect_connected(page)
    expect(page.get_by_role("heading", level=1)).to_have_text("green")

    page.locator("#plus").click()
    expect(open_page(served(process, "/c/green")).locator("#value")).to_have_text("1")


def test_an_invalid_room_name_is_shown_as_text_and_not_joined(new_page: NewPage) -> None:
    page = new_page(viewport={"width": 375, "height": 720})
    count_sockets(page)
    name = '<img src="x" onerror="window.injected = true">'
    page.goto(from_disk(server="ws://127.0.0.1:9/", room=name))
    expect(page.get_by_role("heading", level=1)).to_have_text(name)
    expect(page.locator("#status")).to_have_text(
        "This is not a counter's name. "
        "A name is 1 to 64 letters (A-Z, a-z), digits, hyphens and underscores."
    )
    assert page.locator("h1 img").count() == 0
    assert page.evaluate("window.injected") is None
    assert sockets_created(page) == 0
    expect(page.locator("#plus")).to_be_disabled()
    screenshot(page, "invalid-name-375")


@pytest.mark.parametrize("path", ["/c/two%20words", "/c/", "/c/a/b", "/c/" + "x" * 65])
def test_a_bad_counter_address_says_the_naming_rule_and_links_to_the_main_counter(
    server_process: StartProcess, new_page: NewPage, path: str
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    response = page.goto(served(process, path))
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", level=1)).to_have_text("No such counter")
    expect(page.locator("body")).to_contain_text(
        "A counter's name is 1 to 64 letters (A-Z, a-z), digits, hyphens and underscores"
    )
    page.get_by_role("link", name="main counter").click()
    page.wait_for_url(served(process))
    expect_connected(page)


def test_a_bad_counter_address_echoes_the_path_as_text(server_process: StartProcess) -> None:
    process = server_process("--port", "0", "--rate", "0")
    status, headers, body = http_get(process, "/c/<b>x</b>")
    assert status == 404
    assert headers.get_all("Content-Type") == ["text/html; charset=utf-8"]
    assert b"<b>" not in body
    assert b"/c/&lt;b&gt;x&lt;/b&gt;" in body


def test_a_websocket_to_a_bad_counter_address_gets_a_plain_404(
    server_process: StartProcess,
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{process.url}c/two%20words", open_timeout=TIMEOUT)
    response = refused.value.response
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.body == b"Not found\n"


def test_open_form_goes_to_the_named_counters_page_when_served(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = open_page(served(process, "/c/first"))
    expect_connected(page)
    page.get_by_label("Open another counter").fill("second")
    page.get_by_role("button", name="Open").click()
    page.wait_for_url(served(process, "/c/second"))
    expect(page.get_by_role("heading", level=1)).to_have_text("second")
    expect_connected(page)

    page.get_by_role("link", name="Main counter").click()
    page.wait_for_url(served(process))
    expect(page.get_by_role("heading", level=1)).to_have_text("Main counter")
    expect_connected(page)


def test_open_form_sets_the_room_query_from_disk(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = open_page(from_disk(server=process.url))
    expect_connected(page)
    page.get_by_label("Open another counter").fill("side")
    with page.expect_websocket() as websocket:
        page.get_by_label("Open another counter").press("Enter")
    assert joined(websocket.value.url) == f"ws://127.0.0.1:{process.port}/c/side"
    page.wait_for_url(from_disk(server=process.url, room="side"))
    expect_connected(page)


def test_open_form_accepts_only_counter_names(new_page: NewPage) -> None:
    page = new_page()
    page.goto(from_disk(server="ws://127.0.0.1:9/"))
    name = page.get_by_label("Open another counter")
    for good in ("a", "Z-9_z", "x" * 64):
        name.fill(good)
        assert name.evaluate("input => input.checkValidity()"), good
    for bad in ("", "two words", "é", "a/b", "<b>"):
        name.fill(bad)
        assert not name.evaluate("input => input.checkValidity()"), bad
    name.fill("x" * 65)
    expect(name).to_have_value("x" * 64)  # maxlength: the 65th is not taken

    before = page.url
    name.fill("two words")
    name.press("Enter")
    assert page.url == before
    expect(page.locator("#open-name:invalid")).to_have_count(1)


def test_open_form_says_the_naming_rule_when_a_name_is_refused(new_page: NewPage) -> None:
    page = new_page()
    page.goto(from_disk(server="ws://127.0.0.1:9/"))
    name = page.get_by_label("Open another counter")
    name.fill("two words")
    name.press("Enter")
    expect(page.locator("#open-name:invalid")).to_have_count(1)
    # On a pattern mismatch the bubble shows the title under its generic
    # "Please match the requested format." (a bubble scripts cannot read).
    assert name.evaluate("input => input.validity.patternMismatch")
    expect(name).to_have_attribute(
        "title", "A name is 1 to 64 letters (A-Z, a-z), digits, hyphens and underscores"
    )


# --- Which server the page talks to -------------------------------------------


def test_page_served_by_the_server_connects_to_the_same_host(
    server_process: StartProcess, new_page: NewPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    with page.expect_websocket() as websocket:
        page.goto(served(process))
    assert joined(websocket.value.url) == f"ws://127.0.0.1:{process.port}/"
    expect_connected(page)


def test_page_from_disk_uses_the_server_override(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = open_page(from_disk(server=process.url))
    expect_connected(page)
    expect(page.locator("#value")).to_have_text("0")

    page.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("1")


def test_page_from_disk_without_override_targets_the_default_server(new_page: NewPage) -> None:
    # Only the URL is asserted: something may or may not listen on 6789 here.
    page = new_page()
    with page.expect_websocket() as websocket:
        page.goto(from_disk())
    assert joined(websocket.value.url) == "ws://localhost:6789/"


def test_page_from_disk_with_only_a_room_says_which_server_it_tries(new_page: NewPage) -> None:
    page = new_page(viewport={"width": 375, "height": 720})
    with page.expect_websocket() as websocket:
        page.goto(from_disk(room="green"))
    assert joined(websocket.value.url) == "ws://localhost:6789/c/green"
    info = page.locator("#server-info")
    expect(info).to_be_visible()
    expect(info).to_contain_text("Server: ws://localhost:6789/ (the default")
    expect(info).to_contain_text("add ?server=ws://host:port/ to the address")
    screenshot(page, "from-disk-default-server-375")


def test_page_says_which_server_its_address_names(new_page: NewPage) -> None:
    page = new_page()
    page.goto(from_disk(server="ws://127.0.0.1:9/", room="green"))
    expect(page.locator("#server-info")).to_have_text(
        "Server: ws://127.0.0.1:9/ (from ?server= in the address).", use_inner_text=True
    )


def test_page_served_by_the_server_does_not_name_it(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = open_page(served(process, "/c/green"))
    expect_connected(page)
    expect(page.locator("#server-info")).to_be_hidden()


# --- The icon ----------------------------------------------------------------


def test_page_carries_its_icon_so_the_browser_asks_for_no_favicon(
    new_page: NewPage, tmp_path: Path
) -> None:
    shutil.copy(PAGE_FILE, tmp_path / "client.html")
    # A page with an icon of its own: once the browser asks for it, it has
    # long dealt with the icon of the page opened before it in the same browser.
    (tmp_path / "probe.html").write_text(
        '<!doctype html><title>probe</title><link rel="icon" href="probe.ico">'
    )
    with static_site(tmp_path) as site:
        page = new_page()
        page.goto(f"{site.url}client.html?{urlencode({'server': 'ws://127.0.0.1:9/'})}")
        page.context.new_page().goto(f"{site.url}probe.html")
        site.wait_for("/probe.ico")
        assert "/favicon.ico" not in site.requested


def test_favicon_ico_is_answered_with_no_content(server_process: StartProcess) -> None:
    # For the server's other answers (/healthz in a tab): no 404 in its logs or metrics.
    process = server_process("--port", "0", "--rate", "0")
    status, _, body = http_get(process, "/favicon.ico")
    assert (status, body) == (204, b"")


# --- Disconnects ----------------------------------------------------------------


def test_page_reconnects_to_a_restarted_server_and_shows_its_state(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    old = server_process("--port", "0", "--rate", "0")
    page = open_page(served(old))
    expect_connected(page)
    for _ in range(3):
        page.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("3")

    old.stop()
    expect_reconnecting(page)
    expect(page.locator(".count .label")).to_have_text("Last known count")

    # A new process starts from 0: showing 0 proves the page took fresh state.
    server_process("--port", str(old.port), "--rate", "0")
    expect_connected(page)
    expect(page.locator("#value")).to_have_text("0")
    expect(page.locator(".count .label")).to_have_text("Count")
    expect(page.locator("#plus")).to_be_enabled()
    page.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("1")


def test_disconnected_page_greys_the_user_count_and_says_it_is_the_last_known(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    old = server_process("--port", "0", "--rate", "0")
    page = open_page(served(old))
    open_page(served(old))
    users = page.locator(".users")
    expect(users).to_have_text("2 users online")
    live_colour = users.evaluate("el => getComputedStyle(el).color")

    old.stop()
    expect_reconnecting(page)
    expect(users).to_have_text("Last known: 2 users online")
    stale_colour = users.evaluate("el => getComputedStyle(el).color")
    assert stale_colour != live_colour
    # Grey as the last known value is.
    assert stale_colour == page.locator("#value").evaluate("el => getComputedStyle(el).color")

    server_process("--port", str(old.port), "--rate", "0")
    expect(users).to_have_text("2 users online")
    assert users.evaluate("el => getComputedStyle(el).color") == live_colour


@pytest.mark.parametrize("width", [320, 375, 1280])
def test_card_stays_in_place_and_labels_on_one_line_when_disconnected(
    new_page: NewPage, width: int
) -> None:
    page = new_page(viewport={"width": width, "height": 720})
    # One digit is the largest number, so the tallest row the label shares.
    with scripted_server(users=12_345, value=7) as server:
        page.goto(from_disk(server=server.url, room="team-42"))
        expect_connected(page)
        expect(page.locator("#value")).to_have_text("7")
        connected = box(page, "main")
        assert lines(page, "#value-label") == 1

        server.stop()
        expect_reconnecting(page)
        expect(page.locator("#value-label")).to_have_text("Last known count")
        expect(page.locator(".users")).to_have_text("Last known: 12,345 users online")
        assert lines(page, "#value-label") == 1
        assert lines(page, ".users") == 1
        disconnected = box(page, "main")
        moved = {k: abs(disconnected[k] - connected[k]) for k in ("x", "y", "width", "height")}
        assert max(moved.values()) <= 1, f"the card moved at {width} px: {moved}"


def test_page_keeps_retrying_while_no_server_answers(open_page: OpenPage) -> None:
    # A bound socket that never listens: the port is ours and refuses every connect.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
        page = open_page(from_disk(server=f"ws://127.0.0.1:{port}/"))
        expect_reconnecting(page)
        # The page never had a counter, and still takes clicks for later.
        page.locator("#minus").click()
        expect(page.locator("#pending")).to_have_text(f"{MINUS}1 pending")
        expect_reconnecting(page)


@pytest.mark.parametrize(
    ("random", "delay_ms"),
    [(0.0, RESTART_DELAY_MS[0]), (0.999, RESTART_DELAY_MS[1])],
    ids=["earliest", "latest"],
)
def test_page_reconnects_after_a_spread_delay_when_the_server_restarts(
    new_page: NewPage, random: float, delay_ms: int
) -> None:
    page = new_page()
    count_sockets(page)
    # Math.random picks the delay; pinning it shows both ends of the spread.
    page.add_init_script(f"Math.random = () => {random};")
    page.clock.install()
    with scripted_server(value=7) as server:
        page.goto(from_disk(server=server.url))
        expect_connected(page)
        # Time stands still from here: only run_for moves it.
        page.clock.pause_at(page.evaluate("Date.now()") + 1_000)

        server.close_connection(0, 1012, "service restart")
        expect_reconnecting(page)
        expect(page.locator("#value")).to_have_text("7")
        page.clock.run_for(int(delay_ms * 0.99))
        assert sockets_created(page) == 1
        page.clock.run_for(int(delay_ms * 0.02))
        assert sockets_created(page) == 2
        page.clock.resume()
        expect_connected(page)


def test_page_comes_back_after_a_draining_server_closes_it_with_1012(
    server_process: StartProcess, new_page: NewPage
) -> None:
    old = server_process("--port", "0", "--rate", "0", "--drain-seconds", "1")
    page = new_page()
    page.add_init_script(
        """
        window.closeCodes = [];
        window.WebSocket = class extends WebSocket {
          constructor(...args) {
            super(...args);
            this.addEventListener("close", (event) => window.closeCodes.push(event.code));
          }
        };
        """
    )
    page.goto(served(old, "/c/drained"))
    expect_connected(page)
    page.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("1")

    old.stop()  # SIGTERM: closes every connection with 1012 over a second, then exits
    expect_reconnecting(page)
    # The first close is the drain's; a retry may already have met the exiting server.
    assert page.evaluate("window.closeCodes[0]") == 1012
    server_process("--port", str(old.port), "--rate", "0")
    expect_connected(page)  # within the 1-5 s the page waits after a 1012
    expect(page.locator("#value")).to_have_text("0")


def test_page_reconnects_quickly_after_an_ordinary_disconnect(new_page: NewPage) -> None:
    page = new_page()
    count_sockets(page)
    page.add_init_script("Math.random = () => 0.5;")  # no jitter: exactly 0.5 s
    page.clock.install()
    with scripted_server() as server:
        page.goto(from_disk(server=server.url))
        expect_connected(page)
        page.clock.pause_at(page.evaluate("Date.now()") + 1_000)

        server.close_connection(0, 1011, "internal error")
        expect_reconnecting(page)
        page.clock.run_for(490)
        assert sockets_created(page) == 1
        page.clock.run_for(20)
        assert sockets_created(page) == 2


def test_a_connection_that_stops_answering_is_replaced(
    server_process: StartProcess, new_page: NewPage
) -> None:
    # SIGSTOP keeps the TCP connection open while nothing answers on it: a
    # half-open connection, as after a laptop sleeps or a NAT forgets.
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    page.clock.install()
    with page.expect_websocket() as websocket:
        page.goto(served(process))
    expect_connected(page)
    expect(page.locator("#value")).to_have_text("0")

    os.kill(process.pid, signal.SIGSTOP)
    try:
        with websocket.value.expect_event("framesent", predicate=is_sync):
            page.clock.fast_forward(QUIET_BEFORE_SYNC_MS)
        expect_connected(page)  # asked, not yet given up
        page.clock.fast_forward(SYNC_ANSWER_TIMEOUT_MS)
        expect_reconnecting(page)
        expect(page.locator(".count .label")).to_have_text("Last known count")
    finally:
        os.kill(process.pid, signal.SIGCONT)
    expect_connected(page)


def test_page_asks_for_the_state_when_it_becomes_visible(
    server_process: StartProcess, new_page: NewPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    with page.expect_websocket() as websocket:
        page.goto(served(process))
    expect_connected(page)
    # Headless tabs are always visible: the event is what a tab switch fires.
    with websocket.value.expect_event("framesent", predicate=is_sync):
        page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    expect_connected(page)


def test_page_asks_for_the_state_when_the_browser_comes_back_online(
    server_process: StartProcess, new_page: NewPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    with page.expect_websocket() as websocket:
        page.goto(served(process))
    expect_connected(page)
    page.context.set_offline(True)
    with websocket.value.expect_event("framesent", predicate=is_sync):
        page.context.set_offline(False)


def test_sync_is_answered_with_the_state(server_process: StartProcess, new_page: NewPage) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    with page.expect_websocket() as websocket:
        page.goto(served(process))
    expect_connected(page)
    answers: list[Any] = []
    websocket.value.on("framereceived", lambda payload: answers.append(json.loads(payload)))
    with websocket.value.expect_event("framereceived", predicate=lambda p: "state" in p):
        page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    users, state = answers
    assert users == {"type": "users", "count": 1}
    # The state carries its version too (docs/protocol.md): seq and epoch.
    assert state == {"type": "state", "value": 0, "seq": state["seq"], "epoch": state["epoch"]}
    assert isinstance(state["seq"], int) and isinstance(state["epoch"], str) and state["epoch"]
    expect(page.locator("#error")).to_be_hidden()


# --- Clicks, each counted once ----------------------------------------------------


def test_clicks_made_while_the_server_is_down_are_sent_after_it_comes_back_and_counted_once(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    old = server_process("--port", "0", "--rate", "0")
    page = open_page(served(old))
    expect_connected(page)
    old.stop()
    expect_reconnecting(page)

    for _ in range(3):
        page.locator("#plus").click()
    page.locator("#minus").click()
    pending = page.locator("#pending")
    expect(pending).to_have_text(f"+3 {MINUS}1 pending")
    expect(page.locator("#value")).to_have_text("0")  # only what the server confirmed

    new = server_process("--port", str(old.port), "--rate", "0")
    retry_now(page)
    expect_connected(page)
    expect(page.locator("#value")).to_have_text("2")
    expect(pending).to_have_text("")  # every one acknowledged
    assert healthz(new)["value"] == 2


def test_a_reload_keeps_the_waiting_clicks(
    server_process: StartProcess, open_page: OpenPage, tmp_path: Path
) -> None:
    state = str(tmp_path / "counters.sqlite")
    old = server_process("--port", "0", "--rate", "0", "--state", state)
    # From disk: a page the server sent could not be reloaded while it is down.
    page = open_page(from_disk(server=old.url, room="reload"))
    expect_connected(page)
    page.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("1")
    old.stop()
    expect_reconnecting(page)
    page.locator("#plus").click()
    page.locator("#plus").click()
    pending = page.locator("#pending")
    expect(pending).to_have_text("+2 pending")

    page.reload()
    expect(pending).to_have_text("+2 pending")
    new = server_process("--port", str(old.port), "--rate", "0", "--state", state)
    retry_now(page)
    expect_connected(page)
    expect(page.locator("#value")).to_have_text("3")
    expect(pending).to_have_text("")
    expect(open_page(served(new, "/c/reload")).locator("#value")).to_have_text("3")


def test_clicks_counted_but_not_acknowledged_are_not_counted_again_after_a_reload(
    server_process: StartProcess, new_page: NewPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    routed: list[WebSocketRoute] = []

    def lose_acks(ws: WebSocketRoute) -> None:
        """On the first connection, the acks after the first never reach the page."""
        routed.append(ws)
        server = ws.connect_to_server()
        if len(routed) > 1:
            return  # later connections as they are
        acks = 0

        def from_server(message: str | bytes) -> None:
            nonlocal acks
            if json.loads(message)["type"] == "ack":
                acks += 1
                if acks > 1:
                    return
            ws.send(message)

        server.on_message(from_server)

    page.route_web_socket(re.compile(r"^ws://"), lose_acks)
    page.goto(served(process))
    expect_connected(page)
    page.locator("#plus").click()
    page.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("2")  # counted, as the state says...
    expect(page.locator("#pending")).to_have_text("+2 pending")  # ...not acknowledged
    assert healthz(process)["value"] == 2

    page.reload()  # the same session: the server says both are done
    expect_connected(page)
    expect(page.locator("#pending")).to_have_text("")
    expect(page.locator("#value")).to_have_text("2")
    assert len(routed) == 2
    assert healthz(process)["value"] == 2


def test_pending_clicks_show_beside_the_confirmed_value_and_clear_as_acks_come(
    new_page: NewPage,
) -> None:
    page = new_page()
    with scripted_server(value=5) as server:
        page.goto(from_disk(server=server.url))
        expect_connected(page)
        value, pending = page.locator("#value"), page.locator("#pending")
        expect(pending).to_have_text("")

        page.locator("#plus").click()
        page.locator("#plus").click()
        page.locator("#minus").click()
        assert server.wait_for_ops(0, 3) == [
            {"action": "plus", "op": 1},
            {"action": "plus", "op": 2},
            {"action": "minus", "op": 3},
        ]
        expect(pending).to_have_text(f"+2 {MINUS}1 pending")
        expect(value).to_have_text("5")  # the confirmed value: no click added to it

        server.send(0, {"type": "state", "value": 6, "seq": 2, "epoch": "e1"})
        server.send(0, {"type": "ack", "op": 1})
        expect(value).to_have_text("6")
        expect(pending).to_have_text(f"+1 {MINUS}1 pending")
        server.send(0, {"type": "state", "value": 6, "seq": 4, "epoch": "e1"})
        server.send(0, {"type": "ack", "op": 3})  # cumulative: 2 and 3
        expect(pending).to_have_text("")

        # Read with the count, never announced on its own: no live region.
        live = "el => el.closest('[aria-live], [role=status], [role=alert], [role=log], output')"
        assert pending.evaluate(live) is None
        assert pending.evaluate("el => el.closest('p.count') !== null")


@pytest.mark.parametrize("width", [375, 1280])
def test_pending_clicks_fit_the_screen_and_keep_the_card_in_place(
    new_page: NewPage, width: int
) -> None:
    page = new_page(viewport={"width": width, "height": 720})
    with scripted_server(users=3, value=1_234_567) as server:
        page.goto(from_disk(server=server.url, room="team-42"))
        expect_connected(page)
        expect(page.locator("#value")).to_have_text("1,234,567")
        before = box(page, "main")

        for _ in range(12):
            page.locator("#plus").click()
        page.locator("#minus").click()
        server.wait_for_ops(0, 13)
        expect(page.locator("#pending")).to_have_text(f"+12 {MINUS}1 pending")
        after = box(page, "main")
        moved = {k: abs(after[k] - before[k]) for k in ("x", "y", "width", "height")}
        assert max(moved.values()) <= 1, f"the card moved at {width} px: {moved}"
        assert lines(page, "#pending") == 1
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        expect_readable(page)
        screenshot(page, f"pending-{width}")


def test_a_refused_click_shows_its_reason_and_its_number_is_not_used_again(
    new_page: NewPage,
) -> None:
    page = new_page()
    with scripted_server() as server:
        page.goto(from_disk(server=server.url))
        expect_connected(page)
        page.locator("#plus").click()
        server.wait_for_ops(0, 1)
        reason = "value out of range; action not counted"
        server.send(0, {"type": "error", "error": reason, "op": 1})
        expect(page.locator("#error")).to_have_text(reason)
        expect(page.locator("#pending")).to_have_text("")  # final: not waiting any more

        page.locator("#plus").click()
        assert server.wait_for_ops(0, 2) == [
            {"action": "plus", "op": 1},
            {"action": "plus", "op": 2},
        ]


def test_clicks_refused_as_out_of_order_go_again_in_a_new_session(new_page: NewPage) -> None:
    page = new_page()
    with scripted_server() as server:
        page.goto(from_disk(server=server.url))
        expect_connected(page)
        page.locator("#plus").click()
        page.locator("#minus").click()
        server.wait_for_ops(0, 2)

        # Op 2 skipped ahead of what the server holds; op 1 is still on its
        # way: the page must learn its fate before it starts over.
        server.send(0, {"type": "error", "error": "op out of order", "op": 2})
        server.send(0, {"type": "ack", "op": 1})
        server.wait_for_connections(2)
        assert server.sessions[1] != server.sessions[0]
        assert server.wait_for_ops(1, 1) == [{"action": "minus", "op": 1}]  # renumbered
        expect(page.locator("#pending")).to_have_text(f"{MINUS}1 pending")
        server.send(1, {"type": "ack", "op": 1})
        expect(page.locator("#pending")).to_have_text("")
        expect(page.locator("#error")).to_be_hidden()  # nothing the user must act on


def test_a_new_history_renumbers_the_waiting_clicks_and_sends_them_again(
    new_page: NewPage,
) -> None:
    page = new_page()
    with scripted_server(value=10, seq=7, epoch="old") as server:
        page.goto(from_disk(server=server.url))
        expect_connected(page)
        for _ in range(3):
            page.locator("#plus").click()
        server.wait_for_ops(0, 3)
        server.send(0, {"type": "ack", "op": 1})
        expect(page.locator("#pending")).to_have_text("+2 pending")

        # The server lost its history: a new epoch, and nothing done in it.
        server.epoch, server.seq, server.value = "new", 1, 0
        server.close_connection(0, 1012, "counter history lost; reconnect")
        server.wait_for_connections(2)
        assert server.sessions[1] == server.sessions[0]
        assert server.wait_for_ops(1, 2) == [
            {"action": "plus", "op": 1},
            {"action": "plus", "op": 2},
        ]
        expect(page.locator("#value")).to_have_text("0")  # a lower seq, but a new history


def test_nothing_is_sent_before_the_server_says_which_clicks_it_holds_as_done(
    new_page: NewPage,
) -> None:
    page = new_page()
    with scripted_server() as server:
        page.goto(from_disk(server=server.url))
        expect_connected(page)
        page.locator("#plus").click()
        page.locator("#plus").click()
        server.wait_for_ops(0, 2)
        server.done[server.sessions[0] or ""] = 1  # op 1 counted, op 2 lost on the way
        server.ack_on_connect = False
        server.close_connection(0, 1011, "internal error")
        server.wait_for_connections(2)
        expect_connected(page)

        page.locator("#minus").click()
        # The sync goes after the click: once it is in, so would be any op sent at the click.
        page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
        server.wait_for(lambda: (1, {"action": "sync"}) in server.received)
        assert server.ops(1) == []
        expect(page.locator("#pending")).to_have_text(f"+2 {MINUS}1 pending")

        server.send(1, {"type": "ack", "op": 1})
        assert server.wait_for_ops(1, 2) == [
            {"action": "plus", "op": 2},
            {"action": "minus", "op": 3},
        ]
        expect(page.locator("#pending")).to_have_text(f"+1 {MINUS}1 pending")


def test_a_state_older_than_the_one_shown_is_never_shown(new_page: NewPage) -> None:
    page = new_page()
    with scripted_server(value=5, seq=5) as server:
        page.goto(from_disk(server=server.url))
        expect_connected(page)
        expect(page.locator("#value")).to_have_text("5")
        page.evaluate(
            """() => {
              window.shown = [];
              const value = document.getElementById("value");
              new MutationObserver(() => window.shown.push(value.textContent))
                .observe(value, { childList: true, subtree: true, characterData: true });
            }"""
        )
        for value, seq in [(3, 3), (6, 6), (4, 4)]:
            server.send(0, {"type": "state", "value": value, "seq": seq, "epoch": "e1"})
        server.send(0, {"type": "state", "value": 7, "seq": 7, "epoch": "e1"})
        expect(page.locator("#value")).to_have_text("7")
        assert page.evaluate("window.shown") == ["6", "7"]


def test_the_queue_stops_at_100_clicks_and_the_buttons_say_why(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    old = server_process("--port", "0", "--rate", "0")
    page = open_page(served(old), viewport={"width": 1280, "height": 720})
    expect_connected(page)
    increase = page.get_by_role("button", name="Increase")
    increase.focus()
    old.stop()
    expect_reconnecting(page)

    for _ in range(MAX_PENDING):
        page.keyboard.press("Enter")
    expect(page.locator("#pending")).to_have_text("+100 pending")
    why = "100 clicks are waiting to be sent. The buttons work again once the server has them."
    expect(page.locator("#buttons-why")).to_have_text(why)
    for button in (increase, page.get_by_role("button", name="Decrease")):
        expect(button).to_be_disabled()
        expect(button).to_have_accessible_description(why)
    page.keyboard.press("Enter")  # nowhere to go: focus left the disabled button
    expect(page.locator("#pending")).to_have_text("+100 pending")
    expect_readable(page)
    screenshot(page, "queue-full-1280")

    # The server's default rate limit (--rate 20, --burst 40): the page paces
    # its 100 so that none is refused.
    new = server_process("--port", str(old.port))
    retry_now(page)
    expect_connected(page)
    expect(page.locator("#value")).to_have_text("100")
    expect(page.locator("#pending")).to_have_text("")
    expect(page.locator("#buttons-why")).to_have_text("")
    expect(increase).to_be_focused()  # back where it was
    assert healthz(new)["value"] == MAX_PENDING


def test_a_duplicated_tab_leaves_the_waiting_clicks_to_its_original_and_takes_its_own_session(
    server_process: StartProcess, new_page: NewPage
) -> None:
    old = server_process("--port", "0", "--rate", "0")
    original = new_page()
    address = from_disk(server=old.url, room="twins")  # opens while the server is down
    original.goto(address)
    expect_connected(original)
    old.stop()
    expect_reconnecting(original)
    original.locator("#plus").click()
    original.locator("#plus").click()
    expect(original.locator("#pending")).to_have_text("+2 pending")

    # A duplicated tab starts with a copy of the original's sessionStorage.
    copy = original.context.new_page()
    storage = original.evaluate("JSON.stringify(Object.entries(sessionStorage))")
    copy.add_init_script(f"for (const [k, v] of {storage}) sessionStorage.setItem(k, v);")
    with copy.expect_websocket() as copy_socket:
        copy.goto(address)
    expect(copy.locator("#pending")).to_have_text("")

    new = server_process("--port", str(old.port), "--rate", "0")
    for page in (original, copy):
        retry_now(page)
        expect_connected(page)
        expect(page.locator("#value")).to_have_text("2")
    original.locator("#plus").click()
    copy.locator("#plus").click()  # the same op number as the original's, in another session
    for page in (original, copy):
        expect(page.locator("#value")).to_have_text("4")
        expect(page.locator("#pending")).to_have_text("")
    stored = json.loads(storage)[0][1]
    assert session_of(copy_socket.value.url) != json.loads(stored)["session"]
    assert new.port == old.port


# --- Tokens ------------------------------------------------------------------------


@pytest.fixture
def secret_file(tmp_path: Path) -> tuple[str, bytes]:
    """An HS256 secret in a file, for --token-secret-file: its path and the secret."""
    secret = secrets.token_urlsafe(48).encode()
    path = tmp_path / "token-secret"
    path.write_bytes(secret)
    return str(path), secret


def mint(secret: bytes, *, rooms: list[str], can: str = "write", lasts: float = 3600) -> str:
    """A token for ``rooms``, valid for ``lasts`` seconds from now (whole seconds, rounded up)."""
    claims = {"sub": "tester", "exp": math.ceil(time.time() + lasts), "rooms": rooms, "can": can}
    return jwt.encode(claims, secret, "HS256")


def with_token(url: str, token: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{urlencode({'token': token})}"


def test_a_write_token_in_the_address_lets_the_page_change_the_counter(
    server_process: StartProcess, new_page: NewPage, secret_file: tuple[str, bytes]
) -> None:
    path, secret = secret_file
    process = server_process("--port", "0", "--rate", "0", "--token-secret-file", path)
    token = mint(secret, rooms=["team"])
    page = new_page()
    with page.expect_websocket() as websocket:
        page.goto(with_token(served(process, "/c/team"), token))
    assert parse_qs(urlsplit(websocket.value.url).query)["token"] == [token]
    expect_connected(page)
    page.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("1")
    expect(page.locator("#pending")).to_have_text("")
    expect(page.locator("#buttons-why")).to_have_text("")


@pytest.mark.parametrize("width", [375, 1280])
def test_without_a_token_a_read_only_counter_is_shown_read_only_and_why(
    server_process: StartProcess, open_page: OpenPage, secret_file: tuple[str, bytes], width: int
) -> None:
    path, secret = secret_file
    process = server_process(
        "--port", "0", "--rate", "0", "--token-secret-file", path, "--anonymous", "read"
    )
    writer = open_page(with_token(served(process, "/c/poll"), mint(secret, rooms=["poll"])))
    expect_connected(writer)
    writer.locator("#plus").click()

    page = open_page(served(process, "/c/poll"), viewport={"width": width, "height": 720})
    expect_connected(page)
    expect(page.locator("#value")).to_have_text("1")  # it watches
    expect(page.locator(".users")).to_have_text("2 users online")
    why = "Read-only: this counter needs a token to change."
    expect(page.locator("#buttons-why")).to_have_text(why)
    for name in ("Increase", "Decrease"):
        button = page.get_by_role("button", name=name)
        expect(button).to_be_disabled()
        expect(button).to_have_accessible_description(why)
    writer.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("2")  # still following, still read-only
    expect(page.locator("#buttons-why")).to_have_text(why)
    expect(page.locator("#pending")).to_have_text("")
    expect_readable(page)
    screenshot(page, f"read-only-{width}")
    if width == 375:
        assert serious_axe_violations(page) == []


@pytest.mark.parametrize("width", [375, 1280])
def test_an_expired_token_closes_the_page_s_connection_and_the_page_says_so(
    server_process: StartProcess, new_page: NewPage, secret_file: tuple[str, bytes], width: int
) -> None:
    path, secret = secret_file
    process = server_process("--port", "0", "--rate", "0", "--token-secret-file", path)
    page = new_page(viewport={"width": width, "height": 720})
    count_sockets(page)
    page.clock.install()
    page.goto(with_token(served(process, "/c/brief"), mint(secret, rooms=["brief"], lasts=2)))
    expect_connected(page)
    expect(page.locator("#buttons-why")).to_have_text("")

    # The server closes it with 1008 "token expired" when exp passes.
    expect(page.locator("#status")).to_have_text("disconnected")
    expect(page.locator("#buttons-why")).to_have_text(
        "Your access token expired, so the server closed the connection. "
        "Open the page again with a new token to carry on."
    )
    expect(page.locator("#plus")).to_be_disabled()
    expect(page.locator("#value-label")).to_have_text("Last known count")
    page.clock.fast_forward(60_000)  # many times the longest backoff
    assert sockets_created(page) == 1  # the same token would only be refused
    expect_readable(page)
    screenshot(page, f"token-expired-{width}")


def test_a_refused_token_is_shown_in_words_and_not_tried_again(
    server_process: StartProcess, new_page: NewPage, secret_file: tuple[str, bytes]
) -> None:
    path, _ = secret_file
    process = server_process(
        "--port", "0", "--rate", "0", "--token-secret-file", path, "--anonymous", "none"
    )
    page = new_page()
    count_sockets(page)
    page.clock.install()
    forged = mint(secrets.token_bytes(48), rooms=["/"])  # signed with another secret
    page.goto(with_token(served(process), forged))
    origin = urlencode({"origin": f"http://127.0.0.1:{process.port}"})
    refused = json.loads(http_get(process, f"/admission?{origin}&token={forged}")[2])
    anonymous = json.loads(http_get(process, f"/admission?{origin}")[2])
    assert refused["status"] == 401
    assert refused["reason"] != anonymous["reason"]  # so the page must pass its token on
    expect(page.locator("#problem")).to_have_text(
        f"The server refused the connection: {refused['reason']}."
    )
    expect(page.locator("#status")).to_have_text("disconnected")
    expect(page.locator("#buttons-why")).to_have_text(
        "Changing or watching this counter needs a valid access token. "
        "Open the page again with one."
    )
    page.clock.fast_forward(60_000)
    assert sockets_created(page) == 1


# --- Refusals ----------------------------------------------------------------------


def test_a_full_server_is_shown_as_a_refusal_and_retried(
    server_process: StartProcess, open_page: OpenPage, new_page: NewPage
) -> None:
    process = server_process("--port", "0", "--rate", "0", "--max-users", "1")
    first = open_page(served(process))
    expect_connected(first)

    second = new_page()
    second.clock.install()
    second.goto(served(process))
    expect_reconnecting(second)
    problem = second.locator("#problem")
    expect(problem).to_contain_text("The server refused the connection: server full.")
    expect(problem).to_contain_text("Trying again in")
    expect_readable(second)

    first.close()
    second.clock.fast_forward(15_000)  # past the longest backoff
    expect_connected(second)
    expect(problem).to_have_text("")


def test_too_many_connections_from_one_address_is_shown_as_a_refusal(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0", "--max-users-per-ip", "1")
    expect_connected(open_page(served(process)))

    page = open_page(served(process))
    expect_reconnecting(page)
    expect(page.locator("#problem")).to_contain_text(
        "The server refused the connection: too many connections from your address."
    )


def test_too_many_counters_is_shown_as_a_refusal(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    # Only rooms with users count (the empty default one does not): one fills it.
    process = server_process("--port", "0", "--rate", "0", "--max-rooms", "1")
    expect_connected(open_page(served(process, "/c/first")))

    page = open_page(served(process, "/c/second"))
    expect_reconnecting(page)
    expect(page.locator("#problem")).to_contain_text(
        "The server refused the connection: too many counters in use."
    )


def test_a_page_from_another_origin_is_shown_as_a_refusal(
    server_process: StartProcess, open_page: OpenPage, tmp_path: Path
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    shutil.copy(PAGE_FILE, tmp_path / "client.html")
    with static_site(tmp_path) as site:
        page = open_page(f"{site.url}client.html?{urlencode({'server': process.url})}")
        expect_reconnecting(page)
        expect(page.locator("#problem")).to_contain_text(
            "The server refused the connection: origin not allowed."
        )


# --- Errors -----------------------------------------------------------------------


def test_server_error_is_shown_briefly(server_process: StartProcess, new_page: NewPage) -> None:
    process = server_process("--port", "0", "--rate", "1", "--burst", "1")
    page = new_page()
    # A fake clock lets the test skip the seconds the error stays up.
    page.clock.install()
    page.goto(served(process))
    expect_connected(page)
    error = page.locator("#error")
    expect(error).to_be_hidden()

    for _ in range(4):  # the first is counted, the rest are over the limit
        page.locator("#plus").click()
    expect(error).to_be_visible()
    expect(error).to_contain_text("rate limit exceeded")

    page.clock.fast_forward(10_000)
    expect(error).to_be_hidden()


# --- Keyboard -------------------------------------------------------------------


def test_keyboard_reaches_the_buttons_and_presses_them(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = open_page(served(process))
    expect_connected(page)
    decrease = page.get_by_role("button", name="Decrease")
    increase = page.get_by_role("button", name="Increase")

    page.keyboard.press("Tab")
    expect(decrease).to_be_focused()
    page.keyboard.press("Tab")
    expect(increase).to_be_focused()

    page.keyboard.press("Enter")
    expect(page.locator("#value")).to_have_text("1")
    page.keyboard.press("Space")
    expect(page.locator("#value")).to_have_text("2")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")
    expect(page.locator("#value")).to_have_text("1")


def test_keyboard_focus_stays_on_the_button_while_disconnected(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    old = server_process("--port", "0", "--rate", "0")
    page = open_page(served(old))
    expect_connected(page)
    increase = page.get_by_role("button", name="Increase")
    increase.focus()

    old.stop()
    expect_reconnecting(page)
    expect(increase).to_be_enabled()  # clicks wait in the queue
    expect(increase).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#pending")).to_have_text("+1 pending")

    server_process("--port", str(old.port), "--rate", "0")
    expect_connected(page)
    expect(page.locator("#value")).to_have_text("1")
    expect(increase).to_be_focused()


# --- Accessibility and layout ---------------------------------------------------------


def test_value_changes_are_announced_politely_at_most_every_few_seconds(
    server_process: StartProcess, new_page: NewPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    page.clock.install()
    page.goto(served(process))
    expect_connected(page)
    announce = page.locator("#announce")
    expect(announce).to_have_attribute("aria-live", "polite")
    expect(announce).to_have_text("")  # the first value is not news
    # The visible number is in no live region: it may change many times a second.
    live = "el => el.closest('[aria-live], [role=status], [role=alert], [role=log], output')"
    assert page.locator("#value").evaluate(live) is None

    page.locator("#plus").click()
    expect(announce).to_have_text("Count: 1")
    for _ in range(3):
        page.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("4")
    expect(announce).to_have_text("Count: 1")

    page.clock.fast_forward(ANNOUNCE_EVERY_MS)
    expect(announce).to_have_text("Count: 4")


@pytest.mark.parametrize("state", ["connected", "disconnected"])
def test_axe_finds_no_serious_violations(
    server_process: StartProcess, open_page: OpenPage, state: str
) -> None:
    require_axe()
    process = server_process("--port", "0", "--rate", "0")
    page = open_page(served(process, "/c/axe"))
    expect_connected(page)
    page.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("1")
    if state == "disconnected":
        process.stop()
        expect_reconnecting(page)
    assert serious_axe_violations(page) == []


def test_the_not_found_page_has_no_serious_violations_and_readable_text(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    require_axe()
    process = server_process("--port", "0", "--rate", "0")
    page = open_page(served(process, "/c/two%20words"), viewport={"width": 375, "height": 720})
    expect(page.get_by_role("heading", level=1)).to_have_text("No such counter")
    screenshot(page, "not-a-counter-375")
    expect_readable(page)
    assert serious_axe_violations(page) == []


@pytest.mark.parametrize("state", ["connected", "disconnected"])
def test_every_text_meets_aa_contrast(
    server_process: StartProcess, open_page: OpenPage, state: str
) -> None:
    # --rate 1: a third click is refused, so the error box is on screen too.
    process = server_process("--port", "0", "--rate", "1", "--burst", "1")
    page = open_page(served(process, "/c/contrast"))
    expect_connected(page)
    for _ in range(3):
        page.locator("#plus").click()
    expect(page.locator("#error")).to_be_visible()
    if state == "disconnected":
        process.stop()
        expect_reconnecting(page)
        page.locator("#plus").click()
        # With the click past the limit (never answered: 1008 closed the page).
        expect(page.locator("#pending")).to_have_text(re.compile(r"\+\d+ pending"))
    expect_readable(page)


def test_long_values_wrap_between_digit_groups_on_a_narrow_screen(new_page: NewPage) -> None:
    page = new_page(viewport={"width": 320, "height": 640})
    with scripted_server(users=12_345, value=-LARGEST) as server:
        page.goto(from_disk(server=server.url, room="n" * 64))
        expect_connected(page)
        value = page.locator("#value")
        expect(value).to_have_text("-9,007,199,254,740,991")
        expect(page.locator(".users")).to_have_text("12,345 users online")
        screenshot(page, "long-value-320")

        groups = value.locator(".group")
        assert groups.all_text_contents() == ["-9,", "007,", "199,", "254,", "740,", "991"]
        # An inline box split over two lines has two rectangles.
        assert groups.evaluate_all("gs => gs.map(g => g.getClientRects().length)") == [1] * 6
        tops = groups.evaluate_all("gs => gs.map(g => g.getBoundingClientRect().top)")
        assert len(set(tops)) > 1, "expected the value to wrap at 320 px"
        value_right = value.evaluate("v => v.getBoundingClientRect().right")
        plus_left = page.locator("#plus").evaluate("b => b.getBoundingClientRect().left")
        assert value_right <= plus_left
        assert page.evaluate("document.documentElement.scrollWidth") <= 320


@pytest.mark.parametrize("width", [1280, 375])
@pytest.mark.parametrize("state", ["connected", "disconnected"])
def test_page_fits_the_screen_width(new_page: NewPage, width: int, state: str) -> None:
    page = new_page(viewport={"width": width, "height": 720})
    with scripted_server(users=3, value=1_234_567) as server:
        page.goto(from_disk(server=server.url, room="team-42"))
        expect_connected(page)
        expect(page.locator("#value")).to_have_text("1,234,567")
        if state == "disconnected":
            server.stop()
            expect_reconnecting(page)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        screenshot(page, f"{state}-{width}")
