"""Shared fixtures. pytest-tornado provides ``io_loop``, ``http_server``, ``base_url``; tests define
``app``. pytest-jupyter is loaded only under ``tests/jupyter`` (its fixtures would override these).
"""

from __future__ import annotations

import os

import pytest

from tornado_sse.connections import ConnectionSet
from tornado_sse.metrics import Metrics

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip when a real component is missing locally; under CI=true, fail instead."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required component missing under CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _fresh_metrics() -> None:
    Metrics._default = None
    ConnectionSet._instances.clear()


@pytest.fixture
def port(http_server: object, http_port: int) -> int:
    """The port of pytest-tornado's server running the test's ``app`` fixture."""
    return http_port
