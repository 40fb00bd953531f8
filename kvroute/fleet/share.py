"""Membership shared by every replica: local changes out, the others' changes in.

Workers added, drained or removed at run time (the admin API, a workers
file, DNS discovery) on one replica must reach every replica.
:class:`MembershipShare` connects a replica's
:class:`~kvroute.fleet.membership.Membership` to its
:class:`~kvroute.fleet.sync.ReplicaSync`:

* every local change not made by the sync itself (``MembershipChange.by``
  is not ``"sync"``) is published: on the stream for the live replicas, in
  the hash ``P:members`` for later ones;
* every change another replica published is applied with ``source="sync"``
  (the membership ranks it with the admin API: the operator's word, relayed),
  so it is not published again: ``added`` / ``updated`` add the spec (the
  worker's id is derived from its URL the same way on every replica:
  :func:`kvroute.fleet.spec.runtime_worker_id`), ``draining`` drains,
  ``removed`` removes at once;
* the end of a drain (``by="evict"``: the replica's own requests on the
  worker have finished) travels as ``left``: it leaves ``P:members``, and a
  replica that still holds the worker active drains it, but one that is
  draining it finishes its own requests first (each replica evicts when its
  own in-flight requests end, or its ``drain_timeout`` passes);
* a replica that starts reads ``P:members`` and applies what it lacks, then
  publishes the runtime workers it has and Redis lacks (a workers file only
  one replica reads reaches them all); after an outage of Redis each
  replica re-publishes its runtime workers and its drains (Redis may have
  come back empty).

Workers named at start (``--worker``) are the same on every replica (the
sync checks it), so only their drains and removals travel.

Listeners of a membership run on the thread that made the change;
:meth:`ReplicaSync.publish_member` only queues and wakes the sync's loop,
so a change made on any thread is published from the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from .spec import RUNTIME_ID_BASE, WorkerSpec

if TYPE_CHECKING:
    from .membership import Membership
    from .sync import ReplicaSync

__all__ = ["EVICT", "SYNC_SOURCE", "MembershipShare"]

log = logging.getLogger("kvroute.sync")

#: The source of every change this adapter applies.
SYNC_SOURCE: Final = "sync"
#: ``MembershipChange.by`` of a drain's end.
EVICT: Final = "evict"


class MembershipShare:
    """Share one replica's membership changes with the others (module docstring).

    :param membership: this replica's membership.
    :param sync: this replica's replica sync (its ``on_member`` is taken).
    """

    def __init__(self, membership: Membership, sync: ReplicaSync) -> None:
        self.membership = membership
        self.sync = sync
        self._unsubscribe: Callable[[], None] | None = None
        self.applied = 0

    async def start(self) -> None:
        """Apply what Redis holds, then publish local changes and apply remote ones."""
        self.sync.on_member = self._remote
        self.sync.on_reconnect.append(self._republish)
        held = await self.sync.members_snapshot()
        for mid, (spec, state) in sorted(held.items()):
            self._apply("updated" if state == "active" else "draining", mid, spec, state)
        self._unsubscribe = self.membership.listen(self._local)
        for m in list(self.membership.members().values()):
            if m.id >= RUNTIME_ID_BASE and m.id not in held:
                self.sync.publish_member("added", m.id, m.spec.to_mapping(), m.state)

    def stop(self) -> None:
        """Stop publishing and applying."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.sync.on_member = None
        if self._republish in self.sync.on_reconnect:
            self.sync.on_reconnect.remove(self._republish)

    def _local(self, change: Any) -> None:
        m, by = change.member, getattr(change, "by", None)
        if by == SYNC_SOURCE:
            return  # applied from another replica: not ours to publish again
        kind = "left" if by == EVICT else change.kind
        self.sync.publish_member(kind, m.id, m.spec.to_mapping(), m.state)

    def _remote(
        self, replica: str, kind: str, member_id: int, spec: Mapping[str, Any], state: str
    ) -> None:
        self._apply(kind, member_id, spec, state)

    def _apply(self, kind: str, member_id: int, spec: Mapping[str, Any], state: str) -> None:
        ms = self.membership
        try:
            if kind == "left":  # one replica's drain ended: the others finish their own
                cur = ms.get(member_id)
                if cur is not None and cur.state != "draining":
                    ms.drain(member_id, source=SYNC_SOURCE)
                    self.applied += 1
                return
            if kind == "removed":
                if ms.get(member_id) is not None:
                    ms.remove(member_id, source=SYNC_SOURCE)
                    self.applied += 1
                return
            have = ms.get(member_id)
            ws = WorkerSpec.from_mapping(spec)
            if have is None or have.spec != ws:
                got = ms.add(ws, source=SYNC_SOURCE)
                if got.id != member_id:
                    log.warning(
                        "replica sync: worker %s is %d here but %d on another replica;"
                        " were the replicas started with the same --worker list?",
                        ws.url,
                        got.id,
                        member_id,
                    )
                self.applied += 1
            if (kind == "draining" or state == "draining") and (
                (cur := ms.get(member_id)) is not None and cur.state != "draining"
            ):
                ms.drain(member_id, source=SYNC_SOURCE)
                self.applied += 1
        except (ValueError, KeyError, TypeError) as e:
            log.warning("replica sync: could not apply a membership change (%s): %s", kind, e)

    def _republish(self) -> None:
        # every live replica re-publishes all it holds: the one that made a change may be gone
        for m in list(self.membership.members().values()):
            if m.id >= RUNTIME_ID_BASE or m.state == "draining":
                kind = "draining" if m.state == "draining" else "updated"
                self.sync.publish_member(kind, m.id, m.spec.to_mapping(), m.state)
