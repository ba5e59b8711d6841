"""Fuzzed frames (hypothesis) against a live hub in its own process: whatever one peer sends,
the hub stays up, logs no traceback, drops exactly the peers that sent bad frames or bad
requests, and a well-behaved peer keeps being served."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_bridge import ROOT, stop_process
from tests.test_framing import VALID_HUB_BOUND, fuzz_input
from tornado_sse.broker.base import validate_channel
from tornado_sse.broker.framing import (
    EVENT,
    HISTORY,
    HISTORY_PAGE,
    HUB_BOUND,
    PEER_BOUND,
    PUBLISH,
    PUBLISHED,
    SUBSCRIBE,
    SUBSCRIBED,
    WELCOME,
    FrameDecoder,
    FrameError,
    pack,
)
from tornado_sse.errors import InvalidChannelError, InvalidEventError
from tornado_sse.protocol import Event, encode_event

TIMEOUT = 10.0


class GoodPeer:
    """A well-behaved peer on a blocking socket: it follows ``good`` and publishes to it."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.decoder = FrameDecoder(PEER_BOUND)
        self.backlog: list[list[Any]] = []
        self.rid = 0
        assert self.next_frame()[1] == WELCOME
        self.request(SUBSCRIBE, ["good"])
        assert self.answer(SUBSCRIBED)

    def next_frame(self) -> list[Any]:
        while not self.backlog:
            data = self.sock.recv(1 << 16)
            assert data, "the hub closed the good peer's connection"
            self.backlog.extend(self.decoder.feed(data))
        return self.backlog.pop(0)

    def request(self, kind: int, *fields: Any) -> None:
        self.rid += 1
        self.sock.sendall(pack(kind, self.rid, *fields))

    def answer(self, kind: int) -> list[Any]:
        while True:
            frame = self.next_frame()
            if frame[1] == kind and frame[2] == self.rid:
                return frame

    def publish(self, channel: str, data: str) -> str:
        """Publish; the id (events of our channel that come meanwhile are skipped)."""
        self.request(PUBLISH, channel, data, None, None, time.time())
        event_id: str = self.answer(PUBLISHED)[3]
        return event_id

    def history_page(self, channels: list[str], after: str, limit: int) -> list[Any]:
        """One HISTORY_PAGE frame."""
        self.request(HISTORY, channels, after, limit)
        return self.answer(HISTORY_PAGE)

    def round_trip(self) -> None:
        """Publish to our channel; get the id back and the event itself."""
        self.request(PUBLISH, "good", "ping", None, None, time.time())
        events = []
        while True:
            frame = self.next_frame()
            if frame[1] == EVENT:
                events.append(frame[3])
            elif frame[1] == PUBLISHED and frame[2] == self.rid:
                break
        assert frame[3] in events  # the hub sends the event out before it answers


class LiveHub:
    """The hub process, its log (stderr) and the good peer."""

    def __init__(self, path: str, proc: subprocess.Popen[bytes], log_path: str) -> None:
        self.path = path
        self.proc = proc
        self.log_path = log_path
        self.good: GoodPeer | None = None

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()


@pytest.fixture(scope="module")
def live_hub() -> Iterator[LiveHub]:
    directory = tempfile.mkdtemp(prefix="sse-fuzz-")
    path = os.path.join(directory, "hub.sock")
    log_path = os.path.join(directory, "hub.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tornado_sse.broker.bridge", path, "--max-frame-size=4096"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    hub = LiveHub(path, proc, log_path)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            hub.good = GoodPeer(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline, "hub did not start"
            time.sleep(0.02)
    yield hub
    hub.good.sock.close()
    stop_process(proc)
    shutil.rmtree(directory, ignore_errors=True)


def mutate(template: bytes, index: int, value: int, cut: int) -> bytes:
    data = bytearray(template)
    data[index % len(data)] = value
    return bytes(data[: max(1, cut)])


mutated_frames = st.builds(
    mutate,
    st.sampled_from(VALID_HUB_BOUND),
    st.integers(min_value=0, max_value=200),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=0, max_value=200),
)
# Well-formed requests whose values may be refused: channels and event names, good and bad.
channels = st.sampled_from(["news", "", "a b", "a\nb", "x" * 201, "ü"]) | st.text(max_size=8)
names = st.none() | st.sampled_from(["e", "", "a\rb", "a\nb"]) | st.text(max_size=4)
requests = st.builds(
    lambda rid, channel, data, name, retry: pack(PUBLISH, rid, channel, data, name, retry, 1.0),
    st.integers(min_value=0, max_value=1000),
    channels,
    st.none() | st.text(max_size=8),
    names,
    st.none() | st.integers(min_value=0, max_value=10_000),
) | st.builds(
    lambda rid, kind, listed, limit: (
        pack(kind, rid, listed, "x-1", limit) if kind == HISTORY else pack(kind, rid, listed)
    ),
    st.integers(min_value=0, max_value=1000),
    st.sampled_from([SUBSCRIBE, HISTORY]),
    st.lists(channels, max_size=3),
    st.integers(min_value=0, max_value=3),  # a page of 0 events is refused
)
peer_input = st.lists(
    fuzz_input | mutated_frames | requests | st.sampled_from(VALID_HUB_BOUND), max_size=5
)


def send_as_a_peer(path: str, chunks: list[bytes]) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):  # until the hub closes (it drops us, or sees our EOF)
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass  # dropped while we were still sending


def refused(data: bytes) -> bool:
    """Whether the hub must drop a peer that sends *data*: a frame it cannot decode (the
    decoder is split-independent, see test_framing), or a request it must refuse (an invalid
    channel or event). A stream that only ends inside a frame is not a reason to drop."""
    decoder = FrameDecoder(HUB_BOUND, max_frame_size=4096)
    try:
        frames = decoder.feed(data)
    except FrameError:
        return True
    try:
        for frame in frames:
            kind = frame[1]
            if kind == PUBLISH:
                validate_channel(frame[3])
                encode_event(Event(data=frame[4], event=frame[5], id="x-1", retry=frame[6]))
            elif kind in (SUBSCRIBE, HISTORY):
                for channel in frame[3]:
                    validate_channel(channel)
    except (InvalidChannelError, InvalidEventError):
        return True
    return False


def drops(log: str) -> int:
    return log.count("bridge hub: dropping peer")


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(chunks=peer_input)
def test_fuzzed_peer_never_hurts_the_hub_or_others(live_hub: LiveHub, chunks: list[bytes]) -> None:
    before = drops(live_hub.log())
    send_as_a_peer(live_hub.path, chunks)
    assert live_hub.proc.poll() is None, "the hub died"
    # The hub logs a drop before it closes the connection, and send_as_a_peer returns once
    # the connection is closed: the log is complete for this peer.
    log = live_hub.log()
    assert drops(log) - before == int(refused(b"".join(chunks))), log[-2000:]
    assert "Traceback" not in log, log[-2000:]
    assert live_hub.good is not None
    live_hub.good.round_trip()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=25),
    limits=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=8),
)
def test_history_pages_add_up_to_history(
    live_hub: LiveHub, sizes: list[int], limits: list[int]
) -> None:
    """Read in pages of any sizes, history comes whole, once, in order; each page holds at most
    the events asked for and, unless it is one event, at most the hub's max_frame_size."""
    good = live_hub.good
    assert good is not None
    start = good.publish("pages-a", "start")
    ids = [good.publish(("pages-a", "pages-b")[n % 2], "x" * size) for n, size in enumerate(sizes)]
    got: list[str] = []
    after = start
    for page in range(len(ids) + 1):
        limit = limits[page % len(limits)]
        _, _, _, items, more = good.history_page(["pages-b", "pages-a"], after, limit)
        assert 1 <= len(items) <= limit or not (items or more)
        size = sum(len(c) + len(i) + len(d) + 24 for c, i, d, _ in items)
        assert len(items) == 1 or size <= 4096
        got.extend(item[1] for item in items)
        if not more:
            break
        after = items[-1][1]
    assert got == ids
    assert "Traceback" not in live_hub.log()
