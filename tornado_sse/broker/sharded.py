"""`ShardedBroker`: channels spread over several brokers (shards), with exact resume of a stream
that follows channels on several of them (issue 17).

One Redis carries about 13,000 published events per second (docs/scaling.md). Past that, the
channels are spread over several independent brokers, usually one `.RedisBroker` per Redis
server (or per Redis Cluster shard): each channel lives on exactly one shard, which assigns its
ids, keeps its history, its presence and its loss detection, exactly as a lone broker does. A
process reads only the shards whose channels it follows. This module composes them.

Placement
    `ShardedBroker.shard_of` places a channel by rendezvous (highest random weight) hashing: the
    shard whose index gives the highest BLAKE2b score of ``(index, channel)`` wins. The hash is
    stable across processes and versions (not Python's salted ``hash()``), so every process
    agrees. A companion channel ``presence:C`` is placed as ``C``, so a channel's join and leave
    events sit beside the presence that decides them. Shards are named by their index in the
    list: the order is part of the configuration. Appending a shard moves about 1/N of the
    channels (those that now score highest on the new one) and no others.

Ids
    A stream whose channels all sit on one shard sees that shard's ids, unchanged: it costs
    nothing per event. A stream following channels of several shards sees *composite* ids: one
    part per shard it follows, ``<index>~<shard id>``, joined by ``.``, e.g.
    ``2~1733472000125-4.0~1733472000123-0``: only ``[0-9~.-]``, safe in a ``Last-Event-ID``
    header. Each part is the position on that shard that the stream has reached. An event's own
    part comes first: it names the event, the same in every stream (``SharedEventSource`` drops
    a duplicate by it), while the other parts are the stream's positions and differ from stream
    to stream; they follow in index order, as do all parts of id-only blocks and resets.
    `Broker.publish` returns the shard's own id (what a stream of that channel alone sees).

Resume
    The Last-Event-ID is read against the channels asked for. Each shard resumes from its part,
    through the shard's own exact resume (`Broker.subscribe`): nothing lost, nothing twice. A
    shard without a part (the stream follows it for the first time) starts from now, or with the
    last ``history`` events; the stream is then told its new composite position (an ``id``-only
    block first, as for a fresh stream). A part that its shard no longer has gets a
    ``stream-reset`` event naming that shard's channels (``"channels": [...]`` in its data),
    while the other shards resume exactly; only when every shard reset is the subscription's
    own ``reset`` set. An id that does not parse as a composite is a plain id or garbage: for a
    stream on one shard it is handed to that shard (which resets it if it is not its own), for a
    stream on several it is a reset of all of them (a plain id does not say which shard issued
    it, and ids of different shards overlap).

Ordering
    Events of one shard reach a stream in that shard's id order, replay and live, exactly once.
    Across shards there is no common order: live events interleave as each shard's reader
    delivers them in this process; a paged replay gives each shard's pages in turn. ``history=N``
    on a stream of several shards gives the last N events of each shard's channels (there is no
    order across shards to cut one window in).

Fan-out cost
    A composite id differs from stream to stream only by the positions of the *other* shards it
    follows. Each shard remembers the newest event it delivered live in this process (its
    *horizon*): every live subscription that follows the shard has received everything of its
    channels up to there, so the horizon is a valid position for all of them. A stream whose own
    position on a shard is not past the horizon uses the horizon; so all live streams following
    the same set of shards get the same composite id for an event, and the rewritten frame
    (encoded once) is shared between them. Only streams still catching up (a replay read ahead
    of the live reader, a reset) get frames of their own until the horizon passes them.

Adding a shard
    Moves ~1/N of the channels to the new shard, which has none of their history, and no
    process can tell a moved channel from a new one. A stream over several shards that follows
    a moved channel resumes with no part for the new shard, so that channel starts there from
    now: what its old shard had and the stream had not received is not replayed. A stream on
    one moved channel resumes with an id of its old shard, which the new shard takes as one of
    its own: ``stream-reset`` if the id is past the new shard's newest, otherwise a resume that
    replays nothing, dropping the same events. Open streams keep the old placement until they
    reconnect. docs/scaling.md says how to roll a new shard out.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import BrokerClosedError, InvalidChannelError
from ..protocol import Event, encode_event
from .base import Broker, Frame, Subscriber, Subscription, validate_channel
from .presence import Presence, described, validate_grace, validate_identity

__all__ = ["ShardedBroker", "parse_position", "placement"]

#: between a shard's index and its id in a part of a composite id
PART = "~"
#: between the parts of a composite id
JOIN = "."


@functools.lru_cache(maxsize=1 << 16)
def placement(channel: str, count: int) -> int:
    """The index (of *count* shards) of *channel*'s shard: rendezvous hashing with BLAKE2b of
    ``(index, channel)``; a companion channel ``presence:C`` goes where ``C`` goes."""
    key = (described(channel) or channel).encode()
    best, best_score = 0, -1
    for index in range(count):
        digest = hashlib.blake2b(b"%d\x00%s" % (index, key), digest_size=8).digest()
        score = int.from_bytes(digest, "big")
        if score > best_score:
            best, best_score = index, score
    return best


def parse_position(value: str, count: int) -> dict[int, str] | None:
    """The parts of a composite id (``{shard index: shard id}``), or ``None`` if *value* is not
    one for *count* shards (a plain id, garbage, an index out of range or repeated)."""
    if PART not in value:
        return None
    parts: dict[int, str] = {}
    for piece in value.split(JOIN):
        index, sep, shard_id = piece.partition(PART)
        if not sep or not (index.isascii() and index.isdigit()) or len(index) > 6 or not shard_id:
            return None
        number = int(index)
        if number >= count or number in parts:
            return None
        parts[number] = shard_id
    return parts


def _with_id(frame: Frame, event_id: str) -> Frame:
    """*frame* with its ``id`` line (always the first, `.encode_event`) saying *event_id*."""
    old = b"id: %s\n" % frame.id.encode()
    data = frame.data
    if data.startswith(old):
        data = b"id: %s\n%s" % (event_id.encode(), data[len(old) :])
    copy = Frame(frame.channel, event_id, data, frame.published_at)
    copy.written = frame.written
    return copy


def _position_frame(event_id: str) -> Frame:
    """An ``id``-only block: the client's position moves, no event is dispatched."""
    return Frame("", event_id, encode_event(Event(data=None, id=event_id)), time.time())


def _is_reset(frame: Frame) -> bool:
    """Whether *frame* is a shard's own ``stream-reset`` (`.RedisBroker`'s reader makes them)."""
    head = b'id: %s\nevent: stream-reset\ndata: {"id": "%s", ' % ((frame.id.encode(),) * 2)
    return frame.data.startswith(head)


class _Part:
    """The subscriber of one inner subscription: hands its frames to the outer one."""

    __slots__ = ("index", "outer", "shard", "sharded")

    def __init__(self, outer: ShardedSubscription, index: int) -> None:
        self.outer = outer
        self.index = index
        self.shard = outer._shards[index]
        self.sharded = outer._sharded

    def deliver(self, frame: Frame) -> None:
        outer = self.outer
        if outer.closed:
            return
        if outer._shared:  # the frame every stream at the horizons gets, if made already
            sharded, shard = self.sharded, self.shard
            if frame is sharded._horizon_frame[shard] and frame is sharded._variants_of[shard]:
                variant = sharded._variants[shard].get(outer._shards)
                if variant is not None:
                    outer.subscriber.deliver(variant)
                    return
        outer.subscriber.deliver(self.sharded._live(outer, self.index, frame))


class ShardedSubscription(Subscription):
    """A subscription to channels of several shards: one inner subscription per shard, merged.

    Behaves as a `Subscription` (``reset``, ``position``, ``replay``, :meth:`next_page`,
    :meth:`start`, :meth:`close`); its ids are composite (see `tornado_sse.broker.sharded`).
    """

    __slots__ = (
        "_inner",
        "_live_now",
        "_others",
        "_own",
        "_own_key",
        "_parts",
        "_sharded",
        "_shards",
        "_shared",
    )

    def __init__(
        self,
        broker: ShardedBroker,
        channels: tuple[str, ...],
        subscriber: Subscriber,
        shards: tuple[int, ...],
    ) -> None:
        super().__init__(broker, channels, subscriber)
        self._sharded = broker
        self._shards = shards
        self._inner: list[Subscription] = []
        #: per followed shard: the id reached, its key, and its part (``i~id``)
        self._own: list[str] = []
        self._own_key: list[Any] = []
        self._parts: list[str] = []
        self._live_now = False
        #: live and at every shard's horizon: its positions are the horizons (not kept here)
        self._shared = False
        #: the parts after the first of the last composite id (``(j, parts but the j-th)``)
        self._others: tuple[int, str] | None = None

    def _advance(self, j: int, event_id: str, key: Any) -> None:
        self._own[j] = event_id
        self._own_key[j] = key
        self._parts[j] = f"{self._shards[j]}{PART}{event_id}"
        self._others = None

    def _composite(self) -> str:
        return JOIN.join(self._parts)

    def _event_id(self, j: int) -> str:
        """The composite id of an event of the *j*-th shard: its own part first (which names
        the event, the same in every stream), then the positions on the others."""
        parts = self._parts
        others = self._others
        if others is None or others[0] != j:
            rest = JOIN.join([part for k, part in enumerate(parts) if k != j])
            others = self._others = (j, rest)
        return f"{parts[j]}{JOIN}{others[1]}"

    def _replayed(self, j: int, frames: list[Frame]) -> list[Frame]:
        """Frames of shard *j*'s replay with the composite id the stream reaches with each."""
        key = self._sharded.shards[self._shards[j]].id_key
        out = []
        for frame in frames:
            self._advance(j, frame.id, key(frame.id))
            out.append(_with_id(frame, self._event_id(j)))
        return out

    async def next_page(self, page_size: int | None = None) -> list[Frame]:
        """Read the next page of the replay: the next page of the first shard whose replay is
        not complete. See `Subscription.next_page`."""
        for j, inner in enumerate(self._inner):
            if self.closed:
                break
            if not inner.complete:
                frames = self._replayed(j, await inner.next_page(page_size))
                self.replay = frames
                self.complete = all(sub.complete for sub in self._inner)
                if frames or self.complete:
                    return frames
        self.complete = True
        self.replay = []
        return []

    def start(self) -> None:
        """Release every shard's held back live events (shard by shard) and go live."""
        if self._live_now:
            return
        if not self.complete:
            raise RuntimeError("start() before the last page of the replay was read")
        self.replay = []
        for inner in self._inner:
            if self.closed:
                return
            inner.start()
        self._live_now = True

    def close(self, *, grace: float | None = None) -> None:
        """Stop delivering to the subscriber; end every inner subscription, each with *grace*
        (see `Subscription.close`). Idempotent."""
        if not self.closed:
            self._sharded.unsubscribe(self, grace=grace)

    def _overflow(self) -> None:
        """An inner subscription held back too much: the whole stream is cut off, once."""
        if self.overflowed:
            return
        self.overflowed = True
        self.close()
        if self._on_overflow is not None:
            self._on_overflow()


class ShardedBroker(Broker):
    """Channels placed over several brokers (*shards*), each channel on one of them.

    ::

        shards = [RedisBroker(url, history_size=1000) for url in urls]
        broker = ShardedBroker(shards)

    ``tornado-sse serve --redis URL --redis URL ...`` makes one. Placement, ids, resume and the
    ordering guarantee are described in `tornado_sse.broker.sharded`.

    :param shards: the brokers, in a fixed order (a shard is its index in the list); all with
        the same ``history_size`` and ``presence``. The broker starts and closes them.
    :param history_size: if given, must be that of the shards (a check, not a setting).
    :param presence: if given, must be that of the shards (a check, not a setting).
    :raises ValueError: no shards, the same broker twice, or shards that disagree.
    """

    #: subscriptions are the shards' business; this broker follows nothing itself
    follows_remotely = False

    def __init__(
        self,
        shards: Sequence[Broker],
        *,
        history_size: int | None = None,
        presence: bool | None = None,
    ) -> None:
        shards = tuple(shards)
        if not shards:
            raise ValueError("a sharded broker needs at least one shard")
        if len({id(shard) for shard in shards}) != len(shards):
            raise ValueError("the same broker is given as two shards")
        sizes = {shard.history_size for shard in shards}
        counts = {shard.counts_presence for shard in shards}
        if len(sizes) != 1 or (history_size is not None and sizes != {history_size}):
            raise ValueError("every shard must have the same history_size")
        if len(counts) != 1 or (presence is not None and counts != {presence}):
            raise ValueError("every shard must count presence, or none")
        super().__init__(history_size=sizes.pop(), presence=counts.pop())
        self.shards = shards
        # per shard: the newest event delivered live here (key, id, part) and its frame
        self._horizon: list[tuple[Any, str, str] | None] = [None] * len(shards)
        self._horizon_frame: list[Frame | None] = [None] * len(shards)
        # per shard: the frame whose composite variants are kept, and those variants by id (or,
        # for the streams at every horizon, by their shards)
        self._variants_of: list[Frame | None] = [None] * len(shards)
        self._variants: list[dict[str | tuple[int, ...], Frame]] = [{} for _ in shards]
        self._open: set[ShardedSubscription] = set()

    def shard_of(self, channel: str) -> int:
        """The index of *channel*'s shard: rendezvous hashing of ``(index, channel)`` with
        BLAKE2b, stable across processes; ``presence:C`` is placed as ``C``. Adding a shard at
        the end of the list moves only the channels that now score highest on it (~1/N)."""
        return placement(channel, len(self.shards))

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        await asyncio.gather(*(shard.start() for shard in self.shards))

    async def _close(self) -> None:
        for sub in list(self._open):
            sub.closed = True
            for inner in sub._inner:
                inner.close()
        self._open.clear()
        results = await asyncio.gather(
            *(shard.close() for shard in self.shards), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    @property
    def healthy(self) -> bool:
        """Whether every shard can deliver right now (one shard down: ``/healthz`` says 503)."""
        return not self.closed and all(shard.healthy for shard in self.shards)

    # ------------------------------------------------------------------ publish

    async def _publish(self, channel: str, event: Event) -> str:
        shard = self.shards[self.shard_of(channel)]
        await shard.start()
        return await shard._publish(channel, event)

    # ------------------------------------------------------------------ subscribe

    async def subscribe(
        self,
        channels: Iterable[str],
        subscriber: Subscriber,
        last_event_id: str | None = None,
        *,
        page_size: int | None = None,
        max_pending: int | None = None,
        on_overflow: Callable[[], None] | None = None,
        history: int = 0,
        identity: str | None = None,
        announce: Iterable[str] = (),
        grace: float = 3.0,
    ) -> Subscription:
        """`Broker.subscribe`, over the shards of *channels*: one inner subscription per shard.

        A stream whose channels all sit on one shard gets that shard's own subscription (its
        ids, no cost per event); otherwise a `ShardedSubscription` with composite ids, whose
        *max_pending* is shared out evenly between its shards (one overflowing cuts it off).
        """
        if page_size is not None and page_size < 1:
            raise ValueError("page_size must be at least 1")
        if history < 0:
            raise ValueError("history must not be negative")
        validate_identity(identity)
        names = tuple(dict.fromkeys(validate_channel(c) for c in channels))
        if not names:
            raise InvalidChannelError("subscribe to at least one channel")
        if self.closed:
            raise BrokerClosedError("broker is closed")
        await self.start()
        groups: dict[int, list[str]] = {}
        for name in names:
            groups.setdefault(self.shard_of(name), []).append(name)
        wanted = set(announce)
        parts = None if last_event_id is None else self._parts(last_event_id)
        options: dict[str, Any] = {
            "page_size": page_size,
            "max_pending": max_pending,
            "identity": identity,
            "grace": grace,
        }
        if len(groups) == 1:
            ((index, group),) = groups.items()
            start = last_event_id
            if parts is not None:
                start = parts.get(index)
            sub = await self.shards[index].subscribe(
                group,
                subscriber,
                start,
                on_overflow=on_overflow,
                history=history,
                announce=[c for c in group if c in wanted],
                **options,
            )
            if parts is not None and start is None and not sub.closed:
                sub.replay.insert(0, _position_frame(sub.position))  # tell the new position
            return sub
        order = tuple(sorted(groups))
        outer = ShardedSubscription(self, names, subscriber, order)
        outer._on_overflow = on_overflow
        outer.identity = identity
        if max_pending is not None:  # the bound is the stream's: each shard holds its share
            options["max_pending"] = -(-max_pending // len(order))
        starts: list[str | None] = []
        for index in order:
            if last_event_id is None:
                starts.append(None)
            elif parts is None:
                starts.append("")  # not a position of several shards: a reset of every one
            else:
                starts.append(parts.get(index))
        results = await asyncio.gather(
            *(
                self.shards[index].subscribe(
                    groups[index],
                    _Part(outer, j),
                    starts[j],
                    on_overflow=outer._overflow,
                    history=history,
                    announce=[c for c in groups[index] if c in wanted],
                    **options,
                )
                for j, index in enumerate(order)
            ),
            return_exceptions=True,
        )
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        inner = [r for r in results if isinstance(r, Subscription)]
        outer._inner = inner
        if failure is not None or outer.closed or any(sub.closed for sub in inner):
            outer.closed = True
            for sub in inner:
                sub.close()
            if failure is not None:
                raise failure
            return outer  # overflowed while subscribing
        self._open.add(outer)
        for j, sub in enumerate(inner):
            outer._own.append("")
            outer._own_key.append(None)
            outer._parts.append("")
            outer._advance(j, sub.position, self.shards[order[j]].id_key(sub.position))
        outer.position = outer._composite()
        first: list[Frame] = []
        reset = [j for j, sub in enumerate(inner) if sub.reset]
        if reset and len(reset) == len(inner):
            outer.reset = True
        elif reset:
            concerned = [c for j in reset for c in groups[order[j]]]
            data = {"id": outer.position, "reason": "history", "channels": concerned}
            event = Event(data=json.dumps(data), event="stream-reset", id=outer.position)
            first.append(Frame.from_event("", event))
        elif last_event_id is not None and any(start is None for start in starts):
            first.append(_position_frame(outer.position))
        for j, sub in enumerate(inner):
            first.extend(outer._replayed(j, sub.replay))
        outer.replay = first
        outer.complete = all(sub.complete for sub in inner)
        return outer

    def _parts(self, event_id: str) -> dict[int, str] | None:
        """`parse_position`, and every part an id of its shard; else ``None``."""
        parts = parse_position(event_id, len(self.shards))
        if parts is None or any(self.shards[i].id_key(p) is None for i, p in parts.items()):
            return None
        return parts

    def unsubscribe(self, subscription: Subscription, *, grace: float | None = None) -> None:
        """End *subscription* (same as `Subscription.close`, whose *grace* this takes).
        Idempotent."""
        if grace is not None:
            validate_grace(grace)
        if isinstance(subscription, ShardedSubscription):
            subscription.closed = True
            self._open.discard(subscription)
            for inner in subscription._inner:
                inner.close(grace=grace)
        elif subscription._broker is not self:
            subscription._broker.unsubscribe(subscription, grace=grace)

    def _live(self, outer: ShardedSubscription, j: int, frame: Frame) -> Frame:
        """The frame *outer* sends for a live *frame* of its *j*-th shard: the composite id of
        its positions, shared with every stream at the same positions (see Fan-out cost)."""
        index = outer._shards[j]
        horizons = self._horizon
        if frame is not self._horizon_frame[index]:
            key = self.shards[index].id_key(frame.id)
            seen = horizons[index]
            if _is_reset(frame) or key is None or (seen is not None and key <= seen[0]):
                # a reset, or an event held back until start: this stream's own positions
                self._unshare(outer)
                outer._advance(j, frame.id, key)
                if _is_reset(frame):
                    return self._reset_variant(outer, index, frame)
                event_id = outer._event_id(j)
                return self._variant(frame, index, event_id, event_id)
            horizons[index] = (key, frame.id, f"{index}{PART}{frame.id}")
            self._horizon_frame[index] = frame
        if outer._shared:  # at every shard's horizon: the id every such stream gets
            return self._variant(frame, index, outer._shards, None, j)
        seen = horizons[index]
        assert seen is not None
        own, own_key, parts = outer._own, outer._own_key, outer._parts
        own[j], own_key[j], parts[j] = seen[1], seen[0], seen[2]
        if outer._live_now:
            shared = True
            for k, shard in enumerate(outer._shards):
                other = horizons[shard]
                if other is None or own_key[k] is None or own_key[k] > other[0]:
                    shared = False  # still ahead of what this process delivered: its own
                elif k != j and parts[k] is not other[2]:
                    own[k], own_key[k], parts[k] = other[1], other[0], other[2]
                    outer._others = None
            outer._shared = shared
        event_id = outer._event_id(j)
        return self._variant(frame, index, event_id, event_id)

    def _variant(
        self, frame: Frame, index: int, key: Any, event_id: str | None, j: int = 0
    ) -> Frame:
        """*frame* with a composite id, made once per *key* for this frame of shard *index*
        (*event_id*, or, if ``None``, the id at every shard's horizon, the *j*-th part first)."""
        if self._variants_of[index] is not frame:
            self._variants_of[index] = frame
            self._variants[index] = {}
        variants = self._variants[index]
        variant = variants.get(key)
        if variant is None:
            if event_id is None:
                parts = [self._horizon[shard][2] for shard in key]  # type: ignore[index]
                event_id = JOIN.join([parts[j], *parts[:j], *parts[j + 1 :]])
            variant = variants[key] = _with_id(frame, event_id)
        return variant

    def _unshare(self, outer: ShardedSubscription) -> None:
        """*outer* leaves the shared horizons: its own positions are theirs, from now on."""
        if outer._shared:
            outer._shared = False
            for k, shard in enumerate(outer._shards):
                seen = self._horizon[shard]
                if seen is not None:
                    outer._own[k], outer._own_key[k], outer._parts[k] = seen[1], seen[0], seen[2]
            outer._others = None

    def _reset_variant(self, outer: ShardedSubscription, index: int, frame: Frame) -> Frame:
        """A shard's live ``stream-reset`` for *outer*: its composite id, and the channels."""
        event_id = outer._composite()
        try:
            data = json.loads(frame.data.split(b"data: ", 1)[1].split(b"\n", 1)[0])
        except (IndexError, ValueError):
            data = {}
        data["id"] = event_id
        data["channels"] = [c for c in outer.channels if self.shard_of(c) == index]
        event = Event(data=json.dumps(data), event="stream-reset", id=event_id)
        return Frame.from_event(frame.channel, event, frame.published_at)

    # ------------------------------------------------------------------ presence and metrics

    async def _presence(self, channel: str) -> Presence:
        return await self.shards[self.shard_of(channel)].presence(channel)

    def subscriber_counts(self) -> dict[str, int]:
        """Local subscriptions per channel, over every shard (for metrics)."""
        counts: dict[str, int] = {}
        for shard in self.shards:
            counts.update(shard.subscriber_counts())
        return counts

    def history_sizes(self) -> dict[str, int]:
        """Events retained per channel, where the shards can tell cheaply (for metrics)."""
        sizes: dict[str, int] = {}
        for shard in self.shards:
            sizes.update(shard.history_sizes())
        return sizes

    def collector(self) -> Any:
        """A ``prometheus_client`` collector: each shard's own metrics (those that have them,
        as `.RedisBroker`'s ``tornado_sse_redis_up``), labelled ``shard="<index>"``."""
        from prometheus_client.core import Metric

        inner = [
            (str(index), shard.collector())  # type: ignore[attr-defined]
            for index, shard in enumerate(self.shards)
            if hasattr(shard, "collector")
        ]

        class _Collector:
            def collect(self) -> Iterator[Any]:
                merged: dict[str, Any] = {}
                for index, collector in inner:
                    for family in collector.collect():
                        out = merged.get(family.name)
                        if out is None:
                            out = merged[family.name] = Metric(
                                family.name, family.documentation, family.type, family.unit
                            )
                        for sample in family.samples:
                            labels = {**sample.labels, "shard": index}
                            out.samples.append(sample._replace(labels=labels))
                yield from merged.values()

        return _Collector()

    @property
    def followed_channels(self) -> frozenset[str]:
        """Channels with at least one local subscription, on any shard."""
        return frozenset().union(*(shard.followed_channels for shard in self.shards))

    def id_key(self, event_id: str) -> Any:
        """A sortable key for a shard's id; for a composite id, the key of its newest part
        (shards' ids are not ordered among themselves: good enough for ``until``, no more)."""
        if PART not in event_id:
            return self.shards[0].id_key(event_id)
        parts = self._parts(event_id)
        if parts is None:
            return None
        return max(self.shards[index].id_key(part) for index, part in parts.items())

    # ------------------------------------------------------------------ not used: the shards
    # do the following and the history of their channels

    async def _follow(self, channels: Sequence[str]) -> str:
        raise NotImplementedError("a sharded broker subscribes through its shards")

    async def _unfollow(self, channels: Sequence[str]) -> None:
        raise NotImplementedError("a sharded broker subscribes through its shards")

    async def _history(self, channels: Sequence[str], after: str) -> list[Frame]:
        raise NotImplementedError("a sharded broker subscribes through its shards")

    async def _tail(self, channels: Sequence[str], count: int) -> str:
        raise NotImplementedError("a sharded broker subscribes through its shards")
