"""What presence costs a stream's connect and close, with presence on and off (issue 14).

Presence is counted on subscribe and unsubscribe only, never per event; this measures that
cost where it is paid. For each broker (``memory``; ``bridge``, whose hub runs in this process;
``redis``, a redis-server of its own without persistence) and presence ``on`` (every stream with
an identity, one channel each of a few rooms, as a chat's tabs) or ``off``
(``presence=False``), *streams* subscriptions are opened and closed:

``sequential``
    one after the other (each waits for its presence write, as a stream does before its first
    byte): microseconds per connect and close, wall clock and this process's CPU;
``storm``
    all at once, then all closed at once (a reconnect storm): seconds for the lot; changes
    that come during a write are coalesced into the next.
``redis``
    Redis commands per connect and close (``INFO commandstats``, commands run inside scripts
    included) and Redis CPU per connect and close, over both runs.

The broker is driven directly (`Broker.subscribe` as `EventStreamHandler` calls it): the
handler's own work per stream is the same with presence on and off. Run::

    python -m tornado_sse.bench.presence_cost --streams 2000 --out presence_cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from .redis_cost import RedisProcess, redis_readings

BROKERS = ("memory", "bridge", "redis")
ROOMS = 10


class _Nobody:
    def deliver(self, frame: Any) -> None:
        pass


async def _make(kind: str, presence: bool, workdir: Path, url: str | None, tag: str) -> Any:
    if kind == "memory":
        from tornado_sse.broker.memory import InProcessBroker

        return InProcessBroker(presence=presence)
    if kind == "bridge":
        from tornado_sse.broker.bridge import BridgeBroker

        return BridgeBroker(str(workdir / f"{tag}.sock"), presence=presence)
    from tornado_sse.broker.redis import RedisBroker

    assert url is not None
    return RedisBroker(url, key_prefix=f"{tag}:", presence=presence)


async def measure(
    kind: str, presence: bool, streams: int, workdir: Path, url: str | None
) -> dict[str, Any]:
    """Connect and close *streams* subscriptions in turn, then all at once."""
    tag = f"{kind}-{'on' if presence else 'off'}-{time.monotonic_ns()}"
    broker = await _make(kind, presence, workdir, url, tag)
    await broker.start()
    nobody = _Nobody()

    def args(n: int) -> tuple[list[str], dict[str, Any]]:
        identity = f"user{n % (streams // 3 or 1)}" if presence else None
        return [f"room/{n % ROOMS}"], {"identity": identity}

    try:
        before = redis_readings(url) if url is not None else None
        wall = time.perf_counter()
        cpu = time.process_time()
        for n in range(streams):
            channels, kwargs = args(n)
            sub = await broker.subscribe(channels, nobody, **kwargs)
            sub.start()
            sub.close()
        sequential_wall = time.perf_counter() - wall
        sequential_cpu = time.process_time() - cpu
        wall = time.perf_counter()
        calls = [args(n) for n in range(streams)]
        subs = await asyncio.gather(
            *(broker.subscribe(channels, nobody, **kwargs) for channels, kwargs in calls)
        )
        for sub in subs:
            sub.close()
        if presence:
            for room in range(ROOMS):  # until every close is shared
                while (await broker.presence(f"room/{room}")).subscribers:
                    await asyncio.sleep(0.01)
        storm = time.perf_counter() - wall
        row: dict[str, Any] = {
            "broker": kind,
            "presence": "on" if presence else "off",
            "streams": streams,
            "us_per_connect_close": sequential_wall / streams * 1e6,
            "cpu_us_per_connect_close": sequential_cpu / streams * 1e6,
            "storm_s": storm,
        }
        if url is not None and before is not None:
            after = redis_readings(url)
            calls = sum(c for c, _ in after[0].values()) - sum(c for c, _ in before[0].values())
            row["redis_commands_per_connect_close"] = calls / (2 * streams)
            row["redis_cpu_us_per_connect_close"] = (after[1] - before[1]) / (2 * streams) * 1e6
        return row
    finally:
        await broker.close()


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sse-presence-bench-") as tmp:
        workdir = Path(tmp)
        redis = RedisProcess(workdir) if "redis" in args.brokers else None
        try:
            for kind in args.brokers:
                url = redis.url if kind == "redis" and redis is not None else None
                for presence in (False, True):
                    rows.append(await measure(kind, presence, args.streams, workdir, url))
        finally:
            if redis is not None:
                redis.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| broker | presence | connect + close, one at a time | CPU | all at once | "
        "Redis commands | Redis CPU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        commands = row.get("redis_commands_per_connect_close")
        redis_cpu = row.get("redis_cpu_us_per_connect_close")
        lines.append(
            f"| {row['broker']} | {row['presence']} | {row['us_per_connect_close']:,.0f} us "
            f"| {row['cpu_us_per_connect_close']:,.0f} us "
            f"| {row['storm_s']:.2f} s ({row['streams']:,}) "
            f"| {'' if commands is None else f'{commands:.1f}'} "
            f"| {'' if redis_cpu is None else f'{redis_cpu:,.0f} us'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000, help="streams per run")
    parser.add_argument(
        "--brokers",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=list(BROKERS),
        help="comma-separated: memory, bridge, redis",
    )
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    unknown = [name for name in args.brokers if name not in BROKERS]
    if unknown or args.streams < 3:
        parser.error(f"--brokers from {', '.join(BROKERS)}; --streams at least 3")
    rows = asyncio.run(main_async(args))
    print(table(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
