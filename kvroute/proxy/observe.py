"""What the proxy tells operators about each request: the access log, request metrics, a span.

:class:`Observer` wraps every API request (an aiohttp middleware;
``/health``, ``/livez``, ``/readyz`` and ``/metrics`` are left alone) in a
:class:`~kvroute.proxy.record.RequestRecord`, which the parts fill in as the request goes:

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
from .access_log import AccessLog, open_access_log
from .config import ProxyConfig
from .disconnect import HangUps
from .record import RequestRecord
from .workers import WorkerPool

if TYPE_CHECKING:
    from .prepare import Prepared
    from .tracing import Tracing

__all__ = ["QUIET_PATHS", "RECORD", "Observer", "RequestRecord"]

#: Paths neither logged nor counted as requests (probes and scrapes).
QUIET_PATHS: Final = frozenset({"/health", "/livez", "/readyz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
