"""`ShardedBroker` over three real redis-servers: the broker contract, and resume across shards
(composite ids, per-shard resets, shared frames, placement)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from tornado.ioloop import IOLoop

from tests.broker_contract import TIMEOUT, BrokerContract, Collector, close_brokers, subscribe
from tests.helpers import wait_until
from tests.redis_server import RedisServer
from tornado_sse.broker.base import Broker, Frame
from tornado_sse.broker.redis import RedisBroker
from tornado_sse.broker.sharded import ShardedBroker, parse_position, placement
from tornado_sse.protocol import parse

SHARDS = 3
MakeSharded = Callable[..., Awaitable[ShardedBroker]]


@pytest.fixture(scope="module")
def redis_shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """Three redis-servers of this module's own (tests flush or restart them)."""
    servers = [RedisServer(tmp_path_factory.mktemp(f"shard{n}")) for n in range(SHARDS)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def make_broker(
    io_loop: IOLoop, redis_shards: list[RedisServer], redis_prefix: str
) -> Iterator[MakeSharded]:
    """New started sharded brokers over the three servers, one key prefix per test."""
    made: list[Broker] = []

    async def make(history_size: int = 1000, **options: Any) -> ShardedBroker:
        options.pop("max_channels", None)  # Redis keeps every channel's stream
        options.setdefault("key_prefix", redis_prefix)
        options.setdefault("reconnect_backoff", (0.05, 0.2))
        for server in redis_shards:
            assert server.ping(), "a redis-server of the shards is not answering"
        shards = [
            RedisBroker(server.url, history_size=history_size, **options) for server in redis_shards
        ]
        broker = ShardedBroker(shards)
        made.append(broker)
        await broker.start()
        assert broker.healthy
        return broker

    yield make

    close_brokers(io_loop, made)


@pytest.fixture
def redis_prefix() -> str:
    import uuid

    return f"test-{uuid.uuid4().hex[:12]}:"


def on_shard(shard: int, stem: str, count: int = 1) -> list[str]:
    """*count* channel names starting with *stem* that sit on *shard* (of `SHARDS`)."""
    names = []
    n = 0
    while len(names) < count:
        name = f"{stem}.{n}"
        if placement(name, SHARDS) == shard:
            names.append(name)
        n += 1
    return names


class TestShardedBroker(BrokerContract):
    """The whole contract; where a test expects one id order across channels, its channels are
    put on one shard (ids are ordered per shard). Streams over several shards: below."""

    def together(self, *channels: str) -> list[str]:
        shard = placement(channels[0], SHARDS)
        names = [channels[0]]
        for name in channels[1:]:
            n = 0
            candidate = name
            while placement(candidate, SHARDS) != shard:
                n += 1
                candidate = f"{name}.{n}"
            names.append(candidate)
        return names


# ---------------------------------------------------------------------- placement and ids


def test_placement_is_stable_spread_and_moves_a_quarter_to_a_fourth_shard() -> None:
    assert placement("presence:room/1", 7) == placement("room/1", 7)
    names = [f"user/{n}" for n in range(3000)]
    three = [placement(name, 3) for name in names]
    assert all(three.count(shard) > 800 for shard in range(3))
    four = [placement(name, 4) for name in names]
    moved = [(a, b) for a, b in zip(three, four, strict=True) if a != b]
    assert all(b == 3 for _, b in moved)  # only to the new shard
    assert 600 < len(moved) < 900  # about a quarter


def test_placement_is_pinned() -> None:
    """Every process must agree on placement, across versions: these values must not change."""
    assert [placement(name, 5) for name in ("news", "user/ada", "room/1", "a", "")] == [
        0,
        1,
        1,
        2,
        4,
    ]
    assert [placement(f"user/{n}", 3) for n in range(12)] == [1, 0, 1, 0, 0, 2, 1, 0, 2, 0, 2, 0]


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        ("0~1-0", {0: "1-0"}),
        ("0~1-0.2~5-3", {0: "1-0", 2: "5-3"}),
        ("1-0", None),
        ("", None),
        ("~1-0", None),
        ("0~", None),
        ("3~1-0", None),
        ("0~1-0.0~2-0", None),
        ("a~1-0", None),
        ("0~1-0..1~2-0", None),
        ("-1~1-0", None),
        ("\u00b2~1-0", None),  # a digit to str.isdigit, not to int(): a Latin-1 header byte
        ("0~1-0.\u0661~1-0", None),
    ],
)
def test_composite_ids_parse(value: str, parts: dict[int, str] | None) -> None:
    assert parse_position(value, SHARDS) == parts


def test_shards_must_agree() -> None:
    with pytest.raises(ValueError):
        ShardedBroker([])
    one = RedisBroker("redis://127.0.0.1:1/0", history_size=10)
    with pytest.raises(ValueError):
        ShardedBroker([one, one])
    with pytest.raises(ValueError):
        ShardedBroker([one, RedisBroker("redis://127.0.0.1:1/0", history_size=20)])
    with pytest.raises(ValueError):
        ShardedBroker([one, RedisBroker("redis://127.0.0.1:1/0", history_size=10, presence=False)])


# ---------------------------------------------------------------------- several shards


def parts_of(frame: Frame) -> dict[int, str]:
    parts = parse_position(frame.id, SHARDS)
    assert parts is not None, frame.id
    return parts


def per_shard(frames: list[Frame]) -> dict[int, list[str]]:
    """The data of each shard's events (by the channel's shard), in the order received."""
    out: dict[int, list[str]] = {}
    for frame in frames:
        for event in parse(frame.data):
            if event.data is not None and event.event is None:
                out.setdefault(placement(frame.channel, SHARDS), []).append(event.data)
    return out


def spread() -> list[str]:
    """One channel on each shard, in shard order."""
    return [on_shard(n, f"spread{n}")[0] for n in range(SHARDS)]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_stream_over_every_shard_gets_composite_ids_in_order_per_shard(
    make_broker: MakeSharded,
) -> None:
    broker = await make_broker()
    channels = spread()
    sub, got = await subscribe(broker, channels)
    assert sorted(parse_position(sub.position, SHARDS) or {}) == [0, 1, 2]
    published: dict[int, list[tuple[str, str]]] = {0: [], 1: [], 2: []}
    for n in range(60):
        shard = n % 3
        published[shard].append((await broker.publish(channels[shard], str(n)), str(n)))
    await wait_until(lambda: len(got.frames) >= 60, TIMEOUT)
    assert len(got.frames) == 60
    for shard in range(SHARDS):
        mine = [f for f in got.frames if f.channel == channels[shard]]
        # the shard's part of each of its events is the event's id on that shard
        assert [(parts_of(f)[shard], parse(f.data)[0].data) for f in mine] == published[shard]
        assert all(parse(f.data)[0].id == f.id for f in mine)
    # every part only moves forward
    key = broker.shards[0].id_key
    for shard in range(SHARDS):
        positions = [key(parts_of(f)[shard]) for f in got.frames]
        assert positions == sorted(positions)
    sub.close()


async def read_some_then_resume(
    broker: ShardedBroker,
    channels: list[str],
    last: str,
    collected: list[Frame],
    stop: asyncio.Event,
) -> None:
    """A client that reads a few events, drops, and resumes from the last id it got (first:
    *last*), until *stop*; everything it received goes to *collected*."""
    while not stop.is_set():
        got = Collector()
        sub = await broker.subscribe(channels, got, last, page_size=3)
        frames = list(sub.replay)
        while not sub.complete:
            frames.extend(await sub.next_page())
        got.frames[:0] = frames
        sub.start()
        await wait_until(lambda got=got: len(got.frames) >= 4 or stop.is_set(), TIMEOUT)
        sub.close()
        collected.extend(got.frames)
        if got.frames:
            last = got.frames[-1].id


@pytest.mark.gen_test(timeout=TIMEOUT * 2)
async def test_resume_across_shards_while_publishing_loses_and_repeats_nothing(
    make_broker: MakeSharded,
) -> None:
    broker = await make_broker()
    other = await make_broker()  # a second host publishes
    channels = [*on_shard(0, "r0", 2), *on_shard(1, "r1"), *on_shard(2, "r2", 2)]
    sub0 = await broker.subscribe(channels, Collector())
    start = sub0.position
    sub0.close()
    stop = asyncio.Event()
    published: list[tuple[str, str]] = []

    async def publisher() -> None:
        for n in range(300):
            source = broker if n % 2 else other
            channel = channels[n % len(channels)]
            published.append((channel, await source.publish(channel, str(n))))
            if n % 7 == 0:
                await asyncio.sleep(0)
        stop.set()

    reader_got: list[Frame] = []
    reader = asyncio.ensure_future(read_some_then_resume(broker, channels, start, reader_got, stop))
    await publisher()
    await reader
    # then resume once more from the very last id, to collect the tail
    tail = Collector()
    last = reader_got[-1].id if reader_got else start
    sub = await broker.subscribe(channels, tail, last)
    collected = reader_got + list(sub.replay)
    sub.close()
    data = [e.data for f in collected for e in parse(f.data) if e.data is not None]
    assert sorted(data, key=int) == [str(n) for n in range(300)], "lost or repeated events"
    for shard in range(SHARDS):
        mine = [int(d) for d in per_shard(collected).get(shard, [])]
        assert mine == sorted(mine), f"shard {shard} out of order"


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_paged_replay_over_shards_while_publishing(make_broker: MakeSharded) -> None:
    broker = await make_broker()
    channels = spread()
    sub0, _ = await subscribe(broker, channels)
    position = sub0.position
    sub0.close()
    sent: dict[str, list[str]] = {channel: [] for channel in channels}

    async def publish(channel: str, data: str) -> None:
        await broker.publish(channel, data)
        sent[channel].append(data)

    for n in range(45):
        await publish(channels[n % 3], str(n))
    got = Collector()
    sub = await broker.subscribe(channels, got, position, page_size=4, max_pending=1 << 20)
    replayed = list(sub.replay)
    live = 0
    while not sub.complete:  # publishes race with every page
        await publish(channels[live % 3], f"live{live}")
        live += 1
        replayed.extend(await sub.next_page())
    got.frames.extend(replayed)
    sub.start()
    await publish(channels[1], "after")
    await wait_until(lambda: len(got.frames) >= 45 + live + 1, TIMEOUT)
    assert live > 3
    for channel in channels:  # each shard's events exactly once, in order
        mine = [e.data for f in got.frames if f.channel == channel for e in parse(f.data)]
        assert mine == sent[channel]
    assert len(got.frames) == 45 + live + 1
    # the replay positions: resuming from any of them replays exactly the rest
    middle = got.frames[20]
    again = Collector()
    sub2 = await broker.subscribe(channels, again, middle.id)
    rest = list(sub2.replay)
    sub2.close()
    received_after = got.frames[21:]
    assert sorted(f.data.split(b"\n", 1)[1] for f in rest) == sorted(
        f.data.split(b"\n", 1)[1] for f in received_after
    )
    sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_newly_followed_shard_starts_from_now_and_the_stream_is_told(
    make_broker: MakeSharded,
) -> None:
    broker = await make_broker()
    a, b = on_shard(0, "na")[0], on_shard(2, "nb")[0]
    sub, got = await subscribe(broker, [a])
    await broker.publish(a, "1")
    await wait_until(lambda: len(got.frames) == 1, TIMEOUT)
    sub.close()
    plain = got.frames[0].id
    assert parse_position(plain, SHARDS) is None  # one shard: its own id
    missed = await broker.publish(a, "2")
    await broker.publish(b, "before b was followed")
    # a plain id for a stream of several shards: it cannot say which shard issued it
    sub, got = await subscribe(broker, [a, b], plain)
    assert sub.reset
    sub.close()
    # a composite id without a part for b's shard: a resumes exactly, b starts from now
    sub, got = await subscribe(broker, [a, b], f"0~{plain}")
    assert not sub.reset
    position = got.frames[0]
    assert parse(position.data) == [] and parts_of(position)[0] == plain
    assert 2 in parts_of(position)
    assert [parse(f.data)[0].data for f in got.frames[1:]] == ["2"]
    assert parts_of(got.frames[1])[0] == missed
    await broker.publish(b, "3")
    await wait_until(lambda: len(got.frames) == 3, TIMEOUT)
    assert parse(got.frames[2].data)[0].data == "3"
    sub.close()
    # the other way: a composite id for a stream now on one shard takes that shard's part
    sub, got = await subscribe(broker, [a], f"0~{plain}.2~{parts_of(got.frames[2])[2]}")
    assert [parse(f.data)[0].data for f in got.frames] == ["2"]
    sub.close()
    # ... and without a part for it, starts from now after an id-only block
    sub, got = await subscribe(broker, [b], f"0~{plain}")
    assert len(got.frames) == 1 and parse(got.frames[0].data) == []
    sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_part_out_of_history_resets_that_shards_channels_only(
    make_broker: MakeSharded,
) -> None:
    broker = await make_broker(history_size=3, min_stream_length=1)
    busy, calm = on_shard(1, "busy")[0], on_shard(2, "calm")[0]
    sub0, _ = await subscribe(broker, [busy, calm])
    position = sub0.position
    sub0.close()
    for n in range(400):  # trims busy's stream well past the position
        await broker.publish(busy, str(n))
    calm_ids = [await broker.publish(calm, f"calm{n}") for n in range(2)]
    got = Collector()
    sub = await broker.subscribe([busy, calm], got, position)
    assert not sub.reset  # not every shard reset
    reset = sub.replay[0]
    event = parse(reset.data)[0]
    assert event.event == "stream-reset"
    info = json.loads(event.data or "")
    assert info["channels"] == [busy]
    assert info["id"] == reset.id
    replayed = [(f.channel, parse(f.data)[0].data) for f in sub.replay[1:]]
    assert replayed == [(calm, "calm0"), (calm, "calm1")]
    assert parts_of(sub.replay[-1])[2] == calm_ids[-1]
    sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_garbage_resets_every_shard(make_broker: MakeSharded) -> None:
    broker = await make_broker()
    channels = spread()
    for bad in ("garbage", "", "0~x", "0~1-0.7~1-0", "0~1-0.0~1-0", "99999999999999999999-0"):
        sub, got = await subscribe(broker, channels, bad)
        assert sub.reset, bad
        assert got.frames == []
        assert sorted(parts_of(Frame("", sub.position, b"", 0))) == [0, 1, 2]
        sub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_streams_at_the_same_positions_share_each_event_frame(
    make_broker: MakeSharded,
) -> None:
    broker = await make_broker()
    channels = spread()
    subs = [await subscribe(broker, channels) for _ in range(3)]
    alone = [await subscribe(broker, [channels[0]]) for _ in range(2)]
    for n in range(6):
        await broker.publish(channels[n % 3], str(n))
    await wait_until(lambda: all(len(got.frames) == 6 for _, got in subs), TIMEOUT)
    await wait_until(lambda: all(len(got.frames) == 2 for _, got in alone), TIMEOUT)
    # caught up on every shard: the same composite frame object for every stream
    last = [got.frames[-1] for _, got in subs]
    assert all(frame is last[0] for frame in last)
    # a stream of one shard gets the shard's own frame: nothing made for it
    assert alone[0][1].frames[-1] is alone[1][1].frames[-1]
    assert parse_position(alone[0][1].frames[-1].id, SHARDS) is None
    for sub, _ in subs + alone:
        sub.close()


@pytest.mark.parametrize("loss", ["flushall", "restart"])
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_one_shard_losing_its_data_resets_only_its_channels(
    make_broker: MakeSharded, redis_shards: list[RedisServer], loss: str
) -> None:
    """FLUSHALL of one redis-server, or a restart without persistence."""
    # a FLUSHALL with nothing published is noticed after the reader's blocking read: 0.5 s,
    # not the default 5 s
    broker = await make_broker(read_block=0.5)
    channels = spread()
    sub, got = await subscribe(broker, channels)
    for n in range(6):
        await broker.publish(channels[n % 3], f"before{n}")
    await wait_until(lambda: len(got.frames) == 6, TIMEOUT)
    before = got.frames[-1].id
    if loss == "flushall":
        redis_shards[1].call("FLUSHALL")
    else:
        redis_shards[1].restart()
    await wait_until(
        lambda: any(parse(f.data)[0].event == "stream-reset" for f in got.frames), TIMEOUT
    )
    await wait_until(lambda: broker.healthy, TIMEOUT)
    resets = [f for f in got.frames if parse(f.data)[0].event == "stream-reset"]
    assert len(resets) == 1
    assert json.loads(parse(resets[0].data)[0].data or "")["channels"] == [channels[1]]
    for n in range(3):
        await broker.publish(channels[n], f"after{n}")
    await wait_until(lambda: len(got.frames) == 10, TIMEOUT)
    sub.close()
    # a resume from before the loss: shard 1's channel is reset, the others replay exactly
    again = Collector()
    sub2 = await broker.subscribe(channels, again, before)
    assert not sub2.reset
    events = [(f.channel, parse(f.data)[0]) for f in sub2.replay]
    assert events[0][1].event == "stream-reset"
    assert json.loads(events[0][1].data or "")["channels"] == [channels[1]]
    # (the reset is at the shard's new floor, as for one broker: after1 follows it)
    assert sorted(e.data or "" for _, e in events[1:]) == ["after0", "after1", "after2"]
    sub2.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_presence_and_overflow_over_shards(make_broker: MakeSharded) -> None:
    broker = await make_broker()
    channels = spread()
    sub = await broker.subscribe(channels, Collector(), identity="ada")
    for channel in channels:
        presence = await broker.presence(channel)
        assert presence.subscribers == 1 and presence.users == {"ada": 1}
    sub.close()
    for channel in channels:
        await wait_until(lambda c=channel: _empty(broker, c), TIMEOUT)
    overflows: list[bool] = []
    got = Collector()
    held = await broker.subscribe(
        channels, got, max_pending=300, on_overflow=lambda: overflows.append(True)
    )
    for n in range(8):
        await broker.publish(channels[n % 3], "x" * 100)
    await wait_until(lambda: held.overflowed, TIMEOUT)
    assert held.closed and overflows == [True]
    await wait_until(lambda: not broker.subscriber_counts(), TIMEOUT)


async def _empty(broker: ShardedBroker, channel: str) -> bool:
    return (await broker.presence(channel)).subscribers == 0


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_part_at_the_shared_horizon_resumes_exactly(make_broker: MakeSharded) -> None:
    """A live stream's part for a shard moves with every event that shard delivers here, its
    channels or not (the shared horizon): resuming from such a part loses and repeats nothing."""
    broker = await make_broker()
    news = on_shard(0, "hnews")[0]
    mine, theirs = on_shard(1, "hmine", 2)
    one, got_one = await subscribe(broker, [news, mine])
    two, got_two = await subscribe(broker, [news, theirs])
    await broker.publish(mine, "m0")
    await wait_until(lambda: len(got_one.frames) == 1, TIMEOUT)
    for n in range(3):
        await broker.publish(theirs, f"t{n}")  # moves shard 1's horizon past "m0"
    await wait_until(lambda: len(got_two.frames) == 3, TIMEOUT)
    await broker.publish(news, "n0")
    await wait_until(lambda: len(got_one.frames) == 2 and len(got_two.frames) == 4, TIMEOUT)
    shared = got_one.frames[-1]
    assert shared is got_two.frames[-1]  # one frame for both streams
    assert parts_of(shared)[1] == parts_of(got_two.frames[2])[1]  # at "t2", not "m0"
    one.close()
    missed = [await broker.publish(mine, "m1"), await broker.publish(news, "n1")]
    again, got = await subscribe(broker, [news, mine], shared.id)
    assert not again.reset
    # the replay gives shard 0's events, then shard 1's
    assert [parse(f.data)[0].data for f in got.frames] == ["n1", "m1"]
    assert [parts_of(f)[placement(f.channel, SHARDS)] for f in got.frames] == missed[::-1]
    again.close()
    two.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_events_held_back_until_start_never_claim_a_later_horizon(
    make_broker: MakeSharded,
) -> None:
    """At `start`, the events held back are released shard by shard: an event of the first
    shard must not carry a position on the second past events still to be released."""
    broker = await make_broker()
    first, second = on_shard(0, "hx")[0], on_shard(1, "hy")[0]
    other, got_other = await subscribe(broker, [on_shard(0, "hz")[0], second])
    got = Collector()
    held = await broker.subscribe([first, second], got)
    await broker.publish(first, "a")
    await broker.publish(second, "y")
    await wait_until(lambda: len(got_other.frames) == 1, TIMEOUT)  # shard 1's horizon: "y"
    held.start()
    assert [parse(f.data)[0].data for f in got.frames] == ["a", "y"]
    held.close()
    again, replay = await subscribe(broker, [first, second], got.frames[0].id)
    assert [parse(f.data)[0].data for f in replay.frames] == ["y"]
    again.close()
    other.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_adding_a_shard_moves_channels_as_documented(
    redis_shards: list[RedisServer], redis_prefix: str
) -> None:
    """docs/scaling.md, *Adding a shard*: a moved channel starts from now on its new shard; what
    its old shard had and the stream had not received is not replayed (no reset either)."""
    names = [f"m{n}" for n in range(1000)]
    moved = next(c for c in names if placement(c, 2) == 0 and placement(c, 3) == 2)
    stays = next(c for c in names if placement(c, 2) == 1 and placement(c, 3) == 1)

    def sharded(count: int) -> ShardedBroker:
        urls = [server.url for server in redis_shards[:count]]
        return ShardedBroker([RedisBroker(url, key_prefix=redis_prefix) for url in urls])

    before, after = sharded(2), sharded(3)
    try:
        sub, got = await subscribe(before, [moved, stays])
        await before.publish(moved, "seen")
        await wait_until(lambda: len(got.frames) == 1, TIMEOUT)
        sub.close()
        await before.publish(moved, "missed on the old shard")
        await before.publish(stays, "missed, replayed")
        again, got = await subscribe(after, [moved, stays], got.frames[0].id)
        assert not again.reset
        assert parse(got.frames[0].data) == []  # told its new position (a part for shard 2)
        assert 2 in parts_of(got.frames[0])
        assert [parse(f.data)[0].data for f in got.frames[1:]] == ["missed, replayed"]
        await after.publish(moved, "on the new shard")
        await wait_until(lambda: len(got.frames) == 3, TIMEOUT)
        again.close()
    finally:
        await before.close()
        await after.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_position_ahead_of_the_horizon_is_kept(make_broker: MakeSharded) -> None:
    """A stream that starts past what this process delivered on a shard (its channel's events
    before it came were never delivered here) keeps its own position there: resuming from its
    ids replays nothing from before it started."""
    broker = await make_broker()
    a0, a1 = on_shard(0, "pa", 2)
    b1, c1 = on_shard(1, "pb", 2)
    other, got_other = await subscribe(broker, [a0, b1])
    await broker.publish(b1, "x")  # shard 1's horizon here: "x"
    await wait_until(lambda: len(got_other.frames) == 1, TIMEOUT)
    await broker.publish(c1, "before")  # nobody here follows c1 yet: not delivered
    sub, got = await subscribe(broker, [a1, c1])
    await broker.publish(a1, "e")
    await wait_until(lambda: len(got.frames) == 1, TIMEOUT)
    sub.close()
    again, replay = await subscribe(broker, [a1, c1], got.frames[0].id)
    assert replay.frames == []
    again.close()
    other.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_max_pending_bounds_the_whole_stream_not_each_shard(
    make_broker: MakeSharded,
) -> None:
    broker = await make_broker()
    channels = spread()
    held = await broker.subscribe(channels, Collector(), max_pending=600)
    for channel in channels:  # 300 bytes held on each shard: 900 for the stream
        for _ in range(3):
            await broker.publish(channel, "x" * 100)
    await wait_until(lambda: held.overflowed, TIMEOUT)
    assert held.closed


@pytest.fixture
def app(io_loop: IOLoop, redis_shards: list[RedisServer], redis_prefix: str) -> Iterator[Any]:
    """An application streaming from a sharded broker over the three servers."""
    import tornado.web

    from tornado_sse import ConnectionSet, EventStreamHandler, Metrics

    broker = ShardedBroker(
        [RedisBroker(server.url, key_prefix=redis_prefix) for server in redis_shards]
    )
    yield tornado.web.Application(
        [(r"/events", EventStreamHandler)],
        sse_broker=broker,
        sse_connections=ConnectionSet(prune_interval=0.05),
        sse_metrics=Metrics(),
    )
    close_brokers(io_loop, [broker])


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_non_ascii_digit_in_an_id_is_a_bad_id_not_a_crash(port: int) -> None:
    """``²`` is a digit to ``str.isdigit`` but not to ``int()``; it arrives from a Latin-1
    ``Last-Event-ID`` header byte or a query argument."""
    from tests.helpers import RawStream

    query = "/events?" + "&".join(f"channel={channel}" for channel in spread())
    stream = await RawStream.open(port, query + "&last_event_id=%C2%B2~1-0")
    await stream.read_until(lambda s: len(s.events) >= 1)
    assert stream.status == 200
    assert stream.events[0].event == "stream-reset"  # garbage: a reset, as for any bad id
    stream.close()
    bounded = await RawStream.open(port, query + "&until=%C2%B2~1-0")
    await bounded.read_to_end()
    assert bounded.status == 400
