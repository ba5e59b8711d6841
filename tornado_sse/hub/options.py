"""The ``tornado-sse serve`` command: its flags, checked at parse time, as one `HubOptions`."""

from __future__ import annotations

import dataclasses
import math
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..broker.cluster import DEFAULT_SHARDS, SLOTS
from ..cli import HostName, RedisUrl, require_module
from ..errors import (
    InvalidKeyError,
)
from .access import HubAccess
from .limits import (
    DEFAULT_PUBLISH_RATE,
    DEFAULT_STREAM_RATE,
    RateType,
)

#: the environment variable holding the publish token
TOKEN_ENV = "TORNADO_SSE_TOKEN"  # noqa: S105 (a variable name, not a secret)


#: the environment variable holding the HMAC secret of signed tokens (as for ``tornado-sse token``)
JWT_SECRET_ENV = "TORNADO_SSE_JWT_SECRET"  # noqa: S105 (a variable name, not a secret)


#: ``--drain``'s default: seconds over which SIGTERM closes the streams
DEFAULT_DRAIN = 2.0
#: the longest ``--presence-grace`` (the bridge hub keeps at most an hour too)
MAX_PRESENCE_GRACE = 3600.0


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
    :param redis: Redis URL (``--redis``, Redis backend); ``None``: in-process broker. With
        several ``--redis``, the first of them.
    :param redis_shards: every URL when ``--redis`` is given more than once: channels are
        sharded over those Redis servers (`.ShardedBroker`, in this order); else empty.
    :param redis_cluster: the URL of any node of a Redis Cluster (``--redis-cluster``): channels
        are sharded over ``redis_cluster_shards`` slots of it (`.cluster.cluster_broker`).
    :param redis_cluster_nodes: the URLs of more nodes (``--redis-cluster`` repeated), asked
        when the first does not answer.
    :param redis_cluster_shards: shards on the cluster (``--redis-cluster-shards``, default 12).
    :param redis_durable: declare that Redis never loses an acknowledged write
        (``--redis-durable``; `RedisBroker`'s ``durable``).
    :param idle_connection_timeout: seconds a non-stream connection may take to send a request's
        head (keep-alive connections between requests included).
    :param max_idle_connections: non-stream connections without a request kept at most (the one
        idle for longest is closed past it); ``None``: no bound.
    :param stream_rate: new streams per client address, ``"RATE[/BURST]"`` (`.hub.limits`);
        ``None``: no limit.
    :param publish_rate: publishes per credential, ``"RATE[/BURST]"``; ``None``: no limit.
    :param log_flood_limit: lines a second of each kind logged at most below warnings
        (``--log-flood-limit``, `.hub.logs.FloodFilter`); ``None``: every line.
    :param presence: channel patterns with join/leave events on ``presence:<channel>``
        (``--presence``; the setting ``sse_presence``).
    :param presence_grace: seconds a ``leave`` waits for the user to come back
        (``--presence-grace``; the setting ``sse_presence_grace``).
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
    redis_shards: tuple[str, ...] = ()
    redis_cluster: str | None = None
    redis_cluster_nodes: tuple[str, ...] = ()
    redis_cluster_shards: int = DEFAULT_SHARDS
    redis_durable: bool = False
    xheaders: bool = False
    stream_rate: str | None = DEFAULT_STREAM_RATE
    publish_rate: str | None = None
    idle_connection_timeout: float = 20.0
    max_idle_connections: int | None = 1000
    log_level: str = "info"
    log_json: bool = False
    log_flood_limit: int | None = 100
    presence: tuple[str, ...] = ()
    presence_grace: float = 3.0
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
            from ..auth import TokenVerifier

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
    from ..auth import validate_pattern

    try:
        return tuple(validate_pattern(value) for value in values)
    except InvalidKeyError as exc:
        raise click.BadParameter(str(exc)) from exc


def _http_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from ..client import validate_url

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
    "--presence-grace",
    type=click.FloatRange(0, MAX_PRESENCE_GRACE),
    default=3.0,
    show_default=True,
    metavar="SECONDS",
    help="How long a --presence leave waits for the user to come back: a reconnect within it "
    "is no leave and join. 0: a lost connection is a leave at once.",
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
    multiple=True,
    help="Redis URL (redis://host:6379/0): several hubs on several machines act as one. "
    "Repeat it to shard the channels over several Redis servers (every hub and publisher "
    "must list the same URLs in the same order).",
)
@click.option(
    "--redis-cluster",
    "redis_cluster",
    type=RedisUrl(),
    multiple=True,
    help="URL of any node of a Redis Cluster (redis://host:7000): the channels are sharded "
    "over its primaries, each shard one hash slot. Repeat it to name more nodes, asked in "
    "turn when one does not answer. Not with --redis.",
)
@click.option(
    "--redis-cluster-shards",
    type=click.IntRange(min=1, max=SLOTS),
    metavar="K",
    help=f"Shards on the --redis-cluster (default {DEFAULT_SHARDS}); every hub and publisher "
    "must use the same K. A multiple of the number of primaries spreads them evenly.",
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
    "--log-flood-limit",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    metavar="LINES",
    help="Lines a second of each kind written at most below warnings (stream open, stream "
    "closed, access); the rest are counted in one line a second. 0: every line.",
)
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
    presence_grace: float,
    max_connections: int | None,
    max_connections_per_address: int,
    stream_rate: str | None,
    publish_rate: str | None,
    max_channels_per_stream: int,
    max_body_size: int,
    max_buffer_size: int,
    processes: int,
    redis_url: tuple[str, ...],
    redis_cluster: tuple[str, ...],
    redis_cluster_shards: int | None,
    redis_durable: bool,
    idle_connection_timeout: float,
    max_idle_connections: int,
    xheaders: bool,
    log_level: str,
    log_json: bool,
    log_flood_limit: int,
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
    from ..auth import validate_pattern

    for pattern in presence:
        try:
            validate_pattern(pattern)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--presence") from exc
    if not math.isfinite(presence_grace):
        raise click.BadParameter(
            f"{presence_grace!r} is not a number of seconds", param_hint="'--presence-grace'"
        )
    if len(set(redis_url)) != len(redis_url):
        raise click.BadParameter("the same Redis URL is given twice", param_hint="'--redis'")
    if redis_cluster:
        if redis_url:
            raise click.BadParameter(
                "give either --redis or --redis-cluster", param_hint="'--redis-cluster'"
            )
        for url in redis_cluster:
            if not url.lower().startswith(("redis://", "rediss://")):
                raise click.BadParameter(
                    "a cluster node is reached by redis:// or rediss://",
                    param_hint="'--redis-cluster'",
                )
    elif redis_cluster_shards is not None:
        raise click.BadParameter("needs --redis-cluster", param_hint="'--redis-cluster-shards'")
    options = HubOptions(
        presence=tuple(dict.fromkeys(presence)),
        presence_grace=presence_grace,
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
        redis=redis_url[0] if redis_url else None,
        redis_shards=redis_url if len(redis_url) > 1 else (),
        redis_cluster=redis_cluster[0] if redis_cluster else None,
        redis_cluster_nodes=tuple(dict.fromkeys(redis_cluster[1:])),
        redis_cluster_shards=redis_cluster_shards or DEFAULT_SHARDS,
        redis_durable=redis_durable,
        xheaders=xheaders,
        idle_connection_timeout=idle_connection_timeout,
        max_idle_connections=max_idle_connections or None,
        log_level=log_level.lower(),
        log_json=log_json,
        log_flood_limit=log_flood_limit or None,
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
    from .run import serve

    serve(options)
