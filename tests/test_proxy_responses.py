"""kvroute.proxy, OpenAI's Responses API and the pass-through endpoints, with the ``openai`` SDK.

``/v1/responses`` streamed and not, routed by its rendered prompt in every
tokenizing mode; a ``previous_response_id`` sent to the worker that holds
the response; an unknown one answered as vLLM answers it. Then
``/v1/embeddings``, ``/tokenize`` and ``/detokenize`` through one worker.
"""

from __future__ import annotations

import base64
import json
import struct
import urllib.request
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from test_proxy_support import fleet, post, routed_requests  # noqa: E402

from kvroute.proxy import WORKER_HEADER  # noqa: E402
from kvroute.proxy.responses import LocalResponseStore, ResponsesStream  # noqa: E402
from kvroute.testing import DEFAULT_CHAT_TEMPLATE  # noqa: E402
from kvroute.testing._embeddings import embedding  # noqa: E402

MODEL = "mock-model"
PATH = {"type": "object", "properties": {"path": {"type": "string"}}}
TOOLS = [{"type": "function", "name": "read_file", "description": "Read.", "parameters": PATH}]
INPUT = [
    {"role": "user", "content": [{"type": "input_text", "text": "Fix the failing test."}]},
    {"type": "function_call", "call_id": "c1", "name": "read_file",
     "arguments": '{"path": "utils.py"}'},
    {"type": "function_call_output", "call_id": "c1", "output": "def add(a, b): return a - b"},
]  # fmt: skip


def _modes(tokenizer_json: Path) -> list[dict[str, Any]]:
    return [
        {"tokenize_with": "local", "tokenizer": str(tokenizer_json),
         "chat_template": DEFAULT_CHAT_TEMPLATE},
        {"tokenize_with": "render"},
        {"tokenize_with": "tokenize"},
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["local", "render", "tokenize"])
def test_responses_are_routed_by_the_prompt_the_worker_renders(
    mode: str, tokenizer_json: Path, openai_client: Any
) -> None:
    options = next(m for m in _modes(tokenizer_json) if m["tokenize_with"] == mode)
    worker_kw = {"tokenizer": tokenizer_json}
    with fleet(2, worker_kw=worker_kw, **options) as (proxy, workers):
        client = openai_client(proxy.url + "/v1")
        kwargs: dict[str, Any] = {"model": MODEL, "instructions": "You fix bugs.",
                                  "input": INPUT, "tools": TOOLS,
                                  "max_output_tokens": 5}  # fmt: skip
        raw = client.responses.with_raw_response.create(**kwargs)
        worker = int(raw.headers[WORKER_HEADER])
        response = raw.parse()
        record = workers[worker].requests()[-1]
        assert list(routed_requests(proxy.router)[-1].tokens) == list(record.prompt_token_ids)
        assert len(response.output_text.split()) == 5 and response.status == "incomplete"
        assert response.usage.input_tokens == record.prompt_tokens
        # Streamed: the SDK's events, the same text for the same prompt, on the worker
        # that holds its prefix now (event-free routing predicts it).
        with client.responses.create(**kwargs, stream=True) as stream:
            events = list(stream)
            again = int(stream.response.headers[WORKER_HEADER])
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        final = events[-1].response
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert "".join(deltas) == final.output_text == response.output_text
        assert again == worker and final.usage.input_tokens_details.cached_tokens > 0
        assert final.usage.input_tokens_details.cached_tokens == workers[worker].cache_hits()[
            workers[worker].requests()[-1].request_id
        ]


def test_previous_response_id_goes_to_the_worker_holding_the_response(openai_client: Any) -> None:
    with fleet(3) as (proxy, workers):
        client = openai_client(proxy.url + "/v1")
        chains = []
        for c in range(4):
            raw = client.responses.with_raw_response.create(
                model=MODEL, input=f"Task {c}: list the files.", max_output_tokens=2
            )
            chains.append((int(raw.headers[WORKER_HEADER]), raw.parse().id))
        for _turn in range(3):
            for c, (worker, previous) in enumerate(chains):
                # a new question only: routed by it alone, it could land anywhere
                raw = client.responses.with_raw_response.create(
                    model=MODEL, input=f"And then? ({c})", previous_response_id=previous,
                    max_output_tokens=2,
                )  # fmt: skip
                assert int(raw.headers[WORKER_HEADER]) == worker
                response = raw.parse()
                assert response.previous_response_id == previous
                # the worker rendered the whole conversation it keeps
                assert f"Task {c}" in workers[worker].tokenizer.decode(
                    workers[worker].requests()[-1].prompt_token_ids
                )
                chains[c] = (worker, response.id)
        assert len(proxy.proxy.responses) == 16  # type: ignore[arg-type]


class _SharedStore(LocalResponseStore):
    """A replica's store that has forgotten every id: only the fleet's shared copy knows them."""

    def __init__(self, shared: dict[str, int]) -> None:
        super().__init__()
        self.shared = shared

    async def aworker_of(self, response_id: str) -> int | None:
        return self.worker_of(response_id) or self.shared.get(response_id)


def test_a_store_that_looks_further_is_asked_where_a_response_lives(openai_client: Any) -> None:
    # as RedisResponseStore is, on a replica that started after the response was made
    with fleet(3) as (proxy, _workers):
        client = openai_client(proxy.url + "/v1")
        made = {}
        for c in range(6):
            raw = client.responses.with_raw_response.create(
                model=MODEL, input=f"Task {c}: list the files.", max_output_tokens=2
            )
            made[raw.parse().id] = int(raw.headers[WORKER_HEADER])
        proxy.proxy.responses = _SharedStore(dict(made))
        for rid, worker in made.items():
            raw = client.responses.with_raw_response.create(
                model=MODEL, input="And then?", previous_response_id=rid, max_output_tokens=2
            )
            assert int(raw.headers[WORKER_HEADER]) == worker


def test_an_unknown_or_lost_previous_response_is_the_workers_404(openai_client: Any) -> None:
    with fleet(2) as (proxy, workers):
        client = openai_client(proxy.url + "/v1")
        with pytest.raises(openai.NotFoundError) as info:
            client.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope")
        body = info.value.body
        assert body["message"] == "Response with id 'resp_nope' not found."
        assert (body["param"], body["code"], body["type"]) == (
            "response_id", "not_found", "invalid_request_error")  # fmt: skip
        # The worker holding a response goes down: the continuation goes to
        # another, which does not know it (vLLM keeps responses in memory).
        raw = client.responses.with_raw_response.create(model=MODEL, input="hi")
        holder, rid = int(raw.headers[WORKER_HEADER]), raw.parse().id
        other = workers[1 - holder]
        before = other.http_requests().get("/v1/responses", 0)
        workers[holder].stop()
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model=MODEL, input="more", previous_response_id=rid)
        assert other.http_requests()["/v1/responses"] == before + 1


def test_responses_request_errors_name_the_field(openai_client: Any) -> None:
    with fleet(1) as (proxy, workers):
        url = proxy.url + "/v1/responses"
        for body, param, code in (
            ({"model": MODEL}, "input", "missing_required_parameter"),
            ({"model": MODEL, "input": 5}, "input", "invalid_value"),
            ({"model": MODEL, "input": [1]}, "input[0]", "invalid_value"),
            ({"model": MODEL, "input": "x", "max_output_tokens": 0}, "max_output_tokens",
             "invalid_value"),
            ({"model": MODEL, "input": "x", "previous_response_id": 3}, "previous_response_id",
             "invalid_type"),
        ):  # fmt: skip
            status, _, raw = post(url, body)
            err = json.loads(raw)["error"]
            assert status == 400 and (err["param"], err["code"]) == (param, code), raw
        assert not workers[0].requests()


def test_a_stream_breaking_ends_with_a_responses_error_event() -> None:
    with fleet(1, retries=0) as (proxy, workers):
        workers[0].token_delay = 0.05
        body = {"model": MODEL, "input": "hi", "stream": True, "max_output_tokens": 50}
        req = urllib.request.Request(proxy.url + "/v1/responses", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=20) as r:
            first = r.readline()
            assert first.startswith(b"event: response.created")
            workers[0].pause()  # silent: the health checks take it out, the stream breaks
            rest = r.read().decode()
        events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "error" and events[-1]["code"] == "bad_gateway"
        assert events[-1]["sequence_number"] == events[-2]["sequence_number"] + 1


def test_stream_watcher_reads_id_usage_and_errors() -> None:
    s = ResponsesStream()
    usage = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 32},
             "output_tokens": 3}  # fmt: skip
    events = [
        {"type": "response.created", "response": {"id": "resp_1"}, "sequence_number": 0},
        {"type": "response.output_text.delta", "delta": "a", "sequence_number": 1},
        {"type": "response.completed", "response": {"id": "resp_1", "usage": usage},
         "sequence_number": 2},
    ]  # fmt: skip
    data = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    assert s.feed(data[:30]) + s.feed(data[30:]) == data  # byte for byte
    assert (s.response_id, s.first_token, s.done, s.sequence_number) == ("resp_1", True, True, 2)
    assert s.usage is not None and (s.usage.cached_tokens, s.output_tokens) == (32, 3)
    err = ResponsesStream()
    err.feed(b'event: error\ndata: {"type": "error", "message": "boom", "code": "x"}\n\n')
    assert err.error == "boom"


def test_the_local_store_is_bounded_and_expires() -> None:
    now = [0.0]
    store = LocalResponseStore(max_entries=3, ttl=10.0, clock=lambda: now[0])
    for i in range(4):
        store.remember(f"r{i}", i % 2)
    assert [store.worker_of(f"r{i}") for i in range(4)] == [None, 1, 0, 1]
    now[0] = 9.0
    assert store.worker_of("r1") == 1  # a look-up refreshes its TTL
    now[0] = 15.0
    assert (store.worker_of("r1"), store.worker_of("r2")) == (1, None)
    store.forget_worker(1)
    assert store.worker_of("r1") is None and len(store) == 0
    with pytest.raises(ValueError):
        LocalResponseStore(max_entries=0)


def test_embeddings_tokenize_and_detokenize_pass_through(openai_client: Any) -> None:
    # (not scraping the workers' metrics: the test sets one's waiting requests itself)
    aliases = [("text-embedding-3-small", MODEL)]
    with fleet(2, model_map=aliases, scrape_metrics=False) as (proxy, workers):
        client = openai_client(proxy.url + "/v1")
        # The SDK asks for base64 and decodes it; the model alias is mapped.
        got = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
        tok = workers[0].tokenizer
        assert [list(d.embedding) for d in got.data] == [
            pytest.approx(embedding(tok.encode(t)), abs=1e-6) for t in ("hello", "world")
        ]
        assert got.usage.prompt_tokens == 10 and got.model == MODEL
        status, headers, raw = post(proxy.url + "/v1/embeddings",
                                    {"model": MODEL, "input": [1, 2, 3]})  # fmt: skip
        vector = json.loads(raw)["data"][0]["embedding"]
        assert status == 200 and vector == pytest.approx(embedding([1, 2, 3]))
        as_b64 = {"model": MODEL, "input": [1, 2, 3], "encoding_format": "base64"}
        b64 = post(proxy.url + "/v1/embeddings", as_b64)[2]
        packed = base64.b64decode(json.loads(b64)["data"][0]["embedding"])
        assert list(struct.unpack("<16f", packed)) == pytest.approx(vector)
        # Embeddings go to the least-loaded worker: a busy one is passed over.
        busy = int(headers[WORKER_HEADER])
        proxy.router.update_worker_metrics(busy, waiting_requests=5)
        for _ in range(3):
            _, h, _ = post(proxy.url + "/v1/embeddings", {"model": MODEL, "input": "x"})
            assert int(h[WORKER_HEADER]) == 1 - busy
        # tokenize and detokenize, each worker in turn
        status, _, raw = post(proxy.url + "/tokenize", {"model": MODEL, "prompt": "hi"})
        assert status == 200 and json.loads(raw)["tokens"] == tok.encode("hi")
        ids = tok.encode("hi")
        status, _, raw = post(proxy.url + "/detokenize", {"model": MODEL, "tokens": ids})
        assert status == 200 and json.loads(raw)["prompt"] == "hi"
        # Errors: the worker's, in the proxy's shape; a model not served: the proxy's 404.
        status, _, raw = post(proxy.url + "/v1/embeddings", {"model": MODEL, "input": 5})
        err = json.loads(raw)["error"]
        assert status == 400 and (err["param"], err["code"]) == ("input", "bad_request")
        status, _, raw = post(proxy.url + "/tokenize", {"model": "nope", "prompt": "hi"})
        assert status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"
        assert all(not w.requests() for w in workers)  # nothing generated, nothing cached
        for w in workers:
            w.stop()
        status, _, raw = post(proxy.url + "/tokenize", {"model": MODEL, "prompt": "hi"})
        assert status in (502, 503)
