"""Redis Cluster plumbing for `.RedisBroker`: hash slots, shard tags, finding a slot's primary.

A `.RedisBroker` made with ``cluster_tag`` (or `.RedisBroker.for_cluster_shard`) is one shard of
a Redis Cluster: every key it uses carries the hash tag ``{<tag>}``, so all of them live in one
hash slot on one primary and its scripts stay atomic. This module holds what that needs and
imports nothing but the standard library:

* `key_slot`: the slot Redis Cluster gives a key (CRC16/XMODEM of its hash tag, modulo 16384).
* `shard_tag`: the tag of shard *i* of *k*, chosen once and for all, independent of any cluster's
  topology: the first ``tsN`` whose slot falls in the middle half of the *i*-th of *k* equal
  slot ranges. With the usual layout (``redis-cli --cluster create`` splits the slots in equal
  ranges over the primaries), *k* a multiple of the number of primaries spreads the shards
  evenly; a slot boundary a few slots off does not move a shard to another primary.
* `slot_owner`: the primary of a slot in a ``CLUSTER SLOTS`` reply, and every node it names.
* `node_url`: the URL of a node, made from the URL the application gave (its scheme, user,
  password and options) with the node's host and port.
* `cluster_broker`: the whole thing, a `.ShardedBroker` over *k* cluster shards (``tornado-sse
  serve --redis-cluster URL --redis-cluster-shards K``).

Choosing *k*: every process that publishes or follows channels must use the same *k* (it
places the channels). Each shard is one slot, so one primary carries a shard whole: *k* is the
most primaries the channels can ever spread over without changing *k* (which moves channels,
see `tornado_sse.broker.sharded`). A multiple of the number of primaries keeps them even. A
process opens a reader connection per shard whose channels it follows, never for the others.

How the broker uses them is in the module docstring of `tornado_sse.broker.redis` ("Redis
Cluster").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from .base import Broker

__all__ = [
    "DEFAULT_SHARDS",
    "SLOTS",
    "cluster_broker",
    "key_slot",
    "node_url",
    "shard_tag",
    "slot_owner",
    "validate_tag",
]

#: hash slots of a Redis Cluster
SLOTS = 16384
#: shards of `cluster_broker` (and ``--redis-cluster-shards``) unless told: a multiple of 1, 2,
#: 3, 4 and 6 primaries
DEFAULT_SHARDS = 12
_TAG = re.compile(r"[A-Za-z0-9._~:-]{1,64}")


def _crc16(data: bytes) -> int:
    """CRC16/XMODEM (polynomial 0x1021, initial value 0), as Redis Cluster hashes keys."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str | bytes) -> int:
    """The hash slot of *key*: of its hash tag (the text between the first ``{`` and the
    first ``}`` after it) if the tag is not empty, else of the whole key."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return _crc16(data) % SLOTS


def validate_tag(tag: str) -> str:
    """*tag* if it can be a hash tag of ours (1 to 64 of ``A-Z a-z 0-9 . _ ~ : -``)."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise ValueError(f"a cluster tag is 1 to 64 of A-Z a-z 0-9 . _ ~ : - (got {tag!r})")
    return tag


def shard_tag(index: int, shards: int) -> str:
    """The hash tag of shard *index* of *shards*: the first ``tsN`` whose slot lies in the
    middle half of the *index*-th of *shards* equal slot ranges (the whole range, when it is
    narrower than four slots)."""
    if not 1 <= shards <= SLOTS:
        raise ValueError(f"shards must be between 1 and {SLOTS} (got {shards})")
    if not 0 <= index < shards:
        raise ValueError(f"shard index must be between 0 and {shards - 1} (got {index})")
    low, high = index * SLOTS // shards, (index + 1) * SLOTS // shards
    if high - low >= 4:
        quarter = (high - low) // 4
        low, high = low + quarter, high - quarter
    n = 0
    while True:
        tag = f"ts{n}"
        if low <= key_slot(tag) < high:
            return tag
        n += 1


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def slot_owner(
    reply: Sequence[Any], slot: int, asked: tuple[str, int]
) -> tuple[tuple[str, int] | None, list[tuple[str, int]]]:
    """From a ``CLUSTER SLOTS`` reply, the ``(host, port)`` of *slot*'s primary (None if no
    range covers it) and every node the reply names. A node listed without a host (``""`` or
    ``"?"``: it does not know how it is reached) is taken to be on the host of the node
    *asked*."""
    owner: tuple[str, int] | None = None
    nodes: list[tuple[str, int]] = []
    for entry in reply:
        start, end, *members = entry
        for n, member in enumerate(members):
            host = _text(member[0])
            address = (host if host not in ("", "?") else asked[0], int(member[1]))
            if address not in nodes:
                nodes.append(address)
            if n == 0 and int(start) <= slot <= int(end):
                owner = address
    return owner, nodes


def node_url(url: str, host: str, port: int) -> str:
    """*url* (``redis://`` or ``rediss://``) pointing at *host*:*port* instead: user, password,
    path and query kept."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    where = f"[{host}]" if ":" in host else host
    netloc = f"{credentials}@{where}:{port}" if credentials else f"{where}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def cluster_broker(
    url: str | Sequence[str], shards: int = DEFAULT_SHARDS, **options: Any
) -> Broker:
    """The channels spread over *shards* shards of the Redis Cluster *url* (any of its nodes,
    or a list of several, asked in turn) is part of: a `.ShardedBroker` over
    `.RedisBroker.for_cluster_shard` ``(url, i, shards)`` for each *i* (one shard: that
    `.RedisBroker` alone, its ids unchanged). *options* go to every `.RedisBroker`
    (``history_size``, ``key_prefix``, ``durable`` ...). Needs redis-py
    (``pip install 'tornado-sse[redis]'``)."""
    if not isinstance(shards, int) or not 1 <= shards <= SLOTS:
        raise ValueError(f"shards must be between 1 and {SLOTS} (got {shards!r})")
    from .redis import RedisBroker
    from .sharded import ShardedBroker

    brokers = [RedisBroker.for_cluster_shard(url, n, shards, **options) for n in range(shards)]
    if shards == 1:
        return brokers[0]
    return ShardedBroker(brokers)
