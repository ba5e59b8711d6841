"""The extension through the real start path: ``jupyter server`` as a process of its own.

The other tests here run the server in-process with pytest-jupyter, which never calls
``ServerApp.start()`` (the conftest starts the extensions by hand). This one starts a real
server the way a user does (`python -m jupyter_server`, the extension enabled by a config file),
so the extension is loaded, started and stopped by Jupyter itself: a stream opens, a POST to
``sse/publish`` and the server's own event bus (a saved file) reach it, and SIGTERM ends the stream
with HTTP/1.1's last chunk and the server with status 0, with no traceback in its log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import TLS, RawStream, free_port
from tornado_sse.jupyter import schema_channel

CONTENTS_SCHEMA = "https://events.jupyter.org/jupyter_server/contents_service/v1"
TOKEN = "serverapp-start-token-0123456789"
AUTH = {"Authorization": f"token {TOKEN}"}
TIMEOUT = 30.0


class Jupyter:
    def __init__(self, tmp_path: Path) -> None:
        config = tmp_path / "config"
        config.mkdir()
        (config / "jupyter_server_config.json").write_text(
            json.dumps(
                {
                    "ServerApp": {
                        "jpserver_extensions": {
                            "tornado_sse.jupyter": True,
                            "jupyter_server_terminals": False,
                        }
                    },
                    "SSEExtensionApp": {"heartbeat_interval": 60},
                }
            )
        )
        root = tmp_path / "root"
        root.mkdir()
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(config),
            "JUPYTER_CONFIG_PATH": str(config),
            "JUPYTER_DATA_DIR": str(tmp_path / "data"),
            "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
            "JUPYTER_PLATFORM_DIRS": "1",
            "JUPYTER_NO_CONFIG": "",
        }
        self.log_path = tmp_path / "jupyter.log"
        self.port = 0
        for _ in range(5):  # the free port may be taken before the server binds it
            self.port = free_port()
            command = [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root"]
            command += ["--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0"]
            command += [f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}"]
            with self.log_path.open("wb") as log:
                self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            if self._wait_up():
                return
            self.stop()
        raise AssertionError(f"jupyter server did not start:\n{self.log()}")

    def _wait_up(self) -> bool:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                reply = httpx.get(self.url("api/status"), headers=AUTH, timeout=2, verify=TLS)
                if reply.status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


@pytest.fixture
def jupyter(tmp_path: Path) -> Iterator[Jupyter]:
    server = Jupyter(tmp_path)
    yield server
    server.stop()


@pytest.mark.slow
async def test_the_real_start_path(jupyter: Jupyter) -> None:
    channel = schema_channel(CONTENTS_SCHEMA)
    query = f"sse/events?channel=jobs&channel={channel}"
    stream = await RawStream.open(jupyter.port, f"/{query}", AUTH, timeout=TIMEOUT)
    assert stream.status == 200, jupyter.log()
    await stream.read_until(lambda s: s.parser.last_event_id != "", TIMEOUT)
    async with httpx.AsyncClient(headers=AUTH, timeout=TIMEOUT) as client:
        posted = await client.post(
            jupyter.url("sse/publish"), json={"channel": "jobs", "data": "posted"}
        )
        assert posted.status_code == 200, posted.text
        saved = await client.put(
            jupyter.url("api/contents/notes.txt"),
            json={"type": "file", "format": "text", "content": "hello"},
        )
        assert saved.status_code in (200, 201), saved.text
    await stream.read_until(
        lambda s: any(e.data and '"notes.txt"' in e.data for e in s.events), TIMEOUT
    )
    assert (stream.events[0].id, stream.events[0].data) == (posted.json()["id"], "posted")
    save = json.loads(stream.events[-1].data or "")
    assert (save["schema_id"], save["action"], save["path"]) == (
        CONTENTS_SCHEMA,
        "save",
        "notes.txt",
    )

    jupyter.proc.send_signal(signal.SIGTERM)
    await stream.read_to_end(TIMEOUT)
    assert stream.last_chunk  # ended by the extension's stop, not a dropped connection
    stream.close()
    assert jupyter.proc.wait(TIMEOUT) == 0, jupyter.log()
    assert "Traceback" not in jupyter.log()
