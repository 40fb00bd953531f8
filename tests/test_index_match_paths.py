"""match() on the shapes its fast paths were built for, and match_array().

The compiled match walks a request's blocks with three strategies: a run of
blocks with word-for-word the same holders is credited in one comparison per
block, a small holder set is scanned, and a large holder set is bisected for
each surviving worker once the race has thinned out. These tests build
fleets where each path decides the answer, with expectations worked out by
hand, and compare the compiled index with the twin on random fleets shaped
the same way.
"""

from __future__ import annotations

import importlib
import os
import random

import numpy as np
import pytest


def _keys(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, n, dtype=np.uint64)


def test_shared_system_prompt_then_a_branch_per_worker(BlockIndex: type) -> None:
    system = _keys(300)
    idx = BlockIndex()
    for w in range(40):
        idx.store(w, system)
        idx.store(w, _keys(20, seed=100 + w))  # each worker's own continuation
    own = np.concatenate([system, _keys(20, seed=100 + 7)])
    # every worker holds the 300-block run; only worker 7 continues
    assert idx.match(own) == {w: 320 if w == 7 else 300 for w in range(40)}


def test_a_run_broken_by_one_worker_missing_a_middle_block(BlockIndex: type) -> None:
    prompt = _keys(100)
    idx = BlockIndex()
    for w in range(12):
        idx.store(w, prompt)
    idx.remove(5, prompt[60:61])
    expected = {w: 100 for w in range(12)}
    expected[5] = 60
    assert idx.match(prompt) == expected


def test_a_large_holder_set_after_the_race_thinned(BlockIndex: type) -> None:
    # 64 workers hold block 0 and the tail; only workers 3 and 50 hold block 1,
    # so at the tail the race (2 workers) is far smaller than the holder sets.
    prompt = _keys(50)
    idx = BlockIndex()
    for w in range(64):
        idx.store(w, prompt[:1])
        idx.store(w, prompt[2:])
    for w in (3, 50):
        idx.store(w, prompt[1:2])
    expected = dict.fromkeys(range(64), 1)
    expected[3] = expected[50] = 50
    assert idx.match(prompt) == expected


def test_runs_keep_tiers_apart(BlockIndex: type) -> None:
    prompt = _keys(40)
    idx = BlockIndex()
    for w in range(10):
        idx.store(w, prompt[:30], tier="device")
        idx.store(w, prompt[30:], tier="host")
    idx.store(4, prompt[:10], tier="disk")  # a second copy, slower: device still wins
    idx.store(9, prompt[35:], tier="device")  # faster copy at the tail
    tiers = idx.match_tiers(prompt)
    assert tiers[0] == (30, 10, 0)
    assert tiers[4] == (30, 10, 0)
    assert tiers[9] == (35, 5, 0)
    assert idx.match(prompt) == dict.fromkeys(range(10), 40)


def test_match_array_lays_counts_out_in_the_callers_order(BlockIndex: type) -> None:
    prompt = _keys(8)
    idx = BlockIndex()
    idx.store(2**64 - 1, prompt[:5])
    idx.store(0, prompt[:2])
    idx.store(7, prompt[1:])  # no block 0: no prefix
    workers = np.array([7, 0, 123, 2**64 - 1], dtype=np.uint64)
    out = idx.match_array(prompt, workers)
    assert out.dtype == np.uint32
    assert out.tolist() == [0, 2, 0, 5]
    assert idx.match_array(prompt, [2**64 - 1]).tolist() == [5]
    assert idx.match_array([], workers).tolist() == [0, 0, 0, 0]
    assert idx.match_array(prompt, []).tolist() == []
    idx.remove_worker(2**64 - 1)
    assert idx.match_array(prompt, workers).tolist() == [0, 2, 0, 0]


@pytest.mark.parametrize("bad", [[-1], [2**64], ["x"], np.zeros((1, 1), np.uint64)])
def test_match_array_validates_workers(BlockIndex: type, bad: object) -> None:
    idx = BlockIndex()
    idx.store(1, [1])
    with pytest.raises((OverflowError, TypeError, ValueError)):
        idx.match_array([1], bad)


def _compiled() -> object:
    if os.environ.get("KVROUTE_NO_EXTENSIONS"):
        pytest.skip("the compiled index is disabled")
    return importlib.import_module("kvroute._index")


@pytest.mark.parametrize("seed", range(25))
def test_compiled_matches_twin_on_shared_prefix_fleets(seed: int) -> None:
    from kvroute import _index_py

    c = _compiled().BlockIndex()  # type: ignore[attr-defined]
    p = _index_py.BlockIndex()
    r = random.Random(seed)
    base = _keys(200, seed)
    tiers = ["device", "host", "disk"]
    workers = list(range(r.randint(1, 60)))
    for w in workers:
        length, tier = r.randint(0, 200), r.choice(tiers)
        for x in (c, p):
            x.store(w, base[:length], tier=tier)
        if r.random() < 0.3:
            hole = r.randint(0, 199)
            for x in (c, p):
                x.remove(w, base[hole : hole + 1], tier=tier)
        if r.random() < 0.3:
            a, b, t = r.randint(0, 50), r.randint(50, 200), r.choice(tiers)
            for x in (c, p):
                x.store(w, base[a:b], tier=t)
    ids = np.array([*workers, 10_000], dtype=np.uint64)
    for _ in range(20):
        a = r.randint(0, 5)
        query = base[a : r.randint(a, 200)]
        assert c.match(query) == p.match(query)
        assert c.match_tiers(query) == p.match_tiers(query)
        assert c.match_array(query, ids).tolist() == p.match_array(query, ids).tolist()
    c._check()
