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

The workers' bridge socket is unique to the supervisor (`group_socket_path`), so two groups on
one host never share a hub by accident; which worker runs the hub is decided by the bridge
itself (the first to start, and another one if it dies).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import time
from types import FrameType

from .broker.bridge import default_socket_path

__all__ = ["fork_processes", "group_socket_path", "is_supervisor", "task_id"]

log = logging.getLogger("tornado_sse.process")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1

_supervisor_pid: int | None = None
_task_id: int | None = None


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
    global _supervisor_pid
    if count < 1:
        raise ValueError("count must be at least 1")
    _supervisor_pid = os.getpid()
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
