"""The unix-socket bridge through real processes: the broker contract against a hub in a
subprocess, fan-out and resume across worker processes, kill -9 of the hub and of a worker, stale
sockets, permissions, misbehaving peers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from tornado.ioloop import IOLoop

from tests.broker_contract import BrokerContract, Collector, close_brokers, subscribe
from tests.conftest import require
from tests.helpers import wait_until
from tests.test_bridge_worker import Worker
from tornado_sse.broker.base import Broker
from tornado_sse.broker.bridge import (
    BridgeBroker,
    BridgeHub,
    BridgePermissionError,
    _parse_id,
    check_peer,
    claim_socket,
    peer_credentials,
    secure_directory,
)
from tornado_sse.broker.framing import (
    ANNOUNCE,
    HISTORY,
    MAX_ARRAY_LEN,
    PEER_BOUND,
    PUBLISH,
    PUBLISH_OVERHEAD,
    SUBSCRIBE,
    VERSION,
    WELCOME,
    FrameDecoder,
    pack,
)
from tornado_sse.errors import (
    BrokerUnavailableError,
    EventTooLargeError,
    HistoryGapError,
    InvalidEventError,
)

TIMEOUT = 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sock_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="sse-bridge-")  # mode 0700
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def unreachable(path: str) -> Iterator[None]:
    """The hub's socket file moved away for the block: a broker that lost its connection
    cannot reconnect (it tries, and backs off) until the file is back, so it stays unhealthy
    and misses what is published meanwhile. (Without this, a test waiting to see it
    unhealthy raced its jittered reconnect, a window that can close between two polls.)"""
    away = path + ".away"
    os.rename(path, away)
    try:
        yield
    finally:
        os.rename(away, path)


def start_hub_process(path: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tornado_sse.broker.bridge", path, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(TIMEOUT)


@pytest.fixture
def make_broker(io_loop: IOLoop, sock_dir: str) -> Iterator[Callable[..., Awaitable[Broker]]]:
    """Brokers in this process, connected (without takeover) to a hub in a subprocess."""
    hubs: dict[tuple[int, int], tuple[str, subprocess.Popen[bytes]]] = {}
    made: list[Broker] = []

    async def make(history_size: int = 1000, max_channels: int = 10_000) -> Broker:
        settings = (history_size, max_channels)
        if settings not in hubs:
            path = os.path.join(sock_dir, f"hub{history_size}-{max_channels}.sock")
            hubs[settings] = (
                path,
                start_hub_process(
                    path, f"--history-size={history_size}", f"--max-channels={max_channels}"
                ),
            )
        broker = BridgeBroker(hubs[settings][0], takeover=False, connect_timeout=TIMEOUT)
        made.append(broker)
        await broker.start()
        return broker

    yield make

    close_brokers(io_loop, made)
    for _, proc in hubs.values():
        stop_process(proc)


class TestBridgeBroker(BrokerContract):
    pass


@pytest.fixture
def workers(io_loop: IOLoop) -> Iterator[list[Worker]]:
    """Worker processes a test starts; killed at the end."""
    started: list[Worker] = []
    yield started

    async def stop_all() -> None:
        for worker in started:
            await worker.stop()

    io_loop.run_sync(stop_all)


async def start_workers(started: list[Worker], path: str, count: int, *args: str) -> list[Worker]:
    new = await asyncio.gather(*(Worker.start(path, *args) for _ in range(count)))
    started.extend(new)
    return list(new)


def key(event_id: str) -> tuple[int, int]:
    parsed = _parse_id(event_id)
    assert parsed is not None, event_id
    return parsed


def assert_no_silent_gap(events: list[list[Any]], acked: list[str]) -> None:
    """Events arrive in id order, once; an acknowledged event is received, or a later
    ``stream-reset`` announces that it may have been missed."""
    keys = [key(event_id) for event_id, _, _ in events]
    assert keys == sorted(set(keys)), "out of order or repeated"
    received = {event_id for event_id, name, _ in events if name != "stream-reset"}
    resets = [key(event_id) for event_id, name, _ in events if name == "stream-reset"]
    for event_id in acked:
        if event_id not in received:
            assert any(reset > key(event_id) for reset in resets), f"{event_id} silently lost"


# ---------------------------------------------------------------------- several processes


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_fan_out_across_three_processes(sock_dir: str, workers: list[Worker]) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    first = (await start_workers(workers, path, 1))[0]
    assert first.started_as_hub
    others = await start_workers(workers, path, 2)
    assert not any(worker.started_as_hub for worker in others)
    group = [first, *others]
    for worker in group:
        await worker.call("subscribe", name="s", channels=["news"])
        await worker.call("subscribe", name="other", channels=["sport"])
    ids = []
    for round_ in range(3):
        for index, worker in enumerate(group):
            answer = await worker.call("publish", channel="news", data=f"{round_}-{index}")
            ids.append(answer["id"])
    assert sorted(ids, key=key) == ids
    for worker in group:
        await wait_until(lambda w=worker: _count(w, "s", len(ids)), TIMEOUT)
        events = await worker.events("s")
        assert [event_id for event_id, _, _ in events] == ids
        assert await worker.events("other") == []


async def _count(worker: Worker, name: str, count: int) -> bool:
    return len(await worker.events(name)) >= count


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_resume_on_another_process(sock_dir: str, workers: list[Worker]) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    one, two, three = await start_workers(workers, path, 3)
    await one.call("subscribe", name="s", channels=["feed", "alerts"])
    for n in range(3):
        await three.call("publish", channel="feed", data=f"seen {n}")
    await wait_until(lambda: _count(one, "s", 3), TIMEOUT)
    last_seen = (await one.events("s"))[-1][0]
    await one.call("unsubscribe", name="s")  # the browser goes away ...
    missed = []
    for n in range(4):
        channel = "feed" if n % 2 else "alerts"
        missed.append((await three.call("publish", channel=channel, data=f"missed {n}"))["id"])
    await three.call("publish", channel="elsewhere", data="not followed")
    # ... and its reconnect lands on another process
    answer = await two.call(
        "subscribe", name="r", channels=["feed", "alerts"], last_event_id=last_seen
    )
    assert not answer["reset"]
    assert answer["replay"] == 4
    live = (await one.call("publish", channel="feed", data="live"))["id"]
    await wait_until(lambda: _count(two, "r", 5), TIMEOUT)
    events = await two.events("r")
    assert [event_id for event_id, _, _ in events] == [*missed, live]
    assert [data for _, _, data in events] == [
        "missed 0",
        "missed 1",
        "missed 2",
        "missed 3",
        "live",
    ]


@pytest.mark.gen_test(timeout=60)
async def test_kill_hub_during_publish_stream(sock_dir: str, workers: list[Worker]) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    hub_worker = (await start_workers(workers, path, 1))[0]
    assert hub_worker.started_as_hub
    others = await start_workers(workers, path, 2)
    publisher = BridgeBroker(path, connect_timeout=TIMEOUT)
    try:
        await publisher.start()
        assert publisher.hub is None
        for worker in others:
            await worker.call("subscribe", name="s", channels=["stream"])
        _, local = await subscribe(publisher, ["stream"])
        acked: list[str] = []
        failed = 0
        for n in range(240):
            if n == 80:
                hub_worker.kill()
            try:
                acked.append(await publisher.publish("stream", str(n)))
            except BrokerUnavailableError:
                failed += 1  # fails fast: the caller knows this one was not (surely) sent
                await wait_until(lambda: publisher.healthy, TIMEOUT)
        assert failed >= 1
        assert len({key(event_id)[0] for event_id in acked}) == 2, "a second hub took over"
        last = acked[-1]
        for worker in others:
            await wait_until(lambda w=worker: _has(w, "s", last), TIMEOUT)
            assert_no_silent_gap(await worker.events("s"), acked)
            stats = await worker.call("stats")
            assert stats["healthy"] and stats["resets"] == 1
        await wait_until(lambda: local.frames and local.frames[-1].id == last, TIMEOUT)
        local_events = [[e.id, e.event, e.data] for e in local.events]
        assert_no_silent_gap(local_events, acked)
        # one hub again, in one of the surviving processes
        hubs = [(await w.call("stats"))["is_hub"] for w in others] + [publisher.hub is not None]
        assert hubs.count(True) == 1
        # a browser that resumes from an id of the dead hub is told, wherever it lands
        old_id = acked[0]
        answer = await others[0].call(
            "subscribe", name="late", channels=["stream"], last_event_id=old_id
        )
        assert answer["reset"]
        # and one from the new hub resumes exactly
        answer = await others[1].call(
            "subscribe", name="exact", channels=["stream"], last_event_id=acked[-3]
        )
        assert not answer["reset"] and answer["replay"] == 2
    finally:
        await publisher.close()


async def _has(worker: Worker, name: str, event_id: str) -> bool:
    return any(event[0] == event_id for event in await worker.events(name))


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_kill_worker_frees_its_subscriptions(
    sock_dir: str, workers: list[Worker], caplog: pytest.LogCaptureFixture
) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path)
    await hub.start()
    try:
        doomed, survivor = await start_workers(workers, path, 2, "--no-takeover")
        await doomed.call("subscribe", name="a", channels=["k1", "k2"])
        await survivor.call("subscribe", name="b", channels=["k1"])
        assert hub.followers("k1") == 2 and hub.followers("k2") == 1
        assert hub.peer_count == 2
        with caplog.at_level(logging.INFO, "tornado_sse.bridge"):
            doomed.kill()
            await wait_until(lambda: hub.peer_count == 1, TIMEOUT)
        assert hub.followers("k1") == 1 and hub.followers("k2") == 0
        assert f"peer pid={doomed.pid} gone" in caplog.text
        event_id = (await survivor.call("publish", channel="k1", data="still here"))["id"]
        await wait_until(lambda: _has(survivor, "b", event_id), TIMEOUT)
    finally:
        await hub.close()


# ---------------------------------------------------------------------- outages


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_publish_while_hub_is_gone_fails_fast_and_hub_comes_back(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    proc = start_hub_process(path)
    broker = BridgeBroker(path, takeover=False, connect_timeout=TIMEOUT)
    try:
        await broker.start()
        sub, got = await subscribe(broker, ["o"])
        before = await broker.publish("o", "before")
        await wait_until(lambda: got.data == ["before"], TIMEOUT)
        proc.kill()
        proc.wait(TIMEOUT)
        await wait_until(lambda: not broker.healthy, TIMEOUT)
        with pytest.raises(BrokerUnavailableError):
            await broker.publish("o", "during")
        with pytest.raises(BrokerUnavailableError):
            await broker.subscribe(["p"], Collector())
        assert os.path.exists(path)  # the dead hub's stale socket
        proc = start_hub_process(path)
        await wait_until(lambda: broker.healthy, TIMEOUT)
        after = await broker.publish("o", "after")
        await wait_until(lambda: len(got.frames) == 3, TIMEOUT)
        names = [event.event for event in got.events]
        assert names == [None, "stream-reset", None]
        assert json.loads(got.data[1]) == {"id": got.frames[1].id, "reason": "reconnect"}
        assert got.data[2] == "after"
        assert key(before) < key(got.frames[1].id) < key(after)
        sub.close()
    finally:
        await broker.close()
        stop_process(proc)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_resume_from_an_old_hub_gets_what_the_new_hub_published(sock_dir: str) -> None:
    """A browser coming back after the hub process was replaced, with an id of the old hub:
    ``stream-reset`` at the new hub's first id, then every event it has published since (it
    got live events only before, issue 15's storm)."""
    path = os.path.join(sock_dir, "hub.sock")
    proc = start_hub_process(path)
    broker = BridgeBroker(path, takeover=False, connect_timeout=TIMEOUT)
    try:
        await broker.start()
        gone = await broker.publish("o", "died with the old hub")
        proc.kill()
        proc.wait(TIMEOUT)
        await wait_until(lambda: not broker.healthy, TIMEOUT)
        proc = start_hub_process(path)
        await wait_until(lambda: broker.healthy, TIMEOUT)
        since = [await broker.publish(c, c) for c in ("o", "p", "o")]
        sub, got = await subscribe(broker, ["o"], gone)
        assert sub.reset and key(gone) < key(sub.position) < key(since[0])
        assert sub.position.endswith("-0")
        after = await broker.publish("o", "live")
        await wait_until(lambda: len(got.frames) == 3, TIMEOUT)
        assert [f.id for f in got.frames] == [since[0], since[2], after]
        sub.close()
    finally:
        await broker.close()
        stop_process(proc)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_lost_connection_to_a_live_hub_replays_exactly(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path)
    await hub.start()
    one = BridgeBroker(path, takeover=False, reconnect_delay=0.05, max_reconnect_delay=0.2)
    two = BridgeBroker(path, takeover=False)
    try:
        await one.start()
        await two.start()
        _, got = await subscribe(one, ["r", "q"])
        await two.publish("r", "1")
        await wait_until(lambda: got.data == ["1"], TIMEOUT)
        (peer,) = [peer for peer in hub.peers if "r" in peer.channels]
        with unreachable(path):
            hub.drop(peer, "test")
            await wait_until(lambda: not one.healthy, TIMEOUT)
            await two.publish("r", "2")
            await two.publish("q", "3")
            assert got.data == ["1"]  # both missed
        await wait_until(lambda: one.healthy, TIMEOUT)
        await two.publish("r", "4")
        await wait_until(lambda: len(got.frames) >= 4, TIMEOUT)
        assert got.data == ["1", "2", "3", "4"]
        assert one.resets == 0 and one.connects == 2
    finally:
        await one.close()
        await two.close()
        await hub.close()


# ---------------------------------------------------------------------- history in pages


async def read_pages(sub: Any, got: Collector, publish: Callable[[], Awaitable[str]]) -> list[str]:
    """Read *sub*'s replay page by page as the handler does, publishing one event before each
    page; then go live. The ids published."""
    got.frames.extend(sub.replay)
    published = []
    while not sub.complete:
        published.append(await publish())
        got.frames.extend(await sub.next_page())
    sub.start()
    return published


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_paged_replay_reads_bounded_pages_and_misses_nothing(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path, max_frame_size=8192)
    await hub.start()
    broker = BridgeBroker(path, takeover=False, max_frame_size=8192)
    try:
        await broker.start()
        ids = [await broker.publish("p", f"{n:04d}" + "x" * 1000) for n in range(60)]
        got = Collector()
        sub = await broker.subscribe(["p"], got, ids[0], page_size=20)
        # before issue 12 the hub answered all 59 at once: each resume held all of history
        pages = [len(sub.replay)]
        assert not sub.complete and sum(len(f.data) for f in sub.replay) <= 8192
        live = 0

        async def publish() -> str:
            nonlocal live
            live += 1
            return await broker.publish("p", f"live {live}")

        got.frames.extend(sub.replay)
        published = []
        while not sub.complete:
            published.append(await publish())
            page = await sub.next_page(20 if len(pages) % 2 else 3)
            pages.append(len(page))
            got.frames.extend(page)
            assert len(page) <= 20 and sum(len(f.data) for f in page) <= 8192
        sub.start()
        last = await broker.publish("p", "after")
        await wait_until(lambda: got.frames and got.frames[-1].id == last, TIMEOUT)
        # every event exactly once, in order, also those published while the pages were read
        assert [f.id for f in got.frames] == ids[1:] + published + [last]
        assert pages[0] < 20 and 3 in pages and len(pages) > 8  # cut by bytes, or by count
    finally:
        await broker.close()
        await hub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_history_trimmed_between_pages_is_a_gap(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path, history_size=10)
    await hub.start()
    broker = BridgeBroker(path, takeover=False)
    try:
        await broker.start()
        ids = [await broker.publish("t", str(n)) for n in range(10)]
        sub = await broker.subscribe(["t"], Collector(), ids[0], page_size=3)
        assert [f.id for f in sub.replay] == ids[1:4] and not sub.reset
        for n in range(10):  # the rest of the replay is trimmed away under the reader
            await broker.publish("t", f"more {n}")
        with pytest.raises(HistoryGapError) as gap:
            await sub.next_page()
        assert key(gap.value.current_id) >= key(ids[-1])
        sub.close()
    finally:
        await broker.close()
        await hub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_pages_of_more_channels_than_one_request_carries(sock_dir: str) -> None:
    """Channels past one frame's array bound are asked in several HISTORY requests; a page
    ends where the first of them that has more ends, so the next page misses nothing."""
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path)
    await hub.start()
    broker = BridgeBroker(path, takeover=False)
    try:
        await broker.start()
        channels = [f"m{n}" for n in range(MAX_ARRAY_LEN // 2 + 100)]
        used = [channels[0], channels[-1], channels[7], channels[-2]]  # in both requests
        ids = [await broker.publish(used[n % 4], str(n)) for n in range(41)]
        got = Collector()
        sub = await broker.subscribe(channels, got, ids[0], page_size=3)
        assert not sub.complete

        async def publish() -> str:
            return await broker.publish(used[len(got.frames) % 4], "live")

        published = await read_pages(sub, got, publish)
        last = await broker.publish(channels[-1], "after")
        await wait_until(lambda: got.frames and got.frames[-1].id == last, TIMEOUT)
        assert [f.id for f in got.frames] == ids[1:] + published + [last]
        sub.close()
    finally:
        await broker.close()
        await hub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_history_asked_for_and_never_read_costs_the_hub_its_peer_buffer(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that sends many HISTORY requests at once and reads nothing is dropped once the
    answers queued for it pass max_peer_buffer, not after all of them were made."""
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path, max_peer_buffer=256 << 10)
    await hub.start()
    good = BridgeBroker(path, takeover=False)
    try:
        await good.start()
        _, got = await subscribe(good, ["big"])
        for _ in range(10):
            await good.publish("big", "x" * 10_000)
        _, writer = await raw_peer(path)
        after = f"{hub.ids.epoch}-0"
        requests = b"".join(pack(HISTORY, rid, ["big"], after, 10) for rid in range(400))
        tracemalloc.start()
        try:
            with caplog.at_level(logging.WARNING, "tornado_sse.bridge"):
                writer.write(requests)  # 400 pages of 100 kB: 40 MB if all were queued
                await wait_until(lambda: hub.dropped == 1, TIMEOUT)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "not reading" in caplog.text
        assert peak < 4 << 20, f"the hub held {peak >> 20} MiB for a peer that does not read"
        writer.close()
        await good.publish("big", "after")
        await wait_until(lambda: len(got.frames) == 11, TIMEOUT)
        assert good.healthy and hub.peer_count == 1
    finally:
        await good.close()
        await hub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_catching_up_after_a_reconnect_reads_many_pages(sock_dir: str) -> None:
    """More missed events than one page of a whole read: every one, once, in order."""
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path, history_size=5000)
    await hub.start()
    one = BridgeBroker(path, takeover=False, reconnect_delay=0.05, max_reconnect_delay=0.2)
    two = BridgeBroker(path, takeover=False)
    try:
        await one.start()
        await two.start()
        _, got = await subscribe(one, ["ra", "rb"])
        (peer,) = [peer for peer in hub.peers if "ra" in peer.channels]
        with unreachable(path):
            hub.drop(peer, "test")
            await wait_until(lambda: not one.healthy, TIMEOUT)
            ids = [await two.publish(("ra", "rb")[n % 2], str(n)) for n in range(2500)]
            assert got.frames == []  # all 2500 missed: three pages to read
        await wait_until(lambda: one.healthy, TIMEOUT)
        await wait_until(lambda: len(got.frames) >= len(ids), TIMEOUT)
        assert [f.id for f in got.frames] == ids
        assert one.resets == 0 and one.connects == 2
    finally:
        await one.close()
        await two.close()
        await hub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_catching_up_past_half_the_peer_buffer_is_a_reset(sock_dir: str) -> None:
    """A process does not hold more than half of max_peer_buffer of history to catch up: past
    it, its streams get stream-reset, then the events that follow."""
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path, history_size=5000)
    await hub.start()
    one = BridgeBroker(
        path,
        takeover=False,
        reconnect_delay=0.05,
        max_reconnect_delay=0.2,
        max_peer_buffer=64 << 10,
    )
    two = BridgeBroker(path, takeover=False)
    try:
        await one.start()
        await two.start()
        _, got = await subscribe(one, ["big"])
        (peer,) = [peer for peer in hub.peers if "big" in peer.channels]
        with unreachable(path):
            hub.drop(peer, "test")
            await wait_until(lambda: not one.healthy, TIMEOUT)
            for _ in range(100):  # 100 kB missed
                await two.publish("big", "x" * 1000)
            assert got.frames == []
        await wait_until(lambda: one.healthy, TIMEOUT)
        after = await two.publish("big", "after")
        await wait_until(lambda: got.frames and got.frames[-1].id == after, TIMEOUT)
        assert one.resets == 1
        names = [event.event for event in got.events]
        assert names == ["stream-reset", None]
        assert key(got.frames[0].id) < key(after)
    finally:
        await one.close()
        await two.close()
        await hub.close()


# ---------------------------------------------------------------------- socket hygiene


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_stale_socket_file_is_replaced(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a crashed run leaves the file behind, nobody listening
    broker = BridgeBroker(path)
    try:
        await broker.start()
        assert broker.hub is not None
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700
        _, got = await subscribe(broker, ["s"])
        await broker.publish("s", "works")
        await wait_until(lambda: got.data == ["works"], TIMEOUT)
        # never a second hub on a live socket
        assert claim_socket(path) is None
        with pytest.raises(BrokerUnavailableError):
            await BridgeHub(path).start()
        assert broker.healthy
    finally:
        await broker.close()
    assert not os.path.exists(path)  # the hub removes its socket when it closes


def test_a_live_socket_that_is_not_ours_is_left_alone(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)
        other.listen()
        inode = os.stat(path).st_ino
        assert claim_socket(path) is None
        assert os.stat(path).st_ino == inode


def test_socket_directory_is_created_private_or_refused(sock_dir: str) -> None:
    fresh = os.path.join(sock_dir, "new")
    secure_directory(os.path.join(fresh, "hub.sock"))
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    open_dir = os.path.join(sock_dir, "open")
    os.mkdir(open_dir)
    os.chmod(open_dir, 0o755)
    with pytest.raises(BridgePermissionError, match="open to other users"):
        secure_directory(os.path.join(open_dir, "hub.sock"))
    link = os.path.join(sock_dir, "link")
    os.symlink(fresh, link)
    with pytest.raises(BridgePermissionError, match="not a directory"):
        secure_directory(os.path.join(link, "hub.sock"))
    assert isinstance(BridgePermissionError("x"), PermissionError)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_broker_refuses_an_open_directory(sock_dir: str) -> None:
    os.chmod(sock_dir, 0o711)
    broker = BridgeBroker(os.path.join(sock_dir, "hub.sock"))
    with pytest.raises(BridgePermissionError):
        await broker.start()
    await broker.close()


def test_peer_of_another_user_is_refused_by_the_check() -> None:
    one, two = socket.socketpair(socket.AF_UNIX)
    with one, two:
        credentials = peer_credentials(one)
        assert credentials == (os.getpid(), os.getuid(), os.getgid())
        check_peer(credentials)
        with pytest.raises(BridgePermissionError, match="runs as uid"):
            check_peer((credentials[0], credentials[1] + 1, credentials[2]))
        with pytest.raises(BridgePermissionError):
            check_peer(credentials, uid=credentials[1] + 1)


def connect_as(uid: int, path: str) -> int:
    """Fork a child that becomes *uid* and connects to *path*; its pid. It exits 0 if the hub
    closed the connection without a word, 1 if the hub answered, 2 on any error."""
    pid = os.fork()
    if pid:
        return pid
    code = 2
    try:
        os.setgid(uid)
        os.setuid(uid)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            code = 0 if sock.recv(100) == b"" else 1
    finally:
        os._exit(code)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_hub_refuses_a_peer_of_another_user(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Only root can start a peer as another user (a forked child that drops to `nobody`). CI
    # runs as root here, so under CI=true this runs, and fails rather than skips if it cannot;
    # test_peer_of_another_user_is_refused_by_the_check covers the check itself everywhere.
    require(os.getuid() == 0, "needs root to run a peer as another user")
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path)
    await hub.start()
    try:
        # a misconfiguration lets another user reach the socket: SO_PEERCRED still refuses it
        os.chmod(sock_dir, 0o711)
        os.chmod(path, 0o666)
        with caplog.at_level(logging.WARNING, "tornado_sse.bridge"):
            pid = connect_as(65534, path)
            exit_codes: list[int] = []

            def reap() -> list[int]:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    exit_codes.append(os.waitstatus_to_exitcode(status))
                return exit_codes

            await wait_until(reap, TIMEOUT)
        assert exit_codes == [0], "the hub should close the connection without a word"
        assert "refusing peer" in caplog.text and "uid 65534" in caplog.text
        assert hub.peer_count == 0
    finally:
        await hub.close()


# ---------------------------------------------------------------------- misbehaving peers


async def raw_peer(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    decoder = FrameDecoder(PEER_BOUND)
    frames: list[list[Any]] = []
    while not frames:
        frames = decoder.feed(await asyncio.wait_for(reader.read(1 << 16), TIMEOUT))
    assert frames[0][1] == WELCOME
    return reader, writer


async def dropped(reader: asyncio.StreamReader) -> bool:
    """True once the hub closed the connection (reads until EOF)."""
    try:
        while await asyncio.wait_for(reader.read(1 << 16), TIMEOUT):
            pass
    except ConnectionResetError:
        pass
    return True


BAD_INPUT = {
    "not msgpack": b"\xc1\xc1\xc1",
    "not an array": b"\x81\xa1a\x01",
    "unknown version": b"\x94\x07\x02\x01\x90",
    "unknown kind": bytes([0x93, VERSION, 0x63, 0x01]),
    "kind meant for peers": pack(WELCOME, "x-0", "x-0", 1, 100),
    "wrong field type": pack(SUBSCRIBE, 1, "not-a-list"),
    "invalid channel": pack(SUBSCRIBE, 1, ["no spaces allowed"]),
    "illegal event name": pack(PUBLISH, 1, "c", "x", "bad\nname", None, 0.0),
    "negative rid": pack(SUBSCRIBE, -1, ["a"]),
    "oversize frame": pack(PUBLISH, 1, "c", "x" * 70_000, None, None, 0.0),
    "huge array header": b"\xdd\xff\xff\xff\xff",
    "grace not a number": pack(ANNOUNCE, 1, "c", "alice", float("nan")),
    "negative grace": pack(ANNOUNCE, 1, "c", "alice", -1.0),
}


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_bad_frames_drop_only_that_peer(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path, max_frame_size=65536)
    await hub.start()
    good = BridgeBroker(path, takeover=False)
    try:
        await good.start()
        _, got = await subscribe(good, ["c"])
        with caplog.at_level(logging.WARNING, "tornado_sse.bridge"):
            for n, (name, data) in enumerate(BAD_INPUT.items()):
                reader, writer = await raw_peer(path)
                writer.write(data)
                assert await dropped(reader), name
                writer.close()
                assert hub.dropped == n + 1, name
                await good.publish("c", name)
            # truncated: the peer goes away in the middle of a frame
            reader, writer = await raw_peer(path)
            writer.write(pack(PUBLISH, 1, "c", "x" * 100, None, None, 0.0)[:50])
            await writer.drain()
            writer.close()
            await wait_until(lambda: hub.peer_count == 1, TIMEOUT)
        await wait_until(lambda: len(got.frames) == len(BAD_INPUT), TIMEOUT)
        assert got.data == list(BAD_INPUT)
        assert caplog.text.count("dropping peer") == len(BAD_INPUT)
        assert "stream ended inside a frame" in caplog.text
        assert good.healthy and good.connects == 1
    finally:
        await good.close()
        await hub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_peer_that_floods_without_reading_is_dropped(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    hub = BridgeHub(path, max_peer_buffer=256 << 10)
    await hub.start()
    good = BridgeBroker(path, takeover=False)
    try:
        await good.start()
        _, got = await subscribe(good, ["big"])
        for _ in range(10):
            await good.publish("big", "x" * 10_000)
        _, writer = await raw_peer(path)
        after = f"{hub.ids.epoch}-0"
        requests = b"".join(pack(HISTORY, rid, ["big"], after, 100) for rid in range(50))
        with caplog.at_level(logging.WARNING, "tornado_sse.bridge"):
            writer.write(requests)  # 50 x 100 kB of answers, and it never reads them
            await wait_until(lambda: hub.dropped == 1, TIMEOUT)
        assert "not reading" in caplog.text
        writer.close()
        await good.publish("big", "after")
        await wait_until(lambda: len(got.frames) == 11, TIMEOUT)
        assert good.healthy and hub.peer_count == 1
    finally:
        await good.close()
        await hub.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_an_event_too_large_for_the_bridge_is_refused_before_sending(
    sock_dir: str,
) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    broker = BridgeBroker(path, max_frame_size=4096)
    try:
        await broker.start()
        with pytest.raises(InvalidEventError, match="max_frame_size"):
            await broker.publish("c", "é" * 4000)
        # the event name counts too: a frame the hub refuses would cost the whole connection
        with pytest.raises(EventTooLargeError, match="max_frame_size") as refused:
            await broker.publish("c", "x", event="e" * 4096)
        assert refused.value.limit == 4096 and refused.value.size > 4096
        with pytest.raises(EventTooLargeError):
            await asyncio.wrap_future(broker.publish_threadsafe("c", "x" * 4096))
        fits = "x" * (4096 - PUBLISH_OVERHEAD - 1)
        assert await broker.publish("c", fits)  # the largest event that fits goes through
        assert await broker.publish("c", "small")
        assert broker.healthy and broker.hub is not None and broker.hub.dropped == 0
        assert broker.connects == 1
    finally:
        await broker.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_stuck_hub_is_a_clear_error_not_a_hang(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    proc = start_hub_process(path)
    broker = BridgeBroker(path, takeover=False, connect_timeout=TIMEOUT, request_timeout=0.5)
    try:
        await broker.start()
        await broker.publish("s", "before")
        proc.send_signal(signal.SIGSTOP)
        with pytest.raises(BrokerUnavailableError, match="did not answer"):
            await broker.publish("s", "stuck")
        proc.send_signal(signal.SIGCONT)
        assert await broker.publish("s", "after")
    finally:
        proc.send_signal(signal.SIGCONT)
        await broker.close()
        stop_process(proc)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_forked_child_inherits_neither_the_hub_nor_the_broker(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "hub.sock")
    broker = BridgeBroker(path)
    await broker.start()
    assert broker.hub is not None
    other = BridgeBroker(path, takeover=False)
    await other.start()
    child_waits, release_child = os.pipe()
    child_ready, ready = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the broker is refused, then it lingers until told
        code = 1
        try:
            try:
                asyncio.run(broker.publish("c", "x"))
            except RuntimeError as exc:
                code = 0 if "after fork" in str(exc) else 3
            os.write(ready, b"r")  # the at-fork handler has long run by now
            os.read(child_waits, 1)
        finally:
            os._exit(code)
    try:
        await wait_until(lambda: select.select([child_ready], [], [], 0)[0], TIMEOUT)
        await broker.close()
        # the child is alive, yet holds neither the lock, nor the listening socket, nor the
        # hub's end of the other broker's connection (which would hide the hub's death)
        await wait_until(lambda: not other.healthy, TIMEOUT)
        claim = claim_socket(path)
        assert claim is not None
        claim.release()
    finally:
        os.write(release_child, b"x")
        codes: list[int] = []

        def reap() -> list[int]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes.append(os.waitstatus_to_exitcode(status))
            return codes

        await wait_until(reap, TIMEOUT)
        await other.close()
    assert codes == [0]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_prometheus_collector(sock_dir: str) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    path = os.path.join(sock_dir, "hub.sock")
    hub_side = BridgeBroker(path)
    peer_side = BridgeBroker(path, takeover=False)
    try:
        await hub_side.start()
        await peer_side.start()
        text = {}
        for name, broker in (("hub", hub_side), ("peer", peer_side)):
            registry = CollectorRegistry()
            registry.register(broker.collector())
            text[name] = generate_latest(registry).decode()
        assert "tornado_sse_bridge_up 1.0" in text["hub"]
        assert "tornado_sse_bridge_hub 1.0" in text["hub"]
        assert "tornado_sse_bridge_hub_peers 2.0" in text["hub"]
        assert "tornado_sse_bridge_connects_total 1.0" in text["peer"]
        assert "tornado_sse_bridge_hub 0.0" in text["peer"]
        assert "tornado_sse_bridge_hub_peers" not in text["peer"]
    finally:
        await peer_side.close()
        await hub_side.close()
