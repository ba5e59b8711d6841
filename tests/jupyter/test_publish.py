"""Publishing from Python and over POST (token, cookie + XSRF), bad input, resume."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.jupyter.conftest import SSEServer, server_config
from tests.jupyter.test_auth import denying
from tornado_sse import InvalidChannelError, PublishError
from tornado_sse.publish import parse_publish


def cookies(response: Any) -> dict[str, str]:
    found = {}
    for header in response.headers.get_list("Set-Cookie"):
        name, _, value = header.split(";")[0].partition("=")
        found[name] = value
    return found


async def post(server: SSEServer, body: Any, headers: dict[str, str] | None = None) -> Any:
    raw = body if isinstance(body, str) else json.dumps(body)
    return await server.fetch(
        server.path("sse/publish"),
        method="POST",
        body=raw,
        headers=server.auth if headers is None else headers,
    )


async def test_publish_from_python_and_from_threads(sse_server: SSEServer) -> None:
    stream = await sse_server.stream("jobs")
    broker = sse_server.broker
    first = await broker.publish("jobs", "from a coroutine")
    with ThreadPoolExecutor(2) as pool:
        futures = list(
            pool.map(lambda n: broker.publish_threadsafe("jobs", f"from thread {n}"), range(2))
        )
    ids = [await asyncio.wrap_future(future) for future in futures]
    events = await stream.events_count(3)
    assert (events[0].id, events[0].data) == (first, "from a coroutine")
    assert {(e.id, e.data) for e in events[1:]} == {
        (ids[0], "from thread 0"),
        (ids[1], "from thread 1"),
    }
    with pytest.raises(InvalidChannelError):
        await broker.publish("no spaces", "x")


async def test_post_with_token(sse_server: SSEServer) -> None:
    stream = await sse_server.stream("jobs")
    posted = await post(sse_server, {"channel": "jobs", "data": "50%", "event": "progress"})
    assert posted.code == 200
    reply = json.loads(posted.body)
    assert reply["channel"] == "jobs"
    structured = await post(sse_server, {"channel": "jobs", "data": {"done": 1, "of": 2}})
    assert structured.code == 200
    events = await stream.events_count(2)
    assert (events[0].id, events[0].event, events[0].data) == (reply["id"], "progress", "50%")
    assert json.loads(events[1].data) == {"done": 1, "of": 2}


async def test_post_with_cookie_honours_xsrf(sse_server: SSEServer) -> None:
    stream = await sse_server.stream("jobs")
    by_token = await sse_server.fetch(sse_server.path("api/status", token=sse_server.token))
    login = {k: v for k, v in cookies(by_token).items() if k.startswith("username-")}
    assert login
    cookie = "; ".join(f"{k}={v}" for k, v in login.items())

    no_xsrf = await post(sse_server, {"channel": "jobs", "data": "forged"}, {"Cookie": cookie})
    assert no_xsrf.code == 403
    assert "_xsrf" in json.loads(no_xsrf.body)["message"]

    xsrf = cookies(await sse_server.fetch(sse_server.path("login")))["_xsrf"]
    with_xsrf = await post(
        sse_server,
        {"channel": "jobs", "data": "from the page"},
        {"Cookie": f"{cookie}; _xsrf={xsrf}", "X-XSRFToken": xsrf},
    )
    assert with_xsrf.code == 200, with_xsrf.body
    events = await stream.events_count(1)
    assert [e.data for e in events] == ["from the page"]


async def test_post_requires_authentication(sse_server: SSEServer) -> None:
    # Jupyter checks XSRF before @web.authenticated runs: the refusal used to be "'_xsrf'
    # argument missing from POST", which sends an anonymous caller after the wrong fix.
    for headers in ({}, {"Authorization": "token wrong"}, {"Cookie": "username-x=forged"}):
        anonymous = await post(sse_server, {"channel": "jobs", "data": "x"}, headers)
        assert anonymous.code == 403, headers
        message = json.loads(anonymous.body)["message"]
        assert message.startswith("authentication required"), (headers, message)


@pytest.mark.parametrize("jp_server_config", [denying("write:sse")])
async def test_post_requires_write_permission(sse_server: SSEServer) -> None:
    refused = await post(sse_server, {"channel": "jobs", "data": "x"})
    assert refused.code == 403
    assert "not authorized to write 'sse'" in json.loads(refused.body)["message"]
    assert (await sse_server.stream("jobs")).status == 200


#: bodies the hub's POST /publish refuses with 400: Jupyter's POST sse/publish must too
REFUSED_BODIES: list[str] = [
    "{not json",
    "",
    json.dumps(["jobs", "x"]),
    json.dumps({"data": "no channel"}),
    json.dumps({"channel": "has space", "data": "x"}),
    json.dumps({"channel": "jobs"}),
    json.dumps({"channel": "jobs", "data": "x", "evnet": "typo"}),
    '{"channel": "jobs", "data": "\\ud800"}',
    '{"channel": "jobs", "data": "x", "event": "\\udfff"}',
    json.dumps({"channel": "jobs", "data": "x", "event": "two\nlines"}),
    json.dumps({"channel": "jobs", "data": "x", "event": ""}),
    json.dumps({"channel": "jobs", "data": "x", "retry": -1}),
    json.dumps({"channel": "jobs", "data": "x", "retry": True}),
    '{"channel": "jobs", "data": NaN}',
    '{"channel": "jobs", "data": 1e999}',
]


@pytest.mark.parametrize("jp_server_config", [server_config(max_publish_size=16)])
async def test_post_bad_input_is_refused_as_the_hub_refuses_it(sse_server: SSEServer) -> None:
    stream = await sse_server.stream("jobs")
    expected, answers = [], []
    for body in REFUSED_BODIES:
        with pytest.raises(PublishError) as hub:
            parse_publish(body.encode())
        expected.append((body, 400, str(hub.value)))
        response = await post(sse_server, body)
        answers.append((body, response.code, json.loads(response.body or "{}").get("message")))
    assert [a[:2] for a in answers] == [e[:2] for e in expected]
    assert answers == expected
    limits: list[tuple[Any, int, str]] = [
        ({"channel": "jobs", "data": "x" * 17}, 413, "larger than 16 bytes"),
        ({"channel": "jupyter-events/forged", "data": "x"}, 403, "server's events"),
    ]
    for payload, code, message in limits:
        response = await post(sse_server, payload)
        assert response.code == code, payload
        assert message in json.loads(response.body)["message"], payload
    ok = await post(sse_server, {"channel": "jobs", "data": "x" * 16})
    assert ok.code == 200
    null = await post(sse_server, {"channel": "jobs", "data": None})
    assert null.code == 200
    events = await stream.events_count(2)
    assert [e.data for e in events] == ["x" * 16, "null"]


async def test_resume_with_last_event_id(sse_server: SSEServer) -> None:
    broker = sse_server.broker
    first = await broker.publish("a", "a1")
    await broker.publish("b", "b1")
    await broker.publish("other", "not followed")
    await broker.publish("a", "a2")

    by_header = await sse_server.stream("a", "b", headers={"Last-Event-ID": first})
    by_query = await sse_server.stream("a", "b", last_event_id=first)
    await broker.publish("b", "b2")
    for stream in (by_header, by_query):
        events = await stream.events_count(3)
        assert [e.data for e in events] == ["b1", "a2", "b2"]
        assert len({e.id for e in events}) == 3
