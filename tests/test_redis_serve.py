"""``tornado-sse serve --redis``, black-box: two hub processes sharing one real redis-server.

Two hubs on two ports stand for two hosts behind a load balancer: what is published on one
reaches subscribers of the other, a client resumes on one with an id it got from the other, and
when Redis goes away both say so on ``/healthz`` and their open streams get ``stream-reset`` if
Redis comes back without the events.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    PORT_ATTEMPTS,
    PORT_TAKEN,
    TLS,
    RawStream,
    free_port,
    listens_on,
    stop_process,
    wait_until,
)
from tests.redis_server import RedisServer

TOKEN = "redis-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 20
#: Redis's password: in the hubs' URL, never in their answers or logs
PASSWORD = "redis-pass-4f9e2c"


class Hub:
    """A ``tornado-sse serve --redis URL`` subprocess (*redis_url* ``""``: *args* give the
    backend, e.g. ``--redis-cluster URL``)."""

    def __init__(self, log_path: Path, redis_url: str, *args: str) -> None:
        self.log_path = log_path
        env = {**os.environ, "TORNADO_SSE_TOKEN": TOKEN}
        for _ in range(PORT_ATTEMPTS):  # a port taken in between: try another
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            command = [sys.executable, "-m", "tornado_sse.cli", "serve", "--host", "127.0.0.1"]
            command += ["--port", str(self.port), "--retry", "500"]
            command += ["--redis", redis_url] if redis_url else []  # "": *args name the backend
            command += ["--public-channel", "*", "--metrics-public", *args]
            with log_path.open("wb") as log_file:
                self.proc = subprocess.Popen(
                    command, stdout=log_file, stderr=subprocess.STDOUT, env=env
                )
            if listens_on(self.proc, self.port) or PORT_TAKEN not in self.log():
                break

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def health(self) -> int:
        try:
            return httpx.get(self.url + "/healthz", timeout=2, verify=TLS).status_code
        except httpx.TransportError:
            return 0

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.health() != 200:
            if self.proc.poll() is not None:
                raise AssertionError(f"hub exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"hub did not become healthy:\n{self.log()}")
            time.sleep(0.05)

    def post(self, channel: str, data: Any) -> httpx.Response:
        body = json.dumps({"channel": channel, "data": data})
        return httpx.post(self.url + "/publish", content=body, headers=AUTH, timeout=10, verify=TLS)

    def publish(self, channel: str, data: Any) -> str:
        reply = self.post(channel, data)
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    async def stream(self, query: str, **kwargs: Any) -> RawStream:
        return await RawStream.open(self.port, f"/events?{query}", **kwargs)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Hub, Hub]]:
    """A redis-server of its own (the last test kills it) and hubs A and B on it."""
    directory = tmp_path_factory.mktemp("redis-serve")
    with RedisServer(directory, args=["--requirepass", PASSWORD]) as server:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        hubs = [Hub(directory / f"hub-{name}.log", url) for name in "ab"]
        try:
            for hub in hubs:
                hub.wait_healthy()
            yield server, hubs[0], hubs[1]
        finally:
            for hub in hubs:
                hub.stop()
        for hub in hubs:
            assert hub.proc.returncode == 0, hub.log()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_each_hub_delivers_the_others_publishes(
    cluster: tuple[RedisServer, Hub, Hub],
) -> None:
    _, a, b = cluster
    on_b = await b.stream("channel=news")
    on_a = await a.stream("channel=news")
    await on_b.read_until(lambda s: s.parser.last_event_id != "")
    await on_a.read_until(lambda s: s.parser.last_event_id != "")
    from_a = a.publish("news", "from a")
    from_b = b.publish("news", "from b")
    for stream in (on_a, on_b):
        events = await stream.events_count(2)
        assert [(e.id, e.data) for e in events] == [(from_a, "from a"), (from_b, "from b")]
        stream.close()
    metrics = httpx.get(a.url + "/metrics", timeout=5, verify=TLS).text
    assert "tornado_sse_redis_up 1.0" in metrics
    assert "tornado_sse_redis_outages_total" in metrics


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_resume_on_b_with_an_id_from_a(cluster: tuple[RedisServer, Hub, Hub]) -> None:
    _, a, b = cluster
    on_a = await a.stream("channel=resume")
    await on_a.read_until(lambda s: s.parser.last_event_id != "")
    seen = a.publish("resume", "seen")
    await on_a.events_count(1)
    on_a.close()  # the client drops, and reconnects to the other host
    missed = [a.publish("resume", f"missed {n}") for n in range(3)]
    on_b = await b.stream("channel=resume", headers={"Last-Event-ID": seen})
    events = await on_b.events_count(3)
    assert [e.id for e in events] == missed
    assert b"stream-reset" not in on_b.raw
    live = a.publish("resume", "live")
    events = await on_b.events_count(4)
    assert events[-1].id == live
    on_b.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_redis_restart_health_publish_and_stream_reset(
    cluster: tuple[RedisServer, Hub, Hub],
) -> None:
    server, a, b = cluster
    on_b = await b.stream("channel=outage")
    await on_b.read_until(lambda s: s.parser.last_event_id != "")
    before = a.publish("outage", "before")
    await on_b.events_count(1)

    server.kill()
    await wait_until(lambda: a.health() == 503 and b.health() == 503, TIMEOUT)
    reply = a.post("outage", "lost")
    assert reply.status_code == 503, reply.text
    assert PASSWORD not in reply.text
    shed = await b.stream("channel=new-while-down")
    await shed.read_to_end()
    assert shed.status == 200 and "retry-after" in shed.headers
    assert shed.events == []

    # Stand in for a Redis that accepts and drops connections, until the hubs have tried to
    # reconnect several times: the outage must still be logged once by each.
    attempts = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    listener = await asyncio.start_server(drop, "127.0.0.1", server.port)
    await wait_until(lambda: attempts >= 8, TIMEOUT)
    listener.close()
    await listener.wait_closed()
    server.start()  # empty: the events Redis held are gone
    await wait_until(lambda: a.health() == 200 and b.health() == 200, TIMEOUT)
    await on_b.read_until(lambda s: any(e.event == "stream-reset" for e in s.events))
    reset = next(e for e in on_b.events if e.event == "stream-reset")
    assert reset.id is not None and reset.id != before
    after = a.publish("outage", "after")
    await on_b.read_until(lambda s: s.events[-1].data == "after")
    assert on_b.events[-1].id == after
    on_b.close()
    # Resume with an id from before the loss: told of the gap, never silently skipped.
    again = await a.stream("channel=outage", headers={"Last-Event-ID": before})
    await again.read_until(lambda s: len(s.events) >= 1)
    assert again.events[0].event == "stream-reset"
    again.close()
    for hub in (a, b):
        log = hub.log()
        # each outage logged once, however many reconnection attempts it took, without the
        # password (the address is logged as scheme://host:port/db)
        address = f"redis at redis://127.0.0.1:{server.port}/0"
        assert log.count(f"{address} unreachable (") == 1, log
        assert log.count(f"{address} is back") == 1, log
        assert PASSWORD not in log
