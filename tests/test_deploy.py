"""docs/deploy: the Dockerfile and the Kubernetes manifests are well formed, and their
command lines parse with the real ``kvroute proxy`` parser.

Docker and Kubernetes cannot run here; this is what can be checked without
them (docs/deploy.md says so).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

from kvroute.__main__ import build_parser  # noqa: E402
from kvroute.proxy.cli import build_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "docs" / "deploy"


def dockerfile() -> dict[str, Any]:
    """The Dockerfile's instructions of the last stage: ``{"ENTRYPOINT": [...], ...}``."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    stages: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "FROM":
            stages.append({"FROM": rest})
        else:
            stages[-1].setdefault(word, []).append(rest)
    return stages[-1]


def manifests() -> list[dict[str, Any]]:
    text = (DEPLOY / "kubernetes.yaml").read_text(encoding="utf-8")
    return [d for d in yaml.safe_load_all(text) if d is not None]


def proxy_args(argv: list[str]) -> Any:
    """Parse ``kvroute proxy ARGV`` with the real parser and build its configuration."""
    args = build_parser().parse_args(["proxy", *argv])
    return args, build_config(args)


def entrypoint() -> list[str]:
    (raw,) = dockerfile()["ENTRYPOINT"]
    value = json.loads(raw)  # exec form: a JSON array, so signals reach the proxy
    assert isinstance(value, list) and value[:2] == ["kvroute", "proxy"]
    return value[2:]


def test_the_dockerfile_runs_the_proxy_on_the_port_it_exposes() -> None:
    stage = dockerfile()
    assert stage["FROM"].startswith("python:3.")
    assert stage["USER"] != ["root"] and stage["USER"] != ["0"]
    (cmd,) = stage["CMD"]
    assert json.loads(cmd) == ["--help"]
    with pytest.raises(SystemExit) as info:  # `docker run kvroute` alone: the proxy's help
        proxy_args([*entrypoint(), *json.loads(cmd)])
    assert info.value.code == 0
    args, config = proxy_args([*entrypoint(), "--worker", "http://10.0.0.5:8000"])
    assert (args.host, args.port) == ("0.0.0.0", 8080)
    assert stage["EXPOSE"] == [str(args.port)]
    assert [w.url for w in config.workers] == ["http://10.0.0.5:8000"]
    # it installs the wheel it built with the proxy's extra
    assert any("[serve]" in run for run in stage["RUN"])


def test_the_manifests_have_what_a_cluster_requires() -> None:
    docs = manifests()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [("Deployment", "kvroute-proxy"), ("Service", "kvroute"), ("Service", "vllm")]
    by_name = {d["metadata"]["name"]: d for d in docs}
    deployment = by_name["kvroute-proxy"]
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    assert container["name"] and container["image"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        handler = container[probe].get("httpGet") or container[probe].get("tcpSocket")
        assert handler["port"] in ports
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    # the clients' Service selects the proxy's pods and targets its port
    front = by_name["kvroute"]
    assert front["apiVersion"] == "v1"
    assert front["spec"]["selector"].items() <= labels.items()
    (port,) = front["spec"]["ports"]
    assert port["targetPort"] in ports
    # the workers' headless Service: one DNS name per pod
    workers = by_name["vllm"]
    assert workers["spec"]["clusterIP"] == "None" or workers["spec"]["clusterIP"] is None
    assert {p["port"] for p in workers["spec"]["ports"]} == {8000, 5557, 5558}


def test_the_deployments_command_line_parses_with_the_real_parser() -> None:
    (container,) = next(d for d in manifests() if d["kind"] == "Deployment")["spec"]["template"][
        "spec"
    ]["containers"]
    assert "command" not in container  # the image's entry point runs, with these args
    args, config = proxy_args([*entrypoint(), *container["args"]])
    assert args.port == container["ports"][0]["containerPort"]
    assert [w.url for w in config.workers] == ["http://vllm-0.vllm:8000", "http://vllm-1.vllm:8000"]
    assert [(w.events_endpoint, w.replay_endpoint) for w in config.workers] == [
        (f"tcp://vllm-{i}.vllm:5557", f"tcp://vllm-{i}.vllm:5558") for i in range(2)
    ]
    assert config.kv_events and config.map_model("claude-sonnet-4-5") != "claude-sonnet-4-5"
