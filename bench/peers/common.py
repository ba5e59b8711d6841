"""What every Python peer shares: command-line arguments and the in-process publish driver.

The driver listens on a loopback control port for JSON lines from the harness and publishes the
benchmark's events through the peer's own publish function, in the server's event loop:

``{"cmd": "publish", "count": K, "rate": R, "size": S}``
    publish K events, R per second (``0``: as fast as the loop goes, one event per loop
    iteration, so that every event is a separate write for every peer), then answer with the
    first and last sequence numbers and the monotonic start and end times.
``{"cmd": "start", "rate": R, "size": S}`` / ``{"cmd": "stop"}``
    publish at R per second until stopped (churn); ``stop`` answers with the last sequence number.
``{"cmd": "ping"}``
    answers ``{"ok": true, "pid": ...}`` once the server is ready.
``{"cmd": "streams"}``
    the number of open streams as the peer counts them.
``{"cmd": "gc"}``
    runs a full collection (before memory readings).
``{"cmd": "gctime"}``
    collections and seconds spent in the cyclic garbage collector so far, per generation.
``{"cmd": "census", "top": N}``
    the N most numerous object types the garbage collector tracks (count and shallow bytes).
``{"cmd": "tracemalloc", "start": true}`` / ``{"cmd": "tracemalloc", "top": N}``
    start tracing allocations; then the N lines that allocated most since the start.
``{"cmd": "profile", "seconds": S}``
    profiles the server (cProfile) for S seconds and answers with the top functions, for
    working on the fast path (``python -m tornado_sse.bench.profile``).

Standard library only, like the floor peer that uses it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..events import DEFAULT_SIZE, make_payload

__all__ = ["Driver", "options", "parse_args", "run"]

Publish = Callable[[str], "Awaitable[Any] | None"]


def parse_args(description: str) -> argparse.Namespace:
    """The arguments every peer takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--heartbeat", type=float, default=15.0, help="seconds; 0 turns off")
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--option", action="append", default=[], help="peer-specific k=v")
    return parser.parse_args()


class Driver:
    """Publishes numbered, time-stamped events through *publish* on the harness's commands.

    :param publish: the peer's publish function, given the event's data text; may return an
        awaitable (awaited before the next event).
    :param streams: returns the number of open streams.
    """

    def __init__(self, publish: Publish, streams: Callable[[], int]) -> None:
        self.publish = publish
        self.streams = streams
        self.seq = 0
        self._running: asyncio.Task[None] | None = None
        self._snapshot: Any = None
        self._stop = False
        #: per generation: collections, seconds in them (gc.callbacks; two calls per collection)
        self._gc = [[0, 0.0] for _ in range(3)]
        self._gc_started = 0.0
        gc.callbacks.append(self._gc_timer)

    def _gc_timer(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            entry = self._gc[info["generation"]]
            entry[0] += 1
            entry[1] += time.perf_counter() - self._gc_started

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._client, host, port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                command = json.loads(line)
                reply = await self._handle(command)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _handle(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command.get("cmd")
        if name == "ping":
            return {"ok": True, "pid": os.getpid()}
        if name == "streams":
            return {"ok": True, "streams": self.streams()}
        if name == "gc":
            gc.collect()
            return {"ok": True}
        if name == "gctime":
            return {"ok": True, "generations": self._gc}
        if name == "census":
            return {"ok": True, "types": _census(int(command.get("top", 40)))}
        if name == "tracemalloc":
            import tracemalloc

            if command.get("start"):
                tracemalloc.start(int(command.get("frames", 1)))
                self._snapshot = tracemalloc.take_snapshot()
                return {"ok": True}
            now = tracemalloc.take_snapshot()
            stats = now.compare_to(self._snapshot, command.get("group", "lineno"))
            tracemalloc.stop()
            return {"ok": True, "top": [str(stat) for stat in stats[: int(command.get("top", 30))]]}
        if name == "profile":
            return {"ok": True, "stats": await self._profile(float(command["seconds"]))}
        if name == "publish":
            self._stop = False
            first = self.seq + 1
            collections = [g["collections"] for g in gc.get_stats()]
            t0 = time.monotonic_ns()
            await self._publish_loop(
                int(command["count"]), float(command.get("rate", 0)), command.get("size")
            )
            return {
                "ok": True,
                "first": first,
                "last": self.seq,
                "t0": t0,
                "t1": time.monotonic_ns(),
                "gc": [
                    g["collections"] - c for g, c in zip(gc.get_stats(), collections, strict=True)
                ],
            }
        if name == "start":
            self._stop = False
            first = self.seq + 1
            self._running = asyncio.create_task(
                self._publish_loop(None, float(command["rate"]), command.get("size"))
            )
            return {"ok": True, "first": first}
        if name == "stop":
            self._stop = True
            if self._running is not None:
                await self._running
                self._running = None
            return {"ok": True, "last": self.seq}
        return {"ok": False, "error": f"unknown command {name!r}"}

    async def _profile(self, seconds: float) -> str:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            await asyncio.sleep(seconds)
        finally:
            profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats(
            os.environ.get("BENCH_PROFILE_SORT", "tottime")
        )
        stats.print_stats(int(os.environ.get("BENCH_PROFILE_LINES", "25")))
        callers = os.environ.get("BENCH_PROFILE_CALLERS")
        if callers:  # who calls the functions matching this pattern, and how often
            stats.print_callers(callers)
        return out.getvalue()

    async def _publish_loop(self, count: int | None, rate: float, size: int | None) -> None:
        size = int(size or DEFAULT_SIZE)
        loop = asyncio.get_running_loop()
        start = loop.time()
        publish = self.publish
        sent = 0
        while (count is None or sent < count) and not self._stop:
            self.seq += 1
            sent += 1
            result = publish(make_payload(self.seq, size))
            if result is not None:
                await result
            if rate > 0:
                delay = start + sent / rate - loop.time()
                await asyncio.sleep(delay if delay > 0 else 0)
            else:
                await asyncio.sleep(0)


def _census(top: int) -> list[tuple[str, int, int]]:
    """Objects tracked by the garbage collector, by type: (type, count, bytes), largest first."""
    import sys
    from collections import Counter

    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    return [(name, n, sizes[name]) for name, n in counts.most_common(top)]


def run(main: Callable[[argparse.Namespace], Awaitable[None]], args: argparse.Namespace) -> None:
    """Run a peer's async main on the chosen event loop until killed."""
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args))
    else:
        asyncio.run(main(args))


def options(args: argparse.Namespace) -> dict[str, str]:
    """The ``--option k=v`` pairs."""
    return dict(item.split("=", 1) for item in args.option)
