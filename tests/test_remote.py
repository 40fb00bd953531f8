"""Remote state (kvroute.remote): other replicas' load and decisions, applied to a Router."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import Twin

from kvroute import Request, Router
from kvroute.load import LoadTracker
from kvroute.remote import RemoteUpdate, ReplicaLoad, Routed


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def H(*xs: int) -> np.ndarray:
    return np.array(xs, np.uint64)


def load(workers: list[int], active: list[int], prefill: list[float] | None = None,
         decode: list[float] | None = None) -> ReplicaLoad:  # fmt: skip
    n = len(workers)
    return ReplicaLoad(
        np.array(workers, np.uint64),
        np.array(active, np.int64),
        np.array(prefill or [0.0] * n),
        np.array(decode or [0.0] * n),
    )


def pair(twin: Twin, **kw: Any) -> tuple[Router, Router, list[Routed], Clock]:
    """Two routers over workers 0..3 on one clock; ``a`` shares its decisions into a list."""
    clock = Clock()
    kw = {"block_size": 16, "workers": range(4), "clock": clock, **kw}
    a, b = Router(**kw), Router(**kw)
    out: list[Routed] = []
    a.share(lambda now, r: out.append(r))
    return a, b, out, clock


def test_load_tracker_keeps_the_remote_share_apart() -> None:
    lt = LoadTracker()
    lt.add_worker(5)
    lt.add_worker(6)
    lt.start("a", 5, prefill_tokens=100, decode_blocks=1, now=0.0, hashes=H(1, 2))
    assert lt.set_remote(6, 4, 30.0, 2.0) and lt.set_remote(5, 1, 10.0, 0.0)
    assert not lt.set_remote(99, 1, 0.0, 0.0)
    assert lt.active[:2].tolist() == [2, 4] and lt.prefill_tokens[:2].tolist() == [110.0, 30.0]
    ids, act, pre, dec = lt.local()
    assert (ids.tolist(), act.tolist(), pre.tolist(), dec.tolist()) == (
        [5, 6], [1, 0], [100.0, 0.0], [3.0, 0.0])  # fmt: skip
    lt.set_remote(6, 1, 0.0, 0.0)  # replaced, not added
    assert lt.active[:2].tolist() == [2, 1]
    lt.finish("a")
    lt._check()
    lt.remove_worker(5)  # the last worker moves into the hole with its remote share
    assert lt.active[:1].tolist() == [1] and lt.remote_active[:1].tolist() == [1]
    lt._check()


def test_remote_load_steers_new_requests_away(twin: Twin) -> None:
    _, b, _, _ = pair(twin, policy_params={"seed": 0})
    # replica "x" has 9 requests on each of workers 0..2: only worker 3 is free
    b.apply_remote(RemoteUpdate("x", load=load([0, 1, 2, 3], [9, 9, 9, 0])))
    assert [b.load(w)["active_requests"] for w in range(4)] == [9, 9, 9, 0]
    assert b.route(Request("r", block_hashes=H(1, 2))).worker == 3
    # an update replaces the replica's share; another replica's adds to it
    b.apply_remote(RemoteUpdate("x", load=load([0, 1, 2, 3], [0, 0, 0, 5])))
    b.apply_remote(RemoteUpdate("y", load=load([0], [2])))
    assert [b.load(w)["active_requests"] for w in range(4)] == [2, 0, 0, 6]
    assert b.remote_load()["active"] == {0: 2, 3: 5}
    b._check()
    # the local request is what this router publishes; remote shares are not
    assert b.local_load().active.tolist() == [0, 0, 0, 1]


def test_a_silent_replica_stops_counting_after_the_load_ttl(twin: Twin) -> None:
    _, b, _, clock = pair(twin)
    b.apply_remote(RemoteUpdate("x", load=load([1], [7])))
    clock.t = 2.0
    b.apply_remote(RemoteUpdate("x"))  # a heartbeat without changes renews it
    clock.t = 4.5
    b.route(Request("r", block_hashes=H(1)))  # routing expires what is due
    assert b.load(1)["active_requests"] == 7
    clock.t = 5.0
    b.route(Request("s", block_hashes=H(2)))
    assert b.load(1)["active_requests"] in (0, 1) and b.remote_load()["replicas"] == {}
    b._check()
    b.apply_remote(RemoteUpdate("x", load=load([1], [3])))
    assert b.drop_remote("x") and not b.drop_remote("x")
    assert b.remote_load()["active"] == {}


def test_a_remote_decision_is_a_fresh_decision_with_events(twin: Twin) -> None:
    a, b, out, clock = pair(twin, policy_params={"seed": 0})
    prompt = H(*range(1, 21))
    first = a.route(Request("s0", block_hashes=prompt))
    assert [r.worker for r in out] == [first.worker] and out[0].hashes.tolist() == prompt.tolist()
    b.apply_remote(RemoteUpdate("a", routed=out))
    # a sibling through b follows it (before any KV event), and b shares nothing back
    sib = b.route(Request("s1", block_hashes=H(*range(1, 18), 99)))
    assert (sib.worker, sib.matched_blocks) == (first.worker, 17)
    # a record older than the fresh TTL (5 s) is not applied
    c = Router(block_size=16, workers=range(4), clock=clock)
    c.apply_remote(RemoteUpdate("a", routed=[Routed(2, H(50, 51), age=6.0)]))
    assert c.route(Request("t", block_hashes=H(50, 51))).matched_blocks == 0


def test_remote_decisions_predict_residency_without_events(twin: Twin) -> None:
    a, b, out, clock = pair(twin, kv_events=False, predicted_ttl=100.0)
    d = a.route(Request("c1", block_hashes=H(*range(1, 11)), session_id="conv",
                        cache_control={"type": "ephemeral", "ttl": "1h"}))  # fmt: skip
    assert out[0].pin_ttl == 3600.0 and out[0].session_id == "conv"
    aged = [Routed(r.worker, r.hashes, r.segments, r.session_id, r.pin_ttl, age=30.0) for r in out]
    b.apply_remote(RemoteUpdate("a", routed=aged))
    nxt = b.route(Request("c2", block_hashes=H(*range(1, 14)), session_id="conv"))
    assert nxt.worker == d.worker and nxt.policy == "pin"
    b.finished("c2")
    # the prompt's own prediction lived 100 - 30 s; the breakpoint's prefix 3600 - 30 s
    clock.t = 71.0
    e = b.route(Request("c3", block_hashes=H(*range(1, 11)), session_id="other"))
    assert e.matched_blocks == 10  # the 1 h segment covers the whole prompt
    b._check()


def test_remote_records_for_unknown_workers_are_ignored(twin: Twin) -> None:
    _, b, _, _ = pair(twin)
    b.apply_remote(RemoteUpdate("x", load=load([42], [3]), routed=[Routed(42, H(1, 2))]))
    assert b.remote_load()["active"] == {42: 3}
    b.add_worker(42)  # a worker added later gets the share it is known to carry
    assert b.load(42)["active_requests"] == 3
    b._check()


def test_share_stops_and_never_echoes(twin: Twin) -> None:
    a, b, out, _ = pair(twin)
    got: list[Routed] = []
    b.share(lambda now, r: got.append(r))
    b.apply_remote(RemoteUpdate("a", routed=[Routed(1, H(1, 2, 3))]))
    assert got == []
    a.share(None)
    a.route(Request("q", block_hashes=H(4)))
    assert out == []


@pytest.mark.parametrize("kv_events", [True, False])
def test_generic_path_sees_remote_load_too(twin: Twin, kv_events: bool) -> None:
    # an unhealthy worker makes the router take the generic (non-fused) path
    _, b, _, _ = pair(twin, kv_events=kv_events, policy="kv_cost", policy_params={"seed": 0})
    b.mark_unhealthy(0)
    b.apply_remote(RemoteUpdate("x", load=load([1, 2], [0, 0], [0.0, 0.0], [500.0, 500.0])))
    assert b.route(Request("r", block_hashes=H(1, 2))).worker == 3


def test_pins_alone_are_applied_with_the_time_they_have_left(twin: Twin) -> None:
    _, b, _, clock = pair(twin)
    b.apply_remote(RemoteUpdate("x", pins=[("s", 2, 10.0), ("t", 99, 10.0), ("u", 1, 0.0)]))
    d = b.route(Request("r", block_hashes=H(1), session_id="s"))
    assert (d.worker, d.policy) == (2, "pin")
    b.finished("r")
    clock.t = 10.0
    assert b.route(Request("q", block_hashes=H(1), session_id="s")).policy != "pin"
