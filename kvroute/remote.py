"""Remote state: what other router replicas share with this one, applied without the network.

Several routers (replicas behind one load balancer) each keep their own
block index, fed by the workers' KV events; what the events do not carry,
each replica tells the others (:mod:`kvroute.fleet.sync` carries it through
Redis; the simulator, :mod:`kvroute.sim.replicas`, after a simulated lag).
This module is the router's side of that exchange: no sockets, no clock of
its own, nothing on the ``route()`` path but appending a record to a list.

* **Out.** With :meth:`Router.share <kvroute.router.Router.share>` set, every
  decision is handed to a callback as a :class:`Routed`: the worker, the
  prompt's block keys, the cache breakpoints' segments and the session pin
  they made. Load is read when needed: :meth:`Router.local_load
  <kvroute.router.Router.local_load>` is this router's own share.
* **In.** :meth:`Router.apply_remote <kvroute.router.Router.apply_remote>`
  applies a :class:`RemoteUpdate` from one replica under the router's lock:

  - its **load** per worker (active requests, queued prefill tokens, decode
    blocks) *replaces* that replica's earlier share and is added into the
    load arrays every policy and the compiled route step read
    (:meth:`kvroute.load.LoadTracker.set_remote`); a replica's share expires
    ``load_ttl`` seconds after its last update (a replica that stopped
    heart-beating, or that this one cannot hear, stops counting);
  - its **decisions**: with KV events, a fresh decision
    (:class:`kvroute.approx.FreshDecisions`), so a sibling routed here
    follows one routed there before the engine's first event; without,
    predicted residency (:class:`kvroute.approx.PredictedResidency`), with
    the cache breakpoints' longer TTLs; and a session pin with its TTL
    (:class:`kvroute.pins.SessionPins`). Each record says how old it is
    (``age``): its TTLs are that much shorter here.

Remote decisions are never shared on (no echo) and never counted as load
(the replica that made them counts their load).

>>> from kvroute import Request, Router
>>> a = Router(block_size=16, workers=[0, 1], kv_events=False, clock=lambda: 0.0)
>>> b = Router(block_size=16, workers=[0, 1], kv_events=False, clock=lambda: 0.0)
>>> out = []
>>> a.share(lambda now, routed: out.append(routed))
>>> d = a.route(Request("x", block_hashes=range(1, 11)))
>>> b.apply_remote(RemoteUpdate("a", load=a.local_load(), routed=out))
>>> b.load(d.worker)["active_requests"]        # a's request counts here too
1
>>> b.route(Request("y", block_hashes=range(1, 12))).worker == d.worker   # and its prefix
True

Not thread-safe on its own: the router calls it under its lock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .request import CacheControl, cache_segments

if TYPE_CHECKING:
    from .approx import FreshDecisions, PredictedResidency
    from .load import LoadTracker
    from .pins import SessionPins

__all__ = ["DEFAULT_LOAD_TTL", "RemoteState", "RemoteUpdate", "ReplicaLoad", "Routed"]

#: Seconds a replica's load counts after its last update (three heartbeats of
#: :mod:`kvroute.fleet.sync`'s default).
DEFAULT_LOAD_TTL = 3.0


@dataclass(frozen=True, slots=True)
class Routed:
    """One routing decision, as a replica shares it.

    :param worker: the chosen worker.
    :param hashes: the prompt's block keys (uint64).
    :param segments: ``(leading blocks, ttl)`` of its cache breakpoints
        (:func:`kvroute.request.cache_segments`); empty without any.
    :param session_id: the request's session, if any.
    :param pin_ttl: seconds the decision pins the session to the worker
        (None: no pin; a pin needs a session and a cache breakpoint).
    :param age: seconds since the decision was made, as the receiver counts.
    """

    worker: int
    hashes: npt.NDArray[np.uint64]
    segments: tuple[tuple[int, float], ...] = ()
    session_id: str | None = None
    pin_ttl: float | None = None
    age: float = 0.0


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One replica's own load per worker (what :meth:`LoadTracker.local` gives).

    :param workers: worker ids (uint64).
    :param active: requests in flight per worker (int64).
    :param prefill_tokens: uncached prompt tokens not yet prefilled (float64).
    :param decode_blocks: KV blocks of its requests in flight (float64).
    """

    workers: npt.NDArray[np.uint64]
    active: npt.NDArray[np.int64]
    prefill_tokens: npt.NDArray[np.float64]
    decode_blocks: npt.NDArray[np.float64]

    def total_active(self) -> int:
        """Requests in flight over every worker."""
        return int(self.active.sum())


@dataclass(frozen=True, slots=True)
class RemoteUpdate:
    """What one replica tells the others at once.

    :param replica: the sender's replica id.
    :param load: its own load (None: unchanged since its last update, which
        is still renewed: an update is a heartbeat).
    :param routed: its decisions since its last update, oldest first.
    :param load_ttl: seconds its load counts from now unless renewed (None:
        the receiver's ``load_ttl``); a sender that heart-beats at another
        pace says so here.
    :param pins: session pins on their own ``(session, worker, seconds
        left)``, as a replica that starts late reads them from the store.
    """

    replica: str
    load: ReplicaLoad | None = None
    routed: Sequence[Routed] = field(default_factory=tuple)
    load_ttl: float | None = None
    pins: Sequence[tuple[str, int, float]] = field(default_factory=tuple)


class RemoteState:
    """The other replicas' load per worker, and the application of their decisions.

    :param load: the router's load tracker (remote load is added into it).
    :param pins: the router's session pins.
    :param fresh: its fresh decisions (KV-event mode), or None.
    :param predicted: its predicted residency (event-free mode), or None.
    :param block_size: tokens per block (for the breakpoints' segments).
    :param load_ttl: seconds a replica's load counts after its last update.
    :raises ValueError: ``load_ttl`` is not positive.
    """

    def __init__(
        self,
        load: LoadTracker,
        pins: SessionPins,
        *,
        fresh: FreshDecisions | None,
        predicted: PredictedResidency | None,
        block_size: int,
        load_ttl: float = DEFAULT_LOAD_TTL,
    ) -> None:
        if not load_ttl > 0:
            raise ValueError(f"load_ttl must be > 0, got {load_ttl}")
        self._lt = load
        self._pins = pins
        self._fresh = fresh
        self._predicted = predicted
        self._bs = block_size
        self.load_ttl = float(load_ttl)
        #: replica -> (its load by worker id: (active, prefill, decode), expiry)
        self._loads: dict[str, tuple[dict[int, tuple[int, float, float]], float]] = {}
        # worker -> the sum of every replica's share
        self._totals: dict[int, list[float]] = {}
        self._outbox: Callable[[float, Routed], None] | None = None
        #: the clock time at which the first replica's load expires (inf: none counts)
        self.next_expiry = math.inf
        self.applied = 0  # remote decisions applied, for stats

    # -- out -----------------------------------------------------------------------

    @property
    def sharing(self) -> bool:
        """Whether decisions are handed to a callback."""
        return self._outbox is not None

    def share(self, outbox: Callable[[float, Routed], None] | None) -> None:
        """Hand every later decision to ``outbox(now, routed)`` (None: stop)."""
        self._outbox = outbox

    def routed(
        self,
        now: float,
        worker: int,
        hashes: npt.NDArray[np.uint64],
        breakpoints: tuple[CacheControl, ...],
        session_id: str | None,
    ) -> None:
        """Share one decision (the router calls it after recording the decision)."""
        out = self._outbox
        if out is None:
            return
        segments: tuple[tuple[int, float], ...] = ()
        pin_ttl = None
        if breakpoints:
            segments = tuple(cache_segments(breakpoints, len(hashes), self._bs))
            if session_id is not None:
                pin_ttl = max(b.ttl for b in breakpoints)
        out(now, Routed(worker, hashes, segments, session_id, pin_ttl))

    # -- in ------------------------------------------------------------------------

    def apply(self, update: RemoteUpdate, now: float) -> None:
        """Apply one replica's update: its load (if given) and its decisions."""
        ttl = self.load_ttl if update.load_ttl is None else update.load_ttl
        if update.load is not None:
            self.set_load(update.replica, update.load, now, ttl)
        else:
            kept = self._loads.get(update.replica)
            if kept is not None:
                self._loads[update.replica] = (kept[0], now + ttl)
                self.next_expiry = min(self.next_expiry, now + ttl)
        for r in update.routed:
            self.apply_routed(r, now)
        for session, worker, left in update.pins:
            if left > 0 and worker in self._lt.pos:
                self._pins.pin(session, worker, now + left)

    def apply_routed(self, r: Routed, now: float) -> None:
        """Record another replica's decision as this router's own belief (not its load)."""
        if r.worker not in self._lt.pos or not len(r.hashes):
            return
        self.applied += 1
        if self._predicted is not None:
            self._predicted.record_prompt(r.worker, r.hashes, now, r.segments, r.age)
        elif self._fresh is not None and r.age < self._fresh.ttl:
            # its expiry is the origin's: recorded as if ``age`` seconds ago
            self._fresh.record(r.worker, r.hashes, now - r.age)
        if r.session_id is not None and r.pin_ttl is not None and r.pin_ttl > r.age:
            self._pins.pin(r.session_id, r.worker, now + r.pin_ttl - r.age)

    def set_load(
        self, replica: str, load: ReplicaLoad, now: float, ttl: float | None = None
    ) -> None:
        """Replace ``replica``'s share of the load; it counts until ``now + ttl``.

        :param ttl: seconds (default: ``load_ttl``).
        """
        ttl = self.load_ttl if ttl is None else ttl
        new = {
            int(w): (int(a), float(p), float(d))
            for w, a, p, d in zip(
                load.workers.tolist(),
                load.active.tolist(),
                load.prefill_tokens.tolist(),
                load.decode_blocks.tolist(),
                strict=True,
            )
            if a or p or d
        }
        old = self._loads.get(replica, ({}, 0.0))[0]
        self._loads[replica] = (new, now + ttl)
        self.next_expiry = min(self.next_expiry, now + ttl)
        self._shift(old, new)

    def drop(self, replica: str) -> bool:
        """Forget ``replica``'s load now (it said it stopped). False if unknown."""
        kept = self._loads.pop(replica, None)
        if kept is None:
            return False
        self._shift(kept[0], {})
        return True

    def expire(self, now: float) -> list[str]:
        """Drop the load of every replica not heard from within ``load_ttl``; return them."""
        gone = [r for r, (_, until) in self._loads.items() if until <= now]
        for r in gone:
            self.drop(r)
        self.next_expiry = min((until for _, until in self._loads.values()), default=math.inf)
        return gone

    def _shift(
        self, old: dict[int, tuple[int, float, float]], new: dict[int, tuple[int, float, float]]
    ) -> None:
        for w in old.keys() | new.keys():
            a = old.get(w, (0, 0.0, 0.0))
            b = new.get(w, (0, 0.0, 0.0))
            if a == b:
                continue
            t = self._totals.setdefault(w, [0, 0.0, 0.0])
            t[0] += b[0] - a[0]
            t[1] += b[1] - a[1]
            t[2] += b[2] - a[2]
            if not t[0] and abs(t[1]) < 1e-9 and abs(t[2]) < 1e-9:
                del self._totals[w]
                t = [0, 0.0, 0.0]
            self._lt.set_remote(w, int(t[0]), max(t[1], 0.0), max(t[2], 0.0))

    def reapply(self, worker: int) -> None:
        """Put the remote share back into a worker's arrays (it was just added again)."""
        t = self._totals.get(worker)
        if t is not None:
            self._lt.set_remote(worker, int(t[0]), max(t[1], 0.0), max(t[2], 0.0))

    def replicas(self) -> dict[str, tuple[int, float]]:
        """Per replica heard from: its requests in flight and the clock time its load expires."""
        loads = self._loads.items()
        return {r: (sum(v[0] for v in ld.values()), until) for r, (ld, until) in loads}

    def remote_active(self) -> dict[int, int]:
        """Per worker, the other replicas' requests in flight (workers with none left out)."""
        return {w: int(t[0]) for w, t in self._totals.items() if t[0]}

    def _check(self) -> None:
        """The totals are the sum of the replicas' shares; AssertionError if not."""
        sums: dict[int, list[float]] = {}
        for ld, _ in self._loads.values():
            for w, (a, p, d) in ld.items():
                s = sums.setdefault(w, [0, 0.0, 0.0])
                s[0] += a
                s[1] += p
                s[2] += d
        for w in sums.keys() | self._totals.keys():
            s = sums.get(w, [0, 0.0, 0.0])
            t = self._totals.get(w, [0, 0.0, 0.0])
            assert s[0] == t[0] and abs(s[1] - t[1]) < 1e-6 and abs(s[2] - t[2]) < 1e-6, w
