"""What one event costs Redis when a hub follows many channels (per-user channels, say).

A hub (`RedisBroker`) follows N channels, each with a subscriber, all subscribed at once (a
reconnect storm with per-user channels; how long that takes is reported). A second broker publishes
*events* events of 64 bytes to channels picked at random, a few hundred per second, so each
event is read in a round of its own (the worst case for the read side). Measured: Redis CPU per
event (``INFO cpu``), for each N, with the reader naming every followed stream in each ``XREAD``
(``index_threshold`` above N) and with the reader going through the index stream (the
default above 32 channels). Every event must reach its subscriber once. A redis-server of its
own is started (no persistence). Run::

    python -m tornado_sse.bench.redis_channels --channels 10,1000,10000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from .redis_cost import RedisProcess, redis_readings


class _Count:
    def __init__(self) -> None:
        self.delivered = 0

    def deliver(self, frame: Any) -> None:
        self.delivered += 1


async def measure(
    url: str, channels: int, threshold: int, events: int, prefix: str
) -> tuple[float, float]:
    """Redis CPU microseconds per event for a hub following *channels* channels, and the
    seconds its subscriptions took, all made at once (each to a channel nobody followed)."""
    from tornado_sse.broker.redis import RedisBroker

    hub = RedisBroker(url, key_prefix=prefix, index_threshold=threshold)
    publisher = RedisBroker(url, key_prefix=prefix)
    await hub.start()
    await publisher.start()
    names = [f"user.{n}" for n in range(channels)]
    count = _Count()
    subscriptions = []
    try:
        t0 = time.monotonic()
        subscriptions = list(
            await asyncio.gather(*(hub.subscribe([name], count) for name in names))
        )
        storm = time.monotonic() - t0
        for subscription in subscriptions:
            subscription.start()
        await _publish_and_wait(publisher, names[:1], 1, count)  # the reader is settled
        _, cpu0 = redis_readings(url)
        await _publish_and_wait(publisher, names, events, count)
        _, cpu1 = redis_readings(url)
        return (cpu1 - cpu0) / events * 1e6, storm
    finally:
        for subscription in subscriptions:
            subscription.close()
        await hub.close()
        await publisher.close()


async def _publish_and_wait(publisher: Any, names: list[str], events: int, count: _Count) -> None:
    target = count.delivered + events
    for _ in range(events):
        await publisher.publish(random.choice(names), "x" * 64)
        await asyncio.sleep(0.002)
    deadline = time.monotonic() + 60
    while count.delivered < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count.delivered - target + events} of {events} delivered")
        await asyncio.sleep(0.01)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisProcess(Path(tmp))
        try:
            for n, channels in enumerate(args.channels):
                row: dict[str, Any] = {"channels": channels}
                for name, threshold in (("named", 10**9), ("index", 32)):
                    costs, storms = [], []
                    for r in range(args.repeat):
                        prefix = f"c{n}{name}{r}:"
                        cost, storm = await measure(
                            redis.url, channels, threshold, args.events, prefix
                        )
                        costs.append(cost)
                        storms.append(storm)
                    row[name] = sorted(costs)[len(costs) // 2]
                    row[f"{name}_subscribe_s"] = sorted(storms)[len(storms) // 2]
                rows.append(row)
        finally:
            redis.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--channels",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[10, 1000, 10000],
        help="comma-separated numbers of channels the hub follows",
    )
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure (median kept)")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    print(
        "| channels followed by the hub | Redis CPU per event, every stream named per XREAD "
        "| through the index | all the subscriptions at once (s) |"
    )
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['channels']:,} | {row['named']:,.0f} us | {row['index']:,.0f} us "
            f"| {row['index_subscribe_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
