"""The ``tornado_sse.jupyter`` server extension: shared broker, endpoints, event bus, lifecycle.

Lifecycle, and why it is split this way: Jupyter *loads* extensions while it builds the web
application (no event loop may be running yet), *starts* them once the loop runs (the hook is
async) and *stops* them in ``ServerApp._cleanup`` before the HTTP server stops. So the broker,
the connection set and the handlers are made at load, the broker is bound to the loop at start
(after which ``publish_threadsafe`` works), and at stop the event bus listener is removed and
its in-flight events are published, the broker is closed (which ends every subscription without
leaving a task behind) and then every open stream is ended with its final chunk.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Float, Int, List, Type, Unicode

from ..broker.base import Broker
from ..broker.memory import InProcessBroker
from ..connections import ConnectionSet
from .events import EventBusForwarder
from .handlers import ClientScriptHandler, EventsHandler, PublishHandler

__all__ = ["SSEExtensionApp"]


class SSEExtensionApp(ExtensionApp):
    """Server-Sent Events for Jupyter Server: configure it as ``c.SSEExtensionApp.<trait>``.

    Puts into the web application's settings: ``sse_broker`` (the shared broker, see
    `tornado_sse.jupyter.get_broker`), ``sse_connections`` (the open streams) and the ``sse_*``
    settings below, which every `JupyterEventStreamHandler` in the server reads; and routes
    ``{base_url}sse/events`` and ``{base_url}sse/publish``. The app itself is
    ``web_app.settings["tornado_sse"]``.
    """

    name = "tornado_sse"
    description = "Server-Sent Events: a resumable event stream for Jupyter extensions"
    load_other_extensions = True

    heartbeat_interval = Float(
        15.0,
        help="Seconds of idleness before a stream gets a heartbeat comment"
        " (sse_heartbeat_interval). 0 turns heartbeats off.",
    ).tag(config=True)
    retry_interval = Float(
        3.0,
        help="Reconnection delay announced to clients, in seconds, jittered upwards per stream"
        " (sse_retry_interval).",
    ).tag(config=True)
    history_size = Int(
        1000, help="Events retained per channel, for clients that resume with Last-Event-ID."
    ).tag(config=True)
    max_connections = Int(
        0,
        help="Streams this server holds at most; beyond, new ones are told to retry later."
        " 0: no limit (sse_max_connections).",
    ).tag(config=True)
    max_publish_size = Int(
        256 * 1024, help="Bytes of data an event published with POST sse/publish may carry."
    ).tag(config=True)
    broker_class = Type(
        default_value=InProcessBroker,
        klass=Broker,
        help="The broker class, called with history_size and broker_kwargs as keywords.",
    ).tag(config=True)
    broker_kwargs = Dict(help="Keyword arguments for broker_class.").tag(config=True)
    forward_events = Bool(
        True,
        help="Forward the server's event bus (serverapp.event_logger) to channels"
        " jupyter-events/<schema id>.",
    ).tag(config=True)
    event_schemas = List(
        Unicode(),
        help="Schema ids to forward besides those registered when the server starts"
        " (for schemas registered later).",
    ).tag(config=True)

    broker: Broker
    connections: ConnectionSet
    forwarder: EventBusForwarder

    def initialize_settings(self) -> None:
        """Make the broker, the connection set and the event bus forwarder; fill settings."""
        assert self.serverapp is not None
        broker_class: Any = self.broker_class
        self.broker = broker_class(history_size=self.history_size, **self.broker_kwargs)
        self.connections = ConnectionSet()
        self.forwarder = EventBusForwarder(
            self.serverapp.event_logger, self.broker, self.event_schemas
        )
        if self.forward_events:
            self.forwarder.attach()
        self.settings.update(
            sse_broker=self.broker,
            sse_connections=self.connections,
            sse_heartbeat_interval=self.heartbeat_interval,
            sse_retry_interval=self.retry_interval,
            sse_max_connections=self.max_connections or None,
        )

    def initialize_handlers(self) -> None:
        """Route ``sse/events``, ``sse/publish`` and ``sse/client.js`` (Jupyter prefixes the
        ``base_url``)."""
        self.handlers.extend(
            [
                (r"/sse/events", EventsHandler),
                (r"/sse/publish", PublishHandler, {"max_data_size": self.max_publish_size}),
                (r"/sse/client\.js", ClientScriptHandler),
            ]
        )

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Bind the broker to the running loop; follow schemas registered since loading."""
        await self.broker.start()
        if self.forward_events:
            self.forwarder.attach()

    async def stop_extension(self) -> None:
        """Stop forwarding, close the broker, then end every open stream. Idempotent."""
        if not hasattr(self, "broker"):  # never loaded
            return
        await self.forwarder.close()
        await self.broker.close()
        await self.connections.close()
