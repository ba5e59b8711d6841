"""Every Python example of README.md and the documentation site's pages (docs/), run as written.

Each example starts with a comment naming its file (``# feed.py``); an example printed in two
documents must be the same in both. A test here saves the example to a file, runs it with this
interpreter as a separate process, and probes what the documentation says it does, with real
servers, a real ``redis-server`` and real signals. The one change made to an example is its port
numbers (``8888`` ...), replaced by free ones. The Jupyter extensions (``builds_ext``,
``progress_demo``) run inside a real Jupyter server in tests/jupyter/test_docs.py, and the
page of ``shared_feed`` in Chromium in tests/test_shared_event_source.py.

The embedding example used to refuse every anonymous visitor (its channel ``user/None``) and to
``await`` at module level, which is a SyntaxError in a script (issue 12, item 16).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tornado.web

from tests.helpers import RawStream, free_port, stop_process, wait_until
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
#: every Markdown page of the documentation site (docs/, with CHANGES.md), and the README
DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "CHANGES.md",
    *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts),
]
TIMEOUT = 15.0
#: examples run by tests/jupyter/test_docs.py (they need a Jupyter server)
RUN_IN_JUPYTER = {"builds_ext", "progress_demo"}
#: examples run in Chromium by tests/test_shared_event_source.py
RUN_IN_BROWSER = {"shared_feed"}
#: examples run here
RUN_HERE = {
    "feed",
    "shutdown",
    "follow",
    "workers",
    "redis_feed",
    "metrics_setup",
    "private_feed",
    "ratelimit_example",
}
TOKEN = "readme-test-token-0123456789abcdef"
#: the README's quick start opens the channel its example follows
OPEN_NEWS = ("--public-channel", "news")


def examples() -> dict[str, list[tuple[str, str]]]:
    """Example name -> [(where it is printed, its source)], for every ```python block."""
    found: dict[str, list[tuple[str, str]]] = {}
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
            where = f"{document.name}:{text[: match.start()].count(chr(10)) + 1}"
            name = re.match(r"# (\w+)\.py\b", match.group(1))
            assert name is not None, f"{where}: an example starts with '# <name>.py'"
            found.setdefault(name.group(1), []).append((where, match.group(1)))
    return found


def example(name: str, **ports: int) -> str:
    """The source of example *name*, with each port number named in *ports* (``p8888=...``)
    replaced by the port given."""
    ((_, source), *_) = examples()[name]
    for literal, port in ports.items():
        number = literal.removeprefix("p")
        assert re.search(rf"\b{number}\b", source), (name, number)
        source = re.sub(rf"\b{number}\b", str(port), source)
    return source


def test_every_example_is_run_and_printed_the_same_everywhere() -> None:
    found = examples()
    assert set(found) == RUN_HERE | RUN_IN_JUPYTER | RUN_IN_BROWSER
    for name, copies in found.items():
        assert len({source for _, source in copies}) == 1, (name, [where for where, _ in copies])


class Example:
    """An example saved to *directory* and run as a child process, its output in files."""

    def __init__(self, directory: Path, name: str, source: str) -> None:
        self.path = directory / f"{name}.py"
        self.path.write_text(source, encoding="utf-8")
        self.output = directory / f"{name}.out"
        with self.output.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, str(self.path)],
                cwd=directory,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers too can be stopped as a group
            )

    def text(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_process(self.process)  # type: ignore[arg-type]

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[[str, str], Example]]:
    started: list[Example] = []

    def start(name: str, source: str) -> Example:
        started.append(Example(tmp_path, name, source))
        return started[-1]

    yield start
    for item in started:
        item.stop()
        item.kill_group()


async def listening(item: Example | subprocess.Popen[bytes], port: int) -> None:
    """Wait until the example (or process) accepts connections on *port* (fail at once if it
    died)."""
    process = item.process if isinstance(item, Example) else item

    async def connects() -> bool:
        assert process.poll() is None, item.text() if isinstance(item, Example) else "died"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    await wait_until(connects, TIMEOUT, interval=0.05)


def datas(stream: RawStream, event: str | None = None) -> list[str]:
    return [e.data for e in stream.events if event is None or e.event == event]


def test_feed(run: Callable[[str, str], Example]) -> None:
    port = free_port()
    item = run("feed", example("feed", p8888=port))

    async def probe() -> None:
        await listening(item, port)
        anonymous = await RawStream.open(port, "/events")
        assert anonymous.status == 200  # was 403: channel 'user/None'
        ada = await RawStream.open(
            port, "/events", {"Cookie": f"user={signed('ada')}"}, timeout=TIMEOUT
        )
        forged = await RawStream.open(port, "/events", {"Cookie": "user=ada"})
        for stream in (anonymous, ada, forged):
            assert stream.status == 200
            await stream.read_until(lambda s: datas(s, "time"), TIMEOUT)
        await ada.read_until(lambda s: "hi Ada" in datas(s), TIMEOUT)
        await forged.read_until(lambda s: len(datas(s, "time")) >= 2, TIMEOUT)
        assert "hi Ada" not in datas(anonymous) + datas(forged)
        for stream in (anonymous, ada, forged):
            stream.close()

    asyncio.run(probe())


def signed(user: str) -> str:
    secret = re.search(r'cookie_secret="([^"]+)"', example("feed"))
    assert secret is not None
    value = tornado.web.create_signed_value(secret.group(1), "user", user)
    return value.decode()


def test_shutdown(run: Callable[[str, str], Example]) -> None:
    port = free_port()
    item = run("shutdown", example("shutdown", p8888=port))

    async def probe() -> None:
        await listening(item, port)
        stream = await RawStream.open(port, "/events")
        assert stream.status == 200
        await stream.read_until(lambda s: b"id: " in s.raw)
        item.process.send_signal(signal.SIGTERM)
        await stream.read_to_end(TIMEOUT)
        last = stream.events[-1]
        assert (last.event, last.data) == ("shutdown", "bye")
        stream.close()

    asyncio.run(probe())
    assert item.process.wait(TIMEOUT) == 0, item.text()


def test_follow(run: Callable[[str, str], Example], tmp_path: Path) -> None:
    port = free_port()
    # --drain 0: stopped with the example's stream open, the hub waited out the 2 s window
    serve = ["serve", "--port", str(port), *OPEN_NEWS, "--drain", "0"]
    hub = subprocess.Popen(
        [sys.executable, "-m", "tornado_sse.cli", *serve],
        env={"TORNADO_SSE_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        item = run("follow", example("follow", p8080=port))

        async def probe() -> None:
            from tornado.httpclient import AsyncHTTPClient

            await listening(hub, port)
            client = AsyncHTTPClient()

            async def published_and_printed() -> bool:
                # A fresh stream gets only what is published after it opened: publish until
                # the example, once connected, prints one.
                reply = await client.fetch(
                    f"http://127.0.0.1:{port}/publish",
                    method="POST",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    body=json.dumps({"channel": "news", "data": "hello", "event": "greeting"}),
                )
                assert reply.code == 202, reply
                return any(
                    line.split()[1:] == ["greeting", "hello"] for line in item.text().splitlines()
                )

            await wait_until(published_and_printed, TIMEOUT, interval=0.1)

        asyncio.run(probe())
    finally:
        stop_process(hub)  # type: ignore[arg-type]


def test_workers(run: Callable[[str, str], Example]) -> None:
    port = free_port()
    item = run("workers", example("workers", p8000=port))

    async def probe() -> None:
        from tornado.httpclient import AsyncHTTPClient

        await listening(item, port)
        stream = await RawStream.open(port, "/events")
        assert stream.status == 200
        await stream.read_until(lambda s: b"id: " in s.raw)
        client = AsyncHTTPClient()
        ids = []
        for n in range(8):  # over new connections: the kernel spreads them among the workers
            reply = await client.fetch(
                f"http://127.0.0.1:{port}/publish",
                method="POST",
                body=urllib.parse.urlencode({"text": f"hello {n}"}),
                headers={"Connection": "close"},
            )
            ids.append(json.loads(reply.body)["id"])
        await stream.read_until(lambda s: len(s.events) >= 8, TIMEOUT)
        assert [(e.id, e.data) for e in stream.events] == [
            (event_id, f"hello {n}") for n, event_id in enumerate(ids)
        ]
        stream.close()

    asyncio.run(probe())
    item.process.send_signal(signal.SIGTERM)
    assert item.process.wait(TIMEOUT) == 0, item.text()


def test_redis_feed(run: Callable[[str, str], Example], tmp_path: Path) -> None:
    from tornado_sse.broker.redis import RedisBroker

    port = free_port()
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis") as redis:
        item = run("redis_feed", example("redis_feed", p6379=redis.port, p8000=port))

        async def probe() -> None:
            await listening(item, port)
            stream = await RawStream.open(port, "/events")
            assert stream.status == 200
            await stream.read_until(lambda s: b"id: " in s.raw)
            broker = RedisBroker(redis.url)
            try:
                event_id = await broker.publish("news", "over redis")
            finally:
                await broker.close()
            await stream.read_until(lambda s: s.events, TIMEOUT)
            assert [(e.id, e.data) for e in stream.events] == [(event_id, "over redis")]
            stream.close()

        asyncio.run(probe())


def test_metrics_setup(run: Callable[[str, str], Example]) -> None:
    item = run("metrics_setup", example("metrics_setup"))
    assert item.process.wait(TIMEOUT) == 0, item.text()
    assert "tornado_sse_connections_open" in item.text()


def test_private_feed(run: Callable[[str, str], Example]) -> None:
    """Serves a private channel, opens it with a token it made, prints the welcome, exits."""
    item = run("private_feed", example("private_feed", p8888=free_port()))
    assert item.process.wait(TIMEOUT) == 0, item.text()
    assert item.text() == "welcome, alice\n"


def test_ratelimit_example(tmp_path: Path) -> None:
    path = tmp_path / "ratelimit_example.py"
    path.write_text(example("ratelimit_example"), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2001:db8::/64: try again in 1.0 s\n"
