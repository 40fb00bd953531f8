"""TrtllmApplier: TensorRT-LLM's dict-shape events into a Router, and the LLM API feed.

Unit tests pin each rule (partial blocks, windows, ranks, tiers, capacity,
gaps, restarts); a property test drives a small TensorRT-LLM engine model
(per attention-DP rank: stores with partial tails, evictions, offloads to
host and disk and back, priority changes, a sliding-window twin stream,
restarts, lost events) and checks after every step that the router's index
says what the engines hold: exactly, while no event was lost; never more
than they hold, once one was (a lost removal must not leave a stale block).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvroute import Router
from kvroute.events.metrics import Metrics
from kvroute.events.trtllm_apply import TrtllmApplier
from kvroute.events.trtllm_llmapi import LlmApiFeed
from kvroute.hashing import kvroute_block_hashes
from kvroute.testing import MockWorker, TrtllmOptions

BS = 4
WINDOW, SLIDING = 4096, 128


def keys(tokens: list[int], salt: str | None = None) -> list[int]:
    return [int(k) for k in kvroute_block_hashes(tokens, BS, cache_namespace=salt)]


def toks(*ids: int) -> list[dict[str, int]]:
    return [{"token_id": t, "token_extra_id": 0} for t in ids]


class Events:
    """A hand-written dict-event stream for one rank."""

    def __init__(self, rank: int | None = None, window: int | None = WINDOW) -> None:
        self.rank, self.window, self.next_id = rank, window, 0

    def __call__(self, data: dict[str, Any], **over: Any) -> dict[str, Any]:
        ev: dict[str, Any] = {"event_id": self.next_id, "data": data}
        if self.window is not None:
            ev["window_size"] = self.window
        if self.rank is not None:
            ev["attention_dp_rank"] = self.rank
        ev.update(over)
        self.next_id = ev["event_id"] + 1
        return ev

    def stored(self, parent: Any, *blocks: tuple[Any, list[int]], **kw: Any) -> dict[str, Any]:
        """A stored event (``window_size``, ``layer_group_id``: the event's; rest: blocks')."""
        over = {k: kw.pop(k) for k in ("window_size", "layer_group_id") if k in kw}
        body = [{"block_hash": h, "tokens": toks(*t), **kw} for h, t in blocks]
        return self({"type": "stored", "parent_hash": parent, "blocks": body}, **over)

    def removed(self, *hashes: Any, **over: Any) -> dict[str, Any]:
        return self({"type": "removed", "block_hashes": list(hashes)}, **over)

    def updated(self, h: Any, old: int | None, new: int | None) -> dict[str, Any]:
        level = None if old is None else {"type": "event_diff", "old_value": old, "new_value": new}
        return self({"type": "updated", "block_hash": h, "cache_level": level, "priority": None})

    def created(self, *levels: int, **over: Any) -> dict[str, Any]:
        return self({"type": "created", "num_blocks_per_cache_level": list(levels)}, **over)


@pytest.fixture
def router() -> Router:
    return Router(block_size=BS, workers=[0, 1, 2])


A = list(range(1, 13))  # three blocks


def test_a_chain_with_a_partial_tail_is_keyed_by_the_tokens(router: Router) -> None:
    ap, ev = TrtllmApplier(router, 0), Events()
    assert ap.feed(ev.stored(None, (10, A[:4]), (11, A[4:8]), (12, A[8:10]))) == "ok"
    assert router.index.match(keys(A)) == {0: 2}
    assert router.index.resolve(0, 11) == keys(A)[1]
    assert router.index.resolve(0, 12) is None  # the partial block is not indexed
    # Its removal is recognised, not an unknown block.
    assert ap.feed(ev.removed(12)) == "ok"
    assert ap.feed(ev.removed(12)) == "unknown_block"  # a second time it is unknown
    assert ap.feed(ev.stored(11, (13, A[8:12]))) == "ok"  # the chain continues
    assert router.index.match(keys(A)) == {0: 3}


def test_a_single_partial_block_is_its_own_event(router: Router) -> None:
    ap, ev = TrtllmApplier(router, 0), Events()
    assert ap.feed(ev.stored(None, (10, A[:4]))) == "ok"
    assert ap.feed(ev.stored(10, (20, [5, 6]))) == "ok"
    assert router.index.worker_len(0) == 1
    assert ap.feed(ev.removed(20, 10)) == "ok"
    assert router.index.worker_len(0) == 0


def test_a_block_size_mismatch_is_loud_and_not_indexed(router: Router) -> None:
    ap, ev = TrtllmApplier(router, 0), Events()
    assert ap.feed(ev.stored(None, (10, [1, 2]), (11, [3, 4]))) == "mismatch"
    assert ap.feed(ev.stored(None, (12, A[:8]))) == "mismatch"  # one block, larger than ours
    assert router.index.worker_len(0) == 0


def test_only_the_largest_window_is_indexed(router: Router) -> None:
    ap, ev = TrtllmApplier(router, 0), Events()
    ap.feed(ev.created(100, window_size=SLIDING))
    ap.feed(ev.created(200, window_size=WINDOW))
    assert ap.feed(ev.stored(None, (10, A[:4]), window_size=SLIDING)) == "ignored"
    assert ap.feed(ev.stored(None, (10, A[:4]))) == "ok"
    assert ap.feed(ev.removed(10, window_size=SLIDING)) == "ignored"
    assert router.index.worker_len(0) == 1
    assert ap.capacity(0)["device"] == 200
    assert ap.counts[0] == Counter({"ok": 3, "ignored": 2})  # both created events: ok


def test_a_late_larger_window_re_indexes(router: Router) -> None:
    ap, ev = TrtllmApplier(router, 0), Events()
    assert ap.feed(ev.stored(None, (10, A[:4]), window_size=SLIDING)) == "ok"  # all it knows
    assert router.index.worker_len(0) == 1
    assert ap.feed(ev.stored(None, (30, A[4:8]), window_size=WINDOW)) == "ok"
    # The sliding window's block is gone; the full window's is in.
    assert router.index.resolve(0, 10) is None and router.index.worker_len(0) == 1
    assert ap.counts[0]["window_switch"] == 1
    assert ap.feed(ev.stored(None, (10, A[:4]), window_size=SLIDING)) == "ignored"


def test_layer_groups_of_one_window_index_the_lowest(router: Router) -> None:
    ap, ev = TrtllmApplier(router, 0), Events()
    ap.feed(ev.created(10, layer_group_id=1))
    ap.feed(ev.created(10, layer_group_id=0))
    assert ap.feed(ev.stored(None, (10, A[:4]), layer_group_id=1)) == "ignored"
    assert ap.feed(ev.stored(None, (10, A[:4]), layer_group_id=0)) == "ok"


def test_a_fixed_window_is_the_only_one_indexed(router: Router) -> None:
    ap, ev = TrtllmApplier(router, 0, window_size=SLIDING), Events()
    assert ap.feed(ev.stored(None, (10, A[:4]))) == "ignored"
    assert ap.feed(ev.stored(None, (10, A[:4]), window_size=SLIDING)) == "ok"
    assert ap.feed(ev.stored(None, (11, A[4:8]), window_size=None)) == "ok"  # no window: indexed


def test_folded_ranks_add_their_copies(router: Router) -> None:
    ap = TrtllmApplier(router, 0)
    r0, r1 = Events(rank=0), Events(rank=1)
    ap.feed(r0.stored(None, (10, A[:4])))
    ap.feed(r1.stored(None, (10, A[:4])))
    ap.feed(r0.removed(10))
    assert router.index.match(keys(A)) == {0: 1}  # rank 1 still holds it
    ap.feed(r1.removed(10))
    assert router.index.worker_len(0) == 0


def test_mapped_ranks_are_separate_workers(router: Router) -> None:
    ap = TrtllmApplier(router, {0: 1, 1: 2})
    r0, r1, r5 = Events(rank=0), Events(rank=1), Events(rank=5)
    ap.feed(r0.stored(None, (10, A[:4])))
    ap.feed(r1.stored(None, (10, A[:4]), (11, A[4:8])))
    assert router.index.match(keys(A)) == {1: 1, 2: 2}
    assert ap.feed(r5.stored(None, (10, A[:4]))) == "ignored"
    assert ap.unmapped == Counter({5: 1}) and ap.workers() == [1, 2]
    assert ap.worker_of(None) == 1  # no rank named: rank 0


def test_updated_moves_a_block_between_tiers_and_removal_follows_it(router: Router) -> None:
    ap, ev = TrtllmApplier(router, 0), Events()
    ap.feed(ev.stored(None, (10, A[:4]), (11, A[4:8])))
    assert ap.feed(ev.updated(11, 0, 1)) == "ok"  # offloaded to host
    assert router.index.match_tiers(keys(A)) == {0: (1, 1, 0)}
    assert ap.feed(ev.updated(11, 1, 2)) == "ok"  # on to disk
    assert router.index.match_tiers(keys(A)) == {0: (1, 0, 1)}
    assert ap.feed(ev.removed(11)) == "ok"  # taken from disk, where it is
    assert router.index.match_tiers(keys(A)) == {0: (1, 0, 0)}
    assert ap.feed(ev.updated(10, 0, 1)) == "ok"
    assert ap.feed(ev.updated(10, 1, 0)) == "ok"  # and back
    assert router.index.match_tiers(keys(A)) == {0: (1, 0, 0)}
    assert ap.feed(ev.updated(10, None, None)) == "ok"  # a priority change: nothing moves
    assert ap.feed(ev.updated(99, 0, 1)) == "unknown_block"


def test_a_store_at_a_lower_level_lands_in_its_tier(router: Router) -> None:
    ap, ev = TrtllmApplier(router, 0), Events()
    ap.feed(ev.stored(None, (10, A[:4]), cache_level=1))
    assert router.index.match_tiers(keys(A)) == {0: (0, 1, 0)}
    assert ap.feed(ev.removed(10)) == "ok"
    assert router.index.worker_len(0) == 0


def test_created_reports_capacity_per_tier(router: Router) -> None:
    ap = TrtllmApplier(router, {0: 0, 1: 0, 2: 1})
    for rank, levels in ((0, (100, 20)), (1, (100, 20)), (2, (50, 0, 7))):
        ap.feed(Events(rank=rank).created(*levels))
    assert ap.capacity(0) == {"device": 200, "host": 40, "disk": 0}
    assert ap.capacity(1) == {"device": 50, "host": 0, "disk": 7}


def test_created_feeds_the_routers_capacity() -> None:
    router = Router(block_size=BS, workers=[0], journal=True)
    ap = TrtllmApplier(router, 0)
    ap.feed(Events().created(64, 8))
    calls = [(m, a, kw) for _, m, a, kw in router.journal() if m == "update_worker_metrics"]
    assert calls == [
        (
            "update_worker_metrics",
            (0,),
            {"waiting_requests": None, "kv_usage": None, "kv_capacity_blocks": 64},
        )
    ]


def test_a_gap_clears_the_rank_s_worker_and_counts(router: Router) -> None:
    metrics = Metrics(router)
    ap = TrtllmApplier(router, {0: 0, 1: 1}, metrics=metrics)
    r0, r1 = Events(rank=0), Events(rank=1)
    ap.feed(r0.stored(None, (10, A[:4])))
    ap.feed(r1.stored(None, (10, A[:4])))
    r0.next_id += 2  # two events of rank 0 never arrive
    assert ap.feed(r0.stored(None, (20, A[4:8]))) == "ok"
    assert router.index.resolve(0, 10) is None  # cleared: a lost removal can't linger
    assert router.index.resolve(0, 20) is not None  # and the event after the gap applies
    assert router.index.resolve(1, 10) is not None  # the other rank's worker is untouched
    assert ap.counts[0]["gap"] == 1 and ap.counts[0]["replay_failed"] == 1
    states = router.worker_states()  # the rank's worker degraded, the other trusted
    assert (states[0].state, states[0].cause, states[1].state) == ("degraded", "events_lost", "ok")
    for status in ("gap", "replay_failed"):
        assert metrics.value("kvroute_events_total", {"worker": "0", "status": status}) == 1
    assert ap.applier.counts[0]["replay_failed"] == 1


def test_ids_going_back_are_a_restart_of_the_whole_engine(router: Router) -> None:
    ap = TrtllmApplier(router, {0: 0, 1: 1})
    r0, r1 = Events(rank=0), Events(rank=1)
    ap.feed(r0.created(10))
    ap.feed(r1.created(10))
    ap.feed(r0.stored(None, (10, A[:4])))
    ap.feed(r1.stored(None, (10, A[:4])))
    r0.next_id = r1.next_id = 0  # a new engine
    assert ap.feed(r0.created(10)) == "ok"
    assert router.index.worker_len(0) == router.index.worker_len(1) == 0
    assert ap.feed(r1.created(10)) == "ok"  # the other rank starts anew without another clear
    assert ap.feed(r1.stored(None, (10, A[:4]))) == "ok"
    assert router.index.worker_len(1) == 1
    assert ap.counts[0]["restart"] == ap.counts[1]["restart"] == 1
    assert ap.last_event_ids() == {0: 0, 1: 1}


def test_after_a_restart_a_rank_s_lost_first_events_are_a_gap(router: Router) -> None:
    ap = TrtllmApplier(router, {0: 0, 1: 1})
    r0, r1 = Events(rank=0), Events(rank=1)
    ap.feed(r0.created(10))
    ap.feed(r1.created(10))
    r0.next_id, r1.next_id = 0, 1  # a new engine; rank 1's event 0 never arrives
    ap.feed(r0.created(10))
    assert ap.feed(r1.stored(None, (10, A[:4]))) == "ok"
    assert ap.counts[1]["gap"] == 1 and ap.counts[1]["restart"] == 1


def test_a_malformed_event_is_counted_and_still_advances_its_rank(router: Router) -> None:
    metrics = Metrics(router)
    ap, ev = TrtllmApplier(router, 0, metrics=metrics), Events()
    ap.feed(ev.stored(None, (10, A[:4])))
    bad = ev({"type": "stored", "parent_hash": None, "blocks": [{"block_hash": 11}]})
    assert ap.feed(bad) == "malformed"
    assert ap.feed(ev.removed(10)) == "ok"  # no gap: the malformed event had its id
    assert ap.counts[0]["malformed"] == 1 and "gap" not in ap.counts[0]
    assert metrics.value("kvroute_events_total", {"worker": "0", "status": "malformed"}) == 1
    assert ap.feed(b"\xff") == "malformed"
    assert ap.feed(42) == "malformed"  # type: ignore[arg-type]


def test_arguments_are_checked(router: Router) -> None:
    with pytest.raises(TypeError):
        TrtllmApplier(router, "0")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TrtllmApplier(router, {-1: 0})
    with pytest.raises(ValueError):
        TrtllmApplier(router, 0, window_size=0)


# -- the engine model ----------------------------------------------------------------


def engine_hash(salt: str | None, prefix: tuple[int, ...], algo: str) -> int | str:
    d = hashlib.sha256(repr((salt, prefix)).encode()).digest()
    return d.hex() if algo == "v2_sha256" else int.from_bytes(d[:8], "big")


def handle(h: int | str) -> int:
    return int(h[:16], 16) if isinstance(h, str) else h


@dataclass
class Block:
    prefix: tuple[int, ...]  # every token up to and including this block
    salt: str | None
    tier: int = 0


@dataclass
class RankModel:
    """One attention-DP rank of a TensorRT-LLM engine, and the events it publishes."""

    rank: int
    algo: str
    blocks: dict[int | str, Block] = field(default_factory=dict)
    partial: dict[int | str, tuple[int, ...]] = field(default_factory=dict)
    next_id: int = 0
    lose_next: int = 0  # events to drop before delivery
    out: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, data: dict[str, Any]) -> None:
        for window in (WINDOW, SLIDING):  # the full window, and a sliding-window twin
            ev = {
                "event_id": self.next_id,
                "window_size": window,
                "attention_dp_rank": self.rank,
                "hash_algo": self.algo,
                "data": data,
            }
            self.next_id += 1
            if self.lose_next:
                self.lose_next -= 1
            else:
                self.out.append(ev)

    def h(self, salt: str | None, prefix: tuple[int, ...]) -> int | str:
        return engine_hash(salt, prefix, self.algo)

    def start(self) -> None:
        self.blocks.clear()
        self.partial.clear()
        self.next_id = 0
        self.emit({"type": "created", "num_blocks_per_cache_level": [1000 + self.rank, 10]})

    def store(self, prompt: tuple[int, ...], salt: str | None, with_partial: bool) -> None:
        full = len(prompt) // BS
        parent = None
        i = 0
        while i < full and self.h(salt, prompt[: (i + 1) * BS]) in self.blocks:
            parent = self.h(salt, prompt[: (i + 1) * BS])
            i += 1
        blocks = []
        for j in range(i, full):
            h = self.h(salt, prompt[: (j + 1) * BS])
            self.blocks[h] = Block(prompt[: (j + 1) * BS], salt)
            blocks.append(
                {
                    "type": "stored_block",
                    "block_hash": h,
                    "cache_salt": salt,
                    "tokens": toks(*prompt[j * BS : (j + 1) * BS]),
                    "cache_level": 0,
                    "priority": 35,
                    "mm_keys": [],
                }
            )
        tail = prompt[full * BS :]
        ph = self.h(salt, prompt)
        if with_partial and tail and ph not in self.partial:
            self.partial[ph] = prompt
            blocks.append(
                {
                    "type": "stored_block",
                    "block_hash": ph,
                    "cache_salt": salt,
                    "tokens": toks(*tail),
                    "cache_level": 0,
                    "priority": 35,
                }
            )
        if blocks:
            self.emit({"type": "stored", "parent_hash": parent, "blocks": blocks})

    def leaves(self) -> list[int | str]:
        parents = {
            self.h(b.salt, b.prefix[:-BS]) for b in self.blocks.values() if len(b.prefix) > BS
        }
        return sorted((h for h in self.blocks if h not in parents), key=str)

    def evict(self, pick: int, n: int) -> None:
        gone: list[int | str] = []
        for _ in range(n):
            leaves = self.leaves()
            if not leaves:
                break
            h = leaves[pick % len(leaves)]
            del self.blocks[h]
            gone.append(h)
        if gone:
            self.emit({"type": "removed", "block_hashes": gone})

    def drop_partial(self, pick: int) -> None:
        if self.partial:
            h = sorted(self.partial, key=str)[pick % len(self.partial)]
            del self.partial[h]
            self.emit({"type": "removed", "block_hashes": [h]})

    def move(self, pick: int, level: int) -> None:
        held = sorted(self.blocks, key=str)
        if held:
            h = held[pick % len(held)]
            old, self.blocks[h].tier = self.blocks[h].tier, level
            if old != level:
                self.emit(
                    {
                        "type": "updated",
                        "block_hash": h,
                        "priority": None,
                        "cache_level": {"type": "event_diff", "old_value": old, "new_value": level},
                    }
                )

    def reprioritise(self, pick: int) -> None:
        held = sorted(self.blocks, key=str)
        if held:
            h = held[pick % len(held)]
            self.emit(
                {
                    "type": "updated",
                    "block_hash": h,
                    "cache_level": None,
                    "priority": {"type": "event_diff", "old_value": 35, "new_value": 80},
                }
            )


PROMPTS = [
    tuple(range(1, 13)),
    (*tuple(range(1, 9)), 50, 51, 52, 53, 54),
    (*tuple(range(1, 5)), 60, 61, 62, 63, 64, 65, 66, 67, 68, 69),
    (70, 71, 72),
    tuple(range(1, 15)),
]
SALTS = [None, "tenant-a"]

OPS = st.one_of(
    st.tuples(
        st.just("store"),
        st.integers(0, 1),
        st.integers(0, len(PROMPTS) - 1),
        st.integers(0, len(SALTS) - 1),
        st.booleans(),
    ),
    st.tuples(st.just("evict"), st.integers(0, 1), st.integers(0, 50), st.integers(1, 3)),
    st.tuples(st.just("move"), st.integers(0, 1), st.integers(0, 50), st.integers(0, 2)),
    st.tuples(st.just("drop_partial"), st.integers(0, 1), st.integers(0, 50)),
    st.tuples(st.just("priority"), st.integers(0, 1), st.integers(0, 50)),
    st.tuples(st.just("restart")),
    st.tuples(st.just("lose"), st.integers(0, 1), st.integers(1, 3)),
)


def held(models: list[RankModel], ranks: list[int]) -> dict[int, list[int]]:
    """kvroute key -> tiers of its copies, over the given ranks."""
    out: dict[int, list[int]] = {}
    for r in ranks:
        for b in models[r].blocks.values():
            out.setdefault(keys(list(b.prefix), b.salt)[-1], []).append(b.tier)
    return out


def model_match(
    models: list[RankModel], ranks: list[int], prompt: tuple[int, ...], salt: str | None
) -> tuple[int, int, int]:
    have = held(models, ranks)
    tiers = [0, 0, 0]
    for k in keys(list(prompt), salt):
        if k not in have:
            break
        tiers[min(have[k])] += 1
    return tiers[0], tiers[1], tiers[2]


@pytest.mark.parametrize("algo", ["v2_sha256", "v1_block_key"])
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "mapped"])
@given(ops=st.lists(OPS, max_size=30))
def test_the_index_says_what_the_engine_model_holds(algo: str, fold: bool, ops: list[Any]) -> None:
    router = Router(block_size=BS, workers=[0, 1])
    mapping = {0: 0, 1: 0} if fold else {0: 0, 1: 1}
    ap = TrtllmApplier(router, 0 if fold else mapping)
    models = [RankModel(0, algo), RankModel(1, algo)]
    for m in models:
        m.start()
    exact = {0: True, 1: True}  # no event of the worker lost since its last clear
    undetected = set()  # ranks with a loss their next event has not shown yet

    def deliver() -> None:
        for m in models:
            if m.out:
                undetected.discard(m.rank)
            for ev in m.out:
                ap.feed(ev)
            m.out.clear()

    deliver()
    for op in ops:
        kind, *args = op
        if kind == "restart":
            for m in models:
                m.lose_next = 0  # what the old engine's connection lost is gone with it
                m.start()
            deliver()
            exact = {0: True, 1: True}
            undetected.clear()
            continue
        m = models[args[0]]
        if kind == "store":
            m.store(PROMPTS[args[1]], SALTS[args[2]], args[3])
        elif kind == "evict":
            m.evict(args[1], args[2])
        elif kind == "move":
            m.move(args[1], args[2])
        elif kind == "drop_partial":
            m.drop_partial(args[1])
        elif kind == "priority":
            m.reprioritise(args[1])
        elif kind == "lose":
            m.lose_next += args[1]
            exact[mapping[m.rank]] = False
            undetected.add(m.rank)
        deliver()
        if undetected:
            continue  # a loss the engine has not shown yet: the router cannot know
        for w in set(mapping.values()):
            ranks = [r for r, ww in mapping.items() if ww == w]
            have = held(models, ranks)
            if exact[w]:
                assert router.index.worker_len(w) == len(have)
                for r in ranks:
                    for h, b in models[r].blocks.items():
                        assert (
                            router.index.resolve(w, handle(h)) == keys(list(b.prefix), b.salt)[-1]
                        )
            else:
                assert router.index.worker_len(w) <= len(have)
            for prompt in PROMPTS:
                for salt in SALTS:
                    want = model_match(models, ranks, prompt, salt)
                    got = router.index.match_tiers(keys(list(prompt), salt)).get(w, (0, 0, 0))
                    if exact[w]:
                        assert got == want, (prompt, salt)
                    else:
                        assert sum(got) <= sum(want), (prompt, salt)
    for w in set(mapping.values()):
        assert ap.capacity(w)["device"] == sum(1000 + r for r, ww in mapping.items() if ww == w)


# -- the LLM API feed ------------------------------------------------------------------


def post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_the_llm_api_feed_follows_a_worker_s_events() -> None:
    options = TrtllmOptions(sliding_window=64, host_blocks=5)
    with MockWorker(block_size=BS, num_blocks=12, trtllm=options) as w:
        router = Router(block_size=BS, workers=[0])
        feed = LlmApiFeed(router, 0)
        assert w.trtllm is not None
        llm = w.trtllm.llm

        async def run() -> None:
            task = asyncio.create_task(feed.run(llm, timeout=0.05, idle_sleep=0.01))
            for i in range(10):  # evictions: 12 blocks hold only a few prompts
                prompt = list(range(i, i + 9 + i % 3))
                await asyncio.to_thread(
                    post, w.url + "/v1/completions", {"prompt": prompt, "max_tokens": 1}
                )
            for _ in range(400):
                if feed.applier.last_event_ids().get(0) == w.trtllm.next_event_id - 1:  # type: ignore[union-attr]
                    break
                await asyncio.sleep(0.01)
            feed.stop()
            await asyncio.wait_for(task, 5)

        asyncio.run(run())
        assert feed.applier.last_event_ids() == {0: w.trtllm.next_event_id - 1}
        assert router.index.worker_len(0) == len(w.cached_block_hashes())
        assert all(router.index.resolve(0, h) is not None for h in w.cached_block_hashes())
        assert feed.applier.capacity(0) == {"device": 12, "host": 5, "disk": 0}
        counts = feed.applier.counts[0]
        assert counts["ignored"] == counts["ok"]  # the sliding-window twin of every event
        assert not {"gap", "restart", "malformed", "unknown_block"} & set(counts)


def test_consume_stops_at_an_empty_queue_and_run_checks_its_arguments() -> None:
    router = Router(block_size=BS, workers=[0])
    feed = LlmApiFeed(router, 0)

    async def empty() -> Any:
        raise IndexError  # what TensorRT-LLM's iterator raises on an empty queue
        yield  # pragma: no cover

    assert asyncio.run(feed.consume(empty())) == 0
    with pytest.raises(ValueError):
        asyncio.run(feed.run(object(), timeout=-1))  # type: ignore[arg-type]
