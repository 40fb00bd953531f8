"""What the proxy tells operators about each request: the access log, request metrics, a span.

:class:`Observer` wraps every API request (an aiohttp middleware;
``/health``, ``/livez``, ``/readyz`` and ``/metrics`` are left alone) in a
:class:`RequestRecord`, which the parts fill in as the request goes:

- :mod:`~kvroute.proxy.prepare`'s result: request id, model, session,
  stream, the router's prompt length, the time tokenizing took;
- each routed attempt (:meth:`~kvroute.proxy.upstream.Upstream.send`): the
  worker, what chose it, matched blocks, predicted cached tokens, the
  attempt count; the first token's time (:class:`~kvroute.proxy.upstream.Lifecycle`);
- the relay's result (:class:`~kvroute.proxy.relay.Relayed`): the worker's
  usage (prompt, cached and output tokens) and how the answer ended.

When the request ends (answered, failed, or the client gone: aiohttp then
cancels the handler), :meth:`Observer.finish` builds the access log line
once (:mod:`~kvroute.proxy.access_log`), observes the request histograms once
(:meth:`~kvroute.events.metrics.Metrics.request_finished`) and ends the span
(:mod:`~kvroute.proxy.tracing`, when on). Nothing is done per streamed chunk.

It also exports, read at scrape time, the figures the health checks scrape
from the workers (``kvroute_worker_waiting_requests``,
``kvroute_worker_kv_usage``, for workers that report them) and
``kvroute_proxy_requests_in_flight``; ``kvroute_worker_info`` (1 per worker,
to join on ``worker`` for readable dashboards) is the fleet's
(:mod:`~kvroute.proxy.fleet`).

>>> record = RequestRecord("POST", "/v1/chat/completions", start=10.0)
>>> record.first, record.end = 10.25, 11.25
>>> record.output_tokens, record.stream = 11, True
>>> record.ttft, record.duration, record.inter_token
(0.25, 1.25, 0.1)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..events.metrics import Metrics
from .access_log import AccessLog, json_string, open_access_log, utc_time
from .config import ProxyConfig
from .disconnect import HangUps
from .workers import WorkerPool

if TYPE_CHECKING:
    from ..request import Decision, Request
    from .call import Call
    from .prepare import Prepared
    from .relay import Relayed
    from .tracing import Tracing

__all__ = ["QUIET_PATHS", "RECORD", "Observer", "RequestRecord"]

#: Paths neither logged nor counted as requests (probes and scrapes).
QUIET_PATHS: Final = frozenset({"/health", "/livez", "/readyz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestRecord:
    """One API request as the access log, the metrics and the trace see it.

    Times are ``time.perf_counter()`` readings; a figure not (yet) known is None
    (``worker`` is -1 until a worker is chosen).

    :param method: the HTTP method.
    :param path: the path called.
    :param start: when the request arrived.
    """

    __slots__ = (
        "attempts", "cached_tokens", "client", "end", "first", "id", "matched_blocks",
        "method", "model", "outcome", "output_tokens", "path", "policy",
        "predicted_cached_tokens", "prompt_tokens", "session", "span", "start", "status",
        "stream", "tokenize_seconds", "worker",
    )  # fmt: skip

    def __init__(self, method: str, path: str, start: float) -> None:
        self.method = method
        self.path = path
        self.start = start
        self.first: float | None = None
        self.end = start
        self.id: str | None = None
        self.client: str | None = None
        self.model: str | None = None
        self.session: str | None = None
        self.stream = False
        self.worker = -1
        self.policy: str | None = None
        self.matched_blocks = 0
        self.predicted_cached_tokens = 0
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.output_tokens: int | None = None
        self.tokenize_seconds: float | None = None
        self.attempts = 0
        self.status = 0
        self.outcome = "ok"
        self.span: Any = None

    # -- filled in by the parts ----------------------------------------------------------

    def prepared(self, call: Call, request: Request, tokenize_seconds: float | None) -> None:
        """What preparing the request found."""
        self.id = call.client_id
        model = call.body.get("model")
        self.model = model if isinstance(model, str) else None
        self.stream = call.stream
        self.session = request.session_id
        self.prompt_tokens = len(request.tokens) if request.tokens is not None else None
        self.tokenize_seconds = tokenize_seconds

    def routed(self, decision: Decision) -> None:
        """One routed attempt."""
        self.attempts += 1
        self.worker = decision.worker
        self.policy = decision.policy
        self.matched_blocks = decision.matched_blocks
        self.predicted_cached_tokens = decision.predicted_cached_tokens

    def relayed(self, relayed: Relayed) -> None:
        """What the worker's answer reported, and how it ended."""
        usage = relayed.usage
        if usage is not None:
            self.prompt_tokens = usage.prompt_tokens
            self.cached_tokens = usage.cached_tokens
            self.output_tokens = usage.output_tokens
        self.outcome = relayed.outcome

    # -- figures -------------------------------------------------------------------------

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token (None: none came)."""
        return None if self.first is None else self.first - self.start

    @property
    def duration(self) -> float:
        """Seconds from arrival to the end."""
        return self.end - self.start

    @property
    def inter_token(self) -> float | None:
        """A stream's mean seconds between output tokens after the first (None: unknown)."""
        n = self.output_tokens
        if self.first is None or not self.stream or n is None or n < 2:
            return None
        return (self.end - self.first) / (n - 1)

    def json_line(self, label: str | None, now: float) -> str:
        """The access log's JSON line: :meth:`fields` as JSON, built in one f-string.

        >>> import json
        >>> r = RequestRecord("POST", "/v1/messages", start=1.0)
        >>> r.status, r.end = 400, 1.002
        >>> json.loads(r.json_line(None, 0.0)) == r.fields(None, 0.0)
        True
        """
        routed = self.worker >= 0
        first, tok = self.first, self.tokenize_seconds
        ms = 1000.0
        return (
            f'{{"time":"{utc_time(now)}","id":{_s(self.id)},"method":{json_string(self.method)},'
            f'"path":{json_string(self.path)},"status":{self.status},'
            f'"outcome":{json_string(self.outcome)},"model":{_s(self.model)},'
            f'"session":{_s(self.session)},"stream":{"true" if self.stream else "false"},'
            f'"worker":{self.worker if routed else "null"},"worker_label":{_s(label)},'
            f'"policy":{_s(self.policy)},'
            f'"matched_blocks":{self.matched_blocks if routed else "null"},'
            f'"predicted_cached_tokens":{self.predicted_cached_tokens if routed else "null"},'
            f'"reported_cached_tokens":{_i(self.cached_tokens)},'
            f'"prompt_tokens":{_i(self.prompt_tokens)},"output_tokens":{_i(self.output_tokens)},'
            f'"ttft_ms":{"null" if first is None else f"{(first - self.start) * ms:.3f}"},'
            f'"duration_ms":{(self.end - self.start) * ms:.3f},'
            f'"tokenize_ms":{"null" if tok is None else f"{tok * ms:.3f}"},'
            f'"retries":{max(self.attempts - 1, 0) if routed else "null"},'
            f'"client":{_s(self.client)}}}\n'
        )

    def fields(self, label: str | None, now: float) -> dict[str, object]:
        """The access log's fields (see :data:`~kvroute.proxy.access_log.FIELDS`)."""
        routed = self.worker >= 0
        ttft = self.ttft
        tok = self.tokenize_seconds
        return {
            "time": utc_time(now),
            "id": self.id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "outcome": self.outcome,
            "model": self.model,
            "session": self.session,
            "stream": self.stream,
            "worker": self.worker if routed else None,
            "worker_label": label,
            "policy": self.policy,
            "matched_blocks": self.matched_blocks if routed else None,
            "predicted_cached_tokens": self.predicted_cached_tokens if routed else None,
            "reported_cached_tokens": self.cached_tokens,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "ttft_ms": None if ttft is None else _ms(ttft),
            "duration_ms": _ms(self.end - self.start),
            "tokenize_ms": None if tok is None else _ms(tok),
            "retries": max(self.attempts - 1, 0) if routed else None,
            "client": self.client,
        }


def _s(value: str | None) -> str:
    return "null" if value is None else json_string(value)


def _i(value: int | None) -> str:
    return "null" if value is None else str(value)


def _ms(seconds: float) -> float:
    # as json_line prints it: milliseconds to 3 decimals
    return float(f"{seconds * 1000.0:.3f}")


#: Where a request's record is kept while it is served (a plain key before
#: aiohttp 3.12, which has no ``RequestKey``).
RECORD: Final[Any] = (
    web.RequestKey("kvroute_record", RequestRecord)
    if hasattr(web, "RequestKey")
    else "kvroute_record"
)


class Observer:
    """The access log, the per-request metrics and the spans of one proxy.

    :param config: ``access_log``, ``access_log_format``, ``tracing``.
    :param metrics: the request histograms go here; the worker info and
        in-flight collectors are registered in its registry.
    :param pool: the workers' labels and scraped figures.
    """

    def __init__(self, config: ProxyConfig, metrics: Metrics, pool: WorkerPool) -> None:
        self.config = config
        self.metrics = metrics
        self.pool = pool
        #: The open access log (between :meth:`start` and :meth:`close`), or None.
        self.access_log: AccessLog | None = None
        #: Spans, when ``config.tracing``; replace it to use another tracer provider.
        self.tracing: Tracing | None = None
        if config.tracing:
            from .tracing import Tracing

            self.tracing = Tracing()
        #: API requests being served now.
        self.in_flight = 0
        #: Set when the proxy stops: requests cut off then are logged as ``shutdown``.
        self.stopping = False
        self._idle: asyncio.Event | None = None
        with contextlib.suppress(ValueError):  # a Metrics shared by two proxies has them
            metrics.registry.register(_WorkerCollector(self))

    def start(self) -> None:
        """Open the access log.

        :raises OSError: its file cannot be opened.
        """
        if self.access_log is None:
            self.access_log = open_access_log(self.config.access_log, self.config.access_log_format)

    def close(self) -> None:
        """Flush and close the access log. Idempotent."""
        log, self.access_log = self.access_log, None
        if log is not None:
            log.close()

    def prepared(self, record: RequestRecord, prepared: Prepared) -> None:
        """Note what preparing the request found; send the span's context on with it."""
        record.prepared(prepared.call, prepared.request, prepared.tokenize_seconds)
        if record.span is not None and self.tracing is not None:
            self.tracing.inject(record.span, prepared.call.headers)

    def label(self, worker: int) -> str | None:
        """A worker's name or ``host:port`` (None: no such worker)."""
        state = self.pool.workers.get(worker)
        return None if state is None else state.spec.label

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record every API request from arrival to its end."""
        if request.path in QUIET_PATHS:
            return await handler(request)
        record = RequestRecord(request.method, request.path, time.perf_counter())
        record.client = request.remote
        record.id = request.headers.get("X-Request-Id")
        request[RECORD] = record
        if self.tracing is not None:
            record.span = self.tracing.start(request)
        self.in_flight += 1
        try:
            response = await handler(request)
            record.status = response.status
            if not response.prepared:  # a streamed answer knows; this one is still to send
                transport = request.transport
                if transport is None or transport.is_closing():  # gone before its answer
                    record.outcome = "client_closed"
            return response
        except asyncio.CancelledError:  # the client went away, or the proxy cut it at its stop
            record.status = HangUps.status_when_cancelled(request)
            record.outcome = "shutdown" if self.stopping else "client_closed"
            raise
        except web.HTTPException as e:
            record.status = e.status
            raise
        except BaseException:
            record.status = 500
            raise
        finally:
            self.in_flight -= 1
            if self._idle is not None and not self.in_flight:
                self._idle.set()
            self.finish(record)

    def finish(self, record: RequestRecord) -> None:
        """Log, count and trace a request that ended."""
        record.end = time.perf_counter()
        if record.status >= 400 and record.outcome == "ok":
            record.outcome = "error"
        worker = record.worker
        label = self.label(worker) if worker >= 0 else None
        if worker >= 0:
            self.metrics.request_finished(
                worker,
                record.end - record.start,
                record.ttft,
                record.inter_token,
                record.prompt_tokens,
                record.output_tokens,
            )
        if record.tokenize_seconds is not None:
            self.metrics.tokenize_seconds.observe(record.tokenize_seconds)
        log = self.access_log
        if log is not None:
            if log.json:
                log.write_line(record.json_line(label, time.time()))
            else:
                log.write(record.fields(label, time.time()))
        if record.span is not None and self.tracing is not None:
            self.tracing.end(record.span, record, label)

    async def wait_idle(self, timeout: float) -> int:
        """Wait until no API request is in flight, or ``timeout`` seconds; those left."""
        if self.in_flight:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
            self._idle = None
        return self.in_flight


class _WorkerCollector(Collector):
    """The workers' scraped figures and the requests in flight, at scrape time.

    (``kvroute_worker_info`` comes from the fleet: :mod:`kvroute.proxy.fleet`.)
    """

    def __init__(self, observer: Observer) -> None:
        self._observer = observer

    def collect(self) -> Iterator[Metric]:
        pool = self._observer.pool
        waiting = GaugeMetricFamily(
            "kvroute_worker_waiting_requests",
            "Requests waiting on the worker, as its /metrics last said",
            labels=["worker"],
        )
        usage = GaugeMetricFamily(
            "kvroute_worker_kv_usage",
            "The worker's KV cache usage in [0, 1], as its /metrics last said",
            labels=["worker"],
        )
        for w, state in list(pool.workers.items()):
            if state.waiting is not None:
                waiting.add_metric([str(w)], state.waiting)
            if state.kv_usage is not None:
                usage.add_metric([str(w)], state.kv_usage)
        yield waiting
        yield usage
        flight = GaugeMetricFamily(
            "kvroute_proxy_requests_in_flight", "API requests the proxy is serving now"
        )
        flight.add_metric([], float(self._observer.in_flight))
        yield flight
