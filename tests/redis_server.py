"""A real ``redis-server`` for tests: a child process on a free loopback port.

`RedisServer` starts ``redis-server`` directly (argument list, no shell), waits until it answers
``PING`` (bounded), and stops exactly the process it started. Tests that kill and restart Redis
make their own (``persist=True`` keeps the data across a restart with an fsync'd append-only
file); the rest share the session's server through the ``redis_url`` fixture and keep apart by
key prefix (``redis_prefix``).

Import the fixtures into a test module::

    from tests.redis_server import redis_prefix, redis_server, redis_url  # noqa: F401
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.helpers import free_port

START_TIMEOUT = 10.0


def redis_server_path() -> str:
    """The ``redis-server`` executable; skips locally (fails under CI) when it is missing."""
    path = shutil.which("redis-server")
    require(path is not None, "redis-server is not installed (apt-get install redis-server)")
    assert path is not None
    return path


class RedisServer:
    """One ``redis-server`` child process bound to 127.0.0.1.

    :param directory: its working directory (append-only file, logs).
    :param persist: keep data across :meth:`restart` (``appendonly yes``, ``appendfsync always``);
        otherwise nothing is ever written to disk and a restart comes back empty.
    :param args: extra ``redis-server`` arguments, e.g. ``["--requirepass", "secret"]``.
    :param tls: ``(certificate, key)`` files: serve TLS only (see `make_certificate`).
    """

    def __init__(
        self,
        directory: Path,
        *,
        persist: bool = False,
        args: list[str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.executable = redis_server_path()
        self.directory = directory
        self.persist = persist
        self.args = list(args or [])
        self.tls = tls
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.persist
            else ["--appendonly", "no", "--save", ""]
        )
        if self.tls is not None:
            cert, key = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert)]
            ports += ["--tls-key-file", str(key), "--tls-auth-clients", "no"]
        else:
            ports = ["--port", str(self.port)]
        return [
            self.executable,
            *ports,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
            *persistence,
            *self.args,
        ]

    def start(self) -> None:
        """Start on a free port (the same port again after :meth:`stop`); wait for ``PING``."""
        assert self.process is None, "already running"
        fixed = self.port != 0
        for _ in range(5):
            if not fixed:
                self.port = free_port()
            self.process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=self.directory,
            )
            if self._wait_ready():
                return
            self._reap()
            if fixed:
                # The port of a killed server is free at once (Redis sets SO_REUSEADDR).
                time.sleep(0.05)
        log = self.directory / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.01)
        return False

    def ping(self) -> bool:
        """Whether the server answers ``PING`` (an auth error counts: it is answering)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as raw:
                sock = raw
                if self.tls is not None:
                    context = ssl.create_default_context(cafile=str(self.tls[0]))
                    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
                with sock:  # the TLS socket is a new object: close it too
                    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                    reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")

    def _reap(self) -> None:
        process = self.process
        self.process = None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait(timeout=START_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown save) and wait for it to be gone."""
        process = self.process
        assert process is not None, "not running"
        self.process = None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=START_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM the server and wait (SIGKILL if it lingers). Idempotent."""
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=START_TIMEOUT)

    def restart(self) -> None:
        """Kill and start again on the same port."""
        self.kill()
        self.start()

    def call(self, *args: str | int) -> object:
        """Send one command (``call("SAVE")``) on a short-lived connection; return the reply."""
        import redis

        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=START_TIMEOUT) as client:
            return client.execute_command(*args)

    def info(self, section: str) -> dict[str, str]:
        """``INFO <section>`` as ``{field: value}`` strings."""
        reply = self.call("INFO", section)
        assert isinstance(reply, dict)
        return {str(key): str(value) for key, value in reply.items()}

    def wait_in_sync(self, primary: RedisServer) -> None:
        """As a replica of *primary*: wait (bounded) until it holds every write *primary* has
        acknowledged so far."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica on port {self.port} did not connect to its primary")
            time.sleep(0.01)
        copies = primary.call("WAIT", 1, int(START_TIMEOUT * 1000))
        if copies != 1:
            raise RuntimeError(f"replica on port {self.port} did not acknowledge the writes")

    def detach(self) -> None:
        """As a replica: stop receiving writes but stay a (lagging) replica, by following a
        primary that does not exist. Its data stays as it was."""
        self.call("REPLICAOF", "127.0.0.1", str(free_port()))

    def promote(self, port: int) -> None:
        """Failover: listen on *port* instead (the dead primary's, so clients reconnect to this
        server) and stop being a replica (``REPLICAOF NO ONE``)."""
        self.call("CONFIG", "SET", "port", str(port))
        self.port = port
        self.call("REPLICAOF", "NO", "ONE")

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the ``openssl`` command."""
    openssl = shutil.which("openssl")
    require(openssl is not None, "openssl is not installed")
    assert openssl is not None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's shared ``redis-server`` (no persistence)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the shared server, checked to be still up."""
    assert redis_server.ping(), "the shared redis-server is not answering"
    return redis_server.url


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of its own for each test on the shared server."""
    return f"test-{uuid.uuid4().hex[:12]}:"
