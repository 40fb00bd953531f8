"""Router: API, load accounting, lifecycle, membership, pins, admission, warm-up, bad input.

Every test runs twice (ids c / py): on the compiled cores and on their
pure-Python twins (conftest's ``twin`` fixture), so the router's behaviour is
pinned on both.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from helpers import Clock, H, Twin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.policies import Candidates, Choice, Features
from kvroute.request import CacheControl, Request, cache_segments
from kvroute.router import WARMUP_PLAN_TTL, BusyThreshold, NoWorkerAvailable, Router


def fake_hash(
    tokens: Sequence[int],
    block_size: int,
    *,
    lora_name: str | None = None,
    cache_namespace: str | None = None,
    parent: int | None = None,
) -> npt.NDArray[np.uint64]:
    """Stand-in for kvroute.hashing: a chained key per full block (not Dynamo's values)."""
    out = []
    h = 0 if parent is None else parent
    salt = hash((lora_name, cache_namespace)) & 0xFFFF
    for i in range(len(tokens) // block_size):
        h = (h * 1000003 + hash(tuple(tokens[i * block_size : (i + 1) * block_size])) + salt) & (
            (1 << 63) - 1
        )
        out.append(h)
    return np.array(out, np.uint64)


pytestmark = pytest.mark.usefixtures("twin")


def make(**kw: Any) -> Router:
    kw.setdefault("block_size", 4)
    kw.setdefault("clock", Clock())
    kw.setdefault("hashing", fake_hash)
    return Router(**kw)


# -- API and decisions ----------------------------------------------------------------


def test_the_router_runs_on_the_twin_under_test(twin: Twin) -> None:
    # what the router builds itself must come from the implementation under test
    suffix = "_py" if twin.name == "py" else ""
    r = make(workers=[0])
    assert type(r.index).__module__ == f"kvroute._index{suffix}"
    assert type(r._load.active_blocks).__module__ == f"kvroute._route{suffix}"
    approx = make(workers=[0], kv_events=False)
    assert approx._predicted is not None
    assert type(approx._predicted._index).__module__ == f"kvroute._index{suffix}"
    # the compiled route step and its records (a policy binds the step as a method)
    assert r.policy.route_step.__module__ == f"kvroute._route{suffix}"  # type: ignore[attr-defined]
    assert type(r._load.arrays).__module__ == f"kvroute._route{suffix}"
    assert type(r._fresh).__module__ == f"kvroute._route{suffix}"


def test_route_picks_the_worker_holding_the_prefix_and_reports_the_alternative() -> None:
    r = make(workers=[0, 1, 2], policy_params={"seed": 0})
    r.apply_stored(1, H(1, 2, 3, 4))
    r.apply_stored(2, H(1, 2))
    d = r.route(Request("a", block_hashes=H(1, 2, 3, 9)))
    assert d.worker == 1
    assert d.policy == "kvroute"
    assert d.matched_blocks == 3
    assert (d.alt_worker, d.alt_matched_blocks) == (2, 2)
    assert d.predicted_cached_tokens == 12
    assert d.prompt_tokens == 16
    rows = d.breakdown()
    assert [row["worker"] for row in rows] == [0, 1, 2]
    assert [row["matched_blocks"] for row in rows] == [0, 3, 2]
    assert rows[1]["uncached_tokens"] == 4.0
    text = d.explain()
    assert "-> worker 1" in text and "uncached_tokens" in text
    assert "Decision(request_id='a', worker=1" in repr(d)


def test_route_hashes_tokens_with_salt_and_lora() -> None:
    r = make(workers=[0, 1], policy="cache_aware")
    toks = list(range(16))
    r.apply_stored(1, fake_hash(toks, 4, cache_namespace="s"))
    assert r.route(Request("a", tokens=toks, cache_salt="s")).worker == 1
    # without the salt the chain differs: no match, least loaded (worker 0)
    d = r.route(Request("b", tokens=toks))
    assert d.matched_blocks == 0


def test_cached_tokens_never_exceed_the_prompt() -> None:
    r = make(workers=[0])
    r.apply_stored(0, H(1, 2))
    d = r.route(Request("a", block_hashes=H(1, 2), prompt_tokens=6))
    assert d.predicted_cached_tokens == 6


def test_policy_instance_and_name_and_unknown() -> None:
    from kvroute.policies import RoundRobin

    r = make(workers=[0, 1], policy=RoundRobin())
    assert [r.route(Request(i, block_hashes=H(i))).worker for i in range(3)] == [0, 1, 0]
    with pytest.raises(KeyError, match="unknown routing policy"):
        make(policy="nope")
    with pytest.raises(ValueError, match="policy_params apply only"):
        make(policy=RoundRobin(), policy_params={"start": 1})
    with pytest.raises(TypeError, match="policy must be"):
        make(policy=3)


def test_default_policy_is_kvroute() -> None:
    assert make().policy.name == "kvroute"


def test_missing_hashing_module_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def fake(name: str, *a: Any) -> Any:
        if name == "kvroute.hashing":
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", fake)
    r = Router(block_size=4, workers=[0], clock=Clock())
    with pytest.raises(RuntimeError, match="pass hashing= to Router"):
        r.route(Request("a", tokens=[1, 2, 3, 4]))
    assert r.route(Request("b", block_hashes=H(1))).worker == 0


# -- load tracking and lifecycle --------------------------------------------------------


def test_lifecycle_load_accounting_returns_to_zero() -> None:
    r = make(workers=[0, 1], policy="round_robin")
    r.apply_stored(0, H(1, 2))
    d = r.route(Request("a", block_hashes=H(1, 2, 3, 4), expected_output_tokens=9))
    assert d.worker == 0
    assert r.load(0) == {
        "prefill_tokens": 8.0,  # 16 prompt tokens - 2 cached blocks of 4
        # Dynamo's active blocks: all 4 prompt blocks (cached or not) + ceil(9 / 4) output
        "decode_blocks": 4.0 + 3.0,
        "active_requests": 1,
        "waiting_requests": 0.0,
        "kv_usage": 0.0,
        "healthy": True,
    }
    d2 = r.route(Request("b", block_hashes=H(1, 2, 7)))
    d3 = r.route(Request("c", block_hashes=H(1, 2, 8)))
    assert (d2.worker, d3.worker) == (1, 0)
    # c shares blocks 1, 2 with a, in flight on worker 0: only block 8 is new there
    assert r.load(0)["decode_blocks"] == 7 + 1
    assert r.load(1)["decode_blocks"] == 3
    assert r.load(0)["prefill_tokens"] == 8 + 4
    assert r.first_token("a")
    assert r.load(0)["prefill_tokens"] == 4
    assert r.first_token("a")  # twice is harmless
    assert r.finished("a")
    assert r.load(0)["decode_blocks"] == 3  # c's blocks 1, 2, 8 stay active
    assert r.failed("c") and r.finished("b")
    for w in (0, 1):
        load = r.load(w)
        assert (load["prefill_tokens"], load["decode_blocks"], load["active_requests"]) == (
            0,
            0,
            0,
        )
    r._check()


def test_unknown_request_ids_are_counted_and_ignored() -> None:
    r = make(workers=[0])
    assert not r.first_token("x")
    assert not r.finished("x")
    assert not r.failed(17)
    assert r.stats()["unknown_request_ids"] == 3


def test_duplicate_request_id_in_flight_is_rejected() -> None:
    r = make(workers=[0])
    r.route(Request("a", block_hashes=H(1)))
    with pytest.raises(ValueError, match="'a' is already in flight"):
        r.route(Request("a", block_hashes=H(1)))
    r.finished("a")
    r.route(Request("a", block_hashes=H(1)))


def test_stale_sweep_drops_lost_requests_with_injected_clock() -> None:
    clock = Clock()
    r = make(workers=[0, 1], clock=clock, request_timeout=60.0, sweep_interval=1.0)
    r.route(Request("lost", block_hashes=H(1, 2)))
    clock.t = 30.0
    r.route(Request("alive", block_hashes=H(3, 4)))
    clock.t = 59.0
    r.first_token("alive")  # refreshes its last-seen time
    clock.t = 60.5
    r.route(Request("c", block_hashes=H(5)))  # the sweep runs inside route()
    assert r.stats()["stale_requests"] == 1
    assert not r.finished("lost")
    clock.t = 119.5
    assert r.sweep() == 1  # "alive" last seen at 59, "c" at 60.5
    assert sum(r.load(w)["active_requests"] for w in (0, 1)) == 1
    assert r.finished("c")
    r._check()


# -- membership and health -----------------------------------------------------------


def test_unhealthy_and_removed_workers_are_never_chosen() -> None:
    r = make(workers=[0, 1, 2], policy="cache_aware")
    r.apply_stored(1, H(1, 2, 3))
    assert r.mark_unhealthy(1)
    for i in range(30):
        assert r.route(Request(i, block_hashes=H(1, 2, 3))).worker != 1
    assert r.load(1)["healthy"] is False
    assert r.index.match(H(1, 2, 3)) == {1: 3}  # kept in the index
    assert r.mark_healthy(1)
    assert r.route(Request("back", block_hashes=H(1, 2, 3))).worker == 1
    assert r.remove_worker(1)
    assert r.index.match(H(1, 2, 3)) == {}  # its blocks are dropped
    assert 1 not in r.workers()
    for i in range(30, 60):
        assert r.route(Request(i, block_hashes=H(1, 2, 3))).worker in (0, 2)
    assert not r.remove_worker(1)
    assert not r.mark_unhealthy(99)
    assert r.stats()["unknown_workers"] == 2
    assert r.stats()["dropped_with_worker"] == 1
    r._check()


def test_worker_removal_keeps_other_workers_state_consistent() -> None:
    r = make(workers=[5, 6, 7], policy="round_robin")
    ds = [r.route(Request(i, block_hashes=H(i, 100 + i))) for i in range(6)]
    r.remove_worker(5)  # position 0: worker 7 moves into its slot
    r._check()
    for d in ds:
        if d.worker != 5:
            assert r.finished(d.request_id)
    assert all(r.load(w)["active_requests"] == 0 for w in (6, 7))
    r.add_worker(8)
    assert sorted({r.route(Request(f"n{i}", block_hashes=H(i))).worker for i in range(6)}) == [
        6,
        7,
        8,
    ]
    r._check()


def test_no_worker_raises_clear_exception() -> None:
    r = make()
    with pytest.raises(NoWorkerAvailable, match="no worker has been added"):
        r.route(Request("a", block_hashes=H(1)))
    r.add_worker(0)
    r.mark_unhealthy(0)
    with pytest.raises(NoWorkerAvailable, match="no healthy worker among 1"):
        r.route(Request("a", block_hashes=H(1)))
    r.remove_worker(0)
    with pytest.raises(NoWorkerAvailable):
        r.route(Request("a", block_hashes=H(1)))


def test_blocks_of_workers_unknown_to_the_router_are_ignored() -> None:
    r = make(workers=[0, 1], policy="cache_aware")
    r.index.store(42, H(1, 2, 3))
    d = r.route(Request("a", block_hashes=H(1, 2, 3)))
    assert d.worker in (0, 1) and d.matched_blocks == 0


def test_worker_metrics_feed_the_policy_and_are_validated() -> None:
    r = make(workers=[0, 1], policy="least_loaded")
    assert r.update_worker_metrics(0, waiting_requests=5, kv_usage=0.5)
    assert r.route(Request("a", block_hashes=H(1))).worker == 1
    assert r.load(0)["waiting_requests"] == 5.0
    assert not r.update_worker_metrics(9, waiting_requests=1)
    with pytest.raises(ValueError, match=r"kv_usage must be in \[0, 1\]"):
        r.update_worker_metrics(0, kv_usage=1.5)
    with pytest.raises(ValueError, match="waiting_requests must be a finite number"):
        r.update_worker_metrics(0, waiting_requests=float("nan"))
    with pytest.raises(TypeError, match="kv_usage must be a number"):
        r.update_worker_metrics(0, kv_usage="high")  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        r.update_worker_metrics(-1, kv_usage=0.1)


def test_a_broken_policy_fails_loudly_not_silently() -> None:
    class Bad:
        name = "bad"
        uses_tiers = False

        def choose(self, candidates: Candidates, features: Features) -> Choice:
            return Choice(len(candidates), {})

    r = make(workers=[0], policy=Bad())
    with pytest.raises(RuntimeError, match="chose position 1 of 1"):
        r.route(Request("a", block_hashes=H(1)))
    # nothing was recorded for the failed decision
    assert r.load(0)["active_requests"] == 0


# -- anti-herding --------------------------------------------------------------------------


def shared_prompt_burst(r: Router, n: int = 128) -> collections.Counter[int]:
    system = list(range(1, 65))  # 64 shared blocks
    r.apply_stored(0, H(*system))
    picks: collections.Counter[int] = collections.Counter()
    for i in range(n):
        d = r.route(Request(i, block_hashes=H(*system, 10_000 + 2 * i, 10_001 + 2 * i)))
        picks[d.worker] += 1
    return picks


def test_kvroute_does_not_herd_a_shared_system_prompt_burst() -> None:
    picks = shared_prompt_burst(make(workers=[0, 1, 2, 3], policy_params={"seed": 0}))
    assert set(picks) == {0, 1, 2, 3}
    assert max(picks.values()) <= 42  # (1 + 0.25) x 128 / 4 + 2
    assert picks[0] >= 32  # the warm worker still gets at least its share


def test_kv_cost_herds_the_same_burst_that_kvroute_spreads() -> None:
    # Dynamo's cost: the 64-block credit outweighs the warm worker's growing queue
    picks = shared_prompt_burst(
        make(workers=[0, 1, 2, 3], policy="kv_cost", predict_on_route=False)
    )
    assert picks[0] > 100
    spread = shared_prompt_burst(make(workers=[0, 1, 2, 3], predict_on_route=False))
    assert max(spread.values()) <= 42


def test_kvroute_does_not_herd_in_approximate_mode_either() -> None:
    r = make(workers=[0, 1, 2, 3], kv_events=False, policy_params={"seed": 0})
    system = list(range(1, 65))
    picks = collections.Counter(
        r.route(Request(i, block_hashes=H(*system, 10_000 + i))).worker for i in range(128)
    )
    assert max(picks.values()) <= 42 and len(picks) == 4


# -- predict-on-route with events --------------------------------------------------------


def test_siblings_follow_the_first_before_any_stored_event() -> None:
    clock = Clock()
    r = make(workers=[0, 1, 2, 3], clock=clock, policy="cache_aware", fresh_ttl=5.0)
    prefix = list(range(1, 41))
    first = r.route(Request("p0", block_hashes=H(*prefix, 900)))
    # no event arrived yet; the siblings land on the same worker
    for i in range(1, 4):
        d = r.route(Request(f"p{i}", block_hashes=H(*prefix, 900 + i)))
        assert d.worker == first.worker
        assert d.matched_blocks == 40
    clock.t = 5.0  # the side record expired; no event ever came
    d = r.route(Request("late", block_hashes=H(*prefix, 999)))
    assert d.matched_blocks == 0


def test_predict_on_route_can_be_disabled() -> None:
    r = make(workers=[0, 1], policy="cache_aware", predict_on_route=False)
    r.route(Request("a", block_hashes=H(1, 2, 3)))
    assert r.route(Request("b", block_hashes=H(1, 2, 3))).matched_blocks == 0


def test_failed_request_forgets_its_predicted_blocks() -> None:
    r = make(workers=[0, 1], policy="cache_aware")
    r.route(Request("a", block_hashes=H(1, 2, 3)))
    r.failed("a")
    assert r.route(Request("b", block_hashes=H(1, 2, 3))).matched_blocks == 0


# -- agent hints ------------------------------------------------------------------------


def test_cache_control_pins_the_session_until_ttl() -> None:
    clock = Clock()
    r = make(workers=[0, 1, 2], clock=clock, policy="round_robin")
    cc = {"type": "ephemeral", "ttl": "5m"}
    d0 = r.route(Request("t0", block_hashes=H(1), session_id="s", cache_control=cc))
    assert d0.worker == 0
    for i in range(1, 4):
        d = r.route(Request(f"t{i}", block_hashes=H(1, i), session_id="s"))
        assert d.worker == 0 and d.policy == "pin"
        r.finished(d.request_id)
    # other sessions still follow the policy
    assert r.route(Request("o", block_hashes=H(7), session_id="other")).policy == "round_robin"
    clock.t = 299.0
    assert r.route(Request("t9", block_hashes=H(1), session_id="s")).policy == "pin"
    clock.t = 300.0
    assert r.route(Request("t10", block_hashes=H(1), session_id="s")).policy == "round_robin"
    assert r.stats()["pinned_routes"] == 4


def test_pin_is_ignored_while_the_worker_is_unhealthy_or_overloaded() -> None:
    r = make(workers=[0, 1, 2, 3], policy="least_loaded")
    r.route(Request("t0", block_hashes=H(1), session_id="s", cache_control={"type": "ephemeral"}))
    r.mark_unhealthy(0)
    assert r.route(Request("t1", block_hashes=H(1), session_id="s")).worker != 0
    r.mark_healthy(0)
    assert r.route(Request("t2", block_hashes=H(1), session_id="s")).worker == 0
    # worker 0 has 2 of 2 in flight (+1 -> 3) > 1.25 x 3 / 4 + 2 = 2.94: overloaded
    r.finished("t1")
    d = r.route(Request("t3", block_hashes=H(1), session_id="s"))
    assert d.worker != 0 and d.policy == "least_loaded"
    # 2 of 3 (+1 -> 3) <= 1.25 x 4 / 4 + 2 = 3.25: pinned again
    assert r.route(Request("t4", block_hashes=H(1), session_id="s")).policy == "pin"
    # a busy threshold excludes it too
    rb = make(workers=[0, 1], policy="least_loaded", busy_threshold=BusyThreshold(max_kv_usage=0.9))
    rb.route(Request("a", block_hashes=H(1), session_id="s", cache_control={"type": "ephemeral"}))
    rb.finished("a")
    rb.update_worker_metrics(0, kv_usage=0.95)
    assert rb.route(Request("b", block_hashes=H(1), session_id="s")).policy == "least_loaded"


def test_pin_to_a_removed_worker_is_dropped() -> None:
    r = make(workers=[0, 1], policy="round_robin")
    r.route(Request("a", block_hashes=H(1), session_id="s", cache_control={"type": "ephemeral"}))
    r.remove_worker(0)
    assert r.route(Request("b", block_hashes=H(1), session_id="s")).worker == 1


def test_expected_output_tokens_feed_decode_load() -> None:
    r = make(workers=[0, 1], policy="kv_cost", policy_params={"seed": 0})
    r.route(Request("long", block_hashes=H(1), expected_output_tokens=400))
    assert r.load(0)["decode_blocks"] + r.load(1)["decode_blocks"] == 1 + 100
    busy = 0 if r.load(0)["decode_blocks"] else 1
    assert r.route(Request("next", block_hashes=H(2))).worker == 1 - busy


def test_admission_queue_orders_by_priority_then_fcfs() -> None:
    r = make(workers=[0], policy="round_robin", busy_threshold=BusyThreshold(max_active_requests=1))
    assert r.submit(Request("run", block_hashes=H(1))) is not None
    for rid, prio in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", -1)]:
        assert r.submit(Request(rid, block_hashes=H(2), priority=prio)) is None
    assert r.stats()["queued"] == 5
    assert r.pop_ready() == []  # still busy
    order = []
    r.finished("run")
    while True:
        ready = r.pop_ready()
        if not ready:
            break
        assert len(ready) == 1
        order.append(ready[0].request_id)
        r.finished(ready[0].request_id)
    assert order == ["e", "b", "d", "a", "c"]


def test_admission_queue_shortest_job_first_and_cancel() -> None:
    r = make(
        workers=[0],
        policy="round_robin",
        admission="sjf",
        busy_threshold=BusyThreshold(max_prefill_tokens=1),
    )
    r.submit(Request("run", block_hashes=H(1)))
    r.submit(Request("big", block_hashes=H(*range(10, 20))))
    r.submit(Request("small", block_hashes=H(30)))
    r.submit(Request("mid", block_hashes=H(40, 41), expected_output_tokens=1))
    r.submit(Request("gone", block_hashes=H(50)))
    assert r.cancel("gone") and not r.cancel("gone")
    with pytest.raises(ValueError, match="already queued or in flight"):
        r.submit(Request("big", block_hashes=H(1)))
    order = []
    r.first_token("run")
    while ready := r.pop_ready():
        order.append(ready[0].request_id)
        r.first_token(ready[0].request_id)
    assert order == ["small", "mid", "big"]


def test_submit_without_threshold_routes_immediately() -> None:
    r = make(workers=[0])
    assert r.submit(Request("a", block_hashes=H(1))) is not None


def test_warmup_plan_after_a_speculative_response() -> None:
    r = make(workers=[0, 1], policy="round_robin")
    toks = list(range(12))
    d = r.route(Request("t1", tokens=toks, session_id="agent", speculative_prefill=True))
    assert r.warmup_plan("agent") is None  # not finished yet
    r.finished("t1", output_tokens=np.array([77, 78]))
    plan = r.warmup_plan("agent")
    assert plan is not None
    assert plan.worker == d.worker
    assert plan.tokens == (*toks, 77, 78)
    assert plan.block_hashes.tolist() == fake_hash(toks, 4).tolist()
    assert r.warmup_plan("agent") is None  # consumed
    # no plan for a worker that went away
    r.route(Request("t2", tokens=toks, session_id="agent", speculative_prefill=True))
    r.finished("t2")
    r.remove_worker(r.workers()[0])
    r.remove_worker(r.workers()[0])
    assert r.warmup_plan("agent") is None
    with pytest.raises(TypeError, match="output_tokens must be a sequence"):
        r.finished("x", output_tokens="abc")  # type: ignore[arg-type]


def test_warmup_plans_skip_unhealthy_workers_and_expire() -> None:
    clock = Clock()
    r = make(workers=[0], clock=clock)

    def plan_for(session: str) -> None:
        r.route(Request(session, tokens=[1, 2, 3, 4], session_id=session, speculative_prefill=True))
        r.finished(session)

    plan_for("a")
    r.mark_unhealthy(0)
    assert r.warmup_plan("a") is None  # nowhere to warm: dropped
    r.mark_healthy(0)
    plan_for("b")
    plan_for("c")
    assert r.stats()["warmup_plans"] == 2
    clock.t += WARMUP_PLAN_TTL + 1  # nobody took them: the next sweep drops them
    assert r.warmup_plan("b") is None
    r.sweep()
    assert r.stats()["warmup_plans"] == 0


# -- malformed hints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        ({"cache_control": "5m"}, TypeError, "cache_control must be a mapping"),
        ({"cache_control": {"type": "persistent"}}, ValueError, "type must be 'ephemeral'"),
        (
            {"cache_control": {"type": "ephemeral", "ttl": "2h"}},
            ValueError,
            "ttl must be '5m' or '1h'",
        ),
        ({"cache_control": {"type": "ephemeral", "x": 1}}, ValueError, "unknown keys"),
        ({"cache_control": [{"type": "ephemeral", "ttl": "2h"}]}, ValueError, "'5m' or '1h'"),
        ({"cache_control": [5]}, TypeError, "cache_control must be a mapping"),
        ({"cache_control": {1, 2}}, TypeError, "or a sequence of them, not set"),
        ({"priority": "high"}, TypeError, "priority must be an integer"),
        ({"priority": True}, TypeError, "priority must be an integer, not bool"),
        ({"expected_output_tokens": -1}, ValueError, "expected_output_tokens must be >= 0"),
        ({"expected_output_tokens": 2.5}, TypeError, "expected_output_tokens must be an integer"),
        ({"speculative_prefill": 1}, TypeError, "speculative_prefill must be a bool"),
        ({"speculative_prefill": True}, ValueError, "speculative_prefill needs a session_id"),
        ({"session_id": 5}, TypeError, "session_id must be a str"),
        ({"lora_name": b"x"}, TypeError, "lora_name must be a str"),
        ({"tokens": None}, ValueError, "needs tokens or block_hashes"),
        ({"tokens": "hello"}, TypeError, "tokens must be a sequence of ints"),
        ({"tokens": None, "block_hashes": [-1]}, OverflowError, "block_hashes item"),
        ({"tokens": None, "block_hashes": [1.5]}, TypeError, "block_hashes item"),
    ],
)
def test_malformed_hints_raise_clear_errors(
    kwargs: dict[str, Any], exc: type[Exception], msg: str
) -> None:
    base: dict[str, Any] = {"tokens": [1, 2, 3]}
    base.update(kwargs)
    with pytest.raises(exc, match=msg):
        Request("r", **base)


def test_request_id_type_and_route_argument_are_checked() -> None:
    with pytest.raises(TypeError, match="request_id must be a str or int"):
        Request(1.5, tokens=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="route\\(\\) takes a Request"):
        make(workers=[0]).route({"tokens": [1]})  # type: ignore[arg-type]


def test_cache_control_parsing() -> None:
    assert CacheControl.parse({"type": "ephemeral", "ttl": "1h"}).ttl == 3600.0
    assert Request("r", tokens=[1], cache_control=CacheControl(10.0)).cache_control == (
        CacheControl(10.0),
    )
    # Several breakpoints, as mappings or parsed; their order is kept.
    bps = [{"type": "ephemeral", "ttl": "1h"}, CacheControl(300.0, prefix_tokens=64)]
    r = Request("r", tokens=[1], cache_control=bps)
    assert r.cache_control == (CacheControl(3600.0), CacheControl(300.0, 64))
    assert r.cache_ttl() == 3600.0
    assert Request("r", tokens=[1], cache_control=[]).cache_control is None
    # A proxy passes clients' extra keys over, as the engines do; the API refuses them.
    assert CacheControl.parse({"type": "ephemeral", "scope": "x"}, strict=False) == (
        CacheControl(300.0)
    )
    with pytest.raises(ValueError, match="unknown keys"):
        CacheControl.parse({"type": "ephemeral", "scope": "x"})


@pytest.mark.parametrize(
    ("args", "exc", "msg"),
    [
        ((0.0,), ValueError, "ttl must be > 0"),
        (("5m",), TypeError, "ttl must be a number"),
        ((300.0, -1), ValueError, "prefix_tokens must be >= 0"),
        ((300.0, 1.5), TypeError, "prefix_tokens must be an integer"),
    ],
)
def test_malformed_cache_breakpoints_raise(args: tuple[Any, ...], exc: type, msg: str) -> None:
    with pytest.raises(exc, match=msg):
        CacheControl(*args)


def test_cache_segments_keep_what_each_ttl_adds() -> None:
    seg = cache_segments
    assert seg([], 8, 16) == []
    assert seg([CacheControl(300.0)], 8, 16) == [(8, 300.0)]
    # a partial block is not cached; a prefix past the prompt is the prompt
    assert seg([CacheControl(300.0, 47)], 8, 16) == [(2, 300.0)]
    assert seg([CacheControl(300.0, 10_000)], 8, 16) == [(8, 300.0)]
    assert seg([CacheControl(300.0, 15)], 8, 16) == []
    # a shorter prefix with a TTL no longer than a longer prefix's adds nothing
    two = [CacheControl(300.0, 32), CacheControl(3600.0, 64), CacheControl(300.0)]
    assert seg(two, 8, 16) == [(8, 300.0), (4, 3600.0)]
    assert seg([CacheControl(3600.0), CacheControl(300.0, 32)], 8, 16) == [(8, 3600.0)]


def test_bad_router_parameters() -> None:
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        make(block_size=0)
    with pytest.raises(ValueError, match="admission must be"):
        make(admission="lifo")
    with pytest.raises(ValueError, match="fresh_ttl must be > 0"):
        make(fresh_ttl=0)
    with pytest.raises(TypeError, match="busy_threshold must be a BusyThreshold"):
        make(busy_threshold={"max_active_requests": 3})


def test_journal_records_state_changes_in_order() -> None:
    r = make(workers=[0], journal=True)
    r.apply_stored(0, H(1))
    r.route(Request("a", block_hashes=H(1)))
    r.finished("a")
    ops = [(seq, op) for seq, op, _, _ in r.journal()]
    assert ops == [(1, "add_worker"), (2, "apply_stored"), (3, "route"), (4, "finished")]
    assert make(workers=[0]).journal() == []


# -- the real hasher, random lifecycles, doctests -------------------------------------------


def test_default_hashing_is_kvroute_block_hashes_with_salt_and_lora() -> None:
    from kvroute.hashing import kvroute_block_hashes

    r = Router(block_size=4, workers=[0, 1], policy="cache_aware")
    toks = list(range(20))
    r.apply_stored(1, kvroute_block_hashes(toks, 4, lora_name="a", cache_namespace="t"))
    d = r.route(Request("x", tokens=toks, lora_name="a", cache_salt="t"))
    assert (d.worker, d.matched_blocks, d.prompt_tokens) == (1, 5, 20)
    assert r.route(Request("y", tokens=toks)).matched_blocks == 0


lifecycle_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("route"),
            st.integers(0, 9),
            st.lists(st.integers(1, 6), min_size=0, max_size=5),
            st.one_of(st.none(), st.integers(0, 100)),
        ),
        st.tuples(st.sampled_from(["first_token", "finished", "failed"]), st.integers(0, 9)),
        st.tuples(
            st.sampled_from(["mark_unhealthy", "mark_healthy", "remove", "add"]),
            st.integers(0, 3),
        ),
        st.tuples(st.just("tick"), st.floats(0, 400)),
        st.tuples(st.just("store"), st.integers(0, 3), st.integers(1, 6)),
    ),
    max_size=50,
)


# the twin fixture only rebinds module names, the same for every example
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lifecycle_ops, st.sampled_from(["kvroute", "kv_cost", "cache_aware", "least_loaded"]))
def test_random_lifecycles_keep_load_consistent_and_end_at_zero(
    program: list[Any], policy: str
) -> None:
    clock = Clock()
    r = make(workers=[0, 1, 2, 3], clock=clock, policy=policy, request_timeout=300.0)
    present = {0, 1, 2, 3}
    healthy = {0, 1, 2, 3}
    for op in program:
        kind = op[0]
        if kind == "route":
            _, rid, blocks, out = op
            req = Request(rid, block_hashes=H(*blocks), expected_output_tokens=out)
            try:
                d = r.route(req)
            except NoWorkerAvailable:
                assert not (present & healthy)
            except ValueError as e:
                assert "already in flight" in str(e)
            else:
                assert d.worker in present and d.worker in healthy
        elif kind in ("first_token", "finished", "failed"):
            getattr(r, kind)(op[1])
        elif kind == "mark_unhealthy":
            r.mark_unhealthy(op[1])
            healthy.discard(op[1])
        elif kind == "mark_healthy":
            r.mark_healthy(op[1])
            if op[1] in present:
                healthy.add(op[1])
        elif kind == "remove":
            r.remove_worker(op[1])
            present.discard(op[1])
            healthy.discard(op[1])
        elif kind == "add":
            if op[1] not in present:
                r.add_worker(op[1])
                present.add(op[1])
                healthy.add(op[1])
        elif kind == "tick":
            clock.t += op[1]
        else:
            r.apply_stored(op[1], H(*range(1, op[2] + 1)))
        r._check()
        for w in present:
            load = r.load(w)
            assert load["prefill_tokens"] >= 0 and load["decode_blocks"] >= 0
            assert load["active_requests"] >= 0
    for rid in range(10):
        r.finished(rid)
    for w in present:
        load = r.load(w)
        assert (load["prefill_tokens"], load["decode_blocks"], load["active_requests"]) == (0, 0, 0)


def test_host_tier_hits_are_priced_below_device_hits() -> None:
    r = make(workers=[0, 1], policy="kv_cost", policy_params={"seed": 0}, predict_on_route=False)
    r.apply_stored(0, H(1, 2, 3, 4), tier="host")  # switches the router to per-tier matching
    r.apply_stored(1, H(1, 2, 3, 4))
    d = r.route(Request("a", block_hashes=H(1, 2, 3, 4, 5)))
    # credits: worker 0 0.75 x 4 host blocks = 3.0, worker 1 4 device blocks = 4.0
    assert d.worker == 1
    rows = {row["worker"]: row for row in d.breakdown()}
    assert rows[0]["prefill_blocks"] == pytest.approx(5 - 3.0)
    assert rows[1]["prefill_blocks"] == pytest.approx(5 - 4.0)
    r.finished("a")
    r.apply_cleared(1)
    r.apply_stored(1, H(1, 2))
    d = r.route(Request("b", block_hashes=H(1, 2, 3, 4, 5)))
    # a host hit still beats a shorter device hit: 3.0 blocks of credit against 2
    assert d.worker == 0
    rows = {row["worker"]: row for row in d.breakdown()}
    assert (rows[0]["matched_blocks"], rows[1]["matched_blocks"]) == (4, 2)
    # predicted_cached_tokens counts every matched block, whatever its tier
    assert d.predicted_cached_tokens == 16


def test_router_uses_the_index_it_is_given(twin: Twin) -> None:
    idx = twin.BlockIndex()
    idx.store(1, H(9, 8))
    r = make(workers=[0, 1], index=idx, policy="cache_aware")
    assert r.index is idx
    assert r.route(Request("a", block_hashes=H(9, 8))).worker == 1


def test_exclude_keeps_one_request_off_some_workers_without_touching_their_health() -> None:
    def fleet() -> Router:
        r = make(workers=[0, 1, 2], journal=True, policy_params={"seed": 0})
        r.apply_stored(1, H(1, 2, 3, 4))
        return r

    r = fleet()
    got = [r.route(Request("a", block_hashes=H(1, 2, 3, 4, 5)), exclude=[1])]
    assert got[0].worker != 1 and got[0].matched_blocks == 0  # the warm worker was off limits
    assert r.load(1)["healthy"]
    got.append(r.route(Request("b", block_hashes=H(1, 2, 3, 4, 5))))
    assert got[-1].worker == 1  # the exclusion was for "a" only
    # A pinned session does not override the exclusion either.
    pin = {"type": "ephemeral"}
    got.append(r.route(Request("c", block_hashes=H(1, 2, 3, 4), session_id="s", cache_control=pin)))
    pinned = got[-1].worker
    got.append(r.route(Request("d", block_hashes=H(1, 2), session_id="s")))
    assert (got[-1].worker, got[-1].policy) == (pinned, "pin")
    got.append(r.route(Request("d2", block_hashes=H(1, 2), session_id="s"), exclude=[pinned]))
    assert got[-1].worker != pinned
    got.append(r.route(Request("e", block_hashes=H(9)), exclude=[77]))  # an unknown id: ignored
    with pytest.raises(NoWorkerAvailable, match="outside the excluded"):
        r.route(Request("f", block_hashes=H(9)), exclude=[0, 1, 2])
    for ids in (np.array([0, 1, 2], np.uint64), iter([0, 1, 2]), {0, 1, 2}):  # any iterable
        with pytest.raises(NoWorkerAvailable, match="outside the excluded"):
            r.route(Request("f", block_hashes=H(9)), exclude=ids)
    with pytest.raises(OverflowError):
        r.route(Request("g", block_hashes=H(9)), exclude=[-1])
    # The journal records the exclusions, so replaying it repeats every decision.
    replay = fleet()
    routed = [
        getattr(replay, op)(*args, **kwargs)
        for _, op, args, kwargs in r.journal()[2:]
        if op == "route"
    ]
    assert [d.worker for d in routed] == [d.worker for d in got]
