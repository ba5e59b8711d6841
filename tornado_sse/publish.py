"""The publish contract: one validation of an HTTP publish body, for every endpoint that takes one.

The hub's ``POST /publish`` (`tornado_sse.hub`) and the Jupyter extension's
``POST {base_url}sse/publish`` (`tornado_sse.jupyter.handlers`) both call `parse_publish`, so
the two cannot drift apart: the same body is accepted or refused by both, with the same message
(issue 12, item 8). What differs stays with each endpoint: authentication, size limits, reserved
channels, and the status codes of those refusals.

The body is a JSON object ``{"channel", "data", "event"?, "retry"?}``:

* ``channel`` and ``data`` are required; unknown fields are refused (a typo such as ``"evnet"``
  would otherwise publish a plain message without a word);
* ``data`` that is a string is sent verbatim; any other JSON value (``null`` included) is sent as
  its compact JSON encoding;
* text must be valid Unicode: JSON's ``\\ud800`` escapes can carry a lone surrogate, which has
  no UTF-8 form and could never reach a subscriber;
* ``NaN``, ``Infinity`` and numbers out of a float's range are not JSON and are refused.

Nothing here does I/O or imports Tornado.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .broker.base import validate_channel
from .errors import InvalidChannelError, InvalidEventError, PublishError
from .protocol import Event

__all__ = ["PUBLISH_FIELDS", "PublishError", "PublishRequest", "parse_publish"]

#: the fields a publish body may hold
PUBLISH_FIELDS = ("channel", "data", "event", "retry")


@dataclass(frozen=True)
class PublishRequest:
    """A validated publish body."""

    channel: str
    data: str
    event: str | None = None
    retry: int | None = None


def _reject_constant(name: str) -> Any:
    raise PublishError(f"body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise PublishError(f"body is not valid JSON: {text} is out of range")
    return value


def parse_publish(body: bytes) -> PublishRequest:
    """Validate a publish body: ``{"channel", "data", "event"?, "retry"?}``.

    String ``data`` is kept verbatim; any other JSON value (``null`` included) is sent as its
    compact JSON encoding. Raises `.PublishError` with a message for the client (answered with
    ``400``).
    """
    try:
        payload = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError as exc:
        raise PublishError("body is not valid JSON: it is not UTF-8 text") from exc
    except RecursionError as exc:
        raise PublishError("body is not valid JSON: nested too deeply") from exc
    except ValueError as exc:
        if isinstance(exc, PublishError):
            raise
        raise PublishError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise PublishError('body must be a JSON object like {"channel": "news", "data": "hi"}')
    unknown = sorted(set(payload) - set(PUBLISH_FIELDS))
    if unknown:
        raise PublishError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(PUBLISH_FIELDS)}"
        )
    if "channel" not in payload:
        raise PublishError('missing "channel"')
    try:
        channel = validate_channel(payload["channel"])
    except InvalidChannelError as exc:
        raise PublishError(str(exc)) from exc
    if "data" not in payload:
        raise PublishError('missing "data" (any JSON value; null is sent as null)')
    value = payload["data"]
    if isinstance(value, str):
        data = value
    else:
        try:
            data = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except RecursionError as exc:
            raise PublishError("data is nested too deeply") from exc
    _require_unicode(data, "data")
    event = payload.get("event")
    if event is not None:
        if not isinstance(event, str) or not event:
            raise PublishError('"event" must be a non-empty string')
        if "\r" in event or "\n" in event:
            raise PublishError('"event" must not contain CR or LF')
        _require_unicode(event, "event")
    retry = payload.get("retry")
    if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int) or retry < 0):
        raise PublishError('"retry" must be a non-negative integer (milliseconds)')
    try:
        Event(data=data, event=event, retry=retry)
    except InvalidEventError as exc:
        raise PublishError(str(exc)) from exc
    return PublishRequest(channel=channel, data=data, event=event, retry=retry)


def _require_unicode(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PublishError(f'"{field}" is not valid Unicode (it holds a lone surrogate)') from exc
