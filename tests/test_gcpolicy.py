"""`tornado_sse.gcpolicy.settle`: what ``tornado-sse serve`` does to the garbage collector once
started (issue 15, item 2). In a subprocess: freezing is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import gc, json
import tornado_sse.gcpolicy as gcpolicy
built = [[n] for n in range(1000)]  # start-up's objects
gcpolicy.settle()
print(json.dumps({
    "threshold": gc.get_threshold(),
    "frozen": gc.get_freeze_count(),
    "young": gc.get_count()[0],
}))
"""


def test_settle_freezes_what_start_up_built_and_raises_the_thresholds() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    state = json.loads(done.stdout)
    assert state["threshold"] == [50_000, 20, 100]
    assert state["frozen"] >= 1000  # start-up's lists at least, out of every collection
    assert state["young"] < 100
