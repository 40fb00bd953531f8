"""Index benchmark: replay a request trace's match/store/remove stream through a BlockIndex.

The method follows Dynamo's ``mooncake_bench`` (lib/kv-router/benches): the
trace's requests are spread over mock engines, each engine's prefix cache
turns requests into KV events, and the index sees, per request, one ``match``
over all the request's blocks followed by that engine's removed and stored
events. Throughput is *block ops per second*:

- Dynamo's definition (``block_ops_per_s``): (query blocks + stored blocks)
  per second; removals are applied and timed but not counted;
- with removals counted (``block_ops_per_s_with_removals``): (query + stored
  + removed blocks) per second.

Everything is built before the clock starts (:func:`build_stream`); the timed
loop (:func:`run_kvroute`) only calls ``match`` / ``store`` / ``remove`` on
numpy uint64 arrays, in order, on one thread, through the public API. With
``--compare`` the same stream goes through Dynamo's ``RadixTree`` Python API
(:func:`run_dynamo`), its events pre-encoded in Dynamo's JSON wire format, and
every query's per-worker scores are checked against kvroute's.

What this does not measure: event decoding (the stream is pre-decoded), the
router's policy, locking under concurrent readers, and the GIL handoffs of a
multi-threaded service.

The engine model (:class:`LruEngine`)
-------------------------------------
vLLM's block pool with prefix caching, reduced to what produces events. An
engine holds ``capacity`` blocks. A request first reuses its longest cached
prefix (those blocks leave the free queue while in use), then allocates the
rest, evicting least-recently-freed cached blocks from the head of the free
queue (one removed event per request, listing the evicted blocks in eviction
order), then caches the new blocks (one stored event: the new contiguous
blocks and their parent). When the request finishes its blocks return to the
free queue *tail first*, as vLLM's ``free()`` does, so a prefix's root is
freed last and outlives its leaves. Requests on one engine run one after
another (no batching, no decode blocks), so every cached block is in the free
queue between requests.

Block keys
----------
Each trace ``hash_id`` expands to ``blocks_per_hash`` blocks (16 by default:
the Mooncake trace has 512-token ids, vLLM 32-token blocks). Keys are chained
so that equal id prefixes give equal keys and nothing else does: a *unit* (one
hash_id at one place in a prefix) gets ``xxh3_64(parent unit key || hash_id)``
and its j-th block ``splitmix64(unit key + (j + 1) * golden ratio)``. With
``engine_hashes`` each block also carries a distinct engine hash,
``splitmix64(key ^ salt)``, as a vLLM engine's own hash would be.

Workers are assigned uniformly at random with a fixed seed, as Dynamo's
``partition_trace`` does (with its own RNG, so the assignment is not the same
as Dynamo's, only drawn the same way).
"""

from __future__ import annotations

import gc
import json
import resource
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import xxhash

from .index_api import IndexLike

__all__ = [
    "MATCH",
    "REMOVE",
    "REMOVE_ENGINE",
    "STORE",
    "STORE_ENGINE",
    "LruEngine",
    "MemoryResult",
    "Op",
    "OpStream",
    "RunResult",
    "Served",
    "UnitLruEngine",
    "bench_workload",
    "block_keys",
    "build_stream",
    "dumps",
    "encode_dynamo",
    "engine_hashes_of",
    "expected_holdings",
    "maxrss_bytes",
    "measure_memory",
    "miss_heavy_requests",
    "render_report",
    "run_dynamo",
    "run_kvroute",
    "scores_mismatches",
    "synthetic_requests",
    "verify_state",
]

U64 = npt.NDArray[np.uint64]

#: Op kinds of a stream. The ``*_ENGINE`` kinds store with ``engine_hashes``
#: and remove with ``engine=True``.
MATCH: Final = 0
STORE: Final = 1
REMOVE: Final = 2
STORE_ENGINE: Final = 3
REMOVE_ENGINE: Final = 4

_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_MIX1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MIX2: Final = np.uint64(0x94D049BB133111EB)
_ENGINE_SALT: Final = np.uint64(0x5EED_E461_4E00_0001)
_KEY_SEED: Final = 0x6B76_726F_7574_6531  # "kvroute1": keys differ from any other xxh3 use
_PACK2: Final = struct.Struct("<QQ").pack


# -- keys -----------------------------------------------------------------


def _mix64(x: U64) -> U64:
    """splitmix64's finaliser, element-wise (arrays wrap silently; scalars would warn)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def block_keys(unit_keys: U64, blocks_per_unit: int) -> U64:
    """Expand unit keys into their blocks' keys: ``blocks_per_unit`` per unit, in order.

    Runtime complexity: O(len(unit_keys) * blocks_per_unit), vectorised.

    :param unit_keys: one key per hash_id position (see the module docstring).
    :param blocks_per_unit: blocks each hash_id stands for.
    :returns: the chained block keys, unit by unit.
    """
    subs = np.arange(1, blocks_per_unit + 1, dtype=np.uint64) * _GOLDEN
    return _mix64((unit_keys[:, None] + subs[None, :]).ravel())


def engine_hashes_of(keys: U64) -> U64:
    """The engine hash the mock engines report for each block key (distinct from the key).

    :param keys: kvroute block keys.
    :returns: one engine hash per key, a fixed function of the key.
    """
    return _mix64(keys ^ _ENGINE_SALT)


def _intern_units(
    paths: Iterable[Sequence[int]],
) -> tuple[list[npt.NDArray[np.int64]], U64]:
    """Give every (prefix, hash_id) a unit id and key; return per-request unit ids and keys."""
    ids: dict[tuple[int, int], int] = {}
    keys: list[int] = []
    out: list[npt.NDArray[np.int64]] = []
    for hash_ids in paths:
        parent_id = -1
        parent_key = 0
        path = []
        for h in hash_ids:
            uid = ids.get((parent_id, h))
            if uid is None:
                uid = ids[(parent_id, h)] = len(keys)
                keys.append(xxhash.xxh3_64_intdigest(_PACK2(parent_key, h), seed=_KEY_SEED))
            path.append(uid)
            parent_id, parent_key = uid, keys[uid]
        out.append(np.array(path, dtype=np.int64))
    return out, np.array(keys, dtype=np.uint64)


# -- the engine model -----------------------------------------------------


class Served(NamedTuple):
    """What one request did to an engine's cache.

    :param hit: leading blocks found cached (reused).
    :param cached: blocks of the request the engine holds afterwards (the
        request, cut to the engine's capacity).
    :param evicted: blocks evicted to make room, in eviction order.
    """

    hit: int
    cached: int
    evicted: list[int]


class LruEngine:
    """A mock engine's prefix cache: vLLM's free queue with tail-first release.

    >>> e = LruEngine(capacity=4)
    >>> e.serve([1, 2, 3])
    Served(hit=0, cached=3, evicted=[])
    >>> e.serve([4, 5])          # one free block, so the LRU block goes: 3, a leaf
    Served(hit=0, cached=2, evicted=[3])
    >>> e.serve([1, 2, 6])       # reuses 1, 2; evicts 5 (a leaf again), not 4
    Served(hit=2, cached=3, evicted=[5])
    >>> e.free_order()
    [4, 6, 2, 1]
    """

    def __init__(self, capacity: int) -> None:
        """:param capacity: blocks the engine can hold; at least 1.

        :raises ValueError: ``capacity`` < 1.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # The free queue, least recently freed first. Requests run one at a
        # time, so between requests every cached block is in it.
        self._free: OrderedDict[int, None] = OrderedDict()

    def serve(self, keys: Sequence[int]) -> Served:
        """Run one request whose prompt blocks are ``keys`` (chained, in order).

        Runtime complexity: O(len(keys) + evictions), C-level loops.

        :param keys: the request's block keys; blocks beyond the capacity are
            not cached (vLLM would reject such a request; the router still
            queries all of them).
        :returns: the reuse, what is held afterwards, and the evictions.
        """
        free = self._free
        keys = keys[: self.capacity]
        n = len(keys)
        hit = len(list(takewhile(free.__contains__, keys)))
        for k in keys[:hit]:  # in use now, so not evictable
            del free[k]
        excess = len(free) + n - self.capacity
        evicted = [free.popitem(last=False)[0] for _ in range(excess)] if excess > 0 else []
        # Release tail first: the last block becomes the oldest free block.
        free.update(zip(reversed(keys), [None] * n, strict=True))
        return Served(hit, n, evicted)

    def free_order(self) -> list[int]:
        """The cached blocks, next eviction first."""
        return list(self._free)

    def __len__(self) -> int:
        """Number of cached blocks."""
        return len(self._free)


class UnitLruEngine:
    """:class:`LruEngine` at hash_id granularity: the same events, 16x fewer steps.

    A request uses all blocks of each of its hash_ids and frees them tail
    first, so a hash_id's blocks sit side by side in the free queue, its last
    block oldest. The free queue can therefore hold one entry per hash_id
    (*unit*) with the number of its leading blocks still cached; eviction
    takes blocks from the back of the oldest unit. Requests longer than the
    capacity are cut to whole units. Tests check it against :class:`LruEngine`.

    >>> e = UnitLruEngine(capacity=7, blocks_per_unit=2)
    >>> e.serve([0, 1])
    (0, 4, [])
    >>> e.serve([2, 3])          # evicts unit 1's last block: (unit, had, taken)
    (0, 4, [(1, 2, 1)])
    >>> e.serve([0, 4])          # reuses unit 0; evicts the rest of 1, then half of 3
    (2, 4, [(1, 1, 1), (3, 2, 1)])
    >>> e.holdings()
    [(3, 1), (2, 2), (4, 2), (0, 2)]
    """

    def __init__(self, capacity: int, blocks_per_unit: int) -> None:
        """:param capacity: blocks the engine holds. :param blocks_per_unit: blocks per unit.

        :raises ValueError: ``capacity`` < ``blocks_per_unit`` or ``blocks_per_unit`` < 1.
        """
        if blocks_per_unit < 1 or capacity < blocks_per_unit:
            raise ValueError(
                f"need 1 <= blocks_per_unit <= capacity, got {blocks_per_unit} and {capacity}"
            )
        self.capacity = capacity
        self.blocks_per_unit = blocks_per_unit
        # unit -> leading blocks cached, least recently freed unit first.
        self._free: OrderedDict[int, int] = OrderedDict()
        self._blocks = 0

    def serve(self, path: Sequence[int]) -> tuple[int, int, list[tuple[int, int, int]]]:
        """Run one request made of the units ``path``.

        Runtime complexity: O(len(path) + units evicted).

        :param path: the request's unit ids, in prefix order.
        :returns: ``(hit, cached, evicted)``: leading blocks reused, blocks
            held afterwards, and per evicted unit ``(unit, blocks it had,
            blocks taken)``, in eviction order (blocks go last first).
        """
        bpu = self.blocks_per_unit
        free = self._free
        path = path[: self.capacity // bpu]
        hit = 0
        for u in path:
            c = free.pop(u, 0)
            hit += c
            if c < bpu:  # a miss or a partly evicted unit ends the cached prefix
                break
        n = len(path) * bpu
        excess = self._blocks + n - hit - self.capacity
        evicted: list[tuple[int, int, int]] = []
        while excess > 0:
            u, c = free.popitem(last=False)
            k = min(c, excess)
            evicted.append((u, c, k))
            if k < c:  # the rest of the unit stays, still the oldest
                free[u] = c - k
                free.move_to_end(u, last=False)
            excess -= k
            self._blocks -= k
        self._blocks += n - hit
        free.update(zip(reversed(path), [bpu] * len(path), strict=True))
        return hit, n, evicted

    def holdings(self) -> list[tuple[int, int]]:
        """``(unit, leading blocks cached)`` for every cached unit, next eviction first."""
        return list(self._free.items())

    def __len__(self) -> int:
        """Number of cached blocks."""
        return self._blocks


def _evicted_keys(unit_keys: U64, evicted: Sequence[tuple[int, int, int]]) -> U64:
    """Keys of the evicted blocks, in eviction order (each unit's blocks last first)."""
    arr = np.array(evicted, dtype=np.int64)
    units, present, taken = arr[:, 0], arr[:, 1], arr[:, 2]
    total = int(taken.sum())
    starts = np.repeat(np.cumsum(taken) - taken, taken)
    # block j of a unit is mixed with (j + 1); unit u's evicted blocks are
    # present-1, present-2, ..., present-taken.
    subs = np.repeat(present, taken) - (np.arange(total) - starts)
    return _mix64(np.repeat(unit_keys[units], taken) + subs.astype(np.uint64) * _GOLDEN)


# -- op streams -----------------------------------------------------------


class Op(NamedTuple):
    """One call of the timed loop.

    :param kind: :data:`MATCH`, :data:`STORE`, :data:`REMOVE`,
        :data:`STORE_ENGINE` or :data:`REMOVE_ENGINE`.
    :param worker: the engine (unused for MATCH).
    :param keys: kvroute block keys (the query, the stored or the removed blocks).
    :param parent: the stored blocks' parent key, or None.
    :param engine: the engine hashes of ``keys`` for the ``*_ENGINE`` kinds.
    """

    kind: int
    worker: int
    keys: U64
    parent: int | None
    engine: U64 | None


@dataclass
class OpStream:
    """A workload turned into index calls, with the counts the figures need."""

    name: str
    ops: list[Op]
    requests: int
    workers: int
    capacity: int
    blocks_per_hash: int
    engine_hashes: bool
    match_ops: int = 0
    store_ops: int = 0
    remove_ops: int = 0
    query_blocks: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0
    build_seconds: float = 0.0
    engines: list[UnitLruEngine] = field(default_factory=list, repr=False)
    unit_keys: U64 = field(default_factory=lambda: np.zeros(0, dtype=np.uint64), repr=False)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def dynamo_blocks(self) -> int:
        """Blocks counted by Dynamo's definition: query blocks + stored blocks."""
        return self.query_blocks + self.stored_blocks

    @property
    def all_blocks(self) -> int:
        """Query + stored + removed blocks."""
        return self.dynamo_blocks + self.removed_blocks

    def summary(self) -> dict[str, Any]:
        """The stream's parameters and counts, JSON-ready."""
        return {
            "requests": self.requests,
            "workers": self.workers,
            "capacity_blocks": self.capacity,
            "blocks_per_hash": self.blocks_per_hash,
            "engine_hashes": self.engine_hashes,
            **self.params,
            "ops": {"match": self.match_ops, "store": self.store_ops, "remove": self.remove_ops},
            "blocks": {
                "query": self.query_blocks,
                "stored": self.stored_blocks,
                "removed": self.removed_blocks,
            },
            "build_seconds": self.build_seconds,
        }


def build_stream(
    requests: Sequence[Sequence[int]],
    *,
    name: str = "trace",
    workers: int = 16,
    capacity: int = 16_384,
    blocks_per_hash: int = 16,
    seed: int = 42,
    engine_hashes: bool = False,
    assignment: Sequence[int] | None = None,
    params: dict[str, Any] | None = None,
) -> OpStream:
    """Turn requests (lists of hash_ids) into the index op stream, outside any timing.

    Per request, in order: one MATCH over all its blocks, then the engine's
    REMOVE (if it evicted anything) and STORE (if it cached new blocks), in the
    order an engine emits them (evictions happen while allocating, before the
    new blocks are cached).

    Runtime complexity: O(total blocks), a few seconds for the Mooncake trace.

    :param requests: each request's hash_ids.
    :param name: the workload's name, for reports.
    :param workers: number of mock engines; requests go to them uniformly at
        random (``numpy.random.default_rng(seed)``), unless ``assignment`` is given.
    :param capacity: blocks per engine.
    :param blocks_per_hash: blocks each hash_id expands to.
    :param seed: seed of the worker assignment.
    :param engine_hashes: store with engine hashes and remove by them.
    :param assignment: the engine of each request, instead of the random draw.
    :param params: extra parameters to report with the stream.
    :returns: the stream, its counts and the engines' final states.
    :raises ValueError: a parameter is out of range, or ``assignment`` has the
        wrong length or names an unknown engine.
    """
    if workers < 1 or capacity < 1 or blocks_per_hash < 1:
        raise ValueError("workers, capacity and blocks_per_hash must all be >= 1")
    t0 = time.perf_counter()
    if assignment is None:
        assign = np.random.default_rng(seed).integers(0, workers, size=len(requests)).tolist()
    else:
        assign = [int(w) for w in assignment]
        if len(assign) != len(requests):
            raise ValueError(f"assignment has {len(assign)} items for {len(requests)} requests")
        if any(not 0 <= w < workers for w in assign):
            raise ValueError(f"assignment names an engine outside [0, {workers})")
    paths, unit_keys = _intern_units(requests)
    engines = [UnitLruEngine(capacity, blocks_per_hash) for _ in range(workers)]
    ops: list[Op] = []
    s = OpStream(name, ops, len(requests), workers, capacity, blocks_per_hash, engine_hashes)
    s.engines = engines
    s.unit_keys = unit_keys
    s.params = dict(params or {})
    store_kind = STORE_ENGINE if engine_hashes else STORE
    remove_kind = REMOVE_ENGINE if engine_hashes else REMOVE
    for w, path in zip(assign, paths, strict=True):
        keys = block_keys(unit_keys[path], blocks_per_hash)
        ops.append(Op(MATCH, 0, keys, None, None))
        s.match_ops += 1
        s.query_blocks += len(keys)
        hit, cached, evicted = engines[w].serve(path.tolist())
        if evicted:
            gone = _evicted_keys(unit_keys, evicted)
            eng = engine_hashes_of(gone) if engine_hashes else None
            ops.append(Op(remove_kind, w, gone, None, eng))
            s.remove_ops += 1
            s.removed_blocks += len(gone)
        if cached > hit:
            new = keys[hit:cached]
            parent = int(keys[hit - 1]) if hit else None
            eng = engine_hashes_of(new) if engine_hashes else None
            ops.append(Op(store_kind, w, new, parent, eng))
            s.store_ops += 1
            s.stored_blocks += len(new)
    s.build_seconds = time.perf_counter() - t0
    return s


def expected_holdings(stream: OpStream) -> dict[int, set[int]]:
    """What each engine holds at the end of the stream, by the engine models.

    :returns: worker -> its cached block keys (workers holding nothing included).
    """
    out: dict[int, set[int]] = {}
    for w, engine in enumerate(stream.engines):
        held = engine.holdings()
        keys: set[int] = set()
        if held:
            units = np.array([u for u, _ in held], dtype=np.int64)
            counts = np.array([c for _, c in held], dtype=np.int64)
            every = block_keys(stream.unit_keys[units], stream.blocks_per_hash)
            every = every.reshape(len(held), stream.blocks_per_hash)
            mask = np.arange(stream.blocks_per_hash)[None, :] < counts[:, None]
            keys = set(every[mask].tolist())
        out[w] = keys
    return out


# -- workloads ------------------------------------------------------------


def synthetic_requests(
    n_requests: int = 10_000,
    *,
    seed: int = 7,
    roots: int = 64,
    max_units: int = 48,
) -> list[list[int]]:
    """Random prefix trees: many conversations branching off shared system prompts.

    Each request extends an earlier request (or, one time in five, one of
    ``roots`` system prompts of 1-8 hash ids) by 1-4 fresh hash ids, so the
    requests form random trees with shared trunks. A path longer than
    ``max_units`` starts over from a system prompt.

    :param n_requests: how many requests to draw.
    :param seed: the generator's seed (same seed, same requests).
    :param roots: number of system prompts (tree roots).
    :param max_units: longest request, in hash ids.
    :returns: each request's hash_ids.
    """
    rng = np.random.default_rng(seed)
    next_id = 0
    prompts: list[list[int]] = []
    for _ in range(roots):
        n = int(rng.integers(1, 9))
        prompts.append(list(range(next_id, next_id + n)))
        next_id += n
    out: list[list[int]] = []
    for _ in range(n_requests):
        if not out or rng.random() < 0.2:
            base = prompts[int(rng.integers(roots))]
        else:
            base = out[int(rng.integers(len(out)))]
        grow = int(rng.integers(1, 5))
        if len(base) + grow > max_units:
            base = prompts[int(rng.integers(roots))]
        out.append([*base, *range(next_id, next_id + grow)])
        next_id += grow
    return out


def miss_heavy_requests(
    n_requests: int = 10_000,
    *,
    seed: int = 11,
    prompts: int = 4,
    max_units: int = 40,
) -> list[list[int]]:
    """Mostly unique prompts: most query blocks miss.

    Half the requests start with one of ``prompts`` one-hash-id system prompts
    (so the query walks a block shared by every engine, then misses); the rest
    are unique from the first block. One request in ten re-sends an earlier
    one, which hits only on the engine that served it.

    :param n_requests: how many requests to draw.
    :param seed: the generator's seed.
    :param prompts: number of shared one-hash-id system prompts.
    :param max_units: longest request, in hash ids.
    :returns: each request's hash_ids.
    """
    rng = np.random.default_rng(seed)
    next_id = prompts
    out: list[list[int]] = []
    for _ in range(n_requests):
        if out and rng.random() < 0.1:
            out.append(out[int(rng.integers(len(out)))])
            continue
        n = int(rng.integers(4, max_units + 1))
        head = [int(rng.integers(prompts))] if rng.random() < 0.5 else []
        out.append([*head, *range(next_id, next_id + n - len(head))])
        next_id += n
    return out


# -- timed replays --------------------------------------------------------


@dataclass
class RunResult:
    """Wall time of one replay and the query results it produced."""

    seconds: float
    results: list[Any]


def run_kvroute(stream: OpStream, index: IndexLike) -> RunResult:
    """Replay ``stream`` through ``index``: the timed loop.

    The garbage collector is off while the clock runs (as ``timeit`` does):
    the loop allocates one small dict per query and a collection would land
    in whichever run happened to cross the threshold.

    :param stream: the op stream, from :func:`build_stream`.
    :param index: a fresh index.
    :returns: the seconds taken and each MATCH's result, in order.
    """
    match, store, remove = index.match, index.store, index.remove
    results: list[dict[int, int]] = []
    append = results.append
    ops = stream.ops
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for kind, w, keys, parent, eng in ops:
            if kind == MATCH:
                append(match(keys))
            elif kind == STORE:
                store(w, keys, parent)
            elif kind == REMOVE:
                remove(w, keys)
            elif kind == STORE_ENGINE:
                store(w, keys, parent, engine_hashes=eng)
            else:
                remove(w, eng, engine=True)
        seconds = time.perf_counter() - t0
    finally:
        gc.enable()
    return RunResult(seconds, results)


DynamoOp = tuple[int, int, Any]


def encode_dynamo(stream: OpStream) -> list[DynamoOp]:
    """Pre-encode ``stream`` for Dynamo's RadixTree: events as JSON bytes, queries as lists.

    Each block's key is both its ``tokens_hash`` (what ``find_matches``
    matches) and, unless the stream has engine hashes, its ``block_hash``
    (Dynamo's handle for parent links and removals); with engine hashes the
    engine hash is the ``block_hash``, as a real engine's would be.

    Runtime complexity: O(blocks in the stream); seconds for the Mooncake trace.

    :param stream: from :func:`build_stream`.
    :returns: ``(MATCH, 0, [keys])`` or ``(STORE|REMOVE, worker, json_bytes)`` per op.
    """
    out: list[DynamoOp] = []
    event_id = 0
    for kind, w, keys, parent, eng in stream.ops:
        if kind == MATCH:
            out.append((MATCH, 0, keys.tolist()))
            continue
        event_id += 1
        handles = (eng if eng is not None else keys).tolist()
        if kind in (STORE, STORE_ENGINE):
            if parent is None:
                p = "null"
            elif eng is None:
                p = str(parent)
            else:
                p = str(int(engine_hashes_of(np.array([parent], dtype=np.uint64))[0]))
            blocks = ",".join(
                f'{{"block_hash":{b},"tokens_hash":{t}}}'
                for b, t in zip(handles, keys.tolist(), strict=True)
            )
            text = (
                f'{{"event_id":{event_id},"data":{{"stored":'
                f'{{"parent_hash":{p},"blocks":[{blocks}]}}}}}}'
            )
            out.append((STORE, w, text.encode()))
        else:
            ids = ",".join(map(str, handles))
            text = f'{{"event_id":{event_id},"data":{{"removed":{{"block_hashes":[{ids}]}}}}}}'
            out.append((REMOVE, w, text.encode()))
    return out


def run_dynamo(encoded: Sequence[DynamoOp], tree: Any) -> RunResult:
    """Replay a pre-encoded stream through Dynamo's ``RadixTree``: the comparison's timed loop.

    :param encoded: from :func:`encode_dynamo`.
    :param tree: a fresh ``dynamo._core.RadixTree``.
    :returns: the seconds taken and each query's ``OverlapScores``, in order.
    :raises RuntimeError: Dynamo rejected an event (the stream is inconsistent).
    """
    find, apply = tree.find_matches, tree.apply_event
    results: list[Any] = []
    append = results.append
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for kind, w, payload in encoded:
            if kind == MATCH:
                append(find(payload))
            else:
                apply(w, payload)
        seconds = time.perf_counter() - t0
    finally:
        gc.enable()
    return RunResult(seconds, results)


def scores_mismatches(
    kvroute_results: Sequence[dict[int, int]], dynamo_results: Sequence[Any]
) -> tuple[int, list[str]]:
    """Compare per-worker scores query by query (Dynamo keys them by (worker, dp_rank)).

    :param kvroute_results: ``BlockIndex.match`` results, in query order.
    :param dynamo_results: ``RadixTree.find_matches`` results for the same queries.
    :returns: the number of queries that differ, and up to five descriptions.
    """
    bad = 0
    examples: list[str] = []
    for i, (ours, theirs) in enumerate(zip(kvroute_results, dynamo_results, strict=True)):
        dyn = {w: s for (w, _dp), s in theirs.scores.items() if s}
        mine = {w: s for w, s in ours.items() if s}
        if mine != dyn:
            bad += 1
            if len(examples) < 5:
                examples.append(
                    f"query {i}: kvroute {sorted(mine.items())[:8]}"
                    f" dynamo {sorted(dyn.items())[:8]}"
                )
    return bad, examples


# -- memory ---------------------------------------------------------------


def maxrss_bytes() -> int:
    """The process's peak resident set so far, in bytes (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass
class MemoryResult:
    """Bytes per residency after a fill, and what churn did to ``sizeof()``."""

    residencies: int
    blocks: int
    workers: int
    engine_hashes: bool
    sizeof_bytes: int
    fill_seconds: float
    churn_rounds: int
    churn_residencies: int
    churn_sizeof: list[int]
    churn_state_ok: bool

    @property
    def bytes_per_residency(self) -> float:
        """``sizeof()`` / residencies after the fill."""
        return self.sizeof_bytes / max(self.residencies, 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures, including the churn growth."""
        first = self.churn_sizeof[0] if self.churn_sizeof else self.sizeof_bytes
        last = self.churn_sizeof[-1] if self.churn_sizeof else self.sizeof_bytes
        return {
            "residencies": self.residencies,
            "blocks": self.blocks,
            "workers": self.workers,
            "engine_hashes": self.engine_hashes,
            "sizeof_bytes": self.sizeof_bytes,
            "bytes_per_residency": self.bytes_per_residency,
            "fill_seconds": self.fill_seconds,
            "fill_residencies_per_s": self.residencies / self.fill_seconds
            if self.fill_seconds
            else None,
            "churn": {
                "rounds": self.churn_rounds,
                "residencies_per_round": self.churn_residencies,
                "sizeof_after_each_round": self.churn_sizeof,
                "growth_first_round_bytes": first - self.sizeof_bytes,
                "growth_after_first_round_bytes": last - first,
                "state_restored": self.churn_state_ok,
            },
        }


def _placements(
    rng: np.random.Generator, n_residencies: int, workers: int, chain: int, parent: int | None
) -> Iterable[tuple[list[int], U64, int | None]]:
    """Chains of fresh blocks and the workers holding them, totalling ``n_residencies``.

    By block: 80% on one worker, 15% on two, 5% on three or four (never more
    than ``workers``). Each chain hangs under ``parent``.
    """
    left = n_residencies
    while left > 0:
        r = rng.random()
        k = 1 if r < 0.80 else 2 if r < 0.95 else 3 if r < 0.975 else 4
        k = min(k, workers, left)
        n = min(chain, -(-left // k))
        keys = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
        holders = rng.choice(workers, size=k, replace=False).tolist()
        left -= n * k
        yield holders, keys, parent


def measure_memory(
    index_factory: Callable[[], IndexLike],
    residencies: int = 10_000_000,
    *,
    workers: int = 16,
    seed: int = 42,
    engine_hashes: bool = False,
    shared_prefix: int = 1_024,
    chain: int = 256,
    churn_rounds: int = 5,
    churn_residencies: int | None = None,
) -> MemoryResult:
    """Fill an index to about ``residencies`` (block, worker) pairs, then churn it.

    The fill is a realistic mix: a ``shared_prefix``-block system prompt held
    by every worker, then chains of ``chain`` fresh blocks under it, 80% of
    them on one worker, 15% on two and 5% on three or four. Churn rounds store
    ``churn_residencies`` more (same mix, plus one more copy of the shared
    prefix everywhere) and remove all of it again, tail first: the index
    returns to the same contents, and ``sizeof()`` must not keep growing.

    :param index_factory: makes an empty index.
    :param residencies: fill target (reached to within one chain's workers).
    :param workers: workers holding blocks.
    :param seed: the key generator's seed.
    :param engine_hashes: store with engine hashes, and churn-remove by them.
    :param churn_rounds: store-and-remove rounds after the fill (0: none).
    :param churn_residencies: residencies per round (default: a tenth of the
        fill, at most one million).
    :returns: the figures.
    """
    rng = np.random.default_rng(seed)
    idx = index_factory()
    prefix = rng.integers(0, np.iinfo(np.uint64).max, size=shared_prefix, dtype=np.uint64)
    prefix_eng = engine_hashes_of(prefix)
    per_round = (
        churn_residencies if churn_residencies is not None else min(1_000_000, residencies // 10)
    )

    def put(w: int, keys: U64, parent: int | None) -> None:
        if engine_hashes:
            idx.store(w, keys, parent, engine_hashes=engine_hashes_of(keys))
        else:
            idx.store(w, keys, parent)

    root = int(prefix[-1]) if shared_prefix else None
    gc.collect()
    t0 = time.perf_counter()
    for w in range(workers):
        put(w, prefix, None)
    for holders, keys, parent in _placements(
        rng, max(0, residencies - shared_prefix * workers), workers, chain, root
    ):
        for w in holders:
            put(w, keys, parent)
    fill_seconds = time.perf_counter() - t0
    base = (idx.residencies(), len(idx), [idx.worker_len(w) for w in range(workers)])
    size = idx.sizeof()
    after: list[int] = []
    ok = True
    for _ in range(churn_rounds):
        placed = list(_placements(rng, per_round, workers, chain, root))
        for w in range(workers):
            put(w, prefix, None)
        for holders, keys, parent in placed:
            for w in holders:
                put(w, keys, parent)
        # Remove newest first and each chain tail first, as engines evict.
        for holders, keys, _parent in reversed(placed):
            for w in holders:
                if engine_hashes:
                    idx.remove(w, engine_hashes_of(keys[::-1]), engine=True)
                else:
                    idx.remove(w, keys[::-1])
        for w in range(workers):
            if engine_hashes:
                idx.remove(w, prefix_eng[::-1], engine=True)
            else:
                idx.remove(w, prefix[::-1])
        after.append(idx.sizeof())
        state = (idx.residencies(), len(idx), [idx.worker_len(w) for w in range(workers)])
        ok = ok and state == base
    return MemoryResult(
        residencies=base[0],
        blocks=base[1],
        workers=workers,
        engine_hashes=engine_hashes,
        sizeof_bytes=size,
        fill_seconds=fill_seconds,
        churn_rounds=churn_rounds,
        churn_residencies=per_round,
        churn_sizeof=after,
        churn_state_ok=ok,
    )


# -- a whole benchmark ---------------------------------------------------


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def verify_state(stream: OpStream, index: IndexLike) -> bool:
    """Whether every engine's block count in ``index`` equals its engine model's.

    Runtime complexity: O(workers). The tests check the keys themselves.

    :param stream: the replayed stream (its engines hold their final state).
    :param index: the index the stream was replayed through.
    :returns: True when the counts agree, worker by worker and in total.
    """
    return all(index.worker_len(w) == len(e) for w, e in enumerate(stream.engines)) and (
        index.residencies() == sum(len(e) for e in stream.engines)
    )


def bench_workload(
    stream: OpStream,
    index_factory: Callable[[], IndexLike],
    *,
    repeat: int = 3,
    tree_factory: Callable[[], Any] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Time ``stream`` through fresh indexes (and Dynamo trees), side by side.

    Rounds alternate kvroute and Dynamo so that both see the same machine
    load; the figures are medians over rounds and the ratio is the median of
    the per-round ratios. The first round's query results are cross-checked
    and its index is measured (``sizeof()``, residencies) and checked against
    the engine models before it is dropped.

    :param stream: from :func:`build_stream`.
    :param index_factory: makes an empty BlockIndex.
    :param repeat: rounds (at least 1).
    :param tree_factory: makes an empty ``dynamo._core.RadixTree``; None
        skips the comparison.
    :param log: receives progress lines.
    :returns: the workload's figures, JSON-ready.
    :raises ValueError: ``repeat`` < 1.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    out: dict[str, Any] = {"name": stream.name, **stream.summary(), "repeat": repeat}
    ours: list[float] = []
    theirs: list[float] = []
    encoded: list[DynamoOp] = []
    first: RunResult | None = None
    dyn_first: RunResult | None = None
    for r in range(repeat):
        index = index_factory()
        run = run_kvroute(stream, index)
        ours.append(run.seconds)
        log(f"  {stream.name}: kvroute round {r + 1}/{repeat}: {run.seconds:.3f} s")
        if r == 0:
            first = run
            out["peak_sizeof_bytes"] = index.sizeof()
            out["residencies"] = index.residencies()
            out["blocks_indexed"] = len(index)
            out["bytes_per_residency"] = out["peak_sizeof_bytes"] / max(out["residencies"], 1)
            out["state_ok"] = verify_state(stream, index)
            out["maxrss_bytes"] = maxrss_bytes()
        del index
        if tree_factory is not None:
            if r == 0:
                t0 = time.perf_counter()
                encoded = encode_dynamo(stream)
                out["compare_encode_seconds"] = time.perf_counter() - t0
            dyn = run_dynamo(encoded, tree_factory())
            theirs.append(dyn.seconds)
            log(f"  {stream.name}: dynamo  round {r + 1}/{repeat}: {dyn.seconds:.3f} s")
            if r == 0:
                dyn_first = dyn
    seconds = _median(ours)
    out["seconds"] = seconds
    out["seconds_all"] = ours
    out["block_ops_per_s"] = stream.dynamo_blocks / seconds
    out["block_ops_per_s_with_removals"] = stream.all_blocks / seconds
    if tree_factory is not None:
        assert first is not None and dyn_first is not None
        dseconds = _median(theirs)
        bad, examples = scores_mismatches(first.results, dyn_first.results)
        out["compare"] = {
            "seconds": dseconds,
            "seconds_all": theirs,
            "block_ops_per_s": stream.dynamo_blocks / dseconds,
            "block_ops_per_s_with_removals": stream.all_blocks / dseconds,
            "ratio": _median([d / k for k, d in zip(ours, theirs, strict=True)]),
            "encode_seconds": out.pop("compare_encode_seconds"),
            "queries_checked": len(first.results),
            "mismatches": bad,
            "mismatch_examples": examples,
        }
    return out


def _si(x: float) -> str:
    """Figures like 20.13 M, 980.2 k."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(cells[0]).ljust(widths[0])]
        parts += [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def render_report(report: dict[str, Any]) -> str:
    """The terminal form of a report made by the ``bench`` command.

    :param report: the dict also written by ``--json``.
    :returns: text with one table per section.
    """
    idx = report["index"]
    lines = [
        f"kvroute {report['kvroute_version']} index benchmark: {idx['implementation']} index"
        f" ({idx['module']}), Python {report['machine']['python']},"
        f" {report['machine']['cpus']} CPUs, single thread",
        "block ops/s = (query blocks + stored blocks) / s, as Dynamo's mooncake_bench counts;"
        " '+removed' counts removed blocks too",
        "",
    ]
    workloads = report.get("workloads", {})
    if workloads:
        rows = []
        for name, w in workloads.items():
            rows.append(
                [
                    name,
                    f"{w['requests']:,}",
                    str(w["workers"]),
                    f"{w['blocks']['query']:,}",
                    f"{w['blocks']['stored']:,}",
                    f"{w['blocks']['removed']:,}",
                    f"{w['build_seconds']:.1f}",
                ]
            )
        lines.append(
            _table(
                [
                    "workload",
                    "requests",
                    "workers",
                    "query blk",
                    "stored blk",
                    "removed blk",
                    "build s",
                ],
                rows,
            )
        )
        lines.append("")
        rows = []
        for name, w in workloads.items():
            rows.append(
                [
                    name,
                    f"{w['seconds']:.3f}",
                    _si(w["block_ops_per_s"]),
                    _si(w["block_ops_per_s_with_removals"]),
                    f"{w['residencies']:,}",
                    f"{w['peak_sizeof_bytes'] / 2**20:.1f}",
                    f"{w['bytes_per_residency']:.1f}",
                    f"{w['maxrss_bytes'] / 2**20:.0f}",
                    "ok" if w["state_ok"] else "WRONG",
                ]
            )
        lines.append(
            _table(
                [
                    "kvroute",
                    "seconds",
                    "block ops/s",
                    "+removed",
                    "residencies",
                    "sizeof MiB",
                    "B/res",
                    "maxrss MiB",
                    "state",
                ],
                rows,
            )
        )
        compared = {n: w["compare"] for n, w in workloads.items() if "compare" in w}
        if compared:
            lines.append("")
            rows = []
            for name, c in compared.items():
                rows.append(
                    [
                        name,
                        f"{c['seconds']:.3f}",
                        _si(c["block_ops_per_s"]),
                        _si(c["block_ops_per_s_with_removals"]),
                        f"{c['ratio']:.1f}x",
                        f"{c['mismatches']}/{c['queries_checked']:,}",
                    ]
                )
            lines.append(
                _table(
                    [
                        f"dynamo {report.get('dynamo_version', '')} RadixTree",
                        "seconds",
                        "block ops/s",
                        "+removed",
                        "kvroute/dynamo",
                        "mismatches",
                    ],
                    rows,
                )
            )
        lines.append(
            f"(median of {next(iter(workloads.values()))['repeat']} rounds;"
            " maxrss is the whole process so far)"
        )
    memory = report.get("memory", {})
    if memory:
        lines.append("")
        rows = []
        for name, m in memory.items():
            churn = m["churn"]
            rows.append(
                [
                    name,
                    f"{m['residencies']:,}",
                    f"{m['blocks']:,}",
                    f"{m['sizeof_bytes'] / 2**20:.1f}",
                    f"{m['bytes_per_residency']:.1f}",
                    f"{churn['rounds']} x {churn['residencies_per_round']:,}",
                    f"{churn['growth_first_round_bytes']:+,}",
                    f"{churn['growth_after_first_round_bytes']:+,}",
                    "ok" if churn["state_restored"] else "WRONG",
                ]
            )
        lines.append(
            _table(
                [
                    "memory",
                    "residencies",
                    "blocks",
                    "sizeof MiB",
                    "B/res",
                    "churn",
                    "growth 1st",
                    "growth later",
                    "state",
                ],
                rows,
            )
        )
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    """JSON text of a report (floats as Python writes them, keys in insertion order)."""
    return json.dumps(obj, indent=2)
