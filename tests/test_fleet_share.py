"""Membership and response ids shared through a real Redis (MembershipShare, RedisResponseStore).

``kvroute.fleet.membership`` (the replicas' Membership) is built apart; the
adapter is tested here against ``TinyMembership``, a minimal implementation
of the interface it needs (the merge runs it against the real one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from redis_server import RedisServer
from test_fleet_sync import router, run, sync, until

from kvroute.fleet.responses import RedisResponseStore
from kvroute.fleet.share import MembershipShare
from kvroute.fleet.spec import RUNTIME_ID_BASE, WorkerSpec, parse_worker, runtime_worker_id


@dataclass(frozen=True)
class Member:
    id: int
    spec: WorkerSpec
    state: str
    source: str


@dataclass(frozen=True)
class MembershipChange:
    kind: str
    member: Member


class TinyMembership:
    """The Membership interface, minimally: static workers 0..n-1, runtime ones by URL."""

    def __init__(self, static: list[str]) -> None:
        self._m = {i: Member(i, parse_worker(u), "active", "flag") for i, u in enumerate(static)}
        self._listeners: list[Callable[[MembershipChange], None]] = []

    def members(self) -> dict[int, Member]:
        return dict(self._m)

    def get(self, id: int) -> Member | None:
        return self._m.get(id)

    def by_url(self, url: str) -> Member | None:
        return next((m for m in self._m.values() if m.spec.url == url), None)

    def _tell(self, kind: str, m: Member) -> None:
        for cb in list(self._listeners):
            cb(MembershipChange(kind, m))

    def add(self, spec: WorkerSpec, *, source: str) -> Member:
        old = self.by_url(spec.url)
        if old is not None:
            if old.spec == spec:
                return old
            new = replace(old, spec=spec, source=source)
            self._m[old.id] = new
            self._tell("updated", new)
            return new
        m = Member(runtime_worker_id(spec.url), spec, "active", source)
        self._m[m.id] = m
        self._tell("added", m)
        return m

    def remove(self, id: int, *, source: str) -> None:
        m = self._m.pop(id)
        self._tell("removed", replace(m, source=source))

    def drain(self, id: int, *, source: str) -> None:
        m = self._m[id] = replace(self._m[id], state="draining", source=source)
        self._tell("draining", m)

    def listen(self, callback: Callable[[MembershipChange], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)


STATIC = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
NEW = WorkerSpec("http://10.0.0.9:8000", "tcp://10.0.0.9:5557", name="late-gpu")


def test_runtime_workers_drains_and_removals_reach_every_replica(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        url = redis_server.url()
        ma, mb = TinyMembership(STATIC), TinyMembership(STATIC)
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
        late = TinyMembership(STATIC)
        sc = sync(router(), url, "c", workers=STATIC)
        await sc.start()
        share_c = MembershipShare(late, sc)
        await share_c.start()
        assert late.members()[0].state == "draining" and late.get(added.id) is None
        for s in (share_a, share_b, share_c):
            s.stop()
        for x in (sa, sb, sc):
            await x.stop()

    run(main)


def test_members_come_back_after_redis_returns_empty(redis_server: RedisServer) -> None:
    async def main() -> None:
        url = redis_server.url()
        ma = TinyMembership(STATIC)
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
        late = TinyMembership(STATIC)
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
        ra.put("resp_abc", 2, ttl=30.0)
        assert ra.get("resp_abc") == 2
        await until(lambda: rb.get("resp_abc") == 2)
        ra.put("resp_short", 1, ttl=0.2)
        await until(lambda: rb.get("resp_short") == 1)
        await asyncio.sleep(0.3)
        assert rb.get("resp_short") is None and ra.get("resp_short") is None
        # a replica that starts later asks Redis when its memory has no answer
        sc = sync(router(), url, "c", history=0.01)
        await sc.start()
        rc = RedisResponseStore(sc)
        assert await rc.aget("resp_abc") == 2 and await rc.aget("resp_none") is None
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
        store.put(f"r{i}", i)
    assert len(store) == 3 and store.get("r0") is None and store.get("r4") == 4
