"""The connection set: every open event stream of an event loop, its timers and its write batching.

One `ConnectionSet` per event loop (or per application, through the ``sse_connections`` setting)
keeps, for all its streams together:

* **one heartbeat wheel per interval**: a `PeriodicCallback` ticks four times per heartbeat
  interval and writes a heartbeat to each stream that has been idle for three ticks or more, so a
  stream is never idle longer than the interval and no stream owns a timer;
* **pruning**: a `PeriodicCallback` closes streams whose writes failed, half-open peers whose
  pending output has not drained for the stall timeout, and streams past their maximum lifetime;
  it looks only at the streams that *watch* themselves (output waiting in their IOStream, or a
  maximum lifetime), so thousands of healthy idle streams cost it nothing (issue 8);
* **write batching**: streams that received events are flushed once per event loop iteration,
  so a burst of publishes goes out in one write per stream;
* **limits and shutdown**: counts per client address, and :meth:`ConnectionSet.close`, which can
  pace the closes over a window (a drain): closing every stream at once brings every client back
  in the same ``retry:`` window, to whichever instance is left (issue 15, item 4).

Timers run only while the set holds streams, so an idle process spends no CPU on them.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Protocol

from tornado.ioloop import IOLoop, PeriodicCallback

from .broker.base import release_chunks
from .protocol import Event

__all__ = ["ConnectionSet"]

#: heartbeat ticks per interval; a stream idle for TICKS - 1 ticks gets a heartbeat
TICKS = 4


class Connection(Protocol):
    """What the set needs of a stream (`.EventStreamHandler` implements it)."""

    _idle_ticks: int

    @property
    def address(self) -> str: ...

    def _flush(self) -> None: ...

    def _heartbeat(self) -> None: ...

    def _prune_reason(self, now: float) -> str | None: ...

    def _abort(self, reason: str) -> None: ...

    def close(self, event: Event | None = None) -> asyncio.Future[None]: ...

    def _drain(self, event: Event | None) -> asyncio.Future[None]: ...


class _Wheel:
    """The heartbeat timer shared by every stream with the same interval."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.members: dict[Connection, None] = {}
        self.timer = PeriodicCallback(self.tick, interval * 1000 / TICKS)

    def tick(self) -> None:
        for conn in list(self.members):
            ticks = conn._idle_ticks + 1
            if ticks >= TICKS - 1:
                conn._heartbeat()
            else:
                conn._idle_ticks = ticks


class ConnectionSet:
    """Every open event stream of one event loop, with their shared timers.

    :param prune_interval: seconds between pruning passes (default 1.0).
    """

    _instances: dict[IOLoop, ConnectionSet] = {}

    def __init__(self, *, prune_interval: float = 1.0) -> None:
        self.prune_interval = prune_interval
        self._members: dict[Connection, float] = {}
        self._wheels: dict[float, _Wheel] = {}
        self._addresses: dict[str, int] = {}
        self._dirty: list[Connection] = []
        self._watched: dict[Connection, None] = {}
        self._flush_scheduled = False
        self._pruner: PeriodicCallback | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: true once :meth:`close` began; new streams are shed from then on
        self.closing = False

    @classmethod
    def current(cls) -> ConnectionSet:
        """The default set of the current IOLoop (created on first use)."""
        loop = IOLoop.current()
        instance = cls._instances.get(loop)
        if instance is None:
            instance = cls._instances[loop] = cls()
            # forget the set when its loop closes, so a closed loop is not kept alive
            cls._forget_on_close(loop)
        return instance

    @classmethod
    def _forget_on_close(cls, loop: IOLoop) -> None:
        original = loop.close

        def close(all_fds: bool = False) -> None:
            cls._instances.pop(loop, None)
            original(all_fds)

        loop.close = close  # type: ignore[method-assign]

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, conn: object) -> bool:
        return conn in self._members

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._members))

    def count(self, address: str) -> int:
        """Open streams from client *address*."""
        return self._addresses.get(address, 0)

    def add(self, conn: Connection, heartbeat_interval: float | None) -> None:
        """Track *conn*; with a heartbeat interval, put it on that interval's wheel."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._members[conn] = heartbeat_interval or 0.0
        address = conn.address
        self._addresses[address] = self._addresses.get(address, 0) + 1
        if heartbeat_interval:
            wheel = self._wheels.get(heartbeat_interval)
            if wheel is None:
                wheel = self._wheels[heartbeat_interval] = _Wheel(heartbeat_interval)
            wheel.members[conn] = None
            if not wheel.timer.is_running():
                wheel.timer.start()
        if self._pruner is None:
            self._pruner = PeriodicCallback(self._prune, self.prune_interval * 1000)
        if not self._pruner.is_running():
            self._pruner.start()

    def watch(self, conn: Connection) -> None:
        """Have the pruning passes look at *conn* (a member) until :meth:`unwatch`."""
        if conn in self._members:
            self._watched[conn] = None

    def unwatch(self, conn: Connection) -> None:
        """Stop looking at *conn* in pruning passes (idempotent)."""
        self._watched.pop(conn, None)

    def discard(self, conn: Connection) -> None:
        """Forget *conn* (idempotent); timers stop when the set becomes empty."""
        self._watched.pop(conn, None)
        interval = self._members.pop(conn, None)
        if interval is None:
            return
        address = conn.address
        left = self._addresses.get(address, 1) - 1
        if left > 0:
            self._addresses[address] = left
        else:
            self._addresses.pop(address, None)
        wheel = self._wheels.get(interval)
        if wheel is not None:
            wheel.members.pop(conn, None)
            if not wheel.members:
                wheel.timer.stop()
                del self._wheels[interval]
        if not self._members and self._pruner is not None:
            self._pruner.stop()

    def mark_dirty(self, conn: Connection) -> None:
        """Flush *conn* at the end of this event loop iteration (with every other dirty one)."""
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn._flush()
        release_chunks()

    def _prune(self) -> None:
        now = time.monotonic()
        for conn in list(self._watched):
            reason = conn._prune_reason(now)
            if reason is not None:
                conn._abort(reason)

    async def close(
        self, event: Event | None = None, timeout: float = 5.0, *, window: float = 0.0
    ) -> None:
        """Close every stream, optionally after sending *event*, and stop the timers.

        New streams are shed from the moment this is called. With a *window* (seconds), a drain:
        the streams close one by one in random order, spread evenly over the window, each after
        a jittered ``retry:`` (`.EventStreamHandler.retry_interval` plus up to its
        `~.EventStreamHandler.retry_jitter`), so that their clients come back gradually. Returns
        once every stream has been closed and its final bytes written, or after *timeout* seconds
        (counted from the call, window included), when the remaining streams are dropped. Call it
        on SIGTERM after stopping the listening server::

            server.stop()
            await ConnectionSet.current().close(Event("bye", event="shutdown"), window=2.0)
        """
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        members = list(self._members)
        if window > 0 and members:
            closing = await self._drain_over(members, event, min(window, timeout))
        else:
            closing = [conn.close(event) for conn in members]
        if closing:
            await asyncio.wait(closing, timeout=max(0.0, deadline - loop.time()))
            for conn in list(self._members):
                conn._abort("shutdown")
        for wheel in self._wheels.values():
            wheel.timer.stop()
        self._wheels.clear()
        if self._pruner is not None:
            self._pruner.stop()

    async def _drain_over(
        self, members: list[Connection], event: Event | None, window: float
    ) -> list[asyncio.Future[None]]:
        """Close *members* in random order, evenly over *window* seconds; their close futures."""
        random.shuffle(members)
        loop = asyncio.get_running_loop()
        start = loop.time()
        step = window / len(members)
        closing: list[asyncio.Future[None]] = []
        for index, conn in enumerate(members):
            delay = start + step * (index + 1) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if conn in self._members:
                closing.append(conn._drain(event))
        return closing
