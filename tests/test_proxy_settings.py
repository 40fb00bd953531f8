"""The proxy's settings: --config files (TOML, YAML), secrets from the environment, precedence,
errors naming the file and the key, and --print-config round-tripping.

Most tests run the real ``kvroute`` entry point in-process (``--print-config``
prints the effective settings and exits, so nothing listens); one runs it in
a subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from kvroute import __main__ as cli
from kvroute.config import BusyThreshold
from kvroute.proxy import ProxyConfig, WorkerSpec
from kvroute.proxy.cli import build_config
from kvroute.proxy.settings import (
    ConfigError,
    apply_layers,
    load_file,
    parse_pairs,
    read_layer,
    setting_actions,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

TOML = """\
policy = "kv_cost"
retries = 5
max-body-size = "1M"
access_log = "off"
tokenize_timeout = 12
scrape_metrics = false
models = ["m1", "m2"]

[policy_params]
router_temperature = 0.5
seed = 1

[router]
fresh_ttl = 10
admission = "sjf"
busy_threshold = { max_active_requests = 8 }

[model_map]
"claude-*" = "qwen"

[[workers]]
url = "http://127.0.0.1:8001"
events = "tcp://127.0.0.1:5557"
name = "w0"

[[workers]]
url = "127.0.0.1:8002"
role = "decode"
"""


def _proxy_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["proxy"]


def _resolve(
    argv: list[str], text: str | None = None, env: dict[str, str] | None = None,
    tmp: Path | None = None, name: str = "proxy.toml",
) -> tuple[argparse.Namespace, Any, ProxyConfig]:  # fmt: skip
    """Parse ``proxy ARGV`` with a config file of ``text`` and ``env``: args, settings, config."""
    parser = _proxy_parser()
    data = origin = None
    if text is not None:
        assert tmp is not None
        path = tmp / name
        path.write_text(text)
        origin = str(path)
        data = load_file(path)
    args = parser.parse_args(argv)
    settings = apply_layers(parser, argv, args, data, origin, env or {})
    return args, settings, build_config(args, settings.flagless)


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        status = cli.main(argv)
    except SystemExit as e:
        status = int(e.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_a_toml_file_sets_every_kind_of_option(tmp_path: Path) -> None:
    _, settings, config = _resolve([], TOML, tmp=tmp_path)
    assert config.workers == (
        WorkerSpec("http://127.0.0.1:8001", "tcp://127.0.0.1:5557", name="w0"),
        WorkerSpec("http://127.0.0.1:8002", role="decode"),
    )
    assert config.policy == "kv_cost" and config.retries == 5
    assert config.max_body_size == 1 << 20 and config.access_log == "off"
    assert not config.scrape_metrics and config.models == ("m1", "m2")
    assert config.model_map == (("claude-*", "qwen"),)
    assert config.tokenize_timeout == 12.0  # a field without a flag, by its name
    assert dict(config.policy_params) == {"router_temperature": 0.5, "seed": 1}
    assert dict(config.router) == {
        "fresh_ttl": 10.0, "admission": "sjf",
        "busy_threshold": BusyThreshold(max_active_requests=8),
    }  # fmt: skip
    assert settings.sources["retries"] == str(tmp_path / "proxy.toml")
    assert settings.sources["port"] == "default"


def test_yaml_is_read_alike(tmp_path: Path) -> None:
    yaml_text = """\
policy: kv_cost
retries: 5
max_body_size: 1M
access_log: "off"
tokenize_timeout: 12
scrape_metrics: false
models: [m1, m2]
policy_params: {router_temperature: 0.5, seed: 1}
router:
  fresh_ttl: 10
  admission: sjf
  busy_threshold: {max_active_requests: 8}
model_map: {"claude-*": qwen}
workers:
  - {url: "http://127.0.0.1:8001", events: "tcp://127.0.0.1:5557", name: w0}
  - {url: "127.0.0.1:8002", role: decode}
"""
    _, _, from_toml = _resolve([], TOML, tmp=tmp_path)
    _, _, from_yaml = _resolve([], yaml_text, tmp=tmp_path, name="proxy.yaml")
    assert from_yaml == from_toml


def test_command_line_beats_environment_beats_file(tmp_path: Path) -> None:
    text = 'upstream_api_key = "from-file"\n' + TOML
    # given on the command line, even at its default value, the flag wins
    _, settings, config = _resolve(["--retries", "2"], text, tmp=tmp_path)
    assert config.retries == 2 and settings.sources["retries"] == "command line"
    assert config.upstream_api_key == "from-file"
    env = {"KVROUTE_UPSTREAM_API_KEY": "from-env"}
    _, settings, config = _resolve([], text, env, tmp=tmp_path)
    assert config.upstream_api_key == "from-env"
    assert settings.sources["upstream_api_key"] == "env KVROUTE_UPSTREAM_API_KEY"
    _, _, config = _resolve(["--upstream-api-key", "from-cli"], text, env, tmp=tmp_path)
    assert config.upstream_api_key == "from-cli"
    # a worker on the command line replaces the file's list
    _, _, config = _resolve(["--worker", "http://127.0.0.1:9000"], text, tmp=tmp_path)
    assert [w.url for w in config.workers] == ["http://127.0.0.1:9000"]


def test_policy_params_and_router_settings_merge_by_name(tmp_path: Path) -> None:
    argv = ["--policy-param", "seed=2", "--router-setting", "busy_threshold.max_kv_usage=0.9"]
    _, settings, config = _resolve(argv, TOML, tmp=tmp_path)
    assert dict(config.policy_params) == {"router_temperature": 0.5, "seed": 2}
    assert config.router["fresh_ttl"] == 10.0
    assert config.router["busy_threshold"] == BusyThreshold(
        max_active_requests=8, max_kv_usage=0.9
    )
    assert settings.sources["policy_params"].endswith(" + command line")


def test_router_settings_reach_the_router(tmp_path: Path) -> None:
    from kvroute.proxy.app import ProxyApp

    _, _, config = _resolve(["--router-setting", "predicted_ttl=30"], TOML, tmp=tmp_path)
    router = ProxyApp(config).router
    assert router.config.fresh_ttl == 10.0 and router.config.predicted_ttl == 30.0
    assert router.config.admission == "sjf"
    assert router.config.busy_threshold == BusyThreshold(max_active_requests=8)
    assert router.config.kv_events  # from the workers' events endpoints, not a setting


def test_environment_variables_in_the_file(tmp_path: Path) -> None:
    text = 'workers = ["${HOST}:8001"]\nsession_header = "X-$${literal}"\n'
    _, _, config = _resolve([], text, {"HOST": "10.1.2.3"}, tmp=tmp_path)
    assert config.workers[0].url == "http://10.1.2.3:8001"
    assert config.session_header == "X-${literal}"


def test_every_config_field_and_option_is_a_key() -> None:
    """A key per ProxyConfig field (by name) and per option (by dest): none is unknown."""
    actions = setting_actions(_proxy_parser())
    for f in dataclasses.fields(ProxyConfig):
        try:
            read_layer({f.name: None}, "x.toml", actions, {})
        except ConfigError as e:
            assert "unknown key" not in str(e), f.name
    for dest in actions:
        try:
            read_layer({dest: None}, "x.toml", actions, {})
        except ConfigError as e:
            assert "unknown key" not in str(e), dest


ERRORS = [
    ("retrys = 3\n", "proxy.toml: retrys: unknown key (did you mean 'retries'?)"),
    ('workers = ["a:1"]\nretries = -1\n', "proxy.toml: retries: must be >= 0, got -1"),
    ('workers = ["a:1"]\nretries = true\n', "proxy.toml: retries:"),
    ('workers = ["a:1"]\nretries = 1.5\n', "proxy.toml: retries:"),
    ('workers = ["a:1"]\nscrape_metrics = "no"\n',
     "proxy.toml: scrape_metrics: expected true or false, got 'no'"),
    ('workers = ["a:1"]\ntokenize_with = "fast"\n',
     "proxy.toml: tokenize_with: expected one of 'auto', 'local', 'render', 'tokenize'"),
    ('workers = ["a:1"]\ntokenize_timeout = "soon"\n',
     "proxy.toml: tokenize_timeout: expected a number, got 'soon'"),
    ('workers = ["a:1"]\nmodels = "m"\nport = [1]\n', "proxy.toml: port: expected a single value"),
    ('[[workers]]\nurl = "a:1"\n[[workers]]\nurl = "a:2"\n[[workers]]\nurl = "a:3"\n'
     'role = "prefil"\n',
     "proxy.toml: workers[2].role: role must be one of both, prefill, decode, not 'prefil'"),
    ('[[workers]]\nurl = "a:1"\nport = 3\n', "proxy.toml: workers[0].port: unknown key (known:"),
    ('[[workers]]\nurl = "ftp://a"\n', "proxy.toml: workers[0].url: 'ftp://a' is not an http(s)"),
    ('[[workers]]\nurl = "a:1"\nreplay = "tcp://a:2"\n',
     "proxy.toml: workers[0].replay: a replay_endpoint needs an events_endpoint"),
    ('workers = ["a:1"]\n[policy_params]\ntemperature = 1\n',
     "proxy.toml: policy_params.temperature: not a parameter of policy 'kvroute'"),
    ('workers = ["a:1"]\npolicy = "kv_cost"\n[policy_params]\nrouter_temperature = -1\n',
     "proxy.toml: policy_params.router_temperature must be a finite number >= 0"),
    ('workers = ["a:1"]\n[router]\nfresh_ttl = 0\n', "proxy.toml: router.fresh_ttl must be > 0"),
    ('workers = ["a:1"]\n[router]\nblock_size = 32\n',
     "proxy.toml: router.block_size: unknown router setting (known: predicted_ttl,"),
    ('workers = ["a:1"]\n[router.busy_threshold]\nmax_tokens = 3\n',
     "proxy.toml: router.busy_threshold.max_tokens: unknown limit"),
    ('workers = ["a:1"]\nupstream_api_key = "${KVROUTE_TEST_UNSET}"\n',
     "proxy.toml: upstream_api_key: ${KVROUTE_TEST_UNSET} is not set in the environment"),
    ('workers = ["a:1"\n', "proxy.toml: not valid TOML"),
    ("config = 'other.toml'\n", "proxy.toml: config: unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[m.split(": ")[1] for _, m in ERRORS])
def test_a_bad_file_exits_2_naming_the_file_and_the_key(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    status, _, err = _main(["proxy", "--config", str(path), "--print-config"], capsys)
    assert status == 2
    assert message.replace("proxy.toml", str(path)) in err, err


def test_yaml_and_missing_files_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("workers: [a:1\n")
    status, _, err = _main(["proxy", "--config", str(bad)], capsys)
    assert status == 2 and f"{bad}: not valid YAML" in err
    bad.write_text("- a list\n")
    status, _, err = _main(["proxy", "--config", str(bad)], capsys)
    assert status == 2 and "the file must hold a table of settings, not list" in err
    missing = tmp_path / "nope.toml"
    status, _, err = _main(["proxy", "--config", str(missing)], capsys)
    assert status == 2 and f"{missing}: cannot read the config file" in err


def test_no_worker_anywhere_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text("retries = 1\n")
    status, _, err = _main(["proxy", "--config", str(path)], capsys)
    assert status == 2
    assert "usage: kvroute proxy" in err and "no workers: give --worker" in err
    assert "workers in --config FILE" in err


def test_print_config_round_trips_and_redacts_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('upstream_api_key = "s3cr3t-value"\n' + TOML)
    argv = ["proxy", "--config", str(path), "--retries", "3", "--policy-param", "seed=9",
            "--model-map", "gpt-*=qwen", "--tokenizer", "/models/x"]  # fmt: skip
    status, printed, _ = _main([*argv, "--print-config"], capsys)
    assert status == 0
    assert "s3cr3t-value" not in printed
    assert 'upstream_api_key = "${KVROUTE_UPSTREAM_API_KEY}"' in printed
    tomllib.loads(printed)  # valid TOML
    again = tmp_path / "effective.toml"
    again.write_text(printed)
    monkeypatch.setenv("KVROUTE_UPSTREAM_API_KEY", "s3cr3t-value")
    status, reprinted, _ = _main(["proxy", "--config", str(again), "--print-config"], capsys)
    assert status == 0

    def settings(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    assert settings(reprinted) == settings(printed)
    parser = _proxy_parser()
    first = parser.parse_args(argv[1:])
    s1 = apply_layers(parser, argv[1:], first, load_file(path), str(path), {})
    second = parser.parse_args(["--config", str(again)])
    env = {"KVROUTE_UPSTREAM_API_KEY": "s3cr3t-value"}
    s2 = apply_layers(parser, ["--config", str(again)], second, load_file(again), str(again), env)
    a, b = build_config(first, s1.flagless), build_config(second, s2.flagless)
    assert a == b
    assert b.tokenize_timeout == 12.0 and b.upstream_api_key == "s3cr3t-value"
    assert b.retries == 3 and dict(b.policy_params) == {"router_temperature": 0.5, "seed": 9}
    assert b.model_map == (("gpt-*", "qwen"),)


def test_print_config_of_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    status, printed, _ = _main(["proxy", "--worker", "127.0.0.1:8001", "--print-config"], capsys)
    assert status == 0
    doc = tomllib.loads(printed)
    assert doc["workers"] == [{"url": "http://127.0.0.1:8001"}]
    assert doc["retries"] == 2 and doc["port"] == 8080 and doc["access_log"] == "stderr"
    assert "# tokenizer =  (not set)" in printed
    assert "# upstream_api_key =  (not set; a secret: $KVROUTE_UPSTREAM_API_KEY)" in printed


def test_parse_pairs_nests_dotted_names() -> None:
    assert parse_pairs(["a=1", ("b.c", "2"), "b.d=x"]) == {"a": "1", "b": {"c": "2", "d": "x"}}


def test_print_config_in_a_subprocess_with_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yml"
    path.write_text("workers:\n  - url: 127.0.0.1:8001\n    name: gpu0\nretries: 4\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVROUTE_CONFIG": str(path)}
    done = subprocess.run(
        [sys.executable, "-m", "kvroute", "proxy", "--print-config", "--block-size", "32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = tomllib.loads(done.stdout)
    assert doc["workers"] == [{"url": "http://127.0.0.1:8001", "name": "gpu0"}]
    assert doc["retries"] == 4 and doc["block_size"] == 32
    assert f"# From: {path} + command line." in done.stdout
