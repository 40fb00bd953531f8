"""One seed per run: every random stream of a replay derives from it, by name.

A replay draws random numbers in three places: the workload generator
(agentic sessions), the policies that break ties or sample (``kv_cost``,
``kvroute``, ``power_of_two``, ``random``) and the KV event loss. Seeding
them all with the same number would give correlated streams (the agentic
generator and ``kv_cost`` both use numpy's default generator); leaving a
policy unseeded makes two runs of one command differ. So each stream gets
its own seed, derived from the run's seed and the stream's name by
:func:`derive_seed`, a hash that does not depend on the process, the
platform or numpy's version.

The workload generator is the exception: it takes the run's seed itself,
so ``kvroute replay agentic --seed 0`` replays the very sessions the
calibration and the sweep use (``agentic_sessions(seed=0)``).

>>> derive_seed(0, "policy", "kvroute") == derive_seed(0, "policy", "kvroute")
True
>>> derive_seed(0, "policy", "kvroute") != derive_seed(1, "policy", "kvroute")
True
"""

from __future__ import annotations

import hashlib
import inspect
import json
import operator
from collections.abc import Mapping
from typing import Any

from ..policies import get_policy

__all__ = ["derive_seed", "policy_parameters", "policy_seed", "takes_seed"]


def derive_seed(seed: int, *names: str) -> int:
    """The seed of the stream ``names`` in a run seeded with ``seed``: a 63-bit int.

    BLAKE2b of the JSON text ``[seed, *names]``: stable across processes,
    platforms and library versions (Python's ``hash`` of a str is not), and
    unrelated for unequal inputs.

    >>> derive_seed(0, "policy", "kv_cost")
    6847151930530751835

    :param seed: the run's seed (any int).
    :param names: the stream's name, e.g. ``("policy", "kv_cost")``.
    :returns: an int in ``[0, 2**63)`` (fits every seed argument: numpy,
        :class:`random.Random`, a JSON number).
    :raises TypeError: ``seed`` is not an int or a name is not a str.
    """
    seed = operator.index(seed)
    if isinstance(seed, bool):
        raise TypeError("seed must be an int, not bool")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"stream names must be str, got {type(n).__name__}")
    text = json.dumps([seed, *names], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def policy_seed(seed: int, policy: str) -> int:
    """The seed a replay seeded with ``seed`` gives the policy ``policy``.

    :param seed: the run's seed.
    :param policy: the policy's registered name.
    :returns: ``derive_seed(seed, "policy", policy)``.
    """
    return derive_seed(seed, "policy", policy)


def takes_seed(policy: str) -> bool:
    """Whether the registered policy ``policy`` takes a ``seed`` (it draws random numbers).

    >>> takes_seed("kv_cost"), takes_seed("round_robin")
    (True, False)

    :param policy: a registered policy name.
    :returns: True if ``get_policy(policy, seed=0)`` is accepted.
    :raises KeyError: no policy has that name.
    """
    try:
        get_policy(policy, seed=0)
    except TypeError:
        get_policy(policy)  # an unknown name raises KeyError here, not TypeError
        return False
    return True


def policy_parameters(
    policy: str, given: Mapping[str, Any] | None = None, *, seed: int | None = None
) -> dict[str, Any]:
    """Every parameter the policy ``policy`` runs with: its defaults, ``given``, and its seed.

    A policy that takes a seed gets ``policy_seed(seed, policy)`` unless
    ``given`` names one; with ``seed`` None it stays as given (unseeded if
    not given). The policy is built once, so a bad parameter raises here,
    before any replay.

    >>> p = policy_parameters("kv_cost", {"router_temperature": 0.5}, seed=0)
    >>> p["router_temperature"], p["seed"] == policy_seed(0, "kv_cost"), p["overlap_score_credit"]
    (0.5, True, 1.0)
    >>> policy_parameters("kv_cost", {"seed": 7}, seed=0)["seed"]
    7
    >>> policy_parameters("round_robin", seed=0)
    {'start': 0}

    :param policy: a registered policy name.
    :param given: parameters set explicitly (e.g. ``--policy-param``).
    :param seed: the run's seed.
    :returns: name -> value, defaults included, in the signature's order
        then any extra ones given.
    :raises KeyError: no policy has that name.
    :raises TypeError: an unknown parameter.
    :raises ValueError: a bad value.
    """
    params = dict(given or {})
    if seed is not None and "seed" not in params and takes_seed(policy):
        params["seed"] = policy_seed(seed, policy)
    built = get_policy(policy, **params)
    out: dict[str, Any] = {}
    try:
        sig = inspect.signature(type(built))
    except (TypeError, ValueError):  # a builtin or C type: only what was given is known
        sig = None
    if sig is not None:
        for name, p in sig.parameters.items():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty:
                out[name] = p.default
    out.update(params)
    return out
