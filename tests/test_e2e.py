"""End to end, without a GPU: the proxy, four workers and their KV events on loopback.

Everything is real except the GPU: each :class:`~kvroute.testing.MockWorker`
is an HTTP server with an LRU prefix cache that publishes vLLM 0.33 KV events
over ZMQ (with a replay socket); the proxy subscribes to them, tokenizes
through the workers' render endpoints, routes with the default policy and
forwards over HTTP. The client is plain urllib.

What is checked is what a user of the proxy would check: later turns of a
session land on the worker holding its prefix (with a session id, and
without one, where the workers' KV events alone can tell where a prefix
is; over OpenAI chat and over Anthropic Messages); the proxy's prediction
of each request's cache hit equals the hit the worker really had; and
killing a worker mid-run, then restarting it on the same ports, loses no
request and leaves no block in the index that the worker does not hold.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until
from test_proxy_support import FAST_HEALTH, post

from kvroute.proxy import PREDICTED_HEADER, WORKER_HEADER, ProxyConfig, ProxyServer, WorkerSpec
from kvroute.testing import MockWorker

N_WORKERS = 4
HARNESS = "You are a coding agent. Tools: read_file, edit_file, run_tests, grep. " * 6


@pytest.fixture
def fleet() -> Iterator[tuple[ProxyServer, list[MockWorker]]]:
    workers = [MockWorker(block_size=16, num_blocks=4096).start() for _ in range(N_WORKERS)]
    specs = [WorkerSpec(w.url, w.events_endpoint, w.replay_endpoint) for w in workers]
    server = ProxyServer(ProxyConfig(specs, **FAST_HEALTH)).start()
    try:
        assert server.router.kv_events
        # Every worker's event stream is connected before traffic starts.
        assert all(w.wait_for_subscribers(1, timeout=10) for w in workers)
        yield server, workers
    finally:
        server.stop()
        for w in workers:
            w.stop()


def synced(server: ProxyServer, workers: list[MockWorker]) -> bool:
    """True once the proxy applied every batch each running worker published."""
    sub = server.proxy.subscriber
    assert sub is not None

    def done(streams: dict[int, Any]) -> bool:
        return all(
            not w.is_running or streams[i].last_seq == w.next_seq - 1 for i, w in enumerate(workers)
        )

    return bool(sub.wait_for(done, timeout=10))


class Session:
    """A coding-agent session: a shared harness prefix, then an append-only history.

    :param sid: its number.
    :param session_header: whether its requests name it (``X-Session-Id``).
    :param api: ``"chat"`` (OpenAI chat completions) or ``"messages"`` (Anthropic).
    """

    def __init__(self, sid: int, session_header: bool = True, api: str = "chat") -> None:
        self.sid = sid
        self.session_header = session_header
        self.api = api
        self.messages: list[dict[str, str]] = []
        if api == "chat":
            self.messages.append({"role": "system", "content": HARNESS})
        self.turn = 0

    def send(
        self, proxy: str, model: str = "mock-model"
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        self.messages.append(
            {"role": "user", "content": f"session {self.sid} turn {self.turn}: tool result " * 3}
        )
        body: dict[str, Any] = {"model": model, "messages": self.messages, "max_tokens": 8}
        if self.api == "messages":
            body["system"] = HARNESS
        status, headers, raw = post(
            proxy + ("/v1/chat/completions" if self.api == "chat" else "/v1/messages"),
            body,
            {"X-Session-Id": f"s{self.sid}"} if self.session_header else {},
        )
        out = json.loads(raw)
        if status == 200:
            if self.api == "chat":
                reply = out["choices"][0]["message"]["content"]
            else:
                reply = "".join(b["text"] for b in out["content"] if b["type"] == "text")
            self.messages.append({"role": "assistant", "content": reply})
            self.turn += 1
        return status, headers, out

    def cached_tokens(self, out: dict[str, Any]) -> int:
        """The prompt tokens the worker reported read from its cache."""
        if self.api == "chat":
            return int(out["usage"]["prompt_tokens_details"]["cached_tokens"])
        return int(out["usage"]["cache_read_input_tokens"])


@pytest.mark.parametrize(
    ("api", "session_header"),
    [("chat", True), ("chat", False), ("messages", False)],
    ids=["session-id", "no-session-id", "anthropic-no-session-id"],
)
def test_sessions_land_where_their_prefix_is_and_predictions_match_real_hits(
    fleet: tuple[ProxyServer, list[MockWorker]], api: str, session_header: bool
) -> None:
    # Without a session id only the prompts' prefixes tell the sessions apart:
    # no session pin or session-keyed choice can be what sends a turn home.
    server, workers = fleet
    sessions = [Session(i, session_header, api) for i in range(8)]
    # The sessions start together (a fan-out): while they are in flight the
    # router must spread them, not herd them onto the worker that warmed the
    # shared harness first.
    for w in workers:
        w.token_delay = 0.02
    first = sessions[0].send(server.url)
    assert first[0] == 200
    assert synced(server, workers)
    with concurrent.futures.ThreadPoolExecutor(len(sessions)) as pool:
        started = [first, *pool.map(lambda s: s.send(server.url), sessions[1:])]
    assert [r[0] for r in started] == [200] * len(sessions)
    home = {s.sid: int(r[1][WORKER_HEADER]) for s, r in zip(sessions, started, strict=True)}
    assert len(set(home.values())) >= 2
    assert synced(server, workers)
    for w in workers:
        w.token_delay = 0.001
    # Then turn after turn, each after the previous answer (tool calls between).
    for _ in range(4):
        for s in sessions:
            status, headers, out = s.send(server.url)
            assert status == 200, out
            worker = int(headers[WORKER_HEADER])
            real = s.cached_tokens(out)
            # The proxy predicted exactly the hit the worker really had.
            assert int(headers[PREDICTED_HEADER]) == real
            # A later turn lands on the worker holding its session's prefix...
            assert worker == home[s.sid]
            # ...and hits more than the shared harness: its own history.
            assert real > len(HARNESS)
            assert synced(server, workers)
    # The proxy's index is exactly the workers' caches.
    for i, w in enumerate(workers):
        assert server.router.index.worker_len(i) == len(w.cached_block_hashes())


def test_killing_and_restarting_a_worker_loses_nothing_and_leaves_no_stale_blocks(
    fleet: tuple[ProxyServer, list[MockWorker]],
) -> None:
    server, workers = fleet
    router = server.router
    sessions = [Session(i) for i in range(8)]
    for s in sessions:
        assert s.send(server.url)[0] == 200
        assert synced(server, workers)
    victim = max(range(N_WORKERS), key=lambda i: router.index.worker_len(i))
    assert router.index.worker_len(victim) > 0
    for w in workers:
        w.token_delay = 0.05  # keep requests in flight while the worker dies

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = [pool.submit(s.send, server.url) for s in sessions]
        assert wait_until(lambda: workers[victim].stats().running > 0, timeout=10)
        workers[victim].stop()  # mid-run: its streams break, its port refuses
        results = [f.result() for f in first]
        # Every request of the round was answered; those on the dead worker retried.
        assert [r[0] for r in results] == [200] * len(sessions)
        assert server.proxy.metrics.value("kvroute_proxy_retries_total") >= 1
        second = [f.result() for f in [pool.submit(s.send, server.url) for s in sessions]]
        assert [r[0] for r in second] == [200] * len(sessions)
        assert all(int(r[1][WORKER_HEADER]) != victim for r in second)

        for w in workers:
            w.token_delay = 0.001
        workers[victim].start()  # the same ports: a restarted engine, empty cache
        # Its old blocks leave the index as soon as the event socket reconnects
        # or its health check recovers (each asks for a resync), before it
        # serves or publishes anything.
        assert wait_until(lambda: router.index.worker_len(victim) == 0, timeout=10)
        assert wait_until(lambda: router.load(victim)["healthy"], timeout=10)
        third = [f.result() for f in [pool.submit(s.send, server.url) for s in sessions]]
    assert [r[0] for r in third] == [200] * len(sessions)
    assert synced(server, workers)
    for i, w in enumerate(workers):
        held = w.cached_block_hashes()
        assert router.index.worker_len(i) == len(held), i
        # every block the index credits to the worker names one the worker holds
        assert all(router.index.resolve(i, h) is not None for h in held)
    requests = sum(len(w.requests()) for w in workers)
    assert requests >= 3 * len(sessions)  # retried requests were re-sent, not dropped


def test_a_worker_back_from_unhealthy_has_its_event_stream_resynced(
    fleet: tuple[ProxyServer, list[MockWorker]],
) -> None:
    # A health check cannot tell a hung engine from a restarted one: when the
    # worker answers again, the proxy has the subscriber check its stream
    # against the replay history at once (a restart would clear it).
    server, workers = fleet
    sub = server.proxy.subscriber
    assert sub is not None
    asked: list[int] = []
    resync = sub.resync
    sub.resync = lambda w: (asked.append(w), resync(w))[1]  # type: ignore[method-assign]
    workers[1].pause()
    try:
        assert wait_until(lambda: not server.router.load(1)["healthy"], timeout=10)
    finally:
        workers[1].resume()
    assert wait_until(lambda: server.router.load(1)["healthy"], timeout=10)
    assert asked == [1]
    # The same engine: nothing cleared, and it keeps serving.
    assert sub.streams()[1].counts["restart"] == 0
    assert Session(0, session_header=False).send(server.url)[0] == 200


def test_lora_adapter_requests_match_the_adapters_blocks() -> None:
    """Requests for a LoRA adapter are hashed with its name, as the engine hashes its blocks.

    The adapter is known only from the workers' ``/v1/models`` (its ``parent``).
    Were the proxy to hash adapter prompts like base-model ones, every
    prediction below would be 0 while the worker hit its cache.
    """
    workers = [
        MockWorker(block_size=16, num_blocks=4096, lora_adapters=["sql-lora"]).start()
        for _ in range(2)
    ]
    specs = [WorkerSpec(w.url, w.events_endpoint, w.replay_endpoint) for w in workers]
    server = ProxyServer(ProxyConfig(specs, **FAST_HEALTH)).start()
    try:
        assert all(w.wait_for_subscribers(1, timeout=10) for w in workers)
        assert server.proxy.pool.lora_adapters() == {"sql-lora"}
        adapter, base = Session(0), Session(1)
        served = set()
        for turn in range(3):
            status, headers, out = adapter.send(server.url, model="sql-lora")
            assert status == 200, out
            assert out["model"] == "sql-lora"
            real = out["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert int(headers[PREDICTED_HEADER]) == real
            if turn:
                assert real > len(HARNESS)  # the adapter's own history is hit
            served.add(int(headers[WORKER_HEADER]))
            assert synced(server, workers)
        assert len(served) == 1
        # The base model shares no block with the adapter, even for the same prompt.
        base.messages = adapter.messages[:2]
        status, headers, out = base.send(server.url)
        assert status == 200, out
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert int(headers[PREDICTED_HEADER]) == 0
    finally:
        server.stop()
        for w in workers:
            w.stop()
