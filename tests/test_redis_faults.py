"""`RedisBroker` when Redis goes away: killed, restarted with or without its data, not there yet.

Each test runs its own redis-server, so that killing it disturbs nobody else.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.broker_contract import Collector, subscribe
from tests.helpers import free_port, wait_until
from tests.redis_server import RedisServer
from tornado_sse.broker.redis import RedisBroker
from tornado_sse.errors import BrokerUnavailableError

TIMEOUT = 20


def brokers(
    server: RedisServer, count: int, index_threshold: int = 32, durable: bool = False
) -> list[RedisBroker]:
    return [
        RedisBroker(
            server.url,
            key_prefix="faults:",
            timeout=1.0,
            reconnect_backoff=(0.05, 0.2),
            index_threshold=index_threshold,
            durable=durable,
        )
        for _ in range(count)
    ]


#: the reader names every followed stream (few channels), or goes through the index (many)
BY_INDEX = pytest.mark.parametrize("index_threshold", [32, 0], ids=["direct", "by-index"])


def resets(got: Collector) -> list[dict[str, str]]:
    return [json.loads(e.data or "") for e in got.events if e.event == "stream-reset"]


async def publish_while_down(broker: RedisBroker) -> None:
    """Publishing fails with BrokerUnavailableError, promptly (bounded by the test)."""
    with pytest.raises(BrokerUnavailableError):
        await asyncio.wait_for(broker.publish("live", "lost"), 10)


@BY_INDEX
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_durable_restart_with_data_loses_nothing(
    tmp_path: Path, index_threshold: int
) -> None:
    # Declared durable (the server fsyncs every write): a restart alone is not a loss.
    with RedisServer(tmp_path, persist=True) as server:
        publisher, host = brokers(server, 2, index_threshold, durable=True)
        try:
            await publisher.start()
            await host.start()
            sub, got = await subscribe(host, ["live"])
            ids = [await publisher.publish("live", str(n)) for n in range(3)]
            await wait_until(lambda: len(got.frames) == 3, TIMEOUT)

            server.kill()
            await wait_until(lambda: not host.healthy, TIMEOUT)
            assert host.outages == 1
            await publish_while_down(publisher)
            with pytest.raises(BrokerUnavailableError):
                await asyncio.wait_for(host.subscribe(["new-channel"], Collector()), 10)
            server.start()

            # The publisher's pool reconnects on use; the host's reader after its backoff.
            # Whatever the order, the subscriber gets every event Redis kept, once, in order.
            ids += [await publisher.publish("live", str(n)) for n in range(3, 6)]
            await wait_until(lambda: host.healthy and len(got.frames) >= 6, TIMEOUT)
            assert got.data == [str(n) for n in range(6)]
            assert [frame.id for frame in got.frames] == ids
            assert resets(got) == []
            assert host.live_resets == 0
            # resume across the restart, on the other broker (once its reader is back)
            await wait_until(lambda: publisher.healthy, TIMEOUT)
            sub2, got2 = await subscribe(publisher, ["live"], ids[1])
            assert not sub2.reset
            assert got2.data == ["2", "3", "4", "5"]
            sub.close()
            sub2.close()
        finally:
            await publisher.close()
            await host.close()


@BY_INDEX
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_restart_without_data_sends_stream_reset(
    tmp_path: Path, index_threshold: int
) -> None:
    with RedisServer(tmp_path) as server:
        (host,) = brokers(server, 1, index_threshold)
        try:
            await host.start()
            sub, got = await subscribe(host, ["live", "other"])
            old = [await host.publish("live", str(n)) for n in range(3)]
            await wait_until(lambda: len(got.frames) == 3, TIMEOUT)

            server.restart()  # comes back empty
            await wait_until(lambda: resets(got), TIMEOUT)
            assert host.healthy
            (reset,) = resets(got)
            assert reset["reason"] == "broker"
            reset_key = host.id_key(reset["id"])
            assert reset_key is not None and reset_key > host.id_key(old[-1])
            assert host.live_resets == 1  # one per subscription, not one per channel
            new = await host.publish("live", "after")
            await wait_until(lambda: got.data[-1:] == ["after"], TIMEOUT)
            assert host.id_key(new) > reset_key
            sub.close()

            # An id from before the loss: the history it points into is gone; after the reset,
            # what the new incarnation of the data holds.
            sub, got = await subscribe(host, ["live"], old[1])
            assert sub.reset and sub.position == reset["id"] and got.data == ["after"]
            sub.close()
            # The reset's id is a valid place to resume from.
            sub, got = await subscribe(host, ["live"], reset["id"])
            assert not sub.reset and got.data == ["after"]
            sub.close()
        finally:
            await host.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_down_at_start_then_up(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.port = free_port()
    (broker,) = brokers(server, 1)
    try:
        await broker.start()  # does not raise: the reader keeps trying in the background
        assert not broker.healthy
        await publish_while_down(broker)
        with pytest.raises(BrokerUnavailableError):
            await asyncio.wait_for(broker.subscribe(["live"], Collector()), 10)
        up = broker.collector()
        assert {m.name: m.samples[0].value for m in up.collect()}["tornado_sse_redis_up"] == 0
        server.start()
        await wait_until(lambda: broker.healthy, TIMEOUT)
        sub, got = await subscribe(broker, ["live"])
        await broker.publish("live", "hello")
        await wait_until(lambda: got.data == ["hello"], TIMEOUT)
        sub.close()
        values = {m.name: m.samples[0].value for m in up.collect()}
        assert values["tornado_sse_redis_up"] == 1
        assert values["tornado_sse_redis_outages"] == 1
    finally:
        await broker.close()
        server.stop()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_close_while_down_returns(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        (broker,) = brokers(server, 1)
        await broker.start()
        server.kill()
        await wait_until(lambda: not broker.healthy, TIMEOUT)
        await asyncio.wait_for(broker.close(), 10)
        assert broker.closed and not broker.healthy
