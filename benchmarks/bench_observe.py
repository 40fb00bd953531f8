"""What observing one proxied request costs: the access log line and the request metrics.

Each timed call handles ``BATCH`` finished requests on a running event loop
(the access log's flush timer needs one), so the figure per request is the
time divided by ``BATCH``. A request is a filled-in
:class:`~kvroute.proxy.observe.RequestRecord` (a streamed chat request that
was routed, with usage), built before the clock starts. Variants:

- ``json_line``: the JSON line built straight from the record, as the
  proxy does (:meth:`~kvroute.proxy.observe.RequestRecord.json_line`; no output);
- ``fields_dumps``: the same line as a dict through ``json.dumps`` (no output);
- ``buffered``: the line into the proxy's
  :class:`~kvroute.proxy.access_log.AccessLog` (buffered, written in one
  call per flush interval or 64 KiB);
- ``per_line``: the same line written and flushed one by one (what a
  line-buffered stderr does);
- ``logging``: the line through the ``logging`` module (a ``StreamHandler``:
  a LogRecord, the handler's lock, a flush per line);
- ``metrics``: :meth:`~kvroute.events.metrics.Metrics.request_finished` and
  the tokenize histogram (five histogram observations and one more);
- ``finish``: :meth:`~kvroute.proxy.observe.Observer.finish`, everything a
  request's end does with the buffered log and the metrics.

Output goes to ``/dev/null``: the figures are the proxy's CPU, not a disk's
or a terminal's. Not measured: the per-request work the proxy does anyway
(routing, relaying), filling the record in (a few attribute stores), and
tracing (off by default).

Run as a script for per-request medians side by side::

    python benchmarks/bench_observe.py [--batch 2000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from kvroute import Router
from kvroute.events.metrics import Metrics
from kvroute.proxy import ProxyConfig, WorkerSpec
from kvroute.proxy.access_log import AccessLog, format_json
from kvroute.proxy.observe import Observer, RequestRecord
from kvroute.proxy.workers import WorkerPool

BATCH = 200


def _record(i: int) -> RequestRecord:
    r = RequestRecord("POST", "/v1/chat/completions", start=1000.0 + i)
    r.id = f"{i:032x}"
    r.client = "10.0.0.7"
    r.model = "Qwen/Qwen3-Coder-30B-A3B-Instruct"
    r.session = f"session-{i % 64}"
    r.stream = True
    r.worker = i % 4
    r.policy = "kvroute"
    r.matched_blocks = 412
    r.predicted_cached_tokens = 6592
    r.prompt_tokens = 6650
    r.cached_tokens = 6592
    r.output_tokens = 32
    r.tokenize_seconds = 0.0011
    r.attempts = 1
    r.status = 200
    r.first = r.start + 0.041
    r.end = r.start + 0.350
    return r


@contextmanager
def _devnull() -> Iterator[io.TextIOWrapper]:
    stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    try:
        yield stream
    finally:
        stream.close()


def _observer(stream: Any) -> Observer:
    config = ProxyConfig([WorkerSpec(f"http://10.0.0.{i}:8000") for i in range(4)])
    router = Router(block_size=16, workers=range(4))
    obs = Observer(config, Metrics(router), WorkerPool(router, config))
    obs.access_log = AccessLog(stream, "json")
    return obs


def _variants(stream: Any) -> dict[str, Callable[[RequestRecord], None]]:
    log = AccessLog(stream, "json")
    logger = logging.getLogger("kvroute.bench.access")
    logger.propagate = False
    logger.handlers[:] = [logging.StreamHandler(stream)]
    logger.setLevel(logging.INFO)
    router = Router(block_size=16, workers=range(4))
    metrics = Metrics(router)
    obs = _observer(stream)
    now = time.time()

    def json_line(r: RequestRecord) -> None:
        r.json_line("10.0.0.1:8000", now)

    def fields_dumps(r: RequestRecord) -> None:
        format_json(r.fields("10.0.0.1:8000", now))

    def buffered(r: RequestRecord) -> None:
        log.write_line(r.json_line("10.0.0.1:8000", now))

    def per_line(r: RequestRecord) -> None:
        stream.write(r.json_line("10.0.0.1:8000", now))
        stream.flush()

    def via_logging(r: RequestRecord) -> None:
        logger.info("%s", r.json_line("10.0.0.1:8000", now)[:-1])

    def observe_metrics(r: RequestRecord) -> None:
        metrics.request_finished(
            r.worker, r.duration, r.ttft, r.inter_token, r.prompt_tokens, r.output_tokens
        )
        metrics.tokenize_seconds.observe(r.tokenize_seconds or 0.0)

    def finish(r: RequestRecord) -> None:
        end = r.end
        obs.finish(r)
        r.end, r.outcome = end, "ok"

    return {
        "json_line": json_line,
        "fields_dumps": fields_dumps,
        "buffered": buffered,
        "per_line": per_line,
        "logging": via_logging,
        "metrics": observe_metrics,
        "finish": finish,
    }


def _run_batch(
    loop: asyncio.AbstractEventLoop,
    fn: Callable[[RequestRecord], None],
    records: list[RequestRecord],
) -> None:
    async def go() -> None:
        for r in records:
            fn(r)

    loop.run_until_complete(go())


VARIANTS = ("json_line", "fields_dumps", "buffered", "per_line", "logging", "metrics", "finish")


@pytest.mark.parametrize("variant", VARIANTS)
def bench_observe(benchmark: Any, variant: str) -> None:
    records = [_record(i) for i in range(BATCH)]
    loop = asyncio.new_event_loop()
    try:
        with _devnull() as stream:
            fn = _variants(stream)[variant]
            benchmark(_run_batch, loop, fn, records)
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=2000, help="requests per timed call")
    p.add_argument("--rounds", type=int, default=15, help="timed calls per variant")
    a = p.parse_args(argv)
    records = [_record(i) for i in range(a.batch)]
    loop = asyncio.new_event_loop()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        with _devnull() as stream:
            fns = _variants(stream)
            for _ in range(a.rounds):  # interleaved, so drift hits every variant alike
                for v in VARIANTS:
                    t0 = time.perf_counter()
                    _run_batch(loop, fns[v], records)
                    times[v].append((time.perf_counter() - t0) / a.batch)
    finally:
        loop.close()
    print(
        f"per request, median of {a.rounds} rounds of {a.batch} (python {sys.version.split()[0]})"
    )
    for v in VARIANTS:
        print(f"  {v:<12} {statistics.median(times[v]) * 1e6:7.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
