"""Test helpers: a raw HTTP/1.1 event-stream reader on asyncio sockets, bounded waits, ports.

The reader is deliberately independent of Tornado's HTTP client: it speaks HTTP/1.1 over a plain
socket, decodes chunked framing itself and parses with the sans-I/O parser, so tests see exactly
the bytes the server wrote.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from tornado_sse.protocol import Event, EventStreamParser

DEFAULT_TIMEOUT = 10.0
#: what ``tornado-sse serve`` and ``tornado-sse demo`` say when their port is taken: the port
#: `free_port` found was bound by another process before the server bound it
PORT_TAKEN = "Address already in use"
#: servers started on a free port try this many ports before giving up
PORT_ATTEMPTS = 5
#: the TLS context of the tests' one-off requests (``httpx.get(url, verify=TLS)``): ``httpx.get``
#: and ``httpx.post`` make a client per call, and each client built a context of its own from
#: the CA bundle, 30 ms a request, even of a plain http:// URL (half a minute of a CI run)
TLS = ssl.create_default_context()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM *proc* (a graceful shutdown) and wait; SIGKILL it if it lingers. Idempotent."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def listens_on(proc: subprocess.Popen[Any], port: int, timeout: float = 20.0) -> bool:
    """Wait (bounded) until *proc* listens on TCP *port* (True) or exits (False)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            connections = psutil.Process(proc.pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            break
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            return True
        if time.monotonic() > deadline:
            raise AssertionError(f"process {proc.pid} did not listen on {port} in {timeout}s")
        time.sleep(0.02)
    return False


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux; else the IANA one)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            low, high = ports.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def free_port() -> int:
    """A loopback TCP port nothing is bound to now, for a server to listen on.

    Chosen below the kernel's ephemeral range when it can be: a port of that range (what
    binding port 0 gives) can be taken, between this check and the server's bind, as the local
    port of any outgoing connection on the machine, and the server then fails with "Address
    already in use" (seen under load: the README's examples, the hub's tests)."""
    low, _ = _ephemeral_ports()
    candidates = range(max(1024, low - 16384), low)
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(
    condition: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.005
) -> Any:
    """Poll *condition* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        await asyncio.sleep(interval)


class RawStream:
    """One ``GET`` of an event stream over a raw socket.

    Streams a test leaves open are closed, and every stream's socket is released, before its
    event loop ends (``io_loop`` in conftest).
    """

    #: streams opened since the last ``io_loop`` ended
    opened: list[RawStream] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.loop: asyncio.AbstractEventLoop | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.header_lines: list[tuple[str, str]] = []
        self.parser = EventStreamParser()
        self.raw = b""  # decoded body bytes received so far
        self.events: list[Event] = []
        self.ended = False
        #: the response ended with HTTP/1.1's last chunk (not only a closed connection)
        self.last_chunk = False
        #: the connection ended with a reset (the server aborted it)
        self.reset = False
        #: sizes of the HTTP/1.1 chunks of the body received so far, in order (the server
        #: writes each chunk in one write, so this counts its writes)
        self.chunk_sizes: list[int] = []
        self._chunked = False
        self._remaining: int | None = None
        self._buffer = b""

    @classmethod
    async def open(
        cls,
        port: int,
        path: str,
        headers: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        method: str = "GET",
        timeout: float = DEFAULT_TIMEOUT,
        rcvbuf: int | None = None,
        source: str | None = None,
    ) -> RawStream:
        """*source*: the client's own address (``127.0.0.2``: any of 127.0.0.0/8 is local)."""
        sock = socket.socket()
        if source is not None:
            sock.bind((source, 0))
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        self = cls(reader, writer)
        self.loop = asyncio.get_running_loop()
        cls.opened.append(self)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        await asyncio.wait_for(self._read_head(), timeout)
        return self

    async def _read_head(self) -> None:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(":")
            self.header_lines.append((name.strip(), value.strip()))
            self.headers[name.strip().lower()] = value.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        length = self.headers.get("content-length")
        self._remaining = int(length) if length is not None else None
        if self._remaining == 0:
            self.ended = True

    async def _read_some(self) -> bool:
        try:
            data = await self.reader.read(1 << 16)
        except ConnectionResetError:  # the server aborted the connection (a slow consumer)
            self.reset = True
            data = b""
        if not data:
            self.ended = True
            self.events.extend(self.parser.close())
            self.close()  # the server closed the connection: so do we
            return False
        if not self._chunked:
            self._body(data)
            if self._remaining is not None:
                self._remaining -= len(data)
                if self._remaining <= 0:
                    self.ended = True
                    self.events.extend(self.parser.close())
                    return False
            return True
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                break
            size = int(self._buffer[:end].split(b";")[0], 16)
            if len(self._buffer) < end + 2 + size + 2:
                break
            chunk = self._buffer[end + 2 : end + 2 + size]
            self._buffer = self._buffer[end + 2 + size + 2 :]
            if size == 0:
                self.ended = True
                self.last_chunk = True
                self.events.extend(self.parser.close())
                return False
            self.chunk_sizes.append(size)
            self._body(chunk)
        return True

    def _body(self, data: bytes) -> None:
        self.raw += data
        self.events.extend(self.parser.feed(data))

    async def read_until(
        self, condition: Callable[[RawStream], Any], timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """Read until ``condition(self)`` holds; fail after *timeout* or if the stream ends."""

        async def run() -> None:
            while not condition(self):
                if self.ended:
                    raise AssertionError(f"stream ended before condition; raw={self.raw[-500:]!r}")
                await self._read_some()

        await asyncio.wait_for(run(), timeout)

    async def events_count(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> list[Event]:
        await self.read_until(lambda s: len(s.events) >= count, timeout)
        return self.events

    async def read_to_end(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        async def run() -> None:
            while not self.ended:
                await self._read_some()

        await asyncio.wait_for(run(), timeout)

    def close(self) -> None:
        self.writer.close()
