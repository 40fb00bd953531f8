"""Several routers behind a round-robin front balancer, with or without replica sync.

:class:`ReplicaDispatcher` is a :class:`~kvroute.sim.replay.Dispatcher` made
of N :class:`kvroute.router.Router` replicas. Arrivals go to the replicas in
turn (a front load balancer that knows nothing of prefixes); each request's
lifecycle goes to the replica that routed it; every KV event goes to every
replica (each keeps its own index, fed by the same events). So each replica
sees the whole fleet's cache but only its own share of the load, and, in
event-free mode, only what it routed itself.

With sync, what a replica shares reaches the others ``sync_lag`` simulated
seconds later, through the same router-side API the live sync uses
(:mod:`kvroute.remote`: :meth:`Router.share`, :meth:`Router.local_load`,
:meth:`Router.apply_remote`): its decisions (fresh decisions, predicted
residency, session pins) and its load, after each change. Synced replicas
break ties by rendezvous hash, as the proxy does with ``--sync-url``
(:class:`kvroute.policies.KvRoute`'s ``tie_break``, set whatever the policy
parameters say, as the proxy's sync sets it); unsynced ones keep the
policy's parameter, as a proxy without sync does.

Delivery is exact at routing time: pending shared state is applied at the
start of every dispatcher call, so a request routed at time ``t`` sees
exactly what was shared before ``t - sync_lag``.

>>> from kvroute.sim.replay import SimClock
>>> clock = SimClock()
>>> d = ReplicaDispatcher("kvroute", clock, 2, 16, replicas=3, sync_lag=0.01)
>>> len(d.routers), d.sync
(3, True)
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..remote import RemoteUpdate, Routed
from ..request import Request
from ..router import Router
from .engine import EngineConfig
from .replay import Dispatcher, SimClock
from .workloads import SimRequest

__all__ = [
    "ReplicaDispatcher",
    "add_replica_args",
    "make_replicas",
    "replica_factory",
    "replica_settings",
    "spread_arrivals",
]


def _queue(box: list[tuple[float, Routed]], now: float, routed: Routed) -> None:
    box.append((now, routed))


class ReplicaDispatcher:
    """N router replicas behind a round-robin balancer (see the module docstring).

    :param policy: a registered policy name (every replica runs it).
    :param clock: the simulated clock.
    :param num_workers: fleet size (workers ``0 .. N-1``).
    :param block_size: tokens per block.
    :param replicas: how many routers (>= 1).
    :param sync: share state between replicas.
    :param sync_lag: seconds between a change on one replica and its arrival
        on the others (>= 0).
    :param kv_capacity_blocks: per-worker capacity, given to each router.
    :param router_kwargs: further keyword arguments for each ``Router``
        (``policy_params`` included; a ``seed`` in it is offset per replica).
    :raises ValueError: ``replicas`` < 1 or a bad ``sync_lag``.
    """

    def __init__(
        self,
        policy: str,
        clock: Callable[[], float],
        num_workers: int,
        block_size: int,
        *,
        replicas: int,
        sync: bool = True,
        sync_lag: float = 0.0,
        kv_capacity_blocks: int | None = None,
        router_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if not (sync_lag >= 0 and math.isfinite(sync_lag)):
            raise ValueError(f"sync_lag must be a finite number >= 0, got {sync_lag!r}")
        self._bs = block_size
        self._clock = clock
        self.sync = bool(sync)
        self.sync_lag = float(sync_lag)
        kw = dict(router_kwargs or {})
        params = dict(kw.pop("policy_params", None) or {})
        if self.sync and policy == "kvroute":
            # as the proxy's sync does (kvroute.fleet.sync), whatever the parameters say:
            # `kvroute replay` passes every parameter, tie_break="random" included
            params["tie_break"] = "rendezvous"
        self.routers: list[Router] = []
        for i in range(replicas):
            p = dict(params)
            if p.get("seed") is not None:
                p["seed"] = int(p["seed"]) + 1000 * i
            r = Router(
                block_size=block_size,
                policy=policy,
                clock=clock,
                policy_params=p or None,
                **kw,
            )
            for w in range(num_workers):
                r.add_worker(w, kv_capacity_blocks=kv_capacity_blocks)
            self.routers.append(r)
        self.wants_events = bool(self.routers[0].kv_events)
        self._turn = itertools.cycle(range(replicas))
        self._owner: dict[str | int, int] = {}
        # shared state in flight: (delivery time, seq, sender, its update)
        self._pending: list[tuple[float, int, int, float, list[tuple[float, Routed]], Any]] = []
        self._seq = 0
        self._outboxes: list[list[tuple[float, Routed]]] = [[] for _ in range(replicas)]
        if self.sync:
            for r, box in zip(self.routers, self._outboxes, strict=True):
                r.share(functools.partial(_queue, box))

    # -- shared state ----------------------------------------------------------------

    def _publish(self, i: int) -> None:
        """Send replica ``i``'s decisions since its last send, and its load, after the lag."""
        now = self._clock()
        box = self._outboxes[i]
        routed = list(box)
        box.clear()
        load = self.routers[i].local_load()
        self._seq += 1
        heapq.heappush(self._pending, (now + self.sync_lag, self._seq, i, now, routed, load))

    def _deliver(self) -> None:
        now = self._clock()
        pending = self._pending
        while pending and pending[0][0] <= now:
            _, _, i, _, routed, load = heapq.heappop(pending)
            recs = [
                Routed(r.worker, r.hashes, r.segments, r.session_id, r.pin_ttl, now - t)
                for t, r in routed
            ]
            # a simulated replica never stops: its load counts until replaced
            update = RemoteUpdate(f"r{i}", load=load, routed=recs, load_ttl=math.inf)
            for j, r in enumerate(self.routers):
                if j != i:
                    r.apply_remote(update)

    # -- the Dispatcher protocol ---------------------------------------------------

    def route(self, req: SimRequest) -> int:
        """Route on the next replica in turn; :returns: its choice."""
        if self.sync:
            self._deliver()
        i = next(self._turn)
        n = req.prompt_blocks(self._bs)
        keys = np.fromiter(req.hashes[:n], dtype=np.uint64, count=n)
        d = self.routers[i].route(
            Request(
                req.request_id,
                block_hashes=keys,
                prompt_tokens=req.prompt_len,
                session_id=req.session_id,
            )
        )
        self._owner[req.request_id] = i
        if self.sync:
            self._publish(i)
        return int(d.worker)

    def _lifecycle(self, request_id: str | int, call: str, done: bool) -> None:
        if self.sync:
            self._deliver()
        i = self._owner.pop(request_id) if done else self._owner[request_id]
        getattr(self.routers[i], call)(request_id)
        if self.sync:
            self._publish(i)

    def first_token(self, request_id: str | int) -> None:
        """Forwarded to the replica that routed the request."""
        self._lifecycle(request_id, "first_token", False)

    def finished(self, request_id: str | int) -> None:
        """Forwarded to the replica that routed the request."""
        self._lifecycle(request_id, "finished", True)

    def failed(self, request_id: str | int) -> None:
        """Forwarded to the replica that routed the request."""
        self._lifecycle(request_id, "failed", True)

    def stored(self, worker: int, hashes: Sequence[int], parent: int | None) -> None:
        """Applied to every replica's index."""
        keys = np.fromiter(hashes, np.uint64, len(hashes))
        for r in self.routers:
            r.apply_stored(worker, keys, parent)

    def removed(self, worker: int, hashes: Sequence[int]) -> None:
        """Applied to every replica's index."""
        keys = np.fromiter(hashes, np.uint64, len(hashes))
        for r in self.routers:
            r.apply_removed(worker, keys)


def make_replicas(
    name: str, replicas: int, *, sync: bool = True, sync_lag: float = 0.0, **router_kwargs: Any
) -> Callable[[SimClock, int, EngineConfig], Dispatcher]:
    """A dispatcher factory for :func:`kvroute.sim.replay.replay`: ``replicas`` routers.

    >>> from kvroute.sim.replay import replay
    >>> from kvroute.sim.workloads import SimRequest
    >>> reqs = [SimRequest(i, i * 0.1, 64, 4, (1, 2, 3, 4, 5 + i)) for i in range(6)]
    >>> r = replay(reqs, make_replicas("kvroute", 2, sync_lag=0.01), num_workers=2,
    ...            config=EngineConfig(num_gpu_blocks=64, block_size=16))
    >>> r.summary["requests"]
    6

    :param name: a registered policy name.
    :param replicas: how many routers.
    :param sync: share state between them.
    :param sync_lag: seconds shared state takes to arrive.
    :param router_kwargs: passed to each ``Router``.
    """

    def build(clock: SimClock, n: int, cfg: EngineConfig) -> Dispatcher:
        return ReplicaDispatcher(
            name,
            clock,
            n,
            cfg.block_size,
            replicas=replicas,
            sync=sync,
            sync_lag=sync_lag,
            kv_capacity_blocks=cfg.num_gpu_blocks,
            router_kwargs=router_kwargs,
        )

    return build


def spread_arrivals(
    requests: Sequence[SimRequest], window: float, seed: int = 0
) -> list[SimRequest]:
    """Each arrival moved to a uniformly random time in ``[t, t + window)``, re-sorted.

    The bundled Mooncake trace stamps arrivals in 3-second buckets, so a
    bucket's requests (about ten) replay at one instant: one router sees them
    one after the other, but replicas with any sync lag see none of each
    other's. Spreading them over their bucket is what a fleet would see.

    >>> reqs = [SimRequest(i, 3.0, 16, 1, ()) for i in range(3)]
    >>> [round(r.arrival, 2) for r in spread_arrivals(reqs, 3.0, seed=0)]
    [3.12, 3.81, 4.91]

    :param window: seconds (0: unchanged).
    :param seed: seeds the draws.
    :raises ValueError: ``window`` < 0.
    """
    import dataclasses

    if not window >= 0:
        raise ValueError(f"window must be >= 0, got {window!r}")
    if window == 0:
        return list(requests)
    rng = np.random.default_rng(seed)
    moved = [
        dataclasses.replace(r, arrival=r.arrival + float(u))
        for r, u in zip(requests, rng.uniform(0.0, window, len(requests)), strict=True)
    ]
    return sorted(moved, key=lambda r: r.arrival)


def add_replica_args(p: Any) -> None:
    """Add ``--replicas``, ``--no-sync``, ``--sync-lag`` and ``--arrival-jitter`` to a parser."""
    g = p.add_argument_group("router replicas (kvroute.sim.replicas)")
    g.add_argument(
        "--replicas", type=int, default=1, metavar="N",
        help="N routers behind a round-robin balancer (default 1)",
    )  # fmt: skip
    g.add_argument(
        "--no-sync", dest="sync", action="store_false",
        help="replicas share nothing (default: they share load and decisions)",
    )  # fmt: skip
    g.add_argument(
        "--sync-lag", type=float, default=0.005, metavar="S",
        help="seconds shared state takes to reach the other replicas (default 0.005)",
    )  # fmt: skip
    g.add_argument(
        "--arrival-jitter", type=float, default=0.0, metavar="S",
        help="move each arrival to a random time in [t, t+S) (the bundled trace's stamps"
        " are 3 s buckets; default 0: as recorded)",
    )  # fmt: skip


def replica_factory(
    args: Any, name: str, **router_kwargs: Any
) -> Callable[[SimClock, int, EngineConfig], Dispatcher] | None:
    """The dispatcher factory ``--replicas`` asks for, or None for one plain router."""
    n = getattr(args, "replicas", 1)
    if n < 1:
        raise ValueError(f"--replicas must be >= 1, got {n}")
    if n == 1 or name.startswith("sim:"):  # the simulator's own dispatchers keep no state
        return None
    return make_replicas(name, n, sync=args.sync, sync_lag=args.sync_lag, **router_kwargs)


def replica_settings(args: Any) -> dict[str, Any]:
    """The ``--replicas`` settings of a run, for its JSON report's ``parameters.fleet``."""
    return {
        "replicas": getattr(args, "replicas", 1),
        "sync": getattr(args, "sync", True),
        "sync_lag_s": getattr(args, "sync_lag", 0.0),
    }
