"""sse-starlette on uvicorn, the way its README shows: an async generator per client.

Each stream's generator waits on its own `asyncio.Queue` and yields the event's data; a
publish puts the text in every queue. uvicorn runs in this process's event loop (so the
driver shares it) with the loop and HTTP implementation chosen by ``--loop`` and
``--option http=...`` (default: stock asyncio and uvicorn's automatic choice).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from .common import Driver, options, parse_args, run

clients: set[asyncio.Queue[str]] = set()
HEARTBEAT = 15.0


async def events(request: Request) -> EventSourceResponse:
    queue: asyncio.Queue[str] = asyncio.Queue()
    clients.add(queue)

    async def stream() -> AsyncIterator[dict[str, str]]:
        try:
            while True:
                yield {"data": await queue.get()}
        finally:
            clients.discard(queue)

    return EventSourceResponse(stream(), ping=HEARTBEAT)


def publish(text: str) -> None:
    for queue in clients:
        queue.put_nowait(text)


async def main(args: argparse.Namespace) -> None:
    global HEARTBEAT
    HEARTBEAT = args.heartbeat
    app = Starlette(routes=[Route("/events", events)])
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        backlog=args.backlog,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http=options(args).get("http", "auto"),
    )
    server = uvicorn.Server(config)
    driver = Driver(publish, lambda: len(clients))
    control = await driver.serve(args.host, args.control_port)
    async with control:
        await server.serve()


if __name__ == "__main__":
    run(main, parse_args(__doc__ or ""))
