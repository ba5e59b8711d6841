"""What connecting a storm of streams costs the server, beside Tornado's empty handler.

    python -m tornado_sse.bench.connect_cost --streams 10000 --rounds 5

Issue 15, item 2: the hub should connect 10,000 streams for no more server CPU than an empty
Tornado `RequestHandler` (1.0x), an embedded `EventStreamHandler` within 1.2x of it. On a
shared machine one run of each proves little, so the peers take turns: every round starts each
peer afresh (in a rotated order), warms it up, connects the streams from the load generator
(`tornado_sse.bench.loadgen`, two processes on their own core), reads the server's CPU
(``/proc``, user + system) from the first connect until the server counts every stream, then
closes them and stops the server; the time the server spent in its cyclic garbage collector
meanwhile is read too (wall-clock time around each collection, through `gc.callbacks`, so
time descheduled inside one counts: a share to compare, not a CPU cost). The figure is the
median over the rounds of each peer's CPU, and each ratio the median of the per-round ratios
to the empty handler (the peers of one round ran within seconds of each other, so they shared
the machine's load). The load average is read at the start and the end.

Printed as a Markdown table; ``--out`` writes every round as JSON.

``--instructions`` measures the same thing without the noise: each peer runs once under
valgrind's callgrind (Debian's ``valgrind`` package), which counts the instructions the server
executes in user space from the first connect until it counts every stream; the figure is
instructions per stream and the ratio to the first peer. It is the same on a busy machine as
on a quiet one, so a change of a few percent shows, which the CPU figures above cannot tell
from noise. It leaves out the kernel's share (system calls) and what cache misses cost, and it
is run with the cyclic GC off by default (the ``*_nogc`` peers: the collector's share is in
the CPU run), with fewer streams and fewer connects in flight (callgrind runs the server
about fifty times slower)::

    python -m tornado_sse.bench.connect_cost --instructions --streams 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import PEERS, PeerRun, Plan, Progress, Server, Workers, cores

#: the peers compared by default; the first is the reference
DEFAULT_PEERS = ("tornado_empty", "tornado_sse", "tornado_sse_hubgc", "tornado_sse_hub")


def _runner(
    name: str,
    plan: Plan,
    workers: Workers,
    work: Path,
    server_core: Any,
    client_core: Any,
    wrap: list[str] | None = None,
) -> PeerRun:
    """A run of peer *name* (its server not started yet) with the shared load generator."""
    peer = PEERS[name]
    runner = PeerRun(peer, plan, work, Progress(), server_core, client_core)
    runner.server = Server(peer, plan, server_core, work, wrap=wrap or ())
    runner.workers = workers
    runner.clients = list(range(plan.workers))
    runner.publisher = None
    return runner


async def one(
    name: str, plan: Plan, workers: Workers, work: Path, server_core: Any, client_core: Any
) -> dict[str, Any]:
    """Start *name*, warm it up, connect ``plan.idle_streams`` streams; its connect CPU."""
    runner = _runner(name, plan, workers, work, server_core, client_core)
    await runner.server.start()
    try:
        await runner.warm_up()
        await runner.server.gc()
        gc0 = await runner.server.gc_seconds()
        cpu0 = runner.server.cpu()
        connect = await runner.connect(plan.idle_streams)
        seen = await runner.server.wait_streams(connect["connected"], 30, at_least=True)
        cpu = runner.server.cpu() - cpu0
        gc1 = await runner.server.gc_seconds()
        await runner._close_all()
        await runner.server.wait_streams(0, plan.settle_timeout)
        return {
            "peer": name,
            "streams": connect["connected"],
            "server_cpu_s": cpu,
            # wall-clock time in collections (descheduled time included): a share, not a cost
            "gc_s": None if gc0 is None or gc1 is None else gc1 - gc0,
            "wall_s": connect["seconds"],
            "seen": seen is not None,
            "errors": connect["errors"],
        }
    finally:
        await runner.server.stop()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    names = [name.strip() for name in args.peers.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peers: {', '.join(unknown)}")
    plan = Plan(idle_streams=args.streams, heartbeat=15.0)
    server_core, client_core = cores()
    load0 = os.getloadavg()
    rounds: list[list[dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        workers = Workers(plan.workers, client_core, work)
        await workers.start()
        try:
            for index in range(args.rounds):
                shift = index % len(names)
                order = names[shift:] + names[:shift]
                results = {}
                for name in order:
                    results[name] = await one(name, plan, workers, work, server_core, client_core)
                rounds.append([results[name] for name in names])
                print(
                    f"round {index + 1}: "
                    + ", ".join(f"{r['peer']} {r['server_cpu_s']:.2f}s" for r in rounds[-1]),
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            await workers.stop()
    load1 = os.getloadavg()
    reference = names[0]
    summary = []
    for column, name in enumerate(names):
        cpus = [r[column]["server_cpu_s"] for r in rounds]
        ratios = [r[column]["server_cpu_s"] / r[0]["server_cpu_s"] for r in rounds]
        gcs = [r[column]["gc_s"] for r in rounds if r[column]["gc_s"] is not None]
        summary.append(
            {
                "peer": name,
                "label": PEERS[name].label,
                "median_cpu_s": statistics.median(cpus),
                "median_ratio": statistics.median(ratios),
                "median_gc_s": statistics.median(gcs) if gcs else None,
                "ratios": ratios,
            }
        )
    return {
        "streams": args.streams,
        "rounds": rounds,
        "summary": summary,
        "reference": reference,
        "loadavg_start": load0,
        "loadavg_end": load1,
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


#: the peers of ``--instructions`` by default: each one's own work, the collector off
INSTRUCTION_PEERS = ("tornado_empty_nogc", "tornado_sse_nogc", "tornado_sse_hub_nogc")


async def instructions(
    name: str, plan: Plan, workers: Workers, work: Path, server_core: Any, client_core: Any
) -> dict[str, Any]:
    """Start *name* under callgrind, warm it up, connect ``plan.idle_streams`` streams; the
    instructions it executed meanwhile."""
    out = work / f"{name}.callgrind"
    wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"]
    runner = _runner(name, plan, workers, work, server_core, client_core, wrap)
    await runner.server.start()
    try:
        await runner.warm_up()
        pid = str(runner.server.pid)
        await _callgrind_control("-z", pid)  # count from here
        connect = await runner.connect(plan.idle_streams, concurrency=20)
        await runner.server.wait_streams(connect["connected"], 600, at_least=True)
        await _callgrind_control("-d", pid)  # dumps part 1: from the zero to here
        dump = Path(f"{out}.{pid}.1")
        total = next(
            int(line.split()[1])
            for line in dump.read_text().splitlines()
            if line.startswith("summary:")
        )
        await runner._close_all()
        return {
            "peer": name,
            "streams": connect["connected"],
            "instructions": total,
            "per_stream": total / connect["connected"],
        }
    finally:
        await runner.server.stop()


async def _callgrind_control(option: str, pid: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control", option, pid, stdout=asyncio.subprocess.DEVNULL
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"callgrind_control {option} {pid} failed")


async def count_instructions(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    names = [name.strip() for name in args.peers.split(",") if name.strip()]
    plan = Plan(idle_streams=args.streams, heartbeat=15.0)
    server_core, client_core = cores()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        workers = Workers(plan.workers, client_core, work)
        await workers.start()
        try:
            for name in names:
                results.append(
                    await instructions(name, plan, workers, work, server_core, client_core)
                )
                print(
                    f"{name}: {results[-1]['per_stream']:,.0f} instructions a stream",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            await workers.stop()
    return {
        "streams": args.streams,
        "results": results,
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def instruction_table(result: dict[str, Any]) -> str:
    reference = result["results"][0]["per_stream"]
    lines = [
        f"{result['streams']:,} streams connected under callgrind (user-space instructions)",
        "",
        "| server | instructions a stream | ratio |",
        "|---|---|---|",
    ]
    for row in result["results"]:
        lines.append(
            f"| {PEERS[row['peer']].label} | {row['per_stream'] / 1000:,.0f} k "
            f"| {row['per_stream'] / reference:.2f}x |"
        )
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['streams']:,} streams, {len(result['rounds'])} rounds, load average "
        f"{result['loadavg_start'][0]:.1f} at the start, {result['loadavg_end'][0]:.1f} at the end",
        "",
        f"| server | server CPU to connect (median) | of which in the cyclic GC (median) "
        f"| ratio to {result['reference']} (median) | ratios per round |",
        "|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        per_round = " ".join(f"{ratio:.2f}" for ratio in row["ratios"])
        gc_s = "-" if row["median_gc_s"] is None else f"{row['median_gc_s']:.2f} s"
        lines.append(
            f"| {row['label']} | {row['median_cpu_s']:.2f} s | {gc_s} "
            f"| {row['median_ratio']:.2f}x | {per_round} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--peers", default=",".join(DEFAULT_PEERS), help="comma-separated; the first is 1.0x"
    )
    parser.add_argument("--out", help="write every round as JSON here")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions under callgrind instead (default peers: "
        + ",".join(INSTRUCTION_PEERS)
        + "; use --streams 1000)",
    )
    args = parser.parse_args(argv)
    if args.instructions:
        if args.peers == ",".join(DEFAULT_PEERS):
            args.peers = ",".join(INSTRUCTION_PEERS)
        result = asyncio.run(count_instructions(args))
        print(instruction_table(result))
    else:
        result = asyncio.run(main_async(args))
        print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
