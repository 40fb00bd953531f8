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

The ``kvroute replay`` command line is :mod:`kvroute.sim.cli`.
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
from .workloads import SimRequest

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


def make_dispatcher(name: str, **router_kwargs: Any) -> DispatcherFactory:
    """A factory for the dispatcher called ``name``.

    ``"sim:round_robin"`` is the simulator's own round-robin (calibration);
    any other name is a Router policy, driven by :class:`RouterDispatcher`.

    :param name: the dispatcher or policy name.
    :param router_kwargs: passed to ``Router``.
    :returns: the factory.
    """
    if name == "sim:round_robin":
        return lambda clock, n, cfg: RoundRobinDispatcher(n)

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
    :param summary: :func:`kvroute.sim.metrics.summarize` of them, plus engine counters.
    :param wall_s: wall-clock seconds the replay took.
    """

    records: Records
    summary: dict[str, Any]
    wall_s: float
    engines: list[Engine] = field(default_factory=list)


_DELIVER, _PASS = 0, 1


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

    :param requests: the workload, sorted by arrival.
    :param dispatcher: a dispatcher, or a factory ``(clock, n, config) -> dispatcher``.
    :param num_workers: fleet size.
    :param config: engine settings (default :class:`EngineConfig`).
    :param event_lag: seconds between a KV event and its delivery to the dispatcher.
    :param event_loss: probability an event batch (one stored chain, or one
        pass's removals) is lost.
    :param seed: seeds the loss draws.
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
    wants_events = bool(getattr(disp, "wants_events", True))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    n = len(requests)
    rec = Records.empty(n)
    engines = [Engine(cfg, bulk_decode=bulk_decode) for _ in range(num_workers)]
    owner: list[list[int]] = [[] for _ in range(num_workers)]
    version = [0] * num_workers
    busy = [False] * num_workers
    heap: list[tuple[float, int, int, Any, Any]] = []
    seq = 0
    bs = cfg.block_size
    step = max(1, n // 200)
    prev_arrival = -math.inf

    def deliver(w: int, res: PassResult, t: float) -> None:
        nonlocal seq
        batches: list[tuple[Any, ...]] = []
        if res.removed:
            batches.append((disp.removed, w, res.removed))
        for keys, parent in res.stored:
            batches.append((disp.stored, w, keys, parent))
        for b in batches:
            if event_loss and rng.random() < event_loss:
                continue
            if event_lag:
                seq += 1
                heapq.heappush(heap, (t + event_lag, _DELIVER, seq, b, None))
            else:
                b[0](*b[1:])

    def on_pass_end(w: int, t: float) -> None:
        nonlocal seq
        eng = engines[w]
        res = eng.finish()
        own = owner[w]
        for li in res.first_token:
            g = own[li]
            rec.first_token[g] = t
            rec.cached_tokens[g] = max(eng.requests[li].cached, 0)
            disp.first_token(requests[g].request_id)
        for li in res.finished:
            g = own[li]
            rec.finish[g] = t
            rec.output_tokens[g] = eng.requests[li].generated
            disp.finished(requests[g].request_id)
        for li in res.rejected:
            disp.failed(requests[own[li]].request_id)
        if wants_events and (res.stored or res.removed):
            deliver(w, res, t)
        end = eng.begin(t)
        if end is None:
            busy[w] = False
        else:
            seq += 1
            heapq.heappush(heap, (end, _PASS, seq, w, version[w]))

    i = 0
    while i < n or heap:
        ta = requests[i].arrival if i < n else math.inf
        if heap and heap[0][0] <= ta:
            t, kind, _s, a, b = heapq.heappop(heap)
            clk.now = t
            if kind == _DELIVER:
                a[0](*a[1:])
            elif b == version[a]:
                on_pass_end(a, t)
            continue
        req = requests[i]
        if ta < prev_arrival:
            raise ValueError("requests must be sorted by arrival")
        prev_arrival = ta
        clk.now = ta
        w = disp.route(req)
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 0 <= w < num_workers:
            raise ValueError(f"dispatcher returned worker {w!r}, not in [0, {num_workers})")
        w = int(w)
        rec.arrival[i] = ta
        rec.prompt_tokens[i] = req.prompt_len
        rec.worker[i] = w
        if track_regret:
            keys = req.hashes[: min(req.prompt_blocks(bs), (req.prompt_len - 1) // bs)]
            ov = [e.cached_prefix(keys) for e in engines]
            rec.chosen_overlap[i] = ov[w]
            rec.best_overlap[i] = max(ov)
        eng = engines[w]
        owner[w].append(i)
        eng.enqueue(req)
        if not busy[w]:
            busy[w] = True
            end = eng.begin(ta)
            assert end is not None
            seq += 1
            heapq.heappush(heap, (end, _PASS, seq, w, version[w]))
        else:
            cut = eng.interrupt(ta)
            if cut is not None:
                version[w] += 1
                seq += 1
                heapq.heappush(heap, (cut, _PASS, seq, w, version[w]))
        i += 1
        if progress is not None and (i % step == 0 or i == n):
            progress(i, n)
    wall = time.perf_counter() - t0
    summary: dict[str, Any] = summarize(rec, num_workers)
    summary["preemptions"] = sum(e.preemptions for e in engines)
    summary["engine_steps"] = sum(e.steps for e in engines)
    return ReplayResult(rec, summary, wall, engines)


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
