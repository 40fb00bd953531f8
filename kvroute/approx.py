"""Predicted residency: what the router believes a worker caches because it sent it there.

* **Event-free (approximate) mode** (:class:`PredictedResidency`). Without
  KV events the router records each decision's prompt blocks on the chosen
  worker for ``ttl`` seconds (Dynamo's approximate indexer uses 120 s),
  bounded per worker by its KV capacity when known: least recently routed
  blocks go first, a prompt's tail before its head (as engines evict), so
  the surviving residency is always a set of prefixes.
* **Predict-on-route with events** (:class:`FreshDecisions`). A short-TTL
  record of the latest decisions per first block lets a burst of siblings (a
  subagent fan-out, best-of-N) follow the first one before the engine's first
  "stored" event arrives. It keeps only the few newest decisions per prompt
  start, and matches by comparing hash arrays, so it costs the routing path
  no index update. It is a compiled kernel (``kvroute._route``, read by the
  router's route step); its specification is the twin in ``kvroute._route_py``.

In :class:`PredictedResidency` each decision is an *entry* (worker, hashes,
expiry) whose blocks are stored once in a private, reference-counted
:class:`BlockIndex`: re-routing a prefix adds a reference, an entry's expiry
removes one, so a block stays predicted while any live entry holds it, and
:meth:`~PredictedResidency.match` is the index's match. No per-block Python
loop runs on the routing path. (A block routed more than ``MAX_COPIES``
times within one TTL saturates its count, and may then be forgotten before
its last entry expires; the next decision records it again.)

Not thread-safe on its own: the router calls it under its lock.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ._compat import route as _route

FreshDecisions = _route.FreshDecisions
chained_common_prefix = _route.chained_common_prefix
fresh_overlay = _route.fresh_overlay

__all__ = ["FreshDecisions", "PredictedResidency", "chained_common_prefix", "fresh_overlay"]

if TYPE_CHECKING:
    from .index_api import IndexLike


@dataclass(slots=True)
class _Entry:
    worker: int
    hashes: npt.NDArray[np.uint64]
    expiry: float


class PredictedResidency:
    """Blocks predicted resident per worker, with TTL expiry and an LRU capacity bound.

    >>> from kvroute._index_py import BlockIndex
    >>> pr = PredictedResidency(BlockIndex, ttl=120.0)
    >>> e = pr.record(3, np.array([10, 11, 12], np.uint64), now=0.0)
    >>> pr.match(np.array([10, 11, 99], np.uint64))
    {3: 2}
    >>> pr.expire(now=119.0), pr.expire(now=120.0), pr.match(np.array([10], np.uint64))
    (0, 1, {})

    :param index_factory: builds the private block index.
    :param ttl: default lifetime of a recorded entry, in clock seconds.
    :raises ValueError: ``ttl`` is not positive.
    """

    def __init__(self, index_factory: Callable[[], IndexLike], ttl: float = 120.0) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, got {ttl}")
        self.ttl = float(ttl)
        self._factory = index_factory
        self._index = index_factory()
        self._entries: dict[int, _Entry] = {}
        self._heap: list[tuple[float, int]] = []
        self._order: dict[int, deque[int]] = {}
        self._capacity: dict[int, int] = {}
        self._ids = itertools.count()
        self.evicted_blocks = 0

    def __len__(self) -> int:
        """Number of live entries."""
        return len(self._entries)

    def record(
        self,
        worker: int,
        hashes: npt.NDArray[np.uint64],
        now: float,
        ttl: float | None = None,
    ) -> int:
        """Predict that ``worker`` holds ``hashes`` until ``now + ttl``; return the entry id.

        Runtime complexity: O(len(hashes)) in the index, amortised O(1) Python work,
        plus the capacity eviction it triggers.
        """
        eid = next(self._ids)
        if len(hashes) == 0:
            return eid
        expiry = now + (self.ttl if ttl is None else ttl)
        self._entries[eid] = _Entry(worker, hashes, expiry)
        heapq.heappush(self._heap, (expiry, eid))
        self._order.setdefault(worker, deque()).append(eid)
        self._index.store(worker, hashes)
        cap = self._capacity.get(worker)
        if cap is not None:
            self._evict(worker, cap)
        return eid

    def record_prompt(
        self,
        worker: int,
        hashes: npt.NDArray[np.uint64],
        now: float,
        segments: Sequence[tuple[int, float]] = (),
        age: float = 0.0,
    ) -> tuple[int, ...]:
        """Record a routed prompt, its cache breakpoints' prefixes for their own TTLs.

        The prompt lives for the default TTL; each segment ``(leading blocks,
        ttl)`` (:func:`kvroute.request.cache_segments`) for its own TTL when
        that is longer. The whole prompt is recorded first, so a capacity
        bound trims its tail before the pinned prefixes. ``age`` seconds have
        already passed since the decision (another replica made it): every
        TTL is that much shorter, and what has expired is not recorded.

        >>> from kvroute._index_py import BlockIndex
        >>> pr = PredictedResidency(BlockIndex, ttl=120.0)
        >>> ids = pr.record_prompt(3, np.array([10, 11, 12], np.uint64), 0.0, [(1, 3600.0)])
        >>> len(ids), pr.expire(now=200.0), pr.match(np.array([10, 11], np.uint64))
        (2, 1, {3: 1})

        :returns: the entry ids (for :meth:`forget`).
        """
        if not len(hashes):
            return ()
        ttl = self.ttl
        rest = list(segments)
        if rest and rest[0][0] == len(hashes):
            ttl = max(ttl, rest.pop(0)[1])
        ids = []
        if ttl > age:
            ids.append(self.record(worker, hashes, now, ttl - age))
        ids += [
            self.record(worker, hashes[:k], now, t - age) for k, t in rest if t > ttl and t > age
        ]
        return tuple(ids)

    def forget(self, entry_id: int) -> None:
        """Drop one entry now (its request failed). Unknown ids are ignored."""
        e = self._entries.pop(entry_id, None)
        if e is not None and len(e.hashes):
            self._index.remove(e.worker, e.hashes)

    def expire(self, now: float) -> int:
        """Drop the entries whose expiry is <= ``now``; return how many.

        Runtime complexity: O(expired entries x log(entries) + their blocks).
        """
        dropped = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, eid = heapq.heappop(heap)
            e = self._entries.get(eid)
            if e is not None and e.expiry <= now:
                self.forget(eid)
                dropped += 1
        if dropped:
            for order in self._order.values():
                while order and order[0] not in self._entries:
                    order.popleft()
        if len(heap) > 64 and len(heap) > 4 * len(self._entries):
            self._heap = [(e.expiry, i) for i, e in self._entries.items()]
            heapq.heapify(self._heap)
        return dropped

    def set_capacity(self, worker: int, blocks: int | None) -> None:
        """Bound ``worker``'s predicted blocks to ``blocks`` (None: unbounded), evicting now."""
        if blocks is None:
            self._capacity.pop(worker, None)
            return
        self._capacity[worker] = int(blocks)
        self._evict(worker, int(blocks))

    def _evict(self, worker: int, cap: int) -> None:
        # Least recently routed entries first; within an entry, tail blocks first, so
        # what survives is a prefix. Trimming removes one reference per block: a block
        # another live entry also holds stays, and the loop goes on.
        order = self._order.get(worker)
        idx = self._index
        while order and idx.worker_len(worker) > cap:
            eid = order[0]
            e = self._entries.get(eid)
            if e is None:
                order.popleft()
                continue
            excess = idx.worker_len(worker) - cap
            before = idx.worker_len(worker)
            if excess >= len(e.hashes):
                order.popleft()
                self.forget(eid)
            else:
                idx.remove(worker, e.hashes[len(e.hashes) - excess :])
                e.hashes = e.hashes[: len(e.hashes) - excess]
            self.evicted_blocks += before - idx.worker_len(worker)

    def remove_worker(self, worker: int) -> None:
        """Forget everything predicted for ``worker`` (and its capacity)."""
        self.clear(worker)
        self._capacity.pop(worker, None)
        self._index.remove_worker(worker)

    def clear(self, worker: int) -> None:
        """Forget everything predicted for ``worker`` (its cache was reset); keep its capacity.

        >>> from kvroute._index_py import BlockIndex
        >>> pr = PredictedResidency(BlockIndex)
        >>> e = pr.record(3, np.array([10, 11], np.uint64), now=0.0)
        >>> pr.clear(3); pr.match(np.array([10], np.uint64)), len(pr)
        ({}, 0)
        """
        for eid in self._order.pop(worker, deque()):
            self._entries.pop(eid, None)
        self._index.clear(worker)

    def match(self, hashes: npt.NDArray[np.uint64]) -> dict[int, int]:
        """Per worker, how many leading blocks of ``hashes`` are predicted resident."""
        if not self._entries:
            return {}
        result: dict[int, int] = self._index.match(hashes)
        return result

    def match_array(
        self, hashes: npt.NDArray[np.uint64], workers: npt.NDArray[np.uint64]
    ) -> npt.NDArray[np.uint32]:
        """:meth:`match` laid out in the order of ``workers`` (0 where none), as uint32.

        >>> from kvroute._index_py import BlockIndex
        >>> pr = PredictedResidency(BlockIndex)
        >>> e = pr.record(3, np.array([10, 11], np.uint64), now=0.0)
        >>> pr.match_array(np.array([10, 11, 12], np.uint64), np.array([5, 3], np.uint64)).tolist()
        [0, 2]
        """
        if not self._entries:
            return np.zeros(len(workers), np.uint32)
        out: npt.NDArray[np.uint32] = self._index.match_array(hashes, workers)
        return out

    def worker_len(self, worker: int) -> int:
        """Distinct blocks predicted resident on ``worker``."""
        n: int = self._index.worker_len(worker)
        return n

    def _check(self) -> None:
        """Rebuild the index from the live entries and compare; AssertionError on drift."""
        ref = self._factory()
        for e in self._entries.values():
            if len(e.hashes):
                ref.store(e.worker, e.hashes)
        for w in set(self._index.workers()) | set(ref.workers()):
            assert ref.worker_len(w) == self._index.worker_len(w), f"worker {w} drifted"
            cap = self._capacity.get(w)
            assert cap is None or self._index.worker_len(w) <= cap, f"worker {w} over capacity"
