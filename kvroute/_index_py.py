"""Reference twin of the compiled :class:`BlockIndex`: plain dicts and sets.

This module is the specification. ``kvroute/_index.pyx`` must behave exactly
like it: same names, same ``inspect.signature`` parameter names, same results
and the same exceptions for the same input. It is written naively on purpose
(a dict of dicts, no probing code) so that the two implementations share as
few bugs as possible; the test-suite runs every index test against both.

Model
-----
A *block* is a 64-bit key (kvroute's chained block hash, see
:mod:`kvroute.hashing`). A chained key already encodes its whole prefix, so
"does worker W hold the first k blocks of this request" is k independent
look-ups: no tree is needed.

A *residency* is a (block, worker) pair. It carries one copy count per tier
(``"device"``, ``"host"``, ``"disk"``), because engines do not de-duplicate
blocks (vLLM may hold two copies of one hash and remove them one at a time)
and offloading engines hold a block in several tiers at once. A residency
exists while any of its counts is above zero. Counts saturate at
:data:`MAX_COPIES` (the extra copies are counted in ``stats()["saturated"]``
and otherwise ignored), so a runaway engine can never overflow them.

An *engine handle* is the id the engine uses for a block (vLLM's or SGLang's
own block hash). ``store(..., engine_hashes=...)`` records, per worker, which
kvroute key each engine hash names, so that ``remove(..., engine=True)`` can
resolve the engine's removals. A worker's handles for a block are dropped
with the block, whichever way it leaves.

Thread safety
-------------
Every public method is atomic: both twins serialise calls with an internal
lock (the compiled one releases the GIL only inside it, around loops over
large batches). Calls from several threads are therefore safe and see the
index either before or after any other call, never half-way.
"""

from __future__ import annotations

import functools
import sys
import threading
from array import array
from collections.abc import Callable, Iterable
from typing import Concatenate, Final, ParamSpec, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

from ._convert import TIERS, U64_MAX, as_u64_array, check_u64, tier_index
from ._dump import Dump, pack, positions, unpack

__all__ = ["MAX_COPIES", "TIERS", "BlockIndex", "HashesLike"]

#: Largest copy count kept per (block, worker, tier); further copies saturate.
MAX_COPIES: Final = 4095

#: Anything that can be read as a sequence of uint64 block keys.
HashesLike: TypeAlias = "npt.NDArray[np.uint64] | array[int] | Iterable[int]"


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _atomic(
    method: Callable[Concatenate[BlockIndex, _P], _R],
) -> Callable[Concatenate[BlockIndex, _P], _R]:
    """Run ``method`` under the index's lock, so each call is atomic (as in the compiled twin)."""

    @functools.wraps(method)
    def locked(self: BlockIndex, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class BlockIndex:
    """Which worker holds which KV block: the global prefix index.

    >>> idx = BlockIndex()
    >>> idx.store(0, [11, 12, 13])
    >>> idx.store(1, [11, 12])
    >>> sorted(idx.match([11, 12, 13, 14]).items())
    [(0, 3), (1, 2)]
    >>> idx.remove(0, [12, 99])   # 99 is unknown: counted, ignored
    1
    >>> sorted(idx.match([11, 12, 13]).items())
    [(0, 1), (1, 2)]
    """

    def __init__(self) -> None:
        # block -> worker -> [device, host, disk] copy counts (never all zero)
        self._blocks: dict[int, dict[int, list[int]]] = {}
        # worker -> engine hash -> block; a worker is known once it stored anything
        self._handles: dict[int, dict[int, int]] = {}
        # worker -> number of residencies
        self._resident: dict[int, int] = {}
        self._stats = {"unknown_removals": 0, "orphan_stores": 0, "saturated": 0}
        # Re-entrant: remove_worker calls clear, match calls match_tiers.
        self._lock = threading.RLock()

    # -- mutation ---------------------------------------------------------

    @_atomic
    def store(
        self,
        worker: int,
        hashes: HashesLike,
        parent: int | None = None,
        *,
        tier: str = "device",
        engine_hashes: HashesLike | None = None,
    ) -> None:
        """Record that ``worker`` now holds one more copy of each block in ``hashes``.

        Runtime complexity: O(len(hashes)).

        :param worker: the worker id, an int in [0, 2**64).
        :param hashes: the blocks' kvroute keys, in prefix order.
        :param parent: the key of the block before ``hashes[0]``, or None at
            the start of a prompt. A parent the worker does not hold means an
            event was lost; the store still applies and
            ``stats()["orphan_stores"]`` counts it.
        :param tier: ``"device"``, ``"host"`` or ``"disk"``.
        :param engine_hashes: the engine's own id for each block, one per key;
            ``remove(worker, ids, engine=True)`` later resolves them.
        :raises TypeError, OverflowError: an id is not an int in [0, 2**64).
        :raises ValueError: unknown tier, or ``engine_hashes`` of another length.
        """
        w = check_u64(worker, "worker")
        keys = as_u64_array(hashes)
        p = None if parent is None else check_u64(parent, "parent")
        t = tier_index(tier)
        eng = None if engine_hashes is None else as_u64_array(engine_hashes, "engine_hashes")
        if eng is not None and len(eng) != len(keys):
            raise ValueError(f"engine_hashes has {len(eng)} items but hashes has {len(keys)}")
        handles = self._handles.setdefault(w, {})
        self._resident.setdefault(w, 0)
        if p is not None and w not in self._blocks.get(p, {}):
            self._stats["orphan_stores"] += 1
        for i, k in enumerate(keys.tolist()):
            holders = self._blocks.setdefault(k, {})
            counts = holders.get(w)
            if counts is None:
                counts = holders[w] = [0, 0, 0]
                self._resident[w] += 1
            if counts[t] == MAX_COPIES:
                self._stats["saturated"] += 1
            else:
                counts[t] += 1
            if eng is not None:
                handles[int(eng[i])] = k

    @_atomic
    def remove(
        self,
        worker: int,
        hashes: HashesLike,
        *,
        engine: bool = False,
        tier: str = "device",
    ) -> int:
        """Remove one copy of each block from ``worker``'s ``tier``.

        A block leaves the worker with its last copy in its last tier, and its
        engine handles go with it. Blocks the worker does not hold in that tier
        (or engine hashes it has no handle for) are counted in
        ``stats()["unknown_removals"]`` and skipped; the rest of the batch
        still applies.

        Runtime complexity: O(len(hashes)), plus O(handles of the worker) for
        a block stored with engine handles that leaves by a kvroute key.

        :param engine: ``hashes`` are engine hashes to resolve through the
            worker's handles, not kvroute keys.
        :returns: how many of ``hashes`` were unknown.
        :raises TypeError, OverflowError: an id is not an int in [0, 2**64).
        :raises ValueError: unknown tier.
        """
        w = check_u64(worker, "worker")
        ids = as_u64_array(hashes)
        t = tier_index(tier)
        handles = self._handles.get(w, {})
        unknown = 0
        for h in ids.tolist():
            k = handles.get(h) if engine else h
            counts = None if k is None else self._blocks.get(k, {}).get(w)
            if counts is None or counts[t] == 0:
                unknown += 1
                continue
            counts[t] -= 1
            if not any(counts):
                assert k is not None
                self._drop(k, w)
        self._stats["unknown_removals"] += unknown
        return unknown

    def _drop(self, k: int, w: int) -> None:
        holders = self._blocks[k]
        del holders[w]
        if not holders:
            del self._blocks[k]
        self._resident[w] -= 1
        handles = self._handles[w]
        for e in [e for e, v in handles.items() if v == k]:
            del handles[e]

    @_atomic
    def clear(self, worker: int) -> int:
        """Drop every block ``worker`` holds (an engine reset); it stays known.

        Runtime complexity: O(number of blocks in the index).

        :returns: the number of blocks dropped.
        """
        w = check_u64(worker, "worker")
        dropped = 0
        for k in list(self._blocks):
            holders = self._blocks[k]
            if holders.pop(w, None) is not None:
                dropped += 1
                if not holders:
                    del self._blocks[k]
        if w in self._handles:
            self._handles[w] = {}
            self._resident[w] = 0
        return dropped

    @_atomic
    def remove_worker(self, worker: int) -> int:
        """Drop ``worker`` and every block it holds. Unknown workers are ignored.

        Runtime complexity: O(number of blocks in the index).

        :returns: the number of blocks dropped.
        """
        dropped = self.clear(worker)
        w = check_u64(worker, "worker")
        self._handles.pop(w, None)
        self._resident.pop(w, None)
        return dropped

    # -- snapshots --------------------------------------------------------

    @_atomic
    def dump(self) -> bytes:
        """The whole index as bytes (:mod:`kvroute._dump`'s format), for :meth:`load`.

        Every residency with its copy counts per tier, every engine handle,
        and every known worker (one holding nothing too). Counters
        (:meth:`stats`) are not kept. Either twin loads the other's dump.

        >>> a = BlockIndex()
        >>> a.store(0, [11, 12], engine_hashes=[101, 102])
        >>> a.store(1, [11], tier="host")
        >>> b = BlockIndex()
        >>> b.load(a.dump())
        >>> sorted(b.match_tiers([11, 12]).items()), b.resolve(0, 102)
        ([(0, (2, 0, 0)), (1, (0, 1, 0))], 12)

        Runtime complexity: O(residencies + handles).
        """
        keys, holders, counts = [], [], []
        for k, by_worker in self._blocks.items():
            for w, c in by_worker.items():
                keys.append(k)
                holders.append(w)
                counts.append(c)
        hw, he, hk = [], [], []
        for w, handles in self._handles.items():
            for e, k in handles.items():
                hw.append(w)
                he.append(e)
                hk.append(k)
        u64 = np.uint64
        return pack(
            Dump(
                np.array(sorted(self._resident), u64),
                np.array(keys, u64),
                np.array(holders, u64),
                np.array(hw, u64),
                np.array(he, u64),
                np.array(hk, u64),
                np.array(counts, np.uint16).reshape(len(counts), 3),
            )
        )

    @_atomic
    def load(self, data: bytes | bytearray | memoryview) -> None:
        """Fill this index, which must know no worker yet, from a :meth:`dump`.

        Runtime complexity: O(residencies + handles).

        :raises ValueError: the index is not empty, or ``data`` is not a
            valid dump (the index is then left empty).
        :raises TypeError: ``data`` is not bytes-like.
        """
        if self._resident:
            raise ValueError("load() needs an empty index (one that knows no worker)")
        d = unpack(data)
        positions(d)  # every record's worker is listed
        blocks: dict[int, dict[int, list[int]]] = {}
        resident = {w: 0 for w in d.workers.tolist()}
        for k, w, c in zip(
            d.res_keys.tolist(), d.res_workers.tolist(), d.res_counts.tolist(), strict=True
        ):
            holders = blocks.setdefault(k, {})
            if w in holders:
                raise ValueError(f"a BlockIndex dump names block {k} on worker {w} twice")
            holders[w] = c
            resident[w] += 1
        handles: dict[int, dict[int, int]] = {w: {} for w in resident}
        for w, e, k in zip(
            d.handle_workers.tolist(),
            d.handle_engine.tolist(),
            d.handle_keys.tolist(),
            strict=True,
        ):
            if w not in blocks.get(k, {}):
                raise ValueError(f"a BlockIndex dump has a handle of {w} to a block it lacks")
            handles[w][e] = k
        self._blocks, self._resident, self._handles = blocks, resident, handles

    # -- queries ----------------------------------------------------------

    @_atomic
    def match(self, hashes: HashesLike) -> dict[int, int]:
        """Per worker, how many leading blocks of ``hashes`` it holds (any tier).

        Workers that do not hold ``hashes[0]`` are absent from the result.

        Runtime complexity: O(sum over the matched prefix of the number of
        workers holding each block).
        """
        return {w: sum(c) for w, c in self.match_tiers(hashes).items()}

    @_atomic
    def match_tiers(self, hashes: HashesLike) -> dict[int, tuple[int, int, int]]:
        """Per worker, its matched prefix split by the fastest tier holding each block.

        ``(device, host, disk)`` sums to the worker's ``match`` count: a block
        held on device and host counts as device.
        """
        keys = as_u64_array(hashes).tolist()
        result: dict[int, list[int]] = {}
        if not keys:
            return {}
        first = self._blocks.get(keys[0], {})
        alive = set(first)
        for w in alive:
            result[w] = [0, 0, 0]
        for k in keys:
            holders = self._blocks.get(k, {})
            alive = {w for w in alive if w in holders}
            if not alive:
                break
            for w in alive:
                counts = holders[w]
                fastest = next(t for t in range(3) if counts[t])
                result[w][fastest] += 1
        return {w: (c[0], c[1], c[2]) for w, c in result.items()}

    @_atomic
    def match_array(self, hashes: HashesLike, workers: HashesLike) -> npt.NDArray[np.uint32]:
        """For each id in ``workers``, how many leading blocks of ``hashes`` it holds.

        The same counts as :meth:`match`, laid out in the caller's worker
        order (0 for a worker that holds no prefix or is unknown), so a router
        that keeps per-worker state in arrays needs no dict walk.

        >>> idx = BlockIndex()
        >>> idx.store(4, [1, 2])
        >>> idx.match_array([1, 2, 3], [9, 4]).tolist()
        [0, 2]

        Runtime complexity: that of :meth:`match`, plus O(len(workers)).

        :raises TypeError, OverflowError: an id is not an int in [0, 2**64).
        """
        keys = as_u64_array(hashes)
        ids = as_u64_array(workers, "workers")
        m = self.match(keys)
        return np.array([m.get(w, 0) for w in ids.tolist()], dtype=np.uint32)

    @_atomic
    def match_tiers_array(self, hashes: HashesLike, workers: HashesLike) -> npt.NDArray[np.uint32]:
        """For each id in ``workers``, its matched prefix per tier: rows device, host, disk.

        :meth:`match_tiers` laid out in the caller's worker order, as
        :meth:`match_array` lays out :meth:`match`: a ``(3, len(workers))``
        uint32 array, zeros for a worker that holds no prefix or is unknown.

        >>> idx = BlockIndex()
        >>> idx.store(4, [1, 2])
        >>> idx.store(4, [3], 2, tier="host")
        >>> idx.match_tiers_array([1, 2, 3], [9, 4]).tolist()
        [[0, 2], [0, 1], [0, 0]]

        Runtime complexity: that of :meth:`match_tiers`, plus O(len(workers)).

        :raises TypeError, OverflowError: an id is not an int in [0, 2**64).
        """
        keys = as_u64_array(hashes)
        ids = as_u64_array(workers, "workers")
        m = self.match_tiers(keys)
        out = np.zeros((3, len(ids)), dtype=np.uint32)
        for j, w in enumerate(ids.tolist()):
            if w in m:
                out[:, j] = m[w]
        return out

    @_atomic
    def resolve(self, worker: int, engine_hash: int) -> int | None:
        """The kvroute key that ``worker``'s engine hash names, or None if it names none.

        The event layer uses it to continue the kvroute chain from a stored
        event's parent, which the engine names by its own hash.

        Runtime complexity: O(1).

        :raises TypeError, OverflowError: an id is not an int in [0, 2**64).
        """
        w = check_u64(worker, "worker")
        h = check_u64(engine_hash, "engine_hash")
        return self._handles.get(w, {}).get(h)

    @_atomic
    def workers(self) -> list[int]:
        """Known workers (those that stored anything and were not removed), ascending."""
        return sorted(self._resident)

    @_atomic
    def worker_len(self, worker: int) -> int:
        """Number of distinct blocks ``worker`` holds (0 for an unknown worker)."""
        return self._resident.get(check_u64(worker, "worker"), 0)

    @_atomic
    def residencies(self) -> int:
        """Number of (block, worker) pairs: the sum of ``worker_len`` over workers."""
        return sum(self._resident.values())

    @_atomic
    def stats(self) -> dict[str, int]:
        """Counters: ``unknown_removals``, ``orphan_stores``, ``saturated``."""
        return dict(self._stats)

    def __len__(self) -> int:
        """Number of distinct blocks held by at least one worker."""
        return len(self._blocks)

    @_atomic
    def sizeof(self) -> int:
        """Approximate bytes owned by the index (the containers, not the ints)."""
        total = sys.getsizeof(self._blocks) + sys.getsizeof(self._handles)
        for holders in self._blocks.values():
            total += sys.getsizeof(holders) + len(holders) * sys.getsizeof([0, 0, 0])
        for handles in self._handles.values():
            total += sys.getsizeof(handles)
        return total

    @_atomic
    def _check(self) -> None:
        """Check every invariant; raise AssertionError on the first broken one. O(n)."""
        resident = dict.fromkeys(self._resident, 0)
        for k, holders in self._blocks.items():
            assert 0 <= k <= U64_MAX
            assert holders, f"block {k} has no holders"
            for w, counts in holders.items():
                assert w in resident, f"block {k} held by unknown worker {w}"
                assert any(counts) and all(0 <= c <= MAX_COPIES for c in counts)
                resident[w] += 1
        assert resident == self._resident, "per-worker residency counts are off"
        assert set(self._handles) == set(self._resident)
        for w, handles in self._handles.items():
            for e, k in handles.items():
                assert w in self._blocks.get(k, {}), f"handle {e} of {w} names a dropped block"

    def __repr__(self) -> str:
        return (
            f"<BlockIndex blocks={len(self)} residencies={self.residencies()}"
            f" workers={len(self._resident)}>"
        )
