"""The routing proxy: an aiohttp application in front of a fleet of vLLM / SGLang workers.

:class:`ProxyApp` holds the proxy's state and wires its parts into an aiohttp
application. A generation request (``/v1/completions``,
``/v1/chat/completions``, ``/v1/messages``, ``/v1/responses``) goes through them in turn:

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

A ``/v1/responses`` request continuing a ``previous_response_id`` goes
first to the worker that produced it (:mod:`~kvroute.proxy.responses`: its
:class:`~kvroute.proxy.responses.ResponseStore`), whose memory holds it.

In a prefill/decode-disaggregated fleet (workers with a role) step 2's
attempts are :mod:`~kvroute.proxy.disagg`'s: the prefill leg, then (or with)
the decode leg, whose answer step 3 relays.

Also ``/v1/messages/count_tokens`` (:mod:`~kvroute.proxy.count_tokens`),
``/v1/embeddings``, ``/tokenize`` and ``/detokenize`` (sent to one worker,
:mod:`~kvroute.proxy.passthrough`), ``/v1/models``, ``/health``, ``/livez``
and ``/readyz`` (:mod:`~kvroute.proxy.probes`), ``/metrics`` and, with an
admin token, the admin API (:mod:`~kvroute.proxy.admin`). Every API request
is recorded from arrival to end (:mod:`~kvroute.proxy.observe`: the access
log, the request histograms, a span with ``tracing``). The startup opens
the access log, starts the KV-event subscriber
(:mod:`~kvroute.proxy.subscription`), opens the upstream connections,
starts following the fleet's membership (:mod:`~kvroute.proxy.fleet`) and
runs the health checker (:mod:`~kvroute.proxy.workers`); the cleanup stops
them. Errors are answered in the called API's shape
(:mod:`~kvroute.proxy.errors`), the proxy's own bugs included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from ..config import RouterConfig
from ..disagg import DisaggConfig
from ..events.metrics import CONTENT_TYPE_LATEST, Metrics
from ..fleet.membership import Membership
from ..request import Decision
from ..router import Router
from .admin import AdminApi
from .call import Api, Call, Kind, api_of
from .config import ProxyConfig
from .connections import ConnectionGuard
from .count_tokens import count_tokens
from .deadlines import Deadlines
from .disagg import DisaggLegs
from .disconnect import HangUps
from .errors import ProxyError, error_body
from .fleet import ProxyFleet
from .migration import Migrator
from .models import Models
from .observe import RECORD, Observer
from .outliers import OutlierDetector
from .passthrough import PASS_THROUGH_PATHS, PassThrough
from .prepare import Preparer
from .probes import Probes
from .relay import (
    CACHE_SOURCE_HEADER,
    PREDICTED_HEADER,
    WORKER_HEADER,
    Relay,
    Relayed,
    failure_response,
)
from .replicas import ProxySync
from .responses import LocalResponseStore, ResponseStore
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
        its block size, policy and policy parameters, its ``router`` settings,
        workers ``0..n-1``, ``kv_events`` when any worker has an events
        endpoint). Missing workers are added to it, with their roles.
    :param metrics: the metrics to count into (default: new ones over the router).
    :param tokenizer: a local tokenizer (default: loaded from
        ``config.tokenizer`` when tokenizing locally).
    :param membership: the fleet's workers (default: from ``config``; see
        :class:`~kvroute.proxy.fleet.ProxyFleet`).
    :param responses: where Responses API answers live (default: a
        :class:`~kvroute.proxy.responses.LocalResponseStore`).
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
        responses: ResponseStore | None = None,
    ) -> None:
        self.config = config
        #: The fleet's workers, their sources, and the changes followed while serving.
        self.fleet = ProxyFleet(config, membership=membership)
        specs = self.fleet.specs()
        if router is None:
            settings = RouterConfig(
                block_size=config.block_size,
                kv_events=self.fleet.kv_events(),
                disagg=DisaggConfig(local_prefill_tokens=config.disagg_local_prefill_tokens),
                max_sessions=config.max_sessions,
                **config.router,
            )
            router = Router(
                policy=config.policy,
                workers=specs,
                config=settings,
                policy_params=config.policy_params,
            )
        for w, spec in specs.items():
            router.add_worker(w, role=spec.role)
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
        #: Client connections: the cap, the header and body deadlines.
        self.connections = ConnectionGuard(config, self.metrics.registry)
        #: Counts clients that hang up.
        self.hangups = HangUps(self.metrics.registry)
        #: Ejects workers that fail attempts in a row.
        self.outliers = OutlierDetector(self.pool, config, self.metrics.registry)
        #: Calls to the workers, and the attempt loop.
        self.upstream = Upstream(router, self.pool, config, self.metrics, self.outliers)
        #: Request preparation: body, hints, tokens, breakpoints.
        self.preparer = Preparer(config, router, self.models, self.upstream, tokenizer)
        #: Continues streams whose worker failed mid-way.
        self.migrator = Migrator(self.upstream, config, self.metrics.registry)
        #: Arms each generation request's deadline.
        self.deadlines = Deadlines(config, self.metrics.registry)
        #: Answers clients from workers' responses.
        self.relay = Relay(self.pool, self.metrics, self.migrator)
        #: Speculative-prefill warm-ups.
        self.warmups = Warmups(router, self.upstream, self.metrics)
        #: A disaggregated request's two legs.
        self.disagg = DisaggLegs(router, self.pool, self.upstream, config)
        #: The KV-event subscriber's lifecycle.
        self.events = EventSubscription(
            router, config, self.metrics, self.pool, enabled=self.fleet.follows_events(router)
        )
        self.fleet.attach(router, self.pool, self.events, self.metrics)
        #: Replica sync (``sync_url``), or None.
        self.replicas: ProxySync | None = None
        if config.sync_url:
            members = self.fleet.membership
            self.replicas = ProxySync(router, config, self.pool, self.metrics, members)
        if responses is None:  # with sync, a store every replica shares
            responses = self.replicas.responses if self.replicas else LocalResponseStore()
        #: Which worker holds each Responses API answer.
        self.responses: ResponseStore = responses
        #: Embeddings, tokenize and detokenize, sent to one worker.
        self.passthrough = PassThrough(router, self.preparer, self.upstream)
        #: The access log, request metrics and spans.
        self.observer = Observer(config, self.metrics, self.pool)
        #: ``/livez`` and ``/readyz``.
        self.probes = Probes(
            self.pool, lambda: self.events.subscriber, lambda: self.events.enabled
        )
        self._health: asyncio.Task[None] | None = None
        if self.events.enabled and not all(s.events_endpoint for s in specs.values()):
            log.warning(
                "some workers have no events endpoint: the router only learns their cache"
                " from its own decisions (for fresh_ttl seconds)"
            )

    # -- the application -----------------------------------------------------------------

    def make_app(self) -> web.Application:
        """A new aiohttp application serving this proxy (startup and cleanup included)."""
        # The connection guard is outermost: it sees each request from its headers to its end;
        # then each API request's record (access log, metrics, span), then error shaping.
        middlewares = [self.connections.middleware, self.observer.middleware, self._errors]
        app = web.Application(client_max_size=self.config.max_body_size, middlewares=middlewares)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_post("/v1/responses", self._responses)
        for path in PASS_THROUGH_PATHS:
            app.router.add_post(path, self._passthrough)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health_endpoint)
        app.router.add_get("/livez", self.probes.livez)
        app.router.add_get("/readyz", self.probes.readyz)
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
        self.observer.start()  # first: if it fails, nothing else is open yet
        # then the sync: a snapshot it loads is where the events resume
        resume = await self.replicas.start() if self.replicas is not None else {}
        self.events.start(resume, self.replicas.sync.salts if self.replicas else None)
        if self.replicas is not None:
            self.replicas.attach(self.events.subscriber)
        await self.upstream.start()
        await self.fleet.start()
        await self.pool.check_all()
        self._health = asyncio.create_task(self.pool.run(), name="kvroute-proxy-health")

    async def _cleanup(self, app: web.Application) -> None:
        await self.fleet.stop()
        await self.warmups.close()
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
            self._health = None
        await self.upstream.close()
        if self.replicas is not None:
            await self.replicas.stop()
        await self.events.stop()
        self.observer.close()

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

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "responses")

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, "openai", self.passthrough.serve(request))

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
            self.hangups.note(request)
            return resp
        except ProxyError as e:
            status = e.status
            return self._error(api, e)
        except asyncio.CancelledError:
            status = self.hangups.cancelled(request)
            raise
        finally:
            self._count_request(request, status)

    async def _serve(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        return await self._answer(request, api_of(kind), self._generate(request, kind))

    async def _holder(self, call: Call) -> int | None:
        """The healthy worker holding the response a Responses request continues, if known.

        A shared store (replica sync) that has not heard of the id asks Redis
        once (a replica that started after the response was made).
        """
        previous = call.body.get("previous_response_id") if call.kind == "responses" else None
        if not isinstance(previous, str):
            return None
        worker = await self.responses.aworker_of(previous)
        state = self.pool.workers.get(worker) if worker is not None else None
        return worker if state is not None and state.healthy else None

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        if not self.pool.workers:
            why = "the fleet has no worker yet (they join through the admin API, a file or DNS)"
            raise ProxyError(503, why, code="no_worker_available")
        if kind == "responses" and self.router.disaggregated:
            why = "the Responses API is not served by a prefill/decode-disaggregated fleet"
            raise ProxyError(501, why, code="not_supported")
        return await self.deadlines.run(request, lambda: self._generate_within(request, kind))

    async def _generate_within(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        prepared = await self.preparer.prepare(request, kind)
        call, routed = prepared.call, prepared.request
        record = request.get(RECORD)
        if record is not None:
            self.observer.prepared(record, prepared)

        async def answer(
            decision: Decision, response: aiohttp.ClientResponse, lc: Lifecycle
        ) -> Relayed:
            relayed = await self.relay.answer(
                request, call, decision, response, lc, collect=routed.speculative_prefill,
                routed=routed,
            )  # fmt: skip
            if relayed.response_id is not None and call.body.get("store") is not False:
                self.responses.remember(relayed.response_id, decision.worker)
            return relayed

        attempt = self.disagg.attempt if self.router.disaggregated else None
        holder = await self._holder(call)
        try:
            relayed = await self.upstream.send(
                routed, call, answer, record, prefer=holder, attempt=attempt
            )
        except AttemptFailed as last:  # every attempt failed
            if record is not None:
                record.outcome = "upstream_failed"
            return failure_response(call, last)
        if record is not None:
            record.relayed(relayed.usage, relayed.outcome)
        if routed.speculative_prefill:
            assert routed.session_id is not None
            self.warmups.warm(call, routed.session_id, relayed.reply)
        return relayed.response
