"""The router's beliefs about workers' caches: reset, refused events, bounded sessions.

Issue 16, items 1, 3 and 9: whatever the engine says it dropped leaves
every record at once (:meth:`Router.worker_cache_reset`), events naming a
worker the router does not know never resurrect a cache, and per-session
state is bounded.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvroute import Request, Router


def H(start: int, n: int = 1) -> np.ndarray:
    """``n`` block keys from ``start`` (distinct prompts get distinct ranges)."""
    return np.arange(start * 1000, start * 1000 + n, dtype=np.uint64)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _router(**kw: object) -> tuple[Router, Clock]:
    clock = Clock()
    r = Router(block_size=4, workers=[0, 1, 2], policy_params={"seed": 0}, clock=clock, **kw)  # type: ignore[arg-type]
    return r, clock


# -- item 3: blocks of unknown or removed workers are refused ---------------------------------


def test_a_late_event_from_a_removed_worker_does_not_resurrect_its_cache() -> None:
    r = Router(block_size=4, workers=[0, 1])
    r.remove_worker(1)
    r.apply_stored(1, [101, 102, 103])
    r.add_worker(1)
    assert r.index.match([101, 102, 103, 104]) == {}
    d = r.route(Request("a", block_hashes=[101, 102, 103, 104]))
    assert d.matched_blocks == 0 and d.predicted_cached_tokens == 0
    assert r.stats()["refused_events"] == 1


def test_events_for_a_worker_never_added_are_refused_and_counted() -> None:
    r = Router(block_size=4, workers=[0])
    r.apply_stored(7, [1, 2])
    r.apply_removed(7, [1])
    assert r.apply_cleared(7) == 0
    assert r.index.match([1, 2]) == {} and 7 not in r.index.workers()
    assert r.stats()["refused_events"] == 3
    r.apply_stored(0, [1, 2])  # a known worker's still apply
    assert r.index.match([1, 2]) == {0: 2}


def test_refused_events_replay_the_same_from_the_journal() -> None:
    r = Router(block_size=4, workers=[0, 1], journal=True, policy_params={"seed": 1})
    r.remove_worker(1)
    r.apply_stored(1, [5, 6])
    r.add_worker(1)
    d = r.route(Request("x", block_hashes=[5, 6, 7]))
    replay = Router(block_size=4, journal=True, policy_params={"seed": 1})
    for _, method, args, kwargs in r.journal():
        if method != "route":
            getattr(replay, method)(*args, **kwargs)
        else:
            assert replay.route(*args, **kwargs).worker == d.worker
    assert replay.index.match([5, 6]) == {}


# -- item 1: a cache reset leaves every record at once ------------------------------------------


def test_a_cleared_worker_is_not_predicted_from_fresh_decisions() -> None:
    r, clock = _router()
    h = H(1, 8)
    d = r.route(Request("a", block_hashes=h))
    r.finished("a")
    r.apply_stored(d.worker, h)
    clock.t = 0.5
    r.apply_cleared(d.worker)  # the engine says: everything is gone
    clock.t = 1.0
    d2 = r.route(Request("b", block_hashes=h))
    # Neither the index nor the fresh decision of "a" (5 s TTL) may claim a hit.
    assert d2.predicted_cached_tokens == 0, d2.explain()
    assert [row["matched_blocks"] for row in d2.breakdown()] == [0, 0, 0]


def test_a_burst_after_a_reset_is_not_sent_to_the_reset_worker_on_stale_blocks() -> None:
    # The reproduction: a restart followed at once by a burst of new prompts
    # sharing the old prefix sent all of them to the restarted worker.
    r, clock = _router()
    prefix = H(1, 16)
    d = r.route(Request("warm", block_hashes=prefix))
    w = d.worker
    r.finished("warm")
    r.apply_stored(w, prefix)
    clock.t = 0.1
    r.worker_cache_reset(w, "restart")
    chosen = []
    for i in range(6):
        clock.t = 0.2 + i * 0.01
        hashes = np.concatenate([prefix, H(1000 + i, 2)])
        chosen.append(r.route(Request(f"b{i}", block_hashes=hashes)))
    # Nothing is cached anywhere: the burst spreads over the fleet...
    assert len({c.worker for c in chosen}) > 1
    # ...and the first of it is predicted no hit on the reset worker.
    assert chosen[0].predicted_cached_tokens == 0


def test_worker_cache_reset_drops_pins_warmups_and_predicted_residency() -> None:
    clock = Clock()
    r = Router(block_size=4, workers=[0, 1], kv_events=False, clock=clock,
               policy_params={"seed": 0})  # fmt: skip
    cc = {"type": "ephemeral", "ttl": "1h"}
    d = r.route(
        Request("a", tokens=list(range(16)), session_id="s", cache_control=cc,
                speculative_prefill=True)
    )  # fmt: skip
    r.finished("a", output_tokens=[1, 2])
    w = d.worker
    hashes = r.hashing(list(range(16)), 4, lora_name=None, cache_namespace=None, parent=None)
    assert r.route(Request("probe", block_hashes=hashes)).predicted_cached_tokens == 16
    r.finished("probe")
    listened: list[tuple[int, str, str]] = []
    r.add_listener(lambda worker, change, why: listened.append((worker, change, why)))
    r.worker_cache_reset(w, "restart")
    assert r.warmup_plan("s") is None
    d2 = r.route(Request("b", block_hashes=hashes, session_id="s", cache_control=cc))
    assert d2.policy != "pin" and d2.predicted_cached_tokens == 0
    assert listened == [(w, "reset", "restart")]
    assert r.stats()["cache_resets"] == 1


def test_apply_cleared_is_worker_cache_reset() -> None:
    r, _clock = _router()
    d = r.route(Request("a", block_hashes=H(1, 4)))
    r.apply_stored(d.worker, H(1, 4))
    seen: list[str] = []
    r.add_listener(lambda w, change, why: seen.append(change))
    assert r.apply_cleared(d.worker) == 4
    assert seen == ["reset"]
    assert r.route(Request("b", block_hashes=H(1, 4))).predicted_cached_tokens == 0


def test_a_listener_may_call_the_router_and_a_failing_one_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r, _ = _router()

    def bad(w: int, change: str, why: str) -> None:
        raise RuntimeError("boom")

    calls: list[list[int]] = []
    r.add_listener(bad)
    r.add_listener(lambda w, change, why: calls.append(r.workers()))  # re-enters: no deadlock
    r.worker_cache_reset(1)
    assert calls == [[0, 1, 2]]
    assert any("listener" in rec.getMessage() for rec in caplog.records)


# -- item 9: per-session state is bounded ---------------------------------------------------------


def test_session_pins_are_bounded_and_evictions_counted() -> None:
    r, _clock = _router(max_sessions=100)
    cc = {"type": "ephemeral", "ttl": "1h"}
    for i in range(1000):
        r.route(Request(f"r{i}", block_hashes=H(i, 2), session_id=f"s{i}", cache_control=cc))
        r.finished(f"r{i}")
    st = r.stats()
    assert st["sessions"] <= 100
    assert st["sessions_evicted"] == 900
    # the newest sessions are the ones kept
    assert r.route(Request("n", block_hashes=H(5, 2), session_id="s999")).policy == "pin"


def test_a_session_in_use_survives_the_bound() -> None:
    r, _clock = _router(max_sessions=3)
    cc = {"type": "ephemeral", "ttl": "1h"}
    r.route(Request("a", block_hashes=H(1, 2), session_id="hot", cache_control=cc))
    r.finished("a")
    for i in range(10):
        r.route(Request(f"r{i}", block_hashes=H(10 + i, 2), session_id=f"s{i}", cache_control=cc))
        r.finished(f"r{i}")
        # the hot session comes back between the others: it is the most recently used
        d = r.route(Request(f"h{i}", block_hashes=H(1, 2), session_id="hot"))
        r.finished(f"h{i}")
        assert d.policy == "pin"
    assert r.stats()["sessions"] == 3 and r.stats()["sessions_evicted"] == 8
