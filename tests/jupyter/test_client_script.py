"""``{base_url}sse/client.js``: the ``SharedEventSource`` module, served by the extension."""

from __future__ import annotations

import pytest

from tests.jupyter.conftest import SSEServer
from tornado_sse.script import client_script


@pytest.mark.parametrize("jp_base_url", ["/", "/deep/prefix/"])
async def test_client_script_under_base_url(sse_server: SSEServer, jp_base_url: str) -> None:
    response = await sse_server.fetch(sse_server.path("sse/client.js"))
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert response.body == client_script()


async def test_streams_opt_into_the_channel_field(sse_server: SSEServer) -> None:
    """The module's leading tab asks for ``with_channel=1``: Jupyter's streams honour it."""
    stream = await sse_server.stream("news", with_channel="1")
    event_id = await sse_server.broker.publish("news", "hello")
    await stream.events_count(1)
    assert f"channel: news\nid: {event_id}\ndata: hello\n\n".encode() in stream.raw
