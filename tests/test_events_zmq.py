"""ZmqSubscriber over real ZMQ sockets on loopback.

The publisher here is the engines' protocol and nothing more: a PUB socket
sending ``[topic, seq (8-byte big-endian), payload]`` and a ROUTER answering
replay requests with ``[id, "", topic, seq, payload]`` and the ``ff x 8`` end
marker, as vLLM's ``ZmqEventPublisher`` does (tests/vectors/README.md). The
payloads are the real vLLM 0.33 / SGLang 0.5.23 msgpack batches of the vectors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from helpers import loop_thread, wait_until

from kvroute import Router
from kvroute.events import ZmqSubscriber
from kvroute.events.decode import DecodeError, decode_vllm, register_decoder
from kvroute.events.metrics import EVENT_STATUSES, Metrics
from kvroute.events.types import EventBatch
from kvroute.events.zmq import _METRIC_STATUSES, END_SEQ
from kvroute.hashing import kvroute_block_hashes

#: The ``subscriber`` fixture (tests/conftest.py): makes ZmqSubscribers on a thread or a loop.
Subscribers = Callable[..., ZmqSubscriber]

VECTORS = Path(__file__).parent / "vectors"
# the module (``kvroute.events.decode`` is also the name of the decode function)
decode_module = sys.modules["kvroute.events.decode"]
BASE: list[int] = json.loads((VECTORS / "token_sequences.json").read_text())["base"]
_VLLM = json.loads((VECTORS / "vllm_kv_events.json").read_text())["batches"]
VLLM = {b["name"]: bytes.fromhex(b["payload_hex"]) for b in _VLLM}
SGLANG = {
    b["name"]: bytes.fromhex(b["payload_hex"])
    for b in json.loads((VECTORS / "sglang_vectors.json").read_text())["event_batches"]
}
WAIT = 10.0  # generous: the CI machine is small and shared


class Publisher:
    """An engine's event publisher: live PUB plus a ROUTER replay buffer."""

    def __init__(self, ctx: zmq.Context, *, topic: bytes = b"", delimiter: bool = True) -> None:
        self.topic = topic
        self.delimiter = delimiter
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        rport = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.replay_endpoint = f"tcp://127.0.0.1:{rport}"
        self.buffer: list[tuple[int, bytes]] = []
        self.seq = 0
        self.replay_requests: list[int] = []
        self.reply_delay = 0.0  # seconds between a replay request and its answer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def publish(self, payload: bytes, *, drop: bool = False) -> int:
        """Send the next batch (or only buffer it, when ``drop``: lost in flight)."""
        seq = self.seq
        self.seq += 1
        with self._lock:
            self.buffer.append((seq, payload))
        if not drop:
            self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def restart(self) -> None:
        """An engine restart: the counter and the replay buffer begin again."""
        with self._lock:
            self.buffer.clear()
        self.seq = 0

    def kill(self) -> None:
        """The engine process dies: both sockets close (the ports stay known)."""
        self._stop.set()
        self._thread.join()
        self.pub.close()
        self.router.close()

    def revive(self, ctx: zmq.Context) -> None:
        """A new engine process on the same ports, with an empty history."""
        self.restart()
        self.pub = _rebind(ctx, zmq.PUB, self.endpoint)
        self.router = _rebind(ctx, zmq.ROUTER, self.replay_endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(20):
                continue
            ident, _, start8 = self.router.recv_multipart()
            start = int.from_bytes(start8, "big")
            self.replay_requests.append(start)
            with self._lock:
                todo = [(s, p) for s, p in self.buffer if s >= start]
            time.sleep(self.reply_delay)  # a busy engine: the history as it was when asked
            head = [ident, b""] if self.delimiter else [ident]
            for s, p in todo:
                self.router.send_multipart([*head, self.topic, s.to_bytes(8, "big"), p])
            self.router.send_multipart([*head, b"", END_SEQ.to_bytes(8, "big"), b""])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.pub.close()
        self.router.close()


def _rebind(ctx: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    """Bind a new socket where a closed one was (its port frees asynchronously)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for _ in range(200):
        try:
            sock.bind(endpoint)
            return sock
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE:
                raise
            time.sleep(0.01)
    raise AssertionError(f"{endpoint} stayed in use")


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.term()


@pytest.fixture
def publisher(ctx: zmq.Context) -> Iterator[Publisher]:
    p = Publisher(ctx)
    yield p
    p.close()


@pytest.fixture
def router() -> Router:
    return Router(block_size=16, workers=[0, 1])


def held(router: Router, tokens: list[int], worker: int = 0) -> int:
    return int(router.index.match_array(kvroute_block_hashes(tokens, 16), [worker])[0])


def seen(sub: ZmqSubscriber, worker: int, seq: int, timeout: float = WAIT) -> bool:
    return sub.wait_for(lambda s: worker in s and s[worker].last_seq >= seq, timeout)


def connect(
    sub: ZmqSubscriber, pub: Publisher, worker: int = 0, *, replay: bool | str = True
) -> None:
    """Subscribe and wait out ZMQ's slow joiner: probe until a batch gets through.

    ``replay``: use the publisher's replay endpoint, none (False), or this one (a str).
    """
    endpoint = replay if isinstance(replay, str) else pub.replay_endpoint if replay else None
    sub.subscribe(worker, pub.endpoint, endpoint)
    probe(sub, pub, worker)


def probe(sub: ZmqSubscriber, pub: Publisher, worker: int = 0) -> None:
    """Publish empty batches until one gets through (a new or restored connection)."""
    empty = VLLM["empty_events_no_dp_rank"]
    for _ in range(int(WAIT / 0.05)):
        if seen(sub, worker, pub.publish(empty), timeout=0.05):
            return
    raise AssertionError("the subscriber never received a batch")


def events_metric(m: Metrics, status: str, worker: int = 0) -> float:
    return m.value("kvroute_events_total", {"worker": str(worker), "status": status})


class SilentReplay:
    """A replay endpoint that accepts requests and never answers (a wedged engine)."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"

    def next_request(self) -> int:
        """The start seq of the next replay request (swallowed: no reply)."""
        assert self.sock.poll(int(WAIT * 1000)), "no replay request arrived"
        _ident, _empty, start = self.sock.recv_multipart()
        return int.from_bytes(start, "big")

    def close(self) -> None:
        self.sock.close()


def test_live_batches_build_the_index_and_removals_empty_it(
    router: Router, publisher: Publisher, subscriber: Subscribers,
) -> None:
    m = Metrics(router)
    with subscriber(router, metrics=m) as sub:
        connect(sub, publisher)
        publisher.publish(VLLM["stored_first_blocks"])
        seq = publisher.publish(VLLM["stored_child_block"])
        assert seen(sub, 0, seq)
        assert held(router, BASE[:48]) == 3
        seq = publisher.publish(VLLM["removed_by_eviction"])
        assert seen(sub, 0, seq)
        assert len(router.index) == 0
        # the engine's own AllBlocksCleared (after one store)
        seq = publisher.publish(VLLM["stored_then_cleared"])
        assert seen(sub, 0, seq)
        assert len(router.index) == 0
        counts = sub.streams()[0].counts
    assert counts["ok"] >= 4 and counts["gap"] == 0 and counts["malformed"] == 0
    assert counts["cleared"] == 1
    assert events_metric(m, "ok") == counts["ok"]
    assert events_metric(m, "cleared") == 1


def test_a_burst_longer_than_a_round_is_applied_whole(
    router: Router, publisher: Publisher, subscriber: Subscribers
) -> None:
    """More batches queued at once than one round drains (256): the rest follow.

    On a loop, ZMQ signals the socket once for the whole burst; with the
    periodic round an hour away, only coming back for what a round left can
    apply the rest.
    """
    loop = getattr(subscriber, "keywords", {}).get("loop")
    with subscriber(router, poll_interval=3600 if loop else 0.05) as sub:
        connect(sub, publisher)
        if loop is not None:  # hold the loop while the burst queues up
            loop.call_soon_threadsafe(time.sleep, 0.5)
        for _ in range(600):
            last = publisher.publish(VLLM["stored_first_blocks"])
        assert seen(sub, 0, last)
        assert sub.streams()[0].counts["gap"] == 0


def test_a_long_replay_on_a_loop_leaves_the_loop_turning(
    router: Router, publisher: Publisher
) -> None:
    """A late joiner's long history is applied a slice a turn: the loop serves in between.

    A callback going round the loop meanwhile sees the stream part-way; its
    live batches wait for the history, and nothing is lost or counted twice.
    """
    for _ in range(1500):  # published before anyone listened: only the buffer has them
        publisher.publish(VLLM["stored_first_blocks"], drop=True)
    seen_at: set[int] = set()
    with loop_thread() as loop, ZmqSubscriber(router, loop=loop) as sub:

        def look() -> None:
            if not sub.running:
                return
            stream = sub.streams().get(0)
            seen_at.add(-1 if stream is None else stream.last_seq)
            loop.call_soon(look)

        loop.call_soon_threadsafe(look)
        connect(sub, publisher)
        last = publisher.publish(VLLM["stored_child_block"])
        assert seen(sub, 0, last)
        counts = sub.streams()[0].counts
        sub.stop()
    assert any(0 < s < 1499 for s in seen_at), sorted(seen_at)[:5]
    assert held(router, BASE[:48]) == 3
    assert counts["replayed"] >= 1500 and counts["gap"] == 0 and counts["duplicate"] == 0


def test_unsubscribing_mid_replay_on_a_loop_stops_its_batches(
    router: Router, publisher: Publisher
) -> None:
    applied: list[int] = []
    for _ in range(3000):
        publisher.publish(VLLM["stored_first_blocks"], drop=True)
    with (
        loop_thread() as loop,
        ZmqSubscriber(router, loop=loop, on_batch=lambda w, seq: applied.append(seq)) as sub,
    ):
        sub.subscribe(0, publisher.endpoint, publisher.replay_endpoint)
        for _ in range(int(WAIT / 0.05)):  # live batches until one gets through: the gap
            publisher.publish(VLLM["empty_events_no_dp_rank"])
            if wait_until(lambda: len(applied) > 0, 0.05):
                break
        assert applied  # part-way through the history
        assert sub.unsubscribe(0).wait(WAIT)
        stopped = len(applied)
        time.sleep(0.3)
        assert len(applied) == stopped < 3000  # not one batch more, and not all of them
        assert 0 not in sub.streams() and sub.running


def _decode_vllm_json(payload: bytes, *, max_events: int, max_tokens: int) -> EventBatch:
    """An engine format kvroute does not ship: vLLM's events as JSON instead of msgpack."""
    try:
        batch = json.loads(payload)
    except ValueError as e:
        raise DecodeError(f"not JSON: {e}") from e
    return decode_vllm(
        msgspec.msgpack.encode(batch), max_events=max_events, max_tokens=max_tokens
    )


def test_a_registered_format_is_carried_by_name(
    router: Router, publisher: Publisher, monkeypatch: pytest.MonkeyPatch, subscriber: Subscribers,
) -> None:
    monkeypatch.setattr(decode_module, "_REGISTRY", dict(decode_module._REGISTRY))
    register_decoder("test-vllm-json", _decode_vllm_json)

    def as_json(name: str) -> bytes:
        return json.dumps(msgspec.msgpack.decode(VLLM[name])).encode()

    with subscriber(router, fmt="test-vllm-json") as sub:
        sub.subscribe(0, publisher.endpoint, publisher.replay_endpoint)
        empty = as_json("empty_events_no_dp_rank")
        assert any(seen(sub, 0, publisher.publish(empty), 0.05) for _ in range(int(WAIT / 0.05)))
        publisher.publish(as_json("stored_first_blocks"))
        seq = publisher.publish(as_json("stored_child_block"))
        assert seen(sub, 0, seq)
        assert held(router, BASE[:48]) == 3
        seq = publisher.publish(VLLM["removed_by_eviction"])  # msgpack: not this format
        assert seen(sub, 0, seq)
        counts = sub.streams()[0].counts
    assert held(router, BASE[:48]) == 3
    assert counts["malformed"] == 1 and counts["ok"] >= 2


def test_late_joiner_takes_the_buffered_history(
    router: Router, publisher: Publisher, subscriber: Subscribers
) -> None:
    # Batches published before anyone listened: only the replay buffer has them.
    publisher.publish(VLLM["stored_first_blocks"], drop=True)
    publisher.publish(VLLM["stored_child_block"], drop=True)
    m = Metrics(router)
    with subscriber(router, metrics=m) as sub:
        connect(sub, publisher)
        assert held(router, BASE[:48]) == 3
        st = sub.streams()[0]
    assert publisher.replay_requests[0] == 0
    assert st.counts["replayed"] >= 2 and st.counts["gap"] == 0  # joining is not a gap
    assert events_metric(m, "replayed") == st.counts["replayed"]
    assert events_metric(m, "gap") == events_metric(m, "replay_failed") == 0


@pytest.mark.parametrize("delimiter", [True, False], ids=["4-frame", "3-frame"])
def test_a_gap_is_filled_from_the_replay_endpoint(
    router: Router, ctx: zmq.Context, delimiter: bool, subscriber: Subscribers,
) -> None:
    pub = Publisher(ctx, delimiter=delimiter)
    m = Metrics(router)
    try:
        with subscriber(router, metrics=m) as sub:
            connect(sub, pub)
            before = sub.streams()[0].counts["replayed"]
            pub.publish(VLLM["stored_first_blocks"], drop=True)  # lost in flight
            seq = pub.publish(VLLM["stored_child_block"])
            assert seen(sub, 0, seq)
            st = sub.streams()[0]
    finally:
        pub.close()
    # The child's parent arrived by replay, so the whole chain is indexed.
    assert held(router, BASE[:48]) == 3
    assert st.counts["gap"] == 1 and st.counts["replayed"] == before + 1
    assert st.counts["replay_failed"] == 0 and st.counts["unknown_block"] == 0
    assert events_metric(m, "gap") == 1
    assert events_metric(m, "replayed") == st.counts["replayed"] >= 1
    assert events_metric(m, "replay_failed") == events_metric(m, "cleared") == 0


def test_a_gap_without_replay_clears_the_worker_and_resumes(
    router: Router, publisher: Publisher, caplog: pytest.LogCaptureFixture, subscriber: Subscribers,
) -> None:
    m = Metrics(router)
    with subscriber(router, metrics=m) as sub:
        connect(sub, publisher, replay=False)
        seq = publisher.publish(VLLM["stored_first_blocks"])
        assert seen(sub, 0, seq)
        assert held(router, BASE[:32]) == 2
        publisher.publish(VLLM["removed_by_eviction"], drop=True)  # a lost removal
        with caplog.at_level(logging.WARNING, "kvroute.events"):
            seq = publisher.publish(VLLM["stored_lora_salt"])
            assert seen(sub, 0, seq)
        st = sub.streams()[0]
    # The worker's state was unknowable, so nothing stale is believed...
    assert held(router, BASE[:32]) == 0
    # ...and the batch after the gap still applied.
    keys = kvroute_block_hashes(BASE[:32], 16, lora_name="my-lora", cache_namespace="tenant-A")
    assert router.index.match(keys) == {0: 2}
    assert st.counts["gap"] == 1 and st.counts["replay_failed"] == 1
    assert st.counts["cleared"] == 0  # the engine cleared nothing: the subscriber did
    assert events_metric(m, "gap") == events_metric(m, "replay_failed") == 1
    assert events_metric(m, "cleared") == events_metric(m, "replayed") == 0
    assert any("could not replay" in r.getMessage() for r in caplog.records)


def test_a_replay_that_cannot_cover_the_gap_clears(
    router: Router, publisher: Publisher, subscriber: Subscribers
) -> None:
    m = Metrics(router)
    with subscriber(router, metrics=m) as sub:
        connect(sub, publisher)
        seq = publisher.publish(VLLM["stored_first_blocks"])
        assert seen(sub, 0, seq)
        publisher.publish(VLLM["removed_by_eviction"], drop=True)
        with publisher._lock:  # the engine's buffer already dropped the lost batch
            publisher.buffer.clear()
        seq = publisher.publish(VLLM["empty_events_no_dp_rank"])
        assert seen(sub, 0, seq)
        st = sub.streams()[0]
    assert held(router, BASE[:32]) == 0
    assert st.counts["replay_failed"] == 1
    assert events_metric(m, "replay_failed") == 1 and events_metric(m, "cleared") == 0


def test_an_engine_restart_clears_then_rebuilds(
    router: Router, publisher: Publisher, subscriber: Subscribers
) -> None:
    m = Metrics(router)
    with subscriber(router, metrics=m) as sub:
        connect(sub, publisher)
        publisher.publish(VLLM["stored_first_blocks"])
        seq = publisher.publish(VLLM["stored_child_block"])
        assert seen(sub, 0, seq)
        publisher.restart()
        publisher.publish(VLLM["stored_lora_salt"])  # seq 0 again
        assert sub.wait_for(lambda s: s[0].counts["restart"] == 1, WAIT)
        assert seen(sub, 0, 0)
        st = sub.streams()[0]
    assert held(router, BASE[:48]) == 0  # the old engine's blocks are gone
    keys = kvroute_block_hashes(BASE[:32], 16, lora_name="my-lora", cache_namespace="tenant-A")
    assert router.index.match(keys) == {0: 2}
    assert st.last_seq == 0 and st.counts["cleared"] == 0
    assert events_metric(m, "restart") == 1
    assert events_metric(m, "cleared") == events_metric(m, "replay_failed") == 0


def test_malformed_messages_are_counted_and_leave_the_index_intact(
    router: Router, publisher: Publisher, caplog: pytest.LogCaptureFixture, subscriber: Subscribers,
) -> None:
    m = Metrics(router)
    with (
        caplog.at_level(logging.WARNING, "kvroute.events"),
        subscriber(router, metrics=m) as sub,
    ):
        connect(sub, publisher)
        seq = publisher.publish(VLLM["stored_first_blocks"])
        assert seen(sub, 0, seq)
        publisher.pub.send_multipart([b"", b"\x00" * 3, b"x"])  # bad seq frame
        publisher.pub.send_multipart([b"", b"only two frames"])
        publisher.publish(b"\xc1 not msgpack")  # a bad payload still takes its seq
        too_many = msgspec.msgpack.encode([0.0, [{"type": "AllBlocksCleared"}] * 70_000, 0])
        publisher.publish(too_many)  # oversized: rejected before it is built
        seq = publisher.publish(VLLM["stored_child_block"])
        assert seen(sub, 0, seq)
        st = sub.streams()[0]
    assert st.counts["malformed"] == 4
    assert st.counts["cleared"] == 0  # the 70k clears never applied
    assert held(router, BASE[:48]) == 3  # and the good batches around them did
    assert m.value("kvroute_events_total", {"worker": "0", "status": "malformed"}) == 4
    logged = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(logged) == 1  # once a minute per worker


def test_sglang_stream_and_topic_filter(
    router: Router, ctx: zmq.Context, subscriber: Subscribers
) -> None:
    pub = Publisher(ctx, topic=b"sgl")
    other = Publisher(ctx, topic=b"other")
    try:
        with subscriber(router, fmt="sglang", topic="sgl") as sub:
            connect(sub, pub)
            seq = pub.publish(SGLANG["default:stored_chain"])
            assert seen(sub, 0, seq)
            assert held(router, BASE[:48]) == 3
            # A publisher on another topic reaches no one.
            sub.subscribe(1, other.endpoint)
            other.publish(SGLANG["default:stored_chain"])
            seq = pub.publish(SGLANG["default:removed"])
            assert seen(sub, 0, seq)
            assert 1 not in sub.streams() or sub.streams()[1].last_seq == -1
    finally:
        pub.close()
        other.close()
    assert len(router.index) == 0


def test_two_workers_are_tracked_independently(
    router: Router, ctx: zmq.Context, subscriber: Subscribers
) -> None:
    a, b = Publisher(ctx), Publisher(ctx)
    try:
        with subscriber(router) as sub:
            connect(sub, a, 0)
            connect(sub, b, 1)
            a.publish(VLLM["stored_first_blocks"])
            seq = b.publish(VLLM["stored_first_blocks"])
            assert seen(sub, 1, seq)
            assert sub.wait_for(lambda s: s[0].counts["ok"] >= 1, WAIT)
            assert router.index.match(kvroute_block_hashes(BASE[:32], 16)) == {0: 2, 1: 2}
            sub.unsubscribe(1)
            assert sub.wait_for(lambda s: 1 not in s, WAIT)
            b.publish(VLLM["removed_by_eviction"])
            seq = a.publish(VLLM["removed_by_eviction"])
            assert seen(sub, 0, seq)
    finally:
        a.close()
        b.close()
    # worker 1's removal was not followed; its blocks stay
    assert router.index.match(kvroute_block_hashes(BASE[:32], 16)) == {1: 2}


def test_every_subscriber_status_is_a_documented_metric_status() -> None:
    assert set(EVENT_STATUSES) >= _METRIC_STATUSES
    assert {"replay_failed", "restart"} <= _METRIC_STATUSES


def test_lifecycle_and_arguments(router: Router) -> None:
    sub = ZmqSubscriber(router)
    assert not sub.running
    sub.stop()  # never started: a no-op
    sub.start()
    assert sub.running
    sub.start()  # idempotent
    sub.stop()
    sub.stop()
    assert not sub.running
    assert not any(t.name == "kvroute-zmq-subscriber" for t in threading.enumerate())
    with pytest.raises(ValueError, match="fmt"):
        ZmqSubscriber(router, fmt="dynamo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fmt"):
        sub.subscribe(0, "tcp://127.0.0.1:1", fmt="json")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ZmqSubscriber(router, replay_timeout=0)


def test_reconnecting_to_a_restarted_engine_clears_it_without_waiting_for_events(
    router: Router, publisher: Publisher, ctx: zmq.Context, subscriber: Subscribers,
) -> None:
    m = Metrics(router)
    with subscriber(router, metrics=m) as sub:
        connect(sub, publisher)
        publisher.publish(VLLM["stored_first_blocks"])
        seq = publisher.publish(VLLM["stored_child_block"])
        assert seen(sub, 0, seq)
        assert held(router, BASE[:48]) == 3
        publisher.kill()
        publisher.revive(ctx)  # same ports, new engine, silent
        assert sub.wait_for(lambda s: s[0].counts["restart"] == 1, WAIT)
        assert held(router, BASE[:48]) == 0  # its old blocks did not outlive it
        # and the new engine's stream is followed from seq 0
        assert sub.wait_for(lambda s: s[0].last_seq == -1, WAIT)
        seq = publisher.publish(VLLM["stored_first_blocks"])
        assert seen(sub, 0, seq)
        st = sub.streams()[0]
    assert held(router, BASE[:32]) == 2
    assert st.counts["connects"] >= 2
    assert events_metric(m, "restart") == 1 and events_metric(m, "cleared") == 0


def test_reconnecting_to_the_same_engine_catches_up_and_skips_duplicates(
    router: Router, publisher: Publisher, subscriber: Subscribers,
) -> None:
    with subscriber(router) as sub:
        connect(sub, publisher)
        seq = publisher.publish(VLLM["stored_first_blocks"])
        assert seen(sub, 0, seq)
        before = sub.streams()[0]
        # The replay of a resync brings batches the live socket then delivers
        # again: the same payload at a seen seq is a duplicate, not a restart.
        sub.resync(0)
        seq = publisher.publish(VLLM["stored_child_block"])
        assert seen(sub, 0, seq)
        publisher.pub.send_multipart([b"", seq.to_bytes(8, "big"), VLLM["stored_child_block"]])
        nxt = publisher.publish(VLLM["empty_events_no_dp_rank"])
        assert seen(sub, 0, nxt)
        st = sub.streams()[0]
    # every batch the resync replayed (0 or 1 of them, by timing) came live again too
    replayed = st.counts["replayed"] - before.counts["replayed"]
    assert st.counts["duplicate"] == 1 + replayed and st.counts["restart"] == 0
    assert st.counts["cleared"] == before.counts["cleared"] == 0
    assert held(router, BASE[:48]) == 3


# -- a wedged replay endpoint, and ZMQ's message size limit -------------------------------


def test_a_hung_replay_endpoint_stalls_only_its_own_worker(
    router: Router, ctx: zmq.Context, subscriber: Subscribers,
) -> None:
    a, b, silent = Publisher(ctx), Publisher(ctx), SilentReplay(ctx)
    try:
        with subscriber(router, replay_timeout=600.0) as sub:
            connect(sub, b, 1)
            sub.subscribe(0, a.endpoint, silent.endpoint)
            # worker 0's connection asks its replay endpoint, which never answers...
            assert silent.next_request() == 0
            # ...and worker 1's events keep flowing while that replay is in flight
            seq = b.publish(VLLM["stored_first_blocks"])
            assert seen(sub, 1, seq)
            assert router.index.match(kvroute_block_hashes(BASE[:32], 16)) == {1: 2}
            st = sub.streams()
        # and stop() did not wait for it (the with block's exit)
        assert not sub.running
    finally:
        a.close()
        b.close()
        silent.close()
    assert st[0].last_seq == -1 and st[0].counts["replay_failed"] == 0


def test_resyncs_asked_for_during_a_replay_run_once_after_it(
    router: Router, ctx: zmq.Context, subscriber: Subscribers,
) -> None:
    a, silent = Publisher(ctx), SilentReplay(ctx)
    try:
        with subscriber(router, replay_timeout=0.5) as sub:
            sub.subscribe(0, a.endpoint, silent.endpoint)
            assert silent.next_request() == 0  # the connection's own check, in flight
            for _ in range(3):
                sub.resync(0)
            assert silent.next_request() == 0  # one more, once the first gave up
            assert not silent.sock.poll(1500)  # and no other
            assert sub.running
    finally:
        a.close()
        silent.close()


def test_a_replay_that_never_answers_clears_its_worker_and_is_counted(
    router: Router, ctx: zmq.Context, caplog: pytest.LogCaptureFixture, subscriber: Subscribers,
) -> None:
    a, b, silent = Publisher(ctx), Publisher(ctx), SilentReplay(ctx)
    m = Metrics(router)
    try:
        with (
            caplog.at_level(logging.WARNING, "kvroute.events"),
            subscriber(router, metrics=m, replay_timeout=0.3) as sub,
        ):
            connect(sub, b, 1)
            connect(sub, a, 0, replay=silent.endpoint)  # its resync times out first
            seq = a.publish(VLLM["stored_first_blocks"])
            assert seen(sub, 0, seq)
            assert held(router, BASE[:32], 0) == 2
            before = events_metric(m, "replay_failed")  # a join may have failed one
            a.publish(VLLM["removed_by_eviction"], drop=True)  # a lost removal
            seq = a.publish(VLLM["stored_lora_salt"])
            assert seen(sub, 0, seq)  # after the replay timed out
            st = sub.streams()[0]
            # worker 1 is followed as before
            seq = b.publish(VLLM["stored_first_blocks"])
            assert seen(sub, 1, seq)
            assert held(router, BASE[:32], 1) == 2
    finally:
        a.close()
        b.close()
        silent.close()
    # worker 0's state was unknowable: cleared, then the batch after the gap applied
    assert held(router, BASE[:32], 0) == 0
    keys = kvroute_block_hashes(BASE[:32], 16, lora_name="my-lora", cache_namespace="tenant-A")
    assert router.index.match(keys) == {0: 2}
    assert st.counts["gap"] == 1 and st.counts["replay_failed"] == before + 1
    assert events_metric(m, "gap") == 1 and events_metric(m, "replay_failed") == before + 1
    assert events_metric(m, "cleared") == events_metric(m, "gap", 1) == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert any("did not answer a resync" in msg for msg in msgs)
    assert any("could not replay KV events" in msg for msg in msgs)


def _oversized_batch() -> bytes:
    """A valid vLLM batch storing BASE[:992]: 62 blocks, well over 1 KiB."""
    ts, (event,), rank = msgspec.msgpack.decode(VLLM["stored_first_blocks"])
    n = 62
    event.update(
        block_hashes=list(range(1, n + 1)), token_ids=BASE[: 16 * n], extra_keys=[None] * n
    )
    return msgspec.msgpack.encode([ts, [event], rank])


def test_a_message_over_max_message_bytes_is_rejected_and_its_batch_is_a_gap(
    router: Router, publisher: Publisher, subscriber: Subscribers,
) -> None:
    big = _oversized_batch()
    assert len(big) > 2048 and len(decode_vllm(big).events[0].block_hashes) == 62
    m = Metrics(router)
    with subscriber(router, metrics=m, max_message_bytes=1024) as sub:
        connect(sub, publisher, replay=False)
        seq = publisher.publish(VLLM["stored_first_blocks"])
        assert seen(sub, 0, seq)
        publisher.publish(big)
        seq = publisher.publish(VLLM["stored_lora_salt"])
        assert seen(sub, 0, seq)
        st = sub.streams()[0]
    # never decoded, never applied: only the two small stores' events count
    assert st.counts["malformed"] == 0 and st.counts["ok"] == 2
    assert st.counts["rejected"] == events_metric(m, "rejected") == 1
    assert held(router, BASE[:992]) == 0
    # the connection stayed up; the rejected batch's seq is a gap like any
    # other (no replay here), so the worker was cleared, and it is counted
    assert st.counts["disconnects"] == 0 and st.counts["connects"] == 1
    assert st.counts["gap"] == st.counts["replay_failed"] == 1
    assert events_metric(m, "gap") == events_metric(m, "replay_failed") == 1
    keys = kvroute_block_hashes(BASE[:32], 16, lora_name="my-lora", cache_namespace="tenant-A")
    assert router.index.match(keys) == {0: 2}


class _Cutter:
    """A TCP forwarder to ``port`` on loopback that resets its connections at random moments.

    Stands in for a flaky network between an engine and the subscriber: a
    connection is cut wherever the bytes happen to be, mid-message included.
    """

    def __init__(self, port: int, *, cutting: bool = True) -> None:
        self.port = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.live: list[socket.socket] = []
        self.opened: list[socket.socket] = []  # closed at the end, cut or not
        self.cuts = 0
        self.cutting = cutting
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._accept, self._cut)]
        for t in self._threads:
            t.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.port))
            self.live += [client, upstream]
            self.opened += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(random.choice((7, 100, 4096))):  # odd sizes: cuts land mid-frame
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _cut(self) -> None:
        while not self._stop.wait(random.uniform(0.03, 0.1)):
            if self.cutting:
                self.cut()

    def cut(self) -> None:
        """Reset every open connection now."""
        live, self.live = self.live, []
        self.cuts += bool(live)
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in self.opened:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for s in [*self.opened, self.listener]:
            s.close()


def test_connections_cut_mid_message_are_survived_and_resumed(
    router: Router, publisher: Publisher, subscriber: Subscribers,
) -> None:
    # A cut connection is ZMQ's to re-establish: nothing may take the subscriber
    # (or the process: libzmq asserts if a socket is reconnected by hand while a
    # cut left a message half-read) down, and events flow again after the cuts.
    port = int(publisher.endpoint.rsplit(":", 1)[1])
    cutter = _Cutter(port)
    big = _oversized_batch()
    try:
        with subscriber(router, reconnect_interval=0.01) as sub:
            sub.subscribe(0, cutter.endpoint)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                publisher.publish(big)
                time.sleep(0.001)
            assert cutter.cuts >= 5
            cutter.cutting = False  # the network heals: the stream must recover
            probe(sub, publisher)
            seq = publisher.publish(VLLM["stored_lora_salt"])
            assert seen(sub, 0, seq)
            st = sub.streams()[0]
            assert st.counts["disconnects"] >= 1 and st.counts["malformed"] == 0
    finally:
        cutter.close()
    keys = kvroute_block_hashes(BASE[:32], 16, lora_name="my-lora", cache_namespace="tenant-A")
    assert router.index.match(keys) == {0: 2}


def test_a_reconnect_while_a_replay_is_in_flight_loses_nothing(
    router: Router, publisher: Publisher, subscriber: Subscribers,
) -> None:
    # A live socket waits out of the poll loop during its worker's replay. If
    # nothing touched it, a reconnect then would leave the new connection
    # unsubscribed: the engine would drop what it publishes, and a quiet engine
    # would never show the gap.
    cutter = _Cutter(int(publisher.endpoint.rsplit(":", 1)[1]), cutting=False)
    publisher.reply_delay = 0.5
    try:
        with subscriber(router, reconnect_interval=0.01) as sub:
            sub.subscribe(0, cutter.endpoint, publisher.replay_endpoint)
            probe(sub, publisher)  # after the connection's own resync
            asked = len(publisher.replay_requests)
            sub.resync(0)  # e.g. the proxy saw the worker's health recover
            assert wait_until(lambda: len(publisher.replay_requests) > asked)
            cutter.cut()  # the link drops during the replay; ZMQ reconnects
            # the reconnect's own resync runs after that replay: once it has
            # asked (its history taken), the engine publishes, then goes quiet
            assert wait_until(lambda: len(publisher.replay_requests) >= asked + 2)
            seq = publisher.publish(VLLM["stored_lora_salt"])
            assert seen(sub, 0, seq)
            assert sub.streams()[0].counts["connects"] >= 2
    finally:
        cutter.close()
    keys = kvroute_block_hashes(BASE[:32], 16, lora_name="my-lora", cache_namespace="tenant-A")
    assert router.index.match(keys) == {0: 2}


# -- snapshots: capture, then resume from the captured position --------------------------


def _capture(sub: ZmqSubscriber, router: Router) -> tuple[bytes, dict[int, tuple[int, int]]]:
    return sub.capture(lambda pos: (router.index.dump(), pos)).result(WAIT)  # type: ignore[no-any-return]


def test_a_snapshot_resumes_where_it_was_taken(
    router: Router, publisher: Publisher, subscriber: Subscribers
) -> None:
    with subscriber(router) as sub:
        connect(sub, publisher)
        seq = publisher.publish(VLLM["stored_first_blocks"])
        assert seen(sub, 0, seq)
        data, pos = _capture(sub, router)
        assert pos[0][0] == seq
        # after the snapshot the engine goes on: a child block, then an eviction
        publisher.publish(VLLM["stored_child_block"])
        seq = publisher.publish(VLLM["removed_by_eviction"])
        assert seen(sub, 0, seq)
    late = Router(block_size=16, workers=[0, 1])
    late.index.load(data)
    assert held(late, BASE[:32]) == 2  # what the snapshot held
    before = len(publisher.replay_requests)
    with subscriber(late) as sub2:
        sub2.subscribe(0, publisher.endpoint, publisher.replay_endpoint, resume=pos[0])
        probe(sub2, publisher)
        st = sub2.streams()[0]
    # it asked for the history from the snapshot's seq on, and ended where the live one did
    asked = publisher.replay_requests[before:]
    assert asked and min(asked) >= pos[0][0]
    assert len(late.index) == len(router.index) == 0
    assert st.counts["restart"] == st.counts["replay_failed"] == 0


def test_a_snapshot_older_than_the_replay_buffer_rebuilds_the_worker(
    router: Router, publisher: Publisher, subscriber: Subscribers,
) -> None:
    with subscriber(router) as sub:
        connect(sub, publisher)
        seq = publisher.publish(VLLM["stored_first_blocks"])
        assert seen(sub, 0, seq)
        data, pos = _capture(sub, router)
    publisher.publish(VLLM["removed_by_eviction"])
    with publisher._lock:  # the buffer turned over: the snapshot's seq is gone
        publisher.buffer.clear()
    late = Router(block_size=16, workers=[0, 1])
    late.index.load(data)
    with subscriber(late) as sub2:
        sub2.subscribe(0, publisher.endpoint, publisher.replay_endpoint, resume=pos[0])
        probe(sub2, publisher)
        st = sub2.streams()[0]
    # it could not tell what changed since: the snapshot's blocks of the worker are dropped
    assert held(late, BASE[:32]) == 0
    assert st.counts["restart"] + st.counts["replay_failed"] >= 1


def test_a_snapshot_of_another_engine_life_is_not_trusted(
    router: Router, publisher: Publisher, subscriber: Subscribers,
) -> None:
    with subscriber(router) as sub:
        connect(sub, publisher)
        seq = publisher.publish(VLLM["stored_first_blocks"])
        assert seen(sub, 0, seq)
        data, pos = _capture(sub, router)
    publisher.restart()  # a new engine, whose batch at the same seq is another one
    for _ in range(pos[0][0] + 1):
        publisher.publish(VLLM["empty_events_no_dp_rank"])
    publisher.publish(VLLM["stored_child_block"])
    late = Router(block_size=16, workers=[0, 1])
    late.index.load(data)
    with subscriber(late) as sub2:
        sub2.subscribe(0, publisher.endpoint, publisher.replay_endpoint, resume=pos[0])
        assert sub2.wait_for(lambda s: 0 in s and s[0].counts["restart"] >= 1, WAIT)
    assert held(late, BASE[:32]) == 0


def test_capture_needs_a_running_subscriber_and_resume_a_valid_seq(router: Router) -> None:
    sub = ZmqSubscriber(router)
    with pytest.raises(RuntimeError, match="not running"):
        sub.capture(lambda pos: pos)
    with pytest.raises(ValueError, match="resume"):
        sub.subscribe(0, "tcp://127.0.0.1:9", resume=(-1, 0))
    with sub:
        assert sub.capture(lambda pos: pos).result(WAIT) == {}
        boom = sub.capture(lambda pos: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            boom.result(WAIT)
        assert sub.running
