"""The standalone hub: ``tornado-sse serve``.

A backend in any language POSTs an event to ``/publish``; browsers follow ``/events``. The
operator's contract (endpoints, status codes, flags, metrics, signals) is ``docs/serve.md``; keep
the two in step.

The hub is a thin layer over the core: `HubEventsHandler` is an `.EventStreamHandler` configured
through Application settings, publishing goes through the broker, and ``/metrics`` exposes the
same `.Metrics` an embedded application would register itself.

Deliberate choices:

* **The request body limit is ours, not Tornado's.** Past ``max_body_size`` Tornado drops the
  connection without an answer, so a publisher cannot tell "too large" from "hub crashed".
  `PublishHandler` streams the body (``@stream_request_body``), counts it itself (chunked
  bodies included) and answers 413. A refused body of reasonable size is read to its end and
  discarded before the answer, so the client is not reset while still sending (which could
  lose the 413); a body announced (or sent) far past the limit, or one sent after
  ``Expect: 100-continue``, is answered at once and the connection closed.
* **Under** ``--processes`` **the limit is bounded by the bridge** (issue 12): a
  ``--max-body-size`` past what one bridge frame carries is refused at start, and an event that
  still outgrows it (non-string data is re-encoded as compact JSON, where ``1e15`` becomes
  ``1000000000000000.0``) is answered 413 (`.EventTooLargeError`), never 500.
* **Sockets are bound before anything else is built** (`serve`): ``--processes`` forks after
  binding and before any event loop or broker exists, so each worker builds its own; bind
  errors are reported as a clean command-line error.
* **Every broker is made by** `make_broker`, the one place a backend (``--redis``, the bridge
  behind ``--processes``) plugs in.
* **Running out is not a crash** (`.HubHTTPServer`, issue 12 item 4): out of file descriptors,
  the hub pauses accepting instead of spinning on ``accept()``, and connections that are not
  streams are bounded in time (``--idle-connection-timeout``) and number
  (``--max-idle-connections``).
* **A scrape gets the whole hub's totals** (issue 12 item 14): under ``--processes N`` a scrape
  lands on one worker, so that worker collects every worker's `.Metrics.samples` through the
  bridge (`.BridgeBroker.collect_metrics`, at most about a second) and adds them up; counts of
  one worker alone would be a random fraction. Log lines name their worker (`ProcessFilter`).
* **SIGTERM drains** (issue 15, item 4): the streams close one by one over ``--drain`` seconds
  (2 by default, inside the 5 s stop), each after a jittered ``retry:``
  (`.ConnectionSet.close` with a window), so that a rolling restart moves clients to the other
  instances gradually instead of in one ``retry:`` window.
* **The garbage collector is tuned** (issue 15, item 2): once listening, the hub freezes what
  start-up built and raises the collector's thresholds (`.gcpolicy`), since many long-lived
  streams make CPython's defaults walk the whole heap again and again during a connect storm.
* **No secret reaches a log**: the token is compared with `hmac.compare_digest` and never
  logged; the access log redacts query parameters that look like credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import re
import signal
import socket
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import tornado.web
from tornado.netutil import bind_sockets

from . import gcpolicy
from .broker.base import Broker
from .broker.memory import InProcessBroker
from .cli import HostName, RedisUrl, require_module
from .connections import ConnectionSet
from .errors import (
    AccessDeniedError,
    AuthenticationError,
    BrokerError,
    EventTooLargeError,
    InvalidEventError,
    InvalidKeyError,
)
from .handler import EventStreamHandler
from .httpserver import HubHTTPServer
from .hub.access import HubAccess
from .hub.limits import (
    DEFAULT_PUBLISH_RATE,
    DEFAULT_STREAM_RATE,
    RateType,
    make_limiter,
    publish_key,
    retry_after_header,
)
from .hub.presence import PresenceHandler
from .metrics import Metrics
from .publish import PublishError, PublishRequest, parse_publish
from .redaction import RedactingFilter, redact_url
from .script import client_script_route

__all__ = [
    "HubEventsHandler",
    "HubOptions",
    "PublishError",
    "PublishHandler",
    "PublishRequest",
    "make_app",
    "make_broker",
    "parse_publish",
    "run_hub",
    "serve",
    "serve_command",
]

log = logging.getLogger("tornado_sse.server")
access_log = logging.getLogger("tornado.access")

#: the environment variable holding the publish token
TOKEN_ENV = "TORNADO_SSE_TOKEN"  # noqa: S105 (a variable name, not a secret)
#: the environment variable holding the HMAC secret of signed tokens (as for ``tornado-sse token``)
JWT_SECRET_ENV = "TORNADO_SSE_JWT_SECRET"  # noqa: S105 (a variable name, not a secret)

#: a refused body is read and discarded up to this many bytes past the limit before the answer
DRAIN_ALLOWANCE = 4 << 20

#: seconds the hub waits for streams to close on SIGTERM before dropping the rest (the drain
#: window included, if longer: then the drain plus `DRAIN_GRACE`)
SHUTDOWN_STREAMS_TIMEOUT = 2.5
#: ``--drain``'s default: seconds over which SIGTERM closes the streams
DEFAULT_DRAIN = 2.0
#: seconds the last streams of a drain get to write their final bytes
DRAIN_GRACE = 0.5
#: seconds a worker takes to stop after its streams are closed (idle connections, the broker)
_STOP_AFTER_STREAMS = 2.0

_TOKEN_PATTERN = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class HubOptions:
    """Everything ``tornado-sse serve`` was told, as one value (the flags, in seconds/bytes).

    :param retry: reconnection delay announced to clients, in milliseconds (as on the wire).
    :param drain: seconds over which SIGTERM closes the streams (``--drain``), each after a
        jittered ``retry:``; 0: all at once.
    :param max_connections: streams held at most; ``None``: no limit.
    :param max_connections_per_address: streams one client address may hold (per worker
        process); ``None``: no limit.
    :param max_channels_per_stream: channels one stream may follow; ``None``: no limit.
    :param processes: worker processes sharing the port (``--processes``, bridge backend).
    :param redis: Redis URL (``--redis``, Redis backend); ``None``: in-process broker.
    :param redis_durable: declare that Redis never loses an acknowledged write
        (``--redis-durable``; `RedisBroker`'s ``durable``).
    :param idle_connection_timeout: seconds a non-stream connection may take to send a request's
        head (keep-alive connections between requests included).
    :param max_idle_connections: non-stream connections without a request kept at most (the one
        idle for longest is closed past it); ``None``: no bound.
    :param stream_rate: new streams per client address, ``"RATE[/BURST]"`` (`.hub.limits`);
        ``None``: no limit.
    :param publish_rate: publishes per credential, ``"RATE[/BURST]"``; ``None``: no limit.
    :param presence: channel patterns with join/leave events on ``presence:<channel>``
        (``--presence``; the setting ``sse_presence``).
    :param public_channels: patterns anyone may follow (``--public-channel``); none by default:
        the hub is closed until channels are opened (see `.hub.access`).
    :param jwt_secret: HMAC secret of signed tokens (``--jwt-secret``).
    :param jwt_public_key: PEM public key of signed tokens (``--jwt-public-key``'s content).
    :param auth_url: the backend asked about other streams (``--auth-url``).
    :param metrics_public: ``/metrics`` without the token (``--metrics-public``).
    """

    token: str = dataclasses.field(repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    history: int = 1000
    heartbeat: float = 15.0
    retry: int = 3000
    drain: float = DEFAULT_DRAIN
    cors_origins: tuple[str, ...] = ()
    max_connections: int | None = None
    max_connections_per_address: int | None = 100
    max_channels_per_stream: int | None = 100
    max_body_size: int = 1 << 20
    max_buffer_size: int = 1 << 20
    processes: int = 1
    redis: str | None = None
    redis_durable: bool = False
    xheaders: bool = False
    stream_rate: str | None = DEFAULT_STREAM_RATE
    publish_rate: str | None = None
    idle_connection_timeout: float = 20.0
    max_idle_connections: int | None = 1000
    log_level: str = "info"
    log_json: bool = False
    presence: tuple[str, ...] = ()
    public_channels: tuple[str, ...] = ()
    jwt_secret: str | None = dataclasses.field(default=None, repr=False)
    jwt_public_key: bytes | None = dataclasses.field(default=None, repr=False)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_cookie: str = "tornado_sse_token"
    auth_url: str | None = None
    metrics_public: bool = False

    def access(self) -> HubAccess:
        """The hub's access policy from these options.

        :raises InvalidKeyError: for an unusable ``jwt_secret`` or ``jwt_public_key``.
        :raises ImportError: for signed tokens without PyJWT installed.
        """
        verifier = None
        if self.jwt_secret is not None or self.jwt_public_key is not None:
            from .auth import TokenVerifier

            verifier = TokenVerifier(
                secret=self.jwt_secret,
                public_key=self.jwt_public_key,
                audience=self.jwt_audience,
                issuer=self.jwt_issuer,
                cookie=self.jwt_cookie,
            )
        return HubAccess(
            master_token=self.token,
            verifier=verifier,
            public_channels=self.public_channels,
            auth_url=self.auth_url,
            cookie=self.jwt_cookie,
            metrics_public=self.metrics_public,
        )


# ---------------------------------------------------------------------- broker


def make_broker(options: HubOptions) -> Broker:
    """The broker the hub publishes to and streams subscribe to.

    ``--redis URL``: `tornado_sse.broker.redis.RedisBroker`; else ``--processes N`` (N > 1): a
    `tornado_sse.broker.bridge.BridgeBroker` on the group's socket; otherwise an
    `.InProcessBroker`. Called once per process, after the sockets are bound (and after
    forking, if any).
    """
    if options.redis is not None:
        module = importlib.import_module("tornado_sse.broker.redis")
        broker: Broker = module.RedisBroker(
            options.redis, history_size=options.history, durable=options.redis_durable
        )
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
    elif options.redis_durable:
        raise click.UsageError("--redis-durable needs --redis")
    if options.processes > 1:
        require_module("tornado_sse.broker.bridge", "--processes", "pip install tornado-sse")
        if options.redis is None:
            framing = importlib.import_module("tornado_sse.broker.framing")
            largest = framing.DEFAULT_MAX_FRAME_SIZE - framing.PUBLISH_OVERHEAD
            if options.max_body_size > largest:
                raise click.BadParameter(
                    f"{options.max_body_size} is more than the bridge between --processes"
                    f" carries: at most {largest} bytes (or run one process, or use --redis)",
                    param_hint="'--max-body-size'",
                )


# ---------------------------------------------------------------------- handlers


class _Hub:
    """State the hub's handlers share (one per application)."""

    def __init__(
        self, options: HubOptions, broker: Broker, connections: ConnectionSet, metrics: Metrics
    ) -> None:
        self.options = options
        self.broker = broker
        self.connections = connections
        self.metrics = metrics
        self.stream_limiter = make_limiter(options.stream_rate, "stream", metrics)
        self.publish_limiter = make_limiter(options.publish_rate, "publish", metrics)
        self.access = options.access()
        self.closing = False
        self._registry: Any = None
        self._group_samples: list[Any] | None = None
        if hasattr(broker, "metrics_source"):  # the bridge: answer the other workers' scrapes
            broker.metrics_source = metrics.samples

    def allows_origin(self, origin: str, request: Any) -> bool:
        return (
            origin in self.options.cors_origins or origin == f"{request.protocol}://{request.host}"
        )

    @property
    def healthy(self) -> bool:
        return (
            not self.closing
            and self.broker.healthy
            and all(check() for check in self.metrics.health_sources)
        )

    def _samples(self) -> list[Any]:
        """What the registry reports: every worker's samples just collected, else ours."""
        group = self._group_samples
        return group if group is not None else [self.metrics.samples()]

    async def collect_group(self) -> list[Any] | None:
        """Under ``--processes N``: every worker's samples, collected through the bridge (a
        worker that does not answer within a second is left out; ``tornado_sse_processes``
        says how many did); ``None`` otherwise, or when the bridge cannot ask them now."""
        collect = getattr(self.broker, "collect_metrics", None)
        if collect is None or self.options.processes < 2 or self.options.redis is not None:
            return None
        try:
            group: list[Any] = await collect()
        except (BrokerError, asyncio.TimeoutError) as exc:
            log.warning("metrics: cannot collect the other workers' (%s); this worker's only", exc)
            return None
        return group

    def render(self, group: list[Any] | None) -> bytes:
        """The exposition of the registry, totalled over *group* (each worker's samples) when
        given, else of this process alone."""
        from prometheus_client import generate_latest

        registry = self.registry()
        self._group_samples = group
        try:
            output: bytes = generate_latest(registry)
        finally:
            self._group_samples = None
        return output

    def registry(self) -> Any:
        """The Prometheus registry of this hub (imports ``prometheus_client`` on first use)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry
            from prometheus_client.process_collector import ProcessCollector

            registry = CollectorRegistry()
            registry.register(self.metrics.collector(self._samples))
            backend_collector = getattr(self.broker, "collector", None)
            if backend_collector is not None:  # the backend's own metrics (Redis, for one)
                registry.register(backend_collector())
            ProcessCollector(registry=registry)
            self._registry = registry
        return self._registry


class _HubHandler(tornado.web.RequestHandler):
    """Base of the hub's plain endpoints: JSON errors, no caching."""

    hub: _Hub

    def initialize(self, hub: _Hub) -> None:
        self.hub = hub

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def compute_etag(self) -> str | None:
        return None

    def reply(self, status: int, payload: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(payload, ensure_ascii=False) + "\n")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": self._reason}) + "\n")


class HubEventsHandler(EventStreamHandler):
    """``GET /events?channel=...``: the core stream handler, with plain-text errors; the hub's
    access policy (`.hub.access`) decides, once the channels are known to be valid."""

    _requested: list[str] = []
    _access_checked = False

    def get_channels(self) -> list[str]:
        self._requested = self.query_values("channel")
        return self._requested

    async def check_channel(self, channel: str) -> bool:  # type: ignore[override]
        if not self._access_checked:
            self._access_checked = True
            hub: _Hub = self.settings["tornado_sse_hub"]
            await hub.access.authorize_subscribe(self, self._requested)
        return True

    def compute_etag(self) -> str | None:
        return None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {self._reason}\n")


@tornado.web.stream_request_body
class PublishHandler(_HubHandler):
    """``POST /publish``: authenticate, bound and validate the body, publish, answer 202."""

    _chunks: list[bytes]
    _received = 0
    _refusal: tuple[int, str] | None = None
    #: seconds until the publisher's bucket has a token again (a 429's Retry-After)
    _retry_after = 0.0
    #: who publishes: ``None`` for the master token, else a signed token's grants
    _grants: Any = None
    _limit = 0

    def prepare(self) -> None:
        self._chunks = []
        if self.request.method != "POST":
            return
        self._limit = self.hub.options.max_body_size
        connection = self.request.connection
        if connection is not None and hasattr(connection, "set_max_body_size"):
            # We count the body ourselves (data_received) so that even a chunked body over the
            # limit gets its 413: Tornado's own limit would drop the connection without one.
            connection.set_max_body_size(1 << 62)
        origin = self.request.headers.get("Origin")
        if origin is not None:
            if self.hub.allows_origin(origin, self.request):
                self._set_cors_headers(origin)
            else:
                self._refusal = (403, f"origin {origin!r} is not allowed to publish")
        if self._refusal is None:
            try:
                self._grants = self.hub.access.authorize_publisher(self.request)
            except AuthenticationError as exc:
                self._refusal = (401, str(exc))
        if self._refusal is None:
            self._check_rate(self._grants)
        declared = _content_length(self.request.headers.get("Content-Length"))
        if self._refusal is None and declared is not None and declared > self._limit:
            self._refusal = (413, self._too_large())
        if self._refusal is not None and (
            self.request.headers.get("Expect", "").lower() == "100-continue"
            or (declared is not None and declared > self._limit + DRAIN_ALLOWANCE)
        ):
            self._refuse()  # Tornado then closes the connection instead of reading the body

    def _check_rate(self, grants: Any) -> None:
        """Spend a token of this publisher's bucket (`.hub.limits.publish_key`), or refuse 429."""
        limiter = self.hub.publish_limiter
        if limiter is None:
            return
        wait = limiter.take(publish_key(grants, self.request.remote_ip or ""))
        if wait > 0:
            metrics = self.hub.metrics
            metrics.publishes_refused["rate"] = metrics.publishes_refused.get("rate", 0) + 1
            self._retry_after = wait
            self._refusal = (
                429,
                f"publishing too fast: at most {limiter.burst} at once, then {limiter.rate:g} per"
                f" second; try again in {math.ceil(wait * 10) / 10:g} s",
            )

    def _too_large(self) -> str:
        return f"body larger than {self._limit} bytes"

    def data_received(self, chunk: bytes) -> None:
        if self._limit == 0:  # not a POST: Tornado's server-wide limit applies
            return
        self._received += len(chunk)
        if self._refusal is None and self._received > self._limit:
            self._refusal = (413, self._too_large())
            self._chunks = []
        if self._refusal is not None:
            if self._received > self._limit + DRAIN_ALLOWANCE and not self._finished:
                self._refuse()
            return
        self._chunks.append(chunk)

    def _refuse(self) -> None:
        assert self._refusal is not None
        status, message = self._refusal
        if status == 401:
            scheme = 'Bearer realm="tornado-sse"'
            if "Authorization" in self.request.headers:
                scheme += ', error="invalid_token"'
            self.set_header("WWW-Authenticate", scheme)
        if status == 429:
            self.set_header("Retry-After", retry_after_header(self._retry_after))
            self.reply(status, {"error": message, "retry_after": round(self._retry_after, 3)})
            return
        self.reply(status, {"error": message})

    async def post(self) -> None:
        if self._finished:
            return
        if self._refusal is not None:
            self._refuse()
            return
        body = b"".join(self._chunks)
        self._chunks = []
        try:
            request = parse_publish(body)
        except PublishError as exc:
            self.reply(400, {"error": str(exc)})
            return
        try:
            self.hub.access.authorize_publish(self._grants, request.channel)
        except AccessDeniedError as exc:
            self.reply(403, {"error": str(exc)})
            return
        try:
            event_id = await self.hub.broker.publish(
                request.channel, request.data, event=request.event, retry=request.retry
            )
        except EventTooLargeError as exc:
            self.reply(413, {"error": str(exc)})
            return
        except InvalidEventError as exc:
            self.reply(400, {"error": str(exc)})
            return
        except BrokerError as exc:
            log.warning("publish failed: broker unavailable: %s", exc)
            self.reply(503, {"error": f"the hub cannot deliver now: {exc}"})
            return
        self.reply(202, {"id": event_id})

    def options(self) -> None:
        """CORS preflight for publishing from a browser (an allowed origin only)."""
        origin = self.request.headers.get("Origin")
        if origin is None or not self.hub.allows_origin(origin, self.request):
            self.reply(403, {"error": "origin not allowed"})
            return
        self._set_cors_headers(origin)
        self.set_header("Access-Control-Allow-Methods", "POST, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def _set_cors_headers(self, origin: str) -> None:
        if origin in self.hub.options.cors_origins:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Credentials", "true")
        self.add_header("Vary", "Origin")


def _content_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.split(",")[0].strip())
    except ValueError:
        return None  # Tornado answers 400 itself


class HealthHandler(_HubHandler):
    """``GET /healthz``: 200 when the hub can deliver, 503 otherwise."""

    def get(self) -> None:
        if self.hub.healthy:
            self.reply(200, {"status": "ok"})
        elif self.hub.closing:
            self.reply(503, {"status": "unavailable", "reason": "shutting down"})
        else:
            self.reply(503, {"status": "unavailable", "reason": "the broker cannot deliver"})

    head = get


class MetricsHandler(_HubHandler):
    """``GET /metrics``: Prometheus text exposition; 501 without ``prometheus_client``."""

    async def get(self) -> None:
        try:
            self.hub.access.authorize_scrape(self.request)
        except AuthenticationError as exc:
            self.set_header("WWW-Authenticate", exc.www_authenticate)
            self.reply(401, {"error": str(exc)})
            return
        try:
            from prometheus_client import CONTENT_TYPE_LATEST

            self.hub.registry()
        except ImportError:
            self.set_status(501)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(
                "metrics need prometheus_client, which is not installed: "
                "pip install 'tornado-sse[metrics]'\n"
            )
            return
        group = await self.hub.collect_group()
        output = self.hub.render(group)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(output)


class NotFoundHandler(_HubHandler):
    def prepare(self) -> None:
        self.reply(
            404,
            {
                "error": "not found: the hub serves /events, /publish, /healthz, /metrics, "
                "/presence, /client.js"
            },
        )


def make_app(
    options: HubOptions,
    broker: Broker,
    *,
    connections: ConnectionSet | None = None,
    metrics: Metrics | None = None,
) -> tornado.web.Application:
    """The hub as a Tornado application: ``/events``, ``/publish``, ``/healthz``, ``/metrics``,
    and ``/client.js`` (the browser's ``SharedEventSource``, `.script`).

    *broker* is used as given (see `make_broker`); *connections* and *metrics* default to fresh
    instances of their own, so several hubs may share a process (in tests, say).
    """
    connections = connections if connections is not None else ConnectionSet()
    metrics = metrics if metrics is not None else Metrics()
    metrics.add_broker(broker)
    hub = _Hub(options, broker, connections, metrics)
    kwargs = {"hub": hub}
    return tornado.web.Application(
        [
            (r"/events", HubEventsHandler),
            (r"/publish", PublishHandler, kwargs),
            (r"/healthz", HealthHandler, kwargs),
            (r"/metrics", MetricsHandler, kwargs),
            (r"/presence", PresenceHandler, {"broker": broker, "access": hub.access}),
            client_script_route("/client.js"),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=kwargs,
        log_function=_log_request,
        tornado_sse_hub=hub,
        sse_broker=broker,
        sse_connections=connections,
        sse_metrics=metrics,
        sse_heartbeat_interval=options.heartbeat,
        sse_retry_interval=options.retry / 1000.0,
        sse_max_connections=options.max_connections,
        sse_max_connections_per_address=options.max_connections_per_address,
        sse_stream_rate=hub.stream_limiter,
        sse_max_channels=options.max_channels_per_stream or 0,
        sse_max_buffer_size=options.max_buffer_size,
        sse_cors_origins=options.cors_origins,
        sse_presence=options.presence,
    )


# ---------------------------------------------------------------------- logging


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """The access log: method, path (credentials redacted), status, client, duration."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not access_log.isEnabledFor(level):
        return
    request = handler.request
    path = redact_url(request.uri or "")
    duration = 1000.0 * request.request_time()
    access_log.log(
        level,
        "%d %s %s (%s) %.2fms",
        status,
        request.method,
        path,
        request.remote_ip,
        duration,
        extra={
            "status": status,
            "method": request.method,
            "path": path,
            "client": request.remote_ip,
            "duration_ms": round(duration, 3),
        },
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the access log's fields."""

    FIELDS = ("pid", "worker", "status", "method", "path", "client", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


JsonFormatter.converter = time.gmtime


class ProcessFilter(logging.Filter):
    """Says which process wrote a line: ``worker``, the worker's index under ``--processes``
    (absent otherwise), and ``where`` for text lines: ``worker 1, pid 4242``, ``supervisor,
    pid 4240`` or ``pid 4242``. (``pid`` is the record's own ``process``.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        group = sys.modules.get("tornado_sse.process")
        worker = group.task_id() if group is not None else None
        record.pid = record.process
        record.worker = worker
        if worker is not None:
            record.where = f"worker {worker}, pid {record.process}"
        elif group is not None and group.is_supervisor():
            record.where = f"supervisor, pid {record.process}"
        else:
            record.where = f"pid {record.process}"
        return True


def configure_logging(level: str, json_lines: bool) -> None:
    """Log to stderr at *level*, as text or one JSON object per line; each line says which
    process wrote it (`ProcessFilter`)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(where)s]: %(message)s")
        )
    handler.addFilter(ProcessFilter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# ---------------------------------------------------------------------- running


def bind(options: HubOptions) -> list[socket.socket]:
    """Bind the listening sockets, or fail with a command-line error saying why."""
    try:
        return bind_sockets(options.port, options.host)
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
    hub: _Hub = app.settings["tornado_sse_hub"]
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
    configure_logging(options.log_level, options.log_json)
    if len(options.token) < 16:
        log.warning("the publish token is short: use a long random secret")
    if options.processes > 1:
        # After binding, before any broker or loop exists; the supervisor stays in here.
        from .process import fork_processes

        fork_processes(
            options.processes, shutdown_timeout=streams_timeout(options) + _STOP_AFTER_STREAMS
        )
    asyncio.run(run_hub(options, sockets))


# ---------------------------------------------------------------------- command line


class _OriginType(click.ParamType):  # type: ignore[type-arg]
    name = "ORIGIN"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if text in ("*", "null"):
            self.fail(f"{text!r} is not allowed: list exact origins like https://app.example")
        parts = urllib.parse.urlsplit(text)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.username is not None
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or port == -1
        ):
            self.fail(
                f"{text!r} is not an origin: use scheme://host[:port], like https://app.example"
            )
        return f"{parts.scheme}://{parts.netloc}".lower()


def _patterns(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    from .auth import validate_pattern

    try:
        return tuple(validate_pattern(value) for value in values)
    except InvalidKeyError as exc:
        raise click.BadParameter(str(exc)) from exc


def _http_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from .client import validate_url

    try:
        return validate_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _finite_seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise click.BadParameter("must be a finite number of seconds")
    if 0 < value < 0.1:
        raise click.BadParameter("must be 0 (off) or at least 0.1 seconds")
    return value


@click.command("serve")
@click.option(
    "--host",
    type=HostName(),
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 or :: for every interface).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="TCP port to listen on (0: any free port, logged at start).",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    show_envvar=True,
    metavar="TOKEN",
    help="Secret publishers send as 'Authorization: Bearer TOKEN'. Required. Prefer the "
    "environment variable: other users can read command lines.",
)
@click.option(
    "--history",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    metavar="N",
    help="Events retained per channel, so that reconnecting clients miss nothing.",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(min=0, max=86400),
    default=15.0,
    show_default=True,
    metavar="SECONDS",
    callback=_finite_seconds,
    help="A comment line on every stream idle this long (keeps proxies from timing out; "
    "0 turns it off).",
)
@click.option(
    "--retry",
    type=click.IntRange(0, 86_400_000),
    default=3000,
    show_default=True,
    metavar="MS",
    help="Reconnection delay announced to clients, in milliseconds (jittered upwards).",
)
@click.option(
    "--drain",
    type=click.FloatRange(min=0, max=3600),
    default=DEFAULT_DRAIN,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM, close the streams one by one over this window, each after a jittered "
    "retry, so that clients move to other instances gradually. 0: all at once. Past 2 s the "
    "hub takes longer than 5 s to stop (SIGTERM gives it the window plus 3 s).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    type=_OriginType(),
    multiple=True,
    help="An exact origin (https://app.example) whose pages may subscribe and publish; "
    "repeatable. Default: none.",
)
@click.option(
    "--presence",
    "presence",
    multiple=True,
    metavar="PATTERN",
    help="Channels (a name, or a prefix ending in *) whose streams' users join and leave on "
    "the companion channel presence:<channel>; repeatable. Default: none.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Streams held at most; beyond, a new subscriber is told to retry later. "
    "Default: unlimited.",
)
@click.option(
    "--max-connections-per-address",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    metavar="N",
    help="Streams one client address may hold (per worker process); beyond, a new subscriber "
    "is told to retry later. 0: no limit. Behind a reverse proxy, pass --xheaders, or every "
    "client shares the proxy's address.",
)
@click.option(
    "--stream-rate",
    type=RateType(),
    default=DEFAULT_STREAM_RATE,
    show_default=True,
    help="New streams one client address may open (per worker process): BURST at once, then "
    "RATE per second; resumes count. Beyond, a subscriber is told to retry once it has a token "
    "again. 0: no limit. Behind a reverse proxy, pass --xheaders, or every client shares the "
    "proxy's address.",
)
@click.option(
    "--publish-rate",
    type=RateType(),
    default=DEFAULT_PUBLISH_RATE,
    show_default=True,
    help="Publishes one credential may make (per worker process): the master token is one, a "
    "signed token's sub another. Beyond, 429 with Retry-After. 0: no limit.",
)
@click.option(
    "--max-channels-per-stream",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    metavar="N",
    help="Channels one stream may follow; a request naming more gets 400. 0: no limit.",
)
@click.option(
    "--max-body-size",
    type=click.IntRange(min=1),
    default=1 << 20,
    show_default=True,
    metavar="BYTES",
    help="Largest /publish body accepted (larger ones get 413).",
)
@click.option(
    "--max-buffer-size",
    type=click.IntRange(min=1024),
    default=1 << 20,
    show_default=True,
    metavar="BYTES",
    help="Unsent bytes a stream may hold before it is cut off as a slow consumer "
    "(it resumes from its last event id).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Worker processes sharing the port, joined by a unix-socket bridge.",
)
@click.option(
    "--redis",
    "redis_url",
    type=RedisUrl(),
    default=None,
    help="Redis URL (redis://host:6379/0): several hubs on several machines act as one.",
)
@click.option(
    "--redis-durable",
    is_flag=True,
    help="Declare that Redis never loses an acknowledged write (appendfsync always, no "
    "failover): a Redis restart alone then sends no stream-reset. Default: a restart is taken "
    "as a possible loss.",
)
@click.option(
    "--idle-connection-timeout",
    type=click.FloatRange(min=1, max=3600),
    default=20.0,
    show_default=True,
    metavar="SECONDS",
    help="Close a connection that is not a stream when it takes this long to send a request "
    "(keep-alive connections between requests included).",
)
@click.option(
    "--max-idle-connections",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    metavar="N",
    help="Non-stream connections without a request kept at most; past it the one idle for "
    "longest is closed (0: no bound).",
)
@click.option(
    "--xheaders",
    is_flag=True,
    help="Trust X-Real-IP / X-Forwarded-For for the client address (limits, logs): only behind "
    "a reverse proxy that overwrites them, reachable only through it (else a client forges its "
    "address and goes around every per-address limit).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="Least severe level logged (info: one line per stream open and close, access log).",
)
@click.option("--log-json", is_flag=True, help="Log one JSON object per line.")
@click.option(
    "--public-channel",
    "public_channels",
    multiple=True,
    metavar="PATTERN",
    callback=_patterns,
    help="Channels anyone may follow without a token: a name, or a prefix ending in * "
    "('*': every channel); repeatable. Default: none (see 'Access' in docs/serve.md).",
)
@click.option(
    "--jwt-secret",
    envvar=JWT_SECRET_ENV,
    show_envvar=True,
    metavar="SECRET",
    help="HMAC secret (32 bytes or more) of the signed tokens (JWT, HS256) that grant "
    "channels. Prefer the environment variable.",
)
@click.option(
    "--jwt-public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    metavar="FILE",
    help="PEM public key of the signed tokens (RS*, ES*, EdDSA) that grant channels.",
)
@click.option("--jwt-audience", metavar="AUD", help="Signed tokens must name this audience.")
@click.option("--jwt-issuer", metavar="ISS", help="Signed tokens must come from this issuer.")
@click.option(
    "--jwt-cookie",
    default="tornado_sse_token",
    show_default=True,
    metavar="NAME",
    help="Cookie a browser's signed token may come in.",
)
@click.option(
    "--auth-url",
    metavar="URL",
    callback=_http_url,
    help="Your backend, asked (POST) about each new stream of channels that are not public "
    "and carry no signed token.",
)
@click.option(
    "--metrics-public",
    is_flag=True,
    help="Serve /metrics without the token (it names channels).",
)
def serve_command(
    host: str,
    port: int,
    token: str | None,
    history: int,
    heartbeat: float,
    retry: int,
    drain: float,
    cors_origins: tuple[str, ...],
    presence: tuple[str, ...],
    max_connections: int | None,
    max_connections_per_address: int,
    stream_rate: str | None,
    publish_rate: str | None,
    max_channels_per_stream: int,
    max_body_size: int,
    max_buffer_size: int,
    processes: int,
    redis_url: str | None,
    redis_durable: bool,
    idle_connection_timeout: float,
    max_idle_connections: int,
    xheaders: bool,
    log_level: str,
    log_json: bool,
    public_channels: tuple[str, ...],
    jwt_secret: str | None,
    jwt_public_key: Path | None,
    jwt_audience: str | None,
    jwt_issuer: str | None,
    jwt_cookie: str,
    auth_url: str | None,
    metrics_public: bool,
) -> None:
    """Run the standalone push hub.

    Browsers follow GET /events?channel=NAME; backends POST /publish with a JSON body
    {"channel": ..., "data": ...} and 'Authorization: Bearer TOKEN'. Also GET /healthz and
    GET /metrics. SIGTERM or SIGINT closes the streams and exits 0.
    """
    if not token:
        raise click.UsageError(
            f"no publish token: set {TOKEN_ENV} (or pass --token TOKEN) to a long random "
            "secret, for example\n"
            f"  export {TOKEN_ENV}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if not _TOKEN_PATTERN.fullmatch(token):
        raise click.UsageError(
            f"the publish token ({TOKEN_ENV} or --token) must be printable ASCII without spaces"
        )
    from .auth import validate_pattern

    for pattern in presence:
        try:
            validate_pattern(pattern)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--presence") from exc
    options = HubOptions(
        presence=tuple(dict.fromkeys(presence)),
        token=token,
        host=host,
        port=port,
        history=history,
        heartbeat=heartbeat,
        retry=retry,
        drain=drain,
        cors_origins=tuple(dict.fromkeys(cors_origins)),
        max_connections=max_connections,
        max_connections_per_address=max_connections_per_address or None,
        stream_rate=stream_rate,
        publish_rate=publish_rate,
        max_channels_per_stream=max_channels_per_stream or None,
        max_body_size=max_body_size,
        max_buffer_size=max_buffer_size,
        processes=processes,
        redis=redis_url,
        redis_durable=redis_durable,
        xheaders=xheaders,
        idle_connection_timeout=idle_connection_timeout,
        max_idle_connections=max_idle_connections or None,
        log_level=log_level.lower(),
        log_json=log_json,
        public_channels=tuple(dict.fromkeys(public_channels)),
        jwt_secret=jwt_secret or None,
        jwt_public_key=jwt_public_key.read_bytes() if jwt_public_key is not None else None,
        jwt_audience=jwt_audience,
        jwt_issuer=jwt_issuer,
        jwt_cookie=jwt_cookie,
        auth_url=auth_url,
        metrics_public=metrics_public,
    )
    if options.jwt_secret is not None and options.jwt_public_key is not None:
        raise click.UsageError("give one of --jwt-secret and --jwt-public-key, not both")
    try:
        options.access()
    except InvalidKeyError as exc:
        flag = "--jwt-secret" if options.jwt_secret is not None else "--jwt-public-key"
        raise click.BadParameter(str(exc), param_hint=f"'{flag}'") from exc
    except ImportError:
        require_module("jwt", "--jwt-secret/--jwt-public-key", "pip install 'tornado-sse[jwt]'")
        raise
    serve(options)
