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
        (cont,) = spare.requests
        assert cont.request_id == "m1-m1"
        first = len(cont.prompt_token_ids) - len(prompt)  # tokens worker 0 had generated
        assert first >= 5 and cont.completion_tokens == 30 - first
        tok = MockTokenizer()
        sent = [tok.encode(p.strip())[-1] for p in pieces[:first]]  # the mock's piece ids
        assert list(cont.prompt_token_ids) == prompt + sent
        m = proxy.proxy.metrics
        assert m.value("kvroute_proxy_migrations_total", {"outcome": "continued"}) == 1
        assert m.value("kvroute_routed_requests_total", {"worker": "1"}) == 1
        assert proxy.router.load(0)["healthy"] is False
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
        (cont,) = spare.requests
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
        assert "error" in events[-1] and events[-1]["error"]["code"] == 502
        assert spare.requests == []
        m = proxy.proxy.metrics
        assert m.value("kvroute_proxy_migrations_total", {"outcome": "not_migratable"}) == 1


def test_with_no_worker_left_the_stream_ends_with_an_error_event() -> None:
    with MockWorkerProcess(publish_events=False, token_delay=0.05) as doomed:
        config = ProxyConfig([WorkerSpec(doomed.url)], **FAST_HEALTH)
        with ProxyServer(config, router=Router(block_size=16, kv_events=False)) as proxy:
            body = {"model": MODEL, "prompt": list(range(100, 140)), "max_tokens": 30,
                    "stream": True}  # fmt: skip
            _, events = _stream_and_kill(proxy.url, "/v1/completions", body, doomed, 3, "z1")
            assert "error" in events[-1] and events[-1]["error"]["code"] == 502
            m = proxy.proxy.metrics
            assert m.value("kvroute_proxy_migrations_total", {"outcome": "failed"}) == 1


def test_migrations_zero_keeps_the_error_event() -> None:
    with doomed_fleet(migrations=0) as (proxy, doomed, spare):
        body = {"model": MODEL, "prompt": list(range(100, 140)), "max_tokens": 30, "stream": True}
        _, events = _stream_and_kill(proxy.url, "/v1/completions", body, doomed, 3, "o1")
        assert "error" in events[-1] and spare.requests == []
        # the proxy asked for no token ids it would not use
        assert not any("token_ids" in ch for e in events[:-1] for ch in e["choices"])
