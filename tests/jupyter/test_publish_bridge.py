"""``POST sse/publish`` on a Jupyter server whose broker is a real bridge (unix socket, msgpack).

An event larger than the bridge carries is answered 413, as the hub answers it, not 400: the
broker raises `.EventTooLargeError` (an `.InvalidEventError`) before anything is sent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from traitlets.config import Config

from tests.jupyter.conftest import SSEServer, server_config
from tests.jupyter.test_publish import post
from tornado_sse.broker.bridge import BridgeBroker

#: the bridge's frame limit here: far below the extension's own limit on ``data`` (256 KiB)
FRAME_LIMIT = 4096


@pytest.fixture
def jp_server_config(tmp_path: Path) -> Config:
    socket_dir = tmp_path / "b"
    socket_dir.mkdir(mode=0o700)
    return server_config(
        broker_class=BridgeBroker,
        broker_kwargs={"path": str(socket_dir / "hub.sock"), "max_frame_size": FRAME_LIMIT},
    )


async def test_event_larger_than_the_bridge_carries_is_413(sse_server: SSEServer) -> None:
    assert isinstance(sse_server.broker, BridgeBroker)
    stream = await sse_server.stream("jobs")
    too_large = await post(sse_server, {"channel": "jobs", "data": "x" * (2 * FRAME_LIMIT)})
    assert too_large.code == 413, too_large.body
    message = json.loads(too_large.body)["message"]
    assert "larger than the bridge" in message and str(FRAME_LIMIT) in message
    # Bad input is still 400; the bridge and the stream carry on.
    bad = await post(sse_server, {"channel": "jobs", "data": "x", "event": ""})
    assert bad.code == 400, bad.body
    ok = await post(sse_server, {"channel": "jobs", "data": "fits"})
    assert ok.code == 200, ok.body
    events = await stream.events_count(1)
    assert [e.data for e in events] == ["fits"]
