"""The floor: the least a Python server can do to fan an event out.

One `asyncio.Protocol` per connection; the request is read up to its blank line and answered
with a fixed header block (no chunked framing: the body runs until the connection closes); a
publish encodes the event once and calls ``transport.write`` on every stream. No heartbeats,
no slow-consumer bound, no resume: it is the reference the others are measured against, not a
server anyone should deploy.
"""

from __future__ import annotations

import argparse
import asyncio

from .common import Driver, parse_args, run

HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"retry: 3000\n\n"
)

streams: set[asyncio.Transport] = set()


class Stream(asyncio.Protocol):
    transport: asyncio.Transport | None = None
    request = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport in streams:
            return
        self.request += data
        if b"\r\n\r\n" in self.request:
            self.request = b""
            self.transport.write(HEADERS)
            streams.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            streams.discard(self.transport)
            self.transport = None


def publish(text: str) -> None:
    data = f"data: {text}\n\n".encode()
    for transport in streams:
        transport.write(data)


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Stream, args.host, args.port, backlog=args.backlog)
    driver = Driver(publish, lambda: len(streams))
    control = await driver.serve(args.host, args.control_port)
    async with server, control:
        await asyncio.Event().wait()


if __name__ == "__main__":
    run(main, parse_args(__doc__ or ""))
