"""Prefill/decode disaggregation in the router: roles, both choices, both legs' load, the rule.

Every test runs twice (ids c / py): on the compiled cores and on their
pure-Python twins (conftest's ``twin`` fixture).
"""

from __future__ import annotations

import dataclasses
import doctest
from typing import Any

import numpy as np
import pytest
from helpers import Clock, Twin

import kvroute.disagg
from kvroute.config import RouterConfig
from kvroute.disagg import (
    ROLES,
    DisaggConfig,
    DisaggDecision,
    decode_costs,
    decode_key,
)
from kvroute.fleet.spec import ROLES as SPEC_ROLES
from kvroute.remote import RemoteUpdate
from kvroute.request import CacheControl, Decision, Request
from kvroute.router import NoWorkerAvailable, Router

P0, P1, D0, D1 = 0, 1, 10, 11
PREFIX = [101, 102, 103, 104]


def fleet(
    clock: Clock | None = None,
    *,
    local: int = 0,
    held: bool = True,
    both: tuple[int, ...] = (),
    **kw: Any,
) -> Router:
    """2 prefill + 2 decode workers (and any 'both' ones), block size 4, seeded."""
    cfg = DisaggConfig(local_prefill_tokens=local, local_if_held=held)
    r = Router(
        block_size=4,
        policy="kvroute",
        policy_params={"seed": 0},
        clock=clock or Clock(),
        disagg=cfg,
        **kw,
    )
    for w in (P0, P1):
        r.add_worker(w, role="prefill")
    for w in (D0, D1):
        r.add_worker(w, role="decode")
    for w in both:
        r.add_worker(w)
    return r


def req(rid: str, hashes: list[int], **kw: Any) -> Request:
    return Request(rid, block_hashes=hashes, **kw)


def test_doctests() -> None:
    result = doctest.testmod(kvroute.disagg, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_roles_are_the_fleet_specs_roles() -> None:
    assert ROLES == SPEC_ROLES == ("both", "prefill", "decode")


def test_a_fleet_of_both_is_not_disaggregated_and_its_decisions_name_no_decode_worker(
    twin: Twin,
) -> None:
    r = Router(block_size=4, workers=[0, 1], clock=Clock())
    assert not r.disaggregated and r.role(0) == "both"
    d = r.route(req("a", PREFIX))
    assert type(d) is Decision
    assert d.decode_worker is None and d.remote_prefill is False
    assert "remote_prefills" not in r.stats()
    assert r.prefill_done("a") is False  # no prefill leg apart: not counted as unknown
    assert r.stats()["unknown_request_ids"] == 0


def test_roles_are_set_read_and_refused(twin: Twin) -> None:
    r = fleet()
    assert r.disaggregated
    assert [r.role(w) for w in (P0, P1, D0, D1)] == ["prefill", "prefill", "decode", "decode"]
    with pytest.raises(ValueError, match="role must be one of"):
        r.add_worker(5, role="mixed")  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        r.role(99)
    r.add_worker(P0)  # re-adding a known worker updates its role
    assert r.role(P0) == "both"
    for w in (P1, D0, D1):
        r.remove_worker(w)
    assert not r.disaggregated
    r._check()


def test_the_prefill_worker_holding_the_prefix_prefills_and_a_decode_worker_decodes(
    twin: Twin,
) -> None:
    r = fleet()
    r.apply_stored(P1, PREFIX)
    d = r.route(req("a", [*PREFIX, 555], expected_output_tokens=8))
    assert isinstance(d, DisaggDecision)
    assert (d.worker, d.matched_blocks, d.predicted_cached_tokens) == (P1, 4, 16)
    assert d.decode_worker in (D0, D1) and d.remote_prefill
    assert d.decode_matched_blocks == 0 and d.transfer_blocks(4) == 5
    # both legs are counted: the prefill on P1, the decode on the decode worker
    assert r.load(P1)["prefill_tokens"] == 4 and r.load(P1)["active_requests"] == 1
    dec = r.load(d.decode_worker)
    assert dec["active_requests"] == 1 and dec["prefill_tokens"] == 0
    assert dec["decode_blocks"] == 5 + 2  # the prompt's 5 blocks and 2 expected output blocks
    # the prefill leg ends (the prefill worker answered): only the decode leg is left
    assert r.prefill_done("a") is True and r.prefill_done("a") is False
    assert r.load(P1)["active_requests"] == 0 and r.load(P1)["decode_blocks"] == 0
    assert r.first_token("a") is True
    assert r.finished("a") is True and r.finished("a") is False
    assert r.load(d.decode_worker)["active_requests"] == 0
    assert r.load(d.decode_worker)["decode_blocks"] == 0
    st = r.stats()
    assert (st["remote_prefills"], st["local_prefills"], st["unknown_request_ids"]) == (1, 0, 1)
    r._check()


def test_finished_and_failed_release_both_legs_when_the_prefill_leg_never_reported(
    twin: Twin,
) -> None:
    r = fleet()
    for rid in ("a", "b"):
        r.route(req(rid, [*PREFIX, hash(rid) & 0xFFFF]))
    assert r.finished("a") is True
    assert r.failed("b") is True
    for w in (P0, P1, D0, D1):
        assert r.load(w)["active_requests"] == 0
        assert r.load(w)["decode_blocks"] == 0 and r.load(w)["prefill_tokens"] == 0
    assert r.stats()["unknown_request_ids"] == 0
    r.route(req("c", PREFIX))
    assert r.prefill_done("c")
    with pytest.raises(ValueError, match="already in flight"):
        r.route(req("c", PREFIX))  # its decode leg is still in flight
    r._check()


def test_decode_load_is_balanced(twin: Twin) -> None:
    r = fleet()
    got = [r.route(req(f"r{i}", [1000 + i, 2000 + i])).decode_worker for i in range(20)]
    assert sorted(set(got)) == [D0, D1]
    assert abs(got.count(D0) - got.count(D1)) <= 2
    assert abs(r.load(D0)["active_requests"] - r.load(D1)["active_requests"]) <= 2


def test_a_decode_worker_holding_the_prefix_is_preferred_and_needs_no_transfer(
    twin: Twin,
) -> None:
    r = fleet()
    r.apply_stored(D1, PREFIX)  # a previous turn's transfer left it there
    d = r.route(req("a", [*PREFIX, 7]))
    assert d.decode_worker == D1 and d.decode_matched_blocks == 4
    assert d.transfer_blocks(4) == 1
    rows = {row["worker"]: row for row in d.decode_breakdown()}
    assert rows[D1]["transfer"] == 4.0 and rows[D0]["transfer"] == 20.0
    text = d.explain()
    assert "KV moves to decode worker 11" in text and "transfer" in text


def test_conditional_disaggregation_prefills_on_the_decode_worker_holding_the_prefix(
    twin: Twin,
) -> None:
    r = fleet(local=8, held=False)
    r.apply_stored(D0, PREFIX)
    d = r.route(req("a", [*PREFIX, 7], expected_output_tokens=4))  # 4 of 20 tokens uncached
    assert d.worker == d.decode_worker == D0 and not d.remote_prefill
    assert (d.policy, d.matched_blocks, d.predicted_cached_tokens) == ("local", 4, 16)
    assert d.transfer_blocks(4) == 0
    assert "conditional rule" in d.explain()
    # one leg, on the decode worker, as an ordinary request
    assert r.load(D0)["prefill_tokens"] == 4 and r.load(D0)["active_requests"] == 1
    assert all(r.load(w)["active_requests"] == 0 for w in (P0, P1, D1))
    assert r.prefill_done("a") is False
    assert r.finished("a") is True
    # too much uncached: prefilled remotely, its prefix counted on the decode worker anyway
    d = r.route(req("b", [*PREFIX, 7, 8, 9]))  # 12 tokens uncached on D0
    assert d.remote_prefill and d.worker in (P0, P1)
    st = r.stats()
    assert (st["local_prefills"], st["remote_prefills"]) == (1, 1)
    r._check()


def test_the_decode_workers_queued_prefill_counts_against_the_threshold(twin: Twin) -> None:
    r = fleet(local=8, held=False)
    r.apply_stored(D0, PREFIX)
    r.mark_unhealthy(D1)
    a = r.route(req("a", [*PREFIX, 7]))  # 4 tokens uncached: local
    assert not a.remote_prefill and r.load(D0)["prefill_tokens"] == 4
    # 4 more uncached, 4 queued already: 8, not under 8
    assert r.route(req("b", [*PREFIX, 8])).remote_prefill
    # the held clause does not send it there either while the queue is full
    r = fleet(local=8)
    r.apply_stored(D0, PREFIX)
    r.mark_unhealthy(D1)
    a = r.route(req("a", [*PREFIX, 7, 8]))  # 8 uncached, but D0 holds more than any prefill
    assert not a.remote_prefill and r.load(D0)["prefill_tokens"] == 8
    assert r.route(req("b", [*PREFIX, 20])).remote_prefill
    assert r.first_token("a")  # its prefill is done: the queue is empty again
    c = r.route(req("c", [*PREFIX, 21]))
    assert not c.remote_prefill and c.worker == D0


def test_a_decode_worker_holding_more_than_every_prefill_worker_prefills_locally(
    twin: Twin,
) -> None:
    r = fleet(local=8)
    r.apply_stored(D0, [*PREFIX, 7])
    r.apply_stored(P0, PREFIX[:2])
    r.apply_stored(P1, PREFIX[:3])
    # 12 tokens uncached on D0: over the threshold, but a prefill worker would redo more
    d = r.route(req("a", [*PREFIX, 7, 8, 9, 10]))
    assert (d.worker, d.decode_worker, d.remote_prefill, d.policy) == (D0, D0, False, "local")
    assert r.finished("a")
    # a prefill worker holding as much as the decode worker: remote, as the threshold says
    r.apply_stored(P1, [*PREFIX, 7])
    d = r.route(req("b", [*PREFIX, 7, 20, 21, 22]))  # (a's whole prompt is fresh on D0)
    assert d.remote_prefill and d.worker == P1
    # the clause is off without a threshold, and when asked
    for r in (fleet(local=0), fleet(local=8, held=False)):
        r.apply_stored(D0, [*PREFIX, 7])
        assert r.route(req("c", [*PREFIX, 7, 8, 9, 10])).remote_prefill


def test_without_a_threshold_nothing_is_prefilled_locally(twin: Twin) -> None:
    r = fleet()
    r.apply_stored(D0, [*PREFIX, 7])
    d = r.route(req("a", [*PREFIX, 7]))  # fully cached on D0, but the rule is off
    assert d.remote_prefill and d.worker in (P0, P1)


def test_a_full_decode_worker_is_passed_over(twin: Twin) -> None:
    r = fleet()
    r.add_worker(D1, kv_capacity_blocks=3, role="decode")
    r.apply_stored(D1, PREFIX)
    d = r.route(req("a", [*PREFIX, 7, 8]))  # 6 blocks: D1 has room for 3
    assert d.decode_worker == D0
    rows = {row["worker"]: row for row in d.decode_breakdown()}
    assert rows[D1]["eligible"] == 0.0


def test_excluded_and_unhealthy_workers_are_left_out_of_both_choices(twin: Twin) -> None:
    r = fleet()
    r.apply_stored(P1, PREFIX)
    r.apply_stored(D1, PREFIX)
    d = r.route(req("a", PREFIX), exclude=[P1, D1])
    assert (d.worker, d.decode_worker) == (P0, D0)
    r.mark_unhealthy(D0)
    with pytest.raises(NoWorkerAvailable, match="no healthy decode worker"):
        r.route(req("b", PREFIX), exclude=[D1])
    assert r.route(req("c", PREFIX)).decode_worker == D1


def test_no_worker_for_a_role_raises(twin: Twin) -> None:
    r = fleet()
    with pytest.raises(NoWorkerAvailable, match="decode worker"):
        r.route(req("a", PREFIX), exclude=[D0, D1])
    with pytest.raises(NoWorkerAvailable, match="prefill worker"):
        r.route(req("b", PREFIX), exclude=[P0, P1])
    # with the conditional rule on, the decode workers prefill when no prefill worker is left
    r = fleet(local=1)
    d = r.route(req("c", PREFIX), exclude=[P0, P1])
    assert d.worker == d.decode_worker and not d.remote_prefill


def test_both_workers_prefill_and_decode(twin: Twin) -> None:
    r = fleet(both=(20,))
    r.apply_stored(20, PREFIX)
    d = r.route(req("a", [*PREFIX, 9]))
    assert d.worker == 20  # the 'both' worker holds the prefix: it prefills
    # it may decode too; if it does, nothing moves
    assert d.remote_prefill == (d.decode_worker != 20)


def test_kv_events_from_both_pools_are_in_the_index(twin: Twin) -> None:
    r = fleet()
    r.apply_stored(P0, PREFIX)
    r.apply_stored(D1, PREFIX[:2])
    m = r.index.match(np.array(PREFIX, np.uint64))
    assert m == {P0: 4, D1: 2}
    d = r.route(req("a", PREFIX))
    assert (d.worker, d.decode_worker, d.decode_matched_blocks) == (P0, D1, 2)


def test_the_decode_leg_is_predicted_on_its_worker_before_its_events(twin: Twin) -> None:
    r = fleet()
    first = r.route(req("a", [*PREFIX, 1], session_id="s"))
    assert r.prefill_done("a") and r.finished("a")
    # no events yet: the next turn still finds the prompt on both of first's workers
    second = r.route(req("b", [*PREFIX, 1, 2], session_id="s"))
    assert second.worker == first.worker
    assert second.decode_worker == first.decode_worker
    assert second.decode_matched_blocks == 5


def test_removing_a_worker_drops_its_leg_and_keeps_the_other(twin: Twin) -> None:
    r = fleet()
    d = r.route(req("a", PREFIX))
    r.remove_worker(d.worker)
    assert r.load(d.decode_worker)["active_requests"] == 1
    assert r.finished("a") is True
    assert r.load(d.decode_worker)["active_requests"] == 0
    r._check()


def test_the_stale_sweep_drops_both_legs(twin: Twin) -> None:
    clock = Clock()
    r = fleet(clock, request_timeout=10.0)
    d = r.route(req("a", PREFIX))
    clock.t = 11.0
    assert r.sweep() == 2
    assert r.load(d.worker)["active_requests"] == r.load(d.decode_worker)["active_requests"] == 0
    r._check()


def test_a_warm_up_plan_warms_the_prefill_worker(twin: Twin) -> None:
    r = fleet()
    d = r.route(Request("a", tokens=list(range(16)), session_id="s", speculative_prefill=True))
    assert r.prefill_done("a")
    assert r.finished("a", output_tokens=[99, 98])
    plan = r.warmup_plan("s")
    assert plan is not None and plan.worker == d.worker
    assert plan.tokens == (*range(16), 99, 98)


def test_the_journal_replays_a_disaggregated_fleet(twin: Twin) -> None:
    clock = Clock()
    r = fleet(clock, journal=True, local=6)
    got = []
    for i in range(30):
        clock.t = float(i)
        if i % 7 == 3:
            r.apply_stored(D0 if i % 2 else D1, [*PREFIX, i])
        d = r.route(req(f"r{i}", [*PREFIX, i, i + 1], session_id=f"s{i % 4}"))
        got.append((d.worker, d.decode_worker, d.remote_prefill))
        if i % 3 == 0:
            r.prefill_done(f"r{i}")
        if i % 2 == 0:
            r.finished(f"r{i}")
    journal = r.journal()
    assert ("add_worker", (D0,), {"kv_capacity_blocks": None, "role": "decode"}) in [
        e[1:] for e in journal
    ]
    clock2 = Clock()
    fresh = Router(
        block_size=4, policy="kvroute", policy_params={"seed": 0}, clock=clock2, journal=True,
        disagg=DisaggConfig(local_prefill_tokens=6),
    )  # fmt: skip
    replayed = []
    for _seq, op, args, kwargs in journal:
        if op == "route":
            clock2.t = float(len(replayed))
            d = fresh.route(*args, **kwargs)
            replayed.append((d.worker, d.decode_worker, d.remote_prefill))
        else:
            getattr(fresh, op)(*args, **kwargs)
    assert replayed == got
    for w in (P0, P1, D0, D1):
        assert r.load(w) == fresh.load(w)
    fresh._check()


def test_decode_costs_gate_capacity_busy_and_share() -> None:
    z = np.zeros(3)
    base: dict[str, Any] = dict(
        overlap=np.array([0, 0, 0]), decode_blocks=z, new_blocks=np.full(3, 4.0),
        active=np.zeros(3, np.int64), waiting=z, kv_usage=z, free_blocks=np.full(3, np.inf),
        busy=np.zeros(3, bool), prompt_tokens=64, block_size=16,
    )  # fmt: skip
    cfg = DisaggConfig()
    _, ties = decode_costs(cfg, **base)
    assert ties.tolist() == [0, 1, 2]
    # no room on 0 and 1: 2 is the only one left
    _, ties = decode_costs(cfg, **{**base, "free_blocks": np.array([3.0, 0.0, 9.0])})
    assert ties.tolist() == [2]
    # busy ones are skipped while another is not
    _, ties = decode_costs(cfg, **{**base, "busy": np.array([True, False, True])})
    assert ties.tolist() == [1]
    # worker 0 holds the prompt but is past its fair share of requests
    over = {**base, "overlap": np.array([4, 0, 0]), "active": np.array([9, 0, 0])}
    costs, ties = decode_costs(cfg, **over)
    assert not costs["eligible"][0] and ties.tolist() in ([1], [2], [1, 2])
    # KV pressure counts
    costs, ties = decode_costs(cfg, **{**base, "kv_usage": np.array([0.99, 0.0, 0.0])})
    assert costs["kv_pressure"][0] > 0 and 0 not in ties.tolist()
    # a NaN (broken state) never wins
    costs, ties = decode_costs(cfg, **{**base, "waiting": np.array([np.nan, 1.0, 1.0])})
    assert 0 not in ties.tolist()


def test_disagg_config_is_validated() -> None:
    with pytest.raises(TypeError):
        DisaggConfig(transfer_weight="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kv_high"):
        DisaggConfig(kv_high=1.0)
    with pytest.raises(ValueError, match="local_prefill_tokens"):
        DisaggConfig(local_prefill_tokens=True)
    with pytest.raises(TypeError, match="disagg"):
        RouterConfig(disagg={"local_prefill_tokens": 3})  # type: ignore[arg-type]
    cfg = dataclasses.replace(RouterConfig(), disagg=DisaggConfig(local_prefill_tokens=3))
    assert Router(config=cfg).config.disagg.local_prefill_tokens == 3


def test_decode_key_is_apart_from_every_request_id() -> None:
    assert decode_key("a") != "a" and decode_key(3) != 3
    assert decode_key("a") == decode_key("a")


def test_both_legs_are_shared_with_other_replicas_and_the_session_follows_the_prefill(
    twin: Twin,
) -> None:
    clock = Clock()
    a, b = fleet(clock), fleet(clock)
    out: list[Any] = []
    a.share(lambda now, routed: out.append(routed))
    ttl = CacheControl(ttl=300.0, prefix_tokens=8)
    d = a.route(req("a", [*PREFIX, 7], session_id="s", cache_control=(ttl,)))
    assert d.remote_prefill
    assert [(o.worker, o.session_id) for o in out] == [(d.worker, "s"), (d.decode_worker, None)]
    assert out[0].pin_ttl == 300.0 and out[1].pin_ttl is None
    # the load it shares counts both legs: the prefill on its worker, the decode on its own
    own = a.local_load()
    active = dict(zip(own.workers.tolist(), own.active.tolist(), strict=True))
    assert active == {P0: 0, P1: 0, D0: 0, D1: 0} | {d.worker: 1, d.decode_worker: 1}
    b.apply_remote(RemoteUpdate("a", routed=out))
    # the other replica sends the next turn where the first one went, for both legs
    nxt = b.route(req("b", [*PREFIX, 7, 8], session_id="s"))
    assert (nxt.worker, nxt.decode_worker) == (d.worker, d.decode_worker)
    assert nxt.decode_matched_blocks == 5
    b.apply_remote(RemoteUpdate("a", load=own))
    assert b.load(d.decode_worker)["active_requests"] == 2  # b's own next turn and a's


def test_a_degraded_prefill_worker_is_routed_on_its_fallback_and_judged(twin: Twin) -> None:
    r = fleet(drift_window=2)
    r.apply_stored(P1, PREFIX)
    r.degrade_worker(P1, "events_lost", "test")
    assert r.index.match(PREFIX) == {}
    r.apply_stored(P1, PREFIX)  # events resume: the prefix is held again, but P1 stays degraded
    d = r.route(req("a", [*PREFIX, 7]))
    assert d.worker == P1 and d.remote_prefill
    # the prompt was recorded in P1's fallback: its next turn matches all of it there
    assert r.prefill_done("a") and r.finished("a")
    nxt = r.route(req("b", [*PREFIX, 7, 8]))
    assert (nxt.worker, nxt.matched_blocks) == (P1, 5)
    # the prefill leg is judged against the engine's report: two agreeing reports trust P1
    assert r.observe(d, 16) is None and r.observe(nxt, 20) == "trusted"
    assert r.worker_states()[P1].state == "ok"
    r._check()
