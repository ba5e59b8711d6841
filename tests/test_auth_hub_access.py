"""The hub's access policy (`tornado_sse.hub.access.HubAccess`) through real Tornado servers on
loopback: streams opened by public patterns, signed tokens and an ``--auth-url`` backend that is
a real Tornado application, up, slow, down and wrong.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tests.helpers import RawStream, free_port
from tornado_sse import ConnectionSet, EventStreamHandler, InProcessBroker, Metrics, auth
from tornado_sse.broker import validate_channel
from tornado_sse.hub.access import HubAccess

TIMEOUT = 20
SECRET = "hub-access-secret-for-tests-0123456789"
MASTER = "master-token-for-tests-0123456789"


class AccessStream(EventStreamHandler):
    """What the hub's /events does: valid channels first (400), then the access policy."""

    async def get_channels(self) -> list[str]:  # type: ignore[override]
        channels = self.query_values("channel")
        for channel in channels:
            validate_channel(channel)
        access: HubAccess = self.settings["access"]
        grants = access.authorize_subscribe(self, channels)
        if inspect.isawaitable(grants):  # the --auth-url backend is asked
            await grants
        return channels


class Backend(tornado.web.RequestHandler):
    """The --auth-url backend: its behaviour is the application's ``mode``."""

    async def post(self) -> None:
        settings = self.application.settings
        settings["calls"].append(json.loads(self.request.body))
        mode = settings["mode"]
        if mode == "slow":
            await settings["never"].wait()
        elif mode == "wrong":
            self.finish("this is not JSON")
        elif mode == "500":
            self.send_error(500)
        elif mode == "bad grants":
            self.finish({"subscribe": ["a*b"]})
        elif mode in ("401", "403") or b"session=deny" in self.request.body:
            self.set_status(int(mode) if mode in ("401", "403") else 403)
            self.finish("no")
        else:
            body = json.loads(self.request.body)
            if body["cookie"] != "session=alice":
                self.set_status(401)
                self.finish("who are you?")
                return
            self.finish(
                {"sub": "alice", "subscribe": ["user/alice", "team/*"], "ttl": settings["ttl"]}
            )


@pytest.fixture
def backend(io_loop: Any) -> Iterator[tornado.web.Application]:
    app = tornado.web.Application(
        [(r"/auth", Backend)], calls=[], mode="up", ttl=60, never=asyncio.Event()
    )
    server = HTTPServer(app)
    sockets = bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server.add_sockets(sockets)
    app.settings["port"] = sockets[0].getsockname()[1]
    yield app
    app.settings["never"].set()
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=5)  # no socket left to the collector


@pytest.fixture
def access(backend: tornado.web.Application) -> HubAccess:
    return HubAccess(
        master_token=MASTER,
        verifier=auth.TokenVerifier(secret=SECRET),
        public_channels=["news", "public/*"],
        auth_url=f"http://127.0.0.1:{backend.settings['port']}/auth",
        auth_timeout=0.5,
    )


@pytest.fixture
def app(access: HubAccess) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/events", AccessStream)],
        sse_broker=InProcessBroker(),
        sse_connections=ConnectionSet(prune_interval=0.05),
        sse_metrics=Metrics(),
        access=access,
    )


async def status(port: int, query: str, headers: dict[str, str] | None = None) -> RawStream:
    stream = await RawStream.open(port, "/events?" + query, headers)
    if stream.status == 200:
        await stream.read_until(lambda s: s.parser.retry is not None)
    else:
        await stream.read_to_end()
    stream.close()
    return stream


def shed(stream: RawStream) -> bool:
    return stream.status == 200 and "retry-after" in stream.headers


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_public_channels_need_nothing(port: int, backend: Any) -> None:
    assert (await status(port, "channel=news&channel=public/x")).status == 200
    assert backend.settings["calls"] == []  # the backend is not asked about public channels


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_signed_tokens(port: int, backend: Any) -> None:
    good = auth.create_token(SECRET, subscribe=["user/alice"])
    assert (await status(port, "channel=user/alice&channel=news", bearer(good))).status == 200
    denied = await status(port, "channel=user/bob", bearer(good))
    assert (denied.status, denied.raw) == (403, b"not allowed to follow channel 'user/bob'\n")
    expired = auth.create_token(SECRET, subscribe=["*"], now=0)
    refused = await status(port, "channel=news", bearer(expired))  # never anonymous
    assert (refused.status, refused.raw) == (401, b"token expired\n")
    assert backend.settings["calls"] == []


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_invalid_channel_is_400_before_access(port: int) -> None:
    assert (await status(port, "channel=%20news")).status == 400


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_backend_allows_refuses_and_is_cached(port: int, backend: Any) -> None:
    alice = {"Cookie": "session=alice"}
    assert (await status(port, "channel=user/alice&channel=team/1", alice)).status == 200
    assert (await status(port, "channel=team/2&channel=news", alice)).status == 200
    calls = backend.settings["calls"]
    assert len(calls) == 1  # the second stream used the cached answer
    assert calls[0] == {
        "channels": ["user/alice", "team/1"],
        "cookie": "session=alice",
        "authorization": None,
        "address": "127.0.0.1",
    }
    denied = await status(port, "channel=user/bob", alice)
    assert denied.status == 403 and denied.raw == b"not allowed to follow channel 'user/bob'\n"
    stranger = await status(port, "channel=user/alice", {"Cookie": "session=mallory"})
    assert stranger.status == 401
    assert stranger.headers["www-authenticate"] == "Bearer"
    refused = await status(port, "channel=user/alice", {"Cookie": "session=deny"})
    assert refused.status == 403
    assert len(calls) == 3  # refusals are not cached; other credentials are asked again


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_no_cache_without_ttl(port: int, backend: Any) -> None:
    backend.settings["ttl"] = 0
    for _ in range(2):
        assert (await status(port, "channel=user/alice", {"Cookie": "session=alice"})).status == 200
    assert len(backend.settings["calls"]) == 2


@pytest.mark.gen_test(timeout=TIMEOUT)
@pytest.mark.parametrize("mode", ["slow", "wrong", "500", "bad grants", "down"])
async def test_a_backend_that_cannot_answer_sheds_logged_once(
    port: int,
    backend: Any,
    access: HubAccess,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if mode == "down":
        access.auth_url = f"http://127.0.0.1:{free_port()}/auth"
    backend.settings["mode"] = mode
    caplog.set_level(logging.INFO, logger="tornado_sse.server")
    for _ in range(3):
        stream = await status(port, "channel=user/alice", {"Cookie": "session=alice"})
        assert shed(stream), (mode, stream.status, stream.raw)
    outages = [r for r in caplog.records if "shedding streams" in r.getMessage()]
    assert len(outages) == 1, [r.getMessage() for r in caplog.records]
    assert access.backend_down
    access.auth_url = f"http://127.0.0.1:{backend.settings['port']}/auth"
    backend.settings["mode"] = "up"
    assert (await status(port, "channel=user/alice", {"Cookie": "session=alice"})).status == 200
    assert not access.backend_down
    assert any("answers again" in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test(timeout=TIMEOUT)
@pytest.mark.parametrize(("mode", "code"), [("401", 401), ("403", 403)])
async def test_backend_status_is_passed_on(port: int, backend: Any, mode: str, code: int) -> None:
    backend.settings["mode"] = mode
    stream = await status(port, "channel=user/alice", {"Cookie": "session=alice"})
    assert stream.status == code


def test_closed_hub_describes_how_to_open() -> None:
    closed = HubAccess(master_token=MASTER)
    assert "--public-channel" in closed.describe()
    assert "every stream gets 401" in closed.describe()
    opened = HubAccess(master_token=MASTER, public_channels=["*"])
    assert opened.describe() == "channels are opened by public channels *"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
