"""The hub's HTTP server: Tornado's `~tornado.httpserver.HTTPServer`, hardened for exhaustion.

``tornado-sse serve`` holds many long-lived connections, so two ways of running out must not take
it down (issue 12, item 4):

* **Out of file descriptors.** Tornado's accept loop lets ``accept()``'s ``EMFILE`` / ``ENFILE``
  escape; the listening socket stays readable, so the loop calls it again at once, for ever: a
  core at 100 % and a traceback per iteration (measured: 68 % of a core and 4.2 MiB/s of log
  under ``prlimit --nofile=64`` with 70 idle clients), while ``/healthz`` timed out. Here the
  server stops watching the listening socket for a short interval that doubles while the
  condition lasts (`ACCEPT_PAUSE` up to `MAX_ACCEPT_PAUSE`), closes its oldest idle connections
  to make room, and resumes; the connections already open are served throughout. One warning
  when it starts, at most one reminder per `EXHAUSTED_LOG_INTERVAL` while it lasts, one line
  when accepting works again. Pending clients wait in the kernel's backlog meanwhile.
* **Idle connections.** A connection that is not a stream and has no request in progress (a
  keep-alive between requests, or a client that connected and sent nothing) costs a descriptor
  and is counted by no stream limit. It is closed after ``idle_connection_timeout`` (the whole
  request head must arrive within it, as with Tornado's header timeout; enforced by one sweep a
  second over the idle connections rather than a timer per request), and at most
  ``max_idle_connections`` are kept: past it, the one idle for longest is closed. Browsers open
  a new connection when an idle keep-alive connection was closed, so nobody notices.

In a group of `tornado_sse.process.fork_processes` (``serve --processes N``) the workers also
share new connections evenly: a worker accepts only while it holds no more than its share of
the group's connections, and a stuck worker receives none (`tornado_sse.process` says how and
why). Not with ``ssl_options`` (the TLS wrapper replaces the socket that counts its close).

Streams are not affected by either bound: an `.EventStreamHandler` takes its connection over
from the HTTP/1 reader once its headers are out, and the server forgets it.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from collections.abc import Iterable
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback

from . import process
from .metrics import Metrics

__all__ = [
    "ACCEPT_PAUSE",
    "EXHAUSTED_LOG_INTERVAL",
    "MAX_ACCEPT_PAUSE",
    "SWEEP_INTERVAL",
    "HubHTTPServer",
]

log = logging.getLogger("tornado_sse.server")

#: first pause of accepting after running out of descriptors (seconds); doubles while it lasts
ACCEPT_PAUSE = 0.05
#: longest pause of accepting (seconds)
MAX_ACCEPT_PAUSE = 1.0
#: while descriptors stay exhausted, a reminder is logged at most this often (seconds)
EXHAUSTED_LOG_INTERVAL = 60.0

#: accept() errors that mean "no resources for one more connection now"
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: the idle connections are looked at this often at most (seconds); a quarter of the idle
#: connection timeout if that is shorter
SWEEP_INTERVAL = 1.0
#: connections accepted per readiness event at most (Tornado uses its listen backlog, 128)
_ACCEPT_BATCH = 128


class _IdleTracker(httputil.HTTPMessageDelegate):
    """Wraps a request's delegate: the connection is idle until its request head has arrived."""

    def __init__(
        self, server: HubHTTPServer, server_conn: Any, delegate: httputil.HTTPMessageDelegate
    ) -> None:
        self.server = server
        self.server_conn = server_conn
        self.delegate = delegate

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Any:
        server = self.server
        server._idle.pop(self.server_conn, None)
        server.metrics.idle_connections = len(server._idle)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.server._idle.pop(self.server_conn, None)
        self.delegate.on_connection_close()


class _CountedSocket(socket.socket):
    """An accepted connection whose close is counted in the group's shared table."""

    __slots__ = ("_load",)

    _load: process.GroupLoad | None

    def close(self) -> None:
        load = self._load
        if load is not None:
            self._load = None
            load.closed()
        super().close()


class _Acceptor:
    """Accepts connections on one listening socket, pausing when descriptors run out, and in a
    group while this worker holds more than its share."""

    def __init__(
        self, server: HubHTTPServer, sock: socket.socket, load: process.GroupLoad | None
    ) -> None:
        self.server = server
        self.sock = sock
        self.load = load
        self.io_loop = IOLoop.current()
        self.removed = False
        self.watching = False
        self._resume_handle: object | None = None
        self._watch()

    def _watch(self) -> None:
        self.io_loop.add_handler(self.sock, self._ready, IOLoop.READ)
        self.watching = True

    def _ready(self, fd: Any, events: int) -> None:
        server = self.server
        load = self.load
        for _ in range(_ACCEPT_BATCH):
            if self.removed:
                return
            if load is not None and not load.may_accept():
                self._yield()
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                server._accepting_again()
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # EMFILE and kin, or anything else accept() may raise: never let the listening
                # socket's readiness call us again at once (that is the spin).
                self._pause(exc)
                return
            if load is not None:
                counted = _CountedSocket(fileno=connection.detach())
                counted._load = load
                load.opened()
                connection = counted
            server._handle_connection(connection, address)

    def _yield(self) -> None:
        """Leave the next connections to the other workers for a moment."""
        self.io_loop.remove_handler(self.sock)
        self.watching = False
        self._resume_handle = self.io_loop.call_later(process.BALANCE_RECHECK, self._resume)

    def _pause(self, exc: OSError) -> None:
        delay = self.server._exhausted(exc)
        self.io_loop.remove_handler(self.sock)
        self.watching = False
        self._resume_handle = self.io_loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        self._resume_handle = None
        if not self.removed:
            self._watch()

    def remove(self) -> None:
        """Stop accepting for good (`HubHTTPServer.stop`)."""
        self.removed = True
        if self.watching:
            self.io_loop.remove_handler(self.sock)
            self.watching = False
        if self._resume_handle is not None:
            self.io_loop.remove_timeout(self._resume_handle)
            self._resume_handle = None


class HubHTTPServer(HTTPServer):
    """An `HTTPServer` that backs off when out of descriptors and bounds idle connections.

    Takes Tornado's `HTTPServer` arguments, and:

    :param max_idle_connections: non-stream connections without a request in progress kept at
        most; past it the one idle for longest is closed. ``None``: no bound.
    :param metrics: where to count idle connections, idle connections closed, and accept pauses
        (`.Metrics` ``idle_connections``, ``idle_closed``, ``accept_pauses``).

    Pass ``idle_connection_timeout`` (seconds) as for `HTTPServer`: the time a connection may take
    to send a request's head, the first or the next one. It is enforced here, by one sweep over
    the idle connections every `SWEEP_INTERVAL` at most (oldest first, stopping at the first
    that has time left), instead of by Tornado's timer, future and chained future for every
    request: the same bound, one tick late at most, for a fraction of what a connect costs
    (issue 15, item 2).
    """

    def initialize(  # type: ignore[override]
        self,
        request_callback: Any,
        *,
        max_idle_connections: int | None = None,
        metrics: Metrics | None = None,
        **kwargs: Any,
    ) -> None:
        super().initialize(request_callback, **kwargs)
        self.max_idle_connections = max_idle_connections
        self.metrics = metrics if metrics is not None else Metrics()
        #: seconds a connection may take to send a request head (Tornado's default: an hour)
        self.idle_timeout: float = self.conn_params.header_timeout or 3600.0
        self.conn_params.header_timeout = None  # ours to enforce (_sweep)
        #: idle server connections, oldest first (insertion order), with when they became idle
        self._idle: dict[Any, float] = {}
        self._sweeper: PeriodicCallback | None = None
        self._pause = ACCEPT_PAUSE
        self._exhausted_since: float | None = None
        self._exhausted_logged = 0.0
        self._pauses = 0
        self._heartbeat: PeriodicCallback | None = None

    # ------------------------------------------------------------------ accepting

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        load = process.group_load() if not self.ssl_options else None
        if load is not None and self._heartbeat is None:
            load.beat()
            self._heartbeat = PeriodicCallback(load.beat, process.HEARTBEAT_INTERVAL * 1000)
            self._heartbeat.start()
        if self._sweeper is None:
            interval = min(SWEEP_INTERVAL, self.idle_timeout / 4)
            self._sweeper = PeriodicCallback(self._sweep, interval * 1000)
            self._sweeper.start()
        for sock in sockets:
            acceptor = _Acceptor(self, sock, load)
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = acceptor.remove

    def stop(self) -> None:
        if self._heartbeat is not None:  # the others stop counting on this worker
            self._heartbeat.stop()
            self._heartbeat = None
        super().stop()

    async def close_all_connections(self) -> None:
        await super().close_all_connections()
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def _exhausted(self, exc: OSError) -> float:
        """accept() failed: make room, log (rarely), and return how long to pause (seconds)."""
        now = time.monotonic()
        delay = self._pause
        self._pause = min(self._pause * 2, MAX_ACCEPT_PAUSE)
        self._pauses += 1
        self.metrics.accept_pauses += 1
        closed = self._close_idle(max(1, len(self._idle) // 4))
        reason = (
            "out of file descriptors"
            if exc.errno in (errno.EMFILE, errno.ENFILE)
            else f"accept failed: {exc.strerror or exc}"
        )
        if self._exhausted_since is None:
            self._exhausted_since = self._exhausted_logged = now
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning(
                "%s (%s; open-file limit %d, %d connections open besides streams): pausing "
                "accepts, closing idle connections (%d now); clients wait in the backlog",
                reason,
                errno.errorcode.get(exc.errno or 0, exc.errno),
                soft,
                len(self._connections),
                closed,
            )
        elif now - self._exhausted_logged >= EXHAUSTED_LOG_INTERVAL:
            self._exhausted_logged = now
            log.warning(
                "%s for %.0fs now (%d accept pauses); raise the open-file limit (ulimit -n) "
                "or lower --max-connections / --max-idle-connections",
                reason,
                now - self._exhausted_since,
                self._pauses,
            )
        return delay

    def _accepting_again(self) -> None:
        """The backlog is drained without an error: the exhaustion is over, if there was one."""
        if self._exhausted_since is not None:
            log.info(
                "accepting connections again after %.1fs (%d accept pauses)",
                time.monotonic() - self._exhausted_since,
                self._pauses,
            )
            self._exhausted_since = None
            self._pauses = 0
        self._pause = ACCEPT_PAUSE

    # ------------------------------------------------------------------ idle connections

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        idle = self._idle
        idle[server_conn] = time.monotonic()
        limit = self.max_idle_connections
        if limit is not None and len(idle) > limit:
            self._close_idle(len(idle) - limit)
        self.metrics.idle_connections = len(idle)
        return _IdleTracker(self, server_conn, delegate)

    def on_close(self, server_conn: object) -> None:
        self._idle.pop(server_conn, None)
        self.metrics.idle_connections = len(self._idle)
        super().on_close(server_conn)

    def _sweep(self) -> None:
        """Close the connections idle for longer than `idle_timeout`: those still without a
        request head (Tornado's header timeout), between requests or before the first."""
        idle = self._idle
        if not idle:
            return
        deadline = time.monotonic() - self.idle_timeout
        expired = []
        for server_conn, since in idle.items():
            if since > deadline:
                break  # the rest became idle later
            expired.append(server_conn)
        for server_conn in expired:
            del idle[server_conn]
            server_conn.stream.close()
        if expired:
            self.metrics.idle_connections = len(idle)

    def _close_idle(self, count: int) -> int:
        """Close up to *count* idle connections, those idle for longest first."""
        closed = 0
        idle = self._idle
        while closed < count and idle:
            server_conn = next(iter(idle))
            del idle[server_conn]
            server_conn.stream.close()
            closed += 1
        self.metrics.idle_closed += closed
        self.metrics.idle_connections = len(idle)
        return closed
