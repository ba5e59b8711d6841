"""EventStreamHandler through a real Tornado server on loopback, read by a raw socket client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import socket
import struct
import time
import weakref
from typing import Any

import pytest
import tornado.web
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection

from tests.helpers import RawStream, wait_until
from tornado_sse import ConnectionSet, Event, EventStreamHandler, InProcessBroker, Metrics

TIMEOUT = 15


class Recorder(EventStreamHandler):
    """Records hook calls in the application's ``calls`` list."""

    def _calls(self) -> list[Any]:
        return self.application.settings["calls"]  # type: ignore[no-any-return]

    def check_channel(self, channel: str) -> bool:
        self._calls().append(("check_channel", channel))
        return channel != "secret"

    def open(self) -> None:
        self._calls().append(("open", self.get_query_argument("channel")))
        self.send_event("welcome", event="hello")

    def on_close(self) -> None:
        self._calls().append(("on_close", self.get_query_argument("channel")))


class Async(EventStreamHandler):
    async def get_channels(self) -> list[str]:  # type: ignore[override]
        await asyncio.sleep(0)
        return ["async-" + self.get_query_argument("room")]

    async def check_channel(self, channel: str) -> bool:  # type: ignore[override]
        await asyncio.sleep(0)
        return self.get_query_argument("user", None) == "alice"


class UserFeed(EventStreamHandler):
    """Authorization through Tornado's get_current_user."""

    def get_current_user(self) -> str | None:
        return self.request.headers.get("X-User")

    def get_channels(self) -> list[str]:
        return ["public", f"user.{self.current_user}"] if self.current_user else ["public"]

    def check_channel(self, channel: str) -> bool:
        return channel == "public" or channel == f"user.{self.current_user}"


class Gated(EventStreamHandler):
    """check_channel waits for the application's ``gate``; records hooks and lost clients."""

    def _calls(self) -> list[Any]:
        return self.application.settings["calls"]  # type: ignore[no-any-return]

    async def check_channel(self, channel: str) -> bool:  # type: ignore[override]
        self._calls().append("check_channel")
        await self.application.settings["gate"].wait()
        return True

    def open(self) -> None:
        self._calls().append("open")

    def on_close(self) -> None:
        self._calls().append("on_close")

    def on_connection_close(self) -> None:
        self._calls().append("left")
        super().on_connection_close()


class Writes(EventStreamHandler):
    """Uses Tornado's own write, flush and finish once the stream is open."""

    def open(self) -> None:
        self.write("data: written\n\n")
        self.flush()
        if self.get_query_argument("finish", None):
            self.finish("data: last\n\n")


class Headed(EventStreamHandler):
    """Sets a header and a cookie before the stream opens; ``?bad=1`` puts a line break in a
    header value behind set_header's back."""

    def prepare(self) -> None:
        self.set_header("X-Flavour", "vanilla")
        self.set_cookie("seen", "yes")
        bad = self.get_query_argument("bad", None)
        if bad == "crlf":
            self._headers["X-Injected"] = "a\r\nSet-Cookie: stolen=1"
        elif bad == "wide":
            self._headers["X-Wide"] = "snow \u2603"


class FastHeartbeat(EventStreamHandler):
    """Overrides the heartbeat interval for its route only."""

    @property
    def heartbeat_interval(self) -> float:
        return 0.01


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(history_size=5)


@pytest.fixture
def connections() -> ConnectionSet:
    return ConnectionSet(prune_interval=0.05)


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Extra application settings: parametrize indirectly."""
    return getattr(request, "param", {})  # type: ignore[no-any-return]


@pytest.fixture
def app(
    broker: InProcessBroker, connections: ConnectionSet, settings: dict[str, Any]
) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/events", EventStreamHandler),
            (r"/recorded", Recorder),
            (r"/async", Async),
            (r"/user", UserFeed),
            (r"/writes", Writes),
            (r"/gated", Gated),
            (r"/fast-heartbeat", FastHeartbeat),
            (r"/headed", Headed),
        ],
        sse_broker=broker,
        sse_connections=connections,
        sse_metrics=Metrics(),
        compress_response=True,
        calls=[],
        gate=asyncio.Event(),
        **settings,
    )


async def publish_all(broker: InProcessBroker, channel: str, items: list[str]) -> list[str]:
    return [await broker.publish(channel, item) for item in items]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_headers_and_first_bytes(port: int, broker: InProcessBroker) -> None:
    stream = await RawStream.open(port, "/events?channel=a", {"Accept-Encoding": "gzip"})
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in stream.headers
    assert "connection" not in stream.headers
    assert "content-length" not in stream.headers
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    assert stream.raw.startswith(b"retry: ")
    retry = stream.parser.retry
    assert retry is not None and 3000 <= retry <= 4500
    position = stream.parser.last_event_id
    assert broker.id_key(position) is not None
    event_id = await broker.publish("a", "hi")
    await stream.events_count(1)
    assert stream.events == [Event("hi", id=event_id)]
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_retry_is_jittered_per_connection(port: int) -> None:
    streams = [await RawStream.open(port, "/events?channel=j") for _ in range(8)]
    for stream in streams:
        await stream.read_until(lambda s: s.parser.retry is not None)
    retries = {stream.parser.retry for stream in streams}
    assert len(retries) > 1
    for stream in streams:
        stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_bad_requests(port: int) -> None:
    for path, status, message in [
        ("/events", 400, b"channel"),
        ("/events?channel=", 400, b"invalid channel"),
        ("/events?channel=has%20space", 400, b"invalid channel"),
        # taken as sent, never stripped into another channel (issue 12)
        ("/events?channel=%20lead", 400, b"invalid channel"),
        ("/events?channel=lead%20", 400, b"invalid channel"),
        ("/events?channel=%09lead", 400, b"invalid channel"),
        ("/events?channel=ok&channel=lead%0A", 400, b"invalid channel"),
        ("/events?channel=" + "x" * 201, 400, b"invalid channel"),
        ("/recorded?channel=secret", 403, b"secret"),
        ("/async?room=r", 403, b"async-r"),
    ]:
        stream = await RawStream.open(port, path)
        assert stream.status == status, path
        await stream.read_to_end()
        assert message in stream.raw, stream.raw
        stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_async_hooks(port: int, broker: InProcessBroker) -> None:
    stream = await RawStream.open(port, "/async?room=r&user=alice")
    assert stream.status == 200
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    await broker.publish("async-r", "x")
    await stream.events_count(1)
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_hook_order_and_on_close_once(
    port: int, app: tornado.web.Application, broker: InProcessBroker, connections: ConnectionSet
) -> None:
    calls = app.settings["calls"]
    stream = await RawStream.open(port, "/recorded?channel=room")
    await stream.events_count(1)
    assert stream.events[0] == Event("welcome", event="hello")
    assert calls == [("check_channel", "room"), ("open", "room")]
    await broker.publish("room", "live")
    await stream.events_count(2)
    stream.close()
    await wait_until(lambda: len(connections) == 0)
    await wait_until(lambda: ("on_close", "room") in calls)
    # closing from the server side, then the client: still once
    stream = await RawStream.open(port, "/recorded?channel=room2")
    await stream.events_count(1)
    (handler,) = list(connections)
    await asyncio.wait_for(handler.close(), TIMEOUT)  # type: ignore[attr-defined]
    await stream.read_to_end()
    handler.close()  # type: ignore[attr-defined]
    stream.close()
    assert calls.count(("on_close", "room")) == 1
    assert calls.count(("on_close", "room2")) == 1


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_send_event_after_close_raises(port: int, connections: ConnectionSet) -> None:
    from tornado_sse import EventStreamClosedError

    stream = await RawStream.open(port, "/events?channel=x")
    await wait_until(lambda: len(connections) == 1)
    (handler,) = list(connections)
    handler.send_event("direct")  # type: ignore[attr-defined]
    await stream.events_count(1)
    await handler.close(Event("bye", event="shutdown"))  # type: ignore[attr-defined]
    await stream.read_to_end()
    assert stream.events[-1] == Event("bye", event="shutdown")
    with pytest.raises(EventStreamClosedError):
        handler.send_event("late")  # type: ignore[attr-defined]
    stream.close()


@pytest.mark.parametrize("settings", [{"sse_heartbeat_interval": 0.01}], indirect=True)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_heartbeat_when_idle(
    settings: dict[str, Any], port: int, broker: InProcessBroker
) -> None:
    stream = await RawStream.open(port, "/events?channel=hb")
    await stream.read_until(lambda s: s.parser.comments >= 10)
    stream.close()


@pytest.mark.parametrize("settings", [{"sse_heartbeat_interval": 0.08}], indirect=True)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_no_heartbeat_while_events_flow(
    settings: dict[str, Any], port: int, broker: InProcessBroker
) -> None:
    # The wheel ticks every 20 ms and sends a heartbeat to a stream idle for three ticks. Events
    # published less than one tick apart, over many ticks, leave no room for three ticks between
    # two of them, so no heartbeat may come between the first and the last. On a busy machine a
    # sleep may last longer: a round whose gaps were not all under one tick proves nothing, and
    # is run again.
    tick = 0.08 / 4
    count = 150
    stream = await RawStream.open(port, "/events?channel=busy")
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    for round_ in range(10):
        gaps = []
        last = time.monotonic()
        for n in range(count):
            await broker.publish("busy", f"{round_}-{n}")
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            await asyncio.sleep(0.001)
        final = f"{round_}-{count - 1}"
        await stream.read_until(lambda s, final=final: s.events and s.events[-1].data == final)
        if max(gaps[1:]) < tick and sum(gaps[1:]) > 4 * tick:
            break
    else:
        raise AssertionError("no round of publishes ran over four ticks with gaps under one")
    first = stream.raw.index(f"data: {round_}-0\n".encode())
    last_event = stream.raw.index(f"data: {round_}-{count - 1}\n".encode())
    assert b"\n:" not in stream.raw[first:last_event]
    stream.close()


@pytest.mark.parametrize(
    "settings", [{"sse_heartbeat_interval": 0, "sse_heartbeat_event": "ping"}], indirect=True
)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_heartbeat_off(settings: dict[str, Any], port: int, broker: InProcessBroker) -> None:
    off = await RawStream.open(port, "/events?channel=off")
    await off.read_until(lambda s: s.parser.last_event_id != "")
    # A route that overrides the interval (0.01 s) on the same server: its heartbeats show the
    # wheel had every chance to send some to the other stream.
    fast = await RawStream.open(port, "/fast-heartbeat?channel=fast")
    await fast.read_until(lambda s: sum(e.event == "ping" for e in s.events) >= 5)
    fast.close()
    marker = await broker.publish("off", "marker")
    await off.events_count(1)
    assert [(e.id, e.data) for e in off.events] == [(marker, "marker")]
    assert off.parser.comments == 0
    off.close()


@pytest.mark.parametrize(
    "settings", [{"sse_heartbeat_interval": 0.01, "sse_heartbeat_event": "ping"}], indirect=True
)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_heartbeat_as_named_event(settings: dict[str, Any], port: int) -> None:
    stream = await RawStream.open(port, "/events?channel=ping")
    await stream.events_count(2)
    assert stream.events[0] == Event("", event="ping")
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_resume_from_header_and_query(port: int, broker: InProcessBroker) -> None:
    ids = await publish_all(broker, "r", ["0", "1", "2", "3"])
    stream = await RawStream.open(port, "/events?channel=r", {"Last-Event-ID": ids[1]})
    await stream.events_count(2)
    assert [e.data for e in stream.events] == ["2", "3"]
    stream.close()
    stream = await RawStream.open(port, f"/events?channel=r&last_event_id={ids[2]}")
    await stream.events_count(1)
    assert [e.data for e in stream.events] == ["3"]
    stream.close()
    # the header wins over the query argument
    stream = await RawStream.open(
        port, f"/events?channel=r&last_event_id={ids[0]}", {"Last-Event-ID": ids[2]}
    )
    await stream.events_count(1)
    assert [e.data for e in stream.events] == ["3"]
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_resume_while_publishing(port: int, broker: InProcessBroker) -> None:
    broker.history.size = 1000
    first = await broker.publish("race", "0")
    total = 300

    async def publisher() -> None:
        for n in range(1, total):
            await broker.publish("race", str(n))
            if n % 7 == 0:
                await asyncio.sleep(0)

    task = asyncio.ensure_future(publisher())
    streams = []
    for _ in range(4):
        streams.append(await RawStream.open(port, "/events?channel=race", {"Last-Event-ID": first}))
    await task
    for stream in streams:
        await stream.events_count(total - 1)
        assert [e.data for e in stream.events] == [str(n) for n in range(1, total)]
        stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_last_event_id_query_argument_is_taken_as_sent(
    port: int, broker: InProcessBroker
) -> None:
    ids = await publish_all(broker, "sent", ["0", "1", "2"])
    # " <id>" is not an id of ours: a reset, not a resume from a silently stripped id
    stream = await RawStream.open(port, f"/events?channel=sent&last_event_id=%20{ids[0]}")
    await stream.events_count(1)
    assert stream.events[0].event == "stream-reset"
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_priming_id_resumes_without_loss(port: int, broker: InProcessBroker) -> None:
    await broker.publish("prime", "before")
    stream = await RawStream.open(port, "/events?channel=prime")
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    position = stream.parser.last_event_id
    stream.close()
    await broker.publish("prime", "missed")
    stream = await RawStream.open(port, "/events?channel=prime", {"Last-Event-ID": position})
    await stream.events_count(1)
    assert stream.events[0].data == "missed"
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_stream_reset(port: int, broker: InProcessBroker) -> None:
    ids = await publish_all(broker, "s", [str(n) for n in range(8)])  # history_size=5
    for last in (ids[0], "not-an-id"):
        stream = await RawStream.open(port, "/events?channel=s", {"Last-Event-ID": last})
        await stream.events_count(1)
        reset = stream.events[0]
        assert reset.event == "stream-reset"
        assert reset.id == ids[-1]
        assert json.loads(reset.data or "") == {"id": ids[-1], "reason": "history"}
        live = await broker.publish("s", "live")
        await stream.events_count(2)
        assert stream.events[1] == Event("live", id=live)
        stream.close()
        ids.append(live)


@pytest.mark.parametrize(
    "settings",
    [{"sse_max_buffer_size": 64 * 1024, "sse_heartbeat_interval": 0, "sse_stall_timeout": 60}],
    indirect=True,
)
@pytest.mark.gen_test(timeout=30)
async def test_slow_consumer_is_cut_off_and_resumes(
    settings: dict[str, Any],
    port: int,
    broker: InProcessBroker,
    connections: ConnectionSet,
    app: tornado.web.Application,
) -> None:
    stalled = await RawStream.open(port, "/events?channel=big", rcvbuf=4096)
    await stalled.read_until(lambda s: s.parser.last_event_id != "")
    fast = await RawStream.open(port, "/events?channel=big")
    await fast.read_until(lambda s: s.parser.last_event_id != "")
    payload = "x" * 16_000
    published = 0
    metrics = app.settings["sse_metrics"]
    while metrics.slow_disconnects == 0:
        await broker.publish("big", payload)
        published += 1
        await fast.events_count(published)
        assert published < 500, "stalled client never cut off"
    assert len(connections) == 1
    for _ in range(3):
        await broker.publish("big", payload)
        published += 1
    await fast.events_count(published)
    assert len(fast.events) == published
    fast.close()
    # the cut-off client reads what it got, then resumes from its last id and misses nothing
    await stalled.read_to_end(timeout=TIMEOUT)
    got = len(stalled.events)
    assert got < published
    last = stalled.parser.last_event_id
    stalled.close()
    # history is 5 events: resume inside it or get a reset, never a gap
    resumed = await RawStream.open(port, "/events?channel=big", {"Last-Event-ID": last})
    await resumed.events_count(1)
    if resumed.events[0].event == "stream-reset":
        assert published - got > 5
    else:
        await resumed.events_count(published - got)
        assert len(resumed.events) == published - got
    resumed.close()


@pytest.mark.parametrize(
    "settings",
    [{"sse_heartbeat_interval": 0.01, "sse_stall_timeout": 0.3, "sse_max_buffer_size": 1 << 24}],
    indirect=True,
)
@pytest.mark.gen_test(timeout=30)
async def test_vanished_client_is_pruned_and_released(
    settings: dict[str, Any],
    port: int,
    broker: InProcessBroker,
    connections: ConnectionSet,
    app: tornado.web.Application,
) -> None:
    gone = await RawStream.open(port, "/events?channel=v", rcvbuf=4096)
    await wait_until(lambda: len(connections) == 1)
    (handler,) = list(connections)
    ref = weakref.ref(handler)
    del handler
    # the client stops reading: fill the socket buffers so output stays pending
    for _ in range(20):
        await broker.publish("v", "y" * 100_000)
    # gone through the pruner's stall check or the kernel's TCP_USER_TIMEOUT, whichever is first
    await wait_until(lambda: len(connections) == 0, timeout=TIMEOUT)
    assert broker.subscriber_counts() == {}
    gone.close()
    await wait_until(lambda: gc.collect() is not None and ref() is None, timeout=TIMEOUT)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_an_idle_stream_keeps_nothing_of_tornados_request_loop(
    port: int, connections: ConnectionSet
) -> None:
    """Once a stream has taken its connection over, Tornado's per-connection server object, its
    finished request loop (a task and its coroutine) and the detached HTTP/1 connection go
    (``request.connection`` is None): an idle stream is kept small, and so is what every full
    collection walks (issue 8, issue 15 item 2)."""
    streams = [await RawStream.open(port, f"/events?channel=idle{n}") for n in range(5)]
    for stream in streams:
        await stream.read_until(lambda s: s.parser.last_event_id != "")
    await wait_until(lambda: len(connections) == 5)

    def kept() -> int:
        gc.collect()
        tornados = (HTTP1ServerConnection, HTTP1Connection)
        return sum(1 for o in gc.get_objects() if type(o) in tornados)

    # the request loops end a loop iteration or two after the take-over
    await wait_until(lambda: kept() == 0, timeout=5)
    assert all(handler.request.connection is None for handler in connections)
    for stream in streams:
        stream.close()


@pytest.mark.parametrize("settings", [{"sse_max_lifetime": 0.1}], indirect=True)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_max_lifetime_closes_cleanly(
    settings: dict[str, Any], port: int, connections: ConnectionSet, broker: InProcessBroker
) -> None:
    stream = await RawStream.open(port, "/events?channel=life")
    await stream.read_to_end()
    # A clean end: HTTP/1.1's last chunk, not only a closed connection.
    assert stream.last_chunk
    seen = stream.parser.last_event_id  # of the priming event
    assert seen != ""
    await wait_until(lambda: len(connections) == 0)
    stream.close()
    # The client resumes from its last id and misses nothing published in between.
    missed = await broker.publish("life", "while away")
    again = await RawStream.open(port, "/events?channel=life", {"Last-Event-ID": seen})
    await again.events_count(1)
    assert [(e.id, e.data) for e in again.events] == [(missed, "while away")]
    again.close()


CORS = {"sse_cors_origins": ["https://app.example"]}


@pytest.mark.parametrize("settings", [CORS], indirect=True)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_cors(settings: dict[str, Any], port: int) -> None:
    allowed = await RawStream.open(port, "/events?channel=c", {"Origin": "https://app.example"})
    assert allowed.status == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "Origin" in allowed.headers["vary"]
    allowed.close()
    refused = await RawStream.open(port, "/events?channel=c", {"Origin": "https://evil.example"})
    assert refused.status == 403
    assert "access-control-allow-origin" not in refused.headers
    refused.close()
    same = await RawStream.open(port, "/events?channel=c", {"Origin": f"http://127.0.0.1:{port}"})
    assert same.status == 200
    assert "access-control-allow-origin" not in same.headers
    same.close()
    preflight = await RawStream.open(
        port,
        "/events?channel=c",
        {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id",
        },
        method="OPTIONS",
    )
    assert preflight.status == 204
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "GET" in preflight.headers["access-control-allow-methods"]
    assert "last-event-id" in preflight.headers["access-control-allow-headers"].lower()
    preflight.close()
    bad = await RawStream.open(
        port, "/events?channel=c", {"Origin": "https://evil.example"}, method="OPTIONS"
    )
    assert bad.status == 403
    bad.close()


@pytest.mark.parametrize(
    "settings",
    [{"sse_max_connections": 2, "sse_retry_interval": 2.0, "sse_retry_jitter": 1.0}],
    indirect=True,
)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_connection_limit_sheds_so_eventsource_retries(
    settings: dict[str, Any], port: int, connections: ConnectionSet
) -> None:
    kept = [await RawStream.open(port, "/events?channel=l") for _ in range(2)]
    await wait_until(lambda: len(connections) == 2)
    shed = await RawStream.open(port, "/events?channel=l")
    assert shed.status == 200
    assert shed.headers["content-type"].startswith("text/event-stream")
    assert int(shed.headers["retry-after"]) >= 2
    await shed.read_to_end()
    assert shed.parser.retry is not None and 2000 <= shed.parser.retry <= 4000
    assert shed.events == []
    shed.close()
    kept[0].close()
    await wait_until(lambda: len(connections) == 1, timeout=1.0)
    again = await RawStream.open(port, "/events?channel=l")
    await again.read_until(lambda s: s.parser.last_event_id != "")
    again.close()
    kept[1].close()


@pytest.mark.parametrize("settings", [{"sse_max_connections": 1}], indirect=True)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_stream_whose_hook_awaited_is_shed_if_others_took_the_last_slot(
    settings: dict[str, Any], port: int, app: tornado.web.Application, connections: ConnectionSet
) -> None:
    """The limits are checked again after hooks that awaited (issue 15: only then)."""
    calls = app.settings["calls"]
    waiting = asyncio.ensure_future(RawStream.open(port, "/gated?channel=g"))
    await wait_until(lambda: calls.count("check_channel") == 1)
    taker = await RawStream.open(port, "/events?channel=t")  # takes the only slot meanwhile
    await taker.read_until(lambda s: s.parser.last_event_id != "")
    app.settings["gate"].set()
    shed = await asyncio.wait_for(waiting, TIMEOUT)
    assert shed.status == 200 and "retry-after" in shed.headers
    await shed.read_to_end()
    assert shed.events == [] and shed.parser.last_event_id == ""
    assert len(connections) == 1 and calls.count("open") == 0
    shed.close()
    taker.close()
    await wait_until(lambda: len(connections) == 0)


@pytest.mark.parametrize("settings", [{"sse_max_connections_per_address": 1}], indirect=True)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_per_address_limit(
    settings: dict[str, Any], port: int, connections: ConnectionSet
) -> None:
    first = await RawStream.open(port, "/events?channel=pa")
    await wait_until(lambda: len(connections) == 1)
    second = await RawStream.open(port, "/events?channel=pa")
    await second.read_to_end()
    assert "retry-after" in second.headers
    first.close()
    second.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_graceful_shutdown(port: int, connections: ConnectionSet) -> None:
    streams = [await RawStream.open(port, f"/events?channel=g{n}") for n in range(5)]
    await wait_until(lambda: len(connections) == 5)
    await asyncio.wait_for(connections.close(Event("bye", event="shutdown")), TIMEOUT)
    assert len(connections) == 0
    assert connections._pruner is not None and not connections._pruner.is_running()
    assert all(not wheel.timer.is_running() for wheel in connections._wheels.values())
    for stream in streams:
        await stream.read_to_end()
        assert stream.events[-1] == Event("bye", event="shutdown")
        stream.close()
    late = await RawStream.open(port, "/events?channel=g0")
    await late.read_to_end()
    assert "retry-after" in late.headers
    late.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_publish_from_threads(port: int, broker: InProcessBroker) -> None:
    stream = await RawStream.open(port, "/events?channel=t")
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(lambda n=n: broker.publish_threadsafe("t", str(n)).result(TIMEOUT))
            for n in range(200)
        ]
        ids = await asyncio.wait_for(
            asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), TIMEOUT
        )
    await stream.events_count(200)
    assert sorted(e.data or "" for e in stream.events) == sorted(str(n) for n in range(200))
    assert {e.id for e in stream.events} == set(ids)
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_burst_goes_out_batched(port: int, broker: InProcessBroker) -> None:
    stream = await RawStream.open(port, "/events?channel=burst")
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    before = len(stream.chunk_sizes)
    for n in range(50):  # one loop iteration: no await yields between in-process publishes
        await broker.publish("burst", str(n))
    await stream.events_count(50)
    assert [e.data for e in stream.events] == [str(n) for n in range(50)]
    # One write per stream per loop iteration: the 50 events came in one HTTP chunk (the
    # handler frames each write as one chunk), not one chunk per event.
    assert len(stream.chunk_sizes) - before == 1
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_metrics_counted(port: int, broker: InProcessBroker, app: Any) -> None:
    metrics = app.settings["sse_metrics"]
    stream = await RawStream.open(port, "/events?channel=m")
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    assert metrics.connections_open == 1
    await broker.publish("m", "1")
    await stream.events_count(1)
    assert metrics.events_sent == 1
    assert metrics.latency_count == 1
    stream.close()
    await wait_until(lambda: metrics.connections_open == 0)


async def _head(port: int, request: bytes) -> tuple[list[str], asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    return head.decode("latin1").split("\r\n")[:-2], reader, writer


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_the_stream_writes_its_own_head_with_every_header_set_before(
    port: int, broker: InProcessBroker
) -> None:
    """The handler writes the response head itself (issue 15, item 2): what Tornado would
    have sent, the headers and cookies a subclass set included, then chunks."""
    lines, reader, writer = await _head(port, b"GET /headed?channel=h HTTP/1.1\r\nHost: x\r\n\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    fields = [line.split(": ", 1) for line in lines[1:]]
    names = [name.lower() for name, _ in fields]
    assert sorted(names) == sorted(
        [
            "server",
            "content-type",
            "date",
            "cache-control",
            "x-accel-buffering",
            "x-flavour",
            "set-cookie",
            "transfer-encoding",
        ]
    )
    values = {name.lower(): value for name, value in fields}
    assert values["content-type"] == "text/event-stream; charset=utf-8"
    assert values["cache-control"] == "no-cache"
    assert values["transfer-encoding"] == "chunked"
    assert values["x-flavour"] == "vanilla"
    assert values["set-cookie"].startswith("seen=yes;")
    size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), TIMEOUT), 16)
    first = await asyncio.wait_for(reader.readexactly(size + 2), TIMEOUT)
    assert first.startswith(b"retry: ") and first.endswith(b"\n\n\r\n")
    event_id = await broker.publish("h", "after the head")
    size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), TIMEOUT), 16)
    chunk = await asyncio.wait_for(reader.readexactly(size + 2), TIMEOUT)
    assert chunk == f"id: {event_id}\ndata: after the head\n\n\r\n".encode()
    writer.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_closing_http11_client_is_told_connection_close(port: int) -> None:
    lines, _, writer = await _head(
        port, b"GET /events?channel=c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert "Connection: close" in lines
    writer.close()
    lines, _, writer = await _head(port, b"GET /events?channel=c HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not [line for line in lines if line.lower().startswith("connection:")]
    writer.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_line_break_in_a_header_value_ends_the_stream_before_any_byte(
    port: int, app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A value with CR or LF put in the headers behind set_header's back is never sent (it
    would inject a header), nor one that is not Latin-1: the connection closes without a byte,
    the value is not logged."""
    metrics = app.settings["sse_metrics"]
    for bad in ("crlf", "wide"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /headed?channel=b&bad={bad} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        await wait_until(lambda: metrics.connections_open == 0)
    refused = [r.getMessage() for r in caplog.records if "stream refused" in r.getMessage()]
    assert refused == [
        "stream refused: CR or LF in response header X-Injected",
        "stream refused: a character beyond Latin-1 in response header X-Wide",
    ]
    assert "stolen" not in caplog.text and "snow" not in caplog.text
    # and the next stream is served
    lines, _, writer = await _head(port, b"GET /headed?channel=b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    writer.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_http10_stream_without_keep_alive(port: int, broker: InProcessBroker) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /events?channel=h10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"connection:" not in head.lower()
    assert b"transfer-encoding" not in head.lower()
    body = await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT)  # retry
    body = await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT)  # priming id
    event_id = await broker.publish("h10", "plain")
    body = await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT)
    assert body == f"id: {event_id}\ndata: plain\n\n".encode()
    writer.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_channels_per_current_user(port: int, broker: InProcessBroker) -> None:
    alice = await RawStream.open(port, "/user", {"X-User": "alice"})
    anonymous = await RawStream.open(port, "/user")
    for stream in (alice, anonymous):
        await stream.read_until(lambda s: s.parser.last_event_id != "")
    await broker.publish("user.alice", "for alice")
    await broker.publish("public", "for all")
    await alice.events_count(2)
    await anonymous.events_count(1)
    assert [e.data for e in alice.events] == ["for alice", "for all"]
    assert [e.data for e in anonymous.events] == ["for all"]
    alice.close()
    anonymous.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_history_keeps_one_copy_of_each_event(port: int, broker: InProcessBroker) -> None:
    streams = [await RawStream.open(port, "/events?channel=copy") for _ in range(3)]
    for stream in streams:
        await stream.read_until(lambda s: s.parser.last_event_id != "")
    await broker.publish("copy", "z" * 10_000)
    for stream in streams:
        await stream.events_count(1)
        stream.close()
    (frame,) = [item for _, item in broker.history._channels["copy"].items]
    assert frame._chunk is None  # the chunk-framed copy went with the writes
    assert frame.chunk.endswith(frame.data + b"\r\n")  # and is made again if ever needed


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_write_flush_and_finish_once_open(
    port: int, broker: InProcessBroker, connections: ConnectionSet
) -> None:
    stream = await RawStream.open(port, "/writes?channel=w")
    await stream.events_count(1)
    await broker.publish("w", "live")
    await stream.events_count(2)
    assert [e.data for e in stream.events] == ["written", "live"]
    ended = await RawStream.open(port, "/writes?channel=w&finish=1")
    await ended.read_to_end()
    assert ended.last_chunk
    assert [e.data for e in ended.events] == ["written", "last"]
    assert await asyncio.wait_for(ended.reader.read(), TIMEOUT) == b""  # and the connection closed
    await wait_until(lambda: len(connections) == 1)
    stream.close()
    await wait_until(lambda: len(connections) == 0)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_open_streams_leave_tornados_http_reader(
    port: int, http_server: Any, broker: InProcessBroker, connections: ConnectionSet
) -> None:
    """Nothing of Tornado's per-request machinery stays alive for an open stream (issue 8)."""
    refused = await RawStream.open(port, "/events")  # a 400 keeps its keep-alive connection
    assert refused.status == 400
    await refused.read_to_end()
    streams = [await RawStream.open(port, f"/events?channel=d{n}") for n in range(3)]
    await wait_until(lambda: len(connections) == 3)
    assert len(http_server._connections) == 1  # only the refused request's connection
    refused.close()
    await wait_until(lambda: len(http_server._connections) == 0)
    await broker.publish("d1", "still here")
    await streams[1].events_count(1)
    for stream in streams:
        stream.close()
    await wait_until(lambda: len(connections) == 0)


@pytest.mark.parametrize("settings", [{"sse_max_connections": 3}], indirect=True)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_client_leaving_during_an_async_hook_frees_its_slot(
    settings: dict[str, Any], port: int, app: tornado.web.Application, connections: ConnectionSet
) -> None:
    calls = app.settings["calls"]
    for n in range(3):
        sock = socket.socket()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = f"GET /gated?channel=g{n} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        await wait_until(lambda n=n: calls.count("check_channel") == n + 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # reset while check_channel is pending
        await wait_until(lambda n=n: calls.count("left") == n + 1)
    app.settings["gate"].set()
    # the three abandoned requests hold no slot, then or later: a fresh client gets a stream
    fresh = await RawStream.open(port, "/gated?channel=fresh")
    await fresh.read_until(lambda s: s.parser.last_event_id != "")
    assert "retry-after" not in fresh.headers
    assert len(connections) == 1
    # open() never ran for them, so neither did on_close(); the fresh stream's pair runs once
    assert calls.count("open") == 1
    assert calls.count("on_close") == 0
    fresh.close()
    await wait_until(lambda: len(connections) == 0)
    await wait_until(lambda: calls.count("on_close") == 1)
