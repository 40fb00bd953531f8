"""The proxy's disaggregated legs: the wire fields, the usage patch, the options, the failures.

The field names are vLLM's (its toy proxy's ``kv_transfer_params`` for the
prefill leg) and SGLang's (``bootstrap_host`` / ``bootstrap_port`` /
``bootstrap_room``): pinned here. Failures run against real mock workers.
"""

from __future__ import annotations

import contextlib
import doctest
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_proxy_support import FAST_HEALTH, post

import kvroute.proxy.disagg
from kvroute import __main__ as cli
from kvroute.proxy import ProxyConfig, ProxyServer, WorkerSpec
from kvroute.proxy.cli import build_config
from kvroute.proxy.disagg import (
    REMOTE_DECODE,
    UsagePatch,
    decode_body,
    leg_usage,
    prefill_body,
    sglang_body,
)
from kvroute.testing import MockWorker

CHAT = [{"role": "user", "content": "Summarise the repository layout and its tests. " * 8}]


def test_doctests() -> None:
    result = doctest.testmod(kvroute.proxy.disagg, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_the_vllm_prefill_leg_asks_for_remote_decode_with_vllms_field_names() -> None:
    body = {
        "model": "m", "messages": CHAT, "stream": True, "max_tokens": 300,
        "max_completion_tokens": 300, "min_tokens": 5, "min_completion_tokens": 5,
        "stream_options": {"include_usage": True}, "temperature": 0.2,
    }  # fmt: skip
    out = prefill_body(body)
    assert out["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    assert out["kv_transfer_params"] is not REMOTE_DECODE
    assert (out["stream"], out["max_tokens"], out["max_completion_tokens"]) == (False, 1, 1)
    assert not {"stream_options", "min_tokens", "min_completion_tokens"} & set(out)
    assert out["messages"] == CHAT and out["temperature"] == 0.2
    assert body["stream"] is True and "kv_transfer_params" not in body  # the client's is kept
    params = {"do_remote_prefill": True, "remote_request_id": "r"}
    assert decode_body(body, params) == {**body, "kv_transfer_params": params}


def test_the_sglang_legs_carry_the_bootstrap_fields() -> None:
    out = sglang_body({"prompt": "x", "stream": True}, "10.1.2.3", 8998, 2**62)
    assert out == {
        "prompt": "x",
        "stream": True,
        "bootstrap_host": "10.1.2.3",
        "bootstrap_port": 8998,
        "bootstrap_room": 2**62,
    }


def sse(*events: tuple[str | None, Any]) -> bytes:
    out = b""
    for name, data in events:
        head = f"event: {name}\n" if name else ""
        out += f"{head}data: {json.dumps(data)}\n\n".encode()
    return out


def test_the_usage_patch_puts_the_prefill_legs_cache_reads_in_every_shape() -> None:
    chat = UsagePatch("chat", lambda: 32)
    usage = {"prompt_tokens": 40, "completion_tokens": 3}
    body = json.dumps({"usage": {**usage, "prompt_tokens_details": {"cached_tokens": 40}}})
    body = body.encode()
    assert json.loads(chat.body(body))["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert chat.body(b"not json") == b"not json"
    stream = (
        sse(
            (None, {"choices": [{"delta": {"content": "hi"}}]}),
            (None, {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 1}}),
        )
        + b"data: [DONE]\n\n"
    )
    half = len(stream) // 2
    out = chat.feed(stream[:half]) + chat.feed(stream[half:]) + chat.flush()
    events = [json.loads(e[6:]) for e in out.decode().split("\n\n") if e and "DONE" not in e]
    assert events[0]["choices"][0]["delta"]["content"] == "hi"
    assert events[1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert out.endswith(b"data: [DONE]\n\n")
    # Anthropic: the reads move out of input_tokens, the prompt's total kept
    msg = UsagePatch("messages", lambda: 24)
    usage = {"input_tokens": 0, "cache_read_input_tokens": 40, "output_tokens": 2}
    assert msg.usage(usage)
    assert usage == {"input_tokens": 16, "cache_read_input_tokens": 24, "output_tokens": 2}
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 40, "output_tokens": 0}},
    }
    out = msg.feed(sse(("message_start", start), ("ping", {"type": "ping"})))
    first = json.loads(out.split(b"\n\n")[0].split(b"data: ")[1])
    assert first["message"]["usage"] == {
        "input_tokens": 16, "output_tokens": 0, "cache_read_input_tokens": 24,
    }  # fmt: skip
    # no figure from the prefill leg: the decode leg's are dropped (the relay predicts)
    none = UsagePatch("chat", lambda: None)
    u = {"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 40}}
    assert none.usage(u) and u == {"prompt_tokens": 40}
    u = {"input_tokens": 0, "cache_read_input_tokens": 40, "output_tokens": 1}
    assert UsagePatch("messages", lambda: None).usage(u)
    assert u == {"input_tokens": 40, "output_tokens": 1}
    assert not chat.usage({"completion_tokens": 1}) and not chat.usage(None)


def test_a_legs_usage_is_read_from_json_and_from_streams() -> None:
    assert leg_usage("completions", b"{}", False) is None
    assert leg_usage("chat", b"[1]", False) is None
    stream = sse((None, {"choices": [], "usage": {
        "prompt_tokens": 9, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 8},
    }}))  # fmt: skip
    u = leg_usage("chat", stream, True)
    assert u is not None and (u.prompt_tokens, u.cached_tokens) == (9, 8)
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": 1, "cache_read_input_tokens": 16, "output_tokens": 0,
    }}}  # fmt: skip
    u = leg_usage("messages", sse(("message_start", start)), True)
    assert u is not None and (u.prompt_tokens, u.cached_tokens) == (17, 16)
    bare = {"type": "message_start", "message": {"usage": {"input_tokens": 17, "output_tokens": 0}}}
    assert leg_usage("messages", sse(("message_start", bare)), True) is None


def test_the_options_are_checked() -> None:
    p, d, b = (
        WorkerSpec(f"http://w{i}:8000", role=r) for i, r in enumerate(("prefill", "decode", "both"))
    )  # type: ignore[arg-type]
    assert ProxyConfig([p, d]).disaggregated and not ProxyConfig([b]).disaggregated
    assert ProxyConfig([p, b]).disaggregated  # the 'both' worker decodes
    with pytest.raises(ValueError, match="decodes"):
        ProxyConfig([p])
    with pytest.raises(ValueError, match="prefills"):
        ProxyConfig([d, d])
    with pytest.raises(ValueError, match="disagg_protocol"):
        ProxyConfig([p, d], disagg_protocol="nccl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SGLang decode"):
        ProxyConfig([p, d], disagg_protocol="sglang", disagg_local_prefill_tokens=64)
    with pytest.raises(ValueError, match="disagg_local_prefill_tokens"):
        ProxyConfig([p, d], disagg_local_prefill_tokens=-1)
    with pytest.raises(ValueError, match="disagg_bootstrap_port"):
        ProxyConfig([p, d], disagg_bootstrap_port=70000)


def test_the_command_line_names_workers_by_role() -> None:
    parser = cli.build_parser()
    args = parser.parse_args([
        "proxy", "--prefill-worker", "p0:8100=tcp://p0:5557", "--decode-worker", "d0:8200",
        "--worker", "b0:8000", "--prefill-worker", "p1:8100", "--disagg-protocol", "sglang",
        "--disagg-bootstrap-port", "9000",
    ])  # fmt: skip
    config = build_config(args)
    assert [(w.label, w.role) for w in config.workers] == [
        ("p0:8100", "prefill"), ("d0:8200", "decode"), ("b0:8000", "both"), ("p1:8100", "prefill"),
    ]  # fmt: skip
    assert config.workers[0].events_endpoint == "tcp://p0:5557"
    assert (config.disagg_protocol, config.disagg_bootstrap_port) == ("sglang", 9000)
    # each option's dest is its config field's name (a config file keys them so)
    for name in ("disagg_protocol", "disagg_local_prefill_tokens", "disagg_bootstrap_port"):
        assert hasattr(args, name) and hasattr(config, name)
    args = parser.parse_args(["proxy", "--disagg-local-prefill-tokens", "512"])
    needed = r"at least one worker is needed: give --worker \(or --prefill-worker and --decode"
    with pytest.raises(ValueError, match=needed):
        build_config(args)
    args = parser.parse_args(
        ["proxy", "--prefill-worker", "p:1", "--decode-worker", "d:2",
         "--disagg-local-prefill-tokens", "512"]
    )  # fmt: skip
    assert build_config(args).disagg_local_prefill_tokens == 512


# -- failures, against real mock workers ------------------------------------------


@contextlib.contextmanager
def fleet(
    roles: list[str],
    protocol: str = "vllm",
    worker_kw: dict[str, dict[str, Any]] | None = None,
    **config_kw: Any,
) -> Iterator[tuple[ProxyServer, list[MockWorker]]]:
    """Mock workers in ``roles`` (no KV events; ``worker_kw``: a role's MockWorker
    options) behind a proxy; everything stopped afterwards."""
    workers: list[MockWorker] = []
    server: ProxyServer | None = None
    try:
        for r in roles:
            w = MockWorker(
                publish_events=False, role=r, disagg_protocol=protocol, transfer_timeout=3.0,
                **(worker_kw or {}).get(r, {}),
            )  # fmt: skip
            workers.append(w.start())
        specs = [
            WorkerSpec(w.url, role=r, bootstrap_port=w.bootstrap_port or None)  # type: ignore[arg-type]
            for w, r in zip(workers, roles, strict=True)
        ]
        options = {**FAST_HEALTH, "disagg_protocol": protocol, **config_kw}
        server = ProxyServer(ProxyConfig(specs, **options)).start()
        yield server, workers
    finally:
        if server is not None:
            server.stop()
        for w in workers:
            w.stop()


def chat(server: ProxyServer, **kw: Any) -> tuple[int, dict[str, str], Any]:
    body = {"model": "mock-model", "messages": CHAT, "max_tokens": 4, **kw}
    status, headers, raw = post(server.url + "/v1/chat/completions", body)
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw


def released(server: ProxyServer) -> bool:
    r = server.router
    return all(
        r.load(w)["active_requests"] == 0 and r.load(w)["decode_blocks"] == 0 for w in r.workers()
    )


def until_hit(server: ProxyServer, worker: MockWorker) -> str:
    """Send new prompts until one reaches ``worker``; every answer must be a 200. Its id."""
    for i in range(12):
        rid = f"probe-{i}"
        body = {"model": "mock-model", "max_tokens": 4,
                "messages": [{"role": "user", "content": f"prompt {i}: " * 40}]}  # fmt: skip
        status, _, raw = post(server.url + "/v1/chat/completions", body, {"X-Request-Id": rid})
        assert status == 200, raw
        assert json.loads(raw)["usage"]["completion_tokens"] == 4
        if worker.http_requests().get("/v1/chat/completions"):
            return rid
    raise AssertionError("no request reached the worker")


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_a_failed_decode_leg_is_retried_with_a_new_prefill(protocol: str) -> None:
    with fleet(["prefill", "decode", "decode"], protocol) as (server, (p, d0, d1)):
        d0.fail_next(1)
        rid = until_hit(server, d0)
        # d0 failed it; d1 decoded the KV of a second prefill
        assert [r.request_id for r in p.requests()].count(rid) == 2
        assert [r.request_id for r in d1.requests()].count(rid) == 1
        assert not any(r.request_id == rid for r in d0.requests())
        assert server.proxy.metrics.value("kvroute_proxy_retries_total") == 1
        assert released(server)


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_when_every_decode_leg_fails_the_client_gets_a_clean_error(protocol: str) -> None:
    with fleet(["prefill", "decode"], protocol, retries=1) as (server, (_, d)):
        d.fail_next(5)
        t0 = time.monotonic()
        status, _, out = chat(server)
        assert status == 500 and "injected failure" in out["error"]["message"]
        assert time.monotonic() - t0 < 10  # never a hang
        assert released(server)
        d.fail_next(0)
        assert chat(server, stream=False)[0] in (200, 500)


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_a_failed_prefill_leg_is_retried_on_another_prefill_worker(protocol: str) -> None:
    with fleet(["prefill", "prefill", "decode"], protocol) as (server, (p0, p1, d)):
        p0.fail_next(1)
        rid = until_hit(server, p0)
        assert server.proxy.metrics.value("kvroute_proxy_retries_total") == 1
        # the failed prefill was never admitted; p1 prefilled it, d decoded its KV
        assert not any(r.request_id == rid for r in p0.requests())
        assert [r.request_id for r in p1.requests()].count(rid) == 1
        got = [r for r in d.requests() if r.request_id == rid]
        assert len(got) == 1 and got[0].transferred_tokens > 0
        assert released(server)


def test_a_prefill_workers_4xx_is_the_clients_answer() -> None:
    with fleet(["prefill", "decode"]) as (server, (_, d)):
        status, _, out = chat(server, messages=[{"role": "user", "content": "x" * 40_000}])
        assert status == 400 and "maximum context length" in out["error"]["message"]
        assert d.requests() == [] and released(server)
        assert server.proxy.metrics.value("kvroute_proxy_retries_total") == 0


def test_a_prefill_worker_that_is_no_vllm_prefill_fails_over_then_errs_cleanly() -> None:
    # a 'both' mock answers without kv_transfer_params: not a NixlConnector prefill
    with fleet(["both", "decode"], retries=1) as (server, (_, d)):
        server.router.add_worker(0, role="prefill")
        status, _, out = chat(server)
        assert status == 502 and "kv_transfer_params" in out["error"]["message"]
        assert d.requests() == [] and released(server)


def test_an_sglang_prefill_failure_ends_the_waiting_decode_leg() -> None:
    with fleet(["prefill", "decode"], "sglang", retries=0) as (server, (p, _)):
        p.fail_next(1)
        t0 = time.monotonic()
        status, _, out = chat(server, stream=True)
        assert status == 500 and "injected failure" in str(out)
        # the decode leg, waiting for a KV that never comes, was not waited for
        assert time.monotonic() - t0 < 2.5
        assert released(server)
        assert chat(server)[0] == 200


def test_conditional_disaggregation_prefills_warm_turns_on_the_decode_worker() -> None:
    with fleet(["prefill", "decode"], disagg_local_prefill_tokens=100) as (server, (p, d)):
        status, _, _ = chat(server, messages=CHAT)
        assert status == 200 and len(p.requests()) == 1  # nothing cached yet: remote
        turn = [*CHAT, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "go"}]
        status, _, second = chat(server, messages=turn)
        assert status == 200, second
        # the decode worker holds the first turn (predicted on route): it prefills itself
        assert len(p.requests()) == 1 and len(d.requests()) == 2
        assert d.requests()[-1].transferred_tokens == 0
        assert server.router.stats()["local_prefills"] == 1
        assert released(server)
