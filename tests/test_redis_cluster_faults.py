"""A cluster shard (`RedisBroker.for_cluster_shard`) through a failover (``kill -9`` of the
primary holding it, its replica lagging) and a resharding (its slot moved to another primary),
each on a real Redis Cluster of its own (issue 17)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.ioloop import IOLoop

import tests.test_sharded as sharded_tests
from tests.broker_contract import Collector, close_brokers, subscribe
from tests.helpers import wait_until
from tests.redis_cluster import CLUSTER_TIMEOUT, RedisCluster
from tornado_sse.broker.base import Broker
from tornado_sse.broker.cluster import cluster_broker, key_slot, shard_tag
from tornado_sse.broker.redis import RedisBroker
from tornado_sse.errors import BrokerUnavailableError

MakeRedis = Callable[..., Awaitable[RedisBroker]]
SHARD, SHARDS = 0, 3
SLOT = key_slot(shard_tag(SHARD, SHARDS))
TIMEOUT = 90


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster of this test's own: it kills or reshards nodes."""
    with RedisCluster(tmp_path) as made:
        yield made


@pytest.fixture
def make_broker(io_loop: IOLoop, cluster: RedisCluster) -> Iterator[MakeRedis]:
    made: list[Broker] = []

    async def make(**options: Any) -> RedisBroker:
        options.setdefault("reconnect_backoff", (0.05, 0.2))
        options.setdefault("timeout", 1.0)
        options.setdefault("read_block", 1.0)
        broker = RedisBroker.for_cluster_shard(cluster.url, SHARD, SHARDS, **options)
        made.append(broker)
        await broker.start()
        assert broker.healthy
        return broker

    yield make

    close_brokers(io_loop, made)


class Publisher:
    """Publishes ``0``, ``1``, ... alternately on channels ``a`` and ``b`` until stopped, through
    outages; keeps the id of every publish Redis acknowledged."""

    def __init__(self, broker: RedisBroker, start: int) -> None:
        self.broker = broker
        self.next = start
        self.acked: dict[str, str] = {}
        self.failed: list[str] = []

    async def publish(self) -> None:
        data = str(self.next)
        self.next += 1
        try:
            self.acked[data] = await self.broker.publish("ab"[int(data) % 2], data)
        except BrokerUnavailableError:
            self.failed.append(data)

    async def run_until(self, done: Callable[[], bool]) -> None:
        deadline = asyncio.get_running_loop().time() + CLUSTER_TIMEOUT
        while not done():
            assert asyncio.get_running_loop().time() < deadline, "the shard did not come back"
            await self.publish()
            if self.failed and self.failed[-1] == str(self.next - 1):
                await asyncio.sleep(0.02)  # pacing while the shard is down, not a wait


def resets(got: Collector) -> list[int]:
    """Indexes of the stream-reset events in *got*."""
    return [n for n, event in enumerate(got.events) if event.event == "stream-reset"]


def stream_ids(node: Any, key: str) -> set[str]:
    entries = node.call("XRANGE", key, "-", "+")
    return {(entry[0].decode() if isinstance(entry[0], bytes) else entry[0]) for entry in entries}


@pytest.mark.parametrize("durable", [False, True], ids=["default", "durable"])
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_failover_to_a_lagging_replica_is_a_stream_reset_never_a_gap(
    make_broker: MakeRedis, cluster: RedisCluster, durable: bool
) -> None:
    publisher_broker = await make_broker(durable=durable)
    reader = await make_broker(durable=durable)
    sub, got = await subscribe(reader, ["a", "b"])
    pub = Publisher(publisher_broker, 0)
    for _ in range(6):
        await pub.publish()
    assert len(pub.acked) == 6
    await wait_until(lambda: len(got.events) == 6)
    primary = cluster.owner(SLOT)
    (replica,) = cluster.replicas_of(primary)
    assert primary.call("WAIT", 1, 5000) == 1  # the replica has the first six

    # The replica misses the next six, which the primary acknowledges and the reader delivers:
    # paused, so that it cannot connect again, and cut off (whatever the primary had sent
    # before would still reach it from the socket buffers).
    cluster.pause(replica)
    try:
        assert primary.call("CLIENT", "KILL", "TYPE", "replica") == 1
        for _ in range(6):
            await pub.publish()
        assert len(pub.acked) == 12
        await wait_until(lambda: len(got.events) == 12)
        cluster.kill_primary(SLOT)
    finally:
        cluster.resume(replica)
    promotion = asyncio.ensure_future(asyncio.to_thread(cluster.wait_promoted, SLOT, primary))
    await pub.run_until(promotion.done)
    assert await promotion is replica
    after = pub.next
    await pub.run_until(lambda: sum(int(data) >= after for data in pub.acked) >= 6)
    await wait_until(
        lambda: {e.data for e in got.events} >= {d for d in pub.acked if int(d) >= after}
    )

    # the loss is real: the promoted replica lacks the six
    tag = f"tornado_sse:{{{shard_tag(SHARD, SHARDS)}}}:"
    kept = stream_ids(replica, f"{tag}s:a") | stream_ids(replica, f"{tag}s:b")
    lost = [pub.acked[str(n)] for n in range(6, 12)]
    assert not kept & set(lost)
    assert {pub.acked[str(n)] for n in range(6)} <= kept

    # live: one stream-reset, past every id delivered before it; nothing twice, in id order
    (at,) = resets(got)
    ids = [event.id for event in got.events]
    keys = [reader.id_key(event_id) for event_id in ids if event_id is not None]
    assert len(keys) == len(ids) and keys == sorted(keys) and len(set(keys)) == len(keys)
    assert [event.data for event in got.events[:at]] == [str(n) for n in range(12)]
    reset_id = json.loads(got.events[at].data or "")["id"]
    later = [event.data for event in got.events[at + 1 :]]
    assert all(d is not None and int(d) >= 12 for d in later)
    acked_later = [d for d in pub.acked if int(d) >= after]
    assert [d for d in later if d in acked_later] == acked_later
    sub.close()

    # from the reset: exactly what was published after it
    fresh = await make_broker(durable=durable)
    resumed, replay = await subscribe(fresh, ["a", "b"], reset_id)
    assert not resumed.reset
    assert [e.data for e in replay.events if e.data in acked_later] == acked_later
    assert all(int(e.data or "") >= 12 for e in replay.events)
    resumed.close()
    since_reset = [e.id for e in replay.events]
    # a resume from an id the replica never got, or one it has: stream-reset, never a gap,
    # then what the promoted replica's new incarnation holds (what a resume from the reset gets)
    for last_event_id in (lost[0], lost[-1], pub.acked["3"]):
        resumed, replay = await subscribe(fresh, ["a", "b"], last_event_id)
        assert resumed.reset and resumed.position == reset_id, last_event_id
        assert [e.id for e in replay.events] == since_reset, last_event_id
        resumed.close()


@pytest.mark.parametrize("durable", [False, True], ids=["default", "durable"])
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_resharding_moves_the_shard_while_events_flow(
    make_broker: MakeRedis, cluster: RedisCluster, durable: bool
) -> None:
    publisher_broker = await make_broker(durable=durable)
    reader = await make_broker(durable=durable)
    sub, got = await subscribe(reader, ["a", "b"])
    pub = Publisher(publisher_broker, 0)
    for _ in range(6):
        await pub.publish()
    await wait_until(lambda: len(got.events) == 6)
    source = cluster.owner(SLOT)
    target = next(
        node
        for node in cluster.live
        if node is not source and node.info("replication")["role"] == "master"
    )
    # a few keys at a time, as redis-cli does, while publishes go on: they meet ASK and
    # TRYAGAIN, then MOVED
    moving = asyncio.ensure_future(asyncio.to_thread(cluster.move_slot, SLOT, target, 2))
    await pub.run_until(moving.done)
    await moving
    for _ in range(6):
        await pub.publish()
    assert pub.failed == []  # every publish went through, on one node or the other
    await wait_until(lambda: got.events and got.events[-1].data == str(pub.next - 1))
    assert publisher_broker.address == reader.address == f"redis://127.0.0.1:{target.port}/0"

    ids = [event.id for event in got.events]
    keys = [reader.id_key(event_id) for event_id in ids if event_id is not None]
    assert len(keys) == len(ids) and keys == sorted(keys) and len(set(keys)) == len(keys)
    data = [event.data for event in got.events if event.event is None]
    if durable:
        # the keys moved whole: nothing lost, so nothing to reset
        assert resets(got) == []
        assert data == list(pub.acked)
    else:
        # another Redis process now holds the shard: it may lack writes, so a new incarnation
        (at,) = resets(got)
        reset_key = reader.id_key(json.loads(got.events[at].data or "")["id"])
        assert reset_key is not None
        after = [d for d, i in pub.acked.items() if (reader.id_key(i) or (0, 0)) > reset_key]
        assert [e.data for e in got.events[at + 1 :]] == after
        assert data == [d for d in pub.acked if d in data]
    sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_failover_resets_only_the_failed_shard_of_a_stream_over_three(
    io_loop: IOLoop, cluster: RedisCluster
) -> None:
    """`cluster_broker` over three shards, one per primary: ``kill -9`` of one primary costs a
    stream over all three one stream-reset naming that shard's channel; the other shards go on
    exactly, live and on resume."""
    options: dict[str, Any] = {"timeout": 1.0, "read_block": 1.0}
    options["reconnect_backoff"] = (0.05, 0.2)
    made = [cluster_broker(cluster.url, 3, **options) for _ in range(3)]
    try:
        publisher, reader, fresh = made
        for broker in made:
            await broker.start()
        channels = [sharded_tests.on_shard(n, "room")[0] for n in range(3)]
        sub, got = await subscribe(reader, channels)
        acked: dict[str, str] = {}  # data -> the shard's id
        counter = iter(range(10_000))

        async def publish(shard: int) -> None:
            data = f"{shard}:{next(counter)}"
            try:
                acked[data] = await publisher.publish(channels[shard], data)
            except BrokerUnavailableError:
                await asyncio.sleep(0.02)  # pacing while the cluster is down, not a wait

        for n in range(6):
            await publish(n % 3)
        await wait_until(lambda: len(got.events) == 6)
        before = got.events[-1].id
        assert before is not None

        slot = key_slot(shard_tag(1, 3))
        old = cluster.kill_primary(slot)
        promotion = asyncio.ensure_future(asyncio.to_thread(cluster.wait_promoted, slot, old))
        deadline = asyncio.get_running_loop().time() + CLUSTER_TIMEOUT
        while not promotion.done():
            assert asyncio.get_running_loop().time() < deadline
            await publish(next(counter) % 3)
        await promotion
        later = [f"{shard}:x{n}" for n in range(3) for shard in range(3)]
        for data in later:
            shard = int(data[0])
            while data not in acked:
                assert asyncio.get_running_loop().time() < deadline
                try:
                    acked[data] = await publisher.publish(channels[shard], data)
                except BrokerUnavailableError:
                    await asyncio.sleep(0.02)  # the shard's publisher finding the new primary
        await wait_until(lambda: {e.data for e in got.events} >= set(later))
        sub.close()

        live = got.events
        (at,) = [n for n, e in enumerate(live) if e.event == "stream-reset"]
        assert json.loads(live[at].data or "")["channels"] == [channels[1]]
        data = [e.data for e in live if e.event is None]
        assert len(data) == len(set(data)), "nothing twice"
        for shard in (0, 2):  # the others: every acknowledged event, in order
            mine = [d for d in acked if d.startswith(f"{shard}:")]
            assert [d for d in data if d and d.startswith(f"{shard}:")] == mine
        assert [d for d in data if d and d.startswith("1:x")] == [f"1:x{n}" for n in range(3)]

        # a resume from before the failover: exact on shards 0 and 2, a reset for shard 1's
        # (once this broker's readers are back: before, a subscribe is told to retry later)
        await wait_until(lambda: fresh.healthy, CLUSTER_TIMEOUT)
        resumed, replay = await subscribe(fresh, channels, before)
        resets_ = [e for e in replay.events if e.event == "stream-reset"]
        assert [json.loads(e.data or "")["channels"] for e in resets_] == [[channels[1]]]
        replayed = [e.data for e in replay.events if e.event is None]
        for shard in (0, 2):
            mine = [d for d in acked if d.startswith(f"{shard}:")]
            assert [d for d in replayed if d and d.startswith(f"{shard}:")] == mine[2:]
        resumed.close()
    finally:
        for broker in made:
            await broker.close()
