"""The broker contract against the in-process broker, and its own details."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tornado.ioloop import IOLoop

from tests.broker_contract import BrokerContract, Collector, close_brokers, subscribe
from tests.helpers import wait_until
from tornado_sse.broker.base import Broker, Frame
from tornado_sse.broker.memory import History, IdSequence, InProcessBroker
from tornado_sse.errors import BrokerClosedError


@pytest.fixture
def make_broker(io_loop: IOLoop) -> Iterator[Callable[..., Awaitable[Broker]]]:
    made: list[InProcessBroker] = []

    async def make(history_size: int = 1000, max_channels: int = 10_000) -> Broker:
        for broker in made:  # one process: a second broker object is the same broker
            if broker.history_size == history_size and broker.history.max_channels == max_channels:
                return broker
        return await new(history_size, max_channels)

    async def new(history_size: int, max_channels: int) -> InProcessBroker:
        broker = InProcessBroker(history_size=history_size, max_channels=max_channels)
        await broker.start()
        made.append(broker)
        return broker

    yield make

    close_brokers(io_loop, made)


class TestInProcessBroker(BrokerContract):
    pass


def test_ids_from_another_incarnation_are_unknown() -> None:
    old = IdSequence(epoch_ms=1_000)
    new = IdSequence(epoch_ms=2_000)
    old_id = old.next()
    assert new.key(old_id) is None
    assert new.key(new.current) == 0
    assert new.key(new.epoch + "-5") is None  # from the future


def test_history_detects_trimmed_channels_independently() -> None:
    history: History[str] = History(2)
    for seq in range(1, 6):
        history.append("a", seq, f"a{seq}")
    history.append("b", 6, "b6")
    assert history.since(["a"], 1) is None
    assert history.since(["a"], 3) == [(4, "a4"), (5, "a5")]
    assert history.since(["b"], 0) == [(6, "b6")]
    assert history.since(["a", "b"], 4) == [(5, "a5"), (6, "b6")]
    zero: History[str] = History(0)
    zero.append("z", 1, "z1")
    assert zero.since(["z"], 0) is None
    assert zero.since(["z"], 1) == []


@pytest.mark.gen_test
async def test_subscriber_closing_itself_during_fanout_does_not_break_others() -> None:
    broker = InProcessBroker()
    got: list[str] = []

    class Closer:
        sub = None

        def deliver(self, frame: object) -> None:
            got.append("closer")
            assert self.sub is not None
            self.sub.close()

    closer = Closer()
    closer.sub = await broker.subscribe(["c"], closer)
    closer.sub.start()
    _, other = await subscribe(broker, ["c"])
    await broker.publish("c", "1")
    await broker.publish("c", "2")
    assert got == ["closer"]
    assert other.data == ["1", "2"]


@given(
    channels=st.lists(st.sampled_from("abcd"), min_size=1, max_size=60),
    size=st.integers(min_value=1, max_value=20),
    asked=st.lists(st.sampled_from("abcde"), min_size=1, max_size=4),
    after=st.integers(min_value=0, max_value=60),
    limit=st.integers(min_value=1, max_value=7),
)
def test_history_pages_add_up_to_since(
    channels: list[str], size: int, asked: list[str], after: int, limit: int
) -> None:
    """Pages read one after the other (each after the last seq of the one before) are what
    `since` gives at once, and a gap for one is a gap for the other (the bridge hub's pages)."""
    history: History[str] = History(size, max_channels=3)
    for seq, channel in enumerate(channels, 1):
        history.append(channel, seq, f"{channel}{seq}")
    names = list(dict.fromkeys(asked))
    whole = history.since(names, after)
    page = history.page(names, after, limit)
    if whole is None:
        assert page is None
        return
    pages: list[tuple[int, str]] = []
    while page is not None:
        found, more = page
        assert len(found) <= limit and (found or not more)
        pages.extend(found)
        if not more:
            break
        page = history.page(names, found[-1][0], limit)
    assert pages == whole


def test_history_forgets_least_recent_channels_past_the_bound() -> None:
    history: History[str] = History(10, max_channels=2)
    history.append("a", 1, "a1")
    history.append("b", 2, "b2")
    history.append("a", 3, "a3")  # a is now the most recent
    history.append("c", 4, "c4")  # forgets b (newest item 2)
    assert sorted(history) == ["a", "c"]
    assert history.since(["b"], 1) is None  # b's event 2 is gone: a gap, not silence
    assert history.since(["b"], 2) == []
    assert history.since(["never"], 0) == []  # never forgotten (b is the only one): nothing lost
    assert history.since(["a", "c"], 1) == [(3, "a3"), (4, "c4")]
    assert len(history) == 2


def test_a_forgotten_channel_published_again_keeps_its_gap() -> None:
    """Issue 12, item 2: the new history of a forgotten channel starts after its last event."""
    history: History[str] = History(10, max_channels=2)
    for seq in (1, 2, 3):
        history.append("a", seq, f"a{seq}")
    history.append("b", 4, "b4")
    history.append("c", 5, "c5")  # forgets a (last item 3)
    history.append("a", 6, "a6")  # forgets b (last item 4); a's new history holds all after 3
    assert history.since(["a"], 1) is None
    assert history.since(["a"], 2) is None
    assert history.since(["a"], 3) == [(6, "a6")]
    assert history.since(["a", "c"], 0) is None
    assert history.since(["c", "a"], 4) == [(5, "c5"), (6, "a6")]
    assert history.since(["b"], 3) is None
    assert history.since(["b"], 4) == []


def test_records_of_forgotten_channels_are_bounded_and_stay_conservative() -> None:
    history: History[str] = History(10, max_channels=2)
    history.append("a", 1, "a1")
    for seq in range(2, 102):
        history.append(f"other.{seq}", seq, "x")
    assert len(history) == 2
    assert len(history._forgotten) <= 2  # memory stays bounded however many channels came
    floor = history._floor
    assert 1 <= floor < 100  # the records folded into one number: the highest gone, a's too
    history.append("a", 102, "a102")
    assert history.since(["a"], 0) is None
    assert history.since(["a"], floor - 1) is None
    assert history.since(["a"], floor) == [(102, "a102")]
    floor = history._floor
    history.append("new", 103, "n103")  # never forgotten, but no record says so
    assert history.since(["new"], floor - 1) is None
    assert history.since(["new"], floor) == [(103, "n103")]


@pytest.mark.gen_test
async def test_issue_12_repro_a_channel_forgotten_at_the_default_bound() -> None:
    """Publish A x3, then 10,000 other channels, then A again: a resume from A's first id is a
    stream-reset, not the new event alone; from its third id, exactly the new event."""
    broker = InProcessBroker(history_size=1000)
    try:
        ids = [await broker.publish("A", str(n)) for n in range(3)]
        for n in range(10_000):
            await broker.publish(f"other.{n}", "x")
        last = await broker.publish("A", "again")
        sub, got = await subscribe(broker, ["A"], ids[0])
        assert sub.reset and got.frames == []
        assert sub.position == last
        sub.close()
        sub, got = await subscribe(broker, ["A"], ids[2])
        assert not sub.reset and got.data == ["again"]
        sub.close()
    finally:
        await broker.close()


class LaggingBroker(InProcessBroker):
    """Live events reach this process a moment after they are in history, as with the bridge or
    Redis: the base class's resume must not send an event twice when its replay already had it."""

    follows_remotely = True

    def _deliver(self, frame: Frame) -> None:
        asyncio.get_running_loop().call_later(0.02, super()._deliver, frame)


@pytest.mark.gen_test
async def test_events_in_replay_and_still_in_flight_are_sent_once() -> None:
    broker = LaggingBroker()
    first = await broker.publish("lag", "0")
    _, early = await subscribe(broker, ["lag"])  # live before any of the events below
    for n in range(1, 6):
        await broker.publish("lag", str(n))
    sub, got = await subscribe(broker, ["lag"], first)  # the replay has 1-5; they are in flight
    assert [event.data for event in got.events] == ["1", "2", "3", "4", "5"]
    await broker.publish("lag", "6")
    await wait_until(lambda: len(early.frames) == 6)
    await wait_until(lambda: len(got.frames) >= 6)
    assert got.data == ["1", "2", "3", "4", "5", "6"]
    sub.close()


@pytest.mark.gen_test
async def test_an_id_of_an_earlier_incarnation_is_a_reset_then_what_the_new_one_has() -> None:
    """A hub restarted with the in-process broker: the resume of a client of the old one gets
    ``stream-reset`` at the new epoch's first id, then everything published since (storm case
    a, issue 15: it got live events only, missing what the new hub had in history)."""
    old, new = InProcessBroker(), InProcessBroker()
    new.ids = IdSequence(epoch_ms=int(old.ids.epoch, 36) + 1000)
    try:
        gone = await old.publish("a", "died with the old hub")
        since = [await new.publish(c, c) for c in ("a", "b", "a")]
        sub, got = await subscribe(new, ["a"], gone)
        assert sub.reset and sub.position == f"{new.ids.epoch}-0"
        later = await new.publish("a", "live")
        await wait_until(lambda: [f.id for f in got.frames][-1:] == [later])
        assert [f.id for f in got.frames] == [since[0], since[2], later]
        sub.close()
        # not an earlier incarnation: garbage, a later epoch, one of ours from the future
        future = IdSequence(epoch_ms=int(new.ids.epoch, 36) + 1000).next()
        for last_event_id in ("nonsense", future, f"{new.ids.epoch}-99", "-1", "zz-"):
            sub, _ = await subscribe(new, ["a"], last_event_id)
            assert sub.reset and sub.position == new.ids.current and sub.replay == []
            sub.close()
        # paged, as the handler asks for it (in-process history is one page)
        sub = await new.subscribe(["a", "b"], Collector(), gone, page_size=1)
        assert sub.reset and sub.complete and [f.id for f in sub.replay] == [*since, later]
        sub.close()
    finally:
        await old.close()
        await new.close()


class _StuckPresence(InProcessBroker):
    """A backend whose presence writes never finish (a server that stopped answering)."""

    shares_presence = True

    def __init__(self) -> None:
        super().__init__()
        self.writing = asyncio.Event()

    async def _share_presence(self, channels: object) -> None:
        self.writing.set()
        await asyncio.Event().wait()


@pytest.mark.gen_test(timeout=10)
async def test_close_ends_a_presence_write_under_way_and_whoever_waits_for_it() -> None:
    """A write still in flight when the broker closed was left pending, and destroyed with the
    event loop mid-command (seen in CI as 'Task was destroyed but it is pending' and an
    unclosed Redis connection)."""
    broker = _StuckPresence()
    subscribing = asyncio.ensure_future(broker.subscribe(["a"], Collector(), identity="ada"))
    await asyncio.wait_for(broker.writing.wait(), 5)
    await broker.close()
    writer = broker._presence_writer
    assert writer is not None and writer.done()
    with pytest.raises(BrokerClosedError):
        await asyncio.wait_for(subscribing, 5)
