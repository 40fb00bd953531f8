"""The proxy follows its fleet: workers join, drain and leave while it serves.

:class:`ProxyFleet` holds the proxy's :class:`~kvroute.fleet.membership.Membership`
(built from the ``--worker`` flags, then the workers file, read at once:
a bad file is an error at start) and runs the sources that change it while
the proxy serves: the workers file, watched (:mod:`kvroute.fleet.files`),
and DNS names, re-resolved (:mod:`kvroute.fleet.dns`); the admin API
(:mod:`~kvroute.proxy.admin`) and a replica sync call the membership
directly. Every change is applied, one at a time and in order, on the
proxy's event loop, wherever it was made:

- **added**: the router learns the worker and the pool holds it, unhealthy
  until its first health check passes (checked at once); its KV events are
  followed;
- **updated**: the pool takes its new fields; changed event endpoints are
  followed instead of the old ones;
- **draining**: the worker takes no new request (the pool *excludes* it:
  the proxy routes around it, as around a worker that failed the request;
  its health, blocks and load stay as they are) while its requests in
  flight finish; when the router counts none left, or after
  ``drain_timeout`` seconds, it is evicted from the membership;
- **removed**: excluded at once, its KV events are unsubscribed (and the
  subscriber has let go of its sockets) *before* the router drops its blocks
  and load, so no late batch of its events lands after; then the pool forgets
  it (requests still waiting on it fail over, open streams are closed) and
  its per-worker counters leave ``/metrics``.

``/metrics`` also shows ``kvroute_worker_info{worker,url,name,role,state,source}``
(1 per worker), which ties the ``worker`` label of every other series to a URL.

Why drain by exclusion and not by the router's health flag: health has one
owner, the pool's health checker, which marks a worker healthy again when
its ``/health`` answers, and a draining worker is healthy. Exclusion is the
router's own way to keep a request off a worker for reasons of the caller's
(it already skips pins to excluded workers), it leaves the router's state
alone, and it costs nothing while no worker drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..events.metrics import Metrics
from ..fleet.dns import DnsDiscovery, Resolver
from ..fleet.files import WorkersFile
from ..fleet.membership import Member, Membership, MembershipChange
from ..fleet.spec import WorkerSpec
from ..router import Router
from .config import ProxyConfig
from .subscription import EventSubscription
from .workers import WorkerPool

__all__ = ["ProxyFleet"]

log = logging.getLogger("kvroute.proxy")

#: Seconds between looks at a draining worker's requests in flight.
_DRAIN_POLL = 0.05


class _InfoCollector(Collector):
    """``kvroute_worker_info``: each worker's URL, name, role, state and source, read at scrape."""

    def __init__(self, membership: Membership) -> None:
        self._membership = membership

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "kvroute_worker_info",
            "1 per worker: its URL, name, role, state and the source naming it",
            labels=["worker", "url", "name", "role", "state", "source"],
        )
        for m in self._membership:
            s = m.spec
            info.add_metric([str(m.id), s.url, s.label, s.role, m.state, m.source], 1.0)
        yield info


class ProxyFleet:
    """The proxy's membership, its sources, and the changes applied to the proxy's parts.

    Build it before the router (its members are the router's first workers),
    :meth:`attach` the parts, then :meth:`start` and :meth:`stop` it on the
    proxy's event loop.

    :param config: the flags (``workers``), ``workers_file``, ``worker_dns``
        and their intervals, ``drain_timeout``.
    :param membership: a membership to follow (default: a new one from
        ``config.workers``); the workers file is claimed into it either way.
    :param resolver: for DNS names (default: the system resolver).
    :raises ValueError, OSError, ImportError: the workers file cannot be read
        or holds a bad worker; two flags name one URL.
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        membership: Membership | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        #: The fleet's workers.
        self.membership = membership if membership is not None else Membership(config.workers)
        #: The workers file, watched while serving (None without ``workers_file``).
        self.file: WorkersFile | None = None
        if config.workers_file is not None:
            self.file = WorkersFile(
                config.workers_file, self.membership, interval=config.workers_file_interval
            )
            self.file.load()
        #: The DNS names, re-resolved while serving (None without ``worker_dns``).
        self.dns: DnsDiscovery | None = None
        if config.worker_dns:
            self.dns = DnsDiscovery(
                config.worker_dns,
                self.membership,
                interval=config.worker_dns_interval,
                resolver=resolver,
            )
        self._router: Router | None = None
        self._pool: WorkerPool | None = None
        self._events: EventSubscription | None = None
        self._metrics: Metrics | None = None
        self._guard = threading.Lock()  # _loop and _pending, read by any thread's change
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[MembershipChange] = []
        self._queue: asyncio.Queue[MembershipChange] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._drains: dict[int, asyncio.Task[None]] = {}
        self._unlisten = self.membership.listen(self._heard)

    # -- what the proxy is built from ----------------------------------------------------

    @property
    def dynamic(self) -> bool:
        """Whether workers may join at run time (a workers file, DNS, or the admin API)."""
        c = self.config
        return bool(c.workers_file or c.worker_dns or c.admin_token)

    def kv_events(self) -> bool:
        """Whether a router built for this fleet should follow KV events.

        Yes when a worker known at start has an events endpoint, a DNS name
        gives an events port, or no worker is known yet (those that join
        will likely publish events; one that does not is predicted from the
        router's decisions).
        """
        members = self.membership.members().values()
        if any(m.spec.events_endpoint for m in members):
            return True
        if any(name.events_port is not None for name in self.config.worker_dns):
            return True
        return not members and self.dynamic

    def follows_events(self, router: Router) -> bool:
        """Whether the proxy runs a KV-event subscriber beside ``router``.

        Yes when a worker known at start has an events endpoint, or workers
        may join at run time and the router follows events.
        """
        if any(m.spec.events_endpoint for m in self.membership):
            return True
        return self.dynamic and router.kv_events

    def specs(self) -> dict[int, WorkerSpec]:
        """Every worker's fields, by id."""
        return {wid: m.spec for wid, m in self.membership.members().items()}

    def attach(
        self, router: Router, pool: WorkerPool, events: EventSubscription, metrics: Metrics
    ) -> None:
        """The parts each change is applied to; ``kvroute_worker_info`` joins ``metrics``."""
        self._router, self._pool, self._events, self._metrics = router, pool, events, metrics
        with contextlib.suppress(ValueError):  # already registered (metrics shared by two apps)
            metrics.registry.register(_InfoCollector(self.membership))
        for wid, m in self.membership.members().items():
            if m.state == "draining":
                pool.exclude(wid)

    @property
    def pool(self) -> WorkerPool:
        """The attached worker pool.

        :raises RuntimeError: not attached yet.
        """
        if self._pool is None:
            raise RuntimeError("ProxyFleet.attach() was not called")
        return self._pool

    @property
    def router(self) -> Router:
        """The attached router.

        :raises RuntimeError: not attached yet.
        """
        if self._router is None:
            raise RuntimeError("ProxyFleet.attach() was not called")
        return self._router

    # -- serving -------------------------------------------------------------------------

    async def start(self) -> None:
        """Apply the changes made so far, resolve the DNS names once, start watching.

        Returns once what the first resolution found is in the router and the pool.
        """
        queue: asyncio.Queue[MembershipChange] = asyncio.Queue()
        with self._guard:
            self._loop = asyncio.get_running_loop()
            self._queue = queue
            pending, self._pending = self._pending, []
        for change in pending:
            queue.put_nowait(change)
        self._spawn(self._follow(queue), "kvroute-fleet-follow")
        for wid, m in self.membership.members().items():
            if m.state == "draining" and wid not in self._drains:
                self._start_drain(wid)
        if self.dns is not None:
            await self.dns.resolve()
            self._spawn(self.dns.run(), "kvroute-fleet-dns")
        if self.file is not None:
            self.file.poll()  # edited between the start and now
            self._spawn(self.file.run(), "kvroute-fleet-file")
        await self.settled()

    async def stop(self) -> None:
        """Stop watching and applying; changes made meanwhile wait for the next :meth:`start`."""
        with self._guard:
            self._loop = None
            queue, self._queue = self._queue, None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._drains.clear()
        if queue is not None:
            unapplied = []
            while not queue.empty():
                unapplied.append(queue.get_nowait())
            with self._guard:  # kept for the next start, before what was heard since
                self._pending[:0] = unapplied

    async def settled(self) -> None:
        """Return once every change heard so far is applied to the proxy's parts."""
        queue = self._queue
        if queue is not None:
            await queue.join()

    def _spawn(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- changes -------------------------------------------------------------------------

    def _heard(self, change: MembershipChange) -> None:
        """The membership's listener: runs on whatever thread made the change."""
        with self._guard:
            loop, queue = self._loop, self._queue
            if loop is None or queue is None:
                self._pending.append(change)
                return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is loop:
            queue.put_nowait(change)
        else:
            loop.call_soon_threadsafe(queue.put_nowait, change)

    async def _follow(self, queue: asyncio.Queue[MembershipChange]) -> None:
        while True:
            change = await queue.get()
            try:
                await self._apply(change)
            except Exception:  # one change gone wrong must not stop the following
                log.exception("applying %s of worker %d failed", change.kind, change.member.id)
            finally:
                queue.task_done()

    async def _apply(self, change: MembershipChange) -> None:
        m = change.member
        if change.kind == "added":
            self._added(m)
        elif change.kind == "updated":
            await self._updated(m)
        elif change.kind == "draining":
            self.pool.exclude(m.id)
            self._start_drain(m.id)
            log.info("worker %d (%s) drains: no new requests (by %s)", m.id, m.spec.url, change.by)
        else:
            await self._removed(m)

    def _added(self, m: Member) -> None:
        router, pool = self.router, self.pool
        if m.spec.events_endpoint and not router.kv_events:
            log.warning(
                "worker %d (%s) publishes KV events, but the router runs without them (no worker"
                " known at start had an events endpoint): its cache is predicted instead",
                m.id, m.spec.url,
            )  # fmt: skip
        pool.add(m.id, m.spec)
        if self._events is not None:
            self._events.subscribe(m.id, m.spec)
        self._spawn(pool.check(m.id), f"kvroute-fleet-check-{m.id}")

    async def _updated(self, m: Member) -> None:
        state = self.pool.workers.get(m.id)
        if state is None:
            return
        old, state.spec = state.spec, m.spec
        events = self._events
        ends = ("events_endpoint", "replay_endpoint", "events_format")
        if events is None or all(getattr(old, f) == getattr(m.spec, f) for f in ends):
            return
        if m.spec.events_endpoint:
            events.subscribe(m.id, m.spec)
        else:
            await events.unsubscribe(m.id)

    async def _removed(self, m: Member) -> None:
        pool, router = self.pool, self.router
        pool.exclude(m.id)  # off the routes while its events stop
        drain = self._drains.pop(m.id, None)
        if drain is not None and drain is not asyncio.current_task():
            drain.cancel()
        if self._events is not None:
            await self._events.unsubscribe(m.id)
        router.remove_worker(m.id)
        pool.remove(m.id)
        if self._metrics is not None:
            _forget_worker(self._metrics, m.id)

    # -- draining ------------------------------------------------------------------------

    def _start_drain(self, wid: int) -> None:
        if wid not in self._drains:
            self._drains[wid] = self._spawn(self._drain(wid), f"kvroute-fleet-drain-{wid}")

    async def _drain(self, wid: int) -> None:
        """Evict ``wid`` once the router counts no request of its in flight, or at the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        while True:
            try:
                active = int(self.router.load(wid)["active_requests"])
            except KeyError:  # already gone from the router
                break
            if active == 0:
                break
            if loop.time() >= deadline:
                log.warning("worker %d: drain timed out with %d requests in flight; removing it",
                            wid, active)  # fmt: skip
                break
            await asyncio.sleep(_DRAIN_POLL)
        self._drains.pop(wid, None)
        self.membership.evict(wid)


def _forget_worker(metrics: Metrics, wid: int) -> None:
    """Drop a worker's per-worker counters (prometheus_client >= 0.22; older ones keep them)."""
    for metric in (metrics.routed, metrics.events, metrics.mismatches, metrics.upstream_errors):
        remove = getattr(metric, "remove_by_labels", None)
        if remove is not None:
            remove({"worker": str(wid)})
