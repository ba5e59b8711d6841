"""A reconnect storm on a ``tornado-sse serve --redis`` hub: every stream is taken, none shed.

Found by ``tornado-sse bench storm`` (issue 15, item 3, case c): when the clients of a stopped
hub came back on the other one all at once, most were shed with ``broker unavailable: ... Too
many connections``. Every new stream runs a Redis command; redis-py's pool (100 connections by
default) refused the 101st command in flight instead of waiting for a connection, and the hub
took that for Redis being down. A real hub, a real redis-server, a few hundred streams opened at
once (as a burst of returning browsers does), each resuming with a ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
from tests.test_redis_serve import Hub

STREAMS = 300  # three times redis-py's default pool
TIMEOUT = 20


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with RedisServer(tmp_path) as server:
        # no per-address limits: every stream comes from 127.0.0.1
        flags = ("--max-connections-per-address", "0", "--stream-rate", "0")
        hub = Hub(tmp_path / "hub.log", f"redis://127.0.0.1:{server.port}/0", *flags)
        try:
            hub.wait_healthy()
            yield hub
        finally:
            hub.stop()


async def _open_all(port: int, last_id: str) -> list[bytes]:
    """Open STREAMS streams at once; the response head of each."""
    opened: list[asyncio.StreamWriter] = []

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append(writer)
        writer.write(
            b"GET /events?channel=burst HTTP/1.1\r\nHost: hub\r\n"
            + f"Last-Event-ID: {last_id}\r\n\r\n".encode()
        )
        return await reader.readuntil(b"\r\n\r\n")

    try:
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(STREAMS))), TIMEOUT)
    finally:
        for writer in opened:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in opened), return_exceptions=True)


def test_a_burst_of_resumes_is_served_not_shed(hub: Hub) -> None:
    last_id = hub.post("burst", "before the storm").json()["id"]
    heads = asyncio.run(_open_all(hub.port, last_id))
    assert all(head.startswith(b"HTTP/1.1 200 ") for head in heads)
    shed = [head for head in heads if b"Retry-After" in head]
    assert not shed, f"{len(shed)} of {STREAMS} streams shed: {hub.log()[-600:]}"
    assert "Too many connections" not in hub.log()
