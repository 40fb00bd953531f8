"""The proxy's replica sync: ``--sync-url`` runs a :class:`~kvroute.fleet.sync.ReplicaSync`.

With ``sync_url`` set, the proxy is one replica of a fleet of proxies
behind a load balancer. :class:`ProxySync` starts the replica sync before
the KV-event subscriber (so a snapshot it loads is where the subscriber
resumes), hands it the subscriber (so it can write snapshots), shares the
worker pool's health, the fleet's membership (the admin API's, the workers
file's and DNS's changes reach every replica:
:class:`~kvroute.fleet.share.MembershipShare`) and which worker produced
each Responses API answer (:class:`~kvroute.fleet.responses.RedisResponseStore`,
the proxy's response store with sync), and adds to ``/metrics``:

* ``kvroute_sync_up``: 1 while Redis answers and this replica takes part;
* ``kvroute_sync_replicas``: the other replicas whose load counts here;
* ``kvroute_worker_remote_active_requests{worker}``: the other replicas'
  requests in flight per worker (``kvroute_worker_active_requests`` is the
  fleet's: this replica's plus theirs);
* ``kvroute_sync_snapshots_total``: index snapshots this replica wrote;
* ``kvroute_sync_messages_total{direction}`` and
  ``kvroute_sync_delay_seconds`` (mean and max, Redis' clock): how stale
  the shared state was when it was applied.

Health: each replica publishes the changes its own health checks see;
another replica's "down" makes this one check that worker at once (it
trusts its own check, not the other's: a network split between one
replica and one worker must not take the worker from every replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..events.metrics import Metrics
from ..fleet.membership import Membership
from ..fleet.responses import RedisResponseStore
from ..fleet.share import MembershipShare
from ..fleet.sync import ReplicaSync
from ..router import Router
from .config import ProxyConfig
from .workers import WorkerPool

__all__ = ["ProxySync"]

log = logging.getLogger("kvroute.proxy")


class ProxySync:
    """The proxy's part that runs replica sync (see the module docstring).

    :param router: the proxy's router.
    :param config: the proxy's configuration (``sync_url`` set).
    :param pool: the worker pool (health).
    :param metrics: the proxy's metrics (the sync's series are added).
    :param membership: the fleet's workers, shared with the other replicas
        (None: only what the sync itself carries).
    """

    def __init__(
        self,
        router: Router,
        config: ProxyConfig,
        pool: WorkerPool,
        metrics: Metrics,
        membership: Membership | None = None,
    ) -> None:
        assert config.sync_url is not None
        self.pool = pool
        #: The replica sync itself.
        self.sync = ReplicaSync(
            router,
            config.sync_url,
            replica_id=config.replica_id,
            prefix=config.sync_prefix,
            workers=[w.url for w in config.workers],
            snapshot_interval=config.sync_snapshot_interval,
        )
        self.sync.on_health = self._remote_health
        #: Which worker produced each Responses API answer, known to every replica.
        self.responses = RedisResponseStore(self.sync)
        #: The membership's changes, to and from the other replicas (None without one).
        self.members = MembershipShare(membership, self.sync) if membership is not None else None
        self._seen: dict[int, bool] = {}
        self._checking: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        metrics.registry.register(_SyncCollector(self.sync))

    async def start(self) -> dict[int, tuple[int, int]]:
        """Join the fleet; returns where the event subscriber resumes (see ReplicaSync.start).

        :raises SyncConfigError: another replica uses this replica id, or the
            replicas name different workers.
        """
        resume = await self.sync.start()
        if self.members is not None:
            # what it applies reaches the proxy's parts when the fleet starts following
            await self.members.start()
        self._task = asyncio.create_task(self._watch_health(), name="kvroute-sync-health")
        return resume

    def attach(self, subscriber: Any) -> None:
        """The KV-event subscriber, for snapshots (None without KV events)."""
        if subscriber is not None:
            self.sync.attach_subscriber(subscriber)

    async def stop(self) -> None:
        """Leave the fleet."""
        if self.members is not None:
            self.members.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.sync.stop()

    async def _watch_health(self) -> None:
        # the pool owns health; publish what changes, a few times per health interval
        period = max(min(self.pool.config.health_interval / 4, 0.5), 0.05)
        while True:
            for w, state in list(self.pool.workers.items()):
                if self._seen.get(w) != state.healthy:
                    self._seen[w] = state.healthy
                    self.sync.publish_health(w, state.healthy)
            await asyncio.sleep(period)

    def _remote_health(self, replica: str, worker: int, healthy: bool) -> None:
        state = self.pool.workers.get(worker)
        if healthy or state is None or not state.healthy:
            return
        now = time.monotonic()
        if self._checking.get(worker, 0.0) > now:
            return
        self._checking[worker] = now + 1.0  # at most one early check a second per worker
        log.info("replica %s sees worker %d down: checking it now", replica, worker)
        asyncio.get_running_loop().create_task(self.pool.check(worker))


class _SyncCollector(Collector):
    """The replica sync's series, read at scrape time."""

    def __init__(self, sync: ReplicaSync) -> None:
        self._sync = sync

    def collect(self) -> Iterator[Metric]:
        s = self._sync
        st = s.stats()
        up = GaugeMetricFamily("kvroute_sync_up", "1 while the replica sync reaches Redis")
        up.add_metric([], 1.0 if st["up"] else 0.0)
        yield up
        remote = s.router.remote_load()
        reps = GaugeMetricFamily(
            "kvroute_sync_replicas", "Other replicas whose load counts on this one"
        )
        reps.add_metric([], float(len(remote["replicas"])))
        yield reps
        act = GaugeMetricFamily(
            "kvroute_worker_remote_active_requests",
            "Requests in flight through the other replicas, per worker",
            labels=["worker"],
        )
        active = remote["active"]
        for w in s.router.workers():
            act.add_metric([str(w)], float(active.get(w, 0)))
        yield act
        msgs = CounterMetricFamily(
            "kvroute_sync_messages", "Replica sync messages", labels=["direction"]
        )
        msgs.add_metric(["sent"], float(st["sent"]))
        msgs.add_metric(["received"], float(st["received"]))
        yield msgs
        snaps = CounterMetricFamily(
            "kvroute_sync_snapshots", "Index snapshots this replica wrote for later replicas"
        )
        snaps.add_metric([], float(st["snapshots"]))
        yield snaps
        delay = GaugeMetricFamily(
            "kvroute_sync_delay_seconds",
            "Age of the other replicas' messages when applied (Redis' clock)",
            labels=["stat"],
        )
        delay.add_metric(["mean"], float(st["delay_mean"]))
        delay.add_metric(["max"], float(st["delay_max"]))
        yield delay
