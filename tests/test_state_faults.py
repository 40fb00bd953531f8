"""State faults on the real wire: mock workers, ZMQ events, the router's picture of their caches.

Issue 16's state-side cases, fast versions (``scripts/faults.py --side state`` runs
the long ones and measures them): an engine restart and a cache reset
leave no belief behind; a gap no replay fills degrades the worker and its
index converges back; junk and oversized frames leave the index exact; a
block-size or hash-seed mismatch and silently lost events are detected and
routed around. Each worker is a :class:`~kvroute.testing.MockWorker` on
loopback; :class:`~kvroute.testing.StateFleet` routes, sends each prompt to
the chosen worker and reports its cached tokens, as the proxy does.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

pytest.importorskip("zmq")

from kvroute import Request
from kvroute.events.engine_hashes import vllm_block_hashes
from kvroute.testing import LoseEvents, StateFleet, agreement, drop_removals
from kvroute.testing._state_faults import raw_publish


class Clock:
    """A router clock the test moves: fresh decisions (5 s) expire only when it says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 30000) for _ in range(n)]


def test_an_engine_restart_leaves_no_belief_behind() -> None:
    clock = Clock()  # frozen: the fresh decisions stay live unless dropped
    rng = random.Random(1)
    prompt = tokens(rng, 256)
    with StateFleet(2, router_kw={"clock": clock, "policy_params": {"seed": 0}}) as f:
        first = f.send(prompt)
        w = first.worker
        assert f.send(prompt).predicted == 256  # it is cached there, and believed
        f.restart(w)
        d = f.r.route(Request("after", tokens=prompt))
        # neither the index nor the fresh decisions still claim the dropped blocks
        assert d.predicted_cached_tokens == 0, d.explain()
        assert [row["matched_blocks"] for row in d.breakdown()] == [0, 0]
        assert f.r.stats()["cache_resets"] == 1


def test_all_blocks_cleared_leaves_no_belief_behind() -> None:
    clock = Clock()
    rng = random.Random(2)
    prompt = tokens(rng, 200)
    with StateFleet(2, router_kw={"clock": clock, "policy_params": {"seed": 0}}) as f:
        w = f.send(prompt).worker
        f.reset(w)
        d = f.r.route(Request("after", tokens=prompt))
        assert d.predicted_cached_tokens == 0, d.explain()
        f.r.finished("after")
        # and the engine agrees: nothing was cached on it
        assert f.send(prompt, worker=w).reported == 0


def test_a_burst_right_after_a_restart_is_not_routed_on_the_old_blocks() -> None:
    clock = Clock()
    rng = random.Random(3)
    system = tokens(rng, 160)
    with StateFleet(3, router_kw={"clock": clock, "policy_params": {"seed": 0}}) as f:
        w = f.send(system + tokens(rng, 32)).worker
        f.restart(w)
        burst = [f.r.route(Request(f"b{i}", tokens=system + tokens(rng, 32))) for i in range(6)]
        # the first is predicted nothing anywhere (the others follow it, by design)
        assert burst[0].predicted_cached_tokens == 0, burst[0].explain()
        assert all(row["matched_blocks"] == 0 for row in burst[0].breakdown())


def test_a_gap_without_replay_degrades_the_worker_and_its_index_converges_back() -> None:
    clock = Clock()
    rng = random.Random(4)
    system = tokens(rng, 160)  # 10 blocks every prompt shares
    lost = set(range(10, 15))
    kw = {"replay": False, "drop_seqs": lost, "num_blocks": 512}
    rk = {"clock": clock, "drift_window": 16}
    with StateFleet(1, worker_kw=kw, router_kw=rk, replay=False) as f:
        sent = []
        for _ in range(60):
            clock.t += 10.0  # think time: past the fresh decisions' TTL
            sent.append(f.send(system + tokens(rng, 40)))
            if len(sent) == 16:
                st = f.r.worker_states()[0]
                assert st.state == "degraded" and st.cause == "events_lost", st
        counts = f.sub.streams()[0].counts
        truth = f.truth(0)
        state = f.r.worker_states()[0]
    assert counts["replay_failed"] == 1 and counts["anchored"] >= 1
    # the requests after the one the gap was found on are predicted what the engine served
    assert agreement(sent[17:], tolerance=32) == 1.0, [(s.predicted, s.reported) for s in sent]
    # the index holds only what the engine holds, and most of it (the rest: tails of
    # the lost batches' prompts, which no request touched again)
    assert truth.precision == 1.0 and truth.recall >= 0.7, truth
    # the drift detector found the index agreeing again: trusted, without a restart
    assert state.state == "ok" and state.degradations == 1


def test_junk_and_oversized_frames_leave_the_index_exact() -> None:
    rng = random.Random(5)
    with StateFleet(1, worker_kw={"num_blocks": 512}) as f:
        f.sub.max_message_bytes = 4096
        for i in range(5):
            f.send(tokens(rng, 100 + i))
        w = f.workers[0]
        seq = w.next_seq.to_bytes(8, "big")
        raw_publish(w, [b"", seq])  # two frames
        raw_publish(w, [b"", b"1234567", b"x"])  # a 7-byte sequence number
        raw_publish(w, [b"", (2**40).to_bytes(8, "big"), b"\x00" * 5000])  # over the limit
        for i in range(5):
            f.send(tokens(rng, 120 + i))
        counts = f.sub.streams()[0].counts
        truth = f.truth(0)
    assert counts["malformed"] == 2 and counts["rejected"] == 1
    assert counts["gap"] == counts["replay_failed"] == counts["restart"] == 0
    assert (truth.precision, truth.recall) == (1.0, 1.0), truth


def _sessions(f: StateFleet, clock: Clock, rng: random.Random, n: int, turns: int) -> list[Any]:
    """``n`` multi-turn sessions, interleaved: each turn extends the session's prompt."""
    prompts = [tokens(rng, 200) for _ in range(n)]
    sent = []
    for _ in range(turns):
        for s in range(n):
            clock.t += 10.0
            sent.append((s, f.send(prompts[s])))
            prompts[s] = prompts[s] + tokens(rng, 48)
    return sent


def test_a_block_size_mismatch_is_degraded_at_once_and_routed_on_decisions() -> None:
    clock = Clock()
    rng = random.Random(6)
    # worker 1 runs 32-token blocks, the router 16: none of its events can be indexed
    kw = lambda i: {"block_size": 32} if i == 1 else {}  # noqa: E731
    with StateFleet(2, worker_kw=kw, router_kw={"clock": clock, "policy_params": {"seed": 0}}) as f:
        sent = _sessions(f, clock, rng, n=6, turns=5)
        st = f.r.worker_states()
    assert st[1].state == "degraded" and st[1].cause == "mismatch", st[1]
    assert st[0].state == "ok"
    # Routing quality holds: a later turn goes back where its session's prefix is
    # and finds it cached, on the mismatched worker too (its own decisions say so).
    later = [s for i, (_, s) in enumerate(sent) if i >= 6]
    on_1 = [s for s in later if s.worker == 1]
    assert on_1, "no session used worker 1"
    hit = sum(s.reported for s in later) / sum(s.prompt for s in later)
    assert hit >= 0.6, hit
    assert all(s.reported > 0 for s in on_1)


def test_removals_lost_silently_are_found_by_the_drift_detector() -> None:
    clock = Clock()
    rng = random.Random(7)
    # a small cache that evicts all the time, and says nothing of it
    kw = {"num_blocks": 48}
    rk = {"clock": clock, "drift_window": 16}
    with StateFleet(1, worker_kw=kw, router_kw=rk) as f:
        f.workers[0].event_filter = drop_removals
        prompts = [tokens(rng, 160) for _ in range(8)]  # 80 blocks: more than fit
        sent = []
        found = None
        for i in range(80):
            clock.t += 10.0
            sent.append(f.send(prompts[i % 8]))
            if found is None and f.r.worker_states()[0].state == "degraded":
                found = i
        st = f.r.worker_states()[0]
    assert st.cause == "drift_over", st
    # detected within a bounded number of requests: one window of them
    assert found is not None and found <= 16 + 8, found
    # while degraded its index is not believed: predictions come from decisions alone
    assert st.state == "degraded"


def test_stores_lost_without_a_gap_are_found_by_the_drift_detector() -> None:
    clock = Clock()
    rng = random.Random(8)
    rk = {"clock": clock, "drift_window": 16}
    with StateFleet(1, worker_kw={"num_blocks": 1024}, router_kw=rk) as f:
        f.workers[0].event_filter = LoseEvents(share=1.0, after=0)  # publishes empty batches
        prompts = [tokens(rng, 160) for _ in range(4)]
        sent = []
        for i in range(40):
            clock.t += 10.0
            sent.append(f.send(prompts[i % 4]))
        st = f.r.worker_states()[0]
    assert st.state == "degraded" and st.cause == "drift_under", st
    # routed on its decisions, the repeated prompts are predicted cached again
    assert agreement(sent[-8:], tolerance=32) == 1.0


def _vllm_hashing(
    tokens: Any, bs: int, *, lora_name: Any, cache_namespace: Any, parent: Any
) -> Any:
    # vLLM's default hashes (sha256, PYTHONHASHSEED unset): what worker 0 runs
    if parent is not None:
        raise NotImplementedError("vLLM hashes cannot continue from a 64-bit key")
    return vllm_block_hashes(tokens, bs, algo="sha256", cache_salt=cache_namespace)


@pytest.mark.parametrize("key_on", ["engine", "kvroute"])
def test_another_hash_seed_drifts_only_where_the_index_keys_on_engine_hashes(key_on: str) -> None:
    clock = Clock()
    rng = random.Random(9)
    # worker 1's engine runs another PYTHONHASHSEED
    kw = lambda i: {"hash_seed": "4242"} if i == 1 else {}  # noqa: E731
    rk: dict[str, Any] = {"clock": clock, "drift_window": 8, "policy_params": {"seed": 0}}
    if key_on == "engine":
        rk["hashing"] = _vllm_hashing
    with StateFleet(2, worker_kw=kw, router_kw=rk, key_on=key_on) as f:
        sent = _sessions(f, clock, rng, n=4, turns=6)
        st = f.r.worker_states()
    if key_on == "engine":
        assert st[1].state == "degraded", st[1]
    else:
        # kvroute's own keys never depend on the engine's seed: nothing drifts
        assert st[1].state == st[0].state == "ok"
        assert st[0].drift == st[1].drift == 0.0 and st[1].observed > 0
        assert agreement([s for _, s in sent], tolerance=32) == 1.0
    assert st[0].state == "ok"


def test_a_restart_makes_a_degraded_worker_trusted_again() -> None:
    with StateFleet(2) as f:
        f.send(tokens(random.Random(10), 64), worker=1)
        f.r.degrade_worker(1, "events_lost", "a test")
        st = f.r.worker_states()
        assert st[1].state == "degraded" and st[1].to_dict()["cause"] == "events_lost"
        assert st[0].state == "ok" and f.r.stats()["degraded"] == 1
        f.restart(1)  # a restart: the cache is empty and the events whole again
        assert f.r.worker_states()[1].state == "ok" and f.r.stats()["degraded"] == 0
