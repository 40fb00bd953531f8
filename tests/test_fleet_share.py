"""Membership and response ids shared through a real Redis (MembershipShare, RedisResponseStore).

Each replica's membership is a real :class:`kvroute.fleet.membership.Membership`;
the proxy's end-to-end tests (tests/test_proxy_replicas.py) run the same
through the admin API and a workers file.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis_server import RedisServer
from test_fleet_sync import router, run, sync, until

from kvroute.fleet.membership import Membership
from kvroute.fleet.responses import RedisResponseStore
from kvroute.fleet.share import MembershipShare
from kvroute.fleet.spec import RUNTIME_ID_BASE, WorkerSpec, parse_worker


def membership(static: list[str]) -> Membership:
    """A replica's membership, its workers named by flags as on the command line."""
    return Membership([parse_worker(u) for u in static])


STATIC = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
NEW = WorkerSpec("http://10.0.0.9:8000", "tcp://10.0.0.9:5557", name="late-gpu")


def test_runtime_workers_drains_and_removals_reach_every_replica(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        url = redis_server.url()
        ma, mb = membership(STATIC), membership(STATIC)
        sa, sb = sync(router(), url, "a", workers=STATIC), sync(router(), url, "b", workers=STATIC)
        await sa.start()
        await sb.start()
        share_a, share_b = MembershipShare(ma, sa), MembershipShare(mb, sb)
        await share_a.start()
        await share_b.start()
        sent_before = sb.stats()["sent"]
        added = ma.add(NEW, source="admin")
        assert added.id >= RUNTIME_ID_BASE
        await until(lambda: mb.get(added.id) is not None)
        got = mb.get(added.id)
        assert got is not None and (got.spec, got.source, got.state) == (NEW, "sync", "active")
        mb.drain(0, source="admin")  # a worker named at start, drained on the other replica
        await until(lambda: ma.members()[0].state == "draining")
        ma.remove(added.id, source="admin")
        await until(lambda: mb.get(added.id) is None)
        # b applied a's changes without sending them back (heartbeats aside)
        assert share_b.applied == 2 and share_a.applied == 1
        await asyncio.sleep(0.05)
        assert sb.stats()["sent"] - sent_before < 20
        # a replica that starts now reads what Redis holds: the drain (the removal is gone)
        late = membership(STATIC)
        sc = sync(router(), url, "c", workers=STATIC)
        await sc.start()
        share_c = MembershipShare(late, sc)
        await share_c.start()
        assert late.members()[0].state == "draining" and late.get(added.id) is None
        # a's drain ends (its own requests on worker 0 are done): b and c finish their own
        assert ma.evict(0) is not None
        await until(lambda: not sa._members)
        await asyncio.sleep(0.05)
        assert mb.members()[0].state == "draining" and late.members()[0].state == "draining"
        assert 0 not in await sc.members_snapshot()  # a replica starting now needs no drain
        for s in (share_a, share_b, share_c):
            s.stop()
        for x in (sa, sb, sc):
            await x.stop()

    run(main)


def test_members_come_back_after_redis_returns_empty(redis_server: RedisServer) -> None:
    async def main() -> None:
        url = redis_server.url()
        ma = membership(STATIC)
        sa = sync(router(), url, "a")
        await sa.start()
        share = MembershipShare(ma, sa)
        await share.start()
        added = ma.add(NEW, source="admin")
        await until(lambda: sa.stats()["sent"] >= 2 and not sa._members)
        redis_server.kill()
        await until(lambda: not sa.up)
        redis_server.start()  # empty: no persistence
        await until(lambda: sa.up)
        await until(lambda: not sa._members)  # the re-published members went out
        late = membership(STATIC)
        sc = sync(router(), url, "c")
        await sc.start()
        await MembershipShare(late, sc).start()
        got = late.get(added.id)
        assert got is not None and got.spec == NEW
        share.stop()
        await sa.stop()
        await sc.stop()

    run(main)


def test_response_ids_are_known_everywhere(redis_server: RedisServer) -> None:
    async def main() -> None:
        url = redis_server.url()
        sa, sb = sync(router(), url, "a"), sync(router(), url, "b")
        await sa.start()
        await sb.start()
        ra, rb = RedisResponseStore(sa), RedisResponseStore(sb)
        ra.remember("resp_abc", 2, ttl=30.0)
        assert ra.worker_of("resp_abc") == 2
        await until(lambda: rb.worker_of("resp_abc") == 2)
        ra.remember("resp_short", 1, ttl=0.2)
        await until(lambda: rb.worker_of("resp_short") == 1)
        await asyncio.sleep(0.3)
        assert rb.worker_of("resp_short") is None and ra.worker_of("resp_short") is None
        # a replica that starts later asks Redis when its memory has no answer
        sc = sync(router(), url, "c", history=0.01)
        await sc.start()
        rc = RedisResponseStore(sc)
        assert await rc.aworker_of("resp_abc") == 2 and await rc.aworker_of("resp_none") is None
        for s in (sa, sb, sc):
            await s.stop()

    run(main)


def test_the_response_store_bounds_its_memory() -> None:
    class Quiet:
        on_response: Any = None
        on_reconnect: list[Any] = []  # noqa: RUF012

        def publish_response(self, *a: Any) -> None:
            pass

    store = RedisResponseStore(Quiet(), max_entries=3, clock=lambda: 0.0)  # type: ignore[arg-type]
    for i in range(5):
        store.remember(f"r{i}", i)
    assert len(store) == 3 and store.worker_of("r0") is None and store.worker_of("r4") == 4
    store.forget_worker(4)
    assert len(store) == 2 and store.worker_of("r4") is None and store.worker_of("r3") == 3
