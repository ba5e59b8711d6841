"""Start positions (issue 14): a fresh stream asks for the last N events of its channels, through
the handler (``?history=N``, the hook, the setting), the Python client and a real hub process.
The backends' part (every broker, paged) is in tests/broker_contract.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tornado.web

from tests.helpers import TLS, RawStream, wait_until
from tests.test_server import Hub, start_hub
from tornado_sse import EventSource, EventStreamHandler, InProcessBroker, InvalidArgumentError
from tornado_sse.handler import MAX_HISTORY, parse_history

TIMEOUT = 15


class Backlog(EventStreamHandler):
    """A room whose fresh streams start with its last three events, whatever the query says."""

    def get_history(self) -> int:
        return 3


class Records(EventStreamHandler):
    """The real handler, keeping every stream it opened (to close one from the server)."""

    def open(self) -> None:
        self.application.settings["opened"].append(self)


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(history_size=5)


@pytest.fixture
def app(broker: InProcessBroker) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/events", Records), (r"/backlog", Backlog)],
        sse_broker=broker,
        sse_heartbeat_interval=0,
        sse_retry_interval=0.05,
        sse_retry_jitter=0.0,
        opened=[],
    )


async def publish_all(broker: InProcessBroker, channel: str, count: int) -> list[str]:
    return [await broker.publish(channel, str(n)) for n in range(count)]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_history_query_starts_with_the_last_events(
    port: int, broker: InProcessBroker
) -> None:
    ids = await publish_all(broker, "h", 4)
    stream = await RawStream.open(port, "/events?channel=h&history=2")
    assert stream.status == 200
    await stream.events_count(2)
    assert [event.id for event in stream.events] == ids[2:]
    live = await broker.publish("h", "live")
    await stream.events_count(3)
    assert stream.events[-1].id == live
    stream.close()
    # more than retained (history_size=5): what is retained, no stream-reset
    ids.append(live)
    ids += await publish_all(broker, "h", 3)
    stream = await RawStream.open(port, "/events?channel=h&history=1000")
    await stream.events_count(5)
    assert [event.id for event in stream.events] == ids[-5:]
    assert all(event.event is None for event in stream.events)
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_last_event_id_takes_precedence_over_history(
    port: int, broker: InProcessBroker
) -> None:
    ids = await publish_all(broker, "p", 4)
    stream = await RawStream.open(port, "/events?channel=p&history=4", {"Last-Event-ID": ids[2]})
    await stream.events_count(1)
    assert [event.id for event in stream.events] == ids[3:]
    await broker.publish("p", "live")
    await stream.events_count(2)
    assert [event.data for event in stream.events] == ["3", "live"]
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_bad_history_values_are_400(port: int) -> None:
    for value in ["-1", "abc", "1.5", "", "%205", "1e3", str(MAX_HISTORY + 1), "9" * 30, "%D9%A3"]:
        stream = await RawStream.open(port, f"/events?channel=b&history={value}")
        assert stream.status == 400, value
        await stream.read_to_end()
        assert b"history must be a whole number" in stream.raw, stream.raw
        stream.close()
    with pytest.raises(InvalidArgumentError):
        parse_history("+3")
    assert parse_history(str(MAX_HISTORY)) == MAX_HISTORY


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_hook_decides_the_history(port: int, broker: InProcessBroker) -> None:
    ids = await publish_all(broker, "room", 5)
    stream = await RawStream.open(port, "/backlog?channel=room&history=1")
    await stream.events_count(3)
    assert [event.id for event in stream.events] == ids[2:]
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_setting_is_the_default(broker: InProcessBroker) -> None:
    ids = await publish_all(broker, "s", 4)
    app = tornado.web.Application(
        [(r"/events", EventStreamHandler)], sse_broker=broker, sse_history=2
    )
    server = app.listen(0, "127.0.0.1")
    port = next(iter(server._sockets.values())).getsockname()[1]
    try:
        stream = await RawStream.open(port, "/events?channel=s")
        await stream.events_count(2)
        assert [event.id for event in stream.events] == ids[2:]
        stream.close()
        stream = await RawStream.open(port, "/events?channel=s&history=0")
        await stream.read_until(lambda s: s.parser.last_event_id != "")
        assert stream.parser.last_event_id == ids[-1]
        assert stream.events == []
        stream.close()
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_client_asks_for_history_once_then_resumes(
    port: int, broker: InProcessBroker, app: tornado.web.Application
) -> None:
    ids = await publish_all(broker, "c", 4)
    with pytest.raises(ValueError):
        EventSource(f"http://127.0.0.1:{port}/events?channel=c", history=-1)
    source = EventSource(f"http://127.0.0.1:{port}/events?channel=c", history=2)
    assert source.url.endswith("?channel=c&history=2")
    async with source:
        got = []

        async def take(count: int) -> None:
            async for event in source:
                got.append(event)
                if len(got) == count:
                    return

        await asyncio.wait_for(take(2), TIMEOUT)
        assert [event.id for event in got] == ids[2:]
        opened = app.settings["opened"]
        await opened[0].close()  # the client reconnects with Last-Event-ID: no replay again
        await wait_until(lambda: source.connections == 2 and source.connected, TIMEOUT)
        ids.append(await broker.publish("c", "after"))
        await asyncio.wait_for(take(3), TIMEOUT)
        assert [event.id for event in got] == ids[2:]


@pytest.fixture(scope="module")
def hubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Hub]]:
    """A hub of one process and one of two behind the bridge, each keeping 3 events a channel."""
    path = tmp_path_factory.mktemp("history")
    started = [
        start_hub(path / "one.log", "--history", "3"),
        start_hub(path / "two.log", "--history", "3", "--processes", "2"),
    ]
    yield started
    for hub in started:
        hub.stop()


@pytest.mark.gen_test(timeout=30)
async def test_hub_history_on_one_process_and_over_the_bridge(
    hubs: list[Hub], tmp_path: Path
) -> None:
    for hub in hubs:
        ids = [hub.publish("hh", str(n)) for n in range(5)]
        for query, expected in [("history=2", ids[3:]), ("history=50", ids[2:])]:
            stream = await hub.stream(f"channel=hh&{query}")
            assert stream.status == 200
            await stream.events_count(len(expected))
            assert [event.id for event in stream.events] == expected
            assert all(event.event is None for event in stream.events)
            stream.close()
        reply = httpx.get(hub.url + "/events?channel=hh&history=x", timeout=10, verify=TLS)
        assert reply.status_code == 400
        assert "history must be a whole number" in reply.text
