"""The extension examples of docs/jupyter.md (and README.md), run as written in a real server
(and Chromium)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from traitlets.config import Config

from tests.conftest import require
from tests.jupyter.conftest import SSEServer, server_config

DOCS = Path(__file__).parents[2] / "docs" / "jupyter.md"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def example_source(name: str) -> str:
    """The example of docs/jupyter.md that starts with ``# <name>.py`` (tests/test_readme.py
    checks that README.md prints the same)."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    (source,) = [block for block in blocks if re.match(rf"# {name}\.py\b", block)]
    return str(source)


def load_example(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    (tmp_path / f"{name}.py").write_text(example_source(name), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


@pytest.fixture
def progress_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    module = load_example("progress_demo", tmp_path, monkeypatch)
    module.STEP_SECONDS = 0.02
    yield module
    sys.modules.pop("progress_demo", None)


@pytest.fixture
def builds_ext(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield load_example("builds_ext", tmp_path, monkeypatch)
    sys.modules.pop("builds_ext", None)


@pytest.fixture
def jp_server_config(progress_demo: ModuleType, builds_ext: ModuleType) -> Config:
    return server_config(
        server={
            "jpserver_extensions": {
                "tornado_sse.jupyter": True,
                "progress_demo": True,
                "builds_ext": True,
                "jupyter_server_terminals": False,
            }
        }
    )


def percents(stream: Any) -> list[int]:
    return [json.loads(e.data)["percent"] for e in stream.events if e.event == "progress"]


async def test_example_extension_over_http(sse_server: SSEServer) -> None:
    page = await sse_server.fetch(sse_server.path("progress"), headers=sse_server.auth)
    assert page.code == 200
    assert b"new EventSource(baseUrl + " in page.body
    assert f'data-base-url="{sse_server.base_url}"'.encode() in page.body

    stream = await sse_server.get_stream("progress/events")
    assert stream.status == 200
    started = await sse_server.fetch(
        sse_server.path("progress/start"), method="POST", body=b"", headers=sse_server.auth
    )
    assert started.code == 202
    await stream.read_until(lambda s: 100 in percents(s))
    assert percents(stream) == list(range(0, 101, 10))

    anonymous = await sse_server.get_stream("progress/events", auth=False)
    await anonymous.read_to_end()
    assert anonymous.status == 403


@pytest.mark.browser
async def test_example_extension_in_chromium(sse_server: SSEServer) -> None:
    require(CHROMIUM is not None, "chromium is not installed")
    from playwright.async_api import async_playwright

    url = f"http://127.0.0.1:{sse_server.port}{sse_server.path('progress', token=sse_server.token)}"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = await browser.new_page()
            await page.goto(url)
            # start once the stream is open, so every progress event reaches the page
            await page.wait_for_function("() => events.readyState === EventSource.OPEN")
            await page.click("#start")
            await page.wait_for_function(
                "() => document.getElementById('label').textContent === '100%'", timeout=10_000
            )
            assert await page.eval_on_selector("#bar", "bar => bar.value") == 100
        finally:
            await browser.close()


async def test_publishing_from_another_extension(sse_server: SSEServer) -> None:
    stream = await sse_server.stream("builds/42")
    assert stream.status == 200
    posted = await sse_server.fetch(
        sse_server.path("builds/42/step"),
        method="POST",
        body=json.dumps({"step": 3}),
        headers=sse_server.auth,
    )
    assert posted.code == 200, posted.body
    event_id = json.loads(posted.body)["id"]
    events = await stream.events_count(2)
    assert (events[0].id, events[0].event, json.loads(events[0].data)) == (
        event_id,
        "progress",
        {"step": 3},
    )
    assert (events[1].event, events[1].data) == (None, "logged")
    anonymous = await sse_server.fetch(
        sse_server.path("builds/42/step"), method="POST", body=json.dumps({"step": 4})
    )
    assert anonymous.code == 403
