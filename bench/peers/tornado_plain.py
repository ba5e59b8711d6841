"""A plain Tornado handler written the obvious way: a queue per client, ``write`` + ``flush``.

This is what a Tornado developer writes without a library: each stream's coroutine waits on
its own `tornado.queues.Queue` (with the heartbeat interval as the timeout), writes what it
gets and awaits ``flush()``. A publish encodes once and puts the bytes in every queue.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime

import tornado.netutil
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.queues import Queue

from .common import Driver, parse_args, run

clients: set[Queue[bytes | None]] = set()
HEARTBEAT = 15.0


class Events(tornado.web.RequestHandler):
    queue: Queue[bytes | None] | None = None

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        queue: Queue[bytes | None] = Queue()
        self.queue = queue
        clients.add(queue)
        timeout = datetime.timedelta(seconds=HEARTBEAT) if HEARTBEAT else None
        try:
            self.write(b"retry: 3000\n\n")
            await self.flush()
            while True:
                try:
                    data = await queue.get(timeout=timeout)
                except tornado.util.TimeoutError:
                    data = b":\n\n"
                if data is None:
                    break
                self.write(data)
                await self.flush()
        except StreamClosedError:
            pass
        finally:
            clients.discard(queue)

    def on_connection_close(self) -> None:
        if self.queue is not None:
            self.queue.put_nowait(None)


def publish(text: str) -> None:
    data = f"data: {text}\n\n".encode()
    for queue in clients:
        queue.put_nowait(data)


async def main(args: argparse.Namespace) -> None:
    global HEARTBEAT
    HEARTBEAT = args.heartbeat
    app = tornado.web.Application([(r"/events", Events)])
    server = HTTPServer(app)
    server.add_sockets(tornado.netutil.bind_sockets(args.port, args.host, backlog=args.backlog))
    driver = Driver(publish, lambda: len(clients))
    control = await driver.serve(args.host, args.control_port)
    async with control:
        await asyncio.Event().wait()


if __name__ == "__main__":
    run(main, parse_args(__doc__ or ""))
