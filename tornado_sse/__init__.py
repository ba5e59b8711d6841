"""tornado_sse: Server-Sent Events for Tornado.

Embed it (subclass `EventStreamHandler`), run it in Jupyter (``tornado_sse.jupyter``), or run the
standalone hub (``tornado-sse serve``).

The names that need Tornado (`EventStreamHandler`, `ConnectionSet`, `default_broker`) are loaded on
first use (PEP 562, as ``tornado/__init__.py`` does), so that ``import tornado_sse.protocol``, the
sans-I/O wire format, does not import Tornado (tests/test_import_boundary.py).
"""

from typing import TYPE_CHECKING, Any

from .broker import Broker, Frame, InProcessBroker, Presence, Subscription, validate_channel
from .errors import (
    AccessDeniedError,
    AccessError,
    AccessUnavailableError,
    AuthenticationError,
    BrokerClosedError,
    BrokerError,
    BrokerUnavailableError,
    EventStreamClosedError,
    EventStreamError,
    EventTooLargeError,
    HistoryGapError,
    InvalidArgumentError,
    InvalidChannelError,
    InvalidEventError,
    InvalidKeyError,
    InvalidRateError,
    InvalidURLError,
    PublishError,
    SSEError,
    StreamIdleError,
    StreamParseError,
)
from .metrics import Metrics
from .protocol import Event, EventStreamParser, encode_comment, encode_event, encode_retry
from .ratelimit import RateLimiter

if TYPE_CHECKING:
    from .client import EventSource
    from .connections import ConnectionSet
    from .handler import EventStreamHandler, default_broker
    from .script import ClientScriptHandler, client_script_route

_LAZY = {
    "ConnectionSet": "connections",
    "EventSource": "client",
    "EventStreamHandler": "handler",
    "default_broker": "handler",
    "ClientScriptHandler": "script",
    "client_script_route": "script",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
    "AccessError",
    "AccessUnavailableError",
    "AuthenticationError",
    "Broker",
    "BrokerClosedError",
    "BrokerError",
    "BrokerUnavailableError",
    "ClientScriptHandler",
    "ConnectionSet",
    "Event",
    "EventSource",
    "EventStreamClosedError",
    "EventStreamError",
    "EventStreamHandler",
    "EventStreamParser",
    "EventTooLargeError",
    "Frame",
    "HistoryGapError",
    "InProcessBroker",
    "InvalidArgumentError",
    "InvalidChannelError",
    "InvalidEventError",
    "InvalidKeyError",
    "InvalidRateError",
    "InvalidURLError",
    "Metrics",
    "Presence",
    "PublishError",
    "RateLimiter",
    "SSEError",
    "StreamIdleError",
    "StreamParseError",
    "Subscription",
    "__version__",
    "client_script_route",
    "default_broker",
    "encode_comment",
    "encode_event",
    "encode_retry",
    "validate_channel",
]
