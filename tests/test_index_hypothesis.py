"""Property tests of BlockIndex: the twins side by side, and a state machine per pair.

* ``test_twins_agree_on_random_operation_lists`` runs one random list of
  operations (out-of-range input included) against the compiled index and the
  pure-Python twin and requires the same result or the same exception, with the
  same message, for every operation, and the same observable state after it.
* ``CompiledAgainstTwin`` is a state machine with the twin as the model and the
  compiled index as the system under test.
* ``TwinAgainstTinyModel`` checks the twin itself against ``TinyModel``, an
  independent model built on a ``Counter`` keyed by (worker, key, tier): the
  twin is the specification, so it needs a witness of its own.

The first two need the compiled module and skip without it
(tests/test_build.py fails loudly in that case).
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from helpers import compiled
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import kvroute._index_py as py_twin

U64_MAX = 2**64 - 1
FIB_INV = pow(0x9E3779B97F4A7C15, -1, 2**64)
MAX_COPIES = py_twin.MAX_COPIES
TIERS = ("device", "host", "disk")


COMPILED = compiled("_index")
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="kvroute._index is not loaded")


# -- observable state ------------------------------------------------------------


def observe(idx: Any, probes: Iterable[list[int]], workers: Iterable[int]) -> dict[str, Any]:
    """Everything a caller can see without mutating the index."""
    probes = list(probes)
    everyone = sorted(set(workers) | set(idx.workers()))
    arrays = [idx.match_array(p, everyone) for p in probes]
    return {
        "len": len(idx),
        "residencies": idx.residencies(),
        "workers": idx.workers(),
        "worker_len": {w: idx.worker_len(w) for w in everyone},
        "stats": idx.stats(),
        "match": [idx.match(p) for p in probes],
        "match_tiers": [idx.match_tiers(p) for p in probes],
        "match_array": [(str(a.dtype), a.tolist()) for a in arrays],
    }


def result(value: Any) -> Any:
    """A call's result in a comparable form (numpy arrays by dtype and values)."""
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.tolist())
    return value


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """A call's result, or its exception's type and message."""
    try:
        return ("ok", result(call()))
    except (TypeError, ValueError, OverflowError) as e:
        return ("raised", type(e), str(e))


# -- differential test over random operation lists ----------------------------

# Sentinel-like, colliding (same low bits; same Fibonacci home slot) and plain keys.
KEYS = [
    0, 1, 2, 3, 2**32, 2**33, 2**63, 2**63 + 1, U64_MAX - 1, U64_MAX,
    1 << 56, 2 << 56, 3 << 56,
    FIB_INV, (2 * FIB_INV) % 2**64, (3 * FIB_INV) % 2**64,
    (U64_MAX * FIB_INV) % 2**64, ((U64_MAX - 1) * FIB_INV) % 2**64,
]  # fmt: skip
# Prefix-ordered slices of KEYS: drawing from these (rather than only random
# lists) makes a later removal, re-store or match hit what an earlier store did.
PIECES = [KEYS[i : i + n] for i in (0, 3, 6, 10, 13, 16) for n in (1, 3, 5)]
WORKERS = [0, 1, 2**63, U64_MAX]
LIFECYCLE = ["store", "store with handles", "remove by key", "remove by engine hash", "clear"]
ENGINE = [0, 1, 7, U64_MAX]  # 0 and 1 are also keys: they must not be confused
BAD_WORKERS: list[Any] = [-1, 2**64, "x", 1.5, None]
BAD_ITEMS = [-1, 2**64]

# Valid operations draw only valid values, weighted towards a few workers and
# prefix-ordered pieces so that operations meet; a separate kind of operation
# draws from valid and invalid values alike, so most of its calls raise.
good_worker = st.sampled_from([0, U64_MAX] * 3 + [1, 2**63])
any_worker = st.sampled_from([0, U64_MAX, 1, *BAD_WORKERS])
good_keys = st.one_of(
    st.sampled_from(PIECES), st.sampled_from(PIECES), st.lists(st.sampled_from(KEYS), max_size=6)
)
any_keys = st.one_of(good_keys, st.lists(st.sampled_from(KEYS[:4] + BAD_ITEMS), max_size=4))
good_tier = st.sampled_from(["device"] * 3 + ["host", "disk"])
any_tier = st.sampled_from([*TIERS, "gpu", "", None])
good_parent = st.sampled_from([None, None, None, 0, 1, 2, 2**63, U64_MAX])
any_parent = st.sampled_from([None, 0, U64_MAX, *BAD_ITEMS, "p"])
FORMS = ["list", "tuple", "generator", "uint64", "uint64", "array_Q", "int64", "big_endian"]
BAD_FORMS = ["str", "bytes", "float", "two_d"]
good_form = st.sampled_from(FORMS)
any_form = st.sampled_from(FORMS + BAD_FORMS)


def materialize(form: str, items: list[Any]) -> Any:
    """Build the input for one call (generators are single-use: one per twin)."""
    in_u64 = all(isinstance(v, int) and 0 <= v <= U64_MAX for v in items)
    if form == "tuple":
        return tuple(items)
    if form == "generator":
        return (v for v in items)
    if form == "uint64" and in_u64:
        return np.array(items, dtype=np.uint64)
    if form == "big_endian" and in_u64:
        return np.array(items, dtype=">u8")
    if form == "array_Q" and in_u64:
        return array("Q", items)
    if form == "int64" and all(isinstance(v, int) and -(2**63) <= v < 2**63 for v in items):
        return np.array(items, dtype=np.int64)  # negative items take the OverflowError path
    if form == "str":
        return "abc"
    if form == "bytes":
        return b"\x01\x02"
    if form == "float":
        return np.array([float(i) for i in range(len(items))])
    if form == "two_d":
        return np.zeros((1, max(len(items), 1)), dtype=np.uint64)
    return list(items)


@st.composite
def store_op(draw: st.DrawFn, valid: bool) -> tuple[Any, ...]:
    keys = draw(good_keys if valid else any_keys)
    engine: tuple[str, list[Any]] | None = None
    if draw(st.booleans()):
        # An invalid store sometimes passes one engine hash too many.
        n = len(keys) + (0 if valid else draw(st.sampled_from([0, 1])))
        pool = ENGINE if valid else ENGINE + BAD_ITEMS
        engine = (draw(good_form), draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)))
    return (
        "store",
        draw(good_worker if valid else any_worker),
        (draw(good_form if valid else any_form), keys),
        draw(good_parent if valid else any_parent),
        draw(good_tier if valid else any_tier),
        engine,
    )


@st.composite
def remove_op(draw: st.DrawFn, valid: bool) -> tuple[Any, ...]:
    engine = draw(st.booleans())
    if engine:
        pool = [*ENGINE, 31337] if valid else ENGINE + BAD_ITEMS
        keys = draw(st.lists(st.sampled_from(pool), max_size=4))
    else:
        keys = draw(good_keys if valid else any_keys)
    return (
        "remove",
        draw(good_worker if valid else any_worker),
        (draw(good_form if valid else any_form), keys),
        engine,
        draw(good_tier if valid else any_tier),
    )


# Each kind of operation, and how often it is drawn (st.one_of would weigh the
# kinds evenly, whatever their use).
OPERATIONS: dict[str, tuple[int, st.SearchStrategy[tuple[Any, ...]]]] = {
    "store": (5, store_op(valid=True)),
    "remove": (4, remove_op(valid=True)),
    "clear": (1, st.tuples(st.just("clear"), good_worker)),
    "remove_worker": (1, st.tuples(st.just("remove_worker"), good_worker)),
    "match": (
        1,
        st.tuples(st.sampled_from(["match", "match_tiers"]), st.tuples(good_form, good_keys)),
    ),
    "match_array": (
        1,
        st.tuples(
            st.just("match_array"),
            st.tuples(good_form, good_keys),
            st.tuples(good_form, st.lists(good_worker, max_size=4)),
        ),
    ),
    "worker_len": (1, st.tuples(st.just("worker_len"), good_worker)),
    # Enough copies of one key to reach the copy limit, then some removed.
    "copies": (
        1,
        st.tuples(
            st.just("copies"),
            good_worker,
            st.sampled_from(KEYS),
            good_tier,
            st.sampled_from([MAX_COPIES - 1, MAX_COPIES, MAX_COPIES + 2]),
            st.sampled_from([0, 1, MAX_COPIES - 1, MAX_COPIES, MAX_COPIES + 1]),
        ),
    ),
    # One piece through a short life (store with handles, drop by key or clear,
    # store again, remove by engine hash...): where handle bugs show, and a
    # sequence that independent random operations rarely line up.
    "lifecycle": (
        3,
        st.tuples(
            st.just("lifecycle"),
            good_worker,
            st.sampled_from(PIECES),
            good_tier,
            st.lists(st.sampled_from(ENGINE), min_size=5, max_size=5),
            st.lists(st.sampled_from(LIFECYCLE), min_size=1, max_size=5),
        ),
    ),
    # Mostly invalid input: same exception and message, and nothing applied.
    "invalid store": (1, store_op(valid=False)),
    "invalid remove": (1, remove_op(valid=False)),
    "invalid match": (
        1,
        st.tuples(st.sampled_from(["match", "match_tiers"]), st.tuples(any_form, any_keys)),
    ),
    "invalid worker": (
        1,
        st.tuples(st.sampled_from(["clear", "remove_worker", "worker_len"]), any_worker),
    ),
    "invalid match_array": (
        1,
        st.tuples(
            st.just("match_array"),
            st.tuples(any_form, any_keys),
            st.tuples(any_form, st.lists(any_worker, max_size=3)),
        ),
    ),
}
op_st = st.sampled_from([kind for kind, (n, _) in OPERATIONS.items() for _ in range(n)]).flatmap(
    lambda kind: OPERATIONS[kind][1]
)


def apply(idx: Any, op: tuple[Any, ...]) -> tuple[Any, ...]:
    name = op[0]
    if name == "store":
        _, worker, (form, keys), parent, tier, engine = op
        eng = None if engine is None else materialize(*engine)
        return outcome(
            lambda: idx.store(worker, materialize(form, keys), parent, tier=tier, engine_hashes=eng)
        )
    if name == "remove":
        _, worker, (form, keys), engine, tier = op
        return outcome(
            lambda: idx.remove(worker, materialize(form, keys), engine=engine, tier=tier)
        )
    if name == "copies":
        _, worker, key, tier, stored, removed = op
        return (
            outcome(lambda: idx.store(worker, np.full(stored, key, dtype=np.uint64), tier=tier)),
            outcome(lambda: idx.remove(worker, np.full(removed, key, dtype=np.uint64), tier=tier)),
        )
    if name == "lifecycle":
        _, worker, keys, tier, engine, actions = op
        eng = engine[: len(keys)]
        steps = [lambda: idx.store(worker, keys, tier=tier, engine_hashes=eng)]
        for action in actions:
            steps.append(
                {
                    "store": lambda: idx.store(worker, keys, tier=tier),
                    "store with handles": lambda: idx.store(
                        worker, keys, tier=tier, engine_hashes=eng
                    ),
                    "remove by key": lambda: idx.remove(worker, keys, tier=tier),
                    "remove by engine hash": lambda: idx.remove(
                        worker, eng, engine=True, tier=tier
                    ),
                    "clear": lambda: idx.clear(worker),
                }[action]
            )
        return tuple(outcome(step) for step in steps)
    if name == "match_array":
        _, (form, keys), (wform, workers) = op
        return outcome(
            lambda: idx.match_array(materialize(form, keys), materialize(wform, workers))
        )
    if name in ("match", "match_tiers"):
        form, keys = op[1]
        return outcome(lambda: getattr(idx, name)(materialize(form, keys)))
    return outcome(lambda: getattr(idx, name)(op[1]))


DIFF_PROBES = [[k] for k in KEYS] + [KEYS, KEYS[:4], KEYS[10:], KEYS[::-1]]


@needs_compiled
@given(ops=st.lists(op_st, min_size=10, max_size=60))
def test_twins_agree_on_random_operation_lists(ops: list[tuple[Any, ...]]) -> None:
    assert COMPILED is not None
    c, p = COMPILED.BlockIndex(), py_twin.BlockIndex()
    for step, op in enumerate(ops):
        got, want = apply(c, op), apply(p, op)
        assert got == want, f"step {step}: {op!r}"
        c._check()
        p._check()
        assert observe(c, DIFF_PROBES, WORKERS) == observe(p, DIFF_PROBES, WORKERS), (
            f"state after step {step}: {op!r}"
        )


# -- an independent model of the specification ---------------------------------


class TinyModel:
    """BlockIndex's documented behaviour, from a Counter of (worker, key, tier) copies.

    Valid input only; the twins' validation is covered elsewhere.
    """

    def __init__(self) -> None:
        self.copies: Counter[tuple[int, int, int]] = Counter()
        self.handles: dict[int, dict[int, int]] = {}  # worker -> engine hash -> key
        self.counters = {"unknown_removals": 0, "orphan_stores": 0, "saturated": 0}

    def _holds(self, w: int, k: int) -> bool:
        return any(self.copies[(w, k, t)] for t in range(3))

    def _pairs(self) -> set[tuple[int, int]]:
        return {(w, k) for (w, k, _), n in self.copies.items() if n}

    def store(
        self,
        worker: int,
        hashes: list[int],
        parent: int | None = None,
        *,
        tier: str = "device",
        engine_hashes: list[int] | None = None,
    ) -> None:
        t = TIERS.index(tier)
        self.handles.setdefault(worker, {})
        if parent is not None and not self._holds(worker, parent):
            self.counters["orphan_stores"] += 1
        for i, k in enumerate(hashes):
            if self.copies[(worker, k, t)] >= MAX_COPIES:
                self.counters["saturated"] += 1
            else:
                self.copies[(worker, k, t)] += 1
            if engine_hashes is not None:
                self.handles[worker][engine_hashes[i]] = k

    def remove(
        self, worker: int, hashes: list[int], *, engine: bool = False, tier: str = "device"
    ) -> int:
        t = TIERS.index(tier)
        unknown = 0
        for h in hashes:
            k = self.handles.get(worker, {}).get(h) if engine else h
            if k is None or not self.copies[(worker, k, t)]:
                unknown += 1
                continue
            self.copies[(worker, k, t)] -= 1
            if not self._holds(worker, k):
                named = self.handles[worker]
                self.handles[worker] = {e: v for e, v in named.items() if v != k}
        self.counters["unknown_removals"] += unknown
        self.copies = +self.copies
        return unknown

    def clear(self, worker: int) -> int:
        dropped = len({k for w, k in self._pairs() if w == worker})
        self.copies = Counter({wkt: n for wkt, n in self.copies.items() if wkt[0] != worker})
        if worker in self.handles:
            self.handles[worker] = {}
        return dropped

    def remove_worker(self, worker: int) -> int:
        dropped = self.clear(worker)
        self.handles.pop(worker, None)
        return dropped

    def match_tiers(self, hashes: list[int]) -> dict[int, tuple[int, int, int]]:
        result = {}
        for w in self.handles:
            split = [0, 0, 0]
            for k in hashes:
                held = [self.copies[(w, k, t)] for t in range(3)]
                if not any(held):
                    break
                split[next(t for t in range(3) if held[t])] += 1
            if any(split):
                result[w] = (split[0], split[1], split[2])
        return result

    def match(self, hashes: list[int]) -> dict[int, int]:
        return {w: sum(s) for w, s in self.match_tiers(hashes).items()}

    def match_array(self, hashes: list[int], workers: list[int]) -> np.ndarray:
        m = self.match(hashes)
        return np.array([m.get(w, 0) for w in workers], dtype=np.uint32)

    def workers(self) -> list[int]:
        return sorted(self.handles)

    def worker_len(self, worker: int) -> int:
        return len({k for w, k in self._pairs() if w == worker})

    def residencies(self) -> int:
        return len(self._pairs())

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def __len__(self) -> int:
        return len({k for _, k in self._pairs()})

    def _check(self) -> None:
        assert all(0 < n <= MAX_COPIES for n in self.copies.values())
        assert {w for w, _ in self._pairs()} <= set(self.handles)
        for w, named in self.handles.items():
            assert all(self._holds(w, k) for k in named.values())


# -- state machines ------------------------------------------------------------

CHAINS = [
    [11, 12, 13, 14, 15, 16],
    [11, 12, 13, 24, 25],  # shares a prefix with the first
    [0, U64_MAX, 2**63, 1],  # sentinel-like keys
    [(i * FIB_INV) % 2**64 for i in range(1, 6)],  # one Fibonacci home slot
    [i << 56 for i in range(1, 6)],  # equal modulo 2**56
]
MACHINE_KEYS = sorted({k for chain in CHAINS for k in chain})
MACHINE_PROBES = [chain[i:] for chain in CHAINS for i in range(len(chain))]
MACHINE_WORKERS = [0, 1, U64_MAX]
MACHINE_ENGINE = [0, 1, 12, U64_MAX]

m_worker = st.sampled_from(MACHINE_WORKERS)
m_tier = st.sampled_from(["device", "device", "host", "disk"])
m_parent = st.sampled_from(["chain", "chain", "none", "stray"])


@st.composite
def chain_slice(draw: st.DrawFn) -> tuple[list[int], int, int]:
    """A chain, a start inside it and a length (possibly running past its end)."""
    chain = draw(st.sampled_from(CHAINS))
    return chain, draw(st.integers(0, len(chain) - 1)), draw(st.integers(0, 6))


m_slice = chain_slice()


class IndexMachine(RuleBasedStateMachine):
    """Drive a model and a system under test with the same valid operations.

    ``pieces`` remembers what was stored (worker, keys, tier, engine hashes)
    so that later steps can remove, re-store or resolve exactly that: the
    sequences where copy counts and engine handles go wrong.
    """

    make_model: Callable[[], Any]
    make_sut: Callable[[], Any]

    @initialize()
    def fresh(self) -> None:
        self.model = type(self).make_model()
        self.sut = type(self).make_sut()
        self.pieces: list[tuple[int, list[int], str, list[int] | None]] = []

    def both(self, call: Callable[[Any], Any]) -> Any:
        want = call(self.model)
        got = call(self.sut)
        assert got == want
        return got

    def recorded(self, data: Any, what: str) -> tuple[int, list[int], str, list[int] | None] | None:
        """A piece stored earlier, half of the time once there is one."""
        if self.pieces and data.draw(st.booleans(), label=f"{what} a recorded piece"):
            piece: tuple[int, list[int], str, list[int] | None]
            piece = data.draw(st.sampled_from(self.pieces), label="piece")
            return piece
        return None

    @rule(worker=m_worker, piece=m_slice, parent=m_parent, tier=m_tier, data=st.data())
    def store(
        self, worker: int, piece: tuple[list[int], int, int], parent: str, tier: str, data: Any
    ) -> None:
        again = self.recorded(data, "store again")
        if again is not None:
            w, keys, _, engine = again
            if not data.draw(st.booleans(), label="with its engine hashes"):
                engine = None
            self.both(lambda idx: idx.store(w, keys, tier=tier, engine_hashes=engine))
            return
        chain, start, n = piece
        keys = chain[start : start + n]
        p = {"chain": chain[start - 1] if start else None, "none": None, "stray": 999}[parent]
        engine = None
        if data.draw(st.booleans(), label="with engine hashes"):
            engine = data.draw(
                st.lists(st.sampled_from(MACHINE_ENGINE), min_size=len(keys), max_size=len(keys)),
                label="engine hashes",
            )
        self.both(lambda idx: idx.store(worker, keys, p, tier=tier, engine_hashes=engine))
        self.pieces.append((worker, keys, tier, engine))

    @rule(
        worker=m_worker,
        piece=m_slice,
        ids=st.lists(st.sampled_from([*MACHINE_ENGINE, 31337]), max_size=4),
        by_engine=st.booleans(),
        tier=m_tier,
        data=st.data(),
    )
    def remove(
        self,
        worker: int,
        piece: tuple[list[int], int, int],
        ids: list[int],
        by_engine: bool,
        tier: str,
        data: Any,
    ) -> None:
        again = self.recorded(data, "remove")
        if again is not None:
            w, keys, stored_tier, engine = again
            if by_engine and engine is not None:
                self.both(lambda idx: idx.remove(w, engine, engine=True, tier=stored_tier))
            else:
                self.both(lambda idx: idx.remove(w, keys, tier=stored_tier))
        elif by_engine:
            self.both(lambda idx: idx.remove(worker, ids, engine=True, tier=tier))
        else:
            chain, start, n = piece
            keys = [*chain[start : start + n], 424242]  # one stray key
            self.both(lambda idx: idx.remove(worker, keys, tier=tier))

    @rule(
        worker=m_worker,
        piece=m_slice,
        tier=m_tier,
        engine=st.lists(st.sampled_from(MACHINE_ENGINE), min_size=6, max_size=6),
        actions=st.lists(st.sampled_from(LIFECYCLE), min_size=1, max_size=5),
    )
    def lifecycle(
        self,
        worker: int,
        piece: tuple[list[int], int, int],
        tier: str,
        engine: list[int],
        actions: list[str],
    ) -> None:
        """Store a piece with handles, then act on exactly that piece a few times.

        Handle bugs need such a run (store with handles, drop by key or
        clear, store again, remove by engine hash), which independent random
        steps rarely line up.
        """
        chain, start, n = piece
        keys = chain[start : start + n]
        eng = engine[: len(keys)]
        self.both(lambda idx: idx.store(worker, keys, tier=tier, engine_hashes=eng))
        self.pieces.append((worker, keys, tier, eng))
        for action in actions:
            if action == "store":
                self.both(lambda idx: idx.store(worker, keys, tier=tier))
            elif action == "store with handles":
                self.both(lambda idx: idx.store(worker, keys, tier=tier, engine_hashes=eng))
            elif action == "remove by key":
                self.both(lambda idx: idx.remove(worker, keys, tier=tier))
            elif action == "remove by engine hash":
                self.both(lambda idx: idx.remove(worker, eng, engine=True, tier=tier))
            else:
                self.both(lambda idx: idx.clear(worker))
            self.agree()

    @rule(worker=m_worker, forget=st.booleans())
    def clear(self, worker: int, forget: bool) -> None:
        if forget:
            self.both(lambda idx: idx.remove_worker(worker))
        else:
            self.both(lambda idx: idx.clear(worker))

    @rule(
        worker=m_worker,
        key=st.sampled_from(MACHINE_KEYS),
        n=st.sampled_from([MAX_COPIES - 1, MAX_COPIES, MAX_COPIES + 2]),
        tier=m_tier,
        remove=st.booleans(),
    )
    def many_copies(self, worker: int, key: int, n: int, tier: str, remove: bool) -> None:
        copies = np.full(n, key, dtype=np.uint64)
        method = "remove" if remove else "store"
        self.both(lambda idx: getattr(idx, method)(worker, copies, tier=tier))

    @rule(
        call=st.sampled_from(
            [
                lambda idx: idx.store(-1, [11]),
                lambda idx: idx.store(1, [11, 2**64]),
                lambda idx: idx.store(1, [11, 12], engine_hashes=[1]),
                lambda idx: idx.store(1, [11], tier="gpu", engine_hashes=[0]),
                lambda idx: idx.store(1, [11], parent=-1),
                lambda idx: idx.remove(1, [11, -1]),
                lambda idx: idx.remove(1, [11], tier="ssd", engine=True),
                lambda idx: idx.clear("1"),
            ]
        )
    )
    def invalid_call_changes_nothing(self, call: Callable[[Any], Any]) -> None:
        # Only the system under test is called: the invariant then proves it
        # still agrees with the model, i.e. that nothing was applied.
        with pytest.raises((TypeError, ValueError, OverflowError)):
            call(self.sut)

    @invariant()
    def agree(self) -> None:
        self.model._check()
        self.sut._check()
        assert observe(self.sut, MACHINE_PROBES, MACHINE_WORKERS) == observe(
            self.model, MACHINE_PROBES, MACHINE_WORKERS
        )


class TwinAgainstTinyModel(IndexMachine):
    make_model = TinyModel
    make_sut = py_twin.BlockIndex


class CompiledAgainstTwin(IndexMachine):
    make_model = py_twin.BlockIndex
    make_sut = None if COMPILED is None else COMPILED.BlockIndex


TestTwinAgainstTinyModel = TwinAgainstTinyModel.TestCase
TestCompiledAgainstTwin = needs_compiled(CompiledAgainstTwin.TestCase)
