"""BlockIndex.dump() / load(): the whole index as bytes, across the twins."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from helpers import compiled
from hypothesis import given
from hypothesis import strategies as st
from test_index_hypothesis import DIFF_PROBES, KEYS, WORKERS, apply, observe, op_st

import kvroute._index_py as py_twin
from kvroute._dump import MAGIC

COMPILED = compiled("_index")
MODULES = [m for m in (COMPILED, py_twin) if m is not None]
IDS = ["c" if m is COMPILED else "py" for m in MODULES]


def seen(idx: Any) -> dict[str, Any]:
    """What a caller sees, counters aside (a dump does not keep them), handles included."""
    out = observe(idx, DIFF_PROBES, WORKERS)
    del out["stats"]
    out["handles"] = {(w, e): idx.resolve(w, e) for w in idx.workers() for e in KEYS}
    return out


@given(ops=st.lists(op_st, min_size=5, max_size=50), follow=st.lists(op_st, max_size=20))
def test_a_loaded_dump_is_the_same_index_in_either_twin(
    ops: list[tuple[Any, ...]], follow: list[tuple[Any, ...]]
) -> None:
    for src in MODULES:
        original = src.BlockIndex()
        for op in ops:
            apply(original, op)
        data = original.dump()
        for dst in MODULES:
            copy = dst.BlockIndex()
            copy.load(data)
            copy._check()
            assert seen(copy) == seen(original)
            # and it goes on as the original does (removals through handles included)
            twin = py_twin.BlockIndex()
            twin.load(data)
            for op in follow:
                assert apply(copy, op) == apply(twin, op), op
            copy._check()
            assert observe(copy, DIFF_PROBES, WORKERS)["match_tiers"] == observe(
                twin, DIFF_PROBES, WORKERS
            )["match_tiers"]


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_an_empty_index_and_workers_holding_nothing_survive(mod: Any) -> None:
    a = mod.BlockIndex()
    assert len(a.dump()) == 40
    a.store(7, [])  # known, holding nothing
    b = mod.BlockIndex()
    b.load(a.dump())
    assert b.workers() == [7] and b.residencies() == 0


def _dump(workers: list[int], res: list[tuple[int, int, tuple[int, int, int]]],
          handles: list[tuple[int, int, int]]) -> bytes:  # fmt: skip
    head = struct.pack("<8s4Q", MAGIC, len(workers), len(res), len(handles), 0)
    u = lambda xs: np.array(xs, "<u8").tobytes()  # noqa: E731
    return b"".join([
        head, u(workers), u([r[0] for r in res]), u([r[1] for r in res]),
        u([h[0] for h in handles]), u([h[1] for h in handles]), u([h[2] for h in handles]),
        np.array([r[2] for r in res], "<u2").reshape(len(res), 3).tobytes(),
    ])  # fmt: skip


BAD = [
    (b"nonsense", ValueError, "bad magic"),
    (_dump([1], [(5, 1, (1, 0, 0))], [])[:-2], ValueError, "wrong length"),
    (_dump([1], [(5, 1, (1, 0, 0))], []) + b"\0", ValueError, "wrong length"),
    (_dump([1], [(5, 1, (0, 0, 0))], []), ValueError, "0 or too many copies"),
    (_dump([1], [(5, 1, (4096, 0, 0))], []), ValueError, "0 or too many copies"),
    (_dump([1], [(5, 2, (1, 0, 0))], []), ValueError, "unlisted worker"),
    (_dump([1], [(5, 1, (1, 0, 0))], [(2, 9, 5)]), ValueError, "unlisted worker"),
    (_dump([1, 2], [(5, 1, (1, 0, 0)), (5, 1, (0, 1, 0))], []), ValueError, "twice"),
    (_dump([1, 2], [(5, 1, (1, 0, 0))], [(2, 9, 5)]), ValueError, "a block it lacks"),
    ("a string", TypeError, "bytes"),
]


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
@pytest.mark.parametrize(("data", "exc", "match"), BAD)
def test_bad_dumps_are_refused_alike_and_leave_the_index_empty(
    mod: Any, data: Any, exc: type[Exception], match: str
) -> None:
    idx = mod.BlockIndex()
    with pytest.raises(exc, match=match) as got:
        idx.load(data)
    with pytest.raises(exc) as want:
        py_twin.BlockIndex().load(data)
    assert str(got.value) == str(want.value)
    assert idx.workers() == [] and idx.residencies() == 0 and len(idx) == 0
    idx._check()
    idx.load(_dump([1], [(5, 1, (2, 0, 1))], [(1, 9, 5)]))  # still usable
    assert idx.match_tiers([5]) == {1: (1, 0, 0)} and idx.resolve(1, 9) == 5


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_load_needs_an_empty_index(mod: Any) -> None:
    idx = mod.BlockIndex()
    idx.store(0, [1])
    with pytest.raises(ValueError, match="empty index"):
        idx.load(idx.dump())
    assert idx.match([1]) == {0: 1}


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_a_large_dump_round_trips(mod: Any) -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**64, 20_000, np.uint64, endpoint=False)
    a = mod.BlockIndex()
    for w in range(8):
        a.store(w, keys[w * 2000 : w * 2000 + 4000], engine_hashes=keys[::-1][: 4000] + w)
    data = a.dump()
    b = mod.BlockIndex()
    b.load(data)
    b._check()
    assert b.residencies() == a.residencies() == 32_000 and len(b) == len(a)
    probe = keys[2000:6000]
    assert b.match_array(probe, range(8)).tolist() == a.match_array(probe, range(8)).tolist()
