"""Presence: who follows a channel, counted for the whole deployment (issue 14).

Every subscription may carry an *identity* (a token's ``sub``, Jupyter's user, whatever an
application's `.EventStreamHandler.get_identity` says). Each broker counts its own
subscriptions per channel in a `PresenceTable`: streams, and streams per identity. The counts
change on subscribe and unsubscribe only; the per-event fan-out never touches them.

`.Broker.presence` answers for the whole deployment, so a backend that spans processes shares
its table: after a change, the broker hands the *absolute* counts of the channels that changed
to its backend (``_share_presence``), coalescing changes that come while a write is under way
into the next write. Absolute counts make every write idempotent: a process that reconnects
(to the same bridge hub, a new one, or a Redis that lost its data) writes its whole table
again, and nothing is ever counted twice or driven negative by a lost delta.

Who forgets a process that vanished:

* **bridge**: the hub keeps each worker's table with that worker's connection, and drops it when
  the connection ends (the kernel closes it when the process dies, even by ``kill -9``); the
  announced users die with a hub, so after a reconnect every worker announces the users of its
  open streams again (a new hub sends their joins, the same hub nothing);
* **Redis**: each broker holds a *lease* (default 15 s, refreshed every third of it); its table
  counts only while the lease is live, so a host that vanishes stops counting within the lease,
  and its keys expire on their own. A Redis that lost its data lost the announced marks too: the
  renewal that finds a host's hash gone writes it again and announces the host's users again.

Join and leave events: for the channels an application configures (patterns, the setting
``sse_presence``, the hub's ``--presence``), the broker publishes ``join`` and ``leave`` events
on the *companion* channel ``presence:<channel>`` (`companion`), data
``{"channel": ..., "user": ...}``. They are about identities, not streams: one user with three
tabs is one join, then one leave when the last tab goes, whichever processes the tabs are on. A
leave waits for a grace period (default 3 s) and is not sent if the user is back by then (a
reconnect); a subscription closed with ``close(grace=0)`` (the user left: a Leave button, a
logout) has its leave decided at once, once this process's counts are shared (``close(grace=0)``
after a close hastens a leave still waiting), while a process that dies keeps the grace its
subscriptions were given. The decision is made in one place per
deployment, so that two processes never both announce: the in-process broker itself, the bridge
hub (which holds every worker's counts and, when a worker dies, checks its users after the grace
period), or an atomic script in Redis (which reads every live lease, and flips an ``announced``
mark before the event is published; every host sweeps the marks after each lease renewal for
the users of hosts that vanished, and sends the leave of one absent everywhere for the grace
period kept with its mark). A broker asks for a decision (`Broker._announce`) when a
user's first stream opens in this process, and a grace period after its last one here closed.
The companion channel is an ordinary channel: resumable, with history (``?history=N`` gives the
latest joins and leaves), and a stream may follow it if it may follow the channel it describes.

Who is *announced* (``announced`` of `Presence`): the identities whose join was sent and whose leave
was not, read where the decisions are kept (the in-process broker's set, the bridge hub's, the
``announced:<channel>`` hash in Redis, in the same script as the counts). It is what the
subscribers of the companion channel believe, so a member list starts from it and then applies
the joins and leaves that follow; the streams open now (``users``) are not that: a user whose
connection just dropped has none, yet has not left for anybody (the grace period).

A subscription counts from the end of `.Broker.subscribe` (before its stream's first byte; the
subscribe waits until the count is shared) until it is closed (the stream ended, was pruned as
half-open or cut off as slow); the share of a close is written without waiting, within a second.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError

__all__ = [
    "COMPANION_PREFIX",
    "Presence",
    "PresenceTable",
    "companion",
    "described",
    "matches_any",
    "merge_presence",
    "presence_event_data",
    "record_announcement",
    "validate_identity",
]

#: the companion channel of a channel is named this prefix and the channel
COMPANION_PREFIX = "presence:"

#: identities are 1-200 characters, none of them a control character
MAX_IDENTITY = 200


def validate_grace(grace: float) -> float:
    """Return *grace*, seconds a ``leave`` waits (0 or more; infinity waits for ever); raise
    `.InvalidArgumentError` (a `ValueError`) otherwise. NaN too: as a timer it would disorder
    the event loop's timer heap."""
    if not grace >= 0:
        raise InvalidArgumentError(f"grace must be 0 or more seconds, not {grace!r}")
    return grace


def validate_identity(identity: object) -> str | None:
    """Return *identity* (``None``, or a string of 1-200 characters without control
    characters); raise `.InvalidArgumentError` (a `ValueError`) otherwise."""
    if identity is None:
        return None
    if (
        not isinstance(identity, str)
        or not 0 < len(identity) <= MAX_IDENTITY
        or not identity.isprintable()
    ):
        raise InvalidArgumentError(
            f"invalid identity {identity!r}: use 1-{MAX_IDENTITY} printable characters"
        )
    return identity


def companion(channel: str) -> str:
    """The channel of *channel*'s join and leave events (``presence:<channel>``)."""
    return COMPANION_PREFIX + channel


def described(channel: str) -> str | None:
    """The channel a companion channel describes, or ``None`` if *channel* is not one."""
    if channel.startswith(COMPANION_PREFIX) and len(channel) > len(COMPANION_PREFIX):
        return channel[len(COMPANION_PREFIX) :]
    return None


def matches_any(patterns: Iterable[str], channel: str) -> bool:
    """Whether one of *patterns* (an exact name, or a prefix ending in ``*``) covers
    *channel*."""
    for pattern in patterns:
        if pattern.endswith("*"):
            if channel.startswith(pattern[:-1]):
                return True
        elif pattern == channel:
            return True
    return False


def presence_event_data(channel: str, identity: str) -> str:
    """The data of a ``join`` or ``leave`` event."""
    return json.dumps({"channel": channel, "user": identity}, ensure_ascii=False)


def record_announcement(
    announced: dict[str, set[str]], channel: str, identity: str, present: bool
) -> bool:
    """Whether *identity*'s ``join`` (*present*) or ``leave`` on *channel* is due, given what
    was *announced* so far; if so, record it there. The one rule of the in-process broker and
    the bridge hub: one join while present anywhere, one leave once gone everywhere."""
    seen = announced.get(channel, set())
    if present == (identity in seen):
        return False
    if present:
        announced.setdefault(channel, set()).add(identity)
    else:
        seen.discard(identity)
        if not seen:
            announced.pop(channel, None)
    return True


@dataclass(frozen=True)
class Presence:
    """Who follows a channel, in the whole deployment.

    :ivar channel: the channel.
    :ivar subscribers: streams following it.
    :ivar users: streams per identity, for the streams that have one (a stream without identity
        counts in ``subscribers`` only).
    :ivar announced: the identities *announced* present on a channel with join and leave events:
        joined, and no leave sent yet. It is what the subscribers of the companion channel
        believe, and may differ from ``users`` both ways: a user whose last stream closed is
        still announced during the grace period (a reconnect is no leave), and a user whose
        first stream just opened is in ``users`` before their join is decided. Empty for a
        channel without join and leave events.
    """

    channel: str
    subscribers: int = 0
    users: Mapping[str, int] = field(default_factory=dict)
    announced: frozenset[str] = frozenset()

    def as_json(self) -> dict[str, object]:
        """Every field as JSON values (``announced`` sorted)."""
        return {
            "channel": self.channel,
            "subscribers": self.subscribers,
            "users": dict(self.users),
            "announced": sorted(self.announced),
        }


#: the counts of one channel in one process: (streams, streams per identity)
Counts = tuple[int, dict[str, int]]


class PresenceTable:
    """The subscriptions of one process, counted per channel and per identity."""

    __slots__ = ("_channels",)

    def __init__(self) -> None:
        self._channels: dict[str, tuple[list[int], dict[str, int]]] = {}

    def add(self, channels: Iterable[str], identity: str | None) -> None:
        for channel in channels:
            entry = self._channels.get(channel)
            if entry is None:
                entry = self._channels[channel] = ([0], {})
            entry[0][0] += 1
            if identity is not None:
                entry[1][identity] = entry[1].get(identity, 0) + 1

    def remove(self, channels: Iterable[str], identity: str | None) -> None:
        for channel in channels:
            entry = self._channels.get(channel)
            if entry is None:
                continue
            entry[0][0] -= 1
            if identity is not None:
                left = entry[1].get(identity, 0) - 1
                if left > 0:
                    entry[1][identity] = left
                else:
                    entry[1].pop(identity, None)
            if entry[0][0] <= 0:
                del self._channels[channel]

    def counts(self, channel: str) -> Counts:
        """This process's streams of *channel*, and streams per identity (copies)."""
        entry = self._channels.get(channel)
        if entry is None:
            return 0, {}
        return entry[0][0], dict(entry[1])

    def has(self, channel: str, identity: str) -> bool:
        """Whether *identity* has a stream of *channel* here."""
        entry = self._channels.get(channel)
        return entry is not None and identity in entry[1]

    def channels(self) -> list[str]:
        """Channels with at least one stream here."""
        return list(self._channels)

    def clear(self) -> None:
        self._channels.clear()


def merge_presence(
    channel: str, parts: Iterable[Counts], announced: Iterable[str] = ()
) -> Presence:
    """The `Presence` of *channel* from the counts of every process, and the identities
    *announced* on it by whoever decides join and leave."""
    subscribers = 0
    users: dict[str, int] = {}
    for count, identities in parts:
        subscribers += count
        for identity, streams in identities.items():
            users[identity] = users.get(identity, 0) + streams
    return Presence(channel, subscribers, dict(sorted(users.items())), frozenset(announced))
