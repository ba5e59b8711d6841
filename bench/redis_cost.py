"""What the Redis broker costs, against the in-process broker, measured on this machine.

For each broker (``memory``, then ``redis``) a hub process serves the subscribers' streams from
`EventStreamHandler` and publishes the benchmark's events itself, through ``broker.publish``;
the load generator (`tornado_sse.bench.loadgen`) holds the subscribers as raw sockets and checks
every event (loss, duplicates, order, latency). A redis-server of its own is started (no
persistence) unless ``--redis-url`` names one. Measured, for each broker:

``burst``
    *burst* events published one after the other as fast as the broker takes them: deliveries
    per second (first publish to last receive, all subscribers), hub CPU per delivery.
``latency``
    events at a fixed *rate* for *seconds*: p1, p50, p99 and max publish-to-receive latency, and
    hub CPU per delivery when events go out one at a time. p1 is the broker's own path (the
    first streams served); the median and above add the time it takes to write one event to
    every stream, which is the same for both brokers.
``redis``
    Redis commands per published event (``INFO commandstats``, commands run inside the publish
    script included), Redis CPU per event, over the burst and latency runs together.

Placement: the hub is pinned to the first core, the load generator and redis-server to the
second (when there are two), so the hub's figures are its own. Run from a checkout or an
install::

    python -m tornado_sse.bench.redis_cost --subscribers 1000 --out redis_cost.json

Printed as a Markdown table and, with ``--out``, written as JSON.
"""

from __future__ import annotations

import argparse
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
import urllib.request
from pathlib import Path
from typing import Any

from .events import publish_paced
from .harness import Workers, percentiles, split, stop_process

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CHANNEL = "bench"
#: broker / where the publisher runs: in the hub, or in another process (another host)
SCENARIOS = ("memory/hub", "redis/hub", "redis/remote")


# ---------------------------------------------------------------------- the hub under test


async def publish_spec(broker: Any, spec: dict[str, Any]) -> None:
    """Publish what a ``/run`` request or a stdin line asks for on the benchmark's channel."""
    await publish_paced(
        lambda payload: broker.publish(CHANNEL, payload),
        int(spec["first"]),
        int(spec["count"]),
        int(spec["size"]),
        float(spec["rate"]),
    )


def run_target(
    port: int, broker_name: str, redis_url: str | None, prefix: str, stream_length: int
) -> None:
    """The hub process: streams on /events, publishing on POST /run, readings on /stats."""
    import tornado.web

    from tornado_sse import ConnectionSet, EventStreamHandler, InProcessBroker
    from tornado_sse.broker.base import Broker

    async def main() -> None:
        broker: Broker
        if broker_name == "redis":
            from tornado_sse.broker.redis import RedisBroker

            assert redis_url is not None
            broker = RedisBroker(
                redis_url, key_prefix=prefix, history_size=1000, min_stream_length=stream_length
            )
        else:
            broker = InProcessBroker(history_size=1000)
        await broker.start()
        connections = ConnectionSet()

        class Run(tornado.web.RequestHandler):
            async def post(self) -> None:
                spec = json.loads(self.request.body)
                t0 = time.monotonic_ns()
                await publish_spec(broker, spec)
                self.finish({"t0": t0, "t1": time.monotonic_ns()})

        class Stats(tornado.web.RequestHandler):
            def get(self) -> None:
                with open(f"/proc/{os.getpid()}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
                rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
                resets = getattr(broker, "live_resets", 0)
                self.finish(
                    {"streams": len(connections), "cpu": cpu, "rss": rss, "live_resets": resets}
                )

        app = tornado.web.Application(
            [(r"/events", EventStreamHandler), (r"/run", Run), (r"/stats", Stats)],
            sse_broker=broker,
            sse_connections=connections,
            sse_max_buffer_size=64 << 20,
        )
        app.listen(port, HOST, backlog=4096)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class Target:
    """A hub process started by `run_target`."""

    def __init__(self, broker: str, redis_url: str | None, prefix: str, stream_length: int) -> None:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            self.port = int(sock.getsockname()[1])
        command = [sys.executable, "-m", __spec__.name if __spec__ else "bench.redis_cost"]
        command += ["target", "--port", str(self.port), "--broker", broker, "--prefix", prefix]
        command += ["--stream-length", str(stream_length)]
        if redis_url is not None:
            command += ["--redis-url", redis_url]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, preexec_fn=_pin({0}), text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"hub did not start ({broker}): {line!r}")

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        url = f"http://{HOST}:{self.port}{path}"
        with urllib.request.urlopen(url, data=data, timeout=600) as reply:
            result: dict[str, Any] = json.loads(reply.read())
            return result

    def stop(self) -> None:
        stop_process(self.proc)


def _pin(cores: set[int]) -> Any:
    usable = os.sched_getaffinity(0)
    if len(usable) < 2:
        return None
    chosen = {sorted(usable)[index] for index in cores}

    def pin() -> None:
        os.sched_setaffinity(0, chosen)

    return pin


def run_publisher(redis_url: str, prefix: str, stream_length: int) -> None:
    """Another host's publisher: a `RedisBroker` of its own, driven by JSON lines on stdin."""
    from tornado_sse.broker.redis import RedisBroker

    async def main() -> None:
        broker = RedisBroker(
            redis_url, key_prefix=prefix, history_size=1000, min_stream_length=stream_length
        )
        await broker.start()
        print(json.dumps({"ok": True}), flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            spec = json.loads(line)
            t0 = time.monotonic_ns()
            await publish_spec(broker, spec)
            print(json.dumps({"t0": t0, "t1": time.monotonic_ns()}), flush=True)
        await broker.close()

    asyncio.run(main())


class Publisher:
    """A `run_publisher` process, pinned beside the load generator."""

    def __init__(self, redis_url: str, prefix: str, stream_length: int) -> None:
        command = [sys.executable, "-m", __spec__.name if __spec__ else "bench.redis_cost"]
        command += ["publisher", "--redis-url", redis_url, "--prefix", prefix]
        command += ["--stream-length", str(stream_length)]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=_pin({1}),
            text=True,
        )
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("publisher exited")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# ---------------------------------------------------------------------- redis-server


class RedisProcess:
    """A throwaway redis-server on a free loopback port, pinned beside the load generator."""

    def __init__(self, workdir: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise SystemExit("redis-server is not installed (or pass --redis-url)")
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            self.port = int(sock.getsockname()[1])
        args = [executable, "--port", str(self.port), "--bind", HOST, "--save", ""]
        args += ["--appendonly", "no", "--dir", str(workdir), "--logfile", "redis.log"]
        self.proc = subprocess.Popen(args, preexec_fn=_pin({1}))
        self.url = f"redis://{HOST}:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def redis_readings(url: str) -> tuple[dict[str, tuple[int, int]], float]:
    """``(calls, microseconds)`` per command and Redis CPU seconds so far."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
        cpu = client.info("cpu")
    finally:
        client.close()
    calls = {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in stats.items()
    }
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def xread_cost(url: str, sizes: list[int], prefix: str) -> dict[str, float]:
    """Redis microseconds per ``XREAD`` that finds nothing new, by number of streams named.

    The reader names every followed stream in each ``XREAD``; this is what that costs Redis.
    """
    import redis

    client = redis.Redis.from_url(url)
    out: dict[str, float] = {}
    try:
        for size in sizes:
            keys = [f"{prefix}xread:{size}:{n}" for n in range(size)]
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.xadd(key, {"b": "x"})
            ids = pipe.execute()
            streams = dict(zip(keys, ids, strict=True))
            calls = max(20, 20_000 // size)
            before = client.info("commandstats").get("cmdstat_xread", {"usec": 0, "calls": 0})
            for _ in range(calls):
                client.xread(streams, count=1000)
            after = client.info("commandstats")["cmdstat_xread"]
            out[str(size)] = (after["usec"] - before["usec"]) / (after["calls"] - before["calls"])
            client.delete(*keys)
    finally:
        client.close()
    return out


# ---------------------------------------------------------------------- measuring


async def measure(
    scenario: str, args: argparse.Namespace, redis_url: str | None, workdir: Path
) -> dict[str, Any]:
    broker, _, where = scenario.partition("/")
    prefix = f"bench-{os.getpid()}-{scenario}:"
    target = Target(broker, redis_url, prefix, args.stream_length)
    workers = Workers(args.workers, _cores({1}), workdir)
    publisher = None
    if where == "remote":
        assert redis_url is not None
        publisher = Publisher(redis_url, prefix, args.stream_length)
    seq = 0
    try:
        await workers.start()
        rss0 = target.call("/stats")["rss"]
        counts = split(args.subscribers, args.workers)
        path = f"/events?channel={CHANNEL}"
        replies = await workers.each(
            lambda i: {
                "cmd": "connect",
                "n": counts[i],
                "host": HOST,
                "port": target.port,
                "path": path,
                "src": workers.source(i),
                "concurrency": 200,
            }
        )
        connected = sum(r["connected"] for r in replies)
        rss1 = target.call("/stats")["rss"]
        if connected != args.subscribers:
            raise RuntimeError(f"{broker}: only {connected} of {args.subscribers} connected")

        async def run(count: int, rate: float, latency: bool) -> dict[str, Any]:
            nonlocal seq
            first = seq + 1
            seq += count
            await workers.each(lambda i: {"cmd": "begin", "first": first, "latency": latency})
            cpu0 = target.call("/stats")["cpu"]
            spec = {"first": first, "count": count, "rate": rate, "size": args.size}
            if publisher is None:
                published = await asyncio.to_thread(target.call, "/run", spec)
            else:
                published = await asyncio.to_thread(publisher.run, spec)
            reports = await workers.each(lambda i: {"cmd": "wait", "last": seq, "timeout": 120})
            stats = target.call("/stats")
            cpu1 = stats["cpu"]
            received = sum(r["received"] for r in reports)
            end = max(r["last_recv"] for r in reports)
            result: dict[str, Any] = {
                "events": count,
                "deliveries": received,
                "lost": sum(r["lost"] for r in reports),
                "duplicated": sum(r["duplicated"] for r in reports),
                "reordered": sum(r["reordered"] for r in reports),
                "seconds": (end - published["t0"]) / 1e9,
                "publish_seconds": (published["t1"] - published["t0"]) / 1e9,
                "hub_cpu_seconds": cpu1 - cpu0,
                "live_resets_so_far": stats["live_resets"],
            }
            if latency:
                values: array.array[int] = array.array("q")
                for report in reports:
                    if report["latency_file"]:
                        with open(report["latency_file"], "rb") as fh:
                            values.frombytes(fh.read())
                # p1: the first subscribers served, i.e. the broker's own path; p50 and above
                # also include the time one event takes to be written to every stream
                result["latency_ms"] = percentiles(values, (1, 50, 90, 99))
            return result

        await run(20, 0, False)  # warm-up: every stream has seen an event
        before = redis_readings(redis_url) if broker == "redis" and redis_url else None
        burst = await run(args.burst, 0, False)
        after_burst = redis_readings(redis_url) if before is not None and redis_url else None
        latency = await run(int(args.rate * args.seconds), args.rate, True)
        result: dict[str, Any] = {
            "scenario": scenario,
            "broker": broker,
            "publisher": "another process" if where == "remote" else "in the hub",
            "subscribers": connected,
            "hub_rss_kib_per_stream": (rss1 - rss0) / 1024 / max(1, connected),
        }
        result["burst"] = burst
        result["burst"]["deliveries_per_second"] = burst["deliveries"] / burst["seconds"]
        result["burst"]["hub_cpu_us_per_delivery"] = (
            burst["hub_cpu_seconds"] / burst["deliveries"] * 1e6
        )
        result["latency"] = latency
        if before is not None and after_burst is not None and redis_url is not None:
            calls1, _ = redis_readings(redis_url)
            calls0, cpu0 = before
            events = burst["events"] + latency["events"]
            diff = {
                name: (n - calls0.get(name, (0, 0))[0], us - calls0.get(name, (0, 0))[1])
                for name, (n, us) in calls1.items()
            }
            diff = {name: v for name, v in diff.items() if v[0] and name != "info"}
            result["redis"] = {
                "events": events,
                "commands_per_event": {k: round(v[0] / events, 3) for k, v in sorted(diff.items())},
                "usec_per_call": {k: round(v[1] / v[0], 2) for k, v in sorted(diff.items())},
                "total_per_event": round(sum(v[0] for v in diff.values()) / events, 3),
                # over the burst only: Redis's idle housekeeping would dominate a slow run
                "cpu_us_per_event": (after_burst[1] - cpu0) / burst["events"] * 1e6,
            }
        return result
    finally:
        await workers.stop()
        if publisher is not None:
            publisher.stop()
        target.stop()


def _cores(index: set[int]) -> set[int] | None:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return None
    return {usable[i] for i in index}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| broker | publisher | subscribers | burst deliveries/s | hub CPU µs/delivery "
        "| p1 ms | p50 ms | p99 ms | max ms | lost/dup | Redis cmds/event | Redis CPU µs/event |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "latency" not in r:
            continue
        lat = r["latency"]["latency_ms"]
        redis = r.get("redis", {})
        faults = sum(r[k]["lost"] + r[k]["duplicated"] for k in ("burst", "latency"))
        redis_cells = (
            f"{redis['total_per_event']} | {redis['cpu_us_per_event']:.0f}" if redis else "- | -"
        )
        lines.append(
            f"| {r['broker']} | {r['publisher']} | {r['subscribers']} "
            f"| {r['burst']['deliveries_per_second']:,.0f} "
            f"| {r['burst']['hub_cpu_us_per_delivery']:.2f} "
            f"| {lat['p1']:.2f} | {lat['p50']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} "
            f"| {faults} "
            f"| {redis_cells} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="redis-cost-") as tmp:
        workdir = Path(tmp)
        server = None if args.redis_url else RedisProcess(workdir)
        redis_url = args.redis_url or (server.url if server else None)
        try:
            for scenario in args.scenarios:
                for repeat in range(args.repeat):
                    result = await measure(scenario, args, redis_url, workdir)
                    result["repeat"] = repeat
                    results.append(result)
                    print(json.dumps(result), file=sys.stderr, flush=True)
            if redis_url is not None and args.xread_keys:
                cost = xread_cost(redis_url, args.xread_keys, f"bench-{os.getpid()}:")
                results.append({"scenario": "xread-cost", "usec_per_xread_by_streams": cost})
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        finally:
            if server is not None:
                server.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    target = sub.add_parser("target", help="(internal) the hub under test")
    target.add_argument("--port", type=int, required=True)
    target.add_argument("--broker", choices=["memory", "redis"], required=True)
    target.add_argument("--redis-url")
    target.add_argument("--prefix", default="bench:")
    target.add_argument("--stream-length", type=int, default=100)
    publisher = sub.add_parser("publisher", help="(internal) another host's publisher")
    publisher.add_argument("--redis-url", required=True)
    publisher.add_argument("--prefix", default="bench:")
    publisher.add_argument("--stream-length", type=int, default=100)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=2000, help="events in the burst run")
    parser.add_argument("--rate", type=float, default=100.0, help="events/s in the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--size", type=int, default=64, help="bytes of data per event")
    parser.add_argument("--workers", type=int, default=1, help="load generator processes")
    parser.add_argument("--repeat", type=int, default=1, help="runs per broker")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=SCENARIOS,
        default=list(SCENARIOS),
        help="broker/where the publisher runs (default: all)",
    )
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument(
        "--stream-length",
        type=int,
        default=10_000,
        help="RedisBroker min_stream_length: how far a hub may fall behind a burst",
    )
    parser.add_argument(
        "--xread-keys",
        type=int,
        nargs="*",
        default=[1, 100, 1000, 10_000],
        help="also measure XREAD's cost by number of streams named",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.command == "target":
        run_target(args.port, args.broker, args.redis_url, args.prefix, args.stream_length)
        return
    if args.command == "publisher":
        run_publisher(args.redis_url, args.prefix, args.stream_length)
        return
    results = asyncio.run(main_async(args))
    print(table(results))
    if args.out:
        with contextlib.suppress(FileExistsError):
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
