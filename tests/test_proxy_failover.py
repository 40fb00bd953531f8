"""kvroute.proxy failover: retries on another worker, unhealthy marking, recovery.

A worker that is stopped (connection refused), paused (answers nothing, not
even /health) or failing (HTTP 5xx) must not lose a request that has not yet
sent a byte to the client; it is taken out of routing and brought back when
its /health answers again.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from helpers import wait_until
from test_proxy_support import chat, fleet, get, post, sse_data

from kvroute.proxy import WORKER_HEADER

MODEL = "mock-model"


def _turn(proxy_url: str, turn: int, rid: str, stream: bool = False) -> tuple[int, int, bytes]:
    """One turn of a session whose prompt (token ids: no tokenizing call) grows by 4 blocks."""
    prompt = [100 + i % 150 for i in range(64 * turn)]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": stream}
    status, headers, raw = post(
        proxy_url + "/v1/completions", body, {"X-Session-Id": "s", "X-Request-Id": rid}
    )
    return status, int(headers.get(WORKER_HEADER, -1)), raw


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_stopped_worker_request_is_retried_and_worker_recovers(stream: bool) -> None:
    with fleet(2) as (proxy, workers):
        status, first, _ = _turn(proxy.url, 1, "t1")
        assert status == 200
        other = 1 - first
        workers[first].stop()
        # The next turn follows the session's prefix to the dead worker, fails to
        # connect, and is served by the other one: the client sees a normal answer.
        status, served, raw = _turn(proxy.url, 2, "t2", stream)
        assert status == 200 and served == other, raw
        if stream:
            assert sse_data(raw)[-1] == "[DONE]"
        assert "t2" in workers[other].cache_hits()
        m = proxy.proxy.metrics
        assert m.value("kvroute_proxy_retries_total") == 1
        assert m.value("kvroute_upstream_errors_total", {"worker": str(first)}) == 1
        assert proxy.router.load(first)["healthy"] is False
        assert proxy.router.load(first)["active_requests"] == 0  # failed() was reported
        # Restarted on the same port: the health checker brings it back.
        workers[first].start()
        assert wait_until(lambda: proxy.router.load(first)["healthy"], timeout=5)
        status, _, raw = get(proxy.url + "/health")
        assert json.loads(raw)["healthy_workers"] == 2


def test_killing_and_restarting_a_worker_mid_run_loses_no_request() -> None:
    # Generation is slow enough (40 tokens at 10 ms) that requests are still
    # running when a worker is stopped: the stop waits for two of them to run
    # on one worker rather than for a fixed sleep, so the run always exercises
    # the failover.
    with fleet(3, worker_kw={"token_delay": 0.01}) as (proxy, workers):
        served: dict[str, int] = {}

        def run(i: int) -> int:
            body = {"model": MODEL, "messages": chat(1 + i % 3), "max_tokens": 40}
            rid = f"run-{i}"
            headers = {"X-Session-Id": f"agent-{i % 6}", "X-Request-Id": rid}
            status, got, _ = post(proxy.url + "/v1/chat/completions", body, headers)
            served[rid] = int(got.get(WORKER_HEADER, -1))
            return status

        def busy() -> int | None:
            return next((w for w in range(3) if workers[w].stats().running >= 2), None)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(run, i) for i in range(60)]
            assert wait_until(lambda: busy() is not None, timeout=10)
            victim = busy()
            assert victim is not None
            workers[victim].stop()
            workers[victim].start()
            statuses = [f.result() for f in futures]
        assert statuses == [200] * 60
        # The requests the stop cut off on the victim were answered by another worker.
        cut = {r.request_id for r in workers[victim].requests() if r.status == "aborted"}
        assert len(cut) >= 2
        assert all(served[rid] not in (victim, -1) for rid in cut), (victim, served)
        m = proxy.proxy.metrics
        assert m.value("kvroute_proxy_retries_total") >= len(cut)
        assert m.value("kvroute_upstream_errors_total", {"worker": str(victim)}) >= 2
        assert wait_until(lambda: proxy.router.load(victim)["healthy"], timeout=5)
        assert all(proxy.router.load(w)["active_requests"] == 0 for w in range(3))


def test_paused_worker_is_marked_unhealthy_and_traffic_moves() -> None:
    with fleet(2) as (proxy, workers):
        status, first, _ = _turn(proxy.url, 1, "p1")
        other = 1 - first
        workers[first].pause()
        t0 = time.monotonic()
        # Routed to the silent worker; the health checker gives up on it within
        # a few intervals and the waiting request fails over.
        status, served, raw = _turn(proxy.url, 2, "p2")
        assert status == 200 and served == other, raw
        assert time.monotonic() - t0 < 10
        # Chat requests are tokenized by a worker first; the silent one is skipped.
        for _ in range(2):
            body = {"model": MODEL, "messages": chat(2), "max_tokens": 2}
            assert post(proxy.url + "/v1/chat/completions", body, timeout=10)[0] == 200
        assert proxy.router.load(first)["healthy"] is False
        status, served, _ = _turn(proxy.url, 3, "p3")
        assert served == other
        workers[first].resume()
        assert wait_until(lambda: proxy.router.load(first)["healthy"], timeout=5)


def test_worker_5xx_is_retried_elsewhere_without_marking_it_down() -> None:
    with fleet(2) as (proxy, workers):
        status, first, _ = _turn(proxy.url, 1, "f1")
        workers[first].fail_next(1, status=500)
        status, served, raw = _turn(proxy.url, 2, "f2")
        assert status == 200 and served == 1 - first, raw
        assert proxy.router.load(first)["healthy"] is True
        assert proxy.proxy.metrics.value("kvroute_proxy_retries_total") == 1


def test_every_attempt_failing_passes_the_last_5xx_through() -> None:
    with fleet(2, retries=1) as (proxy, workers):
        for w in workers:
            w.fail_next(1, status=503)
        body = {"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 1}
        status, _, raw = post(proxy.url + "/v1/completions", body)
        assert status == 503
        assert "injected failure" in json.loads(raw)["error"]["message"]
        assert proxy.router.stats()["routed"] == 2
        # Both injected failures are used up; the fleet serves again.
        assert post(proxy.url + "/v1/completions", body)[0] == 200


def test_no_retry_budget_reports_502() -> None:
    with fleet(2, retries=0) as (proxy, workers):
        status, first, _ = _turn(proxy.url, 1, "r1")
        workers[first].stop()
        status, _, raw = _turn(proxy.url, 2, "r2")
        assert status == 502
        assert json.loads(raw)["error"]["code"] == "upstream_error"
        # The worker was taken out at once, so the next request goes elsewhere.
        status, served, _ = _turn(proxy.url, 2, "r3")
        assert status == 200 and served == 1 - first


def test_tokenizing_on_a_silent_worker_fails_over() -> None:
    with fleet(2) as (proxy, workers):
        workers[0].pause()
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 2}
        t0 = time.monotonic()
        # The render calls rotate over the workers: one of these asks the silent one.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(post, proxy.url + "/v1/chat/completions", body, timeout=15)
                for _ in range(2)
            ]
            results = [f.result() for f in futures]
        assert [r[0] for r in results] == [200, 200]
        assert all(r[1][WORKER_HEADER] == "1" for r in results)
        assert time.monotonic() - t0 < 10
        assert proxy.router.load(0)["healthy"] is False


@pytest.mark.parametrize(
    "options",
    [{}, {"health_interval": 3600.0, "read_timeout": 0.4}],
    ids=["health-checks", "read-timeout-alone"],  # who notices the silence
)
def test_worker_going_silent_mid_stream_ends_the_stream_with_an_error_event(
    options: dict[str, float],
) -> None:
    import urllib.request

    # Without migration (see test_proxy_migration.py for the stream continued elsewhere).
    fleet_kw = {"worker_kw": {"token_delay": 0.05}, "migrations": 0, **options}
    with fleet(2, **fleet_kw) as (proxy, workers):
        body = {"model": MODEL, "prompt": [7] * 40, "max_tokens": 60, "stream": True}
        req = urllib.request.Request(
            proxy.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=20) as r:
            worker = int(r.headers[WORKER_HEADER])
            first = r.readline()
            assert first.startswith(b"data: ")
            workers[worker].pause()
            rest = r.read()
        payloads = [json.loads(line[6:]) for line in rest.splitlines() if line[6:7] == b"{"]
        assert "error" in payloads[-1] and payloads[-1]["error"]["code"] == "bad_gateway"
        if "read_timeout" in options:  # the proxy's own read timeout (kvroute.proxy.idle)
            assert "no byte from the worker" in payloads[-1]["error"]["message"]
        assert proxy.router.load(worker)["healthy"] is False
        assert proxy.router.load(worker)["active_requests"] == 0
        assert (
            proxy.proxy.metrics.value("kvroute_upstream_errors_total", {"worker": str(worker)}) == 1
        )
