"""Presence in a real Jupyter server (issue 14): a stream's identity is Jupyter's user."""

from __future__ import annotations

import json
import re

from tests.helpers import wait_until
from tests.jupyter.conftest import SSEServer, primed_id
from tornado_sse.broker.presence import Presence


async def test_a_streams_identity_is_the_jupyter_user(sse_server: SSEServer) -> None:
    # With the server's token and no login cookie, Jupyter names each request's user afresh
    # (a uuid, as /api/me shows): the stream counts under the name Jupyter gave it.
    me = await sse_server.fetch(sse_server.path("api/me"), headers=sse_server.auth)
    assert re.fullmatch(r"[0-9a-f]{32}", json.loads(me.body)["identity"]["username"])
    stream = await sse_server.stream("notebook-room")
    await primed_id(stream)
    broker = sse_server.broker
    found = await broker.presence("notebook-room")
    assert found.subscribers == 1
    ((username, streams),) = found.users.items()
    assert streams == 1 and re.fullmatch(r"[0-9a-f]{32}", username)
    stream.close()

    async def gone() -> bool:
        return await broker.presence("notebook-room") == Presence("notebook-room", 0, {})

    await wait_until(gone, 10)
