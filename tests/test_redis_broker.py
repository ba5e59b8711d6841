"""The broker contract against `RedisBroker` on a real redis-server, and its own details."""

# ruff: noqa: F401, F811  (fixtures imported from tests.redis_server, used as parameters)

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from tornado.ioloop import IOLoop

from tests.broker_contract import TIMEOUT, BrokerContract, Collector, close_brokers, subscribe
from tests.helpers import wait_until
from tests.redis_server import (
    RedisServer,
    make_certificate,
    redis_prefix,
    redis_server,
    redis_url,
)
from tornado_sse.broker.base import Broker, Frame
from tornado_sse.broker.redis import RedisBroker

MakeRedis = Callable[..., Awaitable[RedisBroker]]


@pytest.fixture
def make_broker(io_loop: IOLoop, redis_url: str, redis_prefix: str) -> Iterator[MakeRedis]:
    """New started brokers on the shared server, one key prefix per test: two hosts' worth."""
    made: list[Broker] = []

    async def make(history_size: int = 1000, **options: Any) -> RedisBroker:
        options.pop("max_channels", None)  # Redis keeps every channel's stream: nothing to bound
        options.setdefault("key_prefix", redis_prefix)
        options.setdefault("reconnect_backoff", (0.05, 0.2))
        broker = RedisBroker(redis_url, history_size=history_size, **options)
        made.append(broker)
        await broker.start()
        assert broker.healthy
        return broker

    yield make

    close_brokers(io_loop, made)


class TestRedisBroker(BrokerContract):
    pass


class TestRedisBrokerByIndex(BrokerContract):
    """The whole contract again with readers that always go through the index stream."""

    @pytest.fixture
    def make_broker(self, make_broker: MakeRedis) -> MakeRedis:
        async def make(history_size: int = 1000, **options: Any) -> RedisBroker:
            options.setdefault("index_threshold", 0)
            return await make_broker(history_size, **options)

        return make


def stream_resets(got: Collector) -> list[dict[str, str]]:
    return [json.loads(e.data or "") for e in got.events if e.event == "stream-reset"]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_ids_are_ordered_across_channels_and_hosts(make_broker: MakeRedis) -> None:
    one = await make_broker()
    two = await make_broker()
    reader = await make_broker()
    channels = [f"c{n}" for n in range(4)]
    sub, got = await subscribe(reader, channels)

    async def burst(broker: RedisBroker, tag: str) -> list[str]:
        return list(
            await asyncio.gather(
                *(broker.publish(channels[n % 4], f"{tag}{n}") for n in range(100))
            )
        )

    ids = [i for batch in await asyncio.gather(burst(one, "a"), burst(two, "b")) for i in batch]
    assert len(set(ids)) == 200
    await wait_until(lambda: len(got.frames) == 200, TIMEOUT)
    keys = [reader.id_key(frame.id) for frame in got.frames]
    assert keys == sorted(keys) and len(set(keys)) == 200
    assert sorted(frame.id for frame in got.frames) == sorted(ids)
    sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_resume_on_another_host_with_trimmed_and_future_ids(
    make_broker: MakeRedis,
) -> None:
    one = await make_broker(history_size=3)
    two = await make_broker(history_size=3)
    ids = [await one.publish("h", str(n)) for n in range(6)]
    sub, got = await subscribe(two, ["h"], ids[2])
    assert not sub.reset
    assert got.data == ["3", "4", "5"]
    sub.close()
    sub, got = await subscribe(two, ["h"], ids[1])
    assert sub.reset and sub.position == ids[-1]
    sub.close()
    ms, seq = ids[-1].split("-")
    for future in (f"{ms}-{int(seq) + 1}", f"{int(ms) + 1}-0", "18446744073709551616-0"):
        sub, got = await subscribe(two, ["h"], future)
        assert sub.reset, future
        assert got.frames == []
        sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_history_is_read_in_bounded_pages(make_broker: MakeRedis) -> None:
    broker = await make_broker(history_size=1000)
    channels = ["pg-a", "pg-b", "pg-c", "pg-d"]
    first = await broker.publish("pg-a", "0")
    ids = [await broker.publish(channels[n % 3], str(n)) for n in range(1, 200)]
    ids += [await broker.publish("pg-d", f"d{n}") for n in range(50)]  # one busy channel last
    got = Collector()
    sub = await broker.subscribe(channels, got, first, page_size=8)
    pages = [sub.replay]
    while not sub.complete:
        pages.append(await sub.next_page())
    # COUNT 2 per stream (8 over 4 channels): a page holds at most 2 entries of each
    assert max(len(page) for page in pages) <= 8
    assert len(pages) >= len(ids) // 8
    assert [frame.id for page in pages for frame in page] == ids
    sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_history_trimmed_or_lost_under_a_paged_replay_is_a_gap(
    make_broker: MakeRedis, redis_url: str
) -> None:
    from tornado_sse.errors import HistoryGapError

    broker = await make_broker(history_size=20, min_stream_length=1)
    ids = [await broker.publish("trim", str(n)) for n in range(15)]
    sub = await broker.subscribe(["trim"], Collector(), ids[0], page_size=5)
    assert not sub.reset and [frame.id for frame in sub.replay] == ids[1:6]
    for n in range(500):  # trims the stream (MAXLEN ~ 20) past what the replay has read
        await broker.publish("trim", f"more {n}")
    with pytest.raises(HistoryGapError):
        await sub.next_page()
    sub.close()
    ids = [await broker.publish("lost", str(n)) for n in range(15)]
    sub = await broker.subscribe(["lost"], Collector(), ids[0], page_size=5)
    client = aioredis.from_url(redis_url)
    try:
        await client.delete(*[key async for key in client.scan_iter(f"{broker.key_prefix}*")])
    finally:
        await client.aclose()
    with pytest.raises(HistoryGapError):  # Redis lost its data between two pages
        await sub.next_page()
    sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_history_window_is_per_broker_setting(make_broker: MakeRedis) -> None:
    """The stream keeps more than a small history size; resume still honours history_size."""
    small = await make_broker(history_size=2)
    big = await make_broker(history_size=50)
    ids = [await small.publish("w", str(n)) for n in range(10)]
    sub, _ = await subscribe(small, ["w"], ids[5])
    assert sub.reset
    sub.close()
    sub, got = await subscribe(big, ["w"], ids[5])
    assert not sub.reset and got.data == ["6", "7", "8", "9"]
    sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_history_size_zero_still_delivers_live(make_broker: MakeRedis) -> None:
    broker = await make_broker(history_size=0)
    first = await broker.publish("z", "0")
    sub, got = await subscribe(broker, ["z"])
    await broker.publish("z", "1")
    await wait_until(lambda: got.data == ["1"], TIMEOUT)
    sub.close()
    sub, got = await subscribe(broker, ["z"], first)
    assert sub.reset
    sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_one_reader_per_process_not_per_subscriber(
    make_broker: MakeRedis, redis_url: str
) -> None:
    broker = await make_broker()
    publisher = await make_broker()
    subs = [await subscribe(broker, ["fan"]) for _ in range(100)]
    client = aioredis.from_url(redis_url)
    try:
        before = await client.info("commandstats")
        for n in range(20):
            await publisher.publish("fan", str(n))
        await wait_until(lambda: all(len(got.frames) == 20 for _, got in subs), TIMEOUT)
        after = await client.info("commandstats")
    finally:
        await client.aclose()

    def calls(stats: dict[str, Any], command: str) -> int:
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    # 2 000 deliveries from about one XREAD per event (fewer when events batch up; a few more
    # if a blocked XREAD times out on a slow machine), not one per subscriber
    assert calls(after, "xread") - calls(before, "xread") <= 25
    for _, got in subs:
        assert got.data == [str(n) for n in range(20)]
    for sub, _ in subs:
        sub.close()


@pytest.mark.parametrize(
    "index",
    [{}, {"index_threshold": 0, "index_length": 10}],
    ids=["direct", "by-index-trimmed-too"],
)
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_reader_that_falls_behind_sends_stream_reset(
    make_broker: MakeRedis, redis_url: str, redis_prefix: str, index: dict[str, int]
) -> None:
    """Entries trimmed before the reader got to them: a live stream-reset, never a gap.

    The subscriber holds the event loop (and so the reader) on its first event until another
    host, in a thread, has published far more than the stream keeps.
    """
    broker = await make_broker(history_size=1, min_stream_length=1, **index)
    published = threading.Event()
    failure: list[BaseException] = []

    async def other_host() -> None:
        other = RedisBroker(
            redis_url, key_prefix=redis_prefix, history_size=1, min_stream_length=1, **index
        )
        try:
            for n in range(1, 400):
                await other.publish("behind", str(n))
        finally:
            await other.close()

    def run_other_host() -> None:
        try:
            asyncio.run(other_host())
        except BaseException as exc:
            failure.append(exc)
        finally:
            published.set()

    class Stalling(Collector):
        def deliver(self, frame: Frame) -> None:
            super().deliver(frame)
            if len(self.frames) == 1:
                threading.Thread(target=run_other_host).start()
                assert published.wait(TIMEOUT)

    got = Stalling()
    sub = await broker.subscribe(["behind"], got)
    sub.start()
    await broker.publish("behind", "0")
    await wait_until(lambda: published.is_set() and got.data[-1:] == ["399"], TIMEOUT)
    assert not failure
    resets = stream_resets(got)
    assert len(resets) == 1 and resets[0]["reason"] == "history"
    assert got.data[0] == "0" and len(got.data) < 300
    keys = [broker.id_key(frame.id) for frame in got.frames]
    assert None not in keys and keys == sorted(keys)
    assert broker.live_resets == 1
    # the reset's id is a position to resume from
    sub.close()
    reset_id = next(e.id for e in got.events if e.event == "stream-reset")
    assert reset_id is not None
    sub, again = await subscribe(broker, ["behind"], reset_id)
    assert sub.reset or again.data[-1:] == ["399"]
    sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_url_password_and_database(tmp_path: Path) -> None:
    with RedisServer(tmp_path, args=["--requirepass", "s3cret pass"]) as server:
        url = f"redis://:s3cret%20pass@127.0.0.1:{server.port}/5"
        broker = RedisBroker(url, key_prefix="auth:")
        assert "s3cret" not in broker.address
        await broker.start()
        assert broker.healthy
        event_id = await broker.publish("secure", "x")
        client = aioredis.from_url(url)
        try:
            assert await client.exists("auth:s:secure") == 1
            assert await client.get("auth:last") == event_id.encode()
        finally:
            await client.aclose()
        await broker.close()
        wrong = RedisBroker(f"redis://:nope@127.0.0.1:{server.port}/5", timeout=0.5)
        await wrong.start()
        assert not wrong.healthy
        with pytest.raises(Exception) as info:
            await wrong.publish("secure", "y")
        assert type(info.value).__name__ == "BrokerUnavailableError"
        assert "nope" not in str(info.value)
        await wrong.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_unix_socket_url(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    args = ["--unixsocket", str(path), "--unixsocketperm", "700", "--requirepass", "s3cret"]
    with RedisServer(tmp_path, args=args):
        url = f"unix://:s3cret@{path}?db=3"
        brokers = [RedisBroker(url, key_prefix="unix:") for _ in range(2)]
        assert brokers[0].address == f"unix://{path}"  # for logs: no password, no query
        try:
            for broker in brokers:
                await broker.start()
                assert broker.healthy
            publisher, host = brokers
            sub, got = await subscribe(host, ["local"])
            first = await publisher.publish("local", "over a unix socket")
            await wait_until(lambda: got.data == ["over a unix socket"], TIMEOUT)
            sub.close()
            second = await publisher.publish("local", "missed")
            # a resume on the other broker, from the first one's id
            again, got_again = await subscribe(host, ["local"], last_event_id=first)
            await wait_until(lambda: got_again.data == ["missed"], TIMEOUT)
            assert got_again.frames[0].id == second
            again.close()
        finally:
            for broker in brokers:
                await broker.close()
        client = aioredis.from_url(url)
        try:  # the database of the URL, through the socket
            assert await client.get("unix:last") == second.encode()
        finally:
            await client.aclose()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_tls_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path, tls=make_certificate(tmp_path)) as server:
        assert server.url.startswith("rediss://")
        broker = RedisBroker(server.url, key_prefix="tls:")
        try:
            await broker.start()
            assert broker.healthy
            sub, got = await subscribe(broker, ["secure"])
            await broker.publish("secure", "over tls")
            await wait_until(lambda: got.data == ["over tls"], TIMEOUT)
            sub.close()
        finally:
            await broker.close()
        # the same server through a plain-text URL: not a Redis to talk to
        plain = RedisBroker(f"redis://127.0.0.1:{server.port}/0", timeout=0.5)
        try:
            await plain.start()
            assert not plain.healthy
        finally:
            await plain.close()


def test_bad_url_fails_where_the_broker_is_made() -> None:
    with pytest.raises(ValueError):
        RedisBroker("http://example.com")


def test_import_tornado_sse_does_not_import_redis() -> None:
    code = "import sys, tornado_sse, tornado_sse.broker; print('redis' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("index_threshold", [32, 0], ids=["direct", "by-index"])
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_resp3_connection(redis_url: str, redis_prefix: str, index_threshold: int) -> None:
    broker = RedisBroker(
        redis_url + "?protocol=3", key_prefix=redis_prefix, index_threshold=index_threshold
    )
    try:
        await broker.start()
        first = await broker.publish("a", "1")
        await broker.publish("b", "2")
        sub, got = await subscribe(broker, ["a", "b"], first)
        assert got.data == ["2"]
        await broker.publish("a", "3")
        await wait_until(lambda: got.data == ["2", "3"], TIMEOUT)
        sub.close()
    finally:
        await broker.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_hash_tagged_prefix_for_redis_cluster(make_broker: MakeRedis, redis_url: str) -> None:
    """With a ``{tag}`` prefix every key of the broker hashes to one Cluster slot."""
    broker = await make_broker(key_prefix="{sse-test}:")
    sub, got = await subscribe(broker, ["tagged"])
    await broker.publish("tagged", "x")
    await wait_until(lambda: got.data == ["x"], TIMEOUT)
    sub.close()
    client = aioredis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match="{sse-test}:*")]
        await client.delete(*keys)
    finally:
        await client.aclose()
    assert {b"{sse-test}:last", b"{sse-test}:floor", b"{sse-test}:s:tagged"} <= set(keys)
    assert all(key.startswith(b"{sse-test}:") for key in keys)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_many_channels_are_read_through_the_index(
    make_broker: MakeRedis, redis_url: str, redis_prefix: str
) -> None:
    """A reader following 2,000 channels names only a few streams per XREAD (seen with Redis's
    MONITOR), and still delivers every event once, in order."""
    broker = await make_broker(index_threshold=32)
    publisher = await make_broker()
    channels = [f"user.{n}" for n in range(2000)]
    got = Collector()
    subs = [await broker.subscribe(channels[i : i + 100], got) for i in range(0, 2000, 100)]
    for sub in subs:
        sub.start()
    first = await publisher.publish("user.7", "warm-up")
    await wait_until(lambda: [f.id for f in got.frames] == [first], TIMEOUT)

    named: list[int] = []  # streams named by each XREAD of our reader
    watcher = aioredis.from_url(redis_url)
    ready = asyncio.Event()

    async def watch() -> None:
        async with watcher.monitor() as monitor:
            ready.set()
            async for command in monitor.listen():
                words = command["command"].split()
                if words and words[0].upper() == "XREAD" and "STREAMS" in words:
                    keys = len(words) - words.index("STREAMS") - 1
                    named.append(keys // 2)

    watching = asyncio.ensure_future(watch())
    try:
        await asyncio.wait_for(ready.wait(), TIMEOUT)
        ids = [first]
        for n in range(40):
            ids.append(await publisher.publish(channels[(n * 97) % 2000], f"event {n}"))
        await wait_until(lambda: len(got.frames) == len(ids), TIMEOUT)
        await wait_until(lambda: len(named) >= 2, TIMEOUT)
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await watcher.aclose()
    assert [f.id for f in got.frames] == ids
    assert got.data == ["warm-up"] + [f"event {n}" for n in range(40)]
    assert named and max(named) <= 42, named  # the index, the wake stream, the streams named
    for sub in subs:
        sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_storm_of_new_channels_costs_a_few_round_trips(
    make_broker: MakeRedis, redis_url: str
) -> None:
    """1,000 subscriptions at once, each to a channel nobody follows yet (a reconnect storm with
    per-user channels): the follows are grouped, not queued one Redis round trip each."""
    broker = await make_broker()
    client = aioredis.from_url(redis_url)
    try:
        before = await client.info("commandstats")
        subs = await asyncio.gather(*(subscribe(broker, [f"user.{n}"]) for n in range(1000)))
        after = await client.info("commandstats")
    finally:
        await client.aclose()

    def calls(stats: dict[str, Any], command: str) -> int:
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    assert calls(after, "get") - calls(before, "get") <= 10
    publisher = await make_broker()
    event_id = await publisher.publish("user.999", "hello")
    await wait_until(lambda: subs[999][1].data == ["hello"], TIMEOUT)
    assert subs[999][1].frames[0].id == event_id
    assert all(not got.frames for _, got in subs[:999])
    for sub, _ in subs:
        sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_reader_switches_between_direct_and_index_reads_without_loss(
    make_broker: MakeRedis,
) -> None:
    """Channels followed grow past index_threshold and shrink below it again while events flow
    from another host: every subscription gets exactly its channels' events after its position."""
    broker = await make_broker(index_threshold=4)
    publisher = await make_broker()
    channels = [f"switch.{n}" for n in range(12)]
    published: list[tuple[str, str]] = []
    stop = asyncio.Event()

    async def publish() -> None:
        n = 0
        while not stop.is_set():
            channel = channels[n % len(channels)]
            published.append((channel, await publisher.publish(channel, str(n))))
            n += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(publish())
    subs = []
    for channel in channels:  # 1 -> 12 channels followed: direct reads, then the index
        subs.append(await subscribe(broker, [channel]))
        await wait_until(lambda: len(published) >= 3 * len(subs), TIMEOUT)
    await wait_until(lambda: broker._index_pos is not None, TIMEOUT)  # reading the index
    for sub, _ in subs[2:]:  # back down to 2: direct reads again
        sub.close()
        await wait_until(lambda: len(published) >= 3 * len(subs) + 30, TIMEOUT)
    await wait_until(lambda: broker._index_pos is None, TIMEOUT)  # naming the streams again
    mark = len(published)
    await wait_until(lambda: len(published) >= mark + 30, TIMEOUT)
    stop.set()
    await task
    finals = {channel: await publisher.publish(channel, "final") for channel in channels[:2]}
    key = broker.id_key
    for (sub, got), channel in zip(subs[:2], channels, strict=False):
        start = key(sub.position)
        assert start is not None
        expected = [i for c, i in published if c == channel and (key(i) or start) > start]
        expected.append(finals[channel])
        await wait_until(lambda got=got, n=len(expected): len(got.frames) >= n, TIMEOUT)
        assert [frame.id for frame in got.frames] == expected
        sub.close()
    for _, got in subs[2:]:
        ids = [frame.id for frame in got.frames]
        assert len(ids) == len(set(ids)) and ids == sorted(ids, key=lambda i: key(i) or (0, 0))
