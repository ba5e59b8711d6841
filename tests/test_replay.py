"""Replay after a resume under backpressure (issue 12, item 3), through real servers.

A resume with an early Last-Event-ID may ask for a great deal of history. It is written in pieces
of at most ``sse_max_buffer_size`` bytes, each once the client took the one before; a client that
does not read holds one piece, not all of history, and the live events held back meanwhile are
bounded too. A client that reads gets every event exactly once, in id order.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import tornado.web

from tests.helpers import RawStream, wait_until
from tests.redis_server import RedisServer
from tests.test_server import AUTH, start_hub
from tornado_sse import ConnectionSet, EventStreamHandler, InProcessBroker, Metrics

TIMEOUT = 30
BUFFER = 16 * 1024


class Recorder(EventStreamHandler):
    """Records open() and on_close() in the application's ``calls`` list."""

    def open(self) -> None:
        self.application.settings["calls"].append("open")

    def on_close(self) -> None:
        self.application.settings["calls"].append("on_close")


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(history_size=10_000)


@pytest.fixture
def connections() -> ConnectionSet:
    return ConnectionSet(prune_interval=0.05)


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    return getattr(request, "param", {})  # type: ignore[no-any-return]


@pytest.fixture
def app(
    broker: InProcessBroker, connections: ConnectionSet, settings: dict[str, Any]
) -> tornado.web.Application:
    options: dict[str, Any] = {
        "sse_max_buffer_size": BUFFER,
        "sse_heartbeat_interval": 0,
        "sse_stall_timeout": 60,
        **settings,
    }
    return tornado.web.Application(
        [(r"/events", EventStreamHandler), (r"/recorded", Recorder)],
        sse_broker=broker,
        sse_connections=connections,
        sse_metrics=Metrics(),
        calls=[],
        **options,
    )


async def fill(broker: InProcessBroker, channels: list[str], count: int, size: int) -> list[str]:
    """Publish *count* events of *size* bytes, round robin over *channels*; their ids."""
    return [
        await broker.publish(channels[n % len(channels)], f"{n:06d}" + "x" * size)
        for n in range(count)
    ]


async def never_reading(port: int, path: str, last_event_id: str) -> socket.socket:
    """A socket that sends a GET of *path* and reads nothing (until `adopt`)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nLast-Event-ID: {last_event_id}\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    return sock


async def adopt(sock: socket.socket) -> RawStream:
    """Start reading the answer on *sock*."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    stream = RawStream(reader, writer)
    await asyncio.wait_for(stream._read_head(), TIMEOUT)
    return stream


def handlers(connections: ConnectionSet) -> list[Any]:
    return list(connections)


def buffered(handler: Any) -> int:
    """Bytes of the stream's output waiting in its IOStream (0 once closed)."""
    stream = handler._stream
    return len(stream._write_buffer) if stream is not None else 0


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_reader_gets_a_long_replay_and_live_events_exactly_once_in_order(
    port: int, broker: InProcessBroker, connections: ConnectionSet
) -> None:
    channels = ["r1", "r2", "r3"]
    ids = await fill(broker, channels, 1200, 500)  # 600 KiB: about 40 pieces of 16 KiB
    stream = await RawStream.open(
        port, "/events?channel=r1&channel=r2&channel=r3", {"Last-Event-ID": ids[0]}
    )
    # live events published while the replay is still being written are held back, then
    # released after it without duplicates
    live = []
    for n in range(30):
        live.append(await broker.publish(channels[n % 3], f"live {n}"))
        await stream.events_count(n + 1)
    await stream.events_count(len(ids) - 1 + len(live))
    assert [event.id for event in stream.events] == ids[1:] + live
    more = await broker.publish("r2", "after")
    await stream.events_count(len(ids) + len(live))
    assert stream.events[-1].id == more
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_never_reading_resumes_hold_one_piece_each(
    port: int, broker: InProcessBroker, connections: ConnectionSet, app: tornado.web.Application
) -> None:
    # 8 MiB of history: more than the kernel's socket buffers take (tcp_wmem allows 4 MiB)
    ids = await fill(broker, ["big"], 8000, 1000)
    stalled = [await never_reading(port, "/events?channel=big", ids[0]) for _ in range(4)]
    await wait_until(lambda: len(connections) == 4)
    held = handlers(connections)
    # each waits for its client with at most one piece (plus a chunk header) in its buffer;
    # before issue 12 each held the whole replay, 8 MiB
    await wait_until(lambda: all(buffered(h) > 0 for h in held))
    for handler in held:
        assert buffered(handler) <= BUFFER + 16
    assert app.settings["calls"] == []
    # a reader of the same history is not held up by them and gets all of it once
    reader = await RawStream.open(port, "/events?channel=big", {"Last-Event-ID": ids[0]})
    await reader.events_count(len(ids) - 1)
    assert [event.id for event in reader.events] == ids[1:]
    for handler in held:
        assert buffered(handler) <= BUFFER + 16
    reader.close()
    for sock in stalled:
        sock.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_live_events_held_back_past_the_bound_cut_the_stream_off_without_loss(
    port: int, broker: InProcessBroker, connections: ConnectionSet, app: tornado.web.Application
) -> None:
    ids = await fill(broker, ["held"], 8000, 1000)
    sock = await never_reading(port, "/events?channel=held", ids[0])
    await wait_until(lambda: len(connections) == 1)
    (handler,) = handlers(connections)
    await wait_until(lambda: buffered(handler) > 0)
    metrics = app.settings["sse_metrics"]
    live: list[str] = []
    # the stall timeout is 60 s: only the bound on held-back live events can end it this soon
    while len(connections) == 1:
        live.append(await broker.publish("held", "y" * 1000))
        assert len(live) <= 2 * BUFFER // 1000, "held-back live events were not bounded"
    assert metrics.slow_disconnects == 1
    stalled = await adopt(sock)
    await stalled.read_to_end(timeout=TIMEOUT)
    got = [event.id for event in stalled.events]
    assert got == ids[1 : 1 + len(got)]
    stalled.close()
    resumed = await RawStream.open(
        port, "/events?channel=held", {"Last-Event-ID": got[-1] if got else ids[0]}
    )
    missing = ids[1 + len(got) :] + live
    await resumed.events_count(len(missing))
    assert [event.id for event in resumed.events] == missing
    resumed.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_client_leaving_during_the_replay_frees_everything(
    port: int, broker: InProcessBroker, connections: ConnectionSet, app: tornado.web.Application
) -> None:
    ids = await fill(broker, ["gone"], 8000, 1000)
    sock = await never_reading(port, "/recorded?channel=gone", ids[0])
    await wait_until(lambda: len(connections) == 1)
    (handler,) = handlers(connections)
    await wait_until(lambda: buffered(handler) > 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # reset, mid-replay
    await wait_until(lambda: len(connections) == 0)
    assert broker.subscriber_counts() == {}
    # open() never ran (the replay did not end), so neither does on_close()
    assert app.settings["calls"] == []


@pytest.mark.parametrize("settings", [{"sse_max_channels": 3}], indirect=True)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_channels_per_stream_are_capped(settings: dict[str, Any], port: int) -> None:
    ok = await RawStream.open(port, "/events?channel=a&channel=b&channel=c&channel=a")
    assert ok.status == 200
    ok.close()
    refused = await RawStream.open(port, "/events?channel=a&channel=b&channel=c&channel=d")
    assert refused.status == 400
    await refused.read_to_end()
    assert b"too many channels: 4 (a stream follows at most 3)" in refused.raw
    refused.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_channels_per_stream_default_to_100(port: int) -> None:
    query = "&".join(f"channel=c{n}" for n in range(100))
    ok = await RawStream.open(port, f"/events?{query}")
    assert ok.status == 200
    ok.close()
    refused = await RawStream.open(port, f"/events?{query}&channel=c100")
    assert refused.status == 400
    await refused.read_to_end()
    assert b"too many channels: 101" in refused.raw
    refused.close()


# ---------------------------------------------------------------------- a real hub process


@pytest.mark.parametrize(
    "backend",
    [
        "memory",
        "redis",
        "bridge",
    ],
)
@pytest.mark.gen_test(timeout=120)
async def test_hub_memory_stays_bounded_under_never_reading_resumes(
    tmp_path: Path, backend: str
) -> None:
    flags = ["--history", "400", "--max-buffer-size", str(64 * 1024), "--heartbeat", "0"]
    server: RedisServer | None = None
    if backend == "redis":
        server = RedisServer(tmp_path)
        server.start()
        flags += ["--redis", server.url]
    if backend == "bridge":
        flags += ["--processes", "2"]
    hub = start_hub(tmp_path / "hub.log", *flags)
    try:
        supervisor = psutil.Process(hub.proc.pid)

        def rss() -> int:
            """The hub's resident memory, every process of it."""
            processes = [supervisor, *supervisor.children(recursive=True)]
            return sum(process.memory_info().rss for process in processes)

        channels = [f"h{n}" for n in range(8)]
        query = "&".join(f"channel={c}" for c in channels)
        path = f"/events?{query}"
        event = "z" * (8 * 1024)
        ids: list[str] = []
        async with httpx.AsyncClient(timeout=10) as client:
            # 5 MiB of history over 8 channels: enough to tell the two apart, as a stalled
            # resume holding its own copy of its replay (before issue 12) adds 8 x 5 MiB, far
            # past the bound below, while one held to a page adds little (0.8-6 MiB was seen
            # with 10 MiB of history, as with 5)
            for n in range(640):
                reply = await client.post(
                    hub.url + "/publish",
                    json={"channel": channels[n % 8], "data": f"{n:05d}{event}"},
                    headers=AUTH,
                )
                assert reply.status_code == 202, reply.text
                ids.append(reply.json()["id"])

        async def read_all() -> None:
            reader = await RawStream.open(hub.port, path, {"Last-Event-ID": ids[0]})
            await reader.events_count(len(ids) - 1, timeout=60)
            assert [e.id for e in reader.events] == ids[1:]  # everything, once, in order
            reader.close()

        await read_all()  # the allocator has now seen one whole replay
        before = rss()
        opened = hub.log().count("stream open:")
        socks = [await never_reading(hub.port, path, ids[0]) for _ in range(8)]
        # every worker logs its streams (under --processes, /metrics is one worker's)
        await wait_until(lambda: hub.log().count("stream open:") == opened + 8, timeout=20)
        peak = rss()
        await read_all()  # a reader is served meanwhile, and the stalled ones stay bounded
        peak = max(peak, rss())
        growth = (peak - before) / (1 << 20)
        print(f"{backend}: hub RSS {before / (1 << 20):.1f} MiB, +{growth:.1f} MiB for 8 stalled")
        # before issue 12: each stalled resume held its own copy of the history (+100 MiB
        # with 10 MiB of it)
        assert growth < 16, f"8 never-reading resumes added {growth:.1f} MiB to the hub"
        for sock in socks:
            sock.close()
        # every stream the hub opened (the readers' too) ends
        await wait_until(
            lambda: hub.log().count("stream closed:") == hub.log().count("stream open:"),
            timeout=20,
        )
    finally:
        hub.stop()
        if server is not None:
            server.stop()


# ---------------------------------------------------------------------- the hub's stream limits


@pytest.mark.gen_test(timeout=60)
async def test_hub_limits_streams_per_address_and_channels_per_stream_by_default(
    tmp_path: Path,
) -> None:
    hub = start_hub(tmp_path / "hub.log", "--heartbeat", "0")
    try:
        query = "&".join(f"channel=c{n}" for n in range(100))
        streams = [await hub.stream(query) for _ in range(100)]
        for stream in streams:
            await stream.read_until(lambda s: s.parser.last_event_id != "")
        shed = await hub.stream("channel=one")
        await shed.read_to_end()
        assert "retry-after" in shed.headers
        assert shed.events == []
        shed.close()
        for stream in streams:
            stream.close()
        await wait_until(lambda: hub.metrics()["tornado_sse_connections_open"] == 0)
        refused = hub.get(f"/events?{query}&channel=c100")
        assert refused.status_code == 400
        assert "too many channels: 101 (a stream follows at most 100)" in refused.text
    finally:
        hub.stop()


@pytest.mark.gen_test(timeout=60)
async def test_hub_limit_flags_and_xheaders(tmp_path: Path) -> None:
    flags = ["--max-connections-per-address", "1", "--max-channels-per-stream", "2"]
    flags += ["--drain", "0"]  # stopped with its streams open: no 2 s window to wait out
    hub = start_hub(tmp_path / "hub.log", *flags, "--xheaders")
    try:
        first = await hub.stream("channel=a", headers={"X-Real-IP": "192.0.2.1"})
        await first.read_until(lambda s: s.parser.last_event_id != "")
        again = await hub.stream("channel=a", headers={"X-Real-IP": "192.0.2.1"})
        await again.read_to_end()
        assert "retry-after" in again.headers  # the same client address: shed
        again.close()
        other = await hub.stream("channel=a", headers={"X-Real-IP": "192.0.2.2"})
        await other.read_until(lambda s: s.parser.last_event_id != "")
        assert "retry-after" not in other.headers  # the same socket address, another client
        refused = hub.get("/events?channel=a&channel=b&channel=c")
        assert refused.status_code == 400
        assert "too many channels: 3 (a stream follows at most 2)" in refused.text
        first.close()
        other.close()
    finally:
        hub.stop()
    unlimited = start_hub(
        tmp_path / "unlimited.log",
        "--max-connections-per-address",
        "0",
        "--max-channels-per-stream",
        "0",
        "--stream-rate",
        "0",
        "--drain",
        "0",
    )
    try:
        query = "&".join(f"channel=c{n}" for n in range(150))
        streams = [await unlimited.stream(query) for _ in range(101)]
        for stream in streams:
            await stream.read_until(lambda s: s.parser.last_event_id != "")
            stream.close()
    finally:
        unlimited.stop()
