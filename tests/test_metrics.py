"""kvroute.events.metrics: the Prometheus series the subscriber and the proxy export."""

from __future__ import annotations

import doctest
import logging

import pytest
from helpers import Clock
from prometheus_client.parser import text_string_to_metric_families

import kvroute._logging
import kvroute.events.metrics
from kvroute import Request, Router
from kvroute.events.metrics import Metrics, RateLimitedLog


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize(
    "module", [kvroute.events.metrics, kvroute._logging], ids=lambda m: m.__name__
)
def test_doctests(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.failed == 0 and result.attempted > 0


def test_index_and_worker_load_are_read_at_scrape_time() -> None:
    router = Router(block_size=4, workers=[0, 1])
    m = Metrics(router)
    router.apply_stored(1, [11, 12, 13])
    router.route(Request("r", block_hashes=[11, 12, 99], prompt_tokens=12))
    router.mark_unhealthy(0)
    s = samples(m)
    assert s[("kvroute_index_blocks", ())] == 3
    assert s[("kvroute_index_residencies", ())] == 3
    assert s[("kvroute_index_bytes", ())] == router.index.sizeof() > 0
    assert s[("kvroute_worker_active_requests", (("worker", "1"),))] == 1
    assert s[("kvroute_worker_active_requests", (("worker", "0"),))] == 0
    assert s[("kvroute_worker_prefill_tokens", (("worker", "1"),))] == 4  # 2 of 3 blocks cached
    assert s[("kvroute_worker_healthy", (("worker", "0"),))] == 0
    router.remove_worker(0)
    assert ("kvroute_worker_healthy", (("worker", "0"),)) not in samples(m)


def test_counters_histograms_and_the_cache_ratio() -> None:
    m = Metrics()
    m.routed_request(2, 3e-5, 512)
    m.routed_request(2, 2e-4, 0)
    m.event_applied(2, "ok", 5)
    m.event_applied(2, "ok", 0)  # nothing to count
    m.mismatch(2, "block_size")
    assert m.cache_read_write_ratio() == 0.0
    m.cache_usage(read_tokens=1170, write_tokens=100)
    s = samples(m)
    assert s[("kvroute_route_seconds_count", ())] == 2
    assert s[("kvroute_route_seconds_bucket", (("le", "5e-05"),))] == 1
    assert s[("kvroute_predicted_cached_tokens_sum", ())] == 512
    assert s[("kvroute_routed_requests_total", (("worker", "2"),))] == 2
    assert s[("kvroute_events_total", (("status", "ok"), ("worker", "2")))] == 5
    assert s[("kvroute_event_mismatches_total", (("kind", "block_size"), ("worker", "2")))] == 1
    assert s[("kvroute_cache_read_write_ratio", ())] == pytest.approx(11.7)
    assert m.value("kvroute_events_total", {"worker": "9", "status": "ok"}) == 0.0


def test_two_metrics_objects_do_not_share_series() -> None:
    a, b = Metrics(), Metrics()
    a.event_applied(0, "gap")
    assert b.value("kvroute_events_total", {"worker": "0", "status": "gap"}) == 0.0


def test_rate_limited_log_reports_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(0.0)
    log = RateLimitedLog(logging.getLogger("kvroute.test"), interval=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, "kvroute.test"):
        assert log.warning("w", "bad %s", 1)
        assert not log.warning("w", "bad %s", 2)
        assert not log.warning("w", "bad %s", 3)
        assert log.warning("other", "bad %s", 4)  # keys are independent
        clock.t = 61.0
        assert log.warning("w", "bad %s", 5)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["bad 1", "bad 4", "bad 5 (2 similar messages suppressed)"]
