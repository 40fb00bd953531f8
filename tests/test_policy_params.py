"""kvroute.policies.params: NAME=VALUE policy parameters, checked and typed by the signature.

Also the two command lines that take them: ``replay --policy-param`` (a
policy registered here records what it was built with) and ``proxy
--policy-param`` (the proxy's router holds a policy built with them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvroute import __main__ as cli
from kvroute.policies import (
    Candidates,
    Choice,
    Features,
    check_policy_params,
    params_by_policy,
    parse_assignment,
    policy_parameters,
    register_policy,
)
from kvroute.policies.base import _REGISTRY
from kvroute.policies.params import coerce
from kvroute.sim.seeding import policy_seed


def test_parse_assignment() -> None:
    assert parse_assignment("a=b") == ("a", "b")
    assert parse_assignment(" x = 1=2 ") == ("x", "1=2")
    assert parse_assignment("empty=") == ("empty", "")
    for bad in ("novalue", "=1", " = 1"):
        with pytest.raises(ValueError, match="expected NAME=VALUE"):
            parse_assignment(bad)


def test_values_are_typed_by_the_signature() -> None:
    got = check_policy_params(
        "kv_cost", {"router_temperature": "0.5", "seed": "7", "prefill_load_scale": 2}
    )
    assert got == {"router_temperature": 0.5, "seed": 7, "prefill_load_scale": 2.0}
    assert type(got["prefill_load_scale"]) is float and type(got["seed"]) is int
    assert check_policy_params("kv_cost", {"seed": "none"}) == {"seed": None}
    assert check_policy_params("round_robin", {"start": 3}) == {"start": 3}


@pytest.mark.parametrize(
    ("policy", "params", "message"),
    [
        ("kv_cost", {"router_temperature": "hot"},
         "router_temperature: expected a number, got 'hot'"),
        ("kv_cost", {"router_temperature": True}, "router_temperature: expected a number"),
        ("kv_cost", {"seed": "1.5"}, "seed: expected an integer or none, got '1.5'"),
        ("kv_cost", {"router_temperature": "nan"}, "expected a number"),
        ("round_robin", {"start": "none"}, "start: expected an integer, got 'none'"),
    ],
)  # fmt: skip
def test_bad_values_name_the_parameter(policy: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_policy_params(policy, params)


def test_an_unknown_name_lists_the_policys_parameters() -> None:
    with pytest.raises(ValueError) as info:
        check_policy_params("kvroute", {"router_temperature": "0.5"})
    message = str(info.value)
    assert message.startswith("router_temperature: not a parameter of policy 'kvroute'")
    known, _ = policy_parameters("kvroute")
    assert "balance_slack" in known and all(name in message for name in known)
    with pytest.raises(ValueError, match=r"its parameters: none"):
        check_policy_params("least_loaded", {"x": "1"})
    with pytest.raises(KeyError, match="unknown routing policy 'nosuch'"):
        check_policy_params("nosuch", {})


def test_coerce_bools_literals_and_any() -> None:
    from typing import Literal

    for text, value in (("true", True), ("Off", False), ("1", True), ("no", False)):
        assert coerce(text, bool, "b") is value
    with pytest.raises(ValueError, match="b: expected true or false, got 'maybe'"):
        coerce("maybe", bool, "b")
    with pytest.raises(ValueError, match="b: expected true or false, got 1"):
        coerce(1, bool, "b")
    assert coerce("sjf", Literal["fcfs", "sjf"], "a") == "sjf"
    assert coerce("12", Any, "x") == 12 and coerce("1.5", Any, "x") == 1.5
    assert coerce("true", Any, "x") is True and coerce("word", Any, "x") == "word"
    with pytest.raises(ValueError, match="s: expected a string, got 3"):
        coerce(3, str, "s")


class _Recorder:
    """A policy that records what it was built with (and always picks the first worker)."""

    built: list[dict[str, Any]] = []  # noqa: RUF012 - shared on purpose: the test reads it
    name = "test_recorder"
    uses_tiers = False

    def __init__(self, tag: str = "", weight: float = 1.0, **extra: Any) -> None:
        self.built.append({"tag": tag, "weight": weight, **extra})

    def choose(self, candidates: Candidates, features: Features) -> Choice:
        return Choice(0, {})


@pytest.fixture
def recorder() -> Iterator[type[_Recorder]]:
    register_policy("test_recorder", _Recorder)
    _Recorder.built.clear()
    try:
        yield _Recorder
    finally:
        del _REGISTRY["test_recorder"]


def test_a_policy_taking_any_keyword_accepts_any_name(recorder: type[_Recorder]) -> None:
    known, open_ended = policy_parameters("test_recorder")
    assert list(known) == ["tag", "weight"] and open_ended
    got = check_policy_params("test_recorder", {"weight": "2", "depth": "3", "mode": "fast"})
    assert got == {"weight": 2.0, "depth": 3, "mode": "fast"}


def test_params_by_policy_scopes_names(recorder: type[_Recorder]) -> None:
    got = params_by_policy(
        ["kv_cost", "test_recorder"],
        [("seed", "1"), ("kv_cost.router_temperature", "0.5"), ("test_recorder.seed", "2")],
    )
    assert got == {
        "kv_cost": {"seed": 1, "router_temperature": 0.5},
        "test_recorder": {"seed": 2},
    }
    with pytest.raises(ValueError, match=r"seed: not a parameter of policy 'least_loaded'.*"
                       r"scope a parameter to one policy as POLICY.NAME"):  # fmt: skip
        params_by_policy(["kv_cost", "least_loaded"], [("seed", "1")])
    with pytest.raises(ValueError, match=r"'random' is not one of the policies run"):
        params_by_policy(["kv_cost"], [("random.seed", "1")])


def test_replay_builds_each_policy_with_its_parameters(
    recorder: type[_Recorder], tmp_path: Path
) -> None:
    out = tmp_path / "r.json"
    status = cli.main([
        "replay", "default", "--policy", "test_recorder,round_robin", "--limit", "20",
        "--workers", "2", "--policy-param", "test_recorder.tag=abc",
        "--policy-param", "test_recorder.weight=0.25", "--json", str(out),
    ])  # fmt: skip
    assert status == 0
    # besides one default instance (the parameter check reads the signature's defaults),
    # every build has the given parameters and the seed --seed (0) derives for the policy
    given = {"tag": "abc", "weight": 0.25, "seed": policy_seed(0, "test_recorder")}
    runs = [b for b in recorder.built if b != {"tag": "", "weight": 1.0, "seed": 0}]
    assert runs and all(b == given for b in runs)
    results = json.loads(out.read_text())["results"]
    assert set(results["policies"]) == {"test_recorder", "round_robin"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policy-param", "router_temperature=0.5"],
         "router_temperature: not a parameter of policy 'kvroute'"),
        (["--policy-param", "kv_cost.router_temperature=warm"],
         "router_temperature: expected a number, got 'warm'"),
        (["--policy-param", "sim:round_robin.x=1"], "'sim:round_robin' takes no parameters"),
    ],
)  # fmt: skip
def test_replay_refuses_bad_parameters_before_running(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["replay", "default", "--policy", "kvroute,kv_cost,sim:round_robin", *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_replay_flag_syntax_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["replay", "default", "--policy-param", "router_temperature"])
    assert info.value.code == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_proxy_builds_its_policy_with_the_parameters() -> None:
    pytest.importorskip("aiohttp")
    from kvroute.proxy.app import ProxyApp
    from kvroute.proxy.cli import build_config

    argv = ["proxy", "--worker", "http://127.0.0.1:1", "--policy", "kv_cost",
            "--policy-param", "router_temperature=0.5", "--policy-param", "seed=3"]  # fmt: skip
    config = build_config(cli.build_parser().parse_args(argv))
    assert dict(config.policy_params) == {"router_temperature": 0.5, "seed": 3}
    policy: Any = ProxyApp(config).router.policy
    assert policy.name == "kv_cost" and policy.router_temperature == 0.5
