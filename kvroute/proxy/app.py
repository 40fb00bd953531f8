"""The routing proxy: an aiohttp application in front of a fleet of vLLM / SGLang workers.

Per generation request (``/v1/completions``, ``/v1/chat/completions``,
``/v1/messages``):

1. read the body (``max_body_size``, else 413), parse it (else 400), map
   and check the model (else 404), check an Anthropic body's structure;
2. read the agent hints (session, priority, cache_control, ...);
3. tokenize the prompt as the engine will (locally, or through a worker's
   render / tokenize endpoint);
4. :meth:`Router.route`, timed into the metrics; forward to the chosen
   worker. If the worker cannot be reached, answers 5xx, or fails before a
   byte reached the client, report :meth:`Router.failed` and route again
   with the workers that failed this request excluded, up to ``retries``
   times. Upstream 4xx answers are passed through as they are;
5. pass the response through (SSE streams event by event, unchanged but
   for the few events described in :mod:`~kvroute.proxy.openai` and
   :mod:`~kvroute.proxy.anthropic`), report :meth:`Router.first_token` at
   the first generated content and :meth:`Router.finished` (or ``failed``)
   at the end, and count the worker's cache reads and writes.

A request with the speculative-prefill hint and a session is followed by a
warm-up of its next turn (see :mod:`~kvroute.proxy.warmup`).

Also: ``/v1/messages/count_tokens`` (forwarded; when the workers lack it,
the prompt is counted as routing tokenizes it: locally, or through a
worker's render / tokenize endpoint), ``/v1/models``, ``/health`` and
``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

import aiohttp
from aiohttp import web

from ..events.metrics import CONTENT_TYPE_LATEST, Metrics
from ..request import CacheControl, Decision, Request
from ..router import NoWorkerAvailable, Router
from .anthropic import (
    AnthropicStream,
    anthropic_hints,
    anthropic_usage,
    fill_usage,
    validate_messages,
)
from .config import ProxyConfig
from .errors import Api, ProxyError, error_body, upstream_message
from .hints import Hints, Usage, common_prefix, pinned_breakpoints
from .openai import OpenAIStream, openai_hints, openai_usage
from .sse import encode_event
from .tokenize import (
    RENDER_PATHS,
    Kind,
    LocalTokenizer,
    local_tokens,
    prompt_token_ids,
    render_token_ids,
    tokenize_body,
    tokenize_token_ids,
)
from .warmup import ReplyCollector, reply_of, warmup_body
from .workers import WorkerPool

__all__ = ["CACHE_SOURCE_HEADER", "PREDICTED_HEADER", "WORKER_HEADER", "ProxyApp"]

log = logging.getLogger("kvroute.proxy")

#: Response header naming the worker that served a request.
WORKER_HEADER: Final = "X-Kvroute-Worker"
#: Response header: the prompt tokens the router predicted cached on that worker.
PREDICTED_HEADER: Final = "X-Kvroute-Predicted-Cached-Tokens"
#: Response header (non-streaming): ``worker`` or ``predicted`` cache figures.
CACHE_SOURCE_HEADER: Final = "X-Kvroute-Cache-Source"

# Client headers passed on to workers (besides the body's type and the request id).
_FORWARDED: Final = ("authorization", "x-api-key", "anthropic-version", "anthropic-beta", "accept")
_CONNECTION_ERRORS: Final = (aiohttp.ClientConnectionError, TimeoutError, OSError)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_T = TypeVar("_T")


class _Retry(Exception):
    """This attempt failed before any byte reached the client; another worker may serve it.

    :param reason: for the logs.
    :param status: an upstream 5xx status to pass on if no attempt succeeds.
    :param body: that answer's body.
    :param content_type: that answer's content type.
    """

    def __init__(
        self,
        reason: str,
        status: int | None = None,
        body: bytes = b"",
        content_type: str = "application/json",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.body = body
        self.content_type = content_type


class _Lifecycle:
    """Reports one routed request's lifecycle to the router exactly once."""

    __slots__ = ("_id", "_router", "ended", "first")

    def __init__(self, router: Router, request_id: int) -> None:
        self._router = router
        self._id = request_id
        self.first = False
        self.ended = False

    def first_token(self) -> None:
        if not self.first and not self.ended:
            self.first = True
            self._router.first_token(self._id)

    def finish(self) -> None:
        if not self.ended:
            self.ended = True
            self._router.finished(self._id)

    def fail(self) -> None:
        if not self.ended:
            self.ended = True
            self._router.failed(self._id)


@dataclass(slots=True)
class _Call:
    """One client request on its way to a worker."""

    api: Api
    kind: Kind
    path: str
    body: dict[str, Any]
    data: bytes
    stream: bool
    strip_usage: bool
    client_id: str
    headers: dict[str, str]
    #: Keep the reply (for a speculative-prefill warm-up).
    collect: bool = False
    #: The reply, once the response completed (see :mod:`~kvroute.proxy.warmup`).
    reply: Any = None


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
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        router: Router | None = None,
        metrics: Metrics | None = None,
        tokenizer: LocalTokenizer | None = None,
    ) -> None:
        self.config = config
        n = len(config.workers)
        if router is None:
            router = Router(
                block_size=config.block_size,
                policy=config.policy,
                workers=range(n),
                kv_events=config.kv_events,
            )
        else:
            for w in range(n):
                router.add_worker(w)
        #: The router every request goes through.
        self.router = router
        #: The Prometheus series served at ``/metrics``.
        self.metrics = metrics if metrics is not None else Metrics(router)
        #: Workers' health and metadata.
        self.pool = WorkerPool(router, config)
        self._configured_models = frozenset((*config.models, *config.lora_adapters))
        if tokenizer is None and config.local_tokenizer:
            assert config.tokenizer is not None
            tokenizer = LocalTokenizer(
                config.tokenizer, config.chat_template, image_placeholder=config.image_placeholder
            )
        #: The local tokenizer, or None when workers tokenize.
        self.tokenizer = tokenizer
        self._session: aiohttp.ClientSession | None = None
        self._health: asyncio.Task[None] | None = None
        self._subscriber: Any = None
        self._warmups: set[asyncio.Task[None]] = set()
        self._ids = itertools.count()
        # Render endpoints a worker answered 404 for: use /tokenize for those.
        self._no_render: set[str] = set()
        if config.tokenize_with == "tokenize":
            self._no_render.update(RENDER_PATHS.values())
        if config.kv_events and not all(w.events_endpoint for w in config.workers):
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
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    @property
    def subscriber(self) -> Any:
        """The :class:`kvroute.events.ZmqSubscriber` feeding the router while serving, or None."""
        return self._subscriber

    async def _startup(self, app: web.Application) -> None:
        self._start_events()  # first: if it fails, nothing else is open yet
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.connect_timeout, sock_read=self.config.read_timeout
        )
        # No connection limit per host: streams are long-lived and concurrent.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        self.pool.bind(self._session)
        await self.pool.check_all()
        self._health = asyncio.create_task(self.pool.run(), name="kvroute-proxy-health")
        log.info(
            "kvroute proxy: %d workers (%d healthy), %s, tokenizing %s",
            len(self.pool.workers),
            len(self.pool.healthy()),
            "KV events" if self.config.kv_events else "approximate mode (no KV events)",
            "locally" if self.tokenizer is not None else "on the workers",
        )

    def _start_events(self) -> None:
        if not self.config.kv_events:
            return
        try:
            from ..events.zmq import ZmqSubscriber
        except ImportError as e:
            raise RuntimeError(
                f"KV events need kvroute.events.zmq and pyzmq, which cannot be imported: {e}"
            ) from None
        sub = ZmqSubscriber(self.router, fmt=self.config.events_format, metrics=self.metrics)
        for w, spec in enumerate(self.config.workers):
            if spec.events_endpoint:
                sub.subscribe(w, spec.events_endpoint, spec.replay_endpoint)
        sub.start()
        self._subscriber = sub
        # A worker back from being unhealthy may be a restarted engine: check
        # its event stream against its replay history now, not at its next event.
        replayable = {w for w, spec in enumerate(self.config.workers) if spec.replay_endpoint}
        self.pool.on_up = lambda w: sub.resync(w) if w in replayable else None

    async def _cleanup(self, app: web.Application) -> None:
        for task in list(self._warmups):
            task.cancel()
        await asyncio.gather(*self._warmups, return_exceptions=True)
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
            self._health = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.pool.bind(None)
        if self._subscriber is not None:
            self.pool.on_up = None
            sub, self._subscriber = self._subscriber, None
            await asyncio.get_running_loop().run_in_executor(None, sub.stop)

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

    # -- small endpoints -----------------------------------------------------------------

    async def _health_endpoint(self, request: web.Request) -> web.StreamResponse:
        healthy = self.pool.healthy()
        body = {
            "status": "ok" if healthy else "unavailable",
            "healthy_workers": len(healthy),
            "workers": self.pool.snapshot(),
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def _served_models(self) -> AbstractSet[str] | None:
        if self.config.models:
            return self._configured_models
        return self.pool.model_ids()

    def _lora_name(self, model: object) -> str | None:
        """The LoRA adapter a (mapped) model name selects, or None for a base model."""
        if not isinstance(model, str):
            return None
        if model in self.config.lora_adapters or model in self.pool.lora_adapters():
            return model
        return None

    async def _models(self, request: web.Request) -> web.StreamResponse:
        entries: list[dict[str, Any]]
        if self.config.models:
            entries = [
                {"id": m, "object": "model", "created": 0, "owned_by": "kvroute"}
                for m in self.config.models
            ]
            # vLLM lists an adapter with its base model as parent (known when only one is)
            parent = self.config.models[0] if len(self.config.models) == 1 else None
            entries += [
                {"id": m, "object": "model", "created": 0, "owned_by": "kvroute", "parent": parent}
                for m in self.config.lora_adapters
                if m not in self.config.models
            ]
        else:
            entries = [dict(e) for e in self.pool.models()]
        served = {e["id"] for e in entries}
        for pattern, target in self.config.model_map:
            if not any(c in pattern for c in "*?[") and pattern not in served and target in served:
                entries.append({"id": pattern, "object": "model", "created": 0,
                                "owned_by": "kvroute", "root": target})  # fmt: skip
        self._count_request(request, 200)
        if "anthropic-version" in request.headers:
            data = [
                {"type": "model", "id": e["id"], "display_name": e["id"],
                 "created_at": "1970-01-01T00:00:00Z"}
                for e in entries
            ]  # fmt: skip
            return web.json_response({
                "data": data, "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            })  # fmt: skip
        return web.json_response({"object": "list", "data": entries})

    def _count_request(self, request: web.Request, status: int) -> None:
        self.metrics.proxy_requests.labels(request.path, str(status)).inc()

    # -- reading requests ----------------------------------------------------------------

    async def _read_json(self, request: web.Request) -> tuple[dict[str, Any], bytes]:
        limit = self.config.max_body_size
        too_big = ProxyError(
            413, f"request body too large (limit {limit} bytes)", code="request_too_large"
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_big
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_big from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProxyError(400, f"invalid JSON body: {e}", code="invalid_json") from None
        except RecursionError:
            raise ProxyError(
                400, "invalid JSON body: nested too deeply", code="invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise ProxyError(400, "the body must be a JSON object", code="invalid_json")
        return body, raw

    def _resolve_model(self, body: dict[str, Any]) -> bool:
        """Map the body's model; 404 if it is not served. True if the body changed."""
        model = body.get("model")
        if model is None:
            return False
        if not isinstance(model, str):
            raise ProxyError(400, "model must be a string")
        target = self.config.map_model(model)
        served = self._served_models()
        if served is not None and target not in served:
            shown = model if target == model else f"{model} (mapped to {target})"
            raise ProxyError(404, f"The model `{shown}` does not exist.", code="model_not_found")
        if target != model:
            body["model"] = target
            return True
        return False

    def _forward_headers(self, request: web.Request, client_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": client_id}
        for name in _FORWARDED:
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value
        if self.config.upstream_api_key:
            headers["authorization"] = f"Bearer {self.config.upstream_api_key}"
        return headers

    async def _prepare(self, request: web.Request, kind: Kind) -> tuple[_Call, Hints]:
        api: Api = "anthropic" if kind == "messages" else "openai"
        body, raw = await self._read_json(request)
        if kind == "messages":
            validate_messages(body)
        elif kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ProxyError(400, "messages: must be a non-empty list")
        elif "prompt" not in body:
            raise ProxyError(400, "prompt: Field required")
        changed = self._resolve_model(body)
        header = self.config.session_header
        if kind == "messages":
            hints = anthropic_hints(body, request.headers, header)
        else:
            hints = openai_hints(body, request.headers, header)
        stream = body.get("stream") is True
        strip_usage = False
        if stream and api == "openai":
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                # Ask for the usage chunk (token counts, cache hits); the client
                # did not, so it is not passed on.
                body["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
                strip_usage = changed = True
        data = json.dumps(body, ensure_ascii=False).encode() if changed else raw
        client_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        call = _Call(
            api, kind, request.path, body, data, stream, strip_usage, client_id,
            self._forward_headers(request, client_id),
        )  # fmt: skip
        return call, hints

    # -- tokenizing ----------------------------------------------------------------------

    async def _tokens(self, call: _Call) -> list[int]:
        if call.kind == "completions":
            ids = prompt_token_ids(call.body)
            if ids is not None:
                return ids
        if self.tokenizer is not None:
            loop = asyncio.get_running_loop()
            # A long prompt takes milliseconds to render and encode: off the loop.
            return await loop.run_in_executor(
                None, local_tokens, self.tokenizer, call.kind, call.body
            )
        return await self._remote_tokens(call)

    async def _remote_tokens(self, call: _Call) -> list[int]:
        """Token ids from a worker's render endpoint, else its ``/tokenize``.

        :raises ProxyError: the workers' own 4xx answer to the prompt; 502 if
            the workers asked serve neither endpoint (no retry can help:
            the proxy needs a local tokenizer); 503 if no healthy worker
            answered.
        """
        tried: set[int] = set()
        last = "no healthy worker"
        lacking: list[int] = []  # workers that serve neither endpoint
        while (w := self.pool.pick(tried)) is not None:
            render = RENDER_PATHS[call.kind]
            use_render = render not in self._no_render
            path = render if use_render else "/tokenize"
            data = call.data if use_render else json.dumps(tokenize_body(call.kind, call.body))
            try:
                status, text, _ = await self._exchange(w, path, data, call.headers)
            except _Retry as e:
                tried.add(w)
                last = f"worker {w}: {e.reason}"
                continue
            try:
                answer = json.loads(text)
            except ValueError:
                answer = None
            message = upstream_message(answer)
            if status in (404, 405) and "model" not in (message or "").lower():
                if use_render:
                    log.info("worker %d has no %s; tokenizing with /tokenize", w, render)
                    self._no_render.add(render)
                    continue
                # Not the prompt's fault: passing this 404 on would tell the
                # client its endpoint does not exist.
                tried.add(w)
                lacking.append(w)
                continue
            if status >= 500:
                tried.add(w)
                last = f"worker {w} answered {status} to {path}"
                continue
            if status >= 400:
                raise ProxyError(status, message or f"the worker refused the prompt ({status})")
            try:
                if use_render:
                    return render_token_ids(call.kind, answer)
                return tokenize_token_ids(answer)
            except ValueError as e:
                tried.add(w)
                last = f"worker {w}: {e}"
        if lacking:
            if len(lacking) == 1:
                who = f"worker {lacking[0]} serves"
            else:
                who = f"workers {', '.join(map(str, sorted(lacking)))} serve"
            if self.config.tokenize_with == "tokenize":
                what = "no /tokenize"
            else:
                what = f"neither {RENDER_PATHS[call.kind]} nor /tokenize"
            raise ProxyError(
                502,
                f"the routing proxy cannot tokenize the request: {who} {what}; start the"
                " proxy with --tokenizer (the model's tokenizer.json and chat template)",
                code="tokenizer_unavailable",
                retry=False,
            )
        raise ProxyError(503, f"cannot tokenize the request: {last}", code="no_worker_available")

    # -- routing and forwarding ----------------------------------------------------------

    def _route(self, request: Request, exclude: list[int]) -> Decision:
        """Route, with the workers that failed this request excluded."""
        t0 = time.perf_counter()
        decision = self.router.route(request, exclude=exclude)
        elapsed = time.perf_counter() - t0
        self.metrics.routed_request(decision.worker, elapsed, decision.predicted_cached_tokens)
        return decision

    async def _prefix_tokens(self, call: _Call, prefix: dict[str, Any]) -> list[int] | None:
        """The tokens of a breakpoint's prefix body (None if it cannot be tokenized)."""
        data = json.dumps(prefix, ensure_ascii=False).encode()
        try:
            return await self._tokens(replace(call, body=prefix, data=data))
        except ProxyError as e:
            log.info("request %s: a cache breakpoint's prefix is not pinned: %s", call.client_id, e)
            return None

    async def _tokens_and_breakpoints(
        self, call: _Call, hints: Hints
    ) -> tuple[list[int], tuple[CacheControl, ...]]:
        """The prompt's tokens and its cache breakpoints, each with its prefix's length.

        A breakpoint that does not close the prompt is measured by tokenizing
        the request cut after its block (beside the request itself): the
        tokens the two share are the prefix it caches. Only an event-free
        router uses the lengths (to keep each prefix predicted for its TTL);
        with KV events the workers report what they hold, and the
        breakpoints only pin the session, so nothing is measured.
        """
        pinned = pinned_breakpoints(hints.cache_control)
        if self.router.kv_events:
            return await self._tokens(call), tuple(CacheControl(b.ttl) for b in pinned)
        cuts = [self._prefix_tokens(call, b.prefix) for b in pinned if b.prefix is not None]
        tokens, *prefixes = await asyncio.gather(self._tokens(call), *cuts)
        assert tokens is not None
        found = iter(prefixes)
        breakpoints = []
        for b in pinned:
            if b.prefix is None:
                breakpoints.append(CacheControl(b.ttl))
            elif (prefix := next(found)) is not None:
                breakpoints.append(CacheControl(b.ttl, common_prefix(tokens, prefix)))
        return tokens, tuple(breakpoints)

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        call, hints = await self._prepare(request, kind)
        tokens, breakpoints = await self._tokens_and_breakpoints(call, hints)
        try:
            routed = Request(
                next(self._ids),
                tokens=tokens,
                session_id=hints.session_id,
                priority=hints.priority,
                lora_name=self._lora_name(call.body.get("model")),
                cache_salt=hints.cache_salt,
                expected_output_tokens=hints.expected_output_tokens,
                cache_control=breakpoints,
                speculative_prefill=(hints.speculative_prefill or self.config.speculative_prefill)
                and hints.session_id is not None,
            )
        except (TypeError, ValueError) as e:
            raise ProxyError(400, str(e)) from None
        call.collect = routed.speculative_prefill
        tried: list[int] = []
        failure: _Retry | None = None
        for attempt in range(self.config.retries + 1):
            try:
                decision = self._route(routed, tried)
            except NoWorkerAvailable as e:
                if failure is None:
                    raise ProxyError(503, str(e), code="no_worker_available") from None
                break
            if attempt:
                self.metrics.retries.inc()
            try:
                response = await self._attempt(request, call, decision)
            except _Retry as r:
                tried.append(decision.worker)
                failure = r
                self.metrics.upstream_errors.labels(str(decision.worker)).inc()
                log.warning(
                    "request %s: worker %d failed (%s)%s",
                    call.client_id,
                    decision.worker,
                    r.reason,
                    "; retrying" if attempt < self.config.retries else "",
                )
                continue
            if routed.speculative_prefill:
                assert routed.session_id is not None
                self._warm_up(call, routed.session_id)
            return response
        assert failure is not None
        if failure.status is not None:
            # Every attempt failed; the last worker's own answer says why.
            return self._upstream_error(
                call.api,
                failure.status,
                failure.body,
                {"Content-Type": failure.content_type, "X-Request-Id": call.client_id},
            )
        raise ProxyError(
            502, f"no worker could serve the request: {failure.reason}", code="upstream_error"
        )

    def _warm_up(self, call: _Call, session_id: str) -> None:
        """Send the session's next-turn prefix to the worker that served it (in the background).

        The router's plan is taken in any case: a response that ended without
        a reply to continue (the client left, an empty answer) leaves nothing
        to warm, and its plan must not stay behind.
        """
        plan = self.router.warmup_plan(session_id)
        if plan is None or call.reply is None:
            return
        body = warmup_body(call.kind, call.body, call.reply)
        if body is None:
            return
        data = json.dumps(body, ensure_ascii=False).encode()
        headers = {**call.headers, "X-Request-Id": f"{call.client_id}-warmup"}
        task = asyncio.create_task(self._send_warmup(plan.worker, call.path, data, headers))
        self._warmups.add(task)
        task.add_done_callback(self._warmups.discard)

    async def _send_warmup(
        self, worker: int, path: str, data: bytes, headers: dict[str, str]
    ) -> None:
        # A prefill of a long conversation on a busy worker may take a while: the
        # request timeouts apply, not the tokenizer's, and a slow or failed
        # warm-up says nothing about the worker's health (its checks do that).
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.connect_timeout, sock_read=self.config.read_timeout
        )
        url = self.pool.url(worker) + path
        try:
            async with self._session.post(url, data=data, headers=headers, timeout=timeout) as r:
                await r.read()
                status = r.status
        except (aiohttp.ClientError, *_CONNECTION_ERRORS) as e:
            outcome, detail = "failed", f"{type(e).__name__} {e}"
        else:
            outcome, detail = ("sent", "") if status < 400 else ("refused", f"status {status}")
        self.metrics.warmups.labels(outcome).inc()
        log.debug(
            "warm-up %s to worker %d: %s %s", headers["X-Request-Id"], worker, outcome, detail
        )

    async def _until_down(
        self, worker: int, what: str, work: Callable[[], Coroutine[Any, Any, _T]]
    ) -> _T:
        """Await ``work()`` (a call to ``worker``), giving up if it is marked unhealthy meanwhile.

        :raises _Retry: the worker is unhealthy, became so, or cannot be reached
            (then it is marked unhealthy).
        """
        down = self.pool.down_future(worker)
        if down.done():
            raise _Retry(f"worker {worker} is unhealthy")
        task = asyncio.create_task(work())
        try:
            await asyncio.wait((task, down), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise _Retry(f"worker {worker} was marked unhealthy")
        try:
            return task.result()
        except _CONNECTION_ERRORS as e:
            reason = f"{what}: {type(e).__name__} {e}".strip()
            self.pool.mark_down(worker, reason)
            raise _Retry(reason) from None
        except aiohttp.ClientError as e:
            raise _Retry(f"{what}: {type(e).__name__} {e}".strip()) from None

    async def _open(self, worker: int, call: _Call) -> aiohttp.ClientResponse:
        """POST ``call`` to ``worker``; the response is closed if the worker goes down."""
        assert self._session is not None
        url = self.pool.url(worker) + call.path
        session = self._session

        async def post() -> aiohttp.ClientResponse:
            return await session.post(url, data=call.data, headers=call.headers)

        resp = await self._until_down(worker, f"POST {call.path}", post)
        if not self.pool.workers[worker].healthy:  # went down as the answer arrived
            resp.close()
            raise _Retry(f"worker {worker} was marked unhealthy")
        self.pool.track(worker, resp)
        return resp

    async def _exchange(
        self, worker: int, path: str, data: bytes | str, headers: Mapping[str, str]
    ) -> tuple[int, bytes, str]:
        """POST to ``worker`` and read the whole answer: ``(status, body, content type)``."""
        assert self._session is not None
        session = self._session
        timeout = aiohttp.ClientTimeout(
            total=self.config.tokenize_timeout, connect=self.config.connect_timeout
        )

        async def go() -> tuple[int, bytes, str]:
            url = self.pool.url(worker) + path
            async with session.post(url, data=data, headers=headers, timeout=timeout) as r:
                content_type = r.headers.get("Content-Type", "application/json")
                return r.status, await r.read(), content_type

        return await self._until_down(worker, f"POST {path}", go)

    def _response_headers(
        self, upstream: aiohttp.ClientResponse, call: _Call, decision: Decision
    ) -> dict[str, str]:
        return {
            "Content-Type": upstream.headers.get("Content-Type", "application/json"),
            "X-Request-Id": call.client_id,
            WORKER_HEADER: str(decision.worker),
            PREDICTED_HEADER: str(decision.predicted_cached_tokens),
        }

    async def _attempt(
        self, request: web.Request, call: _Call, decision: Decision
    ) -> web.StreamResponse:
        worker = decision.worker
        lc = _Lifecycle(self.router, int(decision.request_id))
        upstream: aiohttp.ClientResponse | None = None
        try:
            upstream = await self._open(worker, call)
            status = upstream.status
            if status >= 400:
                try:
                    body = await upstream.read()
                except _CONNECTION_ERRORS:
                    body = b""
                content_type = upstream.headers.get("Content-Type", "application/json")
                if status >= 500:
                    raise _Retry(f"answered {status}", status, body, content_type)
                return self._upstream_error(
                    call.api, status, body, self._response_headers(upstream, call, decision)
                )
            if call.stream and upstream.content_type == "text/event-stream":
                return await self._relay_stream(request, call, decision, upstream, lc)
            return await self._relay_json(call, decision, upstream, lc)
        finally:
            lc.fail()  # a no-op when the request already ended
            if upstream is not None:
                self.pool.untrack(worker, upstream)
                upstream.release()

    @staticmethod
    def _upstream_error(
        api: Api, status: int, body: bytes, headers: dict[str, str], fallback: str = ""
    ) -> web.Response:
        """A worker's error answer, passed on; in Anthropic's shape on ``/v1/messages``.

        (vLLM's own Messages errors already are; a gateway's HTML page or an
        OpenAI-shaped error before the engine is rewrapped, its message kept,
        else ``fallback``, else the status.)
        """
        if api == "anthropic":
            try:
                obj = json.loads(body)
            except ValueError:
                obj = None
            if not (isinstance(obj, dict) and obj.get("type") == "error"):
                message = upstream_message(obj) or fallback or f"the worker answered {status}"
                body = json.dumps(error_body("anthropic", ProxyError(status, message))).encode()
                headers = {**headers, "Content-Type": "application/json"}
        return web.Response(status=status, body=body, headers=headers)

    def _account(
        self, call: _Call, decision: Decision, usage: Usage | None, predicted: bool
    ) -> None:
        """Count a response's cache reads and writes into the metrics.

        The worker's figures; where it reported none, the router's prediction,
        as the answer's usage already carries on ``/v1/messages`` (``predicted``)
        and only the metrics do on OpenAI paths (vLLM reports cached tokens
        there only with ``--enable-prompt-tokens-details``). Either is logged.
        """
        if usage is None:
            return
        read = usage.cached_tokens
        where = "usage carries" if predicted else None
        if read is None:
            read = min(decision.predicted_cached_tokens, usage.prompt_tokens)
            where = "the cache metrics count"
        self.metrics.cache_usage(read, max(usage.prompt_tokens - read, 0))
        if where is not None:
            log.info(
                "request %s: worker %d reported no cache reads; %s the router's"
                " prediction (%d of %d prompt tokens)",
                call.client_id, decision.worker, where, read, usage.prompt_tokens,
            )  # fmt: skip

    async def _relay_json(
        self, call: _Call, decision: Decision, upstream: aiohttp.ClientResponse, lc: _Lifecycle
    ) -> web.StreamResponse:
        try:
            data = await upstream.read()
        except _CONNECTION_ERRORS as e:
            self.pool.mark_down(decision.worker, f"reading the answer: {type(e).__name__} {e}")
            raise _Retry(f"reading the answer: {type(e).__name__}") from None
        except aiohttp.ClientError as e:
            raise _Retry(f"reading the answer: {type(e).__name__} {e}") from None
        lc.first_token()
        headers = self._response_headers(upstream, call, decision)
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        usage: Usage | None = None
        predicted = False
        if isinstance(obj, dict):
            raw_usage = obj.get("usage")
            if call.kind == "messages":
                if isinstance(raw_usage, dict) and fill_usage(
                    raw_usage, decision.predicted_cached_tokens
                ):
                    predicted = True
                    data = json.dumps(obj, ensure_ascii=False).encode()
                usage = anthropic_usage(raw_usage)
            else:
                usage = openai_usage(raw_usage)
        if usage is not None:
            # predicted: the cache figures (in the answer on /v1/messages, in
            # the metrics everywhere) are the router's, the worker gave none
            reported = not predicted and usage.cached_tokens is not None
            headers[CACHE_SOURCE_HEADER] = "worker" if reported else "predicted"
        self._account(call, decision, usage, predicted)
        if call.collect:
            call.reply = reply_of(call.kind, obj)
        lc.finish()
        return web.Response(status=upstream.status, body=data, headers=headers)

    async def _relay_stream(
        self,
        request: web.Request,
        call: _Call,
        decision: Decision,
        upstream: aiohttp.ClientResponse,
        lc: _Lifecycle,
    ) -> web.StreamResponse:
        watcher: OpenAIStream | AnthropicStream
        collector = ReplyCollector(call.kind) if call.collect else None
        if call.kind == "messages":
            watcher = AnthropicStream(decision.predicted_cached_tokens, collector=collector)
        else:
            watcher = OpenAIStream(strip_usage=call.strip_usage, collector=collector)
        resp: web.StreamResponse | None = None
        worker = decision.worker
        upstream_error: str | None = None
        while True:
            try:
                chunk = await upstream.content.readany()
            except (*_CONNECTION_ERRORS, aiohttp.ClientPayloadError) as e:
                reason = f"stream broke: {type(e).__name__} {e}".strip()
                if isinstance(e, _CONNECTION_ERRORS):
                    self.pool.mark_down(worker, reason)
                if resp is None:
                    raise _Retry(reason) from None
                upstream_error = reason
                break
            out = watcher.feed(chunk) if chunk else watcher.flush()
            if watcher.first_token:
                lc.first_token()
            if out:
                if resp is None:
                    resp = web.StreamResponse(
                        status=upstream.status,
                        headers=self._response_headers(upstream, call, decision),
                    )
                    resp.headers["Cache-Control"] = "no-cache"
                    await resp.prepare(request)
                try:
                    await resp.write(out)
                except ConnectionError:  # the client went away
                    log.info("request %s: client disconnected", call.client_id)
                    if lc.first:
                        lc.finish()
                    else:
                        lc.fail()
                    return resp
            if not chunk:
                break
        if resp is None:
            raise _Retry("empty stream")
        if upstream_error is not None:
            self.metrics.upstream_errors.labels(str(worker)).inc()
            log.warning("request %s: worker %d %s", call.client_id, worker, upstream_error)
            err = ProxyError(502, f"the worker failed mid-stream: {upstream_error}")
            event = "error" if call.api == "anthropic" else None
            with contextlib.suppress(ConnectionError):
                await resp.write(encode_event(error_body(call.api, err), event))
            lc.fail()
        else:
            predicted = isinstance(watcher, AnthropicStream) and watcher.predicted
            self._account(call, decision, watcher.usage, predicted)
            if watcher.error is not None:
                lc.fail()
            else:
                if collector is not None:
                    call.reply = collector.reply()
                lc.finish()
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    # -- generation endpoints ------------------------------------------------------------

    async def _serve(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        api: Api = "anthropic" if kind == "messages" else "openai"
        status = 500
        try:
            resp = await self._generate(request, kind)
            status = resp.status
            return resp
        except ProxyError as e:
            status = e.status
            return self._error(api, e)
        finally:
            self._count_request(request, status)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "messages")

    # -- count_tokens --------------------------------------------------------------------

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        status = 500
        try:
            resp = await self._count(request)
            status = resp.status
            return resp
        except ProxyError as e:
            status = e.status
            return self._error("anthropic", e)
        finally:
            self._count_request(request, status)

    async def _count(self, request: web.Request) -> web.StreamResponse:
        """``{"input_tokens": N}``: the worker's own count, else the prompt as routing tokenizes it.

        A worker's answer is passed on (its 4xx in Anthropic's shape); when the
        workers lack the endpoint (404 / 405 not about the model) or none
        answers, the prompt is tokenized as for routing a ``/v1/messages``
        request: locally, else by a worker's render endpoint or ``/tokenize``.

        :raises ProxyError: the body is invalid, the model is not served, or
            the proxy cannot tokenize the prompt either (see :meth:`_remote_tokens`).
        """
        body, raw = await self._read_json(request)
        validate_messages(body, count_tokens=True)
        data = json.dumps(body).encode() if self._resolve_model(body) else raw
        client_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        headers = self._forward_headers(request, client_id)
        tried: set[int] = set()
        while (w := self.pool.pick(tried)) is not None:
            try:
                status, answer, ctype = await self._exchange(w, request.path, data, headers)
            except _Retry:
                tried.add(w)
                continue
            if status >= 500:
                tried.add(w)
                continue
            if status < 400:
                return web.Response(status=status, body=answer, headers={"Content-Type": ctype})
            try:
                obj = json.loads(answer)
            except ValueError:
                obj = None
            message = upstream_message(obj)
            if status in (404, 405) and "model" not in (message or "").lower():
                break  # the workers serve no count_tokens endpoint
            return self._upstream_error(
                "anthropic", status, answer, {"Content-Type": ctype},
                fallback=f"the worker could not count tokens ({status})",
            )  # fmt: skip
        # vLLM's Messages request model (the render endpoint parses it) requires
        # max_tokens, which counting has no use for: ask for the least.
        render_body = body if "max_tokens" in body else {**body, "max_tokens": 1}
        call = _Call(
            api="anthropic",
            kind="messages",
            path="/v1/messages",
            body=body,
            data=json.dumps(render_body, ensure_ascii=False).encode(),
            stream=False,
            strip_usage=False,
            client_id=client_id,
            headers=headers,
        )
        return web.json_response({"input_tokens": len(await self._tokens(call))})
