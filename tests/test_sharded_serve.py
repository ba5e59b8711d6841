"""``tornado-sse serve --redis URL --redis URL --redis URL``, black-box: hubs whose channels are
sharded over three real redis-servers. A stream following a channel on every shard resumes
across hub restarts (a new hub process each time) with nothing lost or twice, while another hub
keeps publishing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import TLS
from tests.redis_server import RedisServer
from tests.test_redis_serve import Hub
from tests.test_serve_ops import run_serve
from tornado_sse.broker.sharded import parse_position, placement
from tornado_sse.protocol import Event

TIMEOUT = 60
SHARDS = 3


@pytest.fixture(scope="module")
def redis_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    servers = [RedisServer(tmp_path_factory.mktemp(f"serve-shard{n}")) for n in range(SHARDS)]
    try:
        for server in servers:
            server.start()
        yield [server.url for server in servers]
    finally:
        for server in servers:
            server.stop()


def sharded_hub(log: Path, urls: list[str]) -> Hub:
    more = [arg for url in urls[1:] for arg in ("--redis", url)]
    hub = Hub(log, urls[0], *more, "--drain", "0")
    hub.wait_healthy()
    return hub


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_stream_over_every_shard_resumes_across_hub_restarts(
    tmp_path: Path, redis_urls: list[str]
) -> None:
    channels = []
    for shard in range(SHARDS):
        channels.append(next(f"room{n}" for n in range(100) if placement(f"room{n}", 3) == shard))
    query = "&".join(f"channel={channel}" for channel in channels)
    publisher = sharded_hub(tmp_path / "publisher.log", redis_urls)
    least = 240
    published: dict[str, list[str]] = {channel: [] for channel in channels}
    failures: list[BaseException] = []
    stop = threading.Event()

    def publish_all() -> None:
        """0, 1, 2, ... over the channels in turn, from the first stream's start until the last
        hub's stream has its position (every restart happens while it publishes), and at least
        *least* events. (A fixed count ran out before the last restart once publishing was
        fast, and the last stream, with nothing new to read, never had its position.)"""
        n = 0
        try:
            while n < least or not stop.is_set():
                channel = channels[n % SHARDS]
                publisher.publish(channel, str(n))
                published[channel].append(str(n))
                n += 1
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    received: list[Event] = []
    last = ""
    thread = threading.Thread(target=publish_all)
    try:
        for round_ in range(4):
            hub = sharded_hub(tmp_path / f"hub{round_}.log", redis_urls)
            try:
                headers = {"Last-Event-ID": last} if last else None
                stream = await hub.stream(query, headers=headers)
                await stream.read_until(lambda s: s.parser.last_event_id != "" or failures, TIMEOUT)
                assert not failures, failures
                if round_ == 0:
                    thread.start()  # the stream has its position: publish from now on
                if round_ < 3:
                    count = 30 * (round_ + 1)
                    await stream.read_until(lambda s, c=count: len(received) + len(s.events) >= c)
                else:
                    stop.set()
                    thread.join(TIMEOUT)
                    assert not failures, failures
                    total = sum(len(mine) for mine in published.values())
                    await stream.read_until(lambda s, t=total: len(received) + len(s.events) >= t)
                stream.close()
                received.extend(stream.events)
                last = stream.parser.last_event_id
                parts = parse_position(last, SHARDS)
                assert parts is not None and sorted(parts) == [0, 1, 2], last
            finally:
                hub.stop()
            assert hub.proc.returncode == 0, hub.log()
        metrics = httpx.get(publisher.url + "/metrics", timeout=5, verify=TLS).text
        for shard in range(SHARDS):  # each shard's own metrics, labelled
            assert f'tornado_sse_redis_up{{shard="{shard}"}} 1.0' in metrics
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(TIMEOUT)
        publisher.stop()
    assert all(event.event is None for event in received), "no stream-reset, nothing else"
    data = [event.data for event in received]
    assert sorted(data, key=lambda d: int(d or -1)) == [str(n) for n in range(total)], (
        "lost or repeated events"
    )
    for channel in channels:  # each shard in its id order: as published on each channel
        mine = [d for d in data if int(d or -1) % SHARDS == channels.index(channel)]
        assert mine == published[channel]


def test_the_same_redis_twice_is_a_usage_error() -> None:
    url = "redis://127.0.0.1:6379/0"
    result = run_serve("--redis", url, "--redis", url)
    assert result.returncode == 2, result.stderr
    assert "--redis" in result.stderr and "twice" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_serve("--redis", url, "--redis", "not a url")
    assert result.returncode == 2, result.stderr
    assert "--redis" in result.stderr and "Traceback" not in result.stderr
