"""`RedisBroker`: several processes on several hosts share channels through Redis Streams.

Install with ``pip install 'tornado-sse[redis]'``; nothing else in tornado_sse imports this
module, so ``import tornado_sse`` never needs redis-py.

Layout in Redis (every key under ``key_prefix``, default ``tornado_sse:``):

``<prefix>s:<channel>``
    A stream per channel. Each entry holds the encoded event without its ``id`` line (``b``),
    the publish time (``t``) and the id of the entry before it in the same stream (``p``). Trimmed
    with ``XADD MAXLEN ~`` to at least ``max(history_size, min_stream_length)`` entries.
``<prefix>last``
    The id of the last event published on any channel.
``<prefix>floor``
    The first id of this incarnation of the data: written when ``last`` is found missing (a new
    Redis, or one that restarted without its data). An id below it is from lost history.
``<prefix>tops``
    A hash: for each channel, the id of the newest entry its stream has had (and, under the
    empty field, the floor of the incarnation that made the hash). Written with every event.
``<prefix>index``
    One small entry per event, whatever its channel, with the event's id: the channel (``c``)
    and the id of the event before it (``p``). Trimmed with ``XADD MAXLEN ~`` to about
    ``index_length`` entries. Readers that follow many channels read this first.
``<prefix>wake:<token>``
    A short stream per broker object, used to interrupt its own blocked reader.
``<prefix>presence``
    Presence leases (issue 14): a sorted set of broker tokens, each scored with the time (Redis's
    clock, ms) its lease ends. A broker renews its lease every third of ``presence_lease``.
``<prefix>announced:<channel>``
    The identities announced present on a channel with join/leave events: a hash of identity ->
    the grace period of the stream that announced it (seconds), which the sweep for the users
    of vanished hosts waits for. Read with the counts (`.Broker.presence`'s ``announced``).
    When Redis lost it, each host's users are announced again once its renewal finds its
    presence hash gone.
``<prefix>presence:<token>``
    A broker's presence: a hash of channel -> JSON ``[streams, {identity: streams}]``, the
    absolute counts of its subscriptions, rewritten per changed channel (changes coalesced) and
    whole when Redis lost it. Read only while the token's lease is live, so the streams of a
    host that vanished stop counting within the lease; the hash expires two leases later.

Deliberate choices, and why:

* **Ids are assigned by a Lua script, not by ``XADD *``.** Each stream's automatic ids only grow
  within that stream; two streams can be given ids out of publish order in the same millisecond,
  and a subscriber of both channels must see them in one order it can resume from. The script
  takes ``max(now-0, last + 1, stream top + 1)`` (the top per ``tops``, if later), adds the
  entry with that explicit id and moves ``last``, atomically. Ids keep Redis's ``<ms>-<seq>``
  form: digits and ``-`` only, safe in a ``Last-Event-ID`` header, ordered as the tuple
  ``(ms, seq)``.
* **One reader per process.** A task on a dedicated connection runs ``XREAD BLOCK`` over every
  followed stream from its own position, merges what comes back into id order and hands each
  event once to `Broker._deliver`, which fans it out locally. Following a channel never waits
  for the reader: `_follow` reads ``last``, sets the new stream's position to it (or to the
  reader's horizon, if that is later) and wakes the reader with an ``XADD`` to its wake stream
  so the next ``XREAD`` includes the new stream. A round already in flight when a channel joins
  delivers only up to the join position, so events still come out in id order.
* **Many channels: read the index, then only the streams it names.** An ``XREAD`` costs Redis
  in proportion to the streams it names (about 0.5 us each), so a reader naming thousands of
  followed channels every round (per-user channels, say) would make Redis the bottleneck.
  Above ``index_threshold`` followed channels, the reader blocks on the index stream instead,
  and then reads only the followed streams that the new index entries name, up to the last
  entry it read. Its cost grows with the events published, not the channels followed. The
  publish script writes the index entry atomically with the event. Before it trusts the index,
  the reader catches up directly: it reads ``last``, then reads every followed stream up to it
  without blocking. It does the same again when it finds index entries it had not read trimmed
  (the ``p`` of the first new entry is past its index position).
* **History is the last** ``history_size`` **entries of each stream**, even though a stream may
  physically keep more (``min_stream_length``, so that a reader that falls briefly behind a burst
  still gets every live event). A Last-Event-ID is a gap (`.HistoryGapError`, the client gets
  ``stream-reset``) when it does not parse, is later than ``last`` (from the future, or from
  data Redis lost), is below ``floor``, or when an entry after it has left the window; the
  ``p`` field of the oldest entry read says whether one was trimmed.
* **A channel's stream that loses entries says so** (issue 12 follow-up). One stream can go
  while the rest stays: ``DEL``, eviction under an ``allkeys-*`` ``maxmemory-policy``, a
  ``RESTORE`` of an older copy. Its next entry would start a new chain of ``p`` and hide the
  loss, so ``p`` is the newer of the stream's top and what ``tops`` says the stream had, and
  every entry read (by a resume or the reader), not only the first, must name the one read
  before it. A resume that reads a stream to its end checks that it reaches the stream's
  ``tops`` id, so a loss is a gap even before anything is published again. ``tops`` itself
  gone is a loss of everything (a new incarnation, below). Every broker warns once when Redis's
  ``maxmemory-policy`` may evict our keys.
* **History is read in pages** (issue 12): one transaction per page, ``XRANGE ... COUNT n`` per
  stream (n about the page size divided among the channels), never the whole history in one
  ``EXEC``. Every page checks ``last``, ``floor`` and the ``p`` of each stream's first entry
  again, so history lost or trimmed while a long replay goes on is a gap, never a silent one.
  The window of ``history_size`` entries is checked on the first page when it can read that
  far; past it, a resume is served as long as Redis still holds every entry after it (at most
  the ``MAXLEN ~`` slack more than the window).
* **Never a silent gap on the live path.** If the reader finds that entries it had not read yet
  were trimmed (``p`` of the first new entry is past its position), or cannot prove that Redis
  still holds everything after its horizon (``floor`` moved past it: a new incarnation), it
  delivers a ``stream-reset`` event to the local subscriptions of the channels concerned (one
  per subscription, however many of its channels are concerned), with the id they can resume
  from, and carries on from there. When Redis keeps its data, the reader simply continues from
  its positions and subscribers miss nothing.
* **A loss of Redis data starts a new incarnation before anything can hide it** (issue 12).
  Redis can lose writes it acknowledged: a restart without persistence or from an older
  snapshot, ``FLUSHALL``, a failover to a replica that lagged. Ids issued afterwards sort above
  the lost ones, so a client resuming from a lost id would get the new events and never hear of
  the lost ones: the first publish after the loss, by any process, would hide it. So whoever
  notices a possible loss first moves ``floor`` (and ``last``) above every id it knows,
  atomically in a script. Every id below the new floor is then a gap: resuming from it gets
  ``stream-reset``, and each reader, whose horizon is below the floor, resets its live
  subscriptions. The scripts look for three signs:

  - *Another Redis process* (a restart, a failover): the check script compares ``INFO
    server``'s ``run_id`` with ``run``. It runs on every new connection before any command of
    ours (redis-py's connect callback), and by the reader on (re)connect. Another process
    means new connections, so every publish, follow and history read comes after a check in
    the process it talks to. Not per publish: ``INFO`` in a script costs Redis about 7 us,
    against about 40 us for the whole publish script. A proxy that carries one client
    connection to several Redis servers in turn defeats this check: connect to Redis itself.
  - *No data*: ``last``, ``floor`` or ``tops`` missing (``FLUSHALL``, an empty restart,
    eviction), in any script.
  - *Evidence*: each broker passes its high-water mark (the largest id it published or read as
    ``last``) and the floor it knows. ``last`` below the mark proves a rollback, restart or
    not; a floor it does not know, at or below the mark, means that a new incarnation is
    reissuing ids it saw (the promoted replica's clock was behind), so the script starts
    another above the mark. New ids are ``max(now, last + 1, floor, mark + 1)``. Each history
    page runs this check first, in its transaction, so a rollback in place (``DEBUG RELOAD``,
    ``RESTORE`` of ``last``: no restart, nothing missing) is a gap for a resume on any broker
    that saw a later id, as long as no broker unaware of it has published past that id first.

  The reader reads ``last`` and ``floor`` in the same round trip as each blocking ``XREAD``
  (Redis runs that read after the ``XREAD`` returns): an entry of a new incarnation comes with
  its floor, so after a ``FLUSHALL`` the reader resets instead of delivering across the loss,
  within ``read_block`` even if nothing is published.

  The default is conservative: a Redis process that restarted may have lost the last writes,
  and nothing tells it from one that kept them all, so every client gets one ``stream-reset``.
  ``durable=True`` declares that Redis never loses an acknowledged write (``appendfsync
  always``, no failover): a restart alone is then not a loss, only missing data or evidence is.
  Evidence needs a broker that saw the lost ids; if one that did not publishes first, the loss
  is hidden. That is the price of ``durable=True`` on a Redis that is not durable.
* **Faults are reported, not raised into the application.** The reader reconnects with
  exponential backoff and jitter, logs each outage once (never the URL: it may hold a
  password), and `healthy` is false meanwhile (the hub's ``/healthz`` answers 503). Publishing
  and subscribing fail fast with `.BrokerUnavailableError` (the handler tells new streams to
  retry later), each Redis call bounded by ``timeout``; open streams stay open.
* **One hash slot.** The script and the reader's ``XREAD`` use several keys together, so every
  key of a broker lives in one hash slot. On a Redis Cluster, a broker is one shard
  (``cluster_tag``, or `RedisBroker.for_cluster_shard`): see "Redis Cluster" below.

Redis Cluster (issue 17)
------------------------

A broker made with ``cluster_tag="ts4"`` puts ``{ts4}`` into every key (``tornado_sse:{ts4}:last``
...), so all its keys share one slot and its scripts stay atomic; the URL may name any node.
Several such brokers, one per tag, are the shards of a ``ShardedBroker``. `.cluster` picks the
tags (`.cluster.shard_tag`: shard *i* of *k* in the *i*-th of *k* equal slot ranges).

* **Plain connections to the slot's primary, not redis-py's** ``RedisCluster`` **client.** The
  broker asks any node for ``CLUSTER SLOTS`` and then talks only to the primary of its slot,
  through an ordinary client whose every new connection runs the check script first, as on a
  single Redis. ``RedisCluster`` keeps connections to every node and sends each command where
  its keys are: the check script (keys in our slot) run on connect to another node would be
  refused, a connection to the new primary after a failover would carry commands before any
  check, its pipelines cannot be ``MULTI``/``EXEC`` transactions (the history pages are), and
  the reader's blocking ``XREAD`` needs one dedicated connection to one node anyway.
* **Following the slot.** A call refused with ``MOVED`` (the slot went to another node: a
  resharding, or a failover seen from the old node) re-binds the broker to the node named and
  runs again; ``ASK`` and ``TRYAGAIN`` (the slot is migrating: some keys on each side) and
  ``CLUSTERDOWN`` are retried with backoff. All of these stay within ``timeout``, and are safe
  to retry: Redis refused the call before running it. A lost connection is not retried (the
  script may have run): the call fails with `.BrokerUnavailableError` and the broker asks the
  cluster where its slot is now, so the next call goes there. The reader asks before every
  (re)connection.
* **A new primary is a new incarnation.** The connection to another node runs the check
  script, which finds another ``run_id`` (the ``run`` key came along by replication or by
  migration): unless ``durable=True``, the data may lack writes the old primary acknowledged
  (a replica lags; a ``kill -9`` does not wait for it), so a new incarnation starts and the
  shard's subscribers get one ``stream-reset``; a resume from before it is a gap. With
  ``durable=True``, only evidence counts: a broker that saw ids the promoted replica never
  got starts a new incarnation above them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, ClusterDownError, MovedError, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from ..errors import BrokerError, BrokerUnavailableError, HistoryGapError
from ..protocol import Event, encode_event
from .base import Broker, Frame, Subscription
from .cluster import key_slot, node_url, shard_tag, slot_owner, validate_tag
from .presence import Presence, companion, merge_presence, presence_event_data

__all__ = ["RedisBroker"]

log = logging.getLogger("tornado_sse.redis")

T = TypeVar("T")
Key = tuple[int, int]
# The types-redis stubs (written for redis-py 4) shadow redis-py's own annotations and lack
# parts of its asyncio API (``aclose``); clients are typed loosely rather than against them.
Client = Any

_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
#: entries a history page reads when the caller gives no size (`RedisBroker._history`)
HISTORY_PAGE = 1000
#: entries a history page reads per stream at least, however many channels it names
MIN_PAGE_PER_STREAM = 1
_MAX_PART = (1 << 64) - 1
_ZERO: Key = (0, 0)

# The part of every script that finds a loss of Redis data and starts a new incarnation: KEYS
# last, floor, tops; ARGV[1] the caller's high-water mark, ARGV[2] the floor it knows ('' for
# none).
# Leaves `lost`, `last` and `floor`, the time (`ms`) and the helpers for the rest. Ids are
# compared as (ms, seq) pairs of numbers; no tables, no closures made per call on the publish
# path (they cost Redis several microseconds per publish).
_INCARNATION = """
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function later(a1, a2, b1, b2)
  return a1 > b1 or (a1 == b1 and a2 > b2)
end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = redis.call('GET', KEYS[1])
local floor = redis.call('GET', KEYS[2])
-- `tops` is written with every event: gone (evicted, deleted), it cannot say which streams lost
-- entries, so everything before now is taken as lost
local lost = not last or not floor or redis.call('EXISTS', KEYS[3]) == 0
if not lost and ARGV[1] ~= '' and ARGV[1] ~= last then
  -- `last` below an id the caller saw issued: Redis went back in time. A floor the caller does
  -- not know, at or below such an id: a new incarnation reissues ids the caller saw.
  local h1, h2 = parse(ARGV[1])
  local l1, l2 = parse(last)
  lost = later(h1, h2, l1, l2)
  if not lost and ARGV[2] ~= '' and floor ~= ARGV[2] then
    local f1, f2 = parse(floor)
    lost = not later(f1, f2, h1, h2)
  end
end
"""

# Then, if `lost`: a new incarnation, whose floor (and `last`) sorts above every id known.
_INCARNATE = """
if lost then
  local i1, i2 = ms, 0
  for _, id in ipairs({last or '0-0', floor or '0-0', ARGV[1] ~= '' and ARGV[1] or '0-0'}) do
    local k1, k2 = parse(id)
    if not later(i1, i2, k1, k2) then i1, i2 = k1, k2 + 1 end
  end
  last = string.format('%.0f-%.0f', i1, i2)
  floor = last
  redis.call('SET', KEYS[1], last)
  redis.call('SET', KEYS[2], floor)
  redis.call('HSET', KEYS[3], '', floor)
end
"""

# KEYS: last, floor, tops, stream, index. ARGV: high-water mark, known floor, maxlen, body,
# published_at, index maxlen, channel. Returns {the new id, floor}. The entry's `p` is the newest
# id the stream has had, per `tops` if the stream no longer has it (deleted, evicted, restored
# from an older copy): a resume from before it is then a gap, never a silent one.
_PUBLISH = (
    _INCARNATION
    + _INCARNATE
    + """
local seq = 0
local l1, l2 = parse(last)
if not later(ms, seq, l1, l2) then ms, seq = l1, l2 + 1 end
local top = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local prev = top[1] and top[1][1] or ''
local known = redis.call('HGET', KEYS[3], ARGV[7])
if known then
  if prev == '' then
    prev = known
  else
    local p1, p2 = parse(prev)
    local k1, k2 = parse(known)
    if later(k1, k2, p1, p2) then prev = known end
  end
end
if prev ~= '' then
  local p1, p2 = parse(prev)
  if not later(ms, seq, p1, p2) then ms, seq = p1, p2 + 1 end
end
local id = string.format('%.0f-%.0f', ms, seq)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], id, 'b', ARGV[4], 't', ARGV[5], 'p', prev)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], id, 'c', ARGV[7], 'p', last)
redis.call('HSET', KEYS[3], ARGV[7], id)
redis.call('SET', KEYS[1], id)
return {id, floor}
"""
)

# KEYS: last, floor, tops, run. ARGV: high-water mark, known floor, '1' if Redis is durable.
# Run on every new connection and by the reader on (re)connect: a Redis process other than the
# one that last wrote `run` (a restart, a failover) may have lost data. Returns {last, floor,
# '1' if the process could be told ('0': INFO has no run_id)}.
_CHECK = (
    _INCARNATION
    + """
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if run and redis.call('GET', KEYS[4]) ~= run then
  if ARGV[3] ~= '1' then lost = true end
  redis.call('SET', KEYS[4], run)
end
"""
    + _INCARNATE
    + """
return {last, floor, run and '1' or '0'}
"""
)

# KEYS: last, floor, tops. ARGV: high-water mark, known floor. The evidence check alone, first in
# each history page's transaction: a rollback in place (no restart, no missing key) is a gap for
# a resume on any broker that saw a later id. Returns {last, floor}.
_EVIDENCE = (
    _INCARNATION
    + _INCARNATE
    + """
return {last, floor}
"""
)


# KEYS: the lease set, this broker's presence hash. ARGV: lease ms, token, then channel, value
# pairs (value '' forgets the channel). Writes the values, renews the lease; returns whether the
# hash existed before (if not, and the caller has more than it wrote, it writes everything).
_SHARE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local existed = redis.call('EXISTS', KEYS[2])
for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[2], ARGV[i])
  else
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - lease)
redis.call('PEXPIRE', KEYS[2], 2 * lease)
return existed
"""

# KEYS: the lease set, the channel's announced hash. ARGV: the prefix of presence hashes, the
# channel. Returns the values of the channel in the hashes of every live lease, and the
# identities announced on it (one round trip, one moment: what join/leave said and who is here).
_ASK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local found = {}
for _, token in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local value = redis.call('HGET', ARGV[1] .. token, ARGV[2])
  if value then found[#found + 1] = value end
end
return {found, redis.call('HKEYS', KEYS[2])}
"""


# KEYS: the lease set, the channel's announced set. ARGV: the prefix of presence hashes, the
# channel, the identity, its grace period (kept with the mark, for the sweep). Decides,
# atomically for every host, whether the identity's join (it has a stream under a live lease,
# and was not announced) or leave (the reverse) is to be published, and marks it announced (or
# not). Returns 'join', 'leave' or ''.
_ANNOUNCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local present = false
for _, token in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local value = redis.call('HGET', ARGV[1] .. token, ARGV[2])
  if value then
    local ok, decoded = pcall(cjson.decode, value)
    if ok and type(decoded) == 'table' and type(decoded[2]) == 'table' and decoded[2][ARGV[3]] then
      present = true
      break
    end
  end
end
local announced = redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1
if present == announced then return '' end
if present then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  return 'join'
end
redis.call('HDEL', KEYS[2], ARGV[3])
return 'leave'
"""


def _grace_of(mark: object, default: float) -> float:
    """The grace period kept with an ``announced`` mark (*default* for a mark without one)."""
    try:
        grace = float(mark.decode() if isinstance(mark, bytes) else str(mark))
    except ValueError:
        return default
    return grace if 0 <= grace <= 3600 else default


def _parse(event_id: str | bytes) -> Key | None:
    text = event_id.decode("ascii", "replace") if isinstance(event_id, bytes) else event_id
    match = _ID.fullmatch(text)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    if ms > _MAX_PART or seq > _MAX_PART:
        return None
    return (ms, seq)


def _format(key: Key) -> str:
    return f"{key[0]}-{key[1]}"


def _by_stream(response: Any) -> list[tuple[bytes, list[Any]]]:
    """An ``XREAD`` reply as ``[(stream, entries)]``, whether it came as RESP2 or as RESP3
    (``?protocol=3`` in the URL: ``{stream: [entries]}``)."""
    if isinstance(response, dict):
        return [(stream, value[0] if value else []) for stream, value in response.items()]
    return list(response)


def _redacted(url: str) -> str:
    """``scheme://host:port/db`` without credentials or query, for logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or parts.path or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "redis"
    path = parts.path if parts.hostname else ""
    return f"{parts.scheme}://{host}{port}{path}"


def _reset_frame(channel: str, key: Key, reason: str) -> Frame:
    event_id = _format(key)
    data = json.dumps({"id": event_id, "reason": reason})
    return Frame.from_event(channel, Event(data=data, event="stream-reset", id=event_id))


#: connections the broker's pool holds at most (a ``max_connections`` in the URL's query or in
#: ``redis_options`` overrides it); commands beyond it wait for a free one, up to ``timeout``
POOL_SIZE = 100


class RedisBroker(Broker):
    """A broker whose ids, history and fan-in live in Redis, for several processes or hosts.

    Every process (a hub, an app server) makes its own ``RedisBroker`` on the same URL and key
    prefix; an event published on any of them reaches the subscribers of all, and a client may
    resume on any of them with an id it got from another::

        broker = RedisBroker("redis://:secret@redis.internal:6379/2", history_size=1000)
        app = tornado.web.Application([(r"/events", EventStreamHandler)], sse_broker=broker)

    :param url: a Redis URL as `redis.asyncio.from_url` reads it: ``redis://``, ``rediss://``
        (TLS; ``ssl_*`` options in the query), ``unix://``, with password, user and database.
    :param history_size: events per channel a client may resume across (default 1000).
    :param key_prefix: prefix of every key this broker uses; brokers that share channels must
        share it (default ``"tornado_sse:"``).
    :param timeout: seconds a Redis call may take before it fails (default 3.0). Publishing while
        Redis is unreachable raises `.BrokerUnavailableError` within about this time.
    :param min_stream_length: entries each stream keeps at least, whatever the history size
        (default 100), so that a reader that falls briefly behind still gets every live event.
    :param read_block: seconds the reader blocks per ``XREAD`` (default 5.0); a silently dead
        connection is noticed within this plus ``timeout``.
    :param read_count: entries per stream per ``XREAD`` (default 1000).
    :param index_threshold: above this many followed channels, the reader reads the index
        stream and then only the streams it names (default 32); at or below it, it names every
        followed stream in one ``XREAD``.
    :param index_length: entries the index stream keeps (default 10,000): how far the readers
        that use it may fall behind before they catch up stream by stream.
    :param reconnect_backoff: ``(first, max)`` seconds between reconnection attempts; the delay
        doubles from *first* up to *max* (default ``(0.1, 5.0)``), with jitter.
    :param durable: declare that Redis never loses a write it acknowledged (``appendonly yes``
        with ``appendfsync always``, and no failover to a replica). Then a Redis restart alone
        is not taken as a loss of data; only evidence of one is (``last`` missing or behind an
        id this broker saw). Default ``False``: a different Redis process behind the URL (a
        restart, a failover) may have lost events, so every client is sent ``stream-reset``.
        Brokers sharing a key prefix should agree on it.
    :param presence_lease: seconds this broker's presence counts without a renewal (default
        15.0; renewed every third of it): the streams of a host that vanished stop counting in
        `presence` within this time.
    :param presence: count subscriptions for `presence` (default ``True``; see `.Broker`).
    :param redis_options: further keyword arguments for `redis.asyncio.from_url` (options in
        the URL's query take precedence over them). The broker's pool is a
        `redis.asyncio.BlockingConnectionPool` of `POOL_SIZE` connections (``max_connections``
        changes it): past it, a command waits up to *timeout* for a connection to be free.
    :param cluster_tag: make this broker one shard of a Redis Cluster whose node *url* names:
        every key carries the hash tag ``{cluster_tag}`` (after *key_prefix*, which must hold no
        braces), so they share one slot, and the broker talks to the primary of that slot now
        ("Redis Cluster" above). Default ``None``: a Redis that is not a cluster.
        `for_cluster_shard` picks the tag of shard *i* of *k*.
    :param cluster_nodes: URLs of more nodes of the cluster, asked where the slot is when the
        node of *url* does not answer (the broker also remembers every node the cluster names).
    """

    def __init__(
        self,
        url: str,
        *,
        history_size: int = 1000,
        key_prefix: str = "tornado_sse:",
        timeout: float = 3.0,
        min_stream_length: int = 100,
        read_block: float = 5.0,
        read_count: int = 1000,
        index_threshold: int = 32,
        index_length: int = 10_000,
        reconnect_backoff: tuple[float, float] = (0.1, 5.0),
        durable: bool = False,
        presence_lease: float = 15.0,
        presence: bool = True,
        redis_options: Mapping[str, Any] | None = None,
        cluster_tag: str | None = None,
        cluster_nodes: Sequence[str] = (),
    ) -> None:
        super().__init__(history_size=history_size, presence=presence)
        #: the hash tag of every key, when this broker is one shard of a Redis Cluster
        self.cluster_tag = None if cluster_tag is None else validate_tag(cluster_tag)
        #: the hash slot of every key (cluster shards only)
        self.slot: int | None = None
        if self.cluster_tag is not None:
            if "{" in key_prefix or "}" in key_prefix:
                raise ValueError(
                    "key_prefix of a cluster shard must not hold braces: the broker adds the "
                    "hash tag {cluster_tag} itself"
                )
            if urlsplit(url).scheme not in ("redis", "rediss"):
                raise ValueError("a cluster shard needs a redis:// or rediss:// URL of any node")
            key_prefix = f"{key_prefix}{{{self.cluster_tag}}}:"
            self.slot = key_slot(self.cluster_tag)
        if timeout <= 0 or read_block <= 0 or presence_lease <= 0:
            raise ValueError("timeout, read_block and presence_lease must be positive")
        if read_count < 1 or min_stream_length < 1 or index_length < 1:
            raise ValueError("read_count, min_stream_length and index_length must be at least 1")
        if index_threshold < 0:
            raise ValueError("index_threshold must not be negative")
        if not 0 < reconnect_backoff[0] <= reconnect_backoff[1]:
            raise ValueError("reconnect_backoff must be (first, max) with 0 < first <= max")
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.read_block = read_block
        self.read_count = read_count
        self.index_threshold = index_threshold
        self.index_length = index_length
        self.reconnect_backoff = reconnect_backoff
        self.durable = durable
        self.presence_lease = presence_lease
        #: entries each stream keeps (``XADD MAXLEN ~``)
        self.stream_length = max(history_size, min_stream_length)
        #: where Redis is, without credentials (for logs and errors)
        self.address = _redacted(url)
        #: times Redis became unreachable for this broker
        self.outages = 0
        #: ``stream-reset`` events sent to live subscriptions because continuity was lost
        self.live_resets = 0

        self._seed = url
        if cluster_nodes and self.cluster_tag is None:
            raise ValueError("cluster_nodes needs cluster_tag")
        for node in cluster_nodes:
            if urlsplit(node).scheme not in ("redis", "rediss"):
                raise ValueError("cluster_nodes are redis:// or rediss:// URLs")
        self._cluster_nodes = tuple(cluster_nodes)
        self._url = url
        self._options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            # One retry on a dropped connection, for the pooled connection that died with a
            # Redis restart; a timeout is not retried (the script may have run).
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            **(redis_options or {}),
            # Every new connection checks, before anything else is sent on it, whether the Redis
            # process behind it may have lost data (see the module docstring).
            "redis_connect_func": self._on_connect,
        }
        # cluster shards: the nodes CLUSTER SLOTS named, bumped with each move to another node,
        # clients of nodes left (closed with the broker), one relocation at a time
        self._nodes: list[tuple[str, int]] = []
        self._generation = 0
        self._retired: list[Client] = []
        self._relocation: asyncio.Lock | None = None
        self._discovered_at = float("-inf")
        # Parse the URL now, so that a malformed one fails where the broker is made.
        self._bind(url)
        self._last_key = f"{key_prefix}last"
        self._floor_key = f"{key_prefix}floor"
        self._tops_key = f"{key_prefix}tops"
        self._run_key = f"{key_prefix}run"
        self._stream_prefix = f"{key_prefix}s:"
        self._stream_prefix_bytes = self._stream_prefix.encode()
        self._index_key = f"{key_prefix}index"
        self._wake_key = f"{key_prefix}wake:{secrets.token_hex(8)}"
        self._wake_pos = "0-0"
        self._token = self._wake_key.rpartition(":")[2]
        self._leases_key = f"{key_prefix}presence"
        self._presence_prefix = f"{key_prefix}presence:"
        self._presence_key = self._presence_prefix + self._token
        #: channels with join/leave events seen here, and their grace periods (swept for the
        #: users of hosts that vanished)
        self._announce_graces: dict[str, float] = {}
        #: per such channel, the announced users the sweep found absent, and since when (loop
        #: time): a leave waits for the grace period from then (they may be reconnecting)
        self._absent: dict[str, dict[str, float]] = {}
        self._renewer: asyncio.Task[None] | None = None

        # The largest id this broker saw issued (published, or read as ``last``) and the latest
        # floor it saw: evidence of a loss when Redis comes back with less (module docstring).
        self._high: Key | None = None
        self._known_floor: Key | None = None
        self._warned_run_id = False
        self._warned_eviction = False

        self._healthy = False
        self._connected: asyncio.Event | None = None
        self._reader: asyncio.Task[None] | None = None
        # Reader state, touched only on the event loop's thread:
        # channel -> id of the last entry read (or the join position) of each followed stream
        self._positions: dict[str, Key] = {}
        # every event of a followed channel up to here has been delivered (None: not connected)
        self._horizon: Key | None = None
        # channels followed or unfollowed while a round was in flight, and the lowest join
        # position among them: that round delivers nothing past it
        self._dirty: set[str] = set()
        self._join_floor: Key | None = None
        # reading by index: every event of a followed channel up to here has been delivered
        # and the index is read from here (None: catch up directly first)
        self._index_pos: Key | None = None
        # the floor the reader's positions belong to: when it changes, the reader resyncs
        self._reader_floor: Key | None = None

    @classmethod
    def for_cluster_shard(
        cls, url: str | Sequence[str], shard: int, shards: int, **options: Any
    ) -> RedisBroker:
        """Shard *shard* of *shards* on the Redis Cluster that *url* (any of its nodes, or a
        list of several: the first is *url*, the others ``cluster_nodes``) is part of: a broker
        whose keys all carry the hash tag `.cluster.shard_tag` gives it, so they live in one
        slot, on the primary that owns that slot now. *options* are those of `RedisBroker`."""
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("give the URL of at least one node of the cluster")
        return cls(urls[0], cluster_tag=shard_tag(shard, shards), cluster_nodes=urls[1:], **options)

    def _bind(self, url: str) -> None:
        """Talk to the Redis at *url* from now on (a client and its scripts)."""
        self._url = url
        self.address = _redacted(url)
        # A command finding every pooled connection busy waits for one (up to the timeout)
        # rather than failing at once: redis-py's default pool raises "Too many connections",
        # which a burst of new streams (a reconnect storm, issue 15) took for Redis being down,
        # and every stream past the pool's size was shed.
        pool: Any = aioredis.BlockingConnectionPool.from_url(
            url, **{"max_connections": POOL_SIZE, "timeout": self.timeout, **self._options}
        )
        client: Client = aioredis.Redis(connection_pool=pool)
        client.auto_close_connection_pool = True  # aclose() closes the pool: Redis.from_pool
        self._redis = client
        self._publish_script = self._redis.register_script(_PUBLISH)
        self._check_script = self._redis.register_script(_CHECK)
        self._evidence_script = self._redis.register_script(_EVIDENCE)
        self._share_script = self._redis.register_script(_SHARE)
        self._ask_script = self._redis.register_script(_ASK)
        self._announce_script = self._redis.register_script(_ANNOUNCE)

    # ------------------------------------------------------------------ lifecycle

    @property
    def healthy(self) -> bool:
        """Whether the reader is connected to Redis (``/healthz`` reports it)."""
        return self._healthy and not self.closed

    async def _start(self) -> None:
        self._connected = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read_forever())
        if self.counts_presence:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        try:
            await asyncio.wait_for(self._connected.wait(), self.timeout)
        except asyncio.TimeoutError:
            # Started anyway: the application keeps running and the reader keeps trying.
            log.warning("redis at %s not reachable yet; retrying in the background", self.address)

    async def _close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.wait([self._renewer], timeout=1.0)
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            # a broker that stops on purpose stops counting at once, not after its lease
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(self._leases_key, self._token)
            pipe.delete(self._presence_key)
            await asyncio.wait_for(pipe.execute(), self.timeout)
        reader = self._reader
        # Cancel until it ends: on Python 3.11 a cancellation that lands while redis-py is
        # inside asyncio.wait_for (sending a command) can be swallowed.
        while reader is not None and not reader.done():
            reader.cancel()
            await asyncio.wait([reader], timeout=0.1)
        if reader is not None and not reader.cancelled() and reader.exception() is not None:
            log.error("redis reader ended with an error", exc_info=reader.exception())
        self._healthy = False
        try:
            await asyncio.wait_for(self._redis.delete(self._wake_key), self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError):
            pass
        await self._redis.aclose()
        for client in self._retired:
            await client.aclose()
        self._retired = []

    # ------------------------------------------------------------------ the contract

    async def _publish(self, channel: str, event: Event) -> str:
        body = encode_event(event)
        result = await self._call(
            lambda: self._publish_script(
                keys=[
                    self._last_key,
                    self._floor_key,
                    self._tops_key,
                    self._stream_prefix + channel,
                    self._index_key,
                ],
                args=[
                    *self._evidence(),
                    self.stream_length,
                    body,
                    repr(time.time()),
                    self.index_length,
                    channel,
                ],
            )
        )
        event_id, _ = self._learn(result[0], result[1])
        return _format(event_id)

    async def _follow(self, channels: Sequence[str]) -> str:
        horizon = self._horizon
        if not self._healthy or horizon is None:
            raise BrokerUnavailableError(f"redis at {self.address} is unreachable")
        new = [channel for channel in channels if channel not in self._positions]
        if not new:
            return _format(horizon)
        last = await self._current()
        position = max(last, self._horizon or horizon)
        for channel in new:
            self._positions[channel] = position
            self._dirty.add(channel)
        if self._join_floor is None or position < self._join_floor:
            self._join_floor = position
        if self._index_pos is None:
            # The reader names the streams it follows: wake it so that its next XREAD names
            # this one too. Reading through the index, it hears of the new channel's events
            # from the index anyway.
            await self._wake()
        return _format(position)

    async def _unfollow(self, channels: Sequence[str]) -> None:
        for channel in channels:
            if self._positions.pop(channel, None) is not None:
                self._dirty.add(channel)

    async def _history(self, channels: Sequence[str], after: str) -> list[Frame]:
        found: list[Frame] = []
        first = True
        while True:
            page, more = await self._history_page(channels, after, HISTORY_PAGE, first)
            found.extend(page)
            if not more:
                return found
            after = page[-1].id
            first = False

    async def _history_page(
        self, channels: Sequence[str], after: str, limit: int, first: bool
    ) -> tuple[list[Frame], bool]:
        # One bounded transaction per page (issue 12: a resume of many channels read in one EXEC
        # blocked Redis for 145 ms and cost the hub 100 MB per request): ``XRANGE ... COUNT n``
        # per stream, then only what is certainly complete goes out. A stream that filled its
        # COUNT may hold more before the next page; the page ends at the smallest last id of
        # such streams, and the next one starts there.
        start = _parse(after)
        per_stream = max(MIN_PAGE_PER_STREAM, -(-limit // max(1, len(channels))))
        window = self.history_size + 1
        # The window (history_size entries per channel) can be checked only when a page may
        # read past it; otherwise the trim check below still proves nothing was lost.
        check_window = first and per_stream >= window
        count = window if check_window else per_stream

        async def read() -> Any:
            pipe = self._redis.pipeline(transaction=True)
            # `last` and `floor` after the evidence check (a new incarnation if this broker saw
            # ids that Redis no longer has), in the same transaction as the reads
            await self._evidence_script(
                keys=[self._last_key, self._floor_key, self._tops_key],
                args=self._evidence(),
                client=pipe,
            )
            if start is not None:
                pipe.hmget(self._tops_key, list(channels))
                for channel in channels:
                    pipe.xrange(
                        self._stream_prefix + channel, min=f"({after}", max="+", count=count
                    )
            return await pipe.execute()

        results = await self._call(read)
        last, floor = self._learn(results[0][0], results[0][1])
        current = _format(last)
        if start is None:
            raise HistoryGapError(current, "Last-Event-ID is not an id of this broker")
        if start > last:
            raise HistoryGapError(current, "Last-Event-ID is later than the last event")
        if start < floor:  # after the reset, what the new incarnation has (from its floor)
            lost = "Last-Event-ID is from history Redis no longer has"
            raise HistoryGapError(current, lost, resume_id=_format(floor))
        found: list[tuple[Key, Frame]] = []
        bound: Key | None = None
        for channel, had, entries in zip(channels, results[1], results[2:], strict=True):
            # read to its end, the stream must reach the newest id it has had (`tops`); short
            # of it, entries were lost (the stream deleted, evicted, restored from a copy)
            if len(entries) < count and had is not None:
                newest = _parse(entries[-1][0]) if entries else start
                if newest is None or (_parse(had) or _ZERO) > newest:
                    raise HistoryGapError(current)
            if not entries:
                continue
            if check_window and len(entries) >= window:
                raise HistoryGapError(current)
            # each entry names the one before it (`p`): the first, one at or before *after*, or
            # it was trimmed; the others, the entry read before them, or some were lost
            previous = start
            for entry_id, fields in entries:
                if (_parse(fields.get(b"p") or b"0-0") or _ZERO) > previous:
                    raise HistoryGapError(current)
                key = _parse(entry_id)
                if key is not None:
                    found.append((key, self._frame(channel, entry_id, fields)))
                    previous = key
            if len(entries) >= count:
                top = _parse(entries[-1][0])
                if top is not None and (bound is None or top < bound):
                    bound = top
        if bound is not None:
            found = [item for item in found if item[0] <= bound]
        if len(channels) > 1:
            found.sort(key=lambda item: item[0])
        return [frame for _, frame in found], bound is not None

    async def _tail(self, channels: Sequence[str], count: int) -> str:
        # The last entries of each stream, newest first, up to the window of history_size; a
        # stream that filled it may hold older entries outside the window, so the start is cut
        # at the entry before its oldest one read (its ``p``).
        reach = min(count, self.history_size)

        async def read() -> Any:
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(self._last_key)
            pipe.get(self._floor_key)
            if reach:
                for channel in channels:
                    pipe.xrevrange(self._stream_prefix + channel, max="+", min="-", count=reach)
            return await pipe.execute()

        results = await self._call(read)
        if results[0] is None:
            last, _ = await self._check()
            return _format(last)
        last = _parse(results[0]) or _ZERO
        start = _parse(results[1] or b"0-0") or _ZERO
        if not reach:
            return _format(last)
        keys: list[Key] = []
        for entries in results[2:]:
            for entry_id, _ in entries:
                key = _parse(entry_id)
                if key is not None:
                    keys.append(key)
            if entries and len(entries) >= reach:
                before = _parse(entries[-1][1].get(b"p") or b"0-0") or _ZERO
                start = max(start, before)
        if len(keys) >= count:
            ms, seq = heapq.nlargest(count, keys)[-1]
            start = max(start, (ms, seq - 1) if seq else (ms - 1, _MAX_PART))
        return _format(min(start, last))

    def id_key(self, event_id: str) -> Key | None:
        return _parse(event_id)

    # ------------------------------------------------------------------ presence

    shares_presence = True

    async def _share_presence(self, channels: Sequence[str]) -> None:
        table = self.presence_table
        args: list[Any] = [int(self.presence_lease * 1000), self._token]
        for channel in channels:
            count, identities = table.counts(channel)
            args += [channel, json.dumps([count, identities]) if count else ""]
        existed = await self._call(
            lambda: self._share_script(keys=[self._leases_key, self._presence_key], args=args)
        )
        if not existed:
            rest = set(table.channels()) - set(channels)
            if rest:  # Redis lost our hash (or it expired): write all of it again
                await self._share_presence(sorted(rest))
            # and maybe the announced marks with it: have our users announced again (where the
            # marks are still there, the script sends nothing)
            self._announce_again()

    async def _presence(self, channel: str) -> Presence:
        keys = [self._leases_key, f"{self.key_prefix}announced:{channel}"]
        values, marks = await self._call(
            lambda: self._ask_script(keys=keys, args=[self._presence_prefix, channel])
        )
        parts: list[tuple[int, dict[str, int]]] = []
        for value in values:
            try:
                count, identities = json.loads(value)
                parts.append((int(count), {str(k): int(v) for k, v in identities.items()}))
            except (ValueError, TypeError, AttributeError):
                log.warning("redis: a presence entry of %r is not ours; ignored", channel)
        announced = [m.decode("utf-8", "replace") if isinstance(m, bytes) else m for m in marks]
        return merge_presence(channel, parts, announced)

    async def _announce(self, channel: str, identity: str, grace: float) -> None:
        self._announce_graces[channel] = grace
        verdict = await self._call(
            lambda: self._announce_script(
                keys=[self._leases_key, f"{self.key_prefix}announced:{channel}"],
                args=[self._presence_prefix, channel, identity, repr(float(grace))],
            )
        )
        if isinstance(verdict, bytes):
            verdict = verdict.decode()
        if verdict in ("join", "leave"):
            await self.publish(
                companion(channel), presence_event_data(channel, identity), event=verdict
            )

    async def _sweep_announced(self) -> None:
        """Leave events for the users of hosts whose lease ended (nobody else would send them):
        check every announced user of the channels with join/leave events seen here. One found
        absent from the whole deployment leaves once still absent a grace period later: until
        then, their host may be waiting for them to reconnect, as this sweep cannot tell a host
        that vanished from a user whose connection was just lost."""
        now = asyncio.get_running_loop().time()
        for channel, grace in list(self._announce_graces.items()):
            key = f"{self.key_prefix}announced:{channel}"
            marks = await self._call(lambda key=key: self._redis.hgetall(key))  # type: ignore[misc]
            if not marks and not self.presence_table.counts(channel)[0]:
                del self._announce_graces[channel]
                self._absent.pop(channel, None)
                continue
            graces: dict[str, float] = {}
            for name, value in marks.items():
                identity = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
                graces[identity] = _grace_of(value, grace)
            missing = [i for i in graces if not self.presence_table.has(channel, i)]
            users = (await self._presence(channel)).users if missing else {}
            before = self._absent.get(channel, {})
            absent = {i: before.get(i, now) for i in missing if i not in users}
            if absent:
                self._absent[channel] = absent
            else:
                self._absent.pop(channel, None)
            for identity, since in absent.items():
                if now - since >= graces[identity]:
                    await self._announce(channel, identity, grace)

    async def _renew_forever(self) -> None:
        """Renew this broker's presence lease every third of it (and write the whole table
        again if Redis lost it); send the leaves of the users of vanished hosts."""
        while not self.closed:
            await asyncio.sleep(self.presence_lease / 3)
            try:
                await self._share_presence([])
                await self._sweep_announced()
            except BrokerError as exc:
                log.debug("redis: presence lease not renewed: %s", exc)
            except Exception:
                log.exception("redis: error renewing the presence lease")

    # ------------------------------------------------------------------ metrics

    def collector(self) -> Any:
        """A ``prometheus_client`` collector for this broker's health and fault counters."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        broker = self

        class _Collector:
            def collect(self) -> Iterator[Any]:
                yield GaugeMetricFamily(
                    "tornado_sse_redis_up",
                    "1 while the Redis broker's reader is connected",
                    value=1 if broker.healthy else 0,
                )
                yield CounterMetricFamily(
                    "tornado_sse_redis_outages",
                    "Times Redis became unreachable",
                    value=broker.outages,
                )
                yield CounterMetricFamily(
                    "tornado_sse_redis_live_resets",
                    "stream-reset events sent to live subscribers after lost continuity",
                    value=broker.live_resets,
                )

        return _Collector()

    # ------------------------------------------------------------------ Redis calls

    async def _call(self, make: Callable[[], Awaitable[T]], follow: bool = True) -> T:
        """Make and await a Redis call, bounded by the timeout; failures become
        BrokerUnavailableError. A cluster shard follows ``MOVED`` to the slot's new primary
        (unless not *follow*: a call on the reader's own connection) and retries while the
        slot migrates (``ASK``, ``TRYAGAIN``) or the cluster is down, within the same bound:
        Redis refused those calls, so they never ran."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout + 0.5
        pause = 0.01
        while True:
            generation = self._generation
            try:
                return await asyncio.wait_for(make(), max(0.001, deadline - loop.time()))
            except asyncio.TimeoutError as exc:
                raise BrokerUnavailableError(f"redis at {self.address} did not answer") from exc
            except MovedError as exc:
                if self.cluster_tag is None or not follow:
                    raise BrokerUnavailableError(f"redis at {self.address}: {exc}") from exc
                failure: RedisError = exc
                await self._relocate(generation, self._moved_to(exc))
                if self._generation == generation:
                    await asyncio.sleep(pause)  # told to go where we are: wait for the cluster
                    pause = min(pause * 2, 0.2)
            except (AskError, TryAgainError, ClusterDownError) as exc:
                if self.cluster_tag is None:
                    raise BrokerUnavailableError(f"redis at {self.address}: {exc}") from exc
                failure = exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.2)
            except (RedisError, OSError) as exc:
                if self.cluster_tag is not None and isinstance(
                    exc, (RedisConnectionError, OSError)
                ):
                    # perhaps a failover: the next call goes where the cluster says now (not
                    # this one: it may have run before the connection broke)
                    await self._relocate(generation)
                raise BrokerUnavailableError(f"redis at {self.address}: {exc}") from exc
            if loop.time() >= deadline:
                raise BrokerUnavailableError(f"redis at {self.address}: {failure}") from failure

    # ------------------------------------------------------------------ Redis Cluster

    async def _relocate(self, generation: int, hint: tuple[str, int] | None = None) -> None:
        """A cluster shard: talk to the primary of its slot from now on, *hint* (a ``MOVED``
        reply's node) or whichever node ``CLUSTER SLOTS`` names. Nothing if another call moved
        the broker since *generation*. Bounded by the timeout; finding nothing changes nothing."""
        if self.cluster_tag is None:
            return
        if self._relocation is None:
            self._relocation = asyncio.Lock()
        async with self._relocation:
            if generation != self._generation:
                return
            where = hint
            if where is None:
                # one look at the map per reconnect_backoff[0] at most: every call failing in an
                # outage would otherwise send every node a CLUSTER SLOTS
                now = asyncio.get_running_loop().time()
                if now - self._discovered_at < self.reconnect_backoff[0]:
                    return
                try:
                    where = await asyncio.wait_for(self._discover(), self.timeout)
                except asyncio.TimeoutError:
                    where = None
                self._discovered_at = asyncio.get_running_loop().time()
            if where is None:
                return
            url = node_url(self._seed, *where)
            if url == self._url:
                return
            old = self._redis
            self._bind(url)
            self._generation += 1
            self._retired.append(old)
            # idle connections go now; one in use finishes its call (refused by a node that no
            # longer has the slot) and is closed with the broker
            await old.connection_pool.disconnect(inuse_connections=False)
        log.info(
            "redis cluster: the keys {%s} (slot %s) are served by %s now",
            self.cluster_tag,
            self.slot,
            self.address,
        )

    def _moved_to(self, exc: MovedError) -> tuple[str, int]:
        """Where a ``MOVED`` reply sends us (a node that does not know its own address names
        none: then the host of the node in use)."""
        host = exc.host if exc.host not in ("", "?") else urlsplit(self._url).hostname
        return (host or "127.0.0.1", int(exc.port))

    async def _discover(self) -> tuple[str, int] | None:
        """The primary of this shard's slot per ``CLUSTER SLOTS``, asked of the node in use,
        the node of the URL given, the ``cluster_nodes``, then every node seen before, until
        one answers."""
        candidates: list[tuple[str, int]] = []
        for url in (self._url, self._seed, *self._cluster_nodes):
            parts = urlsplit(url)
            candidates.append((parts.hostname or "127.0.0.1", parts.port or 6379))
        options = {
            key: value for key, value in self._options.items() if key != "redis_connect_func"
        }
        options["retry"] = Retry(NoBackoff(), 0)
        assert self.slot is not None
        for host, port in dict.fromkeys([*candidates, *self._nodes]):
            client: Client = aioredis.from_url(node_url(self._seed, host, port), **options)
            try:
                reply = await asyncio.wait_for(
                    client.execute_command("CLUSTER", "SLOTS"), self.timeout
                )
            except (RedisError, OSError, asyncio.TimeoutError):
                continue
            finally:
                await client.aclose()
            owner, nodes = slot_owner(reply, self.slot, (host, port))
            self._nodes = nodes
            if owner is not None:
                return owner
        return None

    def _evidence(self) -> list[str]:
        """The high-water mark and the known floor, as the scripts take them."""
        high, horizon = self._high, self._horizon
        if horizon is not None and (high is None or horizon > high):
            high = horizon
        floor = self._known_floor
        return [_format(high) if high else "", _format(floor) if floor else ""]

    def _learn(self, last: Any, floor: Any) -> tuple[Key, Key]:
        """Take ``last`` and ``floor`` as a script or one read returned them together."""
        last_key, floor_key = _parse(last or b""), _parse(floor or b"")
        if last_key is None or floor_key is None:
            raise BrokerUnavailableError(f"redis at {self.address}: unexpected ids {last!r}")
        if self._known_floor is None or floor_key > self._known_floor:
            self._known_floor = floor_key
        if self._high is None or last_key > self._high:
            self._high = last_key
        return last_key, floor_key

    def _checked(self, result: Any) -> tuple[Key, Key]:
        if result[2] in (b"0", "0") and not self._warned_run_id:
            self._warned_run_id = True
            log.warning(
                "redis at %s reports no run_id: a restart or failover that lost data is noticed "
                "only when this broker saw ids Redis no longer has",
                self.address,
            )
        return self._learn(result[0], result[1])

    def _check_args(self) -> list[str]:
        return [*self._evidence(), "1" if self.durable else "0"]

    async def _on_connect(self, connection: Any) -> None:
        """redis-py's connect callback: the usual handshake, then the check script, before any
        command of ours uses the connection (a new Redis process means new connections)."""
        await connection.on_connect()
        keys = [self._last_key, self._floor_key, self._tops_key, self._run_key]
        await connection.send_command("EVAL", _CHECK, len(keys), *keys, *self._check_args())
        self._checked(await connection.read_response())

    async def _check(self, client: Client | None = None) -> tuple[Key, Key]:
        """``last`` and ``floor`` after the check script (a new incarnation if Redis lost data)."""
        keys = [self._last_key, self._floor_key, self._tops_key, self._run_key]

        def check() -> Awaitable[Any]:
            script = self._check_script if client is None else client.register_script(_CHECK)
            return script(keys=keys, args=self._check_args())  # type: ignore[no-any-return]

        return self._checked(await self._call(check, follow=client is None))

    async def _current(self) -> Key:
        value = await self._call(lambda: self._redis.get(self._last_key))
        if value is None:
            last, _ = await self._check()
            return last
        return _parse(value) or _ZERO

    async def _wake(self) -> None:
        def wake() -> Awaitable[Any]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=10, approximate=True)
            pipe.pexpire(self._wake_key, 86_400_000)
            return pipe.execute()  # type: ignore[no-any-return]

        await self._call(wake)

    def _frame(self, channel: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Frame:
        try:
            published_at = float(fields.get(b"t", b"0"))
        except ValueError:
            published_at = 0.0
        event_id = entry_id.decode("ascii")
        return Frame(
            channel, event_id, b"id: %s\n%s" % (entry_id, fields.get(b"b", b"")), published_at
        )

    # ------------------------------------------------------------------ the reader

    async def _read_forever(self) -> None:
        delay = self.reconnect_backoff[0]
        while not self.closed:
            if self.cluster_tag is not None:
                # (re)connect to the slot's primary now: a failover or a resharding may have
                # moved it
                await self._relocate(self._generation)
            client: Client = aioredis.from_url(
                self._url,
                **{
                    **self._options,
                    "socket_timeout": self.read_block + self.timeout,
                    "retry": Retry(NoBackoff(), 0),
                },
            )
            try:
                await self._resync(client)
                if self.outages:
                    log.warning("redis at %s is back", self.address)
                self._healthy = True
                assert self._connected is not None
                self._connected.set()
                delay = self.reconnect_backoff[0]
                while not self.closed:
                    await self._round(client)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, BrokerUnavailableError) as exc:
                moved = exc if isinstance(exc, MovedError) else exc.__cause__
                if self.cluster_tag is not None and isinstance(moved, MovedError):
                    # a resharding or a failover moved the slot: reconnect there at once
                    log.info("redis cluster: %s; the reader follows", moved)
                    self._healthy = False
                    before = self._generation
                    await self._relocate(before, self._moved_to(moved))
                    if self._generation != before:
                        continue
                else:
                    self._lost(exc)
            except Exception:
                log.exception("redis reader failed; restarting it")
                self._lost(None)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            if self.closed:
                return
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.reconnect_backoff[1])

    def _lost(self, exc: BaseException | None) -> None:
        if self._healthy or not self.outages:
            self.outages += 1
            log.error(
                "redis at %s unreachable (%s); delivering nothing until it is back",
                self.address,
                exc if exc is not None else "reader error",
            )
        self._healthy = False

    async def _resync(self, client: Client) -> None:
        """After (re)connecting: continue from the reader's positions, or reset if we cannot."""
        last, floor = await self._check(client)
        await self._check_eviction(client)
        horizon = self._horizon
        self._reader_floor = floor
        self._wake_pos = "0-0"
        self._index_pos = None  # the index may have moved on: catch up directly first
        if horizon is None:
            self._horizon = last
            return
        if floor <= horizon <= last:
            return  # Redis kept everything after the horizon: carry on from the positions
        # The check started a new incarnation (floor past the horizon) if Redis may have lost
        # data, including when `last` went below the horizon (the horizon is evidence).
        log.warning(
            "redis at %s may have lost events (it restarted, failed over or lost data); "
            "sending stream-reset to subscribers of %d channels",
            self.address,
            len(self._positions),
        )
        # Reset to the new incarnation's floor, not to `last`: the events published since it
        # began (by brokers that got there first) are still delivered, after the reset.
        position = floor if horizon < floor else last
        self._horizon = position
        for channel in self._positions:
            self._positions[channel] = position
        for _, frame, targets in self._resets(dict.fromkeys(self._positions, position), "broker"):
            self._deliver_to(targets or [], frame)

    async def _check_eviction(self, client: Client) -> None:
        """Warn once when Redis may evict keys of ours (``maxmemory-policy allkeys-*``)."""
        if self._warned_eviction:
            return
        try:
            policy = str((await client.info("memory")).get("maxmemory_policy", ""))
        except RedisError:
            return  # INFO memory refused (an ACL): nothing to say
        if policy.startswith("allkeys"):
            self._warned_eviction = True
            log.warning(
                "redis at %s has maxmemory-policy %s: an evicted key costs its subscribers (or "
                "every client) a stream-reset; set maxmemory-policy noeviction",
                self.address,
                policy,
            )

    async def _blocking_read(
        self, client: Client, streams: dict[str, str]
    ) -> list[tuple[bytes, list[Any]]]:
        """``XREAD BLOCK`` of *streams*, pipelined with a read of ``last`` and ``floor`` that
        Redis runs after the ``XREAD`` returns: an entry of a new incarnation (after a
        ``FLUSHALL``, or one that another process's script started) comes with its floor, so
        the reader resyncs instead of delivering across the loss. Empty after a resync."""
        pipe = client.pipeline(transaction=False)
        pipe.xread(streams, count=self.read_count, block=int(self.read_block * 1000))
        pipe.mget(self._last_key, self._floor_key)
        response, ids = await pipe.execute()
        if await self._continuity(client, ids) is None:
            return []
        return _by_stream(response) if response else []

    async def _continuity(self, client: Client, ids: Sequence[Any]) -> Key | None:
        """``last`` if ``[last, floor]``, as just read, continue what the reader delivered;
        otherwise resync (a ``stream-reset`` where Redis may have lost events) and None."""
        last, floor = (_parse(value) if value is not None else None for value in ids)
        horizon = self._horizon
        if (
            last is not None
            and floor is not None
            and floor == self._reader_floor
            and (horizon is None or horizon <= last)
        ):
            self._learn(ids[0], ids[1])
            return last
        await self._resync(client)
        return None

    async def _round(self, client: Client) -> None:
        """One round of the reader: every followed stream at once, or the index first."""
        if len(self._positions) <= self.index_threshold:
            self._index_pos = None
            await self._read_streams(client, block=True)
        elif self._index_pos is None:
            await self._catch_up(client)
        else:
            await self._read_index(client)

    async def _catch_up(self, client: Client) -> None:
        """Read every followed stream up to ``last`` without blocking; then trust the index."""
        last = await self._continuity(client, await client.mget(self._last_key, self._floor_key))
        if last is None:
            return
        done = await self._read_streams(client, block=False, upto=last)
        if done == last:
            self._index_pos = last
            if self._horizon is None or last > self._horizon:
                self._horizon = last

    async def _read_index(self, client: Client) -> None:
        """Block on the index, then read only the followed streams its new entries name."""
        position = self._index_pos
        assert position is not None
        self._dirty = set()
        self._join_floor = None
        response = await self._blocking_read(
            client, {self._wake_key: self._wake_pos, self._index_key: _format(position)}
        )
        if not response:
            return
        index_key = self._index_key.encode()
        entries: list[tuple[Any, dict[bytes, bytes]]] = []
        for stream, got in response:
            if stream == index_key:
                entries = got
            elif got:
                self._wake_pos = got[-1][0].decode("ascii")
        if not entries:
            return
        before = _parse(entries[0][1].get(b"p") or b"")
        if before is None or before > position:
            log.info("redis index entries were trimmed before the reader got to them; catching up")
            self._index_pos = None
            return
        newest = _parse(entries[-1][0])
        if newest is None:
            self._index_pos = None
            return
        named: set[str] = set()
        for _, fields in entries:
            channel = fields.get(b"c", b"").decode("utf-8", "replace")
            if channel in self._positions:
                named.add(channel)
        done: Key | None = newest
        if named:
            done = await self._read_streams(client, block=False, upto=newest, only=named)
        join_floor = self._join_floor
        if done is not None and join_floor is not None and join_floor < done:
            done = join_floor  # a channel joined meanwhile: read the index again from there
        if done is not None and done > position:
            self._index_pos = done
            if self._horizon is None or done > self._horizon:
                self._horizon = done

    async def _read_streams(
        self,
        client: Client,
        *,
        block: bool,
        upto: Key | None = None,
        only: set[str] | None = None,
    ) -> Key | None:
        """One ``XREAD`` of the followed streams (or of *only* those): deliver what it returns,
        up to *upto*, in id order, exactly once. Returns the id up to which every event of
        those streams was delivered (*upto* unless an entry count or a join cut the round
        short), or None when that is unknown (a blocking read)."""
        snapshot = dict(self._positions)
        if only is not None:
            snapshot = {channel: snapshot[channel] for channel in only if channel in snapshot}
        else:
            self._dirty = set()
            self._join_floor = None
        streams: dict[str, str] = {self._wake_key: self._wake_pos} if block else {}
        for channel, key in snapshot.items():
            streams[self._stream_prefix + channel] = _format(key)
        if not streams:
            return upto
        if block:
            response = await self._blocking_read(client, streams)
        else:
            response = _by_stream(await client.xread(streams, count=self.read_count) or [])
        if not response:
            return upto
        cutoff: Key | None = upto
        newest: Key | None = None
        batches: list[tuple[str, list[tuple[Key, bytes, dict[bytes, bytes]]]]] = []
        prefix = self._stream_prefix_bytes
        for stream, entries in response:
            if not entries:
                continue
            if not stream.startswith(prefix):
                self._wake_pos = entries[-1][0].decode("ascii")
                continue
            channel = stream[len(prefix) :].decode()
            parsed = []
            for entry_id, fields in entries:
                entry_key = _parse(entry_id)
                if entry_key is not None:
                    parsed.append((entry_key, entry_id, fields))
            if not parsed:
                continue
            if newest is None or parsed[-1][0] > newest:
                newest = parsed[-1][0]
            if len(entries) >= self.read_count and (cutoff is None or parsed[-1][0] < cutoff):
                cutoff = parsed[-1][0]  # more may follow: nothing later is complete yet
            if channel in self._dirty or channel not in snapshot:
                continue
            batches.append((channel, parsed))
        join_floor = self._join_floor
        if join_floor is not None and (cutoff is None or join_floor < cutoff):
            cutoff = join_floor
        horizon = self._horizon or _ZERO
        out: list[tuple[Key, Frame, list[Subscription] | None]] = []
        trimmed: dict[str, Key] = {}
        for channel, parsed in batches:
            previous = snapshot[channel]
            last_read: Key | None = None
            for key, entry_id, fields in parsed:
                if cutoff is not None and key > cutoff:
                    break
                before = _parse(fields.get(b"p") or b"0-0") or _ZERO
                if before > previous:
                    # Entries after our position were trimmed before we read them, or lost
                    # (the stream deleted, evicted or restored from an older copy).
                    trimmed[channel] = max(before, horizon, trimmed.get(channel, _ZERO))
                previous = key
                out.append((key, self._frame(channel, entry_id, fields), None))
                last_read = key
            if last_read is not None:
                self._positions[channel] = max(self._positions.get(channel, last_read), last_read)
        if newest is not None and upto is None:
            reached = newest if cutoff is None or newest < cutoff else cutoff
            if reached > horizon:
                self._horizon = reached
        if trimmed:
            log.warning(
                "redis reader found entries missing on %d channels (trimmed before it read "
                "them, or lost from Redis); sending stream-reset",
                len(trimmed),
            )
            out.extend(self._resets(trimmed, "history"))
        if out:
            out.sort(key=lambda item: item[0])
            deliver = self._deliver
            for _, frame, targets in out:
                # The positions already moved past these events: a failing subscriber must not
                # make the reader restart and the events after it go undelivered.
                try:
                    if targets is None:
                        deliver(frame)
                    else:
                        self._deliver_to(targets, frame)
                except Exception:
                    log.exception("a subscriber failed to take event %s", frame.id)
        return cutoff if upto is not None else None

    def _resets(
        self, channels: dict[str, Key], reason: str
    ) -> list[tuple[Key, Frame, list[Subscription] | None]]:
        """One ``stream-reset`` per local subscription of *channels* (``channel -> reset id``),
        at the latest reset id among its channels, so a subscriber of several is told once."""
        at: dict[Subscription, Key] = {}
        for channel, key in channels.items():
            for sub in self._subscriptions.get(channel, ()):
                if sub not in at or key > at[sub]:
                    at[sub] = key
        groups: dict[Key, list[Subscription]] = {}
        for sub, key in at.items():
            groups.setdefault(key, []).append(sub)
        self.live_resets += len(at)
        channel = next(iter(channels), "")
        return [(key, _reset_frame(channel, key, reason), subs) for key, subs in groups.items()]

    def _deliver_to(self, subscriptions: list[Subscription], frame: Frame) -> None:
        """`Broker._deliver` for chosen subscriptions (a reset goes to each subscriber once)."""
        for sub in subscriptions:
            sub._deliver(frame)
