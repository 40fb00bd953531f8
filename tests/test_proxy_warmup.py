"""Speculative prefill through the proxy: the next turn's prefix is warmed on the same worker.

A session asks for warm-ups with ``X-Kvroute-Speculative-Prefill: true``;
after each response the proxy sends the conversation with that response
appended (``max_tokens`` 1) to the worker that served it. Real HTTP on
loopback to MockWorkers, whose token ids and cache hits are their own.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from helpers import wait_until
from test_proxy_support import SYSTEM, chat, fleet, post, sse_data

from kvroute.proxy import WORKER_HEADER
from kvroute.proxy.warmup import ReplyCollector, reply_of, warmup_body
from kvroute.testing import MockWorker

MODEL = "mock-model"
WARM = {"X-Session-Id": "agent-7", "X-Kvroute-Speculative-Prefill": "true"}


def _record(worker: MockWorker, rid: str) -> Any:
    return next((r for r in worker.requests() if r.request_id == rid), None)


def _reply(kind: str, raw: bytes, stream: bool) -> Any:
    """The assistant's reply as the client saw it."""
    if not stream:
        answer = json.loads(raw)
        if kind == "messages":
            return answer["content"]
        return {"role": "assistant", "content": answer["choices"][0]["message"]["content"]}
    events = [e for e in sse_data(raw) if isinstance(e, dict)]
    if kind == "messages":
        text = "".join(
            e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta"
        )
        return [{"type": "text", "text": text}]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"])
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("kind", ["chat", "messages"])
def test_the_next_turn_prefix_is_prefilled_on_the_same_worker(kind: str, stream: bool) -> None:
    path = "/v1/chat/completions" if kind == "chat" else "/v1/messages"
    with fleet(2) as (proxy, workers):
        if kind == "chat":
            body: dict[str, Any] = {"model": MODEL, "messages": chat(1), "max_tokens": 6}
        else:
            body = {"model": MODEL, "max_tokens": 6, "system": SYSTEM,
                    "messages": [{"role": "user", "content": "Run the tests."}]}  # fmt: skip
        body["stream"] = stream
        status, headers, raw = post(proxy.url + path, body, {**WARM, "X-Request-Id": "t1"})
        assert status == 200, raw
        worker = workers[int(headers[WORKER_HEADER])]
        assert wait_until(lambda: _record(worker, "t1-warmup") is not None)
        warm = _record(worker, "t1-warmup")
        # The warm-up is the conversation with the reply appended, as the worker renders it.
        reply = _reply(kind, raw, stream)
        turn = body["messages"] + [
            reply if kind == "chat" else {"role": "assistant", "content": reply}
        ]
        if kind == "chat":
            expected = worker.tokenizer.render_chat(turn)
        else:
            expected = worker.tokenizer.render_anthropic({**body, "messages": turn})
        assert list(warm.prompt_token_ids) == list(expected)
        assert wait_until(lambda: _record(worker, "t1-warmup").status == "finished")
        assert _record(worker, "t1-warmup").completion_tokens == 1
        # counted once its answer is read, just after the worker's record finished
        assert wait_until(
            lambda: proxy.proxy.metrics.value("kvroute_warmups_total", {"outcome": "sent"}) == 1
        )
        assert all(_record(w, "t1-warmup") is None for w in workers if w is not worker)

        # The next turn (the tool result / the user's answer) hits the warmed prefix:
        # everything it shares with the warm-up, up to the last full block.
        follow = {"role": "user", "content": "The tests pass now."}
        status, headers, _ = post(
            proxy.url + path,
            {**body, "stream": False, "messages": [*turn, follow]},
            {"X-Session-Id": "agent-7", "X-Request-Id": "t2"},
        )
        assert status == 200 and workers[int(headers[WORKER_HEADER])] is worker
        t2 = _record(worker, "t2")
        shared = next(
            (
                i
                for i, (a, b) in enumerate(zip(t2.prompt_token_ids, expected, strict=False))
                if a != b
            ),
            min(len(expected), len(t2.prompt_token_ids)),
        )
        t1 = _record(worker, "t1")
        assert worker.cache_hits()["t2"] == shared // 16 * 16 > len(t1.prompt_token_ids)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_tool_call_reply_is_warmed_as_the_next_turn_holds_it(stream: bool) -> None:
    tools = [
        {
            "name": "run_tests",
            "description": "Run the tests.",
            "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
        }
    ]
    body = {"model": MODEL, "max_tokens": 40, "system": SYSTEM, "tools": tools,
            "tool_choice": {"type": "any"}, "stream": stream,
            "messages": [{"role": "user", "content": "Run the tests."}]}  # fmt: skip
    with fleet(1) as (proxy, (worker,)):
        status, _, raw = post(proxy.url + "/v1/messages", body, {**WARM, "X-Request-Id": "t"})
        assert status == 200, raw
        if stream:
            events = [e for e in sse_data(raw) if isinstance(e, dict)]
            (start,) = [e for e in events if e["type"] == "content_block_start"]
            call = dict(start["content_block"])
            call["input"] = json.loads("".join(
                e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
            ))  # fmt: skip
        else:
            (call,) = json.loads(raw)["content"]
        assert call["type"] == "tool_use" and call["name"] == "run_tests"
        assert wait_until(lambda: _record(worker, "t-warmup") is not None)
        turn = [*body["messages"], {"role": "assistant", "content": [call]}]
        expected = worker.tokenizer.render_anthropic({**body, "messages": turn})
        assert list(_record(worker, "t-warmup").prompt_token_ids) == list(expected)


def test_no_warm_up_without_the_hint_or_a_session() -> None:
    with fleet(1) as (proxy, (worker,)):
        url = proxy.url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 3}
        assert post(url, body, {"X-Session-Id": "s", "X-Request-Id": "plain"})[0] == 200
        hint_only = {"X-Kvroute-Speculative-Prefill": "true", "X-Request-Id": "anon"}
        assert post(url, body, hint_only)[0] == 200
        # a failed request warms nothing either
        assert post(url, {**body, "max_tokens": -1}, {**WARM, "X-Request-Id": "bad"})[0] == 400
        assert post(url, body, {**WARM, "X-Request-Id": "ok"})[0] == 200
        assert wait_until(lambda: _record(worker, "ok-warmup") is not None)
        ids = [r.request_id for r in worker.requests()]
        assert ids == ["plain", "anon", "ok", "ok-warmup"], ids


def test_speculative_prefill_for_every_session_is_a_proxy_option() -> None:
    with fleet(1, speculative_prefill=True) as (proxy, (worker,)):
        url = proxy.url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 3}
        assert post(url, body, {"X-Session-Id": "s", "X-Request-Id": "a"})[0] == 200
        assert wait_until(lambda: _record(worker, "a-warmup") is not None)
        assert post(url, body, {"X-Request-Id": "no-session"})[0] == 200  # nothing to plan for
        assert not wait_until(lambda: _record(worker, "no-session-warmup") is not None, 0.3)


def test_completions_continue_as_text_and_token_id_prompts_get_no_warm_up() -> None:
    with fleet(1) as (proxy, (worker,)):
        url = proxy.url + "/v1/completions"
        prompt = SYSTEM + "def main():"
        status, _, raw = post(url, {"model": MODEL, "prompt": prompt, "max_tokens": 4},
                              {**WARM, "X-Request-Id": "c1"})  # fmt: skip
        assert status == 200
        assert wait_until(lambda: _record(worker, "c1-warmup") is not None)
        text = json.loads(raw)["choices"][0]["text"]
        warm = _record(worker, "c1-warmup")
        assert list(warm.prompt_token_ids) == list(worker.tokenizer.render_prompt(prompt + text)[0])
        # A prompt of token ids has no text to continue: no warm-up.
        ids = list(warm.prompt_token_ids)
        assert post(url, {"model": MODEL, "prompt": ids, "max_tokens": 2},
                    {**WARM, "X-Request-Id": "c2"})[0] == 200  # fmt: skip
        assert post(url, {"model": MODEL, "prompt": "x", "max_tokens": 1},
                    {"X-Request-Id": "c3"})[0] == 200  # fmt: skip
        assert [r.request_id for r in worker.requests()] == ["c1", "c1-warmup", "c2", "c3"]


def _send_warmup(proxy: Any, body: bytes) -> None:
    send = proxy.proxy.warmups.send(0, "/v1/completions", body, {"X-Request-Id": "x-warmup"})
    proxy._thread.run(send, timeout=10)


def test_a_refused_or_failed_warm_up_is_counted_and_never_judges_the_worker() -> None:
    # No health checks during the test: only a warm-up could mark the worker down.
    with fleet(1, health_interval=3600.0) as (proxy, (worker,)):
        metrics = proxy.proxy.metrics
        _send_warmup(proxy, b'{"model": "mock-model"}')  # no prompt: the worker answers 400
        assert metrics.value("kvroute_warmups_total", {"outcome": "refused"}) == 1
        worker.stop()
        _send_warmup(proxy, json.dumps({"model": MODEL, "prompt": "x"}).encode())
        assert metrics.value("kvroute_warmups_total", {"outcome": "failed"}) == 1
        assert metrics.value("kvroute_warmups_total", {"outcome": "sent"}) == 0
        # A warm-up is a guess made on the side: its failure marks nothing unhealthy.
        assert proxy.router.load(0)["healthy"]
        assert proxy.proxy.pool.healthy() == [0]


def test_a_client_gone_mid_stream_gets_no_warm_up() -> None:
    with fleet(1, worker_kw={"token_delay": 0.05}) as (proxy, (worker,)):
        host, port = proxy.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 200, "stream": True}
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body),
            {"Content-Type": "application/json", **WARM, "X-Request-Id": "gone"},
        )  # fmt: skip
        response = conn.getresponse()
        assert response.status == 200 and response.read1(64)  # the stream has begun
        conn.close()  # the agent went away
        assert wait_until(lambda: _record(worker, "gone").status == "aborted")
        assert proxy.router.load(0)["active_requests"] == 0
        assert not wait_until(lambda: _record(worker, "gone-warmup") is not None, timeout=0.5)
        assert proxy.proxy.metrics.value("kvroute_warmups_total", {"outcome": "sent"}) == 0
        # and its plan (the whole prompt) is not left behind in the router
        assert wait_until(lambda: proxy.router.stats()["warmup_plans"] == 0)


# -- rebuilding the reply and the warm-up body ---------------------------------------------


def test_chat_replies_with_tool_calls_rebuild_from_json_and_from_the_stream() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "grep", "arguments": '{"q": "TODO"}'}}  # fmt: skip
    answer = {
        "choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [call]}}]
    }
    expected = {"role": "assistant", "content": "", "tool_calls": [call]}
    assert reply_of("chat", answer) == expected
    c = ReplyCollector("chat")
    for delta in [
        {"role": "assistant", "content": ""},
        {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                         "function": {"name": "grep", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"TODO"}'}}]},
    ]:  # fmt: skip
        c.feed({"choices": [{"index": 0, "delta": delta}]})
    c.feed({"choices": [], "usage": {"prompt_tokens": 3}})  # the usage chunk: nothing to add
    assert c.reply() == expected
    assert ReplyCollector("chat").reply() is None


def test_thinking_is_kept_in_a_streamed_messages_reply() -> None:
    c = ReplyCollector("messages")
    events = [
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "Check the "}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "tests."}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "signature_delta", "signature": "sig"}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Ok."}},
    ]  # fmt: skip
    for event in events:
        c.feed(event)
    assert c.reply() == [
        {"type": "thinking", "thinking": "Check the tests.", "signature": "sig"},
        {"type": "text", "text": "Ok."},
    ]


def test_the_warm_up_body_asks_for_one_token_once_and_does_not_stream() -> None:
    chat_body = {"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": True,
                 "stream_options": {"include_usage": True}, "n": 3, "best_of": 3,
                 "max_completion_tokens": 500, "temperature": 0.2}  # fmt: skip
    reply = {"role": "assistant", "content": "a"}
    body = warmup_body("chat", chat_body, reply)
    assert body == {"model": "m", "messages": [*chat_body["messages"], reply], "stream": False,
                    "max_completion_tokens": 1, "max_tokens": 1, "temperature": 0.2}  # fmt: skip
    assert chat_body["messages"] == [{"role": "user", "content": "q"}]  # left as it was
    assert warmup_body("completions", {"prompt": "def f():"}, " pass")["prompt"] == "def f(): pass"
    assert warmup_body("completions", {"prompt": [1, 2, 3]}, " pass") is None
    assert warmup_body("completions", {"prompt": ["a", "b"]}, " pass") is None
    messages = warmup_body("messages", {"messages": [{"role": "user", "content": "q"}]},
                           [{"type": "text", "text": "a"}])  # fmt: skip
    assert messages is not None
    assert messages["messages"][-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "a"}],
    }
