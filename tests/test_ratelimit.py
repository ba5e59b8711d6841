"""`tornado_sse.ratelimit`: the token bucket, its expiry and bound, rate specs, address keys.

The clock is passed in (``now=``), so nothing here sleeps; a property test (hypothesis) checks
the bucket against its definition for arbitrary request times.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tornado_sse import InvalidRateError, RateLimiter
from tornado_sse.ratelimit import address_key, parse_rate


def test_burst_then_rate() -> None:
    limiter = RateLimiter(2.0, burst=3)
    assert [limiter.take("a", 10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", 10.0) == pytest.approx(0.5)
    assert limiter.take("a", 10.25) == pytest.approx(0.25)  # a refusal spends nothing
    assert limiter.take("a", 10.5) == 0.0
    assert limiter.take("a", 10.5) == pytest.approx(0.5)
    assert limiter.take("a", 12.0) == 0.0  # refilled: 1.5 s at 2/s, capped at the burst
    assert limiter.take("a", 12.0) == 0.0
    assert limiter.take("a", 12.0) == 0.0
    assert limiter.take("a", 12.0) == pytest.approx(0.5)


def test_keys_are_independent() -> None:
    limiter = RateLimiter(1.0, burst=1)
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) == pytest.approx(1.0)
    assert limiter.take("b", 0.0) == 0.0


def test_wait_spends_nothing() -> None:
    limiter = RateLimiter(4.0, burst=1)
    assert limiter.wait("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.wait("a", 0.1) == pytest.approx(0.15)
    assert limiter.wait("a", 0.1) == pytest.approx(0.15)
    assert limiter.take("a", 0.25) == 0.0


def test_idle_buckets_expire() -> None:
    limiter = RateLimiter(10.0, burst=5)  # full again 0.5 s after its last use
    for i in range(1000):
        limiter.take(f"10.0.{i // 256}.{i % 256}", 100.0 + i * 1e-4)
    assert len(limiter) == 1000
    limiter.take("late", 100.7)
    assert len(limiter) == 1
    assert limiter.take("10.0.0.0", 100.7) == 0.0  # forgotten means full


def test_a_busy_key_is_not_expired_with_the_idle_ones() -> None:
    limiter = RateLimiter(1.0, burst=2)
    limiter.take("busy", 0.0)
    limiter.take("idle", 0.0)
    limiter.take("busy", 0.0)
    assert limiter.take("busy", 0.5) == pytest.approx(0.5)
    assert limiter.take("busy", 1.0) == 0.0
    limiter.take("other", 2.1)  # "idle" was full again at 1 s, "busy" is at 3 s
    assert len(limiter) == 2
    assert limiter.take("busy", 2.1) == 0.0
    assert limiter.take("busy", 2.1) == pytest.approx(0.9)


def test_max_keys_bounds_the_table_under_churn() -> None:
    limiter = RateLimiter(1.0, burst=60, max_keys=500)  # buckets live a minute
    for i in range(10_000):
        assert limiter.take(f"k{i}", float(i) / 1000) == 0.0
        assert len(limiter) <= 500
    assert len(limiter) == 500


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("5", (5.0, 5)),
        ("5/20", (5.0, 20)),
        (" 0.5 / 3 ", (0.5, 3)),
        ("0.2", (0.2, 1)),
        (".5/1", (0.5, 1)),
        (2.5, (2.5, 3)),
        (3, (3.0, 3)),
        ("0", None),
        ("0/10", None),
        (0, None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rate(spec: str | float | None, parsed: tuple[float, int] | None) -> None:
    assert parse_rate(spec) == parsed


@pytest.mark.parametrize(
    "spec", ["fast", "5/", "/5", "5/0", "-1", "5/2.5", "1e3", "nan", float("nan"), -1.0, True]
)
def test_parse_rate_refuses(spec: object) -> None:
    with pytest.raises(InvalidRateError):
        parse_rate(spec)  # type: ignore[arg-type]


def test_invalid_limiters() -> None:
    for args, kwargs in [
        ((0.0,), {}),
        ((math.inf,), {}),
        ((1.0,), {"burst": 0}),
        ((1.0,), {"max_keys": 0}),
    ]:
        with pytest.raises(InvalidRateError):
            RateLimiter(*args, **kwargs)  # type: ignore[arg-type]
    assert RateLimiter.parse("0") is None
    limiter = RateLimiter.parse("2/7")
    assert limiter is not None and (limiter.rate, limiter.burst) == (2.0, 7)
    assert str(limiter) == "2/7"


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::/64"),
        ("", ""),
        ("not an address", "not an address"),
    ],
)
def test_address_key(address: str, key: str) -> None:
    assert address_key(address) == key


def test_imports_no_tornado() -> None:
    code = "import sys, tornado_sse.ratelimit; assert 'tornado' not in sys.modules, sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- properties

_requests = st.lists(
    st.tuples(st.integers(0, 3), st.floats(0.0, 2.0, allow_nan=False)), min_size=1, max_size=200
)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.1, 100.0),
    burst=st.integers(1, 20),
    requests=_requests,
)
def test_property_never_more_than_burst_plus_rate(
    rate: float, burst: int, requests: list[tuple[int, float]]
) -> None:
    """In any window of length d, a key gets at most burst + rate * d tokens; a refusal names
    a wait after which a token is free; and the bucket matches a counting token bucket."""
    limiter = RateLimiter(rate, burst=burst)
    now = 0.0
    granted: dict[str, list[float]] = {}
    tokens: dict[str, tuple[float, float]] = {}  # the reference: (tokens, last refill time)
    for key_index, step in requests:
        now += step
        key = f"k{key_index}"
        level, stamp = tokens.get(key, (float(burst), now))
        level = min(float(burst), level + (now - stamp) * rate)
        wait = limiter.take(key, now)
        assert wait >= 0.0
        if wait == 0.0:
            assert level >= 1.0 - 1e-6
            level -= 1.0
            granted.setdefault(key, []).append(now)
        else:
            assert level < 1.0 + 1e-6
            assert wait == pytest.approx((1.0 - level) / rate, abs=1e-6)
            assert limiter.wait(key, now + wait + 1e-9) == 0.0
        tokens[key] = (level, now)
    for times in granted.values():
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= burst + rate * (times[j] - start) + 1e-6


@settings(max_examples=100, deadline=None)
@given(
    max_keys=st.integers(1, 50),
    steps=st.lists(st.tuples(st.integers(0, 200), st.floats(0.0, 0.5)), max_size=300),
)
def test_property_table_holds_only_recent_keys(
    max_keys: int, steps: list[tuple[int, float]]
) -> None:
    limiter = RateLimiter(4.0, burst=2, max_keys=max_keys)  # a bucket lives 0.5 s
    now = 0.0
    recent: dict[str, float] = {}
    for key_index, step in steps:
        now += step
        key = f"k{key_index}"
        granted = limiter.take(key, now) == 0.0
        recent[key] = now
        assert len(limiter) <= max_keys
        if granted:  # a take that grants drops the expired buckets; a refusal adds none
            assert len(limiter) <= sum(1 for t in recent.values() if t > now - 0.5 - 1e-9)
