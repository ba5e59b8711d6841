"""Fuzzed frames (hypothesis) against a live hub in its own process: whatever one peer sends,
the hub stays up and a well-behaved peer keeps being served."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_bridge import start_hub_process, stop_process
from tests.test_framing import VALID_HUB_BOUND, fuzz_input
from tornado_sse.broker.framing import (
    EVENT,
    PEER_BOUND,
    PUBLISH,
    PUBLISHED,
    SUBSCRIBE,
    SUBSCRIBED,
    WELCOME,
    FrameDecoder,
    pack,
)

TIMEOUT = 10.0


class GoodPeer:
    """A well-behaved peer on a blocking socket: it follows ``good`` and publishes to it."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
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


@pytest.fixture(scope="module")
def live_hub() -> Iterator[tuple[str, subprocess.Popen[bytes], GoodPeer]]:
    directory = tempfile.mkdtemp(prefix="sse-fuzz-")
    path = os.path.join(directory, "hub.sock")
    proc = start_hub_process(path, "--max-frame-size=4096")
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            good = GoodPeer(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline, "hub did not start"
            time.sleep(0.02)
    yield path, proc, good
    good.sock.close()
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
peer_input = st.lists(fuzz_input | mutated_frames | st.sampled_from(VALID_HUB_BOUND), max_size=5)


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


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(chunks=peer_input)
def test_fuzzed_peer_never_hurts_the_hub_or_others(
    live_hub: tuple[str, subprocess.Popen[bytes], GoodPeer], chunks: list[bytes]
) -> None:
    path, proc, good = live_hub
    send_as_a_peer(path, chunks)
    assert proc.poll() is None, "the hub died"
    good.round_trip()
