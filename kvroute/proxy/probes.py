"""Kubernetes probes: ``/livez`` (the process answers) and ``/readyz`` (send it traffic).

- ``GET /livez``: 200 ``{"status": "ok"}`` while the event loop answers; a
  liveness probe that fails means the process is wedged and should restart.
  It checks nothing else: an unhealthy fleet is no reason to restart the proxy.
- ``GET /readyz``: 200 ``{"status": "ready"}`` when the proxy can serve: at
  least one healthy worker, the KV-event subscriber running (when the
  workers publish events), and not draining. Else 503 ``{"status": "not
  ready", "reasons": [...]}``, so the Service stops sending it requests.
  Draining starts on SIGTERM (:meth:`Probes.drain`): the proxy finishes the
  requests it has while the load balancer takes it out.

``/health`` (per-worker health) is unchanged. Probes are not counted in the
access log or the request metrics.

>>> from kvroute import Router
>>> from kvroute.proxy import ProxyConfig, parse_worker
>>> from kvroute.proxy.workers import WorkerPool
>>> config = ProxyConfig([parse_worker("http://127.0.0.1:9")])
>>> pool = WorkerPool(Router(block_size=16, workers=[0]), config)
>>> probes = Probes(pool, subscriber=lambda: None, events_expected=lambda: False)
>>> probes.reasons()
[]
>>> probes.drain(); probes.reasons()
['draining']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from .workers import WorkerPool

__all__ = ["Probes"]


class Probes:
    """The proxy's liveness and readiness.

    :param pool: the workers' health.
    :param subscriber: returns the running KV-event subscriber, or None.
    :param events_expected: returns whether the proxy follows KV events (then
        a subscriber must be running).
    """

    def __init__(
        self,
        pool: WorkerPool,
        subscriber: Callable[[], Any],
        events_expected: Callable[[], bool],
    ) -> None:
        self.pool = pool
        self._subscriber = subscriber
        self._events_expected = events_expected
        #: Set by :meth:`drain`: the proxy is stopping.
        self.draining = False

    def drain(self) -> None:
        """Report not ready from now on (the proxy is stopping)."""
        self.draining = True

    def reasons(self) -> list[str]:
        """Why the proxy is not ready (empty: ready)."""
        out = []
        if self.draining:
            out.append("draining")
        if not self.pool.healthy():
            out.append("no healthy worker")
        if self._events_expected():
            sub = self._subscriber()
            if sub is None or not sub.running:
                out.append("the KV-event subscriber is not running")
        return out

    async def livez(self, request: web.Request) -> web.StreamResponse:
        """``GET /livez``."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        """``GET /readyz``."""
        reasons = self.reasons()
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready"})
