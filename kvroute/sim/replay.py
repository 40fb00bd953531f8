"""The event-driven replay: workload -> dispatcher -> simulated engines, on a simulated clock.

One heap orders three kinds of events: an engine pass ending, a KV event
reaching the dispatcher (after the configured lag, unless lost) and, merged
from the sorted workload, a request arriving. The dispatcher sees simulated
time only, through the :class:`SimClock` it was built with, so the Router
under test runs exactly the code a proxy runs.

Dispatchers: :class:`RouterDispatcher` drives :class:`kvroute.router.Router`
through its public API (the policies under test). :class:`RoundRobinDispatcher`
exists only to calibrate the engine model against Dynamo's mocker and for
tests; :func:`unbounded_reuse` and :func:`pooled_lru_reuse` compute the two
bounds every report shows beside the policies.

A replay is deterministic: given a seed, :func:`make_dispatcher` seeds the
policy and :func:`replay` the event loss, each from its own stream
(:mod:`kvroute.sim.seeding`), and nothing depends on what ran before in the
process. The ``kvroute replay`` command line is :mod:`kvroute.sim.cli`.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..request import Request
from ..router import Router
from .engine import Engine, EngineConfig, PassResult
from .metrics import Records, summarize
from .seeding import derive_seed, policy_seed, takes_seed
from .workloads import SimRequest, fresh_key_at

__all__ = [
    "Dispatcher",
    "ReplayResult",
    "RoundRobinDispatcher",
    "RouterDispatcher",
    "SimClock",
    "make_dispatcher",
    "pooled_lru_reuse",
    "replay",
    "unbounded_reuse",
]


class SimClock:
    """Simulated time in seconds; call it to read (the Router's ``clock``).

    >>> c = SimClock(); c.now = 2.5; c()
    2.5
    """

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@runtime_checkable
class Dispatcher(Protocol):
    """What the replay drives: a router, seen through its lifecycle and event sinks.

    An optional attribute ``wants_events`` (default True) lets a dispatcher
    that ignores KV events skip their generation.
    """

    def route(self, req: SimRequest) -> int:
        """Choose the worker (0 .. N-1) for an arriving request."""

    def first_token(self, request_id: str | int) -> None:
        """The request's first token was emitted."""

    def finished(self, request_id: str | int) -> None:
        """The request's last token was emitted."""

    def failed(self, request_id: str | int) -> None:
        """The engine dropped the request (it can never fit the cache)."""

    def stored(self, worker: int, hashes: Sequence[int], parent: int | None) -> None:
        """Blocks ``hashes`` (a chain following ``parent``) became cached on ``worker``."""

    def removed(self, worker: int, hashes: Sequence[int]) -> None:
        """Blocks ``hashes`` were evicted from ``worker``."""


class RoundRobinDispatcher:
    """Workers in turn, in arrival order (calibration and tests only; ignores events).

    >>> d = RoundRobinDispatcher(3)
    >>> [d.route(None) for _ in range(4)]  # type: ignore[arg-type]
    [0, 1, 2, 0]

    :param num_workers: fleet size.
    """

    wants_events = False

    def __init__(self, num_workers: int) -> None:
        self._n = num_workers
        self._next = 0

    def route(self, req: SimRequest) -> int:
        """:returns: the next worker in turn."""
        w = self._next
        self._next = (w + 1) % self._n
        return w

    def first_token(self, request_id: str | int) -> None:
        """Ignored."""

    def finished(self, request_id: str | int) -> None:
        """Ignored."""

    def failed(self, request_id: str | int) -> None:
        """Ignored."""

    def stored(self, worker: int, hashes: Sequence[int], parent: int | None) -> None:
        """Ignored."""

    def removed(self, worker: int, hashes: Sequence[int]) -> None:
        """Ignored."""


class RouterDispatcher:
    """Drive :class:`kvroute.router.Router` through its public API.

    The router is built with the simulator's clock; each arrival becomes a
    :class:`kvroute.request.Request` carrying the prompt's full-block keys,
    prompt length and session id; lifecycle and KV events map one to one to
    ``first_token`` / ``finished`` / ``failed`` / ``apply_stored`` /
    ``apply_removed``.

    :param policy: a registered policy name.
    :param clock: the simulated clock.
    :param num_workers: fleet size (workers ``0 .. N-1``).
    :param block_size: tokens per block (the engines').
    :param kv_capacity_blocks: per-worker capacity, given to the router.
    :param router_kwargs: further keyword arguments for ``Router``
        (e.g. ``kv_events=False`` for the approximate mode).
    """

    def __init__(
        self,
        policy: str,
        clock: Callable[[], float],
        num_workers: int,
        block_size: int,
        *,
        kv_capacity_blocks: int | None = None,
        router_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._bs = block_size
        self.router = Router(
            block_size=block_size,
            policy=policy,
            workers=(),
            clock=clock,
            **(router_kwargs or {}),
        )
        for w in range(num_workers):
            self.router.add_worker(w, kv_capacity_blocks=kv_capacity_blocks)
        self.wants_events = bool(getattr(self.router, "kv_events", True))

    def route(self, req: SimRequest) -> int:
        """:returns: the router's choice."""
        n = req.prompt_blocks(self._bs)
        keys = np.fromiter(req.hashes[:n], dtype=np.uint64, count=n)
        d = self.router.route(
            Request(
                req.request_id,
                block_hashes=keys,
                prompt_tokens=req.prompt_len,
                session_id=req.session_id,
            )
        )
        return int(d.worker)

    def first_token(self, request_id: str | int) -> None:
        """Forwarded to ``Router.first_token``."""
        self.router.first_token(request_id)

    def finished(self, request_id: str | int) -> None:
        """Forwarded to ``Router.finished``."""
        self.router.finished(request_id)

    def failed(self, request_id: str | int) -> None:
        """Forwarded to ``Router.failed``."""
        self.router.failed(request_id)

    def stored(self, worker: int, hashes: Sequence[int], parent: int | None) -> None:
        """Forwarded to ``Router.apply_stored``."""
        self.router.apply_stored(worker, np.fromiter(hashes, np.uint64, len(hashes)), parent)

    def removed(self, worker: int, hashes: Sequence[int]) -> None:
        """Forwarded to ``Router.apply_removed``."""
        self.router.apply_removed(worker, np.fromiter(hashes, np.uint64, len(hashes)))


#: ``(clock, num_workers, engine_config) -> Dispatcher``
DispatcherFactory = Callable[[SimClock, int, EngineConfig], Dispatcher]


def make_dispatcher(
    name: str, *, seed: int | None = None, **router_kwargs: Any
) -> DispatcherFactory:
    """A factory for the dispatcher called ``name``.

    ``"sim:round_robin"`` is the simulator's own round-robin (calibration);
    any other name is a Router policy, driven by :class:`RouterDispatcher`.

    With ``seed``, a policy that draws random numbers gets
    :func:`kvroute.sim.seeding.policy_seed` ``(seed, name)``, unless
    ``router_kwargs["policy_params"]`` names a seed: so a replay seeded
    with ``seed`` is the same run every time (``kvroute replay --seed``).

    :param name: the dispatcher or policy name.
    :param seed: the run's seed (None: the policy's RNG is as given, unseeded if not given).
    :param router_kwargs: passed to ``Router`` (``policy_params``, ``kv_events``, ...).
    :returns: the factory.
    :raises KeyError: with ``seed``, an unknown policy name (checked here, not on first use).
    """
    if name == "sim:round_robin":
        return lambda clock, n, cfg: RoundRobinDispatcher(n)
    if seed is not None:
        given = dict(router_kwargs.get("policy_params") or {})
        if "seed" not in given and takes_seed(name):
            router_kwargs = {
                **router_kwargs,
                "policy_params": {**given, "seed": policy_seed(seed, name)},
            }

    def build(clock: SimClock, n: int, cfg: EngineConfig) -> Dispatcher:
        return RouterDispatcher(
            name,
            clock,
            n,
            cfg.block_size,
            kv_capacity_blocks=cfg.num_gpu_blocks,
            router_kwargs=router_kwargs,
        )

    return build


@dataclass(slots=True)
class ReplayResult:
    """The outcome of :func:`replay`.

    :param records: per-request outcomes.
    :param summary: :func:`kvroute.sim.metrics.summarize` of them, plus engine
        counters (``preemptions``, ``engine_steps``) and ``rejected`` (requests
        an engine dropped: they could never fit its cache).
    :param wall_s: wall-clock seconds the replay took (a fact of the run, not a result).
    :param engines: the engines, in their final state.
    """

    records: Records
    summary: dict[str, Any]
    wall_s: float
    engines: list[Engine] = field(default_factory=list)


_DELIVER, _PASS = 0, 1


class _FreshKeys:
    """Block keys for unnamed blocks, counted per replay: a replay's outcome never
    depends on what ran before it in the process (the order of ``--policy`` included)."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def __call__(self) -> int:
        k = self._next
        self._next = k + 1
        return fresh_key_at(k)


class _Replay:
    """The state of one replay and its three event handlers.

    The loop touches the router side only through :attr:`disp` (routing,
    lifecycle calls, and KV events through :meth:`_publish`) and the
    worker side only through :attr:`engines`: the seams for a front
    balancer over several routers (a :class:`Dispatcher` that owns them) and
    for pools of engines with different roles.
    """

    def __init__(
        self,
        requests: Sequence[SimRequest],
        disp: Dispatcher,
        engines: list[Engine],
        clock: SimClock,
        *,
        event_lag: float,
        event_loss: float,
        loss_rng: np.random.Generator,
        track_regret: bool,
    ) -> None:
        self.requests = requests
        self.disp = disp
        self.engines = engines
        self.clock = clock
        self.event_lag = event_lag
        self.event_loss = event_loss
        self.loss_rng = loss_rng
        self.track_regret = track_regret
        self.wants_events = bool(getattr(disp, "wants_events", True))
        self.bs = engines[0].config.block_size
        n, w = len(requests), len(engines)
        self.rec = Records.empty(n)
        self.rejected = 0
        self.owner: list[list[int]] = [[] for _ in range(w)]  # engine-local index -> request
        self.version = [0] * w  # bumped when a pass end is moved: the old heap entry is stale
        self.busy = [False] * w
        self.heap: list[tuple[float, int, int, Any, Any]] = []
        self.seq = 0  # heap tie-breaker: equal times pop in push order

    def _push(self, t: float, kind: int, a: Any, b: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, a, b))

    # -- the router side ------------------------------------------------------------

    def _publish(self, w: int, res: PassResult, t: float) -> None:
        """Send a pass's KV events to the dispatcher: a pass's evictions before its stores."""
        disp = self.disp
        batches: list[tuple[Any, ...]] = []
        if res.removed:
            batches.append((disp.removed, w, res.removed))
        for keys, parent in res.stored:
            batches.append((disp.stored, w, keys, parent))
        for b in batches:
            if self.event_loss and self.loss_rng.random() < self.event_loss:
                continue
            if self.event_lag:
                self._push(t + self.event_lag, _DELIVER, b, None)
            else:
                b[0](*b[1:])

    # -- the worker side ------------------------------------------------------------

    def _pass_end(self, w: int, t: float) -> None:
        eng = self.engines[w]
        res = eng.finish()
        own, rec, reqs, disp = self.owner[w], self.rec, self.requests, self.disp
        for li in res.first_token:
            g = own[li]
            rec.first_token[g] = t
            rec.cached_tokens[g] = max(eng.requests[li].cached, 0)
            disp.first_token(reqs[g].request_id)
        for li in res.finished:
            g = own[li]
            rec.finish[g] = t
            rec.output_tokens[g] = eng.requests[li].generated
            disp.finished(reqs[g].request_id)
        for li in res.rejected:
            self.rejected += 1
            disp.failed(reqs[own[li]].request_id)
        if self.wants_events and (res.stored or res.removed):
            self._publish(w, res, t)
        end = eng.begin(t)
        if end is None:
            self.busy[w] = False
        else:
            self._push(end, _PASS, w, self.version[w])

    def _arrive(self, i: int, t: float) -> None:
        req = self.requests[i]
        n = len(self.engines)
        w = self.disp.route(req)
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 0 <= w < n:
            raise ValueError(f"dispatcher returned worker {w!r}, not in [0, {n})")
        w = int(w)
        rec = self.rec
        rec.arrival[i] = t
        rec.prompt_tokens[i] = req.prompt_len
        rec.worker[i] = w
        if self.track_regret:
            bs = self.bs
            keys = req.hashes[: min(req.prompt_blocks(bs), (req.prompt_len - 1) // bs)]
            ov = [e.cached_prefix(keys) for e in self.engines]
            rec.chosen_overlap[i] = ov[w]
            rec.best_overlap[i] = max(ov)
        eng = self.engines[w]
        self.owner[w].append(i)
        eng.enqueue(req)
        if not self.busy[w]:
            self.busy[w] = True
            end = eng.begin(t)
            assert end is not None
            self._push(end, _PASS, w, self.version[w])
        else:
            cut = eng.interrupt(t)
            if cut is not None:
                self.version[w] += 1
                self._push(cut, _PASS, w, self.version[w])

    # -- the loop -----------------------------------------------------------------------

    def run(self, progress: Callable[[int, int], None] | None) -> None:
        reqs, heap, clk = self.requests, self.heap, self.clock
        n = len(reqs)
        step = max(1, n // 200)
        prev_arrival = -math.inf
        i = 0
        while i < n or heap:
            ta = reqs[i].arrival if i < n else math.inf
            if heap and heap[0][0] <= ta:
                t, kind, _s, a, b = heapq.heappop(heap)
                clk.now = t
                if kind == _DELIVER:
                    a[0](*a[1:])
                elif b == self.version[a]:
                    self._pass_end(a, t)
                continue
            if ta < prev_arrival:
                raise ValueError("requests must be sorted by arrival")
            prev_arrival = ta
            clk.now = ta
            self._arrive(i, ta)
            i += 1
            if progress is not None and (i % step == 0 or i == n):
                progress(i, n)


def replay(
    requests: Sequence[SimRequest],
    dispatcher: Dispatcher | DispatcherFactory,
    *,
    num_workers: int,
    config: EngineConfig | None = None,
    event_lag: float = 0.0,
    event_loss: float = 0.0,
    seed: int = 0,
    track_regret: bool = True,
    progress: Callable[[int, int], None] | None = None,
    clock: SimClock | None = None,
    bulk_decode: bool = True,
) -> ReplayResult:
    """Replay ``requests`` (sorted by arrival) through a dispatcher and ``num_workers`` engines.

    Deterministic: the same arguments (and a dispatcher seeded alike) give
    the same records and summary, whatever ran before in the process.

    :param requests: the workload, sorted by arrival.
    :param dispatcher: a dispatcher, or a factory ``(clock, n, config) -> dispatcher``.
    :param num_workers: fleet size.
    :param config: engine settings (default :class:`EngineConfig`).
    :param event_lag: seconds between a KV event and its delivery to the dispatcher.
    :param event_loss: probability an event batch (one stored chain, or one
        pass's removals) is lost.
    :param seed: the run's seed; the loss draws use ``derive_seed(seed,
        "event_loss")`` (:mod:`kvroute.sim.seeding`). The dispatcher's
        policy is seeded by :func:`make_dispatcher`, not here.
    :param track_regret: measure overlap regret (best cached prefix over all
        workers at routing time minus the chosen worker's).
    :param progress: called as ``progress(arrived, total)`` about 200 times.
    :param clock: the simulated clock (default: a new one); the dispatcher must
        read time from it.
    :param bulk_decode: let engines advance quiet decode stretches in bulk.
    :returns: records, summary and wall time.
    :raises ValueError: bad parameters, unsorted requests, or a dispatcher
        returning an unknown worker.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers!r}")
    if not (event_lag >= 0 and math.isfinite(event_lag)):
        raise ValueError(f"event_lag must be a finite number >= 0, got {event_lag!r}")
    if not 0 <= event_loss <= 1:
        raise ValueError(f"event_loss must be in [0, 1], got {event_loss!r}")
    cfg = config or EngineConfig()
    clk = clock or SimClock()
    disp: Dispatcher
    disp = dispatcher if isinstance(dispatcher, Dispatcher) else dispatcher(clk, num_workers, cfg)
    t0 = time.perf_counter()
    fresh = _FreshKeys()  # one key space for the fleet: unnamed blocks never collide
    engines = [Engine(cfg, fresh, bulk_decode=bulk_decode) for _ in range(num_workers)]
    loop = _Replay(
        requests,
        disp,
        engines,
        clk,
        event_lag=event_lag,
        event_loss=event_loss,
        loss_rng=np.random.default_rng(derive_seed(seed, "event_loss")),
        track_regret=track_regret,
    )
    loop.run(progress)
    wall = time.perf_counter() - t0
    summary: dict[str, Any] = summarize(loop.rec, num_workers)
    summary["rejected"] = loop.rejected
    summary["preemptions"] = sum(e.preemptions for e in engines)
    summary["engine_steps"] = sum(e.steps for e in engines)
    return ReplayResult(loop.rec, summary, wall, engines)


# -- bounds -----------------------------------------------------------------------


def _reusable(req: SimRequest, bs: int) -> Sequence[int]:
    return req.hashes[: min(req.prompt_blocks(bs), max(req.prompt_len - 1, 0) // bs)]


def _bound_result(cached_blocks: int, blocks: int, cached_tok: int, tok: int) -> dict[str, float]:
    return {
        "prefix_reuse": cached_tok / tok if tok else float("nan"),
        "block_weighted": cached_blocks / blocks if blocks else float("nan"),
    }


def unbounded_reuse(requests: Sequence[SimRequest], block_size: int) -> dict[str, float]:
    """Prefix reuse of one cache that never evicts, fed in arrival order.

    Every block of a request (prompt and named output blocks) is cached once
    it arrives. Token-weighted like the replay's ``prefix_reuse``; also
    block-weighted over ``ceil(prompt / block_size)`` blocks.

    >>> a = SimRequest(0, 0.0, 8, 1, (1, 2)); b = SimRequest(1, 1.0, 9, 1, (1, 2))
    >>> unbounded_reuse([a, b], 4)
    {'prefix_reuse': 0.47058823529411764, 'block_weighted': 0.4}

    :param requests: the workload, in arrival order.
    :param block_size: tokens per block.
    :returns: ``prefix_reuse`` and ``block_weighted``.
    """
    seen: set[int] = set()
    cb = nb = ct = nt = 0
    for r in requests:
        keys = _reusable(r, block_size)
        m = 0
        for k in keys:
            if k not in seen:
                break
            m += 1
        cb += m
        nb += -(-r.prompt_len // block_size)
        ct += m * block_size
        nt += r.prompt_len
        seen.update(r.hashes)
    return _bound_result(cb, nb, ct, nt)


def pooled_lru_reuse(
    requests: Sequence[SimRequest], block_size: int, capacity_blocks: int
) -> dict[str, float]:
    """Prefix reuse of one LRU cache with the whole fleet's capacity, fed in arrival order.

    A plain LRU touched in request order, not :class:`kvroute._block_pool.BlockPool`:
    it is the textbook bound, and docs/simulator.md's figures were measured with it.

    :param requests: the workload, in arrival order.
    :param block_size: tokens per block.
    :param capacity_blocks: the pool's size (workers x blocks per worker).
    :returns: ``prefix_reuse`` and ``block_weighted``.
    :raises ValueError: ``capacity_blocks`` < 1.
    """
    if capacity_blocks < 1:
        raise ValueError("capacity_blocks must be >= 1")
    lru: OrderedDict[int, None] = OrderedDict()
    cb = nb = ct = nt = 0
    for r in requests:
        keys = _reusable(r, block_size)
        m = 0
        for k in keys:
            if k not in lru:
                break
            m += 1
        cb += m
        nb += -(-r.prompt_len // block_size)
        ct += m * block_size
        nt += r.prompt_len
        for k in r.hashes:
            lru[k] = None
            lru.move_to_end(k)
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return _bound_result(cb, nb, ct, nt)
