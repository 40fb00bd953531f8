"""BlockIndex behaviour, run against both twins (ids c / py) through conftest's fixtures.

Every assertion here is about observable behaviour as specified by the
docstrings of :mod:`kvroute._index_py`; none depends on how either twin stores
its data. Keys are chosen to hit the places open-addressing tables get wrong:
the empty-slot sentinel, probe runs that wrap, and deletions inside them.
"""

from __future__ import annotations

import ast
import doctest
import inspect
import random
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from helpers import compiled as compiled_module

import kvroute
import kvroute._convert
import kvroute._index_py

U64_MAX = 2**64 - 1

#: The multiplier of Fibonacci hashing; ``k * FIB`` keeps its top bits as the home slot.
FIB = 0x9E3779B97F4A7C15
FIB_INV = pow(FIB, -1, 2**64)

#: Keys an open-addressing table might use as a sentinel, or that sit on a boundary.
SENTINEL_KEYS = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, U64_MAX - 1, U64_MAX]

#: Families of 256 keys that share a home slot, or nearly, in common table designs.
COLLIDING = {
    # Equal modulo 2**32 (and 2**56): identical low bits, a power-of-two mask collides.
    "multiples_of_2**32": [i << 32 for i in range(1, 257)],
    "multiples_of_2**56": [i << 56 for i in range(256)],
    # Identical low 40 bits, differing only above them.
    "differ_in_high_bits": [0xABCDEF0123 | (i << 40) for i in range(256)],
    "sequential": list(range(256)),
    "sequential_below_max": [U64_MAX - i for i in range(256)],
    # k * FIB mod 2**64 == i: the top bits are 0, so every key's home is slot 0.
    "fibonacci_home_first_slot": [(i * FIB_INV) % 2**64 for i in range(256)],
    # k * FIB mod 2**64 == 2**64-1-i: the home is the last slot, so probe runs wrap.
    "fibonacci_home_last_slot": [((U64_MAX - i) * FIB_INV) % 2**64 for i in range(256)],
}


def snapshot(idx: Any, probes: Iterable[list[int]] = ()) -> dict[str, Any]:
    """Everything a caller can observe without mutating the index."""
    probes = list(probes)
    return {
        "len": len(idx),
        "residencies": idx.residencies(),
        "workers": idx.workers(),
        "worker_len": {w: idx.worker_len(w) for w in idx.workers()},
        "stats": idx.stats(),
        "match": [idx.match(p) for p in probes],
        "match_tiers": [idx.match_tiers(p) for p in probes],
        "match_array": [idx.match_array(p, SNAPSHOT_WORKERS).tolist() for p in probes],
    }


#: Workers whose ``match_array`` counts every snapshot records.
SNAPSHOT_WORKERS = [0, 1, 2, 3, U64_MAX]


def held(idx: Any, worker: int, key: int) -> bool:
    return idx.match([key]).get(worker, 0) == 1


# -- basics -------------------------------------------------------------------


def test_new_index_is_empty(BlockIndex: type) -> None:
    idx = BlockIndex()
    assert len(idx) == 0
    assert idx.residencies() == 0
    assert idx.workers() == []
    assert idx.worker_len(0) == 0
    assert idx.stats() == {"unknown_removals": 0, "orphan_stores": 0, "saturated": 0}
    assert idx.match([1, 2, 3]) == {}
    assert idx.match_tiers([1, 2, 3]) == {}
    idx._check()


def test_store_then_match_counts_the_stored_prefix(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(7, [11, 12, 13])
    assert idx.match([11, 12, 13]) == {7: 3}
    assert idx.match([11, 12, 13, 14, 15]) == {7: 3}
    assert idx.match([11]) == {7: 1}
    idx._check()


def test_match_only_reports_workers_holding_the_first_block(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [11, 12, 13])
    idx.store(2, [12, 13])  # holds the tail but not hashes[0]
    assert idx.match([11, 12, 13]) == {1: 3}
    assert idx.match([12, 13]) == {1: 2, 2: 2}
    assert idx.match([99, 11]) == {}


def test_match_stops_at_each_workers_first_gap(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11, 13, 14])  # gap at 12
    idx.store(2, [10, 11, 12, 13, 14])
    idx.store(3, [10])
    # Blocks held after a worker's gap do not count; other workers continue.
    assert idx.match([10, 11, 12, 13, 14]) == {1: 2, 2: 5, 3: 1}


def test_match_of_empty_input_is_empty(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10])
    assert idx.match([]) == {}
    assert idx.match_tiers([]) == {}
    assert idx.match(np.array([], dtype=np.uint64)) == {}


def test_match_counts_a_repeated_query_key_each_time(BlockIndex: type) -> None:
    # The index is a flat map: each query position is an independent look-up.
    idx = BlockIndex()
    idx.store(1, [10])
    assert idx.match([10, 10, 10]) == {1: 3}
    assert idx.match([10, 11, 10]) == {1: 1}


def test_results_are_plain_python_ints_dicts_and_tuples(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(np.uint64(U64_MAX), np.array([5, 6], dtype=np.uint64), tier="host")
    m = idx.match([5, 6])
    mt = idx.match_tiers([5, 6])
    assert type(m) is dict and type(mt) is dict
    assert [(type(w), type(c)) for w, c in m.items()] == [(int, int)]
    ((w, tiers),) = mt.items()
    assert type(w) is int and type(tiers) is tuple
    assert [type(c) for c in tiers] == [int, int, int]
    assert type(idx.workers()) is list and [type(w) for w in idx.workers()] == [int]
    assert all(type(v) is int for v in idx.stats().values())
    assert type(idx.remove(U64_MAX, [5, 99])) is int
    assert type(idx.clear(U64_MAX)) is int
    assert type(idx.remove_worker(U64_MAX)) is int
    assert type(len(idx)) is int and type(idx.residencies()) is int
    assert type(idx.worker_len(0)) is int and type(idx.sizeof()) is int


def test_match_array_lays_out_match_in_the_callers_worker_order(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(4, [1, 2, 3])
    idx.store(U64_MAX, [1, 2], tier="disk")
    idx.store(7, [2, 3])  # known, but lacks the first block
    counts = idx.match_array([1, 2, 3], [9, 4, U64_MAX, 7, 4, 0])
    assert isinstance(counts, np.ndarray)
    assert counts.dtype == np.uint32 and counts.shape == (6,)
    assert counts.tolist() == [0, 3, 2, 0, 3, 0]
    workers = [9, 4, U64_MAX, 7]
    assert idx.match_array([1, 2, 3], workers).tolist() == [
        idx.match([1, 2, 3]).get(w, 0) for w in workers
    ]


@pytest.mark.parametrize("form", ["list", "numpy_uint64", "array_Q", "generator", "numpy_int64"])
def test_match_array_accepts_worker_ids_in_every_form(BlockIndex: type, form: str) -> None:
    idx = BlockIndex()
    idx.store(5, [1])
    idx.store(6, [1, 2])
    ids = [6, 5, 0]
    workers = {
        "list": ids,
        "numpy_uint64": np.array(ids, dtype=np.uint64),
        "array_Q": array("Q", ids),
        "generator": (w for w in ids),
        "numpy_int64": np.array(ids, dtype=np.int64),
    }[form]
    assert idx.match_array(np.array([1, 2], dtype=np.uint64), workers).tolist() == [2, 1, 0]


def test_match_array_of_empty_inputs(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(5, [1])
    empty = idx.match_array([1], [])
    assert empty.dtype == np.uint32 and empty.shape == (0,)
    assert idx.match_array([], [5, 6]).tolist() == [0, 0]
    assert BlockIndex().match_array([1], [5]).tolist() == [0]


def test_store_returns_none(BlockIndex: type) -> None:
    assert BlockIndex().store(1, [1]) is None


# -- tiers --------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_match_counts_a_block_in_any_tier(BlockIndex: type, tier: str) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11], tier=tier)
    assert idx.match([10, 11]) == {1: 2}
    expected = tuple(2 if t == tier else 0 for t in ("device", "host", "disk"))
    assert idx.match_tiers([10, 11]) == {1: expected}


def test_match_tiers_splits_by_the_fastest_tier_holding_each_block(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], tier="disk")
    idx.store(1, [10], tier="host")  # 10 on host and disk: counts host
    idx.store(1, [11], tier="disk")
    idx.store(1, [12], tier="host")
    idx.store(1, [12])  # 12 on device and host: counts device
    idx.store(1, [13], tier="disk")
    idx.store(1, [13], tier="device")  # 13 on device and disk: counts device
    idx.store(2, [10, 11, 12])
    assert idx.match_tiers([10, 11, 12, 13]) == {1: (2, 1, 1), 2: (3, 0, 0)}
    assert idx.match([10, 11, 12, 13]) == {1: 4, 2: 3}
    # Each worker's split sums to its match count.
    for w, tiers in idx.match_tiers([10, 11, 12, 13]).items():
        assert sum(tiers) == idx.match([10, 11, 12, 13])[w]


def test_match_tiers_stops_at_the_first_gap_like_match(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], tier="host")
    idx.store(1, [12], tier="disk")
    assert idx.match_tiers([10, 11, 12]) == {1: (0, 1, 0)}
    assert idx.match_tiers([11, 12]) == {}


def test_removal_is_per_tier(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10])
    idx.store(1, [10], tier="host")
    assert idx.remove(1, [10], tier="host") == 0
    assert idx.match_tiers([10]) == {1: (1, 0, 0)}
    assert idx.remove(1, [10], tier="host") == 1  # no host copy left
    assert idx.match_tiers([10]) == {1: (1, 0, 0)}
    assert idx.remove(1, [10], tier="disk") == 1
    assert idx.remove(1, [10]) == 0  # default tier: device
    assert idx.match([10]) == {}
    assert len(idx) == 0 and idx.worker_len(1) == 0
    assert idx.stats()["unknown_removals"] == 2
    idx._check()


def test_block_moving_from_device_to_host_keeps_its_residency(BlockIndex: type) -> None:
    # Offload: the engine stores the host copy, then evicts the device copy.
    idx = BlockIndex()
    idx.store(1, [10, 11])
    idx.store(1, [10, 11], tier="host")
    assert idx.remove(1, [10, 11]) == 0
    assert idx.match_tiers([10, 11]) == {1: (0, 2, 0)}
    assert idx.residencies() == 2 and len(idx) == 2


def test_removal_without_tier_does_not_touch_host_copies(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], tier="host")
    assert idx.remove(1, [10]) == 1
    assert idx.match_tiers([10]) == {1: (0, 1, 0)}


# -- reference counting -------------------------------------------------------


def test_a_block_stored_twice_needs_two_removals(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11])
    idx.store(1, [10])
    assert idx.worker_len(1) == 2 and idx.residencies() == 2
    assert idx.remove(1, [10, 11]) == 0
    assert idx.match([10]) == {1: 1} and idx.match([11]) == {}
    assert idx.remove(1, [10]) == 0
    assert idx.match([10]) == {}
    assert idx.remove(1, [10]) == 1
    assert len(idx) == 0
    idx._check()


def test_duplicates_within_one_store_are_separate_copies(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 10, 10])
    assert idx.worker_len(1) == 1
    assert idx.remove(1, [10, 10]) == 0
    assert held(idx, 1, 10)
    assert idx.remove(1, [10, 10]) == 1  # the batch applies in order
    assert not held(idx, 1, 10)


def test_copy_counts_are_per_worker(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10])
    idx.store(1, [10])
    idx.store(2, [10])
    assert idx.remove(2, [10]) == 0
    assert idx.match([10]) == {1: 1}
    assert idx.remove(2, [10]) == 1  # worker 1's copies are not worker 2's
    assert idx.match([10]) == {1: 1}
    assert len(idx) == 1 and idx.residencies() == 1


def test_remove_returns_unknowns_of_that_call_and_stats_accumulate(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11])
    assert idx.remove(1, [10, 98, 99]) == 2
    assert idx.remove(1, [11]) == 0
    assert idx.remove(5, [10, 11, 12]) == 3  # unknown worker: every id is unknown
    assert idx.stats()["unknown_removals"] == 5
    assert 5 not in idx.workers()  # a removal does not make a worker known
    assert idx.remove(1, []) == 0


# -- engine handles -----------------------------------------------------------


def test_engine_removal_resolves_handles_to_kvroute_keys(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11, 12], engine_hashes=[910, 911, 912])
    assert idx.remove(1, [911], engine=True) == 0
    assert idx.match([10, 11, 12]) == {1: 1}
    assert held(idx, 1, 12)
    assert idx.remove(1, [910, 912], engine=True) == 0
    assert len(idx) == 0
    idx._check()


def test_unknown_engine_hash_is_counted_and_the_rest_of_the_batch_applies(
    BlockIndex: type,
) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11], engine_hashes=[910, 911])
    assert idx.remove(1, [910, 555, 911], engine=True) == 1
    assert len(idx) == 0
    assert idx.stats()["unknown_removals"] == 1


def test_kvroute_key_is_not_an_engine_handle(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[910])
    assert idx.remove(1, [10], engine=True) == 1
    assert idx.remove(1, [910]) == 1  # and an engine hash is not a key
    assert held(idx, 1, 10)


def test_engine_hash_equal_to_another_kvroute_key_resolves_as_a_handle(
    BlockIndex: type,
) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 20], engine_hashes=[20, 10])  # crossed on purpose
    assert idx.remove(1, [20], engine=True) == 0
    assert not held(idx, 1, 10) and held(idx, 1, 20)
    assert idx.remove(1, [10], engine=True) == 0
    assert len(idx) == 0


def test_engine_handles_are_per_worker(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[910])
    idx.store(2, [10], engine_hashes=[920])
    assert idx.remove(2, [910], engine=True) == 1
    assert idx.remove(1, [920], engine=True) == 1
    assert idx.match([10]) == {1: 1, 2: 1}
    assert idx.remove(2, [920], engine=True) == 0
    assert idx.match([10]) == {1: 1}


def test_resolve_names_the_key_of_a_live_handle_per_worker(BlockIndex: type) -> None:
    idx = BlockIndex()
    assert idx.resolve(1, 910) is None  # unknown worker
    idx.store(1, [10, 11], engine_hashes=[910, 0])  # 0 is a valid engine hash
    idx.store(2, [10], engine_hashes=[920])
    assert idx.resolve(1, 910) == 10
    assert idx.resolve(1, 0) == 11
    assert idx.resolve(2, 910) is None  # another worker's handle
    assert idx.resolve(1, 10) is None  # a key is not a handle
    idx.remove(1, [910], engine=True)
    assert idx.resolve(1, 910) is None  # dropped with its block
    idx.clear(1)
    assert idx.resolve(1, 0) is None
    with pytest.raises(OverflowError):
        idx.resolve(1, -1)
    with pytest.raises(TypeError):
        idx.resolve("w", 1)


def test_engine_removal_respects_the_tier(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], tier="host", engine_hashes=[910])
    assert idx.remove(1, [910], engine=True) == 1  # no device copy
    assert idx.remove(1, [910], engine=True, tier="host") == 0
    assert len(idx) == 0


def test_handle_resolves_while_copies_remain(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[910])
    idx.store(1, [10])
    assert idx.remove(1, [10]) == 0  # one copy leaves by key
    assert idx.remove(1, [910], engine=True) == 0  # the handle still resolves
    assert len(idx) == 0


def test_handle_resolves_while_the_block_remains_in_another_tier(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[910])
    idx.store(1, [10], tier="disk")
    assert idx.remove(1, [910], engine=True) == 0
    assert idx.remove(1, [910], engine=True, tier="disk") == 0
    assert len(idx) == 0


def test_handle_is_dropped_when_its_block_leaves_by_kvroute_key(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11], engine_hashes=[910, 911])
    assert idx.remove(1, [10]) == 0
    idx.store(1, [10])  # back, but without a handle
    assert idx.remove(1, [910], engine=True) == 1
    assert held(idx, 1, 10)
    assert idx.remove(1, [911], engine=True) == 0  # the other handle is intact
    idx._check()


def test_handle_is_dropped_by_clear(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[910])
    idx.clear(1)
    idx.store(1, [10])
    assert idx.remove(1, [910], engine=True) == 1
    assert held(idx, 1, 10)


def test_handle_is_dropped_by_remove_worker(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[910])
    idx.remove_worker(1)
    idx.store(1, [10])
    assert idx.remove(1, [910], engine=True) == 1
    assert held(idx, 1, 10)


def test_handles_of_a_removed_worker_do_not_pass_to_the_next_worker(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[910])
    idx.remove_worker(1)
    idx.store(2, [10])  # may take over whatever worker 1 left behind
    assert idx.remove(2, [910], engine=True) == 1
    assert idx.match([10]) == {2: 1}


def test_handle_overwrite_points_to_the_latest_block(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[900])
    idx.store(1, [20], engine_hashes=[900])
    assert idx.remove(1, [900], engine=True) == 0
    assert held(idx, 1, 10) and not held(idx, 1, 20)
    assert idx.remove(1, [900], engine=True) == 1  # dropped with block 20
    assert held(idx, 1, 10)


def test_dropping_the_old_block_keeps_the_overwritten_handle(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[900])
    idx.store(1, [20], engine_hashes=[900])
    assert idx.remove(1, [10]) == 0  # the block 900 used to name
    assert idx.remove(1, [900], engine=True) == 0
    assert len(idx) == 0
    idx._check()


def test_duplicate_engine_hash_within_one_store_names_the_last_block(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 20], engine_hashes=[900, 900])
    assert idx.remove(1, [900], engine=True) == 0
    assert held(idx, 1, 10) and not held(idx, 1, 20)


def test_two_handles_for_one_block_both_resolve_and_both_drop(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[901])
    idx.store(1, [10], engine_hashes=[902])
    assert idx.remove(1, [901], engine=True) == 0
    assert held(idx, 1, 10)
    assert idx.remove(1, [902], engine=True) == 0
    assert not held(idx, 1, 10)
    idx.store(1, [10])
    assert idx.remove(1, [901, 902], engine=True) == 2
    idx._check()


def test_handle_overwritten_then_old_block_left_through_another_handle(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[901])
    idx.store(1, [20], engine_hashes=[901])  # 901 now names 20
    idx.store(1, [10], engine_hashes=[902])
    assert idx.remove(1, [902, 902], engine=True) == 0  # both copies of 10 leave
    assert not held(idx, 1, 10)
    assert idx.remove(1, [902], engine=True) == 1
    assert idx.remove(1, [901], engine=True) == 0  # still names 20
    assert len(idx) == 0
    idx._check()


def test_handle_is_recorded_for_a_saturated_block(
    BlockIndex: type, index_module: ModuleType
) -> None:
    idx = BlockIndex()
    idx.store(1, np.full(index_module.MAX_COPIES, 10, dtype=np.uint64))
    idx.store(1, [10], engine_hashes=[910])
    assert idx.stats()["saturated"] == 1
    assert idx.remove(1, [910], engine=True) == 0


@pytest.mark.parametrize("engine_hash", [0, 1, 2**63, U64_MAX])
@pytest.mark.parametrize("key", [0, 1, 2**63, U64_MAX])
def test_sentinel_engine_hashes_and_keys_work_as_handles(
    BlockIndex: type, engine_hash: int, key: int
) -> None:
    idx = BlockIndex()
    idx.store(3, [key], engine_hashes=[engine_hash])
    assert idx.remove(3, [engine_hash], engine=True) == 0
    assert len(idx) == 0
    assert idx.remove(3, [engine_hash], engine=True) == 1
    idx._check()


def test_engine_handles_for_many_colliding_hashes(BlockIndex: type) -> None:
    idx = BlockIndex()
    engine = COLLIDING["fibonacci_home_last_slot"] + COLLIDING["multiples_of_2**56"]
    keys = list(range(1000, 1000 + len(engine)))
    idx.store(1, keys, engine_hashes=engine)
    # Drop every third block by key: its handle goes, the others must stay findable.
    assert idx.remove(1, keys[::3]) == 0
    assert idx.remove(1, engine[::3], engine=True) == len(engine[::3])
    rest = [e for i, e in enumerate(engine) if i % 3]
    assert idx.remove(1, rest, engine=True) == 0
    assert len(idx) == 0
    idx._check()


# -- clear and remove_worker --------------------------------------------------


def test_clear_drops_the_workers_blocks_and_keeps_it_known(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11, 11, 12])
    idx.store(1, [12, 13], tier="host")
    idx.store(2, [10, 11])
    assert idx.clear(1) == 4  # distinct blocks, whatever their copies and tiers
    assert idx.workers() == [1, 2]
    assert idx.worker_len(1) == 0
    assert idx.match([10, 11, 12]) == {2: 2}
    assert len(idx) == 2 and idx.residencies() == 2
    assert idx.clear(1) == 0
    idx.store(1, [12])
    assert idx.match([12]) == {1: 1}
    idx._check()


def test_remove_worker_forgets_the_worker(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11], tier="disk")
    idx.store(2, [10])
    assert idx.remove_worker(1) == 2
    assert idx.workers() == [2]
    assert idx.worker_len(1) == 0
    assert idx.match([10, 11]) == {2: 1}
    assert len(idx) == 1 and idx.residencies() == 1
    assert idx.remove_worker(1) == 0
    idx._check()


def test_remove_worker_of_a_cleared_worker_returns_zero_and_forgets_it(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10])
    idx.clear(1)
    assert idx.remove_worker(1) == 0
    assert idx.workers() == []


@pytest.mark.parametrize("op", ["clear", "remove_worker"])
def test_clear_and_remove_worker_of_an_unknown_worker_are_no_ops(BlockIndex: type, op: str) -> None:
    idx = BlockIndex()
    idx.store(1, [10])
    before = snapshot(idx, [[10]])
    assert getattr(idx, op)(2) == 0
    assert getattr(idx, op)(U64_MAX) == 0
    assert snapshot(idx, [[10]]) == before
    assert idx.workers() == [1]


def test_a_parent_held_before_remove_worker_is_an_orphan_after_it(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10])
    idx.remove_worker(1)
    idx.store(1, [11], parent=10)
    assert idx.stats()["orphan_stores"] == 1


def test_clear_and_remove_worker_leave_the_counters_alone(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], parent=5)
    idx.remove(1, [99])
    before = idx.stats()
    idx.clear(1)
    idx.remove_worker(1)
    assert idx.stats() == before == {"unknown_removals": 1, "orphan_stores": 1, "saturated": 0}


# -- sizes --------------------------------------------------------------------


def test_len_residencies_and_worker_len_count_distinct_blocks(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11, 12, 10])
    idx.store(1, [11], tier="host")
    idx.store(2, [11, 12, 13])
    idx.store(3, [])  # known, holds nothing
    assert len(idx) == 4
    assert idx.residencies() == 6
    assert [idx.worker_len(w) for w in (1, 2, 3, 4)] == [3, 3, 0, 0]
    assert idx.residencies() == sum(idx.worker_len(w) for w in idx.workers())


def test_workers_are_listed_ascending(BlockIndex: type) -> None:
    idx = BlockIndex()
    for w in [U64_MAX, 5, 0, 2**63, 17]:
        idx.store(w, [w % 1000])
    assert idx.workers() == [0, 5, 17, 2**63, U64_MAX]


def test_an_empty_store_makes_the_worker_known(BlockIndex: type) -> None:
    # The spec registers the worker before looking at the batch.
    idx = BlockIndex()
    idx.store(4, [])
    idx.store(5, np.array([], dtype=np.uint64), parent=1)
    assert idx.workers() == [4, 5]
    assert idx.worker_len(4) == 0 and len(idx) == 0
    assert idx.stats()["orphan_stores"] == 1


# -- counters -----------------------------------------------------------------


def test_store_without_parent_is_never_an_orphan(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [11])
    assert idx.stats()["orphan_stores"] == 0


def test_store_under_a_parent_the_worker_holds_is_not_an_orphan(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10])
    idx.store(1, [11], parent=10)
    idx.store(1, [20], tier="disk")
    idx.store(1, [21], parent=20)  # held in any tier counts
    assert idx.stats()["orphan_stores"] == 0


def test_store_under_a_parent_only_another_worker_holds_is_an_orphan(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(2, [10])
    idx.store(1, [11, 12, 13], parent=10)  # counted once per call
    idx.store(1, [14], parent=999)  # never stored by anyone
    assert idx.stats()["orphan_stores"] == 2
    assert idx.match([11, 12, 13]) == {1: 3}  # the store still applies


def test_store_under_a_removed_parent_is_an_orphan(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10])
    idx.remove(1, [10])
    idx.store(1, [11], parent=10)
    assert idx.stats()["orphan_stores"] == 1


def test_parent_is_checked_before_the_batch_is_stored(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10, 11], parent=10)
    assert idx.stats()["orphan_stores"] == 1


def test_max_copies_is_4095_in_both_twins(index_module: ModuleType) -> None:
    assert index_module.MAX_COPIES == 4095
    assert kvroute.MAX_COPIES == 4095


def test_copies_beyond_max_copies_saturate_in_one_store(
    BlockIndex: type, index_module: ModuleType
) -> None:
    max_copies = index_module.MAX_COPIES
    idx = BlockIndex()
    idx.store(1, np.full(max_copies + 3, 10, dtype=np.uint64))
    assert idx.stats()["saturated"] == 3
    assert idx.worker_len(1) == 1 and len(idx) == 1
    # The saturated copies were dropped: MAX_COPIES removals empty the block.
    assert idx.remove(1, np.full(max_copies - 1, 10, dtype=np.uint64)) == 0
    assert held(idx, 1, 10)
    assert idx.remove(1, [10]) == 0
    assert not held(idx, 1, 10)
    assert idx.remove(1, [10]) == 1
    idx._check()


def test_saturation_is_counted_across_stores_and_per_tier(
    BlockIndex: type, index_module: ModuleType
) -> None:
    max_copies = index_module.MAX_COPIES
    idx = BlockIndex()
    idx.store(1, np.full(max_copies, 10, dtype=np.uint64))
    assert idx.stats()["saturated"] == 0
    idx.store(1, [10])
    assert idx.stats()["saturated"] == 1
    idx.store(1, np.full(max_copies, 10, dtype=np.uint64), tier="host")  # its own count
    idx.store(2, [10])  # and another worker's
    assert idx.stats()["saturated"] == 1
    assert idx.remove(1, np.full(max_copies, 10, dtype=np.uint64)) == 0
    assert idx.match_tiers([10]) == {1: (0, 1, 0), 2: (1, 0, 0)}
    idx._check()


def test_stats_returns_a_copy(BlockIndex: type) -> None:
    idx = BlockIndex()
    s = idx.stats()
    s["unknown_removals"] = 99
    assert idx.stats()["unknown_removals"] == 0


# -- input forms --------------------------------------------------------------

KEYS = [0, 5, 2**63, U64_MAX]


def _readonly(values: list[int]) -> np.ndarray:
    a = np.array(values, dtype=np.uint64)
    a.flags.writeable = False
    return a


FORMS: dict[str, Callable[[list[int]], Any]] = {
    "list": list,
    "tuple": tuple,
    "generator": lambda ks: (k for k in ks),
    "numpy_uint64": lambda ks: np.array(ks, dtype=np.uint64),
    "numpy_uint64_strided": lambda ks: np.repeat(np.array(ks, dtype=np.uint64), 2)[::2],
    "numpy_uint64_reversed": lambda ks: np.array(ks[::-1], dtype=np.uint64)[::-1],
    "numpy_uint64_big_endian": lambda ks: np.array(ks, dtype=">u8"),
    "numpy_uint64_readonly": _readonly,
    "array_Q": lambda ks: array("Q", ks),
    "memoryview_of_array_Q": lambda ks: memoryview(array("Q", ks)),
    "strided_memoryview_of_array_Q": lambda ks: memoryview(
        array("Q", [k for k in ks for _ in "ab"])
    )[::2],
    "list_of_numpy_scalars": lambda ks: [np.uint64(k) for k in ks],
}


@pytest.mark.parametrize("form", FORMS)
def test_hashes_are_accepted_in_every_supported_form(BlockIndex: type, form: str) -> None:
    make = FORMS[form]
    idx = BlockIndex()
    idx.store(1, make(KEYS), engine_hashes=make(KEYS))
    assert idx.match(make(KEYS)) == {1: 4}
    assert idx.match_tiers(make(KEYS)) == {1: (4, 0, 0)}
    assert idx.remove(1, make(KEYS[:2])) == 0
    assert idx.remove(1, make(KEYS[2:]), engine=True) == 0
    assert len(idx) == 0
    idx._check()


@pytest.mark.parametrize(
    "dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "intp"]
)
def test_numpy_arrays_of_any_integer_dtype_are_accepted(BlockIndex: type, dtype: str) -> None:
    keys = [0, 1, 100, 127]
    idx = BlockIndex()
    idx.store(1, np.array(keys, dtype=dtype), engine_hashes=np.array(keys, dtype=dtype))
    assert idx.match(np.array(keys, dtype=dtype)) == {1: 4}
    assert idx.match(keys) == {1: 4}
    assert idx.remove(1, np.array(keys, dtype=dtype), engine=True) == 0
    assert len(idx) == 0


def test_numpy_integer_worker_ids_are_accepted(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(np.uint64(U64_MAX), [1])
    idx.store(np.int32(7), [1])
    assert idx.workers() == [7, U64_MAX]
    assert idx.worker_len(np.uint64(U64_MAX)) == 1
    assert idx.remove(np.int64(7), [1]) == 0
    assert idx.clear(np.uint8(7)) == 0
    assert idx.remove_worker(np.uint64(U64_MAX)) == 1


def test_store_does_not_keep_a_reference_to_a_mutable_input(BlockIndex: type) -> None:
    keys = np.array([10, 11], dtype=np.uint64)
    buf = array("Q", [20, 21])
    idx = BlockIndex()
    idx.store(1, keys, engine_hashes=buf)
    keys[:] = 0
    buf[0] = 0
    assert idx.match([10, 11]) == {1: 2}
    assert idx.remove(1, [20], engine=True) == 0


def test_strided_memoryview_of_array_q_is_accepted(BlockIndex: type) -> None:
    # Regression: as_u64_array passed a non-contiguous 'Q' memoryview to
    # np.frombuffer, which raised BufferError (a strided ndarray worked).
    idx = BlockIndex()
    idx.store(1, memoryview(array("Q", [10, 0, 11, 0]))[::2])
    assert idx.match([10, 11]) == {1: 2}


# -- errors -------------------------------------------------------------------

# (call, exception, message regex). Worker 3 is unknown to the populated index
# and worker 1 is known, so the "unchanged" check also covers registration.
ERRORS: list[tuple[str, Callable[[Any], Any], type[Exception], str]] = [
    # worker ids
    ("store_worker_-1", lambda i: i.store(-1, [1]), OverflowError,
     r"^worker -1 is outside the uint64 range \[0, 2\*\*64\)$"),
    ("store_worker_2**64", lambda i: i.store(2**64, [1]), OverflowError,
     r"^worker 18446744073709551616 is outside the uint64 range"),
    ("store_worker_str", lambda i: i.store("x", [1]), TypeError,
     r"^worker must be an integer, not str$"),
    ("store_worker_float", lambda i: i.store(1.5, [1]), TypeError,
     r"^worker must be an integer, not float$"),
    ("store_worker_None", lambda i: i.store(None, [1]), TypeError,
     r"^worker must be an integer, not NoneType$"),
    ("remove_worker_-1", lambda i: i.remove(-1, [10]), OverflowError, r"^worker -1 is outside"),
    ("remove_worker_str", lambda i: i.remove("x", [10]), TypeError, r"^worker must be an integer"),
    ("clear_-1", lambda i: i.clear(-1), OverflowError, r"^worker -1 is outside"),
    ("clear_2**64", lambda i: i.clear(2**64), OverflowError, r"^worker 18446744073709551616 is"),
    ("clear_str", lambda i: i.clear("x"), TypeError, r"^worker must be an integer, not str$"),
    ("clear_float", lambda i: i.clear(1.0), TypeError, r"^worker must be an integer, not float$"),
    ("remove_worker_-1", lambda i: i.remove_worker(-1), OverflowError, r"^worker -1 is outside"),
    ("remove_worker_2**64", lambda i: i.remove_worker(2**64), OverflowError, r"^worker 1844"),
    ("remove_worker_str", lambda i: i.remove_worker("x"), TypeError, r"^worker must be an integ"),
    ("remove_worker_float", lambda i: i.remove_worker(1.5), TypeError, r"^worker must be an int"),
    ("worker_len_-1", lambda i: i.worker_len(-1), OverflowError, r"^worker -1 is outside"),
    ("worker_len_2**64", lambda i: i.worker_len(2**64), OverflowError, r"^worker 1844"),
    ("worker_len_str", lambda i: i.worker_len("x"), TypeError, r"^worker must be an integer"),
    ("worker_len_float", lambda i: i.worker_len(1.5), TypeError, r"^worker must be an integer"),
    # hash items: the valid ones before the bad one must not be applied
    ("store_item_-1", lambda i: i.store(3, [20, 21, -1]), OverflowError,
     r"^hashes item -1 is outside the uint64 range \[0, 2\*\*64\)$"),
    ("store_item_2**64", lambda i: i.store(1, [20, 2**64]), OverflowError,
     r"^hashes item 18446744073709551616 is outside the uint64 range"),
    ("store_item_float", lambda i: i.store(1, [20, 2.0]), TypeError,
     r"^hashes item must be an integer, not float$"),
    ("store_item_str", lambda i: i.store(1, [20, "21"]), TypeError,
     r"^hashes item must be an integer, not str$"),
    ("store_item_None", lambda i: i.store(1, [20, None]), TypeError,
     r"^hashes item must be an integer, not NoneType$"),
    ("store_str", lambda i: i.store(3, "abc"), TypeError,
     r"^hashes must be a sequence of integers, not str$"),
    ("store_bytes", lambda i: i.store(3, b"\x01\x02"), TypeError,
     r"^hashes must be a sequence of integers, not bytes$"),
    ("store_bytearray", lambda i: i.store(3, bytearray(b"\x01")), TypeError,
     r"^hashes must be a sequence of integers, not bytearray$"),
    ("store_int", lambda i: i.store(3, 5), TypeError,
     r"^hashes must be a sequence of integers, not int$"),
    ("store_None", lambda i: i.store(3, None), TypeError,
     r"^hashes must be a sequence of integers, not NoneType$"),
    ("store_float64_array", lambda i: i.store(3, np.array([20.0])), TypeError,
     r"^hashes must hold integers, not float64$"),
    ("store_empty_float_array", lambda i: i.store(3, np.array([], dtype=np.float32)), TypeError,
     r"^hashes must hold integers, not float32$"),
    ("store_object_array", lambda i: i.store(3, np.array([20], dtype=object)), TypeError,
     r"^hashes must hold integers, not object$"),
    ("store_array_d", lambda i: i.store(3, array("d", [20.0])), TypeError,
     r"^hashes item must be an integer, not float$"),
    ("store_negative_int64_array", lambda i: i.store(3, np.array([20, -1])), OverflowError,
     r"^hashes item -1 is outside the uint64 range \[0, 2\*\*64\)$"),
    ("store_negative_int8_array", lambda i: i.store(3, np.array([-7], dtype=np.int8)),
     OverflowError, r"^hashes item -7 is outside the uint64 range"),
    ("store_negative_array_q", lambda i: i.store(3, array("q", [20, -2])), OverflowError,
     r"^hashes item -2 is outside the uint64 range"),
    ("store_2d_uint64", lambda i: i.store(3, np.zeros((2, 2), dtype=np.uint64)), ValueError,
     r"^hashes must be one-dimensional, got shape \(2, 2\)$"),
    ("store_2d_int64", lambda i: i.store(3, np.zeros((1, 3), dtype=np.int64)), ValueError,
     r"^hashes must be one-dimensional, got shape \(1, 3\)$"),
    ("store_0d", lambda i: i.store(3, np.array(5, dtype=np.uint64)), ValueError,
     r"^hashes must be one-dimensional, got shape \(\)$"),
    # parent, tier and engine hashes
    ("store_parent_-1", lambda i: i.store(3, [20], parent=-1), OverflowError,
     r"^parent -1 is outside the uint64 range"),
    ("store_parent_2**64", lambda i: i.store(3, [20], parent=2**64), OverflowError,
     r"^parent 18446744073709551616 is outside"),
    ("store_parent_str", lambda i: i.store(3, [20], parent="10"), TypeError,
     r"^parent must be an integer, not str$"),
    ("store_tier_gpu", lambda i: i.store(3, [20], tier="gpu"), ValueError,
     r"^unknown tier 'gpu'; expected one of 'device', 'host', 'disk'$"),
    ("store_tier_upper", lambda i: i.store(3, [20], tier="DEVICE"), ValueError,
     r"^unknown tier 'DEVICE'"),
    ("store_tier_empty", lambda i: i.store(3, [20], tier=""), ValueError, r"^unknown tier ''"),
    ("store_engine_short", lambda i: i.store(3, [20, 21], engine_hashes=[7]), ValueError,
     r"^engine_hashes has 1 items but hashes has 2$"),
    ("store_engine_long", lambda i: i.store(1, [20], engine_hashes=[7, 910]), ValueError,
     r"^engine_hashes has 2 items but hashes has 1$"),
    ("store_engine_for_empty", lambda i: i.store(3, [], engine_hashes=[7]), ValueError,
     r"^engine_hashes has 1 items but hashes has 0$"),
    ("store_engine_-1", lambda i: i.store(1, [20], engine_hashes=[-1]), OverflowError,
     r"^engine_hashes item -1 is outside the uint64 range"),
    ("store_engine_2**64", lambda i: i.store(1, [20], engine_hashes=[2**64]), OverflowError,
     r"^engine_hashes item 18446744073709551616 is outside"),
    ("store_engine_str", lambda i: i.store(1, [20], engine_hashes="a"), TypeError,
     r"^engine_hashes must be a sequence of integers, not str$"),
    ("store_engine_float_array", lambda i: i.store(1, [20], engine_hashes=np.array([1.5])),
     TypeError, r"^engine_hashes must hold integers, not float64$"),
    ("store_engine_2d", lambda i: i.store(1, [20], engine_hashes=np.zeros((1, 1), np.uint64)),
     ValueError, r"^engine_hashes must be one-dimensional, got shape \(1, 1\)$"),
    # removal
    ("remove_item_-1", lambda i: i.remove(1, [10, -1]), OverflowError,
     r"^hashes item -1 is outside the uint64 range"),
    ("remove_item_2**64", lambda i: i.remove(1, [10, 2**64]), OverflowError,
     r"^hashes item 18446744073709551616 is outside"),
    ("remove_engine_item_-1", lambda i: i.remove(1, [910, -1], engine=True), OverflowError,
     r"^hashes item -1 is outside"),
    ("remove_str", lambda i: i.remove(1, "abc"), TypeError,
     r"^hashes must be a sequence of integers, not str$"),
    ("remove_bytes", lambda i: i.remove(1, b"ab"), TypeError,
     r"^hashes must be a sequence of integers, not bytes$"),
    ("remove_float_array", lambda i: i.remove(1, np.array([10.0])), TypeError,
     r"^hashes must hold integers, not float64$"),
    ("remove_negative_int64_array", lambda i: i.remove(1, np.array([10, -3])), OverflowError,
     r"^hashes item -3 is outside"),
    ("remove_2d", lambda i: i.remove(1, np.array([[10]], dtype=np.uint64)), ValueError,
     r"^hashes must be one-dimensional, got shape \(1, 1\)$"),
    ("remove_tier", lambda i: i.remove(1, [10], tier="gpu"), ValueError,
     r"^unknown tier 'gpu'; expected one of 'device', 'host', 'disk'$"),
    ("remove_engine_tier", lambda i: i.remove(1, [910], engine=True, tier="ssd"), ValueError,
     r"^unknown tier 'ssd'"),
    # queries
    ("match_item_-1", lambda i: i.match([10, -1]), OverflowError, r"^hashes item -1 is outside"),
    ("match_item_2**64", lambda i: i.match([2**64]), OverflowError, r"^hashes item 1844"),
    ("match_str", lambda i: i.match("abc"), TypeError, r"^hashes must be a sequence of integ"),
    ("match_float_array", lambda i: i.match(np.array([1.0])), TypeError, r"^hashes must hold"),
    ("match_2d", lambda i: i.match(np.zeros((2, 1), np.uint64)), ValueError,
     r"^hashes must be one-dimensional"),
    ("match_array_item_-1", lambda i: i.match_array([10, -1], [1]), OverflowError,
     r"^hashes item -1 is outside"),
    ("match_array_worker_-1", lambda i: i.match_array([10], [1, -1]), OverflowError,
     r"^workers item -1 is outside the uint64 range"),
    ("match_array_worker_2**64", lambda i: i.match_array([10], [2**64]), OverflowError,
     r"^workers item 18446744073709551616 is outside"),
    ("match_array_worker_str", lambda i: i.match_array([10], [1, "2"]), TypeError,
     r"^workers item must be an integer, not str$"),
    ("match_array_workers_str", lambda i: i.match_array([10], "12"), TypeError,
     r"^workers must be a sequence of integers, not str$"),
    ("match_array_workers_int", lambda i: i.match_array([10], 1), TypeError,
     r"^workers must be a sequence of integers, not int$"),
    ("match_array_workers_float", lambda i: i.match_array([10], np.array([1.0])), TypeError,
     r"^workers must hold integers, not float64$"),
    ("match_array_workers_2d", lambda i: i.match_array([10], np.ones((1, 1), np.uint64)),
     ValueError, r"^workers must be one-dimensional, got shape \(1, 1\)$"),
    ("match_array_hashes_str", lambda i: i.match_array("ab", [1]), TypeError,
     r"^hashes must be a sequence of integers, not str$"),
    ("match_tiers_item_-1", lambda i: i.match_tiers([-1]), OverflowError, r"^hashes item -1"),
    ("match_tiers_bytes", lambda i: i.match_tiers(b"a"), TypeError, r"^hashes must be a seq"),
    ("match_tiers_2d", lambda i: i.match_tiers(np.zeros((2, 1), np.int32)), ValueError,
     r"^hashes must be one-dimensional"),
]  # fmt: skip


def populated(BlockIndex: type) -> Any:
    idx = BlockIndex()
    idx.store(1, [10, 11, 12], engine_hashes=[910, 911, 912])
    idx.store(1, [12, 13], tier="host")
    idx.store(2, [10, 11], parent=5)
    idx.remove(2, [99])
    return idx


PROBES = [[10, 11, 12, 13], [20, 21], [11, 12], [10]]


@pytest.mark.parametrize(("name", "call", "exc", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_invalid_input_raises_and_leaves_the_index_unchanged(
    BlockIndex: type,
    name: str,
    call: Callable[[Any], Any],
    exc: type[Exception],
    message: str,
) -> None:
    idx = populated(BlockIndex)
    before = snapshot(idx, PROBES)
    with pytest.raises(exc, match=message):
        call(idx)
    idx._check()
    assert snapshot(idx, PROBES) == before
    # Engine handles are not observable without mutating: resolve them last.
    assert idx.remove(1, [910, 911, 912], engine=True) == 0


def test_invalid_store_does_not_overwrite_engine_handles(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(1, [10], engine_hashes=[900])
    with pytest.raises(ValueError, match="unknown tier"):
        idx.store(1, [20], tier="gpu", engine_hashes=[900])
    with pytest.raises(OverflowError, match="hashes item -1"):
        idx.store(1, [20, -1], engine_hashes=[900, 901])
    assert idx.remove(1, [900], engine=True) == 0
    assert len(idx) == 0


@pytest.mark.parametrize("tier", [None, 0, b"device", ("device",)])
def test_a_tier_that_is_not_a_string_is_an_unknown_tier(BlockIndex: type, tier: object) -> None:
    idx = BlockIndex()
    with pytest.raises(ValueError, match=r"^unknown tier "):
        idx.store(1, [10], tier=tier)
    with pytest.raises(ValueError, match=r"^unknown tier "):
        idx.remove(1, [10], tier=tier)
    assert idx.workers() == []


def test_arguments_are_validated_in_signature_order(BlockIndex: type) -> None:
    idx = BlockIndex()
    bad = {"parent": -1, "tier": "gpu", "engine_hashes": "x"}
    with pytest.raises(TypeError, match=r"^worker "):
        idx.store("x", "abc", **bad)
    with pytest.raises(TypeError, match=r"^hashes "):
        idx.store(1, "abc", **bad)
    with pytest.raises(OverflowError, match=r"^parent "):
        idx.store(1, [1], **bad)
    with pytest.raises(ValueError, match=r"^unknown tier"):
        idx.store(1, [1], tier="gpu", engine_hashes="x")
    with pytest.raises(TypeError, match=r"^engine_hashes "):
        idx.store(1, [1], engine_hashes="x")
    with pytest.raises(TypeError, match=r"^worker "):
        idx.remove(-0.5, "abc", tier="gpu")
    with pytest.raises(TypeError, match=r"^hashes "):
        idx.remove(1, "abc", tier="gpu")
    assert idx.workers() == []


# -- sentinel and colliding keys ----------------------------------------------


@pytest.mark.parametrize("key", SENTINEL_KEYS)
def test_sentinel_keys_are_absent_until_stored(BlockIndex: type, key: int) -> None:
    idx = BlockIndex()
    assert idx.match([key]) == {}
    assert idx.remove(1, [key]) == 1
    idx.store(1, [k for k in SENTINEL_KEYS if k != key])
    assert idx.match([key]) == {}
    idx.store(2, [key])
    assert idx.match([key]) == {2: 1}
    assert len(idx) == len(SENTINEL_KEYS)
    idx.remove(1, [k for k in SENTINEL_KEYS if k != key])
    assert idx.match([key]) == {2: 1}
    assert idx.remove(2, [key]) == 0
    assert idx.match([key]) == {} and len(idx) == 0
    idx._check()


def test_sentinel_keys_after_churn_are_absent(BlockIndex: type) -> None:
    idx = BlockIndex()
    for round_ in range(3):
        keys = [round_ * 10_000 + i for i in range(1, 500)]
        idx.store(1, keys)
        idx.remove(1, keys)
    for key in SENTINEL_KEYS:
        assert idx.match([key]) == {}
        assert idx.match_tiers([key]) == {}
    assert len(idx) == 0


def test_a_chain_of_sentinel_keys_matches_in_full(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(0, SENTINEL_KEYS)
    idx.store(U64_MAX, SENTINEL_KEYS[:3])
    assert idx.match(SENTINEL_KEYS) == {0: len(SENTINEL_KEYS), U64_MAX: 3}


@pytest.mark.parametrize("worker", [0, 1, 2**32, 2**63, U64_MAX - 1, U64_MAX])
def test_sentinel_worker_ids_behave_like_any_other(BlockIndex: type, worker: int) -> None:
    idx = BlockIndex()
    idx.store(worker, [10, 11], engine_hashes=[worker, 0])
    idx.store(5, [10])
    assert idx.workers() == sorted([worker, 5])
    assert idx.match([10, 11]) == {worker: 2, 5: 1}
    assert idx.worker_len(worker) == 2
    assert idx.remove(worker, [worker], engine=True) == 0
    assert idx.clear(worker) == 1
    assert worker in idx.workers()
    assert idx.remove_worker(worker) == 0
    assert idx.workers() == [5]
    idx._check()


def test_worker_id_equal_to_a_key_is_not_confused_with_it(BlockIndex: type) -> None:
    idx = BlockIndex()
    idx.store(10, [20])
    idx.store(20, [10])
    assert idx.match([10]) == {20: 1}
    assert idx.match([20]) == {10: 1}


@pytest.mark.parametrize("family", COLLIDING)
def test_colliding_keys_are_stored_found_and_removed_independently(
    BlockIndex: type, family: str
) -> None:
    keys = COLLIDING[family]
    idx = BlockIndex()
    idx.store(1, keys)
    idx.store(2, keys[::2])
    assert len(idx) == len(keys)
    assert idx.match(keys) == {1: len(keys), 2: 1}
    for i, k in enumerate(keys):
        assert idx.match([k]) == ({1: 1, 2: 1} if i % 2 == 0 else {1: 1})
    idx._check()
    # Remove every third key from worker 1, in an order that breaks probe runs.
    gone = keys[::3][::-1]
    assert idx.remove(1, gone) == 0
    idx._check()
    for i, k in enumerate(keys):
        expect = {} if i % 3 == 0 else {1: 1}
        if i % 2 == 0:
            expect[2] = 1
        assert idx.match([k]) == expect, f"key #{i} of {family}"
    assert len(idx) == len(keys) - len([i for i in range(0, len(keys), 3) if i % 2])
    # Storing the removed keys again must not duplicate anything.
    idx.store(1, gone)
    assert len(idx) == len(keys) and idx.residencies() == len(keys) + len(keys[::2])
    assert idx.match(keys) == {1: len(keys), 2: 1}
    assert idx.remove(1, keys) == 0
    assert idx.remove(2, keys[::2]) == 0
    assert len(idx) == 0 and idx.residencies() == 0
    for k in keys:
        assert idx.match([k]) == {}
    idx._check()


def test_all_colliding_families_together_with_interleaved_churn(BlockIndex: type) -> None:
    keys = sorted({k for ks in COLLIDING.values() for k in ks} | set(SENTINEL_KEYS))
    rng = random.Random(20240607)
    idx = BlockIndex()
    copies: Counter[int] = Counter()
    for _ in range(6):
        add = rng.sample(keys, len(keys) // 2)
        idx.store(1, add)
        copies.update(add)
        drop = rng.sample(sorted(copies), len(copies) // 2)
        assert idx.remove(1, drop) == 0
        copies.subtract(drop)
        copies = +copies
        idx._check()
        assert len(idx) == idx.worker_len(1) == len(copies)
        assert [k for k in keys if held(idx, 1, k)] == sorted(copies)


# -- many workers -------------------------------------------------------------


def test_more_than_4096_workers_share_blocks(BlockIndex: type) -> None:
    rng = random.Random(7)
    spread = {rng.getrandbits(64) for _ in range(2500)}
    workers = sorted({0, U64_MAX, 2**63} | set(range(1, 2500)) | spread)
    assert len(workers) > 4096
    pos = {w: i for i, w in enumerate(workers)}
    chain = [101, 102, 103]
    idx = BlockIndex()
    for i, w in enumerate(workers):
        idx.store(w, chain[: i % 3 + 1], tier=("device", "host")[i % 2])
        idx.store(w, [200 + i % 7], engine_hashes=[5])
    assert idx.workers() == workers
    assert len(idx) == 3 + 7
    assert idx.match(chain) == {w: i % 3 + 1 for i, w in enumerate(workers)}
    tiers = idx.match_tiers(chain)
    assert tiers[workers[0]] == (1, 0, 0) and tiers[workers[1]] == (0, 2, 0)
    assert idx.residencies() == sum(i % 3 + 2 for i in range(len(workers)))
    # Drop half the workers, then bring in new ones (they may reuse internal slots).
    gone, kept = workers[::2], workers[1::2]
    for w in gone:
        assert idx.remove_worker(w) == pos[w] % 3 + 2
    assert idx.workers() == kept
    assert idx.match(chain) == {w: pos[w] % 3 + 1 for w in kept}
    fresh = [w + 1 for w in gone if w < U64_MAX and w + 1 not in pos]
    assert len(fresh) > 1000
    for w in fresh:
        idx.store(w, [101])
        assert idx.remove(w, [5], engine=True) == 1  # no handle inherited
    assert idx.workers() == sorted(kept + fresh)
    assert idx.match(chain) == {w: 1 for w in fresh} | {w: pos[w] % 3 + 1 for w in kept}
    for w in kept:
        assert idx.remove(w, [5], engine=True) == 0
        assert idx.worker_len(w) == pos[w] % 3 + 1
    idx._check()


def test_a_block_on_every_worker_survives_removals_of_single_workers(BlockIndex: type) -> None:
    idx = BlockIndex()
    workers = list(range(5000))
    for w in workers:
        idx.store(w, [1, 2])
    for w in workers[100:4900:3]:
        assert idx.remove(w, [2]) == 0
    expected = {w: 2 for w in workers}
    expected.update({w: 1 for w in workers[100:4900:3]})
    assert idx.match([1, 2]) == expected
    assert len(idx) == 2
    idx._check()


# -- memory -------------------------------------------------------------------


def test_sizeof_is_positive_and_grows_with_content(BlockIndex: type) -> None:
    empty = BlockIndex()
    small = BlockIndex()
    small.store(1, [1])
    big = BlockIndex()
    big.store(1, np.arange(20_000, dtype=np.uint64))
    with_handles = BlockIndex()
    with_handles.store(
        1, np.arange(20_000, dtype=np.uint64), engine_hashes=np.arange(20_000, dtype=np.uint64)
    )
    assert empty.sizeof() > 0
    assert small.sizeof() >= empty.sizeof()
    assert big.sizeof() > small.sizeof()
    assert with_handles.sizeof() > big.sizeof()


def test_sizeof_stays_bounded_under_churn_that_nets_to_zero(BlockIndex: type) -> None:
    # A long-lived base plus rounds of fresh keys that are stored then removed,
    # some by key and some through engine handles, on two tiers and workers.
    # Each round mixes random keys with a run that shares one home slot.
    rng = np.random.default_rng(11)
    idx = BlockIndex()
    base = np.arange(1, 1001, dtype=np.uint64) << np.uint64(32)
    idx.store(1, base)
    peaks, ends = [], []
    for r in range(30):
        clustered = [((r * 200 + i) * FIB_INV) % 2**64 for i in range(200)]
        fresh = np.concatenate(
            [rng.integers(0, U64_MAX, size=1800, dtype=np.uint64, endpoint=True),
             np.array(clustered, dtype=np.uint64)]
        )  # fmt: skip
        fresh = np.unique(fresh[~np.isin(fresh, base)])
        idx.store(1, fresh, engine_hashes=fresh ^ np.uint64(1))
        idx.store(2, fresh[::2], tier="host")
        peaks.append(idx.sizeof())
        assert idx.remove(1, fresh ^ np.uint64(1), engine=True) == 0
        assert idx.remove(2, fresh[::2], tier="host") == 0
        ends.append(idx.sizeof())
        assert len(idx) == len(base) and idx.residencies() == len(base)
    idx._check()
    # One growth step after the first round is allowed (a table may rehash
    # once to absorb deletions); a leak would grow round after round.
    assert max(peaks) <= 2 * peaks[0]
    assert ends[-1] <= max(peaks[:2])
    assert ends[-1] <= max(ends[:5])


# -- doctests and API parity ---------------------------------------------------


@pytest.mark.parametrize("module", [kvroute._index_py, kvroute._convert])
def test_module_doctests_pass(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_specification_doctests_hold_for_both_twins(BlockIndex: type) -> None:
    # The examples in the twin's docstrings (class and methods), run with
    # ``BlockIndex`` bound to the class under test.
    specs = [t for t in doctest.DocTestFinder().find(kvroute._index_py.BlockIndex) if t.examples]
    assert specs
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for spec in specs:
        spec.globs = {"BlockIndex": BlockIndex}
        runner.run(spec)
    assert runner.failures == 0


def _public_methods(cls: type) -> list[str]:
    return sorted(
        name
        for name, value in vars(cls).items()
        if callable(value) and (not name.startswith("_") or name == "_check")
    )


def _signature_from_text(text: str) -> inspect.Signature:
    """Parse ``name(params) -> ret`` as Cython's embedsignature writes it.

    C types before a parameter name (``str tier='device'``, ``bint engine``)
    are dropped; ``$self`` from ``__text_signature__`` becomes ``self``.
    """
    params = text[text.index("(") + 1 : text.rindex(")")].replace("$self", "self")
    cleaned = []
    for part in (p.strip() for p in params.split(",")):
        if not part:
            continue
        name, eq, default = part.partition("=")
        words = name.split()
        cleaned.append(words[-1] + (f"={default.strip()}" if eq else ""))
    tree = ast.parse(f"def f({', '.join(cleaned)}): pass")
    namespace: dict[str, Any] = {}
    exec(compile(tree, "<signature>", "exec"), namespace)
    return inspect.signature(namespace["f"])


def _signature_of(func: Any) -> tuple[str, inspect.Signature]:
    """The signature of a compiled method, by whichever route works."""
    try:
        return "inspect.signature", inspect.signature(func)
    except (TypeError, ValueError):
        pass
    text = getattr(func, "__text_signature__", None)
    if text:
        return "__text_signature__", _signature_from_text(text)
    first = (getattr(func, "__doc__", None) or "").strip().splitlines()
    if first and "(" in first[0]:
        return "docstring", _signature_from_text(first[0])
    raise AssertionError(f"no signature available for {func!r}")


def _shape(sig: inspect.Signature) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_signature_parser_reads_cython_embedded_signatures() -> None:
    sig = _signature_from_text(
        "BlockIndex.store(self, worker, hashes, parent=None, *, str tier='device', "
        "engine_hashes=None) -> None"
    )
    assert _shape(sig) == _shape(inspect.signature(kvroute._index_py.BlockIndex.store))
    sig = _signature_from_text("($self, worker, hashes, *, bint engine=False, tier='device')")
    assert _shape(sig) == _shape(inspect.signature(kvroute._index_py.BlockIndex.remove))


@pytest.mark.parametrize("name", _public_methods(kvroute._index_py.BlockIndex))
def test_compiled_method_signature_matches_the_twin(name: str) -> None:
    compiled = compiled_module("_index")
    if compiled is None:
        pytest.skip("kvroute._index is not loaded")
    assert hasattr(compiled.BlockIndex, name), f"compiled BlockIndex lacks {name}"
    _, expected = _signature_of(getattr(kvroute._index_py.BlockIndex, name))
    route, actual = _signature_of(getattr(compiled.BlockIndex, name))
    assert _shape(actual) == _shape(expected), f"{name} (compiled signature via {route})"


def test_compiled_module_exports_the_twins_names() -> None:
    compiled = compiled_module("_index")
    if compiled is None:
        pytest.skip("kvroute._index is not loaded")
    assert compiled.MAX_COPIES == kvroute._index_py.MAX_COPIES
    assert tuple(compiled.TIERS) == kvroute._index_py.TIERS
    assert set(kvroute._index_py.__all__) - {"HashesLike"} <= set(compiled.__all__)
    assert _public_methods(compiled.BlockIndex) == _public_methods(kvroute._index_py.BlockIndex)
    assert compiled.BlockIndex.__name__ == "BlockIndex"
