"""Who may follow, publish and scrape on the hub (issue 13): the one place that decides.

Three ways to open channels, in this order for a stream:

1. **A signed token** (``--jwt-secret`` or ``--jwt-public-key``): a request carrying a token
   (``Authorization: Bearer``, ``?access_token=``, the ``--jwt-cookie`` cookie) gets the channels
   it grants (`.auth.Grants`), plus the public ones; its stream ends with ``token-expired`` at
   the token's expiry. A token that is invalid is a 401, even for public channels.
2. **Your backend** (``--auth-url``): otherwise, for a stream asking for a channel that is not
   public, the hub POSTs ``{"channels", "cookie", "authorization", "address"}`` to the URL.
   ``200 {"sub", "subscribe": [patterns], "ttl"}`` allows the channels those patterns cover
   (the answer is kept for ``ttl`` seconds per credentials: the same cookie and authorization
   header); ``401`` and ``403`` refuse with that status; anything else, a backend that does not
   answer within 2 s, or an answer we cannot read sheds the stream (it retries later) and is
   logged once per outage.
3. **Public channels** (``--public-channel PATTERN``, ``*`` for all): anyone may follow them.

Without any of the three the hub is closed: every stream gets 401 (secure by default), and the
start-up log says how to open channels (`HubAccess.describe`).

Publishing takes the master token (``--token``, compared in constant time) or a signed token
whose ``publish`` patterns cover the channel (403 otherwise); so does ``GET /presence`` with
``subscribe`` patterns. ``/metrics`` takes the master token unless ``--metrics-public``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from typing import Any

import tornado.httputil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from ..auth import (
    COOKIE,
    Grants,
    matches,
    token_expired_event,
    token_from_request,
    validate_pattern,
)
from ..errors import (
    AccessDeniedError,
    AccessUnavailableError,
    AuthenticationError,
    InvalidKeyError,
)
from ..handler import EventStreamHandler

__all__ = ["AUTH_TIMEOUT", "HubAccess"]

log = logging.getLogger("tornado_sse.server")

#: seconds the hub waits for the --auth-url backend before it sheds the stream
AUTH_TIMEOUT = 2.0
#: credentials whose --auth-url answer is kept at most (the oldest is dropped past it)
AUTH_CACHE_SIZE = 10_000
#: the longest ttl of an --auth-url answer honoured, in seconds
MAX_AUTH_TTL = 3600.0


class HubAccess:
    """The hub's access policy; see the module's docstring.

    :param master_token: the ``--token`` publishers (and scrapers) send.
    :param verifier: a `.auth.TokenVerifier` for signed tokens (``None``: tokens are not
        accepted; a request carrying one is then decided by ``auth_url`` or refused).
    :param public_channels: patterns anyone may follow.
    :param auth_url: the backend asked about streams that are not public and carry no token.
    :param cookie: the cookie holding a signed token.
    :param metrics_public: whether ``/metrics`` is open to anyone.
    :param auth_timeout: seconds to wait for ``auth_url``.
    """

    def __init__(
        self,
        *,
        master_token: str,
        verifier: Any = None,
        public_channels: Sequence[str] = (),
        auth_url: str | None = None,
        cookie: str = COOKIE,
        metrics_public: bool = False,
        auth_timeout: float = AUTH_TIMEOUT,
        http_client: AsyncHTTPClient | None = None,
    ) -> None:
        self._master = master_token.encode("utf-8")
        self.verifier = verifier
        self.public_channels = tuple(validate_pattern(p) for p in public_channels)
        self.auth_url = auth_url
        self.cookie = cookie
        self.metrics_public = metrics_public
        self.auth_timeout = auth_timeout
        self._http = http_client
        self._cache: OrderedDict[bytes, tuple[float, Grants]] = OrderedDict()
        #: true while --auth-url is failing (logged once per outage)
        self.backend_down = False

    # ------------------------------------------------------------------ start-up

    def describe(self) -> str:
        """How channels are opened, for the start-up log."""
        ways = []
        if self.verifier is not None:
            ways.append(f"signed tokens ({'/'.join(self.verifier.algorithms)})")
        if self.auth_url is not None:
            ways.append("the --auth-url backend")
        if self.public_channels:
            ways.append("public channels " + " ".join(self.public_channels))
        if not ways:
            return (
                "no channel is open: every stream gets 401. Open channels with"
                " --public-channel PATTERN ('*' for all), --jwt-secret/--jwt-public-key"
                " (signed tokens) or --auth-url URL"
            )
        return "channels are opened by " + ", ".join(ways)

    # ------------------------------------------------------------------ checks

    def is_public(self, channel: str) -> bool:
        """Whether anyone may follow *channel*."""
        return any(matches(pattern, channel) for pattern in self.public_channels)

    def is_master(self, request: tornado.httputil.HTTPServerRequest) -> bool:
        """Whether *request* carries the master token as ``Authorization: Bearer``."""
        scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = credentials.strip().encode("latin-1", "replace")
        return hmac.compare_digest(presented, self._master)

    def authorize_subscribe(
        self, handler: EventStreamHandler, channels: Sequence[str]
    ) -> Grants | Awaitable[Grants] | None:
        """Allow the stream of *handler* to follow *channels*, or raise.

        Returns the grants it was allowed by (``None``: public channels only), or, when the
        ``--auth-url`` backend must be asked, an awaitable of them (which raises instead). Only
        that case suspends: a token or public channels are decided at once, with no coroutine
        (issue 15, item 2).

        :raises AuthenticationError: 401: no credentials where they are needed, or a bad token.
        :raises AccessDeniedError: 403 naming the first channel not granted.
        :raises AccessUnavailableError: ``--auth-url`` cannot answer now (the stream is shed).
        """
        request = handler.request
        token = token_from_request(request, self.cookie) if self.verifier is not None else None
        if token is not None:
            grants: Grants = self.verifier.verify(token)
            self._check(grants, channels)
            if grants.expires is not None:
                handler.close_at(grants.expires, token_expired_event(grants))
            return grants
        private = [channel for channel in channels if not self.is_public(channel)]
        if not private:
            return None
        if self.auth_url is not None:
            return self._authorize_by_backend(request, channels)
        if self.verifier is not None:
            raise AuthenticationError("a token is required", error=None)
        raise AuthenticationError(
            f"channel {private[0]!r} is not public and this hub takes no tokens", error=None
        )

    def authorize_publisher(self, request: tornado.httputil.HTTPServerRequest) -> Grants | None:
        """Who publishes: ``None`` for the master token, else the grants of a signed token
        (see `authorize_publish` for the channel).

        :raises AuthenticationError: 401: neither the master token nor a valid signed token.
        """
        if self.is_master(request):
            return None
        if self.verifier is not None:
            token = token_from_request(request, cookie=None)
            if token is not None:
                return self.verifier.verify(token)  # type: ignore[no-any-return]
        raise AuthenticationError(
            "missing or wrong token: send 'Authorization: Bearer TOKEN'",
            error="invalid_token" if "Authorization" in request.headers else None,
        )

    @staticmethod
    def authorize_publish(grants: Grants | None, channel: str) -> None:
        """Raise `.AccessDeniedError` (403) unless *grants* (``None``: the master token) may
        publish to *channel*."""
        if grants is not None:
            grants.check_publish(channel)

    def authorize_presence(self, request: tornado.httputil.HTTPServerRequest, channel: str) -> None:
        """Allow ``GET /presence?channel=C`` (issue 14): the master token, or a signed token
        whose ``subscribe`` patterns cover *channel* (who may follow a channel may see who
        follows it). Public channels are no exception: presence names users.

        :raises AuthenticationError: 401: neither the master token nor a valid signed token.
        :raises AccessDeniedError: 403: a valid token that does not cover *channel*.
        """
        if self.is_master(request):
            return
        token = token_from_request(request, cookie=None) if self.verifier is not None else None
        if token is None:
            raise AuthenticationError(
                "/presence needs the hub's token or a signed token granting the channel:"
                " send 'Authorization: Bearer TOKEN'",
                error="invalid_token" if "Authorization" in request.headers else None,
            )
        grants: Grants = self.verifier.verify(token)
        if not grants.may_subscribe(channel):
            raise AccessDeniedError(channel)

    def authorize_scrape(self, request: tornado.httputil.HTTPServerRequest) -> None:
        """Allow ``GET /metrics``: the master token, or anyone with ``--metrics-public``.

        :raises AuthenticationError: 401.
        """
        if self.metrics_public or self.is_master(request):
            return
        raise AuthenticationError(
            "/metrics needs the hub's token: send 'Authorization: Bearer TOKEN'"
            " (or start the hub with --metrics-public)",
            error="invalid_token" if "Authorization" in request.headers else None,
        )

    def _check(self, grants: Grants, channels: Sequence[str]) -> None:
        for channel in dict.fromkeys(channels):
            if not (grants.may_subscribe(channel) or self.is_public(channel)):
                raise AccessDeniedError(channel)

    # ------------------------------------------------------------------ --auth-url

    async def _authorize_by_backend(
        self, request: tornado.httputil.HTTPServerRequest, channels: Sequence[str]
    ) -> Grants:
        grants = await self._ask_backend(request, list(channels))
        self._check(grants, channels)
        return grants

    async def _ask_backend(
        self, request: tornado.httputil.HTTPServerRequest, channels: list[str]
    ) -> Grants:
        cookie = request.headers.get("Cookie")
        authorization = request.headers.get("Authorization")
        key = hashlib.sha256(
            json.dumps([cookie, authorization]).encode("utf-8", "surrogateescape")
        ).digest()
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._cache[key]
        body = {
            "channels": channels,
            "cookie": cookie,
            "authorization": authorization,
            "address": request.remote_ip,
        }
        assert self.auth_url is not None
        if self._http is None:
            self._http = AsyncHTTPClient()
        try:
            response = await self._http.fetch(
                HTTPRequest(
                    self.auth_url,
                    method="POST",
                    headers={"Content-Type": "application/json"},
                    body=json.dumps(body),
                    connect_timeout=self.auth_timeout,
                    request_timeout=self.auth_timeout,
                    follow_redirects=False,
                ),
                raise_error=False,
            )
        except (OSError, HTTPClientError) as exc:
            raise self._outage(f"unreachable ({exc})") from exc
        if response.code in (401, 403):
            self._recovered()
            message = "refused by the hub's auth backend"
            if response.code == 401:
                raise AuthenticationError(message, error=None)
            raise AccessDeniedError(channels[0], message=f"{message} for these channels")
        if response.code != 200:
            if response.code == 599:  # Tornado's code for no answer: refused, reset, timed out
                raise self._outage(f"did not answer ({response.error})", response.error)
            raise self._outage(f"answered HTTP {response.code}", response.error)
        try:
            grants, ttl = _parse_answer(response.body)
        except ValueError as exc:
            raise self._outage(f"answered 200 with {exc}") from exc
        self._recovered()
        if ttl > 0:
            self._cache[key] = (now + ttl, grants)
            while len(self._cache) > AUTH_CACHE_SIZE:
                self._cache.popitem(last=False)
        return grants

    def _outage(self, reason: str, cause: BaseException | None = None) -> AccessUnavailableError:
        if not self.backend_down:
            self.backend_down = True
            log.warning("auth backend %s: %s; shedding streams until it answers", self.url, reason)
        error = AccessUnavailableError(f"auth backend {reason}")
        error.__cause__ = cause
        return error

    def _recovered(self) -> None:
        if self.backend_down:
            self.backend_down = False
            log.info("auth backend %s answers again", self.url)

    @property
    def url(self) -> str:
        """The ``--auth-url`` without its query (which may hold credentials), for logs."""
        return (self.auth_url or "").partition("?")[0]


def _parse_answer(body: bytes) -> tuple[Grants, float]:
    """The grants and ttl of an --auth-url ``200``; ValueError says what is wrong."""
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError("a body that is not JSON") from exc
    if not isinstance(answer, dict):
        raise ValueError("JSON that is not an object")
    subscribe = answer.get("subscribe", [])
    if not isinstance(subscribe, list):
        raise ValueError('a "subscribe" that is not a list')
    try:
        patterns = tuple(validate_pattern(p) for p in subscribe)
    except InvalidKeyError as exc:
        raise ValueError(str(exc)) from exc
    subject = answer.get("sub")
    if subject is not None and not isinstance(subject, str):
        raise ValueError('a "sub" that is not a string')
    ttl = answer.get("ttl", 0)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 <= ttl < float("inf"):
        raise ValueError('a "ttl" that is not a number of seconds')
    return Grants(subject=subject, subscribe=patterns, claims=answer), min(float(ttl), MAX_AUTH_TTL)
