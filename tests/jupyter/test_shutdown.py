"""Stopping the server with open streams: every stream ends cleanly, nothing is left running."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tests.jupyter.conftest import SSEServer
from tests.jupyter.test_events import CONTENTS_SCHEMA
from tornado_sse import BrokerClosedError
from tornado_sse.jupyter import schema_channel


def ours(task: asyncio.Task[object]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and "tornado_sse" in code.co_filename


async def test_shutdown_with_open_streams_is_clean(
    sse_server: SSEServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = sse_server.app
    extension = app.web_app.settings["tornado_sse"]
    events_channel = schema_channel(CONTENTS_SCHEMA)
    streams = [
        await sse_server.stream("jobs"),
        await sse_server.stream("jobs", events_channel),
        await sse_server.stream(events_channel),
    ]
    await sse_server.broker.publish("jobs", "before")
    assert len(extension.connections) == 3

    # an event emitted just before shutdown is still delivered: the extension stops before its
    # listener task has even started, and waits for it
    app.event_logger.emit(schema_id=CONTENTS_SCHEMA, data={"action": "save", "path": "last.txt"})
    with caplog.at_level(logging.WARNING):
        await extension.stop_extension()

    for stream in streams:
        await stream.read_to_end()  # the terminating chunk: a clean end, not a reset
    assert [e.data for e in streams[0].events] == ["before"]
    assert [json.loads(e.data)["path"] for e in streams[2].events] == ["last.txt"]
    assert len(streams[1].events) == 2

    assert len(extension.connections) == 0
    assert extension.broker.closed
    assert not extension.forwarder.attached
    assert [task for task in asyncio.all_tasks() if ours(task)] == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text

    # until the HTTP server stops, late streams are told to come back later, publishes refused
    late = await sse_server.stream("jobs")
    assert late.status == 200 and "retry-after" in late.headers
    await late.read_to_end()
    with pytest.raises(BrokerClosedError):
        await sse_server.broker.publish("jobs", "too late")
    refused = await sse_server.fetch(
        sse_server.path("sse/publish"),
        method="POST",
        headers=sse_server.auth,
        body=json.dumps({"channel": "jobs", "data": "too late"}),
    )
    assert refused.code == 503

    await app.cleanup_extensions()  # what ServerApp does on stop: again, a no-op
