"""``/metrics`` of ``tornado-sse serve --processes 2`` gives the whole hub's totals, whichever
worker answers the scrape, and every log line says which process wrote it (issue 12, item 14).

A real supervisor and two workers; which worker answered a request is read from /proc.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import RawStream, wait_until
from tests.test_bridge_serve import owner_of, publish_on_new_connection, workers
from tests.test_server import Hub, start_hub
from tornado_sse.metrics import Metrics, merge_samples

TIMEOUT = 20


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Hub]:
    hub = start_hub(tmp_path / "hub.log", "--processes", "2", "--log-json")
    yield hub
    hub.stop()
    if hub.proc.poll() is None:  # pragma: no cover - stop() failed
        for child in psutil.Process(hub.proc.pid).children():
            child.kill()
        hub.proc.kill()


async def scrape(hub: Hub) -> tuple[dict[str, float], int]:
    """GET /metrics on a fresh connection: the samples, and the worker that answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        pid = await owner_of(hub, writer.get_extra_info("sockname")[1])
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples, pid


@pytest.mark.gen_test(timeout=60)
async def test_every_worker_answers_with_the_totals_of_the_hub(group: Hub) -> None:
    pids = set(workers(group))
    assert len(pids) == 2
    # One stream on each worker (the kernel spreads connections: open until both hold one).
    streams: dict[int, RawStream] = {}
    extra: list[RawStream] = []
    for _ in range(40):
        stream = await RawStream.open(group.port, "/events?channel=totals")
        await stream.read_until(lambda s: s.parser.last_event_id != "")
        pid = await owner_of(group, stream.writer.get_extra_info("sockname")[1])
        if pid in streams:
            extra.append(stream)
        else:
            streams[pid] = stream
        if len(streams) == 2:
            break
    assert set(streams) == pids, "the kernel gave every stream to one worker"
    for stream in extra:
        stream.close()

    async def two_open() -> bool:
        samples, _ = await scrape(group)
        return samples["tornado_sse_connections_open"] == 2

    await wait_until(two_open, TIMEOUT, interval=0.05)
    published_by: dict[int, int] = {}
    for n in range(7):
        _, pid = await publish_on_new_connection(group, "totals", f"e{n}")
        published_by[pid] = published_by.get(pid, 0) + 1
    for stream in streams.values():
        await stream.read_until(lambda s: len(s.events) >= 7)
    # Scrape until each worker has answered at least twice: always the totals.
    answered: dict[int, int] = {}
    for _ in range(60):
        samples, pid = await scrape(group)
        answered[pid] = answered.get(pid, 0) + 1
        assert samples["tornado_sse_events_published_total"] == 7, (pid, published_by)
        assert samples["tornado_sse_events_sent_total"] == 14
        assert samples["tornado_sse_connections_open"] == 2
        assert samples["tornado_sse_processes"] == 2
        assert samples["tornado_sse_healthy"] == 1
        assert samples["tornado_sse_channel_subscribers{channel=totals}"] == 2
        assert samples["tornado_sse_channel_history{channel=totals}"] == 7
        assert samples["tornado_sse_publish_to_write_seconds_count"] == 14
        if len(answered) == 2 and min(answered.values()) >= 2:
            break
    assert set(answered) == pids, f"only {answered} answered scrapes"
    for stream in streams.values():
        stream.close()


@pytest.mark.gen_test(timeout=60)
async def test_log_lines_say_which_worker_wrote_them(group: Hub) -> None:
    pids = set(workers(group))
    await wait_until(
        lambda: len(re.findall(r'"message": "hub listening', group.log())) == 2, TIMEOUT
    )
    records = [json.loads(line) for line in group.log().splitlines() if line.startswith("{")]
    listening = [r for r in records if r["message"].startswith("hub listening")]
    assert {r["pid"] for r in listening} == pids
    assert {r["worker"] for r in listening} == {0, 1}
    supervisor = [r for r in records if r["message"].startswith("supervising")]
    assert supervisor and supervisor[0]["pid"] == group.proc.pid
    assert "worker" not in supervisor[0]
    assert all("pid" in r for r in records)


def test_text_log_lines_name_the_worker(tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub.log", "--processes", "2")
    try:
        pids = set(workers(hub))
        found: set[tuple[int, int]] = set()

        def both() -> bool:
            for match in re.finditer(r"\[worker (\d), pid (\d+)\]: hub listening", hub.log()):
                found.add((int(match.group(1)), int(match.group(2))))
            return len(found) == 2

        asyncio.run(wait_until(both, TIMEOUT))
        assert {index for index, _ in found} == {0, 1}
        assert {pid for _, pid in found} == pids
        assert f"[supervisor, pid {hub.proc.pid}]: supervising" in hub.log()
    finally:
        hub.stop()


def test_merge_samples_adds_up_and_skips_malformed() -> None:
    one = Metrics()
    one.connections_open = 2
    one.events_sent = 5
    one.observe_latency(0.002)
    two = Metrics()
    two.connections_open = 1
    two.observe_latency(0.002)
    totals = merge_samples(
        [one.samples(), two.samples(), [["bad"], [1, "", 3], ["x", "", True], "no"]]
    )
    assert totals[("connections_open", "")] == 3
    assert totals[("events_sent", "")] == 5
    assert totals[("processes", "")] == 2
    assert totals[("latency_bucket", "0.0025")] == 2
    assert ("x", "") not in totals
