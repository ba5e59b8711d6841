"""A load generator worker: thousands of raw event-stream clients in one process.

The harness starts several of these (pinned to the load generator's core, each with its own
127.0.0.x source address, since one process may hold at most as many sockets as its open-file
limit allows) and drives them with JSON lines on stdin; each command is answered with one JSON
line on stdout. Clients are bare `asyncio.Protocol` objects, no HTTP library: a request, the
response head, then the body scanned for the benchmark's payload (``data: <seq> <ns> ...``)
with one regular expression per read, whatever the framing (chunked or not, LF or CRLF).

Each client checks its events as they arrive: a sequence number that skips ahead opens a gap
(lost, unless it arrives later, which is then counted as reordered); one at or below the last,
not in a gap, is a duplicate. Latency is the receive time minus the publish time carried in the
event, both on the machine-wide monotonic clock.

Commands (``cmd`` and its arguments):

``connect`` n, host, port, path, src, concurrency
    open *n* more streams; answers when every one has its response head (or failed).
``begin`` first, latency
    start a measured run whose first event is *first*; ``latency`` records every latency.
``wait`` last, timeout
    wait until every open stream has event *last*, then report the run.
``close`` n (optional)
    close *n* streams (all by default) and report how many were closed by the server before.
``churn`` host, port, path, src, duration, clients, min_life, max_life
    keep *clients* short-lived streams cycling for *duration* seconds; report their checks.
``publish_http`` host, port, path, count, rate, size
    POST *count* payloads to an HTTP publisher (Nchan), one at a time over one connection.
``stall`` n
    make *n* streams stop reading (slow consumers); they are left out of the checks (they
    cannot tell whether the server cut them off: the harness asks the server).
``storm_open`` n, offset, channels, urls, src, timeout
    open *n* browser-like streams (`tornado_sse.bench.browser`): they reconnect by themselves,
    honour ``retry:``, resume with ``Last-Event-ID`` and fail over along *urls*.
``storm_begin``, ``storm_status``, ``storm_wait`` lasts, timeout, ``storm_report`` lasts,
unknown, ``storm_close``
    the storm starts (what came before is not counted); how many of them are down; wait until
    all are back and caught up; their counts.
``stats``, ``quit``
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import random
import socket
import sys
import time
from typing import Any

from .browser import StreamGroup
from .events import DEFAULT_SIZE, PAYLOAD, make_payload

monotonic_ns = time.monotonic_ns
find_payloads = PAYLOAD.findall
match_payload = PAYLOAD.match

#: a partial ``data: <seq> <ns> `` line is never longer than this
_MAX_HEAD = 48


class Client(asyncio.Protocol):
    """One event stream: request, response head, then payload checks."""

    __slots__ = (
        "closed_by_server",
        "connected",
        "dups",
        "first",
        "gaps",
        "head",
        "last",
        "last_recv",
        "latencies",
        "n",
        "reorders",
        "request",
        "status",
        "tail",
        "transport",
    )

    def __init__(self, request: bytes, connected: asyncio.Future[Client] | None) -> None:
        self.transport: asyncio.Transport | None = None
        self.connected = connected
        self.head: bytes | None = b""
        self.status = 0
        self.tail = b""
        self.last = -1  # -1: accept any first event
        self.first = -1
        self.n = 0
        self.dups = 0
        self.reorders = 0
        self.gaps: set[int] | None = None
        self.last_recv = 0
        self.latencies: array.array[int] | None = None
        self.closed_by_server = False
        self.request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        head = self.head
        if head is not None:
            head += data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self.head = head
                return
            self.head = None
            line = head[: head.find(b"\r\n")].split(b" ")
            self.status = int(line[1]) if len(line) > 1 and line[1].isdigit() else 0
            connected = self.connected
            if connected is not None and not connected.done():
                connected.set_result(self)
            data = head[end + 4 :]
            if not data:
                return
        buf = self.tail + data if self.tail else data
        size = len(buf)
        i = buf.rfind(b"data: ", size - _MAX_HEAD if size > _MAX_HEAD else 0)
        if i >= 0:
            m = match_payload(buf, i)
            if m is None:
                found = find_payloads(buf, 0, i)
                self.tail = buf[i:]
            else:
                found = find_payloads(buf)
                end = m.end()
                self.tail = buf[end if end > size - 5 else size - 5 :]
        else:
            found = find_payloads(buf)
            self.tail = buf[-5:]
        if not found:
            return
        now = monotonic_ns()
        self.last_recv = now
        lat = self.latencies
        last = self.last
        for seq_text, stamp in found:
            seq = int(seq_text)
            if seq == last + 1 or last < 0:
                last = seq
                self.n += 1
                if self.first < 0:
                    self.first = seq
            elif seq > last:
                gaps = self.gaps
                if gaps is None:
                    gaps = self.gaps = set()
                gaps.update(range(last + 1, seq))
                last = seq
                self.n += 1
            elif self.gaps is not None and seq in self.gaps:
                self.gaps.discard(seq)
                self.reorders += 1
                self.n += 1
            else:
                self.dups += 1
                continue
            if lat is not None:
                lat.append(now - int(stamp))
        self.last = last

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.closed_by_server = True
        self.transport = None
        connected = self.connected
        if connected is not None and not connected.done():
            connected.set_exception(ConnectionError(f"closed before the response head: {exc}"))

    def reset(self, first: int, latencies: array.array[int] | None) -> None:
        self.last = first - 1
        self.first = -1
        self.n = 0
        self.dups = 0
        self.reorders = 0
        self.gaps = None
        self.latencies = latencies

    def close(self) -> None:
        transport = self.transport
        self.transport = None
        if transport is not None:
            transport.abort()


#: Linux: bind() picks the local port at connect() time; without it, bind((ip, 0)) searches the
#: ports in use and connecting thousands of sockets from one address slows to a crawl
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def open_stream(client: Client, host: str, port: int, src: str) -> None:
    """Connect *client* from source address *src*."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if sys.platform.startswith("linux"):
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((src, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        await loop.create_connection(lambda: client, sock=sock)
    except BaseException:
        sock.close()
        raise


def _request(host: str, port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
    ).encode()


class Worker:
    def __init__(self, index: int, latency_dir: str) -> None:
        self.index = index
        self.latency_dir = latency_dir
        self.clients: list[Client] = []
        #: clients that stopped reading (slow consumers), left out of the checks
        self.stalled: list[Client] = []
        self.latencies: array.array[int] | None = None
        self.run_first = 0
        self.storm: StreamGroup | None = None

    async def storm_open(
        self,
        n: int,
        offset: int,
        channels: int,
        urls: list[list[Any]],
        src: str,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        if self.storm is None:
            self.storm = StreamGroup(self.index, self.latency_dir, src)
        return await self.storm.open(n, offset, channels, urls, timeout)

    async def storm_begin(self) -> dict[str, Any]:
        assert self.storm is not None
        return self.storm.begin()

    async def storm_status(self) -> dict[str, Any]:
        assert self.storm is not None
        return self.storm.status()

    async def storm_wait(self, lasts: dict[str, int], timeout: float) -> dict[str, Any]:
        assert self.storm is not None
        return await self.storm.wait(lasts, timeout)

    async def storm_report(
        self, lasts: dict[str, int], unknown: dict[str, list[int]]
    ) -> dict[str, Any]:
        assert self.storm is not None
        return self.storm.report(lasts, unknown)

    async def storm_close(self) -> dict[str, Any]:
        group, self.storm = self.storm, None
        return group.close() if group is not None else {"ok": True, "closed": 0}

    async def connect(
        self, n: int, host: str, port: int, path: str, src: str, concurrency: int = 1000
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        request = _request(host, port, path)
        gate = asyncio.Semaphore(concurrency)
        errors: dict[str, int] = {}
        bad_status: dict[int, int] = {}

        async def one() -> None:
            async with gate:
                connected: asyncio.Future[Client] = loop.create_future()
                client = Client(request, connected)
                try:
                    await open_stream(client, host, port, src)
                    await asyncio.wait_for(connected, 10)
                except (OSError, asyncio.TimeoutError) as exc:
                    key = type(exc).__name__
                    errors[key] = errors.get(key, 0) + 1
                    client.close()
                    return
                if client.status != 200:
                    bad_status[client.status] = bad_status.get(client.status, 0) + 1
                    client.close()
                    return
                client.connected = None
                self.clients.append(client)

        t0 = monotonic_ns()
        await asyncio.gather(*(one() for _ in range(n)))
        t1 = monotonic_ns()
        return {
            "ok": True,
            "t0": t0,
            "t1": t1,
            "connected": len(self.clients),
            "errors": errors,
            "status": {str(k): v for k, v in bad_status.items()},
        }

    def begin(self, first: int, latency: bool) -> dict[str, Any]:
        self.latencies = array.array("q") if latency else None
        self.run_first = first
        self.clients = [c for c in self.clients if c.transport is not None]
        for client in self.clients:
            client.reset(first, self.latencies)
            client.last_recv = 0
        return {"ok": True, "clients": len(self.clients)}

    def stall(self, n: int) -> dict[str, Any]:
        """Make *n* streams stop reading: slow consumers, left out of the delivery checks."""
        chosen = [c for c in self.clients if c.transport is not None][:n]
        for client in chosen:
            assert client.transport is not None
            client.transport.pause_reading()
            self.clients.remove(client)
            self.stalled.append(client)
        return {"ok": True, "stalled": len(chosen)}

    async def wait(self, last: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        clients = self.clients
        while time.monotonic() < deadline:
            if all(c.last >= last or c.transport is None for c in clients):
                break
            await asyncio.sleep(0.005)
        return self.report(last)

    def report(self, last: int) -> dict[str, Any]:
        expected = max(0, last - self.run_first + 1)
        received = lost = dups = reorders = dropped = 0
        last_recv = 0
        for c in self.clients:
            received += c.n
            dups += c.dups
            reorders += c.reorders
            missing = len(c.gaps) if c.gaps else 0
            if c.last < last:
                missing += last - max(c.last, self.run_first - 1)
            lost += missing
            if c.transport is None:
                dropped += 1
            if c.last_recv > last_recv:
                last_recv = c.last_recv
        latency_file = None
        if self.latencies is not None and len(self.latencies):
            latency_file = os.path.join(self.latency_dir, f"lat-{self.index}-{last}.bin")
            with open(latency_file, "wb") as fh:
                self.latencies.tofile(fh)
        return {
            "ok": True,
            "clients": len(self.clients),
            "expected": expected * len(self.clients),
            "received": received,
            "lost": lost,
            "duplicated": dups,
            "reordered": reorders,
            "dropped": dropped,
            "last_recv": last_recv,
            "latency_file": latency_file,
            "stalled": len(self.stalled),
        }

    def close(self, n: int | None) -> dict[str, Any]:
        if n is None:
            for client in self.stalled:
                client.close()
            self.stalled = []
        dropped = sum(1 for c in self.clients if c.transport is None)
        keep = [c for c in self.clients if c.transport is not None]
        count = len(keep) if n is None else min(n, len(keep))
        for client in keep[:count]:
            client.close()
        self.clients = keep[count:]
        return {"ok": True, "closed": count, "dropped_before": dropped}

    async def churn(
        self,
        host: str,
        port: int,
        path: str,
        src: str,
        duration: float,
        clients: int,
        min_life: float,
        max_life: float,
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        request = _request(host, port, path)
        stop_at = loop.time() + duration
        stats = {
            "cycles": 0,
            "failed": 0,
            "received": 0,
            "lost": 0,
            "duplicated": 0,
            "reordered": 0,
            "dropped": 0,
        }
        connect_ns: list[int] = []

        async def cycle() -> None:
            while loop.time() < stop_at:
                connected: asyncio.Future[Client] = loop.create_future()
                client = Client(request, connected)
                t0 = monotonic_ns()
                try:
                    await open_stream(client, host, port, src)
                    await asyncio.wait_for(connected, 10)
                except (OSError, asyncio.TimeoutError):
                    stats["failed"] += 1
                    client.close()
                    await asyncio.sleep(0.05)
                    continue
                connect_ns.append(monotonic_ns() - t0)
                if client.status != 200:
                    stats["failed"] += 1
                    client.close()
                    continue
                await asyncio.sleep(random.uniform(min_life, max_life))
                if client.transport is None:
                    stats["dropped"] += 1
                client.close()
                stats["cycles"] += 1
                stats["received"] += client.n
                stats["duplicated"] += client.dups
                stats["reordered"] += client.reorders
                stats["lost"] += len(client.gaps) if client.gaps else 0

        await asyncio.gather(*(cycle() for _ in range(clients)))
        connect_ns.sort()
        stats["connect_p50_us"] = connect_ns[len(connect_ns) // 2] / 1000 if connect_ns else None
        stats["connect_p99_us"] = (
            connect_ns[int(len(connect_ns) * 0.99)] / 1000 if connect_ns else None
        )
        return {"ok": True, **stats}

    async def publish_http(
        self, host: str, port: int, path: str, count: int, rate: float, size: int | None
    ) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(host, port)
        seq0 = int(self.publish_seq) + 1
        loop = asyncio.get_running_loop()
        start = loop.time()
        t0 = monotonic_ns()
        try:
            for i in range(count):
                self.publish_seq += 1
                body = make_payload(self.publish_seq, int(size or DEFAULT_SIZE)).encode()
                writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
                    "Accept: text/plain\r\n\r\n".encode()
                    + body
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                if rate > 0:
                    delay = start + (i + 1) / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
        finally:
            writer.close()
        return {
            "ok": True,
            "first": seq0,
            "last": self.publish_seq,
            "t0": t0,
            "t1": monotonic_ns(),
        }

    publish_seq = 0
    _publisher: asyncio.Task[dict[str, Any]] | None = None

    def start_http(self, **kwargs: Any) -> dict[str, Any]:
        first = self.publish_seq + 1
        self._publisher = asyncio.ensure_future(self.publish_http(**kwargs))
        return {"ok": True, "first": first}

    async def stop_http(self) -> dict[str, Any]:
        task = self._publisher
        self._publisher = None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        return {"ok": True, "last": self.publish_seq}


async def serve(index: int, latency_dir: str) -> None:
    worker = Worker(index, latency_dir)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    out.write(json.dumps({"ok": True, "pid": os.getpid()}) + "\n")
    out.flush()
    while line := await reader.readline():
        command = json.loads(line)
        name = command.pop("cmd")
        try:
            if name == "quit":
                for client in worker.clients:
                    client.close()
                if worker.storm is not None:
                    worker.storm.close()
                reply: dict[str, Any] = {"ok": True}
            elif name == "stats":
                reply = {"ok": True, "clients": len(worker.clients)}
            elif name == "begin":
                reply = worker.begin(command["first"], bool(command.get("latency")))
            elif name == "stall":
                reply = worker.stall(int(command["n"]))
            elif name == "close":
                reply = worker.close(command.get("n"))
            elif name == "start_http":
                reply = worker.start_http(**command)
            elif name == "stop_http":
                reply = await worker.stop_http()
            else:
                reply = await getattr(worker, name)(**command)
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if name == "quit":
            return


def main() -> None:
    index = int(sys.argv[1])
    latency_dir = sys.argv[2]
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(index, latency_dir))
    else:
        uvloop.run(serve(index, latency_dir))


if __name__ == "__main__":
    main()
