"""``GET /presence?channel=C``: who follows a channel on the whole hub (issue 14).

Answers ``{"channel": "C", "subscribers": N, "users": {"alice": 2, ...}, "announced": [...]}``
from `.Broker.presence`, so it counts every worker behind the bridge and every hub behind Redis;
``users`` is left out when no stream of the channel has an identity. ``announced`` (the users
joined and not left yet, ``announced`` of `.Presence`: what the join and leave events of
``presence:C`` say, a user within the grace period of a lost connection included) is there only
for a channel with join and leave events (``--presence``, the setting ``sse_presence``). Who may
ask is decided in `.hub.access` (`HubAccess.authorize_presence`): the master token, or a signed
token whose ``subscribe`` patterns cover the channel; whoever may follow a channel may follow
its join and leave events, so ``announced`` tells them nothing more.
"""

from __future__ import annotations

import json
from typing import Any

import tornado.web

from ..broker.base import Broker, validate_channel
from ..broker.presence import matches_any
from ..errors import AccessDeniedError, AuthenticationError, BrokerError, InvalidChannelError
from .access import HubAccess

__all__ = ["PresenceHandler"]


class PresenceHandler(tornado.web.RequestHandler):
    """``GET /presence?channel=C`` (JSON; errors as ``{"error": ...}``)."""

    broker: Broker
    access: HubAccess

    def initialize(self, broker: Broker, access: HubAccess) -> None:
        self.broker = broker
        self.access = access

    @property
    def presence_patterns(self) -> tuple[str, ...]:
        """Setting ``sse_presence``: the channels with join and leave events (patterns, as for
        `.EventStreamHandler.presence_patterns`), whose answer includes ``announced``.
        Default: none."""
        return tuple(self.settings.get("sse_presence", ()))

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def compute_etag(self) -> str | None:
        return None

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(payload, ensure_ascii=False) + "\n")

    async def get(self) -> None:
        values = self.request.query_arguments.get("channel", [])
        try:
            if len(values) != 1:
                raise InvalidChannelError("name exactly one channel (?channel=...)")
            channel = validate_channel(self.decode_argument(values[0], name="channel"))
            self.access.authorize_presence(self.request, channel)
        except InvalidChannelError as exc:
            self._reply(400, {"error": str(exc)})
            return
        except AuthenticationError as exc:
            self.set_header("WWW-Authenticate", exc.www_authenticate)
            self._reply(401, {"error": str(exc)})
            return
        except AccessDeniedError as exc:
            self._reply(403, {"error": str(exc)})
            return
        try:
            found = await self.broker.presence(channel)
        except BrokerError as exc:
            self._reply(503, {"error": f"the broker cannot answer now: {exc}"})
            return
        answer: dict[str, Any] = {"channel": channel, "subscribers": found.subscribers}
        if found.users:
            answer["users"] = dict(found.users)
        if matches_any(self.presence_patterns, channel):
            answer["announced"] = sorted(found.announced)
        self._reply(200, answer)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": self._reason}) + "\n")
