"""The hub at its limits (issue 12, item 4): out of file descriptors, and idle connections.

A real ``tornado-sse serve`` process, started under a low open-file limit (``RLIMIT_NOFILE`` set
in the child before exec) where needed, and raw loopback clients.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import TLS, RawStream, free_port, wait_until
from tests.test_server import TOKEN, Hub

#: the hub's open-file limit in the exhaustion test, and how many clients go past it
NOFILE = 64
CLIENTS = 70
EXHAUSTED = "out of file descriptors"


def start_limited_hub(log_path: Path, *flags: str, nofile: int | None = None) -> Hub:
    """A hub on a free port (open-file limit *nofile*), once /healthz answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "tornado_sse.cli", "serve", "--port", str(port)]
    command += ["--public-channel", "*", "--metrics-public", *flags]
    preexec: Callable[[], None] | None = None
    if nofile is not None:
        limit = nofile

        def preexec() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    env = {**os.environ, "TORNADO_SSE_TOKEN": TOKEN}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec
        )
    hub = Hub(proc, port, log_path)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"hub exited with {proc.returncode}:\n{hub.log()}")
        try:
            if httpx.get(hub.url + "/healthz", timeout=1, verify=TLS).status_code == 200:
                return hub
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            hub.stop()
            raise AssertionError(f"hub did not become healthy:\n{hub.log()}")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@pytest.mark.gen_test(timeout=60)
async def test_out_of_descriptors_backs_off_and_recovers(tmp_path: Path) -> None:
    hub = start_limited_hub(
        tmp_path / "hub.log", "--heartbeat", "1", "--idle-connection-timeout", "60", nofile=NOFILE
    )
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        # More stream requests than the hub has descriptors: the first become streams (which
        # are not idle, so nothing can be closed to make room), the rest wait in the backlog.
        request = b"GET /events?channel=fd HTTP/1.1\r\nHost: hub\r\n\r\n"
        for _ in range(CLIENTS):
            reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
            writer.write(request)
            clients.append((reader, writer))
        process = psutil.Process(hub.proc.pid)
        await wait_until(lambda: process.num_fds() >= NOFILE, timeout=15)
        # A spin detector, not a speed claim: spinning on accept() burns the whole window.
        before = cpu_seconds(hub.proc.pid)
        await asyncio.sleep(2.0)
        used = cpu_seconds(hub.proc.pid) - before
        assert used < 0.3, f"hub used {used:.2f}s of CPU in a 2 s window:\n{hub.log()[-3000:]}"
        log = hub.log()
        assert EXHAUSTED in log
        about_it = [line for line in log.splitlines() if "descriptors" in line]
        assert 1 <= len(about_it) <= 2, "\n".join(about_it[:10])
        assert "Traceback" not in log
        assert hub.proc.poll() is None
        # The streams already open are still served: their heartbeats keep coming.
        reader = clients[0][0]
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # the response head
        while True:  # what was sent before now
            try:
                await asyncio.wait_for(reader.read(65536), 0.05)
            except asyncio.TimeoutError:
                break
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert b":" in chunk, chunk
    finally:
        for _, writer in clients:
            writer.close()
    # Once the clients leave, the hub answers again, and a new stream opens.
    try:

        async def healthy() -> bool:
            try:
                reply = await asyncio.to_thread(httpx.get, hub.url + "/healthz", timeout=2)
            except httpx.TransportError:
                return False
            return reply.status_code == 200

        await wait_until(healthy, timeout=15, interval=0.1)
        stream = await RawStream.open(hub.port, "/events?channel=after")
        assert stream.status == 200
        await stream.read_until(lambda s: s.parser.last_event_id != "")
        stream.close()
        assert "accepting connections again" in hub.log()
    finally:
        hub.stop()


@pytest.mark.gen_test(timeout=30)
async def test_idle_connections_are_bounded_oldest_first(tmp_path: Path) -> None:
    hub = start_limited_hub(tmp_path / "hub.log", "--max-idle-connections", "3")
    try:
        socks = []
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", hub.port))
            socks.append(sock)
            await asyncio.sleep(0)  # nothing sent: an idle connection each
        # The two idle for longest are closed (the peer sees EOF); the three newest stay.
        for sock in socks[:2]:
            sock.settimeout(10)
            assert await asyncio.to_thread(sock.recv, 1) == b""

        def still_open(sock: socket.socket) -> bool:
            sock.setblocking(False)
            try:
                return sock.recv(1) != b""
            except BlockingIOError:
                return True

        assert all(still_open(sock) for sock in socks[2:])
        for sock in socks:
            sock.close()
        metrics = await asyncio.to_thread(hub.metrics)
        assert metrics["tornado_sse_idle_connections_closed_total"] >= 2
    finally:
        hub.stop()


@pytest.mark.gen_test(timeout=30)
async def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(
    tmp_path: Path,
) -> None:
    """The idle timeout bounds every wait for a request head: none at all, half of one (a
    slowloris), or the next one on a keep-alive connection. A stream is not idle: it lives on
    past the timeout and keeps receiving events."""
    hub = start_limited_hub(tmp_path / "hub.log", "--idle-connection-timeout", "1")
    try:
        stream = await RawStream.open(hub.port, "/events?channel=alive")
        await stream.read_until(lambda s: s.parser.last_event_id != "")
        silent = socket.create_connection(("127.0.0.1", hub.port))
        half = socket.create_connection(("127.0.0.1", hub.port))
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        kept = socket.create_connection(("127.0.0.1", hub.port))
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        opened = time.monotonic()
        for sock in (silent, half, kept):
            sock.settimeout(10)

        def read_all(sock: socket.socket) -> bytes:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

        replies = await asyncio.gather(
            *(asyncio.to_thread(read_all, s) for s in (silent, half, kept))
        )
        waited = time.monotonic() - opened
        assert replies[0] == b""  # closed by the hub, not by us
        assert replies[1] == b""
        assert replies[2].startswith(b"HTTP/1.1 200 ")  # answered, then closed once idle
        assert waited >= 0.9  # not before the timeout
        for sock in (silent, half, kept):
            sock.close()
        async with httpx.AsyncClient() as client:
            await hub.apublish(client, "alive", "still here")
        await stream.events_count(1)
        assert [e.data for e in stream.events] == ["still here"]
        stream.close()
    finally:
        hub.stop()
