"""Running the hub: the broker, the sockets, the signals, the processes."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import socket

import click
from tornado.netutil import bind_sockets

from .. import gcpolicy
from ..broker.base import Broker
from ..broker.memory import InProcessBroker
from ..cli import require_module
from ..connections import ConnectionSet
from ..errors import (
    BrokerError,
)
from ..httpserver import HubHTTPServer
from .app import HubState, make_app
from .logs import configure_logging, lighten_records
from .options import HubOptions

log = logging.getLogger("tornado_sse.server")


#: seconds the hub waits for streams to close on SIGTERM before dropping the rest (the drain
#: window included, if longer: then the drain plus `DRAIN_GRACE`)
SHUTDOWN_STREAMS_TIMEOUT = 2.5


#: connections the kernel holds for the hub before it accepts them (capped by the kernel at
#: ``net.core.somaxconn``). Tornado's default, 128, is too short for a reconnect storm: past it the
#: kernel drops a client's SYN, which the client sends again only after 1, 3, 7, 15 s (issue 15)
LISTEN_BACKLOG = 4096


#: seconds the last streams of a drain get to write their final bytes
DRAIN_GRACE = 0.5


#: seconds a worker takes to stop after its streams are closed (idle connections, the broker)
_STOP_AFTER_STREAMS = 2.0


def make_broker(options: HubOptions) -> Broker:
    """The broker the hub publishes to and streams subscribe to.

    ``--redis-cluster URL``: `tornado_sse.broker.cluster.cluster_broker` (a
    `tornado_sse.broker.sharded.ShardedBroker` over ``--redis-cluster-shards`` cluster shards);
    ``--redis URL``: `tornado_sse.broker.redis.RedisBroker`; ``--redis`` given several times: a
    `tornado_sse.broker.sharded.ShardedBroker` over one `.RedisBroker` per URL; else
    ``--processes N`` (N > 1): a `tornado_sse.broker.bridge.BridgeBroker` on the group's
    socket; otherwise an
    `.InProcessBroker`. Called once per process, after the sockets are bound (and after
    forking, if any).
    """
    if options.redis_cluster is not None:
        cluster = importlib.import_module("tornado_sse.broker.cluster")
        clustered: Broker = cluster.cluster_broker(
            [options.redis_cluster, *options.redis_cluster_nodes],
            options.redis_cluster_shards,
            history_size=options.history,
            durable=options.redis_durable,
        )
        return clustered
    if options.redis is not None:
        module = importlib.import_module("tornado_sse.broker.redis")
        urls = options.redis_shards or (options.redis,)
        shards: list[Broker] = [
            module.RedisBroker(url, history_size=options.history, durable=options.redis_durable)
            for url in urls
        ]
        if len(shards) == 1:
            return shards[0]
        sharded = importlib.import_module("tornado_sse.broker.sharded")
        broker: Broker = sharded.ShardedBroker(shards)
        return broker
    if options.processes > 1:
        bridge = importlib.import_module("tornado_sse.broker.bridge")
        process = importlib.import_module("tornado_sse.process")
        broker = bridge.BridgeBroker(process.group_socket_path(), history_size=options.history)
        return broker
    return InProcessBroker(history_size=options.history)


def _check_backends(options: HubOptions) -> None:
    """Fail with a clear command-line error when a flag needs a backend this install lacks, or
    asks for more than the backend carries."""
    if options.redis is not None:
        require_module("tornado_sse.broker.redis", "--redis", "pip install 'tornado-sse[redis]'")
    elif options.redis_cluster is not None:
        require_module(
            "tornado_sse.broker.redis", "--redis-cluster", "pip install 'tornado-sse[redis]'"
        )
    elif options.redis_durable:
        raise click.UsageError("--redis-durable needs --redis or --redis-cluster")
    if options.processes > 1:
        require_module("tornado_sse.broker.bridge", "--processes", "pip install tornado-sse")
        if options.redis is None and options.redis_cluster is None:
            framing = importlib.import_module("tornado_sse.broker.framing")
            largest = framing.DEFAULT_MAX_FRAME_SIZE - framing.PUBLISH_OVERHEAD
            if options.max_body_size > largest:
                raise click.BadParameter(
                    f"{options.max_body_size} is more than the bridge between --processes"
                    f" carries: at most {largest} bytes (or run one process, or use --redis)",
                    param_hint="'--max-body-size'",
                )


def bind(options: HubOptions) -> list[socket.socket]:
    """Bind the listening sockets, or fail with a command-line error saying why."""
    try:
        return bind_sockets(options.port, options.host, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise click.ClickException(
            f"cannot listen on {options.host}:{options.port}: {reason}"
        ) from exc


async def run_hub(options: HubOptions, sockets: list[socket.socket]) -> None:
    """Serve on already-bound *sockets* until SIGTERM or SIGINT, then shut down cleanly.

    Shutdown: stop accepting, close every stream (clients reconnect elsewhere or later and
    resume), close the remaining connections and the broker; returns within about 5 seconds.
    The hub owns the process's SIGTERM and SIGINT: after it returns, both are ignored (the
    process is expected to exit).
    """
    try:
        broker = make_broker(options)
        await broker.start()
    except (BrokerError, ValueError, OSError) as exc:
        raise click.ClickException(f"cannot start the broker: {exc}") from exc
    connections = ConnectionSet()
    app = make_app(options, broker, connections=connections)
    hub: HubState = app.settings["tornado_sse_hub"]
    server = HubHTTPServer(
        app,
        xheaders=options.xheaders,
        max_body_size=options.max_body_size,
        body_timeout=60.0,
        idle_connection_timeout=options.idle_connection_timeout,
        max_idle_connections=options.max_idle_connections,
        metrics=hub.metrics,
    )
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if received:
            log.info("%s received: already shutting down", name)
        else:
            log.info("%s received: shutting down (%d streams open)", name, len(connections))
        received.append(name)
        stop.set()

    def handler(signum: int, frame: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are exiting anyway
            loop.call_soon_threadsafe(on_signal, signum)

    # Python-level handlers, not loop.add_signal_handler: removing those at the end reinstates
    # the default SIGINT handler, and a second Ctrl-C caught in between would end the process
    # with KeyboardInterrupt instead of exit status 0. Once shut down, we ignore both signals.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    gcpolicy.settle()  # start-up is done: freeze it, collect less often (tornado_sse.gcpolicy)
    address = sockets[0].getsockname()
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    log.info(
        "hub listening on http://%s:%d (history=%d heartbeat=%gs retry=%dms max_connections=%s"
        " stream_rate=%s publish_rate=%s)",
        host,
        address[1],
        options.history,
        options.heartbeat,
        options.retry,
        options.max_connections or "unlimited",
        options.stream_rate or "unlimited",
        options.publish_rate or "unlimited",
    )
    if hub.access.verifier is None and hub.access.auth_url is None and not options.public_channels:
        log.warning("access: %s", hub.access.describe())
    else:
        log.info("access: %s", hub.access.describe())
    try:
        await stop.wait()
        hub.closing = True
        server.stop()
        await connections.close(timeout=streams_timeout(options), window=options.drain)
        try:
            await asyncio.wait_for(server.close_all_connections(), 1.0)
        except asyncio.TimeoutError:
            log.warning("some connections did not close in time")
        try:
            await asyncio.wait_for(broker.close(), 1.0)
        except asyncio.TimeoutError:
            log.warning("the broker did not close in time")
        log.info("hub stopped")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)


def streams_timeout(options: HubOptions) -> float:
    """Seconds a SIGTERM gives the streams to close: the drain window and a grace, at least
    `SHUTDOWN_STREAMS_TIMEOUT`."""
    return max(SHUTDOWN_STREAMS_TIMEOUT, options.drain + DRAIN_GRACE)


def serve(options: HubOptions) -> None:
    """Run the hub in this process until SIGTERM or SIGINT (what ``tornado-sse serve`` does)."""
    _check_backends(options)
    sockets = bind(options)
    configure_logging(options.log_level, options.log_json, options.log_flood_limit)
    lighten_records()
    if len(options.token) < 16:
        log.warning("the publish token is short: use a long random secret")
    if options.processes > 1:
        # After binding, before any broker or loop exists; the supervisor stays in here.
        from ..process import fork_processes

        fork_processes(
            options.processes, shutdown_timeout=streams_timeout(options) + _STOP_AFTER_STREAMS
        )
    asyncio.run(run_hub(options, sockets))
