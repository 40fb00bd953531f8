"""Members: known / healthy / busy workers and their reported metrics, over the load arrays."""

from __future__ import annotations

import doctest
from typing import Any

import numpy as np
import pytest
from helpers import H
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvroute.members
from kvroute.config import BusyThreshold
from kvroute.load import LoadTracker
from kvroute.members import Members, check_capacity, check_metrics

pytestmark = pytest.mark.usefixtures("twin")


def members(busy: BusyThreshold | None = None) -> tuple[Members, LoadTracker]:
    lt = LoadTracker(capacity=2)  # small, so adding workers grows the arrays
    return Members(lt, busy), lt


def test_doctests() -> None:
    result = doctest.testmod(kvroute.members, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_add_and_remove_workers() -> None:
    m, lt = members()
    assert len(m) == 0 and m.workers() == [] and 5 not in m
    assert [m.add(w) for w in (9, 5, 7, 5)] == [True, True, True, False]
    assert len(m) == 3 and m.workers() == [5, 7, 9] and 5 in m
    lt.start("a", 9, prefill_tokens=8, decode_blocks=1, now=0.0, hashes=H(1, 2))
    lt.start("b", 7, prefill_tokens=8, decode_blocks=1, now=0.0, hashes=H(1, 2))
    assert m.remove(9) == ["a"]  # its requests in flight go with it
    assert m.remove(9) is None and 9 not in m
    assert m.workers() == [5, 7] and list(lt.requests) == ["b"]
    assert m.load(7)["active_requests"] == 1
    lt._check()


def test_health_and_the_all_healthy_summary() -> None:
    m, _ = members()
    assert m.all_healthy  # vacuously, with no worker
    for w in (1, 2, 3):
        m.add(w)
    assert m.set_healthy(2, False) and not m.all_healthy
    assert not m.is_healthy(2) and m.is_healthy(1) and not m.is_healthy(99)
    assert not m.set_healthy(99, False)
    assert m.set_healthy(2, False) and not m.all_healthy  # twice is harmless
    m._check()
    assert m.remove(2) == [] and m.all_healthy  # the unhealthy one left
    m.set_healthy(3, False)
    m.add(2)  # a (re-)added worker starts healthy
    assert m.is_healthy(2) and not m.all_healthy
    assert m.set_healthy(3, True) and m.all_healthy
    m._check()


def test_load_reports_every_field_and_unknown_workers_raise() -> None:
    m, lt = members()
    m.add(4)
    assert m.set_metrics(4, waiting=3.0, kv_usage=None)
    assert m.set_metrics(4, waiting=None, kv_usage=0.25)  # None keeps the other
    assert not m.set_metrics(8, waiting=1.0, kv_usage=None)
    lt.start("a", 4, prefill_tokens=12, decode_blocks=2, now=0.0, hashes=H(1, 2, 3))
    assert m.load(4) == {
        "prefill_tokens": 12.0,
        "decode_blocks": 5.0,
        "active_requests": 1,
        "waiting_requests": 3.0,
        "kv_usage": 0.25,
        "healthy": True,
    }
    with pytest.raises(KeyError):
        m.load(8)


@pytest.mark.parametrize(
    ("threshold", "busy_worker"),
    [
        (BusyThreshold(max_prefill_tokens=100), "prefill"),
        (BusyThreshold(max_active_requests=2), "active"),
        (BusyThreshold(max_waiting_requests=3), "waiting"),
        (BusyThreshold(max_kv_usage=0.9), "kv"),
    ],
)
def test_each_limit_makes_a_worker_busy_at_the_limit(
    threshold: BusyThreshold, busy_worker: str
) -> None:
    m, lt = members(threshold)
    names = ["prefill", "active", "waiting", "kv", "idle"]
    for w in range(len(names)):
        m.add(w)
    # worker 0 sits exactly at the prefill limit, 1 at the active one, and so on
    lt.start("p", 0, prefill_tokens=100, decode_blocks=0, now=0.0)
    lt.start("a1", 1, prefill_tokens=0, decode_blocks=0, now=0.0)
    lt.start("a2", 1, prefill_tokens=0, decode_blocks=0, now=0.0)
    m.set_metrics(2, waiting=3.0, kv_usage=None)
    m.set_metrics(3, waiting=None, kv_usage=0.9)
    # one below each limit is not busy
    m.set_metrics(4, waiting=2.0, kv_usage=0.89)
    lt.start("i", 4, prefill_tokens=99, decode_blocks=0, now=0.0)
    mask = m.busy_mask(len(names))
    assert [names[p] for p in np.flatnonzero(mask)] == [busy_worker]
    assert not m.saturated()


def test_without_a_threshold_no_worker_is_busy_and_the_mask_is_shared() -> None:
    m, lt = members()
    m.add(0)
    m.add(1)
    lt.start("a", 0, prefill_tokens=10**9, decode_blocks=0, now=0.0)
    mask = m.busy_mask(2)
    assert mask.tolist() == [False, False] and not mask.flags.writeable
    assert m.busy_mask(2) is mask  # one array per fleet size, not one per request
    assert m.busy_mask(3).tolist() == [False] * 3
    assert not m.saturated()


def test_saturated_means_no_healthy_worker_is_free() -> None:
    m, lt = members(BusyThreshold(max_active_requests=1))
    assert m.saturated()  # no worker at all: nothing can take a request
    m.add(0)
    m.add(1)
    assert not m.saturated()
    lt.start("a", 0, prefill_tokens=0, decode_blocks=0, now=0.0)
    assert not m.saturated()
    m.set_healthy(1, False)  # the only free worker is unhealthy
    assert m.saturated()
    m.set_healthy(1, True)
    lt.start("b", 1, prefill_tokens=0, decode_blocks=0, now=0.0)
    assert m.saturated()
    lt.finish("a")
    assert not m.saturated()


# the twin fixture only rebinds module names, the same for every example
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "remove", "sick", "well", "start", "finish"]),
            st.integers(0, 5),
        ),
        max_size=40,
    )
)
def test_positions_stay_aligned_with_ids_through_any_membership_history(
    program: list[tuple[str, int]],
) -> None:
    # removal moves the last worker into the hole: masks must move with it
    m, lt = members(BusyThreshold(max_active_requests=1))
    healthy: dict[int, bool] = {}
    active: dict[int, int] = {}
    n_started = 0
    for op, w in program:
        if op == "add":
            if m.add(w):
                healthy[w], active[w] = True, 0
        elif op == "remove":
            assert (m.remove(w) is None) == (w not in healthy)
            healthy.pop(w, None)
            active.pop(w, None)
        elif op in ("sick", "well"):
            assert m.set_healthy(w, op == "well") == (w in healthy)
            if w in healthy:
                healthy[w] = op == "well"
        elif op == "start" and w in healthy:
            lt.start(n_started, w, prefill_tokens=0, decode_blocks=0, now=0.0)
            n_started += 1
            active[w] += 1
        elif op == "finish":
            rid = next((r for r, a in lt.requests.items() if a.worker == w), None)
            if rid is not None:
                lt.finish(rid)
                active[w] -= 1
        m._check()
        lt._check()
        assert m.workers() == sorted(healthy)
        assert m.all_healthy == all(healthy.values())
        mask = m.busy_mask(len(m))
        busy = {int(lt.worker_ids[p]) for p in np.flatnonzero(mask)}
        assert busy == {v for v, k in active.items() if k >= 1}
        assert m.saturated() == (not any(healthy[v] and not active[v] for v in healthy))
        for v, ok in healthy.items():
            assert m.is_healthy(v) is ok and m.load(v)["active_requests"] == active[v]


@pytest.mark.parametrize(
    ("args", "exc", "msg"),
    [
        ((float("nan"), None, None), ValueError, "waiting_requests must be a finite number"),
        ((None, "high", None), TypeError, "kv_usage must be a number"),
        ((None, 1.5, None), ValueError, r"kv_usage must be in \[0, 1\], got 1.5"),
        ((None, -0.1, None), ValueError, "kv_usage must be a finite number >= 0"),
        ((None, None, -1), ValueError, "kv_capacity_blocks must be a finite number >= 0"),
        ((None, None, "lots"), TypeError, "kv_capacity_blocks must be a number"),
    ],
)
def test_metrics_are_validated(args: tuple[Any, ...], exc: type[Exception], msg: str) -> None:
    with pytest.raises(exc, match=msg):
        check_metrics(*args)


def test_valid_metrics_come_back_as_numbers() -> None:
    assert check_metrics(None, None, None) == (None, None, None)
    assert check_metrics(2, 1, 100) == (2.0, 1.0, 100)
    assert check_capacity(None) is None and check_capacity(7.0) == 7
