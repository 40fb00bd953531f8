"""State faults: mock workers whose KV events go wrong, and a fleet that measures the damage.

The router's picture of the workers' caches is only as good as their KV
events. These helpers make the events go wrong the ways real engines' do,
on the real wire (ZMQ, vLLM 0.33 msgpack), and measure how the router's
picture compares with the engines' truth:

- event filters for :attr:`MockWorker.event_filter <kvroute.testing.MockWorker.event_filter>`:
  :func:`drop_removals` (an engine that evicts without saying so) and
  :class:`LoseEvents` (batches whose events vanish while their sequence
  numbers stay whole: a loss no gap shows);
- :class:`StateFleet`: mock workers, a :class:`~kvroute.Router` and a
  :class:`~kvroute.events.ZmqSubscriber` on loopback, and a client that
  does what the proxy does for each request (route, send the prompt to the
  chosen worker, report the lifecycle and the worker's cached tokens to
  :meth:`Router.observe <kvroute.Router.observe>`), waiting for the
  worker's events to be applied so that runs are deterministic;
  :meth:`StateFleet.truth` compares a worker's index blocks with the
  blocks its engine holds.

The fast cases are tests (``tests/test_state_faults.py``); the long runs and
their figures come from ``python scripts/faults.py --side state``.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from ..events import EventApplier, ZmqSubscriber
from ..request import Decision, Request
from ..router import Router
from ._wire import VllmBlockRemoved, VllmEvent
from .mock_worker import MockWorker

__all__ = [
    "LoseEvents",
    "Sent",
    "StateFleet",
    "Truth",
    "agreement",
    "drop_removals",
    "raw_publish",
]


def drop_removals(events: list[VllmEvent]) -> list[VllmEvent]:
    """An engine that evicts blocks without publishing their ``BlockRemoved``.

    >>> drop_removals([VllmBlockRemoved([1], None)])
    []
    """
    return [e for e in events if not isinstance(e, VllmBlockRemoved)]


class LoseEvents:
    """Lose every event of some batches, keeping their sequence numbers (no gap shows).

    :param share: the probability that a batch's events are lost.
    :param seed: the random seed.
    :param after: batches left alone first.

    >>> lose = LoseEvents(share=1.0, after=1)
    >>> len(lose([VllmBlockRemoved([1], None)])), lose([VllmBlockRemoved([2], None)]), lose.lost
    (1, [], 1)
    """

    def __init__(self, share: float, seed: int = 0, after: int = 0) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"share must be in [0, 1], got {share}")
        self.share = share
        self.after = after
        self._rng = random.Random(seed)
        self._seen = 0
        #: Batches whose events were lost so far.
        self.lost = 0

    def __call__(self, events: list[VllmEvent]) -> list[VllmEvent]:
        self._seen += 1
        if self._seen > self.after and events and self._rng.random() < self.share:
            self.lost += 1
            return []
        return events


def raw_publish(worker: MockWorker, frames: Sequence[bytes]) -> None:
    """Send ``frames`` as they are on ``worker``'s event socket: junk a broken engine sends.

    No sequence number is taken and nothing is buffered for replay.

    :raises RuntimeError: the worker is not publishing.
    """
    publisher = worker._engine.publisher
    if publisher is None:
        raise RuntimeError("the worker is not publishing events")
    worker._thread.call(lambda: publisher._outbox.put_nowait(list(frames)))


@dataclass(frozen=True, slots=True)
class Sent:
    """One request sent through :meth:`StateFleet.send`.

    :ivar decision: the router's decision.
    :ivar reported: the cached tokens the worker reported.
    :ivar prompt: the prompt length, in tokens.
    """

    decision: Decision
    reported: int
    prompt: int

    @property
    def worker(self) -> int:
        """The worker it went to."""
        return self.decision.worker

    @property
    def predicted(self) -> int:
        """The cached tokens the router predicted."""
        return self.decision.predicted_cached_tokens


@dataclass(frozen=True, slots=True)
class Truth:
    """A worker's index blocks against its engine's cached blocks (in kvroute keys).

    :ivar index: blocks the index holds for the worker.
    :ivar engine: blocks the engine holds.
    :ivar both: blocks in both.
    """

    index: int
    engine: int
    both: int

    @property
    def precision(self) -> float:
        """Share of the index's blocks the engine holds (1.0 for an empty index)."""
        return self.both / self.index if self.index else 1.0

    @property
    def recall(self) -> float:
        """Share of the engine's blocks the index holds (1.0 for an empty engine)."""
        return self.both / self.engine if self.engine else 1.0


class StateFleet:
    """Mock workers, a router and its ZMQ subscriber on loopback; a client that acts as the proxy.

    :param n: workers (ids ``0 .. n-1``).
    :param block_size: the router's block size (and the workers', unless
        ``worker_kw`` says otherwise).
    :param worker_kw: :class:`MockWorker` arguments for every worker, or a
        function of the worker's index giving them.
    :param router_kw: more :class:`~kvroute.Router` arguments.
    :param key_on: the event applier's keying (``"kvroute"`` or ``"engine"``).
    :param replay: subscribe with the workers' replay endpoints.
    :param observe: report each answer's cached tokens to ``Router.observe``.
    """

    def __init__(
        self,
        n: int,
        *,
        block_size: int = 16,
        worker_kw: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None,
        router_kw: Mapping[str, Any] | None = None,
        key_on: str = "kvroute",
        replay: bool = True,
        observe: bool = True,
    ) -> None:
        self.n = n
        self.block_size = block_size
        self._worker_kw = worker_kw
        self._router_kw = dict(router_kw or {})
        self.key_on = key_on
        self.replay = replay
        self.observe = observe
        self.workers: list[MockWorker] = []
        self.router: Router | None = None
        self.sub: ZmqSubscriber | None = None
        self._ids = 0
        # kvroute key of every engine block seen, per worker (for truth())
        self._keys: list[dict[int, int]] = []

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> StateFleet:
        try:
            for i in range(self.n):
                kw = self._worker_kw(i) if callable(self._worker_kw) else (self._worker_kw or {})
                kw = {"block_size": self.block_size, "token_delay": 0.0, **kw}
                self.workers.append(MockWorker(**kw).start())
                self._keys.append({})
            self.router = Router(self.block_size, workers=range(self.n), **self._router_kw)
            applier = EventApplier(self.router, key_on=self.key_on)  # type: ignore[arg-type]
            self.sub = ZmqSubscriber(self.router, applier=applier).start()
            for i, w in enumerate(self.workers):
                replay = w.replay_endpoint if self.replay else None
                assert w.events_endpoint is not None
                self.sub.subscribe(i, w.events_endpoint, replay)
            for w in self.workers:
                if not w.wait_for_subscribers(1, timeout=10):
                    raise RuntimeError("the subscriber did not reach a worker")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.sub is not None:
            self.sub.stop()
        for w in self.workers:
            w.stop()

    @property
    def r(self) -> Router:
        """The router."""
        assert self.router is not None
        return self.router

    # -- traffic ---------------------------------------------------------------------

    def send(
        self,
        tokens: Sequence[int],
        *,
        worker: int | None = None,
        session_id: str | None = None,
        settle: bool = True,
    ) -> Sent:
        """Route a prompt, send it to the chosen worker, report the answer; wait for its events.

        :param worker: send here regardless of the route (the decision is still made).
        :param settle: wait until the worker's event batches are applied.
        """
        d = self._route(tokens, session_id)
        return self._serve(d, tokens, worker, settle)

    def send_many(self, prompts: Sequence[Sequence[int]], *, settle: bool = True) -> list[Sent]:
        """Route every prompt first (all in flight at once, as concurrent clients), then serve each.

        The router sees the load of those routed before each: a burst spreads
        as it would in production, where requests overlap.
        """
        decisions = [self._route(p, None) for p in prompts]
        out = [self._serve(d, p, None, False) for d, p in zip(decisions, prompts, strict=True)]
        if settle:
            for w in {s.worker for s in out}:
                self.settle(w)
        return out

    def _route(self, tokens: Sequence[int], session_id: str | None) -> Decision:
        self._ids += 1
        return self.r.route(Request(f"req-{self._ids}", tokens=list(tokens), session_id=session_id))

    def _serve(
        self, d: Decision, tokens: Sequence[int], worker: int | None, settle: bool
    ) -> Sent:
        rid = d.request_id
        target = d.worker if worker is None else worker
        body = {"model": "mock-model", "prompt": list(tokens), "max_tokens": 1}
        req = urllib.request.Request(
            self.workers[target].url + "/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "X-Request-Id": str(rid)},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                usage = json.loads(resp.read())["usage"]
        except OSError:
            self.r.failed(rid)
            raise
        self.r.first_token(rid)
        self.r.finished(rid)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        if self.observe and target == d.worker:
            self.r.observe(d, cached)
        if settle:
            self.settle(target)
        return Sent(d, cached, len(tokens))

    def settle(self, worker: int, timeout: float = 10.0) -> bool:
        """Wait until ``worker``'s published batches are all applied (lost ones aside)."""
        w = self.workers[worker]
        last = w.next_seq - 1
        while last >= 0 and last in w.drop_seqs:
            last -= 1
        if last < 0:
            return True
        assert self.sub is not None
        return self.sub.wait_for(
            lambda s: worker in s and s[worker].last_seq >= last, timeout=timeout
        )

    # -- faults ----------------------------------------------------------------------

    def restart(self, worker: int, timeout: float = 10.0) -> float:
        """Restart a worker's engine (empty cache, seq from 0); seconds until the router knew.

        Known: the subscriber counted the restart (its reconnect's resync, or
        the new engine's first batch).
        """
        assert self.sub is not None
        before = self.sub.streams()[worker].counts["restart"]
        t0 = time.monotonic()
        self.workers[worker].restart()
        ok = self.sub.wait_for(lambda s: s[worker].counts["restart"] > before, timeout)
        if not ok:
            raise RuntimeError(f"the restart of worker {worker} was not noticed in {timeout} s")
        return time.monotonic() - t0

    def reset(self, worker: int, timeout: float = 10.0) -> float:
        """The engine's ``reset_prefix_cache`` (``AllBlocksCleared``); seconds until applied."""
        assert self.sub is not None
        t0 = time.monotonic()
        seq = self.workers[worker].reset()
        assert seq is not None
        if not self.sub.wait_for(lambda s: s[worker].last_seq >= seq, timeout):
            raise RuntimeError(f"the reset of worker {worker} was not applied in {timeout} s")
        return time.monotonic() - t0

    # -- measures --------------------------------------------------------------------

    def truth(self, worker: int) -> Truth:
        """The worker's index blocks against its engine's cached ones, in kvroute keys.

        Engine blocks are named by the prompts the engine was sent (its
        request log), so the block size must be the router's.
        """
        w = self.workers[worker]
        keys = self._keys[worker]
        r = self.r
        for rec in w.requests():
            if rec.block_hashes and rec.block_hashes[-1] not in keys:
                ks = r.hashing(rec.prompt_token_ids, self.block_size, lora_name=rec.lora_name,
                               cache_namespace=rec.cache_salt, parent=None)  # fmt: skip
                keys.update(zip(rec.block_hashes, (int(k) for k in ks), strict=False))
        engine = {keys[h] for h in w.cached_block_hashes() if h in keys}
        ids = np.array([worker], np.uint64)
        one = np.zeros(1, np.uint64)
        held = set()
        for k in set(keys.values()):
            one[0] = k
            if r.index.match_array(one, ids)[0]:  # a chained key: held alone or not at all
                held.add(k)
        return Truth(r.index.worker_len(worker), len(engine), len(held & engine))


def agreement(sent: Iterable[Sent], tolerance: int) -> float:
    """Share of requests whose prediction was within ``tolerance`` tokens of the report."""
    rows = list(sent)
    if not rows:
        return 1.0
    return sum(abs(s.predicted - s.reported) <= tolerance for s in rows) / len(rows)
