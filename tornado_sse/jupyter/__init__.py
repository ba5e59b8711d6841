"""Jupyter Server extension: resumable event streams for Jupyter extensions and frontends.

Enable it with ``jupyter server --ServerApp.jpserver_extensions="{'tornado_sse.jupyter': True}"``
(the package also installs ``jupyter_server_config.d/tornado_sse.json``, which enables it). It adds,
under the server's ``base_url``:

``GET {base_url}sse/events?channel=...``
    an event stream for frontends (``new EventSource(url)``), authenticated like every Jupyter
    endpoint and resumable with ``Last-Event-ID``;
``POST {base_url}sse/publish``
    ``{"channel": ..., "data": ..., "event": ...}`` publishes an event (token or cookie plus
    Jupyter's XSRF check);

a shared broker for other extensions (:func:`get_broker`), the server's own event bus
(``serverapp.event_logger``) forwarded to one channel per schema (:func:`schema_channel`), and a
handler class, `JupyterEventStreamHandler`, that extension authors subclass to serve their own
streams with Jupyter's authentication and authorization.

Why this module imports almost nothing: Jupyter imports every enabled extension package when
the server starts (and ``jupyter server extension list`` imports them all), so the entry points
here only import ``jupyter_server`` when the extension is actually linked, and the public classes
are resolved on first attribute access (PEP 562).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:
    from ..broker.base import Broker
    from .extension import SSEExtensionApp
    from .handlers import EventsHandler, JupyterEventStreamHandler, PublishHandler

__all__ = [
    "EVENTS_CHANNEL_PREFIX",
    "EventsHandler",
    "JupyterEventStreamHandler",
    "PublishHandler",
    "SSEExtensionApp",
    "__version__",
    "get_broker",
    "schema_channel",
]

#: channels carrying the server's event bus start with this; POST may not publish to them
EVENTS_CHANNEL_PREFIX = "jupyter-events/"

_LAZY = {
    "JupyterEventStreamHandler": "handlers",
    "EventsHandler": "handlers",
    "PublishHandler": "handlers",
    "SSEExtensionApp": "extension",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-.:/@]")
_MAX_CHANNEL = 200


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """Jupyter's entry point: the extension app (imported only now)."""
    from .extension import SSEExtensionApp

    return [{"module": "tornado_sse.jupyter", "app": SSEExtensionApp}]


def get_broker(where: object) -> Broker:
    """The broker of a Jupyter server running this extension, to publish from other extensions.

    *where* is the `ServerApp`, its tornado ``web_app``, a request handler, or a settings
    mapping. Publish from coroutines with ``await broker.publish(channel, data)`` and from other
    threads with ``broker.publish_threadsafe(...)`` (once the server has started)::

        broker = tornado_sse.jupyter.get_broker(self.serverapp)
        await broker.publish("progress/build", json.dumps({"done": 3, "total": 10}))

    Extensions load in alphabetical order, so call this from a handler, a start hook or later,
    not while your extension loads.

    :raises LookupError: if the extension is not loaded in that server.
    """
    settings: Any = where
    web_app = getattr(where, "web_app", None)
    if web_app is not None:
        settings = web_app.settings
    elif not isinstance(where, Mapping):
        settings = getattr(where, "settings", None)
    broker = settings.get("sse_broker") if isinstance(settings, Mapping) else None
    if broker is None:
        raise LookupError(
            "no tornado_sse broker in this Jupyter server: enable the extension with "
            "--ServerApp.jpserver_extensions=\"{'tornado_sse.jupyter': True}\""
        )
    return broker  # type: ignore[no-any-return]


def schema_channel(schema_id: str) -> str:
    """The channel carrying the server's events of schema *schema_id*.

    ``EVENTS_CHANNEL_PREFIX`` followed by the schema id, in which characters a channel name may
    not hold are written ``~XX`` (hex of their UTF-8 bytes; ``~`` itself is ``~7E``), so two
    schema ids never share a channel. An id too long for a channel name is cut and ends in a hash
    of the whole id. For example the contents service's
    ``https://events.jupyter.org/jupyter_server/contents_service/v1`` keeps its id unchanged:
    ``jupyter-events/https://events.jupyter.org/jupyter_server/contents_service/v1``.
    """
    escaped = _UNSAFE.sub(
        lambda m: "".join(f"~{byte:02X}" for byte in m.group().encode("utf-8")), schema_id
    )
    channel = EVENTS_CHANNEL_PREFIX + escaped
    if len(channel) > _MAX_CHANNEL:
        digest = hashlib.sha256(schema_id.encode("utf-8")).hexdigest()[:16]
        channel = channel[: _MAX_CHANNEL - 17] + "~" + digest
    return channel
