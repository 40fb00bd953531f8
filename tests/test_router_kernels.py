"""The router's kernels: compiled ``kvroute._route`` against its twin ``kvroute._route_py``.

* Both twins run every test (ids ``c`` / ``py``); random operation lists must
  give the same result or the same exception, with the same message, on both.
* ``ActivePrefixes`` replaced a reference-counted ``BlockIndex`` of the prompt
  blocks in flight. For chained keys (what kvroute's hashing produces) the two
  must agree exactly on every count, which is what keeps routing decisions
  unchanged: checked here against a ``BlockIndex`` and, through the router,
  against a recount from the requests in flight.
* ``fresh_overlay`` must equal the loop it replaced in the router
  (``FreshDecisions.match`` then a merge into the overlap array).
"""

from __future__ import annotations

import doctest
import inspect
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from helpers import Clock, Twin, twin_ids, twins
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvroute._route_py as py_twin
from kvroute._index_py import BlockIndex as PyIndex
from kvroute.approx import FreshDecisions
from kvroute.hashing import kvroute_block_hashes
from kvroute.policies import Candidates, KvRoute
from kvroute.request import Request
from kvroute.router import Router

ROUTE_TWINS = twins("_route")
U64_MAX = 2**64 - 1


@pytest.fixture(params=ROUTE_TWINS, ids=twin_ids(ROUTE_TWINS))
def route_module(request: pytest.FixtureRequest) -> ModuleType:
    return request.param  # type: ignore[no-any-return]


def H(*xs: int) -> np.ndarray:
    return np.array(xs, np.uint64)


def chain(tokens: list[int], block_size: int = 1) -> np.ndarray:
    return kvroute_block_hashes(tokens, block_size)


class TinyModel:
    """An independent witness for the twin: a list of prompts per worker, compared key by key.

    A worker's active blocks are the distinct prefixes of its prompts; a new
    prompt shares with them its longest common prefix with one of them.
    """

    def __init__(self) -> None:
        self.prompts: dict[int, list[list[int]]] = {}

    @staticmethod
    def lcp(a: list[int], b: list[int]) -> int:
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        return k

    def shared(self, w: int, h: list[int], skip: int | None = None) -> int:
        mine = self.prompts.get(w, [])
        return max((self.lcp(a, h) for i, a in enumerate(mine) if i != skip), default=0)

    def add(self, w: int, h: list[int]) -> int:
        if not h:
            return 0
        new = len(h) - self.shared(w, h)
        self.prompts.setdefault(w, []).append(list(h))
        return new

    def remove(self, w: int, h: list[int]) -> int:
        if not h:
            return 0
        mine = self.prompts.get(w, [])
        if list(h) not in mine:
            raise KeyError(f"no prompt of {len(h)} blocks equal to this one is in flight on {w}")
        i = mine.index(list(h))
        gone = len(h) - self.shared(w, h, skip=i)
        del mine[i]
        return gone

    def remove_worker(self, w: int) -> int:
        return len(self.prompts.pop(w, []))

    def match_array(self, h: list[int], workers: list[int]) -> np.ndarray:
        return np.array([self.shared(w, h) for w in workers], np.uint32)

    def new_blocks(self, h: list[int], workers: list[int]) -> np.ndarray:
        return len(h) - self.match_array(h, workers).astype(np.float64)

    def worker_len(self, w: int) -> int:
        mine = self.prompts.get(w, [])
        return sum(
            len(a) - max((self.lcp(a, b) for b in mine[:i]), default=0) for i, a in enumerate(mine)
        )

    def __len__(self) -> int:
        return sum(map(len, self.prompts.values()))


def outcome(call: Any) -> tuple[Any, ...]:
    """A call's result (arrays by dtype and values), or its exception's type and message."""
    try:
        v = call()
    except (TypeError, ValueError, OverflowError, KeyError) as e:
        return ("raised", type(e), str(e))
    if isinstance(v, np.ndarray):
        return ("ok", str(v.dtype), tuple(v.tolist()))
    return ("ok", v)


# -- the specification ---------------------------------------------------------------


def test_twin_doctests_pass() -> None:
    result = doctest.testmod(py_twin, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_specification_doctests_hold_for_both_twins(route_module: ModuleType) -> None:
    specs = [t for t in doctest.DocTestFinder().find(py_twin.ActivePrefixes) if t.examples]
    assert specs
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for spec in specs:
        spec.globs = {"ActivePrefixes": route_module.ActivePrefixes, "np": np}
        runner.run(spec)
    assert runner.failures == 0


def test_twins_have_the_same_names_and_parameters(route_module: ModuleType) -> None:
    assert sorted(route_module.__all__) == sorted(py_twin.__all__)
    for name in py_twin.__all__:
        ours, spec = getattr(route_module, name), getattr(py_twin, name)
        if inspect.isclass(spec):
            methods = [
                m
                for m, v in vars(spec).items()
                if callable(v) and (not m.startswith("_") or m == "_check")
            ]
            pairs = [(getattr(ours, m), getattr(spec, m)) for m in methods]
        else:
            pairs = [(ours, spec)]
        for a, b in pairs:
            pa = [(p.name, p.kind, p.default) for p in inspect.signature(a).parameters.values()]
            pb = [(p.name, p.kind, p.default) for p in inspect.signature(b).parameters.values()]
            assert pa == pb, (name, a)


# -- ActivePrefixes ------------------------------------------------------------------


def test_shared_prefixes_count_once_and_leave_with_their_last_prompt(
    route_module: ModuleType,
) -> None:
    ap = route_module.ActivePrefixes()
    a, b, c = H(1, 2, 3, 4), H(1, 2, 3, 4, 5, 6), H(1, 2, 9)
    assert ap.add(0, a) == 4
    assert ap.add(0, b) == 2  # a is a prefix of b
    assert ap.add(0, c) == 1
    assert ap.add(0, a) == 0  # a second copy adds nothing
    assert ap.add(1, c) == 3  # other workers are apart
    assert (ap.worker_len(0), ap.worker_len(1), len(ap)) == (7, 3, 5)
    workers = H(0, 1, 2)
    assert ap.match_array(H(1, 2, 3, 4, 5, 7), workers).tolist() == [5, 2, 0]
    assert ap.new_blocks(H(1, 2, 3, 4, 5, 7), workers).tolist() == [1.0, 4.0, 6.0]
    ap._check()
    assert ap.remove(0, b) == 2
    assert ap.remove(0, a) == 0  # the other copy of a still holds its blocks
    assert ap.remove(0, a) == 2  # [1, 2] stay for c
    assert ap.remove(0, c) == 3  # the last prompt on worker 0
    assert (ap.worker_len(0), len(ap)) == (0, 1)
    ap._check()
    assert ap.remove_worker(1) == 1 and ap.remove_worker(1) == 0
    assert len(ap) == 0 and ap.match_array(c, workers).tolist() == [0, 0, 0]
    ap._check()


def test_empty_prompts_are_not_recorded(route_module: ModuleType) -> None:
    ap = route_module.ActivePrefixes()
    assert ap.add(3, H()) == 0 and ap.remove(3, H()) == 0 and len(ap) == 0
    assert ap.match_array(H(), H(3)).tolist() == [0]
    assert ap.new_blocks(H(), H(3)).tolist() == [0.0]


def test_keys_are_copied(route_module: ModuleType) -> None:
    ap = route_module.ActivePrefixes()
    h = H(5, 6, 7)
    ap.add(0, h)
    h[:] = 9
    assert ap.match_array(H(5, 6, 7), H(0)).tolist() == [3]
    assert ap.remove(0, H(5, 6, 7)) == 3


def test_removing_a_prompt_not_in_flight_raises_key_error(route_module: ModuleType) -> None:
    ap = route_module.ActivePrefixes()
    ap.add(0, H(1, 2, 3))
    for worker, h in ((0, H(1, 2)), (0, H(1, 2, 3, 4)), (0, H(1, 2, 4)), (1, H(1, 2, 3))):
        with pytest.raises(KeyError, match="is in flight on"):
            ap.remove(worker, h)
    ap.add(0, H(1, 2, 3, 4))  # [1, 2, 3] passes through, but also ends, at its node
    assert ap.remove(0, H(1, 2, 3)) == 0
    with pytest.raises(KeyError):
        ap.remove(0, H(1, 2, 3))
    ap._check()


def test_bad_input_raises_like_the_index(route_module: ModuleType) -> None:
    ap = route_module.ActivePrefixes()
    for worker in (-1, 2**64, "x", 1.5):
        ref = outcome(lambda w=worker: py_twin.ActivePrefixes().add(w, H(1)))
        assert ref[0] == "raised"
        assert outcome(lambda w=worker: ap.add(w, H(1))) == ref
        assert outcome(lambda w=worker: ap.remove(w, H(1))) == outcome(
            lambda w=worker: py_twin.ActivePrefixes().remove(w, H(1))
        )
        assert outcome(lambda w=worker: ap.worker_len(w)) == ref
    for keys in ("abc", [-1], np.array([1.5]), np.zeros((2, 2), np.uint64), [2**64]):
        ref = outcome(lambda k=keys: py_twin.ActivePrefixes().add(0, k))
        assert ref[0] == "raised"
        assert outcome(lambda k=keys: ap.add(0, k)) == ref
        assert outcome(lambda k=keys: ap.match_array(k, [0])) == outcome(
            lambda k=keys: py_twin.ActivePrefixes().match_array(k, [0])
        )
        assert outcome(lambda k=keys: ap.match_array([1], k)) == outcome(
            lambda k=keys: py_twin.ActivePrefixes().match_array([1], k)
        )
    assert len(ap) == 0


def test_extreme_worker_ids_and_keys(route_module: ModuleType) -> None:
    ap = route_module.ActivePrefixes()
    for w in (0, U64_MAX, 1 << 63):
        assert ap.add(w, H(0, U64_MAX, 0)) == 3
    assert ap.match_array(H(0, U64_MAX, 1), H(0, U64_MAX, 1 << 63, 7)).tolist() == [2, 2, 2, 0]
    assert ap.remove_worker(0) == 1
    assert ap.match_array(H(0, U64_MAX, 0), [0, U64_MAX]).tolist() == [0, 3]
    ap._check()


def test_remove_worker_repairs_the_tree(route_module: ModuleType) -> None:
    ap = route_module.ActivePrefixes()
    system = list(range(50))
    prompts = [chain([*system, w, i]) for w in range(4) for i in range(3)]
    for k, p in enumerate(prompts):
        ap.add(k % 4, p)
    ap._check()
    for w in (1, 3, 0):
        ap.remove_worker(w)
        ap._check()
    assert ap.worker_len(2) == 50 + 2 * 3
    for k, p in enumerate(prompts):
        if k % 4 == 2:
            ap.remove(2, p)
    assert ap.worker_len(2) == 0 and len(ap) == 0
    ap._check()


def test_churn_does_not_grow_memory() -> None:
    mod = ROUTE_TWINS[0]
    if not hasattr(mod.ActivePrefixes(), "sizeof"):
        pytest.skip("the compiled twin is not built (tests/test_build.py reports it)")
    ap = mod.ActivePrefixes()
    rng = np.random.default_rng(0)
    head = rng.integers(1, 2**63, 64, dtype=np.uint64)
    prompts = [
        np.concatenate([head, rng.integers(1, 2**63, 200, dtype=np.uint64)]) for _ in range(50)
    ]
    sizes = []
    for _ in range(5):
        for k, p in enumerate(prompts):
            ap.add(k % 8, p)
        for k, p in enumerate(prompts):
            ap.remove(k % 8, p)
        sizes.append(ap.sizeof())
        assert len(ap) == 0
    ap._check()
    assert sizes[-1] == sizes[0]


# Small alphabets on purpose: repeated keys, shared prefixes, sentinel-like values.
KEYS = st.sampled_from([0, 1, 2, 3, U64_MAX, 1 << 63])
PROMPTS = st.lists(KEYS, max_size=8)
WORKERS = st.sampled_from([0, 1, 2, U64_MAX])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), WORKERS, PROMPTS),
        st.tuples(st.just("remove"), WORKERS, PROMPTS),
        st.tuples(st.just("remove_in_flight"), st.integers(0, 50)),
        st.tuples(st.just("remove_worker"), WORKERS),
        st.tuples(st.just("match"), PROMPTS),
    ),
    max_size=40,
)


def _replay(ops: list[tuple[Any, ...]], impls: list[Any]) -> None:
    """Run ``ops`` on every implementation; each call must give the same outcome on all."""
    in_flight: list[tuple[int, list[int]]] = []
    everyone = [0, 1, 2, U64_MAX, 5]
    for op in ops:
        if op[0] == "remove_in_flight":
            if not in_flight:
                continue
            op = ("remove", *in_flight.pop(op[1] % len(in_flight)))
        if op[0] == "add":
            calls = [lambda t, o=op: t.add(o[1], o[2])]
            if op[2]:
                in_flight.append((op[1], op[2]))
        elif op[0] == "remove":
            calls = [lambda t, o=op: t.remove(o[1], o[2])]
        elif op[0] == "remove_worker":
            calls = [lambda t, o=op: t.remove_worker(o[1])]
            in_flight = [f for f in in_flight if f[0] != op[1]]
        else:
            calls = [
                lambda t, o=op: t.match_array(o[1], everyone),
                lambda t, o=op: t.new_blocks(o[1], everyone),
            ]
        for call in calls:
            results = {outcome(lambda call=call, t=t: call(t)) for t in impls}
            assert len(results) == 1, (op, results)
        assert len({len(t) for t in impls}) == 1
        assert len({tuple(t.worker_len(w) for w in everyone) for t in impls}) == 1
        for t in impls:
            if hasattr(t, "_check"):
                t._check()


@given(OPS)
@settings(deadline=None)
def test_twin_agrees_with_a_list_of_prompts(ops: list[tuple[Any, ...]]) -> None:
    _replay(ops, [py_twin.ActivePrefixes(), TinyModel()])


@pytest.mark.skipif(len(ROUTE_TWINS) < 2, reason="kvroute._route is not loaded")
@given(OPS)
@settings(deadline=None)
def test_twins_agree_on_random_operation_lists(ops: list[tuple[Any, ...]]) -> None:
    _replay(ops, [ROUTE_TWINS[0].ActivePrefixes(), py_twin.ActivePrefixes()])


# Chained keys over a tiny token alphabet: prompts that share prefixes, diverge and end
# inside one another, as real traffic does.
CHAINED_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.lists(st.integers(0, 2), max_size=10)),
        st.tuples(st.just("remove"), st.integers(0, 100)),
        st.tuples(st.just("remove_worker"), st.integers(0, 3)),
    ),
    max_size=40,
)


@given(CHAINED_OPS, st.lists(st.lists(st.integers(0, 2), max_size=12), min_size=1, max_size=4))
@settings(deadline=None)
def test_for_chained_keys_the_counts_equal_a_ref_counted_block_index(
    ops: list[tuple[Any, ...]], probes: list[list[int]]
) -> None:
    # The design this replaced: every prompt block stored in a BlockIndex while in flight.
    for mod in ROUTE_TWINS:
        ap, ref = mod.ActivePrefixes(), PyIndex()
        in_flight: list[tuple[int, np.ndarray]] = []
        workers = np.arange(4, dtype=np.uint64)
        for op in ops:
            if op[0] == "add":
                h = chain(op[2])
                before = ref.worker_len(op[1])
                if len(h):
                    ref.store(op[1], h)
                    in_flight.append((op[1], h))
                assert ap.add(op[1], h) == ref.worker_len(op[1]) - before
            elif op[0] == "remove" and in_flight:
                w, h = in_flight.pop(op[1] % len(in_flight))
                before = ref.worker_len(w)
                ref.remove(w, h)
                assert ap.remove(w, h) == before - ref.worker_len(w)
            elif op[0] == "remove_worker":
                ref.remove_worker(op[1])
                ap.remove_worker(op[1])
                in_flight = [f for f in in_flight if f[0] != op[1]]
            for q in map(chain, probes):
                assert ap.match_array(q, workers).tolist() == ref.match_array(q, workers).tolist()
            for w in range(4):
                assert ap.worker_len(w) == ref.worker_len(w)
        ap._check()


def test_a_long_random_history_keeps_the_invariants(route_module: ModuleType) -> None:
    rng = np.random.default_rng(7)
    ap = route_module.ActivePrefixes()
    ref = py_twin.ActivePrefixes() if route_module is not py_twin else None
    systems = [rng.integers(0, 4, size=n).tolist() for n in (0, 20, 40)]
    in_flight: list[tuple[int, np.ndarray]] = []
    for step in range(600):
        if rng.random() < 0.55 or not in_flight:
            toks = systems[rng.integers(3)] + rng.integers(0, 3, size=rng.integers(0, 30)).tolist()
            w, h = int(rng.integers(6)), chain(toks)
            got = ap.add(w, h)
            if ref is not None:
                assert got == ref.add(w, h)
            if len(h):
                in_flight.append((w, h))
        else:
            w, h = in_flight.pop(int(rng.integers(len(in_flight))))
            got = ap.remove(w, h)
            if ref is not None:
                assert got == ref.remove(w, h)
        if step % 50 == 0:
            ap._check()
    ap._check()
    for w, h in in_flight:
        ap.remove(w, h)
    assert len(ap) == 0 and all(ap.worker_len(w) == 0 for w in range(6))
    ap._check()


# -- fresh_overlay -------------------------------------------------------------------


def _merge_like_before(
    fd: FreshDecisions, hashes: np.ndarray, now: float, ov: np.ndarray, pos: dict[int, int]
) -> None:
    """The router's loop before fresh_overlay: match with the index's view, then merge."""
    known = {w: int(ov[p]) for w, p in pos.items()}
    for w, k in fd.match(hashes, now, known or None).items():
        p = pos.get(w)
        if p is not None and k > ov[p]:
            ov[p] = k


@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.lists(st.integers(0, 2), max_size=10), st.floats(0, 9)),
        max_size=8,
    ),
    st.lists(st.integers(0, 2), min_size=1, max_size=10),
    st.lists(st.integers(0, 6), max_size=5),
    st.floats(0, 10),
)
@settings(deadline=None)
def test_overlay_equals_the_match_and_merge_it_replaced(
    decisions: list[tuple[int, list[int], float]],
    prompt: list[int],
    index_match: list[int],
    now: float,
) -> None:
    fd = FreshDecisions(ttl=3.0)
    for w, toks, t in decisions:
        fd.record(w, chain(toks), t)
    q = chain(prompt)
    pos = {w: w for w in range(4)}  # workers 4 and 5 are unknown to the router
    ov0 = np.zeros(4, np.int64)
    ov0[: len(index_match[:4])] = [min(k, len(q)) for k in index_match[:4]]
    want = ov0.copy()
    _merge_like_before(fd, q, now, want, pos)
    got = ov0.copy()
    fd.overlay(q, now, got, pos, skip_known=True)
    assert got.tolist() == want.tolist()
    for mod in ROUTE_TWINS:
        d = fd._by_first.get(int(q[0]), [])
        o = ov0.copy()
        raised = mod.fresh_overlay(d, q, now, o, pos, True)
        assert o.tolist() == want.tolist() and raised == int((want != ov0).sum())


def test_overlay_zeroes_the_slower_tiers_where_it_raises(route_module: ModuleType) -> None:
    q = H(1, 2, 3, 4)
    entries = [[7, q, 10.0], [8, H(1, 2), 10.0], [9, H(1, 5, 6), 0.5]]
    ov = np.array([2, 3, 1], np.int64)
    host = np.array([1, 1, 1], np.int64)
    disk = np.array([1, 1, 0], np.int64)
    pos = {7: 0, 8: 1, 9: 2}
    assert route_module.fresh_overlay(entries, q, 1.0, ov, pos, False, host, disk) == 1
    assert (ov.tolist(), host.tolist(), disk.tolist()) == ([4, 3, 1], [0, 1, 1], [0, 1, 0])


@given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
def test_common_prefix_functions_agree(a: list[int], b: list[int]) -> None:
    ka, kb = chain(a), chain(b)
    k = 0
    while k < min(len(ka), len(kb)) and ka[k] == kb[k]:
        k += 1
    for mod in ROUTE_TWINS:
        assert mod.common_prefix(ka, kb) == k
        assert mod.chained_common_prefix(ka, kb) == k
        assert mod.common_prefix(H(*a), H(*b)) == py_twin.common_prefix(H(*a), H(*b))
        assert mod.chained_common_prefix(H(*a), H(*b)) == py_twin.chained_common_prefix(
            H(*a), H(*b)
        )


# -- the kvroute policy's arithmetic ------------------------------------------------

COST_VALUES = st.one_of(
    st.integers(0, 5000).map(float),
    st.sampled_from([0.5, 2.5, 1e-300, 1e300, float("nan"), float("inf"), float("-inf")]),
)


@st.composite
def kvroute_snapshots(draw: Any) -> tuple[Candidates, int, int, KvRoute]:
    """Candidates with ties, over-share workers, busy ones and broken (non-finite) state."""
    n = draw(st.integers(1, 12))
    ints = st.lists(st.integers(0, 60), min_size=n, max_size=n)
    floats = st.lists(st.integers(0, 400).map(float), min_size=n, max_size=n)
    overlap = draw(ints)
    tiered = draw(st.booleans())
    kw: dict[str, Any] = {
        "overlap": overlap,
        "prefill_tokens": draw(floats),
        "decode_blocks": draw(floats),
        "new_decode_blocks": draw(floats),
        "active_requests": draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)),
        "waiting": draw(st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.5]), min_size=n, max_size=n)),
        "kv_usage": draw(st.lists(st.sampled_from([0.0, 0.5, 0.93, 1.0]), min_size=n, max_size=n)),
        "busy": draw(st.lists(st.booleans(), min_size=n, max_size=n)),
    }
    if tiered:
        kw["overlap_host"] = [min(o, h) for o, h in zip(overlap, draw(ints), strict=True)]
        kw["overlap_disk"] = [0] * n
    if draw(st.booleans()):  # one broken worker
        kw[draw(st.sampled_from(["prefill_tokens", "decode_blocks"]))][
            draw(st.integers(0, n - 1))
        ] = draw(COST_VALUES)
    c = Candidates.build(list(range(n)), **kw)
    policy = KvRoute(
        balance_slack=draw(st.sampled_from([0.0, 0.25])),
        balance_abs_slack=draw(st.sampled_from([0.0, 2.0])),
        balance_stake_tokens=draw(st.sampled_from([100.0, 40_000.0])),
        balance_stake_limit=draw(st.sampled_from([0.0, 60_000.0])),
        uncached_weight=draw(st.sampled_from([1.0, 1.5, 0.1])),
    )
    return c, draw(st.integers(0, 40_000)), draw(st.sampled_from([16, 512])), policy


@pytest.mark.skipif(len(ROUTE_TWINS) < 2, reason="kvroute._route is not loaded")
@given(kvroute_snapshots())
@settings(deadline=None)
def test_kvroute_costs_twins_agree_bit_for_bit(
    case: tuple[Candidates, int, int, KvRoute],
) -> None:
    c, prompt, bs, policy = case
    (costs_a, ties_a), (costs_b, ties_b) = (
        mod.kvroute_costs(c, prompt, bs, policy) for mod in ROUTE_TWINS
    )
    assert ties_a == ties_b and ties_a
    assert list(costs_a) == list(costs_b)
    for name, a in costs_a.items():
        b = costs_b[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name  # the same bits, NaNs and signed zeros included


@given(kvroute_snapshots())
@settings(deadline=None)
def test_kvroute_costs_ties_are_the_cheapest_eligible_and_least_loaded(
    case: tuple[Candidates, int, int, KvRoute],
) -> None:
    c, prompt, bs, policy = case
    costs, ties = py_twin.kvroute_costs(c, prompt, bs, policy)
    cost, eligible = costs["cost"], costs["eligible"]
    finite = np.where(np.isfinite(cost), cost, np.inf)
    load = c.active_requests + c.waiting
    if np.isfinite(finite[eligible]).any():
        best = finite[eligible].min()
        assert all(eligible[t] and finite[t] <= best + 1e-9 * max(abs(best), 1.0) for t in ties)
        assert len({float(load[t]) for t in ties}) == 1
    assert ties == sorted(set(ties))


def test_a_minus_infinite_cost_is_broken_state_and_never_chosen(route_module: ModuleType) -> None:
    # a -inf cost made the tie threshold NaN and left no candidate (numpy raised on the draw)
    c = Candidates.build([1, 2, 3], prefill_tokens=[float("-inf"), 0.0, 5.0])
    costs, ties = route_module.kvroute_costs(c, 160, 16, KvRoute())
    assert ties == [1] and costs["cost"][0] == float("-inf")
    c = Candidates.build([1, 2], prefill_tokens=[float("nan"), float("inf")])
    assert route_module.kvroute_costs(c, 160, 16, KvRoute())[1] == [0, 1]


def test_kvroute_costs_reads_the_policy_parameters_on_every_call(
    route_module: ModuleType,
) -> None:
    c = Candidates.build([1, 2], overlap=[0, 10], active_requests=[0, 1])
    policy = KvRoute()
    assert route_module.kvroute_costs(c, 160, 16, policy)[1] == [1]
    policy.active_request_tokens = 1000.0  # one request now outweighs the 160 cached tokens
    costs, ties = route_module.kvroute_costs(c, 160, 16, policy)
    assert ties == [0] and costs["queue"].tolist() == [0.0, 1000.0]


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("overlap", np.zeros(2, np.int32)),
        ("prefill_tokens", np.zeros(3)),
        ("waiting", np.zeros(4)[::2]),
        ("busy", np.zeros(2, np.uint8)),
        ("prefill_tokens", np.zeros(2, ">f8")),  # byte-swapped
        ("kv_usage", [0.0, 0.0]),
    ],
)
def test_kvroute_costs_refuses_arrays_of_the_wrong_kind(
    route_module: ModuleType, field: str, bad: Any
) -> None:
    c = Candidates.build([1, 2])
    setattr(c, field, bad)
    with pytest.raises(TypeError, match=f"candidates.{field} must be a contiguous"):
        route_module.kvroute_costs(c, 16, 16, KvRoute())
    c = Candidates.build([1])
    c.workers = np.zeros(0, np.uint64)
    with pytest.raises(ValueError, match="at least one worker"):
        route_module.kvroute_costs(c, 16, 16, KvRoute())


# -- through the router --------------------------------------------------------------


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("route"), st.lists(st.integers(0, 2), max_size=12)),
            st.tuples(st.sampled_from(["first_token", "finished", "failed"]), st.integers(0, 30)),
        ),
        max_size=40,
    ),
    st.sampled_from(["kvroute", "kv_cost", "round_robin"]),
)
# the twin fixture only rebinds module names, the same for every example
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_router_decode_blocks_equal_the_unique_keys_in_flight(
    twin: Twin, program: list[tuple[Any, ...]], policy: str
) -> None:
    # Dynamo's definition, recounted from scratch: the distinct prompt keys of the
    # requests in flight per worker, plus their expected output blocks.
    r = Router(
        block_size=1,
        workers=[0, 1, 2],
        policy=policy,
        policy_params={"seed": 0} if policy != "round_robin" else None,
        clock=Clock(),
        index_factory=twin.BlockIndex,
    )
    r.apply_stored(1, chain([0, 0, 0]))
    started: list[str] = []
    for k, op in enumerate(program):
        if op[0] == "route":
            rid = f"r{k}"
            r.route(Request(rid, block_hashes=chain(op[1]), expected_output_tokens=k % 3))
            started.append(rid)
        elif started:
            getattr(r, op[0])(started[op[1] % len(started)])
        lt = r._load
        for w, p in lt.pos.items():
            keys: set[int] = set()
            out = 0.0
            for req in lt.requests.values():
                if req.worker == w:
                    keys.update(int(x) for x in req.hashes if req.hashes is not None)
                    out += req.decode_blocks
            assert lt.decode_blocks[p] == len(keys) + out
            probe = chain([0, 1, 2])
            held = 0
            while held < len(probe) and int(probe[held]) in keys:
                held += 1
            assert lt.new_blocks(probe)[p] == len(probe) - held
    r._check()
