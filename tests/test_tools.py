"""``tornado-sse listen`` and ``tornado-sse publish`` against a real Tornado server on loopback.

The server implements the hub's publish contract (``POST /publish`` -> 202 ``{"id"}``, 401, 400
with a message, 413) on `InProcessBroker` and `EventStreamHandler`, so these tests do not depend
on ``tornado-sse serve``. Commands run through click's CliRunner in a worker thread (the test's
event loop keeps serving meanwhile), and through the installed ``tornado-sse`` script when the
test is about the process: signals, exit status, no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import tornado.web
from click.testing import CliRunner, Result
from tornado.httpclient import AsyncHTTPClient

from tests.helpers import PORT_ATTEMPTS, PORT_TAKEN, RawStream, free_port, wait_until
from tornado_sse import Event, EventStreamHandler, InProcessBroker, InvalidEventError
from tornado_sse.broker.base import validate_channel
from tornado_sse.cli import main
from tornado_sse.errors import InvalidChannelError
from tornado_sse.tools import format_event, publish_url, server_message, stream_url

TIMEOUT = 20
TOKEN = "s3cret-token"
LIMIT = 2000
SCRIPT = Path(sys.executable).with_name("tornado-sse")


class State:
    def __init__(self) -> None:
        self.handlers: list[EventStreamHandler] = []
        self.requests: list[tuple[str, str | None]] = []  # (uri, Last-Event-ID)
        self.published: list[dict[str, Any]] = []
        self.stop = False  # answer further stream requests with 204


class Events(EventStreamHandler):
    @property
    def state(self) -> State:
        return self.application.settings["state"]  # type: ignore[no-any-return]

    async def get(self, *args: Any, **kwargs: Any) -> None:
        self.state.requests.append(
            (self.request.uri or "", self.request.headers.get("Last-Event-ID"))
        )
        if self.state.stop:
            self.set_status(204)
            self.finish()
            return
        await super().get(*args, **kwargs)

    def open(self) -> None:
        self.state.handlers.append(self)


class Publish(tornado.web.RequestHandler):
    """The hub's publish contract, minimal."""

    def reply(self, status: int, payload: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(payload) + "\n")

    async def post(self) -> None:
        scheme, _, given = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), TOKEN.encode()):
            self.reply(401, {"error": "missing or wrong token"})
            return
        if len(self.request.body) > LIMIT:
            self.reply(413, {"error": f"body over {LIMIT} bytes"})
            return
        try:
            payload = json.loads(self.request.body)
            channel = validate_channel(payload.get("channel"))
            data = payload["data"]
            if not isinstance(data, str):
                data = json.dumps(data, separators=(",", ":"))
            broker: InProcessBroker = self.settings["sse_broker"]
            event_id = await broker.publish(
                channel, data, event=payload.get("event"), retry=payload.get("retry")
            )
        except (InvalidChannelError, InvalidEventError) as exc:
            self.reply(400, {"error": str(exc)})
            return
        except (ValueError, KeyError):
            self.reply(400, {"error": "invalid JSON or no data"})
            return
        self.settings["state"].published.append(payload)
        self.reply(202, {"id": event_id})


class Plain(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain")
        self.finish("hello\n")


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker()


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def app(broker: InProcessBroker, state: State) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/events", Events), (r"/publish", Publish), (r"/plain", Plain)],
        sse_broker=broker,
        sse_retry_interval=0.05,
        sse_retry_jitter=0.0,
        sse_heartbeat_interval=0,
        state=state,
    )


async def invoke(
    args: Sequence[str], env: dict[str, str | None] | None = None, **kw: Any
) -> Result:
    """Run ``tornado-sse ARGS`` with CliRunner in a thread: the test's server keeps serving."""
    runner = CliRunner()
    environment: dict[str, str | None] = {"TORNADO_SSE_TOKEN": None, **(env or {})}
    call = asyncio.get_running_loop().run_in_executor(
        None, lambda: runner.invoke(main, list(args), env=environment, **kw)
    )
    return await asyncio.wait_for(call, 15)


def assert_clean_failure(result: Result, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert TOKEN not in result.output


# ---------------------------------------------------------------------- publish


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_publish_prints_the_id_subscribers_see(
    port: int, broker: InProcessBroker, state: State
) -> None:
    stream = await RawStream.open(port, "/events?channel=news")
    base = f"http://127.0.0.1:{port}"
    result = await invoke(
        ["publish", base, "--channel", "news", "--data", "two\nlines ünï", "--event", "update"],
        env={"TORNADO_SSE_TOKEN": TOKEN},
    )
    assert result.exit_code == 0, result.output
    event_id = result.stdout.strip()
    (event,) = await stream.events_count(1)
    assert event == Event(data="two\nlines ünï", event="update", id=event_id)

    # --token, a URL already ending in /publish, --retry, --data - (standard input).
    result = await invoke(
        [
            "publish",
            f"{base}/publish",
            "-c",
            "news",
            "-d",
            "-",
            "--retry",
            "2500",
            "--token",
            TOKEN,
        ],
        input="from stdin",
    )
    assert result.exit_code == 0, result.output
    events = await stream.events_count(2)
    assert events[1] == Event(data="from stdin", id=result.stdout.strip(), retry=2500)
    assert state.published[1] == {"channel": "news", "data": "from stdin", "retry": 2500}
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_publish_errors_are_one_clear_line(port: int, state: State) -> None:
    base = f"http://127.0.0.1:{port}"

    result = await invoke(["publish", base, "-c", "a", "-d", "x", "--token", "wrong"])
    assert_clean_failure(result)
    assert "unauthorized" in result.output and "HTTP 401" in result.output

    result = await invoke(["publish", base, "-c", "a", "-d", "x"])
    assert_clean_failure(result, code=2)
    assert "no token: pass --token or set TORNADO_SSE_TOKEN" in result.output

    result = await invoke(["publish", base, "-c", "has space", "-d", "x", "--token", TOKEN])
    assert_clean_failure(result)
    assert "HTTP 400" in result.output and "invalid channel 'has space'" in result.output

    result = await invoke(["publish", base, "-c", "a", "-d", "x", "-e", "a\nb", "--token", TOKEN])
    assert_clean_failure(result)
    assert "HTTP 400" in result.output and "CR or LF" in result.output

    result = await invoke(["publish", base, "-c", "a", "-d", "x" * LIMIT, "--token", TOKEN])
    assert_clean_failure(result)
    assert "larger than the hub accepts (HTTP 413)" in result.output

    result = await invoke(["publish", base, "-c", "a", "-d", "x", "--retry", "-1", "--token", "t"])
    assert_clean_failure(result, code=2)
    assert "--retry" in result.output

    result = await invoke(["publish", "ftp://example", "-c", "a", "-d", "x", "--token", TOKEN])
    assert_clean_failure(result, code=2)
    assert "not an http:// or https:// URL" in result.output

    refused = f"http://127.0.0.1:{free_port()}"
    result = await invoke(["publish", refused, "-c", "a", "-d", "x", "--token", TOKEN])
    assert_clean_failure(result)
    assert "connection refused" in result.output
    assert state.published == []


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_publish_timeout(port: int) -> None:
    # A server that accepts the connection and never answers.
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    silent_port = server.sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{silent_port}"
        result = await invoke(
            ["publish", url, "-c", "a", "-d", "x", "--token", TOKEN, "--timeout", "0.3"]
        )
        assert_clean_failure(result)
        assert "within 0.3s (timed out)" in result.output
        assert accepted
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------- listen


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_listen_json_resumes_without_loss(
    port: int, broker: InProcessBroker, state: State
) -> None:
    # The listener ends when the server answers 204, as EventSource does.
    run = asyncio.ensure_future(
        invoke(["listen", f"http://127.0.0.1:{port}", "-c", "a", "-c", "b", "--json"])
    )
    await wait_until(lambda: state.handlers)
    ids = [await broker.publish("a", "one"), await broker.publish("b", "two\nlines", event="x")]
    await state.handlers[0].close()
    # Published while the listener reconnects: delivered once, replayed or live.
    ids.append(await broker.publish("a", "during the outage"))
    await wait_until(lambda: len(state.handlers) == 2)
    ids.append(await broker.publish("b", "ünïcode 😀"))
    state.stop = True
    await state.handlers[1].close()
    result = await run

    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [
        {"id": ids[0], "event": "message", "data": "one"},
        {"id": ids[1], "event": "x", "data": "two\nlines"},
        {"id": ids[2], "event": "message", "data": "during the outage"},
        {"id": ids[3], "event": "message", "data": "ünïcode 😀"},
    ]
    assert state.requests[0] == ("/events?channel=a&channel=b", None)
    assert state.requests[1][1] == ids[1]
    assert "connected to" in result.stderr and "reconnecting in" in result.stderr


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_listen_reconnects_a_silent_stream(port: int, state: State) -> None:
    # Heartbeats are off here: with --idle-timeout the listener takes silence for a dead peer.
    run = asyncio.ensure_future(
        invoke(["listen", f"http://127.0.0.1:{port}", "-c", "a", "--idle-timeout", "0.3"])
    )
    await wait_until(lambda: len(state.handlers) >= 2)
    state.stop = True  # the next reconnect gets 204 and the listener ends
    result = await asyncio.wait_for(run, TIMEOUT)
    assert result.exit_code == 0, result.output
    assert "no data from the server for 0.3 s" in result.stderr
    assert state.requests[1][1] is not None  # it resumed from the priming id


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_listen_refusals(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    result = await invoke(["listen", f"{base}/events"])  # no channel: the handler's 400
    assert_clean_failure(result)
    assert "refused the stream (HTTP 400)" in result.output and "channel" in result.output

    result = await invoke(["listen", f"{base}/nowhere", "-c", "a"])
    assert_clean_failure(result)
    assert "HTTP 404" in result.output

    result = await invoke(["listen", f"{base}/plain"])
    assert_clean_failure(result)
    assert "is not an event stream" in result.output and "text/plain" in result.output

    result = await invoke(["listen", "not a url"])
    assert_clean_failure(result, code=2)


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_invalid_urls_are_usage_errors() -> None:
    # "http://this is invalid/" used to pass the scheme-and-host check: publish failed on DNS
    # (exit 1) and listen retried it for ever.
    for url in ("http://this is invalid/", "http://a:99999", "http://a%b/", "http://[zz]/"):
        result = await invoke(["publish", url, "-c", "a", "-d", "x", "--token", TOKEN])
        assert_clean_failure(result, code=2)
        assert "Invalid value for URL: invalid URL" in result.output, url
        result = await invoke(["listen", url, "-c", "a"])
        assert_clean_failure(result, code=2)
        assert "Invalid value for URL: invalid URL" in result.output, url


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_listen_process_exits_cleanly_on_ctrl_c(
    port: int, broker: InProcessBroker, state: State
) -> None:
    assert SCRIPT.exists(), SCRIPT
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT),
        "listen",
        f"http://127.0.0.1:{port}/",
        "--channel",
        "room",
        "--last-event-id",
        "not-in-history",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        connected = await asyncio.wait_for(process.stderr.readline(), 15)
        assert connected.startswith(b"connected to http://127.0.0.1:")
        reset = await asyncio.wait_for(process.stdout.readline(), 10)
        assert reset.startswith(b"stream-reset\t")
        event_id = await broker.publish("room", "first\nsecond", event="chat")
        lines = [await asyncio.wait_for(process.stdout.readline(), 10) for _ in range(2)]
        assert lines == [f"chat\t{event_id}\tfirst\n".encode(), b"\t\tsecond\n"]
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 10)
        stderr = await process.stderr.read()
        assert code == 0, stderr
        assert b"Traceback" not in stderr
        await wait_until(lambda: not broker.subscriber_counts().get("room"))
        assert state.requests[0] == ("/events?channel=room", "not-in-history")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# ---------------------------------------------------------------------- the real hub


async def run_script(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 15)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.gen_test(timeout=30)
async def test_listen_and_publish_with_tornado_sse_serve() -> None:
    """The three commands together, each its own process, as an operator would run them."""
    listener: asyncio.subprocess.Process | None = None
    hub: asyncio.subprocess.Process | None = None
    stack = contextlib.ExitStack()
    try:
        client = AsyncHTTPClient()
        for _ in range(PORT_ATTEMPTS):  # a port taken in between: try another
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            log = stack.enter_context(tempfile.TemporaryFile())
            hub = await asyncio.create_subprocess_exec(
                str(SCRIPT),
                *("serve", "--host", "127.0.0.1", "--port", str(port), "--token", TOKEN),
                *("--public-channel", "*"),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )

            async def up(hub: asyncio.subprocess.Process = hub, base: str = base) -> bool:
                if hub.returncode is not None:
                    return True
                try:
                    return (await client.fetch(f"{base}/healthz", raise_error=False)).code == 200
                except OSError:
                    return False

            await wait_until(up, timeout=15, interval=0.05)
            if hub.returncode is None:
                break
            log.seek(0)
            error = log.read().decode(errors="replace")
            assert PORT_TAKEN in error, error
        assert hub is not None and hub.returncode is None, "no free port in five attempts"
        listener = await asyncio.create_subprocess_exec(
            str(SCRIPT),
            *("listen", base, "-c", "room", "--json"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert listener.stdout is not None and listener.stderr is not None
        connected = await asyncio.wait_for(listener.stderr.readline(), 15)
        assert connected.startswith(b"connected to")

        code, out, err = await run_script(
            "publish", base, "-c", "room", "-d", "hé\nllo", "-e", "chat", "--token", TOKEN
        )
        assert code == 0, err
        line = await asyncio.wait_for(listener.stdout.readline(), 10)
        assert json.loads(line) == {"id": out.strip(), "event": "chat", "data": "hé\nllo"}

        code, out, err = await run_script("publish", base, "-c", "room", "-d", "x", "--token", "no")
        assert (code, out) == (1, "")
        assert "unauthorized (HTTP 401)" in err and "Traceback" not in err
        code, out, err = await run_script("publish", base, "-c", "a b", "-d", "x", "--token", TOKEN)
        assert code == 1 and "(HTTP 400): invalid channel 'a b'" in err
        big = b"x" * (1 << 20)
        code, out, err = await run_script(
            "publish", base, "-c", "room", "-d", "-", "--token", TOKEN, stdin=big
        )
        assert code == 1 and "larger than the hub accepts (HTTP 413)" in err

        listener.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(listener.wait(), 10) == 0
    finally:
        for process in (listener, hub):
            if process is not None and process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), 10)
        stack.close()


# ---------------------------------------------------------------------- helpers


def test_urls_and_formats() -> None:
    assert stream_url("http://h:1", ("a", "b/c")) == "http://h:1/events?channel=a&channel=b%2Fc"
    assert stream_url("http://h:1/", ()) == "http://h:1/events"
    assert stream_url("https://h/feed?x=1", ("a",)) == "https://h/feed?x=1&channel=a"
    assert publish_url("http://h:1") == "http://h:1/publish"
    assert publish_url("http://h:1/hub/") == "http://h:1/hub/publish"
    assert publish_url("http://h:1/publish") == "http://h:1/publish"
    assert server_message(b'{"error": "bad channel"}\n') == "bad channel"
    assert server_message(b"<html>\nNot Found</html>") == "<html>"
    assert server_message("x" * 400).endswith("...")

    event = Event(data="a\n\nb", event=None, id="7")
    assert format_event(event, as_json=False) == "message\t7\ta\n\t\t\n\t\tb"
    assert json.loads(format_event(event, as_json=True)) == {
        "id": "7",
        "event": "message",
        "data": "a\n\nb",
    }
    assert format_event(Event(data="x", retry=10), as_json=False) == "message\t-\tx"
    assert json.loads(format_event(Event(data="x", retry=10), as_json=True))["retry"] == 10
