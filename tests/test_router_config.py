"""RouterConfig and BusyThreshold: the settings, validated once, and how Router takes them."""

from __future__ import annotations

import dataclasses
import doctest
import typing
from typing import Any

import pytest

import kvroute
import kvroute.config
from kvroute.config import BusyThreshold, RouterConfig, RouterSettings
from kvroute.disagg import DisaggConfig
from kvroute.router import Router

#: A value other than the default for every field, valid.
OTHER: dict[str, Any] = {
    "block_size": 32,
    "kv_events": False,
    "predicted_ttl": 60.0,
    "predict_on_route": False,
    "fresh_ttl": 2.0,
    "request_timeout": 30.0,
    "sweep_interval": 0.5,
    "busy_threshold": BusyThreshold(max_active_requests=4),
    "admission": "sjf",
    "pin_balance_slack": 0.5,
    "pin_abs_slack": 1.0,
    "tiered": True,
    "journal": True,
    "disagg": DisaggConfig(local_prefill_tokens=512),
    "max_sessions": 1000,
    "drift_window": 8,
    "drift_threshold": 0.25,
    "drift_tolerance_blocks": 1.0,
}


def test_doctests() -> None:
    result = doctest.testmod(kvroute.config, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_every_field_is_listed_here_and_in_the_router_keywords() -> None:
    names = {f.name for f in dataclasses.fields(RouterConfig)}
    assert names == set(OTHER)
    # Router takes block_size as its own first parameter, the rest as RouterSettings
    assert set(typing.get_type_hints(RouterSettings)) == names - {"block_size"}
    assert all(OTHER[f.name] != f.default for f in dataclasses.fields(RouterConfig))


def test_the_router_defaults_are_the_config_defaults() -> None:
    r = Router()
    assert r.config == RouterConfig()
    assert (r.block_size, r.kv_events) == (16, True)


@pytest.mark.parametrize("name", sorted(OTHER))
def test_each_setting_reaches_the_router_as_a_keyword(name: str) -> None:
    r = Router(**{name: OTHER[name]})
    assert getattr(r.config, name) == OTHER[name]
    assert r.config == dataclasses.replace(RouterConfig(), **{name: OTHER[name]})


def test_a_config_and_keywords_together_the_keywords_win() -> None:
    cfg = RouterConfig(**OTHER)
    assert Router(config=cfg).config is cfg
    r = Router(8, config=cfg, journal=False, admission="fcfs")
    assert r.config == dataclasses.replace(cfg, block_size=8, journal=False, admission="fcfs")
    assert r.block_size == 8 and r.kv_events is False
    assert cfg.block_size == 32  # the given config is not changed
    # the settings act: a journal only when asked, event-free mode from the config
    assert Router(config=cfg, workers=[0]).journal()[0][1] == "add_worker"
    assert Router(config=cfg, workers=[0], journal=False).journal() == []


def test_the_router_refuses_what_is_not_a_setting() -> None:
    with pytest.raises(TypeError, match="config must be a RouterConfig, not dict"):
        Router(config={"block_size": 4})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'blocksize'"):
        Router(blocksize=4)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        Router(0, config=RouterConfig())


def test_numbers_are_stored_as_floats_and_flags_as_bools() -> None:
    cfg = RouterConfig(
        predicted_ttl=10,
        fresh_ttl=1,
        request_timeout=5,
        sweep_interval=0,
        pin_balance_slack=1,
        pin_abs_slack=0,
        kv_events=0,  # type: ignore[arg-type]
        journal=1,  # type: ignore[arg-type]
    )
    for name in ("predicted_ttl", "fresh_ttl", "request_timeout", "sweep_interval"):
        assert type(getattr(cfg, name)) is float
    assert type(cfg.pin_balance_slack) is float and type(cfg.pin_abs_slack) is float
    assert cfg.kv_events is False and cfg.journal is True


def test_the_config_is_frozen_and_replace_validates() -> None:
    cfg = RouterConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="request_timeout must be > 0"):
        dataclasses.replace(cfg, request_timeout=0)
    with pytest.raises(TypeError):
        RouterConfig(16)  # type: ignore[misc]  # keyword-only: no positional mix-ups
    assert cfg == RouterConfig() and hash(cfg) == hash(RouterConfig())


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        ({"block_size": 0}, ValueError, "block_size must be an int >= 1, got 0"),
        ({"block_size": 16.0}, ValueError, "block_size must be an int >= 1, got 16.0"),
        ({"block_size": True}, ValueError, "block_size must be an int >= 1, got True"),
        ({"admission": "lifo"}, ValueError, "admission must be 'fcfs' or 'sjf', not 'lifo'"),
        ({"busy_threshold": {"max_active_requests": 3}}, TypeError, "must be a BusyThreshold"),
        ({"predicted_ttl": 0}, ValueError, "predicted_ttl must be > 0"),
        ({"fresh_ttl": 0.0}, ValueError, "fresh_ttl must be > 0"),
        ({"request_timeout": -1}, ValueError, "request_timeout must be a finite number >= 0"),
        ({"request_timeout": float("inf")}, ValueError, "request_timeout must be a finite"),
        ({"predicted_ttl": "2m"}, TypeError, "predicted_ttl must be a number, not str"),
        ({"sweep_interval": -0.5}, ValueError, "sweep_interval must be a finite number >= 0"),
        ({"sweep_interval": None}, TypeError, "sweep_interval must be a number"),
        ({"pin_balance_slack": float("nan")}, ValueError, "pin_balance_slack must be a finite"),
        ({"pin_abs_slack": True}, TypeError, "pin_abs_slack must be a number, not bool"),
        ({"max_sessions": 0}, ValueError, "max_sessions must be an int >= 1, got 0"),
        ({"max_sessions": 1.5}, ValueError, "max_sessions must be an int >= 1, got 1.5"),
        ({"drift_window": True}, ValueError, "drift_window must be an int >= 1, got True"),
        ({"drift_threshold": 0}, ValueError, r"drift_threshold must be in \(0, 1\], got 0.0"),
        ({"drift_threshold": 1.5}, ValueError, r"drift_threshold must be in \(0, 1\]"),
        ({"drift_threshold": "x"}, TypeError, "drift_threshold must be a number, not str"),
        ({"drift_tolerance_blocks": -1}, ValueError, "drift_tolerance_blocks must be a finite"),
    ],
)
def test_bad_settings_raise_naming_the_field(
    kwargs: dict[str, Any], exc: type[Exception], msg: str
) -> None:
    with pytest.raises(exc, match=msg):
        RouterConfig(**kwargs)
    with pytest.raises(exc, match=msg):
        Router(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "msg"),
    [
        ({"max_prefill_tokens": -1}, ValueError, "max_prefill_tokens must be a finite number"),
        ({"max_active_requests": 2.5}, TypeError, "max_active_requests must be an int, not float"),
        ({"max_active_requests": True}, TypeError, "max_active_requests must be an int, not bool"),
        ({"max_active_requests": -1}, ValueError, "max_active_requests must be a finite number"),
        ({"max_waiting_requests": float("nan")}, ValueError, "max_waiting_requests must be"),
        ({"max_kv_usage": "90%"}, TypeError, "max_kv_usage must be a number, not str"),
    ],
)
def test_bad_busy_thresholds_raise_naming_the_limit(
    kwargs: dict[str, Any], exc: type[Exception], msg: str
) -> None:
    with pytest.raises(exc, match=msg):
        BusyThreshold(**kwargs)


def test_busy_threshold_keeps_its_limits() -> None:
    b = BusyThreshold(max_prefill_tokens=1000, max_active_requests=0, max_kv_usage=0.9)
    assert (b.max_prefill_tokens, b.max_active_requests, b.max_waiting_requests) == (1000, 0, None)
    assert BusyThreshold() == BusyThreshold(None, None, None, None)


def test_the_package_exports_the_config() -> None:
    assert "RouterConfig" in kvroute.__all__ and kvroute.RouterConfig is RouterConfig
    assert kvroute.BusyThreshold is BusyThreshold
    assert kvroute.router.BusyThreshold is BusyThreshold
