"""A policy's parameters from text: ``NAME=VALUE`` checked against the policy's signature.

The command line (``kvroute proxy --policy-param``, ``kvroute replay
--policy-param``) and the proxy's config file set a policy's constructor
parameters by name. This module is what they share:

- :func:`parse_assignment` splits ``NAME=VALUE``;
- :func:`policy_parameters` lists what a registered policy takes (its
  factory's signature: names, types, defaults);
- :func:`check_policy_params` checks names against that list and types the
  values by the signature: ``int``, ``float``, ``bool`` and ``str``, each
  possibly ``None`` (text ``none``), given as text or as the value itself;
- :func:`params_by_policy` does it for several policies at once, where a
  name may be scoped to one of them as ``POLICY.NAME`` (``kvroute replay``
  compares several policies in one run).

An unknown name is refused with the policy's known parameters, a bad value
with the parameter's name and type. The policy's own constructor still
checks ranges (a negative weight...) when the router builds it.

>>> check_policy_params("kv_cost", {"router_temperature": "0.5", "seed": "7"})
{'router_temperature': 0.5, 'seed': 7}
>>> check_policy_params("kv_cost", {"temperature": "0.5"})
Traceback (most recent call last):
...
ValueError: temperature: not a parameter of policy 'kv_cost' (its parameters: \
overlap_score_credit, prefill_load_scale, decode_active_request_weight, host_cache_hit_weight, \
disk_cache_hit_weight, router_temperature, seed)
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Union

from .base import _REGISTRY

__all__ = [
    "Parameter",
    "check_policy_params",
    "coerce",
    "params_by_policy",
    "parse_assignment",
    "policy_parameters",
]

_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})
_NONE: Final = frozenset({"none", "null"})


def parse_assignment(text: str) -> tuple[str, str]:
    """Split ``NAME=VALUE`` (spaces around either side dropped).

    >>> parse_assignment("router_temperature = 0.5")
    ('router_temperature', '0.5')

    :param text: what the user typed.
    :returns: the name and the value's text.
    :raises ValueError: no ``=``, or an empty name.
    """
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _describe(kind: object) -> str:
    if kind is Any:
        return "a value"
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(kind))
    if kind is type(None):
        return "none"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind if isinstance(kind, type) else object, str(kind)
    )


def _guess(text: str) -> object:
    """A value typed by its look, for a parameter whose type is not declared."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in _NONE:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def coerce(value: object, kind: object, what: str) -> object:
    """``value`` (text, or a value already typed) as a value of type ``kind``.

    ``kind`` is ``bool``, ``int``, ``float``, ``str``, a ``Literal``, a union
    of those with ``None``, or ``Any`` (text is then typed by its look).
    Text converts (``"0.5"``, ``"true"``/``"off"``, ``"none"`` where None is
    allowed); a typed value must be of the type (an int is a float; a bool
    is not a number).

    >>> coerce("on", bool, "x"), coerce(3, float, "x"), coerce("none", int | None, "x")
    (True, 3.0, None)
    >>> coerce("fast", Literal["fcfs", "sjf"], "admission")
    Traceback (most recent call last):
    ...
    ValueError: admission: expected one of 'fcfs', 'sjf', got 'fast'

    :param value: the value given.
    :param kind: the type wanted.
    :param what: the parameter's name, for the error.
    :returns: the value, typed.
    :raises ValueError: the value is not of (and does not convert to) ``kind``.
    """
    if kind is Any:
        return _guess(value) if isinstance(value, str) else value
    origin = typing.get_origin(kind)
    options: tuple[object, ...] = (
        typing.get_args(kind) if origin in (Union, types.UnionType) else (kind,)
    )
    nullable = type(None) in options
    if value is None or (nullable and isinstance(value, str) and value.lower() in _NONE):
        if nullable:
            return None
        raise ValueError(f"{what}: expected {_describe(kind)}, got none")
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce_one(value, option)
        except (TypeError, ValueError):
            continue
    raise ValueError(f"{what}: expected {_describe(kind)}, got {value!r}")


def _coerce_one(value: object, kind: object) -> object:
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        if value in allowed:
            return value
        raise ValueError(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(value)
    if kind is int:
        if isinstance(value, str):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(value)
    if kind is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, str) or number):
            raise TypeError(value)
        v = float(value)  # type: ignore[arg-type]
        if math.isnan(v):
            raise ValueError(value)
        return v
    if kind is str:
        if isinstance(value, str):
            return value
        raise TypeError(value)
    raise TypeError(f"unsupported parameter type {kind!r}")


@dataclass(frozen=True, slots=True)
class Parameter:
    """One parameter of a policy's factory.

    :param name: its keyword.
    :param kind: its type (``Any`` when the signature declares none and the
        default is None).
    :param default: its default (``inspect.Parameter.empty`` when required).
    """

    name: str
    kind: object
    default: object


def policy_parameters(policy: str) -> tuple[dict[str, Parameter], bool]:
    """What the policy registered as ``policy`` takes: its keyword parameters, in order.

    >>> params, open_ended = policy_parameters("round_robin")
    >>> params["start"], open_ended
    (Parameter(name='start', kind=<class 'int'>, default=0), False)

    :param policy: a registered policy name.
    :returns: the parameters by name, and whether the factory also takes any
        other keyword (``**kwargs``: then any name is accepted, typed by its look).
    :raises KeyError: no policy has that name.
    """
    try:
        factory = _REGISTRY[policy]
    except KeyError:
        raise KeyError(
            f"unknown routing policy {policy!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: anything goes
        return {}, True
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve: fall back to the defaults
        hints = {}
    out: dict[str, Parameter] = {}
    open_ended = False
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            open_ended = True
            continue
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            continue
        kind = hints.get(p.name)
        if kind is None:
            d = p.default
            kind = type(d) if d is not inspect.Parameter.empty and d is not None else Any
        out[p.name] = Parameter(p.name, kind, p.default)
    return out, open_ended


def check_policy_params(policy: str, params: Mapping[str, object]) -> dict[str, object]:
    """``params`` checked against the policy's signature and typed by it.

    >>> check_policy_params("kvroute", {"balance_slack": 0.5})
    {'balance_slack': 0.5}

    :param policy: a registered policy name.
    :param params: name -> value (text or typed).
    :returns: name -> typed value, in the order given.
    :raises KeyError: no policy has that name.
    :raises ValueError: a name the policy does not take (the message names
        it and lists the policy's parameters), or a value of the wrong type.
    """
    known, open_ended = policy_parameters(policy)
    out: dict[str, object] = {}
    for name, value in params.items():
        p = known.get(name)
        if p is None:
            if not open_ended:
                listed = ", ".join(known) if known else "none"
                raise ValueError(
                    f"{name}: not a parameter of policy {policy!r} (its parameters: {listed})"
                )
            out[name] = coerce(value, Any, name)
            continue
        out[name] = coerce(value, p.kind, name)
    return out


def params_by_policy(
    policies: Sequence[str], assignments: Iterable[tuple[str, object]]
) -> dict[str, dict[str, object]]:
    """Parameters for each of several policies: ``NAME`` for all, ``POLICY.NAME`` for one.

    Later assignments of a name override earlier ones; a scoped one
    overrides an unscoped one for its policy.

    >>> params_by_policy(["kvroute", "kv_cost"], [("kv_cost.router_temperature", "0.5")])
    {'kvroute': {}, 'kv_cost': {'router_temperature': 0.5}}

    :param policies: the registered policy names.
    :param assignments: ``(name, value)`` pairs, e.g. from :func:`parse_assignment`.
    :returns: policy -> its typed parameters.
    :raises KeyError: an unknown policy name.
    :raises ValueError: a scope naming a policy not in ``policies``, a name
        some policy it applies to does not take, or a bad value.
    """
    plain: dict[str, object] = {}
    scoped: dict[str, dict[str, object]] = {p: {} for p in policies}
    for name, value in assignments:
        scope, dot, param = name.rpartition(".")
        if not dot:
            plain[name] = value
        elif scope in scoped:
            scoped[scope][param] = value
        else:
            raise ValueError(
                f"{name}: {scope!r} is not one of the policies run ({', '.join(policies)})"
            )
    out: dict[str, dict[str, object]] = {}
    for policy in policies:
        try:
            out[policy] = check_policy_params(policy, {**plain, **scoped[policy]})
        except ValueError as e:
            if not (plain and len(policies) > 1):
                raise
            raise ValueError(f"{e}; scope a parameter to one policy as POLICY.NAME") from None
    return out
