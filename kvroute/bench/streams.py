"""Index op streams: requests turned into the match / store / remove calls an index sees.

Per request, :func:`build_stream` emits one ``match`` over all its blocks,
then its engine's removed and stored events, as Dynamo's ``mooncake_bench``
does. Everything here runs before any clock starts.

The engine model
----------------
vLLM's block pool with prefix caching, reduced to what produces events: the
model is :class:`kvroute._block_pool.BlockPool` (shared with the simulator
and the mock worker), driven one request at a time. An engine holds
``capacity`` blocks. A request first reuses its longest cached prefix (those
blocks leave the free queue while in use), then allocates the rest, evicting
least-recently-freed cached blocks from the head of the free queue (one
removed event per request, listing the evicted blocks in eviction order),
then caches the new blocks (one stored event: the new contiguous blocks and
their parent). When the request finishes its blocks return to the free queue
*tail first*, as vLLM's ``free()`` does, so a prefix's root is freed last and
outlives its leaves. Requests on one engine run one after another (no
batching, no decode blocks), so every cached block is in the free queue
between requests. :class:`LruEngine` is that model per block;
:class:`UnitLruEngine` runs the same model per hash_id, 16x fewer steps.

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

import struct
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import xxhash

from .._block_pool import BlockPool

__all__ = [
    "MATCH",
    "REMOVE",
    "REMOVE_ENGINE",
    "STORE",
    "STORE_ENGINE",
    "U64",
    "LruEngine",
    "Op",
    "OpStream",
    "Served",
    "UnitLruEngine",
    "block_keys",
    "build_stream",
    "engine_hashes_of",
    "expected_holdings",
    "miss_heavy_requests",
    "synthetic_requests",
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
    """A mock engine's prefix cache: the shared block pool, one request at a time.

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
        self.capacity = capacity
        self._pool = BlockPool(capacity)

    def serve(self, keys: Sequence[int]) -> Served:
        """Run one request whose prompt blocks are ``keys`` (chained, in order).

        Runtime complexity: O(len(keys) + evictions).

        :param keys: the request's block keys; blocks beyond the capacity are
            not cached (vLLM would reject such a request; the router still
            queries all of them).
        :returns: the reuse, what is held afterwards, and the evictions.
        """
        pool = self._pool
        keys = keys[: self.capacity]
        hit = pool.match(keys)
        pool.acquire(keys[:hit])
        evicted: list[int] = []
        pool.removed = evicted
        # Between requests every cached block is free or evictable, so this fits.
        ok = pool.allocate(len(keys) - hit)
        assert ok
        for k in keys[hit:]:
            pool.name(k)
        pool.release(keys)
        return Served(hit, len(keys), evicted)

    def free_order(self) -> list[int]:
        """The cached blocks, next eviction first."""
        return list(self._pool.lru)

    def __len__(self) -> int:
        """Number of cached blocks."""
        return len(self._pool)


class UnitLruEngine:
    """:class:`LruEngine` at hash_id granularity: the same events, 16x fewer steps.

    Not a :class:`~kvroute._block_pool.BlockPool`: it is that model run-length
    encoded by hash_id, so that building the Mooncake stream takes seconds, not minutes.

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
