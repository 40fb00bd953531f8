"""docs/operations.md stays true: its generated reference, its access log fields, its metrics.

The configuration reference is generated from the parser, ProxyConfig,
RouterConfig and the policies' signatures by scripts/operations_reference.py;
the page's copy must be what it generates now. The access log table must
list exactly the fields a line has, and every series the metrics table
names must be one a proxy exports.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from kvroute.proxy import ProxyConfig, parse_worker
from kvroute.proxy.access_log import FIELDS
from kvroute.proxy.app import ProxyApp

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "operations.md"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "operations_reference", ROOT / "scripts" / "operations_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(title: str) -> str:
    text = PAGE.read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, title
    return m.group(1)


def test_the_generated_reference_is_current() -> None:
    script = _script()
    text = PAGE.read_text(encoding="utf-8")
    assert script.current(text) == script.render(), (
        "docs/operations.md's reference is stale: run python scripts/operations_reference.py"
    )


def test_every_config_field_is_in_the_reference() -> None:
    reference = _script().current(PAGE.read_text(encoding="utf-8"))
    for f in dataclasses.fields(ProxyConfig):
        assert f"| `{f.name}`" in reference, f.name


def test_the_access_log_table_lists_the_fields_of_a_line() -> None:
    rows = re.findall(r"^\| (`[^|]+`) \|", _section("The access log"), re.M)
    named = [name for row in rows for name in re.findall(r"`(\w+)`", row)]
    assert named == list(FIELDS)


def test_every_series_in_the_metrics_table_is_exported() -> None:
    proxy = ProxyApp(ProxyConfig([parse_worker("http://127.0.0.1:9")]))
    proxy.metrics.request_finished(0, 1.0, 0.1, 0.01, 10, 2)
    proxy.metrics.tokenize_seconds.observe(0.001)
    exported = {m.name for m in proxy.metrics.registry.collect()}
    rows = re.findall(r"^\| `(kvroute_\w+)` \|", _section("Metrics"), re.M)
    assert len(rows) >= 10
    for name in rows:
        assert name in exported, name
    docs = PAGE.read_text(encoding="utf-8") + (ROOT / "docs" / "integration.md").read_text(
        encoding="utf-8"
    )
    for name in exported:  # and every series of the proxy's is named somewhere
        mine = ("kvroute_worker_info", "kvroute_worker_waiting", "kvroute_worker_kv_usage")
        if name.startswith(("kvroute_proxy_", "kvroute_tokenize", *mine)):
            assert f"`{name}" in docs, name


def test_the_readme_links_the_page() -> None:
    assert "docs/operations.md" in (ROOT / "README.md").read_text(encoding="utf-8")
