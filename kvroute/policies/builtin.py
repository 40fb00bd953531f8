"""The built-in routing policies, registered by name when :mod:`kvroute.policies` is imported.

Every policy is vectorised over the candidates (no per-worker Python loop;
the default's arithmetic is one compiled pass, ``kvroute._route.kvroute_costs``),
keeps only the state its docstring names, and takes a ``seed`` when it draws
random numbers, so a test can pin its choices. Formulas, defaults and their
sources are in ``docs/routing.md``.
"""

from __future__ import annotations

import math
import operator
import random
from typing import Any

import numpy as np
import numpy.typing as npt

from .._compat import route as _route
from .base import F64, Candidates, Choice, Features, check_nonneg, register_policy

kvroute_costs = _route.kvroute_costs
kvroute_step = _route.kvroute_step
rendezvous_pick = _route.rendezvous_pick
tie_key = _route.tie_key

__all__ = [
    "CacheAware",
    "KvCost",
    "KvRoute",
    "LeastLoaded",
    "PowerOfTwo",
    "RandomChoice",
    "RoundRobin",
    "SessionAffinity",
    "splitmix64",
]

_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """Mix a 64-bit integer (SplitMix64's finaliser): a cheap, well-spread hash.

    >>> splitmix64(0) != splitmix64(1)
    True
    """
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _splitmix64_array(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    # uint64 array arithmetic wraps silently (scalars would warn), which is what we want.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _finite(cost: F64) -> F64:
    """NaN / inf costs (a worker with broken state) become +inf: never chosen over a finite one."""
    return np.nan_to_num(cost, nan=np.inf, posinf=np.inf, neginf=np.inf)


def _argmin_ties_random(cost: F64, rng: np.random.Generator) -> int:
    """Lowest cost; among exact ties, a uniformly random one (one RNG draw only on a tie)."""
    best = cost.min()
    if best != best:  # a NaN: sanitise only then (nan_to_num costs several numpy calls)
        cost = _finite(cost)
        best = cost.min()
    ties = np.flatnonzero(cost == best)
    if len(ties) == 1:
        return int(ties[0])
    return int(ties[rng.integers(len(ties))])


def _load(c: Candidates) -> F64:
    return c.active_requests.astype(np.float64) + c.waiting


class RoundRobin:
    """Candidates in turn. State: a counter (``start`` sets its first value).

    >>> p = RoundRobin()
    >>> c = Candidates.build([4, 5, 6])
    >>> [p.choose(c, Features(16, 1, 16)).index for _ in range(4)]
    [0, 1, 2, 0]
    """

    name = "round_robin"
    uses_tiers = False

    def __init__(self, start: int = 0) -> None:
        self._next = int(start)

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        i = self._next % len(candidates)
        self._next += 1
        return Choice(i, {})


class RandomChoice:
    """A uniformly random candidate. State: an RNG seeded with ``seed``."""

    name = "random"
    uses_tiers = False

    def __init__(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        return Choice(int(self._rng.integers(len(candidates))), {})


class LeastLoaded:
    """Fewest requests (router-tracked active + worker-reported waiting).

    Ties go to the fewest queued prefill tokens, then the lowest position. Stateless.

    >>> c = Candidates.build([1, 2, 3], active_requests=[2, 1, 1], prefill_tokens=[0, 50, 10])
    >>> LeastLoaded().choose(c, Features(16, 1, 16)).index
    2
    """

    name = "least_loaded"
    uses_tiers = False

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        load = _load(candidates)
        order = np.lexsort((candidates.prefill_tokens, load))
        return Choice(int(order[0]), {"cost": load})


class PowerOfTwo:
    """Sample two distinct candidates, keep the less loaded (ties: the first drawn).

    State: an RNG seeded with ``seed``. Load as in :class:`LeastLoaded`.
    """

    name = "power_of_two"
    uses_tiers = False

    def __init__(self, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        load = _load(candidates)
        n = len(candidates)
        if n == 1:
            return Choice(0, {"cost": load})
        a, b = (int(x) for x in self._rng.choice(n, size=2, replace=False))
        la = (load[a], candidates.prefill_tokens[a])
        lb = (load[b], candidates.prefill_tokens[b])
        return Choice(b if lb < la else a, {"cost": load})


class SessionAffinity:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).

    The request's ``affinity_key`` (its session, else its first block) is
    placed on a ring of ``vnodes`` points per worker; it goes to the first
    worker clockwise whose active requests stay within
    ``ceil(load_bound x (total active + 1) / n)``. Without a key: least loaded.

    State: the ring of the last candidate set seen (rebuilt when it changes).

    :param vnodes: ring points per worker.
    :param load_bound: the bound's factor, > 1 (1.25 is the paper's example).
    """

    name = "session_affinity"
    uses_tiers = False

    def __init__(self, vnodes: int = 64, load_bound: float = 1.25) -> None:
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise ValueError(f"vnodes must be an int >= 1, got {vnodes!r}")
        if check_nonneg(load_bound, "load_bound") <= 1.0:
            raise ValueError(f"load_bound must be > 1, got {load_bound}")
        self.vnodes = vnodes
        self.load_bound = float(load_bound)
        self._ring_key = b""
        self._points: npt.NDArray[np.uint64] = np.zeros(0, np.uint64)
        self._owner: npt.NDArray[np.intp] = np.zeros(0, np.intp)

    def _ring(self, workers: npt.NDArray[np.uint64]) -> None:
        key = workers.tobytes()
        if key == self._ring_key:
            return
        n = len(workers)
        seeds = (workers[:, None] * np.uint64(0x100000001B3)) ^ np.arange(
            self.vnodes, dtype=np.uint64
        )[None, :]
        points = _splitmix64_array(seeds.ravel())
        owner = np.repeat(np.arange(n, dtype=np.intp), self.vnodes)
        order = np.argsort(points, kind="stable")
        self._points, self._owner, self._ring_key = points[order], owner[order], key

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        active = candidates.active_requests
        n = len(candidates)
        if features.affinity_key is None:
            return LeastLoaded().choose(candidates, features)
        self._ring(candidates.workers)
        cap = math.ceil(self.load_bound * (int(active.sum()) + 1) / n)
        start = int(np.searchsorted(self._points, np.uint64(splitmix64(features.affinity_key))))
        walk = np.roll(self._owner, -start)
        ok = (active[walk] + 1) <= cap
        # The least-loaded worker always satisfies the bound, so ``ok`` has a True.
        pos = int(walk[int(np.argmax(ok))])
        return Choice(pos, {"cost": active.astype(np.float64)})


class CacheAware:
    """SGLang's router ``cache_aware`` policy, on kvroute's block index.

    Load is the router's count of active requests per worker. If the fleet is
    imbalanced — ``max - min > balance_abs_threshold`` and
    ``max > min x balance_rel_threshold`` — the least-loaded worker wins.
    Otherwise the worker with the longest match wins if its match ratio
    (matched blocks / prompt blocks) exceeds ``cache_threshold``, else the
    least-loaded one. Ties: fewer active requests, then the lowest position.
    Stateless.

    >>> p = CacheAware()
    >>> c = Candidates.build([1, 2], overlap=[4, 0], active_requests=[3, 0])
    >>> p.choose(c, Features(160, 10, 16)).index   # ratio 0.4 > 0.3: the match wins
    0
    >>> p.choose(c, Features(480, 30, 16)).index   # ratio 0.13: least loaded
    1
    """

    name = "cache_aware"
    uses_tiers = False

    def __init__(
        self,
        cache_threshold: float = 0.3,
        balance_abs_threshold: float = 64,
        balance_rel_threshold: float = 1.5,
    ) -> None:
        self.cache_threshold = check_nonneg(cache_threshold, "cache_threshold")
        self.balance_abs_threshold = check_nonneg(balance_abs_threshold, "balance_abs_threshold")
        self.balance_rel_threshold = check_nonneg(balance_rel_threshold, "balance_rel_threshold")

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        load = candidates.active_requests.astype(np.float64)
        ratio = candidates.overlap / max(features.request_blocks, 1)
        costs = {"load": load, "match_ratio": ratio.astype(np.float64)}
        lo, hi = float(load.min()), float(load.max())
        least = int(np.argmin(load))
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            return Choice(least, costs)
        best = int(np.lexsort((load, -candidates.overlap))[0])
        if ratio[best] > self.cache_threshold:
            return Choice(best, costs)
        return Choice(least, costs)


class KvCost:
    """NVIDIA Dynamo's KV router cost (defaults of Dynamo 1.6.1), in blocks.

    ``credit = overlap_score_credit x device + host_cache_hit_weight x host +
    disk_cache_hit_weight x disk`` overlap blocks;
    ``cost = prefill_load_scale x max(queued prefill blocks + prompt blocks - credit, 0)
    + (active decode blocks + the request's new blocks)
    + decode_active_request_weight x active requests``.
    The lowest cost wins, exact ties uniformly at random; with
    ``router_temperature > 0`` a worker is sampled with probability
    ``softmax(-normalised cost / temperature)``, costs min-max normalised.
    State: an RNG seeded with ``seed``.

    >>> c = Candidates.build([1, 2], overlap=[8, 0], prefill_tokens=[64, 0],
    ...                      new_decode_blocks=[2, 10])
    >>> ch = KvCost(seed=0).choose(c, Features(160, 10, 16))
    >>> ch.index, ch.costs["cost"].tolist()   # [(4 + 10 - 8) + 2, (0 + 10 - 0) + 10]
    (0, [8.0, 20.0])
    """

    name = "kv_cost"
    uses_tiers = True

    def __init__(
        self,
        overlap_score_credit: float = 1.0,
        prefill_load_scale: float = 1.0,
        decode_active_request_weight: float = 0.0,
        host_cache_hit_weight: float = 0.75,
        disk_cache_hit_weight: float = 0.25,
        router_temperature: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.overlap_score_credit = check_nonneg(overlap_score_credit, "overlap_score_credit")
        self.prefill_load_scale = check_nonneg(prefill_load_scale, "prefill_load_scale")
        self.decode_active_request_weight = check_nonneg(
            decode_active_request_weight, "decode_active_request_weight"
        )
        self.host_cache_hit_weight = check_nonneg(host_cache_hit_weight, "host_cache_hit_weight")
        self.disk_cache_hit_weight = check_nonneg(disk_cache_hit_weight, "disk_cache_hit_weight")
        self.router_temperature = check_nonneg(router_temperature, "router_temperature")
        self._rng = np.random.default_rng(seed)

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        c = candidates
        bs = float(features.block_size)
        credit = self.overlap_score_credit * c.overlap
        if c.tiered:
            credit = credit + (self.host_cache_hit_weight - self.overlap_score_credit) * (
                c.overlap_host
            )
            credit += (self.disk_cache_hit_weight - self.overlap_score_credit) * c.overlap_disk
        prefill = np.maximum(c.prefill_tokens / bs + features.prompt_tokens / bs - credit, 0.0)
        decode = c.decode_blocks + c.new_decode_blocks
        requests = self.decode_active_request_weight * c.active_requests
        cost = self.prefill_load_scale * prefill + decode + requests
        costs = {"prefill_blocks": prefill, "decode_blocks": decode, "cost": cost}
        if self.router_temperature <= 0.0 or len(cost) == 1:
            return Choice(_argmin_ties_random(cost, self._rng), costs)
        fin = _finite(cost)
        ok = np.isfinite(fin)
        if not ok.all():
            if not ok.any():
                return Choice(int(self._rng.integers(len(cost))), costs)
            fin = np.where(ok, fin, fin[ok].max())
        lo, hi = float(fin.min()), float(fin.max())
        if hi == lo:
            return Choice(int(self._rng.integers(len(cost))), costs)
        z = -((fin - lo) / (hi - lo)) / self.router_temperature
        z[~ok] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        return Choice(int(self._rng.choice(len(cost), p=p)), costs)


class KvRoute:
    """kvroute's default: estimated work in token-time, behind a gate weighing the prefix at stake.

    Cost, in prompt-token equivalents of GPU time::

        cost = queued prefill tokens + uncached_weight x uncached prompt tokens
             + decode_token_weight x (active + new decode blocks) x block_size
             + active_request_tokens x active requests
             + waiting_request_tokens x waiting requests
             + kv_pressure_tokens x max(kv_usage - kv_high, 0) / (1 - kv_high)

    An uncached token weighs ``uncached_weight`` (1.5): 1 for this request's
    own prefill, plus what recomputing it costs the fleet. Queued tokens are
    work the fleet does wherever this request goes; uncached tokens are work
    it adds, which later arrivals on that worker queue behind, and a prefix
    recomputed on a second worker takes cache room from other prefixes
    (``uncached - min(uncached)`` is the prompt another worker already holds,
    so the 0.5 is, up to a constant, a charge on replicating a prefix).

    Anti-herding gate (consistent hashing with bounded loads, applied to a
    cost policy): a worker's request load (active + waiting) must stay within
    its bound after taking this request::

        bound  = (1 + balance_slack) x (total load + 1) / n + balance_abs_slack
        stake  = uncached tokens on the cheapest worker within the bound
                 - uncached tokens here, clipped to [0, balance_stake_limit]
        bound' = bound x (1 + stake / balance_stake_tokens)

    Each ``balance_stake_tokens`` (40,000) of prompt a worker holds beyond
    the best worker within its bound buys it one more bound of room, up to
    ``balance_stake_limit`` (60,000 tokens: two and a half times its bound,
    never more); one holding only what that worker holds gets no extra
    room. So a long session, or a fan-out sharing its context, is not
    recomputed elsewhere to save a few requests of imbalance, and no prefix,
    however long, lets one worker take more than 2.5 times its bound.
    Workers over the router's busy threshold are skipped while another is
    not. Among equal costs the least-loaded wins, then (``tie_break``) a
    uniformly random one (``"random"``), or the one a rendezvous hash of
    the first block of the prompt's new part ranks first
    (``"rendezvous"``): routers that know nothing of a new prefix yet still
    agree where it goes, which is what replicas that have not heard from
    each other need (:func:`kvroute._route_py.rendezvous_pick`,
    :func:`kvroute._route_py.tie_key`). A NaN or infinite cost (a
    worker with broken state) never wins over a finite one. The returned
    cost arrays are fresh (never views of the snapshot), as every policy's
    must be: a Decision formats them later. State: an RNG seeded with
    ``seed``. Defaults and the simulator runs
    behind them: ``docs/routing.md``.

    >>> c = Candidates.build([1, 2, 3], overlap=[100, 0, 0], active_requests=[9, 0, 0])
    >>> KvRoute(seed=0).choose(c, Features(1616, 101, 16)).index != 0   # warm but over its share
    True
    >>> c = Candidates.build([1, 2, 3], overlap=[200, 0, 0], active_requests=[3, 0, 0])
    >>> KvRoute(seed=0).choose(c, Features(103_000, 201, 512)).index   # 102,400 tokens at stake
    0
    """

    name = "kvroute"
    uses_tiers = True

    def __init__(
        self,
        decode_token_weight: float = 0.05,
        active_request_tokens: float = 32.0,
        waiting_request_tokens: float = 1024.0,
        host_hit_weight: float = 0.75,
        disk_hit_weight: float = 0.25,
        kv_high: float = 0.9,
        kv_pressure_tokens: float = 4096.0,
        balance_slack: float = 0.25,
        balance_abs_slack: float = 2.0,
        balance_stake_tokens: float = 40_000.0,
        balance_stake_limit: float = 60_000.0,
        uncached_weight: float = 1.5,
        seed: int | None = None,
        tie_break: str = "random",
    ) -> None:
        if tie_break not in ("random", "rendezvous"):
            raise ValueError(f"tie_break must be 'random' or 'rendezvous', not {tie_break!r}")
        #: How exact ties are broken: ``"random"`` (seeded) or ``"rendezvous"``.
        self.tie_break = tie_break
        # read by the compiled step on a tie (kvroute/_route.pyx)
        self._rendezvous = tie_break == "rendezvous"
        self.decode_token_weight = check_nonneg(decode_token_weight, "decode_token_weight")
        self.active_request_tokens = check_nonneg(active_request_tokens, "active_request_tokens")
        self.waiting_request_tokens = check_nonneg(waiting_request_tokens, "waiting_request_tokens")
        self.host_hit_weight = check_nonneg(host_hit_weight, "host_hit_weight")
        self.disk_hit_weight = check_nonneg(disk_hit_weight, "disk_hit_weight")
        self.kv_high = check_nonneg(kv_high, "kv_high")
        if self.kv_high >= 1.0:
            raise ValueError(f"kv_high must be < 1, got {kv_high}")
        self.kv_pressure_tokens = check_nonneg(kv_pressure_tokens, "kv_pressure_tokens")
        self.balance_slack = check_nonneg(balance_slack, "balance_slack")
        self.balance_abs_slack = check_nonneg(balance_abs_slack, "balance_abs_slack")
        self.balance_stake_tokens = check_nonneg(balance_stake_tokens, "balance_stake_tokens")
        if self.balance_stake_tokens <= 0.0:
            raise ValueError(f"balance_stake_tokens must be > 0, got {balance_stake_tokens}")
        self.balance_stake_limit = check_nonneg(balance_stake_limit, "balance_stake_limit")
        self.uncached_weight = check_nonneg(uncached_weight, "uncached_weight")
        self._packed_params = self._pack()
        # the stdlib's generator: a tie is broken on most requests of an idle fleet,
        # and numpy's Generator.integers costs ~3 us a draw (randrange ~0.4 us)
        self._rng = random.Random(None if seed is None else operator.index(seed))

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        # the arithmetic is one compiled pass (kvroute/_route.pyx; twin: _route_py.py)
        costs, ties = kvroute_costs(candidates, features.prompt_tokens, features.block_size, self)
        if len(ties) == 1:
            pick = ties[0]
        elif self._rendezvous:
            h = features.block_hashes
            key = 0 if h is None else tie_key(h, ties, candidates.overlap)
            pick = rendezvous_pick(ties, candidates.workers, key)
        else:
            pick = ties[self._rng.randrange(len(ties))]
        return Choice(pick, costs)

    # the parameters the compiled arithmetic reads, in its order (kvroute/_route.pyx)
    _PARAMS = (
        "decode_token_weight",
        "active_request_tokens",
        "waiting_request_tokens",
        "host_hit_weight",
        "disk_hit_weight",
        "kv_high",
        "kv_pressure_tokens",
        "balance_slack",
        "balance_abs_slack",
        "balance_stake_tokens",
        "balance_stake_limit",
        "uncached_weight",
    )

    def _pack(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in self._PARAMS)

    def __setattr__(self, name: str, value: Any) -> None:
        # keep the packed copy current: the compiled step reads it in one go
        object.__setattr__(self, name, value)
        if name == "tie_break":
            object.__setattr__(self, "_rendezvous", value == "rendezvous")
        if name in self._PARAMS and "_packed_params" in self.__dict__:
            object.__setattr__(self, "_packed_params", self._pack())

    #: The router's common path with this policy, in one compiled call (``RouteStep``):
    #: ``kvroute._route.kvroute_step``, the decision :meth:`choose` makes over every live
    #: worker and the router's bookkeeping of it (a function, so it binds as a method).
    route_step = kvroute_step

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a subclass that decides differently must not inherit the fused path
        super().__init_subclass__(**kwargs)
        if "choose" in vars(cls) and "route_step" not in vars(cls):
            cls.route_step = None  # type: ignore[assignment]


register_policy("round_robin", RoundRobin)
register_policy("random", RandomChoice)
register_policy("least_loaded", LeastLoaded)
register_policy("power_of_two", PowerOfTwo)
register_policy("session_affinity", SessionAffinity)
register_policy("cache_aware", CacheAware)
register_policy("kv_cost", KvCost)
register_policy("kvroute", KvRoute)
