"""The restart storm (``tornado-sse bench storm``): streams open, events flowing, a hub goes away.

Issue 15, item 3: a restart must be a non-event. For each case, real ``tornado-sse serve``
processes (pinned to the server's core) hold N browser-like streams of the load generator
(`tornado_sse.bench.browser`, in the `tornado_sse.bench.loadgen` workers on the other core):
each follows one of the channels ``storm-<k>``, honours ``retry:``, resumes with
``Last-Event-ID`` and fails over along a list of hub addresses when a connection cannot be
made. A publisher in this process POSTs events at a steady rate, round robin over the
channels, each carrying its channel's sequence number and its publish time. After a steady
window, the case happens:

``a``
    the hub (in-process broker) gets SIGTERM, drains (``--drain``), exits, and is started again
    on the same port. Its history died with it: the resumes get ``stream-reset``, and the events
    published between a stream's close and its return are *missed after a reset* (announced).
``b``
    ``serve --processes 2``: the worker that does not run the bridge's hub is killed with
    ``kill -9``; its streams come back on the other worker (the supervisor restarts the dead
    one) and resume from the hub's history: nothing missed.
``b-hub``
    the same, killing the worker that runs the hub: the history dies with it, every stream of
    the group gets ``stream-reset`` (see docs/bridge.md, "Never a silent gap").
``c``
    two ``serve --redis`` hubs on one redis-server, the streams spread over both; hub A gets
    SIGTERM and drains; its clients fail over to B and resume from Redis: nothing missed.

Measured per case: the time from the SIGTERM / kill until every stream is back (a 200 response
head that is not a shed one), events lost, duplicated, reordered (must be 0 where history covers
the gap) and missed after a ``stream-reset``; the publish-to-receive latency of the events
published in the steady window and in the storm (from the SIGTERM / kill until every stream is
back) delivered live, and apart from them the events replayed to resuming streams (published
before the stream's connection was up: their latency is the time they waited); the
``retry:`` the streams held when their connection ended, the delay from the close to the
reconnect attempt, and from the close to the stream being back (min / median / max).
Publishes refused while no hub takes them are retried; a publish whose answer was lost (the
connection died under it) is not retried and not counted as lost if it never arrives: the
publisher cannot know whether it happened.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .events import make_payload
from .harness import HOST, Workers, _pinned, cores, free_port, percentiles, split, start_redis

CASES = ("a", "b", "b-hub", "c")
#: the publish token of the hubs under test (a benchmark's, not a secret)
TOKEN = "storm-bench-token-not-a-secret-0123"


@dataclass
class StormPlan:
    """Sizes and timings of one storm run."""

    streams: int = 10_000
    channels: int = 100
    #: events per second over all channels (each stream gets rate / channels)
    rate: float = 100.0
    #: seconds of steady state measured before the storm
    steady: float = 3.0
    #: seconds of publishing after every stream is back (at least two events per channel)
    after: float = 1.0
    #: the hubs' --retry (ms; each stream gets it jittered up to 1.5x) and --drain (s)
    retry: int = 3000
    drain: float = 2.0
    history: int = 1000
    size: int = 64
    workers: int = 2
    #: longest wait for any one step (hubs starting, streams back, catching up)
    timeout: float = 120.0


# ---------------------------------------------------------------------- the hubs


class Hub:
    """One ``tornado-sse serve`` process (a supervisor with ``--processes``)."""

    def __init__(
        self, workdir: Path, name: str, plan: StormPlan, core: set[int] | None, *args: str
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.plan = plan
        self.core = core
        self.args = args
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.workdir / f"hub-{self.name}-{self.starts}.log"

    async def start(self, timeout: float) -> None:
        """Start it on its port (again, after a stop) and wait until ``/healthz`` answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            self.starts += 1
            with open(self.log, "wb") as log:
                self.proc = await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "tornado_sse.cli"),
                    *("serve", "--host", HOST, "--port", str(self.port)),
                    *("--public-channel", "storm-*", "--max-connections-per-address", "0"),
                    *("--stream-rate", "0", "--retry", str(self.plan.retry)),
                    *("--drain", str(self.plan.drain), "--history", str(self.plan.history)),
                    *("--log-level", "warning", *self.args),
                    env={**os.environ, "TORNADO_SSE_TOKEN": TOKEN},
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    preexec_fn=_pinned(self.core),
                )
            while self.proc.returncode is None:
                if await healthy(self.port):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"hub {self.name} did not become healthy")
                try:
                    await asyncio.wait_for(self.proc.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
            text = self.log.read_text(errors="replace")
            if "cannot listen" not in text or time.monotonic() > deadline:
                raise RuntimeError(f"hub {self.name} exited: {text[-1500:]}")
            await asyncio.sleep(0.1)  # the port is not free yet (the old hub is going)

    async def terminate(self, timeout: float) -> int:
        """SIGTERM (the hub drains) and wait for the exit; its status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def workers(self) -> list[int]:
        """The pids of a ``--processes`` hub's workers (the supervisor's children)."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                return [int(child) for child in fh.read().split()]
        except OSError:
            return []

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def healthy(port: int) -> bool:
    """``GET /healthz`` answers 200."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 2)
        return line.split(b" ")[1:2] == [b"200"]
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()


def hub_worker(supervisor: int, workers: Sequence[int]) -> int | None:
    """Which of a ``--processes`` group's *workers* runs the bridge's hub: the one holding the
    sockets bound to the group's unix socket path (``group-<supervisor pid>.sock``)."""
    suffix = f"/group-{supervisor}.sock"
    inodes = set()
    with open("/proc/net/unix") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            if len(parts) >= 8 and parts[7].endswith(suffix):
                inodes.add(f"socket:[{parts[6]}]")
    for pid in workers:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                continue
    return None


# ---------------------------------------------------------------------- the publisher


class Publisher:
    """POSTs the benchmark's events to a hub at a steady rate, round robin over the channels,
    failing over along *urls*; records what each channel's publishes became."""

    def __init__(self, urls: Sequence[tuple[str, int]], plan: StormPlan) -> None:
        self.urls = list(urls)
        self.plan = plan
        self.index = 0
        self.acked: dict[str, int] = {}
        #: publishes whose answer was lost: they may or may not have happened
        self.unknown: dict[str, list[int]] = {}
        self.refused = 0
        self.published = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self.stopping.set()
        if self.task is not None:
            await self.task
        self._drop()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1 / self.plan.rate
        channels = self.plan.channels
        next_at = loop.time()
        number = 0
        while not self.stopping.is_set():
            channel = f"storm-{number % channels}"
            seq = number // channels + 1
            outcome = await self._post(channel, make_payload(seq, self.plan.size))
            if outcome == "refused":
                self.refused += 1
                await asyncio.sleep(0.02)
                continue
            if outcome == "ok":
                self.acked[channel] = seq
                self.published += 1
            else:
                self.unknown.setdefault(channel, []).append(seq)
            number += 1
            next_at = max(next_at + interval, loop.time() - interval)
            delay = next_at - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def _post(self, channel: str, data: str) -> str:
        """``ok`` (202), ``refused`` (not published: no connection, or another status) or
        ``unknown`` (the connection died before the answer)."""
        if self._reader is not None and self._reader.at_eof():
            self._drop()
        if self._writer is None:
            host, port = self.urls[self.index]
            try:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), 2
                )
            except (OSError, asyncio.TimeoutError):
                self.index = (self.index + 1) % len(self.urls)
                return "refused"
        assert self._reader is not None and self._writer is not None
        body = json.dumps({"channel": channel, "data": data}).encode()
        self._writer.write(
            b"POST /publish HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await asyncio.wait_for(self._reader.readexactly(length), 10)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            self._drop()
            return "unknown"
        status = head.split(b" ")[1:2]
        if status == [b"202"]:
            return "ok"
        self._drop()
        return "refused"


# ---------------------------------------------------------------------- one case


def _spread(values: Sequence[int], unit: float = 1e9) -> dict[str, float] | None:
    """min / median / max of *values* divided by *unit* (nanoseconds to seconds by default)."""
    if not values:
        return None
    ordered = sorted(values)
    return {
        "min": ordered[0] / unit,
        "median": ordered[len(ordered) // 2] / unit,
        "max": ordered[-1] / unit,
        "count": len(ordered),
    }


class Case:
    """One storm case: its hubs, streams, publisher and storm."""

    def __init__(
        self,
        name: str,
        plan: StormPlan,
        workdir: Path,
        server_core: set[int] | None,
        workers: Workers,
    ) -> None:
        self.name = name
        self.plan = plan
        self.workdir = workdir
        self.core = server_core
        self.workers = workers
        self.hubs: list[Hub] = []
        self.redis: asyncio.subprocess.Process | None = None

    async def setup(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """Start the hubs; the streams' addresses and the publisher's."""
        plan = self.plan
        if self.name == "a":
            self.hubs = [Hub(self.workdir, "a", plan, self.core)]
        elif self.name in ("b", "b-hub"):
            self.hubs = [Hub(self.workdir, self.name, plan, self.core, "--processes", "2")]
        else:
            self.redis, url = await start_redis(self.workdir, self.core, "storm")
            self.hubs = [
                Hub(self.workdir, f"c{name}", plan, self.core, "--redis", url) for name in "AB"
            ]
        for hub in self.hubs:
            await hub.start(plan.timeout)
        if self.name in ("b", "b-hub"):
            deadline = time.monotonic() + plan.timeout
            while len(self.hubs[0].workers()) < 2 or not await healthy(self.hubs[0].port):
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not start")
                await asyncio.sleep(0.05)
        urls = [(HOST, hub.port) for hub in self.hubs]
        return urls, urls[-1:]

    async def strike(self) -> None:
        """The storm itself; returns once the hub that went has gone (or is back, for ``a``)."""
        hub = self.hubs[0]
        if self.name == "a":
            status = await hub.terminate(self.plan.timeout)
            if status != 0:
                raise RuntimeError(f"the hub exited with {status} on SIGTERM")
            await hub.start(self.plan.timeout)
        elif self.name in ("b", "b-hub"):
            assert hub.proc is not None
            workers = hub.workers()
            runs_hub = hub_worker(hub.proc.pid, workers)
            if runs_hub is None:
                raise RuntimeError("cannot tell which worker runs the hub")
            victim = (
                runs_hub
                if self.name == "b-hub"
                else next(pid for pid in workers if pid != runs_hub)
            )
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + self.plan.timeout
            while victim in hub.workers() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        else:
            status = await hub.terminate(self.plan.timeout)
            if status != 0:
                raise RuntimeError(f"hub A exited with {status} on SIGTERM")

    async def teardown(self) -> None:
        for hub in self.hubs:
            await hub.stop()
        if self.redis is not None and self.redis.returncode is None:
            self.redis.terminate()
            await self.redis.wait()

    async def run(self) -> dict[str, Any]:
        plan = self.plan
        workers = self.workers
        try:
            urls, publish_to = await self.setup()
            shares = split(plan.streams, workers.count)
            offsets = [sum(shares[:i]) for i in range(workers.count)]
            t_open = time.monotonic()
            opened = await workers.each(
                lambda i: {
                    "cmd": "storm_open",
                    "n": shares[i],
                    "offset": offsets[i],
                    "channels": plan.channels,
                    "urls": urls,
                    "src": workers.source(i),
                    "timeout": plan.timeout,
                }
            )
            connected = sum(r["connected"] for r in opened)
            if connected != plan.streams:
                raise RuntimeError(f"only {connected} of {plan.streams} streams connected")
            open_seconds = time.monotonic() - t_open
            publisher = Publisher(publish_to, plan)
            publisher.start()
            steady0 = time.monotonic_ns()
            await asyncio.sleep(plan.steady)
            t0 = time.monotonic_ns()
            begun = await workers.each(lambda i: {"cmd": "storm_begin"})
            await self.strike()
            struck = time.monotonic_ns()
            deadline = time.monotonic() + plan.timeout
            while True:
                states = await workers.each(lambda i: {"cmd": "storm_status"})
                down = sum(s["down"] for s in states)
                closes = sum(s["closes"] for s in states)
                if not down and closes:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{down} streams not back after {plan.timeout} s")
                await asyncio.sleep(0.02)
            t_back = time.monotonic_ns()
            # long enough for two events on every channel: a stream back last sees one after it
            await asyncio.sleep(max(plan.after, 2 * plan.channels / plan.rate))
            await publisher.stop()
            lasts = dict(publisher.acked)
            waited = await workers.each(
                lambda i: {"cmd": "storm_wait", "lasts": lasts, "timeout": plan.timeout}
            )
            reports = await workers.each(
                lambda i: {"cmd": "storm_report", "lasts": lasts, "unknown": publisher.unknown}
            )
            await workers.each(lambda i: {"cmd": "storm_close"})
        finally:
            await self.teardown()
        return self._summarize(
            reports,
            behind=sum(w["behind"] for w in waited),
            down_at_start=sum(b["down"] for b in begun),
            times={"steady0": steady0, "t0": t0, "struck": struck, "t_back": t_back},
            publisher=publisher,
            open_seconds=open_seconds,
        )

    def _summarize(
        self,
        reports: list[dict[str, Any]],
        behind: int,
        down_at_start: int,
        times: dict[str, int],
        publisher: Publisher,
        open_seconds: float,
    ) -> dict[str, Any]:
        t0 = times["t0"]
        steady: array.array[int] = array.array("q")
        storm: array.array[int] = array.array("q")
        replayed: array.array[int] = array.array("q")
        for report in reports:
            stamps: array.array[int] = array.array("q")
            latencies: array.array[int] = array.array("q")
            with open(report["samples_file"], "rb") as fh:
                stamps.fromfile(fh, report["deliveries"])
                latencies.fromfile(fh, report["deliveries"])
                fh.seek(report["replayed"] * 8, os.SEEK_CUR)  # their publish times
                replayed.fromfile(fh, report["replayed"])
            os.unlink(report["samples_file"])
            for stamp, latency in zip(stamps, latencies, strict=True):
                if times["steady0"] <= stamp < t0:
                    steady.append(latency)
                elif t0 <= stamp <= times["t_back"]:
                    storm.append(latency)
        back = [at - t0 for r in reports for at in r["back_at"] if at >= t0]
        total = {
            key: sum(r[key] for r in reports)
            for key in (
                "streams",
                "connected",
                "lost",
                "missed_after_reset",
                "duplicated",
                "reordered",
                "stream_resets",
                "streams_reset",
                "streams_closed",
                "failed_connects",
                "refused_status",
                "deliveries",
                "replayed",
            )
        }
        return {
            **total,
            "behind_at_end": behind,
            "down_at_start": down_at_start,
            "open_seconds": open_seconds,
            "strike_seconds": (times["struck"] - t0) / 1e9,
            "all_back_s": max(back) / 1e9 if back else 0.0,
            "back_seen_s": (times["t_back"] - t0) / 1e9,
            "latency_steady_ms": percentiles(steady, (50, 99)),
            "latency_storm_ms": percentiles(storm, (50, 99)),
            "latency_replayed_ms": percentiles(replayed, (50, 99)),
            "retry_ms": _spread([ms for r in reports for ms in r["retries"]], 1),
            "closes_after_s": _spread([at - t0 for r in reports for at in r["closes"]]),
            "reconnect_delay_s": _spread([d for r in reports for d in r["delays"]]),
            "outage_s": _spread([d for r in reports for d in r["outages"]]),
            "lost_stories": [story for r in reports for story in r["lost_stories"]][:10],
            "unknown_publishes": publisher.unknown,
            "published": publisher.published,
            "publishes_refused": publisher.refused,
            "publishes_unknown": sum(len(v) for v in publisher.unknown.values()),
        }


# ---------------------------------------------------------------------- the run


async def run_storm(
    plan: StormPlan, cases: Sequence[str], workdir: Path | None = None
) -> dict[str, Any]:
    """Run *cases* one after the other; the results by case (``status`` ok or why not)."""
    server_core, client_core = cores()
    affinity = os.sched_getaffinity(0) if client_core is not None else None
    if client_core is not None:
        os.sched_setaffinity(0, client_core)
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="tornado-sse-storm-")) if workdir is None else workdir
    results: dict[str, Any] = {}
    try:
        for name in cases:
            if name == "c" and shutil.which("redis-server") is None:
                results[name] = {"status": "not installed (redis-server: apt-get install it)"}
                continue
            workers = Workers(plan.workers, client_core, work)
            try:
                await workers.start()
                result = await Case(name, plan, work, server_core, workers).run()
                results[name] = {"status": "ok", **result}
            except Exception as exc:
                results[name] = {"status": f"failed: {type(exc).__name__}: {exc}"}
            finally:
                await workers.stop()
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    return results
