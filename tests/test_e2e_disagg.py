"""End to end, disaggregated: the proxy, 2 prefill + 2 decode mock workers, the official SDKs.

For each protocol (vLLM's NIXL ``kv_transfer_params``, SGLang's bootstrap
fields) the client is OpenAI's and Anthropic's own Python SDK, the workers
are :class:`~kvroute.testing.MockWorker` in their roles (real HTTP, real KV
events over ZMQ, the KV transfer mocked between them: a decode worker refuses
a transfer it was never offered). Checked: every request is prefilled on a
prefill worker, then decoded on a decode worker that received its KV; a
session's turns return to the prefill worker holding its prefix; the decode
load is spread over both decode workers; the usage's cached tokens are the
prefill worker's; both pools' blocks are in the router's index; a prefill
worker killed mid-run loses no request (the proxy's retry counter shows the
failover); and both legs' load is released in the end.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from helpers import wait_until
from test_proxy_support import FAST_HEALTH

from kvroute.proxy import ProxyConfig, ProxyServer, WorkerSpec
from kvroute.testing import MockWorker, RequestRecord

BS = 16
HARNESS = "You are a coding agent. Tools: read_file, edit_file, run_tests, grep. " * 6
_ids = itertools.count()

Fleet = tuple[ProxyServer, list[MockWorker], list[MockWorker]]


@pytest.fixture(params=["vllm", "sglang"])
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    protocol = request.param
    kw: dict[str, Any] = {"block_size": BS, "num_blocks": 4096, "disagg_protocol": protocol}
    prefill = [MockWorker(role="prefill", **kw).start() for _ in range(2)]
    decode = [MockWorker(role="decode", **kw).start() for _ in range(2)]
    specs = [
        WorkerSpec(
            w.url,
            w.events_endpoint,
            w.replay_endpoint,
            role=w.role,  # type: ignore[arg-type]
            bootstrap_port=w.bootstrap_port or None,
        )
        for w in (*prefill, *decode)
    ]
    config = ProxyConfig(specs, disagg_protocol=protocol, retries=3, **FAST_HEALTH)
    server = ProxyServer(config).start()
    try:
        assert server.router.disaggregated
        assert all(w.wait_for_subscribers(1, timeout=10) for w in (*prefill, *decode))
        yield server, prefill, decode
    finally:
        server.stop()
        for w in (*prefill, *decode):
            w.stop()


def record(workers: list[MockWorker], rid: str) -> tuple[int, RequestRecord] | None:
    """The worker (index) that admitted request ``rid`` last, and its record."""
    found = None
    for i, w in enumerate(workers):
        for r in w.requests():
            if r.request_id == rid:
                found = (i, r)
    return found


class Agent:
    """A session over one API: a shared harness, an append-only history, one SDK client."""

    def __init__(self, sid: int, url: str, api: str, stream: bool) -> None:
        self.sid, self.api, self.stream = sid, api, stream
        self.history: list[dict[str, Any]] = []
        if api == "messages":
            self.client: Any = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        else:
            self.client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        self.rids: list[str] = []
        self.cached: list[int] = []

    def close(self) -> None:
        self.client.close()

    def turn(self) -> str:
        rid = f"s{self.sid}-{next(_ids)}"
        self.rids.append(rid)
        self.history.append(
            {"role": "user", "content": f"session {self.sid}: tool result {len(self.rids)} " * 4}
        )
        # the reply's expected length counts in its decode worker's load
        headers = {
            "X-Request-Id": rid,
            "X-Session-Id": f"s{self.sid}",
            "X-Kvroute-Expected-Output-Tokens": "1024",
        }
        if self.api == "messages":
            text, cached = self._messages(headers)
        else:
            text, cached = self._chat(headers)
        self.cached.append(cached)
        self.history.append({"role": "assistant", "content": text})
        return rid

    def _chat(self, headers: dict[str, str]) -> tuple[str, int]:
        messages = [{"role": "system", "content": HARNESS}, *self.history]
        if not self.stream:
            out = self.client.chat.completions.create(
                model="mock-model", messages=messages, max_tokens=6, extra_headers=headers
            )
            assert out.usage is not None and out.usage.completion_tokens == 6
            details = out.usage.prompt_tokens_details
            return out.choices[0].message.content or "", (details.cached_tokens or 0)
        text, cached = "", -1
        with self.client.chat.completions.create(
            model="mock-model",
            messages=messages,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        ) as chunks:
            for c in chunks:
                if c.choices:
                    text += c.choices[0].delta.content or ""
                if c.usage is not None:
                    cached = c.usage.prompt_tokens_details.cached_tokens
        return text, cached

    def _messages(self, headers: dict[str, str]) -> tuple[str, int]:
        kw: dict[str, Any] = {
            "model": "mock-model",
            "system": HARNESS,
            "messages": self.history,
            "max_tokens": 6,
            "extra_headers": headers,
        }
        if not self.stream:
            msg = self.client.messages.create(**kw)
        else:
            with self.client.messages.stream(**kw) as s:
                msg = s.get_final_message()
        text = "".join(b.text for b in msg.content if b.type == "text")
        assert msg.usage.output_tokens == 6
        return text, msg.usage.cache_read_input_tokens or 0


def test_sessions_are_prefilled_then_decoded_and_return_to_their_prefill_worker(
    fleet: Fleet,
) -> None:
    server, prefill, decode = fleet
    router = server.router
    kinds = [("chat", False), ("chat", True), ("messages", False), ("messages", True)]
    agents = [Agent(i, server.url, *kinds[i % 4]) for i in range(8)]
    for w in decode:
        w.token_delay = 0.02  # the first turns are in flight together
    try:
        # the sessions start together (a fan-out): both pools must spread them
        with concurrent.futures.ThreadPoolExecutor(len(agents)) as pool:
            list(pool.map(lambda a: a.turn(), agents))
        for w in decode:
            w.token_delay = 0.001
        # then turn after turn, each after the previous answer
        for _ in range(3):
            for a in agents:
                a.turn()
    finally:
        for a in agents:
            a.close()
    decoded_on = []
    for a in agents:
        homes = set()
        for k, rid in enumerate(a.rids):
            p = record(prefill, rid)
            d = record(decode, rid)
            assert p is not None and d is not None, rid  # prefilled, then decoded
            (pi, prec), (di, drec) = p, d
            homes.add(pi)
            decoded_on.append(di)
            # the decode worker received the prefill's full blocks, and decoded
            assert drec.transferred_tokens == prec.prompt_tokens // BS * BS > 0
            assert drec.completion_tokens == 6 and drec.status == "finished"
            # the client's cached tokens are the prefill worker's hit
            assert a.cached[k] == prec.cached_tokens
            if k:
                assert prec.cached_tokens > len(HARNESS)  # its own history, not just the harness
        assert len(homes) == 1, (a.sid, a.rids)  # every turn went home to its prefill worker
    # the decode load is spread over both decode workers
    assert min(decoded_on.count(0), decoded_on.count(1)) >= len(decoded_on) // 4, decoded_on
    for w in (*prefill, *decode):
        assert w.transfers().refused == 0
    assert sum(w.transfers().pulled for w in prefill) == len(decoded_on)
    # both pools' caches are in the index (the decode workers' received blocks too)...
    workers = [*prefill, *decode]

    def indexed() -> bool:
        return all(
            router.index.worker_len(i) == len(w.cached_block_hashes())
            for i, w in enumerate(workers)
        )

    assert wait_until(indexed, timeout=10)
    assert router.index.worker_len(2) > 0 and router.index.worker_len(3) > 0
    # ...and both legs' load is gone
    for i in range(4):
        load = router.load(i)
        assert load["active_requests"] == 0 and load["prefill_tokens"] == 0, (i, load)
        assert load["decode_blocks"] == 0
    assert router.stats()["remote_prefills"] == len(decoded_on)
    assert server.proxy.metrics.value("kvroute_proxy_retries_total") == 0


def test_a_prefill_worker_killed_mid_run_loses_no_request(fleet: Fleet) -> None:
    server, prefill, decode = fleet
    agents = [Agent(i, server.url, "chat", i % 2 == 0) for i in range(8)]
    try:
        for a in agents:
            a.turn()
        for w in prefill:  # keep prefills in flight while one worker dies
            w.prefill_delay_per_token = 2e-3
        victim = prefill[0]
        with concurrent.futures.ThreadPoolExecutor(len(agents)) as pool:
            round2 = [pool.submit(a.turn) for a in agents]
            assert wait_until(lambda: victim.stats().running > 0, timeout=10)
            victim.stop()
            rids = [f.result() for f in round2]  # every request answered
        assert server.proxy.metrics.value("kvroute_proxy_retries_total") >= 1
        # the requests the dead worker was prefilling were prefilled again on the other one
        for rid in rids:
            p = record(prefill, rid)
            d = record(decode, rid)
            assert p is not None and d is not None
            assert d[1].status == "finished" and d[1].completion_tokens == 6
        prefill[1].prefill_delay_per_token = 1e-5
        for a in agents:  # and the next turns go to the prefill worker left
            rid = a.turn()
            found = record(prefill, rid)
            assert found is not None and found[0] == 1
    finally:
        for a in agents:
            a.close()
    router = server.router
    for i in range(4):
        load = router.load(i)
        if i == 0:
            continue  # the dead worker's requests failed over; its own record is gone with it
        assert load["active_requests"] == 0 and load["decode_blocks"] == 0, (i, load)
