"""kvroute.proxy, OpenAI side: real HTTP on loopback through the proxy to MockWorkers.

Routing input, session stickiness, the cache hits the workers really had,
hints reaching the router, error codes and shapes, /v1/models, /health and
/metrics.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from test_proxy_support import SYSTEM, chat, fleet, get, post, routed_requests, sse_data

from kvroute import CacheControl
from kvroute.proxy import CACHE_SOURCE_HEADER, WORKER_HEADER
from kvroute.testing._tokenizer import MockTokenizer

MODEL = "mock-model"


def test_chat_multi_turn_sticks_and_reports_the_workers_real_hits() -> None:
    with fleet(3) as (proxy, workers):
        served = []
        for turn in range(1, 5):
            rid = f"chat-{turn}"
            status, headers, body = post(
                proxy.url + "/v1/chat/completions",
                {"model": MODEL, "messages": chat(turn), "max_tokens": 4},
                {"X-Request-Id": rid, "X-Session-Id": "agent-1"},
            )
            assert status == 200, body
            worker = int(headers[WORKER_HEADER])
            served.append(worker)
            answer = json.loads(body)
            cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
            # The figure the client sees is the worker's own count for this request.
            assert workers[worker].cache_hits()[rid] == cached
            assert headers[CACHE_SOURCE_HEADER] == "worker"
            if turn > 1:
                assert cached > len(SYSTEM) // 2
        assert len(set(served)) == 1, served
        # The router was given the same token ids the worker rendered.
        rec = workers[served[0]].requests()[-1]
        tokens = routed_requests(proxy.router)[-1].tokens
        assert list(tokens) == list(rec.prompt_token_ids)
        # read from the render answer straight into the array the hashing takes
        assert isinstance(tokens, np.ndarray) and tokens.dtype == np.uint32


def test_chat_stream_passes_chunks_and_strips_the_usage_it_asked_for() -> None:
    with fleet(2) as (proxy, workers):
        url = proxy.url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 5, "stream": True}
        status, headers, raw = post(url, body, {"X-Request-Id": "s1"})
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        events = sse_data(raw)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["choices"] for c in chunks)  # no usage-only chunk: the client did not ask
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert len(text.split()) == 5
        # Asked for usage: it comes through, with the worker's real hit.
        body["stream_options"] = {"include_usage": True}
        status, headers, raw = post(url, body, {"X-Request-Id": "s2"})
        w = workers[int(headers[WORKER_HEADER])]
        usage = next(c for c in sse_data(raw)[:-1] if not c["choices"])["usage"]
        assert usage["completion_tokens"] == 5
        assert usage["prompt_tokens_details"]["cached_tokens"] == w.cache_hits()["s2"] > 0
        assert proxy.router.stats()["routed"] == 2
        assert proxy.router.load(int(headers[WORKER_HEADER]))["active_requests"] == 0


def test_completions_text_and_token_prompts_stream_and_not() -> None:
    with fleet(2) as (proxy, workers):
        url = proxy.url + "/v1/completions"
        prompt = SYSTEM + "def main():"
        status, h1, body = post(url, {"model": MODEL, "prompt": prompt, "max_tokens": 3})
        assert status == 200 and len(json.loads(body)["choices"][0]["text"].split()) == 3
        w = int(h1[WORKER_HEADER])
        tokens = list(workers[w].requests()[-1].prompt_token_ids)
        # The same prompt as token ids, streamed: same worker, the whole prefix hit.
        status, h2, raw = post(
            url,
            {"model": MODEL, "prompt": tokens, "max_tokens": 3, "stream": True,
             "stream_options": {"include_usage": True}},
            {"X-Request-Id": "ids"},
        )  # fmt: skip
        assert status == 200 and int(h2[WORKER_HEADER]) == w
        events = sse_data(raw)
        usage = events[-2]["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == workers[w].cache_hits()["ids"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= len(tokens) - 16
        assert list(routed_requests(proxy.router)[-1].tokens) == tokens


def test_hints_from_headers_and_body_reach_the_router() -> None:
    with fleet(2) as (proxy, _workers):
        url = proxy.url + "/v1/chat/completions"
        messages = chat(1)
        messages[0] = {
            "role": "system",
            "content": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        }
        body = {"model": MODEL, "messages": messages, "max_tokens": 2, "priority": 5,
                "session_id": "body-session", "cache_salt": "tenant-a"}  # fmt: skip
        assert post(url, body)[0] == 200
        req = routed_requests(proxy.router)[-1]
        assert (req.session_id, req.priority, req.cache_salt) == ("body-session", 5, "tenant-a")
        # The breakpoint closes the system message: the pinned prefix is the
        # rendered system turn, up to where the user's begins.
        (bp,) = req.cache_control
        assert bp.ttl == 300.0 and bp.prefix_tokens is not None
        decode, tokens = MockTokenizer().decode, list(req.tokens)
        assert decode(tokens[: bp.prefix_tokens]) == f"<|system|>{SYSTEM}<|end|>"
        assert decode(tokens[bp.prefix_tokens :]).startswith("<|user|>")
        headers = {
            "X-Session-Id": "hdr-session",
            "X-Kvroute-Priority": "-2",
            "X-Kvroute-Cache-Ttl": "1h",
            "X-Kvroute-Expected-Output-Tokens": "300",
        }
        status, h, _ = post(url, body, headers)
        assert status == 200
        req = routed_requests(proxy.router)[-1]
        assert (req.session_id, req.priority, req.expected_output_tokens) == (
            "hdr-session",
            -2,
            300,
        )
        # The header's 1 h TTL covers the whole prompt, the body's 5 min prefix with it.
        assert req.cache_control == (CacheControl(3600.0),)
        # The session is now pinned for an hour: its next turns take the pin.
        pinned = proxy.router.stats()["pinned_routes"]
        status, h2, _ = post(url, body, headers)
        assert proxy.router.stats()["pinned_routes"] == pinned + 1
        assert h2[WORKER_HEADER] == h[WORKER_HEADER]


def test_cache_control_without_a_session_keeps_the_prefix_warm_but_pins_nothing() -> None:
    with fleet(2) as (proxy, _):
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 1,
                "cache_control": {"type": "ephemeral", "ttl": "1h"}}  # fmt: skip
        assert post(proxy.url + "/v1/chat/completions", body)[0] == 200
        assert routed_requests(proxy.router)[-1].cache_control == (CacheControl(3600.0),)
        assert post(proxy.url + "/v1/chat/completions", body)[0] == 200
        assert proxy.router.stats()["pinned_routes"] == 0


@pytest.mark.parametrize(
    ("headers", "body_extra", "message"),
    [
        ({"X-Kvroute-Priority": "high"}, {}, "X-Kvroute-Priority"),
        ({"X-Kvroute-Cache-Ttl": "2d"}, {}, "ttl"),
        ({"X-Kvroute-Speculative-Prefill": "maybe"}, {}, "Speculative"),
        ({}, {"priority": "high"}, "priority"),
        ({}, {"cache_control": {"type": "forever"}}, "cache_control"),
    ],
)
def test_bad_hints_are_400(
    headers: dict[str, str], body_extra: dict[str, object], message: str
) -> None:
    with fleet(1) as (proxy, workers):
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 1, **body_extra}
        status, _, raw = post(proxy.url + "/v1/chat/completions", body, headers)
        err = json.loads(raw)["error"]
        assert status == 400 and err["type"] == "invalid_request_error"
        assert message in err["message"]
        assert workers[0].requests() == []


def test_error_codes_and_shapes() -> None:
    # OpenAI's shape everywhere: param names the bad field, code is always a string.
    with fleet(1, max_body_size=4096) as (proxy, _workers):
        url = proxy.url + "/v1/chat/completions"
        cmpl = proxy.url + "/v1/completions"
        cases = [
            (post(url, raw=b"{not json"), 400, "invalid_json", None),
            (post(url, [1, 2]), 400, "invalid_json", None),
            (post(url, {"model": MODEL}), 400, "missing_required_parameter", "messages"),
            (post(url, {"model": MODEL, "messages": "hi"}), 400, "invalid_value", "messages"),
            (post(url, {"model": "gpt-nope", "messages": chat(1)}), 404, "model_not_found",
             "model"),
            (post(url, {"model": MODEL, "messages": chat(1), "pad": "x" * 8000}), 413,
             "request_too_large", None),
            (post(cmpl, {"model": MODEL}), 400, "missing_required_parameter", "prompt"),
            (post(url, {"model": MODEL, "messages": chat(1), "priority": "x"}), 400,
             "invalid_type", "priority"),
            (post(url, {"model": MODEL, "messages": chat(1)}, {"X-Kvroute-Priority": "high"}),
             400, "invalid_type", "X-Kvroute-Priority"),
            (post(proxy.url + "/v1/nothing", {}), 404, "not_found", None),
        ]  # fmt: skip
        for (status, headers, raw), want_status, want_code, want_param in cases:
            assert status == want_status, raw
            assert headers["Content-Type"].startswith("application/json")
            err = json.loads(raw)["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            assert (err["code"], err["param"]) == (want_code, want_param), raw
        # max_tokens 0 is answered as vLLM answers it (its sampling parameters
        # need at least 1), before anything is routed.
        for field in ("max_tokens", "max_completion_tokens"):
            status, _, raw = post(url, {"model": MODEL, "messages": chat(1), field: 0})
            err = json.loads(raw)["error"]
            assert status == 400 and err["message"] == f"{field} must be at least 1, got 0."
            assert (err["type"], err["param"], err["code"]) == (
                "invalid_request_error", field, "invalid_value")  # fmt: skip
        assert proxy.router.stats()["routed"] == 0
        # A worker's own 4xx keeps its message, in the proxy's shape (token ids:
        # no tokenizing first): vLLM's "code": 400 becomes a string.
        status, _, raw = post(cmpl, {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 40000})
        err = json.loads(raw)["error"]
        assert status == 400 and "maximum context length is 32768 tokens" in err["message"]
        assert (err["type"], err["code"]) == ("invalid_request_error", "bad_request")
        # Still serving.
        assert post(url, {"model": MODEL, "messages": chat(1), "max_tokens": 1})[0] == 200
        assert proxy.router.stats()["routed"] == 2


def test_no_healthy_worker_is_503() -> None:
    with fleet(2) as (proxy, workers):
        for w in workers:
            w.stop()
        status, _, raw = post(
            proxy.url + "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1}
        )
        assert status in (502, 503), raw  # the first attempt may find out itself
        status, _, raw = post(
            proxy.url + "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1}
        )
        assert status == 503 and json.loads(raw)["error"]["code"] == "no_worker_available"
        status, _, raw = get(proxy.url + "/health")
        assert status == 503 and json.loads(raw)["healthy_workers"] == 0


def test_model_map_and_models_endpoint() -> None:
    with fleet(2, model_map=[("gpt-4o", MODEL), ("claude-*", MODEL)]) as (proxy, _workers):
        status, _, raw = get(proxy.url + "/v1/models")
        ids = [m["id"] for m in json.loads(raw)["data"]]
        assert status == 200 and ids == [MODEL, "gpt-4o"]
        status, _, raw = get(proxy.url + "/v1/models", {"anthropic-version": "2023-06-01"})
        listing = json.loads(raw)
        assert listing["data"][0]["type"] == "model" and listing["first_id"] == MODEL
        body = {"model": "gpt-4o", "messages": chat(1), "max_tokens": 1}
        status, _headers, raw = post(proxy.url + "/v1/chat/completions", body)
        assert status == 200 and json.loads(raw)["model"] == MODEL


def test_lora_adapters_given_on_the_command_line_are_served_and_hashed_with_their_name() -> None:
    options = {"models": [MODEL], "lora_adapters": ["sql-lora"]}
    worker_kw = {"lora_adapters": ["sql-lora"]}
    with fleet(1, worker_kw=worker_kw, **options) as (proxy, _workers):
        status, _, raw = get(proxy.url + "/v1/models")
        listing = {m["id"]: m for m in json.loads(raw)["data"]}
        assert status == 200 and list(listing) == [MODEL, "sql-lora"]
        assert listing["sql-lora"]["parent"] == MODEL
        for model in ("sql-lora", MODEL):
            body = {"model": model, "messages": chat(1), "max_tokens": 1}
            status, _headers, raw = post(proxy.url + "/v1/chat/completions", body)
            assert status == 200 and json.loads(raw)["model"] == model
        adapter, base = routed_requests(proxy.router)
        assert adapter.lora_name == "sql-lora" and base.lora_name is None
        # Same tokens, different chains: the adapter's blocks are not the base model's.
        assert list(adapter.tokens) == list(base.tokens)
        router = proxy.router
        assert (
            router.hashing(adapter.tokens, 16, lora_name="sql-lora")[0]
            != router.hashing(base.tokens, 16)[0]
        )


def test_health_and_metrics() -> None:
    with fleet(2) as (proxy, workers):
        status, _, raw = get(proxy.url + "/health")
        health = json.loads(raw)
        assert status == 200 and health["healthy_workers"] == 2
        assert [w["url"] for w in health["workers"]] == [w.url for w in workers]
        hits = 0
        for turn in (1, 2, 3):
            rid = f"m{turn}"
            status, h, _ = post(
                proxy.url + "/v1/chat/completions",
                {"model": MODEL, "messages": chat(turn), "max_tokens": 2},
                {"X-Session-Id": "m", "X-Request-Id": rid},
            )
            hits += workers[int(h[WORKER_HEADER])].cache_hits()[rid]
        post(proxy.url + "/v1/chat/completions", {"model": "nope", "messages": chat(1)})
        status, headers, raw = get(proxy.url + "/metrics")
        text = raw.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        m = proxy.proxy.metrics
        labels = {"endpoint": "/v1/chat/completions", "status": "200"}
        assert m.value("kvroute_proxy_requests_total", labels) == 3
        assert m.value("kvroute_proxy_requests_total", {**labels, "status": "404"}) == 1
        assert m.value("kvroute_route_seconds_count") == 3
        assert m.value("kvroute_cache_read_tokens_total") == hits > 0
        assert m.value("kvroute_cache_read_write_ratio") > 0
        for series in (
            "kvroute_routed_requests_total",
            "kvroute_worker_healthy",
            "kvroute_index_blocks",
            "kvroute_upstream_errors",
            "kvroute_proxy_retries",
        ):
            assert series in text, series  # fmt: skip


def test_worker_metrics_are_scraped_into_the_router() -> None:
    with fleet(1) as (proxy, _workers):
        post(proxy.url + "/v1/completions", {"model": MODEL, "prompt": SYSTEM, "max_tokens": 1})
        from helpers import wait_until

        # The mock reports KV usage = cached blocks / capacity; the health loop reads it.
        assert wait_until(lambda: proxy.router.load(0)["kv_usage"] > 0, timeout=5)


def test_an_internal_error_is_a_json_500_and_the_proxy_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with fleet(1) as (proxy, _workers):
        real = proxy.router.route
        calls = iter([RuntimeError("boom")])

        def flaky(request: Any, **kw: Any) -> Any:
            err = next(calls, None)
            if err is not None:
                raise err
            return real(request, **kw)

        monkeypatch.setattr(proxy.router, "route", flaky)
        url = proxy.url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 1}
        status, headers, raw = post(url, body)
        assert status == 500 and headers["Content-Type"].startswith("application/json")
        err = json.loads(raw)["error"]
        assert "internal error" in err["message"] and "RuntimeError" in err["message"]
        assert post(url, body)[0] == 200
