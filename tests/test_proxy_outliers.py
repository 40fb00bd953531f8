"""Outlier detection (issue 16, item 5): a worker failing every generation is ejected.

A worker answering 500 to every generation while its ``/health`` answers 200
used to keep a third of the attempts of a three-worker fleet, wave after
wave. Now ``eject_after`` failures in a row eject it for a growing time; it
is probed back on probation, never the whole fleet is ejected, and the
ejections are counted and shown per worker in ``/health``.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from helpers import wait_until
from test_proxy_support import fleet, get, post

from kvroute import Router
from kvroute.events.metrics import Metrics
from kvroute.proxy import WORKER_HEADER, ProxyConfig, WorkerSpec
from kvroute.proxy.outliers import OutlierDetector
from kvroute.proxy.workers import WorkerPool

MODEL = "mock-model"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _detector(n: int = 3, **kw: Any) -> tuple[OutlierDetector, WorkerPool, Router, Clock, Metrics]:
    router = Router(block_size=16, workers=range(n))
    config = ProxyConfig([WorkerSpec(f"http://127.0.0.1:{9000 + i}") for i in range(n)], **kw)
    pool = WorkerPool(router, config)
    metrics = Metrics(router)
    clock = Clock()
    detector = OutlierDetector(pool, config, metrics.registry, clock=clock)
    return detector, pool, router, clock, metrics


# -- the detector, on a fake clock ------------------------------------------------------------


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    d, pool, router, clock, m = _detector(eject_after=3, ejection_time=10)
    d.failed(1)
    d.failed(1)
    d.succeeded(1)  # the count starts again
    d.failed(1)
    d.failed(1)
    assert pool.healthy() == [0, 1, 2]
    d.failed(1)
    assert pool.healthy() == [0, 2] and router.load(1)["healthy"] is False
    assert pool.workers[1].ejected_until == clock.now + 10
    assert m.value("kvroute_worker_ejections_total", {"worker": "1"}) == 1
    assert m.value("kvroute_worker_ejected", {"worker": "1"}) == 1
    (entry,) = [w for w in pool.snapshot() if w["id"] == 1]
    assert entry["state"] == "ejected" and entry["ejected_for"] == 10 and not entry["healthy"]
    assert entry["ejections"] == 1


def test_ejection_time_grows_with_each_ejection_up_to_the_cap_and_probation_decides() -> None:
    d, pool, router, clock, _ = _detector(eject_after=2, ejection_time=10, max_ejection_time=25)
    lengths = []
    d.failed(0)
    d.failed(0)
    for _ in range(3):
        until = pool.workers[0].ejected_until
        assert until is not None
        lengths.append(until - clock.now)
        clock.now = until - 0.001
        assert pool.release_ejections() == []  # not yet
        clock.now = until
        assert pool.release_ejections() == [0]
        assert router.load(0)["healthy"] is True and d.state(0).probation
        d.failed(0)  # a failed probe ejects again at once, for longer
    assert lengths == [10, 20, 25]
    assert d.state(0).total_ejections == 4


def test_a_passed_probe_clears_probation_and_the_back_off_decays() -> None:
    d, pool, _, clock, _ = _detector(eject_after=1, ejection_time=10)
    d.failed(2)
    clock.now += 10
    pool.release_ejections()
    d.succeeded(2)
    assert not d.state(2).probation and d.state(2).ejections == 1
    clock.now += 10  # one base ejection time of good service: one step less
    d.succeeded(2)
    assert d.state(2).ejections == 0
    d.failed(2)  # a fresh ejection is the short one again
    assert pool.workers[2].ejected_until == clock.now + 10


def test_never_more_than_max_ejected_percent_and_never_the_last_worker() -> None:
    d, pool, _, _, m = _detector(n=4, eject_after=1, max_ejected_percent=50)
    for w in range(4):
        d.failed(w)
    assert pool.healthy() == [2, 3] and d.refused == 2
    assert m.value("kvroute_worker_ejections_refused_total") == 2
    # A fleet of two may lose one worker (at least one can always go), never both.
    d2, pool2, _, _, _ = _detector(n=2, eject_after=1, max_ejected_percent=0)
    d2.failed(0)
    d2.failed(1)
    assert pool2.healthy() == [1]


def test_the_last_usable_worker_going_down_ends_ejections_at_once() -> None:
    d, pool, router, _, _ = _detector(n=2, eject_after=1, ejection_time=100)
    d.failed(0)
    assert pool.healthy() == [1]
    pool.mark_down(1, "unreachable")
    assert pool.healthy() == [0] and router.load(0)["healthy"] is True


def test_failures_of_a_worker_already_out_do_not_count_and_zero_disables() -> None:
    d, pool, _, _, _ = _detector(eject_after=2)
    pool.mark_down(1, "health checks")
    for _ in range(5):
        d.failed(1)
    assert d.state(1).consecutive == 0 and pool.ejected_count() == 0
    off, pool_off, _, _, _ = _detector(eject_after=0)
    for _ in range(50):
        off.failed(0)
    assert pool_off.healthy() == [0, 1, 2]


def test_health_checks_passing_do_not_end_an_ejection() -> None:
    d, pool, router, _, _ = _detector(eject_after=1)
    d.failed(0)
    pool.mark_up(0)  # /health answers 200: the worker stays out
    assert pool.healthy() == [1, 2] and router.load(0)["healthy"] is False


@pytest.mark.parametrize(
    "kw",
    [
        {"eject_after": -1},
        {"ejection_time": 0},
        {"ejection_time": 400},
        {"max_ejected_percent": 101},
    ],
)
def test_outlier_options_are_checked(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ProxyConfig([WorkerSpec("http://w")], **kw)


# -- end to end: a worker answering 500 to every generation --------------------------------


def _wave(proxy_url: str, wave: int, n: int = 40) -> list[tuple[int, int]]:
    def one(i: int) -> tuple[int, int]:
        body = {"model": MODEL, "prompt": [wave, i, *range(40)], "max_tokens": 2}
        status, headers, _ = post(proxy_url + "/v1/completions", body, {"X-Session-Id": f"s{i}"})
        return status, int(headers.get(WORKER_HEADER, -1))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


def test_a_worker_failing_every_generation_is_ejected_and_loses_its_traffic() -> None:
    with fleet(3, ejection_time=60) as (proxy, workers):
        workers[2].fail_next(100_000, status=500)  # its /health still answers 200
        first = _wave(proxy.url, 1)
        assert all(status == 200 for status, _ in first)
        tried = workers[2].http_requests().get("/v1/completions", 0)
        assert 5 <= tried < 15  # the ejection came after 5 failures in a row
        second = _wave(proxy.url, 2)
        assert all(status == 200 and w in (0, 1) for status, w in second)
        assert workers[2].http_requests().get("/v1/completions", 0) == tried  # not one attempt
        m = proxy.proxy.metrics
        assert m.value("kvroute_worker_ejections_total", {"worker": "2"}) == 1
        assert m.value("kvroute_worker_ejected", {"worker": "2"}) == 1
        status, _, raw = get(proxy.url + "/health")
        health = json.loads(raw)
        assert status == 200 and health["healthy_workers"] == 2
        entry = health["workers"][2]
        assert entry["state"] == "ejected" and entry["ejections"] == 1
        assert 0 < entry["ejected_for"] <= 60
        assert proxy.router.load(2)["healthy"] is False


def test_an_ejected_worker_is_probed_back_once_it_recovers() -> None:
    with fleet(2, eject_after=2, ejection_time=0.5) as (proxy, workers):
        workers[1].fail_next(2, status=503)  # two failures, then it recovers
        m = proxy.proxy.metrics
        for i in range(20):
            body = {"model": MODEL, "prompt": [i, *range(40)], "max_tokens": 1}
            assert post(proxy.url + "/v1/completions", body)[0] == 200
            if m.value("kvroute_worker_ejections_total", {"worker": "1"}):
                break
        assert m.value("kvroute_worker_ejections_total", {"worker": "1"}) == 1
        # The health round after the ejection time returns it, on probation.
        assert wait_until(lambda: proxy.proxy.outliers.state(1).probation, timeout=5)
        assert proxy.router.load(1)["healthy"] is True
        served = set()
        for i in range(8):
            body = {"model": MODEL, "prompt": [50 + i, *range(40)], "max_tokens": 1}
            status, headers, _ = post(proxy.url + "/v1/completions", body)
            assert status == 200
            served.add(int(headers[WORKER_HEADER]))
        assert served == {0, 1}
        assert not proxy.proxy.outliers.state(1).probation
        health = json.loads(get(proxy.url + "/health")[2])
        assert health["workers"][1]["state"] == "healthy"
