"""Predicted residency (approximate mode, predict-on-route): TTL, LRU capacity, pins.

Every test runs on the compiled cores and on their pure-Python twins (ids c / py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import Clock, H, Twin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvroute.approx
from kvroute.approx import FreshDecisions, PredictedResidency
from kvroute.hashing import kvroute_block_hashes
from kvroute.request import CacheControl, Request
from kvroute.router import Router

pytestmark = pytest.mark.usefixtures("twin")


def approx_router(**kw: Any) -> tuple[Router, Clock]:
    clock = Clock()
    kw.setdefault("policy", "cache_aware")
    r = Router(block_size=4, clock=clock, kv_events=False, **kw)
    return r, clock


def test_ttl_expiry_in_approximate_mode_with_injected_clock() -> None:
    r, clock = approx_router(workers=[0, 1, 2])
    first = r.route(Request("a", block_hashes=H(1, 2, 3)))
    r.finished("a")
    clock.t = 119.9
    d = r.route(Request("b", block_hashes=H(1, 2, 3)))
    assert (d.worker, d.matched_blocks) == (first.worker, 3)
    r.finished("b")  # b refreshed the prediction at 119.9
    clock.t = 239.8
    assert r.route(Request("c", block_hashes=H(1, 2, 9))).matched_blocks == 2
    r.finished("c")
    clock.t = 359.8  # c (at 239.8) expired
    assert r.route(Request("d", block_hashes=H(1, 2, 9))).matched_blocks == 0


def test_events_are_not_used_in_approximate_mode() -> None:
    r, _ = approx_router(workers=[0, 1])
    r.apply_stored(1, H(1, 2, 3))
    assert r.route(Request("a", block_hashes=H(1, 2, 3))).matched_blocks == 0


def test_custom_predicted_ttl() -> None:
    r, clock = approx_router(workers=[0], predicted_ttl=10.0)
    r.route(Request("a", block_hashes=H(1)))
    clock.t = 10.0
    assert r.route(Request("b", block_hashes=H(1))).matched_blocks == 0


def test_lru_capacity_bound_keeps_prefixes_of_recent_prompts() -> None:
    r, _ = approx_router(workers=[0])
    r.update_worker_metrics(0, kv_capacity_blocks=6)
    r.route(Request("a", block_hashes=H(1, 2, 3, 4)))
    r.route(Request("b", block_hashes=H(10, 11, 12, 13)))
    # 8 blocks > 6: the older prompt loses its tail first
    pr = r._predicted
    assert pr is not None and pr.worker_len(0) == 6
    assert pr.match(H(1, 2, 3, 4)) == {0: 2}
    assert pr.match(H(10, 11, 12, 13)) == {0: 4}
    # touching "a" again makes "b" the least recently used
    r.route(Request("a2", block_hashes=H(1, 2, 3, 4)))
    assert pr.match(H(1, 2, 3, 4)) == {0: 4}
    assert pr.match(H(10, 11, 12, 13)) == {0: 2}
    r._check()


def test_capacity_from_add_worker_and_shrinking_evicts_now() -> None:
    r, _ = approx_router()
    r.add_worker(0, kv_capacity_blocks=100)
    r.route(Request("a", block_hashes=H(*range(1, 51))))
    pr = r._predicted
    assert pr is not None and pr.worker_len(0) == 50
    r.update_worker_metrics(0, kv_capacity_blocks=10)
    assert pr.worker_len(0) == 10
    assert pr.match(H(*range(1, 51))) == {0: 10}
    assert pr.evicted_blocks == 40


def test_shared_blocks_survive_eviction_of_an_older_entry(twin: Twin) -> None:
    pr = PredictedResidency(twin.BlockIndex, ttl=100.0)
    pr.set_capacity(0, 5)
    pr.record(0, H(1, 2, 3), now=0.0)
    pr.record(0, H(1, 2, 7, 8), now=1.0)  # shares 1, 2: 5 distinct blocks, at capacity
    assert pr.worker_len(0) == 5
    pr.record(0, H(1, 9), now=2.0)  # 6 distinct: block 3 (oldest tail) goes
    assert pr.match(H(1, 2, 3)) == {0: 2}
    assert pr.match(H(1, 2, 7, 8)) == {0: 4}
    pr._check()


def test_cache_control_pinned_blocks_outlive_the_normal_ttl() -> None:
    r, clock = approx_router(workers=[0, 1])
    cc = {"type": "ephemeral", "ttl": "1h"}
    d = r.route(Request("a", block_hashes=H(1, 2), session_id="s", cache_control=cc))
    r.route(Request("plain", block_hashes=H(5, 6)))
    r.finished("a")
    r.finished("plain")
    clock.t = 1000.0
    assert r.route(Request("x", block_hashes=H(5, 6))).matched_blocks == 0
    hit = r.route(Request("y", block_hashes=H(1, 2)))
    assert (hit.worker, hit.matched_blocks) == (d.worker, 2)
    r.finished("x")
    r.finished("y")
    clock.t = 3600.0 + 1000.0  # y's own 120 s entry and the pin are both gone
    assert r.route(Request("z", block_hashes=H(1, 2))).matched_blocks == 0


def test_each_breakpoint_keeps_its_own_prefix_for_its_own_ttl() -> None:
    # Block size 4: a 1h breakpoint after 1 block (the system prompt), a 5m one
    # after 3 (the conversation so far), and a 4-block prompt. No session: the
    # breakpoints still say how long the prefixes stay warm.
    r, clock = approx_router(workers=[0, 1])
    bps = [CacheControl(3600.0, prefix_tokens=5), CacheControl(300.0, prefix_tokens=12)]
    d = r.route(Request("a", block_hashes=H(1, 2, 3, 4), cache_control=bps))
    r.finished("a")

    def matched(t: float) -> int:
        clock.t = t
        rid = f"probe@{t}"
        probe = r.route(Request(rid, block_hashes=H(1, 2, 3, 4)))
        r.failed(rid)  # forgets the probe's own prediction
        assert probe.worker == d.worker or probe.matched_blocks == 0
        return probe.matched_blocks

    assert [matched(t) for t in (100.0, 200.0, 400.0, 3599.0, 3601.0)] == [4, 3, 1, 1, 0]
    r._check()


def test_a_failed_request_forgets_its_pinned_prefixes_too() -> None:
    r, _ = approx_router(workers=[0, 1])
    bps = [CacheControl(3600.0, prefix_tokens=4), CacheControl(300.0)]
    r.route(Request("a", block_hashes=H(1, 2, 3), cache_control=bps))
    r.failed("a")
    assert r.route(Request("b", block_hashes=H(1, 2, 3))).matched_blocks == 0
    r._check()


def test_remove_worker_forgets_its_predictions() -> None:
    r, _ = approx_router(workers=[0, 1])
    d = r.route(Request("a", block_hashes=H(1, 2)))
    r.remove_worker(d.worker)
    assert r.route(Request("b", block_hashes=H(1, 2))).matched_blocks == 0
    r._check()


def test_forget_and_bad_ttl(twin: Twin) -> None:
    pr = PredictedResidency(twin.BlockIndex)
    e = pr.record(0, H(1, 2), now=0.0)
    pr.forget(e)
    pr.forget(e)
    assert pr.match(H(1)) == {} and len(pr) == 0
    assert pr.record(0, H(), now=0.0) >= 0 and len(pr) == 0
    with pytest.raises(ValueError, match="ttl must be > 0"):
        PredictedResidency(twin.BlockIndex, ttl=0)


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("record"),
            st.integers(0, 2),
            st.lists(st.integers(1, 12), min_size=1, max_size=6),
            st.sampled_from([None, 5.0, 50.0]),
        ),
        st.tuples(st.just("tick"), st.floats(0, 30)),
        st.tuples(st.just("cap"), st.integers(0, 2), st.one_of(st.none(), st.integers(0, 8))),
        st.tuples(st.just("forget"), st.integers(0, 30)),
        st.tuples(st.just("remove"), st.integers(0, 2)),
    ),
    max_size=40,
)


# the twin fixture only rebinds module names, the same for every example
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_predicted_residency_invariants_under_random_operations(
    twin: Twin, program: list[Any]
) -> None:
    pr = PredictedResidency(twin.BlockIndex, ttl=20.0)
    now = 0.0
    caps: dict[int, int | None] = {}
    for op in program:
        if op[0] == "record":
            _, w, blocks, ttl = op
            # prefix chains: block i's key encodes its prefix, like real hashes
            keys = [hash(tuple(blocks[: i + 1])) & 0xFFFFFFFF for i in range(len(blocks))]
            pr.record(w, np.array(keys, np.uint64), now, ttl)
        elif op[0] == "tick":
            now += op[1]
            pr.expire(now)
        elif op[0] == "cap":
            caps[op[1]] = op[2]
            pr.set_capacity(op[1], op[2])
        elif op[0] == "forget":
            pr.forget(op[1])
        else:
            pr.remove_worker(op[1])
            caps.pop(op[1], None)
        pr._check()
        for w, cap in caps.items():
            if cap is not None:
                assert pr.worker_len(w) <= cap
    pr.expire(now)
    # nothing outlives its expiry
    assert all(e.expiry > now for e in pr._entries.values())


def test_fresh_decisions_keep_the_newest_per_worker_and_expire() -> None:
    fd = FreshDecisions(ttl=5.0, per_key=2)
    fd.record(0, H(1, 2, 3), now=0.0)
    fd.record(0, H(1, 2, 9), now=1.0)  # replaces worker 0's older decision
    assert len(fd) == 1
    assert fd.match(H(1, 2, 3), now=1.0) == {0: 2}
    fd.record(1, H(1, 5), now=2.0)
    fd.record(2, H(1, 2, 3, 4), now=3.0)  # per_key=2: worker 0's entry is pushed out
    assert fd.match(H(1, 2, 3, 4), now=3.0) == {1: 1, 2: 4}
    # a decision that cannot beat what the index already knows is skipped
    assert fd.match(H(1, 2, 3, 4), now=3.0, known={2: 4, 1: 1}) == {}
    assert fd.match(H(1, 2, 3, 4), now=3.0, known={2: 3}) == {1: 1, 2: 4}
    fd.remove_worker(2)
    assert fd.match(H(1, 2, 3, 4), now=3.0) == {1: 1}
    assert fd.purge(now=7.0) == 1 and len(fd) == 0
    e = fd.record(4, H(8), now=10.0)
    fd.forget(e)
    fd.forget(e)
    fd.forget(None)
    assert fd.match(H(8), now=10.0) == {} and fd.record(4, H(), now=0.0) is None
    with pytest.raises(ValueError, match="per_key must be >= 1"):
        FreshDecisions(per_key=0)
    with pytest.raises(ValueError, match="ttl must be > 0"):
        FreshDecisions(ttl=0)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.integers(0, 3), min_size=0, max_size=40),
    st.lists(st.integers(0, 3), min_size=0, max_size=40),
    st.integers(1, 4),
)
def test_chained_common_prefix_agrees_with_the_full_comparison(
    a: list[int], b: list[int], block_size: int
) -> None:
    ka = kvroute_block_hashes(a, block_size)
    kb = kvroute_block_hashes(b, block_size)
    k = 0
    while k < min(len(ka), len(kb)) and ka[k] == kb[k]:
        k += 1
    # looked up when called: the twin's under "py"
    assert kvroute.approx.chained_common_prefix(ka, kb) == k
    assert kvroute.approx.chained_common_prefix(ka, ka) == len(ka)
