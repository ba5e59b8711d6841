"""RedisBroker on a real local Redis Cluster (issue 17): the harness, one broker as one shard."""

# ruff: noqa: F401, F811  (fixtures imported from tests.redis_server, used as parameters)

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from tornado.ioloop import IOLoop

import tests.test_sharded as sharded_tests
from tests.broker_contract import TIMEOUT, BrokerContract, close_brokers, subscribe
from tests.helpers import free_port, wait_until
from tests.redis_cluster import RedisCluster
from tests.redis_server import redis_prefix
from tornado_sse.broker.base import Broker
from tornado_sse.broker.cluster import SLOTS, cluster_broker, key_slot, shard_tag
from tornado_sse.broker.redis import RedisBroker
from tornado_sse.broker.sharded import ShardedBroker

MakeRedis = Callable[..., Awaitable[RedisBroker]]


def test_the_cluster_has_three_primaries_each_with_a_replica(redis_cluster: RedisCluster) -> None:
    roles = [node.info("replication")["role"] for node in redis_cluster.live]
    assert sorted(roles) == ["master"] * 3 + ["slave"] * 3
    client = redis.RedisCluster.from_url(redis_cluster.url)
    try:
        for n in range(30):  # keys on every primary
            client.set(f"harness:{n}", n)
            assert client.get(f"harness:{n}") == str(n).encode()
    finally:
        client.close()
    owners = {redis_cluster.owner(slot).port for slot in (0, 8000, 16383)}
    assert len(owners) == 3


def test_slots_and_tags_agree_with_the_cluster(redis_cluster: RedisCluster) -> None:
    for key in ("", "a", "tornado_sse:last", "x{ts3}:last", "{}x", "a{}{b}", "{b}{c}", "é"):
        assert key_slot(key) == redis_cluster.keyslot(key), key
    for shards in (1, 2, 3, 6, 7):
        tags = [shard_tag(n, shards) for n in range(shards)]
        assert len(set(tags)) == shards
        for n, tag in enumerate(tags):
            assert n * SLOTS // shards <= redis_cluster.keyslot(tag) < (n + 1) * SLOTS // shards
    # three shards on the usual three primaries: one each
    assert len({redis_cluster.owner(key_slot(shard_tag(n, 3))).port for n in range(3)}) == 3
    with pytest.raises(ValueError, match="shards"):
        shard_tag(0, 0)
    with pytest.raises(ValueError, match="index"):
        shard_tag(3, 3)


def test_a_cluster_shard_refuses_what_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisBroker("redis://127.0.0.1:1", key_prefix="{app}:", cluster_tag="ts0")
    with pytest.raises(ValueError, match="tag"):
        RedisBroker("redis://127.0.0.1:1", cluster_tag="a}b")
    with pytest.raises(ValueError, match="URL"):
        RedisBroker("unix:///tmp/redis.sock", cluster_tag="ts0")


@pytest.fixture
def make_broker(
    io_loop: IOLoop, redis_cluster: RedisCluster, redis_prefix: str
) -> Iterator[MakeRedis]:
    """New started brokers on shard 1 of 3 of the shared cluster, given the URL of a node that
    does not own the shard's slot (the first call is told ``MOVED``)."""
    made: list[Broker] = []
    slot = key_slot(shard_tag(1, 3))
    seed = next(node for node in redis_cluster.live if node is not redis_cluster.owner(slot))

    async def make(history_size: int = 1000, **options: Any) -> RedisBroker:
        options.pop("max_channels", None)
        options.setdefault("key_prefix", redis_prefix)
        options.setdefault("reconnect_backoff", (0.05, 0.2))
        broker = RedisBroker.for_cluster_shard(seed.url, 1, 3, history_size=history_size, **options)
        made.append(broker)
        await broker.start()
        assert broker.healthy
        return broker

    yield make

    close_brokers(io_loop, made)


class TestRedisClusterShard(BrokerContract):
    """The whole broker contract on one shard of a real Redis Cluster."""


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_every_key_of_a_shard_is_in_its_slot(
    make_broker: MakeRedis, redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    broker = await make_broker()
    sub, got = await subscribe(broker, ["news", "user/ada"])
    await broker.publish("news", "one")
    await broker.publish("user/ada", "two")
    await wait_until(lambda: got.data == ["one", "two"])
    sub.close()
    owner = redis_cluster.owner(key_slot(shard_tag(1, 3)))
    assert broker.address == f"redis://127.0.0.1:{owner.port}/0"
    keys = owner.call("KEYS", f"{redis_prefix}*")
    assert isinstance(keys, list) and len(keys) >= 6
    assert {key_slot(key) for key in keys} == {broker.slot}
    for node in redis_cluster.live:  # the other primaries have none (replicas have copies)
        if node is not owner and node.info("replication")["role"] == "master":
            assert node.call("KEYS", f"{redis_prefix}*") == []


class TestShardedCluster(sharded_tests.TestShardedBroker):
    """The whole broker contract on `cluster_broker`: three shards of the cluster (one per
    primary), given the URL of any node."""

    @pytest.fixture
    def make_broker(
        self, io_loop: IOLoop, redis_cluster: RedisCluster, redis_prefix: str
    ) -> Iterator[Callable[..., Awaitable[Broker]]]:
        made: list[Broker] = []

        async def make(history_size: int = 1000, **options: Any) -> Broker:
            options.pop("max_channels", None)
            options.setdefault("key_prefix", redis_prefix)
            options.setdefault("reconnect_backoff", (0.05, 0.2))
            broker = cluster_broker(
                redis_cluster.url, sharded_tests.SHARDS, history_size=history_size, **options
            )
            made.append(broker)
            await broker.start()
            assert broker.healthy
            return broker

        yield make

        close_brokers(io_loop, made)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_cluster_shards_sit_one_per_primary_and_a_stream_over_all_resumes(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    broker = cluster_broker(redis_cluster.url, 3, key_prefix=redis_prefix)
    assert isinstance(broker, ShardedBroker)
    await broker.start()
    try:
        addresses = {shard.address for shard in broker.shards}  # type: ignore[attr-defined]
        assert len(addresses) == 3
        channels = [sharded_tests.on_shard(n, "room")[0] for n in range(3)]
        sub, got = await subscribe(broker, channels)
        for n in range(9):
            await broker.publish(channels[n % 3], str(n))
        await wait_until(lambda: len(got.events) == 9)
        sub.close()
        middle = got.events[4].id
        resumed, replay = await subscribe(broker, channels, middle)
        assert not resumed.reset
        assert [e.data for e in got.events] == [str(n) for n in range(9)]
        # each shard's events in its order; across shards, the replay gives them in turn
        assert sorted(replay.data, key=lambda d: int(d or -1)) == [str(n) for n in range(5, 9)]
        resumed.close()
    finally:
        await broker.close()
    one = cluster_broker(redis_cluster.url, 1, key_prefix=redis_prefix)
    assert isinstance(one, RedisBroker)
    with pytest.raises(ValueError, match="shards"):
        cluster_broker(redis_cluster.url, 0)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_node_that_does_not_answer_is_passed_over_for_the_next(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    broker = RedisBroker.for_cluster_shard(
        [dead, redis_cluster.url], 2, 3, key_prefix=redis_prefix, reconnect_backoff=(0.05, 0.2)
    )
    await broker.start()
    try:
        assert broker.healthy
        sub, got = await subscribe(broker, ["news"])
        await broker.publish("news", "found")
        await wait_until(lambda: got.data == ["found"])
        sub.close()
        owner = redis_cluster.owner(key_slot(shard_tag(2, 3)))
        assert broker.address == f"redis://127.0.0.1:{owner.port}/0"
    finally:
        await broker.close()
    with pytest.raises(ValueError, match="cluster_tag"):
        RedisBroker(redis_cluster.url, cluster_nodes=[dead])
    with pytest.raises(ValueError, match="at least one"):
        RedisBroker.for_cluster_shard([], 0, 3)
