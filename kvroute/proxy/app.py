"""The routing proxy: an aiohttp application in front of a fleet of vLLM / SGLang workers.

:class:`ProxyApp` holds the proxy's state and wires its parts into an aiohttp
application. A generation request (``/v1/completions``,
``/v1/chat/completions``, ``/v1/messages``) goes through them in turn:

1. :mod:`~kvroute.proxy.prepare`: read and check the body, map the model
   (:mod:`~kvroute.proxy.models`), read the hints, tokenize the prompt as
   the engine will, measure its cache breakpoints: the call to forward and
   the request to route;
2. :mod:`~kvroute.proxy.upstream`: route, forward to the chosen worker, and
   fail over to another (the failed ones excluded) while nothing reached
   the client, up to ``retries`` times; the router hears each attempt's
   lifecycle;
3. :mod:`~kvroute.proxy.relay`: pass the answer on (SSE event by event)
   and count the worker's cache reads and writes;
4. :mod:`~kvroute.proxy.warmup`: with the speculative-prefill hint and a
   session, warm the session's next turn in the background.

Also ``/v1/messages/count_tokens`` (:mod:`~kvroute.proxy.count_tokens`),
``/v1/models``, ``/health``, ``/metrics`` and, with an admin token, the
admin API (:mod:`~kvroute.proxy.admin`). The startup starts the KV-event
subscriber (:mod:`~kvroute.proxy.subscription`), opens the upstream
connections, starts following the fleet's membership
(:mod:`~kvroute.proxy.fleet`) and runs the health checker
(:mod:`~kvroute.proxy.workers`); the cleanup stops them. Errors are
answered in the called API's shape (:mod:`~kvroute.proxy.errors`), the
proxy's own bugs included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from ..events.metrics import CONTENT_TYPE_LATEST, Metrics
from ..fleet.membership import Membership
from ..request import Decision
from ..router import Router
from .admin import AdminApi
from .call import Api, Kind, api_of
from .config import ProxyConfig
from .count_tokens import count_tokens
from .errors import ProxyError, error_body
from .fleet import ProxyFleet
from .models import Models
from .prepare import Preparer
from .relay import (
    CACHE_SOURCE_HEADER,
    PREDICTED_HEADER,
    WORKER_HEADER,
    Relay,
    Relayed,
    failure_response,
)
from .subscription import EventSubscription
from .tokenize import LocalTokenizer
from .upstream import AttemptFailed, Lifecycle, Upstream
from .warmup import Warmups
from .workers import WorkerPool

__all__ = ["CACHE_SOURCE_HEADER", "PREDICTED_HEADER", "WORKER_HEADER", "ProxyApp"]

log = logging.getLogger("kvroute.proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ProxyApp:
    """The proxy's state and its aiohttp application.

    >>> from kvroute.proxy import ProxyConfig, parse_worker
    >>> proxy = ProxyApp(ProxyConfig([parse_worker("http://127.0.0.1:8001")]))
    >>> proxy.router.workers(), proxy.router.kv_events
    ([0], False)

    :param config: the configuration.
    :param router: a router to use (default: one built from ``config``:
        its block size and policy, workers ``0..n-1``, ``kv_events`` when any
        worker has an events endpoint). Missing workers are added to it.
    :param metrics: the metrics to count into (default: new ones over the router).
    :param tokenizer: a local tokenizer (default: loaded from
        ``config.tokenizer`` when tokenizing locally).
    :param membership: the fleet's workers (default: from ``config``; see
        :class:`~kvroute.proxy.fleet.ProxyFleet`).
    :raises ValueError, OSError: a bad workers file.
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        router: Router | None = None,
        metrics: Metrics | None = None,
        tokenizer: LocalTokenizer | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.config = config
        #: The fleet's workers, their sources, and the changes followed while serving.
        self.fleet = ProxyFleet(config, membership=membership)
        specs = self.fleet.specs()
        if router is None:
            router = Router(
                block_size=config.block_size,
                policy=config.policy,
                workers=specs,
                kv_events=self.fleet.kv_events(),
                max_sessions=config.max_sessions,
            )
        else:
            for w in specs:
                router.add_worker(w)
        #: The router every request goes through.
        self.router = router
        #: The Prometheus series served at ``/metrics``.
        self.metrics = metrics if metrics is not None else Metrics(router)
        #: Workers' health and metadata.
        self.pool = WorkerPool(router, config, specs)
        if tokenizer is None and config.local_tokenizer:
            assert config.tokenizer is not None
            tokenizer = LocalTokenizer(
                config.tokenizer, config.chat_template, image_placeholder=config.image_placeholder
            )
        #: The local tokenizer, or None when workers tokenize.
        self.tokenizer = tokenizer
        #: The served model names.
        self.models = Models(config, self.pool)
        #: Calls to the workers, and the attempt loop.
        self.upstream = Upstream(router, self.pool, config, self.metrics)
        #: Request preparation: body, hints, tokens, breakpoints.
        self.preparer = Preparer(config, router, self.models, self.upstream, tokenizer)
        #: Answers clients from workers' responses.
        self.relay = Relay(self.pool, self.metrics)
        #: Speculative-prefill warm-ups.
        self.warmups = Warmups(router, self.upstream, self.metrics)
        #: The KV-event subscriber's lifecycle.
        self.events = EventSubscription(
            router, config, self.metrics, self.pool, enabled=self.fleet.follows_events(router)
        )
        self.fleet.attach(router, self.pool, self.events, self.metrics)
        self._health: asyncio.Task[None] | None = None
        if self.events.enabled and not all(s.events_endpoint for s in specs.values()):
            log.warning(
                "some workers have no events endpoint: the router only learns their cache"
                " from its own decisions (for fresh_ttl seconds)"
            )

    # -- the application -----------------------------------------------------------------

    def make_app(self) -> web.Application:
        """A new aiohttp application serving this proxy (startup and cleanup included)."""
        app = web.Application(client_max_size=self.config.max_body_size, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health_endpoint)
        app.router.add_get("/metrics", self._metrics)
        if self.config.admin_token is not None:
            AdminApi(self.config.admin_token, self.fleet).install(app)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    @property
    def subscriber(self) -> Any:
        """The :class:`kvroute.events.ZmqSubscriber` feeding the router while serving, or None."""
        return self.events.subscriber

    async def _startup(self, app: web.Application) -> None:
        self.events.start()  # first: if it fails, nothing else is open yet
        await self.upstream.start()
        await self.fleet.start()
        await self.pool.check_all()
        self._health = asyncio.create_task(self.pool.run(), name="kvroute-proxy-health")
        log.info(
            "kvroute proxy: %d workers (%d healthy), %s, tokenizing %s",
            len(self.pool.workers),
            len(self.pool.healthy()),
            "KV events" if self.config.kv_events else "approximate mode (no KV events)",
            "locally" if self.tokenizer is not None else "on the workers",
        )

    async def _cleanup(self, app: web.Application) -> None:
        await self.fleet.stop()
        await self.warmups.close()
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
            self._health = None
        await self.upstream.close()
        await self.events.stop()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Unknown paths, wrong methods and the proxy's own bugs answer JSON in the API's shape."""
        api: Api = "anthropic" if request.path.startswith("/v1/messages") else "openai"
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return self._error(api, ProxyError(e.status, e.reason))
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the client went away: nothing to answer
        except Exception as e:
            log.exception("%s %s: internal error", request.method, request.path)
            return self._error(
                api, ProxyError(500, f"internal error in the routing proxy: {type(e).__name__}")
            )

    @staticmethod
    def _error(api: Api, error: ProxyError) -> web.Response:
        headers = None if error.retry else {"x-should-retry": "false"}
        return web.json_response(error_body(api, error), status=error.status, headers=headers)

    def _count_request(self, request: web.Request, status: int) -> None:
        self.metrics.proxy_requests.labels(request.path, str(status)).inc()

    # -- small endpoints -----------------------------------------------------------------

    async def _health_endpoint(self, request: web.Request) -> web.StreamResponse:
        healthy = self.pool.healthy()
        workers = self.pool.snapshot()
        states = self.router.worker_states()  # each worker's index: trusted or degraded
        body = {
            "status": "ok" if healthy else "unavailable",
            "healthy_workers": len(healthy),
            "workers": [
                {**w, "cache": states[w["id"]].to_dict()} if w["id"] in states else w
                for w in workers
            ],
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self._count_request(request, 200)
        anthropic = "anthropic-version" in request.headers
        return web.json_response(self.models.listing(anthropic=anthropic))

    # -- generation and count_tokens -----------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "messages")

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        counted = count_tokens(request, self.preparer, self.upstream)
        return await self._answer(request, "anthropic", counted)

    async def _answer(
        self, request: web.Request, api: Api, work: Awaitable[web.StreamResponse]
    ) -> web.StreamResponse:
        """``work``'s response, or its :class:`ProxyError` in ``api``'s shape; counted both ways."""
        status = 500
        try:
            resp = await work
            status = resp.status
            return resp
        except ProxyError as e:
            status = e.status
            return self._error(api, e)
        finally:
            self._count_request(request, status)

    async def _serve(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        return await self._answer(request, api_of(kind), self._generate(request, kind))

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        if not self.pool.workers:
            why = "the fleet has no worker yet (they join through the admin API, a file or DNS)"
            raise ProxyError(503, why, code="no_worker_available")
        prepared = await self.preparer.prepare(request, kind)
        call, routed = prepared.call, prepared.request

        async def answer(
            decision: Decision, response: aiohttp.ClientResponse, lc: Lifecycle
        ) -> Relayed:
            return await self.relay.answer(
                request, call, decision, response, lc, collect=routed.speculative_prefill
            )

        try:
            relayed = await self.upstream.send(routed, call, answer)
        except AttemptFailed as last:  # every attempt failed
            return failure_response(call, last)
        if routed.speculative_prefill:
            assert routed.session_id is not None
            self.warmups.warm(call, routed.session_id, relayed.reply)
        return relayed.response
