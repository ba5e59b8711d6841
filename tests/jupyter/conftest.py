"""A real Jupyter server (pytest-jupyter) running the tornado_sse.jupyter extension.

pytest-jupyter's fixtures are imported here, not loaded as a plugin for the session: its
``io_loop``, ``http_server`` and collection hooks would replace pytest-tornado's for every other
test. Imported into this conftest they apply to ``tests/jupyter`` only. Tests here are plain
``async def`` functions run on pytest-jupyter's event loop (no ``gen_test``).

``sse_server`` starts the extensions as ``ServerApp.start()`` would once its loop runs (pytest-
jupyter never calls the start hooks), and serves on a real port: streams are read with
`tests.helpers.RawStream`, because ``jp_fetch`` buffers whole responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import url_path_join
from pytest_jupyter.jupyter_server import *  # noqa: F403
from tornado.httpclient import HTTPResponse
from traitlets.config import Config

from tests.helpers import RawStream
from tornado_sse import Broker
from tornado_sse.jupyter import get_broker

_PRIMING = re.compile(rb"^id: ([^\n]*)\n\n", re.MULTILINE)


async def primed_id(stream: RawStream) -> str:
    """The id a fresh stream is primed with: an event without data, which clients do not
    dispatch but whose id they resume from."""
    await stream.read_until(lambda s: _PRIMING.search(s.raw))
    match = _PRIMING.search(stream.raw)
    assert match is not None
    return match.group(1).decode()


def server_config(server: dict[str, Any] | None = None, **sse: Any) -> Config:
    """Config enabling the extension (and not the terminals pytest-jupyter would add), with
    ``SSEExtensionApp`` traits *sse* and ``ServerApp`` traits *server*."""
    return Config(
        {
            "ServerApp": {
                "jpserver_extensions": {
                    "tornado_sse.jupyter": True,
                    "jupyter_server_terminals": False,
                },
                **(server or {}),
            },
            "SSEExtensionApp": sse,
        }
    )


@pytest.fixture
def jp_server_config() -> Config:
    return server_config()


@dataclass
class SSEServer:
    """The running server, as a client sees it."""

    app: ServerApp
    port: int
    base_url: str
    client: Any
    streams: list[RawStream] = field(default_factory=list)

    @property
    def token(self) -> str:
        return str(self.app.identity_provider.token)

    @property
    def broker(self) -> Broker:
        return get_broker(self.app)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def path(self, *parts: str, **query: Any) -> str:
        """``base_url`` joined with *parts*, with query arguments (lists repeat the name)."""
        url = url_path_join(self.base_url, *parts)
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        return url

    async def stream(
        self,
        *channels: str,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        **query: Any,
    ) -> RawStream:
        """Open ``sse/events`` for *channels* (token in the header unless ``auth=False``)."""
        all_headers = {**(self.auth if auth else {}), **(headers or {})}
        path = self.path("sse/events", channel=list(channels), **query)
        stream = await RawStream.open(self.port, path, all_headers)
        self.streams.append(stream)
        return stream

    async def get_stream(self, path: str, auth: bool = True) -> RawStream:
        """Open the stream at *path* (under ``base_url``) with a raw socket."""
        stream = await RawStream.open(self.port, self.path(path), self.auth if auth else {})
        self.streams.append(stream)
        return stream

    async def fetch(self, path: str, **kwargs: Any) -> HTTPResponse:
        """Fetch *path* (already under ``base_url``), never raising on HTTP errors."""
        kwargs.setdefault("request_timeout", 10)
        response: HTTPResponse = await self.client.fetch(
            path, raise_error=False, follow_redirects=False, **kwargs
        )
        return response


@pytest.fixture
def sse_server(
    jp_serverapp: ServerApp,
    http_server: Any,
    http_server_client: Any,
    jp_http_port: int,
    jp_base_url: str,
    jp_asyncio_loop: asyncio.AbstractEventLoop,
) -> Iterator[SSEServer]:
    jp_asyncio_loop.run_until_complete(jp_serverapp.extension_manager.start_all_extensions())
    server = SSEServer(jp_serverapp, jp_http_port, jp_base_url, http_server_client)
    yield server
    for stream in server.streams:
        stream.close()
        with contextlib.suppress(OSError):
            jp_asyncio_loop.run_until_complete(asyncio.wait_for(stream.writer.wait_closed(), 5))
