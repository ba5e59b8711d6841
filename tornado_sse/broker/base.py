"""The broker contract: what every backend (in-process, unix-socket bridge, Redis) provides.

A broker takes publishes, assigns event ids, keeps a bounded history per channel and delivers
events to the local subscriptions of this process. The public half of the contract lives here
and is the same for every backend; a backend implements these coroutines:

``_publish(channel, event)``
    Assign the id (locally or remotely), store the event in history, arrange for it to reach
    :meth:`Broker._deliver` on this process (if anything here follows the channel) and return the
    id. May raise `.BrokerUnavailableError`.
``_follow(channels)``
    Start receiving live events of *channels* (possibly empty: already followed) and return a
    *position*: the id of the last event published in the whole broker such that every later
    event of those channels reaches :meth:`Broker._deliver`. Calls are made in order.
``_unfollow(channels)``
    No local subscription follows *channels* any more.
``_history(channels, after)``
    The retained frames of *channels* with ids after *after*, in id order; raise
    `.HistoryGapError` when *after* is older than what is retained, unparseable, or unknown.
``_history_page(channels, after, limit, first)`` (optional)
    The same, read in pages of about *limit* frames: returns the frames and whether more may
    follow (then the next call reads after the last frame returned). The default returns all of
    `_history` as one page, which suits backends whose history is already in this process's
    memory (the frames are shared, a page costs a list of references); a backend that must copy
    history out of a server (Redis) reads it in bounded pages.
``_tail(channels, count)``
    Where the last *count* retained events of *channels* begin: an id such that `_history`
    after it returns them (and whatever was published since), never older than the history
    retained of any of the channels (so that reading after it is no gap).
``id_key(event_id)``
    A sortable key for an id of this broker, or ``None`` if the id is not one of ours.
``_share_presence(channels)`` and ``_presence(channel)`` (backends that span processes)
    Write this process's counts of subscriptions of *channels* (`presence_table`) where the
    other processes read them; answer `Broker.presence` for the whole deployment. The rules
    (absolute counts, leases, who forgets a dead process) are in `tornado_sse.broker.presence`.

Resume, the part that is easy to get wrong, is done once, here, for every backend
(:meth:`Broker.subscribe`): the subscription is registered locally *first*, so live events
arriving meanwhile are buffered; then the backend follows the channels and returns the position;
then history after the client's Last-Event-ID is read; the buffered live events are then released
after the replay, dropping those whose id the replay (or the position) already covered. Every
event is thus delivered exactly once and in id order, even while publishes race with the replay.

A replay may be long (a thousand events on each of a hundred channels) and its client may not
read it. So that it costs a bounded amount of memory however large history is (issue 12), the
caller may ask for it in pages (``subscribe(..., page_size=N)``, then
:meth:`Subscription.next_page` until `Subscription.complete`), writing each page once the client
took the one before, and may bound the live events buffered meanwhile (``max_pending``): past
that bound the subscription closes itself with ``overflowed`` set, and the stream, cut off like
any slow consumer, resumes later from the last id it got. A page that finds history trimmed
after the replay began raises `.HistoryGapError`: end the stream, and its resume gets
``stream-reset``.

A fresh subscription may start with the last N events of its channels instead of "from now"
(``subscribe(..., history=N)``, issue 14): the backend says where they begin (`_tail`), and
from there on it is a resume like any other, through the same pages and the same buffering of
live events. The window is the last N events merged in id order, cut where the history of one
of the channels ends (a merged replay never has a hole in one channel that it fills in another);
asking for more than is retained gets what is retained, never ``stream-reset``. A Last-Event-ID
takes precedence: the browser sends one on reconnect, so the first replay is never repeated.

Ids are short strings of ``[A-Za-z0-9._~-]`` (they travel in a ``Last-Event-ID`` header, where
``:`` would force a CORS preflight), strictly increasing within a broker and comparable across
channels through :meth:`Broker.id_key`.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from ..errors import (
    BrokerClosedError,
    BrokerError,
    HistoryGapError,
    InvalidChannelError,
)
from ..protocol import Event, encode_event
from .presence import (
    Presence,
    PresenceTable,
    companion,
    merge_presence,
    presence_event_data,
    record_announcement,
    validate_grace,
    validate_identity,
)

__all__ = [
    "CHANNEL_PATTERN",
    "Broker",
    "Frame",
    "Subscriber",
    "Subscription",
    "validate_channel",
]

log = logging.getLogger("tornado_sse.broker")

#: channel names: 1-200 characters of ``A-Z a-z 0-9 _ - . : / @ ~``
CHANNEL_PATTERN = re.compile(r"[A-Za-z0-9_\-.:/@~]{1,200}")


def validate_channel(channel: object) -> str:
    """Return *channel* if it is a valid channel name; raise `.InvalidChannelError` otherwise."""
    if not isinstance(channel, str) or CHANNEL_PATTERN.fullmatch(channel) is None:
        raise InvalidChannelError(
            f"invalid channel {channel!r}: use 1-200 characters of A-Z a-z 0-9 _ - . : / @ ~"
        )
    return channel


class Frame:
    """An event of a channel, encoded once and shared by every subscriber that receives it.

    ``data`` is the complete encoded event (ending in the blank line); ``chunk`` is the same bytes
    framed as one HTTP/1.1 chunk, computed on first use and then shared too; `with_channel` is the
    variant for streams that asked for a ``channel:`` field (issue 16), also made once per event.
    """

    __slots__ = ("_chunk", "_with_channel", "channel", "data", "id", "published_at", "written")

    def __init__(self, channel: str, id: str, data: bytes, published_at: float) -> None:
        self.channel = channel
        self.id = id
        self.data = data
        #: ``time.time()`` when the event was published (for latency metrics)
        self.published_at = published_at
        #: set once the first stream in this process wrote it (latency is measured once)
        self.written = False
        self._chunk: bytes | None = None
        self._with_channel: Frame | None = None

    @classmethod
    def from_event(cls, channel: str, event: Event, published_at: float | None = None) -> Frame:
        """Encode *event* (whose ``id`` must be set) into a frame."""
        assert event.id is not None
        return cls(
            channel,
            event.id,
            encode_event(event),
            time.time() if published_at is None else published_at,
        )

    @property
    def chunk(self) -> bytes:
        chunk = self._chunk
        if chunk is None:
            chunk = self._chunk = b"%x\r\n%s\r\n" % (len(self.data), self.data)
            _chunked.append(self)
        return chunk

    def with_channel(self) -> Frame:
        """This event with a ``channel: <name>`` field line first (a field that the SSE rules
        tell every client to ignore), for streams that route events by channel themselves
        (``SharedEventSource``'s leading tab). Made on first use, shared by every such stream,
        and dropped with the chunk by `release_chunks`. A frame of no channel is returned as is.
        """
        variant = self._with_channel
        if variant is None:
            if not self.channel:
                return self
            data = b"channel: %s\n%s" % (self.channel.encode(), self.data)
            variant = Frame(self.channel, self.id, data, self.published_at)
            variant.written = self.written
            self._with_channel = variant
            _chunked.append(self)
        return variant

    def __repr__(self) -> str:
        return f"Frame({self.channel!r}, {self.id!r}, {self.data!r})"


#: frames whose chunk was computed since the last `release_chunks`
_chunked: list[Frame] = []


def release_chunks() -> None:
    """Drop the chunk copies (and `Frame.with_channel` variants) made since the last call, so
    that history (which keeps the frames) holds each event's bytes once. The connection set calls
    it after each round of writes; a frame written again later frames itself again."""
    frames = _chunked[:]
    del _chunked[: len(frames)]
    for frame in frames:
        frame._chunk = None
        frame._with_channel = None


class Subscriber(Protocol):
    """What a broker delivers to: `.EventStreamHandler` implements it; tests may too."""

    def deliver(self, frame: Frame) -> None:
        """Take one frame; called on the broker's event loop, in id order. Must not block."""


class Subscription:
    """One subscriber's interest in some channels of a broker, as returned by `Broker.subscribe`.

    After :meth:`Broker.subscribe` returns, the subscription holds what the subscriber must send
    before live events, in this order:

    * ``reset``: true if the requested Last-Event-ID was not in history (send ``stream-reset``
      with ``position``); when the id is from an earlier incarnation of the broker's data (a
      restarted hub, a Redis that lost its data), ``replay`` then holds what the new one
      published since it began, as far as it still has it;
    * ``position``: the id the stream is at before ``replay`` (send it to prime a fresh stream);
    * ``replay``: the missed frames, in id order; with ``page_size``, the first page of them,
      and ``complete`` says whether more follow (:meth:`next_page`).

    Live events are held back until :meth:`start` is called, so the caller can write the replay
    first; past ``max_pending`` bytes of them the subscription closes itself and sets
    ``overflowed``. :meth:`close` (or `Broker.unsubscribe`) ends it; both are idempotent.
    """

    __slots__ = (
        "_announce",
        "_broker",
        "_counted",
        "_floor",
        "_grace",
        "_last_key",
        "_leaving",
        "_max_pending",
        "_on_overflow",
        "_page_size",
        "_pending",
        "_pending_bytes",
        "channels",
        "closed",
        "complete",
        "identity",
        "overflowed",
        "position",
        "replay",
        "reset",
        "subscriber",
    )

    def __init__(self, broker: Broker, channels: tuple[str, ...], subscriber: Subscriber) -> None:
        self._broker = broker
        self.channels = channels
        self.subscriber = subscriber
        self.position = ""
        self.reset = False
        self.replay: list[Frame] = []
        #: false while pages of the replay remain to be read (:meth:`next_page`)
        self.complete = True
        #: true once the live events held back before :meth:`start` passed ``max_pending``
        self.overflowed = False
        self.closed = False
        self._pending: list[Frame] | None = []
        self._pending_bytes = 0
        self._max_pending: int | None = None
        self._on_overflow: Callable[[], None] | None = None
        self._page_size = 0
        self._last_key: Any = None
        self._floor: Any = None
        #: who the subscriber is, for presence (``None``: counted without identity)
        self.identity: str | None = None
        self._counted = False
        self._announce: tuple[str, ...] = ()
        self._grace = 0.0
        #: the leaves of this subscription's identity waiting for its grace period, by channel
        self._leaving: dict[str, tuple[asyncio.TimerHandle, asyncio.Future[None] | None]] = {}

    def _deliver(self, frame: Frame) -> None:
        pending = self._pending
        if pending is not None:
            pending.append(frame)
            self._pending_bytes += len(frame.data)
            limit = self._max_pending
            if limit is not None and self._pending_bytes > limit:
                pending.clear()
                self.overflowed = True
                self.close()
                if self._on_overflow is not None:
                    self._on_overflow()
            return
        floor = self._floor
        if floor is not None:
            key = self._broker.id_key(frame.id)
            if key is not None and key <= floor:
                return  # already sent in the replay
            self._floor = None
            self._broker._changed(self.channels)  # plain delivery from now on
        if not self.closed:
            self.subscriber.deliver(frame)

    async def next_page(self, page_size: int | None = None) -> list[Frame]:
        """Read the next page of the replay into ``replay`` and return it (empty once complete).

        *page_size* (frames) replaces the size given to `Broker.subscribe` from this page on.

        :raises HistoryGapError: history after the last frame read is gone (trimmed since the
            replay began): end the stream; its client's resume gets ``stream-reset``.
        :raises BrokerError: the backend cannot be read now.
        """
        if self.complete or self.closed or not self.replay:
            self.complete = True
            self.replay = []
            return []
        after = self.replay[-1].id
        self.replay = []
        if page_size is not None:
            self._page_size = max(1, page_size)
        frames, more = await self._broker._history_page(
            self.channels, after, self._page_size, False
        )
        self.replay = frames
        self.complete = not more or not frames
        if frames:
            self._last_key = self._broker.id_key(frames[-1].id)
        return frames

    def start(self) -> None:
        """Release the live events buffered since :meth:`Broker.subscribe` and go live.

        Buffered events already covered by the replay or by the position are dropped. With a
        remote backend, an event read into the replay may still be on its way to this process
        as a live event: such events are dropped too, until the first live event past the
        replay arrives (live events come in id order).
        """
        pending = self._pending
        if pending is None:
            return
        if not self.complete:
            raise RuntimeError("start() before the last page of the replay was read")
        self._pending = None
        self._pending_bytes = 0
        self.replay = []
        if self.closed:
            return
        key = self._broker.id_key
        last = self._last_key
        for frame in pending:
            frame_key = key(frame.id)
            if last is None or (frame_key is not None and frame_key > last):
                last = None
                self.subscriber.deliver(frame)
                if self.closed:
                    return
        if last is not None and self._broker.follows_remotely:
            self._floor = last
        self._broker._changed(self.channels)

    def close(self, *, grace: float | None = None) -> None:
        """Stop delivering to the subscriber. Idempotent.

        :param grace: seconds the ``leave`` of this subscription's identity waits for the user
            to come back, if it was their last subscription (see `Broker.subscribe`'s
            *announce*); ``None``: the grace given to `Broker.subscribe`. ``0``: the user left
            (a Leave button, a logout): their ``leave`` is decided at once. It changes the wait
            for this close only; a process that dies still gets the grace given to subscribe.
            On a subscription already closed, a shorter *grace* hastens its leaves still
            waiting (the user says they left after their connection was lost).
        :raises InvalidArgumentError: for a negative *grace* (also a `ValueError`).
        """
        if not self.closed:
            self._broker.unsubscribe(self, grace=grace)
        elif grace is not None:
            self._broker._hasten(self, grace)

    def __repr__(self) -> str:
        return f"<Subscription {self.channels!r} at {self.position!r}>"


class _FollowGroup:
    """Subscriptions waiting together for the next `Broker._follow` call."""

    __slots__ = ("channels", "done", "task")

    def __init__(self) -> None:
        self.channels: list[str] = []
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None


class Broker(abc.ABC):
    """Base class of brokers: validation, threading, local fan-out and resume.

    :param history_size: events retained per channel for resume.
    :param presence: count subscriptions for :meth:`presence` and join/leave events (default
        ``True``); ``False`` saves the cost of it on subscribe and unsubscribe (the benchmark's
        "presence off"), and :meth:`presence` then raises `.BrokerError`.
    """

    #: whether :meth:`_unfollow` must hear of channels no local subscription follows any more
    #: (backends that fan in remotely); the in-process broker turns it off
    follows_remotely = True
    #: whether the backend shares presence beyond this process (`_share_presence`)
    shares_presence = False

    def __init__(self, *, history_size: int = 1000, presence: bool = True) -> None:
        if history_size < 0:
            raise ValueError("history_size must not be negative")
        self.history_size = history_size
        #: whether subscriptions are counted for presence
        self.counts_presence = presence
        if not presence:
            self.shares_presence = False
        self.closed = False
        #: events published through this broker object (not those arriving from other processes)
        self.published_count = 0
        self._subscriptions: dict[str, set[Subscription]] = {}
        # The fan-out's view of _subscriptions: per channel, the subscriptions and what to call
        # for each (the subscriber's deliver, or the append of a not yet started subscription's
        # buffer), rebuilt after any change; _version counts changes so that a fan-out notices
        # one made by a subscriber as it goes. A delivery then touches the subscriber only, not
        # the subscription (issue 8: cache misses dominate with thousands of subscribers).
        self._targets: dict[
            str, tuple[tuple[Subscription, ...], tuple[Callable[[Frame], None], ...]]
        ] = {}
        self._version = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._follow_lock: asyncio.Lock | None = None
        self._follow_group: _FollowGroup | None = None
        #: this process's subscriptions per channel and identity (presence)
        self.presence_table = PresenceTable()
        self._presence_dirty: set[str] = set()
        self._presence_next: asyncio.Future[None] | None = None
        self._presence_writer: asyncio.Task[None] | None = None
        # join/leave: identities announced as present per channel (in-process decisions)
        self._announced: dict[str, set[str]] = {}
        self._announcing: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the backend and bind to the running event loop. Idempotent.

        Called on first use by :meth:`publish` and :meth:`subscribe`; call it yourself to fail
        early or to make :meth:`publish_threadsafe` usable before anything else happened.
        """
        if self._started:
            return
        if self.closed:
            raise BrokerClosedError("broker is closed")
        self._bind_loop()
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._started:
                await self._start()
                self._started = True

    async def _start(self) -> None:
        """Backend hook for :meth:`start`."""

    async def close(self) -> None:
        """Close the broker: end every subscription, release the backend. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for subs in list(self._subscriptions.values()):
            for sub in list(subs):
                sub.closed = True
        self._subscriptions.clear()
        self._targets.clear()
        self._version += 1
        self.presence_table.clear()
        self._presence_dirty.clear()
        # the presence writes and join/leave decisions under way end here, before the backend
        # closes under them (a write left pending was destroyed with the loop, mid-command)
        tasks = [task for task in (self._presence_writer, *self._announcing) if task is not None]
        for _ in range(50):
            tasks = [task for task in tasks if not task.done()]
            if not tasks:
                break
            for task in tasks:
                task.cancel()  # again: on 3.11 redis-py's wait_for can swallow one cancellation
            await asyncio.wait(tasks, timeout=0.1)
        await self._close()

    async def _close(self) -> None:
        """Backend hook for :meth:`close`."""

    @property
    def healthy(self) -> bool:
        """Whether the broker can deliver right now (``/healthz`` reports it)."""
        return not self.closed

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a broker is bound to the event loop it was first used on")
        return loop

    # ------------------------------------------------------------------ publish

    async def publish(
        self,
        channel: str,
        data: str | None = "",
        *,
        event: str | None = None,
        retry: int | None = None,
    ) -> str:
        """Publish an event to *channel* and return its id.

        :param data: text of the event; it is split into ``data`` lines on CRLF, CR and LF.
        :param event: event name (``None`` for a plain ``message``).
        :param retry: reconnection delay in milliseconds for clients that receive it.
        :raises InvalidEventError: for illegal fields, before anything is sent.
        :raises InvalidChannelError: for an invalid channel name.
        :raises BrokerUnavailableError: when the backend cannot take it now.
        """
        validate_channel(channel)
        value = Event(data=data, event=event, retry=retry)
        if self.closed:
            raise BrokerClosedError("broker is closed")
        await self.start()
        event_id = await self._publish(channel, value)
        self.published_count += 1
        return event_id

    def publish_threadsafe(
        self,
        channel: str,
        data: str | None = "",
        *,
        event: str | None = None,
        retry: int | None = None,
    ) -> concurrent.futures.Future[str]:
        """Publish from any thread (or a plain callback); returns a future of the id.

        Validation happens at once in the calling thread. The broker must have been started (or
        used) on its event loop before. Never blocks, so it is safe on the loop's thread too.
        """
        validate_channel(channel)
        Event(data=data, event=event, retry=retry)
        loop = self._loop
        if loop is None:
            raise RuntimeError("broker not started: await broker.start() on its event loop first")
        if self.closed:
            raise BrokerClosedError("broker is closed")
        return asyncio.run_coroutine_threadsafe(
            self.publish(channel, data, event=event, retry=retry), loop
        )

    # ------------------------------------------------------------------ subscribe

    async def subscribe(
        self,
        channels: Iterable[str],
        subscriber: Subscriber,
        last_event_id: str | None = None,
        *,
        page_size: int | None = None,
        max_pending: int | None = None,
        on_overflow: Callable[[], None] | None = None,
        history: int = 0,
        identity: str | None = None,
        announce: Iterable[str] = (),
        grace: float = 3.0,
    ) -> Subscription:
        """Subscribe *subscriber* to *channels*, resuming after *last_event_id* if given.

        Returns a `Subscription` holding what to send first (see there); live events follow
        once the caller calls `Subscription.start`. Duplicate channel names count once.

        :param page_size: read the replay in pages of about this many frames (the first one
            now, the others with `Subscription.next_page`); ``None``: all of it now.
        :param max_pending: bytes of live events held back before `Subscription.start`; past
            it the subscription closes with ``overflowed`` set, and calls *on_overflow* (from
            the fan-out: it must not block). ``None``: no bound.
        :param history: without *last_event_id*, start with the last *history* events of the
            channels, merged in id order (fewer if fewer are retained; never a reset): they are
            the replay, and ``position`` is the id before them. Ignored with *last_event_id*.
        :param identity: who the subscriber is, counted in :meth:`presence` (1-200 printable
            characters; ``None``: counted as a subscriber without identity).
        :param announce: channels (of *channels*) whose ``join`` and ``leave`` events this
            subscription takes part in, when it has an *identity* (see
            `tornado_sse.broker.presence`); *grace*: seconds a leave waits for a reconnect.
        :raises InvalidArgumentError: for an invalid *identity*, a negative or NaN *grace*
            (also a `ValueError`).
        """
        validate_grace(grace)
        if page_size is not None and page_size < 1:
            raise ValueError("page_size must be at least 1")
        if history < 0:
            raise ValueError("history must not be negative")
        validate_identity(identity)
        names = tuple(dict.fromkeys(validate_channel(c) for c in channels))
        if not names:
            raise InvalidChannelError("subscribe to at least one channel")
        if self.closed:
            raise BrokerClosedError("broker is closed")
        if not self._started:
            await self.start()
        sub = Subscription(self, names, subscriber)
        sub._max_pending = max_pending
        sub._on_overflow = on_overflow
        sub._page_size = page_size or 0
        new: list[str] = []
        for name in names:
            subs = self._subscriptions.get(name)
            if subs is None:
                subs = self._subscriptions[name] = set()
                new.append(name)
            subs.add(sub)
        self._changed(names)
        try:
            position = await self._follow_grouped(new)
            sub.position = position
            sub._last_key = self.id_key(position)
            start = last_event_id
            if start is None and history:
                start = await self._tail(names, history)
            while start is not None:
                try:
                    if page_size is None:
                        sub.replay = await self._history(names, start)
                    else:
                        sub.replay, more = await self._history_page(names, start, page_size, True)
                        sub.complete = not more or not sub.replay
                except HistoryGapError as gap:
                    sub.complete = True
                    sub.replay = []
                    if last_event_id is None:
                        break  # history was trimmed between _tail and the read: start from now
                    sub.reset = True
                    if gap.resume_id is not None and gap.resume_id != start:
                        start = gap.resume_id  # after the reset, what the new incarnation has
                        continue
                    sub.position = gap.current_id
                    sub._last_key = self.id_key(gap.current_id)
                else:
                    if sub.replay:
                        sub._last_key = self.id_key(sub.replay[-1].id)
                    else:
                        sub._last_key = self.id_key(start)
                    sub.position = start
                break
            if not sub.closed and self.counts_presence:
                sub.identity = identity
                sub._counted = True
                table = self.presence_table
                table.add(names, identity)
                shared = self._presence_touched(names)
                if shared is not None:
                    await asyncio.shield(shared)
                if identity is not None and announce:
                    wanted = set(announce)
                    sub._announce = tuple(c for c in names if c in wanted and len(c) <= 191)
                    sub._grace = grace
                    for channel in sub._announce:
                        if table.counts(channel)[1].get(identity) == 1:  # first stream here
                            self._announce_soon(channel, identity, grace)
        except BaseException:
            sub.close()
            raise
        return sub

    def unsubscribe(self, subscription: Subscription, *, grace: float | None = None) -> None:
        """End *subscription* (same as `Subscription.close`, whose *grace* this takes).
        Idempotent."""
        if grace is not None:
            validate_grace(grace)
        subscription.closed = True
        self._changed(subscription.channels)
        if subscription._counted:
            subscription._counted = False
            identity = subscription.identity
            self.presence_table.remove(subscription.channels, identity)
            if not self.closed:
                shared = self._presence_touched(subscription.channels)
                if identity is not None and self._loop is not None:
                    wait = subscription._grace if grace is None else grace
                    for channel in subscription._announce:
                        if not self.presence_table.has(channel, identity):  # last one here
                            handle = self._loop.call_later(
                                wait, self._leave_due, subscription, channel
                            )
                            subscription._leaving[channel] = (handle, shared)
        gone: list[str] = []
        for name in subscription.channels:
            subs = self._subscriptions.get(name)
            if subs is None:
                continue
            subs.discard(subscription)
            if not subs:
                del self._subscriptions[name]
                gone.append(name)
        if gone and self.follows_remotely and not self.closed and self._loop is not None:
            self._loop.create_task(self._unfollow_soon(gone))

    async def _follow_grouped(self, channels: list[str]) -> str:
        """`_follow`, one at a time (and never beside an `_unfollow`); callers that arrive while
        one is in flight are grouped into the next call, so a storm of new subscriptions costs a
        few round trips to the backend, not one each in a queue."""
        if self._follow_lock is None:
            self._follow_lock = asyncio.Lock()
        if not self._follow_lock.locked() and self._follow_group is None:
            async with self._follow_lock:
                return await self._follow(channels)
        group = self._follow_group
        if group is None:
            group = self._follow_group = _FollowGroup()
            group.task = asyncio.get_running_loop().create_task(self._run_follow_group(group))
        group.channels.extend(channels)
        return await asyncio.shield(group.done)

    async def _run_follow_group(self, group: _FollowGroup) -> None:
        assert self._follow_lock is not None
        async with self._follow_lock:
            if self._follow_group is group:
                self._follow_group = None  # later callers form the next group
            try:
                position = await self._follow(list(dict.fromkeys(group.channels)))
            except asyncio.CancelledError:
                group.done.cancel()
                raise
            except BaseException as exc:
                group.done.set_exception(exc)
                group.done.exception()  # retrieved here too, in case every caller left
            else:
                group.done.set_result(position)

    async def _unfollow_soon(self, channels: list[str]) -> None:
        if self._follow_lock is None:
            self._follow_lock = asyncio.Lock()
        async with self._follow_lock:
            still_gone = [c for c in channels if c not in self._subscriptions]
            if still_gone and not self.closed:
                await self._unfollow(still_gone)

    # ------------------------------------------------------------------ presence

    async def presence(self, channel: str) -> Presence:
        """Who follows *channel* in the whole deployment: every process behind the bridge,
        every host behind Redis (see `tornado_sse.broker.presence`).

        :raises InvalidChannelError: for an invalid channel name.
        :raises BrokerUnavailableError: when the backend cannot be asked now.
        """
        validate_channel(channel)
        if self.closed:
            raise BrokerClosedError("broker is closed")
        if not self.counts_presence:
            raise BrokerError("presence is turned off for this broker (presence=False)")
        await self.start()
        return await self._presence(channel)

    async def _presence(self, channel: str) -> Presence:
        """Backend hook for :meth:`presence`; default: this process's subscriptions, and the
        identities it announced (it decides join and leave, `_announce`)."""
        return merge_presence(
            channel, [self.presence_table.counts(channel)], self._announced.get(channel, ())
        )

    async def _share_presence(self, channels: Sequence[str]) -> None:
        """Backend hook: write this process's counts of *channels* (`presence_table`) where the
        other processes read them; counts are absolute, so a write may be repeated."""

    def _presence_touched(self, channels: Iterable[str]) -> asyncio.Future[None] | None:
        """The counts of *channels* changed: have them shared (by a single writer, coalescing
        the changes that come during a write into the next one). Returns the future of the
        write that will include them, or ``None`` when the backend shares nothing."""
        if not self.shares_presence or self._loop is None:
            return None
        self._presence_dirty.update(channels)
        future = self._presence_next
        if future is None:
            future = self._presence_next = self._loop.create_future()
            writer = self._presence_writer
            if writer is None or writer.done():
                self._presence_writer = self._loop.create_task(self._write_presence())
        return future

    async def _write_presence(self) -> None:
        future: asyncio.Future[None] | None = None
        try:
            while self._presence_next is not None and not self.closed:
                future, self._presence_next = self._presence_next, None
                dirty, self._presence_dirty = self._presence_dirty, set()
                try:
                    await self._share_presence(list(dirty))
                except Exception as exc:
                    self._presence_dirty |= dirty  # written with the next change, or on reconnect
                    if not future.done():
                        future.set_exception(exc)
                        future.exception()  # retrieved: an unsubscribe does not wait for it
                else:
                    if not future.done():
                        future.set_result(None)
        finally:  # ended by close (cancelled, maybe mid-write): nobody waits for a write forever
            for left in (future, self._presence_next):
                if left is not None and not left.done():
                    left.set_exception(BrokerClosedError("broker is closed"))
                    left.exception()

    def _announce_again(self) -> None:
        """Ask for a decision again on the users of this process's open streams with join and
        leave events, after the deciding side may have lost who is announced (a new bridge
        hub, a Redis that lost its data): otherwise it would neither list them nor ever send
        their leaves. Where the marks survived, nothing is sent; where they were lost, their
        joins are."""
        asked: set[tuple[str, str]] = set()
        for subs in list(self._subscriptions.values()):
            for sub in subs:
                identity = sub.identity
                if identity is None or sub.closed:
                    continue
                for channel in sub._announce:
                    if (channel, identity) not in asked:
                        asked.add((channel, identity))
                        self._announce_soon(channel, identity, sub._grace)

    def _leave_due(self, subscription: Subscription, channel: str) -> None:
        """The grace period of *subscription*'s leave of *channel* is over: ask for a decision.
        The backend is told the subscription's own grace, not this close's wait: a wait of 0
        must not become the channel's (the bridge hub and Redis keep it for dead processes)."""
        _, shared = subscription._leaving.pop(channel)
        identity = subscription.identity
        if identity is not None:
            self._announce_soon(channel, identity, subscription._grace, shared)

    def _hasten(self, subscription: Subscription, grace: float) -> None:
        """Have the leaves of closed *subscription* still waiting wait *grace* seconds at most
        from now (`Subscription.close` on a closed subscription)."""
        validate_grace(grace)
        if self._loop is None:
            return
        now = self._loop.time()
        for channel, (handle, shared) in list(subscription._leaving.items()):
            if handle.when() > now + grace:
                handle.cancel()
                handle = self._loop.call_later(grace, self._leave_due, subscription, channel)
                subscription._leaving[channel] = (handle, shared)

    def _announce_soon(
        self,
        channel: str,
        identity: str,
        grace: float,
        shared: asyncio.Future[None] | None = None,
    ) -> None:
        if self.closed or self._loop is None:
            return
        task = self._loop.create_task(self._announce_logged(channel, identity, grace, shared))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce_logged(
        self, channel: str, identity: str, grace: float, shared: asyncio.Future[None] | None
    ) -> None:
        try:
            if shared is not None:
                # decide on counts that include the close: with a grace of 0 the decision
                # could otherwise overtake the write of the counts and see the user present
                try:
                    await asyncio.shield(shared)
                except Exception as exc:  # rewritten with the next change or on reconnect
                    log.debug("presence of %s on %s not shared yet: %s", identity, channel, exc)
            await self._announce(channel, identity, grace)
        except (BrokerError, OSError) as exc:
            log.warning("presence of %s on %s not announced: %s", identity, channel, exc)

    async def _announce(self, channel: str, identity: str, grace: float) -> None:
        """Backend hook: publish ``join`` (or ``leave``) of *identity* on *channel*'s companion
        channel if it is present (absent) in the whole deployment and was not announced so yet;
        decided in one place per deployment. Default: this process decides (one process)."""
        present = self.presence_table.has(channel, identity)
        if not record_announcement(self._announced, channel, identity, present):
            return
        await self.publish(
            companion(channel),
            presence_event_data(channel, identity),
            event="join" if present else "leave",
        )

    def subscriber_counts(self) -> dict[str, int]:
        """Local subscriptions per channel (for metrics)."""
        return {name: len(subs) for name, subs in self._subscriptions.items()}

    def history_sizes(self) -> dict[str, int]:
        """Events retained per channel, where this process can tell cheaply (for metrics)."""
        return {}

    # ------------------------------------------------------------------ for backends

    def _deliver(self, frame: Frame) -> None:
        """Hand a live frame to the local subscriptions of its channel (event loop thread)."""
        channel = frame.channel
        view = self._targets.get(channel)
        if view is None:
            subs = self._subscriptions.get(channel)
            if not subs:
                return
            live = tuple(sub for sub in subs if not sub.closed)
            view = self._targets[channel] = (
                live,
                tuple(
                    sub.subscriber.deliver
                    if sub._pending is None and sub._floor is None
                    else sub._deliver
                    for sub in live
                ),
            )
        version = self._version
        for sub, deliver in zip(*view, strict=True):
            if self._version == version:
                deliver(frame)
            elif not sub.closed:  # a subscriber changed things as we went: look at each
                sub._deliver(frame)

    def _changed(self, channels: Iterable[str]) -> None:
        """Subscriptions of *channels* came, went live or went: rebuild their fan-out views."""
        self._version += 1
        targets = self._targets
        for name in channels:
            targets.pop(name, None)

    @property
    def followed_channels(self) -> frozenset[str]:
        """Channels with at least one local subscription."""
        return frozenset(self._subscriptions)

    @abc.abstractmethod
    async def _publish(self, channel: str, event: Event) -> str: ...

    @abc.abstractmethod
    async def _follow(self, channels: Sequence[str]) -> str: ...

    @abc.abstractmethod
    async def _unfollow(self, channels: Sequence[str]) -> None: ...

    @abc.abstractmethod
    async def _history(self, channels: Sequence[str], after: str) -> list[Frame]: ...

    async def _history_page(
        self, channels: Sequence[str], after: str, limit: int, first: bool
    ) -> tuple[list[Frame], bool]:
        """About *limit* frames of `_history` after *after* and whether more may follow; *first*
        is true for the page right after the client's Last-Event-ID. Default: all of it."""
        return await self._history(channels, after), False

    @abc.abstractmethod
    async def _tail(self, channels: Sequence[str], count: int) -> str: ...

    @abc.abstractmethod
    def id_key(self, event_id: str) -> Any:
        """A sortable key for *event_id*, or ``None`` if it is not an id of this broker."""
