"""Nchan, the nginx pub/sub module written in C, when nginx and its module are installed.

nginx runs as a plain child process (``daemon off``, one process) with a configuration and a
prefix of our own in a temporary directory, listening on loopback only. nginx cannot run the
benchmark's publish driver, so the load generator POSTs the events to its publisher location,
one at a time over one keep-alive connection (on the load generator's core).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["MODULE_PATHS", "available", "write_config"]

MODULE_PATHS = (
    "/usr/lib/nginx/modules/ngx_nchan_module.so",
    "/usr/share/nginx/modules/ngx_nchan_module.so",
)

CONFIG = """\
load_module {module};
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections {connections};
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    nchan_shared_memory_size 256M;
    server {{
        listen {host}:{port} backlog={backlog};
        location = /events {{
            nchan_subscriber eventsource;
            nchan_subscriber_first_message newest;
            nchan_channel_id bench;
            {ping}
        }}
        location = /publish {{
            nchan_publisher;
            nchan_channel_id bench;
            nchan_message_buffer_length 1000;
            nchan_message_timeout 1h;
        }}
    }}
}}
"""


def module_path() -> str | None:
    """The Nchan module's path, or ``None`` if it is not installed."""
    for path in MODULE_PATHS:
        if os.path.exists(path):
            return path
    return None


def available() -> str | None:
    """``None`` if nginx and Nchan can run here, else why not."""
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        return "not installed (nginx missing)"
    if module_path() is None:
        return "not installed (libnginx-mod-nchan missing)"
    return None


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def write_config(
    prefix: Path, host: str, port: int, heartbeat: float, backlog: int, nofile: int
) -> Path:
    """Write the configuration into *prefix* and return its path."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    ping = (
        f"nchan_eventsource_ping_interval {max(1, round(heartbeat))};\n"
        "            nchan_eventsource_ping_comment '';"
        if heartbeat
        else ""
    )
    path = prefix / "nginx.conf"
    path.write_text(
        CONFIG.format(
            module=module_path(),
            prefix=prefix,
            host=host,
            port=port,
            backlog=backlog,
            nofile=nofile,
            connections=nofile,
            ping=ping,
        )
    )
    return path
