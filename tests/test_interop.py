"""Interoperability: an independent client (httpx + httpx-sse) reads what we serve.

httpx-sse shares no code with tornado_sse: its line splitter and field decoder are its own. Every
case is read by httpx-sse and by our `EventSource` at the same time, and both must yield exactly
what was published: if our encoder and our parser shared a mistake, httpx-sse would catch it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
import tornado.web
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.helpers import wait_until
from tornado_sse import Event, EventStreamHandler, InProcessBroker
from tornado_sse.client import EventSource

TIMEOUT = 20

#: (data, event name) published in order; the comment says what each case probes
CASES: list[tuple[str, str | None]] = [
    ("plain", None),
    ("lf\nseparated", None),
    ("cr\rseparated", None),
    ("crlf\r\nseparated", None),
    ("mixed\r\n\r\nends\n\rhere", None),  # CRLF CRLF, then LF CR: two blank data lines
    ("trailing line break\n", None),
    ("\n", None),  # two empty data lines
    ("", None),  # empty data is still dispatched
    ("emoji 😀🎉 and ünïcödé, 中文", None),
    ("U+2028\u2028U+2029\u2029NEL\x85VT\x0bFF\x0c stay inside one line", None),
    ("  leading spaces, : colons: and data: look-alikes", None),
    ("id: 1\nevent: forged\n\ndata: injected", None),  # stays one event
    ("named", "greeting"),
    ("named, multi\nline", "update"),
    ("", "empty-named"),
]


def expected(data: str) -> str:
    """What any conformant client yields for published *data*: lines joined by LF."""
    return data.replace("\r\n", "\n").replace("\r", "\n")


class Raw(tornado.web.RequestHandler):
    """Serves fixed bytes, for line endings our encoder never writes."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.finish(self.application.settings["raw"])


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker()


@pytest.fixture
def app(broker: InProcessBroker) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/events", EventStreamHandler), (r"/raw", Raw)],
        sse_broker=broker,
        sse_heartbeat_interval=0,
        raw=b"",
    )


async def read_httpx(url: str, count: int) -> list[ServerSentEvent]:
    """The first *count* events httpx-sse yields for *url*."""
    events: list[ServerSentEvent] = []
    async with (
        httpx.AsyncClient(trust_env=False, timeout=10) as client,
        aconnect_sse(client, "GET", url) as source,
    ):
        assert source.response.status_code == 200
        async for sse in source.aiter_sse():
            events.append(sse)
            if len(events) == count:
                break
    return events


async def read_ours(source: EventSource, count: int) -> list[Event]:
    events: list[Event] = []
    async for event in source:
        events.append(event)
        if len(events) == count:
            break
    return events


async def publish_and_read(
    port: int, broker: InProcessBroker, cases: Sequence[tuple[str, str | None]]
) -> tuple[list[str], list[ServerSentEvent], list[Event]]:
    url = f"http://127.0.0.1:{port}/events?channel=interop"
    source = EventSource(url)
    try:
        # httpx-sse also yields the retry: block and the id-only event that prime a stream.
        theirs = asyncio.ensure_future(read_httpx(url, len(cases) + 2))
        ours = asyncio.ensure_future(read_ours(source, len(cases)))
        await wait_until(lambda: broker.subscriber_counts().get("interop") == 2)
        ids = [await broker.publish("interop", data, event=name) for data, name in cases]
        httpx_events, our_events = await asyncio.wait_for(asyncio.gather(theirs, ours), 15)
    finally:
        await source.aclose()
    return ids, httpx_events, our_events


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_httpx_sse_reads_every_case(port: int, broker: InProcessBroker) -> None:
    ids, theirs, ours = await publish_and_read(port, broker, CASES)
    retry, priming = theirs[:2]
    assert retry.retry is not None and retry.retry >= 3000
    assert priming.data == "" and priming.id
    got = [(sse.data, sse.event, sse.id) for sse in theirs[2:]]
    want = [
        (expected(data), name or "message", id) for (data, name), id in zip(CASES, ids, strict=True)
    ]
    assert got == want
    assert [(e.data, e.event or "message", e.id) for e in ours] == want


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_large_multibyte_event_across_reads(port: int, broker: InProcessBroker) -> None:
    # Large enough to be split across many socket reads, so a multi-byte UTF-8 character and the
    # CRLF pairs fall on read boundaries somewhere.
    data = "\r\n".join(f"line {i} 😀 é 中" for i in range(20000))
    ids, theirs, ours = await publish_and_read(port, broker, [(data, "big")])
    assert [(s.data, s.event, s.id) for s in theirs[2:]] == [(expected(data), "big", ids[0])]
    assert [(e.data, e.event, e.id) for e in ours] == [(expected(data), "big", ids[0])]


@pytest.mark.gen_test(timeout=TIMEOUT)
@pytest.mark.parametrize("newline", [b"\n", b"\r", b"\r\n"], ids=["LF", "CR", "CRLF"])
async def test_wire_line_endings(port: int, app: tornado.web.Application, newline: bytes) -> None:
    lines = [
        b": a comment",
        b"id: 7",
        b"event: first",
        b"data: one",
        b"data:two",  # no space after the colon
        b"unknown: ignored",
        b"",
        b"data",  # a field name alone: empty data
        b"",
        b"data: x\xe2\x80\xa8y",  # U+2028 in UTF-8
        b"retry: 1500",
        b"",
        b"data: dropped, no blank line at the end",
    ]
    app.settings["raw"] = newline.join(lines)
    url = f"http://127.0.0.1:{port}/raw"
    want: list[tuple[Any, ...]] = [
        ("one\ntwo", "first", "7"),
        ("", "message", "7"),
        ("x\u2028y", "message", "7"),
    ]
    theirs = await asyncio.wait_for(read_httpx(url, 3), 10)
    assert [(s.data, s.event, s.id) for s in theirs] == want
    assert theirs[2].retry == 1500

    source = EventSource(url, reconnect=False)
    ours = await asyncio.wait_for(read_ours(source, 99), 10)
    assert [(e.data, e.event or "message", source.last_event_id) for e in ours] == want
    assert ours[2].retry == 1500 and source.retry == 1.5
