"""The ``text/event-stream`` wire format, free of I/O.

Nothing here imports Tornado or touches a socket: events go in, bytes come out
(:func:`encode_event`, :func:`encode_comment`, :func:`encode_retry`), and bytes go in, events
come out (:class:`EventStreamParser`). The parser follows the WHATWG HTML "event stream
interpretation" rules (https://html.spec.whatwg.org/multipage/server-sent-events.html).

Deliberate choices:

* Illegal fields are rejected with :class:`~tornado_sse.errors.InvalidEventError`, never rewritten:
  CR or LF in ``event`` or ``id``, NUL in ``id``, an empty event name, a ``retry`` that is not a
  non-negative integer below 2**64, text that cannot be encoded as UTF-8 (lone surrogates). A
  silently rewritten id would break resume.
* ``data`` is split on CRLF, CR and LF only. ``str.splitlines`` also splits on U+2028, U+0085 and
  friends, which the event-stream format treats as ordinary characters.
* An event always carries at least one ``data`` line (``data`` of ``""`` encodes as ``data:``), so a
  browser dispatches it. An event whose ``data`` is ``None`` carries no data line: browsers do not
  dispatch it, but its ``id`` still moves their ``lastEventId`` (used to prime a fresh stream).
* ``retry`` is in milliseconds, as on the wire; everything else in tornado_sse is in seconds. The
  spec puts no upper bound on it; Chromium ignores values that do not fit an unsigned 64-bit
  integer, so we refuse to send them and our parser ignores them too (which also keeps a peer
  from making us convert a megabyte of digits to an int).
* The parser's bound (``max_size``) covers one line plus the data of the event it belongs to, and
  is enforced identically however the stream is chunked. When it is exceeded, the events already
  completed are still returned and the error is raised by the next call, so no event is lost and
  :attr:`EventStreamParser.last_event_id` never runs ahead of what the caller has seen.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from .errors import InvalidEventError, StreamParseError

__all__ = [
    "Event",
    "EventStreamParser",
    "encode_comment",
    "encode_event",
    "encode_retry",
    "parse",
]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CR_OR_LF = re.compile(r"[\r\n]")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: the largest ``retry`` clients honour (Chromium parses it as an unsigned 64-bit integer)
_MAX_RETRY = 2**64 - 1
_MAX_RETRY_DIGITS = len(str(_MAX_RETRY))


def _check_text(name: str, value: str) -> None:
    # isascii() is O(1) on CPython, so the common case costs nothing.
    if not value.isascii() and _SURROGATE.search(value):
        raise InvalidEventError(f"{name} must be encodable as UTF-8 (it holds a lone surrogate)")


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event.

    :param data: the payload; ``None`` for an event without data lines (browsers do not dispatch
        it, but its ``id`` still counts as the last event id).
    :param event: the event name (``None`` for a plain ``message``).
    :param id: the event id; ``""`` is a valid id that resets the client's last event id.
    :param retry: the reconnection delay in milliseconds the client should use from now on.

    Construction validates every field and raises `.InvalidEventError` for illegal values.
    """

    data: str | None = ""
    event: str | None = None
    id: str | None = None
    retry: int | None = None

    def __post_init__(self) -> None:
        if self.data is not None:
            if not isinstance(self.data, str):
                raise InvalidEventError(f"data must be str or None, not {type(self.data).__name__}")
            _check_text("data", self.data)
        if self.event is not None:
            if not isinstance(self.event, str):
                raise InvalidEventError("event must be str or None")
            if not self.event:
                raise InvalidEventError("event name must not be empty (use None for 'message')")
            if _CR_OR_LF.search(self.event):
                raise InvalidEventError("event name must not contain CR or LF")
            _check_text("event", self.event)
        if self.id is not None:
            if not isinstance(self.id, str):
                raise InvalidEventError("id must be str or None")
            if _CR_OR_LF.search(self.id):
                raise InvalidEventError("id must not contain CR or LF")
            if "\0" in self.id:
                raise InvalidEventError("id must not contain NUL")
            _check_text("id", self.id)
        if self.retry is not None:
            _check_retry(self.retry)


def _check_retry(retry: object) -> None:
    if isinstance(retry, bool) or not isinstance(retry, int):
        raise InvalidEventError("retry must be an integer number of milliseconds")
    if retry < 0:
        raise InvalidEventError("retry must not be negative")
    if retry > _MAX_RETRY:
        raise InvalidEventError("retry must be below 2**64 milliseconds (clients ignore more)")


def _data_lines(data: str) -> list[str]:
    return _LINE_BREAK.split(data)


def encode_event(event: Event) -> bytes:
    """Encode *event* as UTF-8 bytes ending with the blank line that dispatches it.

    Field order: ``id``, ``event``, ``retry``, then one ``data`` line per line of data.
    """
    parts: list[str] = []
    if event.id is not None:
        parts.append(f"id: {event.id}\n" if event.id else "id:\n")
    if event.event is not None:
        parts.append(f"event: {event.event}\n")
    if event.retry is not None:
        parts.append(f"retry: {event.retry}\n")
    if event.data is not None:
        for line in _data_lines(event.data):
            parts.append(f"data: {line}\n" if line else "data:\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    """Encode a comment: one ``:`` line per line of *text*. Clients ignore comments."""
    if not isinstance(text, str):
        raise InvalidEventError("comment must be str")
    _check_text("comment", text)
    return "".join(f": {line}\n" if line else ":\n" for line in _data_lines(text)).encode("utf-8")


def encode_retry(milliseconds: int) -> bytes:
    """Encode a block that only sets the client's reconnection delay (in milliseconds)."""
    _check_retry(milliseconds)
    return b"retry: %d\n\n" % milliseconds


class EventStreamParser:
    """Incremental ``text/event-stream`` parser following the WHATWG rules.

    Feed it bytes as they arrive; it returns the events dispatched so far::

        parser = EventStreamParser()
        for chunk in chunks:
            for event in parser.feed(chunk):
                ...
        parser.close()

    Line ends are CR, LF or CRLF (a CR at the end of one chunk and an LF at the start of the next
    are one line end); one leading U+FEFF is dropped; bytes that are not UTF-8 become U+FFFD;
    unknown fields are ignored and comments counted; an ``id`` containing NUL is ignored;
    ``retry`` is honoured only when all ASCII digits (and below 2**64); an event with no ``data``
    line is not dispatched, though its blank line still sets :attr:`last_event_id`; an event
    without its closing blank line when the stream ends is dropped by :meth:`close`.

    Each returned `.Event` carries the ``id`` and ``retry`` fields of its own block (``None`` when
    the block had none), so ``parse(encode_event(e)) == [e]``. The persistent state a client needs
    is on the parser: :attr:`last_event_id` and :attr:`retry`.

    :param max_size: bound, in characters, on one line plus the data of the event it belongs to.
        Past it `.StreamParseError` is raised rather than buffering without bound. Events completed
        before the offending line are still returned; the error is then raised by the next
        :meth:`feed` or :meth:`close`, and by every call after that.
    :param last_event_id: the last event id of a previous connection: a reconnecting client
        carries it over, as the WHATWG "last event ID buffer" outlives the connection.
    """

    def __init__(self, max_size: int = 1 << 20, *, last_event_id: str = "") -> None:
        self.max_size = max_size
        #: the last event id dispatched, as a browser's ``EventSource.lastEventId``
        self.last_event_id = last_event_id
        #: the last valid ``retry`` value seen, in milliseconds
        self.retry: int | None = None
        #: number of comment lines seen (heartbeats, for instance)
        self.comments = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._started = False
        self._tail: list[str] = []  # pieces of the incomplete last line, joined once it ends
        self._tail_size = 0
        self._skip_lf = False  # the last chunk ended with CR: a leading LF is its other half
        self._data: list[str] = []
        self._data_size = 0
        self._event: str | None = None
        self._id: str | None = None
        self._id_buffer = last_event_id
        self._block_retry: int | None = None
        self._closed = False
        self._error: str | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Parse *data*; return the events it completes, in order.

        :raises StreamParseError: the stream exceeded ``max_size`` (now or in an earlier call
            that still returned its completed events), or the parser was closed.
        """
        if self._error is not None:
            raise StreamParseError(self._error)
        if self._closed:
            raise StreamParseError("parser is closed")
        return self._feed_text(self._decoder.decode(data))

    def close(self) -> list[Event]:
        """End of stream: flush the decoder; an unterminated event is dropped (per WHATWG).

        :raises StreamParseError: the stream exceeded ``max_size``.
        """
        if self._error is not None:
            raise StreamParseError(self._error)
        if self._closed:
            return []
        events = self._feed_text(self._decoder.decode(b"", final=True))
        self._closed = True
        self._tail = []
        self._tail_size = 0
        self._reset_block()
        return events

    def _feed_text(self, text: str) -> list[Event]:
        if not text:
            return []
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        if not text:
            return []
        events: list[Event] = []
        pos = 0
        end = len(text)
        for match in _LINE_BREAK.finditer(text):
            if self._tail:
                self._tail.append(text[pos : match.start()])
                line = "".join(self._tail)
                self._tail = []
                self._tail_size = 0
            else:
                line = text[pos : match.start()]
            pos = match.end()
            if len(line) + self._data_size > self.max_size:
                return self._refuse(events)
            self._line(line, events)
        if pos < end:
            self._tail.append(text[pos:])
            self._tail_size += end - pos
            if self._tail_size + self._data_size > self.max_size:
                return self._refuse(events)
        elif text[-1] == "\r":
            # A CR at the very end may be the first half of a CRLF.
            self._skip_lf = True
        return events

    def _refuse(self, events: list[Event]) -> list[Event]:
        self._error = f"event stream line or event exceeds {self.max_size} characters"
        self._tail = []
        self._tail_size = 0
        self._reset_block()
        if events:
            return events
        raise StreamParseError(self._error)

    def _line(self, line: str, events: list[Event]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            self.comments += 1
            return
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
            # The caller checked len(line) + _data_size, which bounds this too.
            self._data_size += len(value) + 1
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self._id = value
                self._id_buffer = value
        elif field == "retry":
            retry = _parse_retry(value)
            if retry is not None:
                self._block_retry = retry
                self.retry = retry

    def _dispatch(self, events: list[Event]) -> None:
        self.last_event_id = self._id_buffer
        if self._data:
            events.append(
                Event(
                    data="\n".join(self._data),
                    event=self._event or None,
                    id=self._id,
                    retry=self._block_retry,
                )
            )
        self._reset_block()

    def _reset_block(self) -> None:
        self._data = []
        self._data_size = 0
        self._event = None
        self._id = None
        self._block_retry = None


def _parse_retry(value: str) -> int | None:
    """The value of a ``retry`` field, or ``None`` when it must be ignored."""
    if not (value and value.isascii() and value.isdigit()):
        return None
    digits = value.lstrip("0")
    if len(digits) > _MAX_RETRY_DIGITS:
        return None
    retry = int(digits or "0")
    return retry if retry <= _MAX_RETRY else None


def parse(data: bytes) -> list[Event]:
    """Parse a complete stream held in *data* (for tests and small tools)."""
    parser = EventStreamParser(max_size=max(len(data), 1))
    return parser.feed(data) + parser.close()
