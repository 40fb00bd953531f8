"""Logging helpers shared by the event subscriber and the proxy."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Log a key's problem at most once per ``interval`` seconds (counting the rest).

    >>> log = RateLimitedLog(logging.getLogger("x"), interval=60.0, clock=lambda: 0.0)
    >>> log.warning("w1", "bad frame from %s", "w1")
    True
    >>> log.warning("w1", "bad frame from %s", "w1")   # suppressed within the minute
    False
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: object, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` logged within the interval; True if logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg += " (%d similar messages suppressed)"
            args = (*args, skipped)
        self._logger.warning(msg, *args)
        return True
