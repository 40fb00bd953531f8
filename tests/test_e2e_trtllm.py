"""End to end, without a GPU: the proxy in front of a TensorRT-LLM fleet, over each transport.

The workers are :class:`~kvroute.testing.MockWorker` in TensorRT-LLM mode:
real HTTP servers whose KV events come in TensorRT-LLM's shapes, either
polled from ``POST /kv_cache_events`` (``trtllm-serve``'s endpoint, named by an
http events endpoint) or streamed over ZMQ with replay. As in test_e2e.py (the
vLLM fleet), a user's checks: later turns land on the worker holding their
prefix, the proxy's prediction of each request's cache hit equals the hit the
worker reports, and the index is exactly the workers' caches. Then: a
restarted ``trtllm-serve`` is cleared from the index before it serves, and the
configuration refuses what cannot work, saying why.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until
from test_e2e import HARNESS, Session
from test_proxy_support import FAST_HEALTH

from kvroute.proxy import PREDICTED_HEADER, WORKER_HEADER, ProxyConfig, ProxyServer, WorkerSpec
from kvroute.proxy.cli import build_config
from kvroute.proxy.event_sources import check_single_consumer, check_worker_events
from kvroute.testing import MockWorker, TrtllmOptions

N_WORKERS = 3


def spec(w: MockWorker, transport: str) -> WorkerSpec:
    assert w.trtllm is not None
    if transport == "http":
        return WorkerSpec(w.url, w.trtllm.events_url, events_format="trtllm")
    return WorkerSpec(w.url, w.events_endpoint, w.replay_endpoint, events_format="trtllm")


@pytest.fixture(params=["http", "zmq"])
def fleet(request: pytest.FixtureRequest) -> Iterator[tuple[ProxyServer, list[MockWorker], str]]:
    transport = request.param
    # A VSWA model: every dict event also comes for a sliding-window layer group.
    options = TrtllmOptions(sliding_window=512)
    workers = [
        MockWorker(block_size=16, num_blocks=4096, trtllm=options).start() for _ in range(N_WORKERS)
    ]
    server = ProxyServer(ProxyConfig([spec(w, transport) for w in workers], **FAST_HEALTH)).start()
    try:
        assert server.router.kv_events
        if transport == "zmq":
            assert all(w.wait_for_subscribers(1, timeout=10) for w in workers)
        yield server, workers, transport
    finally:
        server.stop()
        for w in workers:
            w.stop()


def synced(server: ProxyServer, workers: list[MockWorker], transport: str) -> bool:
    """True once the proxy applied every event each running worker published."""
    if transport == "zmq":
        sub = server.proxy.subscriber
        assert sub is not None
        return bool(
            sub.wait_for(
                lambda s: all(
                    not w.is_running or s[i].last_seq == w.next_seq - 1
                    for i, w in enumerate(workers)
                ),
                timeout=10,
            )
        )
    poller = server.proxy.events.poller
    assert poller is not None

    def done(sources: dict[int, Any]) -> bool:
        return all(
            not w.is_running or sources[i].last_event_ids.get(0) == w.trtllm.next_event_id - 1  # type: ignore[union-attr]
            for i, w in enumerate(workers)
        )

    return bool(poller.wait_for(done, timeout=10))


def test_sessions_land_where_their_prefix_is_and_predictions_match_real_hits(
    fleet: tuple[ProxyServer, list[MockWorker], str],
) -> None:
    server, workers, transport = fleet
    sessions = [Session(i, session_header=False) for i in range(6)]
    # The sessions start together, so the router spreads them (test_e2e.py says why).
    for w in workers:
        w.token_delay = 0.02
    first = sessions[0].send(server.url)
    assert first[0] == 200 and synced(server, workers, transport)
    with concurrent.futures.ThreadPoolExecutor(len(sessions)) as pool:
        started = [first, *pool.map(lambda s: s.send(server.url), sessions[1:])]
    assert [r[0] for r in started] == [200] * len(sessions)
    home = {s.sid: int(r[1][WORKER_HEADER]) for s, r in zip(sessions, started, strict=True)}
    assert len(set(home.values())) >= 2
    assert synced(server, workers, transport)
    for w in workers:
        w.token_delay = 0.001
    for _ in range(3):
        for s in sessions:
            status, headers, out = s.send(server.url)
            assert status == 200, out
            real = s.cached_tokens(out)
            # The proxy predicted exactly the hit the worker really had.
            assert int(headers[PREDICTED_HEADER]) == real
            assert int(headers[WORKER_HEADER]) == home[s.sid]  # found from its events
            assert real > len(HARNESS)  # its own history is hit
            assert synced(server, workers, transport)
    # The proxy's index is exactly the workers' caches (partial blocks and the
    # sliding-window stream left out).
    for i, w in enumerate(workers):
        held = w.cached_block_hashes()
        assert server.router.index.worker_len(i) == len(held)
        assert all(server.router.index.resolve(i, h) is not None for h in held)


def test_a_restarted_trtllm_serve_is_cleared_before_it_serves() -> None:
    w = MockWorker(block_size=16, trtllm=True).start()
    server = ProxyServer(ProxyConfig([spec(w, "http")], **FAST_HEALTH)).start()
    try:
        s = Session(0)
        assert s.send(server.url)[0] == 200
        assert synced(server, [w], "http")
        assert server.router.index.worker_len(0) > 0
        w.restart()  # same port, empty cache; it publishes its `created` events and nothing else
        assert wait_until(lambda: server.router.index.worker_len(0) == 0, timeout=10)
        # a health check may have caught it down mid-restart: it serves once one passes again
        assert wait_until(lambda: bool(server.router.load(0)["healthy"]), timeout=10)
        status, _, out = s.send(server.url)
        assert status == 200 and s.cached_tokens(out) == 0
        assert synced(server, [w], "http")
        assert server.router.index.worker_len(0) == len(w.cached_block_hashes()) > 0
    finally:
        server.stop()
        w.stop()


# -- configuration ----------------------------------------------------------------------


def test_an_http_events_endpoint_must_be_trtllm_s_and_has_no_replay() -> None:
    url = "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="events_format 'trtllm'"):
        ProxyConfig([WorkerSpec(url, url + "/kv_cache_events")])
    with pytest.raises(ValueError, match="no replay"):
        ProxyConfig(
            [
                WorkerSpec(
                    url, url + "/kv_cache_events", "tcp://127.0.0.1:5558", events_format="trtllm"
                )
            ]
        )
    ProxyConfig([WorkerSpec(url, url + "/kv_cache_events")], events_format="trtllm")


def test_formats_must_be_registered() -> None:
    url = "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="registered ZMQ event format"):
        ProxyConfig([WorkerSpec(url)], events_format="dynamo")  # not a ZMQ format
    with pytest.raises(ValueError, match="registered ZMQ event format"):
        ProxyConfig([WorkerSpec(url, "tcp://127.0.0.1:5557", events_format="tgi")])
    mixed = ProxyConfig(
        [
            WorkerSpec(url, "tcp://127.0.0.1:5557"),
            WorkerSpec("http://127.0.0.1:8001", "tcp://127.0.0.1:6557", events_format="sglang"),
        ]
    )
    assert [w.events_format for w in mixed.workers] == [None, "sglang"]


def test_the_cli_takes_any_registered_zmq_format(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from kvroute.proxy.cli import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    worker = "http://127.0.0.1:8000=http://127.0.0.1:8000/kv_cache_events"
    args = parser.parse_args(["--worker", worker, "--events-format", "trtllm"])
    config = build_config(args)
    assert config.events_format == "trtllm"
    assert config.workers[0].events_endpoint == "http://127.0.0.1:8000/kv_cache_events"
    with pytest.raises(SystemExit):
        parser.parse_args(["--worker", worker, "--events-format", "tgi"])
    assert "unknown events format 'tgi'" in capsys.readouterr().err


@dataclasses.dataclass(frozen=True, slots=True)
class SyncedConfig(ProxyConfig):
    """A ProxyConfig with replica sync on (the fleet's ``sync_url`` option)."""

    sync_url: str | None = None


def test_replica_sync_refuses_a_single_consumer_transport_saying_why() -> None:
    url = "http://127.0.0.1:8000"
    polled = WorkerSpec(url, url + "/kv_cache_events", events_format="trtllm")
    streamed = WorkerSpec("http://127.0.0.1:8001", "tcp://127.0.0.1:5557", events_format="trtllm")
    with pytest.raises(ValueError, match="drains the engine's event queue") as info:
        SyncedConfig([streamed, polled], sync_url="redis://127.0.0.1:6379")
    assert "127.0.0.1:8000" in str(info.value) and "ZMQ stream" in str(info.value)
    SyncedConfig([streamed], sync_url="redis://127.0.0.1:6379")  # every replica gets the stream
    SyncedConfig([polled])  # one router: fine
    check_single_consumer(ProxyConfig([polled], events_format="trtllm"))  # no sync_url at all


def test_a_worker_joining_at_run_time_is_checked_alike() -> None:
    url = "http://127.0.0.1:8000"
    polled = WorkerSpec(url, url + "/kv_cache_events")
    check_worker_events(polled, "trtllm")
    with pytest.raises(ValueError, match="events_format 'trtllm'"):
        check_worker_events(polled, "vllm")
    with pytest.raises(ValueError, match="drains the engine's event queue"):
        check_worker_events(polled, "trtllm", sync_url="redis://127.0.0.1:6379")
    check_worker_events(WorkerSpec(url, "tcp://127.0.0.1:5557"), "trtllm", sync_url="redis://x")
