"""The hub's rate limits (issue 20): new streams per client address, publishes per credential.

Counting open streams (``--max-connections-per-address``) does not stop a client that opens
and closes streams in a loop, nor a publisher that floods a channel. Two token buckets
(`.RateLimiter`) do, one per worker process each:

* ``--stream-rate RATE[/BURST]`` (default ``10/100``): new streams per client address (IPv6 per
  /64, `.ratelimit.address_key`), resumes included. Over it the stream is *shed* by the core
  handler (``sse_stream_rate``): ``200`` with a ``retry:`` no shorter than the wait for a token,
  jittered, and ``Retry-After``. Never ``429`` or ``503``: a browser's EventSource gives up for
  good after those, and a shed resume loses nothing (the next attempt resumes from the same id).
  On by default because a hub faces browsers directly: 100 streams at once from one address
  (as many as ``--max-connections-per-address`` lets it hold), then 10 a second, is more than a
  reconnect storm of one office needs and far less than a loop can open.
* ``--publish-rate RATE[/BURST]`` (default off): publishes per credential: the master token is
  one credential, a signed token's ``sub`` another, a signed token without ``sub`` is counted
  per client address. Over it: ``429`` with ``Retry-After`` and a JSON body
  ``{"error": ..., "retry_after": seconds}``; ``tornado-sse publish`` waits and tries again.
  Off by default because the master token is the operator's own backend, whose bursts are the
  hub's purpose; set it when tokens that publish are handed to browsers or tenants.

The client address is the peer's, or with ``--xheaders`` the one the reverse proxy puts in
``X-Real-Ip`` / ``X-Forwarded-For``. Pass ``--xheaders`` only behind a proxy that overwrites those
headers, and make the hub reachable only through it: otherwise a client sends its own header,
takes a fresh address per request, and goes around every per-address limit (docs/serve.md,
"Rate limits").
"""

from __future__ import annotations

import math
from typing import Any

import click

from ..errors import InvalidRateError
from ..metrics import Metrics
from ..ratelimit import RateLimiter, address_key, parse_rate

__all__ = [
    "DEFAULT_PUBLISH_RATE",
    "DEFAULT_STREAM_RATE",
    "RateType",
    "publish_key",
    "retry_after_header",
]

#: the default of ``--stream-rate``: 100 new streams at once per address, then 10 per second
DEFAULT_STREAM_RATE = "10/100"
#: the default of ``--publish-rate``: no limit
DEFAULT_PUBLISH_RATE = "0"


class RateType(click.ParamType):  # type: ignore[type-arg]
    """A ``RATE[/BURST]`` flag: its normalised text (``"5/20"``), or ``None`` for ``0`` (off)."""

    name = "RATE[/BURST]"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> str | None:
        if value is None:
            return None
        try:
            parsed = parse_rate(value)
        except InvalidRateError as exc:
            self.fail(str(exc), param, ctx)
        if parsed is None:
            return None
        return f"{parsed[0]:g}/{parsed[1]}"


def make_limiter(spec: str | None, name: str, metrics: Metrics) -> RateLimiter | None:
    """The limiter of a ``RATE[/BURST]`` option (``None``: off), reported in *metrics* as
    ``tornado_sse_rate_limit_keys{limit=name}``."""
    limiter = RateLimiter.parse(spec) if spec is not None else None
    if limiter is not None:
        metrics.add_limiter(name, limiter)
    return limiter


def publish_key(grants: Any, address: str) -> str:
    """Whose publish bucket a request spends from: ``"token"`` for the master token (*grants*
    ``None``), ``"sub:<sub>"`` for a signed token with a subject, else the client address."""
    if grants is None:
        return "token"
    subject = getattr(grants, "subject", None)
    if isinstance(subject, str) and subject:
        return "sub:" + subject
    return "address:" + address_key(address)


def retry_after_header(wait: float) -> str:
    """A ``Retry-After`` value for a wait of *wait* seconds: whole seconds, rounded up, >= 1."""
    return str(max(1, math.ceil(wait)))
