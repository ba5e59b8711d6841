"""`tornado_sse.process.fork_processes` as its docstring promises, with real processes.

A supervisor (a child of the test) forks two workers. Each worker appends lines to a shared file:
``ready <index> <pid>`` once running, ``term <index>`` when SIGTERM reaches it (then it exits 0).
With ``ignore`` the worker 0 ignores SIGTERM instead.

* SIGTERM or SIGINT to the supervisor is passed on to every worker as SIGTERM, and it exits 0;
* a worker that ignores SIGTERM is SIGKILLed after the shutdown timeout (4.5 s by default);
* SIGKILL of the supervisor: Linux sends SIGTERM to the workers (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require

TIMEOUT = 15.0

WORKER = """
import logging, os, signal, sys, time
from tornado_sse.process import fork_processes

logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
mode, path = sys.argv[1], sys.argv[2]
index = fork_processes(2)

def note(line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (line + "\\n").encode())
    os.close(fd)

def on_term(signum, frame):
    note(f"term {index}")
    os._exit(0)

if mode == "ignore" and index == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, on_term)
note(f"ready {index} {os.getpid()}")
while True:
    time.sleep(1)
"""


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie nobody reaped yet counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" not in state.split()[1]


def wait_for(condition: Callable[[], object], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


class Group:
    def __init__(self, tmp_path: Path, mode: str) -> None:
        require(sys.platform.startswith("linux"), "PR_SET_PDEATHSIG is Linux only")
        self.notes = tmp_path / "notes"
        self.log_path = tmp_path / "supervisor.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WORKER, mode, str(self.notes)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.workers: dict[int, int] = {}
        wait_for(lambda: len(self.ready()) == 2)
        self.workers = self.ready()

    def lines(self) -> list[str]:
        return self.notes.read_text().splitlines() if self.notes.exists() else []

    def ready(self) -> dict[int, int]:
        found = {}
        for line in self.lines():
            if line.startswith("ready "):
                _, index, pid = line.split()
                found[int(index)] = int(pid)
        return found

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cleanup(self) -> None:
        for pid in [self.proc.pid, *self.workers.values()]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(TIMEOUT)


@pytest.fixture
def group_of(tmp_path: Path) -> Iterator[Callable[[str], Group]]:
    groups: list[Group] = []

    def make(mode: str) -> Group:
        group = Group(tmp_path, mode)
        groups.append(group)
        return group

    yield make
    for group in groups:
        group.cleanup()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_passed_on_and_the_group_exits_zero(
    group_of: Callable[[str], Group], signum: int
) -> None:
    group: Group = group_of("plain")
    group.proc.send_signal(signum)
    assert group.proc.wait(TIMEOUT) == 0, group.log()
    assert sorted(line for line in group.lines() if line.startswith("term")) == [
        "term 0",
        "term 1",
    ]
    wait_for(lambda: not any(alive(pid) for pid in group.workers.values()))
    assert "killing it" not in group.log()


@pytest.mark.slow
def test_a_worker_ignoring_sigterm_is_killed_after_the_shutdown_timeout(
    group_of: Callable[[str], Group],
) -> None:
    group: Group = group_of("ignore")
    signalled = time.monotonic()
    group.proc.send_signal(signal.SIGTERM)
    # the obliging worker goes at once; the other stays until the timeout
    wait_for(lambda: "term 1" in group.lines())
    assert alive(group.workers[0])
    assert group.proc.wait(TIMEOUT) == 0, group.log()
    # No upper bound on time here (a busy machine may be slow): the kill is seen in the log,
    # and it cannot have come before the 4.5 s the supervisor waits.
    assert time.monotonic() - signalled >= 4.5
    assert f"worker 0 (pid {group.workers[0]}) did not stop in 4.5s: killing it" in group.log()
    assert not alive(group.workers[0])
    assert "term 0" not in group.lines()


def test_workers_die_with_a_sigkilled_supervisor(group_of: Callable[[str], Group]) -> None:
    group: Group = group_of("plain")
    group.proc.kill()
    group.proc.wait(TIMEOUT)
    # PR_SET_PDEATHSIG: the kernel SIGTERMs each worker when the supervisor dies
    wait_for(
        lambda: (
            sorted(line for line in group.lines() if line.startswith("term"))
            == [
                "term 0",
                "term 1",
            ]
        )
    )
    wait_for(lambda: not any(alive(pid) for pid in group.workers.values()))
