"""Which worker produced a response id, shared by every replica (Responses API chains).

A ``previous_response_id`` must reach the worker that produced it (its
conversation is cached there), whichever replica receives the next request.
:class:`RedisResponseStore` keeps the answer in memory on every replica: each
``put`` is published through the replica sync (its stream, for the live
replicas, and a key with the same TTL, ``P:resp:ID``, for those that start
later), and every replica's store takes the others' puts as they arrive. So
:meth:`~RedisResponseStore.get` never waits on the network: it answers from
memory, and knows a response another replica produced about one Redis round
trip after it was put (long before a client can send the next turn).
:meth:`~RedisResponseStore.aget` also asks Redis when memory has no answer
(a replica that started after the put and before the history it replayed).

It is a :class:`kvroute.proxy.responses.ResponseStore` (``remember``,
``worker_of``, ``forget_worker``), the one the proxy uses with ``--sync-url``
(:mod:`kvroute.proxy.replicas`); a proxy of one's own builds it on its
replica sync::

    store = RedisResponseStore(sync)                     # a started ReplicaSync
    ...
    worker = store.worker_of(previous_response_id)       # or: await store.aworker_of(...)
    store.remember(response_id, decision.worker)

When Redis is away, puts stay local (and are re-published when it
returns); gets answer from memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sync import ReplicaSync

__all__ = ["RedisResponseStore"]


class RedisResponseStore:
    """Response id -> worker, in memory on every replica, shared through a :class:`ReplicaSync`.

    >>> class Quiet:                      # a sync that publishes nothing, for the example
    ...     on_response = None; on_reconnect = []
    ...     def publish_response(self, *a): pass
    >>> store = RedisResponseStore(Quiet(), clock=lambda: 0.0)
    >>> store.remember("resp_1", 3, ttl=60.0)
    >>> store.worker_of("resp_1"), store.worker_of("resp_2")
    (3, None)

    :param sync: the replica sync (its ``on_response`` is taken).
    :param default_ttl: seconds an id lasts when no TTL is given (as long as the
        local store keeps one).
    :param max_entries: ids kept in memory at most (the oldest go first).
    :param clock: monotonic seconds (for expiry).
    :raises ValueError: a TTL or size that is not positive.
    """

    def __init__(
        self,
        sync: ReplicaSync,
        *,
        default_ttl: float = 86_400.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not default_ttl > 0 or max_entries < 1:
            raise ValueError("default_ttl and max_entries must be > 0")
        self.sync = sync
        self.default_ttl = float(default_ttl)
        self.max_entries = int(max_entries)
        self._clock = clock
        # id -> (worker, expiry, ours): insertion order is age order
        self._ids: dict[str, tuple[int, float, bool]] = {}
        sync.on_response = self._remote
        sync.on_reconnect.append(self._republish)

    def __len__(self) -> int:
        """Ids held (expired ones not yet dropped included)."""
        return len(self._ids)

    def worker_of(self, response_id: str) -> int | None:
        """The worker that produced ``response_id``, or None (unknown or expired). No I/O."""
        got = self._ids.get(response_id)
        if got is None:
            return None
        if got[1] <= self._clock():
            del self._ids[response_id]
            return None
        return got[0]

    def remember(self, response_id: str, worker: int, ttl: float | None = None) -> None:
        """Record that ``worker`` produced ``response_id``, for ``ttl`` seconds, everywhere."""
        t = self.default_ttl if ttl is None else float(ttl)
        if not t > 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}")
        self._keep(response_id, int(worker), t, True)
        self.sync.publish_response(response_id, int(worker), t)

    async def aworker_of(self, response_id: str) -> int | None:
        """:meth:`worker_of`, else what Redis holds (one round trip; None if Redis is away)."""
        w = self.worker_of(response_id)
        if w is not None:
            return w
        return await self.sync.fetch_response(response_id)

    def forget_worker(self, worker: int) -> None:
        """Drop this replica's memory of ``worker``'s responses (it left, or restarted empty).

        Runtime complexity: O(entries). The other replicas forget it when they
        see it leave; Redis' keys expire.
        """
        for rid in [k for k, v in self._ids.items() if v[0] == worker]:
            del self._ids[rid]

    def _remote(self, response_id: str, worker: int, left: float) -> None:
        self._keep(response_id, worker, left, False)

    def _keep(self, response_id: str, worker: int, ttl: float, ours: bool) -> None:
        ids = self._ids
        ids.pop(response_id, None)
        ids[response_id] = (worker, self._clock() + ttl, ours)
        if len(ids) > self.max_entries:
            now = self._clock()
            for k in [k for k, v in ids.items() if v[1] <= now]:
                del ids[k]
            while len(ids) > self.max_entries:
                del ids[next(iter(ids))]

    def _republish(self) -> None:
        # Redis came back, perhaps empty: our own puts that still live go out again
        now = self._clock()
        for rid, (w, until, ours) in list(self._ids.items()):
            if ours and until > now:
                self.sync.publish_response(rid, w, until - now)
