"""``sse_stream_rate``: new streams per client address, through a real Tornado server on loopback.

Client addresses are real: each raw client binds its socket to its own 127.0.0.x address.
"""

from __future__ import annotations

from typing import Any

import pytest
import tornado.web

from tests.helpers import RawStream, wait_until
from tornado_sse import ConnectionSet, EventStreamHandler, InProcessBroker, Metrics, RateLimiter

TIMEOUT = 15


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(history_size=50)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    return getattr(request, "param", {})  # type: ignore[no-any-return]


@pytest.fixture
def app(
    broker: InProcessBroker, metrics: Metrics, settings: dict[str, Any]
) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/events", EventStreamHandler)],
        sse_broker=broker,
        sse_metrics=metrics,
        sse_connections=ConnectionSet(prune_interval=0.05),
        sse_retry_interval=0.5,
        sse_retry_jitter=0.5,
        **settings,
    )


async def _shed(port: int, source: str, headers: dict[str, str] | None = None) -> RawStream:
    stream = await RawStream.open(port, "/events?channel=r", headers=headers, source=source)
    await stream.read_to_end()
    stream.close()
    return stream


@pytest.mark.parametrize("settings", [{"sse_stream_rate": "0.1/2"}], indirect=True)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_over_the_rate_a_stream_is_shed_and_other_addresses_are_not(
    settings: dict[str, Any], port: int, metrics: Metrics
) -> None:
    kept = [await RawStream.open(port, "/events?channel=r", source="127.0.0.2") for _ in range(2)]
    for stream in kept:
        await stream.read_until(lambda s: s.parser.last_event_id != "")
        stream.close()
    shed = await _shed(port, "127.0.0.2")
    assert shed.status == 200
    assert shed.headers["content-type"].startswith("text/event-stream")
    assert shed.events == []
    # the next token is ~10 s away (0.1/s): retry: and Retry-After say at least that, not 0.5 s
    assert shed.parser.retry is not None and 9_000 <= shed.parser.retry <= 15_000
    assert 9 <= int(shed.headers["retry-after"]) <= 15
    assert int(shed.headers["retry-after"]) * 1000 >= shed.parser.retry
    # a resume is a new stream like any other
    resumed = await _shed(port, "127.0.0.2", {"Last-Event-ID": kept[0].parser.last_event_id})
    assert resumed.events == [] and resumed.parser.retry is not None
    assert resumed.parser.retry >= 9_000
    other = await RawStream.open(port, "/events?channel=r", source="127.0.0.3")
    await other.read_until(lambda s: s.parser.last_event_id != "")
    assert other.parser.retry is not None and other.parser.retry <= 750
    other.close()
    assert metrics.streams_shed == {"rate": 2}
    assert metrics.connections_shed == 2
    assert metrics.rate_limit_keys() == {"stream": 2}


@pytest.mark.parametrize("settings", [{"sse_stream_rate": RateLimiter(20, burst=1)}], indirect=True)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_shed_resume_loses_nothing(
    port: int, broker: InProcessBroker, settings: dict[str, Any]
) -> None:
    first = await RawStream.open(port, "/events?channel=r", source="127.0.0.4")
    await first.read_until(lambda s: s.parser.last_event_id != "")
    first.close()
    start = first.parser.last_event_id
    ids = [await broker.publish("r", f"e{i}") for i in range(3)]
    shed = await _shed(port, "127.0.0.4", {"Last-Event-ID": start})
    assert shed.events == [] and shed.parser.retry is not None
    limiter = settings["sse_stream_rate"]
    await wait_until(lambda: limiter.wait("127.0.0.4") == 0.0)
    resumed = await RawStream.open(
        port, "/events?channel=r", headers={"Last-Event-ID": start}, source="127.0.0.4"
    )
    await resumed.events_count(3)
    assert [e.data for e in resumed.events] == ["e0", "e1", "e2"]
    assert [e.id for e in resumed.events] == ids
    resumed.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_one_limiter_shared_by_two_applications(
    broker: InProcessBroker, metrics: Metrics
) -> None:
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    limiter = RateLimiter(0.01, burst=1)
    servers, ports = [], []
    for _ in range(2):
        app = tornado.web.Application(
            [(r"/events", EventStreamHandler)],
            sse_broker=broker,
            sse_metrics=metrics,
            sse_connections=ConnectionSet(),
            sse_stream_rate=limiter,
        )
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(app)
        server.add_sockets(sockets)
        servers.append(server)
        ports.append(sockets[0].getsockname()[1])
    try:
        ok = await RawStream.open(ports[0], "/events?channel=r", source="127.0.0.5")
        await ok.read_until(lambda s: s.parser.last_event_id != "")
        ok.close()
        shed = await _shed(ports[1], "127.0.0.5")
        assert shed.events == [] and shed.parser.retry is not None
        assert shed.parser.retry >= 90_000
        assert len(limiter) == 1
    finally:
        for server in servers:
            server.stop()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_off_by_default(port: int, metrics: Metrics) -> None:
    for _ in range(30):
        stream = await RawStream.open(port, "/events?channel=r", source="127.0.0.6")
        await stream.read_until(lambda s: s.parser.last_event_id != "")
        stream.close()
    assert metrics.streams_shed == {}
