"""The chat demo's web application and its command, ``tornado-sse demo``.

Endpoints (all JSON errors carry ``{"error": message}``, shown as is by the page):

``GET /``                          the page (plain HTML, CSS and JS from ``demo/static``)
``GET /api/rooms/<room>?nick=N``   enter a room: members now, and the URL of the room's stream
``GET /api/rooms/<room>/events``   the room's event stream (`RoomStream`, an EventStreamHandler):
                                   messages, and the core's join and leave events
``POST /api/rooms/<room>/messages`` send a message (``nick``, ``text``; XSRF-protected)
``POST /api/rooms/<room>/drop``    close the stream of ``client`` as if its connection was lost
``POST /api/rooms/<room>/leave``   the page of ``client`` left: close its stream, absent at once
``GET /healthz``                   ``ok`` while the broker is healthy
``GET /sse/client.js``             the browser's ``SharedEventSource``: a browser's tabs in one room
                                   under one nickname share one stream

Production choices made visible: Tornado's ``xsrf_cookies`` on every POST; a strict Content
Security Policy (no inline script or style, nothing from other origins), so even a rendering
mistake could not run injected script; user text reaches the page as JSON and is rendered with
``textContent``; the stream's slow-consumer bound and heartbeat come from the core's settings.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import os
import secrets
import signal
import socket
import sys
import urllib.parse
from collections.abc import Awaitable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

import click
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tornado_sse import (
    Broker,
    ConnectionSet,
    Event,
    EventStreamHandler,
    InProcessBroker,
    Metrics,
    client_script_route,
)
from tornado_sse.broker.bridge import BridgeBroker
from tornado_sse.cli import HostName, RedisUrl, require_module
from tornado_sse.process import fork_processes, group_socket_path
from tornado_sse.ratelimit import address_key

from .chat import (
    Chat,
    ChatConfig,
    ChatError,
    Room,
    validate_client,
    validate_message,
    validate_nick,
    validate_room,
)

__all__ = ["ChatHandler", "DemoOptions", "RoomStream", "demo_command", "make_app", "run_demo"]

log = logging.getLogger("tornado_sse.demo")

HERE = Path(__file__).parent

#: what the page may load and talk to: itself only, no inline script or style
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_STATUS_CODES = frozenset(status.value for status in HTTPStatus)
_XSRF_MESSAGE = "Your session token is missing or stale: reload the page."


def _security_headers(handler: tornado.web.RequestHandler) -> None:
    handler.set_header("X-Demo-Process", str(os.getpid()))
    handler.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("Referrer-Policy", "no-referrer")


def _error_message(status_code: int, kwargs: dict[str, Any]) -> str:
    exc_info = kwargs.get("exc_info")
    exc = exc_info[1] if exc_info else None
    if isinstance(exc, ChatError):
        return exc.message
    if isinstance(exc, tornado.web.HTTPError):
        if status_code == 403 and "xsrf" in (exc.log_message or "").lower():
            return _XSRF_MESSAGE
        if 400 <= status_code < 500 and exc.log_message:
            return str(exc.log_message) % exc.args if exc.args else str(exc.log_message)
    return HTTPStatus(status_code).phrase if status_code in _STATUS_CODES else "Error"


class ChatHandler(tornado.web.RequestHandler):
    """Base of the page and API handlers: the chat, security headers, JSON errors."""

    @property
    def chat(self) -> Chat:
        return cast(Chat, self.settings["demo_chat"])

    def set_default_headers(self) -> None:
        _security_headers(self)
        self.set_header("Cache-Control", "no-store")

    def compute_etag(self) -> str | None:
        return None

    def reply(self, status: int, payload: dict[str, Any]) -> None:
        self.set_status(status)
        self.finish(payload)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        exc = exc_info[1] if exc_info else None
        if isinstance(exc, ChatError) and exc.retry_after is not None:
            self.set_header("Retry-After", str(max(1, round(exc.retry_after + 0.49))))
        self.finish({"error": _error_message(status_code, kwargs)})


class IndexHandler(ChatHandler):
    """``GET /``: the page. The room may be preset with ``?room=``."""

    def get(self) -> None:
        room = self.get_query_argument("room", "lobby")[:64]
        self.render("index.html", room=room, max_message=self.chat.config.max_message)


class HealthHandler(ChatHandler):
    """``GET /healthz``: 200 ``ok`` while the broker is healthy, else 503.

    With the bridge, ``X-Demo-Hub`` names the process running the hub (``X-Demo-Process``, on
    every response, the one that answered).
    """

    def get(self) -> None:
        hub_pid = getattr(self.chat.broker, "hub_pid", None)
        if hub_pid is not None:
            self.set_header("X-Demo-Hub", str(hub_pid))
        healthy = self.chat.broker.healthy and not self.chat.closed
        self.set_status(200 if healthy else 503)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("ok\n" if healthy else "unavailable\n")


class RoomHandler(ChatHandler):
    """``GET /api/rooms/<room>?nick=N[&client=C]``: check the nickname, follow the room, say who
    is here now and how to listen.

    ``members`` is who is announced in the room (``announced`` of `.Broker.presence`: joined,
    not left yet), taken before the page opens its stream: the page applies the stream's joins
    and leaves to it (see `demo.chat`). The stream URL asks for
    the room's last ``config.history`` events (``history=N``, the core's start position): the
    first connection replays them from the broker; the stream's own last id takes over on every
    reconnect. A page may bring its own ``client`` id
    (the one its browser used for this nickname before): the tabs of one browser in one room
    under one nickname then have the same stream URL, and share one stream
    (``SharedEventSource``).
    """

    async def get(self, room_name: str) -> None:
        name = validate_room(room_name)
        nick = validate_nick(self.get_query_argument("nick", None))
        room = await self.chat.room(name)
        members = await room.members()
        given = self.get_query_argument("client", None)
        client = validate_client(given) if given else secrets.token_urlsafe(12)
        query = urllib.parse.urlencode(
            {"nick": nick, "client": client, "history": self.chat.config.history}
        )
        self.reply(
            200,
            {
                "room": name,
                "nick": nick,
                "client": client,
                "members": members,
                "events": f"/api/rooms/{name}/events?{query}",
                "max_message": self.chat.config.max_message,
            },
        )


class MessagesHandler(ChatHandler):
    """``POST /api/rooms/<room>/messages`` with ``nick`` and ``text``: 201 ``{"id": ...}``."""

    async def post(self, room_name: str) -> None:
        name = validate_room(room_name)
        nick = validate_nick(self.get_body_argument("nick", None))
        text = validate_message(self.get_body_argument("text", None), self.chat.config.max_message)
        self.chat.check_rate(nick, self.request.remote_ip or "")
        room = await self.chat.room(name)
        event_id = await self.chat.post(room, nick, text)
        self.reply(201, {"id": event_id})


class DropHandler(ChatHandler):
    """``POST /api/rooms/<room>/drop`` with ``client``: close that page's stream server-side, as
    a lost connection.

    Whichever process holds the stream closes it (the request travels through the broker); the
    page reconnects by itself and resumes from its last event id, within the grace period: the
    others see no leave. Answers 202 once the request is published.
    """

    leave = False

    async def post(self, room_name: str) -> None:
        name = validate_room(room_name)
        client = validate_client(self.get_body_argument("client", None))
        wait = self.chat.address_limiter.take("drop:" + address_key(self.request.remote_ip or ""))
        if wait > 0:
            raise ChatError(429, "Too many requests: wait a moment.", retry_after=wait)
        room = await self.chat.room(name)
        await room.drop(client, leave=self.leave)
        self.reply(202, {"client": client})


class LeaveHandler(DropHandler):
    """``POST /api/rooms/<room>/leave`` with ``client``: the page left (its Leave button, or the
    tab closing); its stream is closed with ``close(leave=True)``, so that, if it was the
    nickname's last, the others get its ``leave`` at once rather than after the grace period.
    The page closes its own stream after the answer; when its connection ended first (a closing
    tab), the leave still waiting for the grace period is sent at once."""

    leave = True


class RoomStream(EventStreamHandler):
    """``GET /api/rooms/<room>/events?nick=N&client=C[&history=N]``: the room's messages and its
    joins and leaves, in one stream.

    The stream follows ``room/<room>`` with the nickname as identity (`get_identity`), so the
    core counts it in the room's presence and announces the nickname's join and leave (the
    application's ``sse_presence`` covers ``room/*``), and ``presence:room/<room>``, where they
    are published. Its room's sets hold it while open, and among the last that ended after,
    where a drop or leave request finds it.
    Refusals are plain-text 4xx.
    """

    nick = ""
    client = ""
    room: Room | None = None
    _attached = False

    @property
    def chat(self) -> Chat:
        return cast(Chat, self.settings["demo_chat"])

    def set_default_headers(self) -> None:
        _security_headers(self)

    async def get_channels(self) -> list[str]:
        name = validate_room(self.path_args[0] if self.path_args else "")
        self.nick = validate_nick(self.get_query_argument("nick", None))
        self.client = validate_client(self.get_query_argument("client", None))
        self.room = await self.chat.room(name)
        return [self.room.channel, self.room.presence_channel]

    def get_identity(self) -> str:
        return self.nick

    def open(self) -> Awaitable[None] | None:
        if self.room is not None:
            self.room.add(self)
            self._attached = True
        return None

    def on_close(self) -> None:
        if self._attached and self.room is not None:
            self._attached = False
            self.room.discard(self)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(_error_message(status_code, kwargs) + "\n")


def make_app(
    broker: Broker | None = None,
    config: ChatConfig | None = None,
    *,
    connections: ConnectionSet | None = None,
    metrics: Metrics | None = None,
    **settings: Any,
) -> tornado.web.Application:
    """The chat as a Tornado application; ``app.settings["demo_chat"]`` is its `.Chat`.

    :param broker: any broker (default: a fresh `.InProcessBroker` keeping 1000 events per
        channel). Its history per channel should exceed ``config.history``.
    :param config: the chat's rules.
    :param settings: Tornado and ``sse_`` settings overriding the demo's (the grace period of
        a lost connection is ``sse_presence_grace``, default 3 s).
    """
    broker = broker if broker is not None else InProcessBroker(history_size=1000)
    chat = Chat(broker, config)
    options: dict[str, Any] = {
        "template_path": str(HERE / "templates"),
        "static_path": str(HERE / "static"),
        "xsrf_cookies": True,
        "xsrf_cookie_kwargs": {"samesite": "Strict"},
        "demo_chat": chat,
        "sse_broker": broker,
        "sse_connections": connections if connections is not None else ConnectionSet(),
        "sse_metrics": metrics if metrics is not None else Metrics(),
        "sse_heartbeat_interval": 15.0,
        "sse_retry_interval": 1.0,
        "sse_max_buffer_size": 256 << 10,
        "sse_max_connections_per_address": 200,
        "sse_presence": ["room/*"],
    }
    options.update(settings)
    return tornado.web.Application(
        [
            (r"/", IndexHandler),
            (r"/healthz", HealthHandler),
            (r"/api/rooms/([^/]+)", RoomHandler),
            (r"/api/rooms/([^/]+)/events", RoomStream),
            (r"/api/rooms/([^/]+)/messages", MessagesHandler),
            (r"/api/rooms/([^/]+)/drop", DropHandler),
            (r"/api/rooms/([^/]+)/leave", LeaveHandler),
            client_script_route(),
        ],
        **options,
    )


# ---------------------------------------------------------------------- running


@dataclass(frozen=True)
class DemoOptions:
    """What ``tornado-sse demo`` was told. Seconds everywhere except ``retry`` (milliseconds)."""

    host: str = "127.0.0.1"
    port: int = 8000
    processes: int = 1
    redis: str | None = None
    history: int = 1000
    presence_grace: float = 3.0
    retry: int = 1000


def make_broker(options: DemoOptions) -> Broker:
    """The broker of one demo process: Redis, the unix-socket bridge, or in-process.

    ``--redis`` wins over ``--processes``; the bridge uses the group's socket
    (`tornado_sse.process.group_socket_path`). Called in each worker after forking, as the
    bridge requires.
    """
    if options.redis is not None:
        module = importlib.import_module("tornado_sse.broker.redis")
        return cast(Broker, module.RedisBroker(options.redis, history_size=options.history))
    if options.processes > 1:
        return BridgeBroker(group_socket_path(), history_size=options.history)
    return InProcessBroker(history_size=options.history)


def _check_backends(options: DemoOptions) -> None:
    if options.redis is not None:
        require_module("tornado_sse.broker.redis", "--redis", "pip install 'tornado-sse[redis]'")


async def run_demo(options: DemoOptions, sockets: list[socket.socket]) -> None:
    """Serve the chat on bound *sockets* until SIGTERM or SIGINT, then shut down cleanly."""
    broker = make_broker(options)
    await broker.start()
    connections = ConnectionSet()
    app = make_app(
        broker,
        ChatConfig(),
        connections=connections,
        sse_retry_interval=options.retry / 1000.0,
        sse_presence_grace=options.presence_grace,
    )
    chat: Chat = app.settings["demo_chat"]
    server = HTTPServer(app, max_body_size=64 << 10, idle_connection_timeout=300.0)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("shutting down (%d streams open)", len(connections))
    server.stop()
    await connections.close(Event("the server is restarting", event="shutdown"), timeout=2.0)
    chat.close()
    try:
        await asyncio.wait_for(server.close_all_connections(), 1.0)
    except asyncio.TimeoutError:
        log.warning("some connections did not close in time")
    await broker.close()


def _finite(param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):  # FloatRange lets NaN through
        raise click.BadParameter(f"{value!r} is not a number of seconds", param=param)
    return value


def _bind(options: DemoOptions) -> list[socket.socket]:
    try:
        return bind_sockets(options.port, options.host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise click.ClickException(
            f"cannot listen on {options.host}:{options.port}: {reason}"
        ) from exc


@click.command("demo")
@click.option(
    "--host", type=HostName(), default="127.0.0.1", show_default=True, help="Address to listen on."
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="TCP port to listen on.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Worker processes sharing the port, joined by the unix-socket bridge.",
)
@click.option(
    "--redis",
    "redis_url",
    type=RedisUrl(),
    default=None,
    help="Redis URL (redis://127.0.0.1:6379/0): several demo servers share the rooms.",
)
@click.option(
    "--presence-grace",
    type=click.FloatRange(min=0, max=600),
    default=3.0,
    hidden=True,
    callback=lambda ctx, param, value: _finite(param, value),
)
@click.option("--retry", type=click.IntRange(0, 600_000), default=1000, hidden=True)
def demo_command(
    host: str,
    port: int,
    processes: int,
    redis_url: str | None,
    presence_grace: float,
    retry: int,
) -> None:
    """Run the chat demo: rooms, presence, history, resume after a dropped connection.

    Open the printed address in two browser windows, pick nicknames, and chat. "Simulate network
    drop" closes your stream from the server side: the page reconnects and shows what it missed.
    """
    options = DemoOptions(
        host=host,
        port=port,
        processes=processes,
        redis=redis_url,
        presence_grace=presence_grace,
        retry=retry,
    )
    _check_backends(options)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    sockets = _bind(options)
    address = sockets[0].getsockname()
    url_host = f"[{address[0]}]" if ":" in address[0] else address[0]
    where = f"http://{url_host}:{address[1]}/"
    if options.processes == 1:
        click.echo(f"Chat demo on {where} - open it in two windows. Ctrl-C stops it.", err=True)
    else:
        backend = "Redis" if options.redis else f"bridge at {group_socket_path()}"
        click.echo(
            f"Chat demo on {where} with {options.processes} worker processes ({backend}). "
            "Kill a worker: it is restarted, and its pages resume on the others. Ctrl-C stops it.",
            err=True,
        )
        # After binding, before any loop or broker exists. Returns in each worker; this process
        # stays inside as the group's supervisor and exits with it.
        fork_processes(options.processes)
    asyncio.run(run_demo(options, sockets))
