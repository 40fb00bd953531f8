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
  no index update.

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

import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._compat import route as _route

chained_common_prefix = _route.chained_common_prefix
fresh_overlay = _route.fresh_overlay

__all__ = ["FreshDecisions", "PredictedResidency", "chained_common_prefix"]

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
        for eid in self._order.pop(worker, deque()):
            self._entries.pop(eid, None)
        self._capacity.pop(worker, None)
        self._index.remove_worker(worker)

    def match(self, hashes: npt.NDArray[np.uint64]) -> dict[int, int]:
        """Per worker, how many leading blocks of ``hashes`` are predicted resident."""
        if not self._entries:
            return {}
        result: dict[int, int] = self._index.match(hashes)
        return result

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


class FreshDecisions:
    """The newest routing decisions per prompt start, for ``ttl`` seconds.

    Keyed by a prompt's first block hash; each key keeps its ``per_key``
    newest decisions (worker, hashes, expiry), at most one per worker (a
    newer decision to the same worker replaces the older). :meth:`match` returns, per
    worker among them, the longest common prefix with the request: siblings
    of a fan-out see their first sibling's prompt as cached on its worker.

    >>> fd = FreshDecisions(ttl=5.0)
    >>> e = fd.record(2, np.array([7, 8, 9], np.uint64), now=0.0)
    >>> fd.match(np.array([7, 8, 1], np.uint64), now=1.0)
    {2: 2}
    >>> fd.match(np.array([7, 8, 1], np.uint64), now=5.0)
    {}

    Runtime complexity: :meth:`record` O(1); :meth:`match` O(per_key x log
    prompt blocks), since the hashes are chained keys.

    :param ttl: how long a decision is remembered (s).
    :param per_key: decisions kept per first block.
    :raises ValueError: ``ttl`` <= 0 or ``per_key`` < 1.
    """

    def __init__(self, ttl: float = 5.0, per_key: int = 4) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, got {ttl}")
        if per_key < 1:
            raise ValueError(f"per_key must be >= 1, got {per_key}")
        self.ttl = float(ttl)
        self.per_key = int(per_key)
        self._by_first: dict[int, deque[list[Any]]] = {}

    def __len__(self) -> int:
        """Number of remembered decisions (expired ones included until purged)."""
        return sum(len(d) for d in self._by_first.values())

    def record(self, worker: int, hashes: npt.NDArray[np.uint64], now: float) -> list[Any] | None:
        """Remember that ``hashes`` were just routed to ``worker``; return a handle for forget."""
        if len(hashes) == 0:
            return None
        key = int(hashes[0])
        d = self._by_first.get(key)
        if d is None:
            d = self._by_first[key] = deque(maxlen=self.per_key)
        else:
            for old in d:
                if old[0] == worker:
                    d.remove(old)
                    break
        entry = [worker, hashes, now + self.ttl]
        d.append(entry)
        return entry

    def started(self, key: int) -> bool | None:
        """Whether a remembered decision's prompt starts with block ``key``; None if none is kept.

        >>> fd = FreshDecisions()
        >>> fd.started(7), fd.record(0, np.array([7, 8], np.uint64), 0.0) is not None, fd.started(7)
        (None, True, True)
        """
        if not self._by_first:
            return None
        return key in self._by_first

    def forget(self, entry: list[Any] | None) -> None:
        """Drop a remembered decision (its request failed); unknown handles are ignored."""
        if entry is None:
            return
        d = self._by_first.get(int(entry[1][0]))
        if d is not None:
            with contextlib.suppress(ValueError):
                d.remove(entry)

    def match(
        self,
        hashes: npt.NDArray[np.uint64],
        now: float,
        known: Mapping[int, int] | None = None,
    ) -> dict[int, int]:
        """Per worker, the longest prefix of ``hashes`` among its live remembered decisions.

        :param known: per worker, a match already known (the index's); a
            decision that cannot beat it (it differs from ``hashes`` at block
            ``known[worker]``) is skipped without comparing whole arrays.
        """
        if len(hashes) == 0:
            return {}
        d = self._by_first.get(int(hashes[0]))
        if not d:
            return {}
        out: dict[int, int] = {}
        for worker, h, expiry in d:
            if expiry <= now:
                continue
            if known:
                k = known.get(worker, 0)
                if k >= len(h) or k >= len(hashes) or h[k] != hashes[k]:
                    continue
            k = chained_common_prefix(h, hashes)
            if k > out.get(worker, 0):
                out[worker] = k
        return out

    def overlay(
        self,
        hashes: npt.NDArray[np.uint64],
        now: float,
        ov: npt.NDArray[np.int64],
        pos: Mapping[int, int],
        *,
        skip_known: bool = False,
        host: npt.NDArray[np.int64] | None = None,
        disk: npt.NDArray[np.int64] | None = None,
    ) -> int:
        """:meth:`match` merged into per-position overlaps in place, in one compiled pass.

        ``ov[pos[w]]`` becomes the larger of itself and ``match(hashes, now,
        known)[w]``, where ``known`` is ``ov`` itself when ``skip_known`` (the
        router passes the index's match) and None otherwise; where it is raised,
        ``host`` / ``disk`` (if given) are zeroed: a fresh decision counts as a
        device hit.

        >>> fd = FreshDecisions(ttl=5.0)
        >>> e = fd.record(2, np.array([7, 8, 9], np.uint64), now=0.0)
        >>> ov = np.array([0, 1], np.int64)
        >>> fd.overlay(np.array([7, 8, 1], np.uint64), 1.0, ov, {5: 0, 2: 1}), ov.tolist()
        (1, [0, 2])

        :param ov: int64 overlaps, one per position (C-contiguous, writable).
        :param pos: worker id -> position in ``ov``.
        :returns: how many positions were raised.
        """
        if len(hashes) == 0:
            return 0
        d = self._by_first.get(int(hashes[0]))
        if not d:
            return 0
        raised: int = fresh_overlay(d, hashes, now, ov, pos, skip_known, host, disk)
        return raised

    def remove_worker(self, worker: int) -> None:
        """Forget the decisions that went to ``worker``. O(remembered decisions)."""
        for key in list(self._by_first):
            d = self._by_first[key]
            kept = [e for e in d if e[0] != worker]
            if len(kept) != len(d):
                d.clear()
                d.extend(kept)
            if not d:
                del self._by_first[key]

    def purge(self, now: float) -> int:
        """Drop expired decisions; return how many. O(remembered decisions)."""
        dropped = 0
        for key in list(self._by_first):
            d = self._by_first[key]
            while d and d[0][2] <= now:
                d.popleft()
                dropped += 1
            if not d:
                del self._by_first[key]
        return dropped
