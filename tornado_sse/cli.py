"""The ``tornado-sse`` command line.

Each command lives beside what it runs and is imported only when invoked, so ``tornado-sse
--help`` stays fast and a command's optional dependencies are needed only by that command.
"""

from __future__ import annotations

import importlib
import ipaddress
import re
import urllib.parse
from typing import Any

import click

from . import __version__

#: command name -> "module:attribute" of a click command
COMMANDS = {
    "serve": "tornado_sse.hub.options:serve_command",
    "listen": "tornado_sse.tools:listen_command",
    "publish": "tornado_sse.tools:publish_command",
    "demo": "tornado_sse.demo.app:demo_command",
    "bench": "tornado_sse.bench.cli:bench_command",
    "token": "tornado_sse.token_command:token_command",
}

HELP = {
    "serve": "Run the standalone push hub with an HTTP publish API.",
    "listen": "Print the events of a stream as they arrive (reconnects and resumes).",
    "publish": "Publish one event to a hub and print its id.",
    "demo": "Run the chat demo in your browser.",
    "bench": "Benchmark tornado_sse beside its peers.",
    "token": "Print a signed token (JWT) granting channels to follow and publish to.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            return _unavailable(cmd_name, exc)
        command: Any = getattr(module, attribute)
        return command  # type: ignore[no-any-return]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, HELP[name]) for name in sorted(COMMANDS)])


def require_module(name: str, flag: str, remedy: str) -> None:
    """Fail with a usage error naming *flag* and *remedy* when module *name* cannot be imported
    (an optional extra that is not installed)."""
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if exc.name == name:
            raise click.UsageError(
                f"{flag} is not supported by this version of tornado-sse ({name} is missing)"
            ) from exc
        raise click.UsageError(f"{flag} needs {exc.name or exc}: {remedy}") from exc


# ------------------------------------------------------------ values checked at parse time
#
# A flag naming an address, a URL or a path is checked when the command line is parsed, so that
# a mistake is a usage error (exit status 2) naming the flag, not a failure at start-up.

_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\.?$){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


def host_problem(host: str) -> str | None:
    """Why *host* is not an IP address or a well-formed host name, or ``None`` when it is one.

    Only the form is checked (a name is not resolved here).
    """
    if not host:
        return "empty"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return None
    if _HOSTNAME.fullmatch(host) is None:
        return "not an IP address or a host name"
    return None


class HostName(click.ParamType):  # type: ignore[type-arg]
    """An address to listen on: an IP address (``[::1]`` brackets allowed) or a host name."""

    name = "ADDR"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        if not text:
            self.fail("must not be empty: use 0.0.0.0 or :: for every interface")
        problem = host_problem(text)
        if problem is not None:
            self.fail(f"{text!r} is {problem} (examples: 127.0.0.1, 0.0.0.0, ::, localhost)")
        return text


def safe_url(url: str) -> str:
    """*url* with any password replaced by ``***``, for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class RedisUrl(click.ParamType):  # type: ignore[type-arg]
    """A Redis URL: ``redis://[user:password@]host[:port][/db][?option=value...]``,
    ``rediss://`` (TLS) or ``unix:///path/to/redis.sock[?db=N]``.

    The form is checked here; when redis-py is installed, the query's options are checked
    against it too (an unknown option or a bad value would otherwise fail only at connect).
    """

    name = "URL"
    EXAMPLE = "like redis://127.0.0.1:6379/0 or unix:///run/redis/redis.sock"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        url = str(value).strip()
        if not url:
            self.fail(f"must not be empty: give a Redis URL {self.EXAMPLE}")
        shown = safe_url(url)
        problem = self._problem(url)
        if problem is not None:
            self.fail(f"{shown!r} is not a Redis URL: {problem} ({self.EXAMPLE})")
        return url

    @staticmethod
    def _problem(url: str) -> str | None:
        scheme, sep, _ = url.partition("://")
        if not sep or scheme.lower() not in ("redis", "rediss", "unix"):
            return "the scheme must be redis://, rediss:// or unix://"
        if any(char.isspace() for char in url):
            return "it contains white space"
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            return f"{exc}"
        if parts.fragment:
            return "a fragment (#...) has no meaning here"
        if scheme.lower() == "unix":
            if not parts.path or parts.path == "/":
                return "a unix:// URL needs the socket's path (unix:///run/redis/redis.sock)"
        else:
            host = parts.hostname
            if not host:
                return "no host"
            problem = host_problem(host)
            if problem is not None:
                return f"the host {host!r} is {problem}"
            if port == 0:
                return "port 0"
            db = parts.path.strip("/")
            if db and not (db.isascii() and db.isdigit()):
                return f"the database ({db!r}) must be a number, like /0"
        return RedisUrl._option_problem(url)

    @staticmethod
    def _option_problem(url: str) -> str | None:
        try:
            from redis.asyncio import from_url
        except ImportError:
            return None  # --redis then says what to install
        try:
            pool = from_url(url).connection_pool
            pool.connection_class(**pool.connection_kwargs)
        except TypeError as exc:
            found = re.search(r"keyword argument '([^']+)'", str(exc))
            name = f" {found.group(1)!r}" if found else ""
            return f"unknown option{name} in the query"
        except ValueError as exc:
            return str(exc).rstrip(".")
        return None


def _unavailable(name: str, exc: ImportError) -> click.Command:
    @click.command(name=name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        raise click.ClickException(f"'{name}' is not available: {exc}")

    return command


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="tornado-sse")
def main() -> None:
    """Server-Sent Events for Tornado."""


if __name__ == "__main__":
    main()
