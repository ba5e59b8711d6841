"""tornado_sse in-process: `EventStreamHandler` and `InProcessBroker`, as a user would set it up.

The route follows the channel ``bench``; the driver publishes through the broker in the
server's own event loop. ``--option gc=freeze`` calls `gc.freeze()` once the server is up
(see docs/benchmarks.md); ``--option gc=hub`` applies ``tornado-sse serve``'s policy
(`tornado_sse.gcpolicy.settle`).

``--option auth=jwt --option secret=SECRET``: each stream carries a signed token
(``?access_token=``) that `tornado_sse.auth.TokenVerifier` checks, as an application with private
channels would.

``--option broker=bridge --option socket=PATH``: a `BridgeBroker` instead; alone on its socket,
the process runs the hub and its own broker talks to it over the unix socket, so every event
crosses the bridge to the hub and back. ``--option broker=redis --option redis=URL``: a
`RedisBroker`; every event goes to Redis and comes back through the process's reader.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
from collections.abc import Iterable

import tornado.netutil
import tornado.web
from tornado.httpserver import HTTPServer

from tornado_sse import ConnectionSet, EventStreamHandler, InProcessBroker, gcpolicy
from tornado_sse.broker.base import Broker

from .common import Driver, options, parse_args, run


class Events(EventStreamHandler):
    def get_channels(self) -> Iterable[str]:
        return ["bench"]


class PrivateEvents(Events):
    """The stream of a signed token's grants (its ``exp`` would close it: none here)."""

    def get_current_user(self) -> object:
        return self.settings["verifier"].authenticate(self)

    def check_channel(self, channel: str) -> bool:
        return bool(self.current_user.may_subscribe(channel))  # type: ignore[attr-defined]


def make_broker(settings: dict[str, str]) -> Broker:
    kind = settings.get("broker", "memory")
    if kind == "bridge":
        from tornado_sse.broker.bridge import BridgeBroker

        return BridgeBroker(settings["socket"], history_size=1000)
    if kind == "redis":
        from tornado_sse.broker.redis import RedisBroker

        return RedisBroker(settings["redis"], history_size=1000)
    return InProcessBroker(history_size=1000)


async def main(args: argparse.Namespace) -> None:
    settings = options(args)
    broker = make_broker(settings)
    connections = ConnectionSet()
    handler: type[Events] = Events
    verifier = None
    if settings.get("auth") == "jwt":
        from tornado_sse.auth import TokenVerifier

        handler, verifier = PrivateEvents, TokenVerifier(secret=settings["secret"])
    app = tornado.web.Application(
        [(r"/events", handler)],
        verifier=verifier,
        sse_broker=broker,
        sse_connections=connections,
        sse_heartbeat_interval=args.heartbeat,
    )
    server = HTTPServer(app)
    server.add_sockets(tornado.netutil.bind_sockets(args.port, args.host, backlog=args.backlog))
    await broker.start()

    def publish(text: str) -> object:
        return broker.publish("bench", text)

    driver = Driver(publish, lambda: len(connections))
    control = await driver.serve(args.host, args.control_port)
    tuning = options(args).get("gc", "")
    if tuning == "off":
        gc.disable()
    elif tuning == "hub":
        gcpolicy.settle()
    elif tuning:
        thresholds = [int(x) for x in tuning.replace("freeze", "").split("/") if x]
        if thresholds:
            gc.set_threshold(*thresholds)
        if "freeze" in tuning:
            gc.freeze()
    async with control:
        await asyncio.Event().wait()


if __name__ == "__main__":
    run(main, parse_args(__doc__ or ""))
