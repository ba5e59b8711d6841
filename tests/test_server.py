"""The standalone hub, black-box: ``tornado-sse serve`` as a real process on loopback.

Driven with an independent client (httpx + httpx-sse) and raw sockets (tests.helpers.RawStream).
Tests that do not interfere share one hub process per configuration (module-scoped fixtures).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require
from tests.helpers import (
    PORT_ATTEMPTS,
    PORT_TAKEN,
    TLS,
    RawStream,
    free_port,
    listens_on,
    stop_process,
    wait_until,
)
from tornado_sse.hub import serve_command

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALLOWED = "http://allowed.example"
LIMIT = 1 << 20


class Hub:
    """A ``tornado-sse serve`` subprocess and ways to talk to it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, verify=TLS, **kwargs)

    def post(self, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(
            self.url + "/publish",
            content=content,
            headers=AUTH if headers is None else headers,
            timeout=10,
            verify=TLS,
            **kw,
        )

    def publish(self, channel: str, data: Any, **fields: Any) -> str:
        reply = self.post({"channel": channel, "data": data, **fields})
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    async def apublish(
        self, client: httpx.AsyncClient, channel: str, data: Any, **fields: Any
    ) -> str:
        reply = await client.post(
            self.url + "/publish", json={"channel": channel, "data": data, **fields}, headers=AUTH
        )
        assert reply.status_code == 202, reply.text
        return str(reply.json()["id"])

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, parsed by prometheus_client's own parser."""
        reply = self.get("/metrics")
        assert reply.status_code == 200, reply.text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(reply.text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    async def stream(self, query: str, **kwargs: Any) -> RawStream:
        return await RawStream.open(self.port, f"/events?{query}", **kwargs)

    def stop(self) -> None:
        stop_process(self.proc)


#: flags that open a hub's channels or its /metrics (it is closed without them, issue 13)
ACCESS_FLAGS = ("--public-channel", "--jwt-secret", "--jwt-public-key", "--auth-url")


def _port_taken(hub: Hub) -> bool:
    """Whether *hub* exited because its port was taken (by another process, after `free_port`
    found it free) rather than listening on it."""
    return not listens_on(hub.proc, hub.port) and PORT_TAKEN in hub.log()


def start_hub(
    log_path: Path,
    *flags: str,
    block_module: str | None = None,
    healthy: bool = True,
    open_access: bool = True,
) -> Hub:
    """Start a hub on a free loopback port and wait (bounded) until /healthz answers 200 (any
    answer, if not *healthy*).

    *block_module* makes that module unimportable in the hub process (as if not installed).
    With *open_access* (tests about other things than access), a hub given no access flag
    lets anyone follow every channel and read /metrics (``--public-channel '*'
    --metrics-public``); the hub alone would refuse both.
    """
    if open_access and not any(flag.startswith(ACCESS_FLAGS) for flag in flags):
        flags = ("--public-channel", "*", "--metrics-public", *flags)
    if "--log-flood-limit" not in flags:
        # tests read these hubs' logs for their own streams' lines, and a module's tests may
        # open more streams in a second than the default limit lets be logged
        flags = ("--log-flood-limit", "0", *flags)
    if block_module is None:
        command = [sys.executable, "-m", "tornado_sse.cli"]
    else:
        bootstrap = (
            f"import sys; sys.modules[{block_module!r}] = None; "
            "from tornado_sse.cli import main; main()"
        )
        command = [sys.executable, "-c", bootstrap]
    env = {**os.environ, "TORNADO_SSE_TOKEN": TOKEN}
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        serve = ["serve", "--host", "127.0.0.1", "--port", str(port), *flags]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [*command, *serve], stdout=log_file, stderr=subprocess.STDOUT, env=env
            )
        hub = Hub(proc, port, log_path)
        if not _port_taken(hub) or attempt == PORT_ATTEMPTS:
            break
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"hub exited with {proc.returncode}:\n{hub.log()}")
        try:
            if (
                httpx.get(hub.url + "/healthz", timeout=1, verify=TLS).status_code == 200
                or not healthy
            ):
                return hub
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            hub.stop()
            raise AssertionError(f"hub did not become healthy:\n{hub.log()}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """The general hub: small history and buffer, 1 s heartbeat, one allowed CORS origin."""
    path = tmp_path_factory.mktemp("hub") / "hub.log"
    flags = ["--history", "2", "--heartbeat", "1", "--retry", "500", "--cors-origin", ALLOWED]
    flags += ["--max-buffer-size", str(256 * 1024)]
    hub = start_hub(path, *flags)
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def small_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A hub holding at most two streams, logging JSON lines."""
    path = tmp_path_factory.mktemp("small") / "hub.log"
    flags = ["--max-connections", "2", "--retry", "2000", "--heartbeat", "60", "--log-json"]
    hub = start_hub(path, *flags)
    yield hub
    hub.stop()


def live(stream: RawStream, ids: list[str]) -> list[str]:
    """Ids of the events of *stream* that are among *ids* (the published ones)."""
    return [event.id for event in stream.events if event.id in ids]


# ---------------------------------------------------------------------- GET /events


@pytest.mark.gen_test(timeout=20)
async def test_stream_headers_first_bytes_and_delivery(hub: Hub) -> None:
    stream = await hub.stream("channel=first", headers={"Accept-Encoding": "gzip"})
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert "connection" not in stream.headers
    assert "content-encoding" not in stream.headers
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    first, _, priming = stream.raw.partition(b"\n\n")
    assert first.startswith(b"retry: ")
    assert 500 <= int(first.split(b": ")[1]) <= 750
    assert priming.startswith(b"id: ")
    assert stream.events == []  # the priming event has no data: browsers do not dispatch it
    event_id = hub.publish("first", "hello", event="greeting")
    events = await stream.events_count(1)
    assert (events[0].id, events[0].event, events[0].data) == (event_id, "greeting", "hello")
    stream.close()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "at least one channel"),
        ("other=x", "at least one channel"),
        ("channel=", "invalid channel"),
        ("channel=a%20b", "invalid channel"),
        ("channel=%20lead", "invalid channel"),
        ("channel=lead%20", "invalid channel"),
        ("channel=a%0Ab", "invalid channel"),
        ("channel=%C3%BC", "invalid channel"),
        ("channel=ok&channel=not%09ok", "invalid channel"),
        ("channel=" + "x" * 201, "invalid channel"),
    ],
)
def test_events_refuses_missing_or_invalid_channels(hub: Hub, query: str, message: str) -> None:
    reply = hub.get(f"/events?{query}")
    assert reply.status_code == 400
    assert message in reply.text
    assert reply.headers["content-type"].startswith("text/plain")


def test_longest_and_widest_channel_names_are_accepted(hub: Hub) -> None:
    for channel in ("x" * 200, "Az09_-.:/@~"):
        assert hub.publish(channel, "ok")


@pytest.mark.gen_test(timeout=20)
async def test_duplicate_channel_delivers_once(hub: Hub) -> None:
    stream = await hub.stream("channel=dup&channel=dup")
    ids = [hub.publish("dup", f"n{i}") for i in range(3)]
    await stream.read_until(lambda s: len(live(s, ids)) >= 3)
    marker = hub.publish("dup", "marker")
    await stream.read_until(lambda s: any(e.id == marker for e in s.events))
    assert [e.id for e in stream.events] == [*ids, marker]
    stream.close()


@pytest.mark.gen_test(timeout=20)
async def test_several_channels_in_publish_order(hub: Hub) -> None:
    stream = await hub.stream("channel=multi-a&channel=multi-b")
    ids = [hub.publish(channel, channel) for channel in ("multi-a", "multi-b", "multi-a")]
    ids.append(hub.publish("multi-other", "not followed"))
    events = await stream.events_count(3)
    assert [e.id for e in events] == ids[:3]
    assert [e.data for e in events] == ["multi-a", "multi-b", "multi-a"]
    stream.close()


@pytest.mark.gen_test(timeout=20)
async def test_injection_attempt_stays_one_event(hub: Hub) -> None:
    stream = await hub.stream("channel=inject")
    evil = "a\n\nevent: x\ndata: y\r\nid: 999\rretry: 1"
    event_id = hub.publish("inject", evil)
    marker = hub.publish("inject", "marker")
    events = await stream.events_count(2)
    assert [(e.id, e.event) for e in events] == [(event_id, None), (marker, None)]
    assert events[0].data == "a\n\nevent: x\ndata: y\nid: 999\nretry: 1"
    assert events[0].retry is None
    assert b"data: a\ndata:\ndata: event: x\ndata: data: y\ndata: id: 999\ndata: retry: 1\n\n" in (
        stream.raw
    )
    assert stream.parser.last_event_id == marker
    stream.close()


@pytest.mark.gen_test(timeout=20)
async def test_data_encoding_with_an_independent_client(hub: Hub) -> None:
    values: list[tuple[Any, str]] = [
        ("plain", "plain"),
        ("", ""),
        ("line 1\r\nline 2\rline 3\nline 4", "line 1\nline 2\nline 3\nline 4"),
        ("héllo ✓ 😀 \u2028 kept", "héllo ✓ 😀 \u2028 kept"),
        (None, "null"),
        (3, "3"),
        (True, "true"),
        ({"b": [1, 2.5, None], "a": "ü"}, '{"b":[1,2.5,null],"a":"ü"}'),
        (["x", {}], '["x",{}]'),
    ]
    received: list[Any] = []
    ids: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(client, "GET", f"{hub.url}/events?channel=enc") as source:
            assert source.response.status_code == 200
            for value, _ in values:
                ids.append(await hub.apublish(client, "enc", value))
            ids.append(await hub.apublish(client, "enc", "named", event="update", retry=1234))
            async for sse in source.aiter_sse():
                if sse.id in ids:
                    received.append(sse)
                if len(received) == len(ids):
                    break
    assert [sse.id for sse in received] == ids
    assert [sse.data for sse in received[:-1]] == [expected for _, expected in values]
    assert all(sse.event == "message" for sse in received[:-1])
    assert (received[-1].event, received[-1].data, received[-1].retry) == ("update", "named", 1234)
    raw = await hub_raw_event(hub, "enc-raw", "héllo")
    assert "data: héllo\n".encode() in raw


async def hub_raw_event(hub: Hub, channel: str, data: str) -> bytes:
    stream = await hub.stream(f"channel={channel}")
    hub.publish(channel, data)
    await stream.events_count(1)
    stream.close()
    return stream.raw


# ---------------------------------------------------------------------- resume


@pytest.mark.gen_test(timeout=20)
async def test_resume_across_a_disconnect(hub: Hub) -> None:
    stream = await hub.stream("channel=resume")
    first = hub.publish("resume", "e1")
    await stream.events_count(1)
    assert stream.parser.last_event_id == first
    stream.close()
    missed = [hub.publish("resume", "e2"), hub.publish("resume", "e3")]  # history holds 2
    again = await hub.stream("channel=resume", headers={"Last-Event-ID": first})
    await again.events_count(2)
    live_id = hub.publish("resume", "e4")
    events = await again.events_count(3)
    assert [e.id for e in events] == [*missed, live_id]
    assert [e.data for e in events] == ["e2", "e3", "e4"]
    assert b"event: stream-reset" not in again.raw
    again.close()
    # the query parameter works for clients that cannot set headers
    by_query = await hub.stream(f"channel=resume&last_event_id={missed[1]}")
    events = await by_query.events_count(1)
    assert [e.id for e in events] == [live_id]
    by_query.close()
    # the header wins over the query parameter
    both = await hub.stream(
        f"channel=resume&last_event_id={first}", headers={"Last-Event-ID": missed[1]}
    )
    events = await both.events_count(1)
    assert [e.id for e in events] == [live_id]
    assert b"stream-reset" not in both.raw
    both.close()


@pytest.mark.gen_test(timeout=20)
async def test_stream_reset_when_history_is_gone(hub: Hub) -> None:
    stream = await hub.stream("channel=reset")
    first = hub.publish("reset", "e1")
    await stream.events_count(1)
    stream.close()
    for n in range(3):  # more than --history 2
        hub.publish("reset", f"gone {n}")
    again = await hub.stream("channel=reset", headers={"Last-Event-ID": first})
    events = await again.events_count(1)
    reset = events[0]
    assert reset.event == "stream-reset"
    assert reset.id is not None
    assert json.loads(reset.data) == {"id": reset.id, "reason": "history"}
    live_id = hub.publish("reset", "after")
    events = await again.events_count(2)
    assert (events[1].id, events[1].data) == (live_id, "after")
    again.close()
    # resuming from the reset's id misses nothing
    resumed = await hub.stream("channel=reset", headers={"Last-Event-ID": reset.id})
    events = await resumed.events_count(1)
    assert [e.id for e in events] == [live_id]
    resumed.close()


@pytest.mark.gen_test(timeout=20)
async def test_unparseable_last_event_id_is_treated_as_too_old(hub: Hub) -> None:
    stream = await hub.stream("channel=garbage-id", headers={"Last-Event-ID": "not-an-id"})
    events = await stream.events_count(1)
    assert events[0].event == "stream-reset"
    stream.close()


@pytest.mark.gen_test(timeout=20)
async def test_heartbeat_comments_on_an_idle_stream(hub: Hub) -> None:
    stream = await hub.stream("channel=idle")
    await stream.read_until(lambda s: s.parser.comments >= 2, timeout=10)
    retry, _, rest = stream.raw.partition(b"\n\n")
    priming, _, rest = rest.partition(b"\n\n")
    assert retry.startswith(b"retry: ") and priming.startswith(b"id: ")
    # after the first bytes, nothing but heartbeat comments (an empty comment line each)
    assert rest == b":\n" * rest.count(b"\n")
    assert rest.count(b"\n") >= 2
    assert stream.events == []
    stream.close()


# ---------------------------------------------------------------------- POST /publish


def test_publish_reply_id_is_increasing(hub: Hub) -> None:
    first = hub.post({"channel": "ids", "data": "a"})
    assert first.status_code == 202
    assert first.headers["content-type"].startswith("application/json")
    second = hub.post({"channel": "other-ids", "data": "b"})
    a, b = first.json()["id"], second.json()["id"]
    assert a != b
    assert int(a.rpartition("-")[2]) < int(b.rpartition("-")[2])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"not json", "not valid JSON"),
        (b"\xff\xfe{", "not valid JSON"),
        (b'{"channel": "a", "data": "x"', "not valid JSON"),
        (b'{"channel": "a", "data": NaN}', "not valid JSON"),
        (b'{"channel": "a", "data": 1e999}', "not valid JSON"),
        (b'{"channel": "a", "data": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"[" * 50000 + b"]" * 50000, "not valid JSON"),
        (b'["channel", "data"]', "JSON object"),
        (b'"text"', "JSON object"),
        (b'{"data": "x"}', 'missing "channel"'),
        (b'{"channel": "", "data": "x"}', "invalid channel"),
        (b'{"channel": "a b", "data": "x"}', "invalid channel"),
        (b'{"channel": "a\\nb", "data": "x"}', "invalid channel"),
        (b'{"channel": 5, "data": "x"}', "invalid channel"),
        (b'{"channel": "' + b"x" * 201 + b'", "data": "x"}', "invalid channel"),
        (b'{"channel": "a"}', 'missing "data"'),
        (b'{"channel": "a", "data": "x", "event": "a\\nb"}', "CR or LF"),
        (b'{"channel": "a", "data": "x", "event": "a\\rb"}', "CR or LF"),
        (b'{"channel": "a", "data": "x", "event": "x\\r\\n\\r\\ndata: y"}', "CR or LF"),
        (b'{"channel": "a", "data": "x", "event": ""}', "non-empty"),
        (b'{"channel": "a", "data": "x", "event": 3}', "non-empty"),
        (b'{"channel": "a", "data": "x", "retry": -1}', "non-negative integer"),
        (b'{"channel": "a", "data": "x", "retry": 1.5}', "non-negative integer"),
        (b'{"channel": "a", "data": "x", "retry": "10"}', "non-negative integer"),
        (b'{"channel": "a", "data": "x", "retry": true}', "non-negative integer"),
        (b'{"channel": "a", "data": "x", "id": "1"}', "unknown field"),
        (b'{"channel": "a", "data": "\\ud800"}', "lone surrogate"),
        (b'{"channel": "a", "data": ["\\udfff"]}', "lone surrogate"),
    ],
)
def test_publish_refuses_bad_bodies(hub: Hub, body: bytes, message: str) -> None:
    reply = hub.post(body)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong-token",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN} extra",
    ],
)
def test_publish_refuses_missing_or_wrong_tokens(hub: Hub, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = hub.post({"channel": "auth", "data": "x"}, headers=headers)
    assert reply.status_code == 401
    assert "Bearer" in reply.json()["error"]
    assert reply.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(hub: Hub, scheme: str) -> None:
    reply = hub.post(
        {"channel": "auth", "data": "x"}, headers={"Authorization": f"{scheme} {TOKEN}"}
    )
    assert reply.status_code == 202


def _body_of_size(size: int) -> bytes:
    head, tail = b'{"channel": "big", "data": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_body_limit(hub: Hub) -> None:
    with httpx.Client(base_url=hub.url, headers=AUTH, timeout=10) as client:
        exact = client.post("/publish", content=_body_of_size(LIMIT))
        assert exact.status_code == 202
        over = client.post("/publish", content=_body_of_size(LIMIT + 1))
        assert over.status_code == 413
        assert str(LIMIT) in over.json()["error"]

        def chunks(total: int) -> Iterator[bytes]:
            body = _body_of_size(total)
            for start in range(0, len(body), 100_000):
                yield body[start : start + 100_000]

        chunked = client.post("/publish", content=chunks(2 * LIMIT))
        assert chunked.status_code == 413
        assert chunked.request.headers["transfer-encoding"] == "chunked"
        small_chunked = client.post("/publish", content=chunks(LIMIT))
        assert small_chunked.status_code == 202
        # the refused bodies were read to their end: the connection is still good
        assert client.post("/publish", json={"channel": "big", "data": "y"}).status_code == 202


async def raw_exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send *request* on a fresh connection; return what comes back until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()
        received = b""
        with contextlib.suppress(ConnectionError):
            while True:
                data = await asyncio.wait_for(reader.read(65536), timeout)
                if not data:
                    break
                received += data
        return received
    finally:
        writer.close()


def _publish_head(length: int, *extra: str, token: str = TOKEN) -> bytes:
    lines = [
        "POST /publish HTTP/1.1",
        "Host: hub",
        f"Authorization: Bearer {token}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.gen_test(timeout=20)
async def test_body_far_over_the_limit_is_answered_without_reading_it(hub: Hub) -> None:
    for length in (1 << 40, 10**30):
        reply = await raw_exchange(hub.port, _publish_head(length))
        assert reply.startswith(b"HTTP/1.1 413 ")
        assert reply.endswith(b'{"error": "body larger than 1048576 bytes"}\n')
        assert reply.count(b"HTTP/1.1") == 1  # nothing but our answer
    continued = await raw_exchange(hub.port, _publish_head(2 * LIMIT, "Expect: 100-continue"))
    assert continued.startswith(b"HTTP/1.1 413 ")
    assert continued.count(b"HTTP/1.1") == 1  # no "100 Continue": the body is not wanted
    unauthorized = await raw_exchange(
        hub.port, _publish_head(100, "Expect: 100-continue", token="nope")
    )
    assert unauthorized.startswith(b"HTTP/1.1 401 ")


def test_other_methods_and_paths(hub: Hub) -> None:
    assert hub.get("/publish").status_code == 405
    assert "error" in hub.get("/publish").json()
    assert httpx.post(hub.url + "/events?channel=a", timeout=10, verify=TLS).status_code == 405
    missing = hub.get("/nowhere")
    assert missing.status_code == 404
    assert "/publish" in missing.json()["error"]


# ---------------------------------------------------------------------- CORS


@pytest.mark.gen_test(timeout=20)
async def test_cors_stream_allowed_and_refused(hub: Hub) -> None:
    stream = await hub.stream("channel=cors", headers={"Origin": ALLOWED})
    assert stream.status == 200
    assert stream.headers["access-control-allow-origin"] == ALLOWED
    assert stream.headers["access-control-allow-credentials"] == "true"
    assert "Origin" in stream.headers["vary"]
    stream.close()
    refused = hub.get("/events?channel=cors", headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers


def test_cors_preflight(hub: Hub) -> None:
    def preflight(path: str, origin: str, method: str, headers: str) -> httpx.Response:
        return httpx.options(
            hub.url + path,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": headers,
            },
            timeout=10,
        )

    events = preflight("/events?channel=cors", ALLOWED, "GET", "last-event-id")
    assert events.status_code == 204
    assert events.headers["access-control-allow-origin"] == ALLOWED
    assert "GET" in events.headers["access-control-allow-methods"]
    assert "Last-Event-ID" in events.headers["access-control-allow-headers"]
    publish = preflight("/publish", ALLOWED, "POST", "authorization, content-type")
    assert publish.status_code == 204
    assert publish.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in publish.headers["access-control-allow-methods"]
    allowed_headers = publish.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers
    assert "content-type" in allowed_headers
    for path, method in (("/events?channel=cors", "GET"), ("/publish", "POST")):
        refused = preflight(path, "http://evil.example", method, "authorization")
        assert refused.status_code == 403
        assert "access-control-allow-origin" not in refused.headers


def test_cors_publish(hub: Hub) -> None:
    allowed = hub.post({"channel": "cors", "data": "x"}, headers={**AUTH, "Origin": ALLOWED})
    assert allowed.status_code == 202
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    refused = hub.post(
        {"channel": "cors", "data": "x"}, headers={**AUTH, "Origin": "http://evil.example"}
    )
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers


# ---------------------------------------------------------------------- health and metrics


def test_healthz(hub: Hub) -> None:
    reply = hub.get("/healthz")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok"}
    assert httpx.head(hub.url + "/healthz", timeout=10).status_code == 200


@pytest.mark.gen_test(timeout=20)
async def test_metrics(hub: Hub) -> None:
    before = hub.metrics()
    stream = await hub.stream("channel=metered")
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    event_id = hub.publish("metered", "x")
    await stream.events_count(1)
    assert stream.events[0].id == event_id
    after = await wait_until(
        lambda: (
            (m := hub.metrics())["tornado_sse_events_sent_total"]
            > before["tornado_sse_events_sent_total"]
            and m
        )
    )
    assert after["tornado_sse_connections_open"] >= 1
    assert (
        after["tornado_sse_events_published_total"]
        == before["tornado_sse_events_published_total"] + 1
    )
    assert (
        after["tornado_sse_slow_disconnects_total"] == before["tornado_sse_slow_disconnects_total"]
    )
    assert after["tornado_sse_channel_subscribers{channel=metered}"] == 1
    assert after["tornado_sse_channel_history{channel=metered}"] == 1
    assert after["tornado_sse_publish_to_write_seconds_count"] >= 1
    assert after["tornado_sse_publish_to_write_seconds_bucket{le=+Inf}"] >= 1
    assert after["tornado_sse_healthy"] == 1
    assert after["process_resident_memory_bytes"] > 0
    stream.close()
    gone = await wait_until(
        lambda: "tornado_sse_channel_subscribers{channel=metered}" not in (m := hub.metrics()) and m
    )
    assert gone["tornado_sse_connections_open"] == after["tornado_sse_connections_open"] - 1
    # a client that closes its stream is not a slow consumer
    slow = "tornado_sse_slow_disconnects_total"
    assert gone[slow] == before[slow]


def test_metrics_label_only_the_100_largest_channels(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub.log", "--history", "3")
    try:
        large = [f"z-large-{n}" for n in range(30)]  # last by name, first by size
        small = [f"a-small-{n}" for n in range(90)]
        with httpx.Client(base_url=hub.url, headers=AUTH, timeout=10) as client:
            for channel in large * 3 + small:
                reply = client.post("/publish", json={"channel": channel, "data": "x"})
                assert reply.status_code == 202, reply.text
        history = {
            key[len("tornado_sse_channel_history{channel=") : -1]: value
            for key, value in hub.metrics().items()
            if key.startswith("tornado_sse_channel_history{")
        }
        other = history.pop("_other")
        assert len(history) == 100
        assert all(history[channel] == 3 for channel in large)  # the largest all labelled
        assert set(history) - set(large) < set(small)
        assert other == 20  # the 20 small channels left over, one event each
        assert sum(history.values()) + other == 3 * len(large) + len(small)
    finally:
        hub.stop()


# ---------------------------------------------------------------------- robustness


@pytest.mark.gen_test(timeout=30)
async def test_garbage_and_oversize_headers_leave_the_hub_serving(hub: Hub) -> None:
    stream = await hub.stream("channel=robust")
    bad_requests = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /events?channel=robust HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"POST /publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /events?channel=robust HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        b"GET /events?channel=" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00" * 70_000,
    ]
    for request in bad_requests:
        reply = await raw_exchange(hub.port, request)
        status = reply.split(b"\r\n", 1)[0]
        assert reply == b"" or status.split()[1] in (b"400", b"401", b"431"), reply[:200]
    event_id = hub.publish("robust", "still here")
    events = await stream.events_count(1)
    assert events[0].id == event_id
    assert hub.get("/healthz").status_code == 200
    stream.close()
    assert "Traceback" not in hub.log()
    assert " 500 " not in hub.log()


@pytest.mark.gen_test(timeout=60)
async def test_stalled_subscribers_are_cut_off_and_memory_stays_bounded(hub: Hub) -> None:
    channel = "stall"
    event_size = 64 * 1024
    # 25 MiB in all: without the cut-off the stalled streams would hold all of it (they share
    # the frames, so about 25 MiB however many they are); with it, a few hundred KiB.
    count = 400
    stalled = [await hub.stream(f"channel={channel}", rcvbuf=4096) for _ in range(4)]
    slow_before = hub.metrics()["tornado_sse_slow_disconnects_total"]
    rss_before = hub.rss_kib()
    received: list[str] = []
    ids: list[str] = []
    peak = rss_before
    async with httpx.AsyncClient(timeout=10) as client:
        async with aconnect_sse(client, "GET", f"{hub.url}/events?channel={channel}") as source:

            async def read() -> None:
                async for sse in source.aiter_sse():
                    if sse.data:
                        received.append(sse.id)
                        if len(received) == count:
                            return

            reader = asyncio.ensure_future(read())
            for n in range(count):
                ids.append(await hub.apublish(client, channel, f"{n:05d}" + "x" * event_size))
                # keep the healthy reader within a couple of events: it reads as fast as it can
                await wait_until(lambda n=n: len(received) >= n - 1 or reader.done(), timeout=10)
                if n % 32 == 0:
                    peak = max(peak, hub.rss_kib())
            await asyncio.wait_for(reader, 10)
    assert received == ids
    peak = max(peak, hub.rss_kib())
    growth_mib = (peak - rss_before) / 1024
    print(f"hub RSS {rss_before / 1024:.1f} MiB -> peak {peak / 1024:.1f} MiB")
    assert growth_mib < 10, f"hub RSS grew by {growth_mib:.1f} MiB"
    slow_after = hub.metrics()["tornado_sse_slow_disconnects_total"]
    assert slow_after - slow_before >= len(stalled)
    for stream in stalled:
        await stream.read_to_end(timeout=10)
        assert len(stream.events) < count


# ---------------------------------------------------------------------- logging


@pytest.mark.gen_test(timeout=20)
async def test_logs_stream_lines_and_no_secrets(hub: Hub) -> None:
    stream = await hub.stream("channel=logged-a&channel=logged-b")
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    stream.close()
    await wait_until(lambda: "stream closed: channels=logged-a,logged-b" in hub.log())
    secret = "query-secret-value"
    assert hub.get(f"/healthz?token={secret}&x=1").status_code == 200
    hub.post({"channel": "logged-a", "data": "x"}, headers={"Authorization": "Bearer wrong-xyz"})
    await wait_until(lambda: "token=REDACTED" in hub.log() and "401 POST" in hub.log())
    log = hub.log()
    opened = [line for line in log.splitlines() if "stream open" in line]
    assert any("logged-a,logged-b" in line and "127.0.0.1" in line for line in opened)
    closed = [line for line in log.splitlines() if "stream closed" in line]
    assert any(
        "logged-a,logged-b" in line and "duration=" in line and "127.0.0.1" in line
        for line in closed
    )
    assert TOKEN not in log
    assert secret not in log
    assert "wrong-xyz" not in log


@pytest.mark.gen_test(timeout=20)
async def test_xheaders_logs_the_clients_address(hub: Hub, tmp_path: Path) -> None:
    # --drain 0: stopped with a stream open, it waited out the default 2 s window
    behind = start_hub(tmp_path / "hub.log", "--xheaders", "--drain", "0")
    try:
        for target, address in ((behind, "203.0.113.5"), (hub, "127.0.0.1")):
            stream = await target.stream("channel=proxied", headers={"X-Real-IP": "203.0.113.5"})
            await stream.read_until(lambda s: s.parser.last_event_id != "")
            stream.close()
            closed = f"stream closed: channels=proxied client={address} "
            # the hub writes the access line after the "stream closed" one: wait for both
            access = f"200 GET /events?channel=proxied ({address})"
            await wait_until(
                lambda target=target, lines=(closed, access): all(
                    line in target.log() for line in lines
                )
            )
            assert f"stream open: channels=proxied client={address} " in target.log()
        forwarded = await behind.stream(
            "channel=forwarded", headers={"X-Forwarded-For": "192.0.2.1, 198.51.100.9"}
        )
        await forwarded.read_until(lambda s: s.parser.last_event_id != "")
        forwarded.close()
        # the nearest proxy's entry: the last one, the only one a proxy of ours wrote
        opened = "stream open: channels=forwarded client=198.51.100.9 "
        await wait_until(lambda: opened in behind.log())
    finally:
        behind.stop()


# ---------------------------------------------------------------------- limits (small hub)


@pytest.mark.gen_test(timeout=30)
async def test_shedding_past_max_connections_and_slot_freed(small_hub: Hub) -> None:
    hub = small_hub
    held = [await hub.stream(f"channel=held{n}") for n in range(2)]
    for stream in held:
        await stream.read_until(lambda s: s.parser.last_event_id != "")
    shed = await hub.stream("channel=held0")
    assert shed.status == 200
    assert shed.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert int(shed.headers["retry-after"]) >= 2
    await shed.read_to_end(timeout=5)
    assert shed.raw.startswith(b"retry: ")
    assert shed.raw.endswith(b"\n\n")
    assert shed.raw.count(b"\n") == 2  # nothing but the retry
    assert 2000 <= int(shed.raw.split(b": ")[1]) <= 3000
    assert shed.events == []
    shed.close()
    metrics = hub.metrics()
    assert metrics["tornado_sse_connections_shed_total"] >= 1
    assert metrics["tornado_sse_connections_open"] == 2

    # a closed stream frees its slot at once, not at the next heartbeat (60 s here): 10 s is far
    # from both, whatever the machine's load
    held[0].close()

    async def accepted() -> RawStream | None:
        stream = await hub.stream("channel=held0")
        await stream.read_until(lambda s: s.ended or s.parser.last_event_id != "", timeout=5)
        if stream.ended:
            stream.close()
            return None
        return stream

    replacement = await wait_until(accepted, timeout=10, interval=0.02)
    event_id = hub.publish("held0", "to the new stream")
    events = await replacement.events_count(1)
    assert events[0].id == event_id
    replacement.close()
    held[1].close()


def test_json_logs(small_hub: Hub) -> None:
    assert small_hub.get("/healthz").status_code == 200
    deadline = time.monotonic() + 10
    while "/healthz" not in small_hub.log() and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = [json.loads(line) for line in small_hub.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line.get("path") == "/healthz"]
    assert access
    assert access[0]["status"] == 200
    assert access[0]["method"] == "GET"
    assert access[0]["client"] == "127.0.0.1"
    assert access[0]["level"] == "info"


# ---------------------------------------------------------------------- processes of their own


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.gen_test(timeout=30)
async def test_signal_closes_streams_and_exits_zero(tmp_path: Path, signum: int) -> None:
    hub = start_hub(tmp_path / "hub.log")
    try:
        stream = await hub.stream("channel=bye")
        await stream.read_until(lambda s: s.parser.last_event_id != "")
        idle = httpx.Client(base_url=hub.url, timeout=10)
        assert idle.get("/healthz").status_code == 200  # an idle keep-alive connection
        hub.proc.send_signal(signum)
        hub.proc.send_signal(signum)  # impatient operators: a second one must not disturb it
        await stream.read_to_end(timeout=10)
        assert stream.last_chunk
        stream.close()
        returncode = await asyncio.get_running_loop().run_in_executor(None, hub.proc.wait, 10)
        assert returncode == 0, hub.log()
        # Within 5 s by construction (each shutdown step has its deadline); that no step needed
        # its deadline is what tells a clean stop, whatever the machine's load.
        log = hub.log()
        assert "shutting down" in log and "hub stopped" in log
        assert "did not close in time" not in log
        with pytest.raises(httpx.TransportError):
            httpx.get(hub.url + "/healthz", timeout=2, verify=TLS)
        idle.close()
    finally:
        hub.stop()


def test_metrics_without_prometheus_client(tmp_path: Path) -> None:
    hub = start_hub(
        tmp_path / "hub.log", "--log-level", "warning", block_module="prometheus_client"
    )
    try:
        reply = hub.get("/metrics")
        assert reply.status_code == 501
        assert "pip install 'tornado-sse[metrics]'" in reply.text
        assert hub.publish("still", "works")
        assert hub.get("/healthz").status_code == 200
        hub.stop()
        log = hub.log()
        assert "501 GET /metrics" in log
        assert " INFO " not in log  # --log-level warning
    finally:
        hub.stop()


@pytest.mark.gen_test(timeout=30)
async def test_unreachable_backend_gives_503_and_sheds(tmp_path: Path) -> None:
    """A real backend that is down: --redis pointing at a port where nothing listens."""
    require(importlib.util.find_spec("redis") is not None, "redis-py is not installed")
    hub = start_hub(
        tmp_path / "hub.log", "--redis", f"redis://127.0.0.1:{free_port()}/0", healthy=False
    )
    try:
        health = hub.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        reply = hub.post({"channel": "down", "data": "x"})
        assert reply.status_code == 503
        assert "cannot deliver" in reply.json()["error"]
        stream = await hub.stream("channel=down")
        await stream.read_to_end(timeout=5)
        assert stream.status == 200
        assert "retry-after" in stream.headers
        assert stream.raw.startswith(b"retry: ")
        assert stream.events == []
        assert hub.metrics()["tornado_sse_healthy"] == 0
        hub.proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.get_running_loop().run_in_executor(None, hub.proc.wait, 5)
        assert returncode == 0, hub.log()
    finally:
        hub.stop()


# ---------------------------------------------------------------------- command line


def run_serve(*args: str, env: dict[str, str | None] | None = None) -> Any:
    runner = CliRunner()
    return runner.invoke(serve_command, list(args), env={"TORNADO_SSE_TOKEN": None, **(env or {})})


def test_serve_refuses_to_start_without_a_token() -> None:
    result = run_serve("--port", "0")
    assert result.exit_code == 2
    assert "TORNADO_SSE_TOKEN" in result.output
    assert "--token" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "has space"], "printable ASCII"),
        (["--port", "70000"], "70000"),
        (["--port", "http"], "not a valid integer"),
        (["--heartbeat", "nan"], "finite"),
        (["--heartbeat", "-1"], "-1"),
        (["--heartbeat", "0.01"], "at least 0.1"),
        (["--retry", "-5"], "-5"),
        (["--history", "-1"], "-1"),
        (["--max-connections", "0"], "0"),
        (["--max-body-size", "0"], "0"),
        (["--cors-origin", "*"], "exact origins"),
        (["--cors-origin", "allowed.example"], "not an origin"),
        (["--cors-origin", "http://allowed.example/path"], "not an origin"),
        (["--cors-origin", "ftp://allowed.example"], "not an origin"),
        (["--cors-origin", "http://allowed.example:99999"], "not an origin"),
        (["--log-level", "verbose"], "verbose"),
        (["--redis", ""], "must not be empty"),
    ],
)
def test_serve_flag_errors_are_helpful(args: list[str], message: str) -> None:
    result = run_serve(*args, env={"TORNADO_SSE_TOKEN": TOKEN})
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("flag", "blocked", "message"),
    [
        ("--processes", "tornado_sse.broker.bridge", "not supported by this version"),
        ("--redis", "tornado_sse.broker.redis", "not supported by this version"),
        ("--redis", "redis", "pip install 'tornado-sse[redis]'"),
    ],
)
def test_backend_flags_fail_clearly_without_their_backend(
    flag: str, blocked: str, message: str
) -> None:
    """As installed without the backend (its module made unimportable in the process)."""
    value = "2" if flag == "--processes" else "redis://127.0.0.1:1/0"
    bootstrap = (
        f"import sys; sys.modules[{blocked!r}] = None; from tornado_sse.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", bootstrap, "serve", "--port", "0", flag, value],
        capture_output=True,
        timeout=30,
        check=False,
        env={**os.environ, "TORNADO_SSE_TOKEN": TOKEN},
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert flag in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# Tornado's bind_sockets leaves the socket whose bind failed for the garbage collector (harmless
# in the hub, which then exits; this test runs the command in-process).
@pytest.mark.filterwarnings(r"ignore:unclosed <socket\.socket .*laddr=\('0\.0\.0\.0', 0\)>")
def test_serve_reports_a_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_serve("--port", str(port), env={"TORNADO_SSE_TOKEN": TOKEN})
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output


def test_every_flag_has_help() -> None:
    result = CliRunner().invoke(serve_command, ["--help"])
    assert result.exit_code == 0
    for param in serve_command.params:
        assert getattr(param, "help", None), param.name
    for flag in ("--history", "--heartbeat", "--retry", "--cors-origin", "--max-connections"):
        assert flag in result.output
    for flag in ("--processes", "--redis", "--log-level", "--log-json", "--token"):
        assert flag in result.output


def test_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tornado_sse.cli", "serve", "--help"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert b"--max-connections" in result.stdout
