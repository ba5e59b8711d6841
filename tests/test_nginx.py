"""The hub behind Debian's nginx, with TLS and HTTP/2 to a real Chromium (issue 16).

nginx runs as a plain child process (``daemon off``, one process, every path in a temporary
directory) with a self-signed certificate made here by the ``openssl`` command, in front of a
real ``tornado-sse serve``; the configuration is the one docs/deploy.md recommends. Chromium
(``--ignore-certificate-errors``) opens 10 tabs with plain ``EventSource`` streams: nginx's own
access log, written with ``$connection`` and ``$server_protocol``, shows that they all went over
one HTTP/2 connection. Every wait is bounded and waits for a condition.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import require
from tests.helpers import free_port, wait_until
from tests.test_server import Hub, start_hub
from tornado_sse.script import client_script

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--ignore-certificate-errors",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
]
WAIT = 10_000
TABS = 10

#: what docs/deploy.md recommends, with every path under the test's directory
NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    log_format sse '$connection $server_protocol "$http2" $status $request_method $uri '
                   'upstream=$upstream_status';
    access_log {dir}/access.log sse;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    upstream tornado_sse {{
        server 127.0.0.1:{hub_port};
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        root {dir}/www;

        location = /page.html {{
        }}

        location /events {{
            proxy_pass http://tornado_sse;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 2s;
        }}

        location / {{
            proxy_pass http://tornado_sse;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>plain EventSource</title>
<script>
window.received = [];
window.errors = 0;
window.source = new EventSource('/events?channel=news');
window.source.onmessage = (e) => window.received.push([e.data, e.lastEventId]);
window.source.onerror = () => { window.errors += 1; };
// the raw bytes of another stream, to see the heartbeat comments that EventSource hides
window.readRaw = async (query, headers) => {
  window.raw = '';
  const response = await fetch('/events?' + query, { headers, cache: 'no-store' });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  window.rawController = reader;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    window.raw += decoder.decode(value, { stream: true });
  }
};
</script>
"""


def _nginx() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )


def _playwright_available() -> bool:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return False
    return True


class Nginx:
    def __init__(self, directory: Path, hub_port: int) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        (directory / "www").mkdir()
        (directory / "www" / "page.html").write_text(PAGE)
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        conf = directory / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=directory, port=self.port, hub_port=hub_port))
        binary = _nginx()
        assert binary is not None
        with (directory / "stderr.log").open("wb") as stderr:  # nginx keeps its own copy
            self.proc = subprocess.Popen(
                [binary, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        context = self.tls()
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, "nginx exited:\n" + self.errors()
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1, context=context):
                    break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start:\n" + self.errors()
                time.sleep(0.05)

    @staticmethod
    def tls() -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def errors(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")[-3000:]
            for path in (self.dir / "error.log", self.dir / "stderr.log")
            if path.exists()
        )

    def access(self) -> list[list[str]]:
        path = self.dir / "access.log"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[Hub, Nginx]]:
    require(_nginx() is not None, "nginx is missing (apt-get install nginx)")
    require(shutil.which("openssl") is not None, "openssl is missing (apt-get install openssl)")
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)")
    require(_playwright_available(), "the playwright package is missing (pip install playwright)")
    # --drain 0: stopped with nginx's streams open, it waited out the default 2 s window
    flags = ("--heartbeat", "0.2", "--retry", "200", "--xheaders", "--drain", "0")
    hub = start_hub(tmp_path / "hub.log", *flags)
    nginx = None
    try:
        nginx = Nginx(tmp_path, hub.port)
        yield hub, nginx
    finally:
        hub.stop()
        if nginx is not None:
            nginx.stop()


def test_nginx_build_has_http2_and_tls() -> None:
    binary = _nginx()
    require(binary is not None, "nginx is missing (apt-get install nginx)")
    assert binary is not None
    configure = subprocess.run([binary, "-V"], capture_output=True, text=True, check=True).stderr
    assert "--with-http_v2_module" in configure
    assert "--with-http_ssl_module" in configure


def test_ten_tabs_over_one_http2_connection_through_nginx(
    proxied: tuple[Hub, Nginx],
) -> None:
    hub, nginx = proxied

    async def scenario() -> None:
        from playwright.async_api import async_playwright

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context()
                context.set_default_timeout(WAIT)
                pages = []
                for _ in range(TABS):
                    page = await context.new_page()
                    await page.goto(nginx.url + "/page.html")
                    pages.append(page)
                for page in pages:
                    await page.wait_for_function("() => window.source.readyState === 1")
                await wait_until(lambda: _streams_open(hub) == TABS)

                # live events reach every tab, in order, once
                ids = [hub.publish("news", f"n{n}") for n in range(20)]
                want = [[f"n{n}", ids[n]] for n in range(20)]
                for page in pages:
                    await page.wait_for_function("() => window.received.length >= 20")
                    assert await page.evaluate("window.received") == want

                # heartbeats pass the proxy (EventSource hides them: read one stream raw)
                first = pages[0]
                await first.evaluate("() => { window.readRaw('channel=quiet', {}); }")
                await first.wait_for_function("() => (window.raw.match(/^:$/gm) || []).length >= 3")
                assert await first.evaluate("window.source.readyState") == 1

                # a resume through the proxy is exact: Last-Event-ID header, then query argument
                await first.evaluate("() => window.rawController.cancel()")
                await first.evaluate(
                    "(id) => { window.readRaw('channel=news', {'Last-Event-ID': id}); }", ids[11]
                )
                await first.wait_for_function("() => window.raw.includes('data: n19\\n')")
                raw = str(await first.evaluate("window.raw"))
                assert [line[6:] for line in raw.splitlines() if line.startswith("data: ")] == [
                    f"n{n}" for n in range(12, 20)
                ]
                await first.evaluate("() => window.rawController.cancel()")
                resumed = await context.new_page()
                await resumed.goto(nginx.url + "/page.html")
                await resumed.evaluate(
                    """(id) => {
                        window.source.close();
                        window.received = [];
                        window.source = new EventSource('/events?channel=news&last_event_id=' + id);
                        window.source.onmessage = (e) =>
                          window.received.push([e.data, e.lastEventId]);
                    }""",
                    ids[14],
                )
                await resumed.wait_for_function("() => window.received.length >= 5")
                assert await resumed.evaluate("window.received") == want[15:]
                await resumed.close()

                # shutting the hub down drains every stream through nginx
                hub.proc.send_signal(signal.SIGTERM)
                for page in pages:
                    await page.wait_for_function("() => window.errors >= 1")
                assert hub.proc.wait(10) == 0
                # each tab's reconnect then finds no hub: nginx answers 502, EventSource gives up
                for page in pages:
                    await page.wait_for_function("() => window.source.readyState === 2")
            finally:
                await browser.close()

    asyncio.run(asyncio.wait_for(scenario(), 90))
    # nginx logs a request when it ends. Every stream went over one HTTP/2 connection: the tabs'
    # (ended by the hub's drain, 200 from upstream, none cut short), the raw reads and the resumed
    # page's, then one reconnect per tab once the hub was gone (502: EventSource gives up).
    nginx.stop()
    streams = [line for line in nginx.access() if line[4:6] == ["GET", "/events"]]
    assert {(line[0], line[1], line[2]) for line in streams} == {
        (streams[0][0], "HTTP/2.0", '"h2"')
    }
    drained = [line for line in streams if line[3] == "200"]
    assert len(drained) >= TABS + 4, nginx.access()
    assert {line[6] for line in drained} == {"upstream=200"}
    assert sorted(line[3] for line in streams if line not in drained) == ["502"] * TABS
    assert "prematurely closed" not in nginx.errors()


def test_client_script_through_nginx(proxied: tuple[Hub, Nginx]) -> None:
    _, nginx = proxied
    response = httpx.get(nginx.url + "/client.js", verify=False, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.content == client_script()


def _streams_open(hub: Hub) -> float:
    return hub.metrics().get("tornado_sse_connections_open", -1.0)
