"""Follow-ups of issue 12 on the Redis backend: gaps that were still silent, and the durable flag.

Real redis-server processes throughout; ``tornado-sse serve --redis`` as a subprocess where the
command line is what is under test.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.broker_contract import subscribe
from tests.helpers import wait_until
from tests.redis_server import RedisServer
from tests.test_redis_loss import assert_gap, hub, publish_when_up
from tests.test_redis_serve import TOKEN, Hub
from tornado_sse.broker.redis import RedisBroker
from tornado_sse.cli import main
from tornado_sse.protocol import Event

TIMEOUT = 30
WAIT = 15


@pytest.fixture
def hubs() -> Iterator[list[RedisBroker]]:
    """Brokers made by `tests.test_redis_loss.hub`, closed by the test."""
    made: list[RedisBroker] = []
    yield made
    assert all(broker.closed for broker in made), "close the brokers in the test"


def told(events: list[Event]) -> list[tuple[str | None, str]]:
    """``(event name, data)`` of the events a stream delivered (not its id-only event)."""
    return [(e.event, e.data or "") for e in events if e.data or e.event]


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "default"])
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_serve_redis_durable_keeps_streams_across_a_restart(
    tmp_path: Path, durable: bool
) -> None:
    # Redis fsyncs every write (appendfsync always) and restarts with all of them. Declared
    # durable, the hub carries on: live streams and resumes get every event, no stream-reset.
    # By default the restart is taken as a possible loss: one stream-reset each.
    with RedisServer(tmp_path, persist=True) as server:
        flags = ["--redis-durable"] if durable else []
        # --drain 0: stopped with its streams open, it waited out the default 2 s window
        hub = Hub(tmp_path / "hub.log", server.url, *flags, "--drain", "0")
        try:
            hub.wait_healthy()
            e1 = hub.publish("c", "e1")
            live = await hub.stream("channel=c")
            hub.publish("c", "e2")
            await live.read_until(lambda s: [e.data for e in s.events][-1:] == ["e2"])

            server.restart()
            if not durable:
                await live.read_until(lambda s: any(e.event == "stream-reset" for e in s.events))

            def publish_e3() -> bool:
                return hub.post("c", "e3").status_code == 202

            await wait_until(publish_e3, WAIT, interval=0.05)
            await live.read_until(lambda s: [e.data for e in s.events][-1:] == ["e3"])
            await wait_until(lambda: hub.health() == 200, WAIT)
            resumed = await hub.stream("channel=c", headers={"Last-Event-ID": e1})
            # durable: e2 and e3; by default: stream-reset at the new incarnation's start, then
            # what it published since (e3), which arrives in the same read or a later one
            await resumed.read_until(lambda s: told(s.events)[-1:] == [(None, "e3")])
            resumed.close()
            live.close()
            if durable:
                assert told(live.events) == [(None, "e2"), (None, "e3")]
                assert told(resumed.events) == [(None, "e2"), (None, "e3")]
            else:
                assert [name for name, _ in told(live.events)] == [None, "stream-reset", None]
                assert [name for name, _ in told(resumed.events)] == ["stream-reset", None]
        finally:
            hub.stop()


def test_serve_redis_durable_needs_redis() -> None:
    result = CliRunner().invoke(
        main, ["serve", "--redis-durable"], env={"TORNADO_SSE_TOKEN": TOKEN}
    )
    assert result.exit_code == 2, result.output
    assert "--redis-durable needs --redis" in result.output


# ---------------------------------------------------------------------- a channel's stream lost


@pytest.mark.parametrize("kind", ["del", "restore"])
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_lost_stream_is_a_gap_for_resumes(
    tmp_path: Path, kind: str, hubs: list[RedisBroker]
) -> None:
    # One channel's stream goes (DEL, as eviction would do) or goes back (RESTORE of an older
    # DUMP); nothing else changes. The next event on it must not hide what was lost.
    with RedisServer(tmp_path) as server:
        a, b = hub(server.url, hubs), hub(server.url, hubs, index_threshold=0)
        try:
            await a.start()
            await b.start()
            o0 = await a.publish("other", "o0")
            a1 = await a.publish("c", "a1")
            dump = server.call("DUMP", "loss:s:c")
            a2 = await a.publish("c", "a2")
            a3 = await a.publish("c", "a3")
            await a.publish("other", "o1")
            if kind == "del":
                assert server.call("DEL", "loss:s:c") == 1
            else:
                assert server.call("RESTORE", "loss:s:c", 0, dump, "REPLACE")

            async def resume_from_a3_is_exact(broker: RedisBroker, data: list[str]) -> None:
                # a3 was the newest event the stream had: nothing is missing after it
                sub, got = await subscribe(broker, ["c"], a3)
                sub.close()
                assert not sub.reset and got.data == data

            # Before anything else is published on the channel, and after.
            for broker in (b, a):
                for lost in (o0, a1, a2):
                    await assert_gap(broker, lost)
                await resume_from_a3_is_exact(broker, [])
            await b.publish("c", "a4")  # the hub that did not publish a2 and a3, first
            for broker in (b, a):
                for lost in (o0, a1, a2):
                    await assert_gap(broker, lost)
                await resume_from_a3_is_exact(broker, ["a4"])
        finally:
            await a.close()
            await b.close()


@pytest.mark.parametrize("index_threshold", [32, 0], ids=["streams", "index"])
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_deleted_stream_resets_live_streams(tmp_path: Path, index_threshold: int) -> None:
    # A hub publishes; broker b follows the channel live. The test's blocking calls (httpx,
    # redis-py) hold b's event loop: b's reader cannot read a2 or a3 before they are deleted.
    with RedisServer(tmp_path) as server:
        publisher = Hub(tmp_path / "hub.log", server.url)
        b = RedisBroker(server.url, timeout=1.0, read_block=0.5, index_threshold=index_threshold)
        try:
            publisher.wait_healthy()
            live, got = await subscribe(b, ["c"])
            publisher.publish("c", "a1")
            await wait_until(lambda: got.data == ["a1"], WAIT)
            publisher.publish("c", "a2")
            publisher.publish("c", "a3")
            assert server.call("DEL", "tornado_sse:s:c") == 1
            publisher.publish("c", "a4")
            await wait_until(lambda: got.data[-1:] == ["a4"], WAIT)
            names = [e.event for e in got.events]
            assert names.count("stream-reset") == 1, got.data
            at = names.index("stream-reset")
            before = [e.data for e in got.events[:at]]
            assert before == ["a1", "a2", "a3"][: len(before)] and len(before) < 3
            assert [e.data for e in got.events[at + 1 :]] == ["a4"]
            reset_id = json.loads(got.events[at].data or "")["id"]
            live.close()
            sub, resumed = await subscribe(b, ["c"], reset_id)
            sub.close()
            assert not sub.reset and resumed.data == ["a4"]
        finally:
            await b.close()
            publisher.stop()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_evicted_stream_is_never_a_silent_gap(
    tmp_path: Path, hubs: list[RedisBroker], caplog: pytest.LogCaptureFixture
) -> None:
    # Redis evicts keys under memory pressure (allkeys-lru): the idle channel's stream goes.
    with RedisServer(tmp_path, args=["--maxmemory-policy", "allkeys-lru"]) as server:
        a = hub(server.url, hubs, index_length=100)
        try:
            with caplog.at_level(logging.WARNING, logger="tornado_sse.redis"):
                await a.start()
            assert "maxmemory-policy allkeys-lru" in caplog.text
            a1 = await a.publish("c", "a1")
            await a.publish("c", "a2")
            await a.publish("c", "a3")
            used = int(server.info("memory")["used_memory"])
            server.call("CONFIG", "SET", "maxmemory", used + 512 * 1024)
            filler = "x" * 2000
            for n in range(5000):
                if not server.call("EXISTS", "loss:s:c"):
                    break
                await a.publish(f"f{n}", filler)
            else:
                raise AssertionError("Redis did not evict the idle stream")
            assert int(server.info("stats")["evicted_keys"]) > 0
            server.call("CONFIG", "SET", "maxmemory", 0)
            await publish_when_up(a, "a4")
            await assert_gap(a, a1)
        finally:
            await a.close()


# ---------------------------------------------------------------------- a rollback in place


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_rollback_without_restart_is_a_gap_for_resumes(
    tmp_path: Path, hubs: list[RedisBroker]
) -> None:
    # DEBUG RELOAD NOSAVE: the same Redis process, the same connections, its data back to the
    # last SAVE. Nothing is missing and no run id changed: only a hub that saw e2 or e3 knows.
    # Readers block for long here, so that the resume, not a reader, is first to look.
    with RedisServer(tmp_path, args=["--enable-debug-command", "local"]) as server:
        options = {"key_prefix": "loss:", "timeout": 1.0, "read_block": TIMEOUT}
        a = RedisBroker(server.url, **options)  # type: ignore[arg-type]
        b = RedisBroker(server.url, index_threshold=0, **options)  # type: ignore[arg-type]
        hubs.extend([a, b])
        try:
            await a.start()
            live, got = await subscribe(b, ["c"])  # b only reads
            e1 = await a.publish("c", "e1")
            assert server.call("SAVE")
            await a.publish("c", "e2")
            await a.publish("c", "e3")
            await wait_until(lambda: got.data == ["e1", "e2", "e3"], WAIT)
            assert server.call("DEBUG", "RELOAD", "NOSAVE")
            assert server.call("GET", "loss:last") == e1.encode()
            await assert_gap(b, e1)  # b saw e3 as `last`
            await assert_gap(a, e1)
            live.close()
        finally:
            await a.close()
            await b.close()
