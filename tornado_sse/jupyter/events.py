"""The server's event bus (jupyter_events' `EventLogger`) forwarded to broker channels.

Jupyter Server emits its events (contents saved, kernel actions, extensions' own schemas) through
``serverapp.event_logger``; its only route to a frontend is a WebSocket without ids or history.
Here a listener (jupyter_events' ``add_listener``) publishes every event of a schema to the
channel `schema_channel` names, where it gets an id and history, so an EventSource follows the
bus and resumes after a reconnect.

How jupyter_events calls listeners shapes this module: ``emit()`` starts one task per listener
per event, and listens only to schemas registered when ``add_listener`` was called (or to ids
named explicitly, even before they are registered). So :meth:`EventBusForwarder.attach` is
called when the extension loads and again when the server has started (extensions that load
later register their schemas in between); publishes go through a lock so that events keep
the order in which they were emitted even with a broker whose publish really awaits; and the
tasks are tracked so that shutdown can wait for those in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any

from ..broker.base import Broker
from ..errors import BrokerError
from . import schema_channel

__all__ = ["EventBusForwarder"]

log = logging.getLogger("tornado_sse.jupyter")


class EventBusForwarder:
    """Publishes the events of an `EventLogger` to ``schema_channel(schema_id)`` of a broker.

    The data of each event is the JSON object Jupyter's event WebSocket sends:
    ``{"schema_id": ..., <the event's fields>}``, so frontend code can switch transports.

    :param event_logger: the server's ``jupyter_events.EventLogger``.
    :param schema_ids: schema ids to follow besides every schema registered at :meth:`attach`.
    """

    def __init__(self, event_logger: Any, broker: Broker, schema_ids: Iterable[str] = ()) -> None:
        self.event_logger = event_logger
        self.broker = broker
        self.schema_ids = tuple(schema_ids)
        #: schema ids the listener is attached to
        self.attached: set[str] = set()
        self.forwarded = 0
        self._listener = self._forward
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def attach(self) -> None:
        """Listen to every registered schema and to :attr:`schema_ids`. Idempotent."""
        if self._closed:
            return
        for schema_id in (*self.event_logger.schemas.schema_ids, *self.schema_ids):
            if schema_id not in self.attached:
                self.event_logger.add_listener(schema_id=schema_id, listener=self._listener)
                self.attached.add(schema_id)

    def detach(self) -> None:
        """Stop listening. Idempotent."""
        for schema_id in self.attached:
            self.event_logger.remove_listener(schema_id=schema_id, listener=self._listener)
        self.attached.clear()

    async def close(self, timeout: float = 5.0) -> None:
        """Detach, then wait (at most *timeout* seconds) for the events already in flight."""
        self._closed = True
        self.detach()
        # emit() creates listener tasks that may not have started yet, so they are not in _tasks:
        # one pass of the loop's FIFO ready queue starts each of them before we resume
        await asyncio.sleep(0)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def _forward(self, logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            payload = json.dumps({"schema_id": schema_id, **data}, default=str)
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                await self.broker.publish(schema_channel(schema_id), payload)
            self.forwarded += 1
        except BrokerError as exc:
            log.warning("event of %s not forwarded: %s", schema_id, exc)
        finally:
            if task is not None:
                self._tasks.discard(task)
