"""The bridge's sans-I/O framing: exact bytes, incremental decoding at every split, typed errors,
bounds, and fuzzing (hypothesis)."""

from __future__ import annotations

import ast
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tornado_sse.broker import framing
from tornado_sse.broker.framing import (
    ANNOUNCE,
    ANNOUNCED,
    CLOSING,
    EVENT,
    GAP,
    HISTORY,
    HISTORY_PAGE,
    HUB_BOUND,
    MAX_ARRAY_LEN,
    METRICS,
    METRICS_QUERY,
    METRICS_REPLY,
    METRICS_RESULT,
    PEER_BOUND,
    PRESENCE,
    PRESENCE_ANSWER,
    PRESENCE_ASK,
    PRESENCE_TAKEN,
    PUBLISH,
    PUBLISH_OVERHEAD,
    PUBLISHED,
    SUBSCRIBE,
    SUBSCRIBED,
    TAIL,
    TAIL_START,
    UNSUBSCRIBE,
    VERSION,
    WELCOME,
    FrameDecoder,
    FrameError,
    FrameTooLargeError,
    MalformedFrameError,
    TruncatedFrameError,
    UnsupportedVersionError,
    pack,
    publish_size,
)
from tornado_sse.errors import BrokerError

TABLE = [
    (pack(UNSUBSCRIBE, ["a"]), b"\x93\x03\x03\x91\xa1a"),
    (pack(SUBSCRIBE, 7, ["a", "bc"]), b"\x94\x03\x02\x07\x92\xa1a\xa2bc"),
    (pack(PUBLISHED, 1, "x-1"), b"\x94\x03\x06\x01\xa3x-1"),
    (pack(GAP, 2, "x-9"), b"\x94\x03\x0a\x02\xa3x-9"),
    (
        pack(PUBLISH, 3, "c", "hi", None, 1500, 2.0),
        b"\x98\x03\x01\x03\xa1c\xa2hi\xc0\xcd\x05\xdc\xcb" + struct.pack(">d", 2.0),
    ),
    (
        pack(EVENT, "c", "x-1", b"data: x\n\n", 1.5),
        b"\x96\x03\x05\xa1c\xa3x-1\xc4\x09data: x\n\n\xcb" + struct.pack(">d", 1.5),
    ),
    (pack(HISTORY, 4, ["a"], "x-1", 500), b"\x96\x03\x04\x04\x91\xa1a\xa3x-1\xcd\x01\xf4"),
    (
        pack(HISTORY_PAGE, 4, [["a", "x-2", b"data: y\n\n", 1.5]], True),
        b"\x95\x03\x08\x04\x91\x94\xa1a\xa3x-2\xc4\x09data: y\n\n\xcb"
        + struct.pack(">d", 1.5)
        + b"\xc3",
    ),
    (pack(HISTORY_PAGE, 5, [], False), b"\x95\x03\x08\x05\x90\xc2"),
    (
        pack(PRESENCE_ANSWER, 8, 3, [["al", 2], ["bo", 1]], ["al", "cy"]),
        b"\x96\x03\x15\x08\x03\x92\x92\xa2al\x02\x92\xa2bo\x01\x92\xa2al\xa2cy",
    ),
    (pack(PRESENCE_ANSWER, 9, 0, [], []), b"\x96\x03\x15\x09\x00\x90\x90"),
]


@pytest.mark.parametrize(("packed", "expected"), TABLE)
def test_pack_gives_exact_bytes(packed: bytes, expected: bytes) -> None:
    assert packed == expected


VALID_PEER_BOUND = [
    pack(WELCOME, "k-0", "k-5", 123, 4096),
    pack(EVENT, "news", "k-6", b"id: k-6\ndata: x\n\n", 1.25),
    pack(PUBLISHED, 1, "k-6"),
    pack(SUBSCRIBED, 2, "k-6"),
    pack(HISTORY_PAGE, 3, [["news", "k-6", b"data: x\n\n", 1.0]], True),
    pack(HISTORY_PAGE, 3, [], False),
    pack(GAP, 4, "k-6"),
    pack(CLOSING),
    pack(METRICS_QUERY, 5),
    pack(METRICS_RESULT, 5, [[["processes", "", 1], ["latency_sum", "", 0.5]], []]),
    pack(TAIL_START, 6, "k-2"),
    pack(PRESENCE_TAKEN, 7),
    pack(PRESENCE_ANSWER, 8, 3, [["alice", 2], ["bob", 1]], ["alice", "carol"]),
    pack(PRESENCE_ANSWER, 8, 0, [], []),
    pack(ANNOUNCED, 9),
]
VALID_HUB_BOUND = [
    pack(PUBLISH, 1, "news", "x", "name", 10, 1.0),
    pack(PUBLISH, 2, "news", None, None, None, 1),
    pack(SUBSCRIBE, 3, ["a", "b"]),
    pack(UNSUBSCRIBE, ["a"]),
    pack(HISTORY, 4, ["a"], "k-1", 1),
    pack(HISTORY, 4, [], "k-1", 2**63 - 1),
    pack(METRICS, 5),
    pack(METRICS_REPLY, 5, [["channel_subscribers", "news", 2]]),
    pack(TAIL, 6, ["a", "b"], 50),
    pack(TAIL, 6, ["a"], 0),
    pack(PRESENCE, 7, [["room", 3, [["alice", 2], ["bob", 1]]], ["gone", 0, []]]),
    pack(PRESENCE_ASK, 8, "room"),
    pack(ANNOUNCE, 9, "room", "alice", 3.0),
    pack(ANNOUNCE, 9, "room", "alice", 0),
]


@pytest.mark.parametrize(
    ("accept", "frames"), [(PEER_BOUND, VALID_PEER_BOUND), (HUB_BOUND, VALID_HUB_BOUND)]
)
def test_decode_whole_byte_by_byte_and_split_everywhere(
    accept: frozenset[int], frames: list[bytes]
) -> None:
    stream = b"".join(frames)
    expected = [msgpack.unpackb(frame) for frame in frames]
    assert FrameDecoder(accept).feed(stream) == expected
    decoder = FrameDecoder(accept)
    out = []
    for index in range(len(stream)):
        out.extend(decoder.feed(stream[index : index + 1]))
    assert out == expected
    decoder.close()
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder(accept)
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == expected
        assert decoder.pending == 0
        decoder.close()


def test_many_frames_in_one_feed_larger_than_the_limit() -> None:
    frame = pack(SUBSCRIBE, 1, ["channel"])
    decoder = FrameDecoder(HUB_BOUND, max_frame_size=64)
    frames = decoder.feed(frame * 1000)
    assert len(frames) == 1000


BAD = {
    "not msgpack": (b"\xc1", MalformedFrameError),
    "not an array": (msgpack.packb(5), MalformedFrameError),
    "a map": (b"\x81\xa1a\x01", MalformedFrameError),
    "too short": (msgpack.packb([1]), MalformedFrameError),
    "version not an int": (msgpack.packb(["1", SUBSCRIBE, 1, []]), MalformedFrameError),
    "future version": (msgpack.packb([VERSION + 1, SUBSCRIBE, 1, []]), UnsupportedVersionError),
    "version 1 (whole history answers)": (
        msgpack.packb([1, HISTORY, 1, ["a"], "x-1"]),
        UnsupportedVersionError,
    ),
    "version 2 (no announced in presence answers)": (
        msgpack.packb([2, SUBSCRIBE, 1, ["a"]]),
        UnsupportedVersionError,
    ),
    "version zero": (msgpack.packb([0, SUBSCRIBE, 1, []]), UnsupportedVersionError),
    "unknown kind": (msgpack.packb([VERSION, 99, 1]), MalformedFrameError),
    "kind for the other side": (pack(EVENT, "c", "x-1", b"", 0.0), MalformedFrameError),
    "missing field": (msgpack.packb([VERSION, SUBSCRIBE, 1]), MalformedFrameError),
    "extra field": (pack(SUBSCRIBE, 1, ["a"], "more"), MalformedFrameError),
    "rid negative": (pack(SUBSCRIBE, -1, ["a"]), MalformedFrameError),
    "rid a float": (pack(SUBSCRIBE, 1.0, ["a"]), MalformedFrameError),
    "rid a bool": (pack(SUBSCRIBE, True, ["a"]), MalformedFrameError),
    "channels not a list": (pack(SUBSCRIBE, 1, "a"), MalformedFrameError),
    "channel bytes": (pack(SUBSCRIBE, 1, [b"a"]), MalformedFrameError),
    "data bytes": (pack(PUBLISH, 1, "c", b"x", None, None, 1.0), MalformedFrameError),
    "retry negative": (pack(PUBLISH, 1, "c", "x", None, -5, 1.0), MalformedFrameError),
    "time a string": (pack(PUBLISH, 1, "c", "x", None, None, "now"), MalformedFrameError),
    "bad utf-8": (b"\x93\x03\x03\x91\xa2\xff\xfe", MalformedFrameError),
    "ext type": (b"\x93\x03\x03\x91\xd4\x05\x00", MalformedFrameError),
    "history page size zero": (pack(HISTORY, 1, ["a"], "x-1", 0), MalformedFrameError),
    "history page size a bool": (pack(HISTORY, 1, ["a"], "x-1", True), MalformedFrameError),
    "history without a page size": (pack(HISTORY, 1, ["a"], "x-1"), MalformedFrameError),
    "timestamp": (
        msgpack.packb([VERSION, 3, [0]])[:-1] + b"\xd6\xff\x00\x00\x00\x01",
        MalformedFrameError,
    ),
    "huge array header": (b"\xdd\xff\xff\xff\xff", MalformedFrameError),
    "deep nesting": (b"\x91" * 5000, MalformedFrameError),
}


@pytest.mark.parametrize(("name"), list(BAD))
def test_bad_input_is_a_typed_error_and_final(name: str) -> None:
    data, error = BAD[name]
    decoder = FrameDecoder(HUB_BOUND)
    with pytest.raises(error):
        decoder.feed(data)
    with pytest.raises(MalformedFrameError, match="failed before"):
        decoder.feed(pack(UNSUBSCRIBE, ["a"]))
    assert issubclass(error, FrameError) and issubclass(error, BrokerError)


def test_unsupported_version_carries_it() -> None:
    with pytest.raises(UnsupportedVersionError) as info:
        FrameDecoder(HUB_BOUND).feed(msgpack.packb([2, SUBSCRIBE, 1, []]))
    assert info.value.version == 2
    assert "version 2" in str(info.value)
    assert VERSION == 3


def test_oversize_frames_whole_and_growing() -> None:
    decoder = FrameDecoder(HUB_BOUND, max_frame_size=100)
    assert decoder.feed(pack(PUBLISH, 1, "c", "x" * 60, None, None, 0.0))
    with pytest.raises(FrameTooLargeError):
        decoder.feed(pack(PUBLISH, 1, "c", "x" * 200, None, None, 0.0))
    big = pack(PUBLISH, 1, "c", "x" * 10_000, None, None, 0.0)
    decoder = FrameDecoder(HUB_BOUND, max_frame_size=100)
    with pytest.raises(FrameTooLargeError):
        for index in range(0, len(big), 30):
            decoder.feed(big[index : index + 30])
    assert index < 200, "refused as soon as the frame passed the limit"


def test_truncated_stream() -> None:
    frame = pack(SUBSCRIBE, 1, ["a"])
    decoder = FrameDecoder(HUB_BOUND)
    assert decoder.feed(frame[:-1]) == []
    assert decoder.pending == len(frame) - 1
    with pytest.raises(TruncatedFrameError):
        decoder.close()
    FrameDecoder(HUB_BOUND).close()  # nothing pending: fine


def test_array_bound_is_enforced() -> None:
    ok = pack(SUBSCRIBE, 1, ["a"] * MAX_ARRAY_LEN)
    assert FrameDecoder(HUB_BOUND, max_frame_size=1 << 20).feed(ok)
    too_long = pack(SUBSCRIBE, 1, ["a"] * (MAX_ARRAY_LEN + 1))
    with pytest.raises(MalformedFrameError):
        FrameDecoder(HUB_BOUND, max_frame_size=1 << 20).feed(too_long)


def test_framing_imports_no_io_or_tornado() -> None:
    tree = ast.parse(Path(framing.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "collections.abc", "typing", "msgpack", "..errors"}


# ---------------------------------------------------------------------- fuzzing

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=6),
    max_leaves=20,
)
frame_like = st.builds(
    lambda version, kind, fields: msgpack.packb([version, kind, *fields], use_bin_type=True),
    st.sampled_from([VERSION, VERSION, VERSION, 0, VERSION - 1, VERSION + 1]),
    st.integers(min_value=-1, max_value=12),
    st.lists(msgpack_values, max_size=8),
)
fuzz_input = st.lists(st.binary(max_size=64) | frame_like, max_size=8).map(b"".join)


def _decode_all(accept: frozenset[int], data: bytes, step: int) -> list[list[Any]] | None:
    """The frames of *data* fed *step* bytes at a time, or None if the decoder refused it."""
    decoder = FrameDecoder(accept, max_frame_size=256)
    out = []
    try:
        for index in range(0, len(data), step):
            out.extend(decoder.feed(data[index : index + step]))
        decoder.close()
    except FrameError:
        return None
    return out


@settings(max_examples=200, deadline=None)
@given(fuzz_input, st.integers(min_value=1, max_value=40))
def test_fuzzed_bytes_give_frames_or_a_frame_error(data: bytes, step: int) -> None:
    for accept in (HUB_BOUND, PEER_BOUND):
        whole = _decode_all(accept, data, len(data) or 1)
        for frame in whole or ():
            assert frame[0] == VERSION and frame[1] in accept
            assert well_formed(frame), frame
        # accepted or refused, and the frames, do not depend on how the bytes are split
        assert _decode_all(accept, data, step) == whole


publish_frames = st.builds(
    lambda rid, channel, data, event, retry, at: pack(
        PUBLISH, rid, channel, data, event, retry, at
    ),
    st.integers(min_value=0, max_value=2**63 - 1),
    st.text(max_size=30),
    st.none() | st.text(max_size=200),
    st.none() | st.text(max_size=20),
    st.none() | st.integers(min_value=0, max_value=2**63 - 1),
    st.floats(allow_nan=False),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(publish_frames, min_size=1, max_size=10), st.data())
def test_valid_frames_round_trip_at_any_split(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder = FrameDecoder(HUB_BOUND)
    out = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        out.extend(decoder.feed(stream[previous:cut]))
        previous = cut
    decoder.close()
    assert out == [msgpack.unpackb(frame) for frame in frames]


_TEXT_SIZES = st.sampled_from([0, 1, 31, 32, 255, 256, 65535, 65536, 70000])


@settings(max_examples=60, deadline=None)
@given(
    channel=st.integers(1, 200),
    data=st.one_of(st.none(), _TEXT_SIZES),
    event=st.one_of(st.none(), _TEXT_SIZES),
    wide=st.booleans(),
    rid=st.integers(0, (1 << 63) - 1),
    retry=st.one_of(st.none(), st.integers(0, (1 << 63) - 1)),
    published_at=st.floats(allow_nan=False),
)
def test_publish_size_bounds_the_publish_frame(
    channel: int,
    data: int | None,
    event: int | None,
    wide: bool,
    rid: int,
    retry: int | None,
    published_at: float,
) -> None:
    """What a peer checks against the hub's max_frame_size is never less than what it sends,
    and not much more; msgpack's string headers widen at 32, 256 and 65536 bytes."""
    char = "é" if wide else "x"
    data_text = None if data is None else char * data
    event_text = None if event is None else char * event
    name = "c" * channel
    frame = pack(PUBLISH, rid, name, data_text, event_text, retry, published_at)
    bound = publish_size(name, data_text, event_text)
    assert len(frame) <= bound <= len(frame) + PUBLISH_OVERHEAD


# ---------------------------------------------------------------------- schema, field by field

#: The field types of each kind, transcribed from the module docstring independently of the
#: decoder's own table: ``rid`` and ``int?`` are integers in [0, 2**63) (``int?`` also None),
#: ``count`` an integer in [1, 2**63), ``number`` an int or a float, ``bool`` true or false,
#: ``frames`` a list of ``[str, str, bytes, number]``, ``users`` a list of ``[identity: str,
#: streams: rid]``, ``entries`` a list of ``[channel: str, streams: rid, users]``.
SCHEMA: dict[int, tuple[str, ...]] = {
    WELCOME: ("str", "str", "rid", "rid"),
    PUBLISH: ("rid", "str", "str?", "str?", "int?", "number"),
    SUBSCRIBE: ("rid", "[str]"),
    UNSUBSCRIBE: ("[str]",),
    HISTORY: ("rid", "[str]", "str", "count"),
    EVENT: ("str", "str", "bytes", "number"),
    PUBLISHED: ("rid", "str"),
    SUBSCRIBED: ("rid", "str"),
    HISTORY_PAGE: ("rid", "frames", "bool"),
    GAP: ("rid", "str"),
    CLOSING: (),
    METRICS: ("rid",),
    METRICS_QUERY: ("rid",),
    METRICS_REPLY: ("rid", "samples"),
    METRICS_RESULT: ("rid", "[samples]"),
    TAIL: ("rid", "[str]", "rid"),
    TAIL_START: ("rid", "str"),
    PRESENCE: ("rid", "entries"),
    PRESENCE_TAKEN: ("rid",),
    PRESENCE_ASK: ("rid", "str"),
    PRESENCE_ANSWER: ("rid", "rid", "users", "[str]"),
    ANNOUNCE: ("rid", "str", "str", "number"),
    ANNOUNCED: ("rid",),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rid(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def matches(spec: str, value: Any) -> bool:
    """Whether *value* is of the field type *spec* (see `SCHEMA`)."""
    if spec == "str":
        return isinstance(value, str)
    if spec == "str?":
        return value is None or isinstance(value, str)
    if spec == "rid":
        return _is_rid(value)
    if spec == "int?":
        return value is None or _is_rid(value)
    if spec == "count":
        return _is_rid(value) and value > 0
    if spec == "bool":
        return isinstance(value, bool)
    if spec == "number":
        return _is_number(value)
    if spec == "bytes":
        return isinstance(value, bytes)
    if spec == "[str]":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if spec == "samples":
        return isinstance(value, list) and all(
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and _is_number(item[2])
            for item in value
        )
    if spec == "[samples]":
        return isinstance(value, list) and all(matches("samples", item) for item in value)
    if spec == "users":
        return isinstance(value, list) and all(
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and _is_rid(item[1])
            for item in value
        )
    if spec == "entries":
        return isinstance(value, list) and all(
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and _is_rid(item[1])
            and matches("users", item[2])
            for item in value
        )
    assert spec == "frames"
    return isinstance(value, list) and all(
        isinstance(item, list)
        and len(item) == 4
        and isinstance(item[0], str)
        and isinstance(item[1], str)
        and isinstance(item[2], bytes)
        and _is_number(item[3])
        for item in value
    )


def well_formed(obj: list[Any]) -> bool:
    kind = obj[1]
    schema = SCHEMA[kind]
    return len(obj) == 2 + len(schema) and all(
        matches(spec, value) for spec, value in zip(schema, obj[2:], strict=False)
    )


numbers = st.floats(allow_nan=False) | st.integers(min_value=-(2**63), max_value=2**64 - 1)
rids = st.integers(min_value=0, max_value=2**63 - 1)
FIELD_VALUES = {
    "str": st.text(max_size=10),
    "str?": st.none() | st.text(max_size=10),
    "rid": rids,
    "int?": st.none() | rids,
    "count": st.integers(min_value=1, max_value=2**63 - 1),
    "bool": st.booleans(),
    "number": numbers,
    "bytes": st.binary(max_size=10),
    "[str]": st.lists(st.text(max_size=5), max_size=3),
    "frames": st.lists(
        st.tuples(st.text(max_size=5), st.text(max_size=5), st.binary(max_size=5), numbers).map(
            list
        ),
        max_size=3,
    ),
    "samples": st.lists(
        st.tuples(st.text(max_size=5), st.text(max_size=5), numbers).map(list), max_size=3
    ),
    "[samples]": st.lists(
        st.lists(
            st.tuples(st.text(max_size=5), st.text(max_size=5), numbers).map(list), max_size=2
        ),
        max_size=2,
    ),
    "users": st.lists(st.tuples(st.text(max_size=5), rids).map(list), max_size=3),
    "entries": st.lists(
        st.tuples(
            st.text(max_size=5),
            rids,
            st.lists(st.tuples(st.text(max_size=5), rids).map(list), max_size=2),
        ).map(list),
        max_size=2,
    ),
}


#: values next to the edge of some field type
EDGES = st.sampled_from([-1, 0, 2**63, 2**64 - 1, True, False, 0.5, "", b"", None, [], [b"x"], [1]])


@st.composite
def near_frames(draw: st.DrawFn) -> list[Any]:
    """A well-formed frame of some kind, or one with a single change: one field of another
    type or value, or a field too few or too many."""
    kind = draw(st.sampled_from(sorted(SCHEMA)))
    fields = [draw(FIELD_VALUES[spec]) for spec in SCHEMA[kind]]
    changes = ["none", "field", "field", "field", "fewer", "more"] if fields else ["none", "more"]
    change = draw(st.sampled_from(changes))
    if change == "field":
        fields[draw(st.integers(0, len(fields) - 1))] = draw(EDGES | msgpack_values)
    elif change == "fewer":
        fields.pop()
    elif change == "more":
        fields.append(draw(msgpack_values))
    return [VERSION, kind, *fields]


@settings(max_examples=300, deadline=None)
@given(near_frames())
def test_a_frame_is_accepted_exactly_when_its_fields_match_the_schema(frame: list[Any]) -> None:
    decoder = FrameDecoder(HUB_BOUND | PEER_BOUND)
    try:
        decoded = decoder.feed(msgpack.packb(frame, use_bin_type=True))
    except MalformedFrameError:
        assert not well_formed(frame), frame
        return
    assert well_formed(frame), frame
    (accepted,) = decoded
    assert accepted == frame
    assert [type(value) for value in accepted] == [type(value) for value in frame]


#: a well-formed value of each field type
TYPICAL = {
    "str": "c",
    "str?": "e",
    "rid": 7,
    "int?": 1500,
    "count": 500,
    "bool": True,
    "number": 1.5,
    "bytes": b"data: x\n\n",
    "[str]": ["a", "b"],
    "frames": [["c", "x-1", b"data: x\n\n", 1.5]],
    "samples": [["events_sent", "", 3]],
    "[samples]": [[["events_sent", "", 3]], []],
    "users": [["alice", 2]],
    "entries": [["room", 2, [["alice", 2]]]],
}
#: values at or past the edge of some field type (a frame's item takes them too)
EDGE_VALUES = [
    -1,
    0,
    2**63,
    2**64 - 1,
    True,
    False,
    0.5,
    "",
    b"",
    None,
    [],
    [b"x"],
    [1],
    ["c", "x-1", b""],
]


def test_every_field_at_every_edge() -> None:
    """Each field of each kind (and each part of a history item) replaced by each edge value:
    accepted exactly when the schema says so."""
    for kind, schema in SCHEMA.items():
        base = [VERSION, kind, *(TYPICAL[spec] for spec in schema)]
        variants = []
        for index in range(2, len(base)):
            for value in EDGE_VALUES:
                variants.append([*base[:index], value, *base[index + 1 :]])
                if schema[index - 2] == "frames":
                    item = TYPICAL["frames"][0]
                    variants.append([*base[:index], [item[:3]], *base[index + 1 :]])
                    variants.append([*base[:index], [[*item, 0]], *base[index + 1 :]])
                    for part in range(4):
                        item = list(TYPICAL["frames"][0])
                        item[part] = value
                        variants.append([*base[:index], [item], *base[index + 1 :]])
                if schema[index - 2] == "users":
                    for part in range(2):
                        user = list(TYPICAL["users"][0])
                        user[part] = value
                        variants.append([*base[:index], [user], *base[index + 1 :]])
                if schema[index - 2] == "entries":
                    for part in range(3):
                        entry = list(TYPICAL["entries"][0])
                        entry[part] = value
                        variants.append([*base[:index], [entry], *base[index + 1 :]])
                    user = list(TYPICAL["users"][0])
                    user[1] = value
                    entry = ["room", 2, [user]]
                    variants.append([*base[:index], [entry], *base[index + 1 :]])
                if schema[index - 2] == "samples":
                    sample = TYPICAL["samples"][0]
                    variants.append([*base[:index], [sample[:2]], *base[index + 1 :]])
                    variants.append([*base[:index], [[*sample, 0]], *base[index + 1 :]])
                    for part in range(3):
                        sample = list(TYPICAL["samples"][0])
                        sample[part] = value
                        variants.append([*base[:index], [sample], *base[index + 1 :]])
        for frame in variants:
            try:
                FrameDecoder(HUB_BOUND | PEER_BOUND).feed(msgpack.packb(frame, use_bin_type=True))
            except MalformedFrameError:
                assert not well_formed(frame), frame
            else:
                assert well_formed(frame), frame


def test_the_schema_covers_every_kind_the_decoder_accepts() -> None:
    """A kind added to the protocol without a line in `SCHEMA` would escape the tests above."""
    assert set(SCHEMA) == set(HUB_BOUND | PEER_BOUND)
