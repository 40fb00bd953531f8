"""Outlier detection: a worker that keeps failing generations is taken out for a while.

A worker can answer ``GET /health`` with 200 and fail every generation (a
wedged engine, a broken model, an exhausted disk). Health checks never see
it, and without this part it would keep its share of the traffic, each of
its attempts failed over at the cost of a round trip. Modelled on Envoy's
outlier detection:

- **Consecutive failures eject.** ``eject_after`` attempts in a row that the
  worker failed (a 5xx answer, a connection that broke before the answer, a
  stream that broke mid-way: :meth:`OutlierDetector.failed`) eject it; any
  answer it gave in time (a 4xx included: the client's fault, not the
  worker's) resets the count (:meth:`OutlierDetector.succeeded`). A client
  that hangs up, or a deadline that passes, judges nothing.
- **A growing back-off.** The *n*-th ejection lasts ``ejection_time * n``
  seconds, at most ``max_ejection_time``. The multiplier decays by one for
  each ``ejection_time`` the worker then serves without being ejected.
- **Never the whole fleet.** At most ``max_ejected_percent`` of the workers
  are ejected at once (at least one may be, in a fleet of two or more), and
  never the last worker routing can use: a refused ejection is counted.
- **Probed back.** When its time is up the worker returns *on probation*:
  its next attempt is the probe. Success clears it; a failure ejects it again
  at once, for longer.

Health has one owner, :class:`~kvroute.proxy.workers.WorkerPool`: an
ejection goes through :meth:`~kvroute.proxy.workers.WorkerPool.eject`, which
takes the worker out of routing (without cutting its running requests) and
returns it when the time is up (:meth:`~kvroute.proxy.workers.WorkerPool.release_ejections`).
The ejections, and the workers ejected now, are exported as
``kvroute_worker_ejections_total{worker}``, ``kvroute_worker_ejected{worker}``
and ``kvroute_worker_ejections_refused_total``; ``/health`` shows each
worker's state.

>>> from kvroute import Router
>>> from kvroute.proxy import ProxyConfig, parse_worker
>>> config = ProxyConfig([parse_worker("http://127.0.0.1:9"), parse_worker("http://127.0.0.1:10")],
...                      eject_after=2)
>>> from kvroute.proxy.workers import WorkerPool
>>> pool = WorkerPool(Router(block_size=16, workers=[0, 1]), config)
>>> detector = OutlierDetector(pool, config, clock=lambda: 100.0)
>>> detector.failed(1); detector.failed(1)
>>> pool.healthy(), pool.workers[1].ejected_until, detector.state(1).ejections
([0], 110.0, 1)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ProxyConfig
from .workers import WorkerPool

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

__all__ = ["OutlierDetector", "OutlierState"]

log = logging.getLogger("kvroute.proxy")


@dataclass(slots=True)
class OutlierState:
    """What the detector knows of one worker.

    :ivar consecutive: attempts failed in a row since its last success.
    :ivar ejections: the back-off multiplier: ejections not yet decayed.
    :ivar total_ejections: ejections since the proxy started.
    :ivar probation: back from an ejection, its next attempt not yet judged.
    :ivar since: when ``ejections`` last changed or decayed (the clock's time).
    """

    consecutive: int = 0
    ejections: int = 0
    total_ejections: int = 0
    probation: bool = False
    since: float = 0.0


class OutlierDetector:
    """Ejects workers whose attempts fail in a row; fed by the upstream attempt loop.

    Use from the proxy's event loop only.

    :param pool: the worker table that takes an ejected worker out of routing.
    :param config: ``eject_after`` (0 disables ejection), ``ejection_time``,
        ``max_ejection_time``, ``max_ejected_percent``.
    :param registry: a Prometheus registry to export the ejections into, or None.
    :param clock: seconds, monotonic (the pool's ejection times use the same clock).
    """

    def __init__(
        self,
        pool: WorkerPool,
        config: ProxyConfig,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.config = config
        self._clock = clock
        # Workers that join at run time get their state on first use.
        self._states: dict[int, OutlierState] = {}
        #: Ejections refused because too many workers were out already.
        self.refused = 0
        pool.clock = clock
        pool.on_return = self._returned
        pool.on_remove.append(self.forget)
        pool.reporters.append(self.snapshot)
        self._ejections: Any = None
        self._refused_counter: Any = None
        if registry is not None:
            from prometheus_client import Counter

            self._ejections = Counter(
                "kvroute_worker_ejections",
                "Workers taken out of routing for failing attempts in a row, by worker",
                ["worker"],
                registry=registry,
            )
            self._refused_counter = Counter(
                "kvroute_worker_ejections_refused",
                "Ejections not made because max_ejected_percent of the workers (or all"
                " but the last usable one) were out already",
                registry=registry,
            )
            registry.register(_EjectedCollector(pool))

    def state(self, worker: int) -> OutlierState:
        """``worker``'s state (a live object: do not change it)."""
        st = self._states.get(worker)
        if st is None:
            st = self._states[worker] = OutlierState()
        return st

    def forget(self, worker: int) -> None:
        """``worker`` left the fleet: drop its record (it starts afresh if it rejoins)."""
        self._states.pop(worker, None)

    def succeeded(self, worker: int) -> None:
        """``worker`` answered an attempt in time (whatever the answer's 4xx status)."""
        st = self.state(worker)
        st.consecutive = 0
        st.probation = False
        if st.ejections:
            # A worker serving well sheds one step of its back-off per base ejection time.
            now = self._clock()
            steps = int((now - st.since) // self.config.ejection_time)
            if steps > 0:
                st.ejections = max(st.ejections - steps, 0)
                st.since = now

    def failed(self, worker: int) -> None:
        """``worker`` failed an attempt (5xx, or its connection or stream broke)."""
        st = self.state(worker)
        if self.config.eject_after == 0 or not self.pool.is_routable(worker):
            return  # already out: its health checks or its ejection handle it
        st.consecutive += 1
        if st.probation or st.consecutive >= self.config.eject_after:
            self._eject(worker, st)

    def _eject(self, worker: int, st: OutlierState) -> None:
        pool = self.pool
        limit = max(1, int(len(pool.workers) * self.config.max_ejected_percent / 100))
        if pool.ejected_count() >= limit or len(pool.healthy()) <= 1:
            self.refused += 1
            if self._refused_counter is not None:
                self._refused_counter.inc()
            log.warning(
                "worker %d failed %d attempts in a row but is not ejected: %d of %d workers"
                " are out already", worker, st.consecutive, len(pool.workers) - len(pool.healthy()),
                len(pool.workers),
            )  # fmt: skip
            return
        st.ejections += 1
        st.total_ejections += 1
        seconds = min(self.config.ejection_time * st.ejections, self.config.max_ejection_time)
        reason = (
            "failed its probe" if st.probation else f"failed {st.consecutive} attempts in a row"
        )
        st.consecutive = 0
        st.probation = False
        st.since = self._clock()
        if self._ejections is not None:
            self._ejections.labels(str(worker)).inc()
        pool.eject(worker, seconds, reason)

    def _returned(self, worker: int) -> None:
        """The pool returned ``worker`` to routing: its next attempt is the probe."""
        st = self.state(worker)
        st.probation = True
        st.consecutive = 0
        st.since = self._clock()

    def snapshot(self, worker: int) -> dict[str, object]:
        """``worker``'s outlier figures for ``/health``."""
        st = self.state(worker)
        return {
            "consecutive_failures": st.consecutive,
            "ejections": st.total_ejections,
            "probation": st.probation,
        }


class _EjectedCollector:
    """``kvroute_worker_ejected{worker}``: 1 while a worker is ejected, read at scrape time."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily(
            "kvroute_worker_ejected", "1 while the worker is ejected for failing", labels=["worker"]
        )
        for w, state in self._pool.workers.items():
            g.add_metric([str(w)], 1.0 if state.ejected_until is not None else 0.0)
        yield g
