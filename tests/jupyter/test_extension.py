"""The extension in a real Jupyter server: enabled, listed, configured, routed under base_url."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tornado_sse
from tests.jupyter.conftest import SSEServer, primed_id, server_config
from tornado_sse import InProcessBroker
from tornado_sse.jupyter import SSEExtensionApp, get_broker

CONFIG_FILE = (
    Path(__file__).parents[2] / "jupyter-config" / "jupyter_server_config.d" / "tornado_sse.json"
)


async def test_extension_loaded_with_settings(sse_server: SSEServer) -> None:
    manager = sse_server.app.extension_manager
    package = manager.extensions["tornado_sse.jupyter"]
    assert package.enabled
    point = package.extension_points["tornado_sse"]
    assert point.linked
    assert isinstance(point.app, SSEExtensionApp)
    settings = sse_server.app.web_app.settings
    assert settings["tornado_sse"] is point.app
    assert settings["sse_broker"] is point.app.broker is get_broker(sse_server.app)
    assert get_broker(settings) is get_broker(sse_server.app.web_app) is point.app.broker
    assert isinstance(point.app.broker, InProcessBroker)
    assert settings["sse_heartbeat_interval"] == 15.0
    assert settings["sse_retry_interval"] == 3.0


def test_get_broker_without_extension() -> None:
    with pytest.raises(LookupError, match="jpserver_extensions"):
        get_broker({"base_url": "/"})


def test_shipped_config_file_enables_the_extension() -> None:
    assert json.loads(CONFIG_FILE.read_text()) == {
        "ServerApp": {"jpserver_extensions": {"tornado_sse.jupyter": True}}
    }


@pytest.fixture
def config_dir_with_shipped_file(jp_env_config_path: Path) -> Path:
    target = jp_env_config_path / "jupyter_server_config.d"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFIG_FILE, target)
    return jp_env_config_path


@pytest.mark.parametrize(
    "jp_server_config",
    [server_config(server={"jpserver_extensions": {"jupyter_server_terminals": False}})],
)
async def test_config_file_alone_loads_the_extension(
    config_dir_with_shipped_file: Path, sse_server: SSEServer
) -> None:
    assert sse_server.app.jpserver_extensions.get("tornado_sse.jupyter") is True
    stream = await sse_server.stream("news")
    assert stream.status == 200


def test_extension_manager_lists_it(tmp_path: Path) -> None:
    """``jupyter server extension list`` (a real process) finds, enables and validates it."""
    config_dir = tmp_path / "config"
    (config_dir / "jupyter_server_config.d").mkdir(parents=True)
    shutil.copy(CONFIG_FILE, config_dir / "jupyter_server_config.d")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config_dir), "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "jupyter_server", "extension", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    output = result.stdout + result.stderr
    assert "tornado_sse.jupyter" in output
    lines = [line for line in output.splitlines() if "tornado_sse.jupyter" in line]
    assert any("enabled" in line for line in lines), output
    assert any("OK" in line and tornado_sse.__version__ in line for line in lines), output


@pytest.mark.parametrize(
    "jp_server_config",
    [server_config(heartbeat_interval=0.05, retry_interval=1.0, history_size=2)],
)
async def test_traitlets_flow_into_handler_settings(sse_server: SSEServer) -> None:
    settings = sse_server.app.web_app.settings
    assert settings["sse_heartbeat_interval"] == 0.05
    assert settings["sse_retry_interval"] == 1.0
    assert sse_server.broker.history_size == 2

    stream = await sse_server.stream("news")
    await stream.read_until(lambda s: s.raw.split(b"\n").count(b":") >= 2)
    retry = int(stream.raw.split(b"\n")[0].removeprefix(b"retry: "))
    assert 1000 <= retry <= 1500  # retry_interval, jittered upwards by up to half
    assert not stream.events  # nothing published yet: the priming id only, not dispatched

    position = await primed_id(stream)
    for n in range(3):
        await sse_server.broker.publish("news", str(n))
    # history_size=2: the first of the three is gone, so the client is told, not silently skipped
    reset = await sse_server.stream("news", headers={"Last-Event-ID": position})
    await sse_server.broker.publish("news", "live")
    events = await reset.events_count(2)
    assert [(e.event, e.data) for e in events][1:] == [(None, "live")]
    assert events[0].event == "stream-reset"
    # within history: exactly the missed events
    resumed = await sse_server.stream("news", headers={"Last-Event-ID": events[0].id})
    await sse_server.broker.publish("news", "after")
    assert [e.data for e in await resumed.events_count(2)] == ["live", "after"]


@pytest.mark.parametrize("jp_server_config", [server_config(max_connections=1)])
async def test_max_connections_sheds_with_retry(sse_server: SSEServer) -> None:
    first = await sse_server.stream("news")
    assert first.status == 200 and not first.ended
    second = await sse_server.stream("news")
    assert second.status == 200
    assert "retry-after" in second.headers
    await second.read_to_end()
    assert second.raw.startswith(b"retry: ")


@pytest.mark.parametrize("jp_base_url", ["/", "/deep/prefix/"])
async def test_routes_follow_base_url(sse_server: SSEServer, jp_base_url: str) -> None:
    stream = await sse_server.stream("news")
    assert stream.status == 200
    await sse_server.broker.publish("news", "under " + jp_base_url)
    events = await stream.events_count(1)
    assert events[0].data == "under " + jp_base_url
    posted = await sse_server.fetch(
        sse_server.path("sse/publish"),
        method="POST",
        headers=sse_server.auth,
        body=json.dumps({"channel": "news", "data": "posted"}),
    )
    assert posted.code == 200
    await stream.events_count(2)
    if jp_base_url != "/":
        outside = await sse_server.fetch("/sse/events?channel=news", headers=sse_server.auth)
        assert outside.code == 404


def test_package_imports_little_until_linked() -> None:
    """Jupyter imports every enabled extension package at start (and ``extension list`` imports
    them all): ``tornado_sse.jupyter`` loads jupyter_server only when the extension is linked."""
    script = (
        "import sys, tornado_sse.jupyter as j\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in"
        " ('jupyter_server', 'jupyter_events', 'traitlets')], sorted(sys.modules)\n"
        "points = j._jupyter_server_extension_points()\n"
        "assert 'jupyter_server' in sys.modules and points[0]['app'] is j.SSEExtensionApp\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
