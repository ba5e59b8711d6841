"""Frames of the unix-socket bridge, free of I/O.

The bridge between worker processes and their hub (`tornado_sse.broker.bridge`) speaks msgpack
over a unix stream socket. This module only turns frames into bytes (:func:`pack`) and bytes into
checked frames (:class:`FrameDecoder`); it never touches a socket, so it can be tested (and
fuzzed) exhaustively, as h11 does for HTTP.

Every frame is one msgpack array ``[version, kind, *fields]``. The version is in every frame, not
only in a handshake, so that a peer speaking another version is refused at its first frame,
whatever that frame is. The fields of each kind::

    kind            direction     fields
    WELCOME         hub -> peer   epoch_start_id: str, current_id: str, hub_pid: int,
                                  max_frame_size: int
    PUBLISH         peer -> hub   rid: int, channel: str, data: str | None, event: str | None,
                                  retry: int | None, published_at: float
    SUBSCRIBE       peer -> hub   rid: int, channels: [str]
    UNSUBSCRIBE     peer -> hub   channels: [str]
    HISTORY         peer -> hub   rid: int, channels: [str], after: str, limit: int (>= 1)
    EVENT           hub -> peer   channel: str, id: str, data: bytes, published_at: float
    PUBLISHED       hub -> peer   rid: int, id: str
    SUBSCRIBED      hub -> peer   rid: int, position: str
    HISTORY_PAGE    hub -> peer   rid: int, frames: [[channel, id, data, published_at]],
                                  more: bool
    GAP             hub -> peer   rid: int, current_id: str
    CLOSING         hub -> peer   (none): the hub is closing on purpose (its process stops)
    METRICS         peer -> hub   rid: int (collect every process's metrics)
    METRICS_QUERY   hub -> peer   qid: int (send yours)
    METRICS_REPLY   peer -> hub   qid: int, samples: [[name: str, label: str, value: number]]
    METRICS_RESULT  hub -> peer   rid: int, replies: [samples]  (one per process that answered)
    TAIL            peer -> hub   rid: int, channels: [str], count: int
    TAIL_START      hub -> peer   rid: int, after: str  (the last *count* events follow it)
    PRESENCE        peer -> hub   rid: int, entries: [[channel, streams: int, [[identity, n]]]]
                                  (the peer's absolute counts of those channels; 0 forgets one)
    PRESENCE_TAKEN  hub -> peer   rid: int
    PRESENCE_ASK    peer -> hub   rid: int, channel: str
    PRESENCE_ANSWER hub -> peer   rid: int, streams: int, users: [[identity, n]]  (all peers),
                                  announced: [identity]  (joined, no leave sent yet)
    ANNOUNCE        peer -> hub   rid: int, channel: str, identity: str, grace: float
                                  (publish join/leave of identity if the hub's view changed)
    ANNOUNCED       hub -> peer   rid: int

``rid`` is a request id chosen by the peer and echoed in the answer. ``data`` of an EVENT is the
event already encoded for the wire (`tornado_sse.protocol.encode_event`): the hub encodes once and
no worker encodes again.

History is read in pages (issue 12): a HISTORY request asks for at most ``limit`` events after
``after``, and the hub answers one HISTORY_PAGE of at most that many, cut before it would pass the
hub's ``max_frame_size`` (a page holds at least one event), with ``more`` true if more follow;
the next request continues after the last id of the page. Each request is checked for a gap on
its own (GAP), so history trimmed under a long read is noticed. The hub thus holds at most a
page for a request, however large history is, and a worker's stream at most the page its client
is taking.

Version 2 replaced version 1's whole answers (HISTORY_PART frames and a HISTORY_END, kind 9, now
unused) with pages. Version 3 added ``announced`` to PRESENCE_ANSWER (the identities the hub
announced present on the channel, ``announced`` of `.Presence`). The hub and its workers of one
``serve`` are always the same version, and processes of different versions refuse each other at
their first frame.

Why msgpack's streaming ``Unpacker.feed`` rather than length-prefixed frames: it already is an
incremental, bounded decoder written in C, and it decodes a burst of small frames in one call
without a Python-level slice per frame. The bound is kept here: input is fed in slices of at most
``max_frame_size`` bytes, and a frame (complete, or still incomplete) larger than that raises
`FrameTooLargeError`, so the decoder never holds more than twice the limit.

Errors are the peer's fault, typed, and final: after a `FrameError` the decoder refuses more input
and the connection should be dropped (the hub logs it and keeps serving everybody else)::

    BrokerError
     +- FrameError                 a bridge peer sent bytes we refuse
         +- MalformedFrameError    not msgpack, not an array, unknown kind, wrong fields
         +- UnsupportedVersionError
         +- FrameTooLargeError
         +- TruncatedFrameError    the connection ended in the middle of a frame
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import msgpack

from ..errors import BrokerError

__all__ = [
    "ANNOUNCE",
    "ANNOUNCED",
    "CLOSING",
    "DEFAULT_MAX_FRAME_SIZE",
    "EVENT",
    "GAP",
    "HISTORY",
    "HISTORY_PAGE",
    "HUB_BOUND",
    "MAX_ARRAY_LEN",
    "METRICS",
    "METRICS_QUERY",
    "METRICS_REPLY",
    "METRICS_RESULT",
    "PEER_BOUND",
    "PRESENCE",
    "PRESENCE_ANSWER",
    "PRESENCE_ASK",
    "PRESENCE_TAKEN",
    "PUBLISH",
    "PUBLISHED",
    "PUBLISH_OVERHEAD",
    "SUBSCRIBE",
    "SUBSCRIBED",
    "TAIL",
    "TAIL_START",
    "UNSUBSCRIBE",
    "VERSION",
    "WELCOME",
    "FrameDecoder",
    "FrameError",
    "FrameTooLargeError",
    "MalformedFrameError",
    "TruncatedFrameError",
    "UnsupportedVersionError",
    "pack",
    "publish_size",
]

#: the bridge protocol version this module speaks (2: history in pages; 3: PRESENCE_ANSWER
#: says who is announced)
VERSION = 3

#: bytes of a PUBLISH frame besides the UTF-8 of its channel, data and event name, at most: the
#: array and string headers, version, kind, rid, retry and published_at at their widest
PUBLISH_OVERHEAD = 64

#: largest frame accepted by default (bytes)
DEFAULT_MAX_FRAME_SIZE = 4 << 20

#: most elements in one msgpack array; msgpack allocates a list as soon as it reads the header,
#: so an unbounded length claimed by a few bytes would be a cheap way to exhaust memory
MAX_ARRAY_LEN = 1 << 16

WELCOME = 0
PUBLISH = 1
SUBSCRIBE = 2
UNSUBSCRIBE = 3
HISTORY = 4
EVENT = 5
PUBLISHED = 6
SUBSCRIBED = 7
HISTORY_PAGE = 8
# 9 was version 1's HISTORY_END
GAP = 10
CLOSING = 11
METRICS = 12
METRICS_QUERY = 13
METRICS_REPLY = 14
METRICS_RESULT = 15
TAIL = 16
TAIL_START = 17
PRESENCE = 18
PRESENCE_TAKEN = 19
PRESENCE_ASK = 20
PRESENCE_ANSWER = 21
ANNOUNCE = 22
ANNOUNCED = 23

#: kinds a hub accepts from its peers
HUB_BOUND = frozenset(
    {
        PUBLISH,
        SUBSCRIBE,
        UNSUBSCRIBE,
        HISTORY,
        METRICS,
        METRICS_REPLY,
        TAIL,
        PRESENCE,
        PRESENCE_ASK,
        ANNOUNCE,
    }
)
#: kinds a peer accepts from its hub
PEER_BOUND = frozenset(
    {
        WELCOME,
        EVENT,
        PUBLISHED,
        SUBSCRIBED,
        HISTORY_PAGE,
        GAP,
        CLOSING,
        METRICS_QUERY,
        METRICS_RESULT,
        TAIL_START,
        PRESENCE_TAKEN,
        PRESENCE_ANSWER,
        ANNOUNCED,
    }
)

_NAMES = {
    WELCOME: "WELCOME",
    PUBLISH: "PUBLISH",
    SUBSCRIBE: "SUBSCRIBE",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    HISTORY: "HISTORY",
    EVENT: "EVENT",
    PUBLISHED: "PUBLISHED",
    SUBSCRIBED: "SUBSCRIBED",
    HISTORY_PAGE: "HISTORY_PAGE",
    GAP: "GAP",
    CLOSING: "CLOSING",
    METRICS: "METRICS",
    METRICS_QUERY: "METRICS_QUERY",
    METRICS_REPLY: "METRICS_REPLY",
    METRICS_RESULT: "METRICS_RESULT",
    TAIL: "TAIL",
    TAIL_START: "TAIL_START",
    PRESENCE: "PRESENCE",
    PRESENCE_TAKEN: "PRESENCE_TAKEN",
    PRESENCE_ASK: "PRESENCE_ASK",
    PRESENCE_ANSWER: "PRESENCE_ANSWER",
    ANNOUNCE: "ANNOUNCE",
    ANNOUNCED: "ANNOUNCED",
}


class FrameError(BrokerError):
    """A bridge peer sent bytes we refuse; the connection to it should be dropped."""


class MalformedFrameError(FrameError):
    """Not msgpack, not a frame array, an unknown or unexpected kind, or mistyped fields."""


class UnsupportedVersionError(FrameError):
    """A frame carries a protocol version other than `VERSION` (``.version``)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"bridge protocol version {version} is not supported (we speak {VERSION})")
        self.version = version


class FrameTooLargeError(FrameError):
    """A frame is larger than the decoder's ``max_frame_size``."""


class TruncatedFrameError(FrameError):
    """The input ended in the middle of a frame."""


def publish_size(channel: str, data: str | None, event: str | None) -> int:
    """An upper bound, within `PUBLISH_OVERHEAD`, of the size of the PUBLISH frame of an event;
    a peer compares it with the hub's ``max_frame_size`` before sending."""
    size = PUBLISH_OVERHEAD + len(channel.encode("utf-8"))
    for text in (data, event):
        if text is not None:
            size += len(text.encode("utf-8"))
    return size


def pack(kind: int, *fields: Any) -> bytes:
    """Encode one frame of *kind* with *fields* (see the module docstring for each kind)."""
    return msgpack.packb([VERSION, kind, *fields], use_bin_type=True)


# ---------------------------------------------------------------------- field checks


def _rid(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 63


def _count(value: Any) -> bool:
    return type(value) is int and 0 < value < 1 << 63


def _bool(value: Any) -> bool:
    return type(value) is bool


def _str(value: Any) -> bool:
    return type(value) is str


def _opt_str(value: Any) -> bool:
    return value is None or type(value) is str


def _opt_int(value: Any) -> bool:
    return value is None or (type(value) is int and 0 <= value < 1 << 63)


def _bytes(value: Any) -> bool:
    return type(value) is bytes


def _number(value: Any) -> bool:
    return type(value) is float or type(value) is int


def _str_list(value: Any) -> bool:
    return type(value) is list and all(type(item) is str for item in value)


def _frames(value: Any) -> bool:
    if type(value) is not list:
        return False
    for item in value:
        if (
            type(item) is not list
            or len(item) != 4
            or type(item[0]) is not str
            or type(item[1]) is not str
            or type(item[2]) is not bytes
            or not _number(item[3])
        ):
            return False
    return True


def _samples(value: Any) -> bool:
    if type(value) is not list:
        return False
    for item in value:
        if (
            type(item) is not list
            or len(item) != 3
            or type(item[0]) is not str
            or type(item[1]) is not str
            or not _number(item[2])
        ):
            return False
    return True


def _pairs(value: Any) -> bool:
    if type(value) is not list:
        return False
    for item in value:
        if type(item) is not list or len(item) != 2 or type(item[0]) is not str:
            return False
        if not _rid(item[1]):
            return False
    return True


def _presence_entries(value: Any) -> bool:
    if type(value) is not list:
        return False
    for item in value:
        if (
            type(item) is not list
            or len(item) != 3
            or type(item[0]) is not str
            or not _rid(item[1])
            or not _pairs(item[2])
        ):
            return False
    return True


def _sample_lists(value: Any) -> bool:
    return type(value) is list and all(_samples(item) for item in value)


_SCHEMAS: dict[int, tuple[Callable[[Any], bool], ...]] = {
    WELCOME: (_str, _str, _rid, _rid),
    PUBLISH: (_rid, _str, _opt_str, _opt_str, _opt_int, _number),
    SUBSCRIBE: (_rid, _str_list),
    UNSUBSCRIBE: (_str_list,),
    HISTORY: (_rid, _str_list, _str, _count),
    EVENT: (_str, _str, _bytes, _number),
    PUBLISHED: (_rid, _str),
    SUBSCRIBED: (_rid, _str),
    HISTORY_PAGE: (_rid, _frames, _bool),
    GAP: (_rid, _str),
    CLOSING: (),
    METRICS: (_rid,),
    METRICS_QUERY: (_rid,),
    METRICS_REPLY: (_rid, _samples),
    METRICS_RESULT: (_rid, _sample_lists),
    TAIL: (_rid, _str_list, _rid),
    TAIL_START: (_rid, _str),
    PRESENCE: (_rid, _presence_entries),
    PRESENCE_TAKEN: (_rid,),
    PRESENCE_ASK: (_rid, _str),
    PRESENCE_ANSWER: (_rid, _rid, _pairs, _str_list),
    ANNOUNCE: (_rid, _str, _str, _number),
    ANNOUNCED: (_rid,),
}


def check_frame(obj: Any, accept: Collection[int]) -> list[Any]:
    """Return *obj* if it is a well-formed frame of one of the *accept* kinds; raise otherwise.

    :raises UnsupportedVersionError: for a frame of another protocol version.
    :raises MalformedFrameError: for anything else that is not a frame we accept.
    """
    if type(obj) is not list or len(obj) < 2:
        raise MalformedFrameError("a frame must be an array [version, kind, ...]")
    version = obj[0]
    if type(version) is not int:
        raise MalformedFrameError("the frame version must be an integer")
    if version != VERSION:
        raise UnsupportedVersionError(version)
    kind = obj[1]
    if type(kind) is not int or kind not in accept:
        raise MalformedFrameError(f"unexpected frame kind {kind!r}")
    schema = _SCHEMAS[kind]
    if len(obj) != len(schema) + 2:
        raise MalformedFrameError(f"{_NAMES[kind]} frame needs {len(schema)} fields")
    for index, check in enumerate(schema, 2):
        if not check(obj[index]):
            raise MalformedFrameError(f"{_NAMES[kind]} frame: bad field {index - 2}")
    return obj


class FrameDecoder:
    """Incremental decoder: bytes in (:meth:`feed`), checked frames out; bounded memory.

    :param accept: the frame kinds this side accepts (`HUB_BOUND` on a hub, `PEER_BOUND` on a
        peer); any other kind is a `MalformedFrameError`.
    :param max_frame_size: largest frame in bytes; the decoder holds at most twice this.

    Frames come out as lists ``[version, kind, *fields]`` whose fields have been type-checked
    against the table in the module docstring (values such as channel names are the caller's to
    validate). After an error, every further :meth:`feed` raises `MalformedFrameError`.
    """

    def __init__(
        self, accept: Collection[int], *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    ) -> None:
        if max_frame_size < 64:
            raise ValueError("max_frame_size must be at least 64 bytes")
        self.accept = frozenset(accept)
        self.max_frame_size = max_frame_size
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_buffer_size=2 * max_frame_size,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=0,
            max_ext_len=0,
        )
        self._fed = 0
        self._consumed = 0
        self._failed = False

    @property
    def pending(self) -> int:
        """Bytes received that do not form a complete frame yet."""
        return self._fed - self._consumed

    def feed(self, data: bytes) -> list[list[Any]]:
        """Take the next bytes of the stream and return the frames they complete, in order.

        :raises FrameError: the stream is not one we accept; drop the connection.
        """
        if self._failed:
            raise MalformedFrameError("the decoder failed before; drop the connection")
        try:
            return self._feed(data)
        except FrameError:
            self._failed = True
            raise

    def _feed(self, data: bytes) -> list[list[Any]]:
        frames: list[list[Any]] = []
        limit = self.max_frame_size
        unpacker = self._unpacker
        accept = self.accept
        view = memoryview(data)
        for start in range(0, len(view), limit):
            piece = view[start : start + limit]
            try:
                unpacker.feed(piece)
            except msgpack.BufferFull as exc:  # pragma: no cover - the slicing prevents it
                raise FrameTooLargeError(f"frame larger than {limit} bytes") from exc
            self._fed += len(piece)
            while True:
                try:
                    obj = next(unpacker)
                except StopIteration:
                    break
                except (ValueError, TypeError, msgpack.UnpackException) as exc:
                    # limits (array length, maps, ext) and bad utf-8 surface as ValueError
                    raise MalformedFrameError(
                        f"not a msgpack frame ({type(exc).__name__}: {exc})"
                    ) from exc
                end = unpacker.tell()
                if end - self._consumed > limit:
                    raise FrameTooLargeError(f"frame larger than {limit} bytes")
                self._consumed = end
                frames.append(check_frame(obj, accept))
            if self._fed - self._consumed > limit:
                raise FrameTooLargeError(f"frame larger than {limit} bytes")
        return frames

    def close(self) -> None:
        """The stream ended; raise `TruncatedFrameError` if it ended inside a frame."""
        if not self._failed and self._fed != self._consumed:
            self._failed = True
            raise TruncatedFrameError(f"stream ended inside a frame ({self.pending} bytes)")
