"""TensorRT-LLM's KV events over real sockets: trtllm-serve's HTTP endpoint, and the ZMQ stream.

The worker is :class:`~kvroute.testing.MockWorker` in its TensorRT-LLM mode:
real aiohttp and ZMQ servers on loopback publishing TensorRT-LLM's shapes
(dict events drained by ``POST /kv_cache_events``, streamed batches with a
ROUTER replay). What is checked is what a router needs: after the events are
applied, the index holds what the worker's cache holds; a lost event clears
the worker instead of leaving stale blocks; a restarted engine is noticed
before it serves anything.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from helpers import wait_until

from kvroute import Router
from kvroute.events import ZmqSubscriber
from kvroute.events.metrics import Metrics
from kvroute.events.trtllm_http import HttpEventPoller, HttpSource
from kvroute.testing import MockWorker, TrtllmOptions

BS = 4


def post(url: str, body: dict[str, Any]) -> Any:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def complete(w: MockWorker, prompt: list[int]) -> int:
    """Send one prompt; the worker's reported cache hit."""
    out = post(w.url + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    return int(out["usage"]["prompt_tokens_details"]["cached_tokens"])


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Turns of three sessions after a shared head, each a block longer; odd ones end mid-block."""
    head = list(range(100, 108))
    out = []
    for i in range(n):
        s, t = i % 3, i // 3
        start = seed * 10_000 + s * 1000
        out.append(head + list(range(start, start + BS * (t + 1) + (i % 2) * 2)))
    return out


@pytest.fixture
def trtllm_worker() -> Iterator[MockWorker]:
    options = TrtllmOptions(sliding_window=64, event_buffer_max_size=10_000)
    with MockWorker(block_size=BS, num_blocks=12, trtllm=options) as w:
        yield w


def synced(poller: HttpEventPoller, w: MockWorker, worker: int = 0) -> bool:
    assert w.trtllm is not None
    want = w.trtllm.next_event_id - 1

    def done(sources: dict[int, HttpSource]) -> bool:
        return sources[worker].last_event_ids.get(0) == want

    return poller.wait_for(done, timeout=10)


def index_matches_cache(router: Router, w: MockWorker, worker: int = 0) -> bool:
    held = w.cached_block_hashes()
    return router.index.worker_len(worker) == len(held) and all(
        router.index.resolve(worker, h) is not None for h in held
    )


# -- HTTP -----------------------------------------------------------------------------


def test_the_poller_keeps_the_index_equal_to_the_worker_cache(trtllm_worker: MockWorker) -> None:
    w = trtllm_worker
    assert w.trtllm is not None
    router = Router(block_size=BS, workers=[0])
    metrics = Metrics(router)
    with HttpEventPoller(router, metrics=metrics, poll_interval=0.01) as poller:
        poller.subscribe(0, w.trtllm.events_url)
        for p in prompts(12):  # 12 blocks: evictions happen
            complete(w, p)
        assert synced(poller, w)
        assert index_matches_cache(router, w)
        src = poller.sources()[0]
        assert src.hash_algo == "v2_sha256" and src.url == w.trtllm.events_url
        assert src.counts["polls"] >= 1 and src.counts["events"] == w.trtllm.next_event_id
        statuses = src.statuses[0]
        assert statuses["ignored"] == statuses["ok"]  # every event's sliding-window twin
        assert not {"gap", "restart", "malformed", "unknown_block", "rejected"} & set(statuses)
        assert w.stats().blocks_evicted > 0
    ok = metrics.value("kvroute_events_total", {"worker": "0", "status": "ok"})
    assert ok > 0
    assert not poller.running


def test_a_prediction_from_polled_events_equals_the_worker_s_hit(trtllm_worker: MockWorker) -> None:
    w = trtllm_worker
    assert w.trtllm is not None
    router = Router(block_size=BS, workers=[0])
    with HttpEventPoller(router, poll_interval=0.01) as poller:
        poller.subscribe(0, w.trtllm.events_url)
        for p in prompts(6):
            predicted = router.index.match(router.hashing(p, BS)).get(0, 0) * BS
            assert complete(w, p) == predicted
            assert synced(poller, w)


def test_a_buffer_overflow_is_a_gap_that_clears_the_worker() -> None:
    options = TrtllmOptions(event_buffer_max_size=3)
    with MockWorker(block_size=BS, num_blocks=64, trtllm=options) as w:
        assert w.trtllm is not None
        router = Router(block_size=BS, workers=[0])
        poller = HttpEventPoller(router, poll_interval=0.01)
        poller.subscribe(0, w.trtllm.events_url)
        with poller:
            complete(w, list(range(16)))
            assert synced(poller, w)
            assert router.index.worker_len(0) == 4
            poller.stop()  # not polling: the engine's buffer overflows
            for p in prompts(6, seed=7):
                complete(w, p)
            fresh = list(range(5000, 5008))  # a prompt of its own: two blocks, no parent
            complete(w, fresh)
            poller.start()
            assert synced(poller, w)
            statuses = poller.sources()[0].statuses[0]
            assert statuses["gap"] == 1 and statuses["replay_failed"] == 1
            # Cleared, then only what arrived after the gap: nothing the worker lacks.
            assert router.index.resolve(0, w.block_hashes(list(range(16)))[0]) is None
            assert all(router.index.resolve(0, h) is not None for h in w.block_hashes(fresh))
            assert router.index.worker_len(0) == 2 < len(w.cached_block_hashes())
            # and the worker is degraded (routed on decisions) until its index agrees again
            state = router.worker_states()[0]
            assert state.state == "degraded" and state.cause == "events_lost"


def test_a_restarted_engine_is_cleared_before_it_serves(trtllm_worker: MockWorker) -> None:
    w = trtllm_worker
    assert w.trtllm is not None
    router = Router(block_size=BS, workers=[0])
    with HttpEventPoller(router, poll_interval=0.01, max_backoff=0.05) as poller:
        poller.subscribe(0, w.trtllm.events_url)
        complete(w, list(range(12)))
        assert synced(poller, w)
        assert router.index.worker_len(0) == 3
        w.restart()  # same port, empty cache, event ids from 0 with `created` events
        assert wait_until(lambda: router.index.worker_len(0) == 0, timeout=10)
        src = poller.sources()[0]
        assert src.statuses[0]["restart"] == 1
        assert src.counts["poll_errors"] >= 0  # polls may have failed while it was down


def test_an_unreachable_endpoint_is_retried_until_it_answers() -> None:
    w = MockWorker(block_size=BS, trtllm=True).start()
    assert w.trtllm is not None
    url = w.trtllm.events_url
    w.stop()
    router = Router(block_size=BS, workers=[0])
    with HttpEventPoller(router, poll_interval=0.01, max_backoff=0.05) as poller:
        poller.subscribe(0, url)
        assert poller.wait_for(lambda s: s[0].counts["poll_errors"] >= 2, timeout=10)
        w.start()
        try:
            complete(w, list(range(8)))
            assert synced(poller, w)
            assert router.index.worker_len(0) == 2
        finally:
            w.stop()


def test_two_consumers_steal_each_other_s_events(trtllm_worker: MockWorker) -> None:
    # Why the endpoint serves one consumer: whatever another poll drains is gone.
    w = trtllm_worker
    assert w.trtllm is not None
    router = Router(block_size=BS, workers=[0])
    with HttpEventPoller(router, poll_interval=0.01) as poller:
        poller.subscribe(0, w.trtllm.events_url)
        complete(w, list(range(8)))
        assert synced(poller, w)
        poller.stop()
        complete(w, list(range(100, 108)))
        stolen = post(w.trtllm.events_url, {})  # a second consumer polls first
        assert [e["data"]["type"] for e in stolen] == ["stored", "stored"]
        complete(w, list(range(200, 208)))
        poller.start()
        assert synced(poller, w)
        assert poller.sources()[0].statuses[0]["gap"] == 1


class _Garbage(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[list[tuple[int, bytes]]] = []

    def do_POST(self) -> None:
        status, body = self.answers.pop(0) if self.answers else (200, b"[]")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_bad_answers_are_poll_errors_and_bad_events_are_malformed() -> None:
    blocks = [{"block_hash": 5, "tokens": [{"token_id": t} for t in range(4)]}]
    good = {"event_id": 0, "data": {"type": "stored", "parent_hash": None, "blocks": blocks}}
    bad = {"event_id": 1, "data": {"type": "stored", "blocks": "nope"}}
    _Garbage.answers = [
        (500, b"busy"),
        (200, b"not json"),
        (200, b'{"event_id": 0}'),
        (
            200,
            json.dumps(
                [good, bad, {"event_id": 2, "data": {"type": "removed", "block_hashes": [5]}}]
            ).encode(),
        ),
    ]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        router = Router(block_size=BS, workers=[0])
        with HttpEventPoller(router, poll_interval=0.01, max_backoff=0.02) as poller:
            poller.subscribe(0, f"http://127.0.0.1:{server.server_port}/kv_cache_events")
            assert poller.wait_for(lambda s: s[0].counts["events"] == 3, timeout=10)
            src = poller.sources()[0]
            assert src.counts["poll_errors"] == 3
            assert src.statuses[0] == {"ok": 2, "malformed": 1}  # no gap: the bad one had its id
            assert router.index.worker_len(0) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_poller_arguments_and_lifecycle() -> None:
    router = Router(block_size=BS, workers=[0])
    with pytest.raises(ValueError):
        HttpEventPoller(router, poll_interval=0)
    with pytest.raises(ValueError):
        HttpEventPoller(router, max_response_bytes=10)
    poller = HttpEventPoller(router)
    with pytest.raises(ValueError, match="http"):
        poller.subscribe(0, "tcp://127.0.0.1:5557")
    poller.subscribe(0, "http://127.0.0.1:9/kv_cache_events")
    poller.unsubscribe(0)
    poller.unsubscribe(0)
    assert poller.sources() == {}
    poller.stop()
    poller.stop()


# -- ZMQ ------------------------------------------------------------------------------


def zmq_synced(sub: ZmqSubscriber, w: MockWorker) -> bool:
    return sub.wait_for(lambda s: s[0].last_seq == w.next_seq - 1, timeout=10)


@pytest.mark.parametrize("algo", ["v2_sha256", "v1_block_key"])
def test_the_zmq_stream_keeps_the_index_equal_to_the_worker_cache(algo: str) -> None:
    options = TrtllmOptions(hash_algo=algo)  # type: ignore[arg-type]
    with MockWorker(block_size=BS, num_blocks=12, trtllm=options) as w:
        router = Router(block_size=BS, workers=[0])
        with ZmqSubscriber(router, fmt="trtllm") as sub:
            sub.subscribe(0, w.events_endpoint or "", w.replay_endpoint)
            assert w.wait_for_subscribers(1)
            for p in prompts(12):
                complete(w, p)
            assert zmq_synced(sub, w)
            assert index_matches_cache(router, w)
            counts = sub.streams()[0].counts
            assert not {"gap", "malformed", "unknown_block", "rejected"} & set(counts)
            w.reset()  # AllBlocksCleared on the stream
            assert zmq_synced(sub, w)
            assert router.index.worker_len(0) == 0


def test_a_lost_batch_is_replayed_from_trtllm_s_router_socket() -> None:
    with MockWorker(block_size=BS, trtllm=True, drop_seqs={1}) as w:
        router = Router(block_size=BS, workers=[0])
        with ZmqSubscriber(router, fmt="trtllm") as sub:
            sub.subscribe(0, w.events_endpoint or "", w.replay_endpoint)
            assert w.wait_for_subscribers(1)
            for p in prompts(4):
                complete(w, p)
            assert zmq_synced(sub, w)
            counts = sub.streams()[0].counts
            # (the connection's resync may replay the first batch too)
            assert counts["gap"] == 1 and counts["replayed"] >= 1
            assert counts["replay_failed"] == counts["restart"] == 0
            assert index_matches_cache(router, w)


# -- the mock's TensorRT-LLM mode ------------------------------------------------------


def test_the_mock_speaks_trtllm_s_dict_shape() -> None:
    options = TrtllmOptions(attention_dp_rank=0, host_blocks=3)
    with MockWorker(block_size=BS, num_blocks=8, trtllm=options) as w:
        assert w.trtllm is not None
        created, *rest = post(w.trtllm.events_url, {})
        assert rest == [] and post(w.trtllm.events_url, {}) == []  # drained
        assert created == {
            "event_id": 0,
            "window_size": w.max_model_len,
            "hash_algo": "v2_sha256",
            "attention_dp_rank": 0,
            "data": {"type": "created", "num_blocks_per_cache_level": [8, 3]},
        }
        complete(w, list(range(10)))  # two blocks and a partial one
        (stored, removed) = w.trtllm.llm.get_kv_cache_events(0)
        blocks = stored["data"]["blocks"]
        assert stored["event_id"] == 1 and stored["data"]["parent_hash"] is None
        assert [len(b["tokens"]) for b in blocks] == [4, 4, 2]
        assert all(len(b["block_hash"]) == 64 for b in blocks)  # v2_sha256: hex digests
        assert [int(b["block_hash"][:16], 16) for b in blocks[:2]] == w.block_hashes(
            list(range(10))
        )
        # the partial block is removed when its request ends
        assert removed["data"] == {"type": "removed", "block_hashes": [blocks[2]["block_hash"]]}
        assert w.trtllm.partial_blocks() == set()
        w.restart()
        assert [e["event_id"] for e in post(w.trtllm.events_url, {})] == [0]


def test_the_mock_s_stream_is_trtllm_s_wire_shape() -> None:
    with MockWorker(block_size=BS, trtllm=TrtllmOptions(hash_algo="v2_sha256_64")) as w:
        sub_router = Router(block_size=BS, workers=[0])
        with ZmqSubscriber(sub_router, fmt="trtllm") as sub:
            sub.subscribe(0, w.events_endpoint or "", w.replay_endpoint)
            assert w.wait_for_subscribers(1)
            complete(w, list(range(10)))
            assert zmq_synced(sub, w)
        assert w.trtllm is not None
        (stored,) = w.trtllm.llm.get_kv_cache_events(0)[1:2]
        full = [b["block_hash"] for b in stored["data"]["blocks"][:2]]
        assert full == w.block_hashes(list(range(10)))  # v2_sha256_64: u64 ints
        assert [sub_router.index.resolve(0, h) is not None for h in full] == [True, True]
