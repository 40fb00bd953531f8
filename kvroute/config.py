"""The router's settings: :class:`RouterConfig`, every setting validated once.

A :class:`~kvroute.router.Router` is a coordinator over a few parts; what
they may do is fixed when it is built, here. :class:`RouterConfig` holds the
settings that are plain data (sizes, switches, durations, limits), so two
routers built from one config behave alike and a config can be compared,
copied with :func:`dataclasses.replace` and logged. The router's
collaborators (its hash function, policy, clock and block index) are not
settings: they are passed to the ``Router`` itself.

Every field is checked in ``__post_init__``, so an invalid config cannot
exist: ``TypeError`` for a value of the wrong type, ``ValueError`` for one
out of range, each naming the field. Numbers are stored as ``float``, flags
as ``bool``.

>>> cfg = RouterConfig(block_size=16, admission="sjf")
>>> cfg.admission, cfg.request_timeout, cfg.busy_threshold is None
('sjf', 600.0, True)
>>> RouterConfig(fresh_ttl=0)
Traceback (most recent call last):
...
ValueError: fresh_ttl must be > 0
>>> RouterConfig(busy_threshold=BusyThreshold(max_active_requests=8)).busy_threshold
BusyThreshold(max_prefill_tokens=None, max_active_requests=8, max_waiting_requests=None, \
max_kv_usage=None)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, TypedDict

from .disagg import DisaggConfig
from .policies.base import check_nonneg

__all__ = ["Admission", "BusyThreshold", "RouterConfig", "RouterSettings"]

#: Order within a priority in the admission queue: arrival, or shortest job first.
Admission = Literal["fcfs", "sjf"]


def _set(obj: object, name: str, value: object) -> None:
    # a frozen dataclass normalises its own fields through object.__setattr__
    object.__setattr__(obj, name, value)


@dataclass(frozen=True, slots=True)
class BusyThreshold:
    """When a worker counts as busy, for the admission queue (any limit reached).

    A limit of None is no limit. A busy worker is never given a queued
    request, and a session pinned to it is routed by the policy instead.

    >>> BusyThreshold(max_kv_usage=0.9).max_kv_usage
    0.9
    >>> BusyThreshold(max_active_requests=2.5)
    Traceback (most recent call last):
    ...
    TypeError: max_active_requests must be an int, not float

    :param max_prefill_tokens: queued uncached prompt tokens.
    :param max_active_requests: requests in flight.
    :param max_waiting_requests: worker-reported waiting requests.
    :param max_kv_usage: worker-reported KV usage, in [0, 1].
    :raises TypeError: a limit that is not a number (an int for
        ``max_active_requests``).
    :raises ValueError: a limit that is negative, NaN or infinite.
    """

    max_prefill_tokens: float | None = None
    max_active_requests: int | None = None
    max_waiting_requests: float | None = None
    max_kv_usage: float | None = None

    def __post_init__(self) -> None:
        active = self.max_active_requests
        if active is not None and (isinstance(active, bool) or not isinstance(active, int)):
            raise TypeError(f"max_active_requests must be an int, not {type(active).__name__}")
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                check_nonneg(v, f.name)


class RouterSettings(TypedDict, total=False):
    """:class:`RouterConfig`'s fields but ``block_size``, as keywords: what ``Router`` takes.

    (``block_size`` is ``Router``'s own first parameter, positional as ever.)
    """

    kv_events: bool
    predicted_ttl: float
    predict_on_route: bool
    fresh_ttl: float
    request_timeout: float
    sweep_interval: float
    busy_threshold: BusyThreshold | None
    admission: Admission
    pin_balance_slack: float
    pin_abs_slack: float
    tiered: bool
    journal: bool
    disagg: DisaggConfig
    max_sessions: int
    drift_window: int
    drift_threshold: float
    drift_tolerance_blocks: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterConfig:
    """Every setting of a :class:`~kvroute.router.Router`, validated once.

    :param block_size: tokens per KV block (must match the engines').
    :param kv_events: False for event-free (approximate) mode: the router's own
        decisions, expired after ``predicted_ttl``, stand in for the events.
    :param predicted_ttl: lifetime of a decision in approximate mode (s).
    :param predict_on_route: with events, also remember each decision for
        ``fresh_ttl`` seconds so siblings arriving before the first stored
        event follow it.
    :param fresh_ttl: lifetime of that side record (s).
    :param request_timeout: a request with no lifecycle event for this long
        is dropped by the stale sweep (s).
    :param sweep_interval: how often ``route()`` runs the stale sweep (s).
    :param busy_threshold: when a worker counts as busy, for ``submit()`` and pins.
    :param admission: ``"fcfs"`` or ``"sjf"`` (shortest job first) within a priority.
    :param pin_balance_slack: a pinned worker is preferred while its load stays
        within ``(1 + pin_balance_slack) x (fleet load + 1) / n + pin_abs_slack``
        requests after taking the request (the kvroute policy's gate).
    :param pin_abs_slack: see ``pin_balance_slack``.
    :param tiered: engines report host / disk tiers, so match per tier for
        policies that weigh tiers. The router also switches to it at the
        first ``apply_stored`` with a tier other than ``"device"``.
    :param journal: record every state-changing call (see ``Router.journal``);
        it grows without bound, so it is meant for tests and debugging sessions.
    :param disagg: in a prefill/decode-disaggregated fleet, the decode
        choice's weights and the conditional rule (:mod:`kvroute.disagg`).
    :param max_sessions: sessions whose pin, and whose warm-up plan, the
        router keeps; past it the least recently used session's is evicted
        (counted in ``stats()["sessions_evicted"]``).
    :param drift_window: requests per worker over which the drift detector
        compares predicted and reported cached tokens (those with something
        predicted or reported; see :mod:`kvroute.trust`).
    :param drift_threshold: share of that window off by more than
        ``drift_tolerance_blocks`` at which a worker's index counts as drifted,
        in (0, 1]; it is trusted again at half that share.
    :param drift_tolerance_blocks: a request whose prediction is off by at
        most this many blocks agrees (partial blocks, an engine's recomputed
        last block).
    :raises ValueError, TypeError: a bad setting, naming it.
    """

    block_size: int = 16
    kv_events: bool = True
    predicted_ttl: float = 120.0
    predict_on_route: bool = True
    fresh_ttl: float = 5.0
    request_timeout: float = 600.0
    sweep_interval: float = 1.0
    busy_threshold: BusyThreshold | None = None
    admission: Admission = "fcfs"
    pin_balance_slack: float = 0.25
    pin_abs_slack: float = 2.0
    tiered: bool = False
    journal: bool = False
    # prefill/decode disaggregation (used once a worker has a role other than "both")
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    # -- self-healing state (issue 16): bounded sessions, the drift detector
    max_sessions: int = 100_000
    drift_window: int = 64
    drift_threshold: float = 0.3
    drift_tolerance_blocks: float = 2.0

    def __post_init__(self) -> None:
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"block_size must be an int >= 1, got {bs!r}")
        if self.admission not in ("fcfs", "sjf"):
            raise ValueError(f"admission must be 'fcfs' or 'sjf', not {self.admission!r}")
        if self.busy_threshold is not None and not isinstance(self.busy_threshold, BusyThreshold):
            raise TypeError("busy_threshold must be a BusyThreshold")
        if not isinstance(self.disagg, DisaggConfig):
            raise TypeError("disagg must be a DisaggConfig")
        for name in ("predicted_ttl", "fresh_ttl", "request_timeout"):
            v = check_nonneg(getattr(self, name), name)
            if v == 0:
                raise ValueError(f"{name} must be > 0")
            _set(self, name, v)
        for name in ("max_sessions", "drift_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        threshold = check_nonneg(self.drift_threshold, "drift_threshold")
        if not 0 < threshold <= 1:
            raise ValueError(f"drift_threshold must be in (0, 1], got {threshold}")
        _set(self, "drift_threshold", threshold)
        for name in ("sweep_interval", "pin_balance_slack", "pin_abs_slack",
                     "drift_tolerance_blocks"):  # fmt: skip
            _set(self, name, check_nonneg(getattr(self, name), name))
        # flags accept any truthy value, as the Router's keywords always have
        for name in ("kv_events", "predict_on_route", "tiered", "journal"):
            _set(self, name, bool(getattr(self, name)))
