"""A reconnecting Server-Sent Events client on Tornado's HTTP client.

:class:`EventSource` behaves like a browser's ``EventSource``, as an async iterator::

    async with EventSource("http://127.0.0.1:8000/events?channel=news") as source:
        async for event in source:
            print(event.id, event.event, event.data)

It reconnects on its own after a network error or a clean end of the stream, waiting the
reconnection delay (the server's ``retry:`` field once one arrived, else the ``retry`` argument),
backed off exponentially while attempts keep failing, plus up to 25 % of random jitter so that
clients dropped together do not return together; it sends ``Last-Event-ID`` so the server can
replay what was missed. Like a browser it stops for good on a status other than 200 (raising
`.EventStreamError`), on a 200 that is not ``text/event-stream`` (same), and on 204 (ending the
iteration quietly).

Deliberate choices:

* **Bounded memory, with backpressure.** Bytes go through the sans-I/O
  `.EventStreamParser` (an event or line over ``max_event_size`` raises `.StreamParseError`,
  and the client stops: the server would send the same event again after a resume), and
  parsed events wait in a buffer of at most ``max_queue`` events. When the buffer is full the
  streaming callback waits (Tornado's ``simple_httpclient`` supports coroutine streaming
  callbacks), so Tornado stops reading the socket and TCP flow control pushes back on the
  server, whose slow-consumer bound then applies; the client later resumes from
  ``Last-Event-ID``. Nothing grows without bound when the consumer is slow.
* **Resume position.** ``Last-Event-ID`` is the id of the last *parsed* block carrying an
  ``id`` field, including the id-only events a server uses to prime a fresh stream. Events in
  the buffer are kept across a reconnect, so resuming from the parsed position loses and
  duplicates nothing. As in browsers an empty id resets it, and then no header is sent.
* **Closing an idle stream at once.** Tornado's HTTP client has no way to abort a fetch, so
  the client makes its own `SimpleAsyncHTTPClient` whose TCP client remembers the connection's
  stream; :meth:`EventSource.close` closes that stream. With a caller's ``http_client`` the
  connection is released when its next bytes arrive (a hub's heartbeat) instead.
* **Silence is a dead connection, if you say so.** A half-open connection (a peer that vanished
  without a FIN: a NAT or a laptop lid) looks exactly like a quiet stream. With
  ``idle_timeout`` the client drops a stream that carried no byte for that long and reconnects,
  resuming; set it to a few heartbeat intervals of the server (tornado_sse's default heartbeat
  is 15 s, so 45-60 s). Without it, only TCP itself (after many minutes) ends such a stream.
* **An invalid URL fails at once.** `validate_url` runs in the constructor and refuses what a
  browser's ``EventSource`` constructor (or its fetch) would refuse: a scheme other than
  ``http``/``https``, no host, an invalid host or port, whitespace or control characters. Tornado
  would instead try to resolve ``"this is invalid"`` and the client would retry it for ever.
  As in the WHATWG URL parser, a non-ASCII host is sent in its IDNA form and non-ASCII
  characters of the path and query as UTF-8 percent-escapes.
* **Redirects are followed here, not by Tornado**, so that credentials never follow a redirect
  to another origin whatever Tornado release is installed (before 6.5.6 Tornado forwarded
  ``Authorization`` and ``Cookie``): at most 5 in a row; to another origin the
  ``Authorization``, ``Cookie`` and ``Proxy-Authorization`` headers are dropped for the rest of
  the chain, as the Fetch standard drops them. A reconnect starts again from ``url``, as a
  browser's does.
* **A token is never dropped.** With ``token`` the client sends ``Authorization: Bearer``. At
  a ``token-expired`` event (the server's signal that the token's ``exp`` has come, issue 13),
  a client given a function takes a fresh token from it and reconnects at once with its last
  id, so it resumes exactly; a 401 on a reconnect (a token that expired while the network was
  down) also takes a fresh token, once. A fixed token that expired gets 401 and the client
  stops with `.EventStreamError`: it never carries on without its token.
* No ``Accept-Encoding``: a compressed event stream is buffered by the compressor.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import math
import random
import socket
import ssl
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders, HTTPInputError, parse_response_start_line
from tornado.iostream import IOStream
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.tcpclient import TCPClient

from .errors import (
    EventStreamError,
    InvalidEventError,
    InvalidURLError,
    StreamIdleError,
    StreamParseError,
)
from .protocol import Event, EventStreamParser
from .redaction import redact_url

__all__ = ["TOKEN_EXPIRED", "EventSource", "TokenSource", "validate_url"]

log = logging.getLogger("tornado_sse.client")

#: fraction of the delay added at random before a reconnect
JITTER = 0.25
#: bytes of a refusal's body kept for the error message
_BODY_LIMIT = 4096
#: the longest stream the client's own HTTP client accepts before it reconnects
_MAX_BODY = 1 << 62
#: characters a host may not hold (the WHATWG URL standard's forbidden domain code points)
_FORBIDDEN_HOST = frozenset("\0\t\n\r #%/:<>?@[\\]^|")
#: statuses after which the client follows ``Location`` itself (`EventSource._redirect`)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: redirects followed in a row before the client gives up (Tornado's default)
_MAX_REDIRECTS = 5
#: request headers that never follow a redirect to another origin (lowercase)
_CREDENTIALS = frozenset({"authorization", "cookie", "proxy-authorization"})
#: printable ASCII: kept as is when non-ASCII characters of a path or query are escaped
_PRINTABLE = "".join(chr(code) for code in range(0x21, 0x7F))
#: the event a server sends before it closes a stream whose token expired (`.auth.TOKEN_EXPIRED`)
TOKEN_EXPIRED = "token-expired"  # noqa: S105 (an event name, not a secret)

#: a token, or a function (possibly a coroutine function) returning a fresh one
TokenSource = str | Callable[[], str | Awaitable[str]]


def validate_url(url: object) -> str:
    """Return *url*, an ``http://`` or ``https://`` URL a client can connect to, or raise
    `.InvalidURLError`.

    Refused: a value that is not a string, whitespace or control characters anywhere, another
    scheme, no host, a host holding characters no host may hold (or a non-ASCII host without an
    IDNA form), a port that is not a number from 1 to 65535. The URL returned has its host in
    IDNA form and the non-ASCII characters of its path and query percent-encoded (UTF-8), as a
    browser sends them; an ASCII URL is returned unchanged. The error's message does not repeat
    the URL, which may carry credentials; it is in the error's ``url``.
    """
    if not isinstance(url, str):
        raise InvalidURLError(f"a URL must be a string, not {type(url).__name__}", repr(url))
    bad = next((c for c in url if c <= " " or c == "\x7f" or c.isspace()), None)
    if bad is not None:
        raise InvalidURLError(
            f"invalid URL: it holds whitespace or a control character ({bad!r})", url
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a bad port, or a bracketed host that is not an IP address
        raise InvalidURLError(f"invalid URL: {exc}", url) from exc
    if parts.scheme not in ("http", "https"):
        raise InvalidURLError(
            "invalid URL: not an http:// or https:// URL (e.g. http://127.0.0.1:8000)",
            url,
        )
    host = parts.hostname
    if not host:
        raise InvalidURLError("invalid URL: it has no host", url)
    if port == 0:
        raise InvalidURLError("invalid URL: port 0", url)
    netloc = parts.netloc
    if not parts.netloc.rpartition("@")[2].startswith("["):  # IPv6: urlsplit checked it
        if any(c in _FORBIDDEN_HOST for c in host):
            raise InvalidURLError(f"invalid URL: invalid host {host!r}", url)
        if not host.isascii():
            try:
                ascii_host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise InvalidURLError(f"invalid URL: invalid host {host!r}", url) from exc
            userinfo, at, _ = parts.netloc.rpartition("@")
            netloc = f"{userinfo}{at}{ascii_host}" + (f":{port}" if port is not None else "")
    if url.isascii():
        return url
    return urllib.parse.urlunsplit(
        (
            parts.scheme,
            netloc,
            urllib.parse.quote(parts.path, safe=_PRINTABLE),
            urllib.parse.quote(parts.query, safe=_PRINTABLE),
            urllib.parse.quote(parts.fragment, safe=_PRINTABLE),
        )
    )


class _Aborted(HTTPInputError):
    """Raised from the streaming callback to drop a connection we cannot close directly.

    A subclass of `HTTPInputError` because Tornado then closes the connection quietly.
    """


class _TrackingTCPClient(TCPClient):
    """A `TCPClient` that hands each connected stream to *on_connect*."""

    def __init__(self, on_connect: Any, resolver: Any) -> None:
        super().__init__(resolver=resolver)
        self._on_connect = on_connect

    async def connect(
        self,
        host: str,
        port: int,
        af: socket.AddressFamily = socket.AF_UNSPEC,
        ssl_options: dict[str, Any] | ssl.SSLContext | None = None,
        max_buffer_size: int | None = None,
        source_ip: str | None = None,
        source_port: int | None = None,
        timeout: float | datetime.timedelta | None = None,
    ) -> IOStream:
        stream = await super().connect(
            host,
            port,
            af=af,
            ssl_options=ssl_options,
            max_buffer_size=max_buffer_size,
            source_ip=source_ip,
            source_port=source_port,
            timeout=timeout,
        )
        self._on_connect(stream)
        return stream


class _Attempt:
    """The state of one connection attempt."""

    __slots__ = (
        "aborted",
        "active_at",
        "body",
        "content_type",
        "expired",
        "fatal",
        "headers",
        "parser",
        "paused",
        "progressed",
        "status",
        "stream",
        "token_expired",
        "truncated",
    )

    def __init__(self, parser: EventStreamParser) -> None:
        self.parser = parser
        self.status: int | None = None
        self.headers = HTTPHeaders()
        self.content_type: str | None = None
        self.stream = False  # headers said: a 200 event stream
        self.body = b""
        self.fatal: Exception | None = None
        self.aborted = False
        self.progressed = False  # an event, an id or a heartbeat comment arrived
        self.active_at = time.monotonic()  # when the last bytes arrived (or the attempt began)
        self.expired: asyncio.Future[None] | None = None  # set once idle for idle_timeout
        self.paused = False  # reading waits for the consumer: silence is ours, not the server's
        self.token_expired = False  # the server said token-expired
        self.truncated = False  # a response that is not a stream was cut at _BODY_LIMIT


def _is_event_stream(content_type: str | None) -> bool:
    if content_type is None:
        return False
    return content_type.partition(";")[0].strip().lower() == "text/event-stream"


class EventSource:
    """An async iterator of the `.Event` objects of a ``text/event-stream`` URL, reconnecting.

    :param url: the ``http://`` or ``https://`` URL of the stream; an invalid one raises
        `.InvalidURLError` at once (see `validate_url`).
    :param last_event_id: resume after this id on the first connection (sent as
        ``Last-Event-ID``); ``None`` or ``""`` for none.
    :param history: start with the last this many events of the stream's channels (sent as
        ``?history=N``; the server must support it, as `.EventStreamHandler` and the hub do);
        reconnections resume after the last id received instead. ``None``: from now.
    :param headers: extra request headers (cookies, authorization ...).
    :param retry: initial reconnection delay in seconds, until the server sends ``retry:``.
    :param max_retry: the exponential backoff of repeated failures stops growing here (seconds);
        a larger delay the server asks for is still honoured.
    :param max_event_size: bound, in characters, on one event's data or one line; past it the
        client stops with `.StreamParseError`.
    :param connect_timeout: seconds to wait for a connection (``None``: no limit).
    :param request_timeout: seconds a single connection may last in all before the client
        drops it and reconnects (``None``, the default: no limit).
    :param idle_timeout: seconds without a byte from the server after which the client takes
        the connection for dead, drops it and reconnects (``None``, the default: wait forever).
        Give it a few of the server's heartbeat intervals. With a caller's ``http_client`` the
        dead connection cannot be closed from here: it keeps one of that client's
        ``max_clients`` slots until TCP gives it up, so prefer the private client for this.
    :param reconnect: ``False`` to make one connection only: its end ends the iteration, and a
        failure to connect raises `.EventStreamError` with ``status`` ``None``.
    :param http_client: a `SimpleAsyncHTTPClient` to use (it is not closed). Default: a private
        one, closed by :meth:`close`.
    :param max_queue: events kept for the consumer; when full, reading pauses.
    :param token: a token sent as ``Authorization: Bearer``, or a function (plain or coroutine)
        returning one. The function is called for the first connection, after a
        ``token-expired`` event (the client then reconnects at once, resuming), and once after
        a 401 to a token it did not just return; a 401 to a fresh token stops the client, and
        so does an exception the function raises (raised from the iteration).

    Iterating yields every dispatched event, including ``stream-reset`` and ``token-expired``
    events (the caller decides what a gap in history means to it), and ends after
    :meth:`close`, a 204 response, or the end of the stream when ``reconnect`` is false. It
    raises `.EventStreamError` (a status other than 200 and 204, or a wrong ``Content-Type``)
    and `.StreamParseError` (an oversized event) after yielding the events received before;
    the client is then closed.

    Use it with ``async with`` or call :meth:`close`: leaving an ``async for`` loop alone keeps
    the connection (paused once the buffer is full). Subclass it to watch the connection:
    :meth:`on_open` and :meth:`on_reconnect`; or poll :attr:`connected`, :attr:`connections`
    and :attr:`last_error`. The object belongs to the event loop it is first iterated on.
    """

    def __init__(
        self,
        url: str,
        *,
        last_event_id: str | None = None,
        history: int | None = None,
        headers: Mapping[str, str] | None = None,
        retry: float = 3.0,
        max_retry: float = 60.0,
        max_event_size: int = 1 << 20,
        connect_timeout: float | None = 10.0,
        request_timeout: float | None = None,
        idle_timeout: float | None = None,
        reconnect: bool = True,
        http_client: SimpleAsyncHTTPClient | None = None,
        max_queue: int = 64,
        token: TokenSource | None = None,
    ) -> None:
        url = validate_url(url)
        if history is not None:
            if type(history) is not int or history < 0:
                raise ValueError("history must be a whole number of events (or None)")
            split = urllib.parse.urlsplit(url)
            query = f"{split.query}&history={history}" if split.query else f"history={history}"
            url = urllib.parse.urlunsplit(split._replace(query=query))
        if token is not None:
            if isinstance(token, str):
                _check_token(token)
            elif not callable(token):
                raise TypeError("token must be a string or a function returning one")
            if any(name.lower() == "authorization" for name in headers or {}):
                raise ValueError("give either token or an Authorization header, not both")
        if last_event_id is not None and any(c in last_event_id for c in "\r\n\0"):
            raise InvalidEventError("last_event_id must not contain CR, LF or NUL")
        if retry < 0 or max_retry < 0:
            raise ValueError("retry and max_retry must not be negative")
        if max_queue < 1 or max_event_size < 1:
            raise ValueError("max_queue and max_event_size must be at least 1")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive (or None for no limit)")
        if http_client is not None and not isinstance(http_client, SimpleAsyncHTTPClient):
            # curl_httpclient ignores a coroutine streaming callback: no backpressure.
            raise TypeError("http_client must be a tornado.simple_httpclient.SimpleAsyncHTTPClient")
        self.url = url
        #: `url` as logs and error messages show it: credential-like query parameters and a
        #: password replaced (`.redact_url`)
        self.shown_url = redact_url(url)
        self.headers = dict(headers or {})
        self.max_retry = float(max_retry)
        self.max_event_size = max_event_size
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.reconnect = reconnect
        self.max_queue = max_queue
        #: number of streams opened so far (a 200 ``text/event-stream`` response each);
        #: more than one means the client has reconnected
        self.connections = 0
        #: whether a stream is open right now
        self.connected = False
        #: events received on the current stream, or on the last one once it ended; ``None``
        #: when the last connection attempt opened no stream (refused, failed, not a stream)
        self.stream_events: int | None = None
        #: the error that ended the last connection or attempt (``None`` after a clean end)
        self.last_error: BaseException | None = None
        self._last_event_id = last_event_id or ""
        self._retry = float(retry)
        self._client = http_client
        self._own_client = http_client is None
        self._conn_stream: IOStream | None = None
        self._attempt: _Attempt | None = None
        self._items: deque[Event] = deque()
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._done = False  # the run task has ended; nothing more will arrive
        self._error: BaseException | None = None
        self._closed = False
        self._released = False
        self._token_source = token
        self._token: str | None = token if isinstance(token, str) else None

    # ------------------------------------------------------------------ state

    @property
    def last_event_id(self) -> str:
        """The ``Last-Event-ID`` the next connection sends (``""``: none), as
        ``EventSource.lastEventId`` in browsers.

        It is the last id the stream carried, id-only events included; it may be ahead of the
        events still waiting in the buffer (up to ``max_queue``), which are delivered anyway.
        """
        return self._last_event_id

    @property
    def retry(self) -> float:
        """The reconnection delay in seconds: the server's last ``retry:`` (sent in milliseconds)
        or the ``retry`` argument. Backoff and jitter are added on top of it."""
        return self._retry

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called or the client stopped for good."""
        return self._closed or self._done

    @property
    def pending(self) -> int:
        """Events received and waiting for the consumer (at most ``max_queue``)."""
        return len(self._items)

    # ------------------------------------------------------------------ hooks

    def on_open(self) -> None:
        """Called each time a stream opens (after a 200 ``text/event-stream`` response's headers).

        Not a coroutine. The default does nothing.
        """

    def on_reconnect(self, error: BaseException | None, delay: float) -> None:
        """Called when a connection ended or failed and the client will reconnect in *delay*
        seconds. *error* is the network error, or ``None`` after a clean end of the stream;
        `stream_events` says whether a stream had opened, and how many events it carried.

        Not a coroutine. The default logs at INFO.
        """
        events = self.stream_events
        if events is None:
            what = "ended" if error is None else f"failed ({_describe(error)})"
        elif error is None:
            what = f"ended by the server after {events} events"
        else:
            what = f"interrupted after {events} events ({_describe(error)})"
        log.info("event stream %s %s; reconnecting in %.2fs", self.shown_url, what, delay)

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> EventSource:
        return self

    async def __anext__(self) -> Event:
        if self._task is None and not self._closed:
            self._start()
        while not self._items:
            if self._done or self._closed:
                error = self._error
                if error is not None:
                    self._error = None
                    raise error
                raise StopAsyncIteration
            if self._readable is None or self._readable.done():
                self._readable = asyncio.get_running_loop().create_future()
            await self._readable
        event = self._items.popleft()
        _wake(self._writable)
        return event

    async def __aenter__(self) -> EventSource:
        if self._task is None and not self._closed:
            self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def close(self) -> None:
        """Stop: drop the connection, cancel a pending reconnect, end the iteration. Idempotent.

        Events not yet taken from the iterator are discarded.
        """
        if self._closed:
            return
        self._closed = True
        self.connected = False
        self._items.clear()
        attempt = self._attempt
        if attempt is not None:
            self._abort(attempt)
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        _wake(self._readable)
        _wake(self._writable)
        self._release()

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the background task has finished."""
        self.close()
        task = self._task
        if task is not None:
            try:
                await task
            except asyncio.CancelledError:
                pass

    # ------------------------------------------------------------------ connection loop

    def _start(self) -> None:
        if self._client is None:
            self._client = self._make_client()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _make_client(self) -> SimpleAsyncHTTPClient:
        client = SimpleAsyncHTTPClient(force_instance=True, max_body_size=_MAX_BODY)
        # Tornado offers no way to abort a fetch; remembering the stream gives us one.
        client.tcp_client.close()
        client.tcp_client = _TrackingTCPClient(self._on_stream, client.resolver)
        return client

    def _on_stream(self, stream: IOStream) -> None:
        self._conn_stream = stream
        if self._closed:
            stream.close()

    async def _run(self) -> None:
        failures = 0
        try:
            while not self._closed:
                url, redirects = self.url, 0
                headers: Mapping[str, str] = self.headers
                fresh = self._token is None and callable(self._token_source)
                token = await self._get_token()
                if token is not None:
                    headers = {**headers, "Authorization": f"Bearer {token}"}
                while True:
                    attempt = _Attempt(
                        EventStreamParser(self.max_event_size, last_event_id=self._last_event_id)
                    )
                    error = await self._connect(attempt, url, headers)
                    if self._closed:
                        return
                    location = attempt.headers.get("Location")
                    if error is not None or attempt.status not in _REDIRECTS or not location:
                        break
                    redirects += 1
                    url, headers = self._redirect(attempt, url, location, headers, redirects)
                if attempt.fatal is not None:
                    raise attempt.fatal
                if error is None and attempt.status == 401 and not fresh and token is not None:
                    if callable(self._token_source):
                        self._token = None  # it expired while we were away: take a fresh one
                        continue
                if error is None and attempt.status == 204:
                    return
                if error is None and attempt.status != 200:
                    raise self._refusal(attempt)
                if error is not None and not self.reconnect:
                    raise EventStreamError(
                        f"cannot read event stream {self.shown_url}: {_describe(error)}"
                    ) from error
                if not self.reconnect:
                    return
                self.last_error = error
                # A stream that carried an event, an id or a heartbeat worked; anything else (a
                # refused connection, a shed stream carrying only retry:) backs off further.
                failures = 0 if attempt.progressed else failures + 1
                delay = self._delay(failures)
                if not attempt.progressed:  # a shed stream: its Retry-After is a floor (issue 20)
                    delay = max(delay, retry_after(attempt.headers.get("Retry-After")))
                if attempt.token_expired and callable(self._token_source):
                    self._token = None
                    delay = 0.0
                try:
                    self.on_reconnect(error, delay)
                except Exception:
                    log.exception("error in on_reconnect")
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._error = exc
        finally:
            self._done = True
            self.connected = False
            _wake(self._readable)
            self._release()

    async def _get_token(self) -> str | None:
        """The token to send: the fixed one, the function's last, or a fresh one from it."""
        source = self._token_source
        if self._token is None and source is not None and not isinstance(source, str):
            value = source()
            if isinstance(value, Awaitable):
                value = await value
            self._token = _check_token(value)
        return self._token

    def _release(self) -> None:
        """Close the private HTTP client, once."""
        if not self._released:
            self._released = True
            if self._own_client and self._client is not None:
                self._client.close()

    def _delay(self, failures: int) -> float:
        delay = self._retry
        if failures > 1:
            backoff = min(self.max_retry, max(delay, 0.1) * 2.0 ** min(failures - 1, 32))
            delay = max(delay, backoff)
        return delay + random.uniform(0.0, delay * JITTER)

    def _redirect(
        self,
        attempt: _Attempt,
        url: str,
        location: str,
        headers: Mapping[str, str],
        redirects: int,
    ) -> tuple[str, Mapping[str, str]]:
        """The URL and request headers of the next hop after a redirect from *url* (raises
        `.EventStreamError` past ``_MAX_REDIRECTS`` or for an unusable ``Location``).

        Credentials (``Authorization``, ``Cookie``, ``Proxy-Authorization``) do not follow a
        redirect to another origin, and do not come back on a later hop (as in the Fetch
        standard), whatever the installed Tornado does: it follows no redirect for us.
        """
        if redirects > _MAX_REDIRECTS:
            raise EventStreamError(
                f"{self.shown_url} redirected more than {_MAX_REDIRECTS} times",
                status=attempt.status,
                content_type=attempt.content_type,
            )
        try:
            target = validate_url(urllib.parse.urljoin(url, location))
        except (InvalidURLError, ValueError) as exc:
            raise EventStreamError(
                f"{self.shown_url} redirected to an unusable URL ({exc})",
                status=attempt.status,
                content_type=attempt.content_type,
            ) from exc
        if _origin(target) != _origin(url):
            headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIALS}
        return target, headers

    async def _connect(
        self, attempt: _Attempt, url: str, extra_headers: Mapping[str, str]
    ) -> BaseException | None:
        """Run one connection to *url* to its end; return the network error that ended it, if
        any. Redirects are not followed here (`_redirect`)."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **extra_headers}
        if self._last_event_id:
            # Header values travel as latin-1 in Tornado; send the id's UTF-8 bytes, as browsers do.
            headers["Last-Event-ID"] = self._last_event_id.encode("utf-8").decode("latin-1")
        request = HTTPRequest(
            url,
            headers=headers,
            follow_redirects=False,
            connect_timeout=self.connect_timeout or 0.0,
            request_timeout=self.request_timeout or 0.0,
            decompress_response=False,
            streaming_callback=functools.partial(self._on_chunk, attempt),
            header_callback=functools.partial(self._on_header, attempt),
        )
        self._attempt = attempt
        self.stream_events = None
        assert self._client is not None
        fetch = self._client.fetch(request, raise_error=False)
        # If close() cancels us, the fetch must not be cancelled: Tornado would log an error
        # when it later fails. It fails promptly once close() has closed the stream.
        fetch.add_done_callback(_retrieve)
        watchdog = self._watch(attempt) if self.idle_timeout is not None else None
        try:
            if attempt.expired is None:
                response: HTTPResponse = await asyncio.shield(fetch)
            else:
                # asyncio.wait never cancels what it waits for (see above)
                await asyncio.wait((fetch, attempt.expired), return_when=asyncio.FIRST_COMPLETED)
                if attempt.expired.done():
                    self._abort(attempt)  # with a caller's client: at its next bytes, if any
                    return StreamIdleError(f"no data from the server for {self.idle_timeout:g} s")
                response = fetch.result()
        except (OSError, HTTPClientError, HTTPInputError) as exc:
            if attempt.truncated:
                return None  # we cut a refusal's (or redirect's) body short: its status stands
            return exc
        finally:
            if watchdog is not None:
                watchdog()
            self._attempt = None
            self._conn_stream = None
            self.connected = False
            if attempt.stream and attempt.fatal is None and not self._closed:
                # End of stream: an event without its closing blank line is dropped (WHATWG);
                # an oversized event reported late by the parser is still fatal.
                try:
                    last = attempt.parser.close()
                    self._items.extend(last)
                    self.stream_events = (self.stream_events or 0) + len(last)
                except StreamParseError as exc:
                    attempt.fatal = exc
        if attempt.status is None:
            attempt.status = response.code
        return None

    def _watch(self, attempt: _Attempt) -> Callable[[], None]:
        """Resolve ``attempt.expired`` once the attempt has been silent for idle_timeout; the
        timer is moved on when it fires, not at every chunk. Returns what cancels it."""
        loop = asyncio.get_running_loop()
        timeout = float(self.idle_timeout or 0.0)
        expired = attempt.expired = loop.create_future()
        timer: list[asyncio.TimerHandle] = []

        def check() -> None:
            if attempt.paused:
                attempt.active_at = time.monotonic()
            remaining = attempt.active_at + timeout - time.monotonic()
            if remaining <= 0:
                expired.set_result(None)
            else:
                timer[0] = loop.call_later(remaining, check)

        timer.append(loop.call_later(timeout, check))
        return lambda: timer[0].cancel()

    def _refusal(self, attempt: _Attempt) -> EventStreamError:
        body = attempt.body.decode("utf-8", "replace").strip()
        message = f"{self.shown_url} answered HTTP {attempt.status}"
        if body:
            message += f": {body.splitlines()[0][:200]}"
        return EventStreamError(
            message, status=attempt.status, content_type=attempt.content_type, body=body
        )

    def _abort(self, attempt: _Attempt) -> None:
        attempt.aborted = True
        stream = self._conn_stream
        if stream is not None and self._attempt is attempt:
            stream.close()

    # ------------------------------------------------------------------ Tornado callbacks

    def _on_header(self, attempt: _Attempt, line: str) -> None:
        if attempt.aborted:
            return
        attempt.active_at = time.monotonic()
        if attempt.status is None:
            attempt.status = parse_response_start_line(line.strip()).code
            return
        if line.strip():
            attempt.headers.parse_line(line)
            return
        # The blank line: headers are complete.
        attempt.content_type = attempt.headers.get("Content-Type")
        if attempt.status != 200:
            return
        if not _is_event_stream(attempt.content_type):
            attempt.fatal = EventStreamError(
                f"{self.shown_url} answered with Content-Type {attempt.content_type!r}, "
                "not text/event-stream",
                status=200,
                content_type=attempt.content_type,
            )
            self._abort(attempt)
            return
        attempt.stream = True
        self.connected = True
        self.connections += 1
        self.stream_events = 0
        try:
            self.on_open()
        except Exception:
            log.exception("error in on_open")

    async def _on_chunk(self, attempt: _Attempt, chunk: bytes) -> None:
        if attempt.aborted:
            raise _Aborted("event stream closed by the client")
        attempt.active_at = time.monotonic()
        if not attempt.stream:
            attempt.body += chunk[: _BODY_LIMIT - len(attempt.body)]
            if len(attempt.body) >= _BODY_LIMIT:
                attempt.truncated = True
                self._abort(attempt)
            return
        try:
            events = attempt.parser.feed(chunk)
        except StreamParseError as exc:
            attempt.fatal = exc
            self._abort(attempt)
            return
        parser = attempt.parser
        if parser.last_event_id != self._last_event_id:
            self._last_event_id = parser.last_event_id
            attempt.progressed = True
        if parser.retry is not None:
            self._retry = parser.retry / 1000.0
        if events or parser.comments:
            attempt.progressed = True
        for event in events:
            if event.event == TOKEN_EXPIRED:
                attempt.token_expired = True
            while len(self._items) >= self.max_queue:
                if self._closed:
                    return
                if self._writable is None or self._writable.done():
                    self._writable = asyncio.get_running_loop().create_future()
                attempt.paused = True
                try:
                    await self._writable
                finally:
                    attempt.paused = False
                    attempt.active_at = time.monotonic()
            if self._closed:
                return
            self._items.append(event)
            self.stream_events = (self.stream_events or 0) + 1
            _wake(self._readable)


def retry_after(value: str | None) -> float:
    """Seconds of a ``Retry-After`` header given in seconds; ``0.0`` when absent or not a
    non-negative number (an HTTP date is not honoured: clocks differ), at most an hour."""
    if value is None:
        return 0.0
    try:
        seconds = float(value.strip())
    except ValueError:
        return 0.0
    if not math.isfinite(seconds) or seconds < 0:
        return 0.0
    return min(seconds, 3600.0)


def _origin(url: str) -> tuple[str, str, int]:
    """The origin of a URL `validate_url` accepted: scheme, host, port."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _check_token(token: object) -> str:
    if not isinstance(token, str) or not token:
        raise TypeError(f"a token must be a non-empty string, not {type(token).__name__}")
    if not token.isascii() or any(c <= " " or c == "\x7f" for c in token):
        raise ValueError("a token must be printable ASCII without spaces")
    return token


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _describe(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
