"""Kept importable: the hub moved to `tornado_sse.hub` (issue 13), one module per job."""

from .hub import *  # noqa: F403
from .hub import __all__ as __all__
