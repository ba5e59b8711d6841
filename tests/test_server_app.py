"""The hub application in-process, for states a black-box hub does not reach on demand.

With the in-process broker the hub only becomes unable to deliver once its broker is closed, so
these tests close a real broker under a real server on loopback (pytest-tornado) and check the
answers an operator and a publisher get.
"""

from __future__ import annotations

import httpx
import pytest
import tornado.web

from tests.helpers import RawStream
from tornado_sse import InProcessBroker, Metrics
from tornado_sse.hub import HubOptions, make_app, make_broker

TOKEN = "in-process-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def broker() -> InProcessBroker:
    broker = make_broker(HubOptions(token=TOKEN, history=7))
    assert isinstance(broker, InProcessBroker)
    assert broker.history_size == 7
    return broker


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def app(broker: InProcessBroker, metrics: Metrics) -> tornado.web.Application:
    options = HubOptions(token=TOKEN, public_channels=("*",), metrics_public=True)
    return make_app(options, broker, metrics=metrics)


@pytest.mark.gen_test(timeout=10)
async def test_closed_broker_makes_health_and_publish_answer_503(
    port: int, broker: InProcessBroker, metrics: Metrics
) -> None:
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        assert (await client.get("/healthz")).status_code == 200
        reply = await client.post("/publish", json={"channel": "a", "data": "x"}, headers=AUTH)
        assert reply.status_code == 202
        await broker.close()
        health = await client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        reply = await client.post("/publish", json={"channel": "a", "data": "x"}, headers=AUTH)
        assert reply.status_code == 503
        assert "cannot deliver" in reply.json()["error"]
        assert metrics.published == 1
    # a subscriber arriving now is shed (told to retry later), not refused for good
    stream = await RawStream.open(port, "/events?channel=a")
    await stream.read_to_end(timeout=5)
    assert stream.status == 200
    assert "retry-after" in stream.headers
    assert stream.raw.startswith(b"retry: ")


@pytest.mark.gen_test(timeout=10)
async def test_embedded_metrics_see_the_hub(
    port: int, broker: InProcessBroker, metrics: Metrics
) -> None:
    stream = await RawStream.open(port, "/events?channel=seen")
    await stream.read_until(lambda s: s.parser.last_event_id != "")
    await broker.publish("seen", "x")
    await stream.events_count(1)
    gauges = metrics.channel_gauges()
    assert gauges["subscribers"] == {"seen": 1}
    assert gauges["history"] == {"seen": 1}
    assert all(check() for check in metrics.health_sources)
    stream.close()
