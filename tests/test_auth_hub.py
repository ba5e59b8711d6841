"""Access to a real ``tornado-sse serve`` process (issue 13): closed by default, opened by
``--public-channel``, signed tokens (``--jwt-secret``, ``--jwt-public-key``), or an
``--auth-url`` backend (a real Tornado application on loopback); publishing with signed tokens;
``/metrics`` behind the master token; the Python client renewing its token through the hub.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tornado.web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from tests.helpers import TLS, free_port
from tests.test_server import AUTH, TOKEN, Hub, start_hub
from tornado_sse import auth
from tornado_sse.client import TOKEN_EXPIRED, EventSource

SECRET = "hub-test-secret-0123456789abcdefghij"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PRIVATE = RSA_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
RSA_PUBLIC = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def events(hub: Hub, query: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """The head of a stream request (the body of a refusal); the stream itself is not read."""
    with httpx.stream(
        "GET", f"{hub.url}/events?{query}", headers=headers, timeout=10, verify=TLS
    ) as reply:
        if reply.status_code != 200:
            reply.read()
        return reply


def alice(**kwargs: Any) -> str:
    kwargs.setdefault("subscribe", ["user/alice"])
    return auth.create_token(kwargs.pop("key", SECRET), subject="alice", **kwargs)


# ---------------------------------------------------------------------- closed by default


@pytest.fixture(scope="module")
def closed_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    hub = start_hub(tmp_path_factory.mktemp("closed") / "hub.log", open_access=False)
    yield hub
    hub.stop()


def test_a_hub_without_access_flags_is_closed(closed_hub: Hub) -> None:
    reply = events(closed_hub, "channel=news")
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    assert "not public" in reply.text
    assert "--public-channel" in closed_hub.log()  # the start-up log says how to open channels
    assert closed_hub.get("/metrics").status_code == 401
    assert closed_hub.get("/metrics", headers=AUTH).status_code == 200
    assert closed_hub.post({"channel": "news", "data": "x"}).status_code == 202  # master token


# ---------------------------------------------------------------------- signed tokens


@pytest.fixture(scope="module")
def jwt_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    os.environ["TORNADO_SSE_JWT_SECRET"] = SECRET
    try:
        hub = start_hub(
            tmp_path_factory.mktemp("jwt") / "hub.log",
            "--public-channel",
            "news",
            "--retry",
            "100",
            open_access=False,
        )
    finally:
        del os.environ["TORNADO_SSE_JWT_SECRET"]
    yield hub
    hub.stop()


def test_signed_tokens_open_their_channels(jwt_hub: Hub) -> None:
    assert events(jwt_hub, "channel=news").status_code == 200  # public
    assert events(jwt_hub, "channel=user/alice").status_code == 401
    for headers, query in [
        (bearer(alice()), ""),
        ({}, f"&access_token={alice()}"),
        ({"Cookie": f"tornado_sse_token={alice()}"}, ""),
    ]:
        reply = events(jwt_hub, "channel=user/alice&channel=news" + query, headers)
        assert reply.status_code == 200, (headers, query, reply.text)
    denied = events(jwt_hub, "channel=user/bob", bearer(alice()))
    assert (denied.status_code, denied.text) == (403, "not allowed to follow channel 'user/bob'\n")
    assert f"access_token={alice()}" not in jwt_hub.log()  # redacted in the access log


@pytest.mark.parametrize(
    "bad",
    [
        auth.create_token("another-secret-0123456789abcdefghij", subscribe=["*"]),
        alice(now=time.time() - 7200),
        alice(claims={"nbf": int(time.time()) + 600}),
        alice(audience="elsewhere"),
        "garbage",
        "x" * 10_000,
        "eyJhbGciOiJub25lIn0.eyJ0b3JuYWRvX3NzZSI6eyJzdWJzY3JpYmUiOlsiKiJdfX0.",  # alg none
    ],
    ids=["signature", "expired", "not yet valid", "audience", "garbage", "10 KB", "alg none"],
)
def test_bad_tokens_are_401_never_500_even_for_public_channels(jwt_hub: Hub, bad: str) -> None:
    reply = events(jwt_hub, "channel=news", bearer(bad))
    assert reply.status_code == 401, reply.text
    assert reply.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_publish_with_signed_tokens(jwt_hub: Hub) -> None:
    writer = alice(subscribe=[], publish=["room/*"])
    assert jwt_hub.post({"channel": "room/1", "data": "hi"}, bearer(writer)).status_code == 202
    denied = jwt_hub.post({"channel": "user/bob", "data": "hi"}, bearer(writer))
    assert denied.status_code == 403
    assert denied.json() == {"error": "not allowed to publish to channel 'user/bob'"}
    expired = jwt_hub.post({"channel": "room/1", "data": "x"}, bearer(alice(now=0)))
    assert expired.status_code == 401
    assert expired.headers["www-authenticate"].startswith("Bearer")
    assert jwt_hub.post({"channel": "user/bob", "data": "hi"}).status_code == 202  # master


def test_client_renews_its_token_through_the_hub(jwt_hub: Hub) -> None:
    """Expiry mid-stream: token-expired, a fresh token, and every event exactly once."""
    issued: list[str] = []

    def fresh() -> str:
        issued.append(alice(ttl=2 if not issued else 3600))
        return issued[-1]

    async def run() -> tuple[list[str], list[str], int]:
        published: list[str] = []
        received: list[str] = []
        url = f"{jwt_hub.url}/events?channel=user/alice"
        async with httpx.AsyncClient(timeout=10) as client, EventSource(url, token=fresh) as source:
            while not source.last_event_id:
                await asyncio.sleep(0.01)
            number, after = 0, -1
            iterator = source.__aiter__()
            while after < 15:
                published.append(str(number))
                await jwt_hub.apublish(client, "user/alice", str(number))
                number += 1
                while len(received) < len(published):
                    event = await asyncio.wait_for(iterator.__anext__(), 10)
                    if event.event == TOKEN_EXPIRED:
                        after = 0
                    elif event.event is None:
                        received.append(event.data)
                        if after >= 0:
                            after += 1
                await asyncio.sleep(0.02)
            return published, received, source.connections

    published, received, connections = asyncio.run(asyncio.wait_for(run(), 30))
    assert received == published
    assert connections == 2
    assert len(issued) == 2


def test_metrics_public(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub.log", "--metrics-public", open_access=False)
    try:
        assert hub.get("/metrics").status_code == 200
        assert events(hub, "channel=news").status_code == 401
    finally:
        hub.stop()


def test_a_public_key_audience_and_issuer(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(RSA_PUBLIC)
    flags = ["--jwt-public-key", str(key), "--jwt-audience", "hub", "--jwt-issuer", "me"]
    hub = start_hub(tmp_path / "hub.log", *flags, open_access=False)
    try:
        good = alice(key=RSA_PRIVATE, audience="hub", issuer="me")
        assert events(hub, "channel=user/alice", bearer(good)).status_code == 200
        for bad in [
            alice(key=RSA_PRIVATE, audience="hub"),  # no issuer
            alice(key=RSA_PRIVATE, audience="other", issuer="me"),
            alice(audience="hub", issuer="me"),  # HMAC: not with a public key
        ]:
            assert events(hub, "channel=user/alice", bearer(bad)).status_code == 401
    finally:
        hub.stop()


# ---------------------------------------------------------------------- --auth-url


class Backend(tornado.web.RequestHandler):
    def post(self) -> None:
        if b"session=alice" in self.request.body:
            self.finish({"sub": "alice", "subscribe": ["user/alice"], "ttl": 30})
        else:
            self.set_status(403)
            self.finish("no")


@pytest.fixture
def backend_url() -> Iterator[str]:
    """A Tornado backend on its own loop, in a thread (the hub is another process)."""
    port = free_port()
    started = threading.Event()
    loop: list[IOLoop] = []

    def run() -> None:
        async def main() -> None:
            server = HTTPServer(tornado.web.Application([(r"/auth", Backend)]))
            server.listen(port, "127.0.0.1")
            stop = asyncio.Event()
            loop.append(IOLoop.current())
            stopping.append(stop)
            started.set()
            await stop.wait()
            # no socket left to the collector (issue 19): the listening socket and the hub's
            # keep-alive connections close here, on the backend's own loop
            server.stop()
            await server.close_all_connections()

        asyncio.run(main())

    stopping: list[asyncio.Event] = []
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{port}/auth"
    loop[0].add_callback(stopping[0].set)
    thread.join(10)
    assert not thread.is_alive()


def test_auth_url_up_and_down(tmp_path: Path, backend_url: str) -> None:
    hub = start_hub(tmp_path / "hub.log", "--auth-url", backend_url, open_access=False)
    down = start_hub(
        tmp_path / "down.log",
        "--auth-url",
        f"http://127.0.0.1:{free_port()}/auth",
        open_access=False,
    )
    try:
        assert events(hub, "channel=user/alice", {"Cookie": "session=alice"}).status_code == 200
        assert events(hub, "channel=user/alice", {"Cookie": "session=bob"}).status_code == 403
        for _ in range(2):
            shed = events(down, "channel=user/alice", {"Cookie": "session=alice"})
            assert shed.status_code == 200 and "retry-after" in shed.headers
        assert down.log().count("shedding streams until it answers") == 1
    finally:
        hub.stop()
        down.stop()


# ---------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--jwt-secret", "short"], "at least 32 bytes"),
        (["--jwt-secret", SECRET, "--jwt-public-key", __file__], "not both"),
        (["--jwt-public-key", __file__], "not a PEM public key"),
        (["--public-channel", "a*b"], "invalid channel pattern"),
        (["--auth-url", "ftp://example/"], "not an http:// or https:// URL"),
    ],
)
def test_bad_access_flags_are_usage_errors(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tornado_sse.cli", "serve", "--port", "0", *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "TORNADO_SSE_TOKEN": TOKEN},
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


# ---------------------------------------------------------------------- listen with a token


def _listen(hub: Hub, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tornado_sse.cli", "listen", hub.url, "-c", "user/alice", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _read_lines(stream: Any, count: int, deadline: float) -> list[str]:
    """*count* lines of *stream*, read in a thread so that the wait stays bounded."""
    lines: list[str] = []

    def read() -> None:
        while len(lines) < count:
            line = stream.readline()
            if not line:
                return
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    return lines


def test_listen_follows_a_private_channel_with_a_token(jwt_hub: Hub) -> None:
    refused = _listen(jwt_hub)
    _, stderr = refused.communicate(timeout=20)
    assert refused.returncode == 1
    assert "HTTP 401" in stderr
    process = _listen(jwt_hub, "--token", alice(), "--json")
    try:
        assert _read_lines(process.stderr, 1, time.monotonic() + 15)[0].startswith("connected")
        jwt_hub.post({"channel": "user/alice", "data": "hello"})
        # the first line printed: the priming event has no data, and listen prints what a
        # browser dispatches (waiting for a second line here waited out its 15 s every time)
        lines = _read_lines(process.stdout, 1, time.monotonic() + 15)
        assert lines and json.loads(lines[0])["data"] == "hello", lines
    finally:
        process.terminate()
        process.communicate(timeout=10)  # waits, and closes its pipes


def test_listen_renews_its_token_with_a_token_command(jwt_hub: Hub, tmp_path: Path) -> None:
    """The first token expires after 2 s: listen runs --token-command again at token-expired
    and resumes, so every event published meanwhile is printed exactly once, in order."""
    calls = tmp_path / "calls"
    maker = tmp_path / "make_token.py"
    maker.write_text(
        "import pathlib, sys\n"
        "from tornado_sse import auth\n"
        f"calls = pathlib.Path({str(calls)!r})\n"
        "n = len(calls.read_text()) if calls.exists() else 0\n"
        "calls.write_text('x' * (n + 1))\n"
        f"print(auth.create_token({SECRET!r}, subject='alice', subscribe=['user/alice'],"
        " ttl=2 if n == 0 else 3600))\n"
    )
    process = _listen(jwt_hub, "--token-command", f"{sys.executable} {maker}")
    try:
        first = _read_lines(process.stderr, 1, time.monotonic() + 15)
        if not first or not first[0].startswith("connected"):
            process.kill()
            raise AssertionError("\n".join(first) + process.communicate(timeout=10)[1])
        published: list[str] = []
        deadline = time.monotonic() + 30
        while calls.read_text() == "x" or len(published) < 5:
            assert time.monotonic() < deadline, "the token was never renewed"
            published.append(str(len(published)))
            assert jwt_hub.post({"channel": "user/alice", "data": published[-1]}).status_code == 202
            time.sleep(0.1)  # a steady publisher, not a wait for a condition
        jwt_hub.post({"channel": "user/alice", "data": "end"})
        printed: list[str] = []
        while "end" not in printed:
            (line,) = _read_lines(process.stdout, 1, deadline) or ["<timeout>"]
            assert line != "<timeout>", printed
            event, _, data = line.split("\t", 2)
            if event == "message":
                printed.append(data)
            else:
                assert event == "token-expired", line
        assert printed == [*published, "end"]
        assert calls.read_text() == "xx"
    finally:
        process.terminate()
        process.communicate(timeout=10)  # waits, and closes its pipes
