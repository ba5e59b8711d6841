"""The hub as a Tornado application: ``/events``, ``/publish``, ``/healthz``, ``/metrics``."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable
from typing import Any

import tornado.web

from ..auth import Grants
from ..broker.base import Broker
from ..broker.presence import described, matches_any
from ..connections import ConnectionSet
from ..errors import (
    AccessDeniedError,
    AuthenticationError,
    BrokerError,
    EventTooLargeError,
    InvalidEventError,
)
from ..handler import EventStreamHandler
from ..metrics import Metrics
from ..publish import PublishError, parse_publish
from ..script import client_script_route
from .limits import (
    make_limiter,
    publish_key,
    retry_after_header,
)
from .logs import _log_request
from .options import HubOptions
from .presence import PresenceHandler

log = logging.getLogger("tornado_sse.server")


#: a refused body is read and discarded up to this many bytes past the limit before the answer
DRAIN_ALLOWANCE = 4 << 20


class HubState:
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
        if (
            collect is None
            or self.options.processes < 2
            or self.options.redis is not None
            or self.options.redis_cluster is not None
        ):
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

    hub: HubState

    def initialize(self, hub: HubState) -> None:
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
    access policy (`.hub.access`) decides, once the channels are known to be valid. A
    companion channel of ``--presence`` (``presence:<channel>``) is decided as the channel it
    describes. The stream's identity is the ``sub`` of the credential that allowed it."""

    _requested: list[str] = []
    _access_checked = False
    _grants: Grants | None = None

    def get_channels(self) -> list[str]:
        self._requested = self.query_values("channel")
        return self._requested

    def check_channel(self, channel: str) -> bool | Awaitable[bool]:
        if self._access_checked:
            return True
        self._access_checked = True
        hub: HubState = self.settings["tornado_sse_hub"]
        patterns = self.presence_patterns
        asked = self._requested
        if patterns:
            asked = []
            for requested in self._requested:
                of = described(requested)
                asked.append(of if of is not None and matches_any(patterns, of) else requested)
        grants = hub.access.authorize_subscribe(self, asked)
        if isinstance(grants, Awaitable):  # the --auth-url backend is asked
            return self._granted(grants)
        self._grants = grants
        return True

    async def _granted(self, grants: Awaitable[Grants]) -> bool:
        self._grants = await grants
        return True

    def get_identity(self) -> str | None:
        """The ``sub`` of the signed token or of the ``--auth-url`` answer that allowed the
        stream; ``None`` for a stream of public channels without credentials (issue 14)."""
        return self._grants.subject if self._grants is not None else None

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
    hub = HubState(options, broker, connections, metrics)
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
        sse_presence_grace=options.presence_grace,
    )
