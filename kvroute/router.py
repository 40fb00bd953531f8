"""The router: per request, the worker where its prefix is cached, without herding.

A proxy builds one :class:`Router`, feeds it the workers' KV events
(:meth:`Router.apply_event` for each decoded event, or a
:class:`kvroute.events.ZmqSubscriber` that does it on its own thread), calls
:meth:`Router.route` for each request and reports its lifecycle
(:meth:`Router.first_token`, :meth:`Router.finished`, :meth:`Router.failed`).
:meth:`Router.apply_stored` / :meth:`Router.apply_removed` are the level
below: they take kvroute's keys, not an engine's hashes.

Parts: the router is a coordinator. It holds the lock, the block index, and
one small part per job, each a module with its own specification and tests:

* :class:`~kvroute.config.RouterConfig` (``config.py``): every setting,
  validated once; :attr:`Router.config`.
* :class:`~kvroute.members.Members` (``members.py``): which workers are
  known, healthy and busy, and what they report.
* :class:`~kvroute.load.LoadTracker` (``load.py``): per-worker load and the
  requests in flight.
* :class:`~kvroute.approx.FreshDecisions` / :class:`~kvroute.approx.PredictedResidency`
  (``approx.py``): what the router believes is cached because it sent it there.
* :class:`~kvroute.pins.SessionPins` and :class:`~kvroute.pins.WarmupPlans`
  (``pins.py``): per-session pins and warm-up plans.
* :class:`~kvroute.admission.AdmissionQueue` (``admission.py``): requests
  waiting while every worker is busy.
* :class:`~kvroute.journal.Journal` (``journal.py``): the sequence numbers
  and the replayable record of state-changing calls.
* :class:`~kvroute.trust.WorkerTrust` (``trust.py``): whether each worker's
  index is trusted or degraded, the drift detector that decides it, and what
  a degraded worker is routed on meanwhile.
* the routing policy (:mod:`kvroute.policies`), which chooses among the
  candidates the router lays out.
* :class:`~kvroute.disagg.Disaggregation` (``disagg.py``): worker roles in a
  prefill/decode-disaggregated fleet, the decode worker's choice and the
  conditional rule; :meth:`Router.route` asks it only once some worker has a
  role other than ``"both"``.

:meth:`Router.route` itself lives here: it asks each part in turn and
records the decision in each. A call that changes what the router knows
about a worker (removing it, say) is where the router tells every part that
keeps a record of it. "This worker's cache is gone" is one call,
:meth:`Router.worker_cache_reset`: an engine restart, its ``AllBlocksCleared``
and anything else (a replica sync, say) reach every record through it, and
:meth:`Router.add_listener` hears of it.

Threading: one lock serialises routing, lifecycle, membership and the
``apply_*`` event methods; every critical section is short (a few numpy
operations over the workers plus one batch call into the compiled index).
The parts are not thread-safe on their own: they are only touched under that
lock. Events written straight into :attr:`index` from another thread are
safe too (the index is thread-safe), but they are not ordered against
routing decisions in :meth:`Router.journal`; use ``apply_*`` when a decision
must be replayable.

Time: the router never reads the wall clock. It calls the ``clock`` it was
given (default :func:`time.monotonic`), so a simulator can drive it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import xxhash

from ._convert import as_u64_array, check_u64
from .admission import AdmissionQueue
from .approx import FreshDecisions, PredictedResidency
from .config import BusyThreshold, RouterConfig, RouterSettings
from .disagg import DisaggDecision, Disaggregation, Role, check_role, decode_key
from .index_api import IndexLike
from .journal import Journal, JournalEntry
from .keycheck import StoredKeyCheck
from .load import LoadTracker, RequestKey
from .members import Members, check_capacity, check_metrics
from .pins import WARMUP_PLAN_TTL, SessionPins, WarmupPlans
from .policies import (
    DEFAULT_POLICY,
    Candidates,
    Features,
    RoutingPolicy,
    get_policy,
)
from .remote import RemoteState, RemoteUpdate, ReplicaLoad, Routed
from .request import CacheControl, Decision, Request, WarmupPlan, cache_segments
from .trust import Listener, Listeners, RecentPrompt, WorkerState, WorkerTrust

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._index_py import HashesLike
    from .events.apply import EventApplier
    from .events.types import KVEvent

__all__ = [
    "WARMUP_PLAN_TTL",
    "BusyThreshold",
    "HashFn",
    "NoWorkerAvailable",
    "Router",
    "RouterConfig",
]

#: ``(tokens, block_size, *, lora_name, cache_namespace, parent) -> uint64 array``
HashFn = Callable[..., npt.NDArray[np.uint64]]

logger = logging.getLogger("kvroute.router")

_NO_WORKERS: frozenset[int] = frozenset()


def _default_index_factory() -> Callable[[], IndexLike]:
    # The package picks the compiled index or its twin once; use its choice.
    from . import BlockIndex

    return BlockIndex


def _resolve_policy(
    policy: str | RoutingPolicy | None, params: Mapping[str, Any] | None
) -> RoutingPolicy:
    if policy is None:
        policy = DEFAULT_POLICY
    if isinstance(policy, str):
        return get_policy(policy, **(params or {}))
    if isinstance(policy, RoutingPolicy):
        if params:
            raise ValueError("policy_params apply only to a policy given by name")
        return policy
    raise TypeError(f"policy must be a name or a RoutingPolicy, not {type(policy)}")


class NoWorkerAvailable(RuntimeError):
    """No worker can take the request: none was added, or all are unhealthy."""


@dataclass(slots=True)
class _Payload:
    # what the router keeps per request in flight, beside its load
    entry: Any  # its FreshDecisions entry, or its PredictedResidency entry ids
    session_id: str | None
    # kept for a warm-up plan (speculative prefill)
    tokens: Sequence[int] | npt.NDArray[np.integer[Any]] | None
    hashes: npt.NDArray[np.uint64] | None
    speculative: bool
    prefill_worker: int | None = None  # a decode leg's: where its prompt was prefilled
    fallback: Any = None  # its entry in a degraded worker's fallback residency

    @classmethod
    def of(
        cls, request: Request, hashes: npt.NDArray[np.uint64], entry: Any = None, **kw: Any
    ) -> _Payload:
        """``request``'s payload (its tokens and hashes kept for a speculative prefill)."""
        spec = request.speculative_prefill
        return cls(
            entry,
            request.session_id,
            request.tokens if spec else None,
            hashes if spec else None,
            spec,
            **kw,
        )


class Router:
    """Route requests to workers, tracking their cache, their load and their health.

    >>> r = Router(block_size=4, workers=[0, 1], policy="kvroute",
    ...            policy_params={"seed": 0}, clock=lambda: 0.0)
    >>> seq = r.apply_stored(1, [101, 102, 103])
    >>> d = r.route(Request("a", block_hashes=[101, 102, 555]))
    >>> d.worker, d.matched_blocks, d.predicted_cached_tokens, d.alt_worker
    (1, 2, 8, 0)
    >>> r.first_token("a"), r.finished("a"), r.finished("a")
    (True, True, False)
    >>> r.load(1)["active_requests"], r.stats()["unknown_request_ids"]
    (0, 1)

    The settings are a :class:`RouterConfig`, given whole or as keywords
    (both: the keywords override the config's fields):

    >>> cfg = RouterConfig(block_size=4, admission="sjf")
    >>> Router(config=cfg, journal=True).config == RouterConfig(
    ...     block_size=4, admission="sjf", journal=True)
    True

    :param block_size: tokens per KV block (must match the engines'); a
        :class:`RouterConfig` field, positional for convenience.
    :param hashing: ``f(tokens, block_size, *, lora_name, cache_namespace,
        parent)`` returning uint64 block hashes (default:
        :func:`kvroute.hashing.kvroute_block_hashes`, imported on first use).
    :param policy: a registered policy name, or a :class:`RoutingPolicy`
        (default ``"kvroute"``).
    :param workers: worker ids to start with.
    :param config: the settings (default: ``RouterConfig()``).
    :param policy_params: keyword parameters for :func:`get_policy`.
    :param clock: returns the current time in seconds (default ``time.monotonic``).
    :param index: the block index fed by KV events (default: a new ``BlockIndex``).
    :param index_factory: builds the router's private index of predicted
        residency in approximate mode (default: the compiled ``BlockIndex``,
        else its twin). The prompts in flight are kept apart, in an
        ``ActivePrefixes`` (:mod:`kvroute.load`).
    :param settings: any other :class:`RouterConfig` field (``kv_events``,
        ``predicted_ttl``, ``predict_on_route``, ``fresh_ttl``,
        ``request_timeout``, ``sweep_interval``, ``busy_threshold``,
        ``admission``, ``pin_balance_slack``, ``pin_abs_slack``, ``tiered``,
        ``journal``); see its docstring.
    :raises ValueError, TypeError: a bad parameter or setting.
    """

    def __init__(
        self,
        block_size: int | None = None,
        hashing: HashFn | None = None,
        policy: str | RoutingPolicy | None = None,
        workers: Iterable[int] = (),
        *,
        config: RouterConfig | None = None,
        policy_params: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        index: IndexLike | None = None,
        index_factory: Callable[[], IndexLike] | None = None,
        **settings: Unpack[RouterSettings],
    ) -> None:
        if config is None:
            config = RouterConfig()
        elif not isinstance(config, RouterConfig):
            raise TypeError(f"config must be a RouterConfig, not {type(config).__name__}")
        if block_size is not None or settings:
            # the keywords override the config's fields (and are validated by it)
            size = config.block_size if block_size is None else block_size
            config = dataclasses.replace(config, block_size=size, **settings)
        #: The settings, validated.
        self.config = config
        #: Tokens per KV block (``config.block_size``).
        self.block_size = config.block_size
        #: False in event-free (approximate) mode (``config.kv_events``).
        self.kv_events = config.kv_events
        self._hashing = hashing
        #: The routing policy.
        self.policy: RoutingPolicy = _resolve_policy(policy, policy_params)
        self._clock = clock
        factory = index_factory or _default_index_factory()
        #: The block index KV events feed (thread-safe on its own).
        self.index: IndexLike = factory() if index is None else index
        self._load = LoadTracker()
        self._members = Members(self._load, config.busy_threshold)
        # bound once: route() asks for the busy mask on every call
        self._busy_mask: Callable[[int], npt.NDArray[np.bool_]] = self._members.busy_mask
        self._predicted: PredictedResidency | None = None
        self._fresh: FreshDecisions | None = None
        if not self.kv_events:
            self._predicted = PredictedResidency(factory, config.predicted_ttl)
        elif config.predict_on_route:
            self._fresh = FreshDecisions(config.fresh_ttl)
        self._pins = SessionPins(
            config.pin_balance_slack, config.pin_abs_slack, config.max_sessions
        )
        # other replicas' load and decisions (kvroute.remote); inert unless used
        self._remote = RemoteState(
            self._load, self._pins, fresh=self._fresh, predicted=self._predicted,
            block_size=config.block_size,
        )  # fmt: skip
        self._warmups = WarmupPlans(WARMUP_PLAN_TTL, config.max_sessions)
        self._trust = WorkerTrust(
            config.block_size,
            config.drift_window,
            config.drift_threshold,
            config.drift_tolerance_blocks,
            functools.partial(PredictedResidency, factory, config.predicted_ttl),
        )
        self._degraded = False  # route()'s one check: is any worker degraded?
        self._listeners = Listeners()
        self._queue = AdmissionQueue(config.admission)
        self._journal = Journal(config.journal)
        self._tiered = config.tiered
        self._pd = Disaggregation(config.disagg)
        # route() asks self._pd only in a disaggregated fleet; lifecycle calls look
        # for decode legs once the fleet ever was one
        self._split = self._pd_used = False
        self._next_sweep = -math.inf
        self._zero_cache = np.zeros(0, np.int64)
        self._lock = threading.Lock()
        self._keycheck = StoredKeyCheck()
        self._applier: EventApplier | None = None
        self._applier_lock = threading.Lock()
        self._stats = dict.fromkeys(
            (
                "routed",
                "pinned_routes",
                "unknown_request_ids",
                "stale_requests",
                "dropped_with_worker",
                "unknown_workers",
                "queued",
                "refused_events",
                "cache_resets",
                "degradations",
            ),
            0,
        )
        for w in workers:
            self.add_worker(w)

    @property
    def clock(self) -> Callable[[], float]:
        """The clock the router reads (``time.monotonic`` unless one was given)."""
        return self._clock

    @property
    def _all_healthy(self) -> bool:
        # route()'s candidate filter reads it: no filtering while all are healthy
        return self._members.all_healthy

    # -- bookkeeping -------------------------------------------------------------

    def journal(self) -> list[JournalEntry]:
        """The state-changing calls so far, as ``(seq, method, args, kwargs)``, in order.

        Replaying them on a fresh router with the same parameters, seed and
        clock reproduces every decision (what the stress test checks).
        Empty unless the router was built with ``journal=True``. Admission-queue
        calls (``submit`` / ``pop_ready``) are recorded (as ``"queued"`` and the
        ``"route"`` they lead to) but are not replayable as such.
        """
        with self._lock:
            return self._journal.entries()

    def stats(self) -> dict[str, int]:
        """Counters: routed, pinned_routes, unknown_request_ids, stale_requests,
        dropped_with_worker, unknown_workers, refused_events (events naming a
        worker the router does not know), cache_resets, degradations,
        sessions_evicted (pins and warm-up plans past ``max_sessions``);
        stored_starts_routed / stored_starts_unrouted (prompt starts stored by
        :meth:`apply_stored` that did / did not start a recent decision: see
        :mod:`kvroute.keycheck`); and now: queued (waiting for admission),
        warmup_plans (made and not yet taken), sessions (pins held), degraded
        (workers); in a fleet that has been disaggregated also remote_prefills
        and local_prefills."""
        with self._lock:
            out = dict(self._stats)
            out.update(self._keycheck.counts())
            out["queued"] = len(self._queue)
            out["warmup_plans"] = len(self._warmups)
            out["sessions"] = len(self._pins)
            out["sessions_evicted"] = self._pins.evicted + self._warmups.evicted
            out["degraded"] = len(self._trust.degraded)
            if self._pd_used:
                out.update(self._pd.counters())
            return out

    # -- workers -----------------------------------------------------------------

    def add_worker(
        self, worker: int, *, kv_capacity_blocks: int | None = None, role: Role = "both"
    ) -> None:
        """Add a worker (healthy, idle). Adding a known worker only updates its capacity and role.

        :param kv_capacity_blocks: the worker's KV capacity in blocks; bounds its
            predicted residency in approximate mode, and a decode worker's room.
        :param role: ``"both"``, ``"prefill"`` or ``"decode"`` (see :mod:`kvroute.disagg`).
        :raises TypeError, OverflowError: ``worker`` is not an int in [0, 2**64).
        :raises ValueError: an unknown role.
        """
        w = check_u64(worker, "worker")
        cap = check_capacity(kv_capacity_blocks)
        role = check_role(role)
        with self._lock:
            # the role is journalled only when given, so plain journals keep their shape
            extra = {} if role == "both" else {"role": role}
            self._journal.log("add_worker", w, kv_capacity_blocks=cap, **extra)
            if self._members.add(w):
                self._remote.reapply(w)
            self._trust.add_worker(w)
            if cap is not None:
                self._trust.set_capacity(w, cap)
                self._pd.set_capacity(w, cap)
                if self._predicted is not None:
                    self._predicted.set_capacity(w, cap)
            self._pd.roles.set(w, role)
            self._split = self._pd.roles.disaggregated
            self._pd_used |= self._split

    def remove_worker(self, worker: int) -> bool:
        """Remove a worker: never route to it again, drop its blocks and its requests' load.

        :returns: False (and counted in ``stats()["unknown_workers"]``) if unknown.
        """
        w = check_u64(worker, "worker")
        with self._lock:
            self._journal.log("remove_worker", w)
            dropped = self._members.remove(w)
            if dropped is None:
                self._stats["unknown_workers"] += 1
                return False
            self._stats["dropped_with_worker"] += len(dropped)
            self._pd.drop(w)
            self._split = self._pd.roles.disaggregated
            # every record that names the worker's cache goes with it; a pin or
            # warm-up plan naming it is dropped when next read
            self.index.remove_worker(w)
            if self._predicted is not None:
                self._predicted.remove_worker(w)
            if self._fresh is not None:
                self._fresh.remove_worker(w)
            self._trust.remove_worker(w)
            self._degraded = self._trust.any_degraded
            return True

    def __contains__(self, worker: object) -> bool:
        """Whether ``worker`` is known (added and not removed)."""
        return worker in self._members

    def mark_unhealthy(self, worker: int) -> bool:
        """Exclude a worker from routing; its blocks and load stay. False if unknown."""
        return self._set_health(worker, False)

    def mark_healthy(self, worker: int) -> bool:
        """Let an unhealthy worker take requests again. False if unknown."""
        return self._set_health(worker, True)

    def _set_health(self, worker: int, healthy: bool) -> bool:
        w = check_u64(worker, "worker")
        with self._lock:
            self._journal.log("mark_healthy" if healthy else "mark_unhealthy", w)
            if not self._members.set_healthy(w, healthy):
                self._stats["unknown_workers"] += 1
                return False
            return True

    def workers(self) -> list[int]:
        """Known workers (healthy or not), ascending."""
        with self._lock:
            return self._members.workers()

    def role(self, worker: int) -> Role:
        """A worker's role: ``"both"``, ``"prefill"`` or ``"decode"``.

        :raises KeyError: unknown worker.
        """
        w = check_u64(worker, "worker")
        with self._lock:
            if w not in self._members:
                raise KeyError(worker)
            return self._pd.roles.get(w)

    @property
    def disaggregated(self) -> bool:
        """Whether some worker only prefills or only decodes (then decisions name both)."""
        return self._split

    def load(self, worker: int) -> dict[str, float | int | bool]:
        """The router's view of one worker's load.

        :raises KeyError: unknown worker.
        """
        w = check_u64(worker, "worker")
        with self._lock:
            return self._members.load(w)

    def update_worker_metrics(
        self,
        worker: int,
        *,
        waiting_requests: float | None = None,
        kv_usage: float | None = None,
        kv_capacity_blocks: int | None = None,
    ) -> bool:
        """Feed worker-reported metrics (None leaves a metric unchanged).

        :param waiting_requests: requests queued in the engine.
        :param kv_usage: fraction of its KV cache in use, in [0, 1].
        :param kv_capacity_blocks: its KV capacity, for the approximate mode's LRU bound.
        :returns: False (counted in ``stats()["unknown_workers"]``) for an unknown worker.
        :raises TypeError, ValueError: a metric that is not a finite number in range.
        """
        w = check_u64(worker, "worker")
        wr, ku, cap = check_metrics(waiting_requests, kv_usage, kv_capacity_blocks)
        with self._lock:
            self._journal.log(
                "update_worker_metrics",
                w,
                waiting_requests=wr,
                kv_usage=ku,
                kv_capacity_blocks=cap,
            )
            if not self._members.set_metrics(w, wr, ku):
                self._stats["unknown_workers"] += 1
                return False
            if cap is not None:
                self._trust.set_capacity(w, cap)
                self._pd.set_capacity(w, cap)
                if self._predicted is not None:
                    self._predicted.set_capacity(w, cap)
            return True

    # -- events ------------------------------------------------------------------

    def apply_event(self, worker: int, event: KVEvent) -> str:
        """Apply one of ``worker``'s KV events: the way to feed events you receive yourself.

        ``event`` is a :class:`kvroute.events.BlockStored`,
        :class:`~kvroute.events.BlockRemoved` or
        :class:`~kvroute.events.AllBlocksCleared` (what
        :func:`kvroute.events.decode` makes of an engine's payload; see
        docs/events.md for their fields). A stored event's blocks are keyed by
        this router's hash of its ``token_ids`` (chained from its parent's key,
        found through the parent's engine hash), its engine hashes kept as the
        handles later removals name: requests then match whatever hash
        algorithm or seed the engine runs. One
        :class:`kvroute.events.EventApplier` per router does the work
        (statuses, salts, the checks it logs); calls from several threads are
        serialised.

        >>> from kvroute import Request, Router
        >>> from kvroute.events import BlockRemoved, BlockStored
        >>> r = Router(block_size=4, workers=[0, 1])
        >>> r.apply_event(1, BlockStored(block_hashes=(901, 902), parent_block_hash=None,
        ...                              token_ids=tuple(range(8)), block_size=4))
        'ok'
        >>> r.route(Request("a", tokens=list(range(10)))).matched_blocks
        2
        >>> r.apply_event(1, BlockRemoved(block_hashes=(902,)))
        'ok'

        :returns: its status: ``ok``, ``unknown_block`` (a removal of a block
            the worker does not hold, or a store whose parent it does not
            hold: skipped), ``cleared``, ``mismatch`` (the event's block size
            is not the router's: skipped, logged), ``ignored`` (another
            KV-cache group, or a worker the router does not know: removed, or
            never added; its blocks would outlive it) or ``rejected`` (values
            the index refuses).
        :raises TypeError: ``event`` is not a KV event.
        """
        # the event layer's own applier: keys, salts, parents, its checks
        from .events.apply import EventApplier
        from .events.types import AllBlocksCleared, BlockRemoved, BlockStored

        if not isinstance(event, (BlockStored, BlockRemoved, AllBlocksCleared)):
            raise TypeError(
                "apply_event() takes a kvroute.events BlockStored, BlockRemoved or "
                f"AllBlocksCleared, not {type(event).__name__}"
            )
        with self._applier_lock:
            if self._applier is None:
                self._applier = EventApplier(self)
            return self._applier.apply(worker, event)

    def apply_stored(
        self,
        worker: int,
        keys: HashesLike,
        parent: int | None = None,
        *,
        tier: str = "device",
        engine_hashes: HashesLike | None = None,
    ) -> int:
        """Record that ``worker`` holds the blocks with these kvroute keys, in prefix order.

        ``keys`` are kvroute's routing keys, the ones :meth:`route` computes:
        ``kvroute_block_hashes(token_ids, block_size)`` (or this router's
        ``hashing``), continuing from ``parent``'s key. **Not the engine's
        block hashes** that a KV event carries: those never match a request.
        To apply an engine's event, use :meth:`apply_event`. Same parameters
        and errors as ``BlockIndex.store``; applied under the router's lock,
        so it is ordered with routing decisions. A worker the router does not
        know (never added, or removed: a late event) is refused, counted in
        ``stats()["refused_events"]``: its blocks would outlive it, and come
        back with a new worker of the same id.

        :param keys: the blocks' kvroute keys (uint64s).
        :param parent: the kvroute key of the block before the first, or None
            for a prompt's start.
        :param tier: ``"device"``, ``"host"`` or ``"disk"``.
        :param engine_hashes: the engine's hashes of the same blocks, kept as
            handles for later removals by engine hash.
        :returns: the operation's sequence number.
        :raises ValueError: ``engine_hashes`` equal ``keys``: the engine's
            hashes were given as keys; and as ``BlockIndex.store``.
        """
        keys = as_u64_array(keys)
        w = check_u64(worker, "worker")
        if engine_hashes is not None:
            engine_hashes = as_u64_array(engine_hashes, "engine_hashes")
            # one comparison before the whole arrays: this runs for every stored event
            if len(keys) and engine_hashes[0] == keys[0] and np.array_equal(engine_hashes, keys):
                raise ValueError(
                    "apply_stored(): keys equal engine_hashes. keys are kvroute keys "
                    "(kvroute_block_hashes(token_ids, block_size)), not the engine's block "
                    "hashes; Router.apply_event(worker, event) keys an engine's event itself"
                )
        with self._lock:
            if w not in self._members:
                self._stats["refused_events"] += 1
            else:
                if parent is None and len(keys) and self._fresh is not None:
                    started = self._fresh.started(int(keys[0]))
                    if started is not None and (warning := self._keycheck.observe(started)):
                        logger.warning(warning)
                self._store_locked(w, keys, parent, tier, engine_hashes)
            return self._journal.log(
                "apply_stored", worker, keys, parent, tier=tier, engine_hashes=engine_hashes
            )

    def _store_locked(
        self,
        w: int,
        keys: npt.NDArray[np.uint64],
        parent: int | None,
        tier: str,
        engine_hashes: HashesLike | None,
    ) -> None:
        self._trust.store(self.index, w, keys, parent, tier, engine_hashes)
        if tier != "device":
            self._tiered = True

    def apply_removed(
        self, worker: int, hashes: HashesLike, *, engine: bool = False, tier: str = "device"
    ) -> int:
        """Apply a "blocks removed" event to :attr:`index`; returns how many were unknown.

        Same parameters and errors as ``BlockIndex.remove``. A worker the
        router does not know is refused (``stats()["refused_events"]``; 0 is
        returned). Each engine hash the index cannot resolve may drop one of
        the worker's inferred blocks (see :mod:`kvroute.trust`): it may have
        been one.
        """
        keys = as_u64_array(hashes)
        w = check_u64(worker, "worker")
        with self._lock:
            self._journal.log("apply_removed", worker, keys, engine=engine, tier=tier)
            if w not in self._members:
                self._stats["refused_events"] += 1
                return 0
            unknown: int = self.index.remove(w, keys, engine=engine, tier=tier)
            if unknown and engine:
                self._trust.unresolved_removal(self.index, w, unknown)
            return unknown

    def apply_cleared(self, worker: int) -> int:
        """Apply an "all blocks cleared" event: :meth:`worker_cache_reset` (``"cleared"``).

        :returns: the number of index blocks dropped (0 for a worker the
            router does not know: refused, counted).
        """
        w = check_u64(worker, "worker")
        notes: list[tuple[int, str, str]] = []
        with self._lock:
            self._journal.log("apply_cleared", worker)
            dropped = self._reset_locked(w, "cleared", notes)
        self._listeners.notify(notes)
        return dropped

    # -- what the router believes about a worker's cache ------------------------------

    def worker_cache_reset(self, worker: int, reason: str = "reset") -> int:
        """The worker's cache is gone: drop every record of it the router keeps, at once.

        The one call for it: its blocks in the index, the fresh decisions and
        predicted residency that name it, the session pins and warm-up plans
        that would send requests to it for their cache, and its degraded
        state (an empty cache and the events from now on are the whole truth
        again). The event layer calls it (through :meth:`apply_cleared`) for
        an engine's ``AllBlocksCleared`` and for an engine restart; anything
        else that learns of a reset (a replica sync, an operator) calls it
        too, and every listener (:meth:`add_listener`) hears ``"reset"``.
        Requests in flight on the worker are left to their lifecycle.

        >>> r = Router(block_size=4, workers=[0, 1], clock=lambda: 0.0)
        >>> seq = r.apply_stored(1, [7, 8])
        >>> r.worker_cache_reset(1, "restart"), r.index.match([7, 8])
        (2, {})

        :param reason: what happened, for listeners and logs.
        :returns: the number of index blocks dropped (0 for an unknown worker:
            refused, counted in ``stats()["refused_events"]``).
        """
        w = check_u64(worker, "worker")
        notes: list[tuple[int, str, str]] = []
        with self._lock:
            self._journal.log("worker_cache_reset", worker, reason)
            dropped = self._reset_locked(w, reason, notes)
        self._listeners.notify(notes)
        return dropped

    def _reset_locked(self, w: int, reason: str, notes: list[tuple[int, str, str]]) -> int:
        if w not in self._members:
            self._stats["refused_events"] += 1
            return 0
        dropped: int = self.index.clear(w)
        if self._fresh is not None:
            self._fresh.remove_worker(w)
        if self._predicted is not None:
            self._predicted.clear(w)
        self._pins.drop_worker(w)
        self._warmups.drop_worker(w)
        if self._trust.reset(w):
            self._degraded = self._trust.any_degraded
            logger.info("worker %d: cache reset (%s); its index is trusted again", w, reason)
        self._stats["cache_resets"] += 1
        notes.append((w, "reset", reason))
        return dropped

    def degrade_worker(self, worker: int, cause: str, reason: str) -> int:
        """Stop trusting the index about ``worker``: route it on its own decisions meanwhile.

        What the event layer calls when it knows the worker's index is wrong
        (``cause="events_lost"``: batches lost that no replay brought back;
        ``"mismatch"``: its events cannot be indexed), and what
        :meth:`observe` calls when the drift detector finds it
        (``"drift_over"``, ``"drift_under"``). Its index blocks are dropped
        (but for ``"mismatch"``: nothing was indexed), its next decisions are
        remembered as predicted residency, its orphaned stores are anchored
        to the prompts it is sent (:meth:`apply_anchored`), and it shows as
        degraded in :meth:`worker_states`, logged once and heard by every
        listener (``"degraded"``). See :mod:`kvroute.trust`. It is trusted
        again when the drift detector finds its index agreeing with the
        engine over a full window, or when its cache is reset. No-op without
        KV events (``kv_events=False``: there is no index to distrust).

        :param cause: one of :data:`kvroute.trust.CAUSES`.
        :param reason: what happened, for listeners and logs.
        :returns: the number of index blocks dropped (0 for an unknown worker).
        :raises ValueError: an unknown cause.
        """
        w = check_u64(worker, "worker")
        notes: list[tuple[int, str, str]] = []
        with self._lock:
            self._journal.log("degrade_worker", worker, cause, reason)
            if w not in self._members:
                self._stats["refused_events"] += 1
                return 0
            dropped = self._degrade_locked(w, cause, reason, notes)
        self._listeners.notify(notes)
        return dropped

    def _degrade_locked(
        self, w: int, cause: str, reason: str, notes: list[tuple[int, str, str]]
    ) -> int:
        if not self.kv_events:
            return 0
        new = self._trust.degrade(w, cause, reason, self._clock())
        dropped = 0
        if cause != "mismatch":
            dropped = self.index.clear(w)
            self._trust.inferred(w).clear()
        self._degraded = True
        if new:
            self._stats["degradations"] += 1
            # a mismatch was already warned about, at length, by the event layer
            logger.log(
                logging.INFO if cause == "mismatch" else logging.WARNING,
                "worker %d: its KV index is not trusted (%s: %s); it is routed on the "
                "router's own decisions until its index agrees with the engine again",
                w, cause, reason,
            )  # fmt: skip
            notes.append((w, "degraded", f"{cause}: {reason}"))
        return dropped

    def observe(self, decision: Decision, reported_cached_tokens: int) -> str | None:
        """The engine's report for a routed request: how many prompt tokens it had cached.

        The proxy calls it for every answer whose usage carries the worker's
        cached tokens. The drift detector (:mod:`kvroute.trust`) compares it
        with what the router predicted; a worker whose predictions are off
        persistently is degraded (:meth:`degrade_worker`), a degraded one that
        agrees again is trusted. No-op without KV events.

        >>> r = Router(block_size=4, workers=[0], clock=lambda: 0.0, drift_window=2)
        >>> seq = r.apply_stored(0, [1, 2, 3, 4])
        >>> changes = []
        >>> for i in range(2):
        ...     d = r.route(Request(i, block_hashes=[1, 2, 3, 4]))
        ...     changes.append(r.observe(d, 0))    # the engine had nothing
        >>> changes, r.worker_states()[0].state
        ([None, 'drift_over'], 'degraded')

        :param decision: the request's decision (from :meth:`route`).
        :param reported_cached_tokens: prompt tokens the engine served from its cache.
        :returns: the change it made: ``"drift_over"`` / ``"drift_under"`` (the
            worker is now degraded), ``"trusted"``, or None.
        :raises TypeError, ValueError: not a Decision, or a negative count.
        """
        if not isinstance(decision, Decision):
            raise TypeError(f"observe() takes a Decision, not {type(decision).__name__}")
        if isinstance(reported_cached_tokens, bool) or not isinstance(
            reported_cached_tokens, (int, np.integer)
        ):
            raise TypeError("reported_cached_tokens must be an int")
        reported = int(reported_cached_tokens)
        if reported < 0:
            raise ValueError(f"reported_cached_tokens must be >= 0, got {reported}")
        if not self.kv_events:
            return None
        w = decision.worker
        notes: list[tuple[int, str, str]] = []
        with self._lock:
            self._journal.log("observe", decision, reported)
            if w not in self._members:
                return None
            verdict = self._trust.judge(
                w, decision.request_id, decision.predicted_cached_tokens,
                min(reported, decision.prompt_tokens),
            )  # fmt: skip
            if verdict is None:
                return None
            change, why = verdict
            if change == "trusted":
                self._degraded = self._trust.any_degraded
                logger.info("worker %d: its KV index agrees with the engine again (%s)", w, why)
                notes.append((w, "trusted", why))
            else:
                self._degrade_locked(w, change, why, notes)
        self._listeners.notify(notes)
        return change

    def worker_states(self) -> dict[int, WorkerState]:
        """Per known worker: whether its index is trusted, and its drift figures."""
        with self._lock:
            return {w: self._trust.state(w) for w in self._members.workers()}

    def is_degraded(self, worker: int) -> bool:
        """Whether ``worker``'s index is degraded (no lock: for the event path's checks)."""
        return worker in self._trust.degraded

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(worker, change, reason)`` after each change of a worker's cache state.

        ``change`` is ``"reset"`` (:meth:`worker_cache_reset`: everything
        about its cache was dropped), ``"degraded"`` or ``"trusted"``. It runs
        on the thread that made the change, after the router's lock is
        released (it may call the router); an exception it raises is logged
        and swallowed.
        """
        self._listeners.add(listener)

    def recent_prompts(self, worker: int) -> list[RecentPrompt]:
        """The prompts routed to ``worker`` while it is degraded, oldest first (for anchoring)."""
        with self._lock:
            return self._trust.recent(worker)

    def apply_anchored(
        self,
        worker: int,
        ancestors: HashesLike,
        parent_engine_hash: int | None,
        hashes: HashesLike,
        *,
        tier: str = "device",
        engine_hashes: HashesLike | None = None,
        exact: bool = False,
    ) -> int:
        """Apply a stored event whose parent the index lost, anchored to a prompt's prefix.

        ``ancestors`` are the keys of the blocks before the event's (the
        prompt it continues, found by :func:`kvroute.trust.find_anchor`): the
        engine holds them, since it stored a continuation. Those the worker is
        not known to hold are stored first; then the event's ``hashes``,
        chained from the last ancestor. With ``exact`` (an index keyed on the
        engine's hashes, where a key is its own handle) the ancestors are
        exact. Otherwise the last ancestor gets ``parent_engine_hash`` as its
        handle and the others are *inferred* (see :mod:`kvroute.trust`).

        :returns: the number of ancestors stored.
        """
        anc = as_u64_array(ancestors, "ancestors")
        keys = as_u64_array(hashes)
        w = check_u64(worker, "worker")
        with self._lock:
            self._journal.log(
                "apply_anchored", worker, anc, parent_engine_hash, keys,
                tier=tier, engine_hashes=engine_hashes, exact=exact,
            )  # fmt: skip
            if w not in self._members:
                self._stats["refused_events"] += 1
                return 0
            stored = self._trust.anchor(self.index, w, anc, parent_engine_hash, tier, exact)
            parent = int(anc[-1]) if len(anc) else None
            self._store_locked(w, keys, parent, tier, engine_hashes)
            return stored

    # -- routing -----------------------------------------------------------------

    @property
    def hashing(self) -> HashFn:
        """The function that turns a prompt's tokens into this router's block keys.

        :func:`kvroute.hashing.kvroute_block_hashes` unless ``hashing=`` was
        given; the event layer keys stored blocks with the same function, so
        requests and events always agree. With
        ``EventApplier(key_on="engine")`` it must reproduce the engine's own
        hashes (the applier checks every stored event against it); one that
        cannot continue a chain from a parent's key raises
        :class:`NotImplementedError` when ``parent`` is not None.
        """
        if self._hashing is None:
            try:
                mod = importlib.import_module("kvroute.hashing")
            except ImportError:
                raise RuntimeError(
                    "kvroute.hashing is not available: pass hashing= to Router, "
                    "or give requests block_hashes"
                ) from None
            self._hashing = mod.kvroute_block_hashes
        assert self._hashing is not None
        return self._hashing

    def _hashes(self, request: Request) -> npt.NDArray[np.uint64]:
        if request.block_hashes is not None:
            return request.block_hashes
        assert request.tokens is not None
        return as_u64_array(
            self.hashing(
                request.tokens,
                self.block_size,
                lora_name=request.lora_name,
                cache_namespace=request.cache_salt,
                parent=None,
            )
        )

    def route(self, request: Request, *, exclude: Iterable[int] = ()) -> Decision:
        """Choose a worker for ``request`` and start tracking it.

        Runtime complexity: O(workers) numpy work plus one index match over
        the prompt's matched prefix; hashing (if tokens are given) runs
        outside the lock.

        :param request: the request; its ``request_id`` must not be in flight.
        :param exclude: workers this request must not go to (e.g. the ones a
            proxy's earlier attempts at it failed on); unknown ids are ignored.
        :returns: the decision (worker, matches, predicted cached tokens, costs).
        :raises NoWorkerAvailable: no healthy worker outside ``exclude``.
        :raises ValueError: the request id is already in flight.
        :raises TypeError: ``request`` is not a :class:`Request`.
        """
        if not isinstance(request, Request):
            raise TypeError(f"route() takes a Request, not {type(request).__name__}")
        hashes = request.block_hashes
        if hashes is None:
            hashes = self._hashes(request)
        prompt = request.num_prompt_tokens(self.block_size)
        if type(exclude) is tuple and not exclude:  # the default: nothing excluded
            with self._lock:
                return self._route_locked(request, hashes, prompt)
        skip = frozenset(check_u64(w, "exclude") for w in exclude)
        with self._lock:
            return self._route_locked(request, hashes, prompt, skip)

    def _maintain(self, now: float) -> None:
        if now >= self._remote.next_expiry:
            self._remote.expire(now)
        if now >= self._next_sweep:
            self._next_sweep = now + self.config.sweep_interval
            self._sweep_locked(now)
        if self._predicted is not None:
            self._predicted.expire(now)

    def _sweep_locked(self, now: float) -> int:
        lt = self._load
        stale = lt.stale(now, self.config.request_timeout)
        for rid in stale:
            lt.finish(rid)
        self._stats["stale_requests"] += len(stale)
        self._pins.purge(now)
        self._warmups.purge(now)
        if self._fresh is not None:
            self._fresh.purge(now)
        if self._degraded:
            self._trust.expire(now)
        return len(stale)

    def sweep(self) -> int:
        """Drop requests with no lifecycle event for ``request_timeout``; return how many.

        ``route()`` runs it every ``sweep_interval`` seconds; a proxy may call it too.
        It also drops expired pins, warm-up plans and predictions.
        Runtime complexity: O(requests in flight).
        """
        with self._lock:
            self._journal.log("sweep")
            now = self._clock()
            n = self._sweep_locked(now)
            if self._predicted is not None:
                self._predicted.expire(now)
            return n

    def _match(self, hashes: npt.NDArray[np.uint64], n: int) -> npt.NDArray[np.uint32]:
        """Per position, the matched blocks (uint32): ``(3, n)`` by tier when tiers count.

        From the index with KV events (per tier when it holds other tiers and
        the policy weighs them), else from the predicted residency.
        """
        ids = self._load.ids_frozen
        if not self.kv_events:
            assert self._predicted is not None
            return self._predicted.match_array(hashes, ids)
        if not (self._tiered and self.policy.uses_tiers):
            out: npt.NDArray[np.uint32] = self.index.match_array(hashes, ids)
            return out
        tiers = getattr(self.index, "match_tiers_array", None)
        if tiers is not None:
            out = tiers(hashes, ids)
            return out
        # an index of the user's without the array form: its dict, laid out by position
        out = np.zeros((3, n), np.uint32)
        pos = self._load.pos
        for w, counts in self.index.match_tiers(hashes).items():
            p = pos.get(w)
            if p is not None:
                out[:, p] = counts
        return out

    def _overlap(self, hashes: npt.NDArray[np.uint64], n: int, now: float) -> tuple[Any, Any, Any]:
        """Per position: matched blocks (any tier), of which host, of which disk (or None)."""
        host = disk = None
        if len(hashes) == 0 or n == 0:
            return np.zeros(n, np.int64), host, disk
        m = self._match(hashes, n)
        if self._degraded:
            m = self._trust.widen(m, hashes, self._load.ids_frozen, self._load.pos)
        if m.ndim == 1:
            ov = m.astype(np.int64)
        else:
            device, host, disk = m.astype(np.int64)
            ov = device + host + disk
            if not ov.any():
                host = disk = None
        if self._fresh is not None:
            # predicted residency counts as device: raising ov zeroes host / disk
            self._fresh.overlay(
                hashes, now, ov, self._load.pos, skip_known=host is None, host=host, disk=disk
            )
        return ov, host, disk

    def _zeros(self, n: int) -> npt.NDArray[np.int64]:
        z = self._zero_cache
        if len(z) != n:
            z = self._zero_cache = np.zeros(n, np.int64)
            z.flags.writeable = False
        return z

    def _pinned(self, request: Request, now: float, cand: Any, n: int) -> int | None:
        """The position of the session's pinned worker if it may take the request."""
        if request.session_id is None:
            return None
        worker = self._pins.get(request.session_id, now)
        if worker is None:
            return None
        lt = self._load
        p = lt.pos.get(worker)
        if p is None:
            self._pins.drop(request.session_id)
            return None
        if not lt.healthy[p] or self._busy_mask(n)[p]:
            return None
        load = lt.active[:n] + lt.waiting[:n]
        if cand is not None:
            load = load[cand]
        return p if self._pins.admits(float(lt.active[p] + lt.waiting[p]), load) else None

    def _route_locked(
        self,
        request: Request,
        hashes: npt.NDArray[np.uint64],
        prompt: int,
        exclude: frozenset[int] = _NO_WORKERS,
    ) -> Decision:
        now = self._clock()
        if now >= self._next_sweep or self._predicted is not None or (
            now >= self._remote.next_expiry
        ):
            self._maintain(now)
        lt = self._load
        rid = request.request_id
        if rid in lt.requests:
            raise ValueError(f"request {rid!r} is already in flight")
        if self._split:
            return self._route_split(request, hashes, prompt, exclude, now)
        n = lt.n
        cand: npt.NDArray[np.intp] | None = None
        skip = [p for p in map(lt.pos.get, exclude) if p is not None] if exclude else None
        if skip or not self._members.all_healthy:
            skip = skip or []
            ok = lt.healthy[:n].copy()
            ok[skip] = False
            cand = np.flatnonzero(ok)
            if len(cand) == 0:
                why = " outside the excluded ones" if skip else ""
                raise NoWorkerAvailable(f"no healthy worker{why} among {n} for request {rid!r}")
        elif n == 0:
            raise NoWorkerAvailable(f"no worker has been added; cannot route request {rid!r}")
        bs = self.block_size
        out_blocks = 0.0
        if request.expected_output_tokens:
            out_blocks = float(math.ceil(request.expected_output_tokens / bs))
        # only a session has a pin (a call is measurable on the common path)
        pinned = None if request.session_id is None else self._pinned(request, now, cand, n)
        if pinned is not None and int(lt.worker_ids[pinned]) in exclude:
            pinned = None
        # a policy's compiled path (policies.base.RouteStep) takes the common case
        step = getattr(self.policy, "route_step", None)
        if pinned is not None or cand is not None:
            step = None
        costs: Any
        breakpoints = request.cache_breakpoints() if request.cache_control is not None else ()
        if step is None:
            ov, host, disk = self._overlap(hashes, n, now)
            new = lt.new_blocks(hashes)
            if out_blocks:
                new += out_blocks
            i, p, cw, co, costs, name = self._choose(
                request, hashes, prompt, cand, pinned, ov, host, disk, new
            )
            worker = int(lt.worker_ids[p])
            matched = int(ov[p])
            cached = min(matched * bs, prompt)
            self._start(
                request, hashes, prompt, now, breakpoints, rid, p, prompt - cached, out_blocks
            )
        else:
            # the common path: after the match, one compiled call chooses and records the
            # request (load arrays, prompts in flight, request table, fresh decisions)
            if self.kv_events and not (self._tiered and self.policy.uses_tiers):
                match = self.index.match_array(hashes, lt.ids_frozen)
            else:
                match = self._match(hashes, n)
            if self._degraded:
                match = self._trust.widen(match, hashes, lt.ids_frozen, lt.pos)
            busy = None if self._members.busy is None else self._busy_mask(n)
            payload = _Payload.of(request, hashes)
            p, worker, matched, ov, costs, payload.entry = step(
                lt.arrays, self._fresh, rid, payload, match, hashes, now, prompt, bs, out_blocks,
                busy,
            )  # fmt: skip
            cached = min(matched * bs, prompt)
            self._record(request, payload, p, worker, hashes, prompt, now, breakpoints)
            i, cw, co, name = p, lt.ids_frozen, ov, self.policy.name
        seq = self._routed(request, worker, breakpoints, now, exclude)
        return Decision(rid, worker, name, matched, cached, prompt, seq, cw, co, costs, i)

    def _routed(
        self,
        request: Request,
        worker: int,
        breakpoints: tuple[CacheControl, ...],
        now: float,
        exclude: frozenset[int],
    ) -> int:
        """The end of every route: pin the session to its cache breakpoints, count, journal."""
        if breakpoints and request.session_id is not None:
            self._pins.pin(request.session_id, worker, now + max(b.ttl for b in breakpoints))
        self._stats["routed"] += 1
        # exclude is journalled only when given, so plain journals keep their shape
        if exclude:
            return self._journal.log("route", request, exclude=exclude)
        return self._journal.log("route", request)

    def _start(
        self,
        request: Request,
        hashes: npt.NDArray[np.uint64],
        prompt: int,
        now: float,
        breakpoints: tuple[CacheControl, ...],
        key: RequestKey,
        p: int,
        prefill_tokens: float,
        decode_blocks: float,
        prefilled_on: int | None = None,
    ) -> None:
        """Start one leg of a routed request on the worker at ``p`` (the compiled step's work).

        Its load, its fresh decision, then :meth:`_record`. ``prefilled_on`` is
        a decode leg's prefill worker.
        """
        w = int(self._load.worker_ids[p])
        payload = _Payload.of(request, hashes, prefill_worker=prefilled_on)
        if self._fresh is not None:
            payload.entry = self._fresh.record(w, hashes, now)
        self._record(request, payload, p, w, hashes, prompt, now, breakpoints)
        self._load.start(
            key, w, prefill_tokens=prefill_tokens, decode_blocks=decode_blocks, now=now,
            hashes=hashes, payload=payload,
        )  # fmt: skip

    def _record(
        self,
        request: Request,
        payload: _Payload,
        p: int,
        w: int,
        hashes: npt.NDArray[np.uint64],
        prompt: int,
        now: float,
        breakpoints: tuple[CacheControl, ...],
    ) -> None:
        """What every routed leg leaves beside its load, in its payload and elsewhere.

        Its predicted residency (event-free), its record in a degraded worker's
        fallback, and the decision shared with other replicas. A decode leg
        (``payload.prefill_worker`` set) is not judged by the drift detector
        (the cached tokens reported are its prefill worker's) and does not pin
        the session on other replicas (the session follows its prefill worker).
        """
        if self._predicted is not None and len(hashes):
            payload.entry = self._predict(self._predicted, w, hashes, now, breakpoints)
        decode_leg = payload.prefill_worker is not None
        if self._degraded and not decode_leg and w in self._trust.degraded:
            payload.fallback = self._routed_degraded(request, w, p, hashes, prompt, now)
        if self._remote.sharing:
            session = None if decode_leg else request.session_id
            self._remote.routed(now, w, hashes, breakpoints, session)

    def _choose(
        self,
        request: Request,
        hashes: npt.NDArray[np.uint64],
        prompt: int,
        cand: npt.NDArray[np.intp] | None,
        pinned: int | None,
        ov: npt.NDArray[np.int64],
        host: Any,
        disk: Any,
        new: npt.NDArray[np.float64],
    ) -> tuple[int, int, Any, Any, Any, str]:
        """The policy's choice among the candidates (every position when ``cand`` is None).

        :returns: ``(index among the candidates, position, candidates' ids, their
            overlaps, costs, policy name)``; a session pin decides when ``pinned``
            is a position.
        """
        lt = self._load
        n = lt.n
        bs = self.block_size
        tiered = host is not None and disk is not None
        if host is None or disk is None:
            host = disk = self._zeros(n)
        if pinned is not None:
            p = pinned
            self._stats["pinned_routes"] += 1
            if cand is None:
                cw, co = lt.ids_frozen, ov
            else:
                cw, co = lt.worker_ids[cand], ov[cand]
            i = int(np.flatnonzero(cw == lt.worker_ids[p])[0])
            return i, p, cw, co, {}, "pin"
        busy = self._busy_mask(n)
        if cand is None:
            # every array is already one entry per position: no slicing
            pt, db, act, wt, kv = lt.views
            c = Candidates(lt.ids_frozen, ov, host, disk, pt, db, new, act, wt, kv, busy, tiered)
        else:
            c = Candidates(
                lt.worker_ids[cand],
                ov[cand],
                host[cand],
                disk[cand],
                lt.prefill_tokens[cand],
                lt.decode_blocks[cand],
                new[cand],
                lt.active[cand],
                lt.waiting[cand],
                lt.kv_usage[cand],
                busy[cand],
                tiered,
            )
        key: int | None
        if request.session_id is not None:
            key = xxhash.xxh3_64_intdigest(request.session_id.encode())
        else:
            key = int(hashes[0]) if len(hashes) else None
        feats = Features(
            prompt, len(hashes), bs, key, request.expected_output_tokens, request.priority, hashes
        )
        choice = self.policy.choose(c, feats)
        i = int(choice.index)
        nc = n if cand is None else len(cand)
        if not 0 <= i < nc:
            raise RuntimeError(f"policy {self.policy.name!r} chose position {i} of {nc} candidates")
        p = i if cand is None else int(cand[i])
        return i, p, c.workers, c.overlap, choice.costs, self.policy.name

    def _route_split(
        self,
        request: Request,
        hashes: npt.NDArray[np.uint64],
        prompt: int,
        exclude: frozenset[int],
        now: float,
    ) -> Decision:
        """route() in a disaggregated fleet: the decode worker, then where to prefill.

        The decode part chooses the decode worker; if the conditional rule keeps
        the prefill there, it is routed like any request to that worker; else the
        policy chooses among the prefill workers, and the request's decode leg is
        counted on the decode worker under :func:`~kvroute.disagg.decode_key`.
        """
        lt, pd, rid = self._load, self._pd, request.request_id
        if decode_key(rid) in lt.requests:
            raise ValueError(f"request {rid!r} is already in flight")
        n = lt.n
        ok = lt.healthy[:n].copy()
        ok[[p for p in map(lt.pos.get, exclude) if p is not None]] = False
        bs = self.block_size
        out_blocks = 0.0
        if request.expected_output_tokens:
            out_blocks = float(math.ceil(request.expected_output_tokens / bs))
        ov, host, disk = self._overlap(hashes, n, now)
        new = lt.new_blocks(hashes)
        if out_blocks:
            new += out_blocks
        dec, cand = pd.plan(lt, ok, ov, new, self._busy_mask(n), prompt, bs)
        if dec is None:
            raise NoWorkerAvailable(f"no healthy decode worker among {n} for request {rid!r}")
        if cand is None:
            # the conditional rule (or no prefill worker left, where local prefill is allowed)
            i, p, cw, co, costs = dec.index, dec.position, dec.workers, dec.overlap, dec.costs
            name = "local"
        else:
            if len(cand) == 0:
                raise NoWorkerAvailable(f"no healthy prefill worker among {n} for request {rid!r}")
            pinned = None if request.session_id is None else self._pinned(request, now, cand, n)
            if pinned is not None and pinned not in cand:
                pinned = None
            i, p, cw, co, costs, name = self._choose(
                request, hashes, prompt, cand, pinned, ov, host, disk, new
            )
        worker = int(lt.worker_ids[p])
        remote = p != dec.position
        matched = int(ov[p])
        cached = min(matched * bs, prompt)
        breakpoints = request.cache_breakpoints()
        legs: list[tuple[RequestKey, int, float, float, int | None]] = [
            (rid, p, prompt - cached, 0.0 if remote else out_blocks, None)
        ]
        if remote:
            legs.append((decode_key(rid), dec.position, 0.0, out_blocks, worker))
            pd.remote += 1
        else:
            pd.local += 1
        for key, pos, prefill_tokens, blocks, prefilled_on in legs:
            self._start(
                request, hashes, prompt, now, breakpoints, key, pos, prefill_tokens, blocks,
                prefilled_on,
            )  # fmt: skip
        seq = self._routed(request, worker, breakpoints, now, exclude)
        base = Decision(rid, worker, name, matched, cached, prompt, seq, cw, co, costs, i)
        return DisaggDecision(base, dec, remote)

    def _routed_degraded(
        self,
        request: Request,
        worker: int,
        p: int,
        hashes: npt.NDArray[np.uint64],
        prompt: int,
        now: float,
    ) -> Any:
        """Record a request routed to a degraded worker (fallback, anchors, its index figure)."""
        index_tokens = 0
        if len(hashes):
            index_tokens = min(self._trust.index_blocks(p) * self.block_size, prompt)
        return self._trust.routed(
            worker,
            request.request_id,
            hashes,
            index_tokens,
            now,
            tokens=request.tokens,
            lora_name=request.lora_name,
            cache_salt=request.cache_salt,
        )

    def _predict(
        self,
        predicted: PredictedResidency,
        worker: int,
        hashes: npt.NDArray[np.uint64],
        now: float,
        breakpoints: tuple[CacheControl, ...],
    ) -> tuple[int, ...]:
        """Record a routed prompt as predicted residency; return the entry ids.

        The prompt lives for the default TTL; each cache breakpoint's prefix
        for its own TTL when that is longer. The whole prompt is recorded
        first, so a capacity bound trims its tail before the pinned prefixes.
        """
        segments = cache_segments(breakpoints, len(hashes), self.block_size)
        return predicted.record_prompt(worker, hashes, now, segments)

    # -- replicas (kvroute.remote) ---------------------------------------------------

    def share(self, outbox: Callable[[float, Routed], None] | None) -> None:
        """Hand each later decision to ``outbox(now, routed)`` for other replicas (None: stop).

        Called under the router's lock, on the routing thread: it must only
        queue the record (:mod:`kvroute.fleet.sync` appends to a deque).
        """
        with self._lock:
            self._remote.share(outbox)

    def local_load(self) -> ReplicaLoad:
        """This router's own load per worker, without what other replicas reported."""
        with self._lock:
            return ReplicaLoad(*self._load.local())

    def apply_remote(self, update: RemoteUpdate | None) -> None:
        """Apply another replica's load and decisions (see :mod:`kvroute.remote`).

        Either way (None: nothing to apply), the load of replicas not heard
        from within their TTL stops counting.
        Runtime complexity: O(workers + the decisions' blocks).
        """
        with self._lock:
            now = self._clock()
            if update is not None:
                self._remote.apply(update, now)
            self._remote.expire(now)

    def drop_remote(self, replica: str) -> bool:
        """Stop counting ``replica``'s load now (it stopped). False if it was not counted."""
        with self._lock:
            return self._remote.drop(replica)

    def remote_load(self) -> dict[str, Any]:
        """The other replicas as heard: ``{"replicas": {id: (requests, expiry)},
        "active": {worker: requests}}``."""
        with self._lock:
            return {"replicas": self._remote.replicas(), "active": self._remote.remote_active()}

    # -- lifecycle ---------------------------------------------------------------

    def _unknown(self) -> bool:
        self._stats["unknown_request_ids"] += 1
        return False

    def first_token(self, request_id: str | int) -> bool:
        """The request's first token arrived: its prompt is no longer queued prefill work.

        :returns: False (counted in ``stats()["unknown_request_ids"]``) if unknown.
        """
        with self._lock:
            self._journal.log("first_token", request_id)
            now = self._clock()
            found = self._load.first_token(request_id, now)
            if self._pd_used:  # the decode leg: seen now (the stale sweep reads it)
                found = self._load.first_token(decode_key(request_id), now) or found
            return found or self._unknown()

    def prefill_done(self, request_id: str | int) -> bool:
        """A remotely prefilled request's prefill leg ended: release the prefill worker.

        In a disaggregated fleet the prefill worker's part ends when it answers
        (vLLM: its ``max_tokens=1`` response; SGLang: its leg of the request),
        while the decode worker's goes on until :meth:`finished`.

        :returns: False if the request has no prefill leg in flight (unknown, or
            prefilled on its decode worker); not counted as unknown.
        """
        with self._lock:
            self._journal.log("prefill_done", request_id)
            if not self._pd_used or decode_key(request_id) not in self._load.requests:
                return False
            return self._load.finish(request_id) is not None

    def finished(
        self,
        request_id: str | int,
        *,
        output_tokens: int | Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
    ) -> bool:
        """The request completed: drop its load; record a warm-up plan if it asked for one.

        :param output_tokens: the generated token ids (a sequence of ints),
            appended to the prompt in the warm-up plan of a request routed
            with ``speculative_prefill``; or just how many were generated (an
            int), when the ids are not at hand: the plan then holds the prompt
            alone (its ``tokens`` end where the prompt does), since what the
            reply's tokens were is unknown. The router's load does not depend
            on it. None: as a count.
        :returns: False (counted in ``stats()["unknown_request_ids"]``) if unknown.
        :raises TypeError: ``output_tokens`` is neither token ids nor a count.
        :raises ValueError: a negative count.
        """
        ids: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None
        if isinstance(output_tokens, (int, np.integer)) and not isinstance(output_tokens, bool):
            if output_tokens < 0:
                raise ValueError(f"output_tokens must be >= 0, got {output_tokens}")
        elif output_tokens is not None and (
            isinstance(output_tokens, (str, bytes))
            or not isinstance(output_tokens, (Sequence, np.ndarray))
        ):
            raise TypeError(
                "output_tokens must be a sequence of ints (the generated token ids) or an "
                f"int (how many), not {type(output_tokens).__name__}"
            )
        else:
            ids = output_tokens
        with self._lock:
            self._journal.log("finished", request_id, output_tokens=output_tokens)
            r = self._load.finish(request_id)
            if self._pd_used:
                r = self._load.finish(decode_key(request_id)) or r
            if r is None:
                return self._unknown()
            pl: _Payload = r.payload
            if pl.speculative and pl.session_id is not None:
                assert pl.hashes is not None
                # a disaggregated request warms its prefill worker, whose next turn it is
                worker = r.worker if pl.prefill_worker is None else pl.prefill_worker
                self._warmups.record(
                    pl.session_id, worker, pl.tokens, ids, pl.hashes, self._clock()
                )
            return True

    def failed(self, request_id: str | int) -> bool:
        """The request failed: drop its load and its predicted residency.

        :returns: False (counted in ``stats()["unknown_request_ids"]``) if unknown.
        """
        with self._lock:
            self._journal.log("failed", request_id)
            legs = [self._load.finish(request_id)]
            if self._pd_used:
                legs.append(self._load.finish(decode_key(request_id)))
            found = False
            for r in legs:
                if r is None:
                    continue
                found = True
                pl: _Payload = r.payload
                if pl.entry is not None and self._predicted is not None:
                    for entry in pl.entry:
                        self._predicted.forget(entry)
                elif self._fresh is not None:
                    self._fresh.forget(pl.entry)
                if pl.fallback is not None:
                    self._trust.forget(request_id, pl.fallback)
            return found or self._unknown()

    def warmup_plan(self, session_id: str) -> WarmupPlan | None:
        """Where to send a ``max_tokens=1`` prefill so the session's next turn is warm.

        Available after a request with ``speculative_prefill=True`` finished;
        returned once (the plan is consumed). None if there is no plan, its
        worker is gone or unhealthy, or it is older than
        :data:`WARMUP_PLAN_TTL` (the sweep drops those).
        """
        with self._lock:
            if session_id not in self._warmups:
                return None
            plan = self._warmups.take(session_id, self._clock())
            if plan is None or not self._members.is_healthy(plan.worker):
                return None
            return plan

    # -- admission ---------------------------------------------------------------

    def submit(self, request: Request) -> Decision | None:
        """Route ``request`` now, or queue it while every healthy worker is busy.

        Queued requests leave through :meth:`pop_ready`, by priority (lower
        first), then arrival (``admission="fcfs"``) or prompt + expected output
        length (``"sjf"``).

        :returns: the decision, or None if the request was queued.
        :raises NoWorkerAvailable, ValueError, TypeError: as :meth:`route`.
        """
        if not isinstance(request, Request):
            raise TypeError(f"submit() takes a Request, not {type(request).__name__}")
        hashes = self._hashes(request)
        prompt = request.num_prompt_tokens(self.block_size)
        with self._lock:
            rid = request.request_id
            if rid in self._queue or rid in self._load.requests:
                raise ValueError(f"request {rid!r} is already queued or in flight")
            if not self._queue and not self._members.saturated():
                return self._route_locked(request, hashes, prompt)
            self._queue.push(request, hashes, prompt)
            self._journal.log("queued", request)
            return None

    def pop_ready(self) -> list[Decision]:
        """Route queued requests, in admission order, while some worker is not busy."""
        out: list[Decision] = []
        with self._lock:
            while self._queue and not self._members.saturated():
                q = self._queue.pop()
                assert q is not None  # the queue is not empty
                out.append(self._route_locked(q.request, q.hashes, q.prompt))
        return out

    def cancel(self, request_id: str | int) -> bool:
        """Drop a queued request. False if it is not queued."""
        with self._lock:
            if not self._queue.cancel(request_id):
                return False
            self._journal.log("cancel", request_id)
            return True

    def _check(self) -> None:
        """Check the router's invariants (load aggregates, membership, predictions, queue)."""
        with self._lock:
            self._load._check()
            self._remote._check()
            self._members._check()
            self._pd.roles._check(self._load.pos)
            self._queue._check()
            if self._predicted is not None:
                self._predicted._check()
            self._trust._check()
            assert self._degraded == self._trust.any_degraded, "the degraded flag drifted"

    def __repr__(self) -> str:
        return (
            f"<Router policy={self.policy.name!r} workers={self._load.n} "
            f"in_flight={len(self._load.requests)} kv_events={self.kv_events}>"
        )
