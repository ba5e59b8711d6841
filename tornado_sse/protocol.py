"""The ``text/event-stream`` wire format, free of I/O.

Nothing here imports Tornado or touches a socket: events go in, bytes come out
(:func:`encode_event`, :func:`encode_comment`, :func:`encode_retry`), and bytes go in, events
come out (:class:`EventStreamParser`). The parser follows the WHATWG HTML "event stream
interpretation" rules (https://html.spec.whatwg.org/multipage/server-sent-events.html).

Deliberate choices:

* Illegal fields are rejected with :class:`~tornado_sse.errors.InvalidEventError`, never rewritten:
  CR or LF in ``event`` or ``id``, NUL in ``id``, an empty event name, a ``retry`` that is not a
  non-negative integer. A silently rewritten id would break resume.
* ``data`` is split on CRLF, CR and LF only. ``str.splitlines`` also splits on U+2028, U+0085 and
  friends, which the event-stream format treats as ordinary characters.
* An event always carries at least one ``data`` line (``data`` of ``""`` encodes as ``data:``), so a
  browser dispatches it. An event whose ``data`` is ``None`` carries no data line: browsers do not
  dispatch it, but its ``id`` still moves their ``lastEventId`` (used to prime a fresh stream).
* ``retry`` is in milliseconds, as on the wire; everything else in tornado_sse is in seconds.
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
        if self.data is not None and not isinstance(self.data, str):
            raise InvalidEventError(f"data must be str or None, not {type(self.data).__name__}")
        if self.event is not None:
            if not isinstance(self.event, str):
                raise InvalidEventError("event must be str or None")
            if not self.event:
                raise InvalidEventError("event name must not be empty (use None for 'message')")
            if _CR_OR_LF.search(self.event):
                raise InvalidEventError("event name must not contain CR or LF")
        if self.id is not None:
            if not isinstance(self.id, str):
                raise InvalidEventError("id must be str or None")
            if _CR_OR_LF.search(self.id):
                raise InvalidEventError("id must not contain CR or LF")
            if "\0" in self.id:
                raise InvalidEventError("id must not contain NUL")
        if self.retry is not None:
            if isinstance(self.retry, bool) or not isinstance(self.retry, int):
                raise InvalidEventError("retry must be an integer number of milliseconds")
            if self.retry < 0:
                raise InvalidEventError("retry must not be negative")


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
    return "".join(f": {line}\n" if line else ":\n" for line in _data_lines(text)).encode("utf-8")


def encode_retry(milliseconds: int) -> bytes:
    """Encode a block that only sets the client's reconnection delay (in milliseconds)."""
    Event(data=None, retry=milliseconds)  # validates
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
    are one line end); one leading U+FEFF is dropped; unknown fields and comments are ignored; an
    ``id`` containing NUL is ignored; ``retry`` is honoured only when all ASCII digits; an event
    with no ``data`` line is not dispatched; an event without its closing blank line when the
    stream ends is dropped by :meth:`close`.

    Each returned `.Event` carries the ``id`` and ``retry`` fields of its own block (``None`` when
    the block had none), so ``parse(encode_event(e)) == [e]``. The persistent state a client needs
    is on the parser: :attr:`last_event_id` and :attr:`retry`.

    :param max_size: bound, in characters, on a pending line plus pending event data; past it
        `.StreamParseError` is raised rather than buffering without bound.
    :param last_event_id: the last event id of a previous connection: a reconnecting client
        carries it over, as the WHATWG "last event ID buffer" outlives the connection.
    """

    def __init__(self, max_size: int = 1 << 20, *, last_event_id: str = "") -> None:
        self.max_size = max_size
        #: the last event id seen, as a browser's ``EventSource.lastEventId``
        self.last_event_id = last_event_id
        #: the last valid ``retry`` value seen, in milliseconds
        self.retry: int | None = None
        #: number of comment lines seen (heartbeats, for instance)
        self.comments = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._started = False
        self._tail = ""  # incomplete line
        self._skip_lf = False  # last chunk ended with CR
        self._data: list[str] = []
        self._data_size = 0
        self._event: str | None = None
        self._id: str | None = None
        self._id_buffer = last_event_id
        self._block_retry: int | None = None
        self._closed = False

    def feed(self, data: bytes) -> list[Event]:
        """Parse *data*; return the events it completes, in order."""
        if self._closed:
            raise StreamParseError("parser is closed")
        text = self._decoder.decode(data)
        return self._feed_text(text)

    def close(self) -> list[Event]:
        """End of stream: flush the decoder; an unterminated event is dropped (per WHATWG)."""
        if self._closed:
            return []
        events = self._feed_text(self._decoder.decode(b"", final=True))
        self._closed = True
        self._tail = ""
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
        events: list[Event] = []
        buffer = self._tail + text if self._tail else text
        pos = 0
        end = len(buffer)
        while pos < end:
            match = _LINE_BREAK.search(buffer, pos)
            if match is None:
                break
            if match.group() == "\r" and match.end() == end:
                # A CR at the very end may be the first half of a CRLF.
                self._skip_lf = True
            self._line(buffer[pos : match.start()], events)
            pos = match.end()
        self._tail = buffer[pos:]
        if len(self._tail) + self._data_size > self.max_size:
            raise StreamParseError(f"event stream line or event exceeds {self.max_size} characters")
        return events

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
            self._data_size += len(value) + 1
            if self._data_size > self.max_size:
                raise StreamParseError(f"event data exceeds {self.max_size} characters")
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self._id = value
                self._id_buffer = value
        elif field == "retry":
            if value and value.isascii() and value.isdigit():
                self._block_retry = int(value)
                self.retry = self._block_retry

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


def parse(data: bytes) -> list[Event]:
    """Parse a complete stream held in *data* (for tests and small tools)."""
    parser = EventStreamParser(max_size=max(len(data), 1))
    return parser.feed(data) + parser.close()
