"""ReplicaSync against a real Redis server: routers in one process that share nothing but Redis.

Each router here has its own index, load and policy; the only channel
between them is the Redis server the test started (``redis_server``).
Behaviour is checked, not time: every wait polls until a condition holds
(or fails after a generous timeout).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from redis_server import RedisServer

from kvroute import Request, Router
from kvroute.events import ZmqSubscriber
from kvroute.fleet.sync import ReplicaSync, ReplicaSyncThread, SyncConfigError
from kvroute.fleet.wire import Keys

WAIT = 10.0


def H(*xs: int) -> np.ndarray:
    return np.array(xs, np.uint64)


async def until(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def router(**kw: Any) -> Router:
    return Router(**{"block_size": 16, "workers": range(4), "policy_params": {"seed": 0}, **kw})


def sync(r: Router, url: str, name: str, **kw: Any) -> ReplicaSync:
    kw = {"heartbeat": 0.2, "retry": 0.05, "timeout": 0.5, "snapshot_interval": 0, **kw}
    return ReplicaSync(r, url, replica_id=name, **kw)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())


def test_decisions_and_load_reach_the_other_replica(redis_server: RedisServer) -> None:
    async def main() -> None:
        a, b = router(), router()
        sa, sb = sync(a, redis_server.url(), "a"), sync(b, redis_server.url(), "b")
        await sa.start()
        await sb.start()
        try:
            assert sa.up and sb.up and b.policy.tie_break == "rendezvous"  # type: ignore[attr-defined]
            d = a.route(Request("r1", block_hashes=H(*range(1, 21))))
            # the decision is a fresh decision on b; the load is a's request
            await until(lambda: b.load(d.worker)["active_requests"] == 1)
            sib = b.route(Request("r2", block_hashes=H(*range(1, 18), 99)))
            assert (sib.worker, sib.matched_blocks) == (d.worker, 17)
            await until(lambda: a.load(d.worker)["active_requests"] == 2)
            a.finished("r1")
            await until(lambda: b.load(d.worker)["active_requests"] == 1)
            assert b.remote_load()["replicas"].keys() == {"a"}
        finally:
            await sa.stop()
        # a replica that stops says so: its load stops counting at once
        await until(lambda: b.remote_load()["replicas"] == {})
        await sb.stop()
        assert sb.stats()["received"] >= 2 and sa.stats()["sent"] >= 2

    run(main)


def test_a_silent_replica_stops_counting(redis_server: RedisServer) -> None:
    async def main() -> None:
        a, b = router(), router()
        sa = sync(a, redis_server.url(), "a", heartbeat=0.1)
        sb = sync(b, redis_server.url(), "b", heartbeat=0.1)
        await sa.start()
        await sb.start()
        d = a.route(Request("r", block_hashes=H(1, 2)))
        await until(lambda: b.load(d.worker)["active_requests"] == 1)
        for t in sa._tasks:  # a crash: no goodbye
            t.cancel()
        # three heartbeats later its load no longer counts
        await until(lambda: b.remote_load()["replicas"] == {})
        assert b.load(d.worker)["active_requests"] == 0
        sa._up = False
        await sa.stop()
        await sb.stop()

    run(main)


def test_a_late_replica_replays_the_history_and_reads_long_pins(redis_server: RedisServer) -> None:
    async def main() -> None:
        a = router(kv_events=False)
        sa = sync(a, redis_server.url(), "a")
        await sa.start()
        firsts = {}
        for c in range(6):
            prompt = H(*range(100 * c + 1, 100 * c + 11))
            req = Request(f"c{c}", block_hashes=prompt, session_id=f"s{c}",
                          cache_control={"type": "ephemeral", "ttl": "1h"})  # fmt: skip
            firsts[c] = a.route(req).worker
            a.finished(f"c{c}")
        await until(lambda: sa.stats()["sent"] >= 1 and not sa._out)
        late = router(kv_events=False)
        sl = sync(late, redis_server.url(), "late")
        await sl.start()
        try:
            for c in range(6):
                nxt = late.route(Request(f"n{c}", block_hashes=H(*range(100 * c + 1, 100 * c + 14)),
                                         session_id=f"s{c}"))  # fmt: skip
                assert nxt.worker == firsts[c]
                late.finished(f"n{c}")
        finally:
            await sa.stop()
            await sl.stop()
        # with the history gone (a fresh stream), the 1 h pins alone still lead there
        r = redis_server
        import redis

        with redis.Redis.from_url(r.url()) as cli:
            cli.delete(Keys().log)
        third = router(kv_events=False)
        st = sync(third, r.url(), "third")
        await st.start()
        try:
            for c in range(6):
                d = third.route(Request(f"t{c}", block_hashes=H(5000 + c), session_id=f"s{c}"))
                assert (d.worker, d.policy) == (firsts[c], "pin")
        finally:
            await st.stop()

    run(main)


def test_redis_down_routing_goes_on_and_state_resyncs_when_it_returns(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        a, b = router(kv_events=False), router(kv_events=False)
        sa, sb = sync(a, redis_server.url(), "a"), sync(b, redis_server.url(), "b")
        await sa.start()
        await sb.start()
        try:
            redis_server.kill()
            with caplog.at_level(logging.WARNING, "kvroute.sync"):
                # routing does not wait for Redis, nor fail
                picks = {}
                for c in range(8):
                    d = a.route(Request(f"c{c}", block_hashes=H(*range(100 * c + 1, 100 * c + 11))))
                    picks[c] = d.worker
                await until(lambda: not sa.up and not sb.up)
            warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(warnings) == 2  # one line per replica
            redis_server.start()
            await until(lambda: sa.up and sb.up)
            # a's decisions made while Redis was away reach b; so does its load
            await until(lambda: sum(b.load(w)["active_requests"] for w in range(4)) == 8)
            for c in range(8):
                d = b.route(Request(f"n{c}", block_hashes=H(*range(100 * c + 1, 100 * c + 12))))
                assert d.worker == picks[c]
        finally:
            await sa.stop()
            await sb.stop()
        assert sa.stats()["reconnects"] >= 1

    run(main)


def test_redis_away_at_start_is_not_an_error(redis_server: RedisServer) -> None:
    async def main() -> None:
        redis_server.kill()
        a = router()
        sa = sync(a, redis_server.url(), "a")
        assert await sa.start() == {}
        assert not sa.up
        a.route(Request("r", block_hashes=H(1)))
        redis_server.start()
        await until(lambda: sa.up)
        await sa.stop()

    run(main)


def test_a_replica_id_in_use_and_a_different_worker_list_are_refused(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        urls = ["http://w0:8000", "http://w1:8000"]
        sa = sync(router(), redis_server.url(), "a", workers=urls, load_ttl=0.3)
        await sa.start()
        with pytest.raises(SyncConfigError, match="in use"):
            await sync(router(), redis_server.url(), "a", workers=urls, load_ttl=0.3).start()
        with pytest.raises(SyncConfigError, match="same workers in the same order"):
            await sync(router(), redis_server.url(), "b", workers=urls[::-1]).start()
        await sa.stop()
        # a stopped replica's id is free again (a restart under the same name)
        again = sync(router(), redis_server.url(), "a", workers=urls, load_ttl=0.3)
        await again.start()
        await again.stop()

    run(main)


def test_a_snapshot_starts_a_late_replica_warm(redis_server: RedisServer) -> None:
    async def main() -> None:
        a = router()
        for w in range(4):
            a.apply_stored(w, H(*range(1000 * w + 1, 1000 * w + 50)))
        sub = ZmqSubscriber(a).start()  # no stream: positions are empty
        sa = sync(a, redis_server.url(), "a")
        await sa.start()
        sa.attach_subscriber(sub)
        assert await sa.write_snapshot()
        late = router()
        sl = sync(late, redis_server.url(), "late")
        assert await sl.start() == {}
        assert late.index.residencies() == a.index.residencies() == 4 * 49
        probe = H(*range(2001, 2030))
        assert late.index.match(probe) == a.index.match(probe) == {2: 29}
        # only one replica holds the snapshot lease at a time
        sl.attach_subscriber(sub)
        assert not await sl.write_snapshot()
        await sa.stop()
        await sl.stop()
        sub.stop()

    run(main)


def test_health_responses_members_and_malformed_messages(redis_server: RedisServer) -> None:
    async def main() -> None:
        a, b = router(), router()
        sa, sb = sync(a, redis_server.url(), "a"), sync(b, redis_server.url(), "b")
        got: list[Any] = []
        sb.on_health = lambda rep, w, h: got.append(("health", rep, w, h))
        sb.on_response = lambda rid, w, left: got.append(("resp", rid, w, left > 0))
        sb.on_member = lambda rep, k, i, spec, st: got.append(("member", rep, k, i, spec, st))
        await sa.start()
        await sb.start()
        import redis.asyncio

        cli = redis.asyncio.Redis.from_url(redis_server.url())
        await cli.xadd(Keys().log, {"m": b"not msgpack"})
        sa.publish_health(2, False)
        sa.publish_response("resp_1", 3, 60.0)
        sa.publish_member("added", 2**52, {"url": "http://w9:8000"}, "active")
        await until(lambda: len(got) == 3)
        assert got == [
            ("health", "a", 2, False),
            ("resp", "resp_1", 3, True),
            ("member", "a", "added", 2**52, {"url": "http://w9:8000"}, "active"),
        ]
        assert await sb.fetch_response("resp_1") == 3 and await sb.fetch_response("nope") is None
        assert await sb.members_snapshot() == {2**52: ({"url": "http://w9:8000"}, "active")}
        assert sb.stats()["malformed"] == 1
        await cli.aclose()
        await sa.stop()
        await sb.stop()

    run(main)


def test_the_thread_hosted_sync(redis_server: RedisServer) -> None:
    a, b = router(), router()
    with ReplicaSyncThread(a, redis_server.url(), replica_id="a", heartbeat=0.2) as ta, \
         ReplicaSyncThread(b, redis_server.url(), replica_id="b", heartbeat=0.2) as tb:  # fmt: skip
        assert ta.sync.up and tb.sync.up
        d = a.route(Request("r", block_hashes=H(1, 2, 3)))
        asyncio.run(until(lambda: b.load(d.worker)["active_requests"] == 1))


def test_bad_settings_are_refused() -> None:
    r = router()
    for kw in ({"interval": 0}, {"heartbeat": -1}, {"replica_id": "a b"}, {"prefix": "a:b"},
               {"snapshot_interval": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            ReplicaSync(r, "redis://127.0.0.1:1/0", **kw)
    with pytest.raises(ValueError, match="redis://"):
        ReplicaSync(r, "http://127.0.0.1:1")
