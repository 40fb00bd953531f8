"""Session pins and warm-up plans: what the router remembers per agent session.

* **Pins** (:class:`SessionPins`). A request that carries ``cache_control``
  breakpoints and a ``session_id`` pins its session to the worker it was
  routed to, until its longest breakpoint TTL runs out (every such request
  renews the pin). The session's later requests go to that worker while it
  may take them: it is known, healthy and not busy (the router checks
  those), and its load stays within the fair share :meth:`SessionPins.admits`
  computes, ``(1 + balance_slack) x (fleet load + 1) / n + abs_slack``
  requests after taking the request. Otherwise the policy decides, and the
  pin stays.
* **Warm-up plans** (:class:`WarmupPlans`). When a ``speculative_prefill``
  request finishes, its session gets a :class:`~kvroute.request.WarmupPlan`:
  the worker that served it and the prompt plus the output, for a
  ``max_tokens=1`` prefill that warms the session's next turn. A plan is
  taken once; one not taken within ``ttl`` (:data:`WARMUP_PLAN_TTL`) is
  gone.

Both are keyed by session id, one entry per session (a newer one replaces
the older), expire on the router's clock (``purge(now)`` in the sweep;
reads check expiry too), and can drop everything naming one worker
(``drop_worker``), for when the router learns that worker's cache is gone.
Both are bounded: past ``max_sessions`` entries the least recently used one
(pinned, renewed or read) is evicted and counted in ``evicted``, so clients
that invent session ids cannot grow the router without end (~140 bytes a
pin, measured with 200,000 one-hour pins).

>>> pins = SessionPins(balance_slack=0.25, abs_slack=2.0)
>>> pins.pin("agent-7", worker=3, until=300.0)
>>> pins.get("agent-7", now=10.0), pins.get("agent-7", now=300.0), len(pins)
(3, None, 0)
>>> plans = WarmupPlans(ttl=600.0)
>>> plans.record("agent-7", 3, [1, 2, 3], [4], np.array([11], np.uint64), now=0.0)
>>> plan = plans.take("agent-7", now=5.0)
>>> plan.worker, plan.tokens, plans.take("agent-7", now=5.0)
(3, (1, 2, 3, 4), None)

Not thread-safe on its own: the router calls it under its lock.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .policies.base import check_nonneg
from .request import WarmupPlan

__all__ = ["WARMUP_PLAN_TTL", "SessionPins", "WarmupPlans"]

#: Seconds a warm-up plan waits to be taken (``Router.warmup_plan``)
#: before the sweep drops it: by then the session's next turn has come or
#: it has ended, and the plan's prompt is only memory.
WARMUP_PLAN_TTL: Final = 600.0


class SessionPins:
    """Session -> pinned worker, each until its expiry.

    :param balance_slack: relative slack of the fair-share gate (>= 0).
    :param abs_slack: absolute slack of the gate, in requests (>= 0).
    :param max_sessions: pins kept at most (None: unbounded); the least
        recently used goes first.
    :raises TypeError, ValueError: a slack that is not a finite number >= 0.

    >>> pins = SessionPins(max_sessions=2)
    >>> for s in ("a", "b", "c"):
    ...     pins.pin(s, 0, until=60.0)
    >>> sorted(pins._pins), pins.evicted
    (['b', 'c'], 1)
    """

    def __init__(
        self,
        balance_slack: float = 0.25,
        abs_slack: float = 2.0,
        max_sessions: int | None = None,
    ) -> None:
        self.balance_slack = check_nonneg(balance_slack, "pin_balance_slack")
        self.abs_slack = check_nonneg(abs_slack, "pin_abs_slack")
        self.max_sessions = _check_max(max_sessions)
        #: Pins evicted by the ``max_sessions`` bound so far.
        self.evicted = 0
        # session -> (worker, expiry), least recently used first
        self._pins: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        """Pins held, expired ones not yet purged included."""
        return len(self._pins)

    def pin(self, session_id: str, worker: int, until: float) -> None:
        """Pin ``session_id`` to ``worker`` until clock time ``until`` (replacing its pin)."""
        self._pins.pop(session_id, None)
        self._pins[session_id] = (worker, until)
        self.evicted += _bound(self._pins, self.max_sessions)

    def get(self, session_id: str, now: float) -> int | None:
        """The session's pinned worker, or None; an expired pin is dropped."""
        pin = self._pins.pop(session_id, None)
        if pin is None:
            return None
        if pin[1] <= now:
            return None
        self._pins[session_id] = pin  # the most recently used now
        return pin[0]

    def drop(self, session_id: str) -> None:
        """Forget the session's pin (if any)."""
        self._pins.pop(session_id, None)

    def admits(self, own: float, loads: npt.NDArray[Any]) -> bool:
        """Whether a pinned worker with load ``own`` may take one more request.

        :param own: the pinned worker's load (requests in flight plus waiting).
        :param loads: the same load for every candidate, the pinned one included.
        """
        n = len(loads)
        fair = (1.0 + self.balance_slack) * (float(loads.sum()) + 1.0) / n + self.abs_slack
        return own + 1.0 <= fair

    def purge(self, now: float) -> int:
        """Drop the pins expired at ``now``; return how many. O(pins)."""
        gone = [s for s, (_, until) in self._pins.items() if until <= now]
        for s in gone:
            del self._pins[s]
        return len(gone)

    def drop_worker(self, worker: int) -> int:
        """Drop every pin to ``worker``; return how many. O(pins)."""
        gone = [s for s, (w, _) in self._pins.items() if w == worker]
        for s in gone:
            del self._pins[s]
        return len(gone)


class WarmupPlans:
    """Session -> the warm-up plan made when its last speculative request finished.

    :param ttl: seconds a plan waits to be taken (> 0).
    :param max_sessions: plans kept at most (None: unbounded); the oldest goes first.
    :raises TypeError, ValueError: ``ttl`` is not a positive finite number.
    """

    def __init__(self, ttl: float = WARMUP_PLAN_TTL, max_sessions: int | None = None) -> None:
        if check_nonneg(ttl, "ttl") == 0:
            raise ValueError("ttl must be > 0")
        self.ttl = float(ttl)
        self.max_sessions = _check_max(max_sessions)
        #: Plans evicted by the ``max_sessions`` bound so far.
        self.evicted = 0
        # session -> (its plan, when it was made)
        self._plans: dict[str, tuple[WarmupPlan, float]] = {}

    def __len__(self) -> int:
        """Plans waiting, expired ones not yet purged included."""
        return len(self._plans)

    def __contains__(self, session_id: object) -> bool:
        """Whether a plan (maybe expired) waits for this session."""
        return session_id in self._plans

    def record(
        self,
        session_id: str,
        worker: int,
        prompt: Sequence[int] | npt.NDArray[np.integer[Any]] | None,
        output: Sequence[int] | npt.NDArray[np.integer[Any]] | None,
        hashes: npt.NDArray[np.uint64],
        now: float,
    ) -> None:
        """Make the session's plan: warm ``worker`` with ``prompt`` + ``output`` (replacing any).

        :param prompt: the finished request's prompt tokens (None: it had
            only block hashes, and so has the plan).
        :param output: its generated tokens, appended to the prompt.
        :param hashes: the prompt's block keys.
        """
        tokens = None
        if prompt is not None:
            tokens = _ints(prompt)
            if output is not None:
                tokens += _ints(output)
        self._plans.pop(session_id, None)
        self._plans[session_id] = (WarmupPlan(worker, tokens, hashes), now)
        self.evicted += _bound(self._plans, self.max_sessions)

    def take(self, session_id: str, now: float) -> WarmupPlan | None:
        """Remove and return the session's plan; None if none waits or it expired."""
        kept = self._plans.pop(session_id, None)
        if kept is None or now - kept[1] > self.ttl:
            return None
        return kept[0]

    def purge(self, now: float) -> int:
        """Drop the plans older than ``ttl`` at ``now``; return how many. O(plans)."""
        gone = [s for s, (_, made) in self._plans.items() if now - made > self.ttl]
        for s in gone:
            del self._plans[s]
        return len(gone)

    def drop_worker(self, worker: int) -> int:
        """Drop every plan that would warm ``worker``; return how many. O(plans)."""
        gone = [s for s, (plan, _) in self._plans.items() if plan.worker == worker]
        for s in gone:
            del self._plans[s]
        return len(gone)


def _ints(ids: Sequence[int] | npt.NDArray[np.integer[Any]]) -> tuple[int, ...]:
    """Token ids as a tuple of Python ints (an array through ``tolist``: no numpy scalars)."""
    if isinstance(ids, np.ndarray):
        return tuple(ids.tolist())
    return tuple(int(t) for t in ids)


def _check_max(n: int | None) -> int | None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"max_sessions must be an int >= 1 or None, got {n!r}")
    return n


def _bound(entries: dict[str, Any], limit: int | None) -> int:
    """Evict the oldest entries (dicts keep insertion order) down to ``limit``; how many."""
    if limit is None or len(entries) <= limit:
        return 0
    over = len(entries) - limit
    for s in list(itertools.islice(entries, over)):
        del entries[s]
    return over
