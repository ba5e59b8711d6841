"""The garbage-collector policy of ``tornado-sse serve``, for applications that want the same.

An event-stream server holds many long-lived objects (a dozen or so per open stream) and makes
more at every connect. CPython's defaults suit the opposite: each time the long-lived heap grows
by a quarter, a full collection walks all of it, so a storm of 10,000 connects pays about ten
full collections, each longer than the last (docs/benchmarks.md, "Connection setup"). Two
process-wide settings fix most of it (issue 15, item 2):

* ``gc.freeze()`` once start-up is done: what start-up built (modules, the application, the
  broker) moves to a permanent generation no collection walks again;
* higher thresholds (`THRESHOLDS`): a young collection every 50,000 net allocations instead of
  700, and a full one after 100 middle ones instead of 10. Streams are not cyclic garbage (a
  closed stream is freed by reference counting), so collecting less often loses little memory.

The hub applies it (`settle`) once it listens and its broker is up. A library must not make this
choice for the process it is embedded in, so `.EventStreamHandler` does not; an application
that serves many streams may call `settle` itself once it has started::

    server.listen(8000)
    await broker.start()
    tornado_sse.gcpolicy.settle()
"""

from __future__ import annotations

import gc

__all__ = ["THRESHOLDS", "settle"]

#: ``gc.set_threshold`` arguments the hub uses (CPython's default: 700, 10, 10)
THRESHOLDS = (50_000, 20, 100)


def settle(thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
    """Collect once, freeze what survives (start-up's objects) and set *thresholds*.

    Call it once, after start-up and before serving. Calling it again freezes what was built in
    between too (``gc.unfreeze()`` undoes freezing).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
