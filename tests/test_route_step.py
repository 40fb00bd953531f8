"""The router's fused step (``kvroute_step``) and the kernels it reads, on both twins.

* ``kvroute_step`` must reach the decision ``KvRoute.choose`` reaches on the
  router's candidate snapshot, bit for bit, and leave the router's state as
  ``LoadTracker.start`` and ``FreshDecisions.record`` did: checked through
  whole routers (the fused path against a router whose policy has no fused
  path) over random operation lists, in every mode the step serves
  (events, tiers, no events, busy thresholds), on both twins of the kernels.
* The compiled step and its twin agree on random states, outputs and state
  changes alike; so do the two ``FreshDecisions`` and the two ``LoadArrays``.
* ``match_tiers_array`` and ``PredictedResidency.match_array`` lay out the
  dict results they replace.
"""

from __future__ import annotations

import inspect
import math
import random
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from helpers import NO_EXTENSIONS, Clock, twin_ids, twins
from hypothesis import given, settings
from hypothesis import strategies as st

import kvroute._route_py as py_twin
import kvroute.approx
import kvroute.load
import kvroute.policies.builtin
import kvroute.router
from kvroute._index_py import BlockIndex as PyIndex
from kvroute.approx import PredictedResidency
from kvroute.hashing import kvroute_block_hashes
from kvroute.policies import Candidates, Choice, Features, KvRoute
from kvroute.request import Request
from kvroute.router import BusyThreshold, Router

ROUTE_TWINS = twins("_route")
INDEX_TWINS = twins("_index")


@pytest.fixture(params=ROUTE_TWINS, ids=twin_ids(ROUTE_TWINS))
def route_module(request: pytest.FixtureRequest) -> ModuleType:
    return request.param  # type: ignore[no-any-return]


def chain(tokens: list[int]) -> np.ndarray:
    return kvroute_block_hashes(tokens, 1)


def H(*xs: int) -> np.ndarray:
    return np.array(xs, np.uint64)


# -- the build ----------------------------------------------------------------------


def test_the_route_step_uses_the_compiled_extension() -> None:
    if NO_EXTENSIONS:
        assert kvroute.policies.builtin.kvroute_step is py_twin.kvroute_step
        assert kvroute.approx.FreshDecisions is py_twin.FreshDecisions
        assert kvroute.load.LoadArrays is py_twin.LoadArrays
        assert kvroute.load.ActiveRequest is py_twin.ActiveRequest
        return
    import kvroute._route as route

    assert kvroute.policies.builtin.kvroute_step is route.kvroute_step
    assert kvroute.approx.FreshDecisions is route.FreshDecisions
    assert kvroute.load.LoadArrays is route.LoadArrays
    assert kvroute.load.ActiveRequest is route.ActiveRequest
    assert KvRoute(seed=0).route_step.__func__ is route.kvroute_step  # type: ignore[attr-defined]


# -- the policy's side --------------------------------------------------------------


def test_a_subclass_that_chooses_differently_loses_the_fused_path() -> None:
    class Mine(KvRoute):
        def choose(self, candidates: Candidates, features: Features) -> Choice:
            return Choice(0, {})

    class Tuned(KvRoute):
        pass

    assert Mine().route_step is None
    assert Tuned(seed=1).route_step is not None
    r = Router(block_size=1, workers=[0, 1], policy=Mine(), clock=Clock())
    r.apply_stored(1, H(1, 2))
    assert r.route(Request("a", block_hashes=H(1, 2))).worker == 0  # its choose decided


def test_the_packed_parameters_follow_every_change() -> None:
    p = KvRoute(active_request_tokens=7.0)
    assert p._packed_params == tuple(getattr(p, n) for n in KvRoute._PARAMS)
    p.uncached_weight = 3
    p.kv_high = 0.5
    assert p._packed_params == tuple(getattr(p, n) for n in KvRoute._PARAMS)
    assert p._packed_params[-1] == 3 and p._packed_params[5] == 0.5


# -- whole routers: the fused path against the generic one ------------------------------


class Generic:
    """The kvroute policy without its fused path: the router builds candidates for choose."""

    name = "kvroute"
    uses_tiers = True

    def __init__(self, **params: Any) -> None:
        self.inner = KvRoute(**params)

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        return self.inner.choose(candidates, features)


STEPS: list[int] = []


def _fused_router(mod: ModuleType, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Router:
    """A router whose state and fused step all come from ``mod`` (one twin or the other)."""
    monkeypatch.setattr(kvroute.load, "ActivePrefixes", mod.ActivePrefixes)
    monkeypatch.setattr(kvroute.load, "LoadArrays", mod.LoadArrays)
    monkeypatch.setattr(kvroute.load, "ActiveRequest", mod.ActiveRequest)
    monkeypatch.setattr(kvroute.router, "FreshDecisions", mod.FreshDecisions)
    policy = KvRoute(**kw.pop("policy_params"))

    def counted(self: KvRoute, *args: Any) -> Any:
        STEPS.append(1)
        return mod.kvroute_step(self, *args)

    monkeypatch.setattr(type(policy), "route_step", counted)
    return Router(policy=policy, **kw)


def _generic_router(mod: ModuleType, **kw: Any) -> Router:
    return Router(policy=Generic(**kw.pop("policy_params")), **kw)


def _same(a: Any, b: Any) -> None:
    assert (a.request_id, a.worker, a.matched_blocks, a.predicted_cached_tokens, a.seq) == (
        b.request_id,
        b.worker,
        b.matched_blocks,
        b.predicted_cached_tokens,
        b.seq,
    )
    assert (a.policy, a.alt_worker, a.alt_matched_blocks) == (
        b.policy,
        b.alt_worker,
        b.alt_matched_blocks,
    )
    ra, rb = a.breakdown(), b.breakdown()
    assert [list(r) for r in ra] == [list(r) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for k in x:
            assert x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])), (k, x, y)
    assert a.explain() == b.explain()


def _same_state(a: Router, b: Router) -> None:
    la, lb = a._load, b._load
    n = la.n
    assert n == lb.n and la.pos == lb.pos
    for name in ("prefill_tokens", "decode_blocks", "active", "waiting", "kv_usage"):
        assert getattr(la, name)[:n].tobytes() == getattr(lb, name)[:n].tobytes(), name
    assert set(la.requests) == set(lb.requests)
    for rid, ra in la.requests.items():
        rb = lb.requests[rid]
        assert (ra.worker, ra.prefill_tokens, ra.decode_blocks, ra.last_seen) == (
            rb.worker,
            rb.prefill_tokens,
            rb.decode_blocks,
            rb.last_seen,
        )
    for w in la.pos:
        assert la.active_blocks.worker_len(w) == lb.active_blocks.worker_len(w)
    a._check()
    b._check()
    if a._fresh is not None:
        assert b._fresh is not None
        assert len(a._fresh) == len(b._fresh)
        a._fresh._check()
    assert a.stats() == b.stats()


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("route"),
            st.lists(st.integers(0, 3), max_size=10),  # tokens (chained keys, block size 1)
            st.sampled_from([None, 1, 7]),  # expected output tokens
            st.sampled_from([None, "s1", "s2"]),  # session
            st.sampled_from([None, "5m"]),  # cache_control ttl
            st.sampled_from([(), (1,), (0, 2)]),  # exclude
        ),
        st.tuples(st.sampled_from(["first_token", "finished", "failed"]), st.integers(0, 40)),
        st.tuples(
            st.sampled_from(["stored", "removed"]),
            st.integers(0, 4),
            st.lists(st.integers(0, 3), min_size=1, max_size=8),
            st.sampled_from(["device", "device", "host", "disk"]),
        ),
        st.tuples(
            st.just("metrics"),
            st.integers(0, 3),
            st.sampled_from([0.0, 1.0, 3.0]),
            st.sampled_from([0.0, 0.5, 0.95, 1.0]),
        ),
        st.tuples(st.sampled_from(["unhealthy", "healthy", "add", "remove"]), st.integers(0, 4)),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 3.0, 200.0])),
    ),
    max_size=45,
)

MODES = [
    {"kv_events": True},
    {"kv_events": True, "predict_on_route": False},
    {"kv_events": True, "tiered": True},
    {"kv_events": False},
    {"kv_events": True, "busy_threshold": BusyThreshold(max_active_requests=2)},
]


def _drive(ops: list[tuple[Any, ...]], routers: list[Router], clock: Clock) -> None:
    started: list[str] = []
    for k, op in enumerate(ops):
        kind = op[0]
        outs: list[Any] = []
        for r in routers:
            try:
                if kind == "route":
                    _, toks, out, session, ttl, exclude = op
                    req = Request(
                        f"r{k}",
                        block_hashes=chain(toks),
                        prompt_tokens=len(toks) + 3,
                        expected_output_tokens=out,
                        session_id=session,
                        cache_control=None if ttl is None else {"type": "ephemeral", "ttl": ttl},
                    )
                    outs.append(r.route(req, exclude=exclude))
                elif kind in ("first_token", "finished", "failed"):
                    outs.append(getattr(r, kind)(started[op[1] % len(started)]) if started else 0)
                elif kind == "stored":
                    outs.append(r.apply_stored(op[1], chain(op[2]), tier=op[3]))
                elif kind == "removed":
                    outs.append(r.apply_removed(op[1], chain(op[2])[-2:], tier=op[3]))
                elif kind == "metrics":
                    outs.append(
                        r.update_worker_metrics(op[1], waiting_requests=op[2], kv_usage=op[3])
                    )
                elif kind == "unhealthy":
                    outs.append(r.mark_unhealthy(op[1]))
                elif kind == "healthy":
                    outs.append(r.mark_healthy(op[1]))
                elif kind == "add":
                    outs.append(r.add_worker(op[1], kv_capacity_blocks=6))
                elif kind == "remove":
                    outs.append(r.remove_worker(op[1]))
            except Exception as e:  # both twins must raise alike
                outs.append(("raised", type(e), str(e)))
        if kind == "tick":
            clock.t += op[1]
            continue
        a, b = outs
        if kind == "route" and not isinstance(a, tuple):
            _same(a, b)
            started.append(a.request_id)
        else:
            assert a == b, (op, a, b)
        _same_state(*routers)


@pytest.mark.parametrize("route_module", ROUTE_TWINS, ids=twin_ids(ROUTE_TWINS))
@pytest.mark.parametrize("mode", MODES, ids=["events", "no-fresh", "tiered", "event-free", "busy"])
@given(ops=OPS, seed=st.integers(0, 3), tie=st.sampled_from(["random", "rendezvous"]))
@settings(deadline=None)
def test_the_fused_step_decides_and_counts_as_the_generic_path(
    route_module: ModuleType, mode: dict[str, Any], ops: list[tuple[Any, ...]], seed: int, tie: str
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        routers = []
        clock = Clock()
        for fused in (True, False):
            kw: dict[str, Any] = {
                "block_size": 4,
                "workers": [0, 1, 2],
                "clock": clock,
                "index_factory": PyIndex,
                "policy_params": {"seed": seed, "balance_abs_slack": 0.5, "tie_break": tie},
                "fresh_ttl": 2.0,
                **mode,
            }
            routers.append(
                _fused_router(route_module, mp, **kw)
                if fused
                else _generic_router(route_module, **kw)
            )
        assert getattr(routers[1].policy, "route_step", None) is None
        _drive(ops, routers, clock)


@pytest.mark.parametrize("mode", MODES, ids=["events", "no-fresh", "tiered", "event-free", "busy"])
def test_every_mode_takes_the_fused_step(route_module: ModuleType, mode: dict[str, Any]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        kw = {"workers": [0, 1], "clock": Clock(), "policy_params": {"seed": 0}, **mode}
        r = _fused_router(route_module, mp, **kw)
        r.apply_stored(1, chain([1, 2]), tier="host" if mode.get("tiered") else "device")
        STEPS.clear()
        d = r.route(Request("a", block_hashes=chain([1, 2, 3])))
        assert STEPS == [1] and d.policy == "kvroute"
        if mode["kv_events"]:
            assert (d.worker, d.matched_blocks) == (1, 2)
        else:  # the index is ignored without events
            assert d.matched_blocks == 0


def test_rendezvous_ties_agree_across_routers_and_paths(route_module: ModuleType) -> None:
    # Two routers that never talk (different seeds) send the same new prefix to the
    # same worker; the generic path (policy.choose) agrees with the fused step.
    with pytest.MonkeyPatch.context() as mp:
        kw: dict[str, Any] = {"workers": range(9), "clock": Clock()}
        a = _fused_router(route_module, mp, policy_params={"seed": 1, "tie_break": "rendezvous"},
                          **kw)  # fmt: skip
        b = _generic_router(route_module, policy_params={"seed": 2, "tie_break": "rendezvous"},
                            **kw)  # fmt: skip
        chosen = set()
        for i in range(60):
            req = {"block_hashes": chain([i, i + 1, i + 2])}
            da, db = a.route(Request(i, **req)), b.route(Request(i, **req))
            assert da.worker == db.worker
            chosen.add(da.worker)
            a.finished(i)
            b.finished(i)
        assert len(chosen) > 4  # different prefixes spread over the fleet
        # siblings (same first block) pick the same worker on an idle fleet
        picks = set()
        for j in range(5):
            r = Request(f"s{j}", block_hashes=chain([77, j + 100]))
            picks.add(a.route(r).worker)
            a.finished(f"s{j}")
        assert len(picks) == 1
        # prompts that share only a system prompt every worker holds spread: the key
        # is the first block of their new part, not the shared first block
        for r in (a, b):
            for w in range(9):
                r.apply_stored(w, chain([5]))
        spread = set()
        for j in range(40):
            req = {"block_hashes": chain([5, 1000 + j, 7])}
            da, db = a.route(Request(f"u{j}", **req)), b.route(Request(f"u{j}", **req))
            assert da.worker == db.worker and da.matched_blocks == 1
            spread.add(da.worker)
            a.finished(f"u{j}")
            b.finished(f"u{j}")
        assert len(spread) > 4


def test_the_fused_step_breaks_ties_with_the_policys_generator(route_module: ModuleType) -> None:
    # an idle fleet ties on every prompt: the draws must be randrange's, call for call
    with pytest.MonkeyPatch.context() as mp:
        clock = Clock()
        kw: dict[str, Any] = {"workers": range(37), "clock": clock, "policy_params": {"seed": 5}}
        a = _fused_router(route_module, mp, **kw)
        b = _generic_router(route_module, **kw)
        for i in range(300):
            req = {"block_hashes": chain([i, i + 1]), "expected_output_tokens": i % 5}
            da, db = a.route(Request(i, **req)), b.route(Request(i, **req))
            _same(da, db)
            if i % 3:
                a.finished(i)
                b.finished(i)
        _same_state(a, b)


# -- kvroute_step: the twins on random states -----------------------------------------


@st.composite
def step_cases(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(1, 6))
    workers = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n, unique=True))
    floats = st.lists(st.sampled_from([0.0, 1.0, 17.0, 300.0]), min_size=n, max_size=n)
    prompts = st.lists(st.integers(0, 2), min_size=1, max_size=8)
    tiered = draw(st.booleans())
    match = draw(
        st.lists(
            st.integers(0, 8), min_size=3 * n if tiered else n, max_size=3 * n if tiered else n
        )
    )
    return {
        "workers": workers,
        "prefill": draw(floats),
        "decode": draw(floats),
        "active": draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)),
        "waiting": draw(floats),
        "kv": draw(st.lists(st.sampled_from([0.0, 0.5, 0.95]), min_size=n, max_size=n)),
        "in_flight": draw(st.lists(st.tuples(st.sampled_from(workers), prompts), max_size=5)),
        "fresh": draw(
            st.none()
            | st.lists(
                st.tuples(st.sampled_from([*workers, 99]), prompts, st.floats(0, 4)), max_size=6
            )
        ),
        "match": np.array(match, np.uint32).reshape((3, n) if tiered else (n,)),
        "prompt": draw(prompts),
        "busy": draw(st.none() | st.lists(st.booleans(), min_size=n, max_size=n)),
        "out_blocks": draw(st.sampled_from([0.0, 2.0])),
        "tokens": draw(st.integers(0, 40)),
        "block_size": draw(st.sampled_from([1, 16])),
        "now": draw(st.floats(0, 5)),
        "seed": draw(st.integers(0, 9)),
        "slack": draw(st.sampled_from([0.0, 0.25])),
        "tie": draw(st.sampled_from(["random", "rendezvous"])),
    }


def _build(mod: ModuleType, case: dict[str, Any]) -> tuple[Any, Any, Any]:
    active = mod.ActivePrefixes()
    for w, toks in case["in_flight"]:
        active.add(w, chain(toks))
    la = mod.LoadArrays(
        np.array(case["workers"], np.uint64),
        np.array(case["prefill"]),
        np.array(case["decode"]),
        np.array(case["active"], np.int64),
        np.array(case["waiting"]),
        np.array(case["kv"]),
        active,
        {},
    )
    fresh = None
    if case["fresh"] is not None:
        fresh = mod.FreshDecisions(ttl=2.0, per_key=3)
        for w, toks, t in case["fresh"]:
            fresh.record(w, chain(toks), t)
    policy = KvRoute(
        seed=case["seed"], balance_slack=case["slack"], balance_abs_slack=0.5,
        tie_break=case["tie"],
    )  # fmt: skip
    return la, fresh, policy


@pytest.mark.skipif(len(ROUTE_TWINS) < 2, reason="kvroute._route is not loaded")
@given(step_cases())
@settings(deadline=None)
def test_kvroute_step_twins_agree(case: dict[str, Any]) -> None:
    results = []
    for mod in ROUTE_TWINS:
        la, fresh, policy = _build(mod, case)
        busy = None if case["busy"] is None else np.array(case["busy"], np.bool_)
        p, w, matched, ov, costs, entry = mod.kvroute_step(
            policy,
            la,
            fresh,
            "r",
            "payload",
            case["match"],
            chain(case["prompt"]),
            case["now"],
            case["tokens"],
            case["block_size"],
            case["out_blocks"],
            busy,
        )
        state = [
            la.prefill_tokens.tobytes(),
            la.decode_blocks.tobytes(),
            la.active_requests.tobytes(),
            [la.active.worker_len(x) for x in case["workers"]],
            None
            if fresh is None
            else sorted(
                (k, [(e[0], e[1].tolist(), e[2]) for e in d]) for k, d in fresh._by_first.items()
            ),
            policy._rng.random(),
            [(k, r.worker, r.prefill_tokens, r.decode_blocks, r.last_seen, r.payload,
              r.hashes.tolist()) for k, r in la.requests.items()],
        ]  # fmt: skip
        if fresh is not None:
            fresh._check()
            fresh.forget(entry)
            state.append(len(fresh))
        la.active._check()
        rows = {k: (v.dtype.str, v.tobytes()) for k, v in costs.items()}
        results.append((p, w, matched, ov.dtype.str, ov.tobytes(), list(costs), rows, state))
    assert results[0] == results[1]


def test_kvroute_step_refuses_bad_input_alike(route_module: ModuleType) -> None:
    mod = route_module
    la = mod.LoadArrays(
        H(1, 2), np.zeros(2), np.zeros(2), np.zeros(2, np.int64), np.zeros(2), np.zeros(2),
        mod.ActivePrefixes(), {"busy": None},
    )  # fmt: skip
    h = H(1, 2)
    ok = np.zeros(2, np.uint32)
    cases: list[tuple[Any, ...]] = [
        (la, np.zeros(2, np.int64), None),
        (la, np.zeros(3, np.uint32), None),
        (la, np.zeros((2, 2), np.uint32), None),
        (la, ok, np.zeros(2, np.uint8)),
        (la, ok, np.zeros(3, np.bool_)),
        ("not load arrays", ok, None),
    ]
    for load, match, busy in cases:
        with pytest.raises(TypeError) as got:
            mod.kvroute_step(KvRoute(), load, None, "r", None, match, h, 0.0, 16, 16, 0.0, busy)
        want = pytest.raises(TypeError)
        with want as spec:
            py_twin.kvroute_step(
                KvRoute(),
                load
                if isinstance(load, str)
                else py_twin.LoadArrays(
                    H(1, 2), np.zeros(2), np.zeros(2), np.zeros(2, np.int64), np.zeros(2),
                    np.zeros(2), py_twin.ActivePrefixes(), {},
                ),
                None,
                "r",
                None,
                match,
                h,
                0.0,
                16,
                16,
                0.0,
                busy,
            )  # fmt: skip
        assert str(got.value).replace("LoadArrays", "X") == str(spec.value).replace(
            "LoadArrays", "X"
        ) or isinstance(load, str)
    empty = mod.LoadArrays(
        H(), np.zeros(0), np.zeros(0), np.zeros(0, np.int64), np.zeros(0), np.zeros(0),
        mod.ActivePrefixes(), {},
    )  # fmt: skip
    with pytest.raises(ValueError, match="at least one worker"):
        mod.kvroute_step(
            KvRoute(), empty, None, "r", None, np.zeros(0, np.uint32), h, 0.0, 16, 16, 0.0
        )
    with pytest.raises(OverflowError):
        mod.kvroute_step(KvRoute(), la, None, "r", None, ok, [-1], 0.0, 16, 16, 0.0)
    with pytest.raises(ValueError, match="request 'busy' is already in flight"):
        mod.kvroute_step(KvRoute(), la, None, "busy", None, ok, h, 0.0, 16, 16, 0.0)
    assert la.prefill_tokens.tolist() == [0.0, 0.0] and list(la.requests) == ["busy"]


@pytest.mark.parametrize(
    ("index", "bad", "message"),
    [
        (1, np.zeros(2, np.int64), "prefill_tokens must be a contiguous float64 array of 2 values"),
        (3, np.zeros(2), "active_requests must be a contiguous int64 array of 2 values"),
        (4, np.zeros(4)[::2], "waiting must be a contiguous float64 array of 2 values"),
        (5, [0.0, 0.0], "kv_usage must be a contiguous float64 array of 2 values"),
    ],
)
def test_load_arrays_refuse_arrays_of_the_wrong_kind(
    route_module: ModuleType, index: int, bad: Any, message: str
) -> None:
    args: list[Any] = [
        H(1, 2), np.zeros(2), np.zeros(2), np.zeros(2, np.int64), np.zeros(2), np.zeros(2),
        route_module.ActivePrefixes(), {},
    ]  # fmt: skip
    args[index] = bad
    with pytest.raises(TypeError, match=message):
        route_module.LoadArrays(*args)
    ro = np.zeros(2)
    ro.flags.writeable = False
    args[index] = np.zeros(2, np.int64) if index == 3 else np.zeros(2)
    args[2] = ro
    with pytest.raises(TypeError, match="decode_blocks must be a contiguous float64"):
        route_module.LoadArrays(*args)


def test_load_arrays_are_a_live_view(route_module: ModuleType) -> None:
    pt = np.zeros(2)
    requests: dict[str, Any] = {}
    la = route_module.LoadArrays(
        H(7, 9), pt, np.zeros(2), np.zeros(2, np.int64), np.zeros(2), np.zeros(2),
        route_module.ActivePrefixes(), requests,
    )  # fmt: skip
    assert la.n == 2 and la.pos == {7: 0, 9: 1} and la.prefill_tokens is pt
    assert la.requests is requests
    p, w, *_ = route_module.kvroute_step(
        KvRoute(seed=0), la, None, "r", 5, np.array([0, 3], np.uint32), H(1, 2, 3), 0.0, 48, 16,
        0.0,
    )  # fmt: skip
    assert (p, w) == (1, 9) and pt.tolist() == [0.0, 0.0]  # all 48 tokens cached on 9
    assert requests["r"] == route_module.ActiveRequest(9, 0.0, 0.0, 0.0, 5, requests["r"].hashes)


# -- FreshDecisions: the twins ----------------------------------------------------------


def test_fresh_decisions_keep_the_newest_per_worker_and_expire(route_module: ModuleType) -> None:
    fd = route_module.FreshDecisions(ttl=5.0, per_key=2)
    fd.record(0, H(1, 2, 3), now=0.0)
    fd.record(0, H(1, 2, 9), now=1.0)  # replaces worker 0's older decision
    assert len(fd) == 1
    assert fd.match(H(1, 2, 3), now=1.0) == {0: 2}
    fd.record(1, H(1, 5), now=2.0)
    fd.record(2, H(1, 2, 3, 4), now=3.0)  # per_key=2: worker 0's entry is pushed out
    assert fd.match(H(1, 2, 3, 4), now=3.0) == {1: 1, 2: 4}
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
    fd._check()
    with pytest.raises(ValueError, match="per_key must be >= 1"):
        route_module.FreshDecisions(per_key=0)
    with pytest.raises(ValueError, match="ttl must be > 0"):
        route_module.FreshDecisions(ttl=0)
    with pytest.raises(OverflowError):
        fd.record(-1, H(1), 0.0)
    with pytest.raises(TypeError):
        fd.record(1, ["x"], 0.0)


def test_a_stale_handle_forgets_nothing(route_module: ModuleType) -> None:
    fd = route_module.FreshDecisions(ttl=5.0)
    old = fd.record(3, H(1), now=0.0)
    fd.record(3, H(1), now=0.0)  # the same prompt to the same worker: replaces it
    fd.forget(old)
    assert fd.match(H(1), now=0.0) == {3: 1}


def test_fresh_decisions_copy_nothing_and_keep_the_prompt(route_module: ModuleType) -> None:
    fd = route_module.FreshDecisions(ttl=5.0)
    h = H(1, 2, 3)
    fd.record(3, h, now=0.0)
    [[w, kept, expiry]] = fd._by_first[1]
    assert (w, kept.tolist(), expiry) == (3, [1, 2, 3], 5.0)
    del h, kept
    assert fd.match(H(1, 2, 3), now=1.0) == {3: 3}


FRESH_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.integers(0, 4), st.lists(st.integers(0, 2), max_size=6)),
        st.tuples(st.just("forget"), st.integers(0, 30)),
        st.tuples(st.just("match"), st.lists(st.integers(0, 2), max_size=6), st.booleans()),
        st.tuples(st.just("overlay"), st.lists(st.integers(0, 2), max_size=6), st.booleans()),
        st.tuples(st.just("remove_worker"), st.integers(0, 4)),
        st.tuples(
            st.just("purge"),
        ),
        st.tuples(st.just("tick"), st.sampled_from([0.3, 1.0, 2.5])),
    ),
    max_size=50,
)


@pytest.mark.skipif(len(ROUTE_TWINS) < 2, reason="kvroute._route is not loaded")
@given(FRESH_OPS, st.integers(1, 4))
@settings(deadline=None)
def test_fresh_decisions_twins_agree(ops: list[tuple[Any, ...]], per_key: int) -> None:
    fds = [mod.FreshDecisions(ttl=2.0, per_key=per_key) for mod in ROUTE_TWINS]
    handles: list[list[Any]] = [[], []]
    now = 0.0
    pos = {w: w for w in range(4)}  # worker 4 is unknown to the "router"
    for op in ops:
        if op[0] == "tick":
            now += op[1]
            continue
        outs = []
        for i, fd in enumerate(fds):
            if op[0] == "record":
                handles[i].append(fd.record(op[1], chain(op[2]), now))
                outs.append(None)
            elif op[0] == "forget":
                outs.append(fd.forget(handles[i][op[1] % len(handles[i])]) if handles[i] else 0)
            elif op[0] == "match":
                known = {0: 1, 2: 0} if op[2] else None
                outs.append(fd.match(chain(op[1]), now, known))
            elif op[0] == "overlay":
                ov = np.array([1, 0, 2, 0], np.int64)
                host, disk = np.ones(4, np.int64), np.ones(4, np.int64)
                got = fd.overlay(chain(op[1]), now, ov, pos, skip_known=op[2], host=host, disk=disk)
                outs.append((got, ov.tolist(), host.tolist(), disk.tolist()))
            elif op[0] == "remove_worker":
                outs.append(fd.remove_worker(op[1]))
            else:
                outs.append(fd.purge(now))
        assert outs[0] == outs[1], op
        views = [
            sorted((k, [(e[0], e[1].tolist(), e[2]) for e in d]) for k, d in fd._by_first.items())
            for fd in fds
        ]
        assert views[0] == views[1] and len(fds[0]) == len(fds[1])
        for fd in fds:
            fd._check()


def test_fresh_decisions_twins_have_the_same_methods(route_module: ModuleType) -> None:
    spec, ours = py_twin.FreshDecisions, route_module.FreshDecisions
    for name in ("record", "forget", "match", "overlay", "remove_worker", "purge", "_check"):
        pa = [
            (p.name, p.kind, p.default)
            for p in inspect.signature(getattr(ours, name)).parameters.values()
        ]
        pb = [
            (p.name, p.kind, p.default)
            for p in inspect.signature(getattr(spec, name)).parameters.values()
        ]
        assert pa == pb, name


# -- the arrays the tiered and event-free paths match into ------------------------------


@pytest.mark.parametrize("index_module", INDEX_TWINS, ids=twin_ids(INDEX_TWINS))
@given(
    st.lists(
        st.tuples(
            st.integers(0, 4),
            st.lists(st.integers(0, 2), min_size=1, max_size=6),
            st.sampled_from(["device", "host", "disk"]),
        ),
        max_size=12,
    ),
    st.lists(st.integers(0, 2), max_size=7),
)
@settings(deadline=None)
def test_match_tiers_array_lays_out_match_tiers(
    index_module: ModuleType, stores: list[tuple[int, list[int], str]], query: list[int]
) -> None:
    idx = index_module.BlockIndex()
    for w, toks, tier in stores:
        idx.store(w, chain(toks), tier=tier)
    workers = np.array([3, 0, 9, 1, 2, 4], np.uint64)
    got = idx.match_tiers_array(chain(query), workers)
    tiers = idx.match_tiers(chain(query))
    want = [[tiers.get(w, (0, 0, 0))[t] for w in workers.tolist()] for t in range(3)]
    assert got.dtype == np.uint32 and got.shape == (3, 6) and got.tolist() == want
    assert got.sum(axis=0).tolist() == idx.match_array(chain(query), workers).tolist()
    with pytest.raises(OverflowError):
        idx.match_tiers_array(chain(query), [-1])


def test_predicted_residency_match_array_lays_out_match() -> None:
    pr = PredictedResidency(PyIndex, ttl=10.0)
    workers = np.array([4, 3, 5], np.uint64)
    assert pr.match_array(H(1, 2), workers).tolist() == [0, 0, 0]
    pr.record(3, H(1, 2, 3), now=0.0)
    pr.record(5, H(1), now=0.0)
    got = pr.match_array(H(1, 2, 9), workers)
    assert got.dtype == np.uint32 and got.tolist() == [0, 2, 1]
    pr.expire(10.0)
    assert pr.match_array(H(1, 2, 9), workers).tolist() == [0, 0, 0]


def test_a_user_index_without_the_array_form_still_routes_by_tier() -> None:
    class DictOnly:
        """An index with the protocol's dict methods only (no match_tiers_array)."""

        def __init__(self) -> None:
            self.inner = PyIndex()

        def __getattr__(self, name: str) -> Any:
            if name == "match_tiers_array":
                raise AttributeError(name)
            return getattr(self.inner, name)

    r = Router(block_size=1, workers=[0, 1], index=DictOnly(), clock=Clock(), tiered=True,
               policy_params={"seed": 0})  # fmt: skip
    ref = Router(block_size=1, workers=[0, 1], index_factory=PyIndex, clock=Clock(), tiered=True,
                 policy_params={"seed": 0})  # fmt: skip
    rng = random.Random(3)
    for i in range(30):
        toks = [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
        w, tier = rng.randrange(2), rng.choice(["device", "host"])
        r.apply_stored(w, chain(toks), tier=tier)
        ref.apply_stored(w, chain(toks), tier=tier)
        q = Request(i, block_hashes=chain(toks[:3]))
        _same(r.route(q), ref.route(q))


@pytest.mark.skipif(len(ROUTE_TWINS) < 2, reason="kvroute._route is not loaded")
@given(step_cases())
@settings(deadline=None)
def test_the_compiled_step_takes_the_twins_records_too(case: dict[str, Any]) -> None:
    # a LoadTracker built with active_factory=, or a twin FreshDecisions, goes through
    # their Python methods: the same decision and the same state as with compiled ones
    compiled = ROUTE_TWINS[0]
    results = []
    for mixed in (False, True):
        la, fresh, policy = _build(compiled, case)
        if mixed:
            twin_la, twin_fresh, _ = _build(py_twin, case)
            la = compiled.LoadArrays(
                la.workers, la.prefill_tokens, la.decode_blocks, la.active_requests, la.waiting,
                la.kv_usage, twin_la.active, la.requests,
            )  # fmt: skip
            fresh = twin_fresh
        busy = None if case["busy"] is None else np.array(case["busy"], np.bool_)
        p, w, matched, ov, costs, _ = compiled.kvroute_step(
            policy, la, fresh, "r", None, case["match"], chain(case["prompt"]), case["now"],
            case["tokens"], case["block_size"], case["out_blocks"], busy,
        )  # fmt: skip
        results.append(
            (
                p,
                w,
                matched,
                ov.tobytes(),
                {k: v.tobytes() for k, v in costs.items()},
                la.prefill_tokens.tobytes(),
                la.decode_blocks.tobytes(),
                [la.active.worker_len(x) for x in case["workers"]],
                None if fresh is None else fresh.match(chain(case["prompt"]), case["now"]),
            )
        )
    assert results[0] == results[1]
