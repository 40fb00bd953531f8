"""The KV-event subscribers' lifecycle while the proxy serves.

With KV events (``ProxyConfig.kv_events``: some worker has an events
endpoint), the proxy's startup follows each worker's events over the
transport its endpoint names (:mod:`~kvroute.proxy.event_sources`), in the
worker's own format or the proxy's default ``events_format``:

- ZMQ endpoints: one :class:`kvroute.events.ZmqSubscriber` for them all,
  with each worker's replay endpoint, on the proxy's event loop (no thread of
  its own: the batches apply between requests, on the thread that routes);
- http(s) endpoints (``trtllm-serve``'s ``/kv_cache_events``): one
  :class:`kvroute.events.trtllm_http.HttpEventPoller`, every attention-DP rank
  of a worker's engine folded into that worker (the server's own scheduler
  picks the rank a request runs on). ``upstream_api_key``, when set, is sent
  with the polls.

Cleanup stops them. A worker the health checker finds healthy again may be a
restarted engine: a worker with a replay endpoint then has its event stream
checked against its replay history at once, not at its next event (a polled
engine shows its restart by its event ids starting again, with the
``created`` events it publishes at start). Without KV events nothing runs.

The subscribers follow the fleet: :meth:`EventSubscription.subscribe` adds
a worker that joins at run time, and :meth:`EventSubscription.unsubscribe`
stops following one that leaves, returning once the ZMQ subscriber
has closed its sockets (or the worker's poll has stopped), so that no batch
of the worker's is applied after the router forgets it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..events.metrics import Metrics
from ..router import Router
from .config import ProxyConfig, WorkerSpec
from .event_sources import transport_of, worker_format
from .workers import WorkerPool

__all__ = ["EventSubscription"]

log = logging.getLogger("kvroute.proxy")


class EventSubscription:
    """Starts and stops the proxy's KV-event subscribers.

    :param router: the router the events feed.
    :param config: the workers' endpoints and formats.
    :param metrics: the subscribers count their events here.
    :param pool: the workers to follow at start (by id), and tells when one
        turns healthy again.
    :param enabled: whether to run at all (default: ``config.kv_events``).
    """

    def __init__(
        self,
        router: Router,
        config: ProxyConfig,
        metrics: Metrics,
        pool: WorkerPool,
        *,
        enabled: bool | None = None,
    ) -> None:
        self.router = router
        self.config = config
        self.metrics = metrics
        self.pool = pool
        self.enabled = config.kv_events if enabled is None else enabled
        self._subscriber: Any = None
        self._poller: Any = None

    @property
    def subscriber(self) -> Any:
        """The running :class:`kvroute.events.ZmqSubscriber`, or None (not started)."""
        return self._subscriber

    @property
    def poller(self) -> Any:
        """The running :class:`~kvroute.events.trtllm_http.HttpEventPoller`, or None."""
        return self._poller

    def start(
        self,
        resume: dict[int, tuple[int, int]] | None = None,
        salts: dict[int, dict[int, str]] | None = None,
    ) -> None:
        """Follow every worker's events (nothing without KV events).

        :param resume: per worker, where an index snapshot loaded into the
            router left its ZMQ stream (``ZmqSubscriber.subscribe``'s ``resume``).
        :param salts: the snapshot's cache salts (``EventApplier.restore_salts``).
        :raises RuntimeError: a worker's transport needs a module (pyzmq for
            ZMQ, msgspec for decoding) that cannot be imported.
        """
        if not self.enabled:
            return
        specs = {w: state.spec for w, state in self.pool.workers.items()}
        http = any(
            s.events_endpoint and transport_of(s.events_endpoint) == "http" for s in specs.values()
        )
        try:
            # ZMQ always runs with events on: workers joining at run time mostly stream
            self._subscriber = self._zmq()
            if salts:
                self._subscriber.applier.restore_salts(salts)
            if http:
                self._poller = self._http_poller()
            resume = resume or {}
            for w, spec in specs.items():
                self.subscribe(w, spec, resume=resume.get(w))
            self._subscriber.start()
            if self._poller is not None:
                self._poller.start()
        except BaseException:
            # nothing half-started outlives a failed start (the app opens nothing else first)
            sub, self._subscriber = self._subscriber, None
            poller, self._poller = self._poller, None
            if sub is not None:
                sub.stop()
            if poller is not None:
                poller.stop()
            raise
        self.pool.on_up = self._on_up

    def _zmq(self) -> Any:
        try:
            from ..events.zmq import ZmqSubscriber
        except ImportError as e:
            raise RuntimeError(
                f"KV events need kvroute.events.zmq and pyzmq, which cannot be imported: {e}"
            ) from None
        # On the proxy's own event loop: the events apply between requests, on the
        # thread that routes them, with no second thread to wake for each batch.
        return ZmqSubscriber(
            self.router,
            fmt=self.config.events_format,
            metrics=self.metrics,
            loop=asyncio.get_running_loop(),
        )

    def _http_poller(self) -> Any:
        try:
            from ..events.trtllm_http import HttpEventPoller
        except ImportError as e:
            raise RuntimeError(
                f"polled KV events need kvroute.events.trtllm_http, which cannot be imported: {e}"
            ) from None
        return HttpEventPoller(self.router, metrics=self.metrics)

    def _on_up(self, worker: int) -> None:
        state = self.pool.workers.get(worker)
        if self._subscriber is not None and state is not None and state.spec.replay_endpoint:
            self._subscriber.resync(worker)

    def subscribe(
        self, worker: int, spec: WorkerSpec, *, resume: tuple[int, int] | None = None
    ) -> None:
        """Follow ``worker``'s events at ``spec``'s endpoints (replacing earlier ones), if any.

        A ZMQ endpoint goes to the subscriber in the worker's format; an
        http(s) one is polled (trtllm-serve's ``/kv_cache_events``). Nothing
        happens while the subscribers are not running, or when ``spec`` names
        no events endpoint; an endpoint that cannot be followed is logged.

        :param resume: a ZMQ stream's ``(seq, digest)`` in a loaded index
            snapshot: it continues from there (``ZmqSubscriber.subscribe``).
        """
        sub = self._subscriber
        endpoint = spec.events_endpoint
        if sub is None or not endpoint:
            return
        try:
            if transport_of(endpoint) == "http":
                if self._poller is None:
                    self._poller = self._http_poller().start()
                key = self.config.upstream_api_key
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                self._poller.subscribe(worker, endpoint, headers=headers)
            else:
                fmt = worker_format(spec, self.config.events_format)
                sub.subscribe(worker, endpoint, spec.replay_endpoint, fmt=fmt, resume=resume)
        except (ValueError, RuntimeError) as e:
            log.error("worker %d (%s): its KV events cannot be followed: %s", worker, spec.url, e)

    async def unsubscribe(self, worker: int, timeout: float = 5.0) -> None:
        """Stop following ``worker``; returns once none of its batches can still be applied.

        :param timeout: seconds to wait for the subscriber at most.
        """
        poller = self._poller
        if poller is not None and worker in poller.sources:
            await asyncio.get_running_loop().run_in_executor(None, poller.unsubscribe, worker)
        sub = self._subscriber
        if sub is None:
            return
        done = sub.unsubscribe(worker)
        deadline = time.monotonic() + timeout
        # a short poll: the subscriber takes its commands on its next round
        while not done.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Stop the subscribers (the HTTP poller off the loop: it joins a thread). Idempotent."""
        sub, self._subscriber = self._subscriber, None
        poller, self._poller = self._poller, None
        loop = asyncio.get_running_loop()
        if sub is not None:
            self.pool.on_up = None
            sub.stop()  # on this loop: closes its sockets at once
        if poller is not None:
            await loop.run_in_executor(None, poller.stop)
