"""Disaggregated requests under the proxy's operations and reliability parts.

What main's parts do for every request, checked for a request with two legs:
the access log names both workers, a deadline and a client hang-up release
both legs' load, a failed decode leg counts against the decode worker in
outlier detection, a stream is not migrated, the Responses API is refused
cleanly, workers that join at run time join with their role, and the
disaggregation options are config-file keys shown by ``--print-config``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from test_proxy_disagg import CHAT, chat, fleet, released
from test_proxy_fleet import TOKEN, admin
from test_proxy_settings import _proxy_parser
from test_proxy_support import FAST_HEALTH, post

from kvroute.proxy import ProxyApp, ProxyConfig, WorkerSpec
from kvroute.proxy.bodies import encode_body
from kvroute.proxy.call import Call
from kvroute.proxy.cli import build_config
from kvroute.proxy.settings import apply_layers, load_file, render_toml
from kvroute.testing import MockWorker

pytest.importorskip("aiohttp")


def test_the_access_log_names_the_prefill_and_the_decode_worker(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with fleet(["prefill", "decode"], access_log=str(log)) as (server, _):
        assert chat(server)[0] == 200
        assert post(server.url + "/v1/responses", {"model": "mock-model", "input": "hi"})[0] == 501
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    ok = [x for x in lines if x["path"] == "/v1/chat/completions"]
    assert len(ok) == 1
    assert (ok[0]["worker"], ok[0]["decode_worker"], ok[0]["outcome"]) == (0, 1, "ok")
    assert ok[0]["ttft_ms"] is not None and ok[0]["output_tokens"] == 4
    refused = [x for x in lines if x["path"] == "/v1/responses"]
    assert refused[0]["status"] == 501 and refused[0]["decode_worker"] is None


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_a_deadline_mid_stream_releases_both_legs(protocol: str) -> None:
    slow = {"decode": {"token_delay": 0.1}}
    with fleet(["prefill", "decode"], protocol, slow, deadline=0.6) as (server, _):
        status, _, raw = post(
            server.url + "/v1/chat/completions",
            {"model": "mock-model", "messages": CHAT, "max_tokens": 200, "stream": True},
        )
        assert status == 200 and b"deadline" in raw
        assert wait_until(lambda: released(server), timeout=5)


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_a_client_hang_up_releases_both_legs(protocol: str) -> None:
    slow = {"decode": {"token_delay": 0.1}}
    with fleet(["prefill", "decode"], protocol, slow) as (server, (_, d)):
        url = urllib.parse.urlsplit(server.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        body = {"model": "mock-model", "messages": CHAT, "max_tokens": 200, "stream": True}
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read1(256).startswith(b"data: ")  # the decode leg streams
        assert server.router.load(1)["active_requests"] == 1
        conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        conn.close()
        assert wait_until(lambda: released(server), timeout=5)
        assert wait_until(lambda: d.stats().running == 0, timeout=5)  # the worker aborted it


def test_a_failed_decode_leg_counts_against_the_decode_worker() -> None:
    with fleet(["prefill", "decode"], retries=0) as (server, (_, d)):
        outliers = server.proxy.outliers
        d.fail_next(1)
        assert chat(server)[0] == 500
        assert (outliers.state(0).consecutive, outliers.state(1).consecutive) == (0, 1)
        assert chat(server)[0] == 200
        assert (outliers.state(0).consecutive, outliers.state(1).consecutive) == (0, 0)
        assert released(server)


def test_streams_of_a_disaggregated_fleet_are_not_migrated() -> None:
    config = ProxyConfig([WorkerSpec("http://127.0.0.1:9", role="prefill"),
                          WorkerSpec("http://127.0.0.1:10", role="decode")])  # fmt: skip
    app = ProxyApp(config)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    call = Call("chat", "/v1/chat/completions", body, encode_body(body), True, False, "r", {})
    assert app.migrator.transcript(call) is None
    both = ProxyApp(ProxyConfig([WorkerSpec("http://127.0.0.1:9")]))
    assert both.migrator.transcript(call) is not None  # the same call elsewhere would be


def test_a_decode_worker_added_at_run_time_joins_with_its_role() -> None:
    with fleet(["prefill", "decode"], admin_token=TOKEN) as (server, (_, d0)):
        d1 = MockWorker(publish_events=False, role="decode", transfer_timeout=3.0).start()
        try:
            status, _, added = admin(
                server, "POST", "/admin/workers", {"url": d1.url, "role": "decode"}
            )
            assert status in (200, 201), added
            wid = added["id"]
            assert server.router.role(wid) == "decode"
            assert wait_until(lambda: server.proxy.pool.workers[wid].healthy, timeout=10)
            for i in range(8):
                turn = [{"role": "user", "content": f"request {i} " * 30}]
                assert chat(server, messages=turn)[0] == 200
            # decode load is balanced over both decode workers; the new one never prefills
            assert d1.requests() and d0.requests()
            assert all(r.transferred_tokens > 0 for r in d1.requests())
            assert released(server)
        finally:
            d1.stop()


def _resolve(path: Path) -> tuple[argparse.Namespace, Any, ProxyConfig, str]:
    """``kvroute proxy --config PATH``: args, settings, config, and what --print-config shows."""
    parser = _proxy_parser()
    argv = ["--config", str(path)]
    args = parser.parse_args(argv)
    settings = apply_layers(parser, argv, args, load_file(path), str(path), {})
    config = build_config(args, settings.flagless)
    return args, settings, config, render_toml(parser, args, config, settings)


def test_the_options_are_config_file_keys_shown_by_print_config(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(
        'disagg_protocol = "sglang"\ndisagg_bootstrap_port = 9100\n'
        '[[workers]]\nurl = "http://127.0.0.1:8100"\nrole = "prefill"\nbootstrap_port = 9200\n'
        '[[workers]]\nurl = "http://127.0.0.1:8200"\nrole = "decode"\n'
    )
    _, _, config, shown = _resolve(path)
    assert [w.role for w in config.workers] == ["prefill", "decode"]
    assert (config.disagg_protocol, config.disagg_bootstrap_port) == ("sglang", 9100)
    assert config.workers[0].bootstrap_port == 9200
    assert 'disagg_protocol = "sglang"' in shown and "disagg_local_prefill_tokens = 0" in shown
    assert 'role = "prefill"' in shown and 'role = "decode"' in shown
    # what it prints reads back as the same configuration
    again = tmp_path / "again.toml"
    again.write_text(shown)
    assert _resolve(again)[2] == config


def test_the_proxy_refuses_the_responses_api_in_a_disaggregated_fleet_only() -> None:
    with fleet(["both"], **FAST_HEALTH) as (server, _):
        status, _, _ = post(server.url + "/v1/responses", {"model": "mock-model", "input": "hi"})
        assert status == 200
    with fleet(["prefill", "decode"]) as (server, (p, d)):
        status, _, raw = post(server.url + "/v1/responses", {"model": "mock-model", "input": "hi"})
        assert status == 501 and b"disaggregated" in raw
        assert p.requests() == [] and d.requests() == []
