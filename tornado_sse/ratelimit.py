"""Token buckets: how often one key (a client address, a credential) may start something.

`RateLimiter` keeps one bucket per key: *burst* tokens at most, refilled at *rate* per second;
starting something spends a token, and with none left the caller is told how long until one is
free. The handler uses it for new streams per client address (``sse_stream_rate``), the hub for
those and for publishes per credential (issue 20), the chat demo for messages.

Deliberate choices:

* **One float per key, no timer.** A bucket is kept as the time at which it will be full again
  (the "theoretical arrival time" of GCRA, the generic cell rate algorithm, ITU-T I.371): taking
  a token moves it ``1 / rate`` later, and a token is free while it is at most
  ``(burst - 1) / rate`` ahead of now. This is the same token bucket as counting tokens and
  refilling them, in one number, and nothing runs between requests.
* **Idle buckets expire.** A bucket whose full-again time has passed is the same as no bucket
  at all, so it is dropped. Keys are kept in the order they were last used and every take drops
  the expired ones from the old end: the table holds only the keys used within the last
  ``burst / rate`` seconds (amortised O(1) per take), however many addresses come and go.
* **A hard bound on memory besides.** Past *max_keys* live buckets the least recently used is
  forgotten: that key starts again with a full bucket. The bound is on memory; forgetting is
  lenient by design (the alternative, refusing every new key, would let churn lock everyone out).
* **A monotonic clock** (`time.monotonic`): a step of the wall clock neither refills nor drains
  a bucket.
* **Addresses, not sockets** (`address_key`): an IPv6 client usually holds a whole /64, so IPv6
  addresses are limited per /64 network, and an IPv4-mapped IPv6 address counts as its IPv4
  address. Behind a reverse proxy the address is the proxy's unless the application trusts the
  proxy's header (Tornado's ``xheaders``; the hub's ``--xheaders``): see docs/serve.md.

Nothing here does I/O or imports Tornado.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections import OrderedDict

from .errors import InvalidRateError

__all__ = ["RateLimiter", "address_key", "parse_rate"]

#: live buckets a limiter keeps at most unless told otherwise (about 120 bytes each with their
#: keys: bench/ratelimit_cost.py)
DEFAULT_MAX_KEYS = 100_000

_SPEC = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:/\s*([0-9]+)\s*)?")


def parse_rate(spec: str | float | int | None) -> tuple[float, int] | None:
    """``"RATE[/BURST]"`` (or a number, the rate) as ``(rate, burst)``; ``None`` when off.

    *RATE* is per second, *BURST* how many may start at once (default: the rate rounded up, at
    least 1). ``"0"``, ``0``, ``""`` and ``None`` mean no limit.

    :raises InvalidRateError: for anything else, or a burst of 0 with a rate.
    """
    if spec is None or spec == "":
        return None
    if isinstance(spec, bool):
        raise InvalidRateError(f"not a rate: {spec!r} (give RATE[/BURST], e.g. 5/20)")
    if isinstance(spec, (int, float)):
        rate, burst_text = float(spec), None
        if not math.isfinite(rate) or rate < 0:
            raise InvalidRateError(f"a rate is a finite number >= 0, not {spec!r}")
    else:
        match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
        if match is None:
            raise InvalidRateError(
                f"not a rate: {spec!r} (give RATE[/BURST] per second, e.g. 5/20; 0 for no limit)"
            )
        rate, burst_text = float(match.group(1)), match.group(2)
    if rate == 0:
        return None
    burst = int(burst_text) if burst_text is not None else max(1, math.ceil(rate))
    if burst < 1:
        raise InvalidRateError(f"a burst is at least 1, not {burst} (in {spec!r})")
    return rate, burst


def address_key(address: str) -> str:
    """The key a client address is limited under: the address itself for IPv4 (an IPv4-mapped
    IPv6 address included), its /64 network for IPv6, anything else (a unix socket's ``""``)
    as given."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class RateLimiter:
    """Token buckets by key: *burst* tokens each, refilled at *rate* per second.

    ::

        limiter = RateLimiter(2.0, burst=10)        # or RateLimiter.parse("2/10")
        wait = limiter.take(address_key(request.remote_ip))
        if wait:                                     # no token: try again in *wait* seconds
            ...

    :param rate: tokens added per second (> 0).
    :param burst: tokens a bucket holds at most (>= 1); default: the rate rounded up.
    :param max_keys: live buckets kept at most; past it the least recently used is forgotten.

    For the event loop's thread (or one thread) only: it takes no lock.
    """

    __slots__ = ("_interval", "_span", "_tats", "_tolerance", "burst", "max_keys", "rate")

    def __init__(
        self, rate: float, burst: int | None = None, *, max_keys: int = DEFAULT_MAX_KEYS
    ) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise InvalidRateError(f"a rate is a finite number > 0, not {rate!r}")
        if burst is None:
            burst = max(1, math.ceil(rate))
        if burst < 1:
            raise InvalidRateError(f"a burst is at least 1, not {burst!r}")
        if max_keys < 1:
            raise InvalidRateError(f"max_keys is at least 1, not {max_keys!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self.max_keys = max_keys
        self._interval = 1.0 / self.rate
        self._tolerance = (self.burst - 1) * self._interval
        self._span = self.burst * self._interval
        self._tats: OrderedDict[str, float] = OrderedDict()

    @classmethod
    def parse(cls, spec: str | float, *, max_keys: int = DEFAULT_MAX_KEYS) -> RateLimiter | None:
        """A limiter for ``"RATE[/BURST]"`` (`parse_rate`), or ``None`` for ``"0"`` (no limit)."""
        parsed = parse_rate(spec)
        if parsed is None:
            return None
        return cls(parsed[0], parsed[1], max_keys=max_keys)

    def take(self, key: str, now: float | None = None) -> float:
        """Spend a token of *key*'s bucket and return ``0.0``; or, when it has none, spend
        nothing and return the seconds until it has one (always > 0).

        :param now: a `time.monotonic` reading (default: now).
        """
        if now is None:
            now = time.monotonic()
        tats = self._tats
        tat = tats.get(key)
        if tat is None:
            tat = now
        else:
            tats.move_to_end(key)
            wait = tat - now - self._tolerance
            if wait > 0:
                return wait
            tat = max(tat, now)
        tats[key] = tat + self._interval
        self._expire(now)
        return 0.0

    def wait(self, key: str, now: float | None = None) -> float:
        """The seconds until *key* has a token (``0.0``: it has one now); spends nothing."""
        if now is None:
            now = time.monotonic()
        tat = self._tats.get(key)
        if tat is None:
            return 0.0
        return max(0.0, tat - now - self._tolerance)

    def _expire(self, now: float) -> None:
        tats = self._tats
        while tats:
            oldest = next(iter(tats.values()))
            if oldest > now and len(tats) <= self.max_keys:
                return
            tats.popitem(last=False)

    def __len__(self) -> int:
        """Live buckets (keys used within the last ``burst / rate`` seconds, at most
        *max_keys*)."""
        return len(self._tats)

    def __repr__(self) -> str:
        return f"RateLimiter({self.rate:g}, burst={self.burst}, keys={len(self)})"

    def __str__(self) -> str:
        return f"{self.rate:g}/{self.burst}"
