"""The chat demo in real Chromium (Debian's, driven by playwright), against `tornado-sse demo`.

The demo runs as the real command in a subprocess; each test drives its own browser on its own
asyncio loop (playwright's async API needs one), with every wait bounded. Set
``DEMO_SCREENSHOT=docs/demo.png`` to refresh the README's screenshot from this run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.helpers import PORT_ATTEMPTS, PORT_TAKEN, free_port, listens_on

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
#: milliseconds; every playwright wait is bounded by this
WAIT = 10_000
#: the demo's reconnection delay (ms)
RETRY = 500
#: seconds a lost connection keeps its member listed: longer than any drop in these tests lasts,
#: however slow the machine (the drop test holds the reconnect until it has posted)
PRESENCE_GRACE = 30.0


def _playwright_available() -> bool:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    """``tornado-sse demo`` in a subprocess; its base URL."""
    with demo("--presence-grace", str(PRESENCE_GRACE), "--retry", str(RETRY)) as (url, _):
        yield url


@contextmanager
def demo(*args: str) -> Iterator[tuple[str, dict[str, str]]]:
    """``tornado-sse demo *args`` in a subprocess: its base URL, and the headers of its first
    ``/healthz`` answer (``X-Demo-Hub`` names the process running the bridge hub)."""
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)")
    require(_playwright_available(), "the playwright package is missing (pip install playwright)")
    for _ in range(PORT_ATTEMPTS):  # a port taken in between: try another
        port = free_port()
        log = tempfile.TemporaryFile()
        command = [sys.executable, "-m", "tornado_sse.cli", "demo", "--port", str(port), *args]
        process = subprocess.Popen(command, stdout=log, stderr=log)
        if listens_on(process, port) or PORT_TAKEN not in _read(log):
            break
        log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, "the demo exited at start:\n" + _read(log)
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        headers = {k.lower(): v for k, v in response.headers.items()}
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the demo did not start:\n" + _read(log)
            time.sleep(0.05)
        yield url, headers
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


def _read(log: Any) -> str:
    log.seek(0)
    return str(log.read().decode(errors="replace"))[-3000:]


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class Tab:
    """One browser context (its own cookies) showing the chat page."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        #: the process (``X-Demo-Process``) that answered each of this page's stream requests
        self.stream_workers: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("response", self._response)

    def _response(self, response: Any) -> None:
        if "/events?" in response.url and "until=" not in response.url:
            self.stream_workers.append(response.headers.get("x-demo-process", ""))

    @classmethod
    async def open(cls, browser: Any, url: str, **context: Any) -> Tab:
        ctx = await browser.new_context(viewport={"width": 1000, "height": 640}, **context)
        ctx.set_default_timeout(WAIT)
        page = await ctx.new_page()
        tab = cls(page)
        await page.goto(url + "/")
        return tab

    async def join(self, nick: str, room: str) -> None:
        from playwright.async_api import expect

        await self.page.fill("#nick", nick)
        await self.page.fill("#room", room)
        await self.page.click("#join")
        await expect(self.status).to_have_attribute("data-state", "connected", timeout=WAIT)

    @property
    def status(self) -> Any:
        return self.page.locator("#status")

    async def send(self, text: str) -> str:
        """Type *text* and press Enter; wait for the answer; return the error shown, if any."""
        await self.page.fill("#text", text)
        await self.page.press("#text", "Enter")
        await self.page.wait_for_function(
            "() => !document.getElementById('send').disabled", timeout=WAIT
        )
        return str(await self.page.text_content("#send-error") or "")

    async def say(self, text: str) -> None:
        """Send *text* and wait until this page shows it (it comes back through the stream)."""
        assert await self.send(text) == ""
        await self.wait_texts(text, 1)

    async def post_all(self, room: str, nick: str, texts: list[str]) -> None:
        """POST *texts* from this page's context, one after the other, without waiting for them
        to come back (faster than typing, so that they surely arrive while another tab is away).
        """
        await self.page.evaluate(
            """async ([room, nick, texts]) => {
                const token = document.querySelector('meta[name="xsrf-token"]').content;
                for (const text of texts) {
                    const response = await fetch(`/api/rooms/${room}/messages`, {
                        method: 'POST',
                        headers: { 'X-XSRFToken': token },
                        body: new URLSearchParams({ nick, text }),
                    });
                    if (response.status !== 201) throw new Error(await response.text());
                }
            }""",
            [room, nick, texts],
        )

    async def wait_texts(self, text: str, count: int) -> None:
        await self.page.wait_for_function(
            """([text, count]) => [...document.querySelectorAll('#log .msg .text')]
                   .filter((n) => n.textContent === text).length >= count""",
            arg=[text, count],
            timeout=WAIT,
        )

    async def texts(self) -> list[str]:
        return list(await self.page.locator("#log .msg .text").all_text_contents())

    async def members(self) -> list[str]:
        return list(await self.page.locator("#members li").all_text_contents())

    async def wait_members(self, names: list[str]) -> None:
        await self.page.wait_for_function(
            """(names) => JSON.stringify([...document.querySelectorAll('#members li')]
                   .map((n) => n.textContent)) === JSON.stringify(names)""",
            arg=names,
            timeout=WAIT,
        )

    async def notices(self) -> list[str]:
        return list(await self.page.locator("#log .notice").all_text_contents())


def run(scenario: Any) -> None:
    asyncio.run(asyncio.wait_for(scenario, 50))


def test_two_tabs_chat_with_presence(demo_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with chromium() as browser:
            alice = await Tab.open(browser, demo_url)
            bob = await Tab.open(browser, demo_url)
            await alice.join("alice", "tea-room")
            await alice.wait_members(["alice"])
            await bob.join("bob", "tea-room")
            for tab in (alice, bob):
                await tab.wait_members(["alice", "bob"])
            await alice.say("Hi Bob! Is the new build out?")
            await bob.wait_texts("Hi Bob! Is the new build out?", 1)
            await bob.say("Yes, deployed five minutes ago.")
            await alice.wait_texts("Yes, deployed five minutes ago.", 1)
            await alice.say("Great: the dashboard now updates live, no polling.")
            await bob.wait_texts("Great: the dashboard now updates live, no polling.", 1)
            # bob's view began with the room's history: alice's arrival is in it
            assert await bob.notices() == ["alice joined", "bob joined"]
            assert await alice.notices() == ["alice joined", "bob joined"]
            await bob.page.locator("#text").fill("Server-Sent Events, resumable")
            shot = tmp_path / "demo.png"
            await bob.page.screenshot(path=str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            target = os.environ.get("DEMO_SCREENSHOT")
            if target:
                shutil.copyfile(shot, target)
            await bob.page.click("#leave")
            await alice.wait_members(["alice"])
            await alice.page.wait_for_function(
                "() => [...document.querySelectorAll('#log .notice')]"
                ".some((n) => n.textContent === 'bob left')",
                timeout=WAIT,
            )
            assert alice.errors == [] and bob.errors == []

    run(scenario())


def test_html_in_a_message_is_shown_as_text(demo_url: str) -> None:
    payload = (
        '<img src=x onerror="window.__pwned=1"><b>bold</b>'
        "<script>window.__pwned=2</script>&amp; <i>done</i>"
    )

    async def scenario() -> None:
        async with chromium() as browser:
            alice = await Tab.open(browser, demo_url)
            bob = await Tab.open(browser, demo_url)
            await alice.join("alice", "html")
            await bob.join("bob", "html")
            await alice.say(payload)
            await bob.wait_texts(payload, 1)
            for tab in (alice, bob):
                log = tab.page.locator("#log")
                assert await log.locator("img, b, i, script").count() == 0
                assert await tab.page.evaluate("() => window.__pwned") is None
            error = await alice.send("x" * 501)
            assert "at most 500 characters" in error
            assert await alice.page.input_value("#text") == "x" * 501
            assert await alice.page.text_content("#counter") == "501/500"
            third = await Tab.open(browser, demo_url)
            await third.page.fill("#nick", "<b>eve</b>")
            await third.page.fill("#room", "html")
            await third.page.click("#join")
            await third.page.wait_for_function(
                "() => document.getElementById('join-error').textContent !== ''", timeout=WAIT
            )
            assert "letters, digits" in str(await third.page.text_content("#join-error"))
            assert await third.page.is_hidden("#chat")

    run(scenario())


def test_server_side_drop_resumes_with_each_missed_message_once(demo_url: str) -> None:
    missed = [f"sent while bob was away #{i}" for i in range(3)]

    async def scenario() -> None:
        from playwright.async_api import expect

        async with chromium() as browser:
            alice = await Tab.open(browser, demo_url)
            bob = await Tab.open(browser, demo_url)
            await alice.join("alice", "drops")
            await bob.join("bob", "drops")
            await bob.wait_members(["alice", "bob"])
            await alice.say("before the drop")
            await bob.wait_texts("before the drop", 1)
            # Hold bob's reconnection (a slow network) until the missed messages are posted:
            # whatever the jittered retry delay and the machine's speed, they are published
            # while bob has no stream, and reach him only through the resume.
            reconnects: asyncio.Queue[Any] = asyncio.Queue()
            await bob.page.route("**/api/rooms/drops/events*", reconnects.put_nowait)
            await bob.page.click("#drop")
            await expect(bob.status).to_have_attribute("data-state", "reconnecting", timeout=WAIT)
            held = await asyncio.wait_for(reconnects.get(), WAIT / 1000 + RETRY * 2 / 1000)
            await alice.post_all("drops", "alice", missed)
            for text in missed:
                await alice.wait_texts(text, 1)
            assert await bob.status.get_attribute("data-state") == "reconnecting"
            await held.continue_()
            await bob.page.unroute("**/api/rooms/drops/events*")
            await expect(bob.status).to_have_attribute("data-state", "resumed", timeout=WAIT)
            await bob.wait_texts(missed[-1], 1)
            await alice.say("after the resume")
            await bob.wait_texts("after the resume", 1)
            texts = await bob.texts()
            assert texts == ["before the drop", *missed, "after the resume"]
            items = bob.page.locator("#log .msg")
            ids = [await items.nth(i).get_attribute("data-id") for i in range(len(texts))]
            conns = [await items.nth(i).get_attribute("data-conn") for i in range(len(texts))]
            assert len(set(ids)) == len(ids)
            assert conns == ["1", "2", "2", "2", "2"]
            # the grace period hid the drop from the others
            assert await alice.notices() == ["alice joined", "bob joined"]
            assert await alice.members() == ["alice", "bob"]

    run(scenario())


def test_rate_limit_message_is_shown(demo_url: str) -> None:
    async def scenario() -> None:
        async with chromium() as browser:
            alice = await Tab.open(browser, demo_url)
            await alice.join("speedy", "limits")
            error = ""
            for i in range(12):
                error = await alice.send(f"message {i}")
                if error:
                    break
            assert error.startswith("Slow down: 5 messages at once, then 1 per second.")
            assert "Try again in" in error
            assert await alice.page.is_visible("#send-error")
            # the refused message stays in the box, to be sent again
            assert (await alice.page.input_value("#text")).startswith("message ")

    run(scenario())


#: records every change of the member list and every notice the page shows, from now on
RECORD_CHANGES = """() => {
    window.__changes = [];
    const members = document.getElementById('members');
    new MutationObserver(() => {
        const names = [...members.querySelectorAll('li')].map((n) => n.textContent);
        window.__changes.push('members: ' + names.join(','));
    }).observe(members, { childList: true, subtree: true, characterData: true });
    new MutationObserver((mutations) => {
        for (const mutation of mutations) {
            for (const node of mutation.addedNodes) {
                if (node.classList && node.classList.contains('notice')) {
                    window.__changes.push('notice: ' + node.textContent);
                }
            }
        }
    }).observe(document.getElementById('log'), { childList: true });
}"""

#: seconds a lost connection keeps its member listed in the killed-worker test: its pages
#: reconnect within it (a jittered retry of at most RETRY ms, on a busy machine)
KILL_GRACE = 10.0


def test_a_killed_workers_members_stay_listed_while_their_pages_move() -> None:
    """``--processes 3``: pages in one room spread over the workers; one worker (not the one
    running the bridge hub) is killed with ``kill -9``. Its pages reconnect to another worker
    within the grace period, and no page ever shows a member leaving or joining."""

    async def scenario(url: str, hub: str) -> None:
        async with chromium() as browser:
            tabs: list[Tab] = []
            nicks: list[str] = []

            def by_worker() -> dict[str, list[int]]:
                held: dict[str, list[int]] = {}
                for n, tab in enumerate(tabs):
                    held.setdefault(tab.stream_workers[-1], []).append(n)
                return held

            def victim() -> str | None:
                # a worker other than the hub's, holding a page, with a page elsewhere to watch
                for worker, held in by_worker().items():
                    if worker != hub and len(held) < len(tabs):
                        return worker
                return None

            while len(tabs) < 4 or victim() is None:
                assert len(tabs) < 16, f"the pages all landed on one worker: {by_worker()}"
                tab = await Tab.open(browser, url)
                nick = f"user{len(tabs)}"
                await tab.join(nick, "workers")
                assert tab.stream_workers, "the page's stream request was not seen"
                tabs.append(tab)
                nicks.append(nick)
            for tab in tabs:
                await tab.wait_members(nicks)
                await tab.page.evaluate(RECORD_CHANGES)
            doomed = victim()
            assert doomed is not None
            moved = by_worker()[doomed]
            os.kill(int(doomed), signal.SIGKILL)
            for n in moved:
                await tabs[n].page.wait_for_function(
                    "() => document.getElementById('status').dataset.state === 'resumed'",
                    timeout=WAIT + KILL_GRACE * 1000,
                )
                assert tabs[n].stream_workers[-1] not in ("", doomed)
            # Each moved page speaks once it is back; once every page shows every one of these,
            # it also shows any join or leave published before them (ids are in order): a
            # reconnect later than the grace period would have been a leave, then a join.
            for n in moved:
                await tabs[n].say(f"{nicks[n]} is back")
            for tab in tabs:
                for n in moved:
                    await tab.wait_texts(f"{nicks[n]} is back", 1)
            for n, tab in enumerate(tabs):
                changes = await tab.page.evaluate("() => window.__changes")
                assert [c for c in changes if c != "members: " + ",".join(nicks)] == [], (
                    f"page of {nicks[n]} (moved: {[nicks[m] for m in moved]})"
                )
                assert tab.errors == []

    with demo("--processes", "3", "--presence-grace", str(KILL_GRACE), "--retry", str(RETRY)) as (
        url,
        headers,
    ):
        asyncio.run(asyncio.wait_for(scenario(url, headers["x-demo-hub"]), 90))
