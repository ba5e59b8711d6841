"""``tornado-sse serve`` in one process: the hub's own application, server and settings.

What the issue calls "the hub": `tornado_sse.hub.app.make_app` behind `.HubHTTPServer`, its
in-process broker (history 1000), its access policy (``bench`` as a ``--public-channel``), its
logs at ``info`` as ``serve`` configures them (one line per stream opened and closed, to this
process's stderr, which the harness sends to a file) and its garbage-collector policy
(`tornado_sse.gcpolicy.settle`, once listening). Three flags differ from ``serve``'s defaults.
The load generator connects from two addresses only: no ``--max-connections-per-address``
and no ``--stream-rate`` (both are per client address). It opens up to 2,000 connections at
once: no ``--max-idle-connections`` (default 1,000), which would close the connections whose
request head has not been read yet, past the thousandth, and the storm would be measured
with retries. The driver publishes through the
hub's broker in the server's own event loop, as the other peers do. ``--option log=warning``
runs it with ``--log-level warning`` (no line per stream), to show what the logs cost;
``--option gc=off`` without the cyclic garbage collector (for instruction counts).
"""

from __future__ import annotations

import argparse
import asyncio
import gc

import tornado.netutil

from tornado_sse import ConnectionSet, gcpolicy
from tornado_sse.httpserver import HubHTTPServer
from tornado_sse.hub.app import HubState, make_app
from tornado_sse.hub.logs import configure_logging, lighten_records
from tornado_sse.hub.options import HubOptions
from tornado_sse.hub.run import make_broker

from .common import Driver, options, parse_args, run


async def main(args: argparse.Namespace) -> None:
    level = options(args).get("log", "info")
    hub_options = HubOptions(
        token="bench-master-token-not-used",  # the driver publishes in-process
        host=args.host,
        port=args.port,
        heartbeat=args.heartbeat,
        public_channels=("bench",),
        max_connections_per_address=None,
        stream_rate=None,
        max_idle_connections=None,
        log_level=level,
    )
    configure_logging(hub_options.log_level, hub_options.log_json)
    lighten_records()
    broker = make_broker(hub_options)
    await broker.start()
    connections = ConnectionSet()
    app = make_app(hub_options, broker, connections=connections)
    hub: HubState = app.settings["tornado_sse_hub"]
    server = HubHTTPServer(
        app,
        max_body_size=hub_options.max_body_size,
        body_timeout=60.0,
        idle_connection_timeout=hub_options.idle_connection_timeout,
        max_idle_connections=hub_options.max_idle_connections,
        metrics=hub.metrics,
    )
    server.add_sockets(tornado.netutil.bind_sockets(args.port, args.host, backlog=args.backlog))

    def publish(text: str) -> object:
        return broker.publish("bench", text)

    driver = Driver(publish, lambda: len(connections))
    control = await driver.serve(args.host, args.control_port)
    gcpolicy.settle()
    if options(args).get("gc") == "off":  # its own work alone (connect_cost --instructions)
        gc.disable()
    async with control:
        await asyncio.Event().wait()


if __name__ == "__main__":
    run(main, parse_args(__doc__ or ""))
