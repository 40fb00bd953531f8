"""The index benchmark's machinery: engine models, op streams, replays, Dynamo agreement.

No timing is asserted anywhere: these tests check that the benchmark measures
the right thing (the events an engine would emit, applied in order, leaving
the index holding exactly what the engines hold).
"""

from __future__ import annotations

import doctest
import importlib.util
import itertools
import json
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvroute.bench
import kvroute.traces
from kvroute import bench
from kvroute.bench import (
    MATCH,
    REMOVE,
    REMOVE_ENGINE,
    STORE,
    STORE_ENGINE,
    LruEngine,
    OpStream,
    UnitLruEngine,
)

HAVE_DYNAMO = importlib.util.find_spec("dynamo") is not None
needs_dynamo = pytest.mark.skipif(not HAVE_DYNAMO, reason="needs the 'compare' extra")


def small_trace_stream(**kwargs: Any) -> OpStream:
    """The first 300 Mooncake requests on a small fleet, so that engines evict a lot."""
    rows = kvroute.traces.load_trace(limit=300)
    options: dict[str, Any] = {"workers": 4, "capacity": 512, "blocks_per_hash": 4}
    options.update(kwargs)
    return bench.build_stream([r.hash_ids for r in rows], name="small", **options)


def test_doctests() -> None:
    for module in (kvroute.bench.streams, kvroute.traces):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# -- the per-block engine model -------------------------------------------


def test_engine_releases_tail_first_so_roots_outlive_leaves() -> None:
    e = LruEngine(capacity=6)
    assert e.serve([1, 2, 3]) == (0, 3, [])
    assert e.free_order() == [3, 2, 1]  # the leaf is evicted first
    assert e.serve([4, 5, 6]) == (0, 3, [])
    assert e.free_order() == [3, 2, 1, 6, 5, 4]
    # Three more blocks: the oldest three go, leaf first, root last.
    assert e.serve([7, 8, 9]) == (0, 3, [3, 2, 1])
    assert e.free_order() == [6, 5, 4, 9, 8, 7]


def test_engine_reuse_refreshes_the_prefix_and_evicts_leaves_of_others() -> None:
    e = LruEngine(capacity=5)
    e.serve([1, 2, 3])
    e.serve([1, 2, 4])  # reuses 1, 2; caches 4; nothing to evict (4 of 5 used)
    assert e.free_order() == [3, 4, 2, 1]
    # [1, 5, 6]: reuses 1, needs two blocks, one free: evicts 3 (the oldest leaf).
    assert e.serve([1, 5, 6]) == (1, 3, [3])
    assert e.free_order() == [4, 2, 6, 5, 1]
    # [7]: evicts 4 (a leaf), never 2 before its child 4.
    assert e.serve([7]) == (0, 1, [4])


def test_engine_never_evicts_blocks_in_use() -> None:
    e = LruEngine(capacity=4)
    e.serve([1, 2])
    e.serve([3, 4])  # free queue: 2 1 4 3
    # Reusing 1, 2 takes them out of the free queue: 4 and 3 go instead.
    assert e.serve([1, 2, 5, 6]) == (2, 4, [4, 3])
    assert e.free_order() == [6, 5, 2, 1]


def test_engine_caps_a_request_at_its_capacity() -> None:
    e = LruEngine(capacity=3)
    assert e.serve([1, 2, 3, 4, 5]) == (0, 3, [])
    assert e.free_order() == [3, 2, 1]
    assert e.serve([1, 2, 3, 4, 5]) == (3, 3, [])


def test_engine_hit_stops_at_the_first_missing_block() -> None:
    e = LruEngine(capacity=8)
    e.serve([1, 2, 3])
    assert e.serve([1, 9, 3]) == (1, 3, [])


def test_engine_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError, match="capacity"):
        LruEngine(0)
    with pytest.raises(ValueError, match="blocks_per_unit"):
        UnitLruEngine(3, 4)


# -- the unit engine against the per-block one ----------------------------


def replay_both(
    requests: Sequence[Sequence[int]], capacity: int, bpu: int
) -> tuple[list[Any], list[Any]]:
    """Run both engine models on the same requests; return comparable event lists."""
    paths, unit_keys = bench.streams._intern_units(requests)
    blocks = LruEngine(capacity)
    units = UnitLruEngine(capacity, bpu)
    per_block, per_unit = [], []
    for path in paths:
        keys = bench.block_keys(unit_keys[path], bpu).tolist()
        # The unit model cuts a too-long request to whole units; do the same here.
        keys = keys[: (capacity // bpu) * bpu]
        hit, cached, evicted = blocks.serve(keys)
        per_block.append((hit, cached, evicted))
        u_hit, u_cached, u_evicted = units.serve(path.tolist())
        gone = bench.streams._evicted_keys(unit_keys, u_evicted).tolist() if u_evicted else []
        per_unit.append((u_hit, u_cached, gone))
    held = units.holdings()
    expect = []
    for u, c in held:
        expect += bench.block_keys(unit_keys[[u]], bpu).tolist()[:c][::-1]
    assert blocks.free_order() == expect  # same free queue, block for block
    assert len(units) == len(blocks)
    return per_block, per_unit


@given(
    requests=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=7), min_size=1, max_size=40),
    capacity=st.integers(1, 24),
    bpu=st.integers(1, 4),
)
def test_unit_engine_emits_the_per_block_engines_events(
    requests: list[list[int]], capacity: int, bpu: int
) -> None:
    capacity = max(capacity, bpu)
    per_block, per_unit = replay_both(requests, capacity, bpu)
    assert per_unit == per_block


def test_unit_engine_on_the_mooncake_head() -> None:
    rows = kvroute.traces.load_trace(limit=400)
    per_block, per_unit = replay_both([r.hash_ids for r in rows], 700, 4)
    assert per_unit == per_block
    assert sum(len(e[2]) for e in per_block) > 10_000  # evictions were exercised


# -- keys and op streams --------------------------------------------------


def test_keys_are_prefix_chained() -> None:
    paths, unit_keys = bench.streams._intern_units([[7, 8, 9], [7, 8, 5], [1, 8, 9]])
    a, b, c = (bench.block_keys(unit_keys[p], 3) for p in paths)
    assert len(a) == 9 and len(set(a.tolist())) == 9
    assert (a[:6] == b[:6]).all() and not set(a[6:].tolist()) & set(b[6:].tolist())
    # Same ids after a different first id: no key in common at all.
    assert not set(a.tolist()) & set(c.tolist())
    assert not set(a.tolist()) & set(bench.engine_hashes_of(a).tolist())


def stream_fingerprint(s: OpStream) -> list[tuple[Any, ...]]:
    return [
        (
            op.kind,
            op.worker,
            op.keys.tolist(),
            op.parent,
            None if op.engine is None else op.engine.tolist(),
        )
        for op in s.ops
    ]


def test_stream_is_deterministic_and_seeded() -> None:
    a, b = small_trace_stream(), small_trace_stream()
    assert stream_fingerprint(a) == stream_fingerprint(b)
    assert a.summary() | {"build_seconds": 0} == b.summary() | {"build_seconds": 0}
    c = small_trace_stream(seed=43)
    assert [op.worker for op in c.ops] != [op.worker for op in a.ops]


def test_stream_shape_and_counts() -> None:
    s = small_trace_stream()
    rows = kvroute.traces.load_trace(limit=300)
    kinds = [op.kind for op in s.ops]
    assert kinds.count(MATCH) == s.match_ops == 300
    assert kinds.count(STORE) == s.store_ops and kinds.count(REMOVE) == s.remove_ops
    assert s.remove_ops > 0
    assert s.query_blocks == 4 * sum(len(r.hash_ids) for r in rows)
    assert s.stored_blocks == sum(len(op.keys) for op in s.ops if op.kind == STORE)
    assert s.removed_blocks == sum(len(op.keys) for op in s.ops if op.kind == REMOVE)
    assert s.dynamo_blocks == s.query_blocks + s.stored_blocks
    assert s.all_blocks == s.dynamo_blocks + s.removed_blocks
    # Every request starts with its MATCH; a REMOVE comes before the STORE.
    assert kinds[0] == MATCH
    for prev, cur in itertools.pairwise(kinds):
        assert (prev, cur) != (STORE, REMOVE)
    for op in s.ops:
        assert op.keys.dtype == np.uint64 and op.keys.flags.c_contiguous


def test_store_parent_is_the_block_before_the_new_ones() -> None:
    s = small_trace_stream()
    last_query: list[int] = []
    for op in s.ops:
        if op.kind == MATCH:
            last_query = op.keys.tolist()
        elif op.kind == STORE:
            start = last_query.index(int(op.keys[0]))
            assert op.keys.tolist() == last_query[start : start + len(op.keys)]
            assert op.parent == (last_query[start - 1] if start else None)


def test_explicit_assignment() -> None:
    s = bench.build_stream([[1, 2], [1, 3], [1, 2]], workers=2, capacity=8,
                           blocks_per_hash=2, assignment=[1, 1, 0])  # fmt: skip
    assert [op.worker for op in s.ops if op.kind == STORE] == [1, 1, 0]
    with pytest.raises(ValueError, match="assignment has"):
        bench.build_stream([[1]], assignment=[0, 0])
    with pytest.raises(ValueError, match="outside"):
        bench.build_stream([[1]], workers=2, assignment=[2])


def test_engine_hash_stream_carries_engine_hashes() -> None:
    plain, eng = small_trace_stream(), small_trace_stream(engine_hashes=True)
    assert [op.kind for op in eng.ops] == [
        {STORE: STORE_ENGINE, REMOVE: REMOVE_ENGINE}.get(op.kind, op.kind) for op in plain.ops
    ]
    for op in eng.ops:
        if op.kind in (STORE_ENGINE, REMOVE_ENGINE):
            assert op.engine is not None
            assert op.engine.tolist() == bench.engine_hashes_of(op.keys).tolist()


def test_generated_workloads_are_deterministic() -> None:
    assert bench.synthetic_requests(200) == bench.synthetic_requests(200)
    assert bench.synthetic_requests(200) != bench.synthetic_requests(200, seed=8)
    assert bench.miss_heavy_requests(200) == bench.miss_heavy_requests(200)
    syn = bench.synthetic_requests(500)
    assert all(1 <= len(r) <= 48 for r in syn)
    # Prefix trees: many requests extend an earlier request.
    earlier = {tuple(r) for r in syn}
    assert sum(tuple(r[:-1]) in earlier or tuple(r[:-2]) in earlier for r in syn) > 100


# -- replays: the index ends up holding what the engines hold -------------


def expected_scores(holdings: dict[int, set[int]], keys: list[int]) -> dict[int, int]:
    out = {}
    for w, held in holdings.items():
        n = 0
        for k in keys:
            if k not in held:
                break
            n += 1
        if n:
            out[w] = n
    return out


@pytest.mark.parametrize("engine_hashes", [False, True], ids=["keys", "engine-hashes"])
def test_replay_leaves_the_index_holding_what_the_engines_hold(
    BlockIndex: type, engine_hashes: bool
) -> None:
    s = small_trace_stream(engine_hashes=engine_hashes)
    idx = BlockIndex()
    run = bench.run_kvroute(s, idx)
    assert len(run.results) == s.match_ops and run.seconds > 0
    holdings = bench.expected_holdings(s)
    assert bench.verify_state(s, idx)
    assert idx.residencies() == sum(len(h) for h in holdings.values())
    assert idx.stats()["unknown_removals"] == 0 and idx.stats()["orphan_stores"] == 0
    for w, held in holdings.items():
        assert idx.worker_len(w) == len(held)
        for k in random.Random(w).sample(sorted(held), min(200, len(held))):
            assert w in idx.match([k])
    for op in s.ops[::7]:
        if op.kind == MATCH:
            assert idx.match(op.keys) == expected_scores(holdings, op.keys.tolist())
    idx._check()


def test_verify_state_notices_a_lost_event(BlockIndex: type) -> None:
    s = small_trace_stream()
    lost = next(i for i, op in enumerate(s.ops) if op.kind == REMOVE)
    s.ops.pop(lost)
    idx = BlockIndex()
    bench.run_kvroute(s, idx)
    assert not bench.verify_state(s, idx)


# -- Dynamo ---------------------------------------------------------------


def test_dynamo_encoding_is_dynamos_json() -> None:
    for engine_hashes in (False, True):
        s = small_trace_stream(engine_hashes=engine_hashes)
        encoded = bench.encode_dynamo(s)
        assert len(encoded) == len(s.ops)
        ids = []
        for op, (kind, w, payload) in zip(s.ops, encoded, strict=True):
            if op.kind == MATCH:
                assert (kind, payload) == (MATCH, op.keys.tolist())
                continue
            assert w == op.worker
            event = json.loads(payload)
            ids.append(event["event_id"])
            handles = (op.engine if engine_hashes else op.keys).tolist()  # type: ignore[union-attr]
            if op.kind in (STORE, STORE_ENGINE):
                stored = event["data"]["stored"]
                assert [b["tokens_hash"] for b in stored["blocks"]] == op.keys.tolist()
                assert [b["block_hash"] for b in stored["blocks"]] == handles
                parent = op.parent
                if parent is not None and engine_hashes:
                    parent = bench.engine_hashes_of(np.array([parent], np.uint64)).tolist()[0]
                assert stored["parent_hash"] == parent
            else:
                assert event["data"]["removed"]["block_hashes"] == handles
        assert ids == list(range(1, len(ids) + 1))


@needs_dynamo
@pytest.mark.compare
@pytest.mark.parametrize("engine_hashes", [False, True], ids=["keys", "engine-hashes"])
def test_dynamo_radix_tree_agrees_on_every_query(BlockIndex: type, engine_hashes: bool) -> None:
    from dynamo._core import RadixTree

    s = small_trace_stream(engine_hashes=engine_hashes)
    ours = bench.run_kvroute(s, BlockIndex())
    theirs = bench.run_dynamo(bench.encode_dynamo(s), RadixTree())
    assert bench.scores_mismatches(ours.results, theirs.results) == (0, [])
    # The check has teeth: scores are not all empty, and a wrong one is caught.
    assert sum(bool(r) for r in ours.results) > 100
    bad = [dict(r) for r in ours.results]
    i = next(i for i, r in enumerate(bad) if r)
    w = next(iter(bad[i]))
    bad[i][w] += 1
    n, examples = bench.scores_mismatches(bad, theirs.results)
    assert n == 1 and examples[0].startswith(f"query {i}:")


@needs_dynamo
@pytest.mark.compare
def test_bench_workload_with_compare(BlockIndex: type) -> None:
    from dynamo._core import RadixTree

    s = small_trace_stream()
    lines: list[str] = []
    out = bench.bench_workload(s, BlockIndex, repeat=2, tree_factory=RadixTree, log=lines.append)
    assert len(lines) == 4
    assert out["state_ok"] and out["compare"]["mismatches"] == 0
    assert out["compare"]["queries_checked"] == 300
    assert len(out["seconds_all"]) == len(out["compare"]["seconds_all"]) == 2
    assert out["block_ops_per_s"] == pytest.approx(s.dynamo_blocks / out["seconds"])
    assert out["compare"]["ratio"] > 0
    json.dumps(out)


def test_bench_workload_without_compare(BlockIndex: type) -> None:
    s = small_trace_stream()
    out = bench.bench_workload(s, BlockIndex, repeat=1)
    assert "compare" not in out
    for key in (
        "block_ops_per_s", "block_ops_per_s_with_removals", "seconds", "peak_sizeof_bytes",
        "bytes_per_residency", "maxrss_bytes", "residencies", "ops", "blocks",
    ):  # fmt: skip
        assert key in out, key
    assert out["residencies"] == 4 * 512  # every engine is full
    assert out["bytes_per_residency"] == out["peak_sizeof_bytes"] / out["residencies"]
    with pytest.raises(ValueError, match="repeat"):
        bench.bench_workload(s, BlockIndex, repeat=0)


# -- memory ---------------------------------------------------------------


@pytest.mark.parametrize("engine_hashes", [False, True], ids=["keys", "engine-hashes"])
def test_memory_fill_and_churn(BlockIndex: type, engine_hashes: bool) -> None:
    m = bench.measure_memory(
        BlockIndex, 20_000, workers=8, engine_hashes=engine_hashes, shared_prefix=64,
        chain=32, churn_rounds=2, churn_residencies=3_000,
    )  # fmt: skip
    assert 20_000 <= m.residencies < 20_000 + 4
    assert m.blocks < m.residencies  # some blocks live on several workers
    assert m.churn_state_ok and len(m.churn_sizeof) == 2
    d = m.as_dict()
    assert d["bytes_per_residency"] == m.sizeof_bytes / m.residencies
    assert d["churn"]["growth_after_first_round_bytes"] == m.churn_sizeof[1] - m.churn_sizeof[0]
    json.dumps(d)


def test_memory_mix_has_shared_and_replicated_blocks(BlockIndex: type) -> None:
    idx_holder: list[Any] = []

    def factory() -> Any:
        idx_holder.append(BlockIndex())
        return idx_holder[-1]

    m = bench.measure_memory(factory, 30_000, workers=8, shared_prefix=100, churn_rounds=0)
    idx = idx_holder[0]
    assert m.churn_sizeof == [] and m.churn_state_ok
    # Per worker, its share; the whole shared prefix on each.
    assert all(idx.worker_len(w) >= 100 for w in range(8))
    assert m.residencies / m.blocks == pytest.approx(1.3, abs=0.15)


# -- the report -----------------------------------------------------------


def test_render_report_shows_every_section(BlockIndex: type) -> None:
    s = small_trace_stream()
    w = bench.bench_workload(s, BlockIndex, repeat=1)
    w["compare"] = {
        "seconds": 1.0, "block_ops_per_s": 2.4e6, "block_ops_per_s_with_removals": 3e6,
        "ratio": 8.25, "mismatches": 0, "queries_checked": 300,
    }  # fmt: skip
    m = bench.measure_memory(BlockIndex, 2_000, workers=4, churn_rounds=1).as_dict()
    report = {
        "kvroute_version": "0",
        "index": {"implementation": "python", "module": "kvroute._index_py"},
        "machine": {"python": "3", "cpus": 2},
        "dynamo_version": "1.6.1",
        "workloads": {"small": w},
        "memory": {"kvroute keys": m},
        "notes": ["a note"],
    }
    text = bench.render_report(report)
    for needle in ("small", "block ops/s", "8.2x", "0/300", "kvroute keys", "note: a note"):
        assert needle in text, needle
    assert "2.40 M" in text
