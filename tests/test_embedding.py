"""The README's embedding path, through an `HTTPServer` of the test's own on loopback.

* an application without ``sse_broker`` streams from `tornado_sse.default_broker()`, which takes
  publishes from the loop and from other threads, and is replaced once its loop is closed;
* with ``xheaders=True`` (``--xheaders`` of the hub) per-address limits and the log lines see the
  client's address from ``X-Real-IP`` / ``X-Forwarded-For``;
* a stream's socket carries ``TCP_USER_TIMEOUT`` = the stall timeout, read back with
  ``getsockopt`` on the server's side of the connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.netutil import bind_sockets

import tornado_sse
from tests.conftest import require
from tests.helpers import RawStream, wait_until
from tornado_sse import ConnectionSet, EventStreamHandler, InProcessBroker

TIMEOUT = 15


class News(EventStreamHandler):
    """The README's example, reduced: one channel, anyone may follow it."""

    def get_channels(self) -> list[str]:
        return ["news"]


class ShortStall(EventStreamHandler):
    """Overrides the stall timeout for its route only."""

    @property
    def stall_timeout(self) -> float | None:
        return 7.0


class Server:
    """An `HTTPServer` on a free loopback port that remembers the server side of each
    connection (`handle_stream` is Tornado's public hook for it)."""

    def __init__(self, app: tornado.web.Application, **options: Any) -> None:
        self.streams: list[IOStream] = []
        streams = self.streams

        class Recording(HTTPServer):
            def handle_stream(self, stream: IOStream, address: tuple[str, int]) -> None:
                streams.append(stream)
                super().handle_stream(stream, address)

        self.http = Recording(app, **options)
        sockets = bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
        self.port = int(sockets[0].getsockname()[1])
        self.http.add_sockets(sockets)

    async def stop(self) -> None:
        self.http.stop()
        await asyncio.wait_for(self.http.close_all_connections(), TIMEOUT)


@pytest.fixture
def make_server(io_loop: object) -> Iterator[Any]:
    servers: list[Server] = []

    def make(app: tornado.web.Application, **options: Any) -> Server:
        server = Server(app, **options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.http.stop()


# ---------------------------------------------------------------------- default_broker()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_an_app_without_a_broker_streams_from_default_broker(make_server: Any) -> None:
    server = make_server(tornado.web.Application([(r"/events", News)]))
    stream = await RawStream.open(server.port, "/events")
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    broker = tornado_sse.default_broker()
    assert tornado_sse.default_broker() is broker
    on_loop = await broker.publish("news", "hello", event="greeting")

    def from_a_thread() -> str:
        return (
            tornado_sse.default_broker().publish_threadsafe("news", "from a thread").result(TIMEOUT)
        )

    threaded = await asyncio.get_running_loop().run_in_executor(None, from_a_thread)
    events = await stream.events_count(2)
    assert [(e.id, e.event, e.data) for e in events] == [
        (on_loop, "greeting", "hello"),
        (threaded, None, "from a thread"),
    ]
    stream.close()
    await server.stop()


def test_default_broker_is_replaced_once_its_loop_is_closed() -> None:
    code = """
import asyncio
import tornado_sse

async def use():
    broker = tornado_sse.default_broker()
    await broker.publish("news", "x")
    return broker

first = asyncio.run(use())
second = asyncio.run(use())
assert second is not first and not second.closed, (first, second)
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------- xheaders


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_xheaders_per_address_limit_and_logs(
    make_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tornado_sse")
    connections = ConnectionSet()
    app = tornado.web.Application(
        [(r"/events", EventStreamHandler)],
        sse_broker=InProcessBroker(),
        sse_connections=connections,
        sse_max_connections_per_address=1,
    )
    server = make_server(app, xheaders=True)
    first = await RawStream.open(server.port, "/events?channel=x", {"X-Real-IP": "203.0.113.1"})
    await first.read_until(lambda s: s.parser.last_event_id != "")
    # the same client behind the proxy: over its limit, shed
    again = await RawStream.open(server.port, "/events?channel=x", {"X-Real-IP": "203.0.113.1"})
    await again.read_to_end()
    assert again.status == 200 and "retry-after" in again.headers
    # other clients behind the same proxy (all from 127.0.0.1): each has its own limit
    other = await RawStream.open(
        server.port, "/events?channel=x", {"X-Forwarded-For": "198.51.100.7"}
    )
    proxy = await RawStream.open(server.port, "/events?channel=x")
    for stream in (other, proxy):
        await stream.read_until(lambda s: s.parser.last_event_id != "")
    assert sorted(conn.address for conn in connections) == [  # type: ignore[attr-defined]
        "127.0.0.1",
        "198.51.100.7",
        "203.0.113.1",
    ]
    for stream in (first, other, proxy):
        stream.close()
    again.close()
    await wait_until(lambda: len(connections) == 0)
    messages = [record.getMessage() for record in caplog.records if record.name == "tornado_sse"]
    for address in ("203.0.113.1", "198.51.100.7", "127.0.0.1"):
        assert f"stream open: channels=x client={address} resume=False" in messages
        assert any(
            m.startswith(f"stream closed: channels=x client={address} ") for m in messages
        ), messages
    await server.stop()


# ---------------------------------------------------------------------- socket options


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_stream_sockets_carry_tcp_user_timeout(make_server: Any) -> None:
    require(hasattr(socket, "TCP_USER_TIMEOUT"), "TCP_USER_TIMEOUT is Linux only")
    app = tornado.web.Application(
        [(r"/events", EventStreamHandler), (r"/short", ShortStall)],
        sse_broker=InProcessBroker(),
        sse_connections=ConnectionSet(),
        sse_heartbeat_interval=20,
    )
    server = make_server(app)
    expected = {
        "/events?channel=a": 40_000,  # the default: max(2 x heartbeat, 30) seconds
        "/short?channel=a": 7_000,  # a route's own stall_timeout
    }
    for path, milliseconds in expected.items():
        stream = await RawStream.open(server.port, path)
        await stream.read_until(lambda s: s.parser.last_event_id != "")
        sock = server.streams[-1].socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == milliseconds
        stream.close()
    await server.stop()
