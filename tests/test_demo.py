# ruff: noqa: F811  (redis fixtures imported from tests.redis_server, used as parameters)
"""The chat demo through its HTTP API, on real Tornado servers on loopback (no browser).

Two demo applications sharing one broker stand for two processes (what the bridge and Redis
backends do across processes): presence, history and the server-side drop must work across them.
A page's member list is the snapshot it got on entry with every join and leave of its stream
applied (`members`), as the page does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import tornado.web
from click.testing import CliRunner
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets
from tornado_sse.demo.app import make_app
from tornado_sse.demo.chat import Chat, ChatConfig

from tests.helpers import PORT_ATTEMPTS, PORT_TAKEN, RawStream, free_port, listens_on, wait_until
from tests.redis_server import redis_server, redis_url  # noqa: F401
from tornado_sse import Event, InProcessBroker, RateLimiter
from tornado_sse.cli import main

BASE = ChatConfig(
    history=5,
    nick_burst=100,
    nick_rate=100.0,
    address_burst=1000,
    address_rate=1000.0,
)


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(history_size=200)


@pytest.fixture
def config(request: pytest.FixtureRequest) -> ChatConfig:
    return getattr(request, "param", BASE)


@pytest.fixture
def grace(request: pytest.FixtureRequest) -> float:
    """The presence grace period (``sse_presence_grace``) of the apps of a test."""
    return float(getattr(request, "param", 0.3))


@pytest.fixture
def app(
    io_loop: IOLoop, broker: InProcessBroker, config: ChatConfig, grace: float
) -> Iterator[tornado.web.Application]:
    application = make_app(
        broker,
        config,
        sse_retry_interval=0.1,
        sse_max_buffer_size=16 << 10,
        sse_presence_grace=grace,
    )
    yield application
    io_loop.run_sync(application.settings["demo_chat"].close)


def chat_of(app: tornado.web.Application) -> Chat:
    chat: Chat = app.settings["demo_chat"]
    return chat


class Client:
    """A browser stand-in: keeps the XSRF cookie, posts forms, opens the room's stream."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.http = AsyncHTTPClient()
        self.headers: dict[str, str] = {}

    async def load_page(self, query: str = "") -> HTTPResponse:
        response = await self.http.fetch(f"{self.base}/{query}")
        cookie = response.headers["Set-Cookie"]
        token = cookie.split(";")[0].partition("=")[2]
        self.headers = {"Cookie": f"_xsrf={token}", "X-XSRFToken": token}
        return response

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        response = await self.http.fetch(self.base + path, raise_error=False)
        return response.code, json.loads(response.body)

    async def post(self, path: str, **fields: str) -> tuple[int, dict[str, Any], HTTPResponse]:
        response = await self.http.fetch(
            self.base + path,
            method="POST",
            body=urllib.parse.urlencode(fields),
            headers=self.headers,
            raise_error=False,
        )
        return response.code, json.loads(response.body), response

    async def say(self, room: str, nick: str, text: str) -> str:
        code, body, _ = await self.post(f"/api/rooms/{room}/messages", nick=nick, text=text)
        assert code == 201, body
        return str(body["id"])

    async def enter(self, room: str, nick: str) -> tuple[dict[str, Any], RawStream]:
        code, info = await self.get(f"/api/rooms/{room}?nick={urllib.parse.quote(nick)}")
        assert code == 200, info
        stream = await RawStream.open(self.port, info["events"])
        assert stream.status == 200
        stream.members_on_entry = info["members"]  # type: ignore[attr-defined]
        return info, stream


def messages(stream: RawStream) -> list[str]:
    return [json.loads(e.data or "")["text"] for e in stream.events if e.event is None]


def notices(stream: RawStream) -> list[tuple[str, str]]:
    return [
        (e.event, json.loads(e.data or "")["user"])
        for e in stream.events
        if e.event in ("join", "leave")
    ]


def members(stream: RawStream) -> list[str]:
    """The member list as the page shows it: the snapshot it got on entry, then every join and
    leave of its stream applied in order (replayed ones included)."""
    present = set(getattr(stream, "members_on_entry", []))
    for kind, nick in notices(stream):
        if kind == "join":
            present.add(nick)
        else:
            present.discard(nick)
    return sorted(present, key=lambda n: (n.casefold(), n))


def has_notice(kind: str, nick: str) -> Any:
    return lambda s: (kind, nick) in notices(s)


def listen_another(app: tornado.web.Application) -> tuple[HTTPServer, int]:
    """Serve *app* on a second port of this loop (a second demo process)."""
    [sock] = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(app)
    server.add_sockets([sock])
    return server, int(sock.getsockname()[1])


# ---------------------------------------------------------------------- page and input


@pytest.mark.gen_test(timeout=10)
async def test_page_escapes_user_input_and_locks_down_scripts(port: int) -> None:
    client = Client(port)
    response = await client.load_page('?room="><script>alert(1)</script>')
    page = response.body.decode()
    assert "<script>alert(1)" not in page
    assert 'value="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in page
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert client.headers["X-XSRFToken"]
    for name in ("chat.js", "chat.css"):
        static = await client.http.fetch(f"{client.base}/static/{name}")
        assert static.code == 200
    script = (await client.http.fetch(f"{client.base}/static/chat.js")).body.decode()
    assert re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", script) is None
    assert ".textContent = " in script


@pytest.mark.gen_test(timeout=10)
async def test_post_needs_the_xsrf_token(port: int) -> None:
    client = Client(port)
    code, body, _ = await client.post("/api/rooms/lobby/messages", nick="alice", text="hi")
    assert code == 403
    assert "reload the page" in body["error"]
    await client.load_page()
    client.headers["X-XSRFToken"] = client.headers["X-XSRFToken"][:-3] + "abc"
    code, body, _ = await client.post("/api/rooms/lobby/messages", nick="alice", text="hi")
    assert code == 403
    await client.load_page()
    assert await client.say("lobby", "alice", "hi")


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize(
    ("path", "fields", "message"),
    [
        ("/api/rooms/lobby/messages", {"nick": "", "text": "hi"}, "Choose a nickname"),
        ("/api/rooms/lobby/messages", {"nick": "x" * 33, "text": "hi"}, "at most 32"),
        ("/api/rooms/lobby/messages", {"nick": "<b>bob</b>", "text": "hi"}, "letters, digits"),
        ("/api/rooms/lobby/messages", {"nick": "bob;", "text": "hi"}, "letters, digits"),
        ("/api/rooms/lobby/messages", {"nick": "bob", "text": "   "}, "empty"),
        ("/api/rooms/lobby/messages", {"nick": "bob", "text": "y" * 501}, "at most 500"),
        ("/api/rooms/Bad%20Room/messages", {"nick": "bob", "text": "hi"}, "room name"),
        ("/api/rooms/lobby/drop", {"client": "short"}, "client id"),
    ],
)
async def test_bad_input_gets_400_with_a_message(
    port: int, path: str, fields: dict[str, str], message: str
) -> None:
    client = Client(port)
    await client.load_page()
    code, body, response = await client.post(path, **fields)
    assert code == 400
    assert message in body["error"]
    assert response.headers["Content-Type"].startswith("application/json")


@pytest.mark.gen_test(timeout=10)
async def test_nicknames_allow_unicode_letters_and_spaces(port: int) -> None:
    client = Client(port)
    await client.load_page()
    code, info = await client.get("/api/rooms/lobby?nick=%20Zo%C3%AB%20de_la-Cruz.2%20")
    assert code == 200
    assert info["nick"] == "Zoë de_la-Cruz.2"
    assert await client.say("lobby", "Zoë de_la-Cruz.2", "x" * 500)
    code, info = await client.get("/api/rooms/lobby")
    assert (code, info["error"]) == (400, "Choose a nickname.")


@pytest.mark.gen_test(timeout=10)
async def test_stream_refuses_bad_nickname_with_plain_text(port: int) -> None:
    stream = await RawStream.open(port, "/api/rooms/lobby/events?nick=%3Cb%3E&client=abcdefgh12")
    assert stream.status == 400
    assert stream.headers["content-type"].startswith("text/plain")
    await stream.read_to_end()
    assert b"letters, digits" in stream.raw
    stream.close()


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("config", [replace(BASE, nick_burst=3, nick_rate=0.01)], indirect=True)
async def test_rate_limit_per_nickname(port: int, config: ChatConfig) -> None:
    client = Client(port)
    await client.load_page()
    for i in range(3):
        await client.say("lobby", "alice", f"m{i}")
    code, body, response = await client.post("/api/rooms/lobby/messages", nick="Alice", text="x")
    assert code == 429
    assert body["error"].startswith("Slow down: 3 messages at once")
    assert int(response.headers["Retry-After"]) >= 1
    assert await client.say("lobby", "bob", "another nickname has its own bucket")


def test_the_chat_uses_the_core_token_bucket() -> None:
    chat = Chat(InProcessBroker(), replace(BASE, nick_burst=2, nick_rate=0.5))
    assert isinstance(chat.nick_limiter, RateLimiter)
    assert (chat.nick_limiter.rate, chat.nick_limiter.burst) == (0.5, 2)
    assert isinstance(chat.address_limiter, RateLimiter)


# ---------------------------------------------------------------------- history and presence


@pytest.mark.gen_test(timeout=10)
async def test_history_on_entry_is_the_rooms_last_events(port: int) -> None:
    client = Client(port)
    await client.load_page()
    for i in range(7):
        await client.say("history", f"user{i % 3}", f"m{i}")
    _, stream = await client.enter("history", "zed")
    await stream.read_until(has_notice("join", "zed"))
    assert messages(stream) == ["m2", "m3", "m4", "m5", "m6"]
    assert members(stream) == ["zed"]
    stream.close()


@pytest.mark.gen_test(timeout=10)
async def test_presence_join_and_leave(port: int, app: tornado.web.Application) -> None:
    client = Client(port)
    await client.load_page()
    _, alice = await client.enter("room1", "alice")
    await alice.read_until(lambda s: members(s) == ["alice"])
    _, bob = await client.enter("room1", "Bob")
    await alice.read_until(lambda s: members(s) == ["alice", "Bob"])
    await bob.read_until(lambda s: members(s) == ["alice", "Bob"])
    await alice.read_until(has_notice("join", "Bob"))
    code, info = await client.get("/api/rooms/room1?nick=carol")
    assert code == 200
    assert info["members"] == ["alice", "Bob"]
    bob.close()
    await alice.read_until(lambda s: members(s) == ["alice"])
    await alice.read_until(has_notice("leave", "Bob"))
    assert notices(alice) == [("join", "alice"), ("join", "Bob"), ("leave", "Bob")]
    presence = await app.settings["sse_broker"].presence("room/room1")
    assert presence.users == {"alice": 1}
    alice.close()


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("grace", [60.0], indirect=True)
@pytest.mark.parametrize("closed_first", [False, True])
async def test_leave_is_announced_at_once_despite_the_grace_period(
    port: int, app: tornado.web.Application, grace: float, closed_first: bool
) -> None:
    client = Client(port)
    await client.load_page()
    _, alice = await client.enter("leaving", "alice")
    info, bob = await client.enter("leaving", "bob")
    await alice.read_until(lambda s: members(s) == ["alice", "bob"])
    if closed_first:
        # The tab closed: its connection ended before its leave request arrived.
        bob.close()
        room = await chat_of(app).room("leaving")
        await wait_until(lambda: {s.nick for s in room.streams} == {"alice"})
    code, _, _ = await client.post("/api/rooms/leaving/leave", client=info["client"])
    assert code == 202
    if not closed_first:
        await bob.read_to_end()  # closed by the server, as a leave
        bob.close()
    await alice.read_until(has_notice("leave", "bob"), timeout=5)
    assert members(alice) == ["alice"]
    alice.close()


@pytest.mark.gen_test(timeout=15)
@pytest.mark.parametrize("grace", [60.0], indirect=True)
@pytest.mark.parametrize("config", [replace(BASE, history=50)], indirect=True)
async def test_a_member_reconnecting_is_listed_for_a_newcomer_past_the_replay(
    port: int, broker: InProcessBroker, config: ChatConfig, grace: float
) -> None:
    """bob's connection dropped and his page is reconnecting (within the grace period): he has
    no stream, and his join is older than the newcomer's replay, yet for everybody he never left,
    so the newcomer lists him too."""
    client = Client(port)
    await client.load_page()
    info, bob = await client.enter("gap", "bob")
    await bob.read_until(has_notice("join", "bob"))
    code, _, _ = await client.post("/api/rooms/gap/drop", client=info["client"])
    assert code == 202
    await bob.read_to_end()
    bob.close()

    async def bob_has_no_stream() -> bool:
        return "bob" not in (await broker.presence("room/gap")).users

    await wait_until(bob_has_no_stream)
    for i in range(config.history + 10):
        await client.say("gap", "alice", f"m{i}")
    _, carol = await client.enter("gap", "carol")
    await carol.read_until(has_notice("join", "carol"))
    assert ("join", "bob") not in notices(carol)  # older than the last 50 events
    assert messages(carol)[-1] == f"m{config.history + 9}"
    assert members(carol) == ["bob", "carol"]
    carol.close()


@pytest.mark.gen_test(timeout=15)
async def test_presence_history_and_drop_across_two_processes(
    port: int, app: tornado.web.Application, broker: InProcessBroker, config: ChatConfig
) -> None:
    other = make_app(broker, config, sse_retry_interval=0.1, sse_presence_grace=0.3)
    server, other_port = listen_another(other)
    try:
        here, there = Client(port), Client(other_port)
        await here.load_page()
        await there.load_page()
        for i in range(3):
            await here.say("shared", "alice", f"before {i}")
        _, alice = await here.enter("shared", "alice")
        # The second process follows the room only now: a newcomer there still gets the room's
        # history (history=N is read from the broker, whichever process serves the stream).
        _, bob = await there.enter("shared", "bob")
        await bob.read_until(has_notice("join", "bob"))
        assert messages(bob)[:3] == ["before 0", "before 1", "before 2"]
        for stream in (alice, bob):
            await stream.read_until(lambda s: members(s) == ["alice", "bob"])
        await there.say("shared", "bob", "from the other process")
        await alice.read_until(lambda s: "from the other process" in messages(s))
        # A drop requested on one process closes the stream held by the other.
        info, carol = await there.enter("shared", "carol")
        await carol.read_until(has_notice("join", "carol"))
        code, _, _ = await here.post("/api/rooms/shared/drop", client=info["client"])
        assert code == 202
        await carol.read_to_end()
        carol.close()
        # bob's connection to the other process is lost, and he does not come back: he leaves
        # after the grace period (a worker killed for real: test_demo_browser.py)
        bob.close()
        await alice.read_until(has_notice("leave", "bob"), timeout=5)
        await alice.read_until(lambda s: members(s) == ["alice"])
        assert notices(alice).count(("join", "bob")) == 1
        alice.close()
        bob.close()
    finally:
        server.stop()
        chat_of(other).close()


# ---------------------------------------------------------------------- production behaviour


@pytest.mark.gen_test(timeout=10)
@pytest.mark.parametrize("grace", [30.0], indirect=True)
async def test_dropped_stream_resumes_with_exactly_the_missed_messages(
    port: int, grace: float
) -> None:
    client = Client(port)
    await client.load_page()
    await client.say("resume", "alice", "m0")
    info, bob = await client.enter("resume", "bob")
    await bob.read_until(has_notice("join", "bob"))
    await client.say("resume", "alice", "m1")
    await bob.read_until(lambda s: "m1" in messages(s))
    last = bob.parser.last_event_id
    code, _, _ = await client.post("/api/rooms/resume/drop", client=info["client"])
    assert code == 202
    await bob.read_to_end()
    bob.close()
    missed = [await client.say("resume", "alice", f"missed {i}") for i in range(3)]
    # What the browser does: the same URL (with history=N), plus Last-Event-ID, which wins.
    again = await RawStream.open(port, info["events"], {"Last-Event-ID": last})
    await again.read_until(lambda s: "missed 2" in messages(s))
    await client.say("resume", "alice", "live")
    await again.read_until(lambda s: "live" in messages(s))
    assert messages(again) == ["missed 0", "missed 1", "missed 2", "live"]
    assert [e.id for e in again.events if e.event is None][:3] == missed
    # The grace period hid the drop: no leave, no second join.
    assert notices(again) == []
    again.close()


@pytest.mark.gen_test(timeout=20)
async def test_a_stalled_tab_is_cut_off_and_does_not_slow_the_others(
    port: int, app: tornado.web.Application
) -> None:
    chat = chat_of(app)
    client = Client(port)
    code, info = await client.get("/api/rooms/slow?nick=stalled")
    assert code == 200
    stalled = await RawStream.open(port, info["events"], rcvbuf=4096)
    _, fast = await client.enter("slow", "reader")
    room = await chat.room("slow")
    await wait_until(lambda: {s.nick for s in room.streams} == {"stalled", "reader"})
    # Events far larger than chat messages, to fill the kernel's socket buffers quickly.
    text = "z" * 16_000
    sent = 0
    while "stalled" in {s.nick for s in room.streams}:
        await chat.post(room, "flood", f"{sent} {text}")
        sent += 1
        await fast.read_until(lambda s, n=sent: len(messages(s)) == n)
        assert sent < 1000, "the stalled stream was never cut off"
    for _ in range(3):
        await chat.post(room, "flood", f"{sent} {text}")
        sent += 1
    await fast.read_until(lambda s: len(messages(s)) == sent)
    assert [m.split()[0] for m in messages(fast)] == [str(i) for i in range(sent)]
    assert app.settings["sse_metrics"].slow_disconnects == 1
    stalled.close()
    fast.close()


@pytest.mark.gen_test(timeout=10)
async def test_shutdown_event_reaches_the_page(port: int, app: tornado.web.Application) -> None:
    client = Client(port)
    _, stream = await client.enter("bye", "alice")
    await stream.read_until(has_notice("join", "alice"))
    await app.settings["sse_connections"].close(Event("restarting", event="shutdown"))
    await stream.read_to_end()
    assert stream.events[-1].event == "shutdown"
    stream.close()


class DemoProcess:
    """``tornado-sse demo`` run for real in a subprocess (stopped with SIGTERM)."""

    def __init__(self, *args: str) -> None:
        for _ in range(PORT_ATTEMPTS):  # a port taken in between: try another
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log = tempfile.TemporaryFile()
            command = [sys.executable, "-m", "tornado_sse.cli", "demo", "--port", str(self.port)]
            self.process = subprocess.Popen([*command, *args], stdout=self.log, stderr=self.log)
            if listens_on(self.process, self.port) or PORT_TAKEN not in self.output():
                break
            self.log.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def healthz(self) -> dict[str, str]:
        """Headers of a ``/healthz`` answer (which process answered, which runs the hub)."""
        with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
            assert response.status == 200
            return {k.lower(): v for k, v in response.headers.items()}

    def wait_ready(self, timeout: float = 15.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, "the demo exited:\n" + self.output()
            try:
                return self.healthz()
            except OSError:
                pass
            assert time.monotonic() < deadline, "the demo did not start:\n" + self.output()
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            raise AssertionError("the demo did not stop on SIGTERM:\n" + self.output()) from None
        finally:
            self.log.close()


def test_processes_share_rooms_and_a_killed_worker_is_replaced() -> None:
    demo = DemoProcess("--processes", "3", "--presence-grace", "5", "--retry", "200")
    try:
        hub = demo.wait_ready()["x-demo-hub"]
        asyncio.run(asyncio.wait_for(_killed_worker_scenario(demo, hub), 30))
    finally:
        code = demo.stop()
    assert code == 0, demo.output()


async def _killed_worker_scenario(demo: DemoProcess, hub: str) -> None:
    client = Client(demo.port)
    await client.load_page()
    for i in range(3):
        await client.say("workers", "bob", f"before {i}")
    # A stream held by a worker that does not run the hub (killing the hub is the bridge's
    # failover, tested there).
    for _ in range(50):
        info, alice = await client.enter("workers", "alice")
        worker = alice.headers["x-demo-process"]
        if worker != hub:
            break
        alice.close()
    else:
        raise AssertionError("every stream landed on the hub's process")
    await alice.read_until(has_notice("join", "alice"))
    assert messages(alice) == ["before 0", "before 1", "before 2"]
    last = alice.parser.last_event_id
    pids = {demo.healthz()["x-demo-process"] for _ in range(10)} | {worker}
    os.kill(int(worker), signal.SIGKILL)
    await alice.read_to_end()
    alice.close()
    # Other nicknames than bob's: the demo's real rate limit (5 at once, then 1 per second per
    # nickname) is per process, and these may all land on one.
    missed = [await client.say("workers", "carol", f"missed {i}") for i in range(3)]
    again = await RawStream.open(demo.port, info["events"], {"Last-Event-ID": last})
    assert again.headers["x-demo-process"] != worker
    await client.say("workers", "dave", "live")
    await again.read_until(lambda s: "live" in messages(s))
    assert messages(again) == ["missed 0", "missed 1", "missed 2", "live"]
    assert [e.id for e in again.events if e.event is None][:3] == missed
    again.close()

    def replaced() -> bool:
        return demo.healthz()["x-demo-process"] not in pids

    await wait_until(replaced, timeout=10, interval=0.05)


def test_two_servers_share_rooms_through_redis(redis_url: str) -> None:
    room = f"redis-{uuid.uuid4().hex[:8]}"
    first = DemoProcess("--redis", redis_url, "--presence-grace", "5", "--retry", "200")
    second = DemoProcess("--redis", redis_url, "--presence-grace", "5", "--retry", "200")
    try:
        first.wait_ready()
        second.wait_ready()
        asyncio.run(asyncio.wait_for(_redis_scenario(first, second, room), 30))
    finally:
        codes = [first.stop(), second.stop()]
    assert codes == [0, 0], first.output() + second.output()


async def _redis_scenario(first: DemoProcess, second: DemoProcess, room: str) -> None:
    one, two = Client(first.port), Client(second.port)
    await one.load_page()
    await two.load_page()
    for i in range(2):
        await one.say(room, "alice", f"before {i}")
    _, bob = await two.enter(room, "bob")
    await bob.read_until(has_notice("join", "bob"))
    assert messages(bob) == ["before 0", "before 1"]
    info, alice = await one.enter(room, "alice")
    for stream in (alice, bob):
        await stream.read_until(lambda s: members(s) == ["alice", "bob"])
    await two.say(room, "bob", "hello from the second server")
    await alice.read_until(lambda s: "hello from the second server" in messages(s))
    last = alice.parser.last_event_id
    code, _, _ = await two.post(f"/api/rooms/{room}/drop", client=info["client"])
    assert code == 202
    await alice.read_to_end()
    alice.close()
    await two.say(room, "bob", "while alice was away")
    again = await RawStream.open(second.port, info["events"], {"Last-Event-ID": last})
    await one.say(room, "carol", "live")
    await again.read_until(lambda s: "live" in messages(s))
    assert messages(again) == ["while alice was away", "live"]
    again.close()
    bob.close()


def test_command_line_errors() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--redis", " "])
    assert result.exit_code == 2
    assert "--redis" in result.output
    result = runner.invoke(main, ["demo", "--port", "70000"])
    assert result.exit_code == 2
    for grace in ("nan", "-1", "601"):
        result = runner.invoke(main, ["demo", "--port", "0", "--presence-grace", grace])
        assert result.exit_code == 2, result.output
        assert "--presence-grace" in result.output
    result = runner.invoke(main, ["demo", "--help"])
    assert result.exit_code == 0
    assert "--processes" in result.output and "--presence-grace" not in result.output
