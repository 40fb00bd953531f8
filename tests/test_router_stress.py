"""Concurrency: routes from threads and an asyncio loop while events and health changes apply.

Every state-changing call is journaled under the router's lock in the order it
took effect. Replaying the journal serially on a fresh router must reproduce
every decision and the final state exactly: concurrency changes the order of
operations, never their effect. Runs on the compiled cores and on their
pure-Python twins (ids c / py).
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import numpy as np
import numpy.typing as npt
from helpers import Twin

from kvroute.request import Decision, Request
from kvroute.router import Router

WORKERS = [0, 1, 2, 3, 4]
PREFIXES = [[1000 * p + i for i in range(1, 1 + 8 * (p + 1))] for p in range(6)]


def H(xs: list[int]) -> npt.NDArray[np.uint64]:
    return np.array(xs, np.uint64)


def make(twin: Twin, policy: str) -> Router:
    params: dict[str, Any] = {} if policy == "cache_aware" else {"seed": 11}
    return Router(
        block_size=16,
        workers=WORKERS,
        policy=policy,
        policy_params=params,
        clock=lambda: 0.0,
        index_factory=twin.BlockIndex,
        journal=True,
    )


def client(r: Router, tid: int, n: int, out: list[tuple[int, Decision]]) -> None:
    rng = random.Random(tid)
    open_ids: list[str] = []
    for i in range(n):
        p = PREFIXES[rng.randrange(len(PREFIXES))]
        hashes = H([*p[: rng.randrange(1, len(p) + 1)], 10**9 + tid * 10**6 + i])
        d = r.route(
            Request(
                f"{tid}-{i}",
                block_hashes=hashes,
                expected_output_tokens=rng.choice([None, 50, 500]),
                session_id=rng.choice([None, f"s{tid}"]),
            )
        )
        out.append((d.seq, d))
        open_ids.append(d.request_id)  # type: ignore[arg-type]
        if rng.random() < 0.6:
            r.first_token(open_ids[rng.randrange(len(open_ids))])
        if len(open_ids) > 5:
            rid = open_ids.pop(rng.randrange(len(open_ids)))
            (r.finished if rng.random() < 0.9 else r.failed)(rid)
    for rid in open_ids:
        r.finished(rid)


def events(r: Router, stop: threading.Event) -> None:
    rng = random.Random(99)
    while not stop.is_set():
        w = rng.choice(WORKERS)
        p = PREFIXES[rng.randrange(len(PREFIXES))]
        k = rng.randrange(1, len(p) + 1)
        if rng.random() < 0.7:
            r.apply_stored(w, H(p[:k]))
        else:
            r.apply_removed(w, H(p[k - 1 :]))
        if rng.random() < 0.1:
            r.update_worker_metrics(w, waiting_requests=rng.randrange(4), kv_usage=rng.random())


def health(r: Router, stop: threading.Event) -> None:
    flip = False
    while not stop.is_set():
        # worker 4 flaps; 0-3 stay healthy, so a candidate always exists
        (r.mark_unhealthy if flip else r.mark_healthy)(4)
        flip = not flip


def replay(
    journal: list[tuple[int, str, tuple[Any, ...], dict[str, Any]]], fresh: Router
) -> dict[int, Decision]:
    decisions: dict[int, Decision] = {}
    for seq, op, args, kwargs in journal:
        if op == "add_worker":
            assert seq <= len(WORKERS)
            continue  # the fresh router was built with the same workers
        result = getattr(fresh, op)(*args, **kwargs)
        if op == "route":
            assert result.seq == seq
            decisions[seq] = result
    return decisions


def same(a: Decision, b: Decision) -> bool:
    return (
        a.request_id,
        a.worker,
        a.policy,
        a.matched_blocks,
        a.alt_worker,
        a.alt_matched_blocks,
        a.predicted_cached_tokens,
        [sorted(r.items()) for r in a.breakdown()],
    ) == (
        b.request_id,
        b.worker,
        b.policy,
        b.matched_blocks,
        b.alt_worker,
        b.alt_matched_blocks,
        b.predicted_cached_tokens,
        [sorted(r.items()) for r in b.breakdown()],
    )


def run_stress(twin: Twin, policy: str, n: int = 150) -> None:
    r = make(twin, policy)
    stop = threading.Event()
    outs: list[list[tuple[int, Decision]]] = [[] for _ in range(4)]
    bg = [
        threading.Thread(target=events, args=(r, stop)),
        threading.Thread(target=health, args=(r, stop)),
    ]
    clients = [threading.Thread(target=client, args=(r, t, n, outs[t])) for t in range(3)]

    async def async_client() -> None:
        # an asyncio proxy calls route() from its loop; interleave with the threads
        rng = random.Random(7)
        for i in range(n):
            p = PREFIXES[rng.randrange(len(PREFIXES))]
            d = r.route(Request(f"a-{i}", block_hashes=H([*p, 2 * 10**9 + i])))
            outs[3].append((d.seq, d))
            await asyncio.sleep(0)
            r.first_token(d.request_id)
            r.finished(d.request_id)

    loop_thread = threading.Thread(target=lambda: asyncio.run(async_client()))
    for t in [*bg, *clients, loop_thread]:
        t.start()
    for t in [*clients, loop_thread]:
        t.join()
    stop.set()
    for t in bg:
        t.join()

    journal = r.journal()
    seqs = [e[0] for e in journal]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    got = {seq: d for out in outs for seq, d in out}
    assert len(got) == 4 * n
    fresh = make(twin, policy)
    replayed = replay(journal, fresh)
    assert replayed.keys() == got.keys()
    mismatched = [s for s in got if not same(got[s], replayed[s])]
    assert mismatched == []
    # the same final state: all requests finished, same index contents, loads at zero
    for w in WORKERS:
        assert r.load(w) == fresh.load(w)
        assert r.load(w)["active_requests"] == 0
        assert r.load(w)["prefill_tokens"] == 0
        assert r.load(w)["decode_blocks"] == 0
        assert r.index.worker_len(w) == fresh.index.worker_len(w)
    for p in PREFIXES:
        assert r.index.match(H(p)) == fresh.index.match(H(p))
    r._check()
    r.index._check()
    assert r.stats()["unknown_request_ids"] == 0


def test_concurrent_routes_and_events_match_a_serial_replay_kvroute(twin: Twin) -> None:
    run_stress(twin, "kvroute")


def test_concurrent_routes_and_events_match_a_serial_replay_kv_cost(twin: Twin) -> None:
    run_stress(twin, "kv_cost")


def test_concurrent_routes_and_events_match_a_serial_replay_cache_aware(twin: Twin) -> None:
    run_stress(twin, "cache_aware", n=80)
