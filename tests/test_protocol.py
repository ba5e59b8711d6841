"""The sans-I/O wire format: encoding tables, illegal input, and the WHATWG parser.

Encoding is checked against exact bytes. Every parser case goes through `check`, which feeds the
stream whole, byte by byte and split in two at every index, and asserts that all of them agree on
the events, the parser state and whether the stream was refused. Rules are quoted from
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tornado_sse.errors import InvalidEventError, SSEError, StreamParseError
from tornado_sse.protocol import (
    Event,
    EventStreamParser,
    encode_comment,
    encode_event,
    encode_retry,
    parse,
)

# --------------------------------------------------------------------------------------------
# Encoding: input -> exact bytes


ENCODE_TABLE: list[tuple[str, Event, bytes]] = [
    ("plain data", Event("hello"), b"data: hello\n\n"),
    ("default is empty data", Event(), b"data:\n\n"),
    ("empty data", Event(""), b"data:\n\n"),
    ("data None: no data line", Event(None, id="7"), b"id: 7\n\n"),
    ("data None, nothing else", Event(None), b"\n"),
    ("id", Event("x", id="42"), b"id: 42\ndata: x\n\n"),
    ("id zero is an id", Event("x", id="0"), b"id: 0\ndata: x\n\n"),
    ("empty id resets", Event("x", id=""), b"id:\ndata: x\n\n"),
    ("event name", Event("x", event="update"), b"event: update\ndata: x\n\n"),
    ("retry", Event("x", retry=3000), b"retry: 3000\ndata: x\n\n"),
    ("retry zero", Event("x", retry=0), b"retry: 0\ndata: x\n\n"),
    ("retry only", Event(None, retry=5), b"retry: 5\n\n"),
    (
        "field order id, event, retry, data",
        Event("x", event="e", id="1", retry=10),
        b"id: 1\nevent: e\nretry: 10\ndata: x\n\n",
    ),
    ("LF splits", Event("a\nb"), b"data: a\ndata: b\n\n"),
    ("CRLF splits once", Event("a\r\nb"), b"data: a\ndata: b\n\n"),
    ("CR splits", Event("a\rb"), b"data: a\ndata: b\n\n"),
    ("LF CR is two breaks", Event("a\n\rb"), b"data: a\ndata:\ndata: b\n\n"),
    ("mixed breaks", Event("a\rb\nc\r\nd"), b"data: a\ndata: b\ndata: c\ndata: d\n\n"),
    ("blank line inside data", Event("a\n\nb"), b"data: a\ndata:\ndata: b\n\n"),
    ("trailing LF", Event("a\n"), b"data: a\ndata:\n\n"),
    ("leading LF", Event("\na"), b"data:\ndata: a\n\n"),
    ("only LF", Event("\n"), b"data:\ndata:\n\n"),
    ("U+2028 not split", Event("a\u2028b"), "data: a\u2028b\n\n".encode()),
    ("U+2029 not split", Event("a\u2029b"), "data: a\u2029b\n\n".encode()),
    ("U+0085 not split", Event("a\u0085b"), "data: a\u0085b\n\n".encode()),
    ("U+000B not split", Event("a\x0bb"), b"data: a\x0bb\n\n"),
    ("U+000C not split", Event("a\x0cb"), b"data: a\x0cb\n\n"),
    ("U+001C..1E not split", Event("a\x1c\x1d\x1eb"), b"data: a\x1c\x1d\x1eb\n\n"),
    ("NUL in data is data", Event("a\0b"), b"data: a\0b\n\n"),
    ("leading space kept", Event(" x"), b"data:  x\n\n"),
    ("colon in data", Event("a: b"), b"data: a: b\n\n"),
    (
        "unicode",
        Event("h\u00e9llo \u2603 \U0001f600"),
        "data: h\u00e9llo \u2603 \U0001f600\n\n".encode(),
    ),
    (
        "unicode id and name",
        Event("x", event="\u00e9v", id="\u2603"),
        "id: \u2603\nevent: \u00e9v\ndata: x\n\n".encode(),
    ),
    ("BOM in data kept", Event("\ufeffx"), b"data: \xef\xbb\xbfx\n\n"),
    ("id with leading space", Event("x", id=" 1"), b"id:  1\ndata: x\n\n"),
    ("event named message", Event("x", event="message"), b"event: message\ndata: x\n\n"),
    ("NUL in event name is allowed", Event("x", event="a\0b"), b"event: a\0b\ndata: x\n\n"),
]


@pytest.mark.parametrize(
    ("event", "expected"), [case[1:] for case in ENCODE_TABLE], ids=[c[0] for c in ENCODE_TABLE]
)
def test_encode_event(event: Event, expected: bytes) -> None:
    assert encode_event(event) == expected


COMMENT_TABLE: list[tuple[str, bytes]] = [
    ("", b":\n"),
    ("hi", b": hi\n"),
    (" hi", b":  hi\n"),
    ("a\nb", b": a\n: b\n"),
    ("a\r\nb", b": a\n: b\n"),
    ("a\rb", b": a\n: b\n"),
    ("a\n", b": a\n:\n"),
    ("a\u2028b", ": a\u2028b\n".encode()),
    ("\u2603", ": \u2603\n".encode()),
]


@pytest.mark.parametrize(("text", "expected"), COMMENT_TABLE)
def test_encode_comment(text: str, expected: bytes) -> None:
    assert encode_comment(text) == expected


def test_encode_comment_default_is_bare_colon() -> None:
    assert encode_comment() == b":\n"


@pytest.mark.parametrize(
    ("milliseconds", "expected"),
    [(0, b"retry: 0\n\n"), (1, b"retry: 1\n\n"), (3000, b"retry: 3000\n\n")],
)
def test_encode_retry(milliseconds: int, expected: bytes) -> None:
    assert encode_retry(milliseconds) == expected


def test_encode_retry_largest() -> None:
    assert encode_retry(2**64 - 1) == b"retry: 18446744073709551615\n\n"


def test_event_is_frozen_and_slotted() -> None:
    event = Event("x", id="1")
    with pytest.raises(AttributeError):
        event.data = "y"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")
    assert event == Event("x", id="1")
    assert hash(event) == hash(Event("x", id="1"))


# --------------------------------------------------------------------------------------------
# Illegal input: InvalidEventError, which is also a ValueError


ILLEGAL_EVENTS: list[tuple[str, dict[str, object]]] = [
    ("LF in event", {"event": "a\nb"}),
    ("CR in event", {"event": "a\rb"}),
    ("CRLF in event", {"event": "a\r\nb"}),
    ("trailing LF in event", {"event": "a\n"}),
    ("empty event name", {"event": ""}),
    ("bytes event", {"event": b"e"}),
    ("int event", {"event": 1}),
    ("LF in id", {"id": "1\n2"}),
    ("CR in id", {"id": "1\r"}),
    ("CRLF in id", {"id": "\r\n"}),
    ("NUL in id", {"id": "1\0"}),
    ("int id", {"id": 1}),
    ("bytes id", {"id": b"1"}),
    ("negative retry", {"retry": -1}),
    ("bool retry True", {"retry": True}),
    ("bool retry False", {"retry": False}),
    ("float retry", {"retry": 1.0}),
    ("fractional retry", {"retry": 1.5}),
    ("str retry", {"retry": "100"}),
    ("retry too large for clients", {"retry": 2**64}),
    ("bytes data", {"data": b"x"}),
    ("int data", {"data": 1}),
    ("list data", {"data": ["x"]}),
    ("dict data", {"data": {"a": 1}}),
    ("lone surrogate in data", {"data": "a\ud800b"}),
    ("lone surrogate in event", {"event": "\udfff"}),
    ("lone surrogate in id", {"id": "\ud83d"}),
]


@pytest.mark.parametrize(
    "fields", [c[1] for c in ILLEGAL_EVENTS], ids=[c[0] for c in ILLEGAL_EVENTS]
)
def test_illegal_event_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(InvalidEventError) as info:
        Event(**fields)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, SSEError)
    assert str(info.value)


def test_replace_revalidates() -> None:
    import dataclasses

    with pytest.raises(InvalidEventError):
        dataclasses.replace(Event("x"), id="a\nb")


@pytest.mark.parametrize("value", [-1, True, False, 1.0, 2.5, "10", None, 2**64, b"1"])
def test_encode_retry_rejects(value: object) -> None:
    with pytest.raises(InvalidEventError):
        encode_retry(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [b"x", 1, None, "a\udc80"])
def test_encode_comment_rejects(value: object) -> None:
    with pytest.raises(InvalidEventError):
        encode_comment(value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Parser: every case fed whole, byte by byte, and split in two at every index


@dataclass(frozen=True)
class Outcome:
    events: tuple[Event, ...]
    refused: bool
    last_event_id: str
    retry: int | None
    comments: int


def _run(
    chunks: list[bytes], max_size: int, parser_class: type[EventStreamParser] = EventStreamParser
) -> Outcome:
    parser = parser_class(max_size=max_size)
    events: list[Event] = []
    refused = False
    try:
        for chunk in chunks:
            events.extend(parser.feed(chunk))
        events.extend(parser.close())
    except StreamParseError:
        refused = True
    return Outcome(tuple(events), refused, parser.last_event_id, parser.retry, parser.comments)


def check(
    stream: bytes,
    events: list[Event],
    *,
    last_event_id: str | None = None,
    retry: int | None = None,
    comments: int | None = None,
    refused: bool = False,
    max_size: int = 1 << 20,
    parser_class: type[EventStreamParser] = EventStreamParser,
) -> Outcome:
    """Feed *stream* whole, byte by byte and split at every index; all must agree and match."""
    whole = _run([stream], max_size, parser_class)
    ways = {"byte by byte": [stream[i : i + 1] for i in range(len(stream))]}
    for i in range(len(stream) + 1):
        ways[f"split at {i}"] = [stream[:i], stream[i:]]
    for name, chunks in ways.items():
        assert _run(chunks, max_size, parser_class) == whole, f"{name} disagrees with whole feed"
    assert list(whole.events) == events
    assert whole.refused == refused
    if last_event_id is not None:
        assert whole.last_event_id == last_event_id
    if retry is not None:
        assert whole.retry == retry
    if comments is not None:
        assert whole.comments == comments
    return whole


def test_check_catches_disagreement() -> None:
    """The helper itself can fail: a parser that depends on chunking is caught."""

    class Chunky(EventStreamParser):
        def feed(self, data: bytes) -> list[Event]:
            return [Event("chunk")] if len(data) > 1 else []

    with pytest.raises(AssertionError, match="disagrees"):
        check(b"data: x\n\n", [], parser_class=Chunky)


@pytest.mark.parametrize(
    "stream",
    [b"data: x\n\n", b"data: x\r\n\r\n", b"data: x\r\r", b"data: x\r\n\n", b"data: x\n\r\n"],
    ids=["LF", "CRLF", "CR", "CRLF LF", "LF CRLF"],
)
def test_line_ends(stream: bytes) -> None:
    check(stream, [Event("x")])


def test_mixed_line_ends_in_one_event() -> None:
    check(b"data: a\rdata: b\r\ndata: c\nid: 1\r\r\n", [Event("a\nb\nc", id="1")])


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    check(b"data: a\r\ndata: b\r\n\r\n", [Event("a\nb")])
    outcome = _run([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"], 100)
    assert outcome.events == (Event("a\nb"),)


def test_cr_cr_is_a_blank_line() -> None:
    check(b"data: a\r\rdata: b\r\r", [Event("a"), Event("b")])


def test_lf_after_cr_only_skipped_once() -> None:
    check(b"data: a\r\n\ndata: b\n\n", [Event("a"), Event("b")])


def test_leading_bom_stripped() -> None:
    check(b"\xef\xbb\xbfdata: x\n\n", [Event("x")])


def test_second_bom_is_kept() -> None:
    # After the one leading BOM, a second one is part of the first field name: "\ufeffdata" is an
    # unknown field, so nothing is dispatched.
    check(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n", [Event("y")])


def test_bom_not_at_start_is_data() -> None:
    check(b"data: \xef\xbb\xbfx\n\n", [Event("\ufeffx")])
    check(b"\n\xef\xbb\xbfdata: x\n\ndata: y\n\n", [Event("y")])


def test_bom_split_across_chunks() -> None:
    outcome = _run([b"\xef", b"\xbb", b"\xbfdata: x\n\n"], 100)
    assert outcome.events == (Event("x"),)
    outcome = _run([b"", b"\xef\xbb", b"\xbf", b"data: x\n\n"], 100)
    assert outcome.events == (Event("x"),)


def test_unknown_fields_ignored() -> None:
    check(
        b"foo: bar\ndata: x\nDATA: y\nData: z\nretry2: 5\nid : 9\n\n",
        [Event("x")],
        last_event_id="",
        retry=None,
    )


def test_comments_counted_and_ignored() -> None:
    check(b":\n: hello\n:data: x\ndata: y\n:\n\n:bye\n", [Event("y")], comments=5)


def test_comment_only_stream() -> None:
    check(b":\n\n:\n\n", [], comments=2)


def test_field_without_colon() -> None:
    check(b"data\n\n", [Event("")])
    check(b"data\ndata\n\n", [Event("\n")])
    check(b"id\ndata: x\n\n", [Event("x", id="")], last_event_id="")
    check(b"event\ndata: x\n\n", [Event("x")])
    check(b"retry\ndata: x\n\n", [Event("x")], retry=None)


def test_one_leading_space_stripped_only() -> None:
    check(b"data:x\n\n", [Event("x")])
    check(b"data: x\n\n", [Event("x")])
    check(b"data:  x\n\n", [Event(" x")])
    check(b"data: \n\n", [Event("")])
    check(b"data:\tx\n\n", [Event("\tx")])
    check(b"data: x \n\n", [Event("x ")])
    check(b"event:  e\ndata: x\n\n", [Event("x", event=" e")])
    check(b"id:  1\ndata: x\n\n", [Event("x", id=" 1")], last_event_id=" 1")


def test_value_may_contain_colons() -> None:
    check(b"data: a: b:c\n\n", [Event("a: b:c")])


def test_data_lines_joined_with_lf() -> None:
    check(b"data: a\ndata:\ndata: b\n\n", [Event("a\n\nb")])


def test_event_name() -> None:
    check(b"event: add\ndata: x\n\n", [Event("x", event="add")])
    check(b"event: a\nevent: b\ndata: x\n\n", [Event("x", event="b")])


def test_empty_event_name_means_message() -> None:
    check(b"event:\ndata: x\n\n", [Event("x")])
    check(b"event: a\nevent:\ndata: x\n\n", [Event("x")])


def test_event_name_does_not_leak_into_next_event() -> None:
    check(b"event: a\ndata: 1\n\ndata: 2\n\n", [Event("1", event="a"), Event("2")])
    check(b"event: a\n\ndata: 2\n\n", [Event("2")])


def test_id_field() -> None:
    check(b"id: 1\ndata: x\n\n", [Event("x", id="1")], last_event_id="1")
    check(b"id: 1\nid: 2\ndata: x\n\n", [Event("x", id="2")], last_event_id="2")


def test_id_with_nul_ignored() -> None:
    check(b"id: 1\0\ndata: x\n\n", [Event("x")], last_event_id="")
    check(b"id: 5\nid: 1\0\ndata: x\n\n", [Event("x", id="5")], last_event_id="5")
    check(
        b"id: 5\ndata: a\n\nid: \0\ndata: b\n\n",
        [Event("a", id="5"), Event("b")],
        last_event_id="5",
    )


def test_empty_id_resets_last_event_id() -> None:
    check(
        b"id: 5\ndata: a\n\nid:\ndata: b\n\n",
        [Event("a", id="5"), Event("b", id="")],
        last_event_id="",
    )


def test_last_event_id_persists_across_events() -> None:
    check(b"id: 5\ndata: a\n\ndata: b\n\n", [Event("a", id="5"), Event("b")], last_event_id="5")


def test_last_event_id_updated_only_on_dispatch() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"id: 1\ndata: a\n") == []
    assert parser.last_event_id == ""
    assert parser.feed(b"\n") == [Event("a", id="1")]
    assert parser.last_event_id == "1"
    assert parser.feed(b"id: 2\ndata: b\n") == []
    assert parser.last_event_id == "1"
    assert parser.close() == []
    assert parser.last_event_id == "1"
    check(b"id: 1\ndata: a\n\nid: 2\ndata: b\n", [Event("a", id="1")], last_event_id="1")


def test_last_event_id_carried_over_a_reconnect() -> None:
    # The WHATWG "last event ID buffer" outlives a connection: a reconnecting client passes it on.
    parser = EventStreamParser(last_event_id="41")
    assert parser.last_event_id == "41"
    assert parser.feed(b"data: a\n\n") == [Event("a")]
    assert parser.last_event_id == "41"
    assert parser.feed(b"id: 42\ndata: b\n\n") == [Event("b", id="42")]
    assert parser.last_event_id == "42"
    parser = EventStreamParser(last_event_id="41")
    assert parser.feed(b"id:\n\n") == []
    assert parser.last_event_id == ""
    parser = EventStreamParser(last_event_id="41")
    assert parser.feed(b"id: 42\ndata: unfinished\n") == []
    assert parser.close() == []
    assert parser.last_event_id == "41"


def test_id_without_data_moves_last_event_id() -> None:
    # The blank line "dispatches" (sets lastEventId) even though no event fires: how a fresh
    # stream is primed with its resume position.
    check(b"id: 9\n\n", [], last_event_id="9")
    check(b"id: 9\n\ndata: x\n\n", [Event("x")], last_event_id="9")


def test_id_without_blank_line_does_not_count() -> None:
    check(b"id: 9\n", [], last_event_id="")
    check(b"id: 9", [], last_event_id="")


def test_retry_digits_only() -> None:
    check(b"retry: 1500\ndata: x\n\n", [Event("x", retry=1500)], retry=1500)
    check(b"retry: 0\n\n", [], retry=0)
    check(b"retry: 007\n\n", [], retry=7)


NOT_DIGITS: dict[str, bytes] = {
    "empty": b"",
    "negative": b"-1",
    "plus": b"+1",
    "fraction": b"1.5",
    "exponent": b"1e3",
    "two spaces": b"  1",
    "trailing space": b"1 ",
    "letters": b"abc",
    "hex": b"0x10",
    "arabic-indic digit": "\u0661".encode(),
    "fullwidth digit": "\uff11".encode(),
    "superscript digit": "\u00b9".encode(),
}


@pytest.mark.parametrize("value", NOT_DIGITS.values(), ids=NOT_DIGITS.keys())
def test_retry_not_digits_ignored(value: bytes) -> None:
    check(b"retry: 100\n\nretry:" + value + b"\ndata: x\n\n", [Event("x")], retry=100)


def test_retry_set_without_dispatch() -> None:
    # Unlike the id, the reconnection time takes effect as soon as the field is seen.
    check(b"retry: 100\n", [], retry=100)


def test_huge_retry_ignored_not_crashing() -> None:
    # Python refuses int() of more than 4300 digits with ValueError; the parser must not crash.
    check(b"retry: 100\n\nretry: " + b"9" * 5000 + b"\ndata: x\n\n", [Event("x")], retry=100)
    check(b"retry: " + b"1" + b"0" * 20 + b"\n\n", [], retry=None)
    check(b"retry: 18446744073709551615\n\n", [], retry=2**64 - 1)
    check(b"retry: 18446744073709551616\n\n", [], retry=None)
    check(b"retry: " + b"0" * 5000 + b"42\n\n", [], retry=42)


def test_event_without_data_not_dispatched() -> None:
    check(b"event: a\n\n", [])
    check(b"event: a\nid: 1\nretry: 5\n\n", [], last_event_id="1", retry=5)


def test_unterminated_event_dropped_by_close() -> None:
    check(b"data: x", [])
    check(b"data: x\n", [])
    check(b"data: x\r", [])
    check(b"data: a\n\ndata: b\n", [Event("a")])
    parser = EventStreamParser()
    assert parser.feed(b"data: x\n") == []
    assert parser.close() == []
    assert parser.close() == []


def test_empty_stream() -> None:
    check(b"", [], last_event_id="", comments=0)
    check(b"\n\n\n", [])


def test_blank_lines_between_events() -> None:
    check(b"\n\ndata: a\n\n\n\ndata: b\n\n", [Event("a"), Event("b")])


def test_invalid_utf8_replaced() -> None:
    check(b"data: a\xffb\n\n", [Event("a\ufffdb")])
    check(b"data: \xc3\n\n", [Event("\ufffd")])
    check(b"data: \xe2\x82\n\n", [Event("\ufffd")])
    check(b"data: \xed\xa0\x80\n\n", [Event("\ufffd\ufffd\ufffd")])  # encoded surrogate
    check(b"da\xfeta: x\n\ndata: y\n\n", [Event("y")])


def test_invalid_utf8_at_end_of_stream() -> None:
    check(b"data: x\n\n\xe2\x82", [Event("x")])


def test_multibyte_split_everywhere() -> None:
    text = "h\u00e9 \u2603 \U0001f600 \u2028"
    check(
        f"id: \u00e9\ndata: {text}\n\n".encode(), [Event(text, id="\u00e9")], last_event_id="\u00e9"
    )


def test_u2028_and_friends_do_not_end_lines() -> None:
    data = "a\u2028b\u2029c\u0085d\x0be\x0cf\x1cg"
    check(f"data: {data}\n\n".encode(), [Event(data)])


def test_nul_in_data_and_event() -> None:
    check(b"event: a\0b\ndata: \0\n\n", [Event("\0", event="a\0b")])


def test_event_fields_belong_to_their_block() -> None:
    stream = b"id: 1\nevent: e\nretry: 5\ndata: a\n\ndata: b\n\n"
    check(stream, [Event("a", event="e", id="1", retry=5), Event("b")], last_event_id="1", retry=5)


def test_many_events() -> None:
    stream = b"".join(encode_event(Event(str(i), id=str(i))) for i in range(30))
    check(stream, [Event(str(i), id=str(i)) for i in range(30)], last_event_id="29")


# Bounded buffer: a line plus the pending event's data may not exceed max_size characters.


def test_long_line_refused() -> None:
    check(b"data: " + b"x" * 20 + b"\n\n", [], refused=True, max_size=16)
    check(b": " + b"x" * 20 + b"\n", [], refused=True, max_size=16)
    check(b"x" * 40, [], refused=True, max_size=16)


def test_long_event_refused() -> None:
    stream = b"data: 123456\n" * 4 + b"\n"
    check(stream, [], refused=True, max_size=16)


def test_events_before_refusal_are_delivered() -> None:
    stream = b"id: 1\ndata: ok\n\nid: 2\ndata: " + b"x" * 40 + b"\n\n"
    outcome = check(stream, [Event("ok", id="1")], refused=True, max_size=16, last_event_id="1")
    assert outcome.last_event_id == "1"


def test_within_bound_accepted() -> None:
    check(b"data: 0123456789\n\n", [Event("0123456789")], max_size=16)
    check(b"data:0123456789ab\n\n", [], refused=True, max_size=16)
    check(b"data: 01234\ndata: 6789\n\n", [Event("01234\n6789")], max_size=16)
    check(b"data: 012345\ndata: 6789\n\n", [], refused=True, max_size=16)
    # Many small events each within the bound: the bound is per event, not per stream.
    check(b"data: abc\n\n" * 10, [Event("abc")] * 10, max_size=16)


def test_bound_counts_characters_not_bytes() -> None:
    check("data:\u2603\u2603\u2603\n\n".encode(), [Event("\u2603\u2603\u2603")], max_size=8)


def test_refused_parser_stays_refused() -> None:
    parser = EventStreamParser(max_size=8)
    with pytest.raises(StreamParseError):
        parser.feed(b"x" * 9)
    with pytest.raises(StreamParseError):
        parser.feed(b"\n\ndata: ok\n\n")
    with pytest.raises(StreamParseError):
        parser.close()


def test_refusal_after_events_is_reported_on_next_call() -> None:
    parser = EventStreamParser(max_size=8)
    assert parser.feed(b"data: a\n\n" + b"x" * 9) == [Event("a")]
    with pytest.raises(StreamParseError):
        parser.feed(b"")
    with pytest.raises(StreamParseError):
        parser.close()


def test_feed_after_close() -> None:
    parser = EventStreamParser()
    parser.close()
    with pytest.raises(StreamParseError):
        parser.feed(b"data: x\n\n")


@pytest.mark.timeout(30)
def test_long_line_in_small_chunks_is_linear() -> None:
    # A line arriving in many small reads must not be re-copied per read. A parser that joins its
    # pending tail on every feed needs minutes here (measured: 24 s for 1 MB); a linear one, 0.1 s.
    size = 1 << 22
    parser = EventStreamParser(max_size=size + 16)
    chunk = b"x" * 64
    assert parser.feed(b"data: ") == []
    for _ in range(size // len(chunk)):
        assert parser.feed(chunk) == []
    (event,) = parser.feed(b"\n\n")
    assert len(event.data or "") == size


def test_parse_helper() -> None:
    assert parse(b"data: a\n\ndata: b\n") == [Event("a")]
    assert parse(b"") == []
    big = "y" * 100_000
    assert parse(encode_event(Event(big))) == [Event(big)]


# --------------------------------------------------------------------------------------------
# Property tests: parse(encode_event(e)) == [e]

_NO_BREAKS = st.text().filter(lambda s: "\r" not in s and "\n" not in s)
_NAMES = _NO_BREAKS.filter(bool)
_IDS = _NO_BREAKS.filter(lambda s: "\0" not in s)
_RETRIES = st.integers(min_value=0, max_value=2**64 - 1)
_BREAKY_TEXT = st.lists(
    st.one_of(st.text(max_size=4), st.sampled_from(["\r", "\n", "\r\n", "\n\r", "\u2028", "\x85"]))
).map("".join)


def _normalised(data: str) -> str:
    return re.sub(r"\r\n|\r", "\n", data)


_events = st.builds(
    Event,
    data=_BREAKY_TEXT,
    event=st.none() | _NAMES,
    id=st.none() | _IDS,
    retry=st.none() | _RETRIES,
)


def _as_parsed(event: Event) -> Event:
    """What a parser gives back for *event*: data line breaks normalised to LF."""
    return Event(_normalised(event.data or ""), event=event.event, id=event.id, retry=event.retry)


@settings(max_examples=200, deadline=None)
@given(_events)
def test_roundtrip(event: Event) -> None:
    assert parse(encode_event(event)) == [_as_parsed(event)]


@settings(max_examples=200, deadline=None)
@given(st.text(), st.none() | _NAMES, st.none() | _IDS, st.none() | _RETRIES)
def test_roundtrip_without_cr(
    data: str, name: str | None, id: str | None, retry: int | None
) -> None:
    data = data.replace("\r", "")
    event = Event(data, event=name, id=id, retry=retry)
    assert parse(encode_event(event)) == [event]


@settings(max_examples=200, deadline=None)
@given(st.lists(_events, max_size=6), st.data())
def test_roundtrip_stream_in_random_chunks(events: list[Event], draw: st.DataObject) -> None:
    stream = b"".join(encode_event(e) for e in events)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    parser = EventStreamParser()
    parsed: list[Event] = []
    for chunk in chunks:
        parsed.extend(parser.feed(chunk))
    parsed.extend(parser.close())
    assert parsed == [_as_parsed(e) for e in events]
    ids = [e.id for e in events if e.id is not None]
    assert parser.last_event_id == (ids[-1] if ids else "")


@settings(max_examples=100, deadline=None)
@given(_IDS, st.none() | _RETRIES)
def test_data_none_moves_last_event_id_only(id: str, retry: int | None) -> None:
    parser = EventStreamParser()
    assert parser.feed(encode_event(Event(None, id=id, retry=retry))) == []
    assert parser.last_event_id == id
    assert parser.retry == retry


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_comments_are_invisible(text: str) -> None:
    parser = EventStreamParser()
    assert parser.feed(encode_comment(text) + encode_event(Event("x"))) == [Event("x")]
    assert parser.comments == len(re.split(r"\r\n|\r|\n", text))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.data())
def test_arbitrary_bytes_never_crash_and_chunking_never_matters(
    stream: bytes, draw: st.DataObject
) -> None:
    cut = draw.draw(st.integers(0, len(stream)))
    max_size = draw.draw(st.integers(1, 64))
    whole = _run([stream], max_size)
    assert _run([stream[:cut], stream[cut:]], max_size) == whole
    assert _run([stream[i : i + 1] for i in range(len(stream))], max_size) == whole


# An independent parser reads what we encode the same way (httpx-sse, through its public API on
# an in-memory response: no network involved, nothing of it mocked).


@settings(max_examples=200, deadline=None)
@given(st.lists(_events, min_size=1, max_size=5))
def test_httpx_sse_reads_what_we_encode(events: list[Event]) -> None:
    import httpx
    from httpx_sse import EventSource

    stream = b"".join(encode_event(e) for e in events)
    response = httpx.Response(
        200, headers={"content-type": "text/event-stream; charset=utf-8"}, content=stream
    )
    seen = list(EventSource(response).iter_sse())
    assert len(seen) == len(events)
    last_id = ""
    for sent, got in zip(events, seen, strict=True):
        if sent.id is not None:
            last_id = sent.id
        assert got.data == _normalised(sent.data or "")
        assert got.event == (sent.event or "message")
        assert got.id == last_id
        assert got.retry == sent.retry
