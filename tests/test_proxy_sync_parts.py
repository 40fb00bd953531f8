"""The proxy's replica-sync settings and part (kvroute.proxy.replicas), with a real Redis."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("redis")

from redis_server import RedisServer
from test_proxy_support import FAST_HEALTH, chat, post

from kvroute import Router
from kvroute import __main__ as cli
from kvroute.proxy import ProxyConfig, ProxyServer, WorkerSpec
from kvroute.proxy.cli import build_config
from kvroute.testing import MockWorker


def test_sync_settings_are_validated_and_parsed() -> None:
    w = [WorkerSpec("http://h:1")]
    for bad in ({"sync_url": "http://h:6379"}, {"replica_id": "a b"}, {"sync_prefix": "a:b"},
                {"sync_snapshot_interval": -1.0}):  # fmt: skip
        with pytest.raises(ValueError):
            ProxyConfig(w, **bad)
    assert "secret" not in repr(ProxyConfig(w, sync_url="redis://:secret@h:6379/0"))
    args = cli.build_parser().parse_args([
        "proxy", "--worker", "h:1", "--sync-url", "redis://127.0.0.1:6379/2",
        "--replica-id", "edge-1", "--sync-prefix", "fleet7", "--sync-snapshot-interval", "5",
    ])  # fmt: skip
    c = build_config(args)
    assert (c.sync_url, c.replica_id, c.sync_prefix, c.sync_snapshot_interval) == (
        "redis://127.0.0.1:6379/2", "edge-1", "fleet7", 5.0)  # fmt: skip
    plain = build_config(cli.build_parser().parse_args(["proxy", "--worker", "h:1"]))
    assert plain.sync_url is None


def test_a_replica_that_sees_a_worker_down_makes_the_others_check_it(
    redis_server: RedisServer,
) -> None:
    workers = [MockWorker(publish_events=False).start() for _ in range(2)]
    servers: list[ProxyServer] = []
    try:
        specs = [WorkerSpec(w.url) for w in workers]
        for name in "ab":
            cfg = ProxyConfig(specs, sync_url=redis_server.url(), replica_id=name,
                              **{**FAST_HEALTH, "health_interval": 30.0})  # fmt: skip
            servers.append(ProxyServer(cfg, router=Router(block_size=16, kv_events=False)).start())
        a, b = servers
        assert a.proxy.replicas is not None and b.proxy.replicas is not None
        body = {"model": "mock-model", "messages": chat(1), "max_tokens": 2}
        status, _, answer = post(a.url + "/v1/chat/completions", body)
        assert status == 200, answer
        workers[1].stop()
        # a learns first (its request fails, or its own check); b has no health check
        # due for 30 s, yet checks at once when a says so
        a._thread.call(lambda: a.proxy.pool.mark_down(1, "test: connection refused"))
        deadline = time.monotonic() + 10
        while b.proxy.pool.workers[1].healthy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not b.proxy.pool.workers[1].healthy
        assert b.proxy.pool.workers[0].healthy
        text = b.proxy.metrics.render().decode()
        assert "kvroute_sync_up 1.0" in text and "kvroute_sync_replicas 1.0" in text
    finally:
        for s in servers:
            s.stop()
        for w in workers:
            if w.is_running:
                w.stop()


def test_a_proxy_without_sync_has_no_sync_part() -> None:
    w = MockWorker(publish_events=False).start()
    try:
        s = ProxyServer(ProxyConfig([WorkerSpec(w.url)], **FAST_HEALTH)).start()
        assert s.proxy.replicas is None
        assert b"kvroute_sync_up" not in s.proxy.metrics.render()
        s.stop()
    finally:
        w.stop()
