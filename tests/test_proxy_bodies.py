"""Big request bodies do not hold up the event loop (issue 16, item 7).

Three concurrent 27 MiB token-id prompts used to delay ``/health`` by 1.95 s:
parsing, checking and hashing ran on the event loop. Now a big token-id
prompt is parsed in a thread by numpy (which releases the GIL), other big
bodies are decoded in steps, long prompts are hashed off the loop, and
``max_prompt_tokens`` refuses a long token-id prompt before its ids are
parsed. The latency bound itself is measured by benchmarks/bench_bodies.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")
pytest.importorskip("msgspec")

from helpers import wait_until
from test_proxy_support import fleet, get, post

from kvroute.proxy import bodies
from kvroute.proxy.bodies import (
    BIG_BODY,
    BodyError,
    TokenIds,
    TooManyTokenIds,
    encode_body,
    parse_body,
)

MODEL = "mock-model"


def _ids(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 150_000) for _ in range(n)]


def _big(ids: list[int], **extra: Any) -> bytes:
    return json.dumps({"model": MODEL, "prompt": ids, "max_tokens": 1, **extra}).encode()


def parse(raw: bytes, **kw: Any) -> dict[str, Any]:
    return asyncio.run(parse_body(raw, **kw))


# -- the parser ------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["compact", "spaced", "newlines"])
def test_a_big_token_id_prompt_is_parsed_exactly_and_encoded_back_as_it_came(
    spacing: str,
) -> None:
    ids = _ids(300_000)
    sep = {"compact": (",", ":"), "spaced": (", ", ": "), "newlines": (",\n ", ": ")}[spacing]
    raw = json.dumps({"model": MODEL, "prompt": ids, "stream": False}, separators=sep).encode()
    assert len(raw) >= BIG_BODY
    body = parse(raw, token_ids=True)
    prompt = body["prompt"]
    assert isinstance(prompt, TokenIds) and prompt.ids.dtype == np.int64
    assert prompt.ids.tolist() == ids
    assert {k: v for k, v in body.items() if k != "prompt"} == {"model": MODEL, "stream": False}
    assert bytes(prompt.raw) == json.dumps(ids, separators=sep).encode()
    body["model"] = "mapped"  # a change re-encodes the body, the ids as they came
    again = json.loads(encode_body(body))
    assert again == {"model": "mapped", "prompt": ids, "stream": False}


@pytest.mark.parametrize(
    "prompt",
    [
        [[1, 2, 3]] * 100_000,  # a batch of prompts: not flat
        [-1, *range(250_000)],  # a negative id: the checks downstream answer it
        [1.5, *range(250_000)],
        [2**32, *range(250_000)],  # outside uint32: not hashable as an id
        ["text", *range(250_000)],
    ],
    ids=["batch", "negative", "float", "too-big", "mixed"],
)
def test_other_big_prompts_are_decoded_like_json(prompt: list[Any]) -> None:
    raw = _big(prompt)
    body = parse(raw, token_ids=True)
    assert body == json.loads(raw)
    assert not isinstance(body["prompt"], TokenIds)


def test_the_prompt_list_must_be_the_top_level_one() -> None:
    ids = _ids(160_000)
    nested = json.dumps({"meta": {"prompt": [1, 2]}, "prompt": ids}).encode()
    text = json.dumps({"note": 'a "prompt": [9] in a string', "prompt": ids}).encode()
    later = json.dumps({"model": "prompt", "prompt": ids}).encode()
    for raw in (nested, text, later):
        body = parse(raw, token_ids=True)
        prompt = body.pop("prompt")
        assert list(prompt.ids if isinstance(prompt, TokenIds) else prompt) == ids
        assert body == {k: v for k, v in json.loads(raw).items() if k != "prompt"}
    # a nested "prompt" key first: the top level is decoded the slow way, exactly
    assert not isinstance(parse(nested, token_ids=True)["prompt"], TokenIds)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": [' + b"1," * BIG_BODY + b",2]}",  # an empty element
        b'{"prompt": [' + b"1," * BIG_BODY + b"2]",  # unterminated
        b"[" + b"1," * BIG_BODY + b"2]",  # not an object
        b'{"prompt": "' + b"x" * BIG_BODY + b"}",
    ],
    ids=["empty-element", "unterminated", "array", "bad-string"],
)
def test_malformed_big_bodies_are_refused(raw: bytes) -> None:
    with pytest.raises(BodyError):
        parse(raw, token_ids=True)


def test_too_many_token_ids_are_refused_before_they_are_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*args: Any) -> None:
        raise AssertionError("the ids were parsed")

    monkeypatch.setattr(bodies, "_parse_ids", never)
    with pytest.raises(TooManyTokenIds) as e:
        parse(_big(_ids(300_000)), token_ids=True, max_ids=299_999)
    assert (e.value.count, e.value.limit) == (300_000, 299_999)


def test_other_big_bodies_are_decoded_in_steps_yielding_to_the_loop() -> None:
    messages = [{"role": "user", "content": f"message {i} " + "x" * 200} for i in range(20_000)]
    raw = json.dumps({"model": MODEL, "messages": messages}).encode()
    assert len(raw) > 4 * BIG_BODY

    async def main() -> tuple[dict[str, Any], int]:
        ticks = 0
        done = False

        async def tick() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        body = await parse_body(raw)
        done = True
        await ticker
        return body, ticks

    body, ticks = asyncio.run(main())
    assert body == json.loads(raw)
    assert ticks >= 10  # the loop ran other work between the steps


# -- through the proxy -----------------------------------------------------------------------


def test_health_and_small_requests_are_answered_while_a_big_body_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entered = threading.Event()
    release = threading.Event()
    parse_ids = bodies._parse_ids

    def held(*args: Any) -> Any:
        entered.set()
        assert release.wait(20)
        return parse_ids(*args)

    monkeypatch.setattr(bodies, "_parse_ids", held)
    ids = _ids(160_000)
    with fleet(1, worker_kw={"max_model_len": 200_000, "num_blocks": 12_000}) as (proxy, (w,)):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            big = pool.submit(post, proxy.url + "/v1/completions", raw=_big(ids), timeout=60)
            assert entered.wait(20)
            # the big body's ids are being parsed (held, in a thread): others go on
            assert get(proxy.url + "/health")[0] == 200
            small = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1}
            assert post(proxy.url + "/v1/completions", small)[0] == 200
            assert not big.done()
            release.set()
            status, _, raw = big.result()
        assert status == 200, raw
        (rec,) = [r for r in w.requests() if r.prompt_tokens == len(ids)]
        assert list(rec.prompt_token_ids) == ids
        assert wait_until(lambda: proxy.router.load(0)["active_requests"] == 0)


def test_a_big_prompt_is_routed_by_its_ids_and_sent_on_with_the_body_changed() -> None:
    ids = _ids(160_000, seed=2)
    worker_kw = {"max_model_len": 200_000, "num_blocks": 12_000}
    with fleet(2, worker_kw=worker_kw, model_map=[("alias", MODEL)]) as (proxy, workers):
        # streamed without include_usage: the proxy adds stream_options, a change
        raw = _big(ids, model="alias", stream=True)
        first = post(proxy.url + "/v1/completions", raw=raw, timeout=60)
        assert first[0] == 200, first[2]
        served = int(first[1]["X-Kvroute-Worker"])
        (rec,) = workers[served].requests()
        assert list(rec.prompt_token_ids) == ids
        # the same prompt again follows its blocks
        second = post(proxy.url + "/v1/completions", raw=raw, timeout=60)
        assert int(second[1]["X-Kvroute-Worker"]) == served
        assert int(second[1]["X-Kvroute-Predicted-Cached-Tokens"]) == len(ids) // 16 * 16


def test_max_prompt_tokens_refuses_long_prompts_before_routing() -> None:
    with fleet(1, max_prompt_tokens=200_000) as (proxy, _):
        for prompt in (_ids(200_001), [1] * 200_001):  # a big body, and a small one
            status, headers, raw = post(proxy.url + "/v1/completions", raw=_big(prompt))
            err = json.loads(raw)["error"]
            assert status == 400 and err["code"] == "context_length_exceeded", raw
            assert "200001 tokens" in err["message"]
            assert headers.get("x-should-retry") == "false"
        small = {"model": MODEL, "prompt": list(range(1, 1001)), "max_tokens": 1}
        assert post(proxy.url + "/v1/completions", small)[0] == 200
        assert proxy.router.stats()["routed"] == 1


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(body=st.dictionaries(st.text(), _json_values, max_size=5), indent=st.sampled_from([None, 1]))
def test_a_small_body_parses_as_the_standard_library_parses_it(
    body: dict[str, Any], indent: int | None
) -> None:
    # NaN and infinities included: json.dumps writes them, json.loads takes them back
    raw = json.dumps(body, indent=indent).encode()
    got = asyncio.run(parse_body(raw))
    assert json.dumps(got, sort_keys=True) == json.dumps(json.loads(raw), sort_keys=True)


@pytest.mark.parametrize(
    "raw",
    [b'{"a": NaN, "b": -Infinity}', b'{"s": "\\ud800"}', b'{"x": 1e400}',
     '{"u": "\u00e9"}'.encode("utf-16"), b'{"a": 1, "a": 2}'],
)  # fmt: skip
def test_what_only_the_standard_library_reads_is_still_read(raw: bytes) -> None:
    assert repr(asyncio.run(parse_body(raw))) == repr(json.loads(raw))


@pytest.mark.parametrize("raw", [b"[1]", b"{", b"", b'"x"', b"{} {}"])
def test_a_body_that_is_not_one_json_object_is_refused(raw: bytes) -> None:
    with pytest.raises(BodyError):
        asyncio.run(parse_body(raw))
