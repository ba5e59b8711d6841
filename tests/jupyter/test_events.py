"""The server's event bus (serverapp.event_logger) as resumable event streams."""

from __future__ import annotations

import json

import pytest

from tests.helpers import RawStream
from tests.jupyter.conftest import SSEServer, primed_id, server_config
from tornado_sse.jupyter import schema_channel

CONTENTS_SCHEMA = "https://events.jupyter.org/jupyter_server/contents_service/v1"
LISTED = "https://events.example.org/tornado-sse-test/listed/v1"
UNLISTED = "https://events.example.org/tornado-sse-test/unlisted/v1"


def schema(schema_id: str) -> dict[str, object]:
    return {
        "$id": schema_id,
        "version": "1",
        "title": "test events",
        "description": "emitted by the tests",
        "type": "object",
        "properties": {"step": {"title": "step", "type": "integer"}},
        "required": ["step"],
    }


async def save_file(server: SSEServer, name: str, text: str) -> None:
    response = await server.fetch(
        server.path("api/contents", name),
        method="PUT",
        headers=server.auth,
        body=json.dumps({"type": "file", "format": "text", "content": text}),
    )
    assert response.code in (200, 201), response.body


def actions(stream: RawStream) -> list[tuple[str, str]]:
    return [(json.loads(e.data)["action"], json.loads(e.data)["path"]) for e in stream.events]


async def test_server_events_reach_a_stream_and_resume(sse_server: SSEServer) -> None:
    channel = schema_channel(CONTENTS_SCHEMA)
    stream = await sse_server.stream(channel)
    primed_at = await primed_id(stream)
    await save_file(sse_server, "notes.txt", "hello")
    await stream.read_until(lambda s: ("save", "notes.txt") in actions(s))
    assert json.loads(stream.events[0].data)["schema_id"] == CONTENTS_SCHEMA
    seen = list(stream.events)

    # what the WebSocket cannot do: a frontend that was away gets what it missed
    stream.close()
    await save_file(sse_server, "more.txt", "again")
    resumed = await sse_server.stream(channel, headers={"Last-Event-ID": primed_at})
    await resumed.read_until(lambda s: ("save", "more.txt") in actions(s))
    assert resumed.events[: len(seen)] == seen
    assert all(path == "more.txt" for _, path in actions(resumed)[len(seen) :])


@pytest.mark.parametrize("jp_server_config", [server_config(event_schemas=[LISTED])])
async def test_schemas_registered_later_when_listed_keep_their_order(
    sse_server: SSEServer,
) -> None:
    event_logger = sse_server.app.event_logger
    stream = await sse_server.stream(schema_channel(LISTED), schema_channel(UNLISTED))
    event_logger.register_event_schema(schema(LISTED))
    event_logger.register_event_schema(schema(UNLISTED))
    for step in range(20):
        event_logger.emit(schema_id=UNLISTED, data={"step": step})
        event_logger.emit(schema_id=LISTED, data={"step": step})
    events = await stream.events_count(20)
    # only the listed schema (registered after the server started) is forwarded, in emit order
    assert [json.loads(e.data) for e in events] == [
        {"schema_id": LISTED, "step": step} for step in range(20)
    ]


@pytest.mark.parametrize("jp_server_config", [server_config(forward_events=False)])
async def test_forwarding_can_be_turned_off(sse_server: SSEServer) -> None:
    channel = schema_channel(CONTENTS_SCHEMA)
    stream = await sse_server.stream(channel)
    await save_file(sse_server, "quiet.txt", "not forwarded")
    await sse_server.broker.publish(channel, "marker")
    events = await stream.events_count(1)
    assert [e.data for e in events] == ["marker"]
