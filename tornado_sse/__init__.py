"""tornado_sse: Server-Sent Events for Tornado.

Embed it (subclass `EventStreamHandler`), run it in Jupyter (``tornado_sse.jupyter``), or run the
standalone hub (``tornado-sse serve``).
"""

from .broker import Broker, Frame, InProcessBroker, Subscription, validate_channel
from .connections import ConnectionSet
from .errors import (
    BrokerClosedError,
    BrokerError,
    BrokerUnavailableError,
    EventStreamClosedError,
    HistoryGapError,
    InvalidChannelError,
    InvalidEventError,
    SSEError,
    StreamParseError,
)
from .handler import EventStreamHandler, default_broker
from .metrics import Metrics
from .protocol import Event, EventStreamParser, encode_comment, encode_event, encode_retry

__version__ = "0.1.0"

__all__ = [
    "Broker",
    "BrokerClosedError",
    "BrokerError",
    "BrokerUnavailableError",
    "ConnectionSet",
    "Event",
    "EventStreamClosedError",
    "EventStreamHandler",
    "EventStreamParser",
    "Frame",
    "HistoryGapError",
    "InProcessBroker",
    "InvalidChannelError",
    "InvalidEventError",
    "Metrics",
    "SSEError",
    "StreamParseError",
    "Subscription",
    "__version__",
    "default_broker",
    "encode_comment",
    "encode_event",
    "encode_retry",
    "validate_channel",
]
