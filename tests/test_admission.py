"""AdmissionQueue: priority, then arrival (fcfs) or job size (sjf), O(1) cancel; via the router."""

from __future__ import annotations

import doctest
from typing import Any

import numpy as np
import pytest
from helpers import Clock, H
from hypothesis import given
from hypothesis import strategies as st

import kvroute.admission
from kvroute.admission import AdmissionQueue
from kvroute.config import BusyThreshold
from kvroute.request import Request
from kvroute.router import Router

ONE = np.ones(1, np.uint64)


def req(rid: str | int, priority: int = 0, out: int | None = None) -> Request:
    return Request(rid, block_hashes=[1], priority=priority, expected_output_tokens=out)


def drain(q: AdmissionQueue) -> list[str | int]:
    out = []
    while (entry := q.pop()) is not None:
        out.append(entry.request.request_id)
    return out


def test_doctests() -> None:
    result = doctest.testmod(kvroute.admission, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_fcfs_orders_by_priority_then_arrival() -> None:
    q = AdmissionQueue("fcfs")
    for rid, prio in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", -1)]:
        q.push(req(rid, prio), ONE, 1000 if rid == "d" else 4)
    assert len(q) == 5
    assert drain(q) == ["e", "b", "d", "a", "c"]  # size is ignored in fcfs
    assert len(q) == 0 and q.pop() is None


def test_sjf_orders_by_priority_then_prompt_plus_output_then_arrival() -> None:
    q = AdmissionQueue("sjf")
    q.push(req("big"), ONE, 40)
    q.push(req("small"), ONE, 4)
    q.push(req("mid", out=10), ONE, 8)  # 8 + 10 = 18
    q.push(req("small2"), ONE, 4)
    q.push(req("urgent", priority=-1), ONE, 1000)
    entry = q.pop()
    assert entry is not None and (entry.request.request_id, entry.prompt) == ("urgent", 1000)
    assert drain(q) == ["small", "small2", "mid", "big"]


def test_cancel_is_o1_and_the_cancelled_entry_is_skipped() -> None:
    q = AdmissionQueue()
    for rid in "abc":
        q.push(req(rid), ONE, 4)
    assert q.cancel("b") and not q.cancel("b") and not q.cancel("zz")
    assert "b" not in q and "a" in q and len(q) == 2
    q._check()
    assert drain(q) == ["a", "c"]


def test_a_cancelled_request_id_submitted_again_is_served_once_with_its_new_request() -> None:
    q = AdmissionQueue()
    q.push(req("x", priority=0), ONE, 4)
    q.push(req("y", priority=3), ONE, 4)
    q.cancel("x")
    q.push(req("x", priority=9), H(6, 7, 8), 12)
    q._check()
    first = q.pop()
    second = q.pop()
    assert first is not None and second is not None and q.pop() is None
    assert first.request.request_id == "y"
    assert (second.request.request_id, second.request.priority, second.prompt) == ("x", 9, 12)


def test_a_waiting_id_cannot_be_pushed_twice() -> None:
    q = AdmissionQueue()
    q.push(req(7), ONE, 4)
    with pytest.raises(ValueError, match="request 7 is already queued"):
        q.push(req(7), ONE, 4)
    assert len(q) == 1


def test_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError, match="admission must be 'fcfs' or 'sjf', not 'lifo'"):
        AdmissionQueue("lifo")  # type: ignore[arg-type]


programs = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 9), st.integers(-1, 2), st.integers(0, 50)),
        st.tuples(st.just("cancel"), st.integers(0, 9)),
        st.tuples(st.just("pop")),
    ),
    max_size=60,
)


@given(programs, st.sampled_from(["fcfs", "sjf"]))
def test_the_queue_matches_a_sorted_list_model(program: list[Any], order: str) -> None:
    q = AdmissionQueue(order)  # type: ignore[arg-type]
    model: list[tuple[int, float, int, int, int]] = []  # (priority, size, arrival, id, prompt)
    arrival = 0
    for op in program:
        if op[0] == "push":
            _, rid, prio, prompt = op
            if any(m[3] == rid for m in model):
                with pytest.raises(ValueError):
                    q.push(req(rid, prio), ONE, prompt)
                continue
            q.push(req(rid, prio), ONE, prompt)
            model.append((prio, float(prompt) if order == "sjf" else 0.0, arrival, rid, prompt))
            arrival += 1
        elif op[0] == "cancel":
            before = len(model)
            model = [m for m in model if m[3] != op[1]]
            assert q.cancel(op[1]) == (len(model) < before)
        else:
            got = q.pop()
            if not model:
                assert got is None
                continue
            model.sort()
            want = model.pop(0)
            assert got is not None and (got.request.request_id, got.prompt) == (want[3], want[4])
        q._check()
        assert len(q) == len(model)
        assert all(m[3] in q for m in model)


# -- through the router ----------------------------------------------------------------


def test_the_router_routes_a_cancelled_and_resubmitted_request_with_its_new_content() -> None:
    # Regression: the queue used to serve the old heap entry of a cancelled id
    # submitted again, at its old place and with its old prompt.
    r = Router(
        block_size=4,
        workers=[0],
        policy="round_robin",
        clock=Clock(),
        busy_threshold=BusyThreshold(max_active_requests=1),
    )
    assert r.submit(Request("run", block_hashes=H(1))) is not None
    assert r.submit(Request("x", block_hashes=H(5), priority=0)) is None
    assert r.submit(Request("y", block_hashes=H(2), priority=3)) is None
    assert r.cancel("x")
    assert r.submit(Request("x", block_hashes=H(6, 7, 8), priority=9)) is None
    assert r.stats()["queued"] == 2
    r.finished("run")
    order = []
    while ready := r.pop_ready():
        order.append((ready[0].request_id, ready[0].prompt_tokens))
        r.finished(ready[0].request_id)
    assert order == [("y", 4), ("x", 12)]
    assert r.stats()["queued"] == 0
    r._check()


def test_the_router_queues_behind_waiting_requests_even_when_a_worker_frees_up() -> None:
    r = Router(
        block_size=4,
        workers=[0, 1],
        policy="round_robin",
        clock=Clock(),
        busy_threshold=BusyThreshold(max_active_requests=1),
    )
    assert r.submit(Request("a", block_hashes=H(1))) is not None
    assert r.submit(Request("b", block_hashes=H(1))) is not None
    assert r.submit(Request("c", block_hashes=H(1))) is None  # both busy
    r.finished("a")
    # a worker is free, but "c" waits first: "d" may not overtake it
    assert r.submit(Request("d", block_hashes=H(1))) is None
    assert [d.request_id for d in r.pop_ready()] == ["c"]
    with pytest.raises(ValueError, match="already queued or in flight"):
        r.submit(Request("d", block_hashes=H(1)))
    r.finished("b")
    assert [d.request_id for d in r.pop_ready()] == ["d"]
