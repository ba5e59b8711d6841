"""The in-process broker (the default), and the history store the bridge hub reuses.

Ids are ``<epoch>-<seq>``: ``epoch`` is the broker's start time in milliseconds, base 36, and
``seq`` a decimal counter. Ids therefore keep increasing across a restart of the process, and an
id from an earlier incarnation (whose history is gone) is recognised and answered with
``stream-reset`` rather than misread as a position in the new history.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from ..errors import HistoryGapError
from ..protocol import Event
from .base import Broker, Frame

__all__ = ["History", "IdSequence", "InProcessBroker"]

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"

T = TypeVar("T")


def _base36(number: int) -> str:
    out = []
    while True:
        number, digit = divmod(number, 36)
        out.append(_DIGITS[digit])
        if not number:
            return "".join(reversed(out))


class IdSequence:
    """Strictly increasing ids ``<epoch>-<seq>``; :meth:`key` parses one of ours into ``seq``."""

    def __init__(self, epoch_ms: int | None = None) -> None:
        epoch = int(time.time() * 1000) if epoch_ms is None else epoch_ms
        self.epoch = _base36(epoch)
        self._prefix = self.epoch + "-"
        self.seq = 0

    def next(self) -> str:
        self.seq += 1
        return f"{self._prefix}{self.seq}"

    @property
    def current(self) -> str:
        """The id of the last assigned event (``<epoch>-0`` before the first)."""
        return f"{self._prefix}{self.seq}"

    def key(self, event_id: str) -> int | None:
        """``seq`` of one of our ids, or ``None`` (another incarnation, garbage, the future)."""
        if not event_id.startswith(self._prefix):
            return None
        digits = event_id[len(self._prefix) :]
        if not digits.isascii() or not digits.isdigit() or len(digits) > 20:
            return None
        seq = int(digits)
        if seq > self.seq:
            return None
        return seq

    def earlier(self, event_id: str) -> bool:
        """Whether *event_id* is an id of an earlier incarnation (an earlier epoch)."""
        epoch, dash, digits = event_id.partition("-")
        if not (dash and 0 < len(epoch) <= 13 and all(c in _DIGITS for c in epoch)):
            return False
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 20):
            return False
        return int(epoch, 36) < int(self.epoch, 36)


def _seq(entry: tuple[int, object]) -> int:
    return entry[0]


class _Kept(Generic[T]):
    """One channel's retained items, and ``since``: the seq after which it holds every item of
    the channel (a resume from before it is a gap)."""

    __slots__ = ("items", "since")

    def __init__(self, since: int) -> None:
        self.items: deque[tuple[int, T]] = deque()
        self.since = since


class History(Generic[T]):
    """Per-channel bounded history of ``(seq, item)`` with gap detection.

    Each channel keeps its last *size* items and ``since``, the seq after which it holds every
    item of the channel: a resume point before ``since`` is a gap. Trimming an item moves
    ``since`` up to it. At most *max_channels* channels are kept: past that, the channel
    published to least recently is forgotten whole.

    A forgotten channel may be published to again, and its new history must then not pass for
    all of it (issue 12). So the seq of a forgotten channel's last item is remembered, for the
    last *max_channels* channels forgotten; a channel's history starts with that seq as its
    ``since``, and a channel not kept is a gap before it too. Past that many, the oldest record
    is folded into one number for the whole history, ``floor``, the highest last seq of any
    channel whose record is gone: a channel with no record was either never forgotten or
    forgotten with its last item at or before ``floor``, so its resumes from before ``floor`` are
    gaps (conservative: a needless ``stream-reset`` rather than a silent loss). Memory stays
    bounded (twice *max_channels* channel names) however many channels come and go, and a
    channel that was never forgotten resumes exactly unless more than *max_channels* others
    were forgotten since the resume point.
    """

    def __init__(self, size: int, max_channels: int = 10_000) -> None:
        if max_channels < 1:
            raise ValueError("max_channels must be at least 1")
        self.size = size
        self.max_channels = max_channels
        self._channels: dict[str, _Kept[T]] = {}  # published to least recently first
        self._forgotten: dict[str, int] = {}  # forgotten least recently first: last seq
        self._floor = 0

    def append(self, channel: str, seq: int, item: T) -> None:
        if self.size == 0:
            self._floor = seq  # nothing is kept: every resume from before now is a gap
            return
        kept = self._channels.pop(channel, None)
        if kept is None:
            kept = _Kept(self._forgotten.pop(channel, self._floor))
            if len(self._channels) >= self.max_channels:
                self._forget_oldest_channel()
        self._channels[channel] = kept  # most recently published last
        items = kept.items
        if len(items) >= self.size:
            kept.since = items.popleft()[0]
        items.append((seq, item))

    def _forget_oldest_channel(self) -> None:
        oldest = next(iter(self._channels))
        kept = self._channels.pop(oldest)
        forgotten = self._forgotten
        forgotten[oldest] = kept.items[-1][0]
        if len(forgotten) > self.max_channels:
            gone = next(iter(forgotten))
            self._floor = max(self._floor, forgotten.pop(gone))

    def _since(self, channel: str) -> int:
        kept = self._channels.get(channel)
        if kept is not None:
            return kept.since
        return self._forgotten.get(channel, self._floor)

    def since(self, channels: Sequence[str], after: int) -> list[tuple[int, T]] | None:
        """Items of *channels* with seq > *after*, in seq order; ``None`` if some are gone."""
        found: list[tuple[int, T]] = []
        for channel in channels:
            if after < self._since(channel):
                return None
            kept = self._channels.get(channel)
            if kept is None:
                continue
            tail: list[tuple[int, T]] = []
            for entry in reversed(kept.items):
                if entry[0] <= after:
                    break
                tail.append(entry)
            tail.reverse()
            found.extend(tail)
        if len(channels) > 1:
            found.sort(key=lambda entry: entry[0])
        return found

    def page(
        self, channels: Sequence[str], after: int, limit: int
    ) -> tuple[list[tuple[int, T]], bool] | None:
        """At most *limit* items of *channels* with seq > *after*, in seq order, and whether
        more follow; ``None`` if some are gone. A read in pages continues after the last seq of
        the page before and is checked for a gap again each time (history trimmed under it)."""
        runs: list[Iterable[tuple[int, T]]] = []
        remaining = 0
        for channel in channels:
            if after < self._since(channel):
                return None
            kept = self._channels.get(channel)
            if kept is None:
                continue
            items = kept.items
            start = bisect.bisect_right(items, after, key=_seq)
            if start < len(items):
                remaining += len(items) - start
                runs.append(itertools.islice(items, start, start + limit))
        if len(runs) > 1:
            found = list(itertools.islice(heapq.merge(*runs, key=_seq), limit))
        else:
            found = list(runs[0]) if runs else []
        return found, remaining > len(found)

    def tail(self, channels: Sequence[str], count: int) -> int:
        """The seq after which the last *count* items of *channels* (merged) begin, cut at the
        latest ``since`` of the channels, so that `since` after it is never a gap."""
        start = max(self._since(channel) for channel in channels)
        seqs: list[int] = []
        for channel in channels:
            kept = self._channels.get(channel)
            if kept is not None:
                seqs.extend(seq for seq, _ in itertools.islice(reversed(kept.items), count))
        if len(seqs) >= count > 0:
            start = max(start, heapq.nlargest(count, seqs)[-1] - 1)
        return start

    def sizes(self) -> dict[str, int]:
        """Retained items per channel (for metrics)."""
        return {channel: len(kept.items) for channel, kept in self._channels.items()}

    def __len__(self) -> int:
        return len(self._channels)

    def __iter__(self) -> Iterator[str]:
        return iter(self._channels)


class InProcessBroker(Broker):
    """Broker for one process: ids, history and fan-out all in memory.

    :param history_size: events retained per channel for resume (default 1000).
    :param max_channels: channels whose history is retained (default 10,000); past it the channel
        published to least recently is forgotten: resumes from before its last event get
        ``stream-reset``, also after it is published to again (see `History`).
    :param presence: count subscriptions for `presence` (see `.Broker`).
    """

    follows_remotely = False

    def __init__(
        self, *, history_size: int = 1000, max_channels: int = 10_000, presence: bool = True
    ) -> None:
        super().__init__(history_size=history_size, presence=presence)
        self.ids = IdSequence()
        self.history: History[Frame] = History(history_size, max_channels)

    async def _publish(self, channel: str, event: Event) -> str:
        event_id = self.ids.next()
        frame = Frame.from_event(
            channel, Event(data=event.data, event=event.event, id=event_id, retry=event.retry)
        )
        self.history.append(channel, self.ids.seq, frame)
        self._deliver(frame)
        return event_id

    async def _follow(self, channels: Sequence[str]) -> str:
        return self.ids.current

    async def _unfollow(self, channels: Sequence[str]) -> None:
        return None

    async def _history(self, channels: Sequence[str], after: str) -> list[Frame]:
        after_seq = self.ids.key(after)
        if after_seq is None:
            if self.ids.earlier(after):  # what this incarnation published may still be whole
                raise HistoryGapError(
                    self.ids.current,
                    "Last-Event-ID is from an earlier incarnation",
                    resume_id=f"{self.ids.epoch}-0",
                )
            raise HistoryGapError(self.ids.current, "Last-Event-ID is not an id of this broker")
        found = self.history.since(channels, after_seq)
        if found is None:
            raise HistoryGapError(self.ids.current, "Last-Event-ID is older than the history kept")
        return [frame for _, frame in found]

    async def _tail(self, channels: Sequence[str], count: int) -> str:
        return f"{self.ids.epoch}-{self.history.tail(channels, count)}"

    def id_key(self, event_id: str) -> int | None:
        return self.ids.key(event_id)

    def history_sizes(self) -> dict[str, int]:
        return self.history.sizes()
