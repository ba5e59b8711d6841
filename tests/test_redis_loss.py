"""`RedisBroker` when Redis loses acknowledged writes: never a silent gap (issue 12, item 1).

Each test runs its own redis-server processes (and a real replica for the failover), two
`RedisBroker` objects on them stand for two hubs (two ``tornado-sse serve --redis`` processes in
the black-box reproduction of the issue), and the events that Redis loses are published
by hub ``a`` only: hub ``b``, which never saw them, publishes first after the loss, so that
detecting it cannot rest on the hub that knew the lost ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker_contract import Collector, subscribe
from tests.helpers import wait_until
from tests.redis_server import RedisServer
from tests.test_redis_serve import Hub
from tornado_sse.broker.redis import RedisBroker
from tornado_sse.errors import BrokerUnavailableError

TIMEOUT = 30
WAIT = 15


class Loss:
    """One way for Redis to lose writes it acknowledged, on real redis-server processes.

    :meth:`checkpoint` marks what Redis will keep; :meth:`lose` loses what came after it.
    Clients always connect to :attr:`url` (the failover moves the replica onto that port).
    """

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.primary = RedisServer(directory / "primary")
        self.replica: RedisServer | None = None
        if kind == "failover":
            self.replica = RedisServer(directory / "replica")
            # the replica's first sync at once (Redis waits 5 s for more replicas to share it)
            self.primary.args = ["--repl-diskless-sync-delay", "0"]

    def __enter__(self) -> Loss:
        self.primary.directory.mkdir()
        self.primary.start()
        if self.replica is not None:
            self.replica.directory.mkdir()
            self.replica.args = ["--replicaof", "127.0.0.1", str(self.primary.port)]
            self.replica.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.primary.stop()
        if self.replica is not None:
            self.replica.stop()

    @property
    def url(self) -> str:
        return self.primary.url

    def checkpoint(self) -> None:
        if self.kind == "older-snapshot":
            assert self.primary.call("SAVE")
        elif self.replica is not None:
            self.replica.wait_in_sync(self.primary)
            self.replica.detach()  # the writes from here on never reach it

    def lose(self) -> None:
        if self.kind in ("older-snapshot", "restart-empty"):
            # SIGKILL is SHUTDOWN NOSAVE: the restart loads the last SAVE, or nothing.
            self.primary.kill()
            self.primary.start()
        elif self.kind == "flushall":
            self.primary.call("FLUSHALL")
        else:
            assert self.replica is not None
            port = self.primary.port
            self.primary.kill()
            self.replica.promote(port)


LOSSES = pytest.mark.parametrize(
    "kind", ["older-snapshot", "restart-empty", "flushall", "failover"]
)


@pytest.fixture
def hubs() -> Iterator[list[RedisBroker]]:
    """Brokers made by `hub`, closed after the test."""
    made: list[RedisBroker] = []
    yield made
    assert all(broker.closed for broker in made), "close the brokers in the test"


def hub(url: str, made: list[RedisBroker], **options: object) -> RedisBroker:
    broker = RedisBroker(
        url,
        key_prefix="loss:",
        timeout=1.0,
        read_block=0.5,
        reconnect_backoff=(0.05, 0.2),
        **options,  # type: ignore[arg-type]
    )
    made.append(broker)
    return broker


async def publish_when_up(broker: RedisBroker, data: str) -> str:
    """Publish *data* on channel ``c`` as soon as Redis answers (bounded)."""

    async def attempt() -> str | None:
        try:
            return await broker.publish("c", data)
        except BrokerUnavailableError:
            return None

    event_id: str = await wait_until(attempt, WAIT, interval=0.02)
    return event_id


def resets(got: Collector) -> list[dict[str, str]]:
    return [json.loads(e.data or "") for e in got.events if e.event == "stream-reset"]


async def assert_gap(broker: RedisBroker, last_event_id: str) -> None:
    """A client resuming on *broker* from *last_event_id* is told of the gap."""
    await wait_until(lambda: broker.healthy, WAIT)
    sub, got = await subscribe(broker, ["c"], last_event_id)
    sub.close()
    assert sub.reset, f"resume from {last_event_id} got {got.data} and no stream-reset"


def assert_live_reset(broker: RedisBroker, got: Collector, before: list[str], after: str) -> str:
    """A live stream got *before*, then a stream-reset, then nothing older than the reset,
    and *after*. Returns the reset's id."""
    events = got.events
    assert [e.data for e in events[: len(before)]] == before
    assert events[len(before)].event == "stream-reset", [e.data for e in events]
    reset = json.loads(events[len(before)].data or "")
    assert reset["reason"] == "broker"
    reset_key = broker.id_key(reset["id"])
    rest = events[len(before) + 1 :]
    assert [e.event for e in rest] == [None] * len(rest), "one reset is enough"
    assert all(broker.id_key(e.id or "") > reset_key for e in rest)  # type: ignore[operator]
    assert rest and rest[-1].data == after
    return str(reset["id"])


@LOSSES
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_lost_writes_reset_resumes_and_live_streams(
    tmp_path: Path, kind: str, hubs: list[RedisBroker]
) -> None:
    with Loss(kind, tmp_path) as redis:
        # a names every followed stream in its XREAD; b reads through the index
        a, b = hub(redis.url, hubs), hub(redis.url, hubs, index_threshold=0)
        try:
            await a.start()
            await b.start()
            live_a, got_a = await subscribe(a, ["c"])
            live_b, got_b = await subscribe(b, ["c"])
            await a.publish("c", "e1")
            redis.checkpoint()
            e2 = await a.publish("c", "e2")
            e3 = await a.publish("c", "e3")
            await wait_until(lambda: len(got_a.frames) == len(got_b.frames) == 3, WAIT)

            redis.lose()
            e4 = await publish_when_up(b, "e4")  # the hub that never saw e2 and e3, first
            assert b.id_key(e4) > b.id_key(e3)

            # Resuming from inside what Redis lost, on either hub: stream-reset, never a
            # replay that skips e3 (or e2 and e3) silently.
            for broker in (b, a):
                for lost in (e2, e3):
                    await assert_gap(broker, lost)
            # Live streams on both hubs are told before any later event reaches them.
            await b.publish("c", "e5")
            for broker, got in ((a, got_a), (b, got_b)):
                await wait_until(lambda got=got: got.data[-1:] == ["e5"], WAIT)
                reset_id = assert_live_reset(broker, got, ["e1", "e2", "e3"], "e5")
            # The reset's id is a place to resume from, without a gap.
            sub, got = await subscribe(a, ["c"], reset_id)
            sub.close()
            assert not sub.reset and got.data[-1:] == ["e5"]
            # A resume from inside the loss gets, after its reset, what the incarnation of the
            # data it reads has: e5, and e4 unless a later hub's check started another one.
            for broker in (a, b):
                sub, got = await subscribe(broker, ["c"], e2)
                sub.close()
                assert sub.reset and got.data in (["e4", "e5"], ["e5"]), got.data
            live_a.close()
            live_b.close()
        finally:
            await a.close()
            await b.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_flushall_resets_live_streams_without_a_later_publish(
    tmp_path: Path, hubs: list[RedisBroker]
) -> None:
    with Loss("flushall", tmp_path) as redis:
        a = hub(redis.url, hubs)  # names every followed stream in its XREAD
        b = hub(redis.url, hubs, index_threshold=0)  # reads through the index
        try:
            live_a, got_a = await subscribe(a, ["c"])
            live_b, got_b = await subscribe(b, ["c"])
            await a.publish("c", "e1")
            await wait_until(lambda: len(got_a.frames) == len(got_b.frames) == 1, WAIT)
            redis.lose()
            # Nobody publishes: each reader notices within a blocking read.
            await wait_until(lambda: resets(got_a) and resets(got_b), WAIT)
            await a.publish("c", "e2")
            for broker, got in ((a, got_a), (b, got_b)):
                await wait_until(lambda got=got: got.data[-1:] == ["e2"], WAIT)
                assert_live_reset(broker, got, ["e1"], "e2")
            live_a.close()
            live_b.close()
        finally:
            await a.close()
            await b.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_restart_with_all_data_is_a_reset_unless_durable(
    tmp_path: Path, hubs: list[RedisBroker]
) -> None:
    # Redis fsyncs every write and keeps them all; not declared durable, a restart is still
    # taken as a possible loss: nothing tells this Redis from one that lost the last writes.
    with RedisServer(tmp_path, persist=True) as server:
        a, b = hub(server.url, hubs), hub(server.url, hubs)
        try:
            live, got = await subscribe(b, ["c"])
            e1 = await a.publish("c", "e1")
            await wait_until(lambda: got.data == ["e1"], WAIT)
            server.restart()
            await publish_when_up(a, "e2")
            await wait_until(lambda: resets(got), WAIT)
            await a.publish("c", "e3")
            await wait_until(lambda: got.data[-1:] == ["e3"], WAIT)
            assert_live_reset(b, got, ["e1"], "e3")
            await assert_gap(b, e1)
            live.close()
        finally:
            await a.close()
            await b.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_durable_still_takes_evidence_of_a_loss(
    tmp_path: Path, hubs: list[RedisBroker]
) -> None:
    # Declared durable, yet restored from an older snapshot: hub a saw ids that Redis no longer
    # has, and says so as soon as it reconnects; hub b, which saw none, is then told too.
    with Loss("older-snapshot", tmp_path) as redis:
        a, b = hub(redis.url, hubs, durable=True), hub(redis.url, hubs, durable=True)
        try:
            await b.start()
            live, got = await subscribe(a, ["c"])
            await a.publish("c", "e1")
            redis.checkpoint()
            e2 = await a.publish("c", "e2")
            await wait_until(lambda: len(got.frames) == 2, WAIT)
            redis.lose()
            await wait_until(lambda: resets(got), WAIT)
            await publish_when_up(b, "e3")
            await assert_gap(b, e2)
            await wait_until(lambda: got.data[-1:] == ["e3"], WAIT)
            assert_live_reset(a, got, ["e1", "e2"], "e3")
            live.close()
        finally:
            await a.close()
            await b.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_ids_after_a_loss_sort_above_ids_a_hub_saw(
    tmp_path: Path, hubs: list[RedisBroker]
) -> None:
    # The old Redis's clock ran an hour ahead (its `last` says so); the new one starts from its
    # own clock, below the ids hub a saw. Once hub a is back in touch, every id issued sorts
    # above everything issued before, and a resume from before is a gap.
    with Loss("restart-empty", tmp_path) as redis:
        a, b = hub(redis.url, hubs), hub(redis.url, hubs)
        try:
            ahead = int(time.time() * 1000) + 3_600_000
            redis.primary.call("SET", "loss:last", f"{ahead}-0")
            redis.primary.call("SET", "loss:floor", "0-0")
            e1 = await a.publish("c", "e1")
            assert a.id_key(e1) > (ahead, 0)
            redis.lose()
            e2 = await publish_when_up(b, "e2")
            assert b.id_key(e2) < b.id_key(e1)  # b cannot know better
            e3 = await publish_when_up(a, "e3")
            assert a.id_key(e3) > a.id_key(e1)
            e4 = await b.publish("c", "e4")
            assert b.id_key(e4) > b.id_key(e3)
            for broker in (a, b):
                await assert_gap(broker, e1)
                await assert_gap(broker, e2)
            await wait_until(lambda: b.healthy, WAIT)
            sub, got = await subscribe(b, ["c"], e3)
            sub.close()
            assert not sub.reset and got.data == ["e4"]
        finally:
            await a.close()
            await b.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_older_snapshot_through_two_real_hubs(tmp_path: Path) -> None:
    # The reproduction, black-box: `tornado-sse serve --redis` twice, e2 and e3 published
    # (202) on hub a, Redis restored from the snapshot before them, e4 published on hub b first.
    with Loss("older-snapshot", tmp_path) as redis:
        # --drain 0: stopped with streams open, each waited out the default 2 s window
        a, b = (Hub(tmp_path / f"hub-{name}.log", redis.url, "--drain", "0") for name in "ab")
        try:
            a.wait_healthy()
            b.wait_healthy()
            a.publish("c", "e1")
            redis.checkpoint()
            e2 = a.publish("c", "e2")
            e3 = a.publish("c", "e3")
            redis.lose()

            def publish_e4() -> bool:
                return b.post("c", "e4").status_code == 202

            await wait_until(publish_e4, WAIT, interval=0.05)
            for hub_ in (b, a):
                await wait_until(lambda hub_=hub_: hub_.health() == 200, WAIT)
                for lost in (e2, e3):
                    resumed = await hub_.stream("channel=c", headers={"Last-Event-ID": lost})
                    await resumed.read_until(lambda s: len(s.events) >= 1)
                    resumed.close()
                    assert resumed.events[0].event == "stream-reset", resumed.events
        finally:
            a.stop()
            b.stop()
