"""The hub's log handler and formatters (issue 15, item 2: a line per stream, cheaply).

What is checked is what a reader of the logs sees: every line ends up in the file, a warning
at once (with the lines before it), the time stamps are those `logging.Formatter` writes, and
JSON lines keep their fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from pathlib import Path

import pytest

from tests.helpers import RawStream, wait_until
from tests.test_serve_exhaustion import start_limited_hub
from tornado_sse.hub.logs import (
    FloodFilter,
    JsonFormatter,
    LoopStreamHandler,
    ProcessFilter,
    TextFormatter,
)
from tornado_sse.redaction import RedactingFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(where)s]: %(message)s"


def record(
    message: str, *args: object, created: float, level: int = logging.INFO
) -> logging.LogRecord:
    entry = logging.LogRecord("tornado_sse", level, __file__, 1, message, args, None)
    entry.created = created
    entry.msecs = (created - int(created)) * 1000
    return entry


def test_the_text_time_stamps_are_the_standard_formatters_across_seconds() -> None:
    ours = TextFormatter("%(asctime)s %(message)s")
    standard = logging.Formatter("%(asctime)s %(message)s")
    for created in (1_800_000_000.001, 1_800_000_000.999, 1_800_000_001.5, 1_800_000_000.25):
        line = record("m %s", 1, created=created)
        assert ours.format(line) == standard.format(record("m %s", 1, created=created))


def test_json_time_stamps_follow_the_second() -> None:
    formatter = JsonFormatter()
    first = json.loads(formatter.format(record("a", created=1_800_000_000.25)))
    second = json.loads(formatter.format(record("b", created=1_800_000_001.75)))
    assert first["time"] == "2027-01-15T08:00:00.250Z"
    assert second["time"] == "2027-01-15T08:00:01.750Z"


def _handler(path: Path) -> tuple[LoopStreamHandler, logging.Logger]:
    stream = path.open("w", encoding="utf-8")
    handler = LoopStreamHandler(stream)
    handler.setFormatter(TextFormatter(FORMAT))
    handler.addFilter(ProcessFilter())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(f"test_hub_logs.{path.name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler, logger


@pytest.mark.gen_test(timeout=10)
async def test_lines_reach_the_file_once_the_loop_turns_and_a_warning_at_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hub.log"
    handler, logger = _handler(path)
    try:
        for n in range(3):
            logger.info("stream open: n=%d", n)
        logger.warning("a warning, written with the lines before it")
        lines = path.read_text().splitlines()  # no turn of the loop yet
        assert [line.split(": ", 1)[1] for line in lines] == [
            "stream open: n=0",
            "stream open: n=1",
            "stream open: n=2",
            "a warning, written with the lines before it",
        ]
        logger.info("after the warning ?token=secret&x=1")
        for _ in range(100):  # bounded: the flush is the next callback of the loop
            if len(path.read_text().splitlines()) == 5:
                break
            await asyncio.sleep(0)
        last = path.read_text().splitlines()[-1]
        assert last.endswith("after the warning ?token=REDACTED&x=1")

        def off_the_loop() -> None:
            logger.info("from a thread")

        thread = threading.Thread(target=off_the_loop)
        thread.start()
        thread.join()
        assert path.read_text().splitlines()[-1].endswith("from a thread")
    finally:
        logger.removeHandler(handler)
        handler.close()
        handler.stream.close()


def test_without_a_loop_every_line_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "plain.log"
    handler, logger = _handler(path)
    try:
        logger.info("no loop here")
        assert path.read_text().splitlines()[-1].endswith("no loop here")
    finally:
        logger.removeHandler(handler)
        handler.close()
        handler.stream.close()


def test_a_flood_of_one_kind_of_line_is_cut_to_the_limit_and_counted(tmp_path: Path) -> None:
    """Past the limit in one second, lines of that kind are left out and counted in one line;
    other kinds have their own count, and a warning always passes."""
    path = tmp_path / "flood.log"
    stream = path.open("w", encoding="utf-8")
    handler = LoopStreamHandler(stream)
    handler.addFilter(FloodFilter(100))
    handler.setFormatter(TextFormatter("%(levelname)s %(message)s"))
    report = logging.getLogger("tornado_sse.server")
    report.addHandler(handler)
    report.propagate = False
    level = report.level
    report.setLevel(logging.INFO)
    try:
        second = 1_800_000_000.5
        for n in range(250):
            handler.handle(record("stream open: n=%d", n, created=second))
        for n in range(120):
            handler.handle(record("stream closed: n=%d", n, created=second))
        handler.handle(record("the broker is away", created=second, level=logging.WARNING))
        handler.handle(record("stream open: n=%d", 250, created=second + 1))  # next second
        lines = path.read_text().splitlines()
    finally:
        report.removeHandler(handler)
        report.propagate = True
        report.setLevel(level)
        handler.close()
        stream.close()
    opened = [line for line in lines if line.startswith("INFO stream open:")]
    closed = [line for line in lines if line.startswith("INFO stream closed:")]
    assert opened == [f"INFO stream open: n={n}" for n in [*range(100), 250]]
    assert closed == [f"INFO stream closed: n={n}" for n in range(100)]
    assert "WARNING the broker is away" in lines
    left_out = sorted(line for line in lines if "left out" in line)
    assert left_out == [
        "INFO left out 150 log lines like 'stream open: n=%d' in one second "
        "(over 100 a second, --log-flood-limit)",
        "INFO left out 20 log lines like 'stream closed: n=%d' in one second "
        "(over 100 a second, --log-flood-limit)",
    ]


@pytest.mark.gen_test(timeout=30)
async def test_serve_counts_the_stream_lines_past_its_flood_limit(tmp_path: Path) -> None:
    """Through a real hub: ``--log-flood-limit 3``, 12 streams opened at once; every stream is
    either logged or counted in a "left out" line, which the hub writes once the second is
    over (a timer, with no later line needed)."""
    hub = start_limited_hub(tmp_path / "hub.log", "--log-flood-limit", "3")
    try:
        streams = await asyncio.gather(
            *(RawStream.open(hub.port, f"/events?channel=f{n}") for n in range(12))
        )
        for stream in streams:
            await stream.read_until(lambda s: s.parser.last_event_id != "")

        def accounted() -> int:
            text = hub.log()
            left = re.findall(r"left out (\d+) log lines like 'stream open: ", text)
            return len(re.findall("stream open: channels=f", text)) + sum(int(n) for n in left)

        await wait_until(lambda: accounted() == 12, timeout=10)
        assert len(re.findall("stream open: channels=f", hub.log())) < 12
        for stream in streams:
            stream.close()
    finally:
        hub.stop()
