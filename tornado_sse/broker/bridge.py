"""The unix-socket bridge: several processes on one host act as one broker.

Every process creates a `BridgeBroker` on the same socket path. One *hub* owns the socket: it
assigns the global event ids (`.IdSequence`), keeps the per-channel history (`.History`) and
forwards each event to the processes that follow its channel, so a publish in any process reaches
subscribers in all of them and a browser resumes on whichever process its reconnect lands. A
process tells the hub which channels its streams follow (SUBSCRIBE / UNSUBSCRIBE frames) and
receives only those. Frames are msgpack (`tornado_sse.broker.framing`).

Decisions, and why:

* **Who runs the hub: whoever gets there first, and again after it dies.** There is no hub
  process to deploy. A `BridgeBroker` that finds no live hub tries to *take over*: it takes an
  exclusive ``flock`` on ``<path>.lock`` (released by the kernel when the hub's process dies;
  children forked by that process close their inherited copy at once, through
  ``os.register_at_fork``, so that they cannot keep it alive; ``lockf`` would be released by any
  ``close()`` of the file in the process, and does not conflict within one process), checks
  that no hub answers on the socket, replaces a stale socket file and serves the hub in its own
  event loop (its own broker then connects to it like every other process). The lock makes the
  race between processes safe: never two hubs, never a second hub on a live socket. The same
  code serves ``tornado-sse serve --processes N``, processes forked by an embedding application,
  and processes started independently (even a lone ``python -m tornado_sse.broker.bridge PATH``
  hub).
* **When the hub dies** (its process crashed or was killed), every other process sees its
  connection end, waits a jittered moment, and reconnects with exponential backoff and jitter; one
  of them wins the lock and becomes the hub. No operator is needed.
* **Publishes while there is no hub fail fast** with `.BrokerUnavailableError` (and a publish whose
  answer was lost with the hub raises it too: it may or may not have been delivered). Queueing
  them would hide the outage from the publisher and make memory grow with its length.
  Subscribing fails the same way, and `.EventStreamHandler` then sheds the stream with a retry
  delay, so browsers come back once the hub is. A hub that is alive but stuck is the same error
  after ``request_timeout`` (one watchdog sweep per connection, not a timer per request).
* **Never a silent gap.** The new hub has a new id epoch (kept strictly increasing through the
  lock file), so ids from before are not in its history. After reconnecting, a process follows
  its channels again and asks the hub for what it may have missed since its last position. From
  the *same* hub (the connection, not the hub, was lost) that is an exact replay. From a new hub it
  is answered with a gap: every local stream is sent a ``stream-reset`` event carrying the new
  epoch's first id (``<epoch>-0``) and then everything the new hub has published on its channels,
  in order; a browser that reconnects later with an old Last-Event-ID gets ``stream-reset`` from
  the handler, as for any id no longer in history. Events that died with the old hub are thus
  announced, never silently skipped.
* **A dead process is dropped by the hub** when its connection ends (the kernel closes it), and
  its subscriptions are freed at once.
* **Hygiene and security.** The socket lives in a directory only its owner may enter (created
  0700, or checked: ours, 0700, not a symlink); the socket is chmod 0600 before it listens; both
  ends check the other with ``SO_PEERCRED`` (same uid) where the platform has it. Malformed,
  truncated or oversize frames, unknown versions, invalid channels or events, and a peer that does
  not read what it is sent (its pending output passes ``max_peer_buffer``) get that one peer
  dropped with a log line; the hub never raises out of a callback and other peers keep working.
* **History is read in pages** (issue 12): a HISTORY request asks for at most a number of events
  after an id, and the hub answers one page, cut at ``max_frame_size`` bytes, re-checking for a
  gap each time (history trimmed under a long read is a gap, never a silent skip). A stream's
  replay reads a page when its client took the one before (`.Subscription.next_page`), so a
  resume whose client never reads holds one page in its worker and none in the hub, and a worker
  that asks and never reads is dropped by the hub at ``max_peer_buffer`` like any other. A whole
  read (a process catching up after a reconnect) is paged too, and past half of
  ``max_peer_buffer`` bytes is given up as a gap (``stream-reset``).

Call order matters with ``fork()``: create and start brokers in the processes that use them,
after forking (see docs/bridge.md); a broker refuses to be used in a child of the process that
started it, and such a child lets go of the hub's lock, listening socket and connections at once
(their descriptors point at /dev/null), so that it can neither keep the lock nor hide the hub's
death from the other processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import random
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ..errors import (
    BrokerClosedError,
    BrokerError,
    BrokerUnavailableError,
    EventTooLargeError,
    HistoryGapError,
    InvalidArgumentError,
    InvalidChannelError,
    InvalidEventError,
)
from ..protocol import Event, encode_event
from .base import Broker, Frame, Subscription, validate_channel
from .framing import (
    ANNOUNCE,
    ANNOUNCED,
    CLOSING,
    DEFAULT_MAX_FRAME_SIZE,
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
    pack,
    publish_size,
)
from .memory import History, IdSequence
from .presence import (
    Presence,
    companion,
    merge_presence,
    presence_event_data,
    record_announcement,
    validate_grace,
    validate_identity,
)

__all__ = [
    "BridgeBroker",
    "BridgeHub",
    "BridgePermissionError",
    "check_peer",
    "claim_socket",
    "default_socket_path",
    "peer_credentials",
    "secure_directory",
]

log = logging.getLogger("tornado_sse.bridge")

#: frames the hub sends a peer may be this many times larger than what the hub accepts: events
#: are encoded at the hub, and ``data:`` prefixes can multiply a many-line payload's size
EXPANSION = 8

#: default bound on one peer's pending output at the hub (bytes)
DEFAULT_MAX_PEER_BUFFER = 64 << 20

#: events per HISTORY request when a process reads history whole (after a reconnect)
HISTORY_PAGE_SIZE = 1000

_PEERCRED = struct.Struct("3i")

#: longest unix socket path (``sun_path`` is 108 bytes on Linux, 104 on the BSDs, NUL included)
_MAX_SOCKET_PATH = 103


class BridgePermissionError(BrokerError, PermissionError):
    """The socket's directory or a peer on the socket is not safe to use (wrong owner or mode)."""


# ---------------------------------------------------------------------- socket hygiene


def default_socket_path(name: str = "tornado-sse") -> str:
    """``$XDG_RUNTIME_DIR/<name>/hub.sock``, else ``<tmp>/<name>-<uid>/hub.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, name, "hub.sock")
    return os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}", "hub.sock")


def secure_directory(path: str) -> str:
    """Make sure the directory of socket *path* exists and only we may enter it; return it.

    A missing directory is created with mode 0700 (its parent must exist). An existing one must be
    a real directory (not a symlink), owned by us, with no permissions for group or others.

    :raises BridgePermissionError: if it is not.
    """
    directory = os.path.dirname(os.path.abspath(path))
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise BridgePermissionError(f"{directory} is not a directory (a symlink?)")
    if info.st_uid != os.getuid():
        raise BridgePermissionError(f"{directory} belongs to uid {info.st_uid}, not to us")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise BridgePermissionError(
            f"{directory} is open to other users (mode {stat.S_IMODE(info.st_mode):o});"
            " the bridge socket needs a directory only its owner can enter (chmod 700)"
        )
    return directory


def peer_credentials(sock: Any) -> tuple[int, int, int] | None:
    """``(pid, uid, gid)`` of the process at the other end of unix socket *sock*.

    ``None`` where the platform has no ``SO_PEERCRED`` (the 0700 directory is then the only guard).
    """
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def check_peer(credentials: tuple[int, int, int] | None, uid: int | None = None) -> None:
    """Refuse a peer that does not run as *uid* (default: our own uid).

    :raises BridgePermissionError: for a peer of another user.
    """
    if credentials is None:
        return
    expected = os.getuid() if uid is None else uid
    if credentials[1] != expected:
        raise BridgePermissionError(
            f"bridge peer pid {credentials[0]} runs as uid {credentials[1]}, not {expected}"
        )


def _socket_is_live(path: str) -> bool:
    """Whether something accepts connections on *path* (a stale file after a crash does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (BlockingIOError, InterruptedError):
        return True  # backlog full: somebody is listening
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return False
        raise
    finally:
        probe.close()
    return True


class _Claim:
    """A bound, listening hub socket and the lock that makes it ours."""

    def __init__(self, path: str, sock: socket.socket, lock_fd: int, epoch_ms: int) -> None:
        self.path = path
        self.sock = sock
        self.lock_fd = lock_fd
        self.epoch_ms = epoch_ms
        self.inode = os.stat(path).st_ino

    def release(self) -> None:
        """Close the socket, remove its file if it is still ours, release the lock."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        self.sock.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def claim_socket(path: str, backlog: int = 128) -> _Claim | None:
    """Try to become the hub on *path*: return the claim, or ``None`` if a hub already has it.

    Takes ``<path>.lock`` (non-blocking), makes sure no live hub answers on *path*, removes a
    stale socket file, binds, sets mode 0600 and only then listens. The epoch of the new hub's ids
    is kept strictly increasing in the lock file.
    """
    secure_directory(path)
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
            return None
        raise
    try:
        if _socket_is_live(path):
            os.close(lock_fd)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(backlog)
            sock.setblocking(False)
            epoch_ms = _next_epoch(lock_fd)
        except BaseException:
            sock.close()
            raise
        return _Claim(path, sock, lock_fd, epoch_ms)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(lock_fd)
        raise


def _next_epoch(lock_fd: int) -> int:
    """An epoch (ms) later than the last hub's on this path, recorded for the next one."""
    os.lseek(lock_fd, 0, os.SEEK_SET)
    raw = os.read(lock_fd, 64)
    try:
        last = int(raw.decode("ascii").strip() or 0)
    except ValueError:
        last = 0
    epoch = max(int(time.time() * 1000), last + 1)
    os.ftruncate(lock_fd, 0)
    os.lseek(lock_fd, 0, os.SEEK_SET)
    os.write(lock_fd, b"%d\n" % epoch)
    return epoch


# ---------------------------------------------------------------------- the hub


class _Peer(asyncio.Protocol):
    """One process connected to the hub."""

    def __init__(self, hub: BridgeHub) -> None:
        self.hub = hub
        self.decoder = FrameDecoder(HUB_BOUND, max_frame_size=hub.max_frame_size)
        self.channels: set[str] = set()
        self.out: list[bytes] = []
        #: bytes in ``out``
        self.queued = 0
        self.transport: asyncio.Transport | None = None
        self.pid = 0
        self.closed = False
        #: this peer's streams per channel, and per identity (its absolute counts)
        self.presence: dict[str, tuple[int, dict[str, int]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        try:
            credentials = peer_credentials(transport.get_extra_info("socket"))
            check_peer(credentials)
        except (BridgePermissionError, OSError) as exc:
            log.warning("bridge hub: refusing peer: %s", exc)
            self.closed = True
            transport.abort()
            return
        self.pid = credentials[0] if credentials is not None else 0
        high = max(self.hub.max_peer_buffer // 4, 1 << 16)
        transport.set_write_buffer_limits(high=high)
        self.hub._add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        hub = self.hub
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            hub.drop(self, f"bad frame: {exc}")
            return
        try:
            hub._handle(self, frames)
        except (FrameError, InvalidChannelError, InvalidEventError, InvalidArgumentError) as exc:
            hub.drop(self, f"bad request: {exc}")
        except Exception:
            log.exception("bridge hub: error handling peer pid=%s; dropping it", self.pid)
            hub.drop(self, "internal error")
        hub._flush()

    def eof_received(self) -> bool:
        try:
            self.decoder.close()
        except FrameError as exc:
            if not self.closed:
                log.warning("bridge hub: peer pid=%s: %s", self.pid, exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.hub._forget(self)

    def pause_writing(self) -> None:
        # The peer is not reading what we send: stop taking its requests until it does.
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def send(self, data: bytes) -> None:
        if not self.closed:
            if not self.out:
                self.hub._dirty.append(self)
            self.out.append(data)
            self.queued += len(data)

    @property
    def pending(self) -> int:
        """Bytes sent to this peer that it has not read yet (queued here or in the transport)."""
        transport = self.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self.queued + buffered


class BridgeHub:
    """The hub of a bridge: ids, history, and routing of events to the peers that follow them.

    Usually started by a `BridgeBroker` that finds no hub (see the module docstring); run one on
    its own with ``python -m tornado_sse.broker.bridge PATH`` or::

        hub = BridgeHub(path)
        await hub.start()      # raises BrokerUnavailableError if a live hub has the socket

    :param history_size: events retained per channel.
    :param max_frame_size: largest frame accepted from a peer (bytes).
    :param max_peer_buffer: pending output (bytes) after which a peer that does not read is
        dropped.
    :param max_channels_per_peer: channels one peer may follow.
    :param max_channels: channels whose history is kept (see `.History`): past it the channel
        published to least recently is forgotten, and resumes on it get ``stream-reset``.
    """

    def __init__(
        self,
        path: str,
        *,
        history_size: int = 1000,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_peer_buffer: int = DEFAULT_MAX_PEER_BUFFER,
        max_channels_per_peer: int = 1_000_000,
        max_channels: int = 10_000,
    ) -> None:
        if history_size < 0:
            raise ValueError("history_size must not be negative")
        self.path = path
        self.history_size = history_size
        self.max_frame_size = max_frame_size
        self.max_peer_buffer = max_peer_buffer
        self.max_channels_per_peer = max_channels_per_peer
        self.ids = IdSequence()
        self.history: History[list[Any]] = History(history_size, max_channels)
        self.peers: set[_Peer] = set()
        #: peers dropped for misbehaving (for tests and metrics)
        self.dropped = 0
        self.closed = False
        self._followers: dict[str, dict[_Peer, None]] = {}
        #: per channel, the peers that have streams of it (their counts are in `_Peer.presence`)
        self._present: dict[str, dict[_Peer, None]] = {}
        #: per channel with join/leave events: the identities announced as present, and the
        #: grace period its processes asked for
        self._announced: dict[str, set[str]] = {}
        self._graces: dict[str, float] = {}
        self._dirty: list[_Peer] = []
        self._queries: dict[int, _MetricsQuery] = {}
        self._next_qid = 0
        self._claim: _Claim | None = None
        self._server: asyncio.AbstractServer | None = None
        self._pid = os.getpid()

    async def start(self) -> None:
        """Claim the socket and serve.

        :raises BrokerUnavailableError: if another hub holds the socket.
        :raises BridgePermissionError: if the socket's directory is not private.
        """
        claim = claim_socket(self.path)
        if claim is None:
            raise BrokerUnavailableError(f"another bridge hub serves {self.path}")
        await self._serve(claim)

    async def _serve(self, claim: _Claim) -> None:
        self._claim = claim
        self.ids = IdSequence(claim.epoch_ms)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_unix_server(lambda: _Peer(self), sock=claim.sock)
        except BaseException:
            claim.release()
            self._claim = None
            raise
        _live_hubs.add(self)
        log.info("bridge hub serving %s (pid %d, ids %s-*)", self.path, os.getpid(), self.ids.epoch)

    async def close(self) -> None:
        """Stop serving: drop every peer, remove the socket file, release the lock. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _live_hubs.discard(self)
        if self._server is not None:
            self._server.close()
        goodbye = pack(CLOSING)
        for peer in list(self.peers):
            peer.closed = True
            transport = peer.transport
            if transport is None:
                continue
            if transport.get_write_buffer_size() < self.max_peer_buffer // 4:
                # Tell the peer this is a deliberate stop, not a crash (it logs no alarm), and
                # let what is already queued for it go out first.
                transport.write(goodbye)
                transport.close()
            else:
                transport.abort()
        self.peers.clear()
        self._followers.clear()
        for query in self._queries.values():
            if query.timer is not None:
                query.timer.cancel()
        self._queries.clear()
        if self._claim is not None:
            self._claim.release()
            self._claim = None
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def _forked(self) -> None:
        """In a child of the hub's process: let go of every inherited socket and the lock.

        Otherwise the child would keep the lock (flock belongs to the open file), the listening
        socket and the peers' connections alive after the hub's process dies, and no peer would
        notice the death or be able to take over.
        """
        if self._claim is not None:
            self._claim.sock.close()
            if self._claim.lock_fd >= 0:
                os.close(self._claim.lock_fd)  # the parent's copy keeps the lock
                self._claim.lock_fd = -1
            self._claim = None
        for peer in self.peers:
            if peer.transport is not None:
                _let_go(peer.transport)
        self.closed = True

    # ------------------------------------------------------------------ introspection

    @property
    def peer_count(self) -> int:
        """Connected peers (processes)."""
        return len(self.peers)

    def followers(self, channel: str) -> int:
        """How many peers follow *channel*."""
        return len(self._followers.get(channel, ()))

    # ------------------------------------------------------------------ peers

    def _add(self, peer: _Peer) -> None:
        self.peers.add(peer)
        peer.send(
            pack(
                WELCOME,
                f"{self.ids.epoch}-0",
                self.ids.current,
                os.getpid(),
                self.max_frame_size,
            )
        )
        self._flush()
        log.info("bridge hub: peer pid=%d connected (%d peers)", peer.pid, len(self.peers))

    def _forget(self, peer: _Peer) -> None:
        if peer not in self.peers:
            return
        self.peers.discard(peer)
        followers = self._followers
        for channel in peer.channels:
            members = followers.get(channel)
            if members is not None:
                members.pop(peer, None)
                if not members:
                    del followers[channel]
        peer.channels.clear()
        peer.out.clear()
        peer.queued = 0
        present = self._present
        loop = asyncio.get_running_loop() if not self.closed else None
        for channel, (_, identities) in peer.presence.items():
            peers = present.get(channel)
            if peers is not None:
                peers.pop(peer, None)
                if not peers:
                    del present[channel]
            announced = self._announced.get(channel)
            if announced and loop is not None:
                # its users leave after the grace period, unless they are back (a reconnect)
                for identity in identities:
                    if identity in announced:
                        loop.call_later(
                            self._graces.get(channel, 3.0), self._decide, channel, identity
                        )
        peer.presence.clear()
        for qid, query in list(self._queries.items()):
            query.pending.pop(peer, None)
            if not query.pending:
                self._answer_metrics(qid)
        if not self.closed:
            log.info("bridge hub: peer pid=%d gone (%d peers)", peer.pid, len(self.peers))

    def drop(self, peer: _Peer, reason: str) -> None:
        """Disconnect a misbehaving peer, with a log line; everybody else goes on."""
        if peer.closed:
            return
        log.warning("bridge hub: dropping peer pid=%d: %s", peer.pid, reason)
        self.dropped += 1
        peer.closed = True
        self._forget(peer)
        if peer.transport is not None:
            peer.transport.abort()

    def _flush(self) -> None:
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        limit = self.max_peer_buffer
        for peer in dirty:
            out = peer.out
            peer.queued = 0
            if peer.closed or not out:
                out.clear()
                continue
            peer.out = []
            transport = peer.transport
            assert transport is not None
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            pending = transport.get_write_buffer_size()
            if pending > limit:
                self.drop(peer, f"not reading: {pending} bytes pending")

    # ------------------------------------------------------------------ requests

    def _handle(self, peer: _Peer, frames: list[list[Any]]) -> None:
        # A burst of requests (one read may hold thousands) is answered one at a time, and a peer
        # whose answers pile up past max_peer_buffer is dropped right there, not after all of them
        # were queued: a worker that asks for history and never reads costs the hub that much.
        limit = self.max_peer_buffer
        for frame in frames:
            if peer.closed:
                return
            pending = peer.pending
            if pending > limit:
                self.drop(peer, f"not reading: {pending} bytes pending")
                return
            kind = frame[1]
            if kind == PUBLISH:
                self._publish(peer, frame)
            elif kind == SUBSCRIBE:
                self._subscribe(peer, frame[2], frame[3])
            elif kind == UNSUBSCRIBE:
                self._unsubscribe(peer, frame[2])
            elif kind == METRICS:
                self._collect_metrics(peer, frame[2])
            elif kind == METRICS_REPLY:
                self._metrics_reply(peer, frame[2], frame[3])
            elif kind == TAIL:
                self._tail(peer, frame[2], frame[3], frame[4])
            elif kind == PRESENCE:
                self._set_presence(peer, frame[2], frame[3])
            elif kind == PRESENCE_ASK:
                self._ask_presence(peer, frame[2], frame[3])
            elif kind == ANNOUNCE:
                self._announce(peer, frame[2], frame[3], frame[4], frame[5])
            else:
                assert kind == HISTORY
                self._history(peer, frame[2], frame[3], frame[4], frame[5])

    def _publish(self, peer: _Peer, frame: list[Any]) -> None:
        _, _, rid, channel, data, name, retry, published_at = frame
        validate_channel(channel)
        event_id = self._emit(channel, data, name, retry, float(published_at))
        peer.send(pack(PUBLISHED, rid, event_id))

    def _emit(
        self, channel: str, data: str | None, name: str | None, retry: int | None, at: float
    ) -> str:
        """Give an event its id, keep it in history and send it to the channel's followers."""
        event_id = self.ids.next()
        encoded = encode_event(Event(data=data, event=name, id=event_id, retry=retry))
        item = [channel, event_id, encoded, at]
        self.history.append(channel, self.ids.seq, item)
        followers = self._followers.get(channel)
        if followers:
            message = pack(EVENT, *item)
            for follower in followers:
                follower.send(message)
        return event_id

    def _subscribe(self, peer: _Peer, rid: int, channels: list[str]) -> None:
        for channel in channels:
            validate_channel(channel)
        if len(peer.channels) + len(channels) > self.max_channels_per_peer:
            self.drop(peer, f"follows more than {self.max_channels_per_peer} channels")
            return
        followers = self._followers
        for channel in channels:
            members = followers.get(channel)
            if members is None:
                members = followers[channel] = {}
            members[peer] = None
            peer.channels.add(channel)
        peer.send(pack(SUBSCRIBED, rid, self.ids.current))

    def _unsubscribe(self, peer: _Peer, channels: list[str]) -> None:
        followers = self._followers
        for channel in channels:
            if channel in peer.channels:
                peer.channels.discard(channel)
                members = followers.get(channel)
                if members is not None:
                    members.pop(peer, None)
                    if not members:
                        del followers[channel]

    def _collect_metrics(self, peer: _Peer, rid: int) -> None:
        """Ask every peer (the asker included) for its metric samples; answer the asker with
        the replies once all have answered, or after `METRICS_TIMEOUT` with those that did."""
        if len(self._queries) >= MAX_METRICS_QUERIES:
            peer.send(pack(METRICS_RESULT, rid, []))
            return
        self._next_qid += 1
        qid = self._next_qid
        pending = {member: None for member in self.peers if not member.closed}
        query = _MetricsQuery(peer, rid, pending)
        self._queries[qid] = query
        message = pack(METRICS_QUERY, qid)
        for member in pending:
            member.send(message)
        query.timer = asyncio.get_running_loop().call_later(
            METRICS_TIMEOUT, self._answer_metrics, qid
        )

    def _metrics_reply(self, peer: _Peer, qid: int, samples: list[list[Any]]) -> None:
        query = self._queries.get(qid)
        if query is None or peer not in query.pending:
            return  # too late, or not asked
        del query.pending[peer]
        query.replies.append(samples)
        if not query.pending:
            self._answer_metrics(qid)

    def _answer_metrics(self, qid: int) -> None:
        query = self._queries.pop(qid, None)
        if query is None:
            return
        if query.timer is not None:
            query.timer.cancel()
        if query.pending and not self.closed:
            log.info(
                "bridge hub: %d of %d processes did not send their metrics in time",
                len(query.pending),
                len(query.pending) + len(query.replies),
            )
        asker = query.asker
        if not asker.closed:
            budget = self.max_frame_size * EXPANSION
            replies: list[list[list[Any]]] = []
            size = 0
            for samples in query.replies:  # a reply is a few kB; the frame stays bounded
                size += 64 + sum(len(item[0]) + len(item[1]) + 16 for item in samples)
                if size > budget:
                    break
                replies.append(samples)
            asker.send(pack(METRICS_RESULT, query.rid, replies))
        self._flush()

    def _set_presence(self, peer: _Peer, rid: int, entries: list[list[Any]]) -> None:
        for channel, _, identities in entries:
            validate_channel(channel)
            for identity, _ in identities:
                validate_identity(identity)
        present = self._present
        for channel, count, identities in entries:
            if count:
                peer.presence[channel] = (count, dict(identities))
                present.setdefault(channel, {})[peer] = None
            elif peer.presence.pop(channel, None) is not None:
                peers = present.get(channel)
                if peers is not None:
                    peers.pop(peer, None)
                    if not peers:
                        del present[channel]
        peer.send(pack(PRESENCE_TAKEN, rid))

    def _announce(self, peer: _Peer, rid: int, channel: str, identity: str, grace: float) -> None:
        validate_channel(channel)
        validate_channel(companion(channel))
        validate_identity(identity)
        validate_grace(grace)
        self._graces[channel] = min(float(grace), 3600.0)
        self._decide(channel, identity)
        peer.send(pack(ANNOUNCED, rid))
        self._flush()

    def _decide(self, channel: str, identity: str) -> None:
        """Publish join (leave) of *identity* on *channel*'s companion channel if some (no)
        process has a stream of it and that was not announced yet (the one place per bridge
        where this is decided)."""
        if self.closed:
            return
        present = any(
            identity in member.presence[channel][1] for member in self._present.get(channel, ())
        )
        if not record_announcement(self._announced, channel, identity, present):
            return
        self._emit(
            companion(channel),
            presence_event_data(channel, identity),
            "join" if present else "leave",
            None,
            time.time(),
        )
        self._flush()

    def _ask_presence(self, peer: _Peer, rid: int, channel: str) -> None:
        validate_channel(channel)
        found = self.presence(channel)
        users = [[identity, count] for identity, count in found.users.items()]
        peer.send(pack(PRESENCE_ANSWER, rid, found.subscribers, users, sorted(found.announced)))

    def presence(self, channel: str) -> Presence:
        """Who follows *channel* in every process connected to this hub, and who this hub
        announced present on it."""
        return merge_presence(
            channel,
            [member.presence[channel] for member in self._present.get(channel, ())],
            self._announced.get(channel, ()),
        )

    def _tail(self, peer: _Peer, rid: int, channels: list[str], count: int) -> None:
        for channel in channels:
            validate_channel(channel)
        seq = self.history.tail(channels, count) if channels else self.ids.seq
        peer.send(pack(TAIL_START, rid, f"{self.ids.epoch}-{seq}"))

    def _history(self, peer: _Peer, rid: int, channels: list[str], after: str, limit: int) -> None:
        """Answer one page: at most *limit* events after *after*, cut before the page passes
        ``max_frame_size`` bytes (at least one event), or GAP if any is gone (see top)."""
        for channel in channels:
            validate_channel(channel)
        seq = self.ids.key(after)
        found = None if seq is None else self.history.page(channels, seq, min(limit, MAX_ARRAY_LEN))
        if found is None:
            peer.send(pack(GAP, rid, self.ids.current))
            return
        entries, more = found
        budget = self.max_frame_size
        page: list[list[Any]] = []
        size = 0
        for _, item in entries:
            size += _item_size(*item[:3])
            if page and size > budget:
                more = True
                break
            page.append(item)
        peer.send(pack(HISTORY_PAGE, rid, page, more))


def _item_size(channel: str, event_id: str, data: bytes) -> int:
    """Bytes of a history item in a HISTORY_PAGE frame, at most (msgpack's headers included;
    channel names and ids are ASCII)."""
    return len(channel) + len(event_id) + len(data) + 24


#: seconds the hub waits for the processes' metrics before answering with those it has
METRICS_TIMEOUT = 1.0
#: metrics collections in progress at once at most (more are answered with no replies)
MAX_METRICS_QUERIES = 64


class _MetricsQuery:
    """A collection of every process's metrics, in progress at the hub."""

    __slots__ = ("asker", "pending", "replies", "rid", "timer")

    def __init__(self, asker: _Peer, rid: int, pending: dict[_Peer, None]) -> None:
        self.asker = asker
        self.rid = rid
        self.pending = pending
        self.replies: list[list[list[Any]]] = []
        self.timer: asyncio.TimerHandle | None = None


_live_hubs: weakref.WeakSet[BridgeHub] = weakref.WeakSet()
_live_brokers: weakref.WeakSet[BridgeBroker] = weakref.WeakSet()


def _let_go(transport: asyncio.BaseTransport) -> None:
    """In a forked child: point an inherited socket's descriptor at /dev/null.

    The connection then lives on in the parent only, and the child's (unusable) copy of the
    socket object may still close its descriptor later without closing anything else.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    fd = sock.fileno()
    if fd < 0:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


def _after_fork_in_child() -> None:
    for hub in list(_live_hubs):
        hub._forked()
    _live_hubs.clear()
    for broker in list(_live_brokers):
        broker._forked_away = True
        conn = broker._conn
        if conn is not None and conn.transport is not None:
            _let_go(conn.transport)


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------- a process's connection


#: the answers each request kind may get
_ANSWERS = {
    PUBLISH: frozenset({PUBLISHED}),
    SUBSCRIBE: frozenset({SUBSCRIBED}),
    HISTORY: frozenset({HISTORY_PAGE, GAP}),
    METRICS: frozenset({METRICS_RESULT}),
    TAIL: frozenset({TAIL_START}),
    PRESENCE: frozenset({PRESENCE_TAKEN}),
    ANNOUNCE: frozenset({ANNOUNCED}),
    PRESENCE_ASK: frozenset({PRESENCE_ANSWER}),
}


class _Request:
    __slots__ = ("answers", "future", "sent_at")

    def __init__(
        self, future: asyncio.Future[Any], answers: frozenset[int], sent_at: float
    ) -> None:
        self.future = future
        self.answers = answers
        self.sent_at = sent_at


class _HubConnection(asyncio.Protocol):
    """This process's connection to the hub."""

    def __init__(self, broker: BridgeBroker) -> None:
        self.broker = broker
        self.decoder = FrameDecoder(
            PEER_BOUND, max_frame_size=broker.max_frame_size * EXPANSION + 4096
        )
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.welcome: asyncio.Future[list[Any]] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, _Request] = {}
        self.out: list[bytes] = []
        self.epoch_start = ""
        self.hub_pid = 0
        self.max_frame_size = broker.max_frame_size
        self.closed = False
        #: the hub said it is closing on purpose (CLOSING) before the connection ended
        self.hub_closing = False
        self._next_rid = 0
        self._drained: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            log.error("bridge: the hub sent a bad frame (%s); reconnecting", exc)
            self.abort()
            return
        broker = self.broker
        for frame in frames:
            kind = frame[1]
            if kind == EVENT:
                _, _, channel, event_id, encoded, published_at = frame
                broker._position = event_id
                item = Frame(channel, event_id, encoded, published_at)
                buffer = broker._resync_buffer
                if buffer is not None:
                    buffer.append(item)
                else:
                    broker._deliver(item)
            elif kind == WELCOME:
                if not self.welcome.done():
                    self.welcome.set_result(frame)
            elif kind == CLOSING:
                self.hub_closing = True
            elif kind == METRICS_QUERY:
                self.send(pack(METRICS_REPLY, frame[2], broker._metric_samples()))
            else:
                self._answer(kind, frame)
            if self.closed:
                return

    def _answer(self, kind: int, frame: list[Any]) -> None:
        rid = frame[2]
        request = self.requests.get(rid)
        if request is None or kind not in request.answers:
            log.error("bridge: the hub answered a request it was not asked; reconnecting")
            self.abort()
            return
        del self.requests[rid]
        future = request.future
        if kind == METRICS_RESULT or kind == TAIL_START:
            if not future.done():
                future.set_result(frame[3])
            return
        if kind == PRESENCE_TAKEN or kind == PRESENCE_ANSWER or kind == ANNOUNCED:
            if not future.done():
                future.set_result(frame[3:])
            return
        if kind == HISTORY_PAGE:
            result: Any = (frame[3], frame[4])
        else:
            # PUBLISHED (id), SUBSCRIBED (position), GAP (current id): all are positions in the
            # hub's order, and every event of our channels before them has reached us already.
            self.broker._position = frame[3]
            result = frame[3] if kind != GAP else HistoryGapError(frame[3])
        if not future.done():
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def eof_received(self) -> bool:
        with contextlib.suppress(FrameError):
            self.decoder.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = BrokerUnavailableError("lost the connection to the bridge hub")
        requests, self.requests = self.requests, {}
        for request in requests.values():
            if not request.future.done():
                request.future.set_exception(error)
                request.future.exception()  # retrieved: nobody may be waiting any more
        if not self.welcome.done():
            self.welcome.set_exception(error)
            self.welcome.exception()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # sending

    async def drain(self) -> None:
        """Wait while the socket's buffer is above its high-water mark (flow control)."""
        drained = self._drained
        if drained is not None and not drained.done():
            await drained

    def send(self, data: bytes) -> None:
        if self.closed:
            raise BrokerUnavailableError("lost the connection to the bridge hub")
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(data)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if out and not self.closed and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def request(self, kind: int, *fields: Any) -> asyncio.Future[Any]:
        """Send a request frame (its rid is filled in) and return the future of its answer."""
        self._next_rid += 1
        rid = self._next_rid
        self.send(pack(kind, rid, *fields))
        future: asyncio.Future[Any] = self.loop.create_future()
        self.requests[rid] = _Request(future, _ANSWERS[kind], self.loop.time())
        return future

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _chunks(channels: Sequence[str], size: int = MAX_ARRAY_LEN // 2) -> list[Sequence[str]]:
    return [channels[start : start + size] for start in range(0, len(channels), size)] or [[]]


_BASE36 = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")


def _parse_id(event_id: str) -> tuple[int, int] | None:
    """``(epoch, seq)`` of a well-formed hub id ``<epoch base 36>-<seq>``, else ``None``."""
    epoch, sep, seq = event_id.partition("-")
    if not sep or not 0 < len(epoch) <= 13 or not 0 < len(seq) <= 20:
        return None
    if not _BASE36.issuperset(epoch) or not seq.isascii() or not seq.isdigit():
        return None
    return int(epoch, 36), int(seq)


class BridgeBroker(Broker):
    """A broker shared by the processes of one host through a unix socket (see the module doc).

    Create one in every process (after forking), on the same *path*::

        broker = BridgeBroker("/run/user/1000/myapp/hub.sock")
        app = tornado.web.Application([...], sse_broker=broker)

    :param path: the hub's socket; its directory must be private (0700) or creatable.
        Default: `default_socket_path()`.
    :param history_size: events the hub keeps per channel, when this process runs the hub.
    :param takeover: run the hub in this process when none is running (default ``True``); with
        ``False`` the broker only connects and waits for a hub started elsewhere.
    :param connect_timeout: seconds :meth:`start` waits for a hub before raising
        `.BrokerUnavailableError`.
    :param max_frame_size: largest frame the hub accepts, in bytes (when this process runs it);
        a larger event (channel, data and event name, plus `.PUBLISH_OVERHEAD`) is refused
        with `.EventTooLargeError` (an `.InvalidEventError`) before it is sent.
    :param max_peer_buffer: see `BridgeHub` (when this process runs it); half of it is also
        the most history this process reads whole (catching up after a reconnect) before it
        gives up with ``stream-reset``.
    :param max_channels: see `BridgeHub` (when this process runs it).
    :param request_timeout: seconds to wait for the hub's answer to a publish, subscription or
        history request before raising `.BrokerUnavailableError` (a hub that is alive but stuck).
    :param reconnect_delay: first delay (seconds) before reconnecting; doubles per failed
        attempt up to *max_reconnect_delay*, each jittered by ±50%.
    :param presence: count subscriptions for `presence` (default ``True``; see `.Broker`).
    """

    shares_presence = True

    def __init__(
        self,
        path: str | None = None,
        *,
        history_size: int = 1000,
        takeover: bool = True,
        connect_timeout: float = 10.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_peer_buffer: int = DEFAULT_MAX_PEER_BUFFER,
        max_channels: int = 10_000,
        request_timeout: float = 10.0,
        reconnect_delay: float = 0.05,
        max_reconnect_delay: float = 2.0,
        presence: bool = True,
    ) -> None:
        super().__init__(history_size=history_size, presence=presence)
        self.path = os.path.abspath(path if path is not None else default_socket_path())
        if len(os.fsencode(self.path)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"socket path too long for a unix socket ({_MAX_SOCKET_PATH} bytes at most):"
                f" {self.path}"
            )
        self.takeover = takeover
        self.connect_timeout = connect_timeout
        self.max_frame_size = max_frame_size
        self.max_peer_buffer = max_peer_buffer
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.max_channels = max_channels
        self.request_timeout = request_timeout
        #: the hub, while this process runs it
        self.hub: BridgeHub | None = None
        #: connections made to a hub (the first one included)
        self.connects = 0
        #: reconnections after which local streams were sent ``stream-reset``
        self.resets = 0
        self._conn: _HubConnection | None = None
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._position = ""
        self._resync_after: str | None = None
        self._resync_buffer: list[Frame] | None = None
        self._pid = os.getpid()
        self._forked_away = False
        self._hub_stopped = False  # the last hub we lost said it was stopping on purpose
        #: this process's metric samples (`.Metrics.samples`), sent when any process of the
        #: group collects them (`collect_metrics`); ``tornado-sse serve`` sets it
        self.metrics_source: Callable[[], list[list[Any]]] | None = None

    # ------------------------------------------------------------------ state

    @property
    def healthy(self) -> bool:
        """Connected to a hub, and following our channels on it, right now."""
        conn = self._conn
        ready = self._ready
        return (
            not self.closed
            and conn is not None
            and not conn.closed
            and ready is not None
            and ready.is_set()
        )

    @property
    def hub_pid(self) -> int | None:
        """The pid of the process running the hub we are connected to."""
        conn = self._conn
        return conn.hub_pid if conn is not None and not conn.closed else None

    def id_key(self, event_id: str) -> tuple[int, int] | None:
        """``(epoch, seq)`` of a hub id: ids of a later hub sort after those of an earlier one."""
        return _parse_id(event_id)

    def _connection(self) -> _HubConnection:
        if self._forked_away:
            raise RuntimeError(
                "this BridgeBroker was started in the parent process: create brokers after fork"
            )
        conn = self._conn
        if conn is None or conn.closed:
            if self.closed:
                raise BrokerClosedError("broker is closed")
            raise BrokerUnavailableError(f"no bridge hub at {self.path} right now (reconnecting)")
        return conn

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        secure_directory(self.path)
        _live_brokers.add(self)
        self._ready = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())
        self._watchdog = asyncio.ensure_future(self._watch())
        try:
            await asyncio.wait_for(self._ready.wait(), self.connect_timeout)
        except asyncio.TimeoutError:
            self._task.cancel()
            self._task = None
            self._watchdog.cancel()
            self._watchdog = None
            raise BrokerUnavailableError(
                f"no bridge hub answered at {self.path} within {self.connect_timeout}s"
            ) from None

    async def _close(self) -> None:
        _live_brokers.discard(self)
        for task in (self._task, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._task = self._watchdog = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        hub, self.hub = self.hub, None
        if hub is not None:
            await hub.close()

    async def _watch(self) -> None:
        """Fail requests the hub has not answered within ``request_timeout`` (a stuck hub).

        One sweep every quarter of the timeout (at most every second) rather than a timer per
        request: the hub answers in order, so only the oldest requests need looking at.
        """
        loop = asyncio.get_running_loop()
        while not self.closed:
            await asyncio.sleep(min(1.0, self.request_timeout / 4))
            conn = self._conn
            if conn is None or conn.closed:
                continue
            deadline = loop.time() - self.request_timeout
            for request in list(conn.requests.values()):
                if request.sent_at > deadline:
                    break
                future = request.future
                if not future.done():
                    future.set_exception(
                        BrokerUnavailableError(
                            f"the bridge hub did not answer within {self.request_timeout}s"
                        )
                    )
                    future.exception()  # retrieved: its waiter may be gone

    async def _run(self) -> None:
        """Keep a connection to a hub, taking over when there is none, until closed."""
        while not self.closed:
            try:
                await self._keep_connected()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("bridge: unexpected error; reconnecting")
                conn = self._conn
                if conn is not None:
                    conn.abort()
                await asyncio.sleep(self.max_reconnect_delay)

    async def _keep_connected(self) -> None:
        attempt = 0
        while not self.closed:
            try:
                conn = await self._connect()
            except (OSError, BrokerError, asyncio.TimeoutError) as exc:
                refused = isinstance(exc, (ConnectionRefusedError, FileNotFoundError))
                if refused and self.takeover and self.hub is None:
                    try:
                        if await self._take_over():
                            continue
                    except OSError as claim_error:
                        log.error("bridge: cannot run the hub at %s: %s", self.path, claim_error)
                level = logging.WARNING if attempt == 3 else logging.DEBUG
                log.log(level, "bridge: no hub at %s yet: %s", self.path, exc)
                delay = min(self.max_reconnect_delay, self.reconnect_delay * 2**attempt)
                attempt += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                continue
            attempt = 0
            try:
                await self._resync(conn)
            except BrokerError as exc:
                log.warning("bridge: lost the hub while following channels again: %s", exc)
                conn.abort()
                continue
            assert self._ready is not None
            self._ready.set()
            await conn.lost
            self._ready.clear()
            if self._conn is conn:
                self._conn = None
            if self.closed:
                return
            self._hub_stopped = conn.hub_closing
            if conn.hub_closing:
                # Its process is stopping (a restart, or the whole group stopping): routine.
                log.info("bridge: the hub at %s stopped; connecting to the next one", self.path)
            else:
                log.warning("bridge: lost the hub at %s; reconnecting", self.path)
            # Spread the reconnects of every process of the group.
            await asyncio.sleep(random.uniform(0.0, self.reconnect_delay))

    async def _take_over(self) -> bool:
        claim = claim_socket(self.path)
        if claim is None:
            return False
        hub = BridgeHub(
            self.path,
            history_size=self.history_size,
            max_frame_size=self.max_frame_size,
            max_peer_buffer=self.max_peer_buffer,
            max_channels=self.max_channels,
        )
        await hub._serve(claim)
        if self.closed:
            await hub.close()
            return False
        self.hub = hub
        log.log(
            logging.WARNING if self.connects and not self._hub_stopped else logging.INFO,
            "bridge: this process (pid %d) now runs the hub at %s",
            os.getpid(),
            self.path,
        )
        return True

    async def _connect(self) -> _HubConnection:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self.path)
            check_peer(peer_credentials(sock))
            _, conn = await loop.create_unix_connection(lambda: _HubConnection(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            welcome = await asyncio.wait_for(conn.welcome, self.connect_timeout)
        except BaseException:
            conn.abort()
            raise
        conn.epoch_start = welcome[2]
        conn.hub_pid = welcome[4]
        conn.max_frame_size = welcome[5]
        if conn.max_frame_size * EXPANSION > conn.decoder.max_frame_size:
            log.warning(
                "bridge: the hub accepts frames of %d bytes, more than this process does (%d):"
                " give every process of the group the same max_frame_size",
                conn.max_frame_size,
                self.max_frame_size,
            )
        self.connects += 1
        return conn

    async def _resync(self, conn: _HubConnection) -> None:
        """Make *conn* the connection, follow our channels again and fill the gap (see top)."""
        # If an earlier resync failed half-way, the gap still starts where it started then.
        after = self._resync_after if self._resync_after is not None else self._position
        self._resync_after = after
        if self._follow_lock is None:
            self._follow_lock = asyncio.Lock()
        async with self._follow_lock:
            self._conn = conn
            channels = list(self._subscriptions)
            if not channels:
                self._resync_after = None
                return
            self._resync_buffer = []
            try:
                await self._subscribe_on(conn, channels)
                # A new connection is a new table at the hub: write all of ours again.
                await self._share_presence_on(conn, self.presence_table.channels())
                reset_id: str | None = None
                try:
                    found = await self._history_on(conn, channels, after)
                except HistoryGapError:
                    try:
                        found = await self._history_on(conn, channels, conn.epoch_start)
                        reset_id = conn.epoch_start
                    except HistoryGapError as gap:
                        found = []
                        reset_id = gap.current_id
                buffered = self._resync_buffer
            finally:
                self._resync_buffer = None
            self._resync_after = None
            self._replay_after_reconnect(found + buffered, reset_id)
        # a new hub knows nobody as announced (the marks died with the old one); the same hub,
        # reached again, finds them announced and sends nothing
        self._announce_again()

    def _replay_after_reconnect(self, frames: list[Frame], reset_id: str | None) -> None:
        floor = None
        if reset_id is not None:
            self.resets += 1
            log.warning(
                "bridge: events may have been lost with the old hub: sending stream-reset (%s)",
                reset_id,
            )
            floor = _parse_id(reset_id)
            reset = Frame(
                "",
                reset_id,
                encode_event(
                    Event(
                        data=json.dumps({"id": reset_id, "reason": "reconnect"}),
                        event="stream-reset",
                        id=reset_id,
                    )
                ),
                0.0,
            )
            seen: set[Subscription] = set()
            for subs in list(self._subscriptions.values()):
                for sub in tuple(subs):  # a subscriber may close (and unsubscribe) as we go
                    if sub not in seen and not sub.closed:
                        seen.add(sub)
                        sub._deliver(reset)
        keyed = sorted(((_parse_id(f.id) or (0, 0), f) for f in frames), key=lambda kf: kf[0])
        last = None
        for key, frame in keyed:
            if key == last or (floor is not None and key <= floor):
                continue
            last = key
            self._deliver(frame)

    # ------------------------------------------------------------------ backend hooks

    async def _publish(self, channel: str, event: Event) -> str:
        conn = self._connection()
        data, name, limit = event.data, event.event, conn.max_frame_size
        # The hub drops a peer that sends a frame over its limit: refuse such an event here.
        if (len(data or "") + len(name or "")) * 4 + len(channel) + PUBLISH_OVERHEAD > limit:
            size = publish_size(channel, data, name)
            if size > limit:
                raise EventTooLargeError(
                    f"event of {size} bytes is larger than the bridge between processes"
                    f" carries (max_frame_size: {limit} bytes)",
                    size=size,
                    limit=limit,
                )
        await conn.drain()
        future = conn.request(PUBLISH, channel, data, event.event, event.retry, time.time())
        result: str = await future
        return result

    async def _follow(self, channels: Sequence[str]) -> str:
        conn = self._connection()
        if channels:
            return await self._subscribe_on(conn, channels)
        # Already followed: every event of those channels up to our position has reached us.
        return self._position

    async def _subscribe_on(self, conn: _HubConnection, channels: Sequence[str]) -> str:
        futures = [conn.request(SUBSCRIBE, list(chunk)) for chunk in _chunks(channels)]
        positions = await asyncio.gather(*futures)
        return str(positions[-1])

    async def collect_metrics(self) -> list[list[list[Any]]]:
        """The metric samples of every process of the group that answers within about a
        second (this one included), one list per process (see `.Metrics.samples`).

        :raises BrokerUnavailableError: when not connected to a hub.
        """
        answer = self._connection().request(METRICS)
        replies: list[list[list[Any]]] = await asyncio.wait_for(answer, METRICS_TIMEOUT + 2.0)
        return replies

    def _metric_samples(self) -> list[list[Any]]:
        source = self.metrics_source
        if source is None:
            return []
        try:
            return [list(sample) for sample in source()]
        except Exception:
            log.exception("bridge: error collecting this process's metrics")
            return []

    def collector(self) -> Any:
        """A ``prometheus_client`` collector for this broker's bridge (``serve`` registers it)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        broker = self

        class _Collector:
            def collect(self) -> Iterator[Any]:
                yield GaugeMetricFamily(
                    "tornado_sse_bridge_up",
                    "1 while connected to the bridge hub and following our channels on it",
                    value=1 if broker.healthy else 0,
                )
                yield CounterMetricFamily(
                    "tornado_sse_bridge_connects",
                    "Connections made to a bridge hub (the first one included)",
                    value=broker.connects,
                )
                yield CounterMetricFamily(
                    "tornado_sse_bridge_resets",
                    "Reconnections to a new hub after which local streams got stream-reset",
                    value=broker.resets,
                )
                hub = broker.hub
                yield GaugeMetricFamily(
                    "tornado_sse_bridge_hub",
                    "1 if this process runs the bridge hub",
                    value=0 if hub is None else 1,
                )
                if hub is not None:
                    yield GaugeMetricFamily(
                        "tornado_sse_bridge_hub_peers",
                        "Processes connected to the hub",
                        value=hub.peer_count,
                    )
                    yield CounterMetricFamily(
                        "tornado_sse_bridge_hub_peers_dropped",
                        "Peers the hub dropped for misbehaving",
                        value=hub.dropped,
                    )

        return _Collector()

    def history_sizes(self) -> dict[str, int]:
        """Events retained per channel, when this process runs the hub (else nothing)."""
        hub = self.hub
        return hub.history.sizes() if hub is not None else {}

    async def _unfollow(self, channels: Sequence[str]) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return  # the hub forgot us with the connection
        for chunk in _chunks(channels):
            conn.send(pack(UNSUBSCRIBE, list(chunk)))

    async def _share_presence(self, channels: Sequence[str]) -> None:
        await self._share_presence_on(self._connection(), channels)

    async def _share_presence_on(self, conn: _HubConnection, channels: Sequence[str]) -> None:
        table = self.presence_table
        entries: list[list[Any]] = []
        for channel in channels:
            count, identities = table.counts(channel)
            entries.append([channel, count, [[name, n] for name, n in identities.items()]])
        futures = []
        size = 0
        part: list[list[Any]] = []
        budget = conn.max_frame_size // 2
        for entry in entries:
            entry_size = 64 + len(entry[0]) + sum(len(pair[0]) + 16 for pair in entry[2])
            if part and (size + entry_size > budget or len(part) >= MAX_ARRAY_LEN // 2):
                futures.append(conn.request(PRESENCE, part))
                part, size = [], 0
            part.append(entry)
            size += entry_size
        if part:
            futures.append(conn.request(PRESENCE, part))
        await asyncio.gather(*futures)

    async def _announce(self, channel: str, identity: str, grace: float) -> None:
        await self._connection().request(ANNOUNCE, channel, identity, float(grace))

    async def _presence(self, channel: str) -> Presence:
        streams, users, announced = await self._connection().request(PRESENCE_ASK, channel)
        return Presence(
            channel, streams, {identity: count for identity, count in users}, frozenset(announced)
        )

    async def _tail(self, channels: Sequence[str], count: int) -> str:
        conn = self._connection()
        starts = await asyncio.gather(
            *(conn.request(TAIL, list(chunk), count) for chunk in _chunks(channels))
        )
        return str(max(starts, key=lambda start: _parse_id(start) or (0, 0)))

    async def _history(self, channels: Sequence[str], after: str) -> list[Frame]:
        return await self._history_on(self._connection(), channels, after)

    async def _history_page(
        self, channels: Sequence[str], after: str, limit: int, first: bool
    ) -> tuple[list[Frame], bool]:
        return await self._page_on(self._connection(), channels, after, limit)

    async def _history_on(
        self, conn: _HubConnection, channels: Sequence[str], after: str
    ) -> list[Frame]:
        """All of history after *after*, read page by page; past half of ``max_peer_buffer``
        bytes it is a gap, as the hub answered a whole read too large to buffer before pages."""
        found: list[Frame] = []
        size = 0
        while True:
            page, more = await self._page_on(conn, channels, after, HISTORY_PAGE_SIZE)
            found.extend(page)
            size += sum(_item_size(f.channel, f.id, f.data) for f in page)
            if size > self.max_peer_buffer // 2:
                log.info("bridge: history of more than %d bytes given up as a gap", size)
                raise HistoryGapError(self._position, "history too large to read whole")
            if not more:
                return found
            after = page[-1].id

    async def _page_on(
        self, conn: _HubConnection, channels: Sequence[str], after: str, limit: int
    ) -> tuple[list[Frame], bool]:
        """One page of history after *after* (HISTORY, one request per chunk of channels) and
        whether more follow. Chunks that have more end the page at the smallest last id among
        them, so that the next page, read after the page's last id, misses nothing."""
        limit = max(1, limit)
        futures = [conn.request(HISTORY, list(chunk), after, limit) for chunk in _chunks(channels)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        found: list[Frame] = []
        gap: HistoryGapError | None = None
        bound: tuple[int, int] | None = None
        for result in results:
            if isinstance(result, HistoryGapError):
                gap = result
            elif isinstance(result, BaseException):
                raise result
            else:
                items, more = result
                found.extend(Frame(c, i, d, p) for c, i, d, p in items)
                if more and items:
                    top = _parse_id(items[-1][1]) or (0, 0)
                    bound = top if bound is None else min(bound, top)
        if gap is not None:
            asked, first = _parse_id(after), _parse_id(conn.epoch_start)
            if asked is not None and first is not None and asked[0] < first[0]:
                # an id of an earlier hub: after the reset, what this hub published since it began
                gap.resume_id = conn.epoch_start
            raise gap
        if len(results) > 1:
            found.sort(key=lambda frame: _parse_id(frame.id) or (0, 0))
            if bound is not None:
                found = [frame for frame in found if (_parse_id(frame.id) or (0, 0)) <= bound]
        return found, bound is not None


# ---------------------------------------------------------------------- python -m


def main(argv: Iterable[str] | None = None) -> None:
    """Run a standalone hub: ``python -m tornado_sse.broker.bridge PATH [--history-size N]
    [--max-frame-size BYTES] [--max-channels N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m tornado_sse.broker.bridge", description=main.__doc__
    )
    parser.add_argument("path", nargs="?", default=default_socket_path())
    parser.add_argument("--history-size", type=int, default=1000)
    parser.add_argument("--max-frame-size", type=int, default=DEFAULT_MAX_FRAME_SIZE)
    parser.add_argument("--max-channels", type=int, default=10_000)
    args = parser.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def run() -> None:
        hub = BridgeHub(
            args.path,
            history_size=args.history_size,
            max_frame_size=args.max_frame_size,
            max_channels=args.max_channels,
        )
        await hub.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"bridge hub ready on {args.path} (protocol {VERSION})", flush=True)
        await stop.wait()
        await hub.close()

    try:
        asyncio.run(run())
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
