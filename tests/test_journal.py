"""Journal: sequence numbers for state-changing calls, the record, and replaying it on a router."""

from __future__ import annotations

import doctest

import pytest
from helpers import Clock, H

import kvroute.journal
from kvroute.journal import Journal
from kvroute.request import Request
from kvroute.router import Router

pytestmark = pytest.mark.usefixtures("twin")


def test_doctests() -> None:
    result = doctest.testmod(kvroute.journal, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_numbers_count_from_one_whether_or_not_calls_are_kept() -> None:
    for record in (False, True):
        j = Journal(record)
        assert j.seq == 0 and j.recording is record
        assert [j.log("a"), j.log("b", 1), j.log("c", x=2)] == [1, 2, 3]
        assert j.seq == 3
        assert len(j.entries()) == (3 if record else 0)


def test_entries_are_a_copy_in_order() -> None:
    j = Journal(record=True)
    j.log("route", "r", exclude=frozenset({1}))
    got = j.entries()
    got.clear()
    assert j.entries() == [(1, "route", ("r",), {"exclude": frozenset({1})})]


def fleet(clock: Clock) -> Router:
    return Router(
        block_size=4,
        workers=[0, 1, 2],
        policy_params={"seed": 3},
        clock=clock,
        journal=True,
    )


def test_replaying_the_record_on_a_fresh_router_repeats_every_decision() -> None:
    clock = Clock()
    r = fleet(clock)
    decisions = []
    r.apply_stored(1, H(1, 2, 3))
    for i in range(12):
        clock.t += 0.5
        d = r.route(Request(i, block_hashes=H(1, 2, 3, 100 + i), session_id=f"s{i % 3}"))
        decisions.append(d)
        if i % 4 == 3:
            r.finished(i - 1)
            r.mark_unhealthy(d.worker)
        if i % 4 == 0:
            r.mark_healthy(0)
            r.mark_healthy(1)
            r.mark_healthy(2)
            r.update_worker_metrics(2, waiting_requests=i % 3)
    r.apply_removed(1, H(3))
    r.sweep()
    entries = r.journal()
    assert [e[0] for e in entries] == list(range(1, len(entries) + 1))
    # after the last route: finished, mark_unhealthy, apply_removed, sweep
    assert [e[1] for e in entries[-4:]] == ["finished", "mark_unhealthy", "apply_removed", "sweep"]
    assert entries[-1][0] == decisions[-1].seq + 4

    replay_clock = Clock()
    fresh = fleet(replay_clock)
    replayed = []
    for seq, op, args, kwargs in entries[3:]:  # the three add_worker calls built it
        replay_clock.t = 0.5 * sum(1 for e in entries[:seq] if e[1] == "route")
        result = getattr(fresh, op)(*args, **kwargs)
        if op == "route":
            assert result.seq == seq
            replayed.append(result)
    assert [(d.worker, d.matched_blocks, d.policy) for d in replayed] == [
        (d.worker, d.matched_blocks, d.policy) for d in decisions
    ]
    assert [e[:2] for e in fresh.journal()] == [e[:2] for e in entries]
