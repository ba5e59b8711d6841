"""The browser side, served: ``SharedEventSource``, an ES module shipped in the package.

``tornado_sse/static/shared-event-source.js`` is plain JavaScript (no build step, no npm), so a
page imports it straight from the server that holds its streams::

    app = tornado.web.Application([(r"/events", Feed), tornado_sse.client_script_route()])

    <script type="module">
      import { SharedEventSource } from "/sse/client.js";
      const source = new SharedEventSource("/events?channel=news&channel=user/alice");
    </script>

The hub serves it at ``/client.js`` and the Jupyter extension at ``{base_url}sse/client.js``.
The module's header comment explains how the tabs share one stream.
"""

from __future__ import annotations

import re
from importlib import resources

import tornado.web

__all__ = ["ClientScriptHandler", "client_script", "client_script_route"]

_script: bytes | None = None


def client_script() -> bytes:
    """The module's source (read once from the package)."""
    global _script
    if _script is None:
        _script = (
            resources.files("tornado_sse").joinpath("static/shared-event-source.js").read_bytes()
        )
    return _script


class ClientScriptHandler(tornado.web.RequestHandler):
    """``GET``: the ``SharedEventSource`` module as ``text/javascript``, revalidated by ETag,
    importable from pages of any origin (it is public code, sent without credentials)."""

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Content-Type-Options", "nosniff")
        # public code: pages of other origins may import it (module scripts load with CORS)
        self.set_header("Access-Control-Allow-Origin", "*")

    def get(self) -> None:
        self.write(client_script())

    def head(self) -> None:
        self.set_header("Content-Length", str(len(client_script())))


def client_script_route(path: str = "/sse/client.js") -> tuple[str, type[ClientScriptHandler]]:
    """A route serving the module at *path*, for a Tornado application's handler list."""
    return (re.escape(path), ClientScriptHandler)
