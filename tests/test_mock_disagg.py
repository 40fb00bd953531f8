"""MockWorker's prefill/decode roles: vLLM's NIXL flow and SGLang's bootstrap flow, on loopback.

The field names are vLLM's (``kv_transfer_params``: ``do_remote_decode``,
``do_remote_prefill``, ``remote_block_ids``, ``remote_engine_id``,
``remote_request_id``, ``remote_host``, ``remote_port``, ``tp_size``) and
SGLang's (``bootstrap_host``, ``bootstrap_port``, ``bootstrap_room``); these
tests pin them.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from kvroute.testing import MockWorker

BS = 16
PROMPT = "The quick brown fox jumps over the lazy dog while the wizards jump quickly. " * 3
CHAT = [{"role": "user", "content": PROMPT}]


def request(url: str, body: Any, rid: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    if rid is not None:
        req.add_header("X-Request-Id", rid)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        with err:
            raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


@pytest.fixture(scope="module")
def vllm_pd() -> Iterator[tuple[MockWorker, MockWorker]]:
    with (
        MockWorker(block_size=BS, role="prefill", publish_events=False) as p,
        MockWorker(block_size=BS, role="decode", publish_events=False) as d,
    ):
        yield p, d


def test_a_vllm_prefill_worker_answers_with_kv_transfer_params(
    vllm_pd: tuple[MockWorker, MockWorker],
) -> None:
    p, d = vllm_pd
    body = {
        "messages": CHAT,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None,
        },
    }  # fmt: skip
    status, answer = request(p.url + "/v1/chat/completions", body, rid="pd-1")
    assert status == 200, answer
    params = answer["kv_transfer_params"]
    rec = p.requests()[-1]
    assert set(params) == {
        "do_remote_prefill", "do_remote_decode", "remote_block_ids", "remote_engine_id",
        "remote_request_id", "remote_host", "remote_port", "tp_size",
    }  # fmt: skip
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == p.engine_id and params["remote_request_id"] == "pd-1"
    assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", p.port)
    assert len(params["remote_block_ids"]) == rec.prompt_tokens // BS
    assert answer["usage"]["completion_tokens"] == 1
    # the decode worker pulls the blocks and decodes
    dbody = {"messages": CHAT, "max_tokens": 5, "kv_transfer_params": params}
    status, out = request(d.url + "/v1/chat/completions", dbody, rid="pd-1")
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 5
    got = d.requests()[-1]
    assert got.transferred_tokens == len(params["remote_block_ids"]) * BS
    assert got.cached_tokens == 0  # its own cache held nothing
    # vLLM counts the received tokens as computed, in cached_tokens
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == got.transferred_tokens
    assert p.transfers().pulled == 1 and d.transfers().received == 1
    # the received blocks are cached on the decode worker
    assert set(rec.block_hashes) <= d.cached_block_hashes()
    # an offer is pulled once: the same parameters again are refused
    status, again = request(d.url + "/v1/chat/completions", dbody, rid="pd-1b")
    assert status == 500 and "refused" in again["error"]["message"]
    assert p.transfers().refused == 1


def test_a_vllm_decode_worker_refuses_a_transfer_never_offered(
    vllm_pd: tuple[MockWorker, MockWorker],
) -> None:
    p, d = vllm_pd
    refused = p.transfers().refused
    params = {
        "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [1, 2],
        "remote_engine_id": p.engine_id, "remote_request_id": "never-offered",
        "remote_host": "127.0.0.1", "remote_port": p.port,
    }  # fmt: skip
    status, out = request(
        d.url + "/v1/completions", {"prompt": PROMPT, "kv_transfer_params": params}
    )
    assert status == 500 and "nothing offered" in out["error"]["message"]
    assert p.transfers().refused == refused + 1
    # wrong blocks for a real offer: refused too
    body = {"prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    _, answer = request(p.url + "/v1/completions", body, rid="pd-2")
    bad = {**answer["kv_transfer_params"], "remote_block_ids": [999]}
    status, out = request(d.url + "/v1/completions", {"prompt": PROMPT, "kv_transfer_params": bad})
    assert status == 500 and "not the blocks offered" in out["error"]["message"]
    # the offer is for another prompt: the decode worker notices
    good = answer["kv_transfer_params"]
    status, out = request(
        d.url + "/v1/completions", {"prompt": "other " + PROMPT, "kv_transfer_params": good}
    )
    assert status == 500 and "not this prompt's" in out["error"]["message"]
    # missing fields
    status, out = request(
        d.url + "/v1/completions",
        {"prompt": PROMPT, "kv_transfer_params": {"do_remote_prefill": True}},
    )
    assert status == 400 and "remote_engine_id" in out["error"]["message"]


def test_a_vllm_decode_worker_serves_a_plain_request(
    vllm_pd: tuple[MockWorker, MockWorker],
) -> None:
    _, d = vllm_pd
    status, out = request(d.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 200 and out["usage"]["completion_tokens"] == 2
    assert d.requests()[-1].transferred_tokens == 0


def test_the_sglang_flow_sends_both_legs_at_once() -> None:
    with (
        MockWorker(block_size=BS, role="prefill", disagg_protocol="sglang") as p,
        MockWorker(block_size=BS, role="decode", disagg_protocol="sglang") as d,
    ):
        assert p.bootstrap_port not in (0, p.port)
        body = {
            "messages": CHAT,
            "max_tokens": 6,
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": p.bootstrap_port,
            "bootstrap_room": 2**62 + 5,
        }
        results: dict[str, tuple[int, Any]] = {}

        def leg(name: str, url: str) -> None:
            results[name] = request(url + "/v1/chat/completions", body, rid="room-1")

        # the decode leg first: it waits for the prefill side to offer the room
        threads = [threading.Thread(target=leg, args=a) for a in (("d", d.url), ("p", p.url))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        (ps, pout), (ds, dout) = results["p"], results["d"]
        assert ps == 200 and ds == 200, (pout, dout)
        assert pout["usage"]["completion_tokens"] == 1  # a prefill server generates one token
        assert dout["usage"]["completion_tokens"] == 6
        assert d.requests()[-1].transferred_tokens == p.requests()[-1].prompt_tokens // BS * BS
        assert p.transfers().pulled == 1 and d.transfers().received == 1
        # a decode server cannot prefill alone
        status, out = request(d.url + "/v1/chat/completions", {"messages": CHAT})
        assert status == 400 and "bootstrap_room" in out["error"]["message"]
        bad = {**body, "bootstrap_room": -1}
        status, out = request(d.url + "/v1/chat/completions", bad)
        assert status == 400 and "bootstrap_room" in out["error"]["message"]


def test_an_sglang_prefill_without_its_decode_side_fails_after_the_timeout() -> None:
    with MockWorker(
        block_size=BS, role="prefill", disagg_protocol="sglang", transfer_timeout=0.3
    ) as p:
        body = {
            "prompt": PROMPT,
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": p.bootstrap_port,
            "bootstrap_room": 7,
        }
        status, out = request(p.url + "/v1/completions", body)
        assert status == 500 and "no decode server" in out["error"]["message"]
        assert p.transfers().expired == 1 and p.transfers().pulled == 0


def test_bad_roles_and_protocols_are_refused() -> None:
    with pytest.raises(ValueError, match="role"):
        MockWorker(role="mixed")
    with pytest.raises(ValueError, match="disagg_protocol"):
        MockWorker(role="prefill", disagg_protocol="nccl")
