"""Shared fixtures. pytest-tornado provides ``io_loop``, ``http_server``, ``base_url``; tests define
``app``. pytest-jupyter is loaded only under ``tests/jupyter`` (its fixtures would override these).

Every test fails if something in the test process logs a traceback (a record with exception
information: ``log.exception``, Tornado's "Uncaught exception", asyncio's "Task exception was
never retrieved", ...), unless the test allows that one by name and says why::

    @pytest.mark.allow_traceback("tornado_sse", "error in on_close", reason="on_close raises")

The logger name matches exactly or as a parent (``"tornado_sse"`` covers ``tornado_sse.redis``);
the message matches as a substring of the formatted message.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings
from tornado.ioloop import IOLoop

from tests.helpers import RawStream
from tornado_sse.connections import ConnectionSet
from tornado_sse.metrics import Metrics

if TYPE_CHECKING:
    from tests.redis_cluster import RedisCluster

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Property tests under CI: the same examples on every run (derandomize), so that a failure seen
# in CI is seen again by running the test with CI=true. Locally, examples stay random (a wider
# search over many runs) and a failing one is kept in .hypothesis/ and tried first next time.
# Both print a failing example with the @reproduce_failure blob that replays it anywhere.
settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if IN_CI else "dev")


def require(condition: bool, reason: str) -> None:
    """Skip when a real component is missing locally; under CI=true, fail instead."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required component missing under CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """The session's shared Redis Cluster (`tests.redis_cluster`: 3 primaries, 3 replicas), for
    every module that asks for it; do not kill its nodes or move its slots."""
    # imported here: tests.redis_cluster imports tests.redis_server, which imports `require`
    # from this module
    from tests.redis_cluster import RedisCluster

    with RedisCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def _fresh_metrics() -> None:
    Metrics._default = None
    ConnectionSet._instances.clear()


@pytest.fixture(autouse=True)
def _own_event_loop() -> Iterator[None]:
    """A current asyncio loop of the test's own, closed when it ends. pytest-tornado's
    ``io_loop`` remembers the current loop and restores it afterwards; without one set,
    ``asyncio.get_event_loop()`` made it a loop nobody closed, dropped (with its self-pipe
    sockets, ResourceWarnings) by the next test that calls ``asyncio.run()``."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture
def io_loop(io_loop: IOLoop) -> Iterator[IOLoop]:
    """pytest-tornado's loop; when the test ends, the test's own client streams
    (`tests.helpers.RawStream`) are closed and their sockets released while the loop still
    runs. A transport closes its socket in a callback of the loop: a stream closed on the last
    line of a test would otherwise leave its socket to the garbage collector (a ResourceWarning
    in some later test)."""
    yield io_loop
    loop = io_loop.asyncio_loop  # type: ignore[attr-defined]
    streams = [stream for stream in RawStream.opened if stream.loop is loop]
    RawStream.opened.clear()
    if streams and not loop.is_closed():
        for stream in streams:
            stream.close()

        async def settle() -> None:
            for stream in streams:
                with contextlib.suppress(OSError):
                    await stream.writer.wait_closed()

        io_loop.run_sync(settle, timeout=5)


@pytest.fixture
def port(http_server: object, http_port: int) -> int:
    """The port of pytest-tornado's server running the test's ``app`` fixture."""
    return http_port


class _TracebackCatcher(logging.Handler):
    """Keeps every record of level WARNING or above that carries exception information (a
    traceback logged at DEBUG, as Tornado does for a malformed XSRF cookie, is a diagnostic for
    expected bad input, and off in production)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc_info = record.exc_info
        if (isinstance(exc_info, tuple) and exc_info[0] is not None) or record.exc_text:
            self.records.append(record)


def _allowed(record: logging.LogRecord, logger: str, message: str) -> bool:
    name_matches = record.name == logger or record.name.startswith(logger + ".")
    return name_matches and message in record.getMessage()


def _describe(record: logging.LogRecord) -> str:
    lines = [f"{record.levelname} {record.name}: {record.getMessage()}"]
    if isinstance(record.exc_info, tuple) and record.exc_info[0] is not None:
        lines.append("".join(traceback.format_exception(*record.exc_info)).rstrip())
    elif record.exc_text:
        lines.append(record.exc_text)
    return "\n".join(lines)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Once every test module is imported: collect, then freeze what is left (modules,
    classes, functions, the test items) out of the collector's sight (`gc.freeze`), so that
    `_collect_garbage` walks only what the tests made since. A full collection over the
    whole suite's imports took 0.12-0.19 s, after each of the 1,150 tests (3 minutes of
    CI). Objects made by the tests, where unclosed sockets, files and loops come from, are
    never frozen."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect garbage after each test, so that a socket, file or loop it left unclosed is
    reported (ResourceWarning, an error) for that test rather than for whichever test the
    garbage collector happens to run in."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def _no_unexpected_tracebacks(request: pytest.FixtureRequest) -> object:
    """Fail the test if the test process logged a traceback it did not allow (see above)."""
    allowed = []
    for mark in request.node.iter_markers("allow_traceback"):
        assert mark.kwargs.get("reason"), "allow_traceback needs a reason="
        allowed.append((mark.args[0], mark.args[1]))
    catcher = _TracebackCatcher()
    root = logging.getLogger()
    root.addHandler(catcher)
    try:
        yield
    finally:
        root.removeHandler(catcher)
    unexpected = [
        record
        for record in catcher.records
        if not any(_allowed(record, logger, message) for logger, message in allowed)
    ]
    if unexpected:
        pytest.fail(
            "logged a traceback it did not allow (mark it with allow_traceback and a reason "
            "if it is expected):\n\n" + "\n\n".join(_describe(r) for r in unexpected),
            pytrace=False,
        )
