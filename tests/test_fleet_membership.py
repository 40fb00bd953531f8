"""Membership: one worker per URL, stable ids, claims by source, draining, and the change stream."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.fleet import RUNTIME_ID_BASE, WorkerSpec, runtime_worker_id
from kvroute.fleet.membership import SOURCES, Member, Membership, MembershipChange


def recorder(m: Membership) -> list[tuple[str, int, str, str | None]]:
    seen: list[tuple[str, int, str, str | None]] = []
    m.listen(lambda c: seen.append((c.kind, c.member.id, c.member.source, c.by)))
    return seen


def test_flags_keep_their_positions_and_others_get_their_urls_id() -> None:
    m = Membership([WorkerSpec("http://a:1"), WorkerSpec("b:1/")])
    assert sorted(m.members()) == [0, 1]
    assert m.get(1) == Member(1, WorkerSpec("http://b:1"), "active", "flag")
    c = m.add(WorkerSpec("c:1"), source="file")
    assert c.id == runtime_worker_id("http://c:1") and RUNTIME_ID_BASE <= c.id < 2**53
    # the same URL however spelled is the same worker, with the same id
    assert m.add(WorkerSpec("http://c:1/"), source="dns").id == c.id
    assert m.by_url("c:1") == m.get(c.id) and m.by_url("http://nowhere:1") is None
    assert m.id_for("http://d:1") == runtime_worker_id("d:1") and m.by_url("d:1") is None
    assert m.id_for("http://d:1", source="flag") == 2
    m._check()


def test_two_flags_naming_one_url_are_refused() -> None:
    with pytest.raises(ValueError, match="given twice"):
        Membership([WorkerSpec("http://a:1"), WorkerSpec("a:1/")])


def test_an_id_is_never_given_to_another_url_even_after_its_worker_left() -> None:
    m = Membership([WorkerSpec("http://a:1")])
    assert m.remove(0, source="admin") is not None
    # the flag's URL comes back through the admin API: it is still worker 0
    assert m.add(WorkerSpec("http://a:1"), source="admin").id == 0
    # a new flag takes the next position, not 0
    assert m.add(WorkerSpec("http://b:1"), source="flag").id == 1
    m._check()


def test_fields_come_from_the_highest_ranked_claim() -> None:
    m = Membership()
    seen = recorder(m)
    dns = WorkerSpec("http://w:8000", "tcp://w:1")
    w = m.add(dns, source="dns")
    assert (w.source, w.spec) == ("dns", dns)
    filed = WorkerSpec("http://w:8000", "tcp://w:5557", role="prefill", name="p0")
    assert m.add(filed, source="file").spec == filed
    # DNS says the same again, or something else: the file's fields stay
    assert m.add(WorkerSpec("http://w:8000", "tcp://w:2"), source="dns").spec == filed
    admin = WorkerSpec("http://w:8000", "tcp://w:6000")
    assert m.add(admin, source="admin").source == "admin"
    # admin and sync are one voice: the latest word wins either way
    synced = WorkerSpec("http://w:8000", "tcp://w:7000")
    assert m.add(synced, source="sync").spec == synced
    assert m.add(admin, source="admin").spec == admin
    assert m.sources(w.id) == ("admin", "sync", "file", "dns")
    kinds = [k for k, *_ in seen]
    assert kinds == ["added", "updated", "updated", "updated", "updated"]  # DNS's repeat: none
    # role and every other field pass through untouched
    assert m.remove(w.id, source="admin") is not None
    assert m.add(filed, source="file").spec.role == "prefill"


def test_a_source_that_lets_go_only_takes_back_its_own_claim() -> None:
    m = Membership()
    seen = recorder(m)
    w = m.add(WorkerSpec("http://w:1", name="from-admin"), source="admin").id
    m.add(WorkerSpec("http://w:1", name="from-file"), source="file")
    # the workers file drops it: the admin's claim keeps it in
    after = m.drain(w, source="file")
    assert after is not None and after.state == "active" and after.source == "admin"
    assert m.sources(w) == ("admin",)
    # a source holding no claim changes nothing
    assert m.remove(w, source="dns") is None and m.drain(w, source="file") is None
    assert m.get(w) is not None and seen[-1][0] == "added"
    # DNS drops an address the file still lists: nothing happens
    x = m.add(WorkerSpec("http://x:1"), source="file").id
    m.add(WorkerSpec("http://x:1"), source="dns")
    assert m.remove(x, source="dns") == m.get(x) and m.sources(x) == ("file",)


def test_the_last_claim_going_drains_or_removes() -> None:
    m = Membership()
    seen = recorder(m)
    a = m.add(WorkerSpec("http://a:1"), source="file").id
    b = m.add(WorkerSpec("http://b:1"), source="dns").id
    drained = m.drain(a, source="file")
    assert drained is not None and drained.state == "draining" and m.get(a) == drained
    gone = m.remove(b, source="dns")
    assert gone is not None and m.get(b) is None
    assert seen[2:] == [("draining", a, "file", "file"), ("removed", b, "dns", "dns")]
    m._check()


def test_the_operator_drains_and_removes_whatever_names_the_worker() -> None:
    m = Membership([WorkerSpec("http://a:1")])
    seen = recorder(m)
    m.add(WorkerSpec("http://a:1"), source="file")
    d = m.drain(0, source="admin")
    assert d is not None and d.state == "draining" and d.source == "flag"
    # draining is sticky: claims are recorded, the worker still leaves
    again = m.add(WorkerSpec("http://a:1", name="back"), source="admin")
    assert again.state == "draining" and again.source == "flag"
    assert m.drain(0, source="admin") == again  # idempotent: no second change
    assert m.evict(0) == again and m.get(0) is None and m.evict(0) is None
    assert [k for k, *_ in seen] == ["draining", "removed"]
    assert seen[-1][3] == "evict"
    # removal by sync, for a worker the file names too
    f = m.add(WorkerSpec("http://f:1"), source="file").id
    assert m.remove(f, source="sync") is not None and m.get(f) is None
    assert m.remove(f, source="admin") is None and m.drain(f, source="admin") is None


def test_bad_arguments() -> None:
    m = Membership()
    with pytest.raises(ValueError, match="source must be one of"):
        m.add(WorkerSpec("http://a:1"), source="config")
    with pytest.raises(TypeError, match="WorkerSpec"):
        m.add("http://a:1", source="admin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source must be one of"):
        m.remove(0, source="nobody")


def test_listeners_hear_changes_in_order_and_a_failing_one_hides_nothing() -> None:
    m = Membership()
    heard: list[MembershipChange] = []

    def broken(change: MembershipChange) -> None:
        raise RuntimeError("listener bug")

    m.listen(broken)
    stop = m.listen(heard.append)
    w = m.add(WorkerSpec("http://a:1"), source="admin")
    assert heard == [MembershipChange("added", w, "admin")]
    stop()
    m.remove(w.id, source="admin")
    assert len(heard) == 1
    # a listener may call back into the membership (the lock is re-entrant)
    m.listen(lambda c: m.members())
    m.add(WorkerSpec("http://b:1"), source="admin")


def test_changes_from_many_threads_keep_the_invariants() -> None:
    m = Membership()
    heard: list[MembershipChange] = []
    m.listen(heard.append)
    urls = [f"http://w{i}:8000" for i in range(8)]

    def churn(seed: int) -> None:
        for k in range(200):
            url = urls[(seed * 7 + k) % len(urls)]
            src = SOURCES[(seed + k) % len(SOURCES)]
            op = (seed + 3 * k) % 4
            wid = m.id_for(url, source=src) if src != "flag" else None
            if op < 2 or wid is None:
                m.add(WorkerSpec(url), source=src)
            elif op == 2:
                m.drain(wid, source=src)
            else:
                m.remove(wid, source=src)

    threads = [threading.Thread(target=churn, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m._check()
    assert replayed(heard) == m.members()


def replayed(changes: list[MembershipChange]) -> dict[int, Member]:
    """The members a listener that started from nothing ends with."""
    out: dict[int, Member] = {}
    for c in changes:
        if c.kind == "removed":
            assert out.pop(c.member.id) == c.member
        else:
            assert (c.kind == "added") == (c.member.id not in out)
            out[c.member.id] = c.member
    return out


_URLS = ["http://a:1", "http://b:1", "http://c:1"]
_OPS = st.tuples(
    st.sampled_from(["add", "remove", "drain", "evict"]),
    st.sampled_from(_URLS),
    st.sampled_from(SOURCES),
    st.sampled_from([None, "tcp://e:1", "tcp://e:2"]),
)


@settings(deadline=None)
@given(st.lists(_OPS, max_size=40))
def test_the_change_stream_rebuilds_the_members_exactly(ops: list[Any]) -> None:
    """A follower that applies every change (the proxy, a replica sync) never drifts."""
    m = Membership([WorkerSpec(_URLS[0])])
    heard: list[MembershipChange] = []
    m.listen(heard.append)
    start = m.members()
    for op, url, source, events in ops:
        member = m.by_url(url)
        if op == "add":
            if source == "flag" and m.id_for(url, source="flag") != m.id_for(url):
                source = "admin"  # flags are named at start; later ones are appended
            m.add(WorkerSpec(url, events), source=source)
        elif member is not None and op == "remove":
            m.remove(member.id, source=source)
        elif member is not None and op == "drain":
            m.drain(member.id, source=source)
        elif member is not None:
            m.evict(member.id)
        m._check()
        for wid, mem in m.members().items():
            # the fields are the best-ranked claim's; ids never move
            assert mem.source == m.sources(wid)[0] or mem.source in ("admin", "sync")
            assert m.id_for(mem.spec.url) == wid
    assert replayed([MembershipChange("added", v) for v in start.values()] + heard) == m.members()
