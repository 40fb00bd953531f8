"""BlockIndex hot paths with pytest-benchmark, compiled twin beside the reference twin.

Run for figures (medians; compare within a group, as ratios: machines are noisy)::

    python -m pytest benchmarks/bench_index.py --benchmark-enable --benchmark-group-by=group

Every benchmark is parametrised over the twins (``c`` = ``kvroute._index`` when
it is built, ``py`` = ``kvroute._index_py``) and over sizes in powers of ten.
Data comes from fixed seeds and is built outside the timed call; indexes that
a call mutates are rebuilt in the (untimed) setup of each round. The normal
test run collects this file with ``--benchmark-disable``, so each runs once.

What these do not measure: event decoding, locking under concurrent
readers, and anything above the index (scoring, policies). The end-to-end
figure is ``python -m kvroute bench``; ``bench_replay`` is a small version of it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from kvroute import bench
from kvroute.traces import load_trace

SIZES = [10**3, 10**4, 10**5]
CHAIN = 128  # blocks per store / remove / match call: one prompt's worth
WORKERS = 16
ROUNDS = 5


def _twins() -> list[ModuleType]:
    mods = [importlib.import_module("kvroute._index_py")]
    if not os.environ.get("KVROUTE_NO_EXTENSIONS"):
        # A missing build is not skipped silently: tests/test_build.py fails.
        with contextlib.suppress(ImportError):
            mods.insert(0, importlib.import_module("kvroute._index"))
    return mods


TWINS = _twins()
TWIN_IDS = ["py" if m.__name__.endswith("_py") else "c" for m in TWINS]


@pytest.fixture(params=TWINS, ids=TWIN_IDS)
def new_index(request: pytest.FixtureRequest) -> Callable[[], Any]:
    """Makes an empty BlockIndex of one twin."""
    return request.param.BlockIndex  # type: ignore[no-any-return]


def chains(n: int, seed: int) -> list[np.ndarray]:
    """``n`` fresh random keys (fixed seed) cut into prompts of CHAIN blocks."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
    return [keys[i : i + CHAIN] for i in range(0, n, CHAIN)]


def filled(new_index: Callable[[], Any], parts: list[np.ndarray]) -> Any:
    """An index holding ``parts``: each prompt on one worker, every 8th also on a second."""
    idx = new_index()
    for i, c in enumerate(parts):
        idx.store(i % WORKERS, c)
        if i % 8 == 0:
            idx.store((i + 1) % WORKERS, c)
    return idx


@pytest.mark.parametrize("n", SIZES)
def bench_store(benchmark: Any, new_index: Callable[[], Any], n: int) -> None:
    """Store n fresh blocks, CHAIN per call, into an empty index."""
    parts = chains(n, seed=1)
    benchmark.group = f"store {n:,} blocks"
    benchmark.extra_info["blocks"] = n

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (new_index(),), {}

    def store_all(idx: Any) -> None:
        for i, c in enumerate(parts):
            idx.store(i % WORKERS, c)

    benchmark.pedantic(store_all, setup=setup, rounds=ROUNDS)


@pytest.mark.parametrize("n", SIZES)
def bench_store_engine_hashes(benchmark: Any, new_index: Callable[[], Any], n: int) -> None:
    """Store n fresh blocks with engine hashes (the handle map is written too)."""
    parts = chains(n, seed=1)
    engine = [bench.engine_hashes_of(c) for c in parts]
    benchmark.group = f"store+engine {n:,} blocks"
    benchmark.extra_info["blocks"] = n

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (new_index(),), {}

    def store_all(idx: Any) -> None:
        for i, (c, e) in enumerate(zip(parts, engine, strict=True)):
            idx.store(i % WORKERS, c, engine_hashes=e)

    benchmark.pedantic(store_all, setup=setup, rounds=ROUNDS)


@pytest.mark.parametrize("n", SIZES)
def bench_remove(benchmark: Any, new_index: Callable[[], Any], n: int) -> None:
    """Remove every block of an index holding n, tail first, CHAIN per call."""
    parts = chains(n, seed=2)
    benchmark.group = f"remove {n:,} blocks"
    benchmark.extra_info["blocks"] = n
    tails = [c[::-1].copy() for c in parts]

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        idx = new_index()
        for i, c in enumerate(parts):
            idx.store(i % WORKERS, c)
        return (idx,), {}

    def remove_all(idx: Any) -> None:
        for i, c in enumerate(tails):
            idx.remove(i % WORKERS, c)

    benchmark.pedantic(remove_all, setup=setup, rounds=ROUNDS)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["hit", "miss"])
def bench_match(benchmark: Any, new_index: Callable[[], Any], n: int, kind: str) -> None:
    """100 queries of CHAIN blocks against an index holding n blocks.

    ``hit``: each query is a stored prompt (full-length matches on one or two
    workers). ``miss``: each query is fresh (one probe, nothing found).
    """
    parts = chains(n, seed=3)
    idx = filled(new_index, parts)
    rng = np.random.default_rng(4)
    if kind == "hit":
        queries = [parts[int(i)] for i in rng.integers(0, len(parts), size=100)]
    else:
        queries = chains(100 * CHAIN, seed=5)
    blocks = sum(len(q) for q in queries)
    benchmark.group = f"match-{kind} in {n:,} blocks"
    benchmark.extra_info["query_blocks"] = blocks

    def match_all() -> int:
        found = 0
        for q in queries:
            found += len(idx.match(q))
        return found

    found = benchmark(match_all)
    assert found >= 100 if kind == "hit" else found == 0


@pytest.fixture(scope="module")
def small_stream() -> bench.OpStream:
    """The first 500 Mooncake requests on 4 engines of 2,048 blocks (evictions included)."""
    rows = load_trace(limit=500)
    return bench.build_stream([r.hash_ids for r in rows], name="replay", workers=4, capacity=2_048)


def bench_replay(
    benchmark: Any, new_index: Callable[[], Any], small_stream: bench.OpStream
) -> None:
    """The ``kvroute bench`` loop on a small stream: match, remove, store in trace order."""
    benchmark.group = "replay 500 Mooncake requests"
    benchmark.extra_info["dynamo_blocks"] = small_stream.dynamo_blocks

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (new_index(),), {}

    def replay(idx: Any) -> None:
        bench.run_kvroute(small_stream, idx)

    benchmark.pedantic(replay, setup=setup, rounds=ROUNDS)


@pytest.mark.skipif(importlib.util.find_spec("dynamo") is None, reason="needs the 'compare' extra")
def bench_replay_dynamo(benchmark: Any, small_stream: bench.OpStream) -> None:
    """The same stream through Dynamo's RadixTree, in the same group, for the ratio."""
    from dynamo._core import RadixTree

    encoded = bench.encode_dynamo(small_stream)
    benchmark.group = "replay 500 Mooncake requests"
    benchmark.extra_info["dynamo_blocks"] = small_stream.dynamo_blocks

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (RadixTree(),), {}

    def replay(tree: Any) -> None:
        bench.run_dynamo(encoded, tree)

    benchmark.pedantic(replay, setup=setup, rounds=ROUNDS)


#: Residencies in a snapshot: a million for the compiled index (what a
#: large fleet holds), less for the twin, which would take minutes to fill.
DUMP_SIZES = {"c": [10**5, 10**6], "py": [10**4, 10**5]}


@pytest.fixture(params=[(m, n) for m, i in zip(TWINS, TWIN_IDS, strict=True)
                        for n in DUMP_SIZES[i]],
                ids=[f"{i}-{n}" for i in TWIN_IDS for n in DUMP_SIZES[i]])  # fmt: skip
def snapshot_index(request: pytest.FixtureRequest) -> tuple[Any, Any, int]:
    """An index of n residencies with engine handles, as KV events leave it (n / 8 shared)."""
    mod, n = request.param
    parts = chains(n * 8 // 9, seed=6)
    idx = mod.BlockIndex()
    for i, c in enumerate(parts):
        e = bench.engine_hashes_of(c)
        idx.store(i % WORKERS, c, engine_hashes=e)
        if i % 8 == 0:
            idx.store((i + 1) % WORKERS, c, engine_hashes=e)
    return mod, idx, idx.residencies()


def bench_dump(benchmark: Any, snapshot_index: tuple[Any, Any, int]) -> None:
    """``BlockIndex.dump()`` of an index of n residencies (the replica-sync snapshot)."""
    _, idx, n = snapshot_index
    benchmark.group = f"dump {n:,} residencies"
    data = benchmark.pedantic(idx.dump, rounds=ROUNDS)
    benchmark.extra_info["bytes"] = len(data)
    benchmark.extra_info["residencies"] = n


def bench_load(benchmark: Any, snapshot_index: tuple[Any, Any, int]) -> None:
    """``BlockIndex.load()`` of that dump into an empty index (a replica starting late)."""
    mod, idx, n = snapshot_index
    data = idx.dump()
    benchmark.group = f"load {n:,} residencies"
    benchmark.extra_info["bytes"] = len(data)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (mod.BlockIndex(),), {}

    def load(fresh: Any) -> None:
        fresh.load(data)

    benchmark.pedantic(load, setup=setup, rounds=ROUNDS)
