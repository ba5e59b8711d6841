"""`EventStreamHandler`: a Tornado `RequestHandler` that serves one ``text/event-stream``.

It is shaped like Tornado's `WebSocketHandler`: override hooks (:meth:`open`, :meth:`on_close`)
and policies (:meth:`get_channels`, :meth:`check_channel`, :meth:`check_origin`,
:meth:`get_last_event_id`), never ``get()``; act with verbs (:meth:`send_event`,
:meth:`send_comment`, :meth:`close`). Application settings prefixed ``sse_`` are read through
properties a subclass may override for one route.

The fast path, and why it bypasses parts of Tornado: after the headers, event bytes are written
straight to the connection's `IOStream` (and, when its buffer is empty, straight to the socket),
pre-framed as HTTP/1.1 chunks shared by every subscriber of the event. That avoids a Future, a
copy and a chunk-framing pass per subscriber per event. Events that arrive in one event loop
iteration go out in one write. Tornado's output transforms are switched off for the stream, so
``compress_response=True`` never gzips it (a gzip stream would be buffered by the compressor).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import socket
import threading
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, cast

import tornado.web
from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError

from .broker.base import Broker, Frame, Subscription, validate_channel
from .broker.memory import InProcessBroker
from .broker.presence import described, matches_any, validate_identity
from .connections import ConnectionSet
from .errors import (
    AccessDeniedError,
    AccessUnavailableError,
    AuthenticationError,
    BrokerError,
    EventStreamClosedError,
    HistoryGapError,
    InvalidArgumentError,
    InvalidChannelError,
)
from .metrics import Metrics
from .protocol import Event, encode_comment, encode_event, encode_retry
from .ratelimit import RateLimiter, address_key

__all__ = ["MAX_HISTORY", "EventStreamHandler", "default_broker", "parse_history"]

log = logging.getLogger("tornado_sse")

_HEARTBEAT = encode_comment("")
#: a header value the stream writes as is (what Tornado's set_header accepts)
_HEADER_VALUE = re.compile(r"[\x09\x20-\x7e\x80-\xff]*")
_HEARTBEAT_CHUNK = b"%x\r\n%s\r\n" % (len(_HEARTBEAT), _HEARTBEAT)
#: frames a replay reads from the broker at a time at most; a page holds about max_buffer bytes
#: (its size follows the size of the frames read so far) and is written in pieces of at most
#: max_buffer bytes
REPLAY_PAGE = 500
#: the most past events a fresh stream may ask for (``?history=N``); more than its channels
#: retain gets what they retain
MAX_HISTORY = 100_000
_RELEASED_UI: types.MappingProxyType[str, Any] = types.MappingProxyType({})
_default_lock = threading.Lock()
_default: InProcessBroker | None = None
#: the limiter of each application's ``sse_stream_rate`` given as text or a number, with it
_stream_limiters: weakref.WeakKeyDictionary[Any, tuple[Any, RateLimiter | None]] = (
    weakref.WeakKeyDictionary()
)


def default_broker() -> InProcessBroker:
    """The in-process broker used when the application sets no ``sse_broker``.

    One per process, bound to the event loop that first uses it (a new one replaces it if that
    loop is closed). Publish to it from anywhere in the process::

        await tornado_sse.default_broker().publish("news", "hello")       # on the loop
        tornado_sse.default_broker().publish_threadsafe("news", "hello")  # from any thread

    From other threads it can be used once the loop has started it (``await broker.start()``,
    or any subscription or publish on the loop).
    """
    global _default
    with _default_lock:
        broker = _default
        loop = broker._loop if broker is not None else None
        if broker is None or broker.closed or (loop is not None and loop.is_closed()):
            broker = _default = InProcessBroker()
        return broker


def parse_history(value: str) -> int:
    """The number of past events a ``history`` argument asks for.

    :raises InvalidArgumentError: unless *value* is a whole number from 0 to `MAX_HISTORY`.
    """
    if not (value.isascii() and value.isdigit()) or len(value) > 7 or int(value) > MAX_HISTORY:
        raise InvalidArgumentError(
            f"history must be a whole number of events from 0 to {MAX_HISTORY}, not {value!r}"
        )
    return int(value)


class _StreamParams:
    """Settings resolved once per stream so the hot path never reads the settings dict."""

    __slots__ = (
        "heartbeat",
        "heartbeat_chunk",
        "heartbeat_interval",
        "max_buffer",
        "max_lifetime",
        "metrics",
        "stall_timeout",
    )

    def __init__(self, handler: EventStreamHandler) -> None:
        interval = self.heartbeat_interval = handler.heartbeat_interval
        event = handler.heartbeat_event
        if event is None:
            self.heartbeat, self.heartbeat_chunk = _HEARTBEAT, _HEARTBEAT_CHUNK
        else:
            self.heartbeat = encode_event(Event(data="", event=event))
            self.heartbeat_chunk = b"%x\r\n%s\r\n" % (len(self.heartbeat), self.heartbeat)
        self.max_buffer = handler.max_buffer_size
        self.max_lifetime = handler.max_lifetime
        stall = handler.stall_timeout
        self.stall_timeout = stall if stall is not None else max(2 * (interval or 15.0), 30.0)
        self.metrics = handler.metrics
        self.metrics.add_broker(handler.broker)


class _WithChannel:
    """The subscriber of a stream that asked for ``channel:`` fields: hands the handler each
    frame's `.Frame.with_channel` variant, so streams that did not ask pay nothing for it."""

    __slots__ = ("deliver_to",)

    def __init__(self, handler: EventStreamHandler) -> None:
        self.deliver_to = handler.deliver

    def deliver(self, frame: Frame) -> None:
        self.deliver_to(frame.with_channel())


class EventStreamHandler(tornado.web.RequestHandler):
    """Serve a Server-Sent Events stream of one or more broker channels.

    Subclass it, say which channels a connection follows, and route to it::

        class Feed(tornado_sse.EventStreamHandler):
            def get_channels(self):
                return ["news", f"user/{self.current_user}"]

            def check_channel(self, channel):
                return channel == "news" or self.current_user is not None

        app = tornado.web.Application([(r"/events", Feed)], sse_heartbeat_interval=15)

    ``GET`` answers ``200 text/event-stream`` and first sends a jittered ``retry:``, then either an
    id-only event (a fresh stream: the client now knows where to resume from), a
    ``stream-reset`` event (the requested Last-Event-ID is no longer in history), or the events
    missed since Last-Event-ID; then live events. Two query arguments change that for the
    clients that ask: ``?with_channel=1`` (:attr:`with_channel`) and ``?until=<id>``, a bounded
    read that ends after the replay up to that id (an id that is not the broker's answers 400).
    Refusals are plain-text 4xx responses: 400 for a missing or invalid channel, 403 for a
    forbidden channel or origin. A stream beyond the connection limits or its address's
    :attr:`stream_rate` (or while the broker is unavailable, or during shutdown) is *shed*: a 200
    stream carrying only a jittered ``retry:`` and a ``Retry-After`` header, then closed, so that
    browsers' EventSource try again later (after a 429, 503 or 204 they would give up for good).
    A shed stream loses nothing: its next attempt resumes from the same Last-Event-ID.

    Methods of the handler are for the event loop's thread only; publish through the broker
    (`.Broker.publish_threadsafe`) from other threads.
    """

    # What the fan-out touches for every event lives in slots, inside the handler object itself
    # rather than in its large __dict__: with thousands of streams, a delivery then costs a few
    # cache lines (issue 8). ``_pending`` holds the first frame of this loop iteration,
    # ``_queue`` the rest of a burst (and is None once the stream is closed).
    __slots__ = (
        "_backlog",
        "_chunked",
        "_idle_ticks",
        "_mark_dirty",
        "_metrics",
        "_pending",
        "_queue",
        "_raw_socket",
        "_stream",
    )

    _subscription: Any = None
    _done: asyncio.Future[None] | None = None
    _closed_once = False
    #: true once open() was called: on_close() runs if and only if it is
    _opened = False
    _params: _StreamParams | None = None
    _connections: ConnectionSet | None = None
    _opened_at = 0.0
    _stall_since: float | None = None
    _stall_pending = 0
    _close_reason = "closed"
    #: set by ``close(leave=True)``: the user left, their ``leave`` is decided without a grace
    _leave = False
    #: the subscription of a stream that ended, whose leave may still wait for the grace period
    _ended: Subscription | None = None
    #: true once the stream took the connection over from Tornado's HTTP/1 reader
    _detached = False
    #: the stream asked for ``channel:`` fields (:attr:`with_channel`)
    _with_channel = False
    #: the id key of ``?until=``: the stream ends after the replay up to that id
    _until_key: Any = None
    #: (time.time() value, final event) set by close_at; its timer runs while the stream is open
    _deadline: tuple[float, Event | None] | None = None
    _deadline_timer: object | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._stream: IOStream | None = None
        self._queue: list[Frame] | None = None
        self._pending: Frame | None = None
        self._mark_dirty: Callable[[EventStreamHandler], None] | None = None
        self._metrics: Metrics | None = None
        self._chunked = False
        self._raw_socket: socket.socket | None = None
        self._idle_ticks = 0
        #: true while the IOStream may hold output of ours (the headers, a partial write): then
        #: writes must queue behind it; cleared once its buffer is seen empty
        self._backlog = True
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ settings

    @property
    def broker(self) -> Broker:
        """Setting ``sse_broker``: the broker streams subscribe to.

        Default: `default_broker()`, an `.InProcessBroker` shared by the process.
        """
        broker = self.settings.get("sse_broker")
        return broker if broker is not None else default_broker()

    @property
    def connections(self) -> ConnectionSet:
        """Setting ``sse_connections``: the `.ConnectionSet` holding this stream.

        Default: `.ConnectionSet.current()`, one per event loop.
        """
        conns = self.settings.get("sse_connections")
        return conns if conns is not None else ConnectionSet.current()

    @property
    def metrics(self) -> Metrics:
        """Setting ``sse_metrics``: where counters go. Default: `.Metrics.default()`."""
        metrics = self.settings.get("sse_metrics")
        return metrics if metrics is not None else Metrics.default()

    @property
    def heartbeat_interval(self) -> float:
        """Setting ``sse_heartbeat_interval``: seconds of idleness before a heartbeat.

        Default 15.0; ``0`` or ``None`` turns heartbeats off.
        """
        return float(self.settings.get("sse_heartbeat_interval", 15.0) or 0.0)

    @property
    def heartbeat_event(self) -> str | None:
        """Setting ``sse_heartbeat_event``: send heartbeats as an event of this name (with empty
        data) instead of a comment, for clients that must see them. Default ``None`` (comment)."""
        return cast("str | None", self.settings.get("sse_heartbeat_event"))

    @property
    def retry_interval(self) -> float:
        """Setting ``sse_retry_interval``: reconnection delay announced to clients, in seconds.

        Default 3.0. Each stream announces it jittered upwards by up to
        :attr:`retry_jitter`, sent on the wire in milliseconds.
        """
        return float(self.settings.get("sse_retry_interval", 3.0))

    @property
    def retry_jitter(self) -> float:
        """Setting ``sse_retry_jitter``: fraction added at random to the retry. Default 0.5."""
        return float(self.settings.get("sse_retry_jitter", 0.5))

    @property
    def max_buffer_size(self) -> int:
        """Setting ``sse_max_buffer_size``: bytes of unsent output a stream may hold before it is
        closed as a slow consumer (it resumes from Last-Event-ID). Default 1 MiB.

        A replay after a resume is written in pieces of at most this size, each once the
        client took the one before; the live events that arrive meanwhile are held back up to
        this size too (past it the stream is cut off as a slow consumer)."""
        return int(self.settings.get("sse_max_buffer_size", 1 << 20))

    @property
    def max_channels(self) -> int | None:
        """Setting ``sse_max_channels``: channels one stream may follow (duplicates count once);
        beyond, the request is answered with 400. Default 100; ``0`` or ``None`` turns the
        limit off."""
        value = self.settings.get("sse_max_channels", 100)
        return int(value) if value else None

    @property
    def max_lifetime(self) -> float | None:
        """Setting ``sse_max_lifetime``: seconds after which a stream is closed (the client
        reconnects and resumes). Default ``None``: no limit."""
        value = self.settings.get("sse_max_lifetime")
        return float(value) if value else None

    @property
    def stall_timeout(self) -> float | None:
        """Setting ``sse_stall_timeout``: seconds a stream's pending output may stay undrained
        before the peer is taken for half-open and pruned; also set as the socket's
        ``TCP_USER_TIMEOUT``. Default ``None``: twice the heartbeat interval, at least 30 s."""
        value = self.settings.get("sse_stall_timeout")
        return float(value) if value else None

    @property
    def max_connections(self) -> int | None:
        """Setting ``sse_max_connections``: streams this connection set holds at most; beyond, new
        ones are shed. Default ``None``: no limit."""
        value = self.settings.get("sse_max_connections")
        return int(value) if value else None

    @property
    def max_connections_per_address(self) -> int | None:
        """Setting ``sse_max_connections_per_address``: streams one client address may hold.
        Default ``None``: no limit."""
        value = self.settings.get("sse_max_connections_per_address")
        return int(value) if value else None

    @property
    def stream_rate(self) -> RateLimiter | None:
        """Setting ``sse_stream_rate``: new streams one client address may open, as
        ``"RATE[/BURST]"`` (per second, *BURST* at once; `.ratelimit.parse_rate`) or a
        `.RateLimiter` (to share one between routes or applications). Default ``None``: no
        limit.

        Over the rate a stream is shed, with a ``retry:`` no shorter than the time until the
        address has a token again. Resumes count like any new stream. Addresses are keyed by
        `.ratelimit.address_key` (IPv6 per /64). Off by default because an embedded application
        often sits behind a reverse proxy: unless it trusts the proxy's header (Tornado's
        ``xheaders=True``), every client has the proxy's address and would share one bucket.
        The hub turns it on (``--stream-rate``)."""
        value = self.settings.get("sse_stream_rate")
        if value is None or isinstance(value, RateLimiter):
            return value
        known = _stream_limiters.get(self.application)
        if known is None or known[0] != value:
            known = (value, RateLimiter.parse(value))
            _stream_limiters[self.application] = known
        return known[1]

    @property
    def presence_patterns(self) -> Sequence[str]:
        """Setting ``sse_presence``: channels with ``join`` and ``leave`` events, as patterns
        (an exact name, or a prefix ending in ``*``). A stream of such a channel with an
        identity (:meth:`get_identity`) takes part in them; they are published on the companion
        channel ``presence:<channel>``, which a stream may follow when :meth:`check_channel`
        allows the channel it describes. Default: none."""
        return tuple(self.settings.get("sse_presence", ()))

    @property
    def presence_grace(self) -> float:
        """Setting ``sse_presence_grace``: seconds a ``leave`` waits for the user to come back
        (a reconnect is no leave and join). Default 3.0; 0: a lost connection is a leave at
        once. A stream closed with ``close(leave=True)`` does not wait."""
        return float(self.settings.get("sse_presence_grace", 3.0))

    @property
    def cors_origins(self) -> Sequence[str]:
        """Setting ``sse_cors_origins``: exact origins (``https://app.example``) allowed to read
        streams cross-origin, with credentials. Default: none (same origin only)."""
        return tuple(self.settings.get("sse_cors_origins", ()))

    # ------------------------------------------------------------------ policy hooks

    def get_channels(self) -> Iterable[str] | Awaitable[Iterable[str]]:
        """Channels this stream follows. May be a coroutine.

        Default: the ``channel`` query arguments (``?channel=a&channel=b``), taken exactly as sent
        (`query_values`: no space stripped, nothing rewritten). An empty result or an invalid
        name is answered with 400. Raising `.AuthenticationError` answers 401 (with its
        ``WWW-Authenticate``), `.AccessDeniedError` 403, each with the error's message.
        """
        return self.query_values("channel")

    def check_channel(self, channel: str) -> bool | Awaitable[bool]:
        """Whether this request may follow *channel*; ``False`` answers 403. May be a coroutine.

        Default: allow. Use ``self.current_user`` (Tornado's `get_current_user`) here. Raising
        `.AuthenticationError` answers 401 (a `get_current_user` that found no valid token),
        `.AccessDeniedError` 403; `.auth` has both checks for signed tokens.
        """
        return True

    def check_origin(self, origin: str) -> bool:
        """Whether a request with this ``Origin`` header may open a stream.

        Default: the same origin as the request, or one of :attr:`cors_origins`.
        """
        if origin in self.cors_origins:
            return True
        return origin == f"{self.request.protocol}://{self.request.host}"

    def get_history(self) -> int | Awaitable[int]:
        """How many past events a fresh stream (one without a Last-Event-ID) starts with: the
        last that many events of its channels, merged in id order. May be a coroutine.

        Default: the ``history`` query argument (``?history=50``), else the setting
        ``sse_history`` (default 0: a fresh stream starts from now). A value that is not a whole
        number from 0 to `MAX_HISTORY` raises `.InvalidArgumentError` (answered 400). Asking
        for more than is retained gets what is retained, never ``stream-reset``. Ignored when
        the request has a Last-Event-ID: a reconnecting browser sends one, and resumes after
        what it got instead of receiving the first replay again.
        """
        values = self.query_values("history")
        if not values:
            return int(self.settings.get("sse_history", 0) or 0)
        return parse_history(values[-1])

    def get_identity(self) -> str | Awaitable[str | None] | None:
        """Who this stream's user is, for presence (`.Broker.presence`): counted per identity
        on every channel the stream follows. May be a coroutine; asked once per stream, after
        :meth:`check_channel`.

        Default: from ``self.current_user`` (Tornado's `get_current_user`): a string as is; a
        verified token's ``sub`` (``subject`` of `.auth.Grants`); a Jupyter user's ``username``;
        else ``None`` (the stream counts without identity). An identity is 1-200 printable
        characters; another value raises `.InvalidArgumentError` (answered 400).
        """
        user = self.current_user
        if user is None or isinstance(user, str):
            return user
        for name in ("subject", "username"):
            value = getattr(user, name, None)
            if isinstance(value, str) and value:
                return value
        return None

    def get_last_event_id(self) -> str | None:
        """The id to resume after: the ``Last-Event-ID`` header, else the ``last_event_id`` query
        argument (for clients that cannot set headers), else ``None``. The header wins."""
        header = self.request.headers.get("Last-Event-ID")
        if header is not None:
            return header
        values = self.query_values("last_event_id")
        return values[-1] if values else None

    def query_values(self, name: str) -> list[str]:
        """The values of query argument *name*, exactly as sent (percent-decoded, UTF-8).

        Unlike Tornado's `get_query_arguments`, nothing is stripped and no control character is
        replaced: a channel or id is taken as sent, or refused, never silently changed (issue 12:
        ``?channel=%20lead`` must not stream ``lead``). Invalid UTF-8 answers 400.
        """
        values = self.request.query_arguments.get(name)
        if not values:
            return []
        return [self.decode_argument(value, name=name) for value in values]

    @property
    def with_channel(self) -> bool:
        """Whether each event of a channel carries a ``channel: <name>`` field line (which the SSE
        rules tell clients to ignore): true when the request asks for it with ``?with_channel=1``.
        ``SharedEventSource``'s leading tab asks, to route one stream's events to many tabs; a
        plain EventSource sees the same events either way. Each event's variant is encoded once,
        for all the streams that asked.
        """
        return self.query_values("with_channel")[-1:] == ["1"]

    def open(self) -> Awaitable[None] | None:
        """Called once the stream is open and any replay written, before live events.

        May be a coroutine (live events wait for it). `send_event` works from here on.
        """
        return None

    def on_close(self) -> None:
        """Called exactly once when a stream that was opened ends, whoever ends it and however.

        It pairs with :meth:`open`: a request refused, shed, or left by its client before
        :meth:`open` was called (during an async `get_channels` or `check_channel`, the
        subscription or the replay) calls neither.
        """

    # ------------------------------------------------------------------ actions

    def send_event(
        self,
        data: str | Event | None = "",
        *,
        event: str | None = None,
        id: str | None = None,
        retry: int | None = None,
    ) -> None:
        """Send an event to this stream only (not through the broker).

        Give an `.Event` or its fields. Leave ``id`` unset unless it is a broker id: the client
        resumes from the last id it saw.

        :raises EventStreamClosedError: if the stream is closed.
        :raises InvalidEventError: for illegal fields.
        """
        value = data if isinstance(data, Event) else Event(data, event=event, id=id, retry=retry)
        self._send_bytes(encode_event(value), value.id or "")

    def send_comment(self, text: str = "") -> None:
        """Send a comment (ignored by clients) to this stream.

        :raises EventStreamClosedError: if the stream is closed.
        """
        self._send_bytes(encode_comment(text), "")

    def _send_bytes(self, data: bytes, event_id: str) -> None:
        if self._queue is None:
            raise EventStreamClosedError("event stream is not open")
        self.deliver(Frame("", event_id, data, 0.0))

    def close(self, event: Event | None = None, *, leave: bool = False) -> asyncio.Future[None]:
        """End the stream (after sending *event*, if given) and close the connection.

        With *leave*, the user left (a Leave button, a logout): if this was their last stream
        of a channel with ``join`` and ``leave`` events (:attr:`presence_patterns`), their
        ``leave`` is sent at once instead of after :attr:`presence_grace` (which is for a
        connection that is merely lost, and may come back). Without, a close is like a lost
        connection. On a stream that already ended (its connection was lost first), *leave*
        still sends the leave still waiting for the grace period at once.

        Returns a future resolved once the final bytes are written (or the connection dropped).
        Idempotent. ``on_close`` runs once.
        """
        if leave:
            if self._closed_once:
                if self._ended is not None:
                    self._ended.close(grace=0.0)
            else:
                self._leave = True
        return self._close(event, "closed")

    def _close(self, event: Event | None, reason: str) -> asyncio.Future[None]:
        done = self._done_future()
        if self._closed_once:
            return done
        if self._stream is None or self._queue is None:
            self._finalize(reason)
            return done
        if event is not None:
            final = Frame("", event.id or "", encode_event(event), 0.0)
            if self._pending is None:
                self._pending = final
            else:
                self._queue.append(final)
        self._flush()
        stream = self._stream
        if stream is None:  # the flush failed and dropped the connection
            return done
        self._finalize(reason)  # writes the last chunk of a chunked response
        try:
            write = stream.write(b"")
        except StreamClosedError:
            self._resolve_done()
            return done

        def _written(_: object) -> None:
            stream.close()
            self._resolve_done()

        write.add_done_callback(_written)
        return done

    def _drain(self, event: Event | None) -> asyncio.Future[None]:
        """Close for a drain (`.ConnectionSet.close` with a window): a jittered ``retry:`` first."""
        if self._queue is not None and not self._closed_once:
            self._send_bytes(encode_retry(self._jittered_retry()), "")
        return self._close(event, "drain")

    def close_at(self, when: float, event: Event | None = None) -> None:
        """Close the stream at *when* (a `time.time` value, such as a token's ``exp``), after
        sending *event*, if given.

        May be called before the stream opens (from `get_current_user`, `check_channel` ...): the
        timer starts when it opens, and a deadline already past then closes it at once, after
        the replay. A later call replaces an earlier one. Events published up to the deadline
        are sent before *event*; give *event* no id, so that the client resumes after the last
        event it received. `.auth` uses this to end a stream with ``token-expired`` at the
        token's expiry.
        """
        self._deadline = (float(when), event)
        if self._stream is not None and self._queue is not None:
            self._start_deadline()

    def _start_deadline(self) -> None:
        deadline = self._deadline
        if deadline is None:
            return
        loop = IOLoop.current()
        if self._deadline_timer is not None:
            loop.remove_timeout(self._deadline_timer)
        delay = max(0.0, deadline[0] - time.time())
        self._deadline_timer = loop.call_later(delay, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        deadline = self._deadline
        if deadline is not None:
            self._close(deadline[1], "deadline")

    def flush(self, include_footers: bool = False) -> asyncio.Future[None]:
        """Before the stream opens, Tornado's flush; after, bytes given to `write` go out in
        order with the stream's events."""
        if not self._detached:
            return super().flush(include_footers)
        data = b"".join(self._write_buffer)
        self._write_buffer = []
        if data:
            self._send_bytes(data, "")
        done: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        done.set_result(None)
        return done

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> asyncio.Future[None]:
        """Before the stream opens, Tornado's finish; after, the same as `close`."""
        if not self._detached:
            return super().finish(chunk)
        if chunk is not None:
            self.write(chunk)
        if self._write_buffer and self._queue is not None:
            self.flush()
        return self.close()

    # ------------------------------------------------------------------ request flow

    def compute_etag(self) -> str | None:
        return None

    async def options(self, *args: Any, **kwargs: Any) -> None:
        """CORS preflight for the stream (``Last-Event-ID`` is a non-safelisted header)."""
        origin = self.request.headers.get("Origin")
        if origin is None or not self.check_origin(origin):
            self._refuse(403, "origin not allowed")
            return
        self._set_cors_headers(origin)
        self.set_header("Access-Control-Allow-Methods", "GET, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Last-Event-ID, Cache-Control")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    async def get(self, *args: Any, **kwargs: Any) -> None:
        origin = self.request.headers.get("Origin")
        if origin is not None and not self.check_origin(origin):
            self._refuse(403, "origin not allowed")
            return
        if origin is not None:
            self._set_cors_headers(origin)
        connections = self.connections
        reason = self._over_limits(connections)
        if reason is not None:
            self._shed(reason)
            return
        limiter = self.stream_rate
        if limiter is not None:
            self.metrics.add_limiter("stream", limiter)
            wait = limiter.take(address_key(self.address))
            if wait > 0:
                log.debug("shedding stream: over the stream rate: client=%s", self.address)
                self._shed("rate", wait)
                return
        try:
            # Each hook may be a coroutine; most are not, and awaiting a helper coroutine for
            # each would make four coroutine objects a stream (issue 15, item 2).
            # Whether a hook awaited: only then may other streams have taken the last slots.
            suspended = False
            answer: Any = self.get_channels()
            if isinstance(answer, Awaitable):
                answer, suspended = await answer, True
            channels = list(answer)
            if not channels:
                raise InvalidChannelError("name at least one channel (?channel=...)")
            for channel in channels:
                validate_channel(channel)
            most = self.max_channels
            if most is not None and len(set(channels)) > most:
                raise InvalidChannelError(
                    f"too many channels: {len(set(channels))} (a stream follows at most {most})"
                )
            patterns = self.presence_patterns
            for channel in dict.fromkeys(channels):
                # a companion channel is granted with the channel it describes (issue 14)
                of = described(channel) if patterns else None
                asked = of if of is not None and matches_any(patterns, of) else channel
                answer = self.check_channel(asked)
                if isinstance(answer, Awaitable):
                    answer, suspended = await answer, True
                if not answer:
                    raise AccessDeniedError(channel)
            answer = self.get_history()
            if isinstance(answer, Awaitable):
                answer, suspended = await answer, True
            history = int(answer)
            if not 0 <= history <= MAX_HISTORY:
                raise InvalidArgumentError(
                    f"history must be a whole number of events from 0 to {MAX_HISTORY}"
                )
            answer = self.get_identity()
            if isinstance(answer, Awaitable):
                answer, suspended = await answer, True
            identity = validate_identity(answer)
        except (InvalidChannelError, InvalidArgumentError) as exc:
            self._refuse(400, str(exc))
            return
        except AuthenticationError as exc:
            self.set_header("WWW-Authenticate", exc.www_authenticate)
            self._refuse(401, str(exc))
            return
        except AccessDeniedError as exc:
            self._refuse(403, str(exc))
            return
        except AccessUnavailableError as exc:
            log.debug("shedding stream: %s", exc)  # who raised it logs the outage, once
            self._shed("unavailable")
            return
        if self._closed_once or self.request.connection is None or self._finished:
            return  # the client left while a hook was pending (issue 12): nothing to undo
        if suspended:
            reason = self._over_limits(connections)
            if reason is not None:
                self._shed(reason)  # other streams took the last slots while the hooks ran
                return
        until = self.query_values("until")
        if until:
            self._until_key = self.broker.id_key(until[-1])
            if self._until_key is None:
                self._refuse(400, f"invalid until {until[-1]!r}: not an event id of this stream")
                return
        params = self._params = _StreamParams(self)
        self._connections = connections
        self._queue = []
        connections.add(self, params.heartbeat_interval)
        connections.watch(self)  # until the first pruning pass sees its output drained
        last_event_id = self.get_last_event_id()
        self._with_channel = self.with_channel
        try:
            subscription = await self.broker.subscribe(
                channels,
                _WithChannel(self) if self._with_channel else self,
                last_event_id,
                page_size=min(REPLAY_PAGE, max(16, params.max_buffer // 1024)),
                max_pending=params.max_buffer,
                on_overflow=self._overflow,
                history=history,
                identity=identity,
                announce=[c for c in channels if matches_any(patterns, c)] if patterns else (),
                grace=self.presence_grace,
            )
        except BrokerError as exc:
            log.warning("shedding stream: broker unavailable: %s", exc)
            connections.discard(self)
            self._queue = None
            self._shed("unavailable")
            return
        if self._closed_once:  # the client left while we subscribed
            subscription.close()
            return
        if subscription.overflowed:  # live events passed the bound before the first byte
            connections.discard(self)
            self._queue = None
            self._shed("overflow")
            return
        self._subscription = subscription
        metrics = params.metrics
        metrics.connections_open += 1
        metrics.connections_total += 1
        self._opened_at = time.monotonic()
        first = [encode_retry(self._jittered_retry())]
        if subscription.reset:
            metrics.stream_resets += 1
            first.append(
                encode_event(
                    Event(
                        data=json.dumps({"id": subscription.position, "reason": "history"}),
                        event="stream-reset",
                        id=subscription.position,
                    )
                )
            )
        elif last_event_id is None:
            position = subscription.position
            # the id-only priming event, as encode_event writes it (a broker's ids are plain)
            first.append(
                b"id: %s\n\n" % position.encode()
                if position
                else encode_event(Event(data=None, id=position))
            )
        else:
            metrics.resumes += 1
        self._start_stream(b"".join(first))
        log.info(
            "stream open: channels=%s client=%s resume=%s",
            ",".join(subscription.channels),
            self.address,
            last_event_id is not None,
        )
        if not await self._replay(subscription):
            return
        if self._until_key is not None:
            self.close()  # a bounded read: the replay up to ``until`` was all it asked for
            return
        if self._deadline is not None:
            self._start_deadline()  # a deadline already past closes the stream after the replay
        self._opened = True
        opened = self.open()
        if opened is not None:
            await opened
        if not self._closed_once:
            subscription.start()

    async def _replay(self, subscription: Subscription) -> bool:
        """Write the replay in pieces of at most ``max_buffer`` bytes, each once the client took
        the one before, reading the broker's pages as it goes (issue 12: a replay joined into
        one buffer per stream let clients that never read hold all of history each).

        Returns false if the stream ended meanwhile: the client left, was cut off (a stall, or
        live events held back past ``max_buffer``), or history was trimmed under a long replay
        (then the connection is closed, and the client's resume gets ``stream-reset``).
        """
        params: _StreamParams = self._params  # type: ignore[assignment]
        limit = params.max_buffer
        frames = subscription.replay
        page_size = REPLAY_PAGE
        past_until = False
        while True:
            until = self._until_key
            if until is not None:
                key = self.broker.id_key
                kept = [frame for frame in frames if key(frame.id) <= until]
                past_until = len(kept) < len(frames)  # nothing more to read
                frames = kept
            if self._with_channel:
                frames = [frame.with_channel() for frame in frames]
            if frames:
                average = sum(len(frame.data) for frame in frames) // len(frames)
                page_size = min(REPLAY_PAGE, max(1, limit // max(1, average)))
            start = 0
            while start < len(frames):
                end = start
                size = 0
                while end < len(frames) and (end == start or size + len(frames[end].data) <= limit):
                    size += len(frames[end].data)
                    end += 1
                parts = [frame.data for frame in frames[start:end]]
                if self._chunked:
                    parts = [b"%x\r\n" % size, *parts, b"\r\n"]
                params.metrics.events_sent += end - start
                if not await self._write_drained(b"".join(parts)):
                    return False
                start = end
            if subscription.complete or past_until:
                return True
            try:
                frames = await subscription.next_page(page_size)
            except HistoryGapError:
                self._abort("replay-gap")  # the resume from the last id sent gets stream-reset
                return False
            except BrokerError as exc:
                log.info("replay ended early: %s", exc)
                self._abort("replay-failed")
                return False
            if self._closed_once:
                return False

    def _overflow(self) -> None:
        """Live events held back during the replay passed ``max_buffer``: cut off as slow."""
        if self._stream is None or self._params is None:
            return  # not started yet: get() sheds it once the subscription returns
        self._params.metrics.slow_disconnects += 1
        self._abort("slow")

    async def _write_drained(self, data: bytes) -> bool:
        """Write *data*, then wait until the IOStream holds none of it; false if the stream
        ended. Bounded: a client that stops reading is pruned after the stall timeout."""
        stream = self._stream
        if stream is None or self._closed_once:
            return False
        if not self._write(stream, data):
            return False
        if stream._write_buffer:
            try:
                await stream.write(b"")
            except StreamClosedError:
                return False
        return not self._closed_once

    def _start_stream(self, body: bytes) -> None:
        """Send headers and the first bytes; from here on, bytes go straight to the stream."""
        self._transforms = []  # never gzip an event stream
        self.set_status(200)
        headers = self._headers
        # constants: no need for set_header's checks (issue 15, item 2)
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        headers.pop("Connection", None)
        request = self.request
        connection = request.connection
        if (
            isinstance(connection, HTTP1Connection)
            and isinstance(connection.stream, IOStream)
            and request.method == "GET"
        ):
            self._take_over(connection, body)
        else:
            if request.version == "HTTP/1.0" and "Connection" in request.headers:
                # An HTTP/1.0 stream ends when the connection closes: Tornado would otherwise
                # answer a keep-alive request with "Connection: Keep-Alive" (and no length).
                del request.headers["Connection"]
            self._auto_finish = False
            self.write(body)
            self.flush()
        # Once the headers are out, Tornado's per-request helpers for templates and response
        # headers are never read again: let them go (issue 8: memory per idle stream). Dropping
        # ``ui`` also breaks its reference cycle with the handler.
        self.ui = _RELEASED_UI  # type: ignore[assignment]
        # A fresh mapping, not clear(): HTTPHeaders.clear() is MutableMapping's popitem loop,
        # 6 us a stream for its 5 headers (issue 15, item 2).
        self._headers = httputil.HTTPHeaders()

    def _take_over(self, connection: HTTP1Connection, body: bytes) -> None:
        """Take the connection over from Tornado's HTTP/1 reader, then write the response head
        and *body* ourselves.

        Like `WebSocketHandler`, the stream detaches the connection: Tornado's request loop,
        its futures and per-request objects then go, and with them most of what an idle stream
        would keep alive for the cyclic garbage collector to walk (issue 8). It detaches before
        the head rather than after it, and writes the head itself: what Tornado's ``flush`` and
        ``write_headers`` do for any response (output transforms, content-length bookkeeping,
        the chunk framer, a future per write), a stream does not need, and it was about a sixth
        of what connecting a stream cost (issue 15, item 2). The stream ends by closing the
        connection; the close callback tells us it did.
        """
        request = self.request
        stream = connection.detach()
        # Tornado's per-connection server object, its request loop's finished task and
        # coroutine: kept alive by nothing but this reference once the loop ends, and never
        # needed again (routing read it): a seventh of an idle stream's objects.
        request.server_connection = None
        request.connection = None  # a detached HTTP1Connection: the stream owns the connection
        self._stream = stream
        self._detached = True
        self._auto_finish = False
        self._headers_written = True
        params = self._params
        if self._connections is not None and params is not None:
            self._mark_dirty = self._connections.mark_dirty
            self._metrics = params.metrics
        # HTTP/1.1: chunked framing, ours from the first chunk to the last (in _finalize).
        # HTTP/1.0: the body runs until the connection closes, with no framing at all.
        chunked = self._chunked = request.version == "HTTP/1.1"
        headers = self._headers
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
            if "close" in request.headers.get("Connection", "").lower():
                headers["Connection"] = "close"  # as Tornado says it to a closing 1.1 client
        cookies = getattr(self, "_new_cookie", None)
        if cookies:
            for cookie in cookies.values():
                headers.add("Set-Cookie", cookie.OutputString(None))
        lines = [f"HTTP/1.1 {self._status_code} {self._reason}"]
        lines.extend([f"{name}: {value}" for name, value in headers.get_all()])
        head = "\r\n".join(lines)
        try:
            if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
                raise ValueError("CR or LF")
            data = head.encode("latin1") + b"\r\n\r\n"
        except ValueError as exc:  # UnicodeEncodeError too
            # set_header refuses both; a subclass writing to _headers directly does not. The
            # values are not logged: one may be a cookie.
            bad = [name for name, value in headers.get_all() if not _HEADER_VALUE.fullmatch(value)]
            reason = "CR or LF" if str(exc) == "CR or LF" else "a character beyond Latin-1"
            log.error("stream refused: %s in response header %s", reason, ", ".join(bad))
            stream.close()
            self._finalize("invalid-header")
            self._resolve_done()
            return
        data += b"%x\r\n%s\r\n" % (len(body), body) if chunked else body
        sock = stream.socket
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP (a unix socket): nothing to delay, and no user timeout either
            else:
                if type(stream) is IOStream:
                    self._raw_socket = sock
                if hasattr(socket, "TCP_USER_TIMEOUT"):
                    timeout = params.stall_timeout if params is not None else 30.0
                    try:
                        sock.setsockopt(
                            socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000)
                        )
                    except OSError:
                        pass
        stream.set_close_callback(self.on_connection_close)
        if stream.closed():
            # It closed before we took it over: Tornado's callback for that went to the
            # connection we just let go, and ours is not called for a closed stream.
            IOLoop.current().add_callback(self.on_connection_close)
            return
        # as events go: straight to the socket, the IOStream only for what does not fit
        self._write(stream, data)

    def _over_limits(self, connections: ConnectionSet) -> str | None:
        """Why a new stream must be shed (a `.Metrics.streams_shed` reason: ``"shutdown"``,
        ``"connections"``, ``"address"``), or ``None``."""
        if connections.closing:
            return "shutdown"
        limit = self.max_connections
        if limit is not None and len(connections) >= limit:
            return "connections"
        per_address = self.max_connections_per_address
        if per_address is not None and connections.count(self.address) >= per_address:
            return "address"
        return None

    def _jittered_retry(self, least: float = 0.0) -> int:
        """The ``retry:`` to announce, in milliseconds: :attr:`retry_interval` (or *least*
        seconds, if longer) jittered upwards."""
        base = max(self.retry_interval, least)
        return int(base * 1000 * (1.0 + random.random() * self.retry_jitter))

    def _shed(self, reason: str, wait: float = 0.0) -> None:
        """Answer a stream that cannot be served now: ``retry:`` at least *wait* seconds."""
        metrics = self.metrics
        metrics.connections_shed += 1
        metrics.streams_shed[reason] = metrics.streams_shed.get(reason, 0) + 1
        retry = self._jittered_retry(wait)
        self._transforms = []
        self.set_status(200)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("Retry-After", str(max(1, math.ceil(retry / 1000))))
        self.clear_header("Connection")
        self.finish(encode_retry(retry))

    def _refuse(self, status: int, message: str) -> None:
        self._transforms = []
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(message + "\n")

    def _set_cors_headers(self, origin: str) -> None:
        if origin in self.cors_origins:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Credentials", "true")
        self.add_header("Vary", "Origin")

    @property
    def address(self) -> str:
        """The client address used for per-address limits (``request.remote_ip``)."""
        return self.request.remote_ip or ""

    # ------------------------------------------------------------------ hot path

    def deliver(self, frame: Frame) -> None:
        """Queue *frame* for this stream; it is written at the end of the loop iteration."""
        if self._pending is None:
            if self._queue is None:
                return
            self._pending = frame
            mark = self._mark_dirty
            if mark is not None:
                mark(self)
        else:
            queue = self._queue
            if queue is not None:
                queue.append(frame)

    def _flush(self) -> None:
        first = self._pending
        stream = self._stream
        if first is None or stream is None:
            return
        self._pending = None
        self._idle_ticks = 0
        metrics: Metrics = self._metrics  # type: ignore[assignment]
        queue = self._queue
        if not queue:
            if first.channel:
                metrics.events_sent += 1
            data = (first._chunk or first.chunk) if self._chunked else first.data
        else:
            frames = [first, *queue]
            queue.clear()
            metrics.events_sent += sum(1 for frame in frames if frame.channel)
            data = b"".join([frame.data for frame in frames])
            if self._chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
        if not first.written and first.published_at:
            first.written = True
            metrics.observe_latency(time.time() - first.published_at)
        # The common case, inlined: nothing of ours is waiting in the IOStream, so the bytes go
        # straight to the socket, with no Future, copy or buffer bookkeeping (issue 8).
        sock = self._raw_socket
        if sock is not None and not self._backlog:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._abort("write-failed")
                return
            if sent == len(data):
                return
            # the socket is full: the rest waits in the IOStream (no second send to find out)
            if not self._queue_rest(stream, data[sent:]):
                return
        elif not self._write(stream, data):
            return
        params: _StreamParams = self._params  # type: ignore[assignment]
        if len(stream._write_buffer) > params.max_buffer:
            metrics.slow_disconnects += 1
            self._abort("slow")

    def _write(self, stream: IOStream, data: bytes) -> bool:
        """Write *data*: to the socket if the IOStream holds nothing of ours, else through it.

        Returns false if the stream was aborted.
        """
        sock = self._raw_socket
        if self._backlog and not stream._write_buffer:
            self._backlog = False
        if sock is not None and not self._backlog:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._abort("write-failed")
                return False
            if sent == len(data):
                return True
            data = data[sent:]
        return self._queue_rest(stream, data)

    def _queue_rest(self, stream: IOStream, data: bytes) -> bool:
        """Hand *data* to the IOStream (it writes when the socket drains); false if aborted."""
        try:
            stream.write(data)
        except StreamClosedError:
            self._abort("write-failed")
            return False
        if stream._write_buffer:
            self._backlog = True
            if self._connections is not None:
                self._connections.watch(self)  # for the stall timeout
        else:
            self._backlog = False
        return True

    def _heartbeat(self) -> None:
        self._idle_ticks = 0
        stream = self._stream
        if stream is None or self._queue is None:
            return
        params: _StreamParams = self._params  # type: ignore[assignment]
        params.metrics.heartbeats_sent += 1
        self._write(stream, params.heartbeat_chunk if self._chunked else params.heartbeat)

    def _prune_reason(self, now: float) -> str | None:
        stream = self._stream
        params = self._params
        if stream is None or params is None:
            return None
        if stream.closed():
            return "write-failed"
        if params.max_lifetime is not None and now - self._opened_at > params.max_lifetime:
            return "lifetime"
        pending = len(stream._write_buffer)
        if not pending:
            self._stall_since = None
            if params.max_lifetime is None and self._connections is not None:
                self._connections.unwatch(self)
        elif self._stall_since is None or pending < self._stall_pending:
            self._stall_since = now
        elif now - self._stall_since > params.stall_timeout:
            return "stalled"
        self._stall_pending = pending
        return None

    def _abort(self, reason: str) -> None:
        """Drop the connection at once (slow, stalled, failed, lifetime, shutdown)."""
        if reason == "lifetime":
            self.close()
            return
        if reason not in ("slow", "shutdown") and self._params is not None:
            self._params.metrics.connections_pruned += 1
        stream = self._stream
        self._finalize(reason)
        if stream is not None:
            stream.close()
        self._resolve_done()

    # ------------------------------------------------------------------ ending

    def on_connection_close(self) -> None:
        self._finalize("client-closed")
        self._resolve_done()

    def on_finish(self) -> None:
        if self._queue is not None:
            self._finalize("finished")

    def _finalize(self, reason: str) -> None:
        """Unsubscribe, leave the connection set and call on_close, exactly once."""
        if self._closed_once:
            return
        self._closed_once = True
        self._close_reason = reason
        if self._deadline_timer is not None:
            IOLoop.current().remove_timeout(self._deadline_timer)
            self._deadline_timer = None
        self._queue = None
        self._pending = None
        self._mark_dirty = None
        self._raw_socket = None
        stream = self._stream
        self._stream = None
        channels = ""
        if self._subscription is not None:
            channels = ",".join(self._subscription.channels)
            self._subscription.close(grace=0.0 if self._leave else None)
            self._ended = self._subscription
            self._subscription = None
        if self._connections is not None:
            self._connections.discard(self)
        if stream is not None and self._params is not None:
            self._params.metrics.connections_open -= 1
            log.info(
                "stream closed: channels=%s client=%s reason=%s duration=%.1fs",
                channels,
                self.address,
                reason,
                time.monotonic() - self._opened_at,
            )
        if self._opened:
            try:
                self.on_close()
            except Exception:
                log.exception("error in on_close")
        if stream is not None and not self._finished:
            self._finished = True
            if self._detached:
                if self._chunked and not stream.closed():
                    try:
                        stream.write(b"0\r\n\r\n")  # the last chunk
                    except StreamClosedError:
                        pass
            else:
                connection = self.request.connection
                if connection is not None and not stream.closed():
                    connection.finish()
            self._log()

    def _done_future(self) -> asyncio.Future[None]:
        if self._done is None:
            self._done = asyncio.get_event_loop().create_future()
        return self._done

    def _resolve_done(self) -> None:
        done = self._done_future()
        if not done.done():
            done.set_result(None)
