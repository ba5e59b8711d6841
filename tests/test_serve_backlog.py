"""``tornado-sse serve`` holds a reconnect storm's connections in a long listen backlog.

Found by ``tornado-sse bench storm`` (issue 15, item 3): with 10,000 streams, the clients of a
killed worker came back within their ``retry:`` window faster than the hub accepted them, and the
kernel dropped their SYNs once the hub's accept queue (Tornado's default backlog, 128) was full.
A dropped SYN is retried after 1, 3, 7, 15 s: streams came back after up to 42 s instead of a
few. The hub now listens with a backlog of `tornado_sse.hub.run.LISTEN_BACKLOG` (the kernel caps
it at ``net.core.somaxconn``).

The test stops the hub (SIGSTOP: it accepts nothing) and opens more connections than Tornado's
backlog: every one of them must complete its handshake in the kernel, waiting to be accepted.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_server import Hub, start_hub

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the backlog's cap is Linux's somaxconn"
)

CONNECTIONS = 600  # well past Tornado's default backlog (128)
TIMEOUT = 10


@pytest.fixture
def stopped_hub(tmp_path: Path) -> Iterator[Hub]:
    hub = start_hub(tmp_path / "hub.log")
    hub.proc.send_signal(signal.SIGSTOP)
    try:
        yield hub
    finally:
        hub.proc.send_signal(signal.SIGCONT)
        hub.stop()


async def _connect_all(port: int) -> int:
    """Open CONNECTIONS connections at once; how many completed their handshake."""
    opened: list[asyncio.StreamWriter] = []

    async def one() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append(writer)

    try:
        await asyncio.wait_for(
            asyncio.gather(*(one() for _ in range(CONNECTIONS)), return_exceptions=True), TIMEOUT
        )
    except asyncio.TimeoutError:
        pass  # the SYNs the kernel dropped are still being retried: count what got through
    finally:
        for writer in opened:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in opened), return_exceptions=True)
    return len(opened)


def test_a_hub_that_is_not_accepting_keeps_a_storm_waiting_in_its_backlog(
    stopped_hub: Hub,
) -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    if somaxconn < CONNECTIONS:
        pytest.skip(f"net.core.somaxconn is {somaxconn} here: the kernel caps every backlog")
    completed = asyncio.run(_connect_all(stopped_hub.port))
    assert completed == CONNECTIONS, f"only {completed} of {CONNECTIONS} connections completed"
