"""The proxy and the router's beliefs: each answer checks the prediction, /health shows it.

Issue 16 (items 2, 4 and 9 seen from the proxy): the worker's reported
cached tokens reach :meth:`Router.observe`, a worker whose events cannot be
indexed shows as degraded per worker in ``/health`` and in
``kvroute_worker_degraded``, the drift figures are exported, and
``--max-sessions`` bounds the router's per-session state.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from test_proxy_support import FAST_HEALTH, post

from kvroute import Router
from kvroute.proxy import ProxyConfig, ProxyServer, WorkerSpec
from kvroute.proxy.cli import build_config, configure
from kvroute.testing import MockWorker

pytest.importorskip("zmq")

PROMPTS = [[1000 * k + i for i in range(200)] for k in range(1, 9)]


@pytest.fixture
def fleet() -> Iterator[tuple[ProxyServer, list[MockWorker]]]:
    # worker 1's engine runs 32-token blocks; the proxy, 16
    workers = [MockWorker(block_size=bs, num_blocks=1024).start() for bs in (16, 32)]
    specs = [WorkerSpec(w.url, w.events_endpoint, w.replay_endpoint) for w in workers]
    router = Router(block_size=16, policy_params={"seed": 0}, max_sessions=50)
    server = ProxyServer(ProxyConfig(specs, **FAST_HEALTH), router=router).start()
    try:
        assert all(w.wait_for_subscribers(1, timeout=10) for w in workers)
        yield server, workers
    finally:
        server.stop()
        for w in workers:
            w.stop()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
    return json.loads(body) if url.endswith("/health") else body.decode()


def test_answers_are_observed_and_a_mismatched_worker_shows_degraded(
    fleet: tuple[ProxyServer, list[MockWorker]],
) -> None:
    server, workers = fleet
    url = f"http://127.0.0.1:{server.port}"
    for prompt in PROMPTS:  # new prompts spread over both workers; each comes back twice
        for _ in range(3):
            body = {"model": "mock-model", "prompt": prompt, "max_tokens": 1}
            assert post(url + "/v1/completions", body)[0] == 200
    assert all(w.requests() for w in workers), "a worker got nothing"
    sub = server.proxy.subscriber
    assert sub is not None and sub.wait_for(lambda s: s[1].counts["mismatch"] > 0, 10)
    states = server.router.worker_states()
    # the hits worker 0 served were checked against the router's prediction, and agreed
    hits = sum(1 for r in workers[0].requests() if r.cached_tokens)
    assert hits and states[0].observed == hits and states[0].drift == 0.0
    assert states[1].state == "degraded" and states[1].cause == "mismatch"
    health = _get(url + "/health")
    by_id = {w["id"]: w for w in health["workers"]}
    assert by_id[1]["cache"]["state"] == "degraded" and by_id[1]["cache"]["cause"] == "mismatch"
    assert by_id[0]["cache"]["state"] == "ok" and by_id[1]["healthy"] is True
    metrics = _get(url + "/metrics")
    assert 'kvroute_worker_degraded{cause="mismatch",worker="1"} 1.0' in metrics
    assert 'kvroute_index_drift{worker="0"}' in metrics
    assert "kvroute_sessions_evicted_total 0.0" in metrics


def test_max_sessions_is_a_proxy_option_that_reaches_the_router() -> None:
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--worker", "http://127.0.0.1:9", "--max-sessions", "7"])
    config = build_config(args)
    assert config.max_sessions == 7
    from kvroute.proxy.app import ProxyApp

    assert ProxyApp(config).router.config.max_sessions == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["--worker", "http://127.0.0.1:9", "--max-sessions", "0"])
    with pytest.raises(ValueError, match="max_sessions"):
        ProxyConfig([WorkerSpec("http://127.0.0.1:9")], max_sessions=0)


def test_a_worker_removed_at_run_time_refuses_its_late_events() -> None:
    # The admin API, the workers file and DNS all remove a worker through the
    # fleet (kvroute.proxy.fleet), i.e. Router.remove_worker: after it, an event
    # of that worker still on its way is refused (tests/test_router_state.py: a
    # worker added back under the same id then starts with no blocks).
    from test_proxy_fleet import TOKEN, admin, spec, synced

    from kvroute.events import BlockStored, EventBatch

    with MockWorker(block_size=16, num_blocks=256) as a, MockWorker(block_size=16) as b:
        server = ProxyServer(ProxyConfig(admin_token=TOKEN, **FAST_HEALTH)).start()
        try:
            wa = admin(server, "POST", "/admin/workers", spec(a))[2]["id"]
            wb = admin(server, "POST", "/admin/workers", spec(b))[2]["id"]
            prompt = PROMPTS[0][:64]
            body = {"model": "mock-model", "prompt": prompt, "max_tokens": 1}
            assert post(server.url + "/v1/completions", body)[0] == 200
            assert synced(server, {wa: a, wb: b})
            router, keys = server.router, server.router.hashing(prompt, 16)
            holder = next(iter(router.index.match(keys)))
            held = a if holder == wa else b
            assert admin(server, "DELETE", f"/admin/workers/{holder}")[0] == 200
            # the events it published before leaving, arriving late
            late = BlockStored(tuple(held.block_hashes(prompt)), None, tuple(prompt), 16)
            sub = server.proxy.subscriber
            assert sub is not None
            assert sub.applier.apply_batch(holder, EventBatch(0.0, (late,))) == {"ignored": 1}
            assert router.apply_event(holder, late) == "ignored"
            refused = router.stats()["refused_events"]
            router.apply_stored(holder, keys)
            assert router.stats()["refused_events"] == refused + 1
            assert holder not in router.index.match(keys) and holder not in router.index.workers()
        finally:
            server.stop()
