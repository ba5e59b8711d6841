"""The hub's rate limits (issue 20) against a real ``tornado-sse serve`` process.

Clients come from distinct real addresses: each raw client binds its socket to its own address
of 127.0.0.0/8 (all of it is local on Linux). The shed EventSource is Debian's Chromium.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import require
from tests.helpers import RawStream
from tests.test_server import AUTH, TOKEN, Hub, start_hub

TIMEOUT = 30


async def _open(hub: Hub, source: str, headers: dict[str, str] | None = None) -> RawStream:
    return await RawStream.open(hub.port, "/events?channel=r", headers=headers, source=source)


async def _admitted(hub: Hub, source: str) -> bool:
    """Open a stream from *source* and close it: true if admitted, false if shed."""
    stream = await _open(hub, source)
    try:
        await stream.read_until(lambda s: s.parser.last_event_id != "" or s.ended)
        if stream.parser.last_event_id != "":
            return True
        await stream.read_to_end()
        assert stream.events == [] and "retry-after" in stream.headers
        return False
    finally:
        stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_client_opening_streams_in_a_loop_is_slowed_to_the_rate(tmp_path: Path) -> None:
    # --drain 0: stopped with its streams open, it waited out the default 2 s window
    hub = start_hub(tmp_path / "hub.log", "--stream-rate", "4/5", "--retry", "500", "--drain", "0")
    try:
        started = time.monotonic()
        results = [await _admitted(hub, "127.0.0.2") for _ in range(40)]
        elapsed = time.monotonic() - started
        admitted = sum(results)
        assert results[:5] == [True] * 5  # the burst
        assert admitted <= 5 + 4 * elapsed + 1  # then the rate, however long the loop took
        assert admitted < 40
        # another address is not slowed at all
        assert [await _admitted(hub, "127.0.0.3") for _ in range(5)] == [True] * 5
        metrics = hub.metrics()
        shed = 40 - admitted
        assert metrics["tornado_sse_streams_shed_total{reason=rate}"] == shed
        assert metrics["tornado_sse_connections_shed_total"] == shed
        assert metrics["tornado_sse_rate_limit_keys{limit=stream}"] == 2
        assert "stream_rate=4/5" in hub.log()
    finally:
        hub.stop()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_shed_stream_is_told_to_wait_for_its_token(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub.log", "--stream-rate", "0.2/1", "--retry", "500")
    try:
        assert await _admitted(hub, "127.0.0.4")
        shed = await _open(hub, "127.0.0.4", headers={"Last-Event-ID": "x"})
        await shed.read_to_end()
        shed.close()
        assert shed.status == 200 and shed.events == []
        # the next token is 5 s away: retry: (jittered up to +50 %) and Retry-After say so
        assert shed.parser.retry is not None and 4_500 <= shed.parser.retry <= 7_500
        assert int(shed.headers["retry-after"]) * 1000 >= shed.parser.retry
        assert int(shed.headers["retry-after"]) <= 8
    finally:
        hub.stop()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_stream_rate_off(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub.log", "--stream-rate", "0", "--drain", "0")
    try:
        assert all([await _admitted(hub, "127.0.0.5") for _ in range(30)])
        assert "stream_rate=unlimited" in hub.log()
    finally:
        hub.stop()


async def _bad_request(port: int, source: str) -> int:
    """A stream request from *source* naming an invalid channel: it spends a token, then 400."""
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET /events?channel=%20 HTTP/1.1\r\nHost: hub\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                break
            head += data
        return int(head.split()[1])


@pytest.mark.slow
@pytest.mark.gen_test(timeout=120)
async def test_ten_thousand_addresses_leave_a_bounded_bucket_table(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub.log", "--stream-rate", "100/1", "--log-level", "error")
    try:
        sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(10_000)]
        assert len(set(sources)) == 10_000
        queue = iter(sources)
        statuses: list[int] = []

        async def worker() -> None:
            for source in queue:
                statuses.append(await _bad_request(hub.port, source))

        await asyncio.gather(*(worker() for _ in range(32)))
        assert statuses == [400] * 10_000
        # every bucket took one token and is full again 10 ms later: the table holds only the
        # addresses of the last moments, not the 10,000 seen
        assert 1 <= hub.metrics()["tornado_sse_rate_limit_keys{limit=stream}"] <= 200
        await asyncio.sleep(0.05)  # past the 10 ms after which every bucket is full again
        assert await _bad_request(hub.port, "127.0.0.1") == 400  # a take sweeps the table
        assert hub.metrics()["tornado_sse_rate_limit_keys{limit=stream}"] == 1
        assert hub.metrics().get("tornado_sse_streams_shed_total{reason=rate}", 0) == 0
    finally:
        hub.stop()


# ---------------------------------------------------------------------- publishes


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_publisher_over_the_rate_gets_429_with_a_correct_retry_after(
    tmp_path: Path,
) -> None:
    hub = start_hub(tmp_path / "hub.log", "--publish-rate", "0.5/2")
    try:
        async with httpx.AsyncClient(timeout=10) as client:

            async def publish(data: str) -> httpx.Response:
                return await client.post(
                    hub.url + "/publish", json={"channel": "p", "data": data}, headers=AUTH
                )

            assert [(await publish(f"e{i}")).status_code for i in range(2)] == [202, 202]
            refused = await publish("too fast")
            assert refused.status_code == 429
            body = refused.json()
            assert body["error"].startswith("publishing too fast: at most 2 at once, then 0.5 per")
            assert 0 < body["retry_after"] <= 2.0
            assert refused.headers["Retry-After"] == str(int(-(-body["retry_after"] // 1)))
            assert refused.headers["Content-Type"].startswith("application/json")
            assert (await publish("still too fast")).status_code == 429  # spends nothing
            await asyncio.sleep(body["retry_after"])  # what the hub said: then a token is free
            assert (await publish("in time")).status_code == 202
            assert (await publish("too fast again")).status_code == 429
            unauthorized = await client.post(
                hub.url + "/publish", json={"channel": "p", "data": "x"}
            )
            assert unauthorized.status_code == 401  # no credential, no bucket
        metrics = hub.metrics()
        assert metrics["tornado_sse_publishes_refused_total{reason=rate}"] == 3
        assert metrics["tornado_sse_events_published_total"] == 3
        assert metrics["tornado_sse_rate_limit_keys{limit=publish}"] == 1
    finally:
        hub.stop()


def test_the_publish_command_waits_for_retry_after(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub.log", "--publish-rate", "1/1")
    try:
        assert hub.post({"channel": "c", "data": "first"}).status_code == 202
        command = [sys.executable, "-m", "tornado_sse.cli", "publish", hub.url]
        command += ["--channel", "c", "--data", "second", "--timeout", "10"]
        env = {**os.environ, "TORNADO_SSE_TOKEN": TOKEN}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=20)
        assert done.returncode == 0, done.stderr
        assert "rate limited by the hub: trying again in" in done.stderr
        assert done.stdout.strip()  # the id
        assert hub.metrics()["tornado_sse_events_published_total"] == 2
    finally:
        hub.stop()


def test_the_publish_command_gives_up_when_the_wait_outlasts_its_timeout(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub.log", "--publish-rate", "0.01/1")
    try:
        assert hub.post({"channel": "c", "data": "first"}).status_code == 202
        command = [sys.executable, "-m", "tornado_sse.cli", "publish", hub.url]
        command += ["--channel", "c", "--data", "second", "--timeout", "2"]
        env = {**os.environ, "TORNADO_SSE_TOKEN": TOKEN}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=20)
        assert done.returncode == 1
        assert "the hub is limiting this publisher's rate (HTTP 429)" in done.stderr
        assert "try again in" in done.stderr
    finally:
        hub.stop()


def test_rate_flags_are_checked(tmp_path: Path) -> None:
    for flag, value in [
        ("--stream-rate", "fast"),
        ("--publish-rate", "5/0"),
        ("--stream-rate", "1e3"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "tornado_sse.cli", "serve", "--port", "0", flag, value],
            capture_output=True,
            text=True,
            env={**os.environ, "TORNADO_SSE_TOKEN": TOKEN},
            timeout=20,
        )
        assert done.returncode == 2, done.stderr
        assert f"Invalid value for '{flag}'" in done.stderr
        assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------- a browser


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic"]


def _playwright_available() -> bool:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.browser
def test_a_shed_eventsource_keeps_retrying_gets_in_and_resumes_exactly(tmp_path: Path) -> None:
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)")
    require(_playwright_available(), "the playwright package is missing (pip install playwright)")
    from playwright.async_api import async_playwright

    hub = start_hub(tmp_path / "hub.log", "--stream-rate", "0.5/1", "--retry", "300")

    async def scenario() -> None:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                page.set_default_timeout(10_000)
                await page.goto(hub.url + "/healthz")
                # the first stream takes the address's one token (the next is 2 s away: the
                # shed stream is told to wait that long, ample time to publish e2 and e3)
                await page.evaluate(
                    """() => new Promise((resolve) => {
                        window.first = [];
                        const es = new EventSource("/events?channel=b");
                        es.onmessage = (e) => window.first.push(e.lastEventId);
                        es.onopen = () => resolve();
                    })"""
                )
                e1 = hub.publish("b", "e1")
                await page.wait_for_function(f"() => window.first[0] === {json.dumps(e1)}")
                # a second stream of the same address resumes from e1: it is shed, and retries
                await page.evaluate(
                    """(start) => {
                        window.got = []; window.errors = 0; window.closed = false;
                        const es = new EventSource(
                            "/events?channel=b&last_event_id=" + encodeURIComponent(start));
                        es.onmessage = (e) => window.got.push([e.lastEventId, e.data]);
                        es.onerror = () => {
                            window.errors += 1;
                            if (es.readyState === 2) window.closed = true;
                        };
                        window.second = es;
                    }""",
                    e1,
                )
                await page.wait_for_function("() => window.errors >= 1")
                e2 = hub.publish("b", "e2")
                e3 = hub.publish("b", "e3")
                await page.wait_for_function("() => window.got.length >= 2")
                e4 = hub.publish("b", "e4")
                await page.wait_for_function("() => window.got.length >= 3")
                got = await page.evaluate("() => window.got")
                assert got == [[e2, "e2"], [e3, "e3"], [e4, "e4"]]
                assert await page.evaluate("() => window.closed") is False
                assert await page.evaluate("() => window.second.readyState") == 1
            finally:
                await browser.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
        assert hub.metrics()["tornado_sse_streams_shed_total{reason=rate}"] >= 1
    finally:
        hub.stop()


def test_publishes_are_limited_per_signed_token_subject(tmp_path: Path) -> None:
    require(importlib.util.find_spec("jwt") is not None, "PyJWT is missing (tornado-sse[jwt])")
    from tornado_sse.auth import create_token

    secret = "rate-test-secret-0123456789abcdef0123456789"
    hub = start_hub(
        tmp_path / "hub.log", "--jwt-secret", secret, "--publish-rate", "0.01/2", "--metrics-public"
    )
    try:

        def publish(token: str, data: str) -> int:
            reply = hub.post(
                {"channel": "room/a", "data": data}, headers={"Authorization": f"Bearer {token}"}
            )
            return reply.status_code

        alice = create_token(secret, subject="alice", publish=["room/*"])
        alice_again = create_token(secret, subject="alice", publish=["room/*"], ttl=60)
        bob = create_token(secret, subject="bob", publish=["room/*"])
        assert [publish(alice, "1"), publish(alice_again, "2")] == [202, 202]
        assert publish(alice, "3") == 429  # a fresh token of the same sub shares its bucket
        assert publish(alice_again, "4") == 429
        assert [publish(bob, "1"), publish(bob, "2"), publish(bob, "3")] == [202, 202, 429]
        assert publish(TOKEN, "master") == 202  # the master token is a credential of its own
        metrics = hub.metrics()
        assert metrics["tornado_sse_publishes_refused_total{reason=rate}"] == 3
        assert metrics["tornado_sse_rate_limit_keys{limit=publish}"] == 3
    finally:
        hub.stop()
