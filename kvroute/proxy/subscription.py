"""The KV-event subscriber's lifecycle while the proxy serves.

With KV events (``ProxyConfig.kv_events``: some worker has an events
endpoint), the proxy's startup starts a :class:`kvroute.events.ZmqSubscriber`
feeding the router, subscribed to each worker's events endpoint (and replay
endpoint, in ``events_format``), and its cleanup stops it. A worker the
health checker finds healthy again may be a restarted engine: a worker with
a replay endpoint then has its event stream checked against its replay
history at once, not at its next event. Without KV events nothing runs.

The subscriber follows the fleet: :meth:`EventSubscription.subscribe` adds
a worker that joins at run time, and :meth:`EventSubscription.unsubscribe`
stops following one that leaves, returning once the subscriber thread has
closed its sockets, so that no batch of the worker's is applied after the
router forgets it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..events.metrics import Metrics
from ..router import Router
from .config import ProxyConfig, WorkerSpec
from .workers import WorkerPool

__all__ = ["EventSubscription"]

log = logging.getLogger("kvroute.proxy")


class EventSubscription:
    """Starts and stops the proxy's KV-event subscriber.

    :param router: the router the events feed.
    :param config: the workers' endpoints and ``events_format``.
    :param metrics: the subscriber counts its events here.
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

    @property
    def subscriber(self) -> Any:
        """The running :class:`kvroute.events.ZmqSubscriber`, or None."""
        return self._subscriber

    def start(self) -> None:
        """Subscribe to every worker's events (nothing without KV events).

        :raises RuntimeError: KV events are configured but pyzmq (or the
            events module) cannot be imported.
        """
        if not self.enabled:
            return
        try:
            from ..events.zmq import ZmqSubscriber
        except ImportError as e:
            raise RuntimeError(
                f"KV events need kvroute.events.zmq and pyzmq, which cannot be imported: {e}"
            ) from None
        sub = ZmqSubscriber(self.router, fmt=self.config.events_format, metrics=self.metrics)
        self._subscriber = sub
        for w, state in self.pool.workers.items():
            self.subscribe(w, state.spec)
        sub.start()
        self.pool.on_up = self._on_up

    def _on_up(self, worker: int) -> None:
        state = self.pool.workers.get(worker)
        if self._subscriber is not None and state is not None and state.spec.replay_endpoint:
            self._subscriber.resync(worker)

    def subscribe(self, worker: int, spec: WorkerSpec) -> None:
        """Follow ``worker``'s events at ``spec``'s endpoints (replacing earlier ones), if any.

        Nothing happens while the subscriber is not running, or when ``spec``
        names no events endpoint; an events format nobody registered is logged.
        """
        sub = self._subscriber
        if sub is None or not spec.events_endpoint:
            return
        try:
            sub.subscribe(
                worker, spec.events_endpoint, spec.replay_endpoint, fmt=spec.events_format
            )
        except ValueError as e:
            log.error("worker %d (%s): its KV events cannot be followed: %s", worker, spec.url, e)

    async def unsubscribe(self, worker: int, timeout: float = 5.0) -> None:
        """Stop following ``worker``; returns once none of its batches can still be applied.

        :param timeout: seconds to wait for the subscriber thread at most.
        """
        sub = self._subscriber
        if sub is None:
            return
        done = sub.unsubscribe(worker)
        deadline = time.monotonic() + timeout
        # a short poll: the subscriber thread looks at its commands every 50 ms
        while not done.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Stop the subscriber (off the event loop: it joins its thread). Idempotent."""
        sub, self._subscriber = self._subscriber, None
        if sub is None:
            return
        self.pool.on_up = None
        await asyncio.get_running_loop().run_in_executor(None, sub.stop)
