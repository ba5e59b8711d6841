"""aiohttp-sse, the way its README shows: ``sse_response`` and a send loop per client.

Each stream waits on its own `asyncio.Queue` and awaits ``resp.send()``; a publish puts the
text in every queue. aiohttp-sse requires a positive ping interval, so ``--heartbeat 0`` runs it
with a ping every hour.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web
from aiohttp_sse import sse_response

from .common import Driver, parse_args, run

clients: set[asyncio.Queue[str]] = set()
HEARTBEAT = 15.0


async def events(request: web.Request) -> web.StreamResponse:
    queue: asyncio.Queue[str] = asyncio.Queue()
    clients.add(queue)
    try:
        async with sse_response(request, ping_interval=HEARTBEAT or 3600.0) as resp:
            await resp.send("", retry=3000)
            while resp.is_connected():
                await resp.send(await queue.get())
    except ConnectionError:
        pass
    finally:
        clients.discard(queue)
    return resp


def publish(text: str) -> None:
    for queue in clients:
        queue.put_nowait(text)


async def main(args: argparse.Namespace) -> None:
    global HEARTBEAT
    HEARTBEAT = args.heartbeat
    app = web.Application()
    app.router.add_get("/events", events)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=args.backlog)
    await site.start()
    driver = Driver(publish, lambda: len(clients))
    control = await driver.serve(args.host, args.control_port)
    async with control:
        await asyncio.Event().wait()


if __name__ == "__main__":
    run(main, parse_args(__doc__ or ""))
