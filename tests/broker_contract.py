"""The broker contract, one suite for every backend.

Subclass `BrokerContract` in a test module and provide a fixture ``make_broker`` returning an
async factory ``make(history_size=1000, max_channels=10_000) -> Broker``: each call gives a new,
started broker on the same backend (two brokers act as two processes or two hosts), with the
given history per channel and number of channels whose history is kept (a backend that keeps
every channel, as Redis does, ignores ``max_channels``). The fixture tears them down.
pytest-tornado has no async fixtures: write ``make_broker`` as a plain fixture taking ``io_loop``
and close the brokers with ``io_loop.run_sync`` after ``yield`` (see tests/test_broker_memory.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.helpers import wait_until
from tornado_sse.broker.base import Broker, Frame, Subscription
from tornado_sse.broker.presence import Presence
from tornado_sse.errors import InvalidArgumentError, InvalidChannelError, InvalidEventError
from tornado_sse.protocol import Event, parse

MakeBroker = Callable[..., Awaitable[Broker]]
ID_CHARS = re.compile(r"[A-Za-z0-9._~-]+")
TIMEOUT = 20


class Collector:
    """A subscriber that keeps what it is given."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def deliver(self, frame: Frame) -> None:
        self.frames.append(frame)

    @property
    def events(self) -> list[Event]:
        return [event for frame in self.frames for event in parse(frame.data)]

    @property
    def data(self) -> list[str | None]:
        return [event.data for event in self.events]


def close_brokers(io_loop: Any, brokers: list[Broker]) -> None:
    """The teardown of a ``make_broker`` fixture: close every broker it made."""

    async def close_all() -> None:
        for broker in brokers:
            await broker.close()

    io_loop.run_sync(close_all)


async def subscribe(
    broker: Broker, channels: list[str], last_event_id: str | None = None
) -> tuple[Subscription, Collector]:
    """Subscribe as the handler does: the replay first, then live events."""
    collector = Collector()
    sub = await broker.subscribe(channels, collector, last_event_id)
    collector.frames.extend(sub.replay)
    sub.start()
    return sub, collector


class BrokerContract:
    def together(self, *channels: str) -> list[str]:
        """Names for *channels* in a test that expects one id order across them. Every backend
        orders ids across all its channels, except a sharded one, which orders them per shard:
        it overrides this to give names that sit on one shard (tests/test_sharded.py)."""
        return list(channels)

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_ids_increase_and_are_header_safe(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        a, b, c = self.together("a", "b", "c")
        ids = [await broker.publish(channel, "x") for channel in (a, b, a, c, b)]
        assert len(set(ids)) == len(ids)
        for event_id in ids:
            assert ID_CHARS.fullmatch(event_id), event_id
            assert len(event_id) <= 64
        keys = [broker.id_key(event_id) for event_id in ids]
        assert None not in keys
        assert keys == sorted(keys)

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_fresh_subscription_gets_later_events_in_order(
        self, make_broker: MakeBroker
    ) -> None:
        broker = await make_broker()
        await broker.publish("news", "before")
        sub, got = await subscribe(broker, ["news"])
        assert (not sub.reset and sub.replay == []) or sub.replay == []
        ids = [await broker.publish("news", str(n)) for n in range(20)]
        await wait_until(lambda: len(got.frames) >= 20, TIMEOUT)
        assert got.data == [str(n) for n in range(20)]
        assert [frame.id for frame in got.frames] == ids
        assert [event.id for event in got.events] == ids
        sub.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_position_then_resume_from_it(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        await broker.publish("p", "old")
        sub, _ = await subscribe(broker, ["p"])
        position = sub.position
        sub.close()
        await broker.publish("p", "missed")
        sub2, got = await subscribe(broker, ["p"], position)
        await wait_until(lambda: got.data == ["missed"], TIMEOUT)
        assert not sub2.reset
        sub2.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_several_channels_in_id_order_and_duplicates_once(
        self, make_broker: MakeBroker
    ) -> None:
        broker = await make_broker()
        a, b = self.together("a", "b")
        sub, got = await subscribe(broker, [a, b, a])
        assert sub.channels == (a, b)
        for n in range(10):
            await broker.publish(a if n % 2 else b, str(n))
        await broker.publish("c", "not followed")
        await wait_until(lambda: len(got.frames) >= 10, TIMEOUT)
        assert got.data == [str(n) for n in range(10)]
        sub.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_resume_replays_exactly_the_missed_events(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        a, b = self.together("a", "b")
        ids = []
        for n in range(6):
            ids.append(await broker.publish(a if n % 2 else b, str(n)))
        await broker.publish("other", "skip")
        sub, got = await subscribe(broker, [a, b], ids[2])
        assert not sub.reset
        assert [frame.id for frame in got.frames] == ids[3:]
        await broker.publish(a, "live")
        await wait_until(lambda: len(got.frames) == 4, TIMEOUT)
        assert got.data == ["3", "4", "5", "live"]
        sub.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_resume_while_publishing_loses_and_repeats_nothing(
        self, make_broker: MakeBroker
    ) -> None:
        broker = await make_broker()
        first = await broker.publish("race", "0")
        total = 200
        stop = asyncio.Event()

        async def publisher() -> None:
            for n in range(1, total):
                await broker.publish("race", str(n))
                if n % 10 == 0:
                    await asyncio.sleep(0)
            stop.set()

        task = asyncio.ensure_future(publisher())
        subs = []
        for _ in range(5):
            await asyncio.sleep(0)
            subs.append(await subscribe(broker, ["race"], first))
        await task
        for sub, got in subs:
            await wait_until(lambda got=got: len(got.frames) >= total - 1, TIMEOUT)
            expected = [str(n) for n in range(1, total)]
            missing = sorted(set(expected) - set(got.data), key=int)
            repeated = sorted({d for d in got.data if got.data.count(d) > 1})
            assert got.data == expected, f"missing {missing}, repeated {repeated}, got {got.data}"
            sub.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_paged_replay_while_publishing_loses_and_repeats_nothing(
        self, make_broker: MakeBroker
    ) -> None:
        broker = await make_broker()
        channels = self.together("pa", "pb", "pc")
        first = await broker.publish(channels[0], "0")
        ids = [await broker.publish(channels[n % 3], str(n)) for n in range(1, 120)]
        got = Collector()
        sub = await broker.subscribe(channels, got, first, page_size=7)
        replayed = list(sub.replay)
        live: list[str] = []
        while not sub.complete:  # publishes race with every page
            live.append(await broker.publish(channels[len(live) % 3], f"live {len(live)}"))
            replayed.extend(await sub.next_page())
        assert await sub.next_page() == []
        got.frames.extend(replayed)
        sub.start()
        live.append(await broker.publish(channels[1], "after"))
        await wait_until(lambda: len(got.frames) >= len(ids) + len(live), TIMEOUT)
        assert [frame.id for frame in got.frames] == ids + live
        sub.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_live_events_held_back_past_max_pending_close_the_subscription(
        self, make_broker: MakeBroker
    ) -> None:
        broker = await make_broker()
        overflows: list[bool] = []
        got = Collector()
        sub = await broker.subscribe(
            ["held"], got, max_pending=300, on_overflow=lambda: overflows.append(True)
        )
        for _ in range(4):
            await broker.publish("held", "x" * 100)
        await wait_until(lambda: sub.overflowed, TIMEOUT)
        assert sub.closed
        assert overflows == [True]
        sub.start()
        await broker.publish("held", "later")
        assert got.frames == []
        assert broker.subscriber_counts().get("held") is None

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_subscribe_storm_while_publishing(self, make_broker: MakeBroker) -> None:
        """Many subscriptions at once (most to channels nobody follows yet) while events flow:
        each gets exactly the events of its channels after its position, in order."""
        broker = await make_broker()
        channels = self.together(*(f"storm.{n}" for n in range(40)))
        published: list[tuple[str, str]] = []  # (channel, id)
        stop = asyncio.Event()

        async def publisher() -> None:
            n = 0
            while not stop.is_set():
                channel = channels[n % len(channels)]
                published.append((channel, await broker.publish(channel, str(n))))
                n += 1
                if n % 3 == 0:
                    await asyncio.sleep(0)

        task = asyncio.ensure_future(publisher())
        await wait_until(lambda: len(published) >= 5, TIMEOUT)
        subs = await asyncio.gather(
            *(subscribe(broker, [channels[n % 40], channels[(n * 7 + 3) % 40]]) for n in range(200))
        )
        stop.set()
        await task
        for channel in channels:
            published.append((channel, await broker.publish(channel, "final")))
        key = broker.id_key
        for sub, got in subs:
            mine = set(sub.channels)
            start = key(sub.position)
            assert start is not None
            expected = [i for c, i in published if c in mine and (key(i) or start) > start]
            await wait_until(lambda got=got, n=len(expected): len(got.frames) >= n, TIMEOUT)
            assert [frame.id for frame in got.frames] == expected
            sub.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_too_old_id_is_a_reset_never_a_gap(self, make_broker: MakeBroker) -> None:
        broker = await make_broker(history_size=2)
        ids = [await broker.publish("small", str(n)) for n in range(5)]
        sub, got = await subscribe(broker, ["small"], ids[0])
        assert sub.reset
        assert broker.id_key(sub.position) is not None
        assert broker.id_key(sub.position) >= broker.id_key(ids[-1])
        assert got.frames == []
        await broker.publish("small", "after")
        await wait_until(lambda: got.data == ["after"], TIMEOUT)
        sub.close()
        # within history: no reset
        sub2, got2 = await subscribe(broker, ["small"], ids[3])
        assert not sub2.reset
        assert got2.data[:1] == ["4"]
        sub2.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_a_channel_forgotten_and_published_again_is_never_a_silent_gap(
        self, make_broker: MakeBroker
    ) -> None:
        """Issue 12, item 2: past ``max_channels`` the channel published to least recently is
        forgotten; published to again, its new history must not pass for all of it."""
        broker = await make_broker(max_channels=4)
        first = await broker.publish("forgotten", "1")
        missed = [await broker.publish("forgotten", str(n)) for n in (2, 3)]
        for n in range(5):
            await broker.publish(f"crowd.{n}", "x")
        missed.append(await broker.publish("forgotten", "4"))
        sub, got = await subscribe(broker, ["forgotten"], first)
        if sub.reset:  # its history was forgotten (the in-process broker, the bridge)
            assert got.frames == []
            assert broker.id_key(sub.position) >= broker.id_key(missed[-1])
        else:  # a backend that keeps every channel (Redis) still has all of it
            replayed = [frame.id for frame in got.frames]
            assert replayed == missed, f"silent gap: replayed {replayed}, missed {missed}"
        sub.close()
        # within what the new history holds: no reset
        sub2, got2 = await subscribe(broker, ["forgotten"], missed[-2])
        assert not sub2.reset
        assert [frame.id for frame in got2.frames] == missed[-1:]
        sub2.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_a_new_channel_resumes_exactly_after_others_were_forgotten(
        self, make_broker: MakeBroker
    ) -> None:
        broker = await make_broker(max_channels=4)
        fresh, crowd = self.together("fresh", "crowd.11")
        for n in range(11):
            await broker.publish(f"crowd.{n}", "x")
        await broker.publish(crowd, "x")
        sub, _ = await subscribe(broker, [fresh])
        position = sub.position
        sub.close()
        ids = [await broker.publish(fresh, str(n)) for n in range(2)]
        for n in range(2):
            await broker.publish(f"more.{n}", "x")
        sub2, got = await subscribe(broker, [fresh, crowd], position)
        assert not sub2.reset
        assert [frame.id for frame in got.frames] == ids
        sub2.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_unparseable_id_is_treated_as_too_old(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        await broker.publish("u", "x")
        for bad in ("garbage", "", "99999999999999999999999999-1", "-", "0-0-0"):
            sub, got = await subscribe(broker, ["u"], bad)
            assert sub.reset, bad
            assert got.frames == []
            sub.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_unsubscribe_stops_delivery(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        sub, got = await subscribe(broker, ["gone"])
        keep, kept = await subscribe(broker, ["gone"])
        await broker.publish("gone", "1")
        await wait_until(lambda: len(got.frames) == 1 and len(kept.frames) == 1, TIMEOUT)
        sub.close()
        sub.close()
        await broker.publish("gone", "2")
        await wait_until(lambda: len(kept.frames) == 2, TIMEOUT)
        assert got.data == ["1"]
        keep.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_bad_input_is_a_typed_error(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        for channel in ("", "has space", "x" * 201, "tab\t", "new\nline", "ü"):
            with pytest.raises(InvalidChannelError):
                await broker.publish(channel, "x")
            with pytest.raises(InvalidChannelError):
                await broker.subscribe([channel], Collector())
        with pytest.raises(InvalidChannelError):
            await broker.subscribe([], Collector())
        with pytest.raises(InvalidEventError):
            await broker.publish("ok", "x", event="bad\nname")
        with pytest.raises(InvalidEventError):
            await broker.publish("ok", "x", retry=-1)
        with pytest.raises(InvalidEventError):
            await broker.publish("ok", "x", retry=True)  # type: ignore[arg-type]
        with pytest.raises(InvalidEventError):
            broker.publish_threadsafe("ok", 5)  # type: ignore[arg-type]
        assert await broker.publish("ok", "still works")

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_fields_survive(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        sub, got = await subscribe(broker, ["f"])
        event_id = await broker.publish("f", "line1\r\nline2\rline3\n\u2028ü", event="e", retry=5)
        await wait_until(lambda: len(got.frames) == 1, TIMEOUT)
        assert got.events == [
            Event("line1\nline2\nline3\n\u2028ü", event="e", id=event_id, retry=5)
        ]
        sub.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_threadsafe_publish_from_a_pool(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        sub, got = await subscribe(broker, ["t"])
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(lambda n=n: broker.publish_threadsafe("t", str(n)).result(TIMEOUT))
                for n in range(100)
            ]
            ids = await asyncio.wait_for(
                asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), TIMEOUT
            )
        assert len(set(ids)) == 100
        await wait_until(lambda: len(got.frames) == 100, TIMEOUT)
        assert sorted(got.data, key=lambda d: int(d or 0)) == [str(n) for n in range(100)]
        keys = [broker.id_key(frame.id) for frame in got.frames]
        assert keys == sorted(keys)
        sub.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_two_brokers_share_events_and_history(self, make_broker: MakeBroker) -> None:
        one = await make_broker()
        two = await make_broker()
        sub, got = await subscribe(two, ["shared"])
        first = await one.publish("shared", "from one")
        await wait_until(lambda: got.data == ["from one"], TIMEOUT)
        assert got.frames[0].id == first
        sub.close()
        await one.publish("shared", "missed")
        sub2, got2 = await subscribe(two, ["shared"], first)
        await wait_until(lambda: got2.data == ["missed"], TIMEOUT)
        sub2.close()

    # ------------------------------------------------------------------ start positions

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_history_starts_with_the_last_events_merged_in_id_order(
        self, make_broker: MakeBroker
    ) -> None:
        broker = await make_broker()
        ha, hb = self.together("ha", "hb")
        ids = [await broker.publish(ha if n % 2 else hb, str(n)) for n in range(7)]
        await broker.publish("hother", "not followed")
        got = Collector()
        sub = await broker.subscribe([ha, hb], got, history=4)
        assert not sub.reset
        assert [frame.id for frame in sub.replay] == ids[3:]
        assert broker.id_key(sub.position) < broker.id_key(ids[3])
        assert broker.id_key(sub.position) >= broker.id_key(ids[2])
        got.frames.extend(sub.replay)
        sub.start()
        live = await broker.publish(ha, "live")
        await wait_until(lambda: len(got.frames) == 5, TIMEOUT)
        assert [frame.id for frame in got.frames] == [*ids[3:], live]
        sub.close()
        # the position resumes exactly: the same events again, none before them
        again, got_again = await subscribe(broker, [ha, hb], sub.position)
        assert [frame.id for frame in got_again.frames] == [*ids[3:], live]
        again.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_history_beyond_what_is_retained_gets_what_is_retained(
        self, make_broker: MakeBroker
    ) -> None:
        broker = await make_broker(history_size=5)
        hkeep, hlong = self.together("hkeep", "hlong")
        early = await broker.publish(hkeep, "early")
        ids = [await broker.publish(hlong, str(n)) for n in range(10)]
        late = await broker.publish(hkeep, "late")
        got = Collector()
        sub = await broker.subscribe([hlong, hkeep], got, history=1000)
        assert not sub.reset
        # cut where hlong's history ends: "early" is older than that, so it is not replayed
        assert [frame.id for frame in sub.replay] == [*ids[5:], late]
        assert early not in [frame.id for frame in sub.replay]
        sub.close()
        empty = await broker.subscribe(["hnothing"], Collector(), history=10)
        assert not empty.reset
        assert empty.replay == []
        assert broker.id_key(empty.position) is not None
        empty.close()

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_last_event_id_takes_precedence_over_history(
        self, make_broker: MakeBroker
    ) -> None:
        broker = await make_broker()
        ids = [await broker.publish("hprec", str(n)) for n in range(6)]
        sub = await broker.subscribe(["hprec"], Collector(), ids[4], history=5)
        assert not sub.reset
        assert [frame.id for frame in sub.replay] == ids[5:]
        assert sub.position == ids[4]
        sub.close()
        with pytest.raises(ValueError):
            await broker.subscribe(["hprec"], Collector(), history=-1)

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_history_is_read_in_pages_while_publishing(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        channels = self.together("hpa", "hpb")
        await broker.publish(channels[0], "too early")
        ids = [await broker.publish(channels[n % 2], str(n)) for n in range(30)]
        got = Collector()
        sub = await broker.subscribe(channels, got, page_size=4, history=30, max_pending=1 << 20)
        replayed = list(sub.replay)
        live: list[str] = []
        while not sub.complete:
            live.append(await broker.publish(channels[len(live) % 2], f"live {len(live)}"))
            replayed.extend(await sub.next_page())
        got.frames.extend(replayed)
        sub.start()
        live.append(await broker.publish(channels[1], "after"))
        await wait_until(lambda: len(got.frames) >= len(ids) + len(live), TIMEOUT)
        assert [frame.id for frame in got.frames] == ids + live
        sub.close()

    # ------------------------------------------------------------------ presence

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_presence_counts_streams_and_identities_everywhere(
        self, make_broker: MakeBroker
    ) -> None:
        one = await make_broker()
        two = await make_broker()
        empty = Presence("who", 0, {})
        assert await one.presence("who") == empty
        subs = [
            await one.subscribe(["who", "other"], Collector(), identity="alice"),
            await one.subscribe(["who"], Collector(), identity="alice"),
            await one.subscribe(["who"], Collector(), identity="bob"),
            await one.subscribe(["who"], Collector()),
            await two.subscribe(["who"], Collector(), identity="alice"),
            await two.subscribe(["elsewhere"], Collector(), identity="carol"),
        ]
        expected = Presence("who", 5, {"alice": 3, "bob": 1})
        # a subscription counts as soon as subscribe returned, seen from every process
        assert await one.presence("who") == expected
        assert await two.presence("who") == expected
        assert await two.presence("other") == Presence("other", 1, {"alice": 1})
        subs[0].close()
        subs[0].close()  # idempotent: counted once
        subs[4].close()
        expected = Presence("who", 3, {"alice": 1, "bob": 1})

        async def seen(broker: Broker, want: Presence) -> bool:
            return await broker.presence(want.channel) == want

        await wait_until(lambda: seen(one, expected), TIMEOUT)
        await wait_until(lambda: seen(two, expected), TIMEOUT)
        await wait_until(lambda: seen(one, Presence("other", 0, {})), TIMEOUT)
        for sub in subs:
            sub.close()
        await wait_until(lambda: seen(two, empty), TIMEOUT)
        assert expected.as_json() == {
            "channel": "who",
            "subscribers": 3,
            "users": {"alice": 1, "bob": 1},
            "announced": [],
        }

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_join_and_leave_once_per_user_across_processes(
        self, make_broker: MakeBroker
    ) -> None:
        one = await make_broker()
        two = await make_broker()
        _, watcher = await subscribe(one, ["presence:jl"])

        async def tab(broker: Broker, user: str) -> Subscription:
            return await broker.subscribe(
                ["jl"], Collector(), identity=user, announce=["jl"], grace=0.3
            )

        def said() -> list[tuple[str | None, str | None]]:
            return [(e.event, json.loads(e.data or "")["user"]) for e in watcher.events]

        alice = [await tab(one, "alice"), await tab(two, "alice"), await tab(one, "alice")]
        await wait_until(lambda: said() == [("join", "alice")], TIMEOUT)
        bob = await tab(two, "bob")
        await wait_until(lambda: len(said()) == 2, TIMEOUT)
        bob.close()
        bob = await tab(one, "bob")  # back within the grace period: no leave, no join
        alice[0].close()
        alice[1].close()  # alice still has a tab
        alice[2].close()
        await wait_until(lambda: len(said()) >= 3, TIMEOUT)
        assert said() == [("join", "alice"), ("join", "bob"), ("leave", "alice")]
        assert json.loads(watcher.events[0].data or "") == {"channel": "jl", "user": "alice"}
        # resumable like any channel: its history is the latest joins and leaves
        late = await one.subscribe(["presence:jl"], Collector(), history=2)
        assert [frame.id for frame in late.replay] == [f.id for f in watcher.frames[1:]]
        late.close()
        bob.close()
        await wait_until(lambda: len(said()) == 4, TIMEOUT)
        assert said()[-1] == ("leave", "bob")

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_a_close_without_grace_is_a_leave_at_once(self, make_broker: MakeBroker) -> None:
        one = await make_broker()
        two = await make_broker()
        _, watcher = await subscribe(one, ["presence:now"])

        async def tab(broker: Broker, user: str) -> Subscription:
            return await broker.subscribe(
                ["now"], Collector(), identity=user, announce=["now"], grace=3600
            )

        def said() -> list[tuple[str | None, str | None]]:
            return [(e.event, json.loads(e.data or "")["user"]) for e in watcher.events]

        ada = await tab(two, "ada")
        kim = await tab(one, "kim")
        await wait_until(lambda: len(said()) == 2, TIMEOUT)
        kim_again = await tab(two, "kim")
        with pytest.raises(InvalidArgumentError):
            kim.close(grace=-1)
        assert not kim.closed
        kim.close(grace=0)  # kim still has a tab: no leave
        ada.close(grace=0)  # ada's last: her leave now, not in an hour
        await wait_until(lambda: len(said()) >= 3, TIMEOUT)
        kim_again.close(grace=0)
        await wait_until(lambda: len(said()) >= 4, TIMEOUT)
        assert sorted(said()[:2]) == [("join", "ada"), ("join", "kim")]
        assert said()[2:] == [("leave", "ada"), ("leave", "kim")]
        lou = await tab(two, "lou")
        await wait_until(lambda: len(said()) >= 5, TIMEOUT)
        lou.close()  # a lost connection: the leave waits an hour ...
        lou.close(grace=0)  # ... until the user says they left
        await wait_until(lambda: len(said()) >= 6, TIMEOUT)
        assert said()[4:] == [("join", "lou"), ("leave", "lou")]

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_announced_is_who_join_and_leave_say_is_here(
        self, make_broker: MakeBroker
    ) -> None:
        """`Presence.announced`: joined and not left yet, seen from every process, including a
        user whose only stream closed and who may still come back within the grace period."""
        one = await make_broker()
        two = await make_broker()
        _, watcher = await subscribe(one, ["presence:ann"])

        def said() -> list[tuple[str | None, str | None]]:
            return [(e.event, json.loads(e.data or "")["user"]) for e in watcher.events]

        async def seen(broker: Broker, streams: int, announced: set[str]) -> bool:
            found = await broker.presence("ann")
            return found.subscribers == streams and found.announced == announced

        assert (await one.presence("ann")).announced == frozenset()
        ada = await two.subscribe(
            ["ann"], Collector(), identity="ada", announce=["ann"], grace=3600
        )
        kim = await one.subscribe(
            ["ann"], Collector(), identity="kim", announce=["ann"], grace=3600
        )
        quiet = await one.subscribe(["ann"], Collector(), identity="lou")  # never announced
        await wait_until(lambda: len(said()) == 2, TIMEOUT)
        for broker in (one, two):
            assert await seen(broker, 3, {"ada", "kim"})
        ada.close()  # a lost connection: her stream is gone, her leave waits for the grace
        for broker in (one, two):
            await wait_until(lambda broker=broker: seen(broker, 2, {"ada", "kim"}), TIMEOUT)
        found = await one.presence("ann")
        assert dict(found.users) == {"kim": 1, "lou": 1}
        assert found.as_json()["announced"] == ["ada", "kim"]
        ada.close(grace=0)  # she said she left: the leave now, and she is no longer announced
        await wait_until(lambda: len(said()) == 3, TIMEOUT)
        assert said()[-1] == ("leave", "ada")
        for broker in (one, two):
            await wait_until(lambda broker=broker: seen(broker, 2, {"kim"}), TIMEOUT)
        kim.close(grace=0)
        quiet.close()
        for broker in (one, two):
            await wait_until(lambda broker=broker: seen(broker, 0, set()), TIMEOUT)

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_presence_refuses_bad_input(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        for identity in ["", "x" * 201, "tab\there", "line\n"]:
            with pytest.raises(InvalidArgumentError):
                await broker.subscribe(["bad-identity"], Collector(), identity=identity)
        assert await broker.presence("bad-identity") == Presence("bad-identity", 0, {})
        with pytest.raises(InvalidChannelError):
            await broker.presence("has space")

    @pytest.mark.gen_test(timeout=TIMEOUT)
    async def test_close_is_idempotent_and_final(self, make_broker: MakeBroker) -> None:
        broker = await make_broker()
        await broker.close()
        await broker.close()
        assert broker.closed
