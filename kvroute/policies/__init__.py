"""Routing policies behind the :class:`RoutingPolicy` protocol, registered by name.

>>> from kvroute.policies import available_policies
>>> available_policies()  # doctest: +NORMALIZE_WHITESPACE
['cache_aware', 'kv_cost', 'kvroute', 'least_loaded', 'power_of_two', 'random',
 'round_robin', 'session_affinity']

Add your own with :func:`register_policy`; the router builds policies with
:func:`get_policy`.
"""

from __future__ import annotations

from .base import (
    Candidates,
    Choice,
    Features,
    RoutingPolicy,
    available_policies,
    check_nonneg,
    get_policy,
    register_policy,
)
from .builtin import (
    CacheAware,
    KvCost,
    KvRoute,
    LeastLoaded,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
    SessionAffinity,
)

#: The policy a Router uses when none is named.
DEFAULT_POLICY = "kvroute"

__all__ = [
    "DEFAULT_POLICY",
    "CacheAware",
    "Candidates",
    "Choice",
    "Features",
    "KvCost",
    "KvRoute",
    "LeastLoaded",
    "PowerOfTwo",
    "RandomChoice",
    "RoundRobin",
    "RoutingPolicy",
    "SessionAffinity",
    "available_policies",
    "check_nonneg",
    "get_policy",
    "register_policy",
]
