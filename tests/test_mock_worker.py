"""kvroute.testing.MockWorker: real HTTP and ZMQ on loopback, checked against vLLM's formats.

Every exchange goes over real sockets: urllib / aiohttp / the official
``anthropic`` SDK for HTTP, pyzmq SUB, DEALER and REQ sockets for KV events.
Payloads are decoded with msgspec directly, and the encoder and ZMQ framing
are compared byte for byte with the captured vLLM 0.33 vectors.

The SUB side never sleeps through ZMQ's slow-joiner window: it waits until the
worker's publisher has seen its subscription (``wait_for_subscribers``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("zmq")
pytest.importorskip("msgspec")
pytest.importorskip("jinja2")

import aiohttp
import msgspec
import zmq

from kvroute import Request, Router
from kvroute.events import BlockStored, EventApplier
from kvroute.events.decode import decode_vllm, vllm_cache_salt
from kvroute.events.engine_hashes import VllmLoRA, vllm_block_hashes
from kvroute.hashing import kvroute_block_hashes
from kvroute.testing import (
    BYTE_OFFSET,
    REPLAY_END_SEQ,
    SPECIAL_TOKENS,
    MockTokenizer,
    MockWorker,
    PrefixCache,
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEvent,
    anthropic_to_chat,
    decode_batch,
    encode_batch,
    pack_seq,
    unpack_seq,
)

VECTORS = Path(__file__).parent / "vectors"
# The ZMQ capture lives in the shared vectors folder (beside the repository).
_CAPTURE_CANDIDATES = (
    VECTORS / "vllm_zmq_capture.json",
    Path(__file__).resolve().parents[2] / "shared" / "vectors" / "vllm_zmq_capture.json",
)
TIMEOUT_MS = 5000

TEXT = (
    "The quick brown fox jumps over the lazy dog while the five boxing wizards "
    "jump quickly; pack my box with five dozen liquor jugs."
)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _request(
    url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def post(worker: MockWorker, path: str, body: Any, **headers: str) -> Any:
    status, raw = _request(worker.url + path, body, headers)
    assert status == 200, raw
    return json.loads(raw)


def post_error(worker: MockWorker, path: str, body: Any) -> tuple[int, Any]:
    status, raw = _request(worker.url + path, body)
    assert status != 200
    return status, json.loads(raw)


def sse_data(worker: MockWorker, path: str, body: Any) -> list[str]:
    """The ``data:`` payloads of an OpenAI-style event stream, in order."""
    status, raw = _request(worker.url + path, body)
    assert status == 200, raw
    events = raw.decode().split("\n\n")
    assert events[-1] == ""
    out = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        out.append(event[len("data: ") :])
    return out


def batch_dicts(payload: bytes) -> tuple[float, list[dict[str, Any]], int | None]:
    """Decode a payload generically (no schema) and check its outer shape."""
    decoded = msgspec.msgpack.decode(payload)
    assert isinstance(decoded, list) and len(decoded) == 3
    ts, events, rank = decoded
    assert isinstance(ts, float)
    for event in events:
        assert next(iter(event)) == "type"  # the tag comes first in every map
    return ts, events, rank


class Sockets:
    """ZMQ sockets for one test, all closed at teardown (never left to the GC)."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._open: list[zmq.Socket[bytes]] = []

    def socket(self, kind: int) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        self._open.append(sock)
        return sock

    def close(self) -> None:
        for sock in self._open:
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def zctx() -> Iterator[Sockets]:
    sockets = Sockets()
    yield sockets
    sockets.close()


@pytest.fixture
def worker() -> Iterator[MockWorker]:
    with MockWorker(block_size=4, num_blocks=64, token_delay=0.0005) as w:
        yield w


def subscribe(ctx: Sockets, worker: MockWorker) -> zmq.Socket[bytes]:
    """A SUB connected to the worker, returned once the worker has seen it subscribe."""
    before = worker.subscriptions
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    assert worker.events_endpoint is not None
    sub.connect(worker.events_endpoint)
    assert worker.wait_for_subscribers(before + 1, timeout=10)
    return sub


def wait_for_resubscription(sub: zmq.Socket[bytes], worker: MockWorker) -> None:
    """Wait until a SUB has reconnected to a restarted worker and subscribed again.

    libzmq hands a reconnected pipe to the SUB socket as a command that only the
    socket's own calls process, so the SUB is polled meanwhile (as any real
    subscriber's receive loop does) instead of sitting idle.
    """
    deadline = time.monotonic() + 10
    while not worker.wait_for_subscribers(1, timeout=0.01):
        assert time.monotonic() < deadline, "the SUB did not resubscribe"
        sub.poll(10)


def recv_live(sub: zmq.Socket[bytes], n: int) -> list[list[bytes]]:
    return [sub.recv_multipart() for _ in range(n)]


def replay(ctx: Sockets, worker: MockWorker, start: int) -> list[list[bytes]]:
    """Every DEALER reply message up to and including the end marker."""
    dealer = ctx.socket(zmq.DEALER)
    assert worker.replay_endpoint is not None
    dealer.connect(worker.replay_endpoint)
    dealer.send_multipart([b"", pack_seq(start)])
    out = []
    while True:
        frames = dealer.recv_multipart()
        out.append(frames)
        if frames[2] == REPLAY_END_SEQ:
            break
    return out


def load_capture() -> dict[str, Any]:
    for path in _CAPTURE_CANDIDATES:
        if path.exists():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
    pytest.skip("vllm_zmq_capture.json not found beside the repository")


def vector_events(decoded: dict[str, Any]) -> list[VllmEvent]:
    """The typed events of one vllm_kv_events.json ``decoded`` batch."""

    def h(x: Any) -> Any:
        return bytes.fromhex(x["bytes_hex"]) if isinstance(x, dict) else x

    out: list[VllmEvent] = []
    for raw in decoded["events"]:
        fields = dict(raw)
        kind = fields.pop("type")
        if "block_hashes" in fields:
            fields["block_hashes"] = [h(x) for x in fields["block_hashes"]]
        if "parent_block_hash" in fields:
            fields["parent_block_hash"] = h(fields["parent_block_hash"])
        cls = {
            "BlockStored": VllmBlockStored,
            "BlockRemoved": VllmBlockRemoved,
            "AllBlocksCleared": VllmAllBlocksCleared,
        }[kind]
        out.append(cls(**fields))
    return out


KV_EVENT_BATCHES = json.loads((VECTORS / "vllm_kv_events.json").read_text())["batches"]


# ---------------------------------------------------------------------------
# Wire format: byte-exact against vLLM 0.33
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", KV_EVENT_BATCHES, ids=[b["name"] for b in KV_EVENT_BATCHES])
def test_encoder_reproduces_vllm_payload_bytes(batch: dict[str, Any]) -> None:
    decoded = batch["decoded"]
    events = vector_events(decoded)
    payload = encode_batch(decoded["ts"], events, decoded["data_parallel_rank"])
    assert payload.hex() == batch["payload_hex"]
    back = decode_batch(payload)
    assert back.events == events and back.data_parallel_rank == decoded["data_parallel_rank"]


def test_seq_frames() -> None:
    assert pack_seq(0) == b"\0" * 8
    assert unpack_seq(pack_seq(2**64 - 1)) == 2**64 - 1 == unpack_seq(REPLAY_END_SEQ)
    with pytest.raises(ValueError):
        unpack_seq(b"\0")


def test_live_frames_and_replay_match_the_vllm_capture(
    zctx: Sockets,
) -> None:
    capture = load_capture()
    by_name = {b["name"]: b for b in KV_EVENT_BATCHES}
    with MockWorker(topic=capture["topic"], buffer_steps=100) as w:
        sub = subscribe(zctx, w)
        for frame in capture["live_pub_frames"]:
            decoded = by_name[frame["batch_name"]]["decoded"]
            seq = w.publish(vector_events(decoded), decoded["ts"], decoded["data_parallel_rank"])
            assert seq == frame["seq"]
        live = recv_live(sub, len(capture["live_pub_frames"]))
        assert [[f.hex() for f in m] for m in live] == [
            f["frames_hex"] for f in capture["live_pub_frames"]
        ]

        dealer_start = unpack_seq(bytes.fromhex(capture["replay_dealer"]["request_frames_hex"][1]))
        got = replay(zctx, w, dealer_start)
        assert [[f.hex() for f in m] for m in got] == capture["replay_dealer"][
            "reply_messages_frames_hex"
        ]
        beyond = capture["replay_dealer_start_beyond_buffer"]
        got = replay(zctx, w, unpack_seq(bytes.fromhex(beyond["request_frames_hex"][1])))
        assert [[f.hex() for f in m] for m in got] == beyond["reply_messages_frames_hex"]

        req = zctx.socket(zmq.REQ)
        assert w.replay_endpoint is not None
        req.connect(w.replay_endpoint)
        req.send(bytes.fromhex(capture["replay_req_socket"]["request_frame_hex"]))
        assert [f.hex() for f in req.recv_multipart()] == capture["replay_req_socket"][
            "reply_messages_frames_hex"
        ][0]
        with pytest.raises(zmq.ZMQError) as err:
            req.recv_multipart()
        assert err.value.errno == zmq.EFSM


# ---------------------------------------------------------------------------
# OpenAI-compatible endpoints
# ---------------------------------------------------------------------------


def test_completions_shape_and_cached_tokens_grow(worker: MockWorker) -> None:
    tok = MockTokenizer()
    first = post(worker, "/v1/completions", {"model": "mock-model", "prompt": TEXT})
    assert first["object"] == "text_completion" and first["model"] == "mock-model"
    (choice,) = first["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["text"]
    n = len(tok.encode(TEXT))
    assert first["usage"] == {
        "prompt_tokens": n,
        "total_tokens": n + 16,
        "completion_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 0},
    }

    again = post(worker, "/v1/completions", {"prompt": TEXT, "max_tokens": 3})
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n // 4 * 4
    assert again["usage"]["completion_tokens"] == 3
    assert again["choices"][0]["text"] == " ".join(choice["text"].split()[:3])

    longer = post(
        worker, "/v1/completions", {"prompt": TEXT + " And then some more.", "max_tokens": 1}
    )
    assert longer["usage"]["prompt_tokens_details"]["cached_tokens"] == n // 4 * 4

    log = worker.requests()
    assert [r.cached_tokens for r in log] == [0, n // 4 * 4, n // 4 * 4]
    assert all(r.path == "/v1/completions" and r.status == "finished" for r in log)
    assert log[0].prompt_tokens == n and log[0].completion_tokens == 16
    assert worker.cache_hits() == {r.request_id: r.cached_tokens for r in log}
    stats = worker.stats()
    assert stats.requests == 3 and stats.running == 0 and stats.cached_tokens == 2 * (n // 4 * 4)
    assert 0 < stats.hit_rate < 1


def test_completions_stream_with_usage(worker: MockWorker) -> None:
    plain = post(worker, "/v1/completions", {"prompt": TEXT, "max_tokens": 5})
    data = sse_data(
        worker,
        "/v1/completions",
        {
            "prompt": TEXT,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]

    # Without include_usage there is no usage chunk.
    data = sse_data(worker, "/v1/completions", {"prompt": TEXT, "max_tokens": 2, "stream": True})
    assert data[-1] == "[DONE]" and all("usage" not in json.loads(d) for d in data[:-1])


def test_completions_token_ids_and_prompt_lists(worker: MockWorker) -> None:
    ids = list(range(100, 140))
    out = post(worker, "/v1/completions", {"prompt": ids, "max_tokens": 1})
    assert out["usage"]["prompt_tokens"] == 40
    assert worker.requests()[-1].prompt_token_ids == tuple(ids)

    out = post(
        worker,
        "/v1/completions",
        {"prompt": [ids, ids[:20]], "max_tokens": 2},
        **{"X-Request-Id": "r"},
    )
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 40 + 20
    assert [r.request_id for r in worker.requests()[-2:]] == ["r-0", "r-1"]

    rendered = post(worker, "/v1/completions/render", {"prompt": ["ab", "cd"]})
    assert [r["token_ids"] for r in rendered] == [
        [ord("a") + BYTE_OFFSET, ord("b") + BYTE_OFFSET],
        [ord("c") + BYTE_OFFSET, ord("d") + BYTE_OFFSET],
    ]
    assert all(r["request_id"].startswith("cmpl-") for r in rendered)


def test_chat_completions_shapes(worker: MockWorker) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT}]
    out = post(worker, "/v1/chat/completions", {"messages": messages, "max_tokens": 4})
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert len(choice["message"]["content"].split()) == 4

    data = sse_data(
        worker,
        "/v1/chat/completions",
        {
            "messages": messages,
            "max_completion_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    body = chunks[1:-1]
    text = "".join(c["choices"][0]["delta"]["content"] for c in body)
    assert text == choice["message"]["content"]
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == (
        out["usage"]["prompt_tokens"] // 4 * 4
    )


def test_tokenize_render_and_generation_agree(worker: MockWorker) -> None:
    tok = MockTokenizer()
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "sys"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "x"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    body = {"messages": messages, "tools": tools}
    expected = tok.render_chat(messages, tools=tools)
    assert SPECIAL_TOKENS.index("<|image|>") in expected

    tokenized = post(worker, "/tokenize", body)
    assert tokenized == {
        "count": len(expected),
        "max_model_len": worker.max_model_len,
        "tokens": expected,
        "token_strs": None,
    }
    rendered = post(
        worker, "/v1/chat/completions/render", {**body, "max_tokens": 3, "cache_salt": "s"}
    )
    assert rendered["token_ids"] == expected
    assert rendered["request_id"].startswith("chatcmpl-") and rendered["features"] is None
    assert rendered["sampling_params"]["max_tokens"] == 3 and rendered["cache_salt"] == "s"
    post(worker, "/v1/chat/completions", {**body, "max_tokens": 1})
    assert list(worker.requests()[-1].prompt_token_ids) == expected

    # Plain prompts: /tokenize == encode == what /v1/completions admits.
    assert post(worker, "/tokenize", {"prompt": TEXT})["tokens"] == tok.encode(TEXT)
    strs = post(worker, "/tokenize", {"prompt": "a<|user|>", "return_token_strs": True})
    assert strs["token_strs"] == ["a", "<|user|>"]
    assert post(worker, "/detokenize", {"tokens": tok.encode(TEXT)}) == {"prompt": TEXT}

    # Anthropic: render, count_tokens and /v1/messages agree with render_anthropic.
    anthropic_body = {
        "model": "mock-model",
        "max_tokens": 2,
        "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        "tools": [{"name": "lookup", "description": "d", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": "x"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [{"type": "text", "text": "r"}],
                    },
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                    },
                    {"type": "text", "text": "and?"},
                ],
            },
        ],
        "metadata": {"user_id": "u"},
    }
    expected = tok.render_anthropic(anthropic_body)
    text = tok.decode(expected)
    assert text.startswith('<|tools|>[{"type": "function"')
    assert (
        "<|system|>Be brief.<|end|><|user|>hi<|end|>"
        '<|assistant|>calling<|tool_call|>lookup{"q": "x"}<|end|>'
    ) in text
    assert text.endswith("<|tool|>r<|end|><|user|>" + "<|image|>" * 4 + "and?<|end|><|assistant|>")
    assert post(worker, "/v1/messages/render", anthropic_body)["token_ids"] == expected
    assert post(worker, "/v1/messages/count_tokens", anthropic_body) == {
        "input_tokens": len(expected)
    }
    post(worker, "/v1/messages", anthropic_body)
    assert list(worker.requests()[-1].prompt_token_ids) == expected


def test_generate_endpoint_tokens_in_tokens_out(worker: MockWorker) -> None:
    ids = list(range(200, 232))
    out = post(
        worker, "/inference/v1/generate", {"token_ids": ids, "sampling_params": {"max_tokens": 3}}
    )
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 3
    assert worker.requests()[-1].path == "/inference/v1/generate"


def test_models_health_metrics(worker: MockWorker) -> None:
    models = json.loads(_request(worker.url + "/v1/models")[1])
    assert models["object"] == "list" and models["data"][0]["id"] == "mock-model"
    assert _request(worker.url + "/health") == (200, b"")
    post(worker, "/v1/completions", {"prompt": TEXT, "max_tokens": 1})
    metrics = _request(worker.url + "/metrics")[1].decode()
    assert 'vllm:num_requests_running{model_name="mock-model"} 0' in metrics
    assert "vllm:prefix_cache_queries_total" in metrics


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", {"prompt": "x", "model": "other"}, 404),
        ("/v1/completions", {"prompt": 3}, 400),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400),
        ("/v1/completions", {"prompt": "x" * 100, "max_tokens": 1000}, 400),
        ("/v1/chat/completions", {"messages": []}, 400),
        ("/tokenize", {}, 400),
    ],
)
def test_openai_errors(path: str, body: Any, status: int) -> None:
    with MockWorker(max_model_len=512) as w:
        got, err = post_error(w, path, body)
        assert got == status
        assert set(err["error"]) == {"message", "type", "param", "code"}
        assert err["error"]["code"] == status
        assert w.requests() == []


# ---------------------------------------------------------------------------
# Anthropic Messages, through the official SDK
# ---------------------------------------------------------------------------


def test_anthropic_sdk_messages_and_stream(worker: MockWorker) -> None:
    anthropic = pytest.importorskip("anthropic")
    messages = [{"role": "user", "content": TEXT}]
    with anthropic.Anthropic(base_url=worker.url, api_key="test", max_retries=0) as client:
        msg = client.messages.create(
            model="mock-model", max_tokens=5, system="Be brief.", messages=messages
        )
        assert msg.type == "message" and msg.role == "assistant" and msg.model == "mock-model"
        assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
        assert msg.content[0].type == "text" and len(msg.content[0].text.split()) == 5
        n = len(MockTokenizer().render_anthropic({"system": "Be brief.", "messages": messages}))
        assert (msg.usage.input_tokens, msg.usage.output_tokens) == (n, 5)
        assert msg.usage.cache_read_input_tokens == 0
        assert msg.usage.cache_creation_input_tokens is None  # not reported: the proxy fills it

        with client.messages.stream(
            model="mock-model", max_tokens=5, system="Be brief.", messages=messages
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == msg.content[0].text == final.content[0].text
        assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
        cached = n // 4 * 4
        assert final.usage.cache_read_input_tokens == cached
        assert final.usage.input_tokens == n - cached

        raw = client.messages.create(
            model="mock-model", max_tokens=2, messages=messages, stream=True
        )
        with raw:
            kinds = [event.type for event in raw]
        assert kinds == [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]  # the SDK drops the ping

        assert client.messages.count_tokens(model="mock-model", messages=messages).input_tokens == (
            len(MockTokenizer().render_anthropic({"messages": messages}))
        )

        with pytest.raises(anthropic.NotFoundError) as not_found:
            client.messages.create(model="nope", max_tokens=5, messages=messages)
        assert not_found.value.body["error"]["type"] == "not_found_error"


def test_anthropic_sse_wire_format(worker: MockWorker) -> None:
    status, raw = _request(
        worker.url + "/v1/messages",
        {
            "model": "mock-model",
            "max_tokens": 1,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert status == 200
    events = raw.decode().split("\n\n")[:-1]
    names = [e.split("\n")[0] for e in events]
    assert names[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
    for event in events:
        name_line, data_line = event.split("\n")
        assert json.loads(data_line.removeprefix("data: "))["type"] == name_line.removeprefix(
            "event: "
        )
    delta = json.loads(events[-2].split("\n")[1].removeprefix("data: "))
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 1


TOOLS = [
    {"name": "read", "description": "Read a file.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string"}, "limit": {"type": "integer"}}}},
    {"name": "ls", "input_schema": {"type": "object", "properties": {}}},
]  # fmt: skip


def _sse_events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON of each Anthropic SSE event, checked against its ``event:`` line."""
    out = []
    for event in raw.decode().split("\n\n")[:-1]:
        name_line, data_line = event.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name_line.removeprefix("event: ")
        out.append(data)
    return out


def test_anthropic_tool_choice_makes_a_tool_use_block(worker: MockWorker) -> None:
    body = {
        "model": "mock-model",
        "max_tokens": 6,
        "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "read"},
        "messages": [{"role": "user", "content": TEXT}],
    }
    msg = post(worker, "/v1/messages", body)
    (block,) = msg["content"]
    assert block["type"] == "tool_use" and block["name"] == "read"
    assert block["id"].startswith("chatcmpl-tool-")
    assert isinstance(block["input"]["path"], str) and isinstance(block["input"]["limit"], int)
    assert msg["stop_reason"] == "tool_use"
    assert msg["usage"]["output_tokens"] == worker.requests()[-1].completion_tokens <= 6

    status, raw = _request(worker.url + "/v1/messages", {**body, "stream": True})
    assert status == 200
    events = _sse_events(raw)
    assert [e["type"] for e in events] == [
        "message_start", "content_block_start", "ping",
        *["content_block_delta"] * 6,
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    start = events[1]["content_block"]
    assert (start["type"], start["name"], start["input"]) == ("tool_use", "read", {})
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"input_json_delta"}
    # Same prompt, same call: the streamed JSON pieces add up to the input.
    assert json.loads("".join(d["partial_json"] for d in deltas)) == block["input"]
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2]["usage"]["output_tokens"] == len(deltas)

    # "any" calls the first tool; "auto" and "none" leave the model writing text.
    any_choice = post(worker, "/v1/messages", {**body, "tool_choice": {"type": "any"}})
    assert any_choice["content"][0]["name"] == "read"
    one_tool = {**body, "tools": TOOLS[1:], "tool_choice": {"type": "any"}}
    (ls_block,) = post(worker, "/v1/messages", one_tool)["content"]
    assert (ls_block["name"], ls_block["input"]) == ("ls", {})
    for kind in ("auto", "none"):
        text = post(worker, "/v1/messages", {**body, "tool_choice": {"type": kind}})
        assert text["content"][0]["type"] == "text" and text["stop_reason"] == "max_tokens"

    status, err = post_error(
        worker, "/v1/messages", {**body, "tool_choice": {"type": "tool", "name": "nope"}}
    )
    assert status == 400 and "nope" in err["error"]["message"]


def test_anthropic_sdk_reads_the_tool_use_stream(worker: MockWorker) -> None:
    anthropic = pytest.importorskip("anthropic")
    with anthropic.Anthropic(base_url=worker.url, api_key="test", max_retries=0) as client:
        kwargs: dict[str, Any] = {
            "model": "mock-model", "max_tokens": 8, "tools": TOOLS,
            "tool_choice": {"type": "tool", "name": "read"},
            "messages": [{"role": "user", "content": TEXT}],
        }  # fmt: skip
        created = client.messages.create(**kwargs)
        with client.messages.stream(**kwargs) as stream:
            final = stream.get_final_message()
    assert final.stop_reason == created.stop_reason == "tool_use"
    (block,) = final.content
    assert block.type == "tool_use" and block.name == "read"
    assert block.input == created.content[0].input


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (
            {"model": "mock-model", "messages": [{"role": "user", "content": "x"}]},
            400,
            "invalid_request_error",
        ),
        ({"model": "mock-model", "max_tokens": 5, "messages": []}, 400, "invalid_request_error"),
        (
            {
                "model": "mock-model",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "video"}]}],
            },
            400,
            "invalid_request_error",
        ),
        (
            {"model": "other", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
            404,
            "not_found_error",
        ),
    ],
)
def test_anthropic_errors(worker: MockWorker, body: Any, status: int, kind: str) -> None:
    got, err = post_error(worker, "/v1/messages", body)
    assert got == status
    assert err["type"] == "error" and err["error"]["type"] == kind and err["error"]["message"]


# ---------------------------------------------------------------------------
# KV events over ZMQ
# ---------------------------------------------------------------------------


def test_events_carry_the_prompt_blocks(worker: MockWorker, zctx: Sockets) -> None:
    sub = subscribe(zctx, worker)
    tok = MockTokenizer()
    post(worker, "/v1/completions", {"prompt": TEXT, "max_tokens": 1})
    post(worker, "/v1/completions", {"prompt": TEXT + " More words here.", "max_tokens": 1})
    first, second = recv_live(sub, 2)
    assert [f[0] for f in (first, second)] == [b"", b""]
    assert [unpack_seq(f[1]) for f in (first, second)] == [0, 1]

    tokens = tok.encode(TEXT)
    hashes = [int(h) for h in vllm_block_hashes(tokens, 4, algo="sha256")]
    ts, events, rank = batch_dicts(first[2])
    assert rank == 0 and abs(ts - time.time()) < 60
    assert events == [
        {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": None,
            "token_ids": tokens[: len(hashes) * 4],
            "block_size": 4,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "extra_keys": [None] * len(hashes),
            "group_idx": 0,
        }
    ]
    longer = tok.encode(TEXT + " More words here.")
    all_hashes = [int(h) for h in vllm_block_hashes(longer, 4, algo="sha256")]
    assert all_hashes[: len(hashes)] == hashes
    _, (stored,), _ = batch_dicts(second[2])
    assert stored["block_hashes"] == all_hashes[len(hashes) :]
    assert stored["parent_block_hash"] == hashes[-1]
    assert stored["token_ids"] == longer[len(hashes) * 4 : len(all_hashes) * 4]
    assert worker.cached_block_hashes() == set(all_hashes)
    assert [r.seq for r in worker.requests()] == [0, 1]

    # A full hit stores nothing, so publishes nothing.
    post(worker, "/v1/completions", {"prompt": TEXT, "max_tokens": 1})
    assert worker.requests()[-1].seq is None and worker.next_seq == 2


def test_cache_salt_changes_hashes_and_extra_keys(worker: MockWorker, zctx: Sockets) -> None:
    sub = subscribe(zctx, worker)
    tokens = list(range(100, 112))
    post(worker, "/v1/completions", {"prompt": tokens, "max_tokens": 1, "cache_salt": "tenant-A"})
    post(worker, "/v1/completions", {"prompt": tokens, "max_tokens": 1})
    (a,) = batch_dicts(recv_live(sub, 1)[0][2])[1]
    (b,) = batch_dicts(recv_live(sub, 1)[0][2])[1]
    assert a["block_hashes"] == worker.block_hashes(tokens, cache_salt="tenant-A")
    assert a["block_hashes"] == [
        int(h) for h in vllm_block_hashes(tokens, 4, cache_salt="tenant-A")
    ]
    assert a["extra_keys"] == [["tenant-A"], None, None]
    assert set(a["block_hashes"]).isdisjoint(b["block_hashes"])
    assert [r.cached_tokens for r in worker.requests()] == [0, 0]


def test_eviction_is_lru_and_tail_first(zctx: Sockets) -> None:
    with MockWorker(block_size=4, num_blocks=4, token_delay=0) as w:
        sub = subscribe(zctx, w)
        a = list(range(100, 112))  # 3 blocks
        b = list(range(200, 212))  # 3 other blocks
        post(w, "/v1/completions", {"prompt": a, "max_tokens": 1})
        post(w, "/v1/completions", {"prompt": b, "max_tokens": 1})
        ha, hb = w.block_hashes(a), w.block_hashes(b)
        live = recv_live(sub, 2)
        _, events, _ = batch_dicts(live[1][2])
        # Room for one block: two of A's are evicted, its deepest first.
        assert events[:2] == [
            {"type": "BlockRemoved", "block_hashes": [ha[2]], "medium": "GPU", "group_idx": 0},
            {"type": "BlockRemoved", "block_hashes": [ha[1]], "medium": "GPU", "group_idx": 0},
        ]
        assert events[2]["type"] == "BlockStored" and events[2]["block_hashes"] == hb
        assert w.cached_block_hashes() == {ha[0], *hb}
        assert w.requests()[-1].evicted_hashes == (ha[2], ha[1])
        assert w.stats().blocks_evicted == 2

        # A's first block is still cached: a hit of one block.
        out = post(w, "/v1/completions", {"prompt": a, "max_tokens": 1})
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 4


def test_reset_publishes_all_blocks_cleared(worker: MockWorker, zctx: Sockets) -> None:
    sub = subscribe(zctx, worker)
    post(worker, "/v1/completions", {"prompt": TEXT, "max_tokens": 1})
    assert worker.reset() == 1
    _live_store, live_reset = recv_live(sub, 2)
    assert batch_dicts(live_reset[2])[1] == [{"type": "AllBlocksCleared"}]
    assert worker.cached_block_hashes() == set()
    again = post(worker, "/v1/completions", {"prompt": TEXT, "max_tokens": 1})
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_replay_dealer_and_req(worker: MockWorker, zctx: Sockets) -> None:
    sub = subscribe(zctx, worker)
    for i in range(3):
        post(worker, "/v1/completions", {"prompt": f"{i} {TEXT}", "max_tokens": 1})
    live = recv_live(sub, 3)

    got = replay(zctx, worker, 1)
    assert got == [[b"", *m] for m in live[1:]] + [[b"", b"", REPLAY_END_SEQ, b""]]
    assert replay(zctx, worker, 99) == [[b"", b"", REPLAY_END_SEQ, b""]]

    req = zctx.socket(zmq.REQ)
    assert worker.replay_endpoint is not None
    req.connect(worker.replay_endpoint)
    req.send(pack_seq(0))
    assert req.recv_multipart() == live[0]
    with pytest.raises(zmq.ZMQError) as err:
        req.recv_multipart()
    assert err.value.errno == zmq.EFSM


def test_replay_buffer_keeps_the_last_buffer_steps(zctx: Sockets) -> None:
    with MockWorker(buffer_steps=2) as w:
        for _ in range(4):
            w.publish([])
        got = replay(zctx, w, 0)
        assert [unpack_seq(m[2]) for m in got[:-1]] == [2, 3]


def test_drop_seqs_leave_a_gap_live_but_not_in_replay(
    zctx: Sockets,
) -> None:
    with MockWorker(block_size=4, drop_seqs={1}) as w:
        sub = subscribe(zctx, w)
        for i in range(3):
            post(w, "/v1/completions", {"prompt": f"{i} {TEXT}", "max_tokens": 1})
        live = recv_live(sub, 2)
        assert [unpack_seq(m[1]) for m in live] == [0, 2]
        sub.setsockopt(zmq.RCVTIMEO, 50)
        with pytest.raises(zmq.Again):
            sub.recv_multipart()
        got = replay(zctx, w, 0)
        assert [unpack_seq(m[2]) for m in got] == [0, 1, 2, 2**64 - 1]
        assert [got[0][1:], got[2][1:]] == live


def test_publish_and_replay_switches(zctx: Sockets) -> None:
    with MockWorker(publish_events=False) as w:
        assert w.events_endpoint is None and w.replay_endpoint is None
        post(w, "/v1/completions", {"prompt": TEXT, "max_tokens": 1})
        assert w.reset() is None
        with pytest.raises(RuntimeError):
            w.publish([])
    with MockWorker(replay=False, topic="kv@a") as w:
        assert w.replay_endpoint is None and w.events_endpoint is not None
        sub = subscribe(zctx, w)
        w.publish([])
        assert recv_live(sub, 1)[0][0] == b"kv@a"


# ---------------------------------------------------------------------------
# Lifecycle and failure hooks
# ---------------------------------------------------------------------------


def test_restart_on_same_ports_resets_seq_and_cache(
    zctx: Sockets,
) -> None:
    w = MockWorker(block_size=4)
    w.start()
    try:
        url, events, replay_ep = w.url, w.events_endpoint, w.replay_endpoint
        sub = subscribe(zctx, w)
        post(w, "/v1/completions", {"prompt": TEXT, "max_tokens": 1})
        assert unpack_seq(recv_live(sub, 1)[0][1]) == 0

        w.restart()
        assert (w.url, w.events_endpoint, w.replay_endpoint) == (url, events, replay_ep)
        # The same SUB reconnects by itself and subscribes again.
        wait_for_resubscription(sub, w)
        out = post(w, "/v1/completions", {"prompt": TEXT, "max_tokens": 1})
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert unpack_seq(recv_live(sub, 1)[0][1]) == 0
        assert [unpack_seq(m[2]) for m in replay(zctx, w, 0)] == [0, 2**64 - 1]
        ports = (w.port, w.events_port, w.replay_port)
    finally:
        w.stop()

    # A new worker on the remembered ports is a restart too.
    with MockWorker(port=ports[0], events_port=ports[1], replay_port=ports[2]) as w2:
        assert (w2.url, w2.events_endpoint, w2.replay_endpoint) == (url, events, replay_ep)
        wait_for_resubscription(sub, w2)
        w2.publish([])
        assert unpack_seq(recv_live(sub, 1)[0][1]) == 0


def test_start_stop_leaves_no_threads_and_rejects_double_start() -> None:
    before = set(threading.enumerate())
    w = MockWorker()
    w.start()
    with pytest.raises(RuntimeError):
        w.start()
    w.stop()
    w.stop()  # idempotent
    assert set(threading.enumerate()) == before
    assert not w.is_running


def test_bad_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError):
        MockWorker(block_size=0)
    with pytest.raises(ValueError):
        MockWorker(token_delay=-1)
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        MockWorker(hash_algo="xxhash")
    w = MockWorker(hash_algo="xxhash_cbor", hash_seed="0", block_size=4)
    assert w.block_hashes(range(8)) == [
        int(h) for h in vllm_block_hashes(list(range(8)), 4, algo="xxhash_cbor", seed="0")
    ]


def test_start_fails_cleanly_on_a_taken_port() -> None:
    with MockWorker() as w:
        before = set(threading.enumerate())
        clash = MockWorker(port=w.port)
        with pytest.raises(OSError):
            clash.start()
        assert not clash.is_running
        assert set(threading.enumerate()) == before


def test_fail_next(worker: MockWorker) -> None:
    worker.fail_next(2, status=503)
    status, err = post_error(worker, "/v1/completions", {"prompt": TEXT})
    assert status == 503 and err["error"]["code"] == 503
    status, err = post_error(
        worker,
        "/v1/messages",
        {"model": "mock-model", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
    )
    assert status == 503 and err["type"] == "error" and err["error"]["type"] == "api_error"
    assert post(worker, "/tokenize", {"prompt": "x"})["count"] == 1  # not a generation path
    post(worker, "/v1/completions", {"prompt": TEXT, "max_tokens": 1})
    assert len(worker.requests()) == 1
    with pytest.raises(ValueError):
        worker.fail_next(1, status=200)


def test_pause_resume_and_stop_while_paused() -> None:
    async def scenario(w: MockWorker) -> None:
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession() as session:
            w.pause()
            assert w.paused
            with pytest.raises(asyncio.TimeoutError):
                async with session.get(w.url + "/health", timeout=timeout):
                    pass
            w.resume()
            async with session.get(w.url + "/health") as resp:
                assert resp.status == 200

            # A stream freezes mid-way while paused, then completes.
            async with session.post(
                w.url + "/v1/completions", json={"prompt": TEXT, "max_tokens": 50, "stream": True}
            ) as resp:
                first = await resp.content.readline()
                assert first.startswith(b"data: ")
                w.pause()
                await asyncio.sleep(0.05)
                frozen = w.requests()[-1].completion_tokens
                await asyncio.sleep(0.05)
                assert w.requests()[-1].completion_tokens == frozen < 50
                w.resume()
                rest = await resp.read()
            assert rest.endswith(b"data: [DONE]\n\n")

            # Stopping while requests hang is prompt: a paused stream is cut and
            # recorded as aborted, a request held at the door never reaches the engine.
            async with session.post(
                w.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": TEXT}], "stream": True},
            ) as resp:
                await resp.content.readline()
                w.pause()
                waiting = asyncio.ensure_future(
                    session.post(w.url + "/v1/completions", json={"prompt": TEXT})
                )
                await asyncio.sleep(0.05)
                started = time.monotonic()
                await w.astop()
                assert time.monotonic() - started < 5
                with pytest.raises(aiohttp.ClientError):
                    await resp.read()
            with pytest.raises(aiohttp.ClientError):
                await waiting
            assert w.requests()[-1].path == "/v1/chat/completions"
            assert w.requests()[-1].status == "aborted"
            assert w.stats().running == 0

    w = MockWorker(token_delay=0.002)
    w.start()
    try:
        asyncio.run(scenario(w))
    finally:
        w.stop()


def test_client_disconnect_aborts_and_releases() -> None:
    async def scenario(w: MockWorker) -> None:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                w.url + "/v1/completions", json={"prompt": TEXT, "max_tokens": 1000, "stream": True}
            )
            await resp.content.readline()
            resp.close()  # drop the connection mid-stream
        deadline = time.monotonic() + 10
        while w.requests()[-1].status == "running":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert w.requests()[-1].status == "aborted"
        assert w.requests()[-1].completion_tokens < 1000

    blocks = len(MockTokenizer().encode(TEXT)) // 4
    with MockWorker(block_size=4, num_blocks=blocks, token_delay=0.002) as w:
        asyncio.run(scenario(w))
        # The aborted request's blocks were unpinned: another prompt can evict them all.
        post(w, "/v1/completions", {"prompt": TEXT.upper(), "max_tokens": 1})
        assert len(w.requests()[-1].stored_hashes) == len(w.requests()[-1].evicted_hashes) == blocks


def test_async_context_manager_and_concurrent_streams() -> None:
    async def scenario() -> None:
        async with MockWorker(block_size=4) as w, aiohttp.ClientSession() as session:

            async def one(i: int) -> str:
                body = {
                    "messages": [{"role": "user", "content": TEXT}],
                    "max_tokens": 8,
                    "stream": True,
                }
                text = []
                async with session.post(
                    w.url + "/v1/chat/completions", json=body, headers={"X-Request-Id": f"req-{i}"}
                ) as resp:
                    assert resp.headers["X-Request-Id"] == f"req-{i}"
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            delta = json.loads(line[6:])["choices"][0]["delta"]
                            text.append(delta.get("content", ""))
                return "".join(text)

            texts = await asyncio.gather(*(one(i) for i in range(4)))
            assert len(set(texts)) == 1  # deterministic
            assert sorted(r.request_id for r in w.requests()) == [f"req-{i}" for i in range(4)]
            assert w.stats().running == 0
            # Concurrent identical prompts: exactly one stored the blocks.
            assert sum(bool(r.stored_hashes) for r in w.requests()) == 1

    asyncio.run(scenario())


# ---------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------


def test_mock_tokenizer_bytes_and_specials() -> None:
    tok = MockTokenizer()
    text = "héllo <|user|> wörld<|end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[:2] == [ord("h") + BYTE_OFFSET, 0xC3 + BYTE_OFFSET]
    assert SPECIAL_TOKENS.index("<|user|>") in ids and SPECIAL_TOKENS.index("<|end|>") == ids[-1]
    assert tok.encode("x", add_special_tokens=True) == tok.encode("x", add_special_tokens=False)
    assert tok.vocab_size == BYTE_OFFSET + 256
    assert tok.render_chat([{"role": "user", "content": "a"}], add_generation_prompt=False) == [
        SPECIAL_TOKENS.index("<|user|>"),
        ord("a") + BYTE_OFFSET,
        SPECIAL_TOKENS.index("<|end|>"),
    ]


def test_anthropic_to_chat_conversion() -> None:
    messages, tools = anthropic_to_chat(
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}],
                },
            ],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        }
    )
    # vLLM's shapes: no content key without text, description None, defer_loading dumped.
    assert messages == [
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "t", "content": "ok"},
    ]
    assert tools == [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": None,
                "parameters": {"type": "object"},
                "defer_loading": None,
            },
        }
    ]


def test_hugging_face_tokenizer_and_template(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0}
    for word in ["hello", "world", "how", "are", "you", "user", "assistant"]:
        vocab[word] = len(vocab)
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    template = (
        "{% for m in messages %}"
        "<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    messages = [{"role": "user", "content": "hello world how are you"}]
    rendered_text = "<|im_start|>user hello world how are you<|im_end|><|im_start|>assistant "
    expected = hf.encode(rendered_text, add_special_tokens=False).ids

    tok = MockTokenizer(path, template)
    assert tok.apply_chat_template(messages) == rendered_text
    assert tok.render_chat(messages) == expected
    assert tok.vocab_size == len(vocab) + 2
    with MockWorker(tokenizer=path, chat_template=template, block_size=4) as w:
        assert post(w, "/tokenize", {"messages": messages})["tokens"] == expected
        assert (
            post(w, "/v1/chat/completions/render", {"messages": messages})["token_ids"] == expected
        )
        post(w, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
        assert list(w.requests()[-1].prompt_token_ids) == expected
        assert post(w, "/tokenize", {"prompt": "hello you"})["tokens"] == [1, 5]


# ---------------------------------------------------------------------------
# LoRA adapters (vllm serve BASE --enable-lora --lora-modules name=/models/name)
# ---------------------------------------------------------------------------

LORAS = ("sql-lora", "chat-lora")


def decoded_store(payload: bytes) -> BlockStored:
    """A payload's one event, decoded by kvroute's own vLLM decoder: a ``BlockStored``."""
    (ev,) = decode_vllm(payload).events
    assert isinstance(ev, BlockStored)
    return ev


@pytest.fixture
def lora_worker() -> Iterator[MockWorker]:
    with MockWorker(block_size=4, num_blocks=64, token_delay=0.0005, lora_adapters=LORAS) as w:
        yield w


def test_models_lists_lora_adapters_with_their_parent(lora_worker: MockWorker) -> None:
    assert lora_worker.lora_adapters == LORAS
    assert [lora_worker.lora_id(n) for n in LORAS] == [1, 2]
    assert lora_worker.lora_path("sql-lora") == "/models/sql-lora"
    with pytest.raises(KeyError):
        lora_worker.lora_id("mock-model")
    models = json.loads(_request(lora_worker.url + "/v1/models")[1])
    base, *adapters = models["data"]
    assert base["id"] == "mock-model" and base["parent"] is None
    assert [a["id"] for a in adapters] == list(LORAS)
    for card in adapters:
        assert set(card) == set(base)
        assert card["parent"] == "mock-model"
        assert card["root"] == "/models/" + card["id"]
        assert card["object"] == "model" and card["owned_by"] == "vllm"
        assert card["max_model_len"] == base["max_model_len"]


def test_lora_requests_echo_the_model_and_unknown_models_404(lora_worker: MockWorker) -> None:
    out = post(lora_worker, "/v1/completions", {"model": "sql-lora", "prompt": TEXT})
    assert out["model"] == "sql-lora" and out["choices"][0]["text"]
    messages = [{"role": "user", "content": TEXT}]
    chat = post(lora_worker, "/v1/chat/completions", {"model": "chat-lora", "messages": messages})
    assert chat["model"] == "chat-lora"
    chunks = sse_data(
        lora_worker,
        "/v1/chat/completions",
        {"model": "chat-lora", "messages": messages, "stream": True, "max_tokens": 2},
    )
    assert {json.loads(c)["model"] for c in chunks[:-1]} == {"chat-lora"}
    msg = post(
        lora_worker,
        "/v1/messages",
        {"model": "sql-lora", "max_tokens": 2, "messages": messages},
    )
    assert msg["model"] == "sql-lora"
    base = post(lora_worker, "/v1/completions", {"model": "mock-model", "prompt": TEXT})
    assert base["model"] == "mock-model"
    ids = list(range(200, 212))
    post(
        lora_worker,
        "/inference/v1/generate",
        {"model": "sql-lora", "token_ids": ids, "sampling_params": {"max_tokens": 1}},
    )
    assert [r.lora_name for r in lora_worker.requests()] == [
        "sql-lora",
        "chat-lora",
        "chat-lora",
        "sql-lora",
        None,
        "sql-lora",
    ]
    assert post(lora_worker, "/tokenize", {"model": "chat-lora", "prompt": "hi"})["count"] == 2

    n = len(lora_worker.requests())
    for path, body in [
        ("/v1/completions", {"model": "other-lora", "prompt": TEXT}),
        ("/v1/chat/completions", {"model": "other-lora", "messages": messages}),
        ("/tokenize", {"model": "other-lora", "prompt": "hi"}),
    ]:
        status, err = post_error(lora_worker, path, body)
        assert status == 404 and err["error"]["code"] == 404
    status, err = post_error(
        lora_worker, "/v1/messages", {"model": "other-lora", "max_tokens": 2, "messages": messages}
    )
    assert status == 404 and err["type"] == "error"
    assert len(lora_worker.requests()) == n


def test_lora_event_matches_the_vllm_capture(zctx: Sockets) -> None:
    # vllm_kv_events.json's "stored_lora_salt": LoRARequest("my-lora", 7,
    # "/models/my-lora"), cache_salt "tenant-A", base[:32], block_size 16.
    vector = {b["name"]: b for b in KV_EVENT_BATCHES}["stored_lora_salt"]["decoded"]
    (want,) = vector["events"]
    tokens = json.loads((VECTORS / "token_sequences.json").read_text())["base"][:40]
    names = [f"lora-{i}" for i in range(1, 7)] + ["my-lora"]
    with MockWorker(block_size=16, token_delay=0, lora_adapters=names) as w:
        assert w.lora_id("my-lora") == 7
        sub = subscribe(zctx, w)
        body = {"model": "my-lora", "prompt": tokens, "max_tokens": 1, "cache_salt": "tenant-A"}
        post(w, "/v1/completions", body)
        payload = recv_live(sub, 1)[0][2]

    _, (raw,), _ = batch_dicts(payload)
    # Field for field what vLLM published, but the session_id (the mock has none).
    expected = {k: v for k, v in want.items() if k != "session_id"}
    assert raw == {k: v for k, v in expected.items() if k in raw}
    # What is left out is only the defaulted nils, which vLLM omits on the wire too.
    assert all(expected[k] is None for k in expected.keys() - raw.keys())
    assert raw["extra_keys"] == [["my-lora", "tenant-A"], ["my-lora"]]

    ev = decoded_store(payload)
    assert ev.lora_name == "my-lora" and ev.lora_id == 7
    assert ev.cache_salt == "tenant-A"
    assert ev.extra_keys == (("my-lora", "tenant-A"), ("my-lora",))
    assert vllm_cache_salt(ev.extra_keys, ev.lora_name) == "tenant-A"
    lora = VllmLoRA("my-lora", "/models/my-lora")
    assert list(ev.block_hashes) == [
        int(h) for h in vllm_block_hashes(tokens, 16, lora=lora, cache_salt="tenant-A")
    ]


def test_lora_blocks_are_hashed_apart_from_the_base_model(
    lora_worker: MockWorker, zctx: Sockets
) -> None:
    sub = subscribe(zctx, lora_worker)
    tokens = list(range(100, 114))  # 3 full blocks of 4, and 2 more tokens
    for model in ("mock-model", "sql-lora", "chat-lora", "sql-lora"):
        post(lora_worker, "/v1/completions", {"model": model, "prompt": tokens, "max_tokens": 1})
    # Same tokens, other model: never a hit; the adapter again: a full hit.
    assert [r.cached_tokens for r in lora_worker.requests()] == [0, 0, 0, 12]
    assert lora_worker.next_seq == 3  # the full hit stored nothing
    base, sql, chat = (decoded_store(m[2]) for m in recv_live(sub, 3))

    assert (base.lora_name, base.lora_id, base.extra_keys) == (None, None, (None,) * 3)
    assert (sql.lora_name, sql.lora_id) == ("sql-lora", 1)
    assert (chat.lora_name, chat.lora_id) == ("chat-lora", 2)
    assert sql.extra_keys == (("sql-lora",),) * 3
    assert sql.cache_salt is None and vllm_cache_salt(sql.extra_keys, sql.lora_name) is None
    for ev, name in ((sql, "sql-lora"), (chat, "chat-lora")):
        lora = VllmLoRA(name, "/models/" + name)
        assert list(ev.block_hashes) == [int(h) for h in vllm_block_hashes(tokens, 4, lora=lora)]
        assert list(ev.block_hashes) == lora_worker.block_hashes(tokens, lora_name=name)
    assert list(base.block_hashes) == lora_worker.block_hashes(tokens)
    hash_sets = [set(ev.block_hashes) for ev in (base, sql, chat)]
    assert len(set().union(*hash_sets)) == 9  # pairwise disjoint
    recs = lora_worker.requests()
    assert recs[1].block_hashes == sql.block_hashes and recs[3].stored_hashes == ()

    # Salted: the salt follows the name on the first block only.
    body = {"model": "sql-lora", "prompt": tokens, "max_tokens": 1, "cache_salt": "tenant-A"}
    post(lora_worker, "/v1/completions", body)
    salted = decoded_store(recv_live(sub, 1)[0][2])
    assert salted.extra_keys == (("sql-lora", "tenant-A"), ("sql-lora",), ("sql-lora",))
    assert salted.cache_salt == "tenant-A" and lora_worker.requests()[-1].cached_tokens == 0
    assert list(salted.block_hashes) == lora_worker.block_hashes(
        tokens, cache_salt="tenant-A", lora_name="sql-lora"
    )


def test_lora_events_key_the_router_index_by_lora_name(
    lora_worker: MockWorker, zctx: Sockets
) -> None:
    sub = subscribe(zctx, lora_worker)
    tokens = list(range(100, 116))  # 4 blocks
    longer = tokens + list(range(300, 308))  # 2 more, stored as a child event
    for body in (
        {"model": "sql-lora", "prompt": tokens},
        {"model": "sql-lora", "prompt": longer},
        {"model": "chat-lora", "prompt": tokens, "cache_salt": "tenant-A"},
    ):
        post(lora_worker, "/v1/completions", {**body, "max_tokens": 1})
    router = Router(block_size=4, workers=[0, 1])
    applier = EventApplier(router)
    for msg in recv_live(sub, 3):
        assert applier.apply_batch(1, decode_vllm(msg[2])) == {"ok": 1}

    def overlap(toks: list[int], **kw: Any) -> dict[int, int]:
        return dict(router.index.match(kvroute_block_hashes(toks, 4, **kw)))

    assert overlap(longer, lora_name="sql-lora") == {1: 6}
    assert overlap(longer) == {} and overlap(longer, lora_name="chat-lora") == {}
    assert overlap(tokens, lora_name="chat-lora", cache_namespace="tenant-A") == {1: 4}
    assert overlap(tokens, lora_name="chat-lora") == {}
    d = router.route(Request("r", tokens=[*longer, 1, 2], lora_name="sql-lora"))
    assert (d.worker, d.matched_blocks) == (1, 6)


def test_bad_lora_adapters_fail_at_construction() -> None:
    for adapters in (["mock-model"], ["a", "b", "a"], [""]):
        with pytest.raises(ValueError):
            MockWorker(lora_adapters=adapters)
    with pytest.raises(TypeError):
        MockWorker(lora_adapters="sql-lora")
    assert MockWorker(model="base", lora_adapters=["mock-model"]).lora_adapters == ("mock-model",)
    with pytest.raises(ValueError):
        MockWorker(lora_adapters=["a"]).block_hashes(range(8), lora_name="b")


# ---------------------------------------------------------------------------
# The prefix cache on its own
# ---------------------------------------------------------------------------


def test_prefix_cache_pins_running_blocks_and_touches_hits() -> None:
    cache = PrefixCache(block_size=1, num_blocks=3)
    a = cache.acquire([1, 2], [10, 20])
    # Full and pinned: nothing can be evicted, so only what fits is stored.
    b = cache.acquire([5, 6], [50, 60])
    assert b.stored == (5,) and b.evicted == ()
    cache._check()
    cache.release(a)
    cache.release(a)  # idempotent
    cache.release(b)
    assert cache.lru_order() == [2, 1, 5]
    # A hit on block 1 moves it to the most recently used end.
    c = cache.acquire([1], [10])
    cache.release(c)
    assert cache.lru_order() == [2, 5, 1]
    d = cache.acquire([7, 8], [70, 80])
    assert d.evicted == (2, 5) and cache.hashes() == {1, 7, 8}
    cache._check()
    assert cache.clear() == [VllmAllBlocksCleared()]
    cache.release(d)  # blocks dropped by clear() are ignored
    assert len(cache) == 0 and cache.lru_order() == []
    with pytest.raises(ValueError):
        PrefixCache(block_size=0, num_blocks=1)
