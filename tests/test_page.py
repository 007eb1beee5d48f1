"""client.html in real headless Chromium, against ``python server.py`` subprocesses."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.conftest import StartProcess
from tests.helpers import ROOT, TIMEOUT, ServerProcess, require_binary

PAGE_FILE = ROOT / "client.html"
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


NewPage = Callable[[], Page]
OpenPage = Callable[[str], Page]

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

    def new() -> Page:
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        return context.new_page()

    yield new
    for context in contexts:
        context.close()


@pytest.fixture
def open_page(new_page: NewPage) -> OpenPage:
    """Open a URL in a new page of its own context."""

    def open_(url: str) -> Page:
        page = new_page()
        page.goto(url)
        return page

    return open_


def served(process: ServerProcess) -> str:
    return f"http://127.0.0.1:{process.port}/"


def from_disk(**query: str) -> str:
    url = PAGE_FILE.as_uri()
    return f"{url}?{urlencode(query)}" if query else url


def expect_connected(page: Page) -> None:
    expect(page.locator("body")).to_have_attribute("data-status", "connected")
    expect(page.locator("#status")).to_have_text("connected")


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


# --- Which server the page talks to -------------------------------------------


def test_page_served_by_the_server_connects_to_the_same_host(
    server_process: StartProcess, new_page: NewPage
) -> None:
    process = server_process("--port", "0", "--rate", "0")
    page = new_page()
    with page.expect_websocket() as websocket:
        page.goto(served(process))
    assert websocket.value.url == f"ws://127.0.0.1:{process.port}/"
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
    assert websocket.value.url == "ws://localhost:6789/"


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
    expect(page.locator("body")).to_have_attribute("data-status", "reconnecting")
    expect(page.locator("#status")).to_have_text("reconnecting…")
    expect(page.locator("#plus")).to_be_disabled()
    expect(page.locator("#minus")).to_be_disabled()

    # A new process starts from 0: showing 0 proves the page took fresh state.
    server_process("--port", str(old.port), "--rate", "0")
    expect_connected(page)
    expect(page.locator("#value")).to_have_text("0")
    expect(page.locator("#plus")).to_be_enabled()
    page.locator("#plus").click()
    expect(page.locator("#value")).to_have_text("1")


def test_page_keeps_retrying_while_no_server_answers(open_page: OpenPage) -> None:
    # A bound socket that never listens: the port is ours and refuses every connect.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
        page = open_page(from_disk(server=f"ws://127.0.0.1:{port}/"))
        expect(page.locator("body")).to_have_attribute("data-status", "reconnecting")
        expect(page.locator("#status")).to_have_text("reconnecting…")
        expect(page.locator("#plus")).to_be_disabled()
        expect(page.locator("#minus")).to_be_disabled()


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


def test_keyboard_focus_returns_to_the_button_after_a_reconnect(
    server_process: StartProcess, open_page: OpenPage
) -> None:
    old = server_process("--port", "0", "--rate", "0")
    page = open_page(served(old))
    expect_connected(page)
    increase = page.get_by_role("button", name="Increase")
    increase.focus()

    old.stop()
    expect(increase).to_be_disabled()
    expect(increase).not_to_be_focused()  # a disabled button cannot hold focus

    server_process("--port", str(old.port), "--rate", "0")
    expect_connected(page)
    expect(increase).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#value")).to_have_text("1")
