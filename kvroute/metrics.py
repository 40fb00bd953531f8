"""Deprecated: the Prometheus metrics moved to :mod:`kvroute.events.metrics`.

``from kvroute.metrics import Metrics`` still works, with a
``DeprecationWarning``, until kvroute 0.2. (The metrics serve the event
subscriber and the proxy, so they live beside them; the core never imports them.)
"""

from __future__ import annotations

import warnings

from .events.metrics import (
    CONTENT_TYPE_LATEST,
    EVENT_STATUSES,
    EventStatus,
    Metrics,
    RateLimitedLog,
)

__all__ = ["CONTENT_TYPE_LATEST", "EVENT_STATUSES", "EventStatus", "Metrics", "RateLimitedLog"]

warnings.warn(
    "kvroute.metrics moved to kvroute.events.metrics; the old name goes in kvroute 0.2",
    DeprecationWarning,
    stacklevel=2,
)
