"""Brokers: the contract (`Broker`) and the in-process default (`InProcessBroker`).

The unix-socket bridge and Redis backends live in their own modules and are imported only when
used, so that ``import tornado_sse`` needs none of their dependencies.
"""

from .base import CHANNEL_PATTERN, Broker, Frame, Subscriber, Subscription, validate_channel
from .memory import History, IdSequence, InProcessBroker
from .presence import Presence

__all__ = [
    "CHANNEL_PATTERN",
    "Broker",
    "Frame",
    "History",
    "IdSequence",
    "InProcessBroker",
    "Presence",
    "Subscriber",
    "Subscription",
    "validate_channel",
]
