"""Worker membership: which workers the router knows, which are healthy, which are busy.

The router keeps one entry per worker in the dense arrays of its
:class:`~kvroute.load.LoadTracker` (positions ``0 .. n-1``, so policies get
zero-copy slices): its id, health, load and the metrics it reports.
:class:`Members` is the one place that adds and removes workers, changes
their health, stores what they report, and answers what follows from it:

* a worker is **known** from ``add`` until ``remove``; adding a known worker
  changes nothing;
* a known worker is **healthy** until ``set_healthy(w, False)``; an
  unhealthy worker keeps its blocks and its load but is never a candidate;
* a worker is **busy** when it reaches any limit of the
  :class:`~kvroute.config.BusyThreshold` (never, without one); the fleet is
  **saturated** when no healthy worker is free of it, which is when the
  admission queue holds requests back.

Everything the router keeps elsewhere about a worker (its blocks in the
index, predicted residency, pins) is the router's to drop when ``remove``
says the worker is gone.

>>> from kvroute.load import LoadTracker
>>> m = Members(LoadTracker(), BusyThreshold(max_kv_usage=0.9))
>>> m.add(7), m.add(8), m.add(7)
(True, True, False)
>>> m.set_healthy(8, False), m.all_healthy, m.is_healthy(8), m.workers()
(True, False, False, [7, 8])
>>> m.set_metrics(7, waiting=None, kv_usage=0.95), m.busy_mask(2).tolist(), m.saturated()
(True, [True, False], True)
>>> m.remove(8), m.remove(8), m.all_healthy
([], None, True)

Not thread-safe on its own: the router calls it under its lock.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .config import BusyThreshold
from .load import LoadTracker, RequestKey
from .policies.base import check_nonneg

__all__ = ["Members", "WorkerMetrics", "check_capacity", "check_metrics"]

#: ``(waiting_requests, kv_usage, kv_capacity_blocks)``, each None when not reported.
WorkerMetrics = tuple[float | None, float | None, int | None]


def check_capacity(kv_capacity_blocks: object) -> int | None:
    """A worker's KV capacity in blocks, validated; None stays None.

    :raises TypeError, ValueError: not a finite number >= 0.
    """
    if kv_capacity_blocks is None:
        return None
    return int(check_nonneg(kv_capacity_blocks, "kv_capacity_blocks"))


def check_metrics(
    waiting_requests: object, kv_usage: object, kv_capacity_blocks: object
) -> WorkerMetrics:
    """Validate worker-reported metrics (None: not reported).

    >>> check_metrics(3, 0.5, None)
    (3.0, 0.5, None)
    >>> check_metrics(None, 1.5, None)
    Traceback (most recent call last):
    ...
    ValueError: kv_usage must be in [0, 1], got 1.5

    :raises TypeError, ValueError: a metric that is not a finite number in range.
    """
    wr = None if waiting_requests is None else check_nonneg(waiting_requests, "waiting_requests")
    ku = None if kv_usage is None else check_nonneg(kv_usage, "kv_usage")
    if ku is not None and ku > 1.0:
        raise ValueError(f"kv_usage must be in [0, 1], got {kv_usage!r}")
    return wr, ku, check_capacity(kv_capacity_blocks)


class Members:
    """The workers a router knows, their health, their reported metrics and their busy state.

    :param load: the tracker whose arrays hold one entry per worker.
    :param busy: when a worker counts as busy (None: never).
    """

    def __init__(self, load: LoadTracker, busy: BusyThreshold | None = None) -> None:
        self._load = load
        self.busy = busy
        #: True when every known worker is healthy (then routing skips the health filter).
        self.all_healthy = True
        # one read-only all-False mask per fleet size, not a fresh array per request
        self._free = np.zeros(0, np.bool_)
        self._update()

    def __len__(self) -> int:
        """Known workers, healthy or not."""
        return self._load.n

    def __contains__(self, worker: object) -> bool:
        """Whether ``worker`` is known."""
        return worker in self._load.pos

    def workers(self) -> list[int]:
        """Known workers (healthy or not), ascending."""
        return sorted(self._load.pos)

    def add(self, worker: int) -> bool:
        """Add a worker, healthy and idle. False (and nothing changes) if it is known."""
        if worker in self._load.pos:
            return False
        self._load.add_worker(worker)
        self._update()
        return True

    def remove(self, worker: int) -> list[RequestKey] | None:
        """Forget a worker and its load; return the ids of its requests in flight.

        :returns: None if the worker is unknown.
        """
        if worker not in self._load.pos:
            return None
        dropped = self._load.remove_worker(worker)
        self._update()
        return dropped

    def set_healthy(self, worker: int, healthy: bool) -> bool:
        """Mark a worker healthy or not. False if it is unknown."""
        p = self._load.pos.get(worker)
        if p is None:
            return False
        self._load.healthy[p] = healthy
        self._update()
        return True

    def is_healthy(self, worker: int) -> bool:
        """Whether ``worker`` is known and healthy."""
        p = self._load.pos.get(worker)
        return p is not None and bool(self._load.healthy[p])

    def set_metrics(self, worker: int, waiting: float | None, kv_usage: float | None) -> bool:
        """Store what a worker reports (None leaves a metric unchanged). False if unknown."""
        return self._load.set_metrics(worker, waiting, kv_usage)

    def load(self, worker: int) -> dict[str, float | int | bool]:
        """The router's view of one worker: its load, reported metrics and health.

        :raises KeyError: unknown worker.
        """
        lt = self._load
        p = lt.pos[worker]
        return {
            "prefill_tokens": float(lt.prefill_tokens[p]),
            "decode_blocks": float(lt.decode_blocks[p]),
            "active_requests": int(lt.active[p]),
            "waiting_requests": float(lt.waiting[p]),
            "kv_usage": float(lt.kv_usage[p]),
            "healthy": bool(lt.healthy[p]),
        }

    def busy_mask(self, n: int) -> npt.NDArray[np.bool_]:
        """Per position ``0 .. n-1``, whether that worker is busy.

        Without a threshold: one shared read-only all-False array per ``n``.
        Runtime complexity: O(n) numpy work per limit set.
        """
        b = self.busy
        if b is None:
            f = self._free
            if len(f) != n:
                f = self._free = np.zeros(n, np.bool_)
                f.flags.writeable = False
            return f
        lt = self._load
        busy = np.zeros(n, np.bool_)
        if b.max_prefill_tokens is not None:
            busy |= lt.prefill_tokens[:n] >= b.max_prefill_tokens
        if b.max_active_requests is not None:
            busy |= lt.active[:n] >= b.max_active_requests
        if b.max_waiting_requests is not None:
            busy |= lt.waiting[:n] >= b.max_waiting_requests
        if b.max_kv_usage is not None:
            busy |= lt.kv_usage[:n] >= b.max_kv_usage
        return busy

    def saturated(self) -> bool:
        """Whether no healthy worker is free of the busy threshold (never without one)."""
        if self.busy is None:
            return False
        lt = self._load
        free = ~self.busy_mask(lt.n) & lt.healthy[: lt.n]
        return not bool(free.any())

    def _update(self) -> None:
        lt = self._load
        self.all_healthy = bool(lt.healthy[: lt.n].all())

    def _check(self) -> None:
        """The cached health summary matches the arrays; AssertionError if not."""
        lt = self._load
        assert self.all_healthy == bool(lt.healthy[: lt.n].all()), "health summary drifted"
