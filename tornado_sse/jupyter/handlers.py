"""Handlers of the Jupyter extension: a stream base class with Jupyter's auth, and publishing.

`JupyterEventStreamHandler` puts `JupyterHandler` first in the MRO, so Jupyter's ``prepare()``
(identity provider: token, cookie, custom providers; host check; CORS headers) runs before
``EventStreamHandler.get`` and Jupyter's ``check_origin`` (``allow_origin``, token-authenticated
requests) governs the stream. Deliberate choices:

* ``get`` is ``@web.authenticated`` whatever ``ServerApp.allow_unauthenticated_access`` says (it
  only guards endpoints that carry no rule), and a refusal is a ``403`` with a plain-text message
  instead of Jupyter's redirect to the login page, which an ``EventSource`` would follow and then
  fail on as a non-stream response without saying why.
* Authorization asks the server's `Authorizer` itself (``read`` on :attr:`auth_resource`) instead
  of wrapping ``get`` in ``@authorized``: that decorator remembers the resource of the first
  request it sees, so subclasses with different ``auth_resource`` values sharing an inherited
  ``get`` would all be checked against the first one.
* Errors are plain text (``403 Forbidden: <message>``), readable with ``curl`` and in the
  browser's network panel, not an HTML page.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from tornado import web

from ..broker.base import Broker
from ..errors import BrokerError, EventTooLargeError, InvalidEventError, PublishError
from ..handler import EventStreamHandler, default_broker
from ..publish import parse_publish
from ..script import client_script
from . import EVENTS_CHANNEL_PREFIX

__all__ = [
    "AUTH_RESOURCE",
    "ClientScriptHandler",
    "EventsHandler",
    "JupyterEventStreamHandler",
    "PublishHandler",
]

#: the authorizer resource of the extension's endpoints (``read`` to follow, ``write`` to publish)
AUTH_RESOURCE = "sse"

#: the message of a refusal for want of a user
AUTHENTICATION_REQUIRED = "authentication required: log in to Jupyter or pass the server's token"


async def _is_authorized(handler: JupyterHandler, action: str, resource: str) -> bool:
    user = handler.current_user
    if not user:
        return False
    return bool(
        await ensure_async(handler.authorizer.is_authorized(handler, user, action, resource))
    )


class JupyterEventStreamHandler(JupyterHandler, EventStreamHandler):
    """An `.EventStreamHandler` behind Jupyter Server's authentication and authorization.

    Subclass it in a server extension, as you would `.EventStreamHandler`, and route it under the
    server's ``base_url``::

        from jupyter_server.utils import url_path_join
        from tornado_sse.jupyter import JupyterEventStreamHandler

        class BuildLog(JupyterEventStreamHandler):
            auth_resource = "builds"

            def get_channels(self):
                return [f"builds/{self.path_kwargs['build']}"]

        def _load_jupyter_server_extension(serverapp):
            base_url = serverapp.web_app.settings["base_url"]
            serverapp.web_app.add_handlers(
                ".*$", [(url_path_join(base_url, r"builds/(?P<build>\\w+)/log"), BuildLog)]
            )

    A stream opens only for an authenticated user (token in the ``Authorization`` header or the
    ``token`` query argument, Jupyter's login cookie, or whatever the server's identity provider
    accepts) whom the server's authorizer allows to ``read`` :attr:`auth_resource`; anyone else
    gets ``403`` with a message, even on a server that allows unauthenticated access to
    endpoints without a rule. ``Origin`` is checked by Jupyter's rules (``ServerApp.allow_origin``
    and friends). The stream's settings (broker, heartbeat, retry ...) are the server's
    ``sse_*`` settings, set by the ``tornado_sse.jupyter`` extension from its traitlets.

    All `.EventStreamHandler` hooks apply; `check_channel` may use :meth:`is_authorized` and
    ``self.current_user`` (a `jupyter_server.auth.User`).
    """

    #: the authorizer resource a user must be allowed to ``read`` to open the stream
    auth_resource = AUTH_RESOURCE

    def check_origin(self, origin: str = "") -> bool:
        """Jupyter's origin policy (`~jupyter_server.base.handlers.JupyterHandler.check_origin`)."""
        return JupyterHandler.check_origin(self, origin)

    async def is_authorized(self, action: str, resource: str | None = None) -> bool:
        """Whether the server's authorizer lets the current user do *action* on *resource*.

        *resource* defaults to :attr:`auth_resource`. Actions are Jupyter's: ``read``,
        ``write``, ``execute``.
        """
        return await _is_authorized(self, action, resource or self.auth_resource)

    def get_login_url(self) -> str:
        # @web.authenticated would redirect GET to the login page; a stream has no use for it
        raise web.HTTPError(403, AUTHENTICATION_REQUIRED)

    @web.authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not await self.is_authorized("read"):
            raise web.HTTPError(403, f"not authorized to read {self.auth_resource!r}")
        await EventStreamHandler.get(self, *args, **kwargs)

    @allow_unauthenticated
    async def options(self, *args: Any, **kwargs: Any) -> None:
        """CORS preflight (browsers send no credentials with it); Jupyter sets the CORS headers."""
        await EventStreamHandler.options(self, *args, **kwargs)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors as ``<status> <reason>: <message>`` in plain text."""
        message = ""
        exc_info = kwargs.get("exc_info")
        if exc_info is not None and isinstance(exc_info[1], web.HTTPError):
            error = exc_info[1]
            if error.log_message:
                message = error.log_message % error.args if error.args else error.log_message
        self._transforms = []
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        text = f"{status_code} {self._reason}"
        self.finish(f"{text}: {message}\n" if message else text + "\n")


class EventsHandler(JupyterEventStreamHandler):
    """``GET {base_url}sse/events?channel=a&channel=b``: any channels, for frontends.

    Channels of the server's event bus (``jupyter-events/...``) additionally need the permission
    Jupyter's own event WebSocket asks for: ``execute`` on ``events``.
    """

    async def check_channel(self, channel: str) -> bool:
        if channel.startswith(EVENTS_CHANNEL_PREFIX):
            return await self.is_authorized("execute", "events")
        return True


class PublishHandler(APIHandler):
    """``POST {base_url}sse/publish``: publish one event to the server's broker.

    The body is the hub's (`tornado_sse.publish.parse_publish`, shared with ``tornado-sse
    serve``): a JSON object ``{"channel": "progress", "data": ..., "event": null, "retry":
    null}``, ``channel`` and ``data`` required, no other field. ``data`` is sent as is if it is a
    string, else as its compact JSON encoding. The answer is ``{"id": "<event id>", "channel":
    ...}``. The user needs ``write`` on ``sse``; a cookie-authenticated request also needs
    Jupyter's XSRF token (``_xsrf`` cookie echoed in an ``X-XSRFToken`` header), a
    token-authenticated one does not. Errors are Jupyter's JSON errors: 400 for bad input, 403
    for an unauthenticated or unauthorized user, a missing XSRF token, or a reserved channel
    (``jupyter-events/...``), 413 for data larger than ``max_data_size`` or than the broker's
    backend carries (`.EventTooLargeError`, e.g. the bridge's frame limit), 503 while the broker
    cannot take events.
    """

    auth_resource = AUTH_RESOURCE

    def initialize(self, max_data_size: int = 256 * 1024) -> None:
        """:param max_data_size: bytes of ``data`` (UTF-8) an event may carry."""
        self.max_data_size = max_data_size

    @property
    def broker(self) -> Broker:
        broker = self.settings.get("sse_broker")
        return broker if broker is not None else default_broker()

    def check_xsrf_cookie(self) -> None:
        """Jupyter's XSRF check, after authentication: an anonymous request is told that it
        needs to authenticate, not that its XSRF token is missing."""
        if hasattr(self, "_jupyter_current_user") and not self.current_user:
            raise web.HTTPError(403, AUTHENTICATION_REQUIRED)
        super().check_xsrf_cookie()

    def get_login_url(self) -> str:
        # APIHandler would raise a bare 403 here (for @web.authenticated); say why
        raise web.HTTPError(403, AUTHENTICATION_REQUIRED)

    @web.authenticated
    async def post(self) -> None:
        if not await _is_authorized(self, "write", self.auth_resource):
            raise web.HTTPError(403, f"not authorized to write {self.auth_resource!r}")
        try:
            request = parse_publish(self.request.body)
        except PublishError as exc:
            raise web.HTTPError(400, str(exc)) from None
        if request.channel.startswith(EVENTS_CHANNEL_PREFIX):
            raise web.HTTPError(403, f"channels {EVENTS_CHANNEL_PREFIX}* carry the server's events")
        if len(request.data.encode("utf-8")) > self.max_data_size:
            raise web.HTTPError(413, f"data is larger than {self.max_data_size} bytes")
        try:
            event_id = await self.broker.publish(
                request.channel, request.data, event=request.event, retry=request.retry
            )
        except EventTooLargeError as exc:
            raise web.HTTPError(413, str(exc)) from None
        except InvalidEventError as exc:
            raise web.HTTPError(400, str(exc)) from None
        except BrokerError as exc:
            raise web.HTTPError(503, f"the broker cannot take events now: {exc}") from None
        self.finish(json.dumps({"id": event_id, "channel": request.channel}))


class ClientScriptHandler(JupyterHandler):
    """``GET {base_url}sse/client.js``: the ``SharedEventSource`` module (`tornado_sse.script`).

    Public code, like Jupyter's own static files: served without authentication (the streams it
    opens are authenticated as usual).
    """

    @allow_unauthenticated
    def get(self) -> None:
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.write(client_script())
