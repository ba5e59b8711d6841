"""Streams get Jupyter's authentication and authorization, whatever the server allows elsewhere."""

from __future__ import annotations

from typing import Any

import pytest
from jupyter_server.auth import Authorizer
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from traitlets import List, Unicode

from tests.jupyter.conftest import SSEServer, server_config
from tornado_sse.jupyter import JupyterEventStreamHandler, schema_channel

CONTENTS_SCHEMA = "https://events.jupyter.org/jupyter_server/contents_service/v1"


class DenyingAuthorizer(Authorizer):
    """Allows everything but the ``action:resource`` pairs in ``deny``."""

    deny = List(Unicode()).tag(config=True)

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        return f"{action}:{resource}" not in self.deny


def denying(*pairs: str, **server: Any) -> Any:
    config = server_config(server={"authorizer_class": DenyingAuthorizer, **server})
    config.DenyingAuthorizer.deny = list(pairs)
    return config


class OpenHandler(JupyterHandler):
    """An extension route with no auth rule: open when allow_unauthenticated_access is on."""

    def get(self) -> None:
        self.finish("open")


def login_cookie(stream: Any) -> str:
    cookies = [value.split(";")[0] for name, value in stream.header_lines if name == "Set-Cookie"]
    (cookie,) = [c for c in cookies if c.startswith("username-")]
    return cookie


@pytest.mark.parametrize(
    "jp_server_config",
    [
        server_config(server={"allow_unauthenticated_access": True}),
        server_config(server={"allow_unauthenticated_access": False}),
    ],
    ids=["unauthenticated-allowed", "unauthenticated-denied"],
)
async def test_stream_requires_authentication(sse_server: SSEServer) -> None:
    app = sse_server.app
    if app.allow_unauthenticated_access:
        app.web_app.add_handlers(".*$", [(url_path_join(sse_server.base_url, "open"), OpenHandler)])
        opened = await sse_server.fetch(sse_server.path("open"))
        assert (opened.code, opened.body) == (200, b"open")

    refused = await sse_server.stream("news", auth=False)
    await refused.read_to_end()
    assert refused.status == 403  # not a redirect to the login page
    assert refused.headers["content-type"] == "text/plain; charset=utf-8"
    assert b"authentication required" in refused.raw

    wrong = await sse_server.stream("news", auth=False, token="not-the-token")
    await wrong.read_to_end()
    assert wrong.status == 403

    accepted = await sse_server.stream("news")
    assert accepted.status == 200
    await sse_server.broker.publish("news", "for the authenticated")
    assert (await accepted.events_count(1))[0].data == "for the authenticated"


async def test_token_query_then_cookie_with_jupyter_origin_rules(sse_server: SSEServer) -> None:
    by_query = await sse_server.stream("news", auth=False, token=sse_server.token)
    assert by_query.status == 200
    cookie = login_cookie(by_query)

    by_cookie = await sse_server.stream("news", auth=False, headers={"Cookie": cookie})
    assert by_cookie.status == 200
    same_origin = f"http://127.0.0.1:{sse_server.port}"
    by_page = await sse_server.stream(
        "news", auth=False, headers={"Cookie": cookie, "Origin": same_origin}
    )
    assert by_page.status == 200

    # a page elsewhere must not read the stream with the user's cookie (ServerApp.allow_origin)
    cross_site = await sse_server.stream(
        "news", auth=False, headers={"Cookie": cookie, "Origin": "http://evil.example"}
    )
    await cross_site.read_to_end()
    assert cross_site.status == 403

    await sse_server.broker.publish("news", "hello")
    for stream in (by_query, by_cookie, by_page):
        assert (await stream.events_count(1))[0].data == "hello"


@pytest.mark.parametrize("jp_server_config", [denying("read:sse")])
async def test_authorizer_can_deny_the_stream(sse_server: SSEServer) -> None:
    refused = await sse_server.stream("news")
    await refused.read_to_end()
    assert refused.status == 403
    assert b"not authorized to read 'sse'" in refused.raw
    status = await sse_server.fetch(sse_server.path("api/status"), headers=sse_server.auth)
    assert status.code == 200


@pytest.mark.parametrize("jp_server_config", [denying("execute:events")])
async def test_event_bus_channels_need_the_events_permission(sse_server: SSEServer) -> None:
    refused = await sse_server.stream("news", schema_channel(CONTENTS_SCHEMA))
    await refused.read_to_end()
    assert refused.status == 403
    assert b"not allowed to follow channel" in refused.raw
    allowed = await sse_server.stream("news")
    assert allowed.status == 200


class BuildLog(JupyterEventStreamHandler):
    """What an extension author writes: one class, Jupyter's auth included."""

    auth_resource = "builds"

    def get_channels(self) -> list[str]:
        return [f"builds/{self.path_kwargs['build']}"]

    def open(self) -> None:
        self.send_event(self.current_user.username, event="hello")


class DeployLog(BuildLog):
    auth_resource = "deploys"


@pytest.mark.parametrize(
    "jp_server_config",
    # allow_unauthenticated_access=False: Jupyter warns (an error here) about routes without an
    # auth rule, so adding these proves the subclass carries one
    [denying("read:builds", allow_unauthenticated_access=False)],
)
async def test_subclass_carries_authentication_and_its_own_auth_resource(
    sse_server: SSEServer,
) -> None:
    base = sse_server.base_url
    sse_server.app.web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, r"builds/(?P<build>\w+)/log"), BuildLog),
            (url_path_join(base, r"deploys/(?P<build>\w+)/log"), DeployLog),
        ],
    )
    # the allowed class is asked first: @authorized would then remember its resource for both
    deploys = await sse_server.get_stream("deploys/7/log")
    assert deploys.status == 200
    hello = (await deploys.events_count(1))[0]
    assert hello.event == "hello"
    assert hello.data  # the username of the token's user, from the identity provider

    builds = await sse_server.get_stream("builds/7/log")
    await builds.read_to_end()
    assert builds.status == 403
    assert b"not authorized to read 'builds'" in builds.raw

    anonymous = await sse_server.get_stream("deploys/7/log", auth=False)
    await anonymous.read_to_end()
    assert anonymous.status == 403

    await sse_server.broker.publish("builds/7", "step 1")
    assert (await deploys.events_count(2))[1].data == "step 1"

    # a CORS preflight carries no credentials; Jupyter's CORS settings decide the origin
    preflight = await sse_server.fetch(
        sse_server.path("deploys/7/log"),
        method="OPTIONS",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.code == 204
    assert "Last-Event-ID" in preflight.headers["Access-Control-Allow-Headers"]
