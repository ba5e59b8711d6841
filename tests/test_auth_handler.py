"""The handler's share of access control, through a real Tornado server on loopback: a stream
closed at a deadline with a final event (`EventStreamHandler.close_at`, which `tornado_sse.auth`
uses for ``token-expired``), and hooks raising `AuthenticationError` / `AccessDeniedError`.

No token library is needed here: these are the generic mechanisms the token checks build on.
"""

from __future__ import annotations

import time

import pytest
import tornado.web

from tests.helpers import RawStream, wait_until
from tornado_sse import (
    AccessDeniedError,
    AccessUnavailableError,
    AuthenticationError,
    ConnectionSet,
    Event,
    EventStreamHandler,
    InProcessBroker,
    Metrics,
)

TIMEOUT = 15
EXPIRED = Event('{"reason": "deadline"}', event="token-expired")


class Deadline(EventStreamHandler):
    """Closes at ``?in=<seconds>`` from now; sets the deadline before the stream opens."""

    def check_channel(self, channel: str) -> bool:
        self.application.settings["streams"].append(self)
        self.close_at(time.time() + float(self.get_query_argument("in")), EXPIRED)
        return True

    def on_close(self) -> None:
        self.application.settings["closed"].append(self._close_reason)


class Guarded(EventStreamHandler):
    """``X-Token: good`` may follow ``mine``; no header is anonymous; anything else is bad."""

    def get_current_user(self) -> str | None:
        token = self.request.headers.get("X-Token")
        if token == "ask-later":
            raise AccessUnavailableError("the access backend is down")
        if token is None:
            raise AuthenticationError("a token is required", error=None)
        if token != "good":
            raise AuthenticationError("token malformed")
        return "alice"

    def check_channel(self, channel: str) -> bool:
        if self.current_user and channel != "mine":
            raise AccessDeniedError(channel)
        return True


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(history_size=50)


@pytest.fixture
def app(broker: InProcessBroker) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/deadline", Deadline), (r"/guarded", Guarded)],
        sse_broker=broker,
        sse_connections=ConnectionSet(prune_interval=0.05),
        sse_metrics=Metrics(),
        closed=[],
        streams=[],
    )


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_close_at_sends_the_event_after_everything_published_before(
    port: int, broker: InProcessBroker, app: tornado.web.Application
) -> None:
    stream = await RawStream.open(port, "/deadline?channel=a&in=0.5")
    assert stream.status == 200
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    ids = [await broker.publish("a", f"m{i}") for i in range(3)]
    await stream.read_to_end()
    assert [e.data for e in stream.events] == ["m0", "m1", "m2", EXPIRED.data]
    assert stream.events[-1].event == "token-expired"
    assert stream.parser.last_event_id == ids[-1]  # the final event carries no id
    assert stream.last_chunk
    assert app.settings["closed"] == ["deadline"]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_deadline_already_past_closes_after_the_replay(
    port: int, broker: InProcessBroker, app: tornado.web.Application
) -> None:
    first = await broker.publish("a", "old")
    second = await broker.publish("a", "missed")
    stream = await RawStream.open(port, "/deadline?channel=a&in=-10", {"Last-Event-ID": first})
    await stream.read_to_end()
    assert stream.events == [Event("missed", id=second), EXPIRED]
    assert app.settings["closed"] == ["deadline"]


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_stream_that_ends_first_cancels_its_deadline(
    port: int, broker: InProcessBroker, app: tornado.web.Application
) -> None:
    stream = await RawStream.open(port, "/deadline?channel=a&in=3600")
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    stream.close()
    await wait_until(lambda: app.settings["closed"])
    assert app.settings["closed"] == ["client-closed"]
    [handler] = app.settings["streams"]
    assert handler._deadline_timer is None


@pytest.mark.gen_test(timeout=TIMEOUT)
@pytest.mark.parametrize(
    ("headers", "status", "challenge", "message"),
    [
        ({}, 401, "Bearer", "a token is required"),
        ({"X-Token": "bad"}, 401, 'Bearer error="invalid_token"', "token malformed"),
        ({"X-Token": "good"}, 403, None, "not allowed to follow channel 'other'"),
    ],
)
async def test_hooks_raising_access_errors(
    port: int, headers: dict[str, str], status: int, challenge: str | None, message: str
) -> None:
    stream = await RawStream.open(port, "/guarded?channel=mine&channel=other", headers)
    await stream.read_to_end()
    assert stream.status == status
    assert stream.headers.get("www-authenticate") == challenge
    assert stream.headers["content-type"].startswith("text/plain")
    assert stream.raw.decode().strip() == message


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_granted_stream_opens(port: int, broker: InProcessBroker) -> None:
    stream = await RawStream.open(port, "/guarded?channel=mine", {"X-Token": "good"})
    assert stream.status == 200
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_access_unavailable_sheds_the_stream(port: int) -> None:
    """Neither refused for good (EventSource would stop) nor let in: told to retry later."""
    stream = await RawStream.open(port, "/guarded?channel=mine", {"X-Token": "ask-later"})
    await stream.read_to_end()
    assert stream.status == 200
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert int(stream.headers["retry-after"]) >= 1
    assert stream.raw.startswith(b"retry: ")
    assert stream.events == []
