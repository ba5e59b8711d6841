"""EventStreamHandler through a real Tornado server on loopback."""

from __future__ import annotations

import pytest
import tornado.web

from tests.helpers import RawStream
from tornado_sse import EventStreamHandler, InProcessBroker


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(history_size=5)


@pytest.fixture
def app(broker: InProcessBroker) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/events", EventStreamHandler)],
        sse_broker=broker,
        compress_response=True,
    )


@pytest.mark.gen_test
async def test_headers(port: int, broker: InProcessBroker) -> None:
    stream = await RawStream.open(port, "/events?channel=a", {"Accept-Encoding": "gzip"})
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert stream.headers["cache-control"] == "no-cache"
    assert "content-encoding" not in stream.headers
    assert "connection" not in stream.headers
    await broker.publish("a", "hi")
    events = await stream.events_count(1)
    assert events[0].data == "hi"
    stream.close()
