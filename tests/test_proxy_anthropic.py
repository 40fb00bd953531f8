"""kvroute.proxy, Anthropic side: the official ``anthropic`` SDK against the proxy and MockWorkers.

A multi-turn tool-use session with ``cache_control`` breakpoints (streaming
and not): later turns land on the worker holding the prefix, and the
``cache_read_input_tokens`` the SDK reports are that worker's real hits.
Also ``count_tokens``, Anthropic-shaped errors for bad input, and usage
filled from the router's prediction when a worker reports no cache reads.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Iterator
from typing import Any

import pytest

anthropic = pytest.importorskip("anthropic")
pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from helpers import Clock  # noqa: E402
from test_proxy_support import SYSTEM, fleet, post, routed_requests  # noqa: E402

from kvroute import CacheControl, Router  # noqa: E402
from kvroute.proxy import CACHE_SOURCE_HEADER, PREDICTED_HEADER, WORKER_HEADER  # noqa: E402
from kvroute.proxy.anthropic import AnthropicStream  # noqa: E402
from kvroute.testing._tokenizer import MockTokenizer  # noqa: E402

MODEL = "mock-model"
TOOLS = [
    {
        "name": "read_file",
        "description": "Read a file of the repository.",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    },
    {
        "name": "run_tests",
        "description": "Run the test-suite.",
        "input_schema": {"type": "object", "properties": {}},
        "cache_control": {"type": "ephemeral", "ttl": "1h"},
    },
]


def _system() -> list[dict[str, Any]]:
    return [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]


def _session(turns: int) -> Iterator[list[dict[str, Any]]]:
    """The message list of each turn of a tool-use session (the model's calls are scripted)."""
    history: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Fix the failing test in utils."}]}
    ]
    for t in range(turns):
        # Only the newest user block carries a breakpoint, as agent harnesses do.
        msgs = [dict(m) for m in history]
        last = dict(msgs[-1])
        marked = {**last["content"][-1], "cache_control": {"type": "ephemeral"}}
        last["content"] = [*last["content"][:-1], marked]
        msgs[-1] = last
        yield msgs
        call_id = f"toolu_{t:04d}"
        history.append({"role": "assistant", "content": [
            {"type": "text", "text": f"Let me look (step {t})."},
            {"type": "tool_use", "id": call_id, "name": "read_file", "input": {"path": f"f{t}.py"}},
        ]})  # fmt: skip
        history.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call_id,
             "content": [{"type": "text", "text": f"def f{t}():\n    return {t}\n" * 6}]},
        ]})  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_sdk_tool_use_session_lands_on_the_prefix_and_reports_real_hits(
    stream: bool, anthropic_client: Any
) -> None:
    with fleet(3) as (proxy, workers):
        client = anthropic_client(proxy.url)
        served: list[int] = []
        reads: list[int] = []
        for turn, messages in enumerate(_session(4)):
            rid = f"turn-{turn}"
            kwargs: dict[str, Any] = {
                "model": MODEL,
                "max_tokens": 8,
                "system": _system(),
                "tools": TOOLS,
                "messages": messages,
                "metadata": {"user_id": "session-A"},
                "extra_headers": {"X-Request-Id": rid},
            }
            if stream:
                with client.messages.stream(**kwargs) as s:
                    text = s.get_final_text()
                    message = s.get_final_message()
                    worker = int(s.response.headers[WORKER_HEADER])
            else:
                raw = client.messages.with_raw_response.create(**kwargs)
                worker = int(raw.headers[WORKER_HEADER])
                assert raw.headers[CACHE_SOURCE_HEADER] == "worker"
                message = raw.parse()
                text = message.content[0].text
            assert len(text.split()) == 8 and message.stop_reason == "max_tokens"
            served.append(worker)
            usage = message.usage
            reads.append(usage.cache_read_input_tokens)
            record = workers[worker].requests()[-1]
            assert record.request_id == rid
            # The SDK's figures are the worker's real hits and its prompt; the
            # worker reported no writes: the rest of the prompt is its writes.
            assert usage.cache_read_input_tokens == workers[worker].cache_hits()[rid]
            assert usage.cache_creation_input_tokens == (
                record.prompt_tokens - usage.cache_read_input_tokens
            )
            assert usage.input_tokens == 0
            # The router saw the tokens the worker rendered.
            assert list(routed_requests(proxy.router)[-1].tokens) == list(record.prompt_token_ids)
        assert len(set(served)) == 1, served
        assert reads[0] == 0 and all(r > len(SYSTEM) for r in reads[1:]), reads
        req = routed_requests(proxy.router)[-1]
        assert req.session_id == "session-A"
        # Two breakpoints pin something: the tools' 1 h one (the mock's template
        # renders the tools first) and the newest block's 5 min one, closing the
        # prompt; the system's 5 min breakpoint is inside the latter.
        tools, whole = req.cache_control
        assert (tools.ttl, whole) == (3600.0, CacheControl(300.0))
        decode, tokens = MockTokenizer().decode, list(req.tokens)
        assert tools.prefix_tokens is not None
        assert decode(tokens[: tools.prefix_tokens]).startswith("<|tools|>[")
        assert decode(tokens[: tools.prefix_tokens]).endswith("]<|end|>")
        assert decode(tokens[tools.prefix_tokens :]).startswith("<|system|>")
        assert proxy.router.stats()["pinned_routes"] >= 3
        m = proxy.proxy.metrics
        assert m.value("kvroute_cache_read_tokens_total") == sum(reads)
        ratio = m.value("kvroute_cache_read_write_ratio")
        written = m.value("kvroute_cache_creation_tokens_total")
        assert written > 0 and ratio == pytest.approx(sum(reads) / written)


def test_session_header_overrides_metadata(anthropic_client: Any) -> None:
    with fleet(2, session_header="X-Agent-Session") as (proxy, _):
        client = anthropic_client(proxy.url)
        client.messages.create(
            model=MODEL,
            max_tokens=2,
            messages=[{"role": "user", "content": "hello"}],
            metadata={"user_id": "from-metadata"},
            extra_headers={"X-Agent-Session": "from-header"},
        )
        assert routed_requests(proxy.router)[-1].session_id == "from-header"


def test_count_tokens_matches_the_worker_rendering(anthropic_client: Any) -> None:
    with fleet(2) as (proxy, workers):
        client = anthropic_client(proxy.url)
        messages = next(_session(1))
        counted = client.messages.count_tokens(
            model=MODEL, system=_system(), tools=TOOLS, messages=messages
        )
        body = {"model": MODEL, "system": _system(), "tools": TOOLS, "messages": messages}
        assert counted.input_tokens == len(workers[0].tokenizer.render_anthropic(body))
        assert proxy.router.stats()["routed"] == 0  # counting is not routed
        with pytest.raises(anthropic.NotFoundError) as info:
            client.messages.count_tokens(model="claude-x", messages=messages)
        assert info.value.body["error"]["type"] == "not_found_error"


def test_bad_input_gets_anthropic_errors_and_the_proxy_keeps_serving(anthropic_client: Any) -> None:
    with fleet(2, max_body_size=64 * 1024) as (proxy, workers):
        client = anthropic_client(proxy.url)
        ok = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        cases: list[tuple[dict[str, Any], type[Exception], int, str, str]] = [
            ({**ok, "messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
             anthropic.BadRequestError, 400, "invalid_request_error", "unknown content block"),
            ({**ok, "max_tokens": 0}, anthropic.BadRequestError, 400, "invalid_request_error",
             "max_tokens"),
            ({**ok, "messages": []}, anthropic.BadRequestError, 400, "invalid_request_error",
             "messages"),
            ({**ok, "messages": [{"role": "robot", "content": "x"}]}, anthropic.BadRequestError,
             400, "invalid_request_error", "role"),
            ({**ok, "system": [{"type": "text", "text": "s",
                                "cache_control": {"type": "ephemeral", "ttl": "2h"}}]},
             anthropic.BadRequestError, 400, "invalid_request_error", "ttl"),
            ({**ok, "model": "claude-unknown"}, anthropic.NotFoundError, 404, "not_found_error",
             "does not exist"),
            ({**ok, "messages": [{"role": "user", "content": "x" * 100_000}]},
             anthropic.APIStatusError, 413, "request_too_large", "too large"),
        ]  # fmt: skip
        for body, exc, status, kind, words in cases:
            with pytest.raises(exc) as info:
                client.messages.create(**body)
            err = info.value
            assert err.status_code == status
            assert err.body == {"type": "error", "error": {"type": kind, "message": err.body[
                "error"]["message"]}}  # fmt: skip
            assert words in err.body["error"]["message"]
        # Not JSON at all, and JSON that is not an object.
        for raw in (b"{broken", b"[1]", b"[" * 50_000):  # the last nested past any parser
            status, _, answer = post(proxy.url + "/v1/messages", raw=raw)
            assert status == 400
            assert json.loads(answer)["error"]["type"] == "invalid_request_error"
        assert all(w.requests() == [] for w in workers)
        assert client.messages.create(**ok).content[0].type == "text"


def _vllm_usage(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict[str, Any]:
    # vLLM's own /v1/messages reports no cache figures: input_tokens is the whole prompt.
    return {"input_tokens": prompt_tokens, "output_tokens": output_tokens}


def _report_no_cache_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the MockWorkers answer /v1/messages with vLLM's usage (no cache figures)."""
    for name in ("kvroute.testing._http", "kvroute.testing.mock_worker"):
        module = importlib.import_module(name) if importlib.util.find_spec(name) else None
        if module is not None and hasattr(module, "anthropic_usage"):
            monkeypatch.setattr(module, "anthropic_usage", _vllm_usage)
            return
    pytest.fail("the mock worker's Anthropic usage builder is not where this test patches it")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_usage_without_cache_reads_is_filled_from_the_prediction(
    stream: bool, monkeypatch: pytest.MonkeyPatch, anthropic_client: Any
) -> None:
    _report_no_cache_reads(monkeypatch)
    with fleet(2) as (proxy, workers):
        client = anthropic_client(proxy.url)
        written = 0
        for turn, messages in enumerate(_session(2)):
            rid = f"p{turn}"
            kwargs: dict[str, Any] = {
                "model": MODEL, "max_tokens": 4, "system": _system(), "messages": messages,
                "metadata": {"user_id": "s"}, "extra_headers": {"X-Request-Id": rid},
            }  # fmt: skip
            if stream:
                with client.messages.stream(**kwargs) as s:
                    message = s.get_final_message()
                    worker = int(s.response.headers[WORKER_HEADER])
            else:
                raw = client.messages.with_raw_response.create(**kwargs)
                assert raw.headers[CACHE_SOURCE_HEADER] == "predicted"
                worker = int(raw.headers[WORKER_HEADER])
                message = raw.parse()
            record = workers[worker].requests()[-1]
            usage = message.usage
            # Event-free routing predicted exactly what the worker had cached,
            # and the rest of the prompt was written to its cache: on the
            # first turn too (its system prompt carries a breakpoint).
            assert usage.cache_read_input_tokens == workers[worker].cache_hits()[rid]
            assert usage.cache_creation_input_tokens == (
                record.prompt_tokens - usage.cache_read_input_tokens
            )
            assert usage.cache_creation_input_tokens > 0 and usage.input_tokens == 0
            written += usage.cache_creation_input_tokens
            if turn:
                assert usage.cache_read_input_tokens > 0
        # the answers and /metrics count the same writes
        assert proxy.proxy.metrics.value("kvroute_cache_creation_tokens_total") == written


def test_a_breakpoint_keeps_only_its_prefix_warm_for_its_ttl(anthropic_client: Any) -> None:
    # Event-free routing: the router predicts what it sent where, for 120 s; a
    # 1 h breakpoint on the system prompt keeps just that prefix predicted longer.
    clock = Clock(1000.0)
    router = Router(block_size=16, kv_events=False, journal=True, clock=clock)
    with fleet(2, router=router, block_size=16) as (proxy, _):
        client = anthropic_client(proxy.url)
        system = [
            {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
        ]

        def ask(question: str) -> tuple[int, int]:
            raw = client.messages.with_raw_response.create(
                model=MODEL, max_tokens=2, system=system,
                messages=[{"role": "user", "content": question * 40}],
            )  # fmt: skip
            return int(raw.headers[WORKER_HEADER]), int(raw.headers[PREDICTED_HEADER])

        worker, _ = ask("What does utils.py do? ")
        (pin,) = routed_requests(router)[-1].cache_control
        assert pin.ttl == 3600.0 and pin.prefix_tokens is not None
        # The prefix is what every request with this system prompt shares: the
        # system turn and the header of the first message (always the user's).
        prefix = list(routed_requests(router)[-1].tokens)[: pin.prefix_tokens]
        assert MockTokenizer().decode(prefix) == f"<|system|>{SYSTEM}<|end|><|user|>"
        clock.t += 600.0  # the whole prompt's prediction is gone, the system prompt's is not
        again, predicted = ask("Where is the bug? ")
        assert (again, predicted) == (worker, pin.prefix_tokens // 16 * 16)
        clock.t += 3600.0
        assert ask("And now? ")[1] == 0


def test_with_kv_events_breakpoints_pin_the_session_without_extra_renders(
    anthropic_client: Any,
) -> None:
    # The workers' events say what they hold: measuring each prefix (a render
    # of the request cut after its breakpoint) would be a wasted round trip.
    router = Router(block_size=16, kv_events=True, journal=True)
    with fleet(2, router=router) as (proxy, workers):
        client = anthropic_client(proxy.url)
        for turn, messages in enumerate(_session(2)):
            client.messages.create(
                model=MODEL, max_tokens=2, system=_system(), tools=TOOLS, messages=messages,
                metadata={"user_id": "s"},
            )  # fmt: skip
            renders = sum(w.http_requests().get("/v1/messages/render", 0) for w in workers)
            assert renders == turn + 1  # the request itself, nothing more
        # the tools' 1 h breakpoint and the newest block's 5 min one, unmeasured
        assert routed_requests(router)[-1].cache_control == (
            CacheControl(3600.0),
            CacheControl(300.0),
        )
        assert router.stats()["pinned_routes"] == 1


def test_stream_watcher_patches_message_start_and_delta_only_when_needed() -> None:
    def ev(kind: str, data: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

    usage = {"input_tokens": 40, "output_tokens": 0}
    start = ev("message_start", {"message": {"id": "m", "usage": usage}})
    delta = ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "a"}})
    end = ev("message_delta", {"delta": {"stop_reason": "end_turn"},
                               "usage": {"input_tokens": 40, "output_tokens": 3}})  # fmt: skip
    w = AnthropicStream(predicted_cached_tokens=32)
    out = w.feed(start[:20]) + w.feed(start[20:] + ev("ping", {}) + delta) + w.feed(end)
    events = [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data")]
    assert events[0]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0,
        "cache_read_input_tokens": 32, "cache_creation_input_tokens": 8}  # fmt: skip
    assert events[-1]["usage"]["cache_read_input_tokens"] == 32
    assert w.predicted and w.first_token and w.usage is not None
    assert (w.usage.prompt_tokens, w.usage.cached_tokens, w.usage.output_tokens) == (40, 32, 3)
    # Reported by the worker: every byte passes unchanged.
    reported = start.replace(b'"output_tokens": 0}', b'"output_tokens": 0, '
                             b'"cache_read_input_tokens": 16, '
                             b'"cache_creation_input_tokens": 24}')  # fmt: skip
    w2 = AnthropicStream(predicted_cached_tokens=32)
    assert w2.feed(reported + delta + end) == reported + delta + end
    assert not w2.predicted
    # Reads reported, writes not: the worker's reads stay, the rest is its writes.
    reads_only = start.replace(b'"output_tokens": 0}', b'"output_tokens": 0, '
                               b'"cache_read_input_tokens": 16}')  # fmt: skip
    w4 = AnthropicStream(predicted_cached_tokens=32)
    first = json.loads(w4.feed(reads_only).decode().split("data: ")[1])
    assert first["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0,
        "cache_read_input_tokens": 16, "cache_creation_input_tokens": 40}  # fmt: skip
    assert not w4.predicted
    # Reported in message_delta only (vLLM with prompt token details): message_start
    # carries the prediction, the worker's final figures pass unchanged and count.
    late = ev("message_delta", {"delta": {"stop_reason": "end_turn"},
                                "usage": {"input_tokens": 24, "output_tokens": 3,
                                          "cache_read_input_tokens": 16,
                                          "cache_creation_input_tokens": 0}})  # fmt: skip
    w3 = AnthropicStream(predicted_cached_tokens=32)
    out = w3.feed(start + delta + late)
    assert out.endswith(late) and b'"cache_read_input_tokens":32' in out
    assert not w3.predicted and w3.usage is not None
    assert (w3.usage.cached_tokens, w3.usage.output_tokens) == (16, 3)
