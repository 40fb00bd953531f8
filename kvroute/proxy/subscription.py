"""The KV-event subscriber's lifecycle while the proxy serves.

With KV events (``ProxyConfig.kv_events``: some worker has an events
endpoint), the proxy's startup starts a :class:`kvroute.events.ZmqSubscriber`
feeding the router, subscribed to each worker's events endpoint (and replay
endpoint, in ``events_format``), and its cleanup stops it. A worker the
health checker finds healthy again may be a restarted engine: a worker with
a replay endpoint then has its event stream checked against its replay
history at once, not at its next event. Without KV events nothing runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..events.metrics import Metrics
from ..router import Router
from .config import ProxyConfig
from .workers import WorkerPool

__all__ = ["EventSubscription"]


class EventSubscription:
    """Starts and stops the proxy's KV-event subscriber.

    :param router: the router the events feed.
    :param config: the workers' endpoints and ``events_format``.
    :param metrics: the subscriber counts its events here.
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

    @property
    def subscriber(self) -> Any:
        """The running :class:`kvroute.events.ZmqSubscriber`, or None."""
        return self._subscriber

    def start(
        self,
        resume: dict[int, tuple[int, int]] | None = None,
        salts: dict[int, dict[int, str]] | None = None,
    ) -> None:
        """Subscribe to every worker's events (nothing without KV events).

        :param resume: per worker, where an index snapshot loaded into the
            router left its stream (``ZmqSubscriber.subscribe``'s ``resume``).
        :param salts: the snapshot's cache salts (``EventApplier.restore_salts``).
        :raises RuntimeError: KV events are configured but pyzmq (or the
            events module) cannot be imported.
        """
        if not self.config.kv_events:
            return
        try:
            from ..events.zmq import ZmqSubscriber
        except ImportError as e:
            raise RuntimeError(
                f"KV events need kvroute.events.zmq and pyzmq, which cannot be imported: {e}"
            ) from None
        sub = ZmqSubscriber(self.router, fmt=self.config.events_format, metrics=self.metrics)
        if salts:
            sub.applier.restore_salts(salts)
        resume = resume or {}
        for w, spec in enumerate(self.config.workers):
            if spec.events_endpoint:
                sub.subscribe(w, spec.events_endpoint, spec.replay_endpoint, resume=resume.get(w))
        sub.start()
        self._subscriber = sub
        replayable = {w for w, spec in enumerate(self.config.workers) if spec.replay_endpoint}
        self.pool.on_up = lambda w: sub.resync(w) if w in replayable else None

    async def stop(self) -> None:
        """Stop the subscriber (off the event loop: it joins its thread). Idempotent."""
        sub, self._subscriber = self._subscriber, None
        if sub is None:
            return
        self.pool.on_up = None
        await asyncio.get_running_loop().run_in_executor(None, sub.stop)
