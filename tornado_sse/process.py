"""A group of forked worker processes sharing listening sockets, joined by the bridge.

``tornado-sse serve --processes N`` uses these building blocks, and so can an application that
forks its own workers (docs/bridge.md has the example)::

    sockets = tornado.netutil.bind_sockets(8000)
    tornado_sse.process.fork_processes(4)          # returns in each worker
    async def main():
        broker = BridgeBroker(tornado_sse.process.group_socket_path())
        ...
    asyncio.run(main())

Why not `tornado.process.fork_processes`: its parent restarts crashed children but does not pass
SIGTERM on, so stopping the parent (as a service manager does) orphans the workers. Here the
parent is a small supervisor that:

* forks the workers with SIGTERM and SIGINT blocked, so a signal can never hit a half-born
  child; each child restores default handling before anything else;
* restarts a worker that died abnormally (signal or non-zero status), like Tornado, with a cap;
* on SIGTERM or SIGINT, sends SIGTERM to every worker, waits for them (at most
  *shutdown_timeout*, then SIGKILL), removes the group's bridge files and exits 0;
* asks Linux to SIGTERM the workers should the supervisor itself be killed (``PR_SET_PDEATHSIG``),
  so that no orphan keeps the port.

**How the workers share the load** (issue 15, item 1). With one listening socket shared by every
worker, the kernel gives a new connection to whichever worker calls ``accept()`` first, and
Tornado then takes up to 128 at once: under load one worker took 50 of 50 fresh streams, 174 of
200 with a busy loop on one core, and event streams stay for hours. The alternatives weighed:

* one ``SO_REUSEPORT`` socket per worker: the kernel hashes connections over them evenly, but
  blindly: a stuck worker keeps receiving its share, which waits in its backlog for ever (or
  until a BPF program steers around it: Linux only, and a program to maintain);
* the supervisor accepting and passing descriptors over a unix socket: a copy and a hop for every
  connection, and the supervisor becomes the single point that can stall the whole group;
* pausing accept by the counts the bridge carries (the ``METRICS`` frames ``/metrics``
  aggregates): they arrive a round trip late and depend on the bridge hub being up.

Chosen: the shared socket, and a table in memory shared by the group (`GroupLoad`, an anonymous
``mmap`` made before forking: one slot per worker with its open connections and a heartbeat).
A worker accepts one connection at a time, and only while it holds at most `BALANCE_FACTOR`
times the mean of the live workers plus `BALANCE_SLACK`; past it, it stops watching the
listening socket and looks again after `BALANCE_RECHECK` seconds. The counts are exact and
current (a worker writes its own slot at each accept and close), nothing is copied, and the
worst a wrong count can do is make a worker wait. The least loaded live worker always passes the
test, so somebody always accepts. A stuck worker (stopped, or its loop blocked) does not call
``accept()`` at all, so it receives nothing new; once its heartbeat is older than `STUCK_AFTER`
it is left out of the mean, so that the others do not wait for it to catch up. A restarted worker
starts from an empty slot. `~tornado_sse.httpserver.HubHTTPServer` does all this in a group;
an application that forks with `fork_processes` uses it in place of Tornado's ``HTTPServer``.

The workers' bridge socket is unique to the supervisor (`group_socket_path`), so two groups on
one host never share a hub by accident; which worker runs the hub is decided by the bridge
itself (the first to start, and another one if it dies).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import signal
import sys
import time
from types import FrameType

__all__ = [
    "BALANCE_FACTOR",
    "BALANCE_RECHECK",
    "BALANCE_SLACK",
    "HEARTBEAT_INTERVAL",
    "STUCK_AFTER",
    "GroupLoad",
    "fork_processes",
    "group_load",
    "group_socket_path",
    "is_supervisor",
    "task_id",
]

log = logging.getLogger("tornado_sse.process")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1

#: a worker accepts while it holds at most this many times the live workers' mean connections...
BALANCE_FACTOR = 1.1
#: ... plus this many (so that a handful of connections never makes workers take turns)
BALANCE_SLACK = 8
#: seconds a worker that declined to accept waits before it looks at the counts again
BALANCE_RECHECK = 0.01
#: seconds between a serving worker's heartbeats in the shared table
HEARTBEAT_INTERVAL = 0.2
#: seconds without a heartbeat after which a worker counts as stuck (left out of the mean)
STUCK_AFTER = 1.0

_supervisor_pid: int | None = None
_task_id: int | None = None
_group_load: GroupLoad | None = None


class GroupLoad:
    """Connections each worker of a group holds, in memory the group shares (made before forking).

    Slot *i* holds worker *i*'s open connections and the time (``time.monotonic``, the same clock
    in every process) of its last heartbeat. A worker writes only its own slot (aligned 8-byte
    stores, so a reader sees the old value or the new one) and reads the others'.
    """

    def __init__(self, count: int) -> None:
        self.size = count
        self._map = mmap.mmap(-1, 16 * count)  # anonymous and shared: inherited by fork
        self._counts = memoryview(self._map).cast("q")  # slot i: [2 * i]
        self._stamps = memoryview(self._map).cast("d")  # slot i: [2 * i + 1]
        self.index = -1

    def claim(self, index: int) -> None:
        """Make slot *index* this process's, starting from no connections."""
        self.index = index
        self._counts[2 * index] = 0
        self._stamps[2 * index + 1] = time.monotonic()

    def opened(self) -> None:
        """This worker accepted a connection."""
        self._counts[2 * self.index] += 1

    def closed(self) -> None:
        """One of this worker's connections closed."""
        self._counts[2 * self.index] -= 1

    def beat(self) -> None:
        """This worker's loop is running."""
        self._stamps[2 * self.index + 1] = time.monotonic()

    def counts(self) -> list[int]:
        """Open connections of every worker, by index."""
        return [self._counts[2 * i] for i in range(self.size)]

    def may_accept(self) -> bool:
        """Whether this worker may accept one more connection now (and a heartbeat)."""
        now = time.monotonic()
        counts, stamps, me = self._counts, self._stamps, self.index
        stamps[2 * me + 1] = now
        live = 0
        total = 0
        oldest = now - STUCK_AFTER
        for i in range(self.size):
            if i == me or stamps[2 * i + 1] >= oldest:
                live += 1
                total += counts[2 * i]
        return counts[2 * me] <= BALANCE_FACTOR * total / live + BALANCE_SLACK


def group_load() -> GroupLoad | None:
    """The shared table of this worker's group, or ``None`` outside a group of `fork_processes`."""
    if _group_load is None or _group_load.index < 0:
        return None
    return _group_load


def task_id() -> int | None:
    """This worker's index (0 .. N-1), or ``None`` outside a group of `fork_processes`."""
    return _task_id


def is_supervisor() -> bool:
    """Whether this process supervises a group of `fork_processes` (it is not a worker)."""
    return _supervisor_pid == os.getpid()


def group_socket_path(name: str = "tornado-sse") -> str:
    """The bridge socket of this group: ``<private dir>/group-<supervisor pid>.sock``.

    Outside a group (no `fork_processes` in this process's past) the current pid stands in.
    """
    # Imported here: the bridge is optional for this module (serve without --processes, and an
    # install without the bridge backend, must not need it).
    from .broker.bridge import default_socket_path

    owner = _supervisor_pid if _supervisor_pid is not None else os.getpid()
    return os.path.join(os.path.dirname(default_socket_path(name)), f"group-{owner}.sock")


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def fork_processes(count: int, *, shutdown_timeout: float = 4.5, max_restarts: int = 100) -> int:
    """Fork *count* workers and supervise them; returns the worker's index in each worker.

    Call it after binding the listening sockets and before creating any event loop, thread or
    broker: each worker must build its own. The calling process becomes the supervisor and
    never returns: it exits when the workers are gone (status 0 after SIGTERM or SIGINT, or when
    every worker exited 0; 1 when restarts ran out).

    :param shutdown_timeout: seconds the workers get to exit after SIGTERM before SIGKILL.
    :param max_restarts: abnormal worker deaths tolerated before the group gives up.
    """
    global _supervisor_pid, _group_load
    if count < 1:
        raise ValueError("count must be at least 1")
    _supervisor_pid = os.getpid()
    _group_load = GroupLoad(count)
    children: dict[int, int] = {}
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    born: dict[int, float] = {}
    for index in range(count):
        born[index] = time.monotonic()
        if _spawn(index, children):
            return index
    for signum in _SIGNALS:
        signal.signal(signum, _raise_stop)
    log.info("supervising %d worker processes (pid %d)", count, os.getpid())
    restarts = 0
    young_deaths = 0
    status = 0
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # a pending signal raises _Stop
        while children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            if pid not in children:
                continue
            index = children.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if code == 0:
                log.info("worker %d (pid %d) exited", index, pid)
                continue
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            restarts += 1
            if restarts > max_restarts:
                log.error("worker %d (pid %d) %s; too many restarts, stopping", index, pid, how)
                status = 1
                break
            log.warning("worker %d (pid %d) %s; restarting it", index, pid, how)
            if time.monotonic() - born.get(index, 0.0) < 1.0:
                young_deaths += 1  # a crash loop: back off, up to 5 s, instead of spinning
                time.sleep(min(0.05 * 2**young_deaths, 5.0))
            else:
                young_deaths = 0
            born[index] = time.monotonic()
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            if _spawn(index, children):
                return index
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    except _Stop as stop:
        log.info(
            "%s received: stopping %d workers", signal.Signals(stop.signum).name, len(children)
        )
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    _stop_children(children, shutdown_timeout)
    _remove_group_files()
    for signum, handler in previous.items():
        with contextlib.suppress(TypeError, ValueError):
            signal.signal(signum, handler)
    sys.exit(status)


def _spawn(index: int, children: dict[int, int]) -> bool:
    """Fork worker *index*; True in the child (signals restored), False in the supervisor."""
    global _task_id
    parent = os.getpid()
    pid = os.fork()
    if pid:
        children[pid] = index
        return False
    _task_id = index
    if _group_load is not None:
        _group_load.claim(index)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    return True


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when the supervisor dies (best effort elsewhere: nothing)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)


def _stop_children(children: dict[int, int], timeout: float) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while children and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            break
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.02)
    for pid, index in list(children.items()):
        log.warning("worker %d (pid %d) did not stop in %.1fs: killing it", index, pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    children.clear()


def _remove_group_files() -> None:
    path = group_socket_path()
    for leftover in (path, path + ".lock"):
        with contextlib.suppress(OSError):
            os.unlink(leftover)
