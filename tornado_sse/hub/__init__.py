"""The standalone hub: ``tornado-sse serve``.

A backend in any language POSTs an event to ``/publish``; browsers follow ``/events``. The
operator's contract (endpoints, status codes, flags, metrics, signals, access) is
``docs/serve.md``; keep the two in step.

The hub is a thin layer over the core: `HubEventsHandler` is an `.EventStreamHandler` configured
through Application settings, publishing goes through the broker, and ``/metrics`` exposes the
same `.Metrics` an embedded application would register itself. One job per module:

* ``app.py``: the Tornado application and its handlers (``/events``, ``/publish``,
  ``/healthz``, ``/metrics``, ``/client.js``);
* ``access.py``: who may follow, publish and scrape;
* ``limits.py``: rate limits on new streams and publishes;
* ``presence.py``: ``GET /presence``, who follows a channel;
* ``options.py``: the flags of ``tornado-sse serve``, checked at parse time, as one `HubOptions`;
* ``run.py``: the broker, the sockets, the signals and the processes;
* ``logs.py``: text or JSON log lines, with credentials redacted.

Deliberate choices:

* **The request body limit is ours, not Tornado's.** Past ``max_body_size`` Tornado drops the
  connection without an answer, so a publisher cannot tell "too large" from "hub crashed".
  `PublishHandler` streams the body (``@stream_request_body``), counts it itself (chunked
  bodies included) and answers 413. A refused body of reasonable size is read to its end and
  discarded before the answer, so the client is not reset while still sending (which could
  lose the 413); a body announced (or sent) far past the limit, or one sent after
  ``Expect: 100-continue``, is answered at once and the connection closed.
* **Under** ``--processes`` **the limit is bounded by the bridge** (issue 12): a
  ``--max-body-size`` past what one bridge frame carries is refused at start, and an event that
  still outgrows it (non-string data is re-encoded as compact JSON, where ``1e15`` becomes
  ``1000000000000000.0``) is answered 413 (`.EventTooLargeError`), never 500.
* **Sockets are bound before anything else is built** (`serve`): ``--processes`` forks after
  binding and before any event loop or broker exists, so each worker builds its own; bind
  errors are reported as a clean command-line error.
* **Every broker is made by** `make_broker`, the one place a backend (``--redis``, the bridge
  behind ``--processes``) plugs in.
* **Running out is not a crash** (`.HubHTTPServer`, issue 12 item 4): out of file descriptors,
  the hub pauses accepting instead of spinning on ``accept()``, and connections that are not
  streams are bounded in time (``--idle-connection-timeout``) and number
  (``--max-idle-connections``).
* **A scrape gets the whole hub's totals** (issue 12 item 14): under ``--processes N`` a scrape
  lands on one worker, so that worker collects every worker's `.Metrics.samples` through the
  bridge (`.BridgeBroker.collect_metrics`, at most about a second) and adds them up; counts of
  one worker alone would be a random fraction. Log lines name their worker (`ProcessFilter`).
* **SIGTERM drains** (issue 15, item 4): the streams close one by one over ``--drain`` seconds
  (2 by default, inside the 5 s stop), each after a jittered ``retry:``
  (`.ConnectionSet.close` with a window), so that a rolling restart moves clients to the other
  instances gradually instead of in one ``retry:`` window.
* **The garbage collector is tuned** (issue 15, item 2): once listening, the hub freezes what
  start-up built and raises the collector's thresholds (`.gcpolicy`), since many long-lived
  streams make CPython's defaults walk the whole heap again and again during a connect storm.
* **Access is decided in one place**, `.access.HubAccess` (issue 13): closed by default
  (every stream 401 until ``--public-channel``, ``--jwt-*`` or ``--auth-url`` opens
  channels), a bad token never taken for anonymous, an ``--auth-url`` outage shedding
  streams rather than letting them in or locking them out.
* **No secret reaches a log**: the token is compared with `hmac.compare_digest` and never
  logged; the access log redacts query parameters that look like credentials.
"""

from ..publish import PublishError, PublishRequest, parse_publish
from .access import HubAccess
from .app import HubEventsHandler, PublishHandler, make_app
from .logs import JsonFormatter, configure_logging
from .options import TOKEN_ENV, HubOptions, serve_command
from .run import bind, make_broker, run_hub, serve

__all__ = [
    "TOKEN_ENV",
    "HubAccess",
    "HubEventsHandler",
    "HubOptions",
    "JsonFormatter",
    "PublishError",
    "PublishHandler",
    "PublishRequest",
    "bind",
    "configure_logging",
    "make_app",
    "make_broker",
    "parse_publish",
    "run_hub",
    "serve",
    "serve_command",
]
