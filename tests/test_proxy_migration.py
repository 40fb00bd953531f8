"""A stream whose worker dies mid-way goes on from another worker (issue 16, item 11).

The worker is a real process, killed with SIGKILL while it streams. The
client must see one continuous stream: the same chunk id throughout, no
error, one ``[DONE]``, all the tokens it asked for; the second worker must
have been sent the prompt plus what was generated, with the output budget
reduced. Where a stream cannot be continued it ends with an error event, as
before.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from helpers import wait_until
from test_proxy_support import FAST_HEALTH

from kvroute import Router
from kvroute.proxy import WORKER_HEADER, ProxyConfig, ProxyServer, WorkerSpec
from kvroute.testing import MockTokenizer, MockWorker
from kvroute.testing.process import MockWorkerProcess

MODEL = "mock-model"


@contextlib.contextmanager
def doomed_fleet(**config_kw: Any) -> Iterator[tuple[ProxyServer, MockWorkerProcess, MockWorker]]:
    """Worker 0 a process (to be killed), worker 1 in-process (its log readable).

    Round-robin routing sends the first request to worker 0.
    """
    with contextlib.ExitStack() as stack:
        doomed = stack.enter_context(MockWorkerProcess(publish_events=False, token_delay=0.05))
        spare = stack.enter_context(MockWorker(publish_events=False, token_delay=0.001))
        config = ProxyConfig(
            [WorkerSpec(doomed.url), WorkerSpec(spare.url)],
            policy="round_robin",
            **{**FAST_HEALTH, **config_kw},
        )
        router = Router(block_size=16, policy="round_robin", kv_events=False)
        yield stack.enter_context(ProxyServer(config, router=router)), doomed, spare


def _stream_and_kill(
    url: str, path: str, body: dict[str, Any], doomed: MockWorkerProcess, after: int, rid: str
) -> tuple[str, list[Any]]:
    """Stream ``body``; SIGKILL the serving worker after ``after`` content chunks; all events."""
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": rid},
    )
    events: list[Any] = []
    with urllib.request.urlopen(req, timeout=30) as r:
        worker = r.headers[WORKER_HEADER]
        content = 0
        for line in r:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
            if isinstance(events[-1], dict) and _text(events[-1]):
                content += 1
                if content == after:
                    doomed.kill()
    return worker, events


def _text(event: dict[str, Any]) -> str:
    out = []
    for c in event.get("choices") or []:
        out.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    return "".join(out)


def _check_one_stream(events: list[Any]) -> list[dict[str, Any]]:
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [e for e in events if isinstance(e, dict)]
    assert not [e for e in chunks if "error" in e], chunks
    assert len({e["id"] for e in chunks}) == 1 and len({e["created"] for e in chunks}) == 1
    return chunks


def test_a_token_id_completion_is_continued_token_exactly_on_another_worker() -> None:
    prompt = list(range(100, 180))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 30, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with doomed_fleet() as (proxy, doomed, spare):
        worker, events = _stream_and_kill(proxy.url, "/v1/completions", body, doomed, 5, "m1")
        assert worker == "0"
        chunks = _check_one_stream(events)
        pieces = [_text(c) for c in chunks if _text(c)]
        assert len(pieces) == 30
        # the client did not ask for token ids: the ones the proxy asked for are gone
        assert not [c for c in chunks for ch in c["choices"] if "token_ids" in ch]
        usage = chunks[-1]["usage"]
        assert usage["prompt_tokens"] == len(prompt) and usage["completion_tokens"] == 30
        (cont,) = spare.requests()
        assert cont.request_id == "m1-m1"
        first = len(cont.prompt_token_ids) - len(prompt)  # tokens worker 0 had generated
        assert first >= 5 and cont.completion_tokens == 30 - first
        tok = MockTokenizer()
        sent = [tok.encode(p.strip())[-1] for p in pieces[:first]]  # the mock's piece ids
        assert list(cont.prompt_token_ids) == prompt + sent
        m = proxy.proxy.metrics
        assert m.value("kvroute_proxy_migrations_total", {"outcome": "continued"}) == 1
        assert m.value("kvroute_routed_requests_total", {"worker": "1"}) == 1
        assert wait_until(lambda: proxy.router.load(0)["healthy"] is False)  # dead: found out
        assert wait_until(lambda: all(proxy.router.load(w)["active_requests"] == 0 for w in (0, 1)))


def test_a_chat_stream_is_continued_from_its_text_as_a_final_assistant_message() -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name the NATO alphabet, slowly."}]  # fmt: skip
    body = {"model": MODEL, "messages": messages, "max_tokens": 24, "stream": True}
    with doomed_fleet() as (proxy, doomed, spare):
        _, events = _stream_and_kill(proxy.url, "/v1/chat/completions", body, doomed, 4, "c1")
        chunks = _check_one_stream(events)
        roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
        assert len(roles) == 1 and roles[0] is chunks[0]
        text = "".join(_text(c) for c in chunks)
        assert len([c for c in chunks if _text(c)]) == 24
        assert "usage" not in chunks[-1]  # the client did not ask for it
        (cont,) = spare.requests()
        partial = text[: len(text) - len("".join(_cont_pieces(chunks, cont.completion_tokens)))]
        expected = MockTokenizer().render_chat(
            [*messages, {"role": "assistant", "content": partial}],
            add_generation_prompt=False,
            continue_final_message=True,
        )
        assert list(cont.prompt_token_ids) == expected
        assert cont.completion_tokens == 24 - len([p for p in partial.split(" ") if p])


def _cont_pieces(chunks: list[dict[str, Any]], n: int) -> list[str]:
    return [_text(c) for c in chunks if _text(c)][-n:] if n else []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": list(range(100, 140)), "n": 2}),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_object"},
            },
        ),
    ],
    ids=["n2", "structured"],
)
def test_streams_that_cannot_be_continued_end_with_an_error_event(
    path: str, body: dict[str, Any]
) -> None:
    body = {"model": MODEL, "max_tokens": 30, "stream": True, **body}
    with doomed_fleet() as (proxy, doomed, spare):
        _, events = _stream_and_kill(proxy.url, path, body, doomed, 3, "x1")
        assert "error" in events[-1] and events[-1]["error"]["code"] == "bad_gateway"
        assert spare.requests() == []
        m = proxy.proxy.metrics
        assert m.value("kvroute_proxy_migrations_total", {"outcome": "not_migratable"}) == 1


def test_with_no_worker_left_the_stream_ends_with_an_error_event() -> None:
    with MockWorkerProcess(publish_events=False, token_delay=0.05) as doomed:
        config = ProxyConfig([WorkerSpec(doomed.url)], **FAST_HEALTH)
        with ProxyServer(config, router=Router(block_size=16, kv_events=False)) as proxy:
            body = {"model": MODEL, "prompt": list(range(100, 140)), "max_tokens": 30,
                    "stream": True}  # fmt: skip
            _, events = _stream_and_kill(proxy.url, "/v1/completions", body, doomed, 3, "z1")
            assert "error" in events[-1] and events[-1]["error"]["code"] == "bad_gateway"
            m = proxy.proxy.metrics
            assert m.value("kvroute_proxy_migrations_total", {"outcome": "failed"}) == 1


def test_migrations_zero_keeps_the_error_event() -> None:
    with doomed_fleet(migrations=0) as (proxy, doomed, spare):
        body = {"model": MODEL, "prompt": list(range(100, 140)), "max_tokens": 30, "stream": True}
        _, events = _stream_and_kill(proxy.url, "/v1/completions", body, doomed, 3, "o1")
        assert "error" in events[-1] and spare.requests() == []
        # the proxy asked for no token ids it would not use
        assert not any("token_ids" in ch for e in events[:-1] for ch in e["choices"])


# -- the parts, alone ------------------------------------------------------------------------

from kvroute.proxy.bodies import TokenIds, encode_body  # noqa: E402
from kvroute.proxy.call import Call  # noqa: E402
from kvroute.proxy.migration import (  # noqa: E402
    Migrator,
    Transcript,
    ask_for_token_ids,
    strip_token_ids,
    why_not,
)


def _call(kind: str, body: dict[str, Any], *, stream: bool = True, strip: bool = False) -> Call:
    path = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}[kind]
    data = encode_body(body)
    return Call(kind, path, body, data, stream, False, "r", {}, strip_token_ids=strip)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "body", "reason"),
    [
        ("completions", {"prompt": "text"}, None),
        ("completions", {"prompt": [1, 2, 3]}, None),
        ("completions", {"prompt": ["a", "b"]}, "not a single prompt"),
        ("completions", {"prompt": "x", "echo": True}, "echo or prompt_logprobs"),
        ("completions", {"prompt": "x", "n": 2}, "n > 1"),
        ("chat", {"messages": [], "tool_choice": "required"}, "a forced tool choice"),
        ("chat", {"messages": [], "tool_choice": "auto"}, None),
        ("chat", {"messages": [], "guided_json": {}}, "structured output"),
        ("chat", {"messages": [], "response_format": {"type": "text"}}, None),
    ],
)
def test_what_can_be_continued(kind: str, body: dict[str, Any], reason: str | None) -> None:
    assert why_not(_call(kind, body)) == reason
    assert why_not(_call(kind, body, stream=False)) == "not streamed"


def test_token_ids_are_asked_for_a_token_id_prompt_only_and_stripped_again() -> None:
    body: dict[str, Any] = {"prompt": [1, 2]}
    assert ask_for_token_ids("completions", body) and body["return_token_ids"] is True
    assert not ask_for_token_ids("completions", {"prompt": [1], "return_token_ids": True})
    assert not ask_for_token_ids("completions", {"prompt": "text"})
    assert not ask_for_token_ids("chat", {"messages": []})
    chunk = {"id": "c", "prompt_token_ids": [1], "choices": [{"text": "a", "token_ids": [7]}]}
    assert strip_token_ids(chunk) == {"id": "c", "choices": [{"text": "a"}]}
    plain = {"id": "c", "choices": [{"text": "a"}]}
    assert strip_token_ids(plain) is plain


def test_a_transcript_records_text_ids_and_what_blocks_a_continuation() -> None:
    t = Transcript("completions", ids=True)
    t.feed({"id": "x", "created": 5, "choices": [{"index": 0, "text": "a", "token_ids": [1]}]})
    t.feed({"id": "x", "choices": [{"index": 0, "text": " b", "token_ids": [2, 3]}]})
    assert (t.id, t.created, t.text, t.ids, t.generated) == ("x", 5, ["a", " b"], [1, 2, 3], 3)
    t.feed({"id": "x", "choices": [{"index": 0, "text": "c"}]})  # no ids: cannot go on exactly
    assert t.ids is None and t.blocked == "the worker gave no token ids"
    chat = Transcript("chat")
    chat.feed({"id": "y", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    chat.feed({"id": "y", "choices": [{"index": 0, "delta": {"content": "hi"}}]})
    assert chat.text == ["hi"] and chat.blocked is None
    chat.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]})
    assert chat.blocked == "a tool call was under way"
    chat.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    assert chat.finished


def test_continuations_carry_the_prompt_and_what_was_generated_with_the_budget_reduced() -> None:
    from kvroute.proxy import ProxyConfig, WorkerSpec

    m = Migrator(None, ProxyConfig([WorkerSpec("http://w")]))  # type: ignore[arg-type]
    t = Transcript("completions", ids=True)
    t.feed(
        {
            "choices": [
                {"text": "a", "token_ids": [7]},
            ]
        }
    )
    t.feed({"choices": [{"text": "b", "token_ids": [8]}]})
    ids = TokenIds(np.array([1, 2], dtype=np.int64), b"[1, 2]")
    body = {"model": "m", "prompt": ids, "max_tokens": 10, "min_tokens": 5, "stream": True}
    cont = m._continuation(_call("completions", body), t, 1)
    assert cont is not None and cont.headers["X-Request-Id"] == "r-m1"
    sent = json.loads(cont.data)
    assert sent["prompt"] == [1, 2, 7, 8] and sent["max_tokens"] == 8 and sent["min_tokens"] == 3
    text = Transcript("completions")
    text.feed({"choices": [{"text": " more"}]})
    cont = m._continuation(_call("completions", {"prompt": "Once", "stream": True}), text, 1)
    assert cont is not None and json.loads(cont.data)["prompt"] == "Once more"
    assert json.loads(cont.data)["max_tokens"] == 15  # vLLM's default budget, 16, less one
    chat = Transcript("chat")
    chat.feed({"choices": [{"delta": {"content": "Hel"}}]})
    msgs = [{"role": "user", "content": "hi"}]
    cont = m._continuation(_call("chat", {"messages": msgs, "max_completion_tokens": 4}), chat, 2)
    assert cont is not None
    sent = json.loads(cont.data)
    assert sent["messages"][-1] == {"role": "assistant", "content": "Hel"}
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["max_completion_tokens"] == 3
    spent = Transcript("chat")
    for _ in range(4):
        spent.feed({"choices": [{"delta": {"content": "x"}}]})
    assert m._continuation(_call("chat", {"messages": msgs, "max_tokens": 4}), spent, 1) is None
