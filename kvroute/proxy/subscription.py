"""The KV-event subscribers' lifecycle while the proxy serves.

With KV events (``ProxyConfig.kv_events``: some worker has an events
endpoint), the proxy's startup follows each worker's events over the
transport its endpoint names (:mod:`~kvroute.proxy.event_sources`), in the
worker's own format or the proxy's default ``events_format``:

- ZMQ endpoints: one :class:`kvroute.events.ZmqSubscriber` for them all,
  with each worker's replay endpoint;
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
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..events.metrics import Metrics
from ..router import Router
from .config import ProxyConfig, WorkerSpec
from .event_sources import transport_of, worker_format
from .workers import WorkerPool

__all__ = ["EventSubscription"]


class EventSubscription:
    """Starts and stops the proxy's KV-event subscribers.

    :param router: the router the events feed.
    :param config: the workers' endpoints and formats.
    :param metrics: the subscribers count their events here.
    :param pool: tells when a worker turns healthy again.
    """

    def __init__(
        self, router: Router, config: ProxyConfig, metrics: Metrics, pool: WorkerPool
    ) -> None:
        self.router = router
        self.config = config
        self.metrics = metrics
        self.pool = pool
        self._subscriber: Any = None
        self._poller: Any = None

    @property
    def subscriber(self) -> Any:
        """The running :class:`kvroute.events.ZmqSubscriber`, or None (no ZMQ worker)."""
        return self._subscriber

    @property
    def poller(self) -> Any:
        """The running :class:`~kvroute.events.trtllm_http.HttpEventPoller`, or None."""
        return self._poller

    def start(self) -> None:
        """Follow every worker's events (nothing without KV events).

        :raises RuntimeError: a worker's transport needs a module (pyzmq for
            ZMQ, msgspec for decoding) that cannot be imported.
        """
        if not self.config.kv_events:
            return
        zmq_workers: list[tuple[int, str, WorkerSpec]] = []
        http_workers: list[tuple[int, str, WorkerSpec]] = []
        for w, spec in enumerate(self.config.workers):
            if spec.events_endpoint:
                http = transport_of(spec.events_endpoint) == "http"
                (http_workers if http else zmq_workers).append((w, spec.events_endpoint, spec))
        try:
            if zmq_workers:
                self._start_zmq(zmq_workers)
            if http_workers:
                self._start_polls(http_workers)
        except BaseException:
            # nothing half-started outlives a failed start (the app opens nothing else first)
            if self._subscriber is not None:
                self.pool.on_up = None
                self._subscriber.stop()
                self._subscriber = None
            raise

    def _start_zmq(self, workers: list[tuple[int, str, WorkerSpec]]) -> None:
        try:
            from ..events.zmq import ZmqSubscriber
        except ImportError as e:
            raise RuntimeError(
                f"KV events need kvroute.events.zmq and pyzmq, which cannot be imported: {e}"
            ) from None
        default = self.config.events_format
        sub = ZmqSubscriber(self.router, fmt=default, metrics=self.metrics)
        for w, endpoint, spec in workers:
            sub.subscribe(w, endpoint, spec.replay_endpoint, fmt=worker_format(spec, default))
        sub.start()
        self._subscriber = sub
        replayable = {w for w, _, spec in workers if spec.replay_endpoint}
        self.pool.on_up = lambda w: sub.resync(w) if w in replayable else None

    def _start_polls(self, workers: list[tuple[int, str, WorkerSpec]]) -> None:
        try:
            from ..events.trtllm_http import HttpEventPoller
        except ImportError as e:
            raise RuntimeError(
                f"polled KV events need kvroute.events.trtllm_http, which cannot be imported: {e}"
            ) from None
        key = self.config.upstream_api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        poller = HttpEventPoller(self.router, metrics=self.metrics)
        for w, endpoint, _ in workers:
            poller.subscribe(w, endpoint, headers=headers)
        self._poller = poller.start()

    async def stop(self) -> None:
        """Stop the subscribers (off the event loop: they join threads). Idempotent."""
        sub, self._subscriber = self._subscriber, None
        poller, self._poller = self._poller, None
        loop = asyncio.get_running_loop()
        if sub is not None:
            self.pool.on_up = None
            await loop.run_in_executor(None, sub.stop)
        if poller is not None:
            await loop.run_in_executor(None, poller.stop)
