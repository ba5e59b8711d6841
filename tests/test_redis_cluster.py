"""RedisBroker on a real local Redis Cluster (issue 17): the harness, one broker as one shard."""

# ruff: noqa: F401, F811  (fixtures imported from tests.redis_cluster, used as parameters)

from __future__ import annotations

import redis

from tests.redis_cluster import RedisCluster, redis_cluster


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
