"""WorkerTrust and the router's use of it: the drift detector, the fallback, anchoring.

Issue 16, items 2 and 4, without sockets: the detector is statistical (a
window, a threshold, a tolerance), legitimate disagreements do not trip it,
a degraded worker is routed on its own decisions (and an over-believing
index is ignored), orphaned stores are anchored, inferred blocks never
outlive a removal the index cannot resolve.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest

from kvroute import Request, Router
from kvroute.events import EventApplier
from kvroute.events.types import BlockRemoved, BlockStored, EventBatch
from kvroute.hashing import kvroute_block_hashes
from kvroute.trust import RecentPrompt, WorkerTrust, find_anchor


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def keys(start: int, n: int) -> np.ndarray:
    return np.arange(start * 1000, start * 1000 + n, dtype=np.uint64)


# -- the detector ---------------------------------------------------------------------------


def trust(**kw: float) -> WorkerTrust:
    t = WorkerTrust(block_size=16, window=int(kw.pop("window", 64)), **kw)  # type: ignore[arg-type]
    t.add_worker(0)
    return t


def test_it_waits_for_a_full_window() -> None:
    t = trust(window=8)
    assert [t.observe(0, 512, 0) for _ in range(8)] == [None] * 7 + ["drift_over"]
    t = trust(window=8)
    assert [t.observe(0, 0, 512) for _ in range(8)][-1] == "drift_under"


@pytest.mark.parametrize(
    ("predicted", "reported"),
    [
        (48, 32),  # the engine recomputes a fully cached prompt's last block
        (512, 480),  # two blocks apart: the tolerance
        (100, 96),  # a partial block predicted, whole blocks reported
    ],
)
def test_what_counts_as_agreeing(predicted: int, reported: int) -> None:
    t = trust(window=4)
    assert [t.observe(0, predicted, reported) for _ in range(8)] == [None] * 8
    assert t.state(0).drift == 0.0


def test_requests_with_nothing_cached_or_predicted_are_not_counted() -> None:
    # a prompt shorter than a block, or unique: nothing on either side, no information,
    # so a workload of mostly unique prompts cannot dilute a drift
    t = trust(window=4)
    for _ in range(3):
        for _ in range(10):
            assert t.observe(0, 0, 0) is None
        t.observe(0, 512, 0)
    assert t.state(0).observed == 3
    assert t.observe(0, 512, 0) == "drift_over"


def test_scattered_disagreements_never_trip_it() -> None:
    # an engine evicting between its event and the request, a warm-up not yet
    # heard of: one request in ten off, for a long time
    t = trust()
    rng = random.Random(0)
    for _ in range(5000):
        off = rng.random() < 0.1
        assert t.observe(0, 512, 0 if off else 512) is None
    assert t.state(0).state == "ok" and 0.0 < t.state(0).drift < 0.3


def test_a_fan_out_burst_does_not_trip_it() -> None:
    # a dozen siblings run side by side: each predicted its first sibling's prefix,
    # the engine saw none of it; the window's other requests agree
    t = trust()
    for _ in range(64):
        t.observe(0, 256, 256)
    for _ in range(12):
        assert t.observe(0, 1024, 0) is None
    for _ in range(64):
        assert t.observe(0, 256, 256) is None


def test_a_degraded_worker_is_trusted_at_half_the_threshold_not_before() -> None:
    t = trust(window=10, threshold=0.5)
    t.degrade(0, "drift_over", "test", now=0.0)
    # 3 of 10 off: under the threshold, above half of it: still degraded
    for i in range(30):
        assert t.observe(0, 512, 0 if i % 10 < 3 else 512) is None
    changes = [t.observe(0, 512, 512) for _ in range(10)]
    assert changes[-1] == "trusted" or "trusted" in changes


def test_a_mismatch_is_never_trusted_by_observations() -> None:
    t = trust(window=4)
    t.degrade(0, "mismatch", "block size", now=0.0)
    assert [t.observe(0, 0, 0) for _ in range(20)] == [None] * 20
    assert t.reset(0) and t.state(0).state == "ok"


def test_requests_routed_before_the_degradation_are_not_judged() -> None:
    t = trust(window=4)
    assert t.prediction(0, "old", 512) == 512
    t.degrade(0, "events_lost", "gap", now=0.0)
    assert t.prediction(0, "old", 512) is None  # routed while trusted: predates it
    t.routed(0, "new", keys(1, 4), index_tokens=16, now=0.0)
    assert t.prediction(0, "new", 64) == 16  # the index's own figure, not the fallback's
    assert t.prediction(0, "new", 64) is None  # taken once


def test_degrade_rejects_an_unknown_cause() -> None:
    with pytest.raises(ValueError, match="cause must be one of"):
        trust().degrade(0, "bored", "", now=0.0)


# -- routing a degraded worker ----------------------------------------------------------------


def test_a_degraded_worker_is_routed_on_its_own_decisions() -> None:
    clock = Clock()
    r = Router(block_size=4, workers=[0, 1], clock=clock, policy_params={"seed": 0},
               predict_on_route=False)  # fmt: skip
    r.degrade_worker(1, "events_lost", "test")
    d = r.route(Request("a", block_hashes=keys(1, 8)), exclude=[0])
    assert d.worker == 1 and d.predicted_cached_tokens == 0
    r.finished("a")
    clock.t = 10.0
    d2 = r.route(Request("b", block_hashes=keys(1, 8)))
    # nothing in the index: the fallback (its own decision) says worker 1 holds it
    assert r.index.match(keys(1, 8)) == {}
    assert d2.worker == 1 and d2.predicted_cached_tokens == 32
    r._check()


def test_an_over_believing_index_is_ignored_while_degraded() -> None:
    clock = Clock()
    r = Router(block_size=4, workers=[0, 1], clock=clock, policy_params={"seed": 0},
               predict_on_route=False, drift_window=4)  # fmt: skip
    r.apply_stored(1, keys(1, 8))
    for i in range(4):
        d = r.route(Request(f"r{i}", block_hashes=keys(1, 8)))
        assert d.worker == 1 and d.predicted_cached_tokens == 32
        r.finished(f"r{i}")
        r.observe(d, 0)  # the engine had none of it
    st = r.worker_states()[1]
    assert st.state == "degraded" and st.cause == "drift_over"
    # the stale blocks were dropped; stored again, they are still not believed
    r.apply_stored(1, keys(1, 8))
    d = r.route(Request("x", block_hashes=keys(1, 8)))
    assert d.breakdown()[1]["matched_blocks"] == 0
    r._check()


def test_the_fast_path_and_the_policy_path_agree_on_a_degraded_fleet() -> None:
    # the compiled route step and the policy path (a pinned session) see the same overlap
    clock = Clock()
    r = Router(block_size=4, workers=[0, 1, 2], clock=clock, policy_params={"seed": 0})
    r.degrade_worker(2, "events_lost", "test")
    d = r.route(Request("a", block_hashes=keys(1, 6)), exclude=[0, 1])
    r.finished("a")
    clock.t = 10.0  # the fresh decision expired: only the fallback remembers
    cc = {"type": "ephemeral"}
    d1 = r.route(Request("b", block_hashes=keys(1, 6), session_id="s", cache_control=cc))
    r.finished("b")
    d2 = r.route(Request("c", block_hashes=keys(1, 6)), exclude=[1])  # the slow path
    assert d.worker == d1.worker == d2.worker == 2
    assert d1.predicted_cached_tokens == d2.predicted_cached_tokens == 24


def test_observe_validates_and_is_a_no_op_without_events() -> None:
    r = Router(block_size=4, workers=[0])
    d = r.route(Request("a", block_hashes=keys(1, 2)))
    with pytest.raises(TypeError, match="takes a Decision"):
        r.observe("a", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        r.observe(d, -1)
    with pytest.raises(TypeError, match="must be an int"):
        r.observe(d, 1.5)  # type: ignore[arg-type]
    approx = Router(block_size=4, workers=[0], kv_events=False)
    d = approx.route(Request("a", block_hashes=keys(1, 2)))
    assert approx.observe(d, 0) is None and approx.degrade_worker(0, "drift_over", "x") == 0
    assert approx.worker_states()[0].state == "ok"


def test_the_journal_replays_observations_and_degradations() -> None:
    clock = Clock()
    kw = {"block_size": 4, "policy_params": {"seed": 3}, "clock": clock, "drift_window": 2}
    r = Router(workers=[0, 1], journal=True, **kw)  # type: ignore[arg-type]
    r.apply_stored(0, keys(1, 4))
    decisions = []
    for i in range(6):
        clock.t = float(i * 10)  # the replay sets the same time for each request
        d = r.route(Request(i, block_hashes=keys(1, 4)))
        decisions.append(d.worker)
        r.finished(i)
        r.observe(d, 0)
    replay = Router(journal=True, **kw)  # type: ignore[arg-type]
    got = []
    for _, method, args, kwargs in r.journal():
        if method == "route":
            clock.t = float(args[0].request_id * 10)
        out = getattr(replay, method)(*args, **kwargs)
        if method == "route":
            got.append(out.worker)
    assert got == decisions
    assert replay.worker_states() == r.worker_states()


# -- anchoring ----------------------------------------------------------------------------------


def test_find_anchor_takes_the_newest_prompt_and_refuses_ambiguity() -> None:
    a = RecentPrompt(list(range(16)), keys(1, 4), None, None)
    b = RecentPrompt(list(range(16)), keys(2, 4), None, None)
    prompt, j = find_anchor([a, b], [8, 9, 10, 11], block_size=4)  # type: ignore[misc]
    assert prompt is b and j == 2
    # an event that runs past the prompt (its output blocks) still anchors
    assert find_anchor([a], [12, 13, 14, 15, 99, 98, 97, 96], block_size=4) == (a, 3)
    # another adapter's prompt never does
    assert find_anchor([a], [8, 9, 10, 11], 4, lora_name="x") is None
    # a prompt repeating itself: which block is the parent is unknowable
    rep = RecentPrompt([1, 2, 3, 4] * 4, keys(3, 4), None, None)
    assert find_anchor([rep], [1, 2, 3, 4], block_size=4) is None
    # shorter than a block, or only the first block: nothing to anchor
    assert find_anchor([a], [0, 1], block_size=4) is None
    assert find_anchor([a], [0, 1, 2, 3], block_size=4) is None


def _anchored_router() -> tuple[Router, EventApplier, list[int], np.ndarray]:
    clock = Clock()
    r = Router(block_size=4, workers=[0], clock=clock)
    ap = EventApplier(r)
    toks = list(range(100, 124))  # 6 blocks
    ks = kvroute_block_hashes(toks, 4)
    r.degrade_worker(0, "events_lost", "test")
    r.route(Request("p", tokens=toks))
    r.finished("p")
    return r, ap, toks, ks


def test_an_orphaned_store_is_anchored_to_the_prompt_it_continues() -> None:
    r, ap, toks, ks = _anchored_router()
    # the engine held blocks 0..3 from before the gap (engine hashes 900..903 unknown);
    # now it stores blocks 4 and 5, continuing block 3
    ev = BlockStored((904, 905), 903, tuple(toks[16:24]), block_size=4)
    assert ap.apply(0, ev) == "anchored"
    assert r.index.match(ks) == {0: 6}
    assert r.index.resolve(0, 903) == int(ks[3])  # the parent got its engine handle
    assert r.worker_states()[0].inferred_blocks == 3  # blocks 0..2: no handle
    # a later child of block 5 resolves its parent at once
    child = BlockStored((906,), 905, (1, 2, 3, 4), block_size=4)
    assert ap.apply(0, child) == "ok"


def test_inferred_blocks_go_only_once_nothing_held_continues_them() -> None:
    r, ap, toks, ks = _anchored_router()
    ap.apply(0, BlockStored((904, 905), 903, tuple(toks[16:24]), block_size=4))
    # An eviction the index cannot resolve, while block 3 (the anchor, handled) is
    # held: engines evict leaves first, so blocks 0..2 are still there.
    assert ap.apply(0, BlockRemoved((801,))) == "unknown_block"
    assert r.index.match(ks) == {0: 6} and r.worker_states()[0].inferred_blocks == 3
    # The anchor and its continuation go (resolved); the next unresolved evictions
    # may now be the inferred blocks: one each, the prompt's tail first.
    ap.apply_batch(0, EventBatch(0.0, (BlockRemoved((905,)), BlockRemoved((904,)),
                                       BlockRemoved((903,)))))  # fmt: skip
    assert r.index.match(ks) == {0: 3}
    assert ap.apply(0, BlockRemoved((802,))) == "unknown_block"
    assert r.index.match(ks) == {0: 2} and r.worker_states()[0].inferred_blocks == 2
    ap.apply_batch(0, EventBatch(0.0, (BlockRemoved((803,)), BlockRemoved((804,)))))
    assert r.index.match(ks) == {} and r.worker_states()[0].inferred_blocks == 0
    r._check()


def test_a_stored_copy_replaces_an_inferred_one() -> None:
    r, ap, toks, ks = _anchored_router()
    ap.apply(0, BlockStored((904, 905), 903, tuple(toks[16:24]), block_size=4))
    # the engine stores block 0 again (it had evicted it unseen): one copy, with a handle
    ap.apply(0, BlockStored((900,), None, tuple(toks[:4]), block_size=4))
    assert r.worker_states()[0].inferred_blocks == 2
    assert ap.apply(0, BlockRemoved((900,))) == "ok"
    assert r.index.match(ks) == {}


def test_a_trusted_worker_is_not_anchored() -> None:
    r = Router(block_size=4, workers=[0])
    ap = EventApplier(r)
    toks = list(range(100, 124))
    r.route(Request("p", tokens=toks))
    ev = BlockStored((904,), 903, tuple(toks[16:20]), block_size=4)
    assert ap.apply(0, ev) == "unknown_block"


def test_events_for_a_worker_the_router_does_not_know_are_counted_ignored() -> None:
    r = Router(block_size=4, workers=[0])
    ap = EventApplier(r)
    stored = BlockStored((1,), None, (1, 2, 3, 4), block_size=4)
    batch = EventBatch(0.0, (stored, BlockRemoved((1,))))
    assert ap.apply_batch(5, batch) == {"ignored": 2}
    assert r.index.workers() == [] and r.stats()["refused_events"] == 0


def test_a_block_size_mismatch_degrades_once(caplog: pytest.LogCaptureFixture) -> None:
    r = Router(block_size=4, workers=[0])
    ap = EventApplier(r)
    with caplog.at_level(logging.INFO, "kvroute.router"):
        for i in range(3):
            assert ap.apply(0, BlockStored((i,), None, tuple(range(8)), block_size=8)) == "mismatch"
    assert r.worker_states()[0].cause == "mismatch" and r.stats()["degradations"] == 1
    assert sum("not trusted" in rec.getMessage() for rec in caplog.records) == 1


def test_an_unrecoverable_gap_clears_and_degrades_the_worker() -> None:
    # what TensorRT-LLM's transports call on an event_id gap (no replay there)
    r = Router(block_size=4, workers=[0, 1])
    ap = EventApplier(r)
    r.apply_stored(0, keys(1, 3))
    r.apply_stored(1, keys(1, 3))
    ap.unrecoverable_gap(0, "event ids 7..9")
    assert r.index.match(keys(1, 3)) == {1: 3}
    st = r.worker_states()[0]
    assert st.state == "degraded" and st.cause == "events_lost" and "7..9" in (st.reason or "")
    assert ap.counts[0]["replay_failed"] == 1
    assert r.worker_states()[1].state == "ok"
