"""Operating ``tornado-sse serve``: its command line refuses bad values, and its log keeps
credentials out. A real hub process (tests.test_server.start_hub) and the real CLI.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.test_server import TOKEN, Hub, start_hub
from tornado_sse.redaction import is_secret_name, redact_url


@pytest.fixture(scope="module")
def json_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A hub logging JSON lines (so that the access line's ``path`` field is checked too)."""
    hub = start_hub(tmp_path_factory.mktemp("ops") / "hub.log", "--log-json")
    yield hub
    hub.stop()


# ---------------------------------------------------------------------- log redaction

#: query parameter -> its secret value; every one must be written as REDACTED
SECRETS = {
    "password": "pw-value-1",
    "api-key": "apikey-value-2",
    "api_token": "apitoken-value-3",
    "API_KEY": "apikey-value-4",
    "apiKey": "apikey-value-5",
    "X-Amz-Signature": "sig-value-6",
    "client_secret": "secret-value-7",
    "sessionId": "session-value-8",
    "passwd": "passwd-value-9",
    "access_token": "token-value-10",
    "Authorization": "auth-value-11",
    "pwd": "pwd-value-12",
}


@pytest.mark.gen_test(timeout=20)
async def test_access_log_redacts_the_credential_family(json_hub: Hub) -> None:
    query = "&".join(f"{name}={value}" for name, value in SECRETS.items())
    assert json_hub.get(f"/healthz?channel=kept-visible&keyword=kept-too&{query}").is_success
    await wait_until(lambda: "kept-visible" in json_hub.log())
    log = json_hub.log()
    for name, value in SECRETS.items():
        assert value not in log, f"{name}'s value reached the log"
        assert f"{name}=REDACTED" in log
    assert "channel=kept-visible" in log and "keyword=kept-too" in log


@pytest.mark.gen_test(timeout=20)
async def test_tornados_own_warnings_are_redacted(json_hub: Hub) -> None:
    # Tornado logs "400 GET <uri> (client): Invalid unicode in channel" itself, quoting the URI.
    reply = json_hub.get("/events?channel=%FF&password=leaky-value&api-key=leaky-key")
    assert reply.status_code == 400
    await wait_until(lambda: "Invalid unicode" in json_hub.log())
    log = json_hub.log()
    assert "leaky-value" not in log and "leaky-key" not in log
    assert "password=REDACTED" in log


@pytest.mark.parametrize(
    "name",
    ["token", "Token", "pass-word", "user.password", "PHPSESSID", "refreshToken", "sig", "otp"],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["channel", "last_event_id", "keyword", "id", "event", "monkey", "author"]
)
def test_ordinary_names(name: str) -> None:
    assert not is_secret_name(name)


# ---------------------------------------------------------------------- command line


def run_serve(*flags: str) -> subprocess.CompletedProcess[str]:
    """``tornado-sse serve FLAGS`` as a real process (it must exit at once: a usage error)."""
    env = {**os.environ, "TORNADO_SSE_TOKEN": TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "tornado_sse.cli", "serve", "--port", "0", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--redis", "not a url"], "--redis"),
        (["--redis", "http://127.0.0.1:6379/0"], "--redis"),
        (["--redis", "redis://127.0.0.1:notaport/0"], "--redis"),
        (["--redis", "redis://127.0.0.1:6379/zero"], "--redis"),
        (["--redis", "redis://127.0.0.1:6379/0?socket_timeout=abc"], "--redis"),
        (["--redis", "unix://"], "--redis"),
        (["--redis", " "], "--redis"),
        (["--host", "not a host"], "--host"),
        (["--host", "http://127.0.0.1"], "--host"),
        (["--host", ""], "--host"),
    ],
)
def test_bad_addresses_are_usage_errors_naming_the_flag(flags: list[str], flag: str) -> None:
    result = run_serve(*flags)
    assert result.returncode == 2, result.stderr
    assert flag in result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot start the broker" not in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://user:pw@redis.internal:6380/2?socket_timeout=5",
        "redis://localhost",
        "unix:///run/redis/redis.sock?db=1",
        "redis://[::1]:6379",
    ],
)
def test_good_redis_urls_pass(url: str) -> None:
    from tornado_sse.cli import RedisUrl

    assert RedisUrl().convert(url, None, None) == url


def test_unbindable_host_is_exit_1(tmp_path: Path) -> None:
    # Well-formed but not an address of this machine: a run-time failure, status 1 (docs/serve.md).
    result = run_serve("--host", "192.0.2.1")
    assert result.returncode == 1, result.stderr
    assert "cannot listen on 192.0.2.1" in result.stderr


def test_demo_redis_url_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tornado_sse.cli", "demo", "--port", "0", "--redis", "not a url"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "--redis" in result.stderr and "Traceback" not in result.stderr


def test_a_password_in_a_refused_redis_url_is_not_echoed() -> None:
    result = run_serve("--redis", "redis://:hunter2-secret@127.0.0.1:6379/zero")
    assert result.returncode == 2, result.stderr
    assert "hunter2-secret" not in result.stderr
    assert "must be a number" in result.stderr


# ---------------------------------------------------------------------- URLs in messages


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("/events?channel=a&password=x", "/events?channel=a&password=REDACTED"),
        ("/events?channel=a", "/events?channel=a"),
        ("/healthz", "/healthz"),
        (
            "http://me:pw@hub.example:8080/events?api-key=k&channel=b#top",
            "http://me:***@hub.example:8080/events?api-key=REDACTED&channel=b#top",
        ),
        (
            "https://hub.example/events?accessToken=t",
            "https://hub.example/events?accessToken=REDACTED",
        ),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.gen_test(timeout=30)
async def test_listen_and_the_client_log_no_credential_from_the_url(json_hub: Hub) -> None:
    secret = "listen-secret-value"
    url = f"{json_hub.url}/events?channel=listened&api_key={secret}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tornado_sse.cli",
        "listen",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), 15)
        assert line.startswith(b"connected to"), line
        proc.send_signal(signal.SIGINT)
        _, rest = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = (line + rest).decode()
    assert secret not in stderr and "api_key=REDACTED" in stderr
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "tornado_sse.cli",
            "listen",
            f"{json_hub.url}/nowhere?token={secret}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 1 and "HTTP 404" in refused.stderr
    assert secret not in refused.stderr and "token=REDACTED" in refused.stderr
