"""The ``tornado-sse`` command line.

Each command lives beside what it runs and is imported only when invoked, so ``tornado-sse
--help`` stays fast and a command's optional dependencies are needed only by that command.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from . import __version__

#: command name -> "module:attribute" of a click command
COMMANDS = {
    "serve": "tornado_sse.server:serve_command",
    "listen": "tornado_sse.tools:listen_command",
    "publish": "tornado_sse.tools:publish_command",
    "demo": "tornado_sse.demo.app:demo_command",
    "bench": "tornado_sse.bench.cli:bench_command",
}

HELP = {
    "serve": "Run the standalone push hub with an HTTP publish API.",
    "listen": "Print the events of a stream as they arrive (reconnects and resumes).",
    "publish": "Publish one event to a hub and print its id.",
    "demo": "Run the chat demo in your browser.",
    "bench": "Benchmark tornado_sse beside its peers.",
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
