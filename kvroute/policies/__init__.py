"""Routing policies behind the :class:`RoutingPolicy` protocol, registered by name.

>>> from kvroute.policies import available_policies
>>> available_policies()  # doctest: +NORMALIZE_WHITESPACE
['cache_aware', 'kv_cost', 'kvroute', 'least_loaded', 'power_of_two', 'random',
 'round_robin', 'session_affinity']

Add your own with :func:`register_policy`; the router builds policies with
:func:`get_policy`. :func:`check_policy_params` checks parameters given as
text (``--policy-param NAME=VALUE``) against a policy's signature.
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
from .params import check_policy_params, params_by_policy, parse_assignment, policy_parameters

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
    "check_policy_params",
    "get_policy",
    "params_by_policy",
    "parse_assignment",
    "policy_parameters",
    "register_policy",
]
