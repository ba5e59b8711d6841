"""What a rate limit costs a new stream, and what its bucket table weighs (issue 20).

`tornado_sse.RateLimiter.take` runs once per new stream (``sse_stream_rate``, the hub's
``--stream-rate``) and once per publish (``--publish-rate``). Measured here, in this process:

``hot``
    one key taking over and over (a client reconnecting in a loop): nanoseconds per take;
``churn``
    every take from a new key (addresses coming and going), with expiry dropping old buckets as
    it goes: nanoseconds per take, and the table's size at the end;
``memory``
    bytes per live bucket, from ``tracemalloc``, with *keys* buckets alive at once (keys shaped
    like IPv4 addresses), and with ``max_keys`` holding the table at a tenth of that.

Run::

    python -m tornado_sse.bench.ratelimit_cost --takes 200000 --keys 100000 --out ratelimit.json
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

from tornado_sse import RateLimiter


def _address(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


def hot(takes: int) -> dict[str, Any]:
    limiter = RateLimiter(1e9, burst=1_000_000_000)
    clock = 0.0
    started = time.perf_counter()
    for _ in range(takes):
        clock += 1e-6
        limiter.take("192.0.2.1", clock)
    elapsed = time.perf_counter() - started
    return {"takes": takes, "ns_per_take": round(elapsed / takes * 1e9, 1)}


def churn(takes: int) -> dict[str, Any]:
    limiter = RateLimiter(100.0, burst=10)  # a bucket that took one token is full 10 ms later
    keys = [_address(i) for i in range(takes)]
    clock = 0.0
    started = time.perf_counter()
    for key in keys:
        clock += 1e-4  # 10,000 new addresses a second: about 100 alive at a time
        limiter.take(key, clock)
    elapsed = time.perf_counter() - started
    return {
        "takes": takes,
        "ns_per_take": round(elapsed / takes * 1e9, 1),
        "table_at_end": len(limiter),
    }


def memory(keys: int) -> dict[str, Any]:
    names = [_address(i) for i in range(keys)]  # the keys exist anyway (the request holds one)
    out: dict[str, Any] = {"keys": keys}
    for label, max_keys in (("unbounded", keys), ("max_keys_tenth", max(1, keys // 10))):
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        limiter = RateLimiter(1.0, burst=60, max_keys=max_keys)  # full again after 1 s
        for i, key in enumerate(names):
            limiter.take(key, i * 1e-6)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        out[label] = {
            "table": len(limiter),
            "bytes": used,
            "bytes_per_bucket": round(used / len(limiter), 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--takes", type=int, default=200_000, help="takes per timing run")
    parser.add_argument("--keys", type=int, default=100_000, help="live buckets for memory")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.takes < 1 or args.keys < 10:
        parser.error("--takes must be at least 1 and --keys at least 10")
    results = {"hot": hot(args.takes), "churn": churn(args.takes), "memory": memory(args.keys)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
