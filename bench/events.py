"""The benchmark's event payload: a sequence number and the publish time, padded to a size.

Every peer publishes the same text as the ``data`` of its events, so every client can measure
latency (publish to receive, on the machine-wide monotonic clock shared by all processes),
loss, duplication and order without knowing which server it talks to::

    data: <seq> <publish time, monotonic ns> xxxxxxxx...

Standard library only: peers and load generator import it in their own processes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["DEFAULT_SIZE", "PAYLOAD", "make_payload", "publish_paced"]

#: bytes of ``data`` per event (the issue's landscape table uses 64-byte events)
DEFAULT_SIZE = 64

#: finds every event's sequence number and publish time in a chunk of a stream
PAYLOAD = re.compile(rb"data: (\d+) (\d+) ")


def make_payload(seq: int, size: int = DEFAULT_SIZE, now_ns: int | None = None) -> str:
    """The ``data`` text for event *seq*, stamped with the current monotonic time."""
    stamp = time.monotonic_ns() if now_ns is None else now_ns
    head = f"{seq} {stamp} "
    return head + "x" * max(0, size - len(head))


async def publish_paced(
    publish: Callable[[str], Awaitable[Any]],
    first: int,
    count: int,
    size: int,
    rate: float,
    window: int = 1,
) -> None:
    """Publish events *first* .. *first + count - 1*, *rate* per second (0: as fast as each
    publish returns). With *window* > 1, up to that many publishes are in flight at once; they
    start in order, so ids follow the sequence numbers."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    flying: set[asyncio.Future[Any]] = set()
    for index in range(count):
        payload = make_payload(first + index, size)
        if window <= 1:
            await publish(payload)
        else:
            flying.add(asyncio.ensure_future(publish(payload)))
            if len(flying) >= window:
                _, flying = await asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED)
        if rate > 0:
            delay = start + (index + 1) / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
    if flying:
        await asyncio.gather(*flying)
