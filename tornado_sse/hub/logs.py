"""The hub's logs: text or JSON lines, and no credential in any of them."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

import tornado.web

from ..redaction import RedactingFilter, redact_url

access_log = logging.getLogger("tornado.access")
log = logging.getLogger("tornado_sse.server")


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """The access log: method, path (credentials redacted), status, client, duration."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if not access_log.isEnabledFor(level):
        return
    request = handler.request
    path = redact_url(request.uri or "")
    duration = 1000.0 * request.request_time()
    access_log.log(
        level,
        "%d %s %s (%s) %.2fms",
        status,
        request.method,
        path,
        request.remote_ip,
        duration,
        extra={
            "status": status,
            "method": request.method,
            "path": path,
            "client": request.remote_ip,
            "duration_ms": round(duration, 3),
        },
    )


class TextFormatter(logging.Formatter):
    """`logging.Formatter` that formats the time of day once a second, not once a line: at
    ``info`` the hub writes a line for every stream that opens and closes, thousands a second
    in a reconnect storm (issue 15, item 2)."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(
                datefmt or self.default_time_format, self.converter(record.created)
            )
            self._second = second
        if datefmt:
            return self._stamp
        return f"{self._stamp},{int(record.msecs):03d}"  # logging's default_msec_format


class JsonFormatter(TextFormatter):
    """One JSON object per line: time, level, logger, message and the access log's fields."""

    FIELDS = ("pid", "worker", "status", "method", "path", "client", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


JsonFormatter.converter = time.gmtime


class ProcessFilter(logging.Filter):
    """Says which process wrote a line: ``worker``, the worker's index under ``--processes``
    (absent otherwise), and ``where`` for text lines: ``worker 1, pid 4242``, ``supervisor,
    pid 4240`` or ``pid 4242``. (``pid`` is the record's own ``process``.)"""

    def __init__(self) -> None:
        super().__init__()
        #: (pid, worker) -> where: the same for every line of a process once it is a worker
        self._where: dict[tuple[int | None, int | None], str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        group = sys.modules.get("tornado_sse.process")
        worker = group.task_id() if group is not None else None
        pid = record.pid = record.process
        record.worker = worker
        where = self._where.get((pid, worker))
        if where is None:
            if worker is not None:
                where = f"worker {worker}, pid {pid}"
            elif group is not None and group.is_supervisor():
                where = f"supervisor, pid {pid}"
            else:
                where = f"pid {pid}"
            self._where[(pid, worker)] = where
        record.where = where
        return True


#: lines a second of one kind written at most by default (``--log-flood-limit``)
DEFAULT_FLOOD_LIMIT = 100


class FloodFilter(logging.Filter):
    """Keeps the lines that every stream and request writes from flooding the log in a storm.

    Lines of one kind (the same format string: ``stream open: ...``, ``stream closed: ...``,
    the access log's) pass up to *limit* a second; the rest of that second are left out and
    counted, and once the second is over one line says how many of each kind were left out. A
    reconnect storm of 10,000 streams would otherwise write about 30,000 lines in a few seconds
    (an open, a close and an access line each), and writing them was a tenth of what its
    connects cost the hub (issue 15, item 2). Warnings and errors always pass.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self._second = 0
        #: lines of each kind this second (by format string), and those left out
        self._counts: dict[object, int] = {}
        self._dropped: dict[object, int] = {}
        self._reporting = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._counts.clear()
            if self._dropped and not self._reporting:
                self._report()
        key = record.msg
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        if count <= self.limit:
            return True
        self._dropped[key] = self._dropped.get(key, 0) + 1
        if not self._reporting:
            loop = asyncio._get_running_loop()
            if loop is not None:  # else the next line after this second reports
                self._reporting = True
                loop.call_later(max(0.0, second + 1 - time.time()), self._report)
        return False

    def _report(self) -> None:
        self._reporting = False
        dropped, self._dropped = self._dropped, {}
        for key, count in dropped.items():
            log.info(
                "left out %d log lines like %r in one second (over %d a second, --log-flood-limit)",
                count,
                str(key)[:60],
                self.limit,
            )


class LoopStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A `logging.StreamHandler` that, on an event loop's thread, flushes its stream once at
    the end of the loop iteration rather than after every line: the lines of a connect storm
    go out in a few writes instead of one system call each (issue 15, item 2). A warning or
    worse, and any line from another thread or without a running loop, is flushed at once;
    so are the lines before it."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._flush_scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            self.stream.write(text + self.terminator)
            if record.levelno < logging.WARNING:
                loop = asyncio._get_running_loop()  # None off the loop's thread: no exception
                if loop is not None:
                    if not self._flush_scheduled:
                        self._flush_scheduled = True
                        loop.call_soon(self._flush_later)
                    return
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _flush_later(self) -> None:
        self._flush_scheduled = False
        self.acquire()
        try:
            self.flush()
        finally:
            self.release()


def lighten_records() -> None:
    """Stop `logging` collecting what no line of the hub shows: the caller's file, line and
    function (a walk up the stack for every record), the thread's name and the multiprocessing
    process name; the switches of the Python logging HOWTO's "Optimization" section. They are
    process-wide, so the hub sets them in its own process only (`.hub.run.serve`); the pid
    stays (`ProcessFilter` writes it). At ``info`` the hub writes a line for every stream that
    opens: a quarter less CPU for each (issue 15, item 2)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


def configure_logging(
    level: str, json_lines: bool, flood_limit: int | None = DEFAULT_FLOOD_LIMIT
) -> None:
    """Log to stderr at *level*, as text or one JSON object per line; each line says which
    process wrote it (`ProcessFilter`). Below warnings, at most *flood_limit* lines a second
    of each kind (`FloodFilter`; ``None``: every line)."""
    handler = LoopStreamHandler(sys.stderr)
    if flood_limit is not None:
        handler.addFilter(FloodFilter(flood_limit))  # first: it counts by format string
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)s %(name)s [%(where)s]: %(message)s")
        )
    handler.addFilter(ProcessFilter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
