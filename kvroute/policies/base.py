"""The policy interface: a snapshot of the candidates in, a choice and its reasons out.

A policy never sees the router. It gets a :class:`Candidates` snapshot (one
numpy array per quantity, all indexed alike: position ``i`` is worker
``workers[i]``) and the request's :class:`Features`, and returns a
:class:`Choice`: the chosen position and, per cost term, one value per
candidate (the decision's explanation). The only state a policy may keep is
explicit and documented (a round-robin counter, a seeded RNG, a hash ring
cache), so each policy can be tested alone and swapped by name.

Every candidate the router passes is eligible: healthy, not removed. The
router raises before calling a policy with no candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "Candidates",
    "Choice",
    "Features",
    "RouteStep",
    "RoutingPolicy",
    "available_policies",
    "check_nonneg",
    "get_policy",
    "register_policy",
]

F64 = npt.NDArray[np.float64]


def check_nonneg(value: object, what: str) -> float:
    """Return ``value`` as a float, or raise naming ``what``: for policy and router parameters.

    >>> check_nonneg(2, "slack")
    2.0
    >>> check_nonneg(float("nan"), "slack")
    Traceback (most recent call last):
    ...
    ValueError: slack must be a finite number >= 0, got nan

    :raises TypeError: not an int or float (bools included).
    :raises ValueError: negative, NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return v


I64 = npt.NDArray[np.int64]


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__ per
# field, measurable on the routing path. Policies must not mutate a snapshot.
@dataclass(slots=True)
class Candidates:
    """The eligible workers and their state at routing time (arrays of equal length n >= 1).

    :param workers: worker ids (uint64).
    :param overlap: leading prompt blocks cached on each worker, any tier
        (int64; predicted residency counts as device).
    :param overlap_host: of ``overlap``, blocks whose fastest copy is in host memory.
    :param overlap_disk: of ``overlap``, blocks whose fastest copy is on disk.
    :param prefill_tokens: uncached prompt tokens of requests routed there and
        not yet past their first token (float64).
    :param decode_blocks: active KV blocks of requests in flight there
        (shared prefixes counted once) plus their expected output blocks.
    :param new_decode_blocks: blocks this request would add to ``decode_blocks``.
    :param active_requests: requests routed there and not finished (int64).
    :param waiting: worker-reported waiting requests (0 when unknown).
    :param kv_usage: worker-reported KV usage in [0, 1] (0 when unknown).
    :param busy: over the router's busy threshold (bool).
    :param tiered: whether ``overlap_host`` / ``overlap_disk`` may be non-zero
        (False lets a policy skip the per-tier arithmetic).
    """

    workers: npt.NDArray[np.uint64]
    overlap: I64
    overlap_host: I64
    overlap_disk: I64
    prefill_tokens: F64
    decode_blocks: F64
    new_decode_blocks: F64
    active_requests: I64
    waiting: F64
    kv_usage: F64
    busy: npt.NDArray[np.bool_]
    tiered: bool = True

    def __len__(self) -> int:
        return len(self.workers)

    @classmethod
    def build(
        cls,
        workers: Any,
        overlap: Any = None,
        *,
        overlap_host: Any = None,
        overlap_disk: Any = None,
        prefill_tokens: Any = None,
        decode_blocks: Any = None,
        new_decode_blocks: Any = None,
        active_requests: Any = None,
        waiting: Any = None,
        kv_usage: Any = None,
        busy: Any = None,
    ) -> Candidates:
        """Build a snapshot from lists (missing quantities are zero); for tests and tools.

        >>> c = Candidates.build([7, 9], overlap=[3, 0], active_requests=[1, 0])
        >>> len(c), c.overlap.tolist(), c.prefill_tokens.tolist()
        (2, [3, 0], [0.0, 0.0])

        :raises ValueError: arrays of different lengths, or no workers.
        """
        w = np.asarray(workers, dtype=np.uint64)
        n = len(w)
        if n == 0:
            raise ValueError("Candidates needs at least one worker")

        def arr(v: Any, dtype: type) -> Any:
            a: Any = np.zeros(n, dtype=dtype) if v is None else np.asarray(v, dtype=dtype)
            if a.shape != (n,):
                raise ValueError(f"expected {n} values, got shape {a.shape}")
            return a

        return cls(
            w,
            arr(overlap, np.int64),
            arr(overlap_host, np.int64),
            arr(overlap_disk, np.int64),
            arr(prefill_tokens, np.float64),
            arr(decode_blocks, np.float64),
            arr(new_decode_blocks, np.float64),
            arr(active_requests, np.int64),
            arr(waiting, np.float64),
            arr(kv_usage, np.float64),
            arr(busy, np.bool_),
            overlap_host is not None or overlap_disk is not None,
        )


@dataclass(slots=True)
class Features:
    """What a policy may know about the request.

    :param prompt_tokens: prompt length in tokens.
    :param request_blocks: number of block hashes of the prompt.
    :param block_size: tokens per KV block.
    :param affinity_key: a 64-bit key for sticky policies: the session id's
        hash if any, else the first block hash, else None.
    :param expected_output_tokens: predicted output length, if hinted.
    :param priority: the request's priority (lower is more urgent).
    :param block_hashes: the prompt's block keys (what every router computes
        alike, for deterministic tie-breaks), or None.
    """

    prompt_tokens: int
    request_blocks: int
    block_size: int
    affinity_key: int | None = None
    expected_output_tokens: int | None = None
    priority: int = 0
    block_hashes: npt.NDArray[np.uint64] | None = None


@dataclass(slots=True)
class Choice:
    """A policy's answer: the chosen candidate position and its per-candidate costs.

    :param index: position in the :class:`Candidates` arrays.
    :param costs: cost term name -> one number per candidate, as a fresh
        array (for explanations; by convention the term the policy minimised
        is called ``"cost"``).
    """

    index: int
    costs: dict[str, npt.NDArray[Any]]


@runtime_checkable
class RoutingPolicy(Protocol):
    """A routing policy: pick one of the candidates.

    :ivar name: the registry name.
    :ivar uses_tiers: whether :attr:`Candidates.overlap_host` /
        ``overlap_disk`` are needed (the router skips the per-tier match otherwise).
    """

    name: str
    uses_tiers: bool

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        """Return the chosen position among ``candidates`` and the per-candidate costs."""
        ...


class RouteStep(Protocol):
    """Optional: a policy's compiled fast path, which the router uses when it can.

    A policy with a ``route_step`` method (not None) gets the router's common
    case -- every live worker a candidate, no session pin -- as one call after
    the index match, instead of :meth:`RoutingPolicy.choose` on a
    :class:`Candidates` snapshot. It must reach the decision ``choose`` would
    (bit for bit) and do the router's bookkeeping of the chosen worker, as
    ``kvroute._route_py.kvroute_step`` specifies (the built-in ``kvroute``
    policy's). Other policies need not care: the router falls back to ``choose``.
    """

    def route_step(
        self,
        load: Any,
        fresh: Any,
        request_id: Any,
        payload: Any,
        match: Any,
        hashes: Any,
        now: float,
        prompt_tokens: int,
        block_size: int,
        out_blocks: float,
        busy: Any = None,
    ) -> tuple[int, int, int, npt.NDArray[np.int64], Any, Any]:
        """``(position, worker, matched blocks, overlap, costs, fresh entry)``; see above."""
        ...


PolicyFactory = Callable[..., RoutingPolicy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register_policy(name: str, factory: PolicyFactory, *, replace: bool = False) -> None:
    """Make ``get_policy(name, **params)`` build a policy with ``factory(**params)``.

    :param name: the policy's name.
    :param factory: a callable taking keyword parameters, returning a :class:`RoutingPolicy`.
    :param replace: allow replacing an existing registration.
    :raises ValueError: ``name`` is already registered and ``replace`` is false.
    :raises TypeError: ``name`` is not a str or ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("a policy name must be a non-empty str")
    if not callable(factory):
        raise TypeError(f"policy factory for {name!r} is not callable")
    if name in _REGISTRY and not replace:
        raise ValueError(f"policy {name!r} is already registered (pass replace=True)")
    _REGISTRY[name] = factory


def get_policy(name: str, **params: Any) -> RoutingPolicy:
    """Build the policy registered as ``name``.

    >>> get_policy("round_robin").name
    'round_robin'

    :raises KeyError: no policy has that name (the message lists those that do).
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown routing policy {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None
    return factory(**params)


def available_policies() -> list[str]:
    """Names of the registered policies, sorted."""
    return sorted(_REGISTRY)
