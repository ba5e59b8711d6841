"""What one event costs each Redis when channels are sharded over 1, 2 and 3 of them.

For each number of shards N, a `ShardedBroker` publisher (another host, in effect) publishes
N times *events* events of 64 bytes to *channels* channels picked at random, paced at N times
*rate* events per second (so that each shard sees the same load whatever N), and a hub
(`ShardedBroker` over the same servers) follows every channel with one
subscriber each; every event must reach it once. Measured on each redis-server (``INFO cpu``,
``INFO commandstats`` before and after): Redis CPU per event *that landed on that shard*, and
commands per such event. Capacity grows linearly with the shards when this per-shard cost does
not grow with N.

Then *one-shard hub*: a hub follows only channels that sit on shard 0 of 3, and events go only
to those channels. The other shards' CPU and commands over the same time are reported: a hub
reads only the shards whose channels it follows, so they should stay flat (an idle reader's
blocking ``XREAD`` every ``read_block`` and the presence lease are all they see).

Last, *fan-out*: the hub's CPU per delivery to *streams* streams of one shard's channel (the
shard's own frames) against streams that also follow a channel of another shard (composite ids,
shared between streams at the same positions).

Each redis-server is started here (no persistence) and pinned to the second core, as the
publisher and hub are to the first. Run::

    python -m tornado_sse.bench.redis_shards --events 1500 --rate 200 --repeat 3 --out shards.json

Printed as Markdown tables and, with ``--out``, written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from .redis_cost import RedisProcess, _pin, redis_readings

MAX_SHARDS = 3


class _Count:
    def __init__(self) -> None:
        self.delivered = 0

    def deliver(self, frame: Any) -> None:
        self.delivered += 1


def _sharded(urls: list[str], prefix: str) -> Any:
    from tornado_sse.broker.redis import RedisBroker
    from tornado_sse.broker.sharded import ShardedBroker

    return ShardedBroker([RedisBroker(url, key_prefix=prefix) for url in urls])


def _readings(urls: list[str]) -> list[tuple[int, float]]:
    """(commands run, CPU seconds) of each server so far."""
    out = []
    for url in urls:
        calls, cpu = redis_readings(url)
        out.append((sum(count for count, _ in calls.values()), cpu))
    return out


async def _publish_all(
    publisher: Any, names: list[str], events: int, concurrency: int, count: _Count
) -> float:
    """Publish *events* to random *names*, *concurrency* at a time; wait until all arrived.
    Returns the seconds from the first publish to the last delivery."""
    target = count.delivered + events
    t0 = time.monotonic()
    left = events
    while left:
        batch = min(concurrency, left)
        await asyncio.gather(
            *(publisher.publish(random.choice(names), "x" * 64) for _ in range(batch))
        )
        left -= batch
    deadline = time.monotonic() + 60
    while count.delivered < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count.delivered - target + events} of {events} delivered")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def measure(
    urls: list[str], names: list[str], events: int, rate: float, prefix: str
) -> dict[str, Any]:
    """Per shard of *urls*: events landed, Redis CPU us and commands per such event, for
    *events* events per shard published at *rate* events per second per shard (so each shard
    sees the same load whatever the number of shards); and the events per second reached."""
    from tornado_sse.broker.sharded import placement

    publisher = _sharded(urls, prefix)
    hub = _sharded(urls, prefix)
    count = _Count()
    subscriptions = []
    await publisher.start()
    await hub.start()
    try:
        subscriptions = [await hub.subscribe([name], count) for name in names]
        for subscription in subscriptions:
            subscription.start()
        await _publish_all(publisher, names, len(urls) * 10, 16, count)  # settle
        landed = [0] * len(urls)
        random.seed(len(urls))
        plan = [random.choice(names) for _ in range(events * len(urls))]
        for name in plan:
            landed[placement(name, len(urls))] += 1
        before = _readings(urls)
        seconds = await _publish_planned(publisher, plan, rate * len(urls), count)
        after = _readings(urls)
    finally:
        for subscription in subscriptions:
            subscription.close()
        await hub.close()
        await publisher.close()
    shards = []
    for n, ((c0, cpu0), (c1, cpu1)) in enumerate(zip(before, after, strict=True)):
        shards.append(
            {
                "events": landed[n],
                "cpu_us_per_event": (cpu1 - cpu0) / max(1, landed[n]) * 1e6,
                "commands_per_event": (c1 - c0) / max(1, landed[n]),
            }
        )
    return {"shards": shards, "events_per_s": len(plan) / seconds}


async def _publish_planned(publisher: Any, plan: list[str], rate: float, count: _Count) -> float:
    """Publish to the channels of *plan* in order, *rate* events per second (in ticks of 10 ms,
    each tick's publishes concurrent); wait until all arrived. Returns the seconds taken."""
    target = count.delivered + len(plan)
    t0 = time.monotonic()
    done = 0
    while done < len(plan):
        due = min(len(plan), int((time.monotonic() - t0) * rate) + 1)
        if due > done:
            await asyncio.gather(*(publisher.publish(name, "x" * 64) for name in plan[done:due]))
            done = due
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + 60
    while count.delivered < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count.delivered - target + len(plan)} delivered")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def one_shard_hub(
    urls: list[str], events: int, concurrency: int, prefix: str
) -> list[dict[str, float]]:
    """A hub following only channels of shard 0: each server's CPU us and commands over the
    run (the others should see none of it)."""
    from tornado_sse.broker.sharded import placement

    names = [f"user.{n}" for n in range(3000) if placement(f"user.{n}", len(urls)) == 0][:300]
    publisher = _sharded(urls, prefix)
    hub = _sharded(urls, prefix)
    count = _Count()
    await publisher.start()
    await hub.start()
    subscriptions = []
    try:
        subscriptions = [await hub.subscribe([name], count) for name in names]
        for subscription in subscriptions:
            subscription.start()
        await _publish_all(publisher, names, 10, concurrency, count)
        before = _readings(urls)
        seconds = await _publish_all(publisher, names, events, concurrency, count)
        after = _readings(urls)
    finally:
        for subscription in subscriptions:
            subscription.close()
        await hub.close()
        await publisher.close()
    return [
        {"cpu_us": (cpu1 - cpu0) * 1e6, "commands": c1 - c0, "seconds": seconds}
        for (c0, cpu0), (c1, cpu1) in zip(before, after, strict=True)
    ]


async def fanout_cost(urls: list[str], streams: int, events: int, prefix: str) -> dict[str, float]:
    """Hub CPU (this process) per delivery of an event of shard 0 to *streams* streams that
    follow its channel alone (the shard's own frames) or it and a channel of shard 1 (composite
    ids, one frame shared by every stream at the same positions). Python's own time to call a
    subscriber is in both; the difference is the composite id's cost."""
    from tornado_sse.broker.sharded import placement

    news = next(f"news.{n}" for n in range(99) if placement(f"news.{n}", len(urls)) == 0)
    other = next(f"room.{n}" for n in range(99) if placement(f"room.{n}", len(urls)) == 1)
    out: dict[str, float] = {}
    for name, channels in (("one shard", [news]), ("two shards", [news, other])):
        publisher, hub = _sharded(urls, prefix + name[:3]), _sharded(urls, prefix + name[:3])
        await publisher.start()
        await hub.start()
        count = _Count()
        subscriptions = []
        try:
            subscriptions = [await hub.subscribe(channels, count) for _ in range(streams)]
            for subscription in subscriptions:
                subscription.start()
            await _publish_all(publisher, channels, 4, 1, count)  # every shard delivered once
            target = count.delivered + streams * events
            cpu0 = time.process_time()
            for _ in range(events):
                await publisher.publish(news, "x" * 64)
            while count.delivered < target:
                await asyncio.sleep(0.001)
            cpu = time.process_time() - cpu0
        finally:
            for subscription in subscriptions:
                subscription.close()
            await hub.close()
            await publisher.close()
        out[name] = cpu / (streams * events) * 1e6
    return out


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"sharded": [], "one_shard_hub": [], "fanout": []}
    pin = _pin({0})
    if pin is not None:
        pin()  # the publisher and the hub: the first core; the redis-servers: the second
    with tempfile.TemporaryDirectory() as tmp:
        servers = []
        try:
            for n in range(MAX_SHARDS):
                directory = Path(tmp) / f"shard{n}"
                directory.mkdir()
                servers.append(RedisProcess(directory))
            urls = [server.url for server in servers]
            names = [f"user.{n}" for n in range(args.channels)]
            for shards in range(1, MAX_SHARDS + 1):
                runs = [
                    await measure(urls[:shards], names, args.events, args.rate, f"s{shards}r{r}:")
                    for r in range(args.repeat)
                ]
                results["sharded"].append({"shards": shards, "runs": runs})
            for r in range(args.repeat):
                results["one_shard_hub"].append(
                    await one_shard_hub(urls, args.events, args.concurrency, f"one{r}:")
                )
            for r in range(args.repeat):
                results["fanout"].append(
                    await fanout_cost(urls[:2], args.streams, args.fanout_events, f"fan{r}")
                )
        finally:
            for server in servers:
                server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1500, help="events per shard")
    parser.add_argument(
        "--rate", type=float, default=200, help="events per second per shard (paced)"
    )
    parser.add_argument("--channels", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64, help="publishes in flight")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median kept)")
    parser.add_argument("--streams", type=int, default=2000, help="streams for the fan-out")
    parser.add_argument("--fanout-events", type=int, default=50, help="events for the fan-out")
    parser.add_argument("--out", type=Path, help="also write the results here, as JSON")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    print(
        "| shards | events/s published, all shards "
        "| per shard: Redis CPU per event | per shard: commands per event |"
    )
    print("| --- | --- | --- | --- |")
    for row in results["sharded"]:
        runs = row["runs"]
        rate = _median([run["events_per_s"] for run in runs])
        cpu = [
            _median([run["shards"][n]["cpu_us_per_event"] for run in runs])
            for n in range(row["shards"])
        ]
        commands = [
            _median([run["shards"][n]["commands_per_event"] for run in runs])
            for n in range(row["shards"])
        ]
        print(
            f"| {row['shards']} | {rate:,.0f} | "
            + " / ".join(f"{value:.0f} µs" for value in cpu)
            + " | "
            + " / ".join(f"{value:.1f}" for value in commands)
            + " |"
        )
    print()
    print("| one-shard hub | shard 0 | shard 1 | shard 2 |")
    print("| --- | --- | --- | --- |")
    for r, run in enumerate(results["one_shard_hub"]):
        cells = [f"{s['cpu_us'] / 1000:,.1f} ms CPU, {s['commands']:,} commands" for s in run]
        print(f"| run {r + 1} ({run[0]['seconds']:.1f} s) | " + " | ".join(cells) + " |")

    print()
    print("| hub CPU per delivery (process time) | one-shard streams | two-shard streams |")
    print("| --- | --- | --- |")
    for r, run in enumerate(results["fanout"]):
        print(f"| run {r + 1} | {run['one shard']:.2f} µs | {run['two shards']:.2f} µs |")


if __name__ == "__main__":
    main()
