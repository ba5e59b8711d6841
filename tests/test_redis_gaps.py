"""Follow-ups of issue 12 on the Redis backend: gaps that were still silent, and the durable flag.

Real redis-server processes throughout; ``tornado-sse serve --redis`` as a subprocess where the
command line is what is under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import wait_until
from tests.redis_server import RedisServer
from tests.test_redis_serve import TOKEN, Hub
from tornado_sse.cli import main
from tornado_sse.protocol import Event

TIMEOUT = 30
WAIT = 15


def told(events: list[Event]) -> list[tuple[str | None, str]]:
    """``(event name, data)`` of the events a stream delivered (not its id-only event)."""
    return [(e.event, e.data or "") for e in events if e.data or e.event]


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "default"])
@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_serve_redis_durable_keeps_streams_across_a_restart(
    tmp_path: Path, durable: bool
) -> None:
    # Redis fsyncs every write (appendfsync always) and restarts with all of them. Declared
    # durable, the hub carries on: live streams and resumes get every event, no stream-reset.
    # By default the restart is taken as a possible loss: one stream-reset each.
    with RedisServer(tmp_path, persist=True) as server:
        flags = ["--redis-durable"] if durable else []
        hub = Hub(tmp_path / "hub.log", server.url, *flags)
        try:
            hub.wait_healthy()
            e1 = hub.publish("c", "e1")
            live = await hub.stream("channel=c")
            hub.publish("c", "e2")
            await live.read_until(lambda s: [e.data for e in s.events][-1:] == ["e2"])

            server.restart()
            if not durable:
                await live.read_until(lambda s: any(e.event == "stream-reset" for e in s.events))

            def publish_e3() -> bool:
                return hub.post("c", "e3").status_code == 202

            await wait_until(publish_e3, WAIT, interval=0.05)
            await live.read_until(lambda s: [e.data for e in s.events][-1:] == ["e3"])
            await wait_until(lambda: hub.health() == 200, WAIT)
            resumed = await hub.stream("channel=c", headers={"Last-Event-ID": e1})
            await resumed.read_until(lambda s: bool(told(s.events)))
            if durable:
                await resumed.read_until(lambda s: told(s.events)[-1:] == [(None, "e3")])
            resumed.close()
            live.close()
            if durable:
                assert told(live.events) == [(None, "e2"), (None, "e3")]
                assert told(resumed.events) == [(None, "e2"), (None, "e3")]
            else:
                assert [name for name, _ in told(live.events)] == [None, "stream-reset", None]
                assert [name for name, _ in told(resumed.events)] == ["stream-reset"]
        finally:
            hub.stop()


def test_serve_redis_durable_needs_redis() -> None:
    result = CliRunner().invoke(
        main, ["serve", "--redis-durable"], env={"TORNADO_SSE_TOKEN": TOKEN}
    )
    assert result.exit_code == 2, result.output
    assert "--redis-durable needs --redis" in result.output
