"""What the unix-socket bridge costs against one process, and what a second process changes.

Scenarios (the hub under test serves real ``EventStreamHandler`` streams over HTTP; the load
generator, `tornado_sse.bench.loadgen`, holds the subscribers as raw sockets and checks every
event for loss, duplicates, order and latency):

``memory/1``
    one process, `InProcessBroker`: the baseline.
``bridge/1``
    one process, `BridgeBroker`: the process runs the hub and its own broker talks to it over
    the unix socket, so every event crosses the bridge once (publish) and comes back once.
``bridge/2``
    two worker processes forked by `tornado_sse.process.fork_processes`, sharing the listening
    socket (the kernel spreads the subscribers), joined by the bridge; one of them runs the hub.

For each: a *burst* of events published back to back (deliveries per second from first publish
to last receive, CPU per delivery of the whole group, split between the hub's process and the
other), then events at a fixed *rate* (publish-to-receive latency percentiles). The publisher
is ``broker.publish`` inside the worker that receives ``POST /run``.

Placement: the hub group on the first core (both workers share it by default, so ``bridge/2``
has the same CPU budget as the others: what it shows is the cost of a second process, not the
gain of a second core), the load generator on the second. With more cores, pass
``--group-cores 0,1`` and ``--loadgen-cores 2,3``. Run::

    python -m tornado_sse.bench.bridge_cost --subscribers 1000 --out bridge_cost.json

Printed as a Markdown table and, with ``--out``, written as JSON.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
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
SCENARIOS = ("memory/1", "bridge/1", "bridge/2")


# ---------------------------------------------------------------------- the group under test


def run_target(port: int, broker_name: str, processes: int) -> None:
    """The hub under test: *processes* workers on *port*; each prints ``ready <pid> <role>``."""
    import tornado.web
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from tornado_sse import ConnectionSet, EventStreamHandler, InProcessBroker
    from tornado_sse.broker.base import Broker
    from tornado_sse.broker.bridge import BridgeBroker
    from tornado_sse.process import fork_processes, group_socket_path

    sockets = bind_sockets(port, HOST, backlog=4096)
    if processes > 1:
        fork_processes(processes)

    async def main() -> None:
        broker: Broker
        if broker_name == "bridge":
            broker = BridgeBroker(group_socket_path(), history_size=1000)
        else:
            broker = InProcessBroker(history_size=1000)
        await broker.start()
        connections = ConnectionSet()

        class Run(tornado.web.RequestHandler):
            async def post(self) -> None:
                spec = json.loads(self.request.body)
                t0 = time.monotonic_ns()
                await publish_paced(
                    lambda payload: broker.publish(CHANNEL, payload),
                    int(spec["first"]),
                    int(spec["count"]),
                    int(spec["size"]),
                    float(spec["rate"]),
                    int(spec.get("window", 1)),
                )
                self.finish({"t0": t0, "t1": time.monotonic_ns(), "pid": os.getpid()})

        app = tornado.web.Application(
            [(r"/events", EventStreamHandler), (r"/run", Run)],
            sse_broker=broker,
            sse_connections=connections,
            sse_max_buffer_size=64 << 20,
        )
        server = HTTPServer(app)
        server.add_sockets(sockets)
        role = "hub" if getattr(broker, "hub", None) is not None else "peer"
        print(f"ready {os.getpid()} {role}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pin(cores: set[int] | None) -> Any:
    if cores is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, cores)

    return pin


def _cores(spec: str) -> set[int] | None:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return None
    return {usable[int(index) % len(usable)] for index in spec.split(",")}


class Target:
    """A group started by `run_target`: its workers' pids and roles."""

    def __init__(self, broker: str, processes: int, cores: set[int] | None) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind((HOST, 0))
            self.port = int(sock.getsockname()[1])
        command = [sys.executable, "-m", __spec__.name if __spec__ else "bench.bridge_cost"]
        command += ["target", "--port", str(self.port), "--broker", broker]
        command += ["--processes", str(processes)]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, preexec_fn=_pin(cores), text=True
        )
        assert self.proc.stdout is not None
        self.roles: dict[int, str] = {}
        for _ in range(processes):
            line = self.proc.stdout.readline().split()
            if len(line) != 3 or line[0] != "ready":
                self.stop()
                raise RuntimeError(f"group did not start ({broker}/{processes}): {line!r}")
            self.roles[int(line[1])] = line[2]

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"http://{HOST}:{self.port}{path}"
        with urllib.request.urlopen(url, data=json.dumps(body).encode(), timeout=600) as reply:
            result: dict[str, Any] = json.loads(reply.read())
            return result

    def cpu(self) -> dict[int, float]:
        return {pid: _cpu(pid) for pid in self.roles}

    def streams(self) -> dict[int, int]:
        """Established streams per worker (the kernel's spread of the subscribers)."""
        import psutil

        counts = {}
        for pid in self.roles:
            counts[pid] = sum(
                1
                for conn in psutil.Process(pid).net_connections(kind="tcp")
                if conn.laddr.port == self.port and conn.status == "ESTABLISHED"
            )
        return counts

    def stop(self) -> None:
        stop_process(self.proc)


# ---------------------------------------------------------------------- measuring


async def measure(scenario: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    broker, _, count = scenario.partition("/")
    processes = int(count)
    target = Target(broker, processes, _cores(args.group_cores))
    workers = Workers(args.workers, _cores(args.loadgen_cores), workdir)
    seq = 0
    try:
        await workers.start()
        counts = split(args.subscribers, args.workers)
        replies = await workers.each(
            lambda i: {
                "cmd": "connect",
                "n": counts[i],
                "host": HOST,
                "port": target.port,
                "path": f"/events?channel={CHANNEL}",
                "src": workers.source(i),
                "concurrency": 200,
            }
        )
        connected = sum(r["connected"] for r in replies)
        if connected != args.subscribers:
            raise RuntimeError(f"{scenario}: only {connected} of {args.subscribers} connected")
        spread = target.streams()

        async def run(count: int, rate: float, latency: bool, window: int = 1) -> dict[str, Any]:
            nonlocal seq
            first = seq + 1
            seq += count
            await workers.each(lambda i: {"cmd": "begin", "first": first, "latency": latency})
            cpu0 = target.cpu()
            spec = {
                "first": first,
                "count": count,
                "rate": rate,
                "size": args.size,
                "window": window,
            }
            published = await asyncio.to_thread(target.call, "/run", spec)
            reports = await workers.each(lambda i: {"cmd": "wait", "last": seq, "timeout": 300})
            cpu1 = target.cpu()
            received = sum(r["received"] for r in reports)
            end = max(r["last_recv"] for r in reports)
            cpu = {target.roles[pid]: cpu1[pid] - cpu0[pid] for pid in cpu0}
            result: dict[str, Any] = {
                "events": count,
                "deliveries": received,
                "lost": sum(r["lost"] for r in reports),
                "duplicated": sum(r["duplicated"] for r in reports),
                "reordered": sum(r["reordered"] for r in reports),
                "seconds": (end - published["t0"]) / 1e9,
                "publish_seconds": (published["t1"] - published["t0"]) / 1e9,
                "publisher": target.roles.get(published["pid"], "?"),
                "cpu_seconds": cpu,
            }
            if latency:
                values: array.array[int] = array.array("q")
                for report in reports:
                    if report["latency_file"]:
                        with open(report["latency_file"], "rb") as fh:
                            values.frombytes(fh.read())
                result["latency_ms"] = percentiles(values, (50, 90, 99))
            return result

        await run(20, 0, False)  # warm-up: every stream has seen an event
        burst = await run(args.burst, 0, False)
        pipelined = await run(args.burst, 0, False, args.window)
        latency = await run(int(args.rate * args.seconds), args.rate, True)
        for figures in (burst, pipelined, latency):
            total_cpu = sum(figures["cpu_seconds"].values())
            figures["deliveries_per_second"] = figures["deliveries"] / figures["seconds"]
            figures["cpu_us_per_delivery"] = total_cpu / figures["deliveries"] * 1e6
            figures["cpu_us_per_event"] = {
                role: seconds / figures["events"] * 1e6
                for role, seconds in figures["cpu_seconds"].items()
            }
        return {
            "scenario": scenario,
            "broker": broker,
            "processes": processes,
            "subscribers": connected,
            "streams_per_process": {target.roles[pid]: n for pid, n in spread.items()},
            "burst": burst,
            "pipelined": pipelined,
            "window": args.window,
            "latency": latency,
        }
    finally:
        await workers.stop()
        target.stop()


class _Counter:
    """A subscriber that only counts (so that the broker's own cost is what is measured)."""

    def __init__(self) -> None:
        self.count = 0
        self.last_latency_ns = 0

    def deliver(self, frame: Any) -> None:
        self.count += 1


async def overhead(events: int, window: int) -> list[dict[str, Any]]:
    """The bridge's own cost per event, without HTTP: CPU of this process (publisher, hub and a
    following broker all in it) per event, pipelined, and the round trip of one publish."""
    from tornado_sse import InProcessBroker
    from tornado_sse.broker.base import Broker
    from tornado_sse.broker.bridge import BridgeBroker

    out = []
    with tempfile.TemporaryDirectory(prefix="bridge-overhead-") as tmp:
        for name in ("memory", "bridge"):
            publisher: Broker
            follower: Broker
            if name == "memory":
                publisher = follower = InProcessBroker()
            else:
                publisher = BridgeBroker(os.path.join(tmp, "hub.sock"))
                await publisher.start()
                follower = BridgeBroker(os.path.join(tmp, "hub.sock"), takeover=False)
            await follower.start()
            counter = _Counter()
            sub = await follower.subscribe([CHANNEL], counter)
            sub.start()
            loop = asyncio.get_running_loop()

            async def until(count: int, counter: _Counter = counter) -> None:
                while counter.count < count:
                    await asyncio.sleep(0)

            cpu0, t0 = time.process_time(), time.perf_counter()
            flying: set[asyncio.Future[str]] = set()
            for index in range(events):
                flying.add(asyncio.ensure_future(publisher.publish(CHANNEL, str(index))))
                if len(flying) >= window:
                    _, flying = await asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.gather(*flying)
            await until(events)
            cpu1, t1 = time.process_time(), time.perf_counter()
            rounds = []
            for index in range(1000):
                start = loop.time()
                await publisher.publish(CHANNEL, str(index))
                await until(events + index + 1)
                rounds.append(loop.time() - start)
            rounds.sort()
            out.append(
                {
                    "scenario": f"overhead/{name}",
                    "events_per_second": events / (t1 - t0),
                    "cpu_us_per_event": (cpu1 - cpu0) / events * 1e6,
                    "publish_to_deliver_us": {
                        "p50": rounds[len(rounds) // 2] * 1e6,
                        "p99": rounds[int(len(rounds) * 0.99)] * 1e6,
                    },
                }
            )
            sub.close()
            await follower.close()
            await publisher.close()
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | streams per process | deliveries/s, one publish at a time "
        "| deliveries/s, pipelined | CPU µs/delivery, pipelined (hub + peer) "
        "| CPU µs/event at the steady rate (hub, peer) | p50 ms | p99 ms | max ms | lost/dup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r["scenario"].startswith("overhead/"):
            continue
        lat = r["latency"]["latency_ms"]
        runs = ("burst", "pipelined", "latency")
        faults = sum(r[k]["lost"] + r[k]["duplicated"] + r[k]["reordered"] for k in runs)
        per_event = r["latency"]["cpu_us_per_event"]
        spread = ", ".join(f"{role} {n}" for role, n in sorted(r["streams_per_process"].items()))
        roles = ", ".join(f"{role} {us:.0f}" for role, us in sorted(per_event.items()))
        lines.append(
            f"| {r['scenario']} | {spread} | {r['burst']['deliveries_per_second']:,.0f} "
            f"| {r['pipelined']['deliveries_per_second']:,.0f} "
            f"| {r['pipelined']['cpu_us_per_delivery']:.2f} | {roles} "
            f"| {lat['p50']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} | {faults} |"
        )
    overheads = [r for r in results if r["scenario"].startswith("overhead/")]
    if overheads:
        lines += [
            "",
            "| broker, no HTTP | events/s (pipelined, 1 follower) | CPU µs/event "
            "| publish to deliver p50 µs | p99 µs |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in overheads:
            lines.append(
                f"| {r['scenario'].split('/')[1]} | {r['events_per_second']:,.0f} "
                f"| {r['cpu_us_per_event']:.1f} | {r['publish_to_deliver_us']['p50']:.0f} "
                f"| {r['publish_to_deliver_us']['p99']:.0f} |"
            )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    if args.overhead:
        for result in await overhead(args.overhead, args.window):
            results.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="bridge-cost-") as tmp:
        for scenario in args.scenarios:
            for repeat in range(args.repeat):
                result = await measure(scenario, args, Path(tmp))
                result["repeat"] = repeat
                results.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    target = sub.add_parser("target", help="(internal) the group under test")
    target.add_argument("--port", type=int, required=True)
    target.add_argument("--broker", choices=["memory", "bridge"], required=True)
    target.add_argument("--processes", type=int, default=1)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=2000, help="events in the burst runs")
    parser.add_argument(
        "--window", type=int, default=64, help="publishes in flight in the pipelined burst"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="events/s in the latency run")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency run")
    parser.add_argument("--size", type=int, default=64, help="bytes of data per event")
    parser.add_argument("--workers", type=int, default=1, help="load generator processes")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario")
    parser.add_argument("--group-cores", default="0", help="cores of the group under test")
    parser.add_argument("--loadgen-cores", default="1", help="cores of the load generator")
    parser.add_argument(
        "--scenarios", nargs="*", choices=SCENARIOS, default=list(SCENARIOS), help="default: all"
    )
    parser.add_argument(
        "--overhead",
        type=int,
        default=20000,
        metavar="EVENTS",
        help="also measure the bridge's own cost per event without HTTP (0: skip)",
    )
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.command == "target":
        run_target(args.port, args.broker, args.processes)
        return
    results = asyncio.run(main_async(args))
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
