"""Prometheus metrics for the event subscriber and the proxy.

One :class:`Metrics` owns its own :class:`prometheus_client.CollectorRegistry`
(so two proxies, or two tests, in one process never collide) and holds every
kvroute series. Counters and histograms are updated where things happen; the
index size and per-worker load are read from the :class:`~kvroute.Router` at
scrape time, so they cost nothing between scrapes.

Needs the ``serve`` extra (``prometheus_client``); the core library never
imports this module.

>>> from kvroute import Router
>>> m = Metrics(Router(block_size=16, workers=[0]))
>>> m.event_applied(0, "ok", 3)
>>> b"kvroute_events_total" in m.render()
True
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Final, Literal, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .._logging import RateLimitedLog

if TYPE_CHECKING:
    from ..router import Router

__all__ = [
    "CONTENT_TYPE_LATEST",
    "EVENT_STATUSES",
    "EventStatus",
    "LiteHistogram",
    "Metrics",
    "RateLimitedLog",
]

#: How an event was applied (per event: ok ... ignored), or what the subscriber
#: met (per batch: gap, replayed, malformed; per occurrence: replay_failed and
#: restart, each of which cleared the worker; ``cleared`` is the engine's own
#: AllBlocksCleared only; ``anchored``: a store whose parent the index had lost,
#: applied through the prompt it continues).
EventStatus = Literal[
    "ok",
    "unknown_block",
    "gap",
    "replayed",
    "cleared",
    "malformed",
    "rejected",
    "mismatch",
    "ignored",
    "anchored",
    "replay_failed",
    "restart",
]
EVENT_STATUSES: Final[tuple[str, ...]] = get_args(EventStatus)

# Route latency: the interesting range is 5 us .. 10 ms.
_ROUTE_BUCKETS: Final = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 0.1)
_TOKEN_BUCKETS: Final = (0, 16, 128, 512, 1024, 4096, 16384, 32768, 65536, 131072)
# Per request through the proxy: first token and whole request from 5 ms (a
# cached short prompt) to 10 min (the read timeout); decode steps of 1 ms to 1 s;
# tokenizing from 50 us (a short prompt, locally) to a second (a worker's render).
_LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0
)  # fmt: skip
_ITL_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0
)  # fmt: skip
_TOKENIZE_BUCKETS: Final = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1, 1.0)
_OUTPUT_BUCKETS: Final = (1, 4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)


class _RouterCollector(Collector):
    """Index size and memory, and per-worker load, read at scrape time."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self) -> Iterator[Metric]:
        r = self._router
        index = r.index
        blocks = GaugeMetricFamily("kvroute_index_blocks", "Distinct blocks in the index")
        blocks.add_metric([], float(len(index)))
        yield blocks
        res = GaugeMetricFamily(
            "kvroute_index_residencies", "(worker, block) residencies in the index"
        )
        res.add_metric([], float(index.residencies()))
        yield res
        mem = GaugeMetricFamily("kvroute_index_bytes", "Bytes owned by the index")
        mem.add_metric([], float(index.sizeof()))
        yield mem
        labels = ["worker"]
        fams = {
            "active_requests": GaugeMetricFamily(
                "kvroute_worker_active_requests", "Requests in flight", labels=labels
            ),
            "prefill_tokens": GaugeMetricFamily(
                "kvroute_worker_prefill_tokens",
                "Uncached prompt tokens not yet prefilled",
                labels=labels,
            ),
            "decode_blocks": GaugeMetricFamily(
                "kvroute_worker_decode_blocks", "KV blocks of requests in flight", labels=labels
            ),
            "healthy": GaugeMetricFamily(
                "kvroute_worker_healthy", "1 if the worker takes requests", labels=labels
            ),
        }
        for w in r.workers():
            try:
                load = r.load(w)
            except KeyError:  # removed between workers() and load()
                continue
            for key, fam in fams.items():
                fam.add_metric([str(w)], float(load[key]))
        yield from fams.values()
        yield from _trust_metrics(r)


def _trust_metrics(r: Router) -> Iterator[Metric]:
    """Per worker, whether its index is trusted and how far it drifts; session evictions."""
    drift = GaugeMetricFamily(
        "kvroute_index_drift",
        "Share of the worker's recent requests whose predicted cached tokens were off"
        " the engine's report by more than the tolerance",
        labels=["worker"],
    )
    degraded = GaugeMetricFamily(
        "kvroute_worker_degraded",
        "1 while the worker's KV index is not trusted (routed on the router's own decisions)",
        labels=["worker", "cause"],
    )
    times = CounterMetricFamily(
        "kvroute_worker_degradations", "Times the worker's KV index became untrusted",
        labels=["worker"],
    )  # fmt: skip
    for w, st in r.worker_states().items():
        drift.add_metric([str(w)], st.drift)
        degraded.add_metric([str(w), st.cause or "none"], float(st.state == "degraded"))
        times.add_metric([str(w)], float(st.degradations))
    yield drift
    yield degraded
    yield times
    evicted = CounterMetricFamily(
        "kvroute_sessions_evicted",
        "Session pins and warm-up plans evicted by the router's max_sessions bound",
    )
    evicted.add_metric([], float(r.stats()["sessions_evicted"]))
    yield evicted


class Metrics:
    """Every kvroute Prometheus series, in a registry of its own.

    :param router: the router whose index and load are exported at scrape time,
        or ``None`` for counters only.
    :param registry: a registry to register into (default: a new one).
    """

    def __init__(self, router: Router | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.route_seconds = Histogram(
            "kvroute_route_seconds",
            "Time spent in Router.route()",
            buckets=_ROUTE_BUCKETS,
            registry=reg,
        )
        self.predicted_cached_tokens = Histogram(
            "kvroute_predicted_cached_tokens",
            "Prompt tokens the router predicts are cached on the chosen worker",
            buckets=_TOKEN_BUCKETS,
            registry=reg,
        )
        self.routed = Counter(
            "kvroute_routed_requests", "Requests routed, by worker", ["worker"], registry=reg
        )
        self.events = Counter(
            "kvroute_events",
            "KV events by worker and status (batches for gap/replayed/malformed; "
            "subscriber-side clears for replay_failed/restart)",
            ["worker", "status"],
            registry=reg,
        )
        self.mismatches = Counter(
            "kvroute_event_mismatches",
            "Stored events that disagree with the router's configuration (kind=block_size or hash)",
            ["worker", "kind"],
            registry=reg,
        )
        self.proxy_requests = Counter(
            "kvroute_proxy_requests",
            "Proxy requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=reg,
        )
        self.upstream_errors = Counter(
            "kvroute_upstream_errors",
            "Failed attempts to reach a worker (connection errors, 5xx, timeouts)",
            ["worker"],
            registry=reg,
        )
        self.retries = Counter(
            "kvroute_proxy_retries", "Requests re-routed after a worker failed", registry=reg
        )
        self.warmups = Counter(
            "kvroute_warmups",
            "Speculative-prefill warm-ups sent by the proxy, by outcome (sent, refused, failed)",
            ["outcome"],
            registry=reg,
        )
        self.cache_read_tokens = Counter(
            "kvroute_cache_read_tokens",
            "Prompt tokens served from a worker's prefix cache, as the worker reports"
            " (the router's prediction where it reports none)",
            registry=reg,
        )
        self.cache_write_tokens = Counter(
            "kvroute_cache_creation_tokens",
            "Prompt tokens computed and written to a worker's prefix cache",
            registry=reg,
        )
        # -- per proxied request, by worker (observed once, when the request ends)
        per_worker = ("worker",)
        self.ttft_seconds = LiteHistogram(
            "kvroute_proxy_ttft_seconds",
            "Time to first token through the proxy (the whole answer, for a JSON one), by worker",
            per_worker, _LATENCY_BUCKETS,
        )  # fmt: skip
        self.inter_token_seconds = LiteHistogram(
            "kvroute_proxy_inter_token_seconds",
            "Mean time between output tokens of each streamed request (after the first), by worker",
            per_worker, _ITL_BUCKETS,
        )  # fmt: skip
        self.request_seconds = LiteHistogram(
            "kvroute_proxy_request_seconds",
            "Duration of routed requests through the proxy, arrival to last byte, by worker",
            per_worker, _LATENCY_BUCKETS,
        )  # fmt: skip
        self.prompt_tokens = LiteHistogram(
            "kvroute_proxy_prompt_tokens",
            "Prompt tokens of routed requests (the worker's count, else the router's), by worker",
            per_worker, _TOKEN_BUCKETS,
        )  # fmt: skip
        self.output_tokens = LiteHistogram(
            "kvroute_proxy_output_tokens",
            "Output tokens of routed requests, as the worker reports them, by worker",
            per_worker, _OUTPUT_BUCKETS,
        )  # fmt: skip
        self.tokenize_seconds = LiteHistogram(
            "kvroute_tokenize_seconds",
            "Time to tokenize a request's prompt for routing (locally or on a worker)",
            (), _TOKENIZE_BUCKETS,
        )  # fmt: skip
        for h in (
            self.ttft_seconds, self.inter_token_seconds, self.request_seconds,
            self.prompt_tokens, self.output_tokens, self.tokenize_seconds,
        ):  # fmt: skip
            reg.register(h)
        # the five per-worker children, looked up once per worker
        self._per_worker: dict[int, tuple[_Child, _Child, _Child, _Child, _Child]] = {}
        # the children counted once per event batch and per routed request, looked up once
        self._applied: dict[tuple[int, str], Counter] = {}
        self._routed: dict[int, Counter] = {}
        self._usage_lock = threading.Lock()
        self._read = 0
        self._written = 0
        if router is not None:
            reg.register(_RouterCollector(router))
        reg.register(_RatioCollector(self))

    # -- helpers used by the subscriber and the proxy ------------------------------------

    def event_applied(self, worker: int, status: str, n: int = 1) -> None:
        """Count ``n`` events of ``worker`` applied with ``status``."""
        if n:
            child = self._applied.get((worker, status))
            if child is None:
                child = self._applied[worker, status] = self.events.labels(str(worker), status)
            child.inc(n)

    def mismatch(self, worker: int, kind: str) -> None:
        """Count a stored event that disagrees with the router (``block_size`` / ``hash``)."""
        self.mismatches.labels(str(worker), kind).inc()

    def routed_request(self, worker: int, seconds: float, predicted_cached_tokens: int) -> None:
        """Record one ``route()`` call: its latency and its prediction."""
        self.route_seconds.observe(seconds)
        self.predicted_cached_tokens.observe(predicted_cached_tokens)
        child = self._routed.get(worker)
        if child is None:
            child = self._routed[worker] = self.routed.labels(str(worker))
        child.inc()

    def request_finished(
        self,
        worker: int,
        seconds: float,
        ttft: float | None,
        inter_token: float | None,
        prompt_tokens: int | None,
        output_tokens: int | None,
    ) -> None:
        """Record one routed request that ended: its figures on ``worker`` (None: unknown)."""
        children = self._per_worker.get(worker)
        if children is None:
            w = str(worker)
            children = self._per_worker[worker] = (
                self.request_seconds.labels(w),
                self.ttft_seconds.labels(w),
                self.inter_token_seconds.labels(w),
                self.prompt_tokens.labels(w),
                self.output_tokens.labels(w),
            )
        duration, first, itl, prompt, output = children
        duration.observe(seconds)
        if ttft is not None:
            first.observe(ttft)
        if inter_token is not None:
            itl.observe(inter_token)
        if prompt_tokens is not None:
            prompt.observe(prompt_tokens)
        if output_tokens is not None:
            output.observe(output_tokens)

    def cache_usage(self, read_tokens: int, write_tokens: int) -> None:
        """Add one response's cache reads and writes (prompt tokens)."""
        with self._usage_lock:
            self._read += read_tokens
            self._written += write_tokens
        if read_tokens:
            self.cache_read_tokens.inc(read_tokens)
        if write_tokens:
            self.cache_write_tokens.inc(write_tokens)

    def cache_read_write_ratio(self) -> float:
        """Cache-read prompt tokens per cache-written one so far (0.0 before any write)."""
        with self._usage_lock:
            return self._read / self._written if self._written else 0.0

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0.0 if absent); for tests and logs.

        >>> m = Metrics()
        >>> m.event_applied(3, "gap")
        >>> m.value("kvroute_events_total", {"worker": "3", "status": "gap"})
        1.0
        """
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else float(v)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format (without ``_created`` series).

        prometheus_client gives every counter and histogram a ``*_created``
        timestamp series; Prometheus ignores it in the text format and it
        doubles what a scrape carries, so it is left out here (not switched
        off process-wide: another library's registry keeps its own).
        """
        return generate_latest(_WithoutCreated(self.registry))


class _Child:
    """One label set's bucket counts (the last is +Inf) and sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value``."""
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class LiteHistogram(Collector):
    """A Prometheus histogram whose ``observe()`` is a bisect and two additions.

    prometheus_client's ``Histogram.observe`` takes a lock per bucket and
    per sum (2.4-2.8 us a call on the machine of docs/operations.md); this
    one costs 0.36-0.41 us there, for series the proxy observes several
    times per request. It is meant to be observed from one thread (the proxy's event
    loop): no lock, so a scrape from another thread may see one observation
    counted in a bucket but not yet in the sum. Exported at scrape time as an
    ordinary histogram (cumulative ``_bucket{le}``, ``_sum``, ``_count``).

    >>> h = LiteHistogram("t_seconds", "A test.", ("worker",), (0.1, 1.0))
    >>> h.labels("0").observe(0.5); h.labels("0").observe(7)
    >>> [(s.labels.get("le"), s.value) for s in next(iter(h.collect())).samples]
    [('0.1', 0.0), ('1.0', 1.0), ('+Inf', 2.0), (None, 2.0), (None, 7.5)]

    :param name: the series' name (without ``_bucket``...).
    :param documentation: its help text.
    :param labelnames: its label names (empty: one unlabelled series).
    :param buckets: the finite upper bounds, ascending (+Inf is added).
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = [float(b) for b in buckets] + [math.inf]
        self._le: list[str] = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], _Child] = {}

    def labels(self, *values: str) -> _Child:
        """The series of one label set (made at first use)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = _Child(self._bounds)
        return child

    def observe(self, value: float) -> None:
        """Count ``value`` (an unlabelled histogram)."""
        self.labels().observe(value)

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            running = 0
            buckets = []
            for le, n in zip(self._le, child.counts, strict=True):
                running += n
                buckets.append((le, float(running)))
            fam.add_metric(list(values), buckets, child.sum)
        yield fam


class _WithoutCreated:
    """A registry's metrics without their ``_created`` samples (for ``generate_latest``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            if metric.type in ("counter", "histogram", "summary", "gaugehistogram"):
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class _RatioCollector(Collector):
    """The fleet's cache read / write ratio (published for four-agent sessions: 11.7x)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "kvroute_cache_read_write_ratio",
            "Cache-read prompt tokens per cache-write prompt token, since start",
        )
        g.add_metric([], self._m.cache_read_write_ratio())
        yield g
