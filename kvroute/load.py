"""Per-worker load, kept in numpy arrays indexed by a dense worker position.

:class:`LoadTracker` owns the router's view of each worker's load: active
prefill tokens (the uncached part of each prompt until its first token),
active decode blocks, active requests (all tracked from the request
lifecycle), and the worker-reported waiting requests and KV usage. Positions
``0 .. n-1`` are always the live workers (removal moves the last worker into
the hole), so the router can hand policies zero-copy slices.

Active decode blocks follow Dynamo's definition: the unique blocks of a
worker's in-flight requests (their prompt blocks, a prefix shared by several
requests counted once, cached or not) plus their expected output blocks. The
prompts in flight live in an :class:`~kvroute._route_py.ActivePrefixes` (a
radix tree of prompts in the compiled twin), so a request entering or
leaving costs one walk down its prompt instead of a store or removal per
block, and :meth:`LoadTracker.new_blocks` says in one compiled call, per
worker, how many of a request's blocks would be new to that worker's active
set.

Other router replicas' load (:mod:`kvroute.remote`) is added into the same
arrays, so every policy and the compiled route step see the fleet's load
without reading a second set: :meth:`LoadTracker.set_remote` replaces a
worker's remote share (kept apart in ``remote_*``), and
:meth:`LoadTracker.local` gives this router's own share, which is what a
replica publishes.

Not thread-safe on its own: the router calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import numpy.typing as npt

from ._compat import route as _route

ActivePrefixes = _route.ActivePrefixes
ActiveRequest = _route.ActiveRequest
LoadArrays = _route.LoadArrays

__all__ = ["ActivePrefixes", "ActiveRequest", "LoadTracker", "RequestKey"]

#: What the tracker keys a request by: its id, or for the decode leg of a
#: disaggregated request :func:`kvroute.disagg.decode_key` of its id.
RequestKey = Hashable


class LoadTracker:
    """Dense per-worker load arrays and the table of requests in flight.

    >>> lt = LoadTracker()
    >>> lt.add_worker(7)
    0
    >>> prompt = np.array([11, 12, 13], np.uint64)
    >>> lt.start("a", 7, prefill_tokens=100, decode_blocks=2, now=0.0, hashes=prompt)
    >>> lt.prefill_tokens[:1].tolist(), lt.decode_blocks[:1].tolist(), lt.active[:1].tolist()
    ([100.0], [5.0], [1])
    >>> lt.new_blocks(np.array([11, 12, 14], np.uint64)).tolist()  # 11, 12 are active
    [1.0]
    >>> lt.first_token("a", now=1.0), lt.prefill_tokens[:1].tolist()
    (True, [0.0])
    >>> lt.finish("a") is not None, lt.decode_blocks[:1].tolist(), lt.active[:1].tolist()
    (True, [0.0], [0])

    :param capacity: initial array size (grows by doubling).
    :param active_factory: builds the record of prompts in flight (default: the
        compiled :class:`ActivePrefixes`, else its twin).
    """

    def __init__(
        self, capacity: int = 16, *, active_factory: Callable[[], Any] | None = None
    ) -> None:
        # the prompts of the requests in flight, per worker (their unique blocks)
        self.active_blocks: Any = (active_factory or ActivePrefixes)()
        cap = max(int(capacity), 1)
        self.n = 0
        self.worker_ids = np.zeros(cap, np.uint64)
        self.prefill_tokens = np.zeros(cap, np.float64)
        self.decode_blocks = np.zeros(cap, np.float64)
        self.active = np.zeros(cap, np.int64)
        self.waiting = np.zeros(cap, np.float64)
        self.kv_usage = np.zeros(cap, np.float64)
        self.healthy = np.ones(cap, np.bool_)
        # the other replicas' share of the three load arrays above (included in them)
        self.remote_prefill = np.zeros(cap, np.float64)
        self.remote_decode = np.zeros(cap, np.float64)
        self.remote_active = np.zeros(cap, np.int64)
        self.pos: dict[int, int] = {}
        self.requests: dict[RequestKey, ActiveRequest] = {}
        self.ids_frozen = np.zeros(0, np.uint64)
        #: ``(prefill_tokens, decode_blocks, active, waiting, kv_usage)[:n]``, live views.
        self.views: tuple[Any, ...] = ()
        #: the same views and ids, held for the router's route kernel
        self.arrays: Any = None
        self._freeze_ids()

    _ARRAYS = (
        "worker_ids",
        "prefill_tokens",
        "decode_blocks",
        "active",
        "waiting",
        "kv_usage",
        "healthy",
        "remote_prefill",
        "remote_decode",
        "remote_active",
    )

    def _grow(self) -> None:
        for name in self._ARRAYS:
            old = getattr(self, name)
            new = np.zeros(2 * len(old), old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def _freeze_ids(self) -> None:
        # An immutable copy of the live ids: decisions keep it without copying again.
        self.ids_frozen = self.worker_ids[: self.n].copy()
        self.ids_frozen.flags.writeable = False
        # Live views of the live positions, made once per membership change
        # (five slices per request were a measurable part of route()).
        n = self.n
        self.views = (
            self.prefill_tokens[:n],
            self.decode_blocks[:n],
            self.active[:n],
            self.waiting[:n],
            self.kv_usage[:n],
        )
        self.arrays = LoadArrays(self.ids_frozen, *self.views, self.active_blocks, self.requests)

    def add_worker(self, worker: int) -> int:
        """Add a worker (healthy, idle); return its position. Adding a known worker is a no-op."""
        if worker in self.pos:
            return self.pos[worker]
        if self.n == len(self.worker_ids):
            self._grow()
        p = self.n
        self.n += 1
        for name in self._ARRAYS:
            getattr(self, name)[p] = 0
        self.worker_ids[p] = worker
        self.healthy[p] = True
        self.pos[worker] = p
        self._freeze_ids()
        return p

    def remove_worker(self, worker: int) -> list[RequestKey]:
        """Forget a worker and its requests in flight; return those requests' ids.

        Runtime complexity: O(requests in flight).
        """
        p = self.pos.pop(worker, None)
        if p is None:
            return []
        dropped = [rid for rid, r in self.requests.items() if r.worker == worker]
        for rid in dropped:
            del self.requests[rid]
        self.active_blocks.remove_worker(worker)
        last = self.n - 1
        if p != last:
            for name in self._ARRAYS:
                arr = getattr(self, name)
                arr[p] = arr[last]
            self.pos[int(self.worker_ids[p])] = p
        self.n = last
        self._freeze_ids()
        return dropped

    def start(
        self,
        request_id: RequestKey,
        worker: int,
        *,
        prefill_tokens: float,
        decode_blocks: float,
        now: float,
        payload: Any = None,
        hashes: npt.NDArray[np.uint64] | None = None,
    ) -> None:
        """Count a new request on ``worker`` (which must be known).

        :param decode_blocks: its expected output blocks.
        :param hashes: its prompt's block keys; those the worker's other
            requests in flight do not already hold add to its decode blocks.
        :raises KeyError: unknown worker.
        :raises ValueError: ``request_id`` is already in flight.
        """
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already in flight")
        p = self.pos[worker]
        self.requests[request_id] = ActiveRequest(
            worker, float(prefill_tokens), float(decode_blocks), now, payload, hashes
        )
        self.prefill_tokens[p] += prefill_tokens
        self.active[p] += 1
        added = 0 if hashes is None else self.active_blocks.add(worker, hashes)
        self.decode_blocks[p] += decode_blocks + added

    def new_blocks(self, hashes: npt.NDArray[np.uint64]) -> npt.NDArray[np.float64]:
        """Per position, how many of ``hashes`` are not yet among that worker's active blocks.

        A block is active on a worker when one of its requests in flight has
        the same prefix up to it (same chained key), so the blocks shared with
        this request are a leading run: ``len(hashes)`` minus the longest
        common prefix with one of the worker's prompts. A fresh float64 array.
        """
        out: npt.NDArray[np.float64] = self.active_blocks.new_blocks(hashes, self.ids_frozen)
        return out

    def first_token(self, request_id: RequestKey, now: float) -> bool:
        """The request's prefill is done: drop its prefill tokens. False if unknown."""
        r = self.requests.get(request_id)
        if r is None:
            return False
        r.last_seen = now
        if r.prefill_tokens:
            p = self.pos[r.worker]
            self.prefill_tokens[p] = max(self.prefill_tokens[p] - r.prefill_tokens, 0.0)
            r.prefill_tokens = 0.0
        return True

    def finish(self, request_id: RequestKey) -> ActiveRequest | None:
        """The request left (finished, failed or swept): drop all its load. None if unknown."""
        r = self.requests.pop(request_id, None)
        if r is None:
            return None
        p = self.pos[r.worker]
        if r.prefill_tokens:
            self.prefill_tokens[p] = max(self.prefill_tokens[p] - r.prefill_tokens, 0.0)
        self.active[p] = max(int(self.active[p]) - 1, 0)
        gone = r.decode_blocks
        if r.hashes is not None:
            gone += self.active_blocks.remove(r.worker, r.hashes)
        self.decode_blocks[p] = max(self.decode_blocks[p] - gone, 0.0)
        return r

    def stale(self, now: float, timeout: float) -> list[RequestKey]:
        """Ids of requests with no lifecycle event for more than ``timeout``. O(in flight)."""
        limit = now - timeout
        return [rid for rid, r in self.requests.items() if r.last_seen < limit]

    def set_remote(
        self, worker: int, active: int, prefill_tokens: float, decode_blocks: float
    ) -> bool:
        """Make the other replicas' load on ``worker`` this (replacing their previous share).

        The share is added into :attr:`active`, :attr:`prefill_tokens` and
        :attr:`decode_blocks`, where policies read the fleet's load.

        >>> lt = LoadTracker(); lt.add_worker(7)
        0
        >>> lt.set_remote(7, 3, 50.0, 4.0), lt.active[:1].tolist(), lt.local()[1].tolist()
        (True, [3], [0])

        :returns: False if the worker is unknown (nothing changes).
        """
        p = self.pos.get(worker)
        if p is None:
            return False
        self.active[p] += int(active) - int(self.remote_active[p])
        self.prefill_tokens[p] += float(prefill_tokens) - self.remote_prefill[p]
        self.decode_blocks[p] += float(decode_blocks) - self.remote_decode[p]
        self.remote_active[p] = active
        self.remote_prefill[p] = prefill_tokens
        self.remote_decode[p] = decode_blocks
        return True

    def local(self) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], npt.NDArray[np.float64],
                             npt.NDArray[np.float64]]:  # fmt: skip
        """This router's own load, without the other replicas': fresh arrays by position.

        :returns: ``(worker ids, active requests, prefill tokens, decode blocks)``;
            rounding can leave a float a hair below 0, so they are clipped at 0.
        """
        n = self.n
        act = np.maximum(self.active[:n] - self.remote_active[:n], 0)
        pre = np.maximum(self.prefill_tokens[:n] - self.remote_prefill[:n], 0.0)
        dec = np.maximum(self.decode_blocks[:n] - self.remote_decode[:n], 0.0)
        return self.worker_ids[:n].copy(), act, pre, dec

    def set_metrics(self, worker: int, waiting: float | None, kv_usage: float | None) -> bool:
        """Store worker-reported metrics; False if the worker is unknown."""
        p = self.pos.get(worker)
        if p is None:
            return False
        if waiting is not None:
            self.waiting[p] = waiting
        if kv_usage is not None:
            self.kv_usage[p] = kv_usage
        return True

    def _check(self) -> None:
        """Recompute the aggregates from the request table; AssertionError if they differ."""
        prefill = self.remote_prefill[: self.n].copy()
        active = self.remote_active[: self.n].copy()
        decode = self.remote_decode[: self.n].copy()
        for r in self.requests.values():
            p = self.pos[r.worker]
            prefill[p] += r.prefill_tokens
            active[p] += 1
            decode[p] += r.decode_blocks
        for w, p in self.pos.items():
            decode[p] += self.active_blocks.worker_len(w)
        self.active_blocks._check()
        assert np.allclose(prefill, self.prefill_tokens[: self.n]), "prefill tokens drifted"
        assert (active == self.active[: self.n]).all(), "active requests drifted"
        assert np.allclose(decode, self.decode_blocks[: self.n]), "decode blocks drifted"
        for w, p in self.pos.items():
            assert int(self.worker_ids[p]) == w, "position table drifted"
