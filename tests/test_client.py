"""tornado_sse.client.EventSource against real Tornado servers on loopback.

Streams come from `EventStreamHandler` + `InProcessBroker`, and from small scripted handlers when a
test needs bytes the real handler never sends (oversized events, refusals, exact ids).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import tornado.httpserver
import tornado.web
from tornado.simple_httpclient import HTTPTimeoutError, SimpleAsyncHTTPClient

from tests.helpers import free_port, wait_until
from tornado_sse import (
    Event,
    EventStreamHandler,
    InProcessBroker,
    Metrics,
    StreamIdleError,
    StreamParseError,
)
from tornado_sse.client import EventSource, retry_after, validate_url
from tornado_sse.errors import EventStreamError, InvalidEventError, InvalidURLError

TIMEOUT = 15


class Record:
    """What the test servers saw, shared through the application's settings."""

    def __init__(self) -> None:
        #: ``Last-Event-ID`` header of every request, in order
        self.last_event_ids: list[str | None] = []
        self.handlers: list[EventStreamHandler] = []
        self.opened_at: list[float] = []
        self.closed: list[asyncio.Future[None]] = []
        #: when set, requests after the first wait for it before subscribing
        self.gate: asyncio.Event | None = None
        #: (status, content type, body) answered in turn by /script
        self.script: list[tuple[int, str, bytes]] = []
        #: the query string of every request to /script, as sent
        self.queries: list[str] = []
        #: (host and path, Authorization, Cookie, Last-Event-ID) of every request to a `Hop`
        self.hops: list[tuple[str, str | None, str | None, str | None]] = []


class Stream(EventStreamHandler):
    """The real handler, recording what happens to it."""

    @property
    def record(self) -> Record:
        return self.application.settings["record"]  # type: ignore[no-any-return]

    async def get_channels(self) -> list[str]:  # type: ignore[override]
        record = self.record
        record.last_event_ids.append(self.request.headers.get("Last-Event-ID"))
        if record.gate is not None and len(record.last_event_ids) > 1:
            await record.gate.wait()
        return self.get_query_arguments("channel")

    def open(self) -> None:
        record = self.record
        record.opened_at.append(time.monotonic())
        record.handlers.append(self)
        record.closed.append(asyncio.get_running_loop().create_future())

    def on_close(self) -> None:
        for handler, closed in zip(self.record.handlers, self.record.closed, strict=True):
            if handler is self and not closed.done():
                closed.set_result(None)


class Script(tornado.web.RequestHandler):
    """Answers each request with the next (status, content type, body) of the record's script."""

    def get(self) -> None:
        record: Record = self.application.settings["record"]
        record.last_event_ids.append(self.request.headers.get("Last-Event-ID"))
        record.queries.append(self.request.query)
        status, content_type, body = record.script.pop(0)
        self.set_status(status)
        if content_type:
            self.set_header("Content-Type", content_type)
        self.finish(body or None)


class Endless(tornado.web.RequestHandler):
    """A 200 that is not an event stream and never ends."""

    async def get(self) -> None:
        self._gone = asyncio.Event()
        self.set_header("Content-Type", "text/plain")
        self.write("not an event stream\n")
        await self.flush()
        await self._gone.wait()

    def on_connection_close(self) -> None:
        self._gone.set()


class Boom(tornado.web.RequestHandler):
    def get(self) -> None:
        raise RuntimeError("boom (expected by the test)")

    def log_exception(self, *args: Any) -> None:
        pass


class Hop(tornado.web.RequestHandler):
    """Records the credentials a request carries, then redirects it to ``?to=`` (with
    ``?status=``) or, at the end of a chain, answers a stream once and 204 afterwards."""

    def get(self) -> None:
        headers = self.request.headers
        hops: list[tuple[str, str | None, str | None, str | None]] = self.settings["hops"]
        hops.append(
            (
                f"{self.request.host}{self.request.path}",
                headers.get("Authorization"),
                headers.get("Cookie"),
                headers.get("Last-Event-ID"),
            )
        )
        to = self.get_query_argument("to", None)
        if to is not None:
            self.redirect(to, status=int(self.get_query_argument("status", "302")))
            return
        if headers.get("Last-Event-ID"):
            self.set_status(204)
            self.finish()
            return
        self.set_header("Content-Type", "text/event-stream")
        self.finish("retry: 10\nid: e1\ndata: arrived\n\n")


def hop(base: str, path: str = "/hop", to: str | None = None, status: int = 302) -> str:
    """The URL of `Hop` at *base*, redirecting to *to*."""
    if to is None:
        return f"{base}{path}"
    return f"{base}{path}?" + urllib.parse.urlencode({"to": to, "status": status})


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(history_size=100)


@pytest.fixture
def record() -> Record:
    return Record()


@pytest.fixture
def app(broker: InProcessBroker, record: Record) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/events", Stream),
            (r"/script", Script),
            (r"/endless", Endless),
            (r"/boom", Boom),
            (r"/hop.*", Hop),
        ],
        sse_broker=broker,
        sse_retry_interval=0.05,
        sse_retry_jitter=0.0,
        sse_heartbeat_interval=0,
        record=record,
        hops=record.hops,
    )


async def take(source: EventSource, count: int) -> list[Event]:
    """The next *count* events of *source*, or fail within the timeout."""

    async def run() -> list[Event]:
        events: list[Event] = []
        async for event in source:
            events.append(event)
            if len(events) == count:
                break
        return events

    return await asyncio.wait_for(run(), 10)


async def drain(source: EventSource) -> list[Event]:
    """Every remaining event of *source* until the iteration ends (or raises)."""

    async def run() -> list[Event]:
        return [event async for event in source]

    return await asyncio.wait_for(run(), 10)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_resumes_after_server_close_without_loss_or_duplicates(
    port: int, broker: InProcessBroker, record: Record
) -> None:
    record.gate = asyncio.Event()
    async with EventSource(f"http://127.0.0.1:{port}/events?channel=a&channel=b") as source:
        await wait_until(lambda: source.connected)
        published = [await broker.publish("a", f"before {i}") for i in range(3)]
        first = await take(source, 3)
        assert [e.id for e in first] == published

        await record.handlers[0].close()
        # The reconnect is held at the gate: these are published during the outage.
        await wait_until(lambda: len(record.last_event_ids) == 2)
        assert not source.connected
        for i in range(5):
            published.append(await broker.publish("b" if i % 2 else "a", f"outage {i}"))
        record.gate.set()
        # And these race with the replay.
        for i in range(5):
            published.append(await broker.publish("a", f"after {i}"))
        rest = await take(source, 10)

        assert record.last_event_ids == [None, published[2]]
        assert [e.id for e in first + rest] == published
        assert [e.data for e in rest] == [f"outage {i}" for i in range(5)] + [
            f"after {i}" for i in range(5)
        ]
        assert source.connections == 2
        assert source.connected
        assert source.last_event_id == published[-1]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_resumes_from_priming_id(port: int, broker: InProcessBroker, record: Record) -> None:
    position = await broker.publish("a", "published before the client came")
    async with EventSource(f"http://127.0.0.1:{port}/events?channel=a") as source:
        await wait_until(lambda: record.handlers)
        # The fresh stream carried only retry: and an id-only event; nothing was yielded.
        await wait_until(lambda: source.last_event_id == position)
        assert source.pending == 0
        await record.handlers[0].close()
        await wait_until(lambda: len(record.handlers) == 2)
        assert record.last_event_ids == [None, position]
        live = await broker.publish("a", "live")
        assert [e.id for e in await take(source, 1)] == [live]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_honours_retry_from_the_server(
    port: int, broker: InProcessBroker, record: Record, app: tornado.web.Application
) -> None:
    app.settings["sse_retry_interval"] = 0.3
    # The client's own delay is tiny: only the server's retry: explains a long wait.
    async with EventSource(f"http://127.0.0.1:{port}/events?channel=a", retry=0.001) as source:
        await wait_until(lambda: record.handlers)
        await wait_until(lambda: source.retry == 0.3)
        closed_at = time.monotonic()
        await record.handlers[0].close()
        await wait_until(lambda: len(record.handlers) == 2)
        assert record.opened_at[1] - closed_at >= 0.3

        # retry: carried by an event changes the delay too (milliseconds on the wire).
        await broker.publish("a", "slower", retry=450)
        (event,) = await take(source, 1)
        assert event.retry == 450
        assert source.retry == 0.45


class Watched(EventSource):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opens = 0
        self.reconnects: list[tuple[BaseException | None, float]] = []

    def on_open(self) -> None:
        self.opens += 1

    def on_reconnect(self, error: BaseException | None, delay: float) -> None:
        self.reconnects.append((error, delay))


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_backs_off_while_refused_then_connects(broker: InProcessBroker) -> None:
    port = free_port()
    source = Watched(f"http://127.0.0.1:{port}/events?channel=a", retry=0.01, max_retry=0.08)
    async with source:
        await wait_until(lambda: len(source.reconnects) >= 5)
        assert source.opens == 0 and not source.connected
        assert all(isinstance(error, ConnectionRefusedError) for error, _ in source.reconnects)
        delays = [delay for _, delay in source.reconnects]
        assert delays[0] >= 0.01
        assert all(0.01 <= d <= 0.08 * 1.25 for d in delays)
        assert min(delays[3:]) >= 0.08  # the backoff grew to max_retry

        record = Record()
        app = tornado.web.Application(
            [(r"/events", Stream)], sse_broker=broker, sse_retry_interval=0.05, record=record
        )
        server = tornado.httpserver.HTTPServer(app)
        server.listen(port, "127.0.0.1")
        try:
            await wait_until(lambda: record.handlers)
            event_id = await broker.publish("a", "finally")
            assert [e.id for e in await take(source, 1)] == [event_id]
            assert source.opens == 1 and source.connections == 1
        finally:
            server.stop()
    assert source.closed


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_sends_last_event_id_and_stops_on_204(port: int, record: Record) -> None:
    record.script = [
        (200, "text/event-stream", b"retry: 10\n\nid: first\n\n"),
        (200, "text/event-stream; charset=utf-8", b"id: second\ndata: x\n\n: comment\n\n"),
        (200, "text/event-stream", b"data: keeps the id\n\n"),
        (204, "", b""),
    ]
    source = EventSource(f"http://127.0.0.1:{port}/script", last_event_id="start", retry=5)
    events = await drain(source)
    assert [(e.data, e.id) for e in events] == [("x", "second"), ("keeps the id", None)]
    assert record.last_event_ids == ["start", "first", "second", "second"]
    assert source.closed and source.connections == 3
    assert source.retry == 0.01


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_empty_id_resets_last_event_id(port: int, record: Record) -> None:
    record.script = [
        (200, "text/event-stream", b"retry: 1\nid: one\ndata: a\n\n"),
        (200, "text/event-stream", b"id:\ndata: b\n\n"),
        (204, "", b""),
    ]
    events = await drain(EventSource(f"http://127.0.0.1:{port}/script"))
    assert [(e.data, e.id) for e in events] == [("a", "one"), ("b", "")]
    # As in browsers, an empty last event id is not sent at all.
    assert record.last_event_ids == [None, "one", None]


@pytest.mark.gen_test(timeout=TIMEOUT)
@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/missing", 404, "Not Found"),
        ("/boom", 500, "Internal Server Error"),
        ("/events", 400, "channel"),  # EventStreamHandler's refusal, no channel given
        ("/endless", 200, "text/plain"),  # a wrong Content-Type that never ends
    ],
)
async def test_stops_for_good_on_refusal(
    port: int, record: Record, path: str, status: int, message: str
) -> None:
    source = EventSource(f"http://127.0.0.1:{port}{path}", retry=0.01)
    with pytest.raises(EventStreamError) as info:
        await drain(source)
    assert info.value.status == status
    assert message in str(info.value)
    assert source.closed and source.connections == 0
    with pytest.raises(StopAsyncIteration):
        await source.__anext__()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_oversized_event_is_a_clear_error(port: int, record: Record) -> None:
    record.script = [
        (200, "text/event-stream", b"data: small\n\ndata: " + b"x" * 5000 + b"\n\ndata: after\n\n"),
    ]
    source = EventSource(f"http://127.0.0.1:{port}/script", max_event_size=1000, retry=0.01)
    events: list[Event] = []
    with pytest.raises(StreamParseError):
        async for event in source:
            events.append(event)
    assert [e.data for e in events] == ["small"]
    assert len(record.last_event_ids) == 1  # no reconnect: the same event would come back


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_buffer_is_bounded_and_loses_nothing(
    port: int, broker: InProcessBroker, record: Record
) -> None:
    async with EventSource(f"http://127.0.0.1:{port}/events?channel=a", max_queue=3) as source:
        await wait_until(lambda: record.handlers)
        published = [await broker.publish("a", f"event {i}") for i in range(40)]
        await wait_until(lambda: source.pending == 3)
        more = [await broker.publish("a", f"more {i}") for i in range(10)]
        assert source.pending == 3
        events = await take(source, 50)
        assert [e.id for e in events] == published + more


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_close_releases_an_idle_stream_at_once(port: int, record: Record) -> None:
    # No heartbeats in this app: only close() itself can end the server's stream.
    source = EventSource(f"http://127.0.0.1:{port}/events?channel=a")
    consumer = asyncio.ensure_future(drain(source))
    await wait_until(lambda: record.handlers)
    source.close()
    await asyncio.wait_for(record.closed[0], 5)
    assert await consumer == []
    assert source.closed and not source.connected
    await source.aclose()  # idempotent


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_stream_reset_is_yielded(port: int, broker: InProcessBroker) -> None:
    async with EventSource(
        f"http://127.0.0.1:{port}/events?channel=a", last_event_id="not-an-id"
    ) as source:
        (reset,) = await take(source, 1)
        assert reset.event == "stream-reset"
        assert json.loads(reset.data or "")["id"] == reset.id
        live = await broker.publish("a", "live")
        assert [e.id for e in await take(source, 1)] == [live]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_without_reconnect(port: int, record: Record) -> None:
    record.script = [(200, "text/event-stream", b"data: only\n\n")]
    source = EventSource(f"http://127.0.0.1:{port}/script", reconnect=False)
    assert [e.data for e in await drain(source)] == ["only"]
    assert len(record.last_event_ids) == 1

    refused = EventSource(f"http://127.0.0.1:{free_port()}/events", reconnect=False)
    with pytest.raises(EventStreamError) as info:
        await drain(refused)
    assert info.value.status is None
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


@pytest.mark.parametrize(
    "url",
    [
        "http://this is invalid/",
        " http://127.0.0.1:1/",
        "http://127.0.0.1:1/a\tb",
        "http://127.0.0.1:1/\n",
        "http://127.0.0.1:1/\x7f",
        "ftp://127.0.0.1/",
        "127.0.0.1:8000/events",
        "/events",
        "",
        "http://",
        "http:///events",
        "http://:80/",
        "http://127.0.0.1:99999/",
        "http://127.0.0.1:x/",
        "http://127.0.0.1:0/",
        "http://[zz]/",
        "http://a%20b/",
        "http://a<b/",
        "http://a^b/",
        "http://a|b/",
        "http://a\\b/",
        "http://\u00e9" + "x" * 70 + ".com/",
    ],
)
def test_an_invalid_url_fails_at_once(url: str) -> None:
    # As the web platform's EventSource constructor throws; the client used to retry for ever.
    with pytest.raises(InvalidURLError) as info:
        EventSource(url)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("invalid URL: ")
    assert info.value.url == url
    with pytest.raises(InvalidURLError):
        EventSource(url.encode())  # type: ignore[arg-type]


def test_urls_are_sent_as_a_browser_sends_them() -> None:
    assert validate_url("http://127.0.0.1:8000/events?channel=a") == (
        "http://127.0.0.1:8000/events?channel=a"
    )
    assert validate_url("HTTPS://user:pw@[::1]:8443/x") == "HTTPS://user:pw@[::1]:8443/x"
    assert validate_url("http://\u00e9x.example:81/\u00e9v?q=\u00fc#f") == (
        "http://xn--x-9fa.example:81/%C3%A9v?q=%C3%BC#f"
    )
    assert EventSource("http://h/\u00e9").url == "http://h/%C3%A9"


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_non_ascii_path_reaches_the_server_encoded(port: int, record: Record) -> None:
    record.script.append((200, "text/event-stream", b"data: here\n\n"))
    async with EventSource(
        f"http://localhost:{port}/script?x=\u00e9\u20ac", reconnect=False
    ) as source:
        assert [e.data for e in await drain(source)] == ["here"]
    assert record.queries == ["x=%C3%A9%E2%82%AC"]


CREDENTIALS = {"Authorization": "Bearer s3cret", "Cookie": "session=s3cret"}


@pytest.fixture
def other_origin(io_loop: Any, record: Record) -> Iterator[str]:
    """A second Tornado server on loopback (another port: another origin) sharing ``hops``."""
    other_port = free_port()
    server = tornado.httpserver.HTTPServer(
        tornado.web.Application([(r"/hop.*", Hop)], hops=record.hops)
    )
    server.listen(other_port, "127.0.0.1")
    try:
        yield f"http://127.0.0.1:{other_port}"
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=TIMEOUT)
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_credentials_do_not_follow_a_redirect_to_another_origin(
    port: int, record: Record, other_origin: str, status: int
) -> None:
    here = f"http://127.0.0.1:{port}"
    # here -> here (same origin: credentials kept) -> there (dropped) -> here (not restored)
    url = hop(here, "/hop1", hop(here, "/hop2", hop(other_origin, "/hop3", hop(here), status)))
    async with EventSource(url, headers=CREDENTIALS, retry=0.01) as source:
        assert [(e.id, e.data) for e in await drain(source)] == [("e1", "arrived")]
        assert source.url == url
    there = other_origin.removeprefix("http://")
    first = [
        (f"127.0.0.1:{port}/hop1", "Bearer s3cret", "session=s3cret", None),
        (f"127.0.0.1:{port}/hop2", "Bearer s3cret", "session=s3cret", None),
        (f"{there}/hop3", None, None, None),
        (f"127.0.0.1:{port}/hop", None, None, None),
    ]
    # The reconnect starts again from the URL given, with the credentials and Last-Event-ID.
    again = [(where, auth, cookie, "e1") for where, auth, cookie, _ in first]
    again[2:] = [(where, None, None, "e1") for where, *_ in first[2:]]
    assert record.hops == first + again


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_another_host_or_scheme_is_another_origin(
    port: int, record: Record, other_origin: str
) -> None:
    here = f"http://127.0.0.1:{port}"
    url = hop(here, "/hop1", hop(f"http://localhost:{port}", "/hop2"))
    async with EventSource(url, headers=CREDENTIALS, reconnect=False) as source:
        assert [e.data for e in await drain(source)] == ["arrived"]
    assert [h[1:3] for h in record.hops] == [("Bearer s3cret", "session=s3cret"), (None, None)]
    # URL credentials become an Authorization header for their own origin only.
    record.hops.clear()
    with_userinfo = hop(f"http://user:pw@127.0.0.1:{port}", "/hop1", hop(other_origin))
    async with EventSource(with_userinfo, reconnect=False) as source:
        assert [e.data for e in await drain(source)] == ["arrived"]
    assert [h[1] for h in record.hops] == ["Basic dXNlcjpwdw==", None]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_redirect_loops_and_unusable_locations_stop_the_client(
    port: int, record: Record
) -> None:
    here = f"http://127.0.0.1:{port}"
    loop = hop(here, "/hop", hop(here, "/hop", hop(here, "/hop", hop(here, "/hop", hop(here)))))
    for _ in range(2):
        loop = hop(here, "/hop", loop)  # seven hops: two too many
    with pytest.raises(EventStreamError) as info:
        await drain(EventSource(loop, retry=0.01))
    assert info.value.status == 302 and "redirected more than 5 times" in str(info.value)
    for location in ("ftp://127.0.0.1/", "http://this is invalid/"):
        with pytest.raises(EventStreamError) as info:
            await drain(EventSource(hop(here, "/hop", location), retry=0.01))
        assert info.value.status == 302 and "unusable URL" in str(info.value)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_refusal_with_a_long_body_stops_the_client(port: int, record: Record) -> None:
    # The body is cut at 4 KiB; that cut used to count as a network error, retried for ever.
    record.script.append((404, "text/plain", b"x" * 100_000))
    with pytest.raises(EventStreamError) as info:
        await drain(EventSource(f"http://127.0.0.1:{port}/script", retry=0.01))
    assert info.value.status == 404 and info.value.body == "x" * 4096


def test_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidEventError):
        EventSource("http://127.0.0.1:1/", last_event_id="a\nb")
    with pytest.raises(ValueError):
        EventSource("http://127.0.0.1:1/", retry=-1)
    with pytest.raises(ValueError):
        EventSource("http://127.0.0.1:1/", max_queue=0)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_with_callers_http_client(
    port: int, broker: InProcessBroker, record: Record, app: tornado.web.Application
) -> None:
    # With a caller's client the connection is released by its next bytes: a heartbeat here.
    app.settings["sse_heartbeat_interval"] = 0.05
    client = SimpleAsyncHTTPClient(force_instance=True)
    try:
        source = EventSource(f"http://127.0.0.1:{port}/events?channel=a", http_client=client)
        async with source:
            await wait_until(lambda: record.handlers)
            event_id = await broker.publish("a", "hello")
            assert [e.id for e in await take(source, 1)] == [event_id]
        await asyncio.wait_for(record.closed[0], 5)
        # The caller's client is still usable.
        response = await client.fetch(f"http://127.0.0.1:{port}/missing", raise_error=False)
        assert response.code == 404
    finally:
        client.close()
    with pytest.raises(TypeError):
        EventSource("http://127.0.0.1:1/", http_client=object())  # type: ignore[arg-type]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_request_timeout_reconnects(
    port: int, broker: InProcessBroker, record: Record
) -> None:
    url = f"http://127.0.0.1:{port}/events?channel=a"
    async with EventSource(url, request_timeout=0.2) as source:
        await wait_until(lambda: source.connections >= 2)
        assert isinstance(source.last_error, HTTPTimeoutError)
        event_id = await broker.publish("a", "still here")
        assert [e.id for e in await take(source, 1)] == [event_id]


@pytest.mark.gen_test(timeout=30)
async def test_stalled_consumer_is_cut_off_by_the_server_and_loses_nothing(
    port: int, app: tornado.web.Application
) -> None:
    # The client's full buffer stops it reading; the server's slow-consumer bound then closes the
    # stream; the client resumes from Last-Event-ID once the consumer catches up.
    metrics = Metrics()
    broker = InProcessBroker(history_size=50_000)
    app.settings.update(sse_broker=broker, sse_max_buffer_size=64 * 1024, sse_metrics=metrics)
    async with EventSource(f"http://127.0.0.1:{port}/events?channel=a", max_queue=4) as source:
        await wait_until(lambda: source.connected)
        payload = "x" * 2000
        published: list[str] = []
        while not metrics.slow_disconnects:
            assert len(published) < 20_000, "no slow-consumer cut-off after 40 MB"
            for _ in range(200):
                published.append(await broker.publish("a", payload))
            await asyncio.sleep(0.01)  # let the stream write, fill the socket and be cut off
        assert source.pending <= 4
        received = [event.id for event in await take(source, len(published))]
        assert received == published
        assert source.connections == 2


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_idle_timeout_drops_a_silent_stream_and_resumes(
    port: int, broker: InProcessBroker, record: Record
) -> None:
    # Heartbeats are off in this app: after the priming id, the stream says nothing.
    position = await broker.publish("a", "before")
    url = f"http://127.0.0.1:{port}/events?channel=a"
    async with EventSource(url, idle_timeout=0.3) as source:
        await wait_until(lambda: len(record.handlers) >= 2)
        await asyncio.wait_for(record.closed[0], TIMEOUT)  # the client let the silent one go
        assert record.last_event_ids[:2] == [None, position]
        assert isinstance(source.last_error, StreamIdleError)
        assert "no data from the server for 0.3 s" in str(source.last_error)
        live = await broker.publish("a", "live")
        assert [e.id for e in await take(source, 1)] == [live]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_idle_timeout_spares_a_stream_that_has_heartbeats(
    port: int, app: tornado.web.Application, record: Record
) -> None:
    metrics = Metrics()
    app.settings.update(sse_heartbeat_interval=0.05, sse_metrics=metrics)
    async with EventSource(f"http://127.0.0.1:{port}/events?channel=a", idle_timeout=0.3) as source:
        await wait_until(lambda: source.connected)
        # 20 heartbeats span about a second: more than three idle timeouts
        await wait_until(lambda: metrics.heartbeats_sent >= 20)
        assert source.connections == 1 and len(record.handlers) == 1
        assert source.last_error is None


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_idle_timeout_does_not_count_a_slow_consumer(
    port: int, broker: InProcessBroker, record: Record
) -> None:
    url = f"http://127.0.0.1:{port}/events?channel=a"
    async with EventSource(url, idle_timeout=0.2, max_queue=1) as source:
        await wait_until(lambda: source.connected)
        published = [await broker.publish("a", f"event {i}") for i in range(3)]
        await wait_until(lambda: source.pending == 1)
        # The client's reading now waits for us: that silence is ours, not the server's.
        started = time.monotonic()
        await wait_until(lambda: time.monotonic() - started > 0.8)
        assert [e.id for e in await take(source, 3)] == published
        assert source.connections == 1 and len(record.handlers) == 1


def test_idle_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        EventSource("http://127.0.0.1:1/events", idle_timeout=0)


class ShedByRate(tornado.web.RequestHandler):
    """Sheds every stream as a rate limit does: 200, a short retry:, a longer Retry-After."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Retry-After", "2")
        self.finish("retry: 10\n\n")


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_shed_streams_retry_after_is_a_floor_of_the_delay() -> None:
    port = free_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/events", ShedByRate)]))
    server.listen(port, "127.0.0.1")
    try:
        source = Watched(f"http://127.0.0.1:{port}/events", retry=0.01)
        async with source:
            await wait_until(lambda: source.reconnects)
            error, delay = source.reconnects[0]
            assert error is None and source.retry == 0.01
            assert 2.0 <= delay <= 2.0 * 1.25
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 0.0),
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("-1", 0.0),
        ("nan", 0.0),
        ("inf", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("99999", 3600.0),
    ],
)
def test_retry_after_values(value: str | None, seconds: float) -> None:
    assert retry_after(value) == seconds
