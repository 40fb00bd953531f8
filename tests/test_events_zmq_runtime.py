"""ZmqSubscriber while workers join and leave: a bad endpoint, IPv6, unsubscribing for good."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

import pytest

pytest.importorskip("zmq")

from kvroute import Router
from kvroute.events import ZmqSubscriber
from kvroute.testing import MockWorker

#: The ``subscriber`` fixture (tests/conftest.py): makes ZmqSubscribers on a thread or a loop.
Subscribers = Callable[..., ZmqSubscriber]


def _prompt(worker: MockWorker, text: str) -> None:
    body = {"model": "mock-model", "prompt": text * 40, "max_tokens": 2}
    req = urllib.request.Request(worker.url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    urllib.request.urlopen(req, timeout=20).close()


def _applied(sub: ZmqSubscriber, worker: int, engine: MockWorker) -> bool:
    return sub.wait_for(
        lambda s: worker in s and s[worker].last_seq == engine.next_seq - 1, timeout=10
    )


def test_a_bad_endpoint_is_refused_and_the_others_keep_flowing(subscriber: Subscribers) -> None:
    router = Router(block_size=16, workers=[0, 1, 2])
    with MockWorker() as engine, subscriber(router) as sub:
        sub.subscribe(0, "bogus://nowhere:1")  # a transport ZMQ does not know
        sub.subscribe(2, f"tcp://[::1]:{engine.events_port}")  # IPv6 accepted (nobody there)
        sub.subscribe(1, engine.events_endpoint, engine.replay_endpoint)
        _prompt(engine, "hello ")
        assert _applied(sub, 1, engine)
        assert sub.running and 0 not in sub.streams() and 2 in sub.streams()
        assert router.index.worker_len(1) == len(engine.cached_block_hashes()) > 0


def test_unsubscribe_says_when_no_batch_of_the_worker_can_still_apply(
    subscriber: Subscribers,
) -> None:
    router = Router(block_size=16, workers=[0, 1])
    stopped = subscriber(router).unsubscribe(0)
    assert stopped.is_set()  # not running: nothing can apply
    with MockWorker() as a, MockWorker() as b, subscriber(router) as sub:
        sub.subscribe(0, a.events_endpoint, a.replay_endpoint)
        sub.subscribe(1, b.events_endpoint, b.replay_endpoint)
        assert a.wait_for_subscribers(1) and b.wait_for_subscribers(1)
        _prompt(a, "first ")
        assert _applied(sub, 0, a)
        held = router.index.worker_len(0)
        done = sub.unsubscribe(0)
        assert done.wait(10)
        assert 0 not in sub.streams()
        # a publishes again; b's batch, sent after, is applied: a's never is
        _prompt(a, "second ")
        _prompt(b, "third ")
        assert _applied(sub, 1, b)
        assert router.index.worker_len(0) == held
        assert sub.unsubscribe(7).wait(10)  # unknown worker: done all the same
