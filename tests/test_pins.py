"""SessionPins and WarmupPlans: one entry per session, expiry on the clock, drop per worker."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from helpers import H

import kvroute.pins
from kvroute.pins import WARMUP_PLAN_TTL, SessionPins, WarmupPlans


def test_doctests() -> None:
    result = doctest.testmod(kvroute.pins, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# -- pins ------------------------------------------------------------------------------


def test_a_pin_holds_until_its_expiry_exclusive() -> None:
    pins = SessionPins()
    pins.pin("s", 4, until=300.0)
    assert pins.get("s", 0.0) == 4 and pins.get("s", 299.999) == 4
    assert len(pins) == 1
    assert pins.get("s", 300.0) is None  # expired at its expiry, and dropped
    assert len(pins) == 0 and pins.get("s", 0.0) is None
    assert pins.get("never", 0.0) is None


def test_a_new_pin_replaces_the_sessions_old_one() -> None:
    pins = SessionPins()
    pins.pin("s", 1, until=10.0)
    pins.pin("s", 2, until=5.0)  # a shorter renewal is still the renewal
    assert len(pins) == 1 and pins.get("s", 4.0) == 2 and pins.get("s", 6.0) is None
    pins.pin("t", 3, until=10.0)
    pins.drop("t")
    pins.drop("t")
    assert pins.get("t", 0.0) is None


def test_purge_and_drop_worker_count_what_they_drop() -> None:
    pins = SessionPins()
    for i, (worker, until) in enumerate([(0, 5.0), (1, 10.0), (0, 20.0), (2, 30.0)]):
        pins.pin(f"s{i}", worker, until)
    assert pins.purge(now=10.0) == 2  # s0 (5) and s1 (10, expired at 10)
    assert pins.purge(now=10.0) == 0
    assert pins.drop_worker(0) == 1 and pins.drop_worker(0) == 0
    assert len(pins) == 1 and pins.get("s3", 10.0) == 2


@pytest.mark.parametrize(
    ("own", "loads", "slack", "abs_slack", "admits"),
    [
        # fair = 1.25 x (3 + 1) / 4 + 2 = 3.25: own 2 + 1 fits, own 3 + 1 does not
        (2.0, [2, 1, 0, 0], 0.25, 2.0, True),
        (3.0, [3, 0, 0, 0], 0.25, 2.0, False),
        # the boundary is inclusive: fair = (2 + 1) / 3 = 1.0 and own + 1 = 1.0
        (0.0, [0, 1, 1], 0.0, 0.0, True),
        (1.0, [1, 1, 1], 0.0, 0.0, False),
        # waiting requests count as load (fractional, from metrics)
        (0.5, [0.5, 0.0], 1.0, 0.0, True),
    ],
)
def test_the_fair_share_gate(
    own: float, loads: list[float], slack: float, abs_slack: float, admits: bool
) -> None:
    pins = SessionPins(balance_slack=slack, abs_slack=abs_slack)
    assert pins.admits(own, np.array(loads, np.float64)) is admits


def test_bad_slacks_are_refused() -> None:
    with pytest.raises(ValueError, match="pin_balance_slack must be a finite number >= 0"):
        SessionPins(balance_slack=-0.1)
    with pytest.raises(TypeError, match="pin_abs_slack must be a number"):
        SessionPins(abs_slack="2")  # type: ignore[arg-type]


# -- warm-up plans -----------------------------------------------------------------------


def test_a_plan_is_the_prompt_plus_output_taken_once() -> None:
    plans = WarmupPlans()
    assert plans.ttl == WARMUP_PLAN_TTL
    plans.record("s", 3, [1, 2, 3, 4], np.array([9, 8], np.int64), H(11), now=0.0)
    assert "s" in plans and len(plans) == 1
    plan = plans.take("s", now=1.0)
    assert plan is not None
    assert (plan.worker, plan.tokens, plan.block_hashes.tolist()) == (3, (1, 2, 3, 4, 9, 8), [11])
    assert all(type(t) is int for t in plan.tokens or ())
    assert plans.take("s", now=1.0) is None and "s" not in plans


def test_a_plan_without_tokens_or_output() -> None:
    plans = WarmupPlans()
    plans.record("hashes-only", 1, None, [5, 6], H(11), now=0.0)
    plans.record("no-output", 2, (1, 2), None, H(12), now=0.0)
    a, b = plans.take("hashes-only", 0.0), plans.take("no-output", 0.0)
    assert a is not None and a.tokens is None  # nothing to send but the hashes
    assert b is not None and b.tokens == (1, 2)


def test_a_newer_plan_replaces_the_sessions_older_one() -> None:
    plans = WarmupPlans()
    plans.record("s", 1, [1], None, H(1), now=0.0)
    plans.record("s", 2, [2], None, H(2), now=5.0)
    plan = plans.take("s", now=5.0 + WARMUP_PLAN_TTL)  # aged from the newer one
    assert plan is not None and plan.worker == 2 and len(plans) == 0


def test_plans_expire_after_their_ttl() -> None:
    plans = WarmupPlans(ttl=10.0)
    plans.record("a", 0, [1], None, H(1), now=0.0)
    plans.record("b", 0, [1], None, H(1), now=0.0)
    plans.record("c", 1, [1], None, H(1), now=5.0)
    assert plans.take("a", now=10.0) is not None  # exactly ttl old: still good
    assert plans.take("b", now=10.001) is None  # too old: gone, not kept
    assert "b" not in plans
    assert plans.purge(now=15.0) == 0 and plans.purge(now=15.5) == 1
    assert len(plans) == 0


def test_drop_worker_drops_only_its_plans() -> None:
    plans = WarmupPlans()
    for i, worker in enumerate([0, 1, 0]):
        plans.record(f"s{i}", worker, [i], None, H(i + 1), now=0.0)
    assert plans.drop_worker(0) == 2 and plans.drop_worker(0) == 0
    plan = plans.take("s1", 0.0)
    assert plan is not None and plan.worker == 1


def test_bad_plan_ttl_is_refused() -> None:
    with pytest.raises(ValueError, match="ttl must be > 0"):
        WarmupPlans(ttl=0)
    with pytest.raises(ValueError, match="ttl must be a finite number"):
        WarmupPlans(ttl=float("inf"))
