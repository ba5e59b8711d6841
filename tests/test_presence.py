"""Presence (issue 14) through real parts: streams of an `EventStreamHandler` on loopback, worker
processes behind a bridge hub killed with ``kill -9``, a hub failover, and a Redis host that
vanishes. What every backend shares is in tests/broker_contract.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tornado.web
from tornado.ioloop import IOLoop

from tests.broker_contract import Collector
from tests.helpers import TLS, RawStream, wait_until
from tests.redis_server import redis_prefix, redis_server, redis_url  # noqa: F401
from tests.test_auth_hub import backend_url  # noqa: F401
from tests.test_bridge_worker import Worker
from tests.test_server import AUTH, start_hub
from tornado_sse import ConnectionSet, EventStreamHandler, InProcessBroker
from tornado_sse.auth import TokenVerifier, create_token
from tornado_sse.broker.bridge import BridgeHub
from tornado_sse.broker.presence import Presence
from tornado_sse.hub.access import HubAccess
from tornado_sse.hub.presence import PresenceHandler

TIMEOUT = 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "a test secret that is long enough for HS256 ......"
verifier = TokenVerifier(secret=SECRET)
MASTER = "the hub's master token"


class Named(EventStreamHandler):
    """Who the user is comes from a header (as a login cookie would say)."""

    def get_current_user(self) -> str | None:
        return self.request.headers.get("X-User")


class Tokens(EventStreamHandler):
    """A verified token: the default identity is its ``sub``."""

    def get_current_user(self) -> Any:
        return verifier.authenticate(self)

    def check_channel(self, channel: str) -> bool:
        return bool(self.current_user.may_subscribe(channel))


class Room(Named):
    """May follow room/1 only (and so its companion channel, presence:room/1)."""

    def check_channel(self, channel: str) -> bool:
        return channel == "room/1"


class Leaving(Room):
    """Streams the test closes itself (by ``X-User``); their grace period, an hour on this
    route only, would hide any leave but one at once."""

    presence_grace = 3600.0  # type: ignore[assignment]

    def open(self) -> None:
        self.settings["open_streams"][self.request.headers["X-User"]] = self


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker()


@pytest.fixture
def connections() -> ConnectionSet:
    return ConnectionSet(prune_interval=0.05)


@pytest.fixture
def app(broker: InProcessBroker, connections: ConnectionSet) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/named", Named),
            (r"/tokens", Tokens),
            (r"/room", Room),
            (r"/leaving", Leaving),
            (
                r"/presence",
                PresenceHandler,
                {"broker": broker, "access": HubAccess(master_token=MASTER, verifier=verifier)},
            ),
        ],
        sse_broker=broker,
        sse_connections=connections,
        sse_heartbeat_interval=0.01,
        sse_stall_timeout=0.3,
        sse_max_buffer_size=1 << 24,
        sse_presence=["room/*"],
        sse_presence_grace=1.0,
        open_streams={},
    )


async def opened(port: int, path: str, headers: dict[str, str] | None = None) -> RawStream:
    stream = await RawStream.open(port, path, headers)
    assert stream.status == 200
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    return stream


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_streams_count_once_open_and_stop_when_they_close(
    port: int, broker: InProcessBroker
) -> None:
    tabs = [await opened(port, "/named?channel=room", {"X-User": "ada"}) for _ in range(3)]
    # counted as soon as the stream is open: nothing to wait for
    assert await broker.presence("room") == Presence("room", 3, {"ada": 3})
    anonymous = await opened(port, "/named?channel=room&channel=lobby")
    assert await broker.presence("room") == Presence("room", 4, {"ada": 3})
    assert await broker.presence("lobby") == Presence("lobby", 1, {})
    for tab in tabs:
        tab.close()
    anonymous.close()
    await wait_until(lambda: _is(broker, Presence("room", 0, {})), TIMEOUT)
    assert await broker.presence("lobby") == Presence("lobby", 0, {})


async def _is(broker: Any, want: Presence) -> bool:
    return bool(await broker.presence(want.channel) == want)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_identity_is_the_tokens_sub_and_bad_identities_are_400(
    port: int, broker: InProcessBroker
) -> None:
    token = create_token(SECRET, subject="alice", subscribe=["room/*"], ttl=600)
    stream = await opened(port, "/tokens?channel=room/1", {"Authorization": f"Bearer {token}"})
    alice = Presence("room/1", 1, {"alice": 1}, frozenset({"alice"}))  # room/* has join/leave
    await wait_until(lambda: _is(broker, alice), TIMEOUT)
    stream.close()
    for user in ["x" * 201, "tab\there"]:
        refused = await RawStream.open(port, "/named?channel=room", {"X-User": user})
        assert refused.status == 400
        await refused.read_to_end()
        assert b"invalid identity" in refused.raw
        refused.close()
    assert await broker.presence("room") == Presence("room", 0, {})


@pytest.mark.gen_test(timeout=30)
async def test_a_half_open_peer_stops_counting_when_it_is_pruned(
    port: int, broker: InProcessBroker, connections: ConnectionSet
) -> None:
    gone = await RawStream.open(port, "/named?channel=v", {"X-User": "ghost"}, rcvbuf=4096)
    await wait_until(lambda: len(connections) == 1, TIMEOUT)
    assert await broker.presence("v") == Presence("v", 1, {"ghost": 1})
    for _ in range(20):  # the client stops reading: output stays pending until the stall timeout
        await broker.publish("v", "y" * 100_000)
    await wait_until(lambda: len(connections) == 0, TIMEOUT)
    assert await broker.presence("v") == Presence("v", 0, {})
    gone.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_join_and_leave_events_of_a_user_with_three_tabs(port: int) -> None:
    watcher = await opened(port, "/room?channel=presence:room/1")
    for path, status in [
        ("/room?channel=presence:room/2", 403),  # granted with the channel it describes
        ("/room?channel=presence:other", 403),  # not a presence channel: checked as is
    ]:
        refused = await RawStream.open(port, path)
        assert refused.status == status, path
        refused.close()
    tabs = [await opened(port, "/room?channel=room/1", {"X-User": "ada"}) for _ in range(3)]
    await watcher.events_count(1)
    for tab in tabs:
        tab.close()
    # a reconnect within the grace period (1 s) is no leave and join
    again = await opened(port, "/room?channel=room/1", {"X-User": "ada"})
    again.close()  # then gone for good: one leave, after the grace period
    await watcher.events_count(2)
    said = [(event.event, json.loads(event.data or "")) for event in watcher.events]
    assert said == [
        ("join", {"channel": "room/1", "user": "ada"}),
        ("leave", {"channel": "room/1", "user": "ada"}),
    ]
    # resumable like any channel, and a newcomer can start with the latest joins and leaves
    late = await opened(port, "/room?channel=presence:room/1&history=5")
    await late.events_count(2)
    assert [event.id for event in late.events] == [event.id for event in watcher.events]
    late.close()
    watcher.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_stream_closed_as_a_leave_is_a_leave_at_once(
    port: int, app: tornado.web.Application, broker: InProcessBroker
) -> None:
    watcher = await opened(port, "/room?channel=presence:room/1")
    streams: dict[str, Leaving] = app.settings["open_streams"]
    ada = await opened(port, "/leaving?channel=room/1", {"X-User": "ada"})
    bob = await opened(port, "/leaving?channel=room/1", {"X-User": "bob"})
    await watcher.events_count(2)
    await wait_until(lambda: len(streams) == 2, TIMEOUT)
    bob.close()  # a lost connection: the grace period (an hour) holds bob's leave
    # bob has no stream, and is still announced: for the watchers he never left
    here = Presence("room/1", 1, {"ada": 1}, frozenset({"ada", "bob"}))
    await wait_until(lambda: _is(broker, here), TIMEOUT)
    await streams["ada"].close(leave=True)  # the user left: no grace period
    await ada.read_to_end(TIMEOUT)
    await watcher.events_count(3)
    await streams["bob"].close(leave=True)  # bob says he left, after his connection ended
    await watcher.events_count(4)
    said = [(event.event, json.loads(event.data or "")["user"]) for event in watcher.events]
    assert said == [("join", "ada"), ("join", "bob"), ("leave", "ada"), ("leave", "bob")]
    watcher.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_get_presence_takes_the_master_token_or_a_token_granting_the_channel(
    port: int, broker: InProcessBroker
) -> None:
    tabs = [await opened(port, "/room?channel=room/1", {"X-User": "ada"}) for _ in range(2)]
    tabs.append(await opened(port, "/room?channel=room/1"))
    tabs.append(await opened(port, "/named?channel=lobby", {"X-User": "ada"}))
    # her join is decided once her first stream is open
    await wait_until(
        lambda: _is(broker, Presence("room/1", 3, {"ada": 2}, frozenset({"ada"}))), TIMEOUT
    )
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT)
    granted = create_token(SECRET, subject="reader", subscribe=["room/*"], ttl=600)
    other = create_token(SECRET, subject="reader", subscribe=["lobby"], ttl=600)
    try:
        for credentials in [MASTER, granted]:
            reply = await client.get(
                "/presence", params={"channel": "room/1"}, headers=bearer(credentials)
            )
            assert reply.status_code == 200, reply.text
            assert reply.json() == {
                "channel": "room/1",
                "subscribers": 3,
                "users": {"ada": 2},
                "announced": ["ada"],
            }
            assert reply.headers["cache-control"] == "no-store"
        # users only when identities are known; announced only with join and leave events
        reply = await client.get("/presence?channel=room/2", headers=bearer(MASTER))
        assert reply.json() == {"channel": "room/2", "subscribers": 0, "announced": []}
        reply = await client.get("/presence?channel=lobby", headers=bearer(MASTER))
        assert reply.json() == {"channel": "lobby", "subscribers": 1, "users": {"ada": 1}}
        for query, headers, status, message in [
            ("channel=room/1", {}, 401, "needs the hub's token"),
            ("channel=room/1", bearer("wrong"), 401, "token malformed"),
            ("channel=room/1", bearer(other), 403, "room/1"),
            ("channel=a%20b", bearer(MASTER), 400, "invalid channel"),
            ("channel=a&channel=b", bearer(MASTER), 400, "exactly one channel"),
            ("", bearer(MASTER), 400, "exactly one channel"),
        ]:
            reply = await client.get(f"/presence?{query}", headers=headers)
            assert reply.status_code == status, (query, reply.text)
            assert message in reply.json()["error"], reply.text
            if status == 401:
                assert reply.headers["www-authenticate"].startswith("Bearer")
    finally:
        await client.aclose()
        for tab in tabs:
            tab.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------- the bridge


@pytest.fixture
def sock_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="sse-presence-")  # mode 0700
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def workers(io_loop: IOLoop) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started

    async def stop_all() -> None:
        for worker in started:
            await worker.stop()

    io_loop.run_sync(stop_all)


async def seen_by(worker: Worker, channel: str, subscribers: int, users: dict[str, int]) -> bool:
    answer = await worker.call("presence", channel=channel)
    return bool((answer["subscribers"], answer["users"]) == (subscribers, users))


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_killed_worker_stops_counting_at_once(sock_dir: str, workers: list[Worker]) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path)
    await hub.start()
    try:
        for _ in range(2):
            workers.append(await Worker.start(path, "--no-takeover"))
        doomed, survivor = workers
        for n in range(2):
            await doomed.call("subscribe", name=f"d{n}", channels=["room"], identity="dora")
        await survivor.call("subscribe", name="s", channels=["room"], identity="sam")
        assert await seen_by(survivor, "room", 3, {"dora": 2, "sam": 1})
        assert hub.presence("room") == Presence("room", 3, {"dora": 2, "sam": 1})
        doomed.kill()
        await wait_until(lambda: hub.peer_count == 1, TIMEOUT)
        # dropped with the connection, not after a lease
        assert hub.presence("room") == Presence("room", 1, {"sam": 1})
        assert await seen_by(survivor, "room", 1, {"sam": 1})
    finally:
        await hub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_leave_at_once_keeps_the_grace_of_a_killed_worker(
    sock_dir: str, workers: list[Worker]
) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path)
    await hub.start()
    try:
        for _ in range(2):
            workers.append(await Worker.start(path, "--no-takeover"))
        leaver, doomed = workers
        await leaver.call("subscribe", name="w", channels=["presence:room"])
        tab = {"channels": ["room"], "announce": ["room"], "grace": 3600}
        await leaver.call("subscribe", name="a", identity="ada", **tab)
        await doomed.call("subscribe", name="d", identity="dora", **tab)

        async def said(count: int) -> list[tuple[str | None, str]]:
            events: list[list[Any]] = []

            async def enough() -> bool:
                events[:] = await leaver.events("w")
                return len(events) >= count

            await wait_until(enough, TIMEOUT)
            return [(e[1], json.loads(e[2])["user"] if e[1] else e[2]) for e in events]

        await said(2)
        await leaver.call("unsubscribe", name="a", grace=0)  # ada left: her leave now
        await said(3)
        doomed.kill()  # dora's connection is lost: her grace period (an hour) holds
        await wait_until(lambda: hub.peer_count == 1, TIMEOUT)
        await leaver.call("publish", channel="presence:room", data="after the kill")
        got = await said(4)
        assert sorted(got[:2]) == [("join", "ada"), ("join", "dora")]
        assert got[2:] == [("leave", "ada"), (None, "after the kill")]
    finally:
        await hub.close()


@pytest.mark.gen_test(timeout=60)
async def test_no_double_counting_across_a_hub_failover(
    sock_dir: str, workers: list[Worker]
) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    for _ in range(3):
        workers.append(await Worker.start(path))
    hub_worker, one, two = workers
    assert hub_worker.started_as_hub
    await hub_worker.call("subscribe", name="h", channels=["room"], identity="hugo")
    await one.call("subscribe", name="a", channels=["room"], identity="ann")
    await one.call("subscribe", name="b", channels=["room"], identity="ben")
    await two.call("subscribe", name="c", channels=["room"], identity="ann")
    assert await seen_by(two, "room", 4, {"ann": 2, "ben": 1, "hugo": 1})
    hub_worker.kill()
    # a survivor takes over; both write their tables to the new hub once, hugo's are gone
    want = {"ann": 2, "ben": 1}
    await wait_until(lambda: _quiet(seen_by(one, "room", 3, want)), TIMEOUT)
    assert await seen_by(two, "room", 3, want)
    hubs = [(await worker.call("stats"))["is_hub"] for worker in (one, two)]
    assert hubs.count(True) == 1
    await one.call("unsubscribe", name="b")
    await wait_until(lambda: _quiet(seen_by(two, "room", 2, {"ann": 2})), TIMEOUT)


@pytest.mark.gen_test(timeout=60)
async def test_a_new_hub_learns_who_is_announced_from_the_workers(
    sock_dir: str, workers: list[Worker]
) -> None:
    """The announced users die with the hub that decided them: the survivors announce their
    users to the new hub, so that it lists them and their leaves are still sent."""
    path = os.path.join(sock_dir, "hub.sock")
    for _ in range(3):
        workers.append(await Worker.start(path))
    hub_worker, one, two = workers
    assert hub_worker.started_as_hub
    await one.call("subscribe", name="w", channels=["presence:room"])
    tab = {"channels": ["room"], "announce": ["room"], "grace": 0.5}
    await hub_worker.call("subscribe", name="h", identity="hugo", **tab)
    await one.call("subscribe", name="a", identity="ann", **tab)
    await two.call("subscribe", name="b", identity="ben", **tab)

    async def last_said(want: tuple[str, str]) -> bool:
        events = await one.events("w")
        said = [(e[1], json.loads(e[2])["user"]) for e in events if e[1] in ("join", "leave")]
        return bool(said) and said[-1] == want

    async def announced(worker: Worker, want: list[str]) -> bool:
        return bool((await worker.call("presence", channel="room"))["announced"] == want)

    await wait_until(lambda: _quiet(announced(two, ["ann", "ben", "hugo"])), TIMEOUT)
    hub_worker.kill()
    # hugo's worker ran the hub: he is gone with it; the new hub announces ann and ben
    await wait_until(lambda: _quiet(announced(two, ["ann", "ben"])), TIMEOUT)
    assert await announced(one, ["ann", "ben"])
    await two.call("unsubscribe", name="b", grace=0)  # and ben's leave is sent
    await wait_until(lambda: _quiet(announced(one, ["ann"])), TIMEOUT)
    await wait_until(lambda: _quiet(last_said(("leave", "ben"))), TIMEOUT)


async def _quiet(check: Any) -> bool:
    """A check that may meet the bridge between two hubs: not there yet."""
    try:
        return bool(await check)
    except (AssertionError, KeyError):
        return False


# ---------------------------------------------------------------------- Redis

HOST = """
import asyncio, sys
from tornado_sse.broker.redis import RedisBroker

class Nobody:
    def deliver(self, frame):
        pass

async def main():
    broker = RedisBroker(sys.argv[1], key_prefix=sys.argv[2], presence_lease=float(sys.argv[3]))
    announce = {"announce": ["room"], "grace": float(sys.argv[4])} if sys.argv[4:] else {}
    for n in range(2):
        await broker.subscribe(["room"], Nobody(), identity="vera", **announce)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.gen_test(timeout=60)
async def test_a_vanished_redis_host_stops_counting_within_its_lease(
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    from tornado_sse.broker.redis import RedisBroker

    assert RedisBroker(redis_url).presence_lease <= 15
    here = RedisBroker(redis_url, key_prefix=redis_prefix)
    await here.start()
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, redis_url, redis_prefix, "1.5"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert host.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(host.stdout.readline), TIMEOUT)
        assert line == b"ready\n"
        mine = await here.subscribe(["room"], Collector(), identity="otto")
        assert await here.presence("room") == Presence("room", 3, {"otto": 1, "vera": 2})
        # still counted after the host renewed its lease (every 0.5 s)
        leases = dict(await here._redis.zrange(here._leases_key, 0, -1, withscores=True))
        (other,) = [token for token in leases if token.decode() != here._token]

        async def renewed() -> bool:
            score = await here._redis.zscore(here._leases_key, other)
            return score is not None and score > leases[other]

        await wait_until(renewed, 10)
        assert await here.presence("room") == Presence("room", 3, {"otto": 1, "vera": 2})
        host.kill()  # SIGKILL: nothing is cleaned up, only the lease ends
        host.wait(TIMEOUT)
        await wait_until(lambda: _is(here, Presence("room", 1, {"otto": 1})), 10)
        mine.close()
        await wait_until(lambda: _is(here, Presence("room", 0, {})), TIMEOUT)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(TIMEOUT)
        if host.stdout is not None:
            host.stdout.close()
        await here.close()


async def _renewed(broker: Any, times: int) -> None:
    """Wait until *broker* renewed its presence lease *times* times (each renewal is followed
    by a sweep for the users of vanished hosts)."""
    scores: set[float] = set()

    async def more() -> bool:
        scores.add(await broker._redis.zscore(broker._leases_key, broker._token))
        return len(scores) > times

    await wait_until(more, TIMEOUT)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_redis_leave_waits_for_its_grace_through_the_sweeps(
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    """The sweep that sends the leaves of vanished hosts' users waits for their grace period
    too: a user whose connection was just lost is no leave while they may come back."""
    from tornado_sse.broker.redis import RedisBroker

    one = RedisBroker(redis_url, key_prefix=redis_prefix, presence_lease=0.3)
    two = RedisBroker(redis_url, key_prefix=redis_prefix, presence_lease=0.3)
    await one.start()
    await two.start()
    host: subprocess.Popen[bytes] | None = None
    try:
        watcher = Collector()
        (await one.subscribe(["presence:room"], watcher)).start()

        def said() -> list[tuple[str | None, str | None]]:
            return [
                (e.event, json.loads(e.data or "")["user"] if e.event else e.data)
                for e in watcher.events
            ]

        lou = await two.subscribe(
            ["room"], Collector(), identity="lou", announce=["room"], grace=3600
        )
        await wait_until(lambda: len(said()) == 1, TIMEOUT)
        lou.close()  # a lost connection: lou may come back within the hour
        for broker in (one, two):
            await _renewed(broker, 2)
        await one.publish("presence:room", "after two sweeps")
        await wait_until(lambda: len(said()) >= 2, TIMEOUT)
        assert said() == [("join", "lou"), (None, "after two sweeps")]
        # a host that vanishes: its user leaves once the lease and the grace period are over
        host = subprocess.Popen(
            [sys.executable, "-c", HOST, redis_url, redis_prefix, "0.3", "0.2"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert host.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(host.stdout.readline), TIMEOUT)
        assert line == b"ready\n"
        await wait_until(lambda: len(said()) >= 3, TIMEOUT)
        host.kill()
        host.wait(TIMEOUT)
        await wait_until(lambda: len(said()) >= 4, TIMEOUT)
        assert said()[2:] == [("join", "vera"), ("leave", "vera")]
    finally:
        if host is not None:
            if host.poll() is None:
                host.kill()
                host.wait(TIMEOUT)
            if host.stdout is not None:
                host.stdout.close()
        await one.close()
        await two.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_redis_broker_that_closes_stops_counting_at_once(
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    from tornado_sse.broker.redis import RedisBroker

    one = RedisBroker(redis_url, key_prefix=redis_prefix)
    two = RedisBroker(redis_url, key_prefix=redis_prefix)
    await one.start()
    await two.start()
    try:
        await two.subscribe(["room"], Collector(), identity="tess")
        assert await one.presence("room") == Presence("room", 1, {"tess": 1})
        await two.close()
        assert await one.presence("room") == Presence("room", 0, {})
        # Redis lost the hash (FLUSHALL, an empty restart): the next renewal writes it all again
        await one.subscribe(["room"], Collector(), identity="uma")
        await one._redis.delete(one._presence_key)
        assert await one.presence("room") == Presence("room", 0, {})
        await one._share_presence([])
        assert await one.presence("room") == Presence("room", 1, {"uma": 1})
    finally:
        await one.close()
        await two.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_users_are_announced_again_after_redis_lost_their_marks(
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    """Redis loses the deployment's data (a FLUSHALL, an empty restart): the announced marks go
    with the presence hashes, and each host's next lease renewal announces its users again, so
    that they are listed and their leaves are still sent."""
    from tornado_sse.broker.redis import RedisBroker

    one = RedisBroker(redis_url, key_prefix=redis_prefix, presence_lease=0.6)
    two = RedisBroker(redis_url, key_prefix=redis_prefix, presence_lease=0.6)
    await one.start()
    await two.start()
    try:
        watcher = Collector()
        (await one.subscribe(["presence:room"], watcher)).start()
        tab: dict[str, Any] = {"announce": ["room"], "grace": 3600.0}
        await one.subscribe(["room"], Collector(), identity="ann", **tab)
        ben = await two.subscribe(["room"], Collector(), identity="ben", **tab)

        async def announced(want: set[str]) -> bool:
            return (await one.presence("room")).announced == want

        await wait_until(lambda: announced({"ann", "ben"}), 10)
        keys = [key async for key in one._redis.scan_iter(match=redis_prefix + "*")]
        await one._redis.delete(*keys)
        assert await announced(set())
        await wait_until(lambda: announced({"ann", "ben"}), 10)
        ben.close(grace=0)
        await wait_until(lambda: announced({"ann"}), 10)

        def left() -> bool:
            said = [e for e in watcher.events if e.event in ("join", "leave")]
            return bool(said) and (said[-1].event, json.loads(said[-1].data or "")["user"]) == (
                "leave",
                "ben",
            )

        await wait_until(left, 10)
    finally:
        await one.close()
        await two.close()


# ---------------------------------------------------------------------- the hub's --presence


def test_serve_refuses_a_bad_presence_pattern() -> None:
    from click.testing import CliRunner

    from tornado_sse.hub import serve_command

    result = CliRunner().invoke(
        serve_command, ["--presence", "room/*", "--presence", "a b"], env={"TORNADO_SSE_TOKEN": "t"}
    )
    assert result.exit_code == 2
    assert "--presence" in result.output and "invalid channel pattern 'a b'" in result.output


@pytest.mark.parametrize("value", ["-1", "3601", "nan", "inf", "soon", ""])
def test_serve_refuses_a_bad_presence_grace(value: str) -> None:
    from click.testing import CliRunner

    from tornado_sse.hub import serve_command

    result = CliRunner().invoke(
        serve_command, ["--presence-grace", value], env={"TORNADO_SSE_TOKEN": "t"}
    )
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--presence-grace'" in result.output


@pytest.mark.gen_test(timeout=60)
async def test_the_hubs_presence_grace_is_its_flag(tmp_path: Path) -> None:
    """With ``--presence-grace 0`` a reconnect is a leave and a join (with the default 3 s,
    neither): the flag reaches the hub's streams."""
    hub = start_hub(
        tmp_path / "hub.log",
        *("--jwt-secret", SECRET, "--presence", "room/*", "--presence-grace", "0"),
        *("--drain", "0"),  # stopped with its streams open: no 2 s window to wait out
        open_access=False,
    )

    async def tab(query: str, user: str) -> RawStream:
        token = create_token(SECRET, subject=user, subscribe=["room/*"], ttl=600)
        stream = await hub.stream(query, headers=bearer(token))
        assert stream.status == 200, query
        await stream.read_until(lambda s: s.parser.last_event_id != "")
        return stream

    def users() -> dict[str, int]:
        reply = httpx.get(
            hub.url + "/presence", params={"channel": "room/1"}, headers=AUTH, verify=TLS
        )
        assert reply.status_code == 200, reply.text
        return dict(reply.json().get("users", {}))

    streams: list[RawStream] = []
    try:
        watcher = await tab("channel=presence:room/1", "carol")
        streams.append(watcher)
        streams.append(await tab("channel=room/1", "ada"))
        await watcher.events_count(1)
        streams[-1].close()  # a lost connection ...
        await wait_until(lambda: users() == {}, TIMEOUT)
        streams.append(await tab("channel=room/1", "ada"))  # ... and its reconnect
        streams.append(await tab("channel=room/1", "zed"))
        await watcher.read_until(lambda s: "zed" in (s.events[-1].data or ""), TIMEOUT)
        said = [(e.event, json.loads(e.data or "")["user"]) for e in watcher.events]
        assert said == [("join", "ada"), ("leave", "ada"), ("join", "ada"), ("join", "zed")]
    finally:
        for stream in streams:
            stream.close()
        hub.stop()


@pytest.mark.gen_test(timeout=60)
async def test_the_hubs_presence_counts_every_worker(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub.log", "--processes", "2")
    streams: list[RawStream] = []
    try:
        for _ in range(6):  # the kernel spreads them over both workers
            streams.append(await hub.stream("channel=lobby"))
        assert all(stream.status == 200 for stream in streams)
        for stream in streams:
            await stream.read_until(lambda s: s.parser.last_event_id != "")
        reply = httpx.get(hub.url + "/presence?channel=lobby", headers=AUTH, timeout=10, verify=TLS)
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"channel": "lobby", "subscribers": 6}
        reply = httpx.get(hub.url + "/presence?channel=lobby", timeout=10, verify=TLS)
        assert reply.status_code == 401
        for stream in streams:
            stream.close()

        def gone() -> bool:
            reply = httpx.get(
                hub.url + "/presence?channel=lobby", headers=AUTH, timeout=10, verify=TLS
            )
            return bool(reply.json()["subscribers"] == 0)

        await wait_until(gone, TIMEOUT)
    finally:
        for stream in streams:
            stream.close()
        hub.stop()


@pytest.mark.gen_test(timeout=60)
async def test_the_hubs_streams_have_the_identity_of_their_credential(
    tmp_path: Path,
    backend_url: str,  # noqa: F811
) -> None:
    """A JWT's ``sub`` and an --auth-url answer's ``sub`` are who the stream is: /presence
    names them, and --presence announces their joins and leaves (issue 14)."""
    hub = start_hub(
        tmp_path / "hub.log",
        *("--jwt-secret", SECRET, "--auth-url", backend_url),
        *("--presence", "room/*", "--presence", "user/*"),
        # stopped with its streams open: no 2 s window to wait out; a leave comes 0.5 s after
        # the last tab closed instead of the default 3 s (the flag has its own test)
        *("--drain", "0", "--presence-grace", "0.5"),
        open_access=False,
    )

    def token(subject: str) -> dict[str, str]:
        return bearer(create_token(SECRET, subject=subject, subscribe=["room/*"], ttl=600))

    async def tab(query: str, headers: dict[str, str]) -> RawStream:
        stream = await hub.stream(query, headers=headers)
        assert stream.status == 200, query
        await stream.read_until(lambda s: s.parser.last_event_id != "")
        return stream

    def presence(channel: str) -> Any:
        reply = httpx.get(
            hub.url + "/presence", params={"channel": channel}, headers=AUTH, verify=TLS
        )
        assert reply.status_code == 200, reply.text
        return reply.json()

    streams: list[RawStream] = []
    try:
        # the companion channel is granted with the channel it describes
        watcher = await tab("channel=presence:room/1", token("carol"))
        streams.append(watcher)
        alice = [await tab("channel=room/1", token("alice")) for _ in range(2)]
        bob = await tab("channel=room/1", token("bob"))
        streams += [*alice, bob]
        await watcher.events_count(2)
        assert presence("room/1") == {
            "channel": "room/1",
            "subscribers": 3,
            "users": {"alice": 2, "bob": 1},
            "announced": ["alice", "bob"],
        }
        for stream in alice:
            stream.close()
        await watcher.events_count(3)  # one leave for both tabs, after the grace period
        said = [(event.event, json.loads(event.data or "")) for event in watcher.events]
        assert said == [
            ("join", {"channel": "room/1", "user": "alice"}),
            ("join", {"channel": "room/1", "user": "bob"}),
            ("leave", {"channel": "room/1", "user": "alice"}),
        ]
        assert presence("room/1")["users"] == {"bob": 1}
        assert presence("room/1")["announced"] == ["bob"]
        streams.append(await tab("channel=user/alice", {"Cookie": "session=alice"}))
        assert presence("user/alice")["users"] == {"alice": 1}
        await wait_until(lambda: presence("user/alice")["announced"] == ["alice"], TIMEOUT)
    finally:
        for stream in streams:
            stream.close()
        hub.stop()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_presence_off_counts_nothing_and_says_so() -> None:
    from tornado_sse import BrokerError

    broker = InProcessBroker(presence=False)
    sub = await broker.subscribe(["room"], Collector(), identity="ada", announce=["room"])
    assert broker.presence_table.channels() == []
    with pytest.raises(BrokerError, match="presence is turned off"):
        await broker.presence("room")
    sub.close()
    await broker.close()


@pytest.mark.parametrize("grace", [float("nan"), -1.0])
@pytest.mark.gen_test
async def test_a_grace_that_is_no_number_of_seconds_is_refused(grace: float) -> None:
    """NaN got through to ``call_later``, where it disorders the loop's timers."""
    from tornado_sse.errors import InvalidArgumentError

    broker = InProcessBroker()
    try:
        with pytest.raises(InvalidArgumentError, match="grace"):
            await broker.subscribe(["a"], Collector(), identity="ada", announce=["a"], grace=grace)
        sub = await broker.subscribe(["a"], Collector(), identity="ada", announce=["a"])
        with pytest.raises(InvalidArgumentError, match="grace"):
            sub.close(grace=grace)
        sub.close()
        assert (await broker.presence("a")).subscribers == 0
    finally:
        await broker.close()
