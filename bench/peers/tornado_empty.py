"""The least a stream costs through Tornado's HTTP server and a `RequestHandler` (a reference).

Not an SSE server anyone would run: ``get`` writes the response head and a ``retry:``, then
waits for the connection to close; a publish writes the bytes to every stream. No heartbeats,
no resume, no slow-consumer bound. It shows what Tornado's own per-request path costs when a
storm of streams connects, the floor under every Tornado-based server (tornado_sse included).
``--option gc=off`` turns the cyclic garbage collector off, to show that part separately.
"""

from __future__ import annotations

import argparse
import asyncio
import gc

import tornado.netutil
import tornado.web
from tornado.httpserver import HTTPServer

from .common import Driver, options, parse_args, run

streams: set[Events] = set()


class Events(tornado.web.RequestHandler):
    closed: asyncio.Future[None] | None = None

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.write(b"retry: 3000\n\n")
        self.flush()
        self.closed = asyncio.get_running_loop().create_future()
        streams.add(self)
        await self.closed

    def on_connection_close(self) -> None:
        streams.discard(self)
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)


def publish(text: str) -> None:
    data = f"data: {text}\n\n".encode()
    for stream in streams:
        stream.write(data)
        stream.flush()


async def main(args: argparse.Namespace) -> None:
    app = tornado.web.Application([(r"/events", Events)])
    server = HTTPServer(app)
    server.add_sockets(tornado.netutil.bind_sockets(args.port, args.host, backlog=args.backlog))
    driver = Driver(publish, lambda: len(streams))
    control = await driver.serve(args.host, args.control_port)
    if options(args).get("gc") == "off":
        gc.disable()
    async with control:
        await asyncio.Event().wait()


if __name__ == "__main__":
    run(main, parse_args(__doc__ or ""))
