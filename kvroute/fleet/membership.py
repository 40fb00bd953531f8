"""The fleet's workers as one part: who they are, who named them, and which are leaving.

Every way of naming a worker (``--worker`` flags, the workers file, DNS
discovery, the admin API, another replica through sync) calls this one
:class:`Membership`; the proxy, and anything else that follows the fleet,
listens to its :class:`MembershipChange` stream.

**Identity.** A worker *is* its normalized URL
(:func:`~kvroute.fleet.spec.normalize_url`): two sources naming the same URL
name the same worker. Its id is fixed the first time its URL is seen and
kept for the life of the membership, even after it leaves and comes back:
a worker named by a flag gets its position among the flags (``0, 1, ...``,
as the command line always gave); any other gets
:func:`~kvroute.fleet.spec.runtime_worker_id` of its URL, which every
replica derives alone. So an id never names another worker.

**Claims and precedence.** Each source that names a worker holds a *claim*
on it: the :class:`~kvroute.fleet.spec.WorkerSpec` that source gave. The
worker's fields are those of the highest-ranked claim::

    flag  >  admin = sync  >  file  >  dns

The command line is what the operator started the proxy with; the admin API
is the operator's word at run time, and sync is that word relayed from
another replica, so the two are one voice: between them the latest claim
wins, and every replica ends with the same fields whichever one was asked.
A workers file beats DNS because it names a worker on purpose, with its
endpoints and role; DNS only finds addresses. :attr:`Member.source` is the
source whose claim gives the fields.

**Leaving.** What a removal does depends on who asks:

- ``admin`` and ``sync`` speak for the operator: :meth:`Membership.remove`
  takes the worker out at once, and :meth:`Membership.drain` starts its
  drain, whatever else names it;
- ``flag``, ``file`` and ``dns`` only take back their own claim: a workers
  file that drops a URL the admin API also added leaves the worker in (its
  fields now the admin's); a DNS answer that loses an address the file
  still lists changes nothing. When the last claim goes, ``remove`` takes
  the worker out and ``drain`` drains it. (The bundled file and DNS sources
  drain: a worker dropped from a file, or a pod leaving a Service, finishes
  what it holds.)

A draining worker stays draining until it leaves (:meth:`Membership.evict`,
which the proxy calls when its last request ends or its drain times out);
claims made meanwhile are recorded but do not bring it back. A worker that
left is gone with all its claims: the file and DNS sources report changes,
not their whole view, so they name it again only when their own view of it
changes (the file is edited to list it, or DNS loses the address and finds
it again).

**Thread safety.** Every method may be called from any thread. Changes are
made under one re-entrant lock, and listeners are called on the thread that
made the change, under that lock, in the order of the changes: a listener
must be quick and must not block (hand the change to your own loop or
thread, e.g. with ``loop.call_soon_threadsafe``). A listener that raises is
logged and the others still hear the change.

>>> from kvroute.fleet import WorkerSpec
>>> m = Membership([WorkerSpec("http://10.0.0.5:8000")])          # one --worker flag
>>> seen = []
>>> stop = m.listen(seen.append)
>>> w = m.add(WorkerSpec("10.0.0.6:8000", name="from-file"), source="file")
>>> w.id == runtime_worker_id("http://10.0.0.6:8000"), w.source, w.spec.label
(True, 'file', 'from-file')
>>> m.add(WorkerSpec("http://10.0.0.6:8000", "tcp://10.0.0.6:5557"), source="admin").source
'admin'
>>> m.remove(w.id, source="file").source          # the file lets go; the admin's claim stays
'admin'
>>> m.drain(w.id, source="admin").state
'draining'
>>> m.evict(w.id).id == w.id, m.get(w.id)
(True, None)
>>> [c.kind for c in seen]
['added', 'updated', 'draining', 'removed']
>>> sorted(m.members()) == [0]
True
>>> stop()
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from .spec import WorkerSpec, normalize_url, runtime_worker_id

__all__ = [
    "PRECEDENCE",
    "SOURCES",
    "Member",
    "MemberState",
    "Membership",
    "MembershipChange",
    "Source",
]

log = logging.getLogger("kvroute.fleet")

#: Who named a worker.
Source = Literal["flag", "file", "dns", "admin", "sync"]
#: Every source, highest precedence first.
SOURCES: Final[tuple[str, ...]] = ("flag", "admin", "sync", "file", "dns")
#: Each source's rank for a worker's fields (lower wins; equal ranks: the latest claim wins).
PRECEDENCE: Final[dict[str, int]] = {"flag": 0, "admin": 1, "sync": 1, "file": 2, "dns": 3}
#: Sources whose removal or drain acts on the worker, not only on their own claim.
_OPERATOR: Final = frozenset({"admin", "sync"})

#: ``"active"``: takes requests; ``"draining"``: takes no new ones, leaves when idle.
MemberState = Literal["active", "draining"]


@dataclass(frozen=True)
class Member:
    """One worker of the fleet, as the membership holds it.

    :ivar id: the worker id every part uses (router, pool, events, metrics).
    :ivar spec: its fields, from the highest-ranked claim.
    :ivar state: ``"active"`` or ``"draining"``.
    :ivar source: the source whose claim gives ``spec``.
    """

    id: int
    spec: WorkerSpec
    state: MemberState
    source: str


@dataclass(frozen=True)
class MembershipChange:
    """One change, as listeners hear it.

    :ivar kind: ``"added"`` (a new worker), ``"updated"`` (its fields or
        source changed), ``"draining"`` (it takes no new requests) or
        ``"removed"`` (it left).
    :ivar member: the worker after the change (for ``"removed"``: as it was).
    :ivar by: the source whose call made the change, or ``"evict"`` for the
        end of a drain. A replica sync uses it not to echo back what it applied.
    """

    kind: Literal["added", "updated", "draining", "removed"]
    member: Member
    by: str | None = None


def _check_source(source: object) -> str:
    if source not in PRECEDENCE:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
    assert isinstance(source, str)
    return source


class Membership:
    """The fleet's workers: ids, fields, claims, state; and who listens.

    :param flags: workers named on the command line, in order (ids ``0, 1, ...``).
    :raises ValueError: two flags name the same URL.
    """

    def __init__(self, flags: Iterable[WorkerSpec] = ()) -> None:
        self._lock = threading.RLock()
        self._members: dict[int, Member] = {}
        # id -> source -> (sequence, spec): every live claim
        self._claims: dict[int, dict[str, tuple[int, WorkerSpec]]] = {}
        # url -> id, never forgotten: a URL keeps its id for the membership's life
        self._ids: dict[str, int] = {}
        self._flag_positions = 0
        self._seq = itertools.count()
        self._listeners: dict[int, Callable[[MembershipChange], None]] = {}
        self._listener_ids = itertools.count()
        for spec in flags:
            if normalize_url(spec.url) in self._by_url():
                raise ValueError(f"worker {spec.url} is given twice")
            self.add(spec, source="flag")

    # -- reading -----------------------------------------------------------------------

    def members(self) -> dict[int, Member]:
        """Every worker, draining ones included, by id (a copy, in the order they joined)."""
        with self._lock:
            return dict(self._members)

    def __len__(self) -> int:
        """How many workers there are, draining ones included."""
        return len(self._members)

    def __iter__(self) -> Iterator[Member]:
        """The workers (a snapshot), in the order they joined."""
        return iter(self.members().values())

    def get(self, worker_id: int) -> Member | None:
        """The worker with this id, or None."""
        return self._members.get(worker_id)

    def by_url(self, url: str) -> Member | None:
        """The worker at this URL (normalized first), or None.

        :raises ValueError: ``url`` is not a worker URL.
        """
        wid = self._ids.get(normalize_url(url))
        return None if wid is None else self._members.get(wid)

    def sources(self, worker_id: int) -> tuple[str, ...]:
        """The sources that name the worker, highest precedence first (empty if unknown)."""
        with self._lock:
            claims = self._claims.get(worker_id, {})
            return tuple(s for s in SOURCES if s in claims)

    def id_for(self, url: str, *, source: str = "admin") -> int:
        """The id the worker at ``url`` has, or would get if ``source`` named it now.

        :raises ValueError: a bad URL or source.
        """
        with self._lock:
            return self._id(normalize_url(url), _check_source(source), assign=False)

    # -- changing ----------------------------------------------------------------------

    def add(self, spec: WorkerSpec, *, source: str) -> Member:
        """Record ``source``'s claim on the worker ``spec`` names; add the worker if new.

        Naming a known worker again replaces that source's claim (the worker
        is ``"updated"`` if its fields or source change). A draining worker
        stays draining.

        :returns: the worker after the change.
        :raises ValueError: an unknown source, or (never in practice) a
            runtime id that another URL already has.
        :raises TypeError: ``spec`` is not a :class:`WorkerSpec`.
        """
        src = _check_source(source)
        if not isinstance(spec, WorkerSpec):
            raise TypeError(f"spec must be a WorkerSpec, not {type(spec).__name__}")
        with self._lock:
            wid = self._id(spec.url, src, assign=True)
            claims = self._claims.setdefault(wid, {})
            claims[src] = (next(self._seq), spec)
            old = self._members.get(wid)
            new = self._resolve(wid, "active" if old is None else old.state)
            self._members[wid] = new
            if old is None:
                self._emit(MembershipChange("added", new, src))
            elif new != old:
                self._emit(MembershipChange("updated", new, src))
            return new

    def remove(self, worker_id: int, *, source: str) -> Member | None:
        """Take the worker out (``admin``, ``sync``), or take back ``source``'s claim.

        :returns: the worker as it is after the call (as it was, if it left);
            None if it is unknown, or ``source`` holds no claim on it and may
            not remove it.
        :raises ValueError: an unknown source.
        """
        src = _check_source(source)
        with self._lock:
            if worker_id not in self._members:
                return None
            if src in _OPERATOR:
                return self._leave(worker_id, src)
            return self._withdraw(worker_id, src, drain=False)

    def drain(self, worker_id: int, *, source: str) -> Member | None:
        """Drain the worker (``admin``, ``sync``), or take back ``source``'s claim, draining
        it when that was the last.

        A draining worker takes no new requests; whoever follows the
        membership lets its requests in flight finish, then calls :meth:`evict`.

        :returns: the worker after the call; None if it is unknown, or
            ``source`` holds no claim on it and may not drain it.
        :raises ValueError: an unknown source.
        """
        src = _check_source(source)
        with self._lock:
            old = self._members.get(worker_id)
            if old is None:
                return None
            if src in _OPERATOR:
                return self._start_drain(old, src)
            return self._withdraw(worker_id, src, drain=True)

    def evict(self, worker_id: int) -> Member | None:
        """The worker leaves now, whatever names it (the end of its drain).

        :returns: the worker as it was, or None if unknown.
        """
        with self._lock:
            if worker_id not in self._members:
                return None
            return self._leave(worker_id, "evict")

    def listen(self, callback: Callable[[MembershipChange], None]) -> Callable[[], None]:
        """Call ``callback`` with every change from now on; returns the unsubscribe function."""
        with self._lock:
            key = next(self._listener_ids)
            self._listeners[key] = callback

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.pop(key, None)

        return unsubscribe

    # -- inside the lock -----------------------------------------------------------------

    def _by_url(self) -> dict[str, int]:
        return {m.spec.url: wid for wid, m in self._members.items()}

    def _id(self, url: str, source: str, *, assign: bool) -> int:
        wid = self._ids.get(url)
        if wid is not None:
            return wid
        if source == "flag":
            wid = self._flag_positions
        else:
            wid = runtime_worker_id(url)
            taken = next((u for u, i in self._ids.items() if i == wid), None)
            if taken is not None:
                raise ValueError(f"worker {url}: its id {wid} is already {taken}'s")
        if assign:
            self._ids[url] = wid
            if source == "flag":
                self._flag_positions += 1
        return wid

    def _resolve(self, wid: int, state: MemberState) -> Member:
        claims = self._claims[wid]
        # the best rank wins; within a rank, the latest claim
        src = min(claims, key=lambda s: (PRECEDENCE[s], -claims[s][0]))
        return Member(wid, claims[src][1], state, src)

    def _withdraw(self, wid: int, source: str, *, drain: bool) -> Member | None:
        claims = self._claims[wid]
        if claims.pop(source, None) is None:
            return None
        old = self._members[wid]
        if claims:
            new = self._resolve(wid, old.state)
            self._members[wid] = new
            if new != old:
                self._emit(MembershipChange("updated", new, source))
            return new
        if not drain:
            return self._leave(wid, source)
        # The last claim: the worker drains. The claim stays recorded until it
        # leaves, so a draining worker always has fields to show.
        claims[source] = (next(self._seq), old.spec)
        return self._start_drain(old, source)

    def _start_drain(self, old: Member, source: str) -> Member:
        if old.state == "draining":
            return old
        new = Member(old.id, old.spec, "draining", old.source)
        self._members[old.id] = new
        self._emit(MembershipChange("draining", new, source))
        return new

    def _leave(self, wid: int, by: str) -> Member:
        old = self._members.pop(wid)
        del self._claims[wid]
        self._emit(MembershipChange("removed", old, by))
        return old

    def _emit(self, change: MembershipChange) -> None:
        for callback in list(self._listeners.values()):
            try:
                callback(change)
            except Exception:  # one listener's bug must not hide the change from the others
                log.exception("a membership listener failed on %s of worker %d",
                              change.kind, change.member.id)  # fmt: skip

    def _check(self) -> None:
        """Invariants: every member has claims, its fields are its best claim's; ids are stable.

        :raises AssertionError: one does not hold.
        """
        with self._lock:
            assert set(self._members) == set(self._claims), "members and claims differ"
            for wid, m in self._members.items():
                assert self._claims[wid], f"worker {wid} has no claim"
                best = self._resolve(wid, m.state)
                assert (best.spec, best.source) == (m.spec, m.source), f"worker {wid} drifted"
                assert self._ids[m.spec.url] == wid, f"worker {wid}'s URL maps elsewhere"
