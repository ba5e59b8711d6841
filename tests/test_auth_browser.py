"""Private channels in real Chromium (Debian's, driven by playwright) against a real
``tornado-sse serve --jwt-secret`` process (issue 13).

The page comes from another origin (a Tornado application of the test's own, on another port),
as an application's page would:

* a cookie-authenticated cross-origin stream: the page's server sets the token cookie, the page
  opens ``new EventSource(hub, {withCredentials: true})``; without credentials the same stream
  is refused (401, which EventSource takes as final);
* a page whose token expires mid-stream gets ``token-expired``, takes a new token from its
  server and opens a new EventSource with ``last_event_id=``: every event published before,
  during and after arrives once, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import tornado.web
from tornado.httpserver import HTTPServer

from tests.conftest import require
from tests.helpers import free_port
from tests.test_server import TOKEN, Hub, start_hub
from tornado_sse import auth

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
#: milliseconds; every playwright wait is bounded by this
WAIT = 15_000
SECRET = "browser-test-secret-0123456789abcdef"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>private</title></head><body>
<script>
const HUB = %(hub)s;
const CHANNEL = "user/alice";
window.withCookie = []; window.withoutCookie = []; window.refused = false;
window.received = []; window.expired = 0; window.opened = 0; window.failures = 0;

function cookieStreams() {
  const good = new EventSource(HUB + "/events?channel=" + CHANNEL, {withCredentials: true});
  good.onmessage = (e) => window.withCookie.push(e.data);
  const bare = new EventSource(HUB + "/events?channel=" + CHANNEL);
  bare.onmessage = (e) => window.withoutCookie.push(e.data);
  bare.onerror = () => { window.refused = bare.readyState === EventSource.CLOSED; };
}

async function follow(lastId) {
  const token = await (await fetch("/token")).text();
  let url = HUB + "/events?channel=" + CHANNEL + "&access_token=" + encodeURIComponent(token);
  if (lastId) url += "&last_event_id=" + encodeURIComponent(lastId);
  const source = new EventSource(url);
  source.onopen = () => { window.opened += 1; };
  source.onmessage = (e) => window.received.push(e.data);
  source.onerror = () => { window.failures += 1; };
  source.addEventListener("token-expired", (e) => {
    window.expired += 1;
    const id = e.lastEventId;  // an EventSource has no lastEventId of its own: its events do
    source.close();
    follow(id);
  });
}
</script></body></html>
"""


class Page(tornado.web.RequestHandler):
    def get(self) -> None:
        token = self.settings["tokens"](ttl=3600)
        self.set_cookie(auth.COOKIE, token, httponly=True, samesite="Lax")
        self.finish(PAGE % {"hub": json.dumps(self.settings["hub"])})


class Token(tornado.web.RequestHandler):
    def get(self) -> None:
        issued = self.settings["issued"]
        ttl = 2 if not issued else 3600  # the first token expires while the page follows
        issued.append(self.settings["tokens"](ttl=ttl))
        self.set_header("Content-Type", "text/plain")
        self.finish(issued[-1])


def tokens(ttl: float) -> str:
    return auth.create_token(SECRET, subject="alice", subscribe=["user/alice"], ttl=ttl)


@pytest.fixture(scope="module")
def hub_and_page_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hub, str]]:
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)")
    page_port = free_port()
    origin = f"http://127.0.0.1:{page_port}"
    os.environ["TORNADO_SSE_JWT_SECRET"] = SECRET
    try:
        hub = start_hub(
            tmp_path_factory.mktemp("hub") / "hub.log",
            "--cors-origin",
            origin,
            "--retry",
            "200",
            open_access=False,
        )
    finally:
        del os.environ["TORNADO_SSE_JWT_SECRET"]
    try:
        yield hub, origin
    finally:
        hub.stop()


@asynccontextmanager
async def page_server(hub: Hub, origin: str) -> AsyncIterator[list[str]]:
    issued: list[str] = []
    app = tornado.web.Application(
        [(r"/", Page), (r"/token", Token)], hub=hub.url, tokens=tokens, issued=issued
    )
    server = HTTPServer(app)
    server.listen(int(origin.rsplit(":", 1)[1]), "127.0.0.1")
    try:
        yield issued
    finally:
        server.stop()


@asynccontextmanager
async def browser_page(url: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context()
            context.set_default_timeout(WAIT)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(url)
            yield page
            assert errors == []
        finally:
            await browser.close()


async def publish(client: httpx.AsyncClient, hub: Hub, data: str) -> str:
    reply = await client.post(
        hub.url + "/publish",
        json={"channel": "user/alice", "data": data},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert reply.status_code == 202, reply.text
    return str(reply.json()["id"])


def test_cookie_authenticated_cross_origin_stream(hub_and_page_origin: tuple[Hub, str]) -> None:
    hub, origin = hub_and_page_origin

    async def run() -> None:
        async with page_server(hub, origin), browser_page(origin + "/") as page:
            await page.evaluate("cookieStreams()")
            await page.wait_for_function("window.refused === true")
            async with httpx.AsyncClient(timeout=10) as client:
                for attempt in range(100):  # until the stream, once open, got one
                    await publish(client, hub, f"hello {attempt}")
                    if await page.evaluate("window.withCookie.length") > 0:
                        break
                    await asyncio.sleep(0.1)
            await page.wait_for_function("window.withCookie.length > 0")
            assert (await page.evaluate("window.withCookie"))[0].startswith("hello")
            assert await page.evaluate("window.withoutCookie") == []

    asyncio.run(asyncio.wait_for(run(), 60))


def test_token_expires_mid_stream_and_the_page_resumes_exactly(
    hub_and_page_origin: tuple[Hub, str],
) -> None:
    hub, origin = hub_and_page_origin

    async def run() -> None:
        async with page_server(hub, origin) as issued, browser_page(origin + "/") as page:
            await page.evaluate("follow(null)")
            await page.wait_for_function("window.opened === 1")
            published: list[str] = []
            async with httpx.AsyncClient(timeout=10) as client:
                number = 0
                while True:
                    published.append(str(number))
                    await publish(client, hub, str(number))
                    number += 1
                    state = await page.evaluate("[window.expired, window.received.length]")
                    if state[0] >= 1 and state[1] >= len(published) - 1 and number > 60:
                        break
                    assert number < 2000, state
                    await asyncio.sleep(0.03)
            await page.wait_for_function(f"window.received.length >= {len(published)}")
            assert await page.evaluate("window.received") == published
            assert await page.evaluate("[window.expired, window.opened]") == [1, 2]
            assert len(issued) == 2

    asyncio.run(asyncio.wait_for(run(), 60))
