"""The chat's model: rooms, presence, recent history, input rules and rate limits.

Everything a room shows is derived from events in the broker, never from one process's memory,
so the chat behaves the same with one process, ``--processes N`` (bridge) or ``--redis``:

* **Messages and notices** (``message``, ``join``, ``leave``) are events of the room's channel
  ``room/<name>``; pages follow that channel only.
* **Presence** travels on a second channel, ``presence/<name>``, followed by each process that
  serves the room (a `Room` is a broker subscriber). Each process publishes ``here`` events
  carrying the *full* set of nicknames it holds in the room: on every change, when another
  process asks (``sync``), and every ``presence_interval`` seconds as a lease that expires after
  three intervals (so a killed worker's members disappear). The member list is the union of the
  unexpired leases, folded by every process from the same events. State-carrying ``here`` events
  are idempotent, so a lost or repeated one is repaired by the next.
* **Join and leave notices** are published by the process whose own ``here`` event, folded in
  order, changed the member list (one publisher, no duplicates); for an expired lease, by the
  live process with the smallest id. A stream that closes keeps its nickname present for
  ``presence_grace`` seconds, so a reconnect (a network drop, a server-side close) shows neither
  "left" nor "joined".
* **Recent history on entry** is the core's start position (issue 14): a page opens its stream
  with ``history=<config.history>`` and gets the room's last events from the broker's history,
  on whichever process and backend. The browser sends a ``Last-Event-ID`` header on every
  reconnect, which takes precedence, so a page gets exactly what it missed, never the backlog
  again. The room keeps no bookkeeping of its own for it.
* **A server-side close** (the page's "simulate network drop") is a ``drop`` event on the
  presence channel: whichever process holds the client's stream closes it.

Only public names of tornado_sse are used, as an application would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import unicodedata
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Protocol

import tornado.web
from tornado.ioloop import PeriodicCallback

from tornado_sse import (
    Broker,
    BrokerError,
    EventStreamParser,
    Frame,
    RateLimiter,
    SSEError,
    Subscription,
)
from tornado_sse.ratelimit import address_key

__all__ = [
    "Chat",
    "ChatConfig",
    "ChatError",
    "Room",
    "validate_client",
    "validate_message",
    "validate_nick",
    "validate_room",
]

log = logging.getLogger("tornado_sse.demo")

_NICK = re.compile(r"[\w\-. ]{1,32}")
_ROOM = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_CLIENT = re.compile(r"[A-Za-z0-9_-]{8,64}")


class ChatError(tornado.web.HTTPError):
    """Input the chat refuses: answered with ``status`` and ``message`` (shown in the page).

    :param retry_after: seconds after which trying again makes sense (sent as ``Retry-After``).
    """

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, "%s", message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class ChatConfig:
    """The chat's rules and timings. Seconds everywhere.

    :param history: events of a room replayed to a page on entry.
    :param max_message: characters a message may hold.
    :param presence_interval: seconds between a process's ``here`` leases (they expire after 3).
    :param presence_grace: seconds a closed stream's nickname stays present (a reconnect within
        it shows no leave/join).
    :param sync_timeout: seconds a process waits for the others' ``here`` events when it starts
        following a room; ``0`` (one process) skips the exchange.
    :param nick_burst: messages one nickname may send at once (token bucket capacity) ...
    :param nick_rate: ... and per second after that.
    :param address_burst: the same for one client address, across nicknames ...
    :param address_rate: ... and per second.
    :param max_rooms: rooms one process follows at most (idle ones are forgotten first).
    """

    history: int = 50
    max_message: int = 500
    presence_interval: float = 10.0
    presence_grace: float = 3.0
    sync_timeout: float = 0.0
    nick_burst: int = 5
    nick_rate: float = 1.0
    address_burst: int = 30
    address_rate: float = 5.0
    max_rooms: int = 1000


# ---------------------------------------------------------------------- input rules


def validate_nick(value: str | None) -> str:
    """A nickname: 1-32 letters, digits, ``_ - .`` or spaces (NFC, surrounding spaces removed)."""
    nick = unicodedata.normalize("NFC", value or "").strip()
    if not nick:
        raise ChatError(400, "Choose a nickname.")
    if len(nick) > 32:
        raise ChatError(400, "A nickname has at most 32 characters.")
    if _NICK.fullmatch(nick) is None:
        raise ChatError(400, 'A nickname may only use letters, digits, spaces, _, - and ".".')
    return nick


def validate_room(value: str | None) -> str:
    """A room name: 1-32 of ``a-z 0-9 _ -``, starting with a letter or digit (case folded)."""
    room = (value or "").strip().lower()
    if _ROOM.fullmatch(room) is None:
        raise ChatError(
            400, "A room name has 1-32 characters: a-z, 0-9, _ and -, starting with a-z or 0-9."
        )
    return room


def validate_client(value: str | None) -> str:
    """The page's client id (random, one per tab), used to close its stream on request."""
    if value is None or _CLIENT.fullmatch(value) is None:
        raise ChatError(400, "Missing or invalid client id; reload the page.")
    return value


def validate_message(value: str | None, limit: int) -> str:
    """A message: 1-*limit* characters, not only spaces; line ends kept."""
    text = value or ""
    if not text.strip():
        raise ChatError(400, "The message is empty.")
    if len(text) > limit:
        raise ChatError(
            400, f"A message has at most {limit} characters (this one has {len(text)})."
        )
    return text


# ---------------------------------------------------------------------- rooms


class Stream(Protocol):
    """What a room needs of a page's stream (the demo's `.EventStreamHandler`)."""

    nick: str
    client: str
    #: set before closing a stream whose page left: its nickname does not linger
    leaving: bool

    def send_event(self, data: str = "", *, event: str | None = None) -> None: ...

    def close(self) -> Any: ...


def _now() -> float:
    return time.monotonic()


class Room:
    """One room as seen by this process: a broker subscriber to its two channels.

    Create it with `Chat.room`, which awaits :meth:`start`.
    """

    def __init__(self, chat: Chat, name: str) -> None:
        self.chat = chat
        self.name = name
        self.channel = f"room/{name}"
        self.presence_channel = f"presence/{name}"
        #: this process's open streams of the room
        self.streams: set[Stream] = set()
        #: the room's members as every process folds them from ``here`` events
        self.members: tuple[str, ...] = ()
        self.last_used = _now()
        self._live: Counter[str] = Counter()
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        self._lingering_clients: dict[str, str] = {}
        self._announced: frozenset[str] = frozenset()
        self._leases: dict[str, tuple[frozenset[str], float]] = {}
        self._subscription: Subscription | None = None
        self._synced: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Follow the room's channels; with other processes, exchange presence first."""
        broker = self.chat.broker
        self._synced = asyncio.get_running_loop().create_future()
        sub = await broker.subscribe([self.presence_channel], self)
        self._subscription = sub
        sub.start()
        timeout = self.chat.config.sync_timeout
        if timeout > 0:
            self.chat.enqueue(self.presence_channel, {"proc": self.chat.proc}, "sync")
            try:
                await asyncio.wait_for(asyncio.shield(self._synced), timeout)
            except asyncio.TimeoutError:
                pass

    def close(self) -> None:
        """Stop following the room (idempotent)."""
        for handle in self._lingering.values():
            handle.cancel()
        self._lingering.clear()
        self._lingering_clients.clear()
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    @property
    def idle(self) -> bool:
        """No stream of this process is in the room and none lingers."""
        return not self.streams and not self._lingering

    # ------------------------------------------------------------ local streams

    def attach(self, stream: Stream) -> None:
        """A stream of this process entered the room (its replay already written)."""
        self.streams.add(stream)
        self.last_used = _now()
        self._live[stream.nick] += 1
        handle = self._lingering.pop(stream.nick, None)
        if handle is not None:
            handle.cancel()
        self._send_members(stream)
        self._local_changed()

    def detach(self, stream: Stream) -> None:
        """A stream of this process ended; its nickname lingers for the grace period."""
        if stream not in self.streams:
            return
        self.streams.discard(stream)
        self.last_used = _now()
        nick = stream.nick
        self._live[nick] -= 1
        if self._live[nick] > 0:
            return
        del self._live[nick]
        grace = self.chat.config.presence_grace
        if grace > 0 and not stream.leaving:
            loop = asyncio.get_running_loop()
            old = self._lingering.pop(nick, None)
            if old is not None:
                old.cancel()
            self._lingering[nick] = loop.call_later(grace, self._linger_over, nick)
            self._lingering_clients[stream.client] = nick
            if len(self._lingering_clients) > 4 * len(self._lingering) + 100:
                self._lingering_clients = {
                    c: n for c, n in self._lingering_clients.items() if n in self._lingering
                }
        self._local_changed()

    def _linger_over(self, nick: str) -> None:
        handle = self._lingering.pop(nick, None)
        if handle is not None:
            handle.cancel()
        self._local_changed()

    def _leave(self, client: str) -> None:
        """The page of *client* left: close its stream here, with no grace period."""
        for stream in [s for s in self.streams if s.client == client]:
            stream.leaving = True
            stream.close()
        nick = self._lingering_clients.pop(client, None)
        if nick is not None and nick in self._lingering:
            self._linger_over(nick)

    def local_nicks(self) -> frozenset[str]:
        """Nicknames this process holds in the room (live or lingering)."""
        return frozenset(self._live) | frozenset(self._lingering)

    def _local_changed(self) -> None:
        nicks = self.local_nicks()
        if nicks != self._announced:
            self._announced = nicks
            self.publish_here()

    def publish_here(self) -> None:
        """Publish this process's lease: its nicknames in the room."""
        config = self.chat.config
        self.chat.enqueue(
            self.presence_channel,
            {
                "proc": self.chat.proc,
                "nicks": sorted(self._announced),
                "ttl": 3 * config.presence_interval,
            },
            "here",
        )

    def drop(self, client: str, *, leave: bool = False) -> None:
        """Ask every process to close the streams of *client*.

        A drop (the page's "simulate network drop") keeps the nickname present for the grace
        period, as any lost connection does; a *leave* (the page's Leave button, or the tab
        closing) ends its presence at once.
        """
        self.chat.enqueue(self.presence_channel, {"client": client, "leave": leave}, "drop")

    # ------------------------------------------------------------ broker events

    def deliver(self, frame: Frame) -> None:
        """Take a frame of the presence channel (broker's event loop, id order)."""
        parser = EventStreamParser()
        try:
            events = parser.feed(frame.data) + parser.close()
        except SSEError:
            return
        for event in events:
            try:
                payload = json.loads(event.data or "")
            except ValueError:
                continue
            if isinstance(payload, dict):
                self._on_presence(event.event or "message", payload)

    def _on_presence(self, name: str, payload: dict[str, Any]) -> None:
        proc = payload.get("proc")
        if name == "drop":
            client = payload.get("client")
            if not isinstance(client, str):
                return
            if payload.get("leave") is True:
                self._leave(client)
            else:
                for stream in [s for s in self.streams if s.client == client]:
                    stream.close()
        elif name == "sync" and isinstance(proc, str) and proc != self.chat.proc:
            self.publish_here()
        elif name == "here" and isinstance(proc, str):
            self._on_here(proc, payload)

    def _on_here(self, proc: str, payload: dict[str, Any]) -> None:
        nicks = payload.get("nicks")
        ttl = payload.get("ttl")
        if not isinstance(nicks, list) or not isinstance(ttl, (int, float)):
            return
        mine = proc == self.chat.proc
        if not mine:
            if self._synced is not None and not self._synced.done():
                self._synced.set_result(None)
        names = frozenset(n for n in nicks if isinstance(n, str))
        if names:
            self._leases[proc] = (names, _now() + float(ttl))
        else:
            self._leases.pop(proc, None)
        self._fold(announce=mine)

    def expire(self, now: float) -> None:
        """Forget leases past their time (a process that died without saying goodbye).

        This process's own lease never expires here: it knows its own state, and a stalled
        event loop must not make it announce its own members' departure.
        """
        mine = self.chat.proc
        gone = [p for p, (_, until) in self._leases.items() if until <= now and p != mine]
        if not gone:
            return
        for proc in gone:
            del self._leases[proc]
        live = [*self._leases, self.chat.proc]
        self._fold(announce=min(live) == self.chat.proc)

    def _fold(self, announce: bool) -> None:
        members: set[str] = set()
        for names, _ in self._leases.values():
            members |= names
        before = set(self.members)
        if members == before:
            return
        self.members = tuple(sorted(members, key=lambda n: (n.casefold(), n)))
        for stream in list(self.streams):
            self._send_members(stream)
        if announce:
            for nick in sorted(members - before):
                self.chat.enqueue(self.channel, {"nick": nick, "ts": time.time()}, "join")
            for nick in sorted(before - members):
                self.chat.enqueue(self.channel, {"nick": nick, "ts": time.time()}, "leave")

    def _send_members(self, stream: Stream) -> None:
        try:
            stream.send_event(json.dumps({"members": list(self.members)}), event="presence")
        except SSEError:
            pass


# ---------------------------------------------------------------------- the chat


class Chat:
    """All rooms of this process, their timers, the ordered publisher and the rate limits.

    :param broker: where rooms live; any backend.
    :param config: rules and timings.
    """

    def __init__(self, broker: Broker, config: ChatConfig | None = None) -> None:
        self.broker = broker
        self.config = config or ChatConfig()
        #: this process's id in presence leases
        self.proc = uuid.uuid4().hex[:12]
        self.rooms: dict[str, Room] = {}
        self.nick_limiter = RateLimiter(self.config.nick_rate, self.config.nick_burst)
        self.address_limiter = RateLimiter(self.config.address_rate, self.config.address_burst)
        self._starting: dict[str, asyncio.Future[Room]] = {}
        self._outbox: deque[tuple[str, str, str]] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._timer: PeriodicCallback | None = None
        self.closed = False

    async def room(self, name: str) -> Room:
        """The room *name*, followed from now on (created on first use).

        :raises ChatError: 503 when this process follows too many rooms with people in them.
        """
        room = self.rooms.get(name)
        if room is not None:
            room.last_used = _now()
            return room
        starting = self._starting.get(name)
        if starting is not None:
            return await asyncio.shield(starting)
        if self.closed:
            raise ChatError(503, "The chat is shutting down.")
        self._make_room_for_one_more()
        future: asyncio.Future[Room] = asyncio.get_running_loop().create_future()
        self._starting[name] = future
        room = Room(self, name)
        try:
            await room.start()
        except BrokerError as exc:
            room.close()
            error = ChatError(503, "The message broker is unavailable; try again shortly.")
            future.set_exception(error)
            future.exception()
            raise error from exc
        except BaseException as exc:
            room.close()
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            del self._starting[name]
        self.rooms[name] = room
        future.set_result(room)
        self._start_timer()
        return room

    def _make_room_for_one_more(self) -> None:
        if len(self.rooms) + len(self._starting) < self.config.max_rooms:
            return
        idle = [room for room in self.rooms.values() if room.idle]
        if not idle:
            raise ChatError(503, "Too many rooms are in use on this server; try again later.")
        self.forget(min(idle, key=lambda room: room.last_used))

    def forget(self, room: Room) -> None:
        """Stop following *room* (its history stays in the broker)."""
        room.close()
        self.rooms.pop(room.name, None)

    def check_rate(self, nick: str, address: str) -> None:
        """Spend a token of *nick* and of *address* (`.ratelimit.address_key`: IPv6 per /64);
        raise 429 when either bucket is empty."""
        now = time.monotonic()
        config = self.config
        for limiter, key, burst, rate in (
            (self.nick_limiter, "n:" + nick.casefold(), config.nick_burst, config.nick_rate),
            (self.address_limiter, address_key(address), config.address_burst, config.address_rate),
        ):
            wait = limiter.take(key, now)
            if wait > 0:
                raise ChatError(
                    429,
                    f"Slow down: {burst} messages at once, then {rate:g} per second. "
                    f"Try again in {math.ceil(wait * 10) / 10:g} s.",
                    retry_after=wait,
                )

    async def post(self, room: Room, nick: str, text: str) -> str:
        """Publish a message to *room* and return its id."""
        data = json.dumps({"nick": nick, "text": text, "ts": time.time()})
        try:
            return await self.broker.publish(room.channel, data)
        except BrokerError as exc:
            raise ChatError(503, "The message broker is unavailable; try again shortly.") from exc

    # ------------------------------------------------------------ ordered publishing

    def enqueue(self, channel: str, payload: dict[str, Any], event: str) -> None:
        """Publish presence and notices in the order they were decided, in the background."""
        if self.closed:
            return
        self._outbox.append((channel, json.dumps(payload), event))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_outbox())

    async def _send_outbox(self) -> None:
        while self._outbox and not self.closed:
            channel, data, event = self._outbox.popleft()
            try:
                await self.broker.publish(channel, data, event=event)
            except (BrokerError, SSEError) as exc:
                log.warning("could not publish %s to %s: %s", event, channel, exc)

    # ------------------------------------------------------------ timers

    def _start_timer(self) -> None:
        if self._timer is None:
            self._timer = PeriodicCallback(self._tick, self.config.presence_interval * 1000)
            self._timer.start()

    def _tick(self) -> None:
        now = _now()
        for room in list(self.rooms.values()):
            if room.local_nicks():
                room.publish_here()
            room.expire(now)

    # ------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop every room and timer. Streams are closed by the connection set."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.stop()
        for room in list(self.rooms.values()):
            room.close()
        self.rooms.clear()
        self._outbox.clear()
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
