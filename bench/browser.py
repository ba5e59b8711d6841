"""Browser-like event streams for the restart storm (``tornado-sse bench storm``).

A load generator worker (`tornado_sse.bench.loadgen`) holds thousands of these. Each one is
what an ``EventSource`` does, reduced to what the storm measures: it follows one channel, keeps
the last ``id:`` and ``retry:`` it saw, and when its connection ends it waits that ``retry:``
and connects again with ``Last-Event-ID``. It is also what a load balancer adds: a stream has
a list of hub addresses, and a connection that cannot be made (refused, reset before the
response head) moves on to the next one at once; only when every address failed does it wait
``retry:`` again.

Checks, per stream, on the benchmark's payload (``data: <seq> <publish ns> ...``, the sequence
numbered per channel): a sequence number that skips ahead opens a gap (lost, unless it arrives
later: reordered); one at or below the last that fills no gap is a duplicate. A skip right after
a ``stream-reset`` event is counted apart (*missed after a reset*): the hub announced it; so
are the events a stream lacks at the end when no event has come after its reset yet.
Publishes whose answer was lost (the publisher cannot tell whether they happened) are given at
report time and never counted as lost.

Deliberately small wire handling: the hub's responses are HTTP/1.1 with chunked bodies and LF
line ends (the hub's encoder); the body is de-chunked and cut into events at blank lines. It is
a load generator's parser, not a general one (`tornado_sse.protocol` is that, and it is under
test here, so it is not used).

Standard library only.
"""

from __future__ import annotations

import array
import asyncio
import collections
import os
import re
import socket
import sys
import time
from typing import Any

monotonic_ns = time.monotonic_ns

#: the reconnection time before a stream has seen a ``retry:`` (browsers use about 3 s)
DEFAULT_RETRY_MS = 3000
#: a response head that takes longer than this is given up (the connection aborted, retried)
HEAD_TIMEOUT = 30.0
PAYLOAD = re.compile(rb"(\d+) (\d+) ")
#: steps of a stream kept for the report of a stream with a gap
TRACE = 24

#: Linux: bind() picks the local port at connect() time (see loadgen.py)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class _Link(asyncio.Protocol):
    """One connection of a `Stream`; forwards to it while it is the stream's current one."""

    __slots__ = ("stream", "transport")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stream.connection_made(self)

    def data_received(self, data: bytes) -> None:
        if self.stream.link is self:
            self.stream.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.stream.link is self:
            self.stream.connection_lost()


class Stream:
    """One browser-like stream of one channel, over as many connections as it takes."""

    def __init__(self, group: StreamGroup, channel: str, urls: list[tuple[str, int]]) -> None:
        self.group = group
        self.channel = channel
        self.urls = urls
        self.url_index = 0
        self.link: _Link | None = None
        self.head: bytes | None = b""
        self.chunked = False
        #: bytes of the current chunk still to come; -1: a size line, -2: the CRLF after the
        #: data, -3: past the last chunk
        self.chunk_left = -1
        self.raw = b""
        self.text = b""
        self.connected = False
        self.stopped = False
        self.last_id: str | None = None
        self.retry_ms = DEFAULT_RETRY_MS
        self.last = 0
        self.gaps: set[int] = set()
        self.dups = 0
        self.reorders = 0
        self.resets = 0
        self.after_reset = False
        self.missed_after_reset: list[int] = []
        self.closed_at = 0  # monotonic ns of the loss of the connection being made up for
        self.retry_at_close = 0
        self.closes = 0
        self.back_at = 0
        self.failed_connects = 0
        self.refused_status = 0
        self._head_timer: asyncio.TimerHandle | None = None
        #: the stream's last steps (connects, heads, resets, events, closes), to explain a gap
        self.trace: collections.deque[str] = collections.deque(maxlen=TRACE)

    # ------------------------------------------------------------------ connecting

    def request(self) -> bytes:
        host, port = self.urls[self.url_index]
        resume = f"Last-Event-ID: {self.last_id}\r\n" if self.last_id else ""
        return (
            f"GET /events?channel={self.channel} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n{resume}\r\n"
        ).encode()

    async def connect(self) -> None:
        """Connect, failing over along the addresses; after a whole round failed, wait
        ``retry:`` and start again. Returns once a connection is made (its head pending)."""
        loop = asyncio.get_running_loop()
        failed = 0
        while not self.stopped:
            host, port = self.urls[self.url_index]
            link = _Link(self)
            self.link = link
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if sys.platform.startswith("linux"):
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.group.src, 0))
                sock.setblocking(False)
                await loop.sock_connect(sock, (host, port))
                await loop.create_connection(lambda link=link: link, sock=sock)
                return
            except OSError:
                sock.close()
                self.link = None
                self.failed_connects += 1
                failed += 1
                self.url_index = (self.url_index + 1) % len(self.urls)
                if failed % len(self.urls) == 0:
                    await asyncio.sleep(self.retry_ms / 1000)

    def connection_made(self, link: _Link) -> None:
        self.head = b""
        self.chunked = False
        self.chunk_left = -1
        self.raw = self.text = b""
        assert link.transport is not None
        link.transport.write(self.request())
        self.trace.append(f"connect {self.urls[self.url_index][1]} last-id={self.last_id}")
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(HEAD_TIMEOUT, self._head_overdue, link)

    def _head_overdue(self, link: _Link) -> None:
        if self.link is link and self.head is not None and link.transport is not None:
            link.transport.abort()

    def _on_head(self, head: bytes) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ")
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        self.chunked = headers.get(b"transfer-encoding") == b"chunked"
        self.trace.append(f"head {status}{' shed' if b'retry-after' in headers else ''}")
        if status != 200:
            self.refused_status += 1
            return
        if b"retry-after" in headers:  # shed: a 200 with only retry:, closed at once
            return
        self.connected = True
        now = monotonic_ns()
        self.back_at = now
        if self.closed_at:
            self.group.outages.append(now - self.closed_at)
            self.closed_at = 0

    def connection_lost(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.link = None
        if self.stopped:
            return
        now = monotonic_ns()
        self.trace.append("closed")
        if self.connected or not self.closed_at:
            self.closes += 1
            self.closed_at = now
            self.group.closes.append(now)
            self.group.retries.append(self.retry_ms)
        self.connected = False
        asyncio.get_running_loop().call_later(self.retry_ms / 1000, self._reconnect, now)

    def _reconnect(self, lost_at: int) -> None:
        if self.stopped:
            return
        self.group.delays.append(monotonic_ns() - lost_at)
        task = asyncio.ensure_future(self.connect())
        self.group.tasks.add(task)
        task.add_done_callback(self.group.tasks.discard)

    def close(self) -> None:
        self.stopped = True
        link = self.link
        self.link = None
        if link is not None and link.transport is not None:
            link.transport.abort()

    # ------------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            head = self.head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self.head = head
                return
            self.head = None
            self._on_head(head[:end])
            data = head[end + 4 :]
        if not self.chunked:
            self._feed(data)
            return
        raw = self.raw + data if self.raw else data
        pos = 0
        size = len(raw)
        body = []
        while pos < size:
            state = self.chunk_left
            if state == -1:  # a size line
                eol = raw.find(b"\r\n", pos)
                if eol < 0:
                    break
                length = int(raw[pos:eol].split(b";")[0], 16)
                pos = eol + 2
                self.chunk_left = length if length else -3
            elif state == -2:  # the CRLF after a chunk's data
                if size - pos < 2:
                    break
                pos += 2
                self.chunk_left = -1
            elif state == -3:  # after the last chunk: the hub ended the response
                pos = size
            else:
                take = min(state, size - pos)
                body.append(raw[pos : pos + take])
                pos += take
                self.chunk_left = state - take or -2
        self.raw = raw[pos:]
        if body:
            self._feed(b"".join(body))

    def _feed(self, data: bytes) -> None:
        text = self.text + data if self.text else data
        start = 0
        while True:
            end = text.find(b"\n\n", start)
            if end < 0:
                break
            self._event(text[start:end])
            start = end + 2
        self.text = text[start:]

    def _event(self, block: bytes) -> None:
        name = b""
        data = None
        for line in block.split(b"\n"):
            field, _, value = line.partition(b": ")
            if field == b"data":
                data = value
            elif field == b"id":
                self.last_id = value.decode()
            elif field == b"event":
                name = value
            elif field == b"retry" and value.isdigit():
                self.retry_ms = int(value)
        if name == b"stream-reset":
            self.trace.append(f"stream-reset id={self.last_id}")
            self.resets += 1
            self.after_reset = True
            return
        if data is None:
            return
        match = PAYLOAD.match(data)
        if match is None:
            return
        seq = int(match.group(1))
        now = monotonic_ns()
        last = self.last
        if seq == last + 1:
            self.last = seq
        elif seq > last:
            if self.after_reset:
                self.missed_after_reset.extend(range(last + 1, seq))
            else:
                self.gaps.update(range(last + 1, seq))
                self.trace.append(f"gap {last + 1}-{seq - 1}")
            self.last = seq
        elif seq in self.gaps:
            self.gaps.discard(seq)
            self.reorders += 1
        else:
            self.dups += 1
            return
        self.after_reset = False
        self.trace.append(f"{seq} id={self.last_id}")
        stamp = int(match.group(2))
        group = self.group
        if stamp < self.back_at:  # published before this connection was up: a replay
            group.replay_stamps.append(stamp)
            group.replay_latencies.append(now - stamp)
        else:
            group.stamps.append(stamp)
            group.latencies.append(now - stamp)


class StreamGroup:
    """The storm's streams of one load generator worker, and what they saw."""

    def __init__(self, index: int, workdir: str, src: str) -> None:
        self.index = index
        self.workdir = workdir
        self.src = src
        self.streams: list[Stream] = []
        self.tasks: set[asyncio.Future[Any]] = set()
        #: publish time and publish-to-receive latency of every live delivery (ns)
        self.stamps: array.array[int] = array.array("q")
        self.latencies: array.array[int] = array.array("q")
        #: the same for replayed deliveries: events published before their stream's connection
        #: was up, sent on its resume
        self.replay_stamps: array.array[int] = array.array("q")
        self.replay_latencies: array.array[int] = array.array("q")
        #: when a connection was lost (monotonic ns), and the retry: the stream held then (ms)
        self.closes: list[int] = []
        self.retries: list[int] = []
        #: from a loss to the reconnect attempt it waited for (ns)
        self.delays: list[int] = []
        #: from the loss of a stream's connection to its next 200 response head (ns)
        self.outages: list[int] = []

    async def open(
        self, count: int, offset: int, channels: int, urls: list[list[Any]], timeout: float
    ) -> dict[str, Any]:
        """Open *count* streams, stream *i* of the run following channel ``storm-<i % channels>``
        and starting at address ``i % len(urls)``; answer once every one has its head."""
        addresses = [(str(host), int(port)) for host, port in urls]
        fresh = []
        for i in range(offset, offset + count):
            stream = Stream(self, f"storm-{i % channels}", addresses)
            stream.url_index = i % len(addresses)
            fresh.append(stream)
        self.streams += fresh
        gate = asyncio.Semaphore(500)

        async def one(stream: Stream) -> None:
            async with gate:
                await stream.connect()

        await asyncio.wait_for(asyncio.gather(*(one(s) for s in fresh)), timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(s.connected for s in fresh):
            await asyncio.sleep(0.01)
        return {"ok": True, "connected": sum(s.connected for s in fresh)}

    def begin(self) -> dict[str, Any]:
        """The storm starts: forget the closes and reconnects of the opening and steady phases
        (a response head that took longer than `HEAD_TIMEOUT` while thousands opened)."""
        for group in (self.closes, self.retries, self.delays, self.outages):
            group.clear()
        for stream in self.streams:
            stream.closes = stream.failed_connects = stream.refused_status = 0
        return {"ok": True, "down": sum(not s.connected for s in self.streams)}

    def status(self) -> dict[str, Any]:
        return {
            "ok": True,
            "down": sum(not s.connected for s in self.streams),
            "closes": len(self.closes),
        }

    async def wait(self, lasts: dict[str, int], timeout: float) -> dict[str, Any]:
        """Wait until every stream is connected and has its channel's event *lasts[channel]*."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            behind = sum(
                1 for s in self.streams if not s.connected or s.last < lasts.get(s.channel, 0)
            )
            if not behind:
                break
            await asyncio.sleep(0.01)
        return {"ok": True, "behind": behind}

    def report(self, lasts: dict[str, int], unknown: dict[str, list[int]]) -> dict[str, Any]:
        """Counts over every stream; *unknown*: per channel, the publishes whose answer was lost
        (not counted as lost when missing)."""
        maybe = {channel: set(seqs) for channel, seqs in unknown.items()}
        lost = missed = 0
        stories = []
        for s in self.streams:
            skip = maybe.get(s.channel, set())
            holes = set(s.gaps)
            tail = range(s.last + 1, lasts.get(s.channel, 0) + 1)
            announced = set(s.missed_after_reset)
            # a reset with no event after it yet: what it skipped is announced too
            (announced if s.after_reset else holes).update(tail)
            silent = holes - skip
            lost += len(silent)
            if silent and len(stories) < 5:
                stories.append({"channel": s.channel, "lost": sorted(silent), "trace": [*s.trace]})
            missed += len(announced - skip)
        name = os.path.join(self.workdir, f"storm-{self.index}.bin")
        with open(name, "wb") as fh:
            for samples in (self.stamps, self.latencies, self.replay_stamps, self.replay_latencies):
                samples.tofile(fh)
        return {
            "ok": True,
            "streams": len(self.streams),
            "connected": sum(s.connected for s in self.streams),
            "lost": lost,
            "lost_stories": stories,
            "missed_after_reset": missed,
            "duplicated": sum(s.dups for s in self.streams),
            "reordered": sum(s.reorders for s in self.streams),
            "stream_resets": sum(s.resets for s in self.streams),
            "streams_reset": sum(1 for s in self.streams if s.resets),
            "streams_closed": sum(1 for s in self.streams if s.closes),
            "closes": self.closes,
            "retries": self.retries,
            "delays": self.delays,
            "outages": self.outages,
            "back_at": [s.back_at for s in self.streams if s.closes],
            "failed_connects": sum(s.failed_connects for s in self.streams),
            "refused_status": sum(s.refused_status for s in self.streams),
            "deliveries": len(self.stamps),
            "replayed": len(self.replay_stamps),
            "samples_file": name,
        }

    def close(self) -> dict[str, Any]:
        for stream in self.streams:
            stream.close()
        for task in list(self.tasks):
            task.cancel()
        count = len(self.streams)
        self.streams = []
        return {"ok": True, "closed": count}
