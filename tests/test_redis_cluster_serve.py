"""``tornado-sse serve --redis-cluster URL --redis-cluster-shards 3``, black-box, on a real Redis
Cluster (issue 17): a stream following a channel on every shard resumes across hub restarts (a
new hub process each time) with nothing lost or twice while another hub publishes; the flags'
usage errors."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from tests.helpers import free_port
from tests.redis_cluster import RedisCluster
from tests.test_redis_serve import Hub
from tests.test_serve_ops import run_serve
from tornado_sse.broker.sharded import parse_position, placement
from tornado_sse.protocol import Event

TIMEOUT = 60
SHARDS = 3


def cluster_hub(log: Path, cluster: RedisCluster, node: int) -> Hub:
    """A hub given the URL of the cluster's *node*-th node (any node will do); the second
    hub's first URL names no node at all, so it asks the next."""
    urls = [cluster.live[node].url]
    if node == 2:
        urls.insert(0, f"redis://127.0.0.1:{free_port()}/0")
    flags = [arg for url in urls for arg in ("--redis-cluster", url)]
    # --drain 0: a hub stopped with its stream open waited out the default window (2 s) each time
    hub = Hub(log, "", *flags, "--redis-cluster-shards", str(SHARDS), "--drain", "0")
    hub.wait_healthy()
    return hub


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_stream_over_every_cluster_shard_resumes_across_hub_restarts(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    stem = f"room-{uuid.uuid4().hex[:8]}-"
    channels = [
        next(f"{stem}{n}" for n in range(1000) if placement(f"{stem}{n}", SHARDS) == shard)
        for shard in range(SHARDS)
    ]
    query = "&".join(f"channel={channel}" for channel in channels)
    publisher = cluster_hub(tmp_path / "publisher.log", redis_cluster, 0)
    least = 180
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
        for round_ in range(3):
            hub = cluster_hub(tmp_path / f"hub{round_}.log", redis_cluster, round_ + 1)
            try:
                headers = {"Last-Event-ID": last} if last else None
                stream = await hub.stream(query, headers=headers)
                await stream.read_until(lambda s: s.parser.last_event_id != "" or failures, TIMEOUT)
                assert not failures, failures
                if round_ == 0:
                    thread.start()  # the stream has its position: publish from now on
                if round_ < 2:
                    count = 40 * (round_ + 1)
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


@pytest.mark.parametrize(
    ("flags", "flag", "says"),
    [
        (["--redis-cluster", "not a url"], "--redis-cluster", "not a Redis URL"),
        (["--redis-cluster", "unix:///run/redis.sock"], "--redis-cluster", "redis://"),
        (["--redis-cluster", "redis://h:7000", "--redis", "redis://h:6379"], "--redis", "either"),
        (["--redis-cluster-shards", "3"], "--redis-cluster-shards", "needs --redis-cluster"),
        (["--redis-cluster", "redis://h:7000", "--redis-cluster-shards", "0"], "shards", "0"),
        (["--redis-cluster", "redis://h:7000", "--redis-cluster-shards", "x"], "shards", "x"),
        (["--redis-cluster", "redis://h:7000", "--redis-cluster-shards", "16385"], "shards", ""),
    ],
)
def test_cluster_flags_refused_name_the_flag(flags: list[str], flag: str, says: str) -> None:
    result = run_serve(*flags)
    assert result.returncode == 2, result.stderr
    assert flag in result.stderr and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
