"""The benchmark's event payload: a sequence number and the publish time, padded to a size.

Every peer publishes the same text as the ``data`` of its events, so every client can measure
latency (publish to receive, on the machine-wide monotonic clock shared by all processes),
loss, duplication and order without knowing which server it talks to::

    data: <seq> <publish time, monotonic ns> xxxxxxxx...

Standard library only: peers and load generator import it in their own processes.
"""

from __future__ import annotations

import re
import time

__all__ = ["DEFAULT_SIZE", "PAYLOAD", "make_payload"]

#: bytes of ``data`` per event (the issue's landscape table uses 64-byte events)
DEFAULT_SIZE = 64

#: finds every event's sequence number and publish time in a chunk of a stream
PAYLOAD = re.compile(rb"data: (\d+) (\d+) ")


def make_payload(seq: int, size: int = DEFAULT_SIZE, now_ns: int | None = None) -> str:
    """The ``data`` text for event *seq*, stamped with the current monotonic time."""
    stamp = time.monotonic_ns() if now_ns is None else now_ns
    head = f"{seq} {stamp} "
    return head + "x" * max(0, size - len(head))
