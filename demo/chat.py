"""The chat's model: rooms, input rules and rate limits, on the core's presence and history.

Everything a room shows comes from the broker, never from one process's memory, so the chat
behaves the same with one process, ``--processes N`` (bridge) or ``--redis``:

* **Messages** are events of the room's channel ``room/<name>``.
* **Who is here** is the core's presence (issue 14). A page's stream has its nickname as
  identity (`RoomStream.get_identity <demo.app.RoomStream>`), and the application's setting
  ``sse_presence = ["room/*"]`` gives every room join and leave events, published by the core on
  the companion channel ``presence:room/<name>``: one ``join`` per nickname however many tabs
  and workers, one ``leave`` when its last stream is gone, and none for a reconnect within the
  grace period (``sse_presence_grace``, 3 s), so a dropped connection or a killed worker shows
  no "left"/"joined" flicker. A page's one stream follows both channels.
* **The member list** starts from the nicknames *announced* in the room (``announced`` of
  `.Broker.presence`: joined and not left yet, in the whole deployment), which the page gets
  from ``GET /api/rooms/<room>`` *before* it opens its stream; the page then applies every
  ``join`` and ``leave`` its stream brings, in order, the replayed ones included. A change
  between the snapshot and the stream is in the replay, so it is not lost; one from before the
  snapshot, applied again, changes nothing (a join of someone listed, a leave of someone not),
  so it is not doubled. The snapshot is what the joins and leaves said, not who has a stream
  now: a member whose connection just dropped has none, but has not left for anybody else
  (the grace period), and a join older than the replay is in it all the same.
* **Recent history on entry** is the core's start position: a page opens its stream with
  ``history=<config.history>`` and gets the room's last events, messages and notices merged in
  id order, on whichever process and backend. The browser sends a ``Last-Event-ID`` on every
  reconnect, which takes precedence, so a page gets exactly what it missed, never the backlog
  again.
* **Leave and drop** close a page's stream from the server side, on whichever process holds it:
  the request is published on the room's *control* channel ``control/<name>``, which every
  process serving the room follows (a `Room` is a broker subscriber). *Leave* closes with
  ``close(leave=True)``: the nickname is gone at once, even when the page's connection ended
  first (a closing tab: its last stream's leave, still waiting for the grace period, is sent
  then). *Drop* (the page's "simulate network drop") closes like a lost connection: the page
  reconnects within the grace period.

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
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import tornado.web

from tornado_sse import (
    Broker,
    BrokerError,
    EventStreamParser,
    Frame,
    RateLimiter,
    SSEError,
    Subscription,
)
from tornado_sse.broker.presence import companion
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
#: streams of a room that ended, remembered per process for a leave that comes after them
_ENDED = 256


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
    """The chat's rules. Seconds everywhere. (The presence grace period is the core's setting
    ``sse_presence_grace``.)

    :param history: events of a room replayed to a page on entry.
    :param max_message: characters a message may hold.
    :param nick_burst: messages one nickname may send at once (token bucket capacity) ...
    :param nick_rate: ... and per second after that.
    :param address_burst: the same for one client address, across nicknames ...
    :param address_rate: ... and per second.
    :param max_rooms: rooms one process follows at most (idle ones are forgotten first).
    """

    history: int = 50
    max_message: int = 500
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


def sorted_nicks(nicks: Any) -> list[str]:
    """Nicknames in the order the page lists them (case-insensitive)."""
    return sorted(nicks, key=lambda n: (n.casefold(), n))


# ---------------------------------------------------------------------- rooms


class Stream(Protocol):
    """What a room needs of a page's stream (the demo's `.EventStreamHandler`)."""

    nick: str
    client: str

    def close(self, event: Any = None, *, leave: bool = False) -> Any: ...


def _now() -> float:
    return time.monotonic()


class Room:
    """One room as seen by this process: its channels, this process's streams of it, and a
    broker subscription to its control channel.

    Create it with `Chat.room`, which awaits :meth:`start`.
    """

    def __init__(self, chat: Chat, name: str) -> None:
        self.chat = chat
        self.name = name
        #: messages
        self.channel = f"room/{name}"
        #: the core's join and leave events of the room's channel
        self.presence_channel = companion(self.channel)
        #: requests to close a page's stream, wherever it is
        self.control_channel = f"control/{name}"
        #: this process's open streams of the room
        self.streams: set[Stream] = set()
        #: its streams that ended last, by client (a leave may come after its connection ended)
        self.ended: OrderedDict[str, Stream] = OrderedDict()
        self.last_used = _now()
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        """Follow the room's control channel."""
        sub = await self.chat.broker.subscribe([self.control_channel], self)
        self._subscription = sub
        sub.start()

    def close(self) -> None:
        """Stop following the room (idempotent)."""
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    @property
    def idle(self) -> bool:
        """No stream of this process is in the room."""
        return not self.streams

    def add(self, stream: Stream) -> None:
        """A stream of this process opened."""
        self.streams.add(stream)
        self.ended.pop(stream.client, None)

    def discard(self, stream: Stream) -> None:
        """A stream of this process ended."""
        self.streams.discard(stream)
        self.ended[stream.client] = stream
        self.ended.move_to_end(stream.client)
        if len(self.ended) > _ENDED:
            self.ended.popitem(last=False)

    async def members(self) -> list[str]:
        """The nicknames announced in the room now (joined, not left yet), in the whole
        deployment.

        :raises ChatError: 503 when the broker cannot be asked.
        """
        try:
            presence = await self.chat.broker.presence(self.channel)
        except BrokerError as exc:
            raise ChatError(503, "The message broker is unavailable; try again shortly.") from exc
        return sorted_nicks(presence.announced)

    async def drop(self, client: str, *, leave: bool = False) -> None:
        """Have the process holding the stream of *client* close it: as a lost connection (the
        page's "simulate network drop"; it reconnects within the grace period), or with
        *leave* (its Leave button: the nickname is gone at once).

        :raises ChatError: 503 when the broker cannot take the request.
        """
        data = json.dumps({"client": client, "leave": leave})
        try:
            await self.chat.broker.publish(self.control_channel, data, event="drop")
        except BrokerError as exc:
            raise ChatError(503, "The message broker is unavailable; try again shortly.") from exc

    def deliver(self, frame: Frame) -> None:
        """Take a frame of the control channel (broker's event loop, id order)."""
        parser = EventStreamParser()
        try:
            events = parser.feed(frame.data) + parser.close()
        except SSEError:
            return
        for event in events:
            try:
                request = json.loads(event.data or "")
            except ValueError:
                continue
            if event.event != "drop" or not isinstance(request, dict):
                continue
            client = request.get("client")
            leave = request.get("leave") is True
            for stream in [s for s in self.streams if s.client == client]:
                stream.close(leave=leave)
            ended = self.ended.get(client) if isinstance(client, str) else None
            if leave and ended is not None:
                ended.close(leave=True)  # its connection ended first: its leave goes now


# ---------------------------------------------------------------------- the chat


class Chat:
    """All rooms of this process and the rate limits.

    :param broker: where rooms live; any backend.
    :param config: rules.
    """

    def __init__(self, broker: Broker, config: ChatConfig | None = None) -> None:
        self.broker = broker
        self.config = config or ChatConfig()
        self.rooms: dict[str, Room] = {}
        self.nick_limiter = RateLimiter(self.config.nick_rate, self.config.nick_burst)
        self.address_limiter = RateLimiter(self.config.address_rate, self.config.address_burst)
        self._starting: dict[str, asyncio.Future[Room]] = {}
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

    def close(self) -> None:
        """Stop every room. Streams are closed by the connection set."""
        if self.closed:
            return
        self.closed = True
        for room in list(self.rooms.values()):
            room.close()
        self.rooms.clear()
