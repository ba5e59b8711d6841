"""``SharedEventSource`` (issue 16): many tabs, one stream, in real Chromium.

The server side (the ``?with_channel=1`` opt-in) is checked on the wire first. The browser
tests run a real Tornado application and Debian's Chromium (through playwright) on one asyncio
loop: the pages of one browser context share BroadcastChannel and Web Locks as the tabs of one
browser do, and the server's own connection set says how many streams are open. Every wait is
bounded and waits for a condition.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import tornado.web
from tornado.httpserver import HTTPServer

from tests.conftest import require
from tests.helpers import RawStream, free_port, wait_until
from tornado_sse import (
    ConnectionSet,
    Event,
    EventStreamHandler,
    InProcessBroker,
    Metrics,
    client_script_route,
)
from tornado_sse.broker.base import Broker, release_chunks
from tornado_sse.protocol import encode_event

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
    # background pages must keep their timers and streams running as foreground ones
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]
#: milliseconds; every playwright wait is bounded by this
WAIT = 10_000
TIMEOUT = 15

# ---------------------------------------------------------------------- the wire: ?with_channel=1


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(history_size=100)


@pytest.fixture
def app(broker: InProcessBroker) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/events", EventStreamHandler), client_script_route()],
        sse_broker=broker,
        sse_connections=ConnectionSet(prune_interval=0.05),
        sse_metrics=Metrics(),
    )


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_with_channel_adds_a_field_line_to_channel_events_only(
    port: int, broker: InProcessBroker
) -> None:
    first = await broker.publish("a", "zero")
    replayed = await broker.publish("a", "replayed", event="note")
    query = f"/events?channel=a&channel=b&last_event_id={first}"
    plain = await RawStream.open(port, query)
    tagged = await RawStream.open(port, query + "&with_channel=1")
    fresh = await RawStream.open(port, "/events?channel=a&with_channel=1")
    await fresh.read_until(lambda s: b"\nid: " in s.raw, TIMEOUT)  # the id-only priming event
    ids = [await broker.publish("a", "one"), await broker.publish("b", "two\nlines")]
    want = [("note", "replayed", replayed), (None, "one", ids[0])]
    want.append((None, "two\nlines", ids[1]))
    for stream in (plain, tagged):
        await stream.events_count(3)
        # what a client sees is the same: the SSE rules ignore an unknown field
        assert [(e.event, e.data, e.id) for e in stream.events] == want
    assert b"channel:" not in plain.raw
    body = tagged.raw.decode()
    for channel, (name, data, event_id) in zip("aab", want, strict=True):
        event = Event(data, event=name, id=event_id)
        assert f"channel: {channel}\n{encode_event(event).decode()}" in body
    assert body.count("channel:") == 3
    # the priming event of a fresh stream belongs to no channel
    assert b"channel:" not in fresh.raw
    for stream in (plain, tagged, fresh):
        stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_until_ends_the_stream_after_the_replay_up_to_that_id(
    port: int, broker: InProcessBroker
) -> None:
    ids = [await broker.publish("a" if n % 2 else "b", str(n)) for n in range(6)]
    stream = await RawStream.open(port, f"/events?channel=a&last_event_id={ids[0]}&until={ids[4]}")
    await stream.read_to_end()
    assert [(e.data, e.id) for e in stream.events] == [("1", ids[1]), ("3", ids[3])]
    assert stream.last_chunk  # ended by the server, cleanly
    # nothing in history after it yet: the stream ends at once, with nothing
    stream = await RawStream.open(port, f"/events?channel=a&last_event_id={ids[5]}&until={ids[5]}")
    await stream.read_to_end()
    assert stream.events == []
    stream = await RawStream.open(port, "/events?channel=a&until=nonsense")
    assert stream.status == 400
    await stream.read_to_end()
    assert b"invalid until" in stream.raw


def test_with_channel_variant_is_encoded_once_per_event() -> None:
    from tornado_sse.broker.base import Frame

    frame = Frame.from_event("room/1", Event("hi", id="x-1"))
    variant = frame.with_channel()
    assert variant is frame.with_channel()
    assert variant.data == b"channel: room/1\n" + frame.data
    assert (variant.id, variant.channel) == (frame.id, frame.channel)
    release_chunks()  # what the connection set does after each round of writes
    assert frame._with_channel is None
    own = Frame("", "", b": comment\n\n", 0.0)
    assert own.with_channel() is own


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_client_script_route_serves_the_module(http_client: Any, base_url: str) -> None:
    from tornado_sse.script import client_script

    response = await http_client.fetch(base_url + "/sse/client.js")
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.body == client_script()
    assert b"export class SharedEventSource" in response.body


# ---------------------------------------------------------------------- Chromium


def _playwright_available() -> bool:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return False
    return True


def _pyjwt_available() -> bool:
    try:
        import jwt  # noqa: F401
    except ImportError:
        return False
    return True


#: the HMAC secret of the token tests (32 bytes, as tornado_sse.auth requires)
SECRET = "shared-event-source-test-secret!"

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>tab</title>
<script type="module">
import { SharedEventSource } from '/sse/client.js';
const params = new URLSearchParams(location.search);
const url = new URL('/events', location.href);
for (const channel of params.getAll('channel')) url.searchParams.append('channel', channel);
if (params.has('last_event_id')) url.searchParams.set('last_event_id', params.get('last_event_id'));
const init = {};
if (params.has('token')) {
  init.token = async () => (await fetch('/token', { method: 'POST' })).text();
}
window.received = [];
window.opens = 0;
window.expired = 0;
const record = (event) => window.received.push([event.type, event.data, event.lastEventId]);
const source = new SharedEventSource(url, init);
source.onmessage = record;
source.addEventListener('note', record);
source.onopen = () => { window.opens += 1; };
source.addEventListener('token-expired', () => { window.expired += 1; });
window.source = source;
</script>
"""


class Feed(EventStreamHandler):
    """The stream under test: records open streams; with a token lifetime set, takes signed
    tokens through `tornado_sse.auth` (the ``Authorization: Bearer`` header, or ``access_token``
    for a plain EventSource), which closes each stream with ``token-expired`` at the token's
    ``exp``."""

    def _hub(self) -> Hub:
        return self.application.settings["hub"]  # type: ignore[no-any-return]

    def get_current_user(self) -> Any:
        verifier = self._hub().verifier
        return None if verifier is None else verifier.authenticate(self)

    def check_channel(self, channel: str) -> bool:
        grants = self.current_user
        return grants is None or bool(grants.may_subscribe(channel))

    def open(self) -> None:
        self._hub().streams.append(self)

    def on_close(self) -> None:
        self._hub().streams.remove(self)


class Page(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(PAGE)


class Token(tornado.web.RequestHandler):
    """Your backend's token endpoint: a short-lived token for the page's user."""

    def post(self) -> None:
        from tornado_sse.auth import create_token

        hub: Hub = self.settings["hub"]
        hub.tokens_issued += 1
        self.finish(create_token(SECRET, subscribe=["news", "room/*", "user/alice"], ttl=hub.ttl))


class Hub:
    """The server of a browser test: a real Tornado application on loopback."""

    def __init__(self, ttl: int | None = None, broker: Broker | None = None) -> None:
        self.broker = broker if broker is not None else InProcessBroker(history_size=1000)
        self.connections = ConnectionSet(prune_interval=0.05)
        self.verifier: Any = None
        if ttl is not None:
            from tornado_sse.auth import TokenVerifier

            self.verifier = TokenVerifier(secret=SECRET)
        self.ttl = ttl
        self.tokens_issued = 0
        self.streams: list[Feed] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = tornado.web.Application(
            [(r"/", Page), (r"/events", Feed), (r"/token", Token), client_script_route()],
            hub=self,
            sse_broker=self.broker,
            sse_connections=self.connections,
            sse_metrics=Metrics(),
            sse_heartbeat_interval=5,
            sse_retry_interval=0.2,
        )
        self.server: HTTPServer | None = None

    def start(self) -> None:
        self.server = self.app.listen(self.port, address="127.0.0.1")

    async def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        await self.connections.close(timeout=2)
        await self.broker.close()

    def channels(self) -> list[list[str]]:
        """The channels of each open stream, as the server holds them."""
        return [sorted(set(stream.query_values("channel"))) for stream in self.streams]


@asynccontextmanager
async def browser_and_hub(
    ttl: int | None = None, init_script: str | None = None, broker: Broker | None = None
) -> AsyncIterator[tuple[Any, Hub]]:
    """A running `Hub` and one Chromium context (whose pages share BroadcastChannel and locks)."""
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)")
    require(_playwright_available(), "the playwright package is missing (pip install playwright)")
    from playwright.async_api import async_playwright

    if ttl is not None:
        require(_pyjwt_available(), "PyJWT is missing (pip install 'tornado-sse[jwt]')")
    hub = Hub(ttl, broker)
    hub.start()
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context()
                context.set_default_timeout(WAIT)
                if init_script is not None:
                    await context.add_init_script(init_script)
                yield context, hub
            finally:
                await browser.close()
    finally:
        await hub.stop()


class Tab:
    def __init__(self, page: Any, channels: list[str]) -> None:
        self.page = page
        self.channels = channels
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    @classmethod
    async def open(
        cls,
        context: Any,
        hub: Hub,
        channels: list[str],
        token: bool = False,
        last_event_id: str | None = None,
        lag: bool = False,
    ) -> Tab:
        page = await context.new_page()
        tab = cls(page, channels)
        query = "&".join(f"channel={channel}" for channel in channels)
        if token:
            query += "&token=1"
        if last_event_id is not None:
            query += f"&last_event_id={last_event_id}"
        if lag:
            query += "&lag=1"
        await page.goto(f"{hub.url}/?{query}")
        return tab

    async def wait_open(self) -> None:
        await self.page.wait_for_function(
            "() => window.source && window.source.readyState === 1", timeout=WAIT
        )

    async def wait_count(self, count: int) -> None:
        await self.page.wait_for_function(
            "(count) => window.received.length >= count", arg=count, timeout=WAIT
        )

    async def received(self) -> list[tuple[str, str, str]]:
        return [tuple(item) for item in await self.page.evaluate("window.received")]

    async def leading(self) -> bool:
        return bool(await self.page.evaluate("window.source.leading"))

    async def mode(self) -> str:
        return str(await self.page.evaluate("window.source.mode"))


def run(scenario: Any) -> None:
    asyncio.run(asyncio.wait_for(scenario, 60))


async def publish_round(
    hub: Hub, channels: list[str], count: int, pace: bool = False
) -> list[tuple[str, str, str]]:
    """Publish *count* events round-robin over *channels*; (channel, data, id) of each."""
    sent = []
    for n in range(count):
        channel = channels[n % len(channels)]
        data = f"{channel}:{n}"
        event = "note" if n % 3 == 0 else None
        sent.append((channel, data, await hub.broker.publish(channel, data, event=event)))
        if pace:
            await asyncio.sleep(0.01)  # spread over the handover (a pace, not a wait)
    return sent


def expected(tab: Tab, sent: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [
        ("note" if int(data.split(":")[1]) % 3 == 0 else "message", data, event_id)
        for channel, data, event_id in sent
        if channel in tab.channels
    ]


CHANNEL_SETS = [["news"], ["room/1", "user/alice"], ["news", "room/1"]]


@pytest.mark.browser
def test_eight_tabs_share_one_stream_and_each_gets_exactly_its_events() -> None:
    async def scenario() -> None:
        async with browser_and_hub() as (context, hub):
            tabs = [
                await Tab.open(context, hub, CHANNEL_SETS[n % len(CHANNEL_SETS)]) for n in range(8)
            ]
            for tab in tabs:
                await tab.wait_open()
            await wait_until(lambda: len(hub.streams) == 1)
            assert hub.channels() == [["news", "room/1", "user/alice"]]
            sent = await publish_round(hub, ["news", "room/1", "user/alice", "other"], 40)
            for tab in tabs:
                want = expected(tab, sent)
                await tab.wait_count(len(want))
                assert await tab.received() == want
            assert len(hub.streams) == 1
            assert len([tab for tab in tabs if await tab.leading()]) == 1
            assert {await tab.mode() for tab in tabs} == {"shared"}
            assert [tab.errors for tab in tabs] == [[]] * 8

    run(scenario())


@pytest.mark.browser
def test_closing_the_leading_tab_hands_over_without_loss_or_duplicates() -> None:
    async def scenario() -> None:
        async with browser_and_hub() as (context, hub):
            tabs = [await Tab.open(context, hub, CHANNEL_SETS[n % 3]) for n in range(5)]
            for tab in tabs:
                await tab.wait_open()
            await wait_until(lambda: len(hub.streams) == 1)
            leader = [tab for tab in tabs if await tab.leading()]
            assert len(leader) == 1
            rest = [tab for tab in tabs if tab is not leader[0]]
            before = await publish_round(hub, ["news", "room/1", "user/alice"], 15)
            publishing = asyncio.ensure_future(
                publish_round(hub, ["news", "room/1", "user/alice"], 60, pace=True)
            )
            await wait_until(lambda: hub.broker.published_count > 25)
            old_stream = hub.streams[0]
            await leader[0].page.close()
            # another tab leads within 2 s (issue 16): the server holds its new stream
            await wait_until(
                lambda: len(hub.streams) == 1 and hub.streams[0] is not old_stream, timeout=2
            )
            during = await publishing
            sent = before + during
            for tab in rest:
                want = expected(tab, sent)
                await tab.wait_count(len(want))
                assert await tab.received() == want
            assert len([tab for tab in rest if await tab.leading()]) == 1
            assert len(hub.streams) == 1

    run(scenario())


#: a tab opened with ``?lag=1`` ignores broadcasts while ``window.deaf`` is set: a tab that fell
#: behind the leader by a few messages (a busy or throttled tab), as a new leader may be
LAGGING = """
if (new URLSearchParams(location.search).has('lag')) {
  const Real = window.BroadcastChannel;
  window.BroadcastChannel = class extends Real {
    set onmessage(handler) {
      super.onmessage = (event) => { if (!window.deaf) handler.call(this, event); };
    }
  };
}
"""


@pytest.mark.browser
def test_a_new_leader_behind_the_others_replays_what_it_missed_and_nobody_gets_it_twice() -> None:
    """The next leader resumes from the last id *it* knows; the events it missed come back from
    the server and reach it once, and the tabs that already had them drop them by id."""

    async def scenario() -> None:
        async with browser_and_hub(init_script=LAGGING) as (context, hub):
            channels = ["news", "room/1"]
            leader = await Tab.open(context, hub, channels)
            await leader.wait_open()
            assert await leader.leading()
            behind = await Tab.open(context, hub, channels, lag=True)
            await behind.wait_open()
            other = await Tab.open(context, hub, channels)
            await other.wait_open()
            await wait_until(lambda: len(hub.streams) == 1)
            sent = await publish_round(hub, channels, 6)
            for tab in (leader, behind, other):
                await tab.wait_count(6)
            await behind.page.evaluate("window.deaf = true")
            missed = await publish_round(hub, channels, 5)
            for tab in (leader, other):
                await tab.wait_count(11)
            await behind.page.evaluate("window.deaf = false")
            assert len(await behind.received()) == 6
            old_stream = hub.streams[0]
            await leader.page.close()
            await wait_until(
                lambda: len(hub.streams) == 1 and hub.streams[0] is not old_stream, timeout=5
            )
            assert await behind.leading()  # queued first: it leads, from where it fell behind
            after = await publish_round(hub, channels, 4)
            for tab in (behind, other):
                want = expected(tab, sent + missed + after)
                await tab.wait_count(len(want))
                # a duplicate would come before the events published after the handover
                assert await tab.received() == want

    run(scenario())


@pytest.mark.browser
def test_a_new_leader_behind_the_others_gets_nobody_an_event_twice_over_shards(
    tmp_path: Path,
) -> None:
    """The same with a stream over two Redis shards (issue 17): an event's composite id differs
    between the old leader's stream and the new one's (the other shard's part is another
    position), yet it names the same event: the tabs that had it drop it."""
    from tests.redis_server import RedisServer
    from tornado_sse.broker.redis import RedisBroker
    from tornado_sse.broker.sharded import ShardedBroker, placement

    channels = ["news", next(f"room/{n}" for n in range(99) if placement(f"room/{n}", 2) == 1)]
    assert placement("news", 2) == 0
    servers = [RedisServer(tmp_path / f"shard{n}") for n in range(2)]
    for server in servers:
        server.directory.mkdir()
        server.start()

    async def scenario() -> None:
        broker = ShardedBroker([RedisBroker(server.url) for server in servers])
        async with browser_and_hub(init_script=LAGGING, broker=broker) as (context, hub):
            leader = await Tab.open(context, hub, channels)
            await leader.wait_open()
            behind = await Tab.open(context, hub, channels, lag=True)
            await behind.wait_open()
            other = await Tab.open(context, hub, channels)
            await other.wait_open()
            await wait_until(lambda: len(hub.streams) == 1)
            sent = await publish_round(hub, channels, 6)
            for tab in (leader, behind, other):
                await tab.wait_count(6)
            await behind.page.evaluate("window.deaf = true")
            missed = await publish_round(hub, channels, 5)
            for tab in (leader, other):
                await tab.wait_count(11)
            await behind.page.evaluate("window.deaf = false")
            old_stream = hub.streams[0]
            await leader.page.close()
            await wait_until(
                lambda: len(hub.streams) == 1 and hub.streams[0] is not old_stream, timeout=5
            )
            after = await publish_round(hub, channels, 4)
            want = [data for _, data, _ in sent + missed + after]
            for tab in (behind, other):
                await wait_until(lambda tab=tab: _has_all(tab, want), timeout=5)
                got = [data for _, data, _ in await tab.received()]
                # events of one shard in order; across the two, as each arrived
                assert sorted(got) == sorted(want), "an event lost or twice"
                for channel in channels:
                    mine = [d for d in got if d.startswith(channel + ":")]
                    assert mine == [d for d in want if d.startswith(channel + ":")]

    try:
        run(scenario())
    finally:
        for server in servers:
            server.stop()


async def _has_all(tab: Tab, want: list[str]) -> bool:
    got = [data for _, data, _ in await tab.received()]
    return set(want) <= set(got)


@pytest.mark.browser
def test_tabs_coming_and_going_while_events_flow_lose_nothing() -> None:
    """A tab joining with a new channel, then leaving, makes the leader reconnect twice, with
    its last id: the other tabs get every event once, in order."""

    async def scenario() -> None:
        async with browser_and_hub() as (context, hub):
            tabs = [await Tab.open(context, hub, ["news"]) for _ in range(2)]
            for tab in tabs:
                await tab.wait_open()
            publishing = asyncio.ensure_future(
                publish_round(hub, ["news", "room/1"], 80, pace=True)
            )
            await wait_until(lambda: hub.broker.published_count > 10)
            visitor = await Tab.open(context, hub, ["room/1"])
            await visitor.wait_open()
            await wait_until(lambda: hub.channels() == [["news", "room/1"]])
            await visitor.page.close()
            await wait_until(lambda: hub.channels() == [["news"]])
            sent = await publishing
            for tab in tabs:
                want = expected(tab, sent)
                await tab.wait_count(len(want))
                assert await tab.received() == want

    run(scenario())


@pytest.mark.browser
def test_a_tab_gone_without_goodbye_is_forgotten_at_the_next_handover() -> None:
    async def scenario() -> None:
        async with browser_and_hub() as (context, hub):
            tabs = [await Tab.open(context, hub, CHANNEL_SETS[n]) for n in range(3)]
            for tab in tabs:
                await tab.wait_open()
            await wait_until(lambda: hub.channels() == [["news", "room/1", "user/alice"]])
            (leader,) = [tab for tab in tabs if await tab.leading()]
            mute, last = [tab for tab in tabs if tab is not leader]
            # as if its process died: it goes without telling the others
            await mute.page.evaluate("() => { window.source._post = () => {}; }")
            await mute.page.close()
            await leader.page.close()
            await wait_until(lambda: hub.channels() == [sorted(last.channels)])
            assert await last.leading()
            assert await last.page.evaluate("window.source.tabs") == 1

    run(scenario())


@pytest.mark.browser
def test_reloading_every_tab_keeps_one_stream() -> None:
    async def scenario() -> None:
        async with browser_and_hub() as (context, hub):
            tabs = [await Tab.open(context, hub, CHANNEL_SETS[n % 3]) for n in range(6)]
            for tab in tabs:
                await tab.wait_open()
            for tab in tabs:
                await tab.page.reload()
                await tab.wait_open()
            await wait_until(lambda: len(hub.streams) == 1)
            assert hub.channels() == [["news", "room/1", "user/alice"]]
            sent = await publish_round(hub, ["news", "room/1", "user/alice"], 30)
            for tab in tabs:
                want = expected(tab, sent)
                await tab.wait_count(len(want))
                assert await tab.received() == want
            assert len(hub.streams) == 1

    run(scenario())


async def expiries(tabs: list[Tab]) -> int:
    """``token-expired`` events the tabs have seen (the leader's, or each tab's own)."""
    return sum([int(await tab.page.evaluate("window.expired")) for tab in tabs])


async def publish_across_expiries(hub: Hub, tabs: list[Tab], count: int) -> list[Any]:
    """Publish, paced, until the tabs have seen *count* ``token-expired`` events, and after."""
    sent = []
    while await expiries(tabs) < count:
        sent += await publish_round(hub, ["news", "room/1", "user/alice"], 3, pace=True)
    sent += await publish_round(hub, ["news", "room/1", "user/alice"], 6)
    return sent


@pytest.mark.browser
def test_a_token_expiring_mid_stream_is_renewed_and_the_stream_resumes() -> None:
    async def scenario() -> None:
        async with browser_and_hub(ttl=2) as (context, hub):
            tabs = [await Tab.open(context, hub, CHANNEL_SETS[n], token=True) for n in range(3)]
            for tab in tabs:
                await tab.wait_open()
            await wait_until(lambda: len(hub.streams) == 1)
            # the server closes the stream at each token's exp with token-expired (issue 13)
            sent = await publish_across_expiries(hub, tabs, 2)
            for tab in tabs:
                want = expected(tab, sent)
                await tab.wait_count(len(want))
                assert await tab.received() == want
            assert hub.tokens_issued >= 3
            assert len(hub.streams) == 1
            leader = [tab for tab in tabs if await tab.leading()]
            assert await leader[0].page.evaluate("window.expired") >= 2

    run(scenario())


@pytest.mark.browser
def test_a_tab_resumes_its_own_last_event_id_without_disturbing_the_others() -> None:
    """A tab whose URL carries ``last_event_id`` gets its channels' events after it (the demo's
    history on entry), whether it opens the shared stream, joins it on a new channel, or joins a
    channel it already follows; the other tabs get none of it."""

    async def scenario() -> None:
        async with browser_and_hub() as (context, hub):
            history = await publish_round(hub, ["news", "room/1"], 8)
            ids = [event_id for _, _, event_id in history]
            first = await Tab.open(context, hub, ["news"], last_event_id=ids[1])
            await first.wait_open()
            plain = await Tab.open(context, hub, ["news"])
            await plain.wait_open()
            joins = await Tab.open(context, hub, ["room/1"], last_event_id=ids[2])
            await joins.wait_open()
            later = await Tab.open(context, hub, ["news"], last_event_id=ids[5])
            await later.wait_open()
            live = await publish_round(hub, ["news", "room/1"], 6)
            cases = [(first, ids[1]), (plain, None), (joins, ids[2]), (later, ids[5])]
            for tab, after in cases:
                since = [] if after is None else history[ids.index(after) + 1 :]
                want = expected(tab, since + live)
                await tab.wait_count(len(want))
                assert await tab.received() == want
            await wait_until(lambda: len(hub.streams) == 1)  # the bounded reads ended

    run(scenario())


NO_SHARING = """
delete window.BroadcastChannel;
Object.defineProperty(Navigator.prototype, 'locks', { get() { return undefined; } });
"""


@pytest.mark.browser
def test_fallback_without_web_locks_or_broadcast_channel() -> None:
    async def scenario() -> None:
        async with browser_and_hub(ttl=2, init_script=NO_SHARING) as (context, hub):
            tabs = [await Tab.open(context, hub, CHANNEL_SETS[n], token=True) for n in range(3)]
            for tab in tabs:
                await tab.wait_open()
            assert {await tab.mode() for tab in tabs} == {"fallback"}
            await wait_until(lambda: len(hub.streams) == 3)
            assert sorted(hub.channels()) == sorted(sorted(s) for s in CHANNEL_SETS)
            sent = await publish_across_expiries(hub, tabs, 3)
            for tab in tabs:
                want = expected(tab, sent)
                await tab.wait_count(len(want))
                assert await tab.received() == want

    run(scenario())


@pytest.mark.browser
def test_readme_page_opens_one_stream_for_three_tabs(tmp_path: Path) -> None:
    """The README's complete page (``shared_feed.py``), run as written: three tabs, one request
    to ``/events`` in the whole browser, the same ticks in every tab."""
    from tests.test_readme import Example, example, listening

    port = free_port()
    item = Example(tmp_path, "shared_feed", example("shared_feed", p8888=port))

    async def scenario() -> None:
        await listening(item, port)
        require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)")
        require(_playwright_available(), "the playwright package is missing")
        from playwright.async_api import async_playwright

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context()
                context.set_default_timeout(WAIT)
                streams: list[str] = []
                context.on(
                    "request", lambda r: streams.append(r.url) if "/events" in r.url else None
                )
                pages = [await context.new_page() for _ in range(3)]
                for page in pages:
                    await page.goto(f"http://127.0.0.1:{port}/")
                for page in pages:
                    await page.wait_for_function(
                        "() => document.querySelectorAll('#log li').length >= 3"
                    )
                ids: dict[int, str] = {}
                for page in pages:
                    # "<id> tick <n>": consecutive ticks, each with the same id in every tab
                    lines = [
                        line.split() for line in await page.locator("#log li").all_text_contents()
                    ]
                    ticks = [int(n) for _, _, n in lines]
                    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))
                    for (event_id, _, _), tick in zip(lines, ticks, strict=True):
                        assert ids.setdefault(tick, event_id) == event_id
                assert len(streams) == 1, streams
            finally:
                await browser.close()

    try:
        run(scenario())
    finally:
        item.stop()


@pytest.mark.browser
def test_demo_tabs_of_one_browser_share_one_stream() -> None:
    """The chat demo: three tabs of one browser in one room under one nickname hold one stream;
    each shows the room's history and every message once; the nickname stays present until the
    last of them closes."""
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)")
    require(_playwright_available(), "the playwright package is missing")
    from tornado_sse.demo.app import make_app

    async def scenario() -> None:
        from playwright.async_api import async_playwright

        connections = ConnectionSet(prune_interval=0.05)
        app = make_app(connections=connections, sse_retry_interval=0.2)
        port = free_port()
        server = app.listen(port, address="127.0.0.1")
        url = f"http://127.0.0.1:{port}/"
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    alice_browser = await browser.new_context()
                    bob_browser = await browser.new_context()
                    for context in (alice_browser, bob_browser):
                        context.set_default_timeout(WAIT)

                    async def join(context: Any, nick: str) -> Any:
                        page = await context.new_page()
                        await page.goto(url + "?room=tea")
                        await page.fill("#nick", nick)
                        await page.click("#join")
                        await page.wait_for_function(
                            "() => document.getElementById('status').dataset.state === 'connected'"
                        )
                        return page

                    bob = await join(bob_browser, "bob")
                    alice = [await join(alice_browser, "alice") for _ in range(3)]
                    await wait_until(lambda: len(connections) == 2)  # bob's, and alice's one
                    for page in [bob, *alice]:
                        await page.wait_for_function(
                            "() => [...document.querySelectorAll('#members li')]"
                            ".map((n) => n.textContent).join() === 'alice,bob'"
                        )
                    await bob.fill("#text", "hello alice")
                    await bob.press("#text", "Enter")
                    for page in alice:
                        await page.wait_for_function(
                            "() => document.querySelectorAll('#log .msg').length === 1"
                        )
                        # the history on entry (bob's and alice's arrival), then the message
                        assert await page.locator("#log li").all_text_contents() == [
                            "bob joined",
                            "alice joined",
                            await page.locator("#log .msg").text_content(),
                        ]
                    await alice[0].close()
                    await alice[1].close()
                    await alice[2].wait_for_function(
                        "() => document.getElementById('status').dataset.state !== 'connecting'"
                    )
                    await bob.fill("#text", "still there?")
                    await bob.press("#text", "Enter")
                    await alice[2].wait_for_function(
                        "() => document.querySelectorAll('#log .msg').length === 2"
                    )
                    assert "alice left" not in await bob.locator("#log .notice").all_text_contents()
                    await alice[2].close()
                    await bob.wait_for_function(
                        "() => [...document.querySelectorAll('#log .notice')]"
                        ".some((n) => n.textContent === 'alice left')"
                    )
                finally:
                    await browser.close()
        finally:
            server.stop()
            await connections.close(timeout=2)
            app.settings["demo_chat"].close()
            await app.settings["demo_chat"].broker.close()

    run(scenario())
