"""``tornado-sse serve --drain SECONDS``: SIGTERM closes the streams one by one over the window,
each after a jittered ``retry:``, and every client resumes exactly on another hub (issue 15,
item 4).

Two real hubs on a real redis-server. Streams on hub A; a publisher on hub B publishes as fast as
it is answered while A drains, so a stream closed later has seen more events: how many distinct
last ids the streams end with shows the closes were spread (at once, they all end with the same
one), without measuring time.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.redis_server import RedisServer
from tests.test_redis_serve import AUTH, Hub

TIMEOUT = 30
STREAMS = 30
RETRY = 500  # the hubs' --retry (tests/test_redis_serve.py), jittered up to 1.5x


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[tuple[Hub, Hub]]:
    with RedisServer(tmp_path) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        flags = ("--max-connections-per-address", "0", "--stream-rate", "0", "--drain", "1.5")
        a = Hub(tmp_path / "hub-a.log", url, *flags)
        b = Hub(tmp_path / "hub-b.log", url, *flags)
        try:
            a.wait_healthy()
            b.wait_healthy()
            yield a, b
        finally:
            a.stop()
            b.stop()


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_drains_streams_over_the_window_and_they_resume_exactly(
    hubs: tuple[Hub, Hub],
) -> None:
    a, b = hubs
    streams = [await a.stream("channel=drain") for _ in range(STREAMS)]
    for stream in streams:
        await stream.read_until(lambda s: s.parser.last_event_id != "")
    published: list[str] = []
    drained = asyncio.Event()

    async def publish() -> None:
        async with httpx.AsyncClient(base_url=b.url, headers=AUTH, timeout=10) as client:
            while not drained.is_set():
                body = json.dumps({"channel": "drain", "data": len(published)})
                reply = await client.post("/publish", content=body)
                assert reply.status_code == 202, reply.text
                published.append(reply.json()["id"])

    publisher = asyncio.ensure_future(publish())
    while len(published) < 5:
        await asyncio.sleep(0.01)
    a.proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*(s.read_to_end() for s in streams)), TIMEOUT)
    drained.set()
    await asyncio.wait_for(publisher, TIMEOUT)
    assert a.proc.wait(TIMEOUT) == 0, a.log()

    last_ids = {stream.parser.last_event_id for stream in streams}
    assert len(last_ids) >= STREAMS // 3, f"closed in {len(last_ids)} groups: not spread"
    retries = set()
    for stream in streams:
        assert stream.last_chunk, stream.raw[-200:]
        # Each received a run of consecutive events, then a jittered retry, then the last chunk.
        ids = [event.id for event in stream.events]
        first = published.index(ids[0])
        assert ids == published[first : first + len(ids)]
        block = re.fullmatch(rb"(?s).*\n\nretry: (\d+)\n\n", stream.raw)
        assert block is not None, stream.raw[-200:]
        retries.add(int(block.group(1)))
    assert all(RETRY <= retry <= RETRY * 1.5 for retry in retries), retries
    assert len(retries) > 1, "the retry is not jittered"

    # Every client resumes on B from its own last id and gets exactly what it missed.
    for stream in streams:
        last = stream.parser.last_event_id
        missed = published[published.index(last) + 1 :]
        resumed = await b.stream("channel=drain", headers={"Last-Event-ID": last})
        await resumed.events_count(len(missed), TIMEOUT)
        assert [event.id for event in resumed.events] == missed
        assert b"stream-reset" not in resumed.raw
        resumed.close()
    for stream in streams:
        stream.close()


def test_drain_is_validated(tmp_path: Path) -> None:
    for bad in ("-1", "soon", "3601"):
        proc = Hub(tmp_path / f"bad{bad}.log", "redis://127.0.0.1:1/0", "--drain", bad).proc
        assert proc.wait(TIMEOUT) == 2
        assert "--drain" in (tmp_path / f"bad{bad}.log").read_text()
