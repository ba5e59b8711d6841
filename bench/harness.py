"""The benchmark harness: starts each peer and the load generator, runs the scenarios, measures.

Placement: the server under test is pinned to one core, the load generator workers (and this
process) to another, so that they do not take each other's time. Server CPU is read from
``/proc/<pid>/stat`` (``utime + stime``, all threads) over each measured window and divided by the
deliveries made in it: on a shared, noisy machine this is the steadier figure, since it does not
count the time the server was waiting for the load generator or for someone else's process.

Scenarios (each peer in turn, one server process per peer, in this order):

``idle``
    RSS of the server before and after N streams connect (per stream), the time to connect N
    (first connect to the last response head), and the server's CPU over an idle window with
    heartbeats on; then every stream is closed and the time until the server's stream count
    is back to zero recorded.
``fanout``
    for each subscriber count, events published as fast as the server's loop goes (one per
    iteration): deliveries per second (publish start to last receive, all clients), server CPU
    per delivery, latency; the median of the repeated runs.
``latency``
    events at a fixed rate to a fixed number of subscribers: p50, p99 and max latency.
``churn``
    steady subscribers plus clients connecting and leaving while events flow: the steady ones
    must see every event once and in order, the short-lived ones an unbroken run; the server's
    stream count must return to the steady count (nothing leaks).
``slow``
    one client per load generator process stops reading while large events are published as
    fast as the server goes: the others must get every event with their usual latency; the
    server's memory growth shows whether it bounds what it holds for the stalled ones (and
    whether it cut them off).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .peers import nchan

CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
#: the HMAC secret of the signed-token peer (a benchmark's, not a secret)
JWT_SECRET = "bench-secret-not-a-secret-0123456789"


# ---------------------------------------------------------------------- configuration


@dataclass
class Plan:
    """Sizes and durations of one benchmark run."""

    idle_streams: int = 10_000
    idle_window: float = 15.0
    fanout_subscribers: Sequence[int] = (100, 1_000, 5_000)
    #: most deliveries per measured fan-out run; fewer for slow servers (see fanout_seconds)
    fanout_deliveries: int = 400_000
    #: a measured fan-out run is sized to last about this long at the warm-up's rate
    fanout_seconds: float = 1.5
    fanout_repeats: int = 3
    latency_subscribers: int = 1_000
    latency_rate: float = 10.0
    latency_duration: float = 20.0
    churn_steady: int = 500
    churn_clients: int = 200
    churn_rate: float = 50.0
    churn_duration: float = 15.0
    churn_life: tuple[float, float] = (0.1, 1.0)
    slow_subscribers: int = 20
    slow_events: int = 5_000
    slow_size: int = 4_096
    heartbeat: float = 15.0
    #: longest wait for the server to count its streams back (released, settled after churn)
    settle_timeout: float = 10.0
    size: int = 64
    workers: int = 2

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            idle_streams=1_000,
            idle_window=1.0,
            settle_timeout=3.0,
            fanout_subscribers=(100, 1_000),
            fanout_deliveries=100_000,
            fanout_seconds=0.3,
            fanout_repeats=1,
            latency_subscribers=1_000,
            latency_duration=1.5,
            churn_steady=200,
            churn_clients=50,
            churn_duration=1.5,
            slow_subscribers=10,
            slow_events=4_000,
        )


@dataclass
class Peer:
    """One server to compare: a module of `tornado_sse.bench.peers`, or nginx with Nchan."""

    name: str
    label: str
    module: str | None
    requires: Sequence[str] = ()
    loop: str = "asyncio"
    options: Sequence[str] = ()
    why: str = ""
    #: extra environment variables for the server process (experiments: PYTHONPATH=...)
    env: dict[str, str] = field(default_factory=dict)
    #: the scenarios this peer means something in (None: all); the others are left out
    scenarios: Sequence[str] | None = None
    #: tornado_sse's broker: "memory", "bridge" (the process is its own hub, over the unix
    #: socket) or "redis" (a redis-server of its own, on the server's core)
    backend: str = "memory"
    #: the stream's path and query (the hub takes its channels from ``?channel=``)
    stream_path: str = "/events"

    @property
    def path(self) -> str:
        """The stream's path: with ``auth=jwt``, carrying a signed token (`JWT_SECRET`)."""
        if "auth=jwt" not in self.options:
            return self.stream_path
        from tornado_sse.auth import create_token

        return "/events?access_token=" + create_token(JWT_SECRET, subscribe=["bench"], ttl=None)

    def unavailable(self) -> str | None:
        """``None`` if this peer can run here, else why not."""
        if self.module is None:
            return nchan.available()
        import importlib.util

        for name in self.requires:
            if importlib.util.find_spec(name) is None:
                return f"not installed ({name} missing: pip install 'tornado-sse[bench]')"
        if self.backend == "redis" and shutil.which("redis-server") is None:
            return "not installed (redis-server missing: apt-get install redis-server)"
        return None


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer(
            "floor",
            "asyncio floor (encode once, transport.write)",
            "floor",
            why="the least a Python server can do",
        ),
        Peer("tornado_sse", "tornado_sse (in-process broker)", "tornado_sse_peer"),
        Peer(
            "tornado_sse_uvloop",
            "tornado_sse on uvloop",
            "tornado_sse_peer",
            requires=("uvloop",),
            loop="uvloop",
        ),
        Peer(
            "tornado_sse_bridge",
            "tornado_sse over the unix-socket bridge (process is its own hub)",
            "tornado_sse_peer",
            backend="bridge",
        ),
        Peer(
            "tornado_sse_redis",
            "tornado_sse with Redis (server CPU includes redis-server's)",
            "tornado_sse_peer",
            requires=("redis",),
            backend="redis",
        ),
        Peer(
            "tornado_sse_jwt",
            "tornado_sse, a signed token (HS256) verified per stream",
            "tornado_sse_peer",
            requires=("jwt",),
            options=("auth=jwt", f"secret={JWT_SECRET}"),
            why="what verifying a token costs a new stream (compare tornado_sse's connect time)",
            scenarios=("idle",),
        ),
        Peer(
            "tornado_sse_hubgc",
            "tornado_sse with the hub's GC policy (gcpolicy.settle: freeze, 50000/20/100)",
            "tornado_sse_peer",
            options=("gc=hub",),
            why="what tornado-sse serve's garbage-collector policy does to connect time",
            scenarios=("idle",),
        ),
        Peer(
            "tornado_sse_hub",
            "tornado-sse serve (the hub's application, server, access, logs and GC policy)",
            "hub_peer",
            stream_path="/events?channel=bench",
            why="what a stream costs the hub itself, beside the embedded handler",
            scenarios=("idle",),
        ),
        Peer(
            "tornado_sse_nogc",
            "tornado_sse, cyclic GC off",
            "tornado_sse_peer",
            options=("gc=off",),
            why="its own work per stream, without the collector (instruction counts)",
            scenarios=("idle",),
        ),
        Peer(
            "tornado_sse_hub_nogc",
            "tornado-sse serve, cyclic GC off",
            "hub_peer",
            options=("gc=off",),
            stream_path="/events?channel=bench",
            why="the hub's own work per stream, without the collector (instruction counts)",
            scenarios=("idle",),
        ),
        Peer(
            "tornado_sse_hub_quiet",
            "tornado-sse serve --log-level warning (no log line per stream)",
            "hub_peer",
            options=("log=warning",),
            stream_path="/events?channel=bench",
            why="what the hub's info lines per stream cost",
            scenarios=("idle",),
        ),
        Peer("tornado_plain", "plain Tornado (queue per client, write + flush)", "tornado_plain"),
        Peer(
            "tornado_empty",
            "empty Tornado handler (reference: Tornado's own per-request cost)",
            "tornado_empty",
            why="what any RequestHandler costs to connect, before its own work",
            scenarios=("idle",),
        ),
        Peer(
            "tornado_empty_nogc",
            "empty Tornado handler, cyclic GC off (reference)",
            "tornado_empty",
            options=("gc=off",),
            why="the same without the cyclic garbage collector's share",
            scenarios=("idle",),
        ),
        Peer(
            "aiohttp_sse",
            "aiohttp-sse",
            "aiohttp_peer",
            requires=("aiohttp", "aiohttp_sse"),
        ),
        Peer(
            "sse_starlette",
            "sse-starlette on uvicorn",
            "starlette_peer",
            requires=("sse_starlette", "uvicorn", "starlette"),
        ),
        Peer("nchan", "Nchan (nginx module, C)", None),
    )
}

SCENARIOS = ("idle", "fanout", "latency", "churn", "slow")


def cores() -> tuple[set[int] | None, set[int] | None]:
    """(server core, load generator cores): separate cores when there are two or more."""
    try:
        available = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None
    if len(available) < 2:
        return None, None
    return {available[0]}, set(available[1:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------- processes


async def start_redis(
    workdir: Path, core: set[int] | None, name: str
) -> tuple[asyncio.subprocess.Process, str]:
    """A throwaway redis-server (no persistence) pinned to *core*: the process and its URL."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(shutil.which("redis-server") or "redis-server", "--port", str(port)),
        *("--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(workdir)),
        *("--logfile", str(workdir / f"{name}-redis.log")),
        stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=_pinned(core),
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"PING\r\n")
            reply = await asyncio.wait_for(reader.readline(), 2)
            writer.close()
            if reply.startswith(b"+PONG"):
                return proc, f"redis://{HOST}:{port}/0"
        except (OSError, asyncio.TimeoutError):
            pass
        if time.monotonic() > deadline or proc.returncode is not None:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise RuntimeError("redis-server did not start")
        await asyncio.sleep(0.02)


def _proc_times(pid: int) -> tuple[float, float]:
    """Seconds of user and system CPU (all threads) used by *pid* so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _proc_cpu(pid: int) -> float:
    """Seconds of CPU (user + system, all threads) used by *pid* so far."""
    return sum(_proc_times(pid))


def _proc_rss(pid: int) -> int:
    """Resident memory of *pid* in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM *proc* and wait; SIGKILL it if it lingers. Idempotent."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _pinned(core: set[int] | None) -> Callable[[], None] | None:
    if core is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, core)

    return pin


class Server:
    """A peer's server process, its control connection and its /proc readings."""

    def __init__(
        self,
        peer: Peer,
        plan: Plan,
        core: set[int] | None,
        workdir: Path,
        wrap: Sequence[str] = (),
    ) -> None:
        self.peer = peer
        self.plan = plan
        self.core = core
        self.workdir = workdir
        #: a command the server runs under (``valgrind --tool=callgrind ...``): then it may
        #: take minutes to start
        self.wrap = list(wrap)
        self.port = free_port()
        self.control_port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.log = workdir / f"{peer.name}.log"
        #: the redis-server of a Redis-backed peer
        self.redis: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        log = open(self.log, "wb")  # the child keeps its own copy; ours is closed below
        if self.peer.module is None:
            prefix = self.workdir / "nginx"
            prefix.mkdir(exist_ok=True)
            conf = nchan.write_config(prefix, HOST, self.port, self.plan.heartbeat, 4096, 19_000)
            argv = [
                nchan.nginx_binary(),
                "-p",
                str(prefix),
                "-c",
                str(conf),
                "-e",
                str(prefix / "error.log"),
            ]
        else:
            argv = [
                sys.executable,
                "-m",
                f"tornado_sse.bench.peers.{self.peer.module}",
                "--port",
                str(self.port),
                "--control-port",
                str(self.control_port),
                "--heartbeat",
                str(self.plan.heartbeat),
                "--loop",
                self.peer.loop,
            ]
            for option in self.peer.options:
                argv += ["--option", option]
            if self.peer.backend == "bridge":
                socket_path = self.workdir / f"{self.peer.name}.sock"
                argv += ["--option", "broker=bridge", "--option", f"socket={socket_path}"]
            elif self.peer.backend == "redis":
                url = await self._start_redis()
                argv += ["--option", "broker=redis", "--option", f"redis={url}"]
        self.proc = await asyncio.create_subprocess_exec(
            *self.wrap,
            *argv,
            env={**os.environ, **self.peer.env} if self.peer.env else None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=_pinned(self.core),
        )
        log.close()
        deadline = time.monotonic() + (600 if self.wrap else 30)
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.peer.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if self.peer.module is None:
                    _, writer = await asyncio.open_connection(HOST, self.port)
                    writer.close()
                else:
                    self._reader, self._writer = await asyncio.open_connection(
                        HOST, self.control_port
                    )
                    await self.control({"cmd": "ping"})
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.peer.name} did not start") from None
                await asyncio.sleep(0.05)

    async def control(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(json.dumps(command).encode() + b"\n")
        line = await self._reader.readline()
        if not line:
            raise RuntimeError(f"{self.peer.name} closed its control connection")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.peer.name}: {reply}")
        return reply

    async def streams(self) -> int | None:
        """Open streams as the server counts them (``None`` for Nchan)."""
        if self.peer.module is None:
            return None
        return int((await self.control({"cmd": "streams"}))["streams"])

    async def wait_streams(
        self, count: int, timeout: float, at_least: bool = False
    ) -> float | None:
        """Seconds until the server holds *count* streams, or *at_least* that many (``None``:
        unknown or timed out)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            now = await self.streams()
            if now is None:
                return None
            if now == count or (at_least and now > count):
                return time.monotonic() - t0
            await asyncio.sleep(0.02)
        return None

    async def gc(self) -> None:
        if self.peer.module is not None:
            await self.control({"cmd": "gc"})

    async def gc_seconds(self) -> float | None:
        """Seconds the server spent in its cyclic garbage collector so far (None: not Python)."""
        if self.peer.module is None:
            return None
        reply = await self.control({"cmd": "gctime"})
        return float(sum(seconds for _, seconds in reply["generations"]))

    async def _start_redis(self) -> str:
        """A throwaway redis-server on the server's core; its URL."""
        self.redis, url = await start_redis(self.workdir, self.core, self.peer.name)
        return url

    def _pids(self) -> list[int]:
        """The server's processes: the peer, and its redis-server if it has one."""
        return [self.pid] + ([self.redis.pid] if self.redis is not None else [])

    def cpu(self) -> float:
        return sum(_proc_cpu(pid) for pid in self._pids())

    def times(self) -> tuple[float, float]:
        user, system = 0.0, 0.0
        for pid in self._pids():
            u, s = _proc_times(pid)
            user, system = user + u, system + s
        return user, system

    def rss(self) -> int:
        return _proc_rss(self.pid)

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        for proc in (self.proc, self.redis):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()


class Workers:
    """The load generator worker processes (`tornado_sse.bench.loadgen`)."""

    def __init__(self, count: int, core: set[int] | None, workdir: Path) -> None:
        self.count = count
        self.core = core
        self.workdir = workdir
        self.procs: list[asyncio.subprocess.Process] = []
        self._locks: list[asyncio.Lock] = []

    def source(self, index: int) -> str:
        """Each worker connects from its own loopback address (its own range of ports)."""
        return f"127.0.0.{11 + index}"

    async def start(self) -> None:
        for index in range(self.count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tornado_sse.bench.loadgen",
                str(index),
                str(self.workdir),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                preexec_fn=_pinned(self.core),
                limit=1 << 20,
            )
            self.procs.append(proc)
            self._locks.append(asyncio.Lock())
        for index in range(self.count):
            await self._read(index)

    async def _read(self, index: int) -> dict[str, Any]:
        stdout = self.procs[index].stdout
        assert stdout is not None
        line = await stdout.readline()
        if not line:
            raise RuntimeError(f"load generator {index} exited")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"load generator {index}: {reply.get('error')}")
        return reply

    async def call(self, index: int, command: dict[str, Any]) -> dict[str, Any]:
        async with self._locks[index]:
            stdin = self.procs[index].stdin
            assert stdin is not None
            stdin.write(json.dumps(command).encode() + b"\n")
            await stdin.drain()
            return await self._read(index)

    async def each(
        self, command: Callable[[int], dict[str, Any] | None], indexes: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """Send ``command(i)`` to every worker at once (skipping ``None``); all the replies."""
        calls = []
        for index in indexes if indexes is not None else range(self.count):
            cmd = command(index)
            if cmd is not None:
                calls.append(self.call(index, cmd))
        return list(await asyncio.gather(*calls))

    async def stop(self) -> None:
        for index, proc in enumerate(self.procs):
            if proc.returncode is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.call(index, {"cmd": "quit"}), 5)
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def percentiles(values: array.array[int], points: Sequence[float]) -> dict[str, float]:
    """Percentiles of nanosecond *values*, in milliseconds."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for point in points:
        index = min(len(ordered) - 1, int(len(ordered) * point / 100))
        out[f"p{point:g}"] = ordered[index] / 1e6
    out["max"] = ordered[-1] / 1e6
    out["samples"] = len(ordered)
    return out


# ---------------------------------------------------------------------- one peer


@dataclass
class Progress:
    """Receives a label and a number of steps done; `tornado_sse.bench.cli` shows a bar."""

    advance: Callable[[int], None] = lambda steps: None
    describe: Callable[[str], None] = lambda label: None


@dataclass
class PeerRun:
    """Runs the scenarios against one peer."""

    peer: Peer
    plan: Plan
    workdir: Path
    progress: Progress
    server_core: set[int] | None
    client_core: set[int] | None
    results: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    connected: int = 0

    async def run(self, scenarios: Sequence[str]) -> dict[str, Any]:
        self.server = Server(self.peer, self.plan, self.server_core, self.workdir)
        extra = 1 if self.peer.module is None else 0  # Nchan's publisher
        self.workers = Workers(self.plan.workers + extra, self.client_core, self.workdir)
        self.clients = list(range(self.plan.workers))
        self.publisher = self.plan.workers if extra else None
        try:
            await self.workers.start()
            await self.server.start()
            for name in scenarios:
                if self.peer.scenarios is not None and name not in self.peer.scenarios:
                    self.progress.advance(steps(self.plan, [name]))
                    continue
                self.progress.describe(f"{self.peer.name}: {name}")
                started = time.monotonic()
                try:
                    self.results[name] = await getattr(self, f"scenario_{name}")()
                    self.results[name]["elapsed_s"] = time.monotonic() - started
                except Exception as exc:
                    self.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    with contextlib.suppress(Exception):
                        await self._close_all()
                    if self.server.proc is None or self.server.proc.returncode is not None:
                        raise
        finally:
            await self.workers.stop()
            await self.server.stop()
        return self.results

    # ------------------------------------------------------------------ building blocks

    async def connect(self, total: int, concurrency: int = 1000) -> dict[str, Any]:
        """Open *total* more streams across the workers (each with at most *concurrency*
        connects in flight); how long it took, and failures."""
        shares = split(total, len(self.clients))
        replies = await self.workers.each(
            lambda i: (
                {
                    "cmd": "connect",
                    "n": shares[i],
                    "host": HOST,
                    "port": self.server.port,
                    "path": self.peer.path,
                    "src": self.workers.source(i),
                    "concurrency": concurrency,
                }
                if shares[i]
                else None
            ),
            self.clients,
        )
        errors: dict[str, int] = {}
        for reply in replies:
            for key, value in {**reply["errors"], **reply["status"]}.items():
                errors[key] = errors.get(key, 0) + value
        connected = sum(r["connected"] for r in replies)
        if total and connected < self.connected + total * 0.99:
            raise RuntimeError(
                f"only {connected - self.connected} of {total} streams connected: {errors}"
            )
        self.connected = connected
        return {
            "seconds": (max(r["t1"] for r in replies) - min(r["t0"] for r in replies)) / 1e9,
            "connected": connected,
            "errors": errors,
        }

    async def _close_all(self) -> list[dict[str, Any]]:
        self.connected = 0
        return await self.workers.each(lambda i: {"cmd": "close"}, self.clients)

    async def publish(self, count: int, rate: float, size: int | None = None) -> dict[str, Any]:
        size = size or self.plan.size
        if self.publisher is not None:
            reply = await self.workers.call(
                self.publisher,
                {
                    "cmd": "publish_http",
                    "host": HOST,
                    "port": self.server.port,
                    "path": "/publish",
                    "count": count,
                    "rate": rate,
                    "size": size,
                },
            )
        else:
            reply = await self.server.control(
                {"cmd": "publish", "count": count, "rate": rate, "size": size}
            )
        self.seq = reply["last"]
        return reply

    async def start_publishing(self, rate: float) -> None:
        if self.publisher is not None:
            await self.workers.call(
                self.publisher,
                {
                    "cmd": "start_http",
                    "host": HOST,
                    "port": self.server.port,
                    "path": "/publish",
                    "count": 10**9,
                    "rate": rate,
                    "size": self.plan.size,
                },
            )
        else:
            await self.server.control({"cmd": "start", "rate": rate, "size": self.plan.size})

    async def stop_publishing(self) -> int:
        if self.publisher is not None:
            reply = await self.workers.call(self.publisher, {"cmd": "stop_http"})
        else:
            reply = await self.server.control({"cmd": "stop"})
        self.seq = int(reply["last"])
        return self.seq

    async def measured(
        self, count: int, rate: float, latency: bool, timeout: float, size: int | None = None
    ) -> dict[str, Any]:
        """Publish *count* events and check every client got each once, in order."""
        first = self.seq + 1
        await self.workers.each(
            lambda i: {"cmd": "begin", "first": first, "latency": latency}, self.clients
        )
        user0, system0 = self.server.times()
        published = await self.publish(count, rate, size)
        reports = await self.workers.each(
            lambda i: {"cmd": "wait", "last": published["last"], "timeout": timeout},
            self.clients,
        )
        user1, system1 = self.server.times()
        result = self._summarize(published, reports, user1 - user0 + system1 - system0)
        result["stalled"] = sum(r.get("stalled", 0) for r in reports)
        result["server_system_share"] = (
            (system1 - system0) / result["server_cpu_s"] if result["server_cpu_s"] else None
        )
        return result

    def _summarize(
        self, published: dict[str, Any], reports: list[dict[str, Any]], cpu: float
    ) -> dict[str, Any]:
        received = sum(r["received"] for r in reports)
        last_recv = max(r["last_recv"] for r in reports)
        wall = (last_recv - published["t0"]) / 1e9 if last_recv else float("nan")
        lat: array.array[int] = array.array("q")
        for report in reports:
            if report.get("latency_file"):
                with open(report["latency_file"], "rb") as fh:
                    lat.frombytes(fh.read())
                os.unlink(report["latency_file"])
        out: dict[str, Any] = {
            "events": published["last"] - published["first"] + 1,
            "subscribers": sum(r["clients"] for r in reports),
            "deliveries": received,
            "expected": sum(r["expected"] for r in reports),
            "lost": sum(r["lost"] for r in reports),
            "duplicated": sum(r["duplicated"] for r in reports),
            "reordered": sum(r["reordered"] for r in reports),
            "dropped": sum(r["dropped"] for r in reports),
            "seconds": wall,
            "publish_seconds": (published["t1"] - published["t0"]) / 1e9,
            "deliveries_per_s": received / wall if wall and wall > 0 else None,
            "server_cpu_s": cpu,
            "cpu_us_per_delivery": cpu / received * 1e6 if received else None,
            "gc_collections": published.get("gc"),
        }
        if lat:
            out["latency_ms"] = percentiles(lat, (50, 99, 99.9))
        return out

    async def warm_up(self) -> None:
        """Connect a few streams, send a few events, close them: imports and caches settle."""
        await self.connect(min(100, self.plan.latency_subscribers))
        await self.measured(20, 0, False, 10)
        await self._close_all()
        await self.server.wait_streams(0, min(2.0, self.plan.settle_timeout))

    # ------------------------------------------------------------------ scenarios

    async def scenario_idle(self) -> dict[str, Any]:
        plan = self.plan
        await self.warm_up()
        await self.server.gc()
        await asyncio.sleep(0.3)
        rss0 = self.server.rss()
        gc0 = await self.server.gc_seconds()
        cpu0 = self.server.cpu()
        connect = await self.connect(plan.idle_streams)
        self.progress.advance(1)
        seen = await self.server.wait_streams(connect["connected"], 10, at_least=True)
        connect_cpu = self.server.cpu() - cpu0
        gc1 = await self.server.gc_seconds()
        await asyncio.sleep(0.5)
        await self.server.gc()
        rss1 = self.server.rss()
        cpu0 = self.server.cpu()
        t0 = time.monotonic()
        await asyncio.sleep(plan.idle_window)
        idle_cpu = (self.server.cpu() - cpu0) / (time.monotonic() - t0)
        closing = await self._close_all()
        released = await self.server.wait_streams(0, plan.settle_timeout)
        await self.server.gc()
        await asyncio.sleep(0.2)
        rss2 = self.server.rss()
        self.progress.advance(1)
        streams = connect["connected"]
        return {
            "streams": streams,
            "connect_seconds": connect["seconds"],
            "connect_server_cpu_s": connect_cpu,
            "connect_gc_s": None if gc0 is None or gc1 is None else gc1 - gc0,
            "connect_errors": connect["errors"],
            "server_saw_all_after_s": seen,
            "rss_before": rss0,
            "rss_connected": rss1,
            "rss_after_close": rss2,
            "kb_per_stream": (rss1 - rss0) / streams / 1024 if streams else None,
            "idle_cpu_percent": idle_cpu * 100,
            "idle_window_s": plan.idle_window,
            "heartbeat_s": plan.heartbeat,
            "closed_by_server_while_idle": sum(r["dropped_before"] for r in closing),
            "release_seconds": released,
        }

    async def scenario_fanout(self) -> dict[str, Any]:
        plan = self.plan
        out: dict[str, Any] = {}
        connected = 0
        for subscribers in plan.fanout_subscribers:
            connect = await self.connect(subscribers - connected)
            connected = subscribers
            most = max(20, min(4000, plan.fanout_deliveries // subscribers))
            warm = await self.measured(max(5, most // 10), 0, False, 30)
            rate = warm["deliveries_per_s"] or 0.0
            count = max(20, min(most, int(rate * plan.fanout_seconds / subscribers)))
            runs = []
            for _ in range(plan.fanout_repeats):
                runs.append(await self.measured(count, 0, False, 60))
            runs.sort(key=lambda r: r["deliveries_per_s"] or 0)
            median = dict(runs[len(runs) // 2])
            median["runs"] = [
                {k: r[k] for k in ("deliveries_per_s", "cpu_us_per_delivery", "seconds")}
                for r in runs
            ]
            median["connect_errors"] = connect["errors"]
            median["lost"] = sum(r["lost"] for r in runs)
            median["duplicated"] = sum(r["duplicated"] for r in runs)
            median["reordered"] = sum(r["reordered"] for r in runs)
            median["dropped"] = max(r["dropped"] for r in runs)
            out[str(subscribers)] = median
            self.progress.advance(1)
        await self._close_all()
        await self.server.wait_streams(0, min(2.0, self.plan.settle_timeout))
        return out

    async def scenario_latency(self) -> dict[str, Any]:
        plan = self.plan
        connect = await self.connect(plan.latency_subscribers)
        await self.measured(5, 0, False, 10)
        count = max(1, round(plan.latency_rate * plan.latency_duration))
        result = await self.measured(count, plan.latency_rate, True, 30)
        result["rate"] = plan.latency_rate
        result["connect_errors"] = connect["errors"]
        await self._close_all()
        await self.server.wait_streams(0, min(2.0, self.plan.settle_timeout))
        self.progress.advance(1)
        return result

    async def scenario_churn(self) -> dict[str, Any]:
        plan = self.plan
        connect = await self.connect(plan.churn_steady)
        await self.measured(5, 0, False, 10)
        await self.server.gc()
        rss0 = self.server.rss()
        first = self.seq + 1
        await self.workers.each(
            lambda i: {"cmd": "begin", "first": first, "latency": True}, self.clients
        )
        cpu0 = self.server.cpu()
        t0 = time.monotonic_ns()
        await self.start_publishing(plan.churn_rate)
        shares = split(plan.churn_clients, len(self.clients))
        churn = await self.workers.each(
            lambda i: {
                "cmd": "churn",
                "host": HOST,
                "port": self.server.port,
                "path": self.peer.path,
                "src": self.workers.source(i),
                "duration": plan.churn_duration,
                "clients": shares[i],
                "min_life": plan.churn_life[0],
                "max_life": plan.churn_life[1],
            },
            self.clients,
        )
        last = await self.stop_publishing()
        reports = await self.workers.each(
            lambda i: {"cmd": "wait", "last": last, "timeout": 30}, self.clients
        )
        cpu = self.server.cpu() - cpu0
        steady = self._summarize({"first": first, "last": last, "t0": t0, "t1": t0}, reports, cpu)
        settled = await self.server.wait_streams(connect["connected"], plan.settle_timeout)
        await self.server.gc()
        rss1 = self.server.rss()
        await self._close_all()
        await self.server.wait_streams(0, min(2.0, self.plan.settle_timeout))
        self.progress.advance(1)
        churners: dict[str, Any] = {}
        for reply in churn:
            for key, value in reply.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    churners[key] = churners.get(key, 0) + value
        p50 = [r["connect_p50_us"] for r in churn if r.get("connect_p50_us") is not None]
        p99 = [r["connect_p99_us"] for r in churn if r.get("connect_p99_us") is not None]
        churners["connect_p50_ms"] = max(p50) / 1000 if p50 else None
        churners["connect_p99_ms"] = max(p99) / 1000 if p99 else None
        churners["connects_per_s"] = churners.get("cycles", 0) / plan.churn_duration
        return {
            "steady": steady,
            "churners": churners,
            "rate": plan.churn_rate,
            "duration_s": plan.churn_duration,
            "rss_growth_kb": (rss1 - rss0) / 1024,
            "streams_settled_after_s": settled,
        }

    async def scenario_slow(self) -> dict[str, Any]:
        plan = self.plan
        # a fresh server: memory freed by the earlier scenarios would hide what this one holds
        await self.server.stop()
        self.server = Server(self.peer, plan, self.server_core, self.workdir)
        await self.server.start()
        if self.publisher is None:
            self.seq = 0  # a new server numbers its events from 1 (Nchan's publisher goes on)
        await self.connect(plan.slow_subscribers)
        await self.measured(5, 0, False, 10)
        await self.workers.each(lambda i: {"cmd": "stall", "n": 1}, self.clients)
        await self.server.gc()
        rss0 = self.server.rss()
        before = await self.server.streams()
        result = await self.measured(plan.slow_events, 0, True, 60, plan.slow_size)
        # a stalled client does not read, so it cannot see its stream closed: ask the server
        after = await self.server.streams()
        result["stalled_cut_off"] = (
            None if before is None or after is None else max(0, before - after)
        )
        await self.server.gc()
        result["rss_growth_mb"] = (self.server.rss() - rss0) / 2**20
        result["event_size"] = plan.slow_size
        result["stalled_backlog_mb"] = plan.slow_events * plan.slow_size / 2**20
        await self._close_all()
        await self.server.wait_streams(0, min(2.0, self.plan.settle_timeout))
        self.progress.advance(1)
        return result


def steps(plan: Plan, scenarios: Sequence[str]) -> int:
    """Progress steps per peer."""
    count = {
        "idle": 2,
        "fanout": len(plan.fanout_subscribers),
        "latency": 1,
        "churn": 1,
        "slow": 1,
    }
    return sum(count[name] for name in scenarios)


async def run_peers(
    peers: Sequence[Peer],
    scenarios: Sequence[str],
    plan: Plan,
    progress: Progress,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run *scenarios* against each of *peers*, one after the other; the results by peer."""
    server_core, client_core = cores()
    affinity = os.sched_getaffinity(0) if client_core is not None else None
    if client_core is not None:
        os.sched_setaffinity(0, client_core)
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="tornado-sse-bench-")) if workdir is None else workdir
    results: dict[str, Any] = {}
    try:
        for peer in peers:
            reason = peer.unavailable()
            if reason is not None:
                results[peer.name] = {"label": peer.label, "status": reason}
                if peer.scenarios is not None:
                    results[peer.name]["scenarios"] = list(peer.scenarios)
                progress.advance(steps(plan, scenarios))
                continue
            runner = PeerRun(peer, plan, work, progress, server_core, client_core)
            try:
                scenario_results = await runner.run(scenarios)
                status = "ok"
            except Exception as exc:
                scenario_results = runner.results
                status = f"failed: {type(exc).__name__}: {exc}"
            results[peer.name] = {"label": peer.label, "status": status, **scenario_results}
            if peer.scenarios is not None:
                results[peer.name]["scenarios"] = list(peer.scenarios)
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    return results
