"""What ``tornado-sse serve --processes 2`` costs per delivery beside one process (issue 15, 5).

    python -m tornado_sse.bench.serve_cost --subscribers 1000 --rounds 3

The real command, not a model of it: each round starts ``tornado-sse serve`` with
``--processes 1``, then with ``--processes 2`` (in alternating order from round to round),
connects the subscribers (the load generator, `tornado_sse.bench.loadgen`, on its own core,
checking every event for loss, duplicates and order), and POSTs a burst of events to
``/publish`` one at a time over one keep-alive connection, as a backend would. The server CPU
(user + system, from ``/proc``) of every process of the group is summed over the burst: the
supervisor, the workers, and so the worker that runs the bridge's hub; it is divided by the
deliveries the clients received. The group is pinned to one core, so that both variants have
the same CPU budget: what the ratio shows is what a second process costs, not what a second
core gains. Each round's ratio compares runs made seconds apart; the result is the median of
the rounds' ratios (the machine is shared, and one run proves little).

``POST /publish`` is part of the cost in both variants (about the same in each): at 1,000
subscribers it is a few percent of an event's fan-out.

Printed as a Markdown table; ``--out`` writes every run as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .events import make_payload
from .harness import Workers, split, stop_process

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CHANNEL = "bench"


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _children(pid: int) -> list[int]:
    """The direct children of *pid* (Linux: /proc/PID/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _pin(core: set[int] | None) -> Any:
    if core is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, core)

    return pin


class Group:
    """One ``tornado-sse serve`` (its supervisor and workers, or the single process)."""

    def __init__(self, processes: int, core: set[int] | None, log: Path) -> None:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            self.port = int(sock.getsockname()[1])
        self.processes = processes
        self.token = secrets.token_urlsafe(32)
        command = [
            *(sys.executable, "-c", "from tornado_sse.cli import main; main()", "serve"),
            *("--host", HOST, "--port", str(self.port), "--public-channel", CHANNEL),
            *("--processes", str(processes), "--log-level", "warning"),
            # the load generator connects from one address, all at once; the bursts are fast
            *("--max-connections-per-address", "0", "--stream-rate", "0", "--publish-rate", "0"),
        ]
        self._log = open(log, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            command,
            env={**os.environ, "TORNADO_SSE_TOKEN": self.token},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=_pin(core),
        )
        self.pids: list[int] = []

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until ``/healthz`` answers and every worker exists."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve --processes {self.processes} exited")
            pids = [self.proc.pid]
            if self.processes > 1:
                pids += _children(self.proc.pid)
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/healthz", timeout=2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            if len(pids) == self.processes + (1 if self.processes > 1 else 0):
                self.pids = pids
                return
            time.sleep(0.05)
        raise RuntimeError(f"serve --processes {self.processes} did not start")

    def cpu(self) -> float:
        return sum(_cpu(pid) for pid in self.pids)

    def stop(self) -> None:
        stop_process(self.proc, 15.0)
        self._log.close()


async def publish(port: int, token: str, first: int, count: int, size: int) -> None:
    """POST *count* events to ``/publish``, one at a time over one keep-alive connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for seq in range(first, first + count):
            body = json.dumps({"channel": CHANNEL, "data": make_payload(seq, size)}).encode()
            writer.write(
                f"POST /publish HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 202"):
                raise RuntimeError(f"publish refused: {head[:80]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
    finally:
        writer.close()


async def measure(
    processes: int, args: argparse.Namespace, workers: Workers, work: Path, core: set[int] | None
) -> dict[str, Any]:
    group = Group(processes, core, work / f"serve-{processes}.log")
    try:
        await asyncio.to_thread(group.wait_ready)
        counts = split(args.subscribers, len(workers.procs))
        replies = await workers.each(
            lambda i: {
                "cmd": "connect",
                "n": counts[i],
                "host": HOST,
                "port": group.port,
                "path": f"/events?channel={CHANNEL}",
                "src": workers.source(i),
                "concurrency": 200,
            }
        )
        connected = sum(r["connected"] for r in replies)
        if connected != args.subscribers:
            raise RuntimeError(f"--processes {processes}: {connected} of {args.subscribers}")
        seq = 0

        async def burst(count: int) -> dict[str, Any]:
            nonlocal seq
            first = seq + 1
            seq += count
            await workers.each(lambda i: {"cmd": "begin", "first": first, "latency": False})
            cpu0 = group.cpu()
            t0 = time.monotonic()
            await publish(group.port, group.token, first, count, args.size)
            reports = await workers.each(lambda i: {"cmd": "wait", "last": seq, "timeout": 300})
            cpu = group.cpu() - cpu0
            received = sum(r["received"] for r in reports)
            return {
                "events": count,
                "deliveries": received,
                "seconds": time.monotonic() - t0,
                "server_cpu_s": cpu,
                "cpu_us_per_delivery": cpu / received * 1e6 if received else None,
                "lost": sum(r["lost"] for r in reports),
                "duplicated": sum(r["duplicated"] for r in reports),
                "reordered": sum(r["reordered"] for r in reports),
            }

        await burst(20)  # warm-up: every stream has seen an event, every worker its imports
        result = await burst(args.events)
        result["processes"] = processes
        result["subscribers"] = connected
        await workers.each(lambda i: {"cmd": "close"})
        return result
    finally:
        await asyncio.to_thread(group.stop)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    usable = sorted(os.sched_getaffinity(0))
    core = {usable[0]} if len(usable) > 1 else None
    client_core = set(usable[1:]) if len(usable) > 1 else None
    load0 = os.getloadavg()
    rounds: list[dict[int, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        workers = Workers(args.workers, client_core, work)
        await workers.start()
        try:
            for index in range(args.rounds):
                order = (1, 2) if index % 2 == 0 else (2, 1)
                runs = {n: await measure(n, args, workers, work, core) for n in order}
                rounds.append(runs)
                print(
                    f"round {index + 1}: "
                    + ", ".join(
                        f"--processes {n}: {runs[n]['cpu_us_per_delivery']:.2f} us/delivery"
                        for n in (1, 2)
                    ),
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            await workers.stop()
    ratios = [r[2]["cpu_us_per_delivery"] / r[1]["cpu_us_per_delivery"] for r in rounds]
    return {
        "subscribers": args.subscribers,
        "events": args.events,
        "rounds": [{str(n): run for n, run in r.items()} for r in rounds],
        "median_us": {
            str(n): statistics.median(r[n]["cpu_us_per_delivery"] for r in rounds) for n in (1, 2)
        },
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "integrity": {
            key: sum(r[n][key] for r in rounds for n in (1, 2))
            for key in ("lost", "duplicated", "reordered")
        },
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def table(result: dict[str, Any]) -> str:
    per_round = " ".join(f"{ratio:.2f}" for ratio in result["ratios"])
    integrity = result["integrity"]
    return "\n".join(
        [
            f"{result['subscribers']:,} subscribers, bursts of {result['events']:,} events, "
            f"{len(result['rounds'])} rounds, load average {result['loadavg_start'][0]:.1f} at "
            f"the start, {result['loadavg_end'][0]:.1f} at the end",
            "",
            "| tornado-sse serve | server CPU per delivery, all processes (median) | ratio |",
            "|---|---|---|",
            f"| --processes 1 | {result['median_us']['1']:.2f} us | 1.00x |",
            f"| --processes 2 | {result['median_us']['2']:.2f} us | "
            f"{result['median_ratio']:.2f}x (per round: {per_round}) |",
            "",
            f"lost / duplicated / reordered: {integrity['lost']} / {integrity['duplicated']} / "
            f"{integrity['reordered']}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=2000, help="events in each burst")
    parser.add_argument("--size", type=int, default=64, help="bytes of data per event")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="load generator processes")
    parser.add_argument("--out", help="write every run as JSON here")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
