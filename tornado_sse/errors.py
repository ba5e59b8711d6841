"""Exceptions raised by tornado_sse.

::

    SSEError
     +- InvalidEventError (also ValueError)     an event we were asked to send is illegal
     |   +- EventTooLargeError                  larger than the backend carries (.size, .limit)
     +- InvalidChannelError (also ValueError)   a channel name is not allowed
     +- InvalidArgumentError (also ValueError)  a stream argument we refuse (?history=x): 400
     +- InvalidURLError (also ValueError)       a stream URL the client cannot use
     +- PublishError (also ValueError)          a publish body (JSON over HTTP) we refuse
     +- InvalidKeyError (also ValueError)       a token key (or grant pattern) we cannot use
     +- InvalidRateError (also ValueError)      a rate limit we cannot use ("RATE[/BURST]")
     +- StreamParseError                        the peer sent an event stream we refuse to buffer
     +- EventStreamError                        a URL did not answer with an event stream (.status)
     +- EventStreamClosedError                  sending to a stream whose client went away
     +- AccessError                             a request's credentials do not allow it
     |   +- AuthenticationError                 no valid token: 401 (.www_authenticate)
     |   +- AccessDeniedError                   a valid token without the grant: 403 (.channel)
     |   +- AccessUnavailableError              who decides cannot answer now: the stream is shed
     +- BrokerError
         +- BrokerClosedError                   the broker was closed
         +- BrokerUnavailableError              the backend (hub, Redis) cannot be reached now
         +- HistoryGapError                     a Last-Event-ID fell out of history (.current_id)

"You asked for something illegal" (``InvalidEventError``, ``InvalidChannelError``,
``InvalidArgumentError``, ``InvalidURLError``, ``PublishError``, ``InvalidKeyError``,
``InvalidRateError``) is kept apart from "the peer sent something bad" (``StreamParseError``,
``AccessError``), as h11 separates local and remote protocol errors. A hook of
`.EventStreamHandler` (``get_channels``, ``check_channel``, ``get_current_user`` called from
them) may raise ``AuthenticationError`` or ``AccessDeniedError``: the request is answered 401 or
403 with the error's message; ``AccessUnavailableError`` sheds it.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "AccessError",
    "AccessUnavailableError",
    "AuthenticationError",
    "BrokerClosedError",
    "BrokerError",
    "BrokerUnavailableError",
    "EventStreamClosedError",
    "EventStreamError",
    "EventTooLargeError",
    "HistoryGapError",
    "InvalidArgumentError",
    "InvalidChannelError",
    "InvalidEventError",
    "InvalidKeyError",
    "InvalidRateError",
    "InvalidURLError",
    "PublishError",
    "SSEError",
    "StreamIdleError",
    "StreamParseError",
]


class SSEError(Exception):
    """Base class of every exception tornado_sse raises."""


class InvalidEventError(SSEError, ValueError):
    """An event (or comment) we were asked to encode is not legal on the wire.

    Raised instead of silently rewriting the field: a rewritten id would break resume.
    """


class EventTooLargeError(InvalidEventError):
    """An event is larger than the broker's backend can carry (the bridge's ``max_frame_size``).

    Raised by `.Broker.publish` before anything is sent; the hub answers ``413`` with its message.

    :ivar size: the event's size as the backend counts it, in bytes.
    :ivar limit: the most the backend carries, in bytes.
    """

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class InvalidChannelError(SSEError, ValueError):
    """A channel name is empty, too long, or holds characters channel names may not hold."""


class InvalidArgumentError(SSEError, ValueError):
    """A stream argument we refuse, such as ``?history=`` that is not a whole number from 0 to
    `.handler.MAX_HISTORY`: `.EventStreamHandler` answers ``400`` with this message."""


class InvalidURLError(SSEError, ValueError):
    """A URL `.client.EventSource` cannot connect to: not ``http://`` or ``https://``, no host,
    an invalid host or port, whitespace or control characters.

    Raised at once, as a browser's ``EventSource`` constructor throws, rather than retried for
    ever. ``url`` is the URL refused.
    """

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class PublishError(SSEError, ValueError):
    """A publish body we refuse (the hub's ``POST /publish``, Jupyter's ``POST sse/publish``):
    answered with ``400`` and this message."""


class InvalidKeyError(SSEError, ValueError):
    """A key `.auth.TokenVerifier` cannot verify tokens with (an HMAC secret too short, a PEM
    that is not a public key of a supported type), or a grant pattern that is not one."""


class InvalidRateError(SSEError, ValueError):
    """A rate limit `.ratelimit.RateLimiter` cannot use: not ``RATE[/BURST]``, a rate that is
    not a finite positive number, or a burst below 1."""


class AccessError(SSEError):
    """A request's credentials do not allow what it asks. Its message is safe to send to the
    client: it never holds the token."""


class AuthenticationError(AccessError):
    """No token, or one that is malformed, badly signed, expired, not yet valid, or meant for
    another audience or issuer: answered ``401`` with a ``WWW-Authenticate`` header.

    :ivar error: the RFC 6750 error code, ``"invalid_token"``, or ``None`` when the request
        carried no token at all (RFC 6750 section 3.1: then no error code is sent).
    """

    def __init__(self, message: str, error: str | None = "invalid_token") -> None:
        super().__init__(message)
        self.error = error

    @property
    def www_authenticate(self) -> str:
        """The value of the ``WWW-Authenticate`` header of the 401 answer."""
        if self.error is None:
            return "Bearer"
        return f'Bearer error="{self.error}"'


class AccessDeniedError(AccessError):
    """A valid token (or a `check_channel` policy) does not grant *channel*: answered ``403``
    naming it.

    :ivar channel: the channel refused.
    :ivar action: ``"subscribe"`` (follow) or ``"publish"``.
    """

    def __init__(self, channel: str, action: str = "subscribe", message: str | None = None) -> None:
        if message is None:
            verb = "follow" if action == "subscribe" else action + " to"
            message = f"not allowed to {verb} channel {channel!r}"
        super().__init__(message)
        self.channel = channel
        self.action = action


class AccessUnavailableError(AccessError):
    """Whoever decides access (the hub's ``--auth-url`` backend) cannot answer now: unreachable,
    too slow, or an answer we cannot read. A stream is then *shed* (told to retry later), as
    when the broker is unavailable, never refused for good nor let in."""


class StreamParseError(SSEError):
    """The peer sent an event stream that exceeds our buffer bounds."""


class EventStreamError(SSEError):
    """The server answered a stream request with something other than an event stream.

    Raised by `.client.EventSource`, which then stops for good (as a browser's EventSource does):
    a status other than 200 or 204, or a 200 whose ``Content-Type`` is not
    ``text/event-stream``. With ``reconnect=False`` also raised when the connection fails, with
    ``status`` ``None`` and the network error as ``__cause__``.

    :ivar status: the HTTP status, or ``None`` when no response arrived.
    :ivar content_type: the response's ``Content-Type`` (``None`` if absent or no response).
    :ivar body: the start of the response body, decoded (the server's message), or ``""``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        content_type: str | None = None,
        body: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.content_type = content_type
        self.body = body


class StreamIdleError(SSEError, TimeoutError):
    """The client's ``idle_timeout`` passed without a byte from the server: the connection is
    taken for dead (half-open) and the client reconnects. Seen in `EventSource.last_error`."""


class EventStreamClosedError(SSEError):
    """Raised by `.EventStreamHandler.send_event` after the stream has closed."""


class BrokerError(SSEError):
    """Base class for broker failures."""


class BrokerClosedError(BrokerError):
    """The broker has been closed and takes no more publishes or subscriptions."""


class BrokerUnavailableError(BrokerError):
    """The broker's backend (the bridge hub, Redis) cannot be reached right now.

    Publishing while the backend is away raises this at once instead of queueing without bound.
    """


class HistoryGapError(BrokerError):
    """A resume point is older than the retained history (or unknown to this broker).

    ``current_id`` is the id a client may resume from after it has been told of the gap.
    ``resume_id``, when known, is an earlier such id after which history is complete: the first
    id of a new incarnation of the broker's data (a restarted hub, a Redis that lost its data),
    when the Last-Event-ID is from an earlier one. What was published since the new incarnation
    began is then replayed after the ``stream-reset``: only what died with the old one is lost.
    """

    def __init__(
        self,
        current_id: str,
        message: str = "Last-Event-ID is not in history",
        *,
        resume_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.current_id = current_id
        self.resume_id = resume_id
