"""The ``listen`` and ``publish`` commands: the hub's HTTP contract, from a terminal.

``tornado-sse listen URL`` follows a stream with the reconnecting `.EventSource` and prints one
line per event; ``tornado-sse publish URL`` POSTs one event to ``URL/publish`` and prints its id.
Both speak only the documented contract of ``tornado-sse serve`` (``GET /events?channel=...``,
``POST /publish`` answering ``202 {"id": ...}``), so they work against any hub, embedded or not.

Failures end in one line on standard error and a non-zero exit status, never a traceback:
the server's own message is shown when it gave one (the hub answers ``{"error": "..."}``).
Progress notes (connected, reconnecting) go to standard error too, so standard output carries
only events and can be piped (``--json`` gives one JSON object per line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import click
from tornado.httpclient import HTTPClientError, HTTPRequest, HTTPResponse
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError, SimpleAsyncHTTPClient

from .client import EventSource, TokenSource, retry_after, validate_url
from .errors import EventStreamError, InvalidURLError, StreamIdleError, StreamParseError
from .protocol import Event
from .redaction import redact_url

__all__ = ["listen_command", "publish_command"]

#: environment variable holding the publish token (a name, not a secret)
TOKEN_ENV = "TORNADO_SSE_TOKEN"  # noqa: S105
#: the environment variable ``listen --token`` reads: a signed token, not the master token
STREAM_TOKEN_ENV = "TORNADO_SSE_STREAM_TOKEN"  # noqa: S105


def _split_http_url(url: str) -> urllib.parse.SplitResult:
    """*url* split, once `.validate_url` accepts it; else a usage error (exit status 2)."""
    try:
        return urllib.parse.urlsplit(validate_url(url))
    except InvalidURLError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from None


def stream_url(url: str, channels: tuple[str, ...] = ()) -> str:
    """The stream URL for ``listen``: ``/events`` when *url* has no path, plus ``channel`` args."""
    parts = _split_http_url(url)
    path = parts.path if parts.path not in ("", "/") else "/events"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query += [("channel", channel) for channel in channels]
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, path, urllib.parse.urlencode(query), "")
    )


def publish_url(url: str) -> str:
    """The publish URL: *url* + ``/publish``, unless *url* already ends with ``/publish``."""
    parts = _split_http_url(url)
    path = parts.path.rstrip("/")
    if not path.endswith("/publish"):
        path += "/publish"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def server_message(body: bytes | str) -> str:
    """The server's message in a refusal: ``error`` (or ``message``) of a JSON object, else the
    first line of the text; one line, at most 300 characters."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = text.strip()
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        for key in ("error", "message"):
            if isinstance(payload.get(key), str):
                text = payload[key]
                break
    lines = text.strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= 300 else line[:297] + "..."


def _network_error(url: str, exc: BaseException, timeout: float | None = None) -> str:
    """One line describing why *url* could not be reached."""
    parts = urllib.parse.urlsplit(url)
    where = parts.netloc.rpartition("@")[2] or redact_url(url)
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused (is the hub running?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {parts.hostname!r}: {exc.strerror or exc}"
    if isinstance(exc, StreamIdleError):
        return f"{where} sent nothing, not even a heartbeat: {exc} (taken for a dead connection)"
    if isinstance(exc, HTTPTimeoutError) or isinstance(exc, TimeoutError):
        limit = f" within {timeout:g}s" if timeout else ""
        return f"no answer from {where}{limit} (timed out)"
    if isinstance(exc, HTTPStreamClosedError):
        return f"{where} closed the connection without answering"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"cannot reach {where}: {exc}"


# ---------------------------------------------------------------------- listen


class _Listener(EventSource):
    """An `EventSource` that notes its connection state on standard error."""

    quiet = False

    def on_open(self) -> None:
        if not self.quiet:
            resume = f" (resuming after {self.last_event_id})" if self.last_event_id else ""
            click.echo(f"connected to {self.shown_url}{resume}", err=True)

    def on_reconnect(self, error: BaseException | None, delay: float) -> None:
        if not self.quiet:
            click.echo(
                f"{_ending(self.url, error, self.stream_events)}; reconnecting in {delay:.1f}s",
                err=True,
            )


def _ending(url: str, error: BaseException | None, events: int | None) -> str:
    """What ended a connection: a stream that was open (*events* received on it), or an attempt
    that opened none (*events* is ``None``)."""
    if events is None:
        return "stream ended" if error is None else _network_error(url, error)
    count = f"{events} event{'' if events == 1 else 's'}"
    if error is None:
        return f"stream ended by the server after {count}"
    if isinstance(error, StreamIdleError):
        return f"stream interrupted after {count}: {_network_error(url, error)}"
    if isinstance(error, HTTPStreamClosedError):
        return f"stream interrupted after {count}: the connection closed before the stream ended"
    return f"stream interrupted after {count}: {_network_error(url, error)}"


def format_event(event: Event, as_json: bool) -> str:
    """One event as printed by ``listen``.

    Plain: ``event<TAB>id<TAB>data``, a line of multi-line data continuing on the next output
    line after two tabs; ``message`` for an unnamed event and ``-`` for a missing id. JSON: an
    object with ``id``, ``event`` and ``data`` (and ``retry`` in milliseconds when present).
    """
    name = event.event or "message"
    if as_json:
        record: dict[str, Any] = {"id": event.id, "event": name, "data": event.data}
        if event.retry is not None:
            record["retry"] = event.retry
        return json.dumps(record, ensure_ascii=False)
    lines = (event.data or "").split("\n")
    head = f"{name}\t{event.id if event.id is not None else '-'}\t{lines[0]}"
    return "\n".join([head, *(f"\t\t{line}" for line in lines[1:])])


def _command_token(command: str) -> Callable[[], Awaitable[str]]:
    """A token function for `EventSource` that runs *command* (a shell command line) for each
    fresh token: its standard output, stripped, is the token."""

    async def fresh() -> str:
        process = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.PIPE, stderr=None
        )
        out, _ = await process.communicate()
        if process.returncode != 0:
            raise click.ClickException(
                f"--token-command exited with status {process.returncode}: no token"
            )
        token = out.decode("utf-8", "replace").strip()
        if not token:
            raise click.ClickException("--token-command printed no token")
        return token

    return fresh


async def _listen(
    url: str,
    last_event_id: str | None,
    as_json: bool,
    quiet: bool,
    idle_timeout: float,
    token: TokenSource | None = None,
) -> None:
    source = _Listener(
        url, last_event_id=last_event_id, idle_timeout=idle_timeout or None, token=token
    )
    source.quiet = quiet
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, source.close)
        except (ValueError, RuntimeError, NotImplementedError):
            continue  # not the main thread (or no signals here): Ctrl-C ends asyncio.run instead
        handled.append(sig)
    try:
        async for event in source:
            try:
                click.echo(format_event(event, as_json))
            except BrokenPipeError:
                # `listen ... | head`: the reader left. Stop quietly, as `cat` does.
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
                break
    except EventStreamError as exc:
        message = server_message(exc.body) if exc.body else ""
        if exc.status is None:
            raise click.ClickException(str(exc)) from None
        if exc.status == 200:
            raise click.ClickException(
                f"{redact_url(url)} is not an event stream (Content-Type {exc.content_type!r})"
            ) from None
        raise click.ClickException(
            f"{redact_url(url)} refused the stream (HTTP {exc.status})"
            + (f": {message}" if message else "")
        ) from None
    except StreamParseError as exc:
        raise click.ClickException(f"{redact_url(url)}: {exc}") from None
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await source.aclose()


@click.command(name="listen")
@click.argument("url")
@click.option(
    "--channel",
    "-c",
    "channels",
    multiple=True,
    metavar="NAME",
    help="Channel to follow (repeatable); added to the URL as ?channel=NAME.",
)
@click.option(
    "--last-event-id",
    metavar="ID",
    help="Resume after this event id (sent as the Last-Event-ID header).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per event: id, event, data."
)
@click.option(
    "--quiet", "-q", is_flag=True, help="Do not note connects and reconnects on standard error."
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Take the connection for dead and reconnect when the server sends nothing, not even "
    "a heartbeat, for this long; 0 waits forever.",
)
@click.option(
    "--token",
    envvar=STREAM_TOKEN_ENV,
    show_envvar=True,
    metavar="TOKEN",
    help="A signed token granting the channels (sent as Authorization: Bearer). At "
    "token-expired the stream ends: use --token-command to carry on with a fresh token.",
)
@click.option(
    "--token-command",
    metavar="COMMAND",
    help="A shell command printing a fresh token; run at start and at each token-expired, "
    "after which the stream resumes exactly where it was (e.g. 'tornado-sse token ...').",
)
def listen_command(
    url: str,
    channels: tuple[str, ...],
    last_event_id: str | None,
    as_json: bool,
    quiet: bool,
    idle_timeout: float,
    token: str | None,
    token_command: str | None,
) -> None:
    """Print the events of the stream at URL as they arrive.

    URL is a hub (http://127.0.0.1:8000, meaning its /events) or any event-stream URL.
    Reconnects on its own, resuming with Last-Event-ID, until Ctrl-C. Plain output is
    EVENT<TAB>ID<TAB>DATA per event (more lines of DATA follow after two tabs).
    """
    target = stream_url(url, channels)
    if last_event_id is not None and any(c in last_event_id for c in "\r\n\0"):
        raise click.BadParameter("must not contain CR, LF or NUL", param_hint="--last-event-id")
    if token is not None and token_command is not None:
        raise click.UsageError("give either --token or --token-command, not both")
    source: TokenSource | None = token
    if token_command is not None:
        source = _command_token(token_command)
    elif token is not None and (not token or any(c in token for c in "\r\n\0 ")):
        raise click.BadParameter(
            "must be a token, without spaces or line breaks", param_hint="--token"
        )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_listen(target, last_event_id, as_json, quiet, idle_timeout, source))


# ---------------------------------------------------------------------- publish


async def _post(url: str, body: bytes, token: str, timeout: float) -> HTTPResponse:
    client = SimpleAsyncHTTPClient(force_instance=True)
    request = HTTPRequest(
        url,
        method="POST",
        body=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json; charset=utf-8",
            "Accept": "application/json",
        },
        connect_timeout=timeout,
        request_timeout=timeout,
        follow_redirects=False,
    )
    try:
        return await client.fetch(request, raise_error=False)
    finally:
        client.close()


async def _post_within(url: str, body: bytes, token: str, timeout: float) -> HTTPResponse:
    """POST, and after a 429 wait its ``Retry-After`` (at least 0.1 s) and POST again, as long
    as the answer can still come within *timeout* seconds; the last answer is returned."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        response = await _post(url, body, token, max(0.001, deadline - loop.time()))
        if response.code != 429:
            return response
        wait = max(0.1, retry_after(response.headers.get("Retry-After")))
        if loop.time() + wait >= deadline:
            return response
        click.echo(f"rate limited by the hub: trying again in {wait:g} s", err=True)
        await asyncio.sleep(wait)


#: status -> (what happened, a hint shown instead of the server's message)
_REFUSALS: dict[int, tuple[str, str | None]] = {
    400: ("the hub rejected the event", None),
    401: ("unauthorized", f"the hub refused the token; check --token or ${TOKEN_ENV}"),
    403: ("forbidden", None),
    404: ("not found", "is this the URL of a tornado-sse hub?"),
    413: ("the event is larger than the hub accepts", None),
    429: ("the hub is limiting this publisher's rate", None),
    503: ("the hub cannot deliver right now", None),
}


@click.command(name="publish")
@click.argument("url")
@click.option("--channel", "-c", required=True, metavar="NAME", help="Channel to publish to.")
@click.option(
    "--data",
    "-d",
    required=True,
    metavar="TEXT",
    help="Event data, sent verbatim (line breaks become data lines); '-' reads standard input.",
)
@click.option("--event", "-e", metavar="NAME", help="Event name (default: a plain message).")
@click.option(
    "--retry",
    type=click.IntRange(min=0),
    metavar="MS",
    help="Reconnection delay for the receivers, in milliseconds.",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    show_envvar=True,
    metavar="TOKEN",
    help="The hub's publish token (sent as Authorization: Bearer).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Give up after this long.",
)
def publish_command(
    url: str,
    channel: str,
    data: str,
    event: str | None,
    retry: int | None,
    token: str | None,
    timeout: float,
) -> None:
    """Publish one event to the hub at URL and print its id.

    URL is the hub (http://127.0.0.1:8000); /publish is appended unless already there. Over the
    hub's --publish-rate (429), it waits as long as Retry-After says and tries again, within
    --timeout.
    """
    target = publish_url(url)
    if not token:
        raise click.UsageError(f"no token: pass --token or set {TOKEN_ENV}")
    if data == "-":
        data = sys.stdin.read()
    payload: dict[str, Any] = {"channel": channel, "data": data}
    if event is not None:
        payload["event"] = event
    if retry is not None:
        payload["retry"] = retry
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    try:
        response = asyncio.run(_post_within(target, body, token, timeout))
    except (OSError, HTTPClientError) as exc:
        raise click.ClickException(_network_error(target, exc, timeout)) from None
    message = server_message(response.body or b"")
    if 200 <= response.code < 300:
        try:
            event_id = json.loads(response.body)["id"]
        except (ValueError, TypeError, KeyError):
            event_id = None
        if not isinstance(event_id, str):
            raise click.ClickException(
                f"unexpected reply from {target} (HTTP {response.code}): {message or 'no id'}"
            )
        click.echo(event_id)
        return
    what, hint = _REFUSALS.get(response.code, ("unexpected answer", None))
    detail = hint or message
    raise click.ClickException(f"{what} (HTTP {response.code})" + (f": {detail}" if detail else ""))
