"""The replay loop: dispatch, lifecycle, event lag and loss, metrics, bounds, calibration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from kvroute.sim.engine import EngineConfig, TimingModel
from kvroute.sim.metrics import Records, percentiles, summarize
from kvroute.sim.replay import (
    RoundRobinDispatcher,
    SimClock,
    make_dispatcher,
    pooled_lru_reuse,
    replay,
    unbounded_reuse,
)
from kvroute.sim.workloads import SimRequest, load_mooncake

UNIT = TimingModel(
    prefill_a=0.0, prefill_b=1.0, prefill_c=0.0, decode_a=0.0, decode_b=0.0, decode_c=1.0
)
CFG = EngineConfig(num_gpu_blocks=4, block_size=4, timing=UNIT)


class Recorder(RoundRobinDispatcher):
    """Round-robin that logs every call with the simulated time."""

    wants_events = True

    def __init__(self, n: int, clock: SimClock) -> None:
        super().__init__(n)
        self.clock = clock
        self.log: list[tuple[float, str, object]] = []

    def route(self, req: SimRequest) -> int:
        self.log.append((self.clock(), "route", req.request_id))
        return super().route(req)

    def first_token(self, request_id: str | int) -> None:
        self.log.append((self.clock(), "first", request_id))

    def finished(self, request_id: str | int) -> None:
        self.log.append((self.clock(), "finished", request_id))

    def stored(self, worker: int, hashes: Sequence[int], parent: int | None) -> None:
        self.log.append((self.clock(), "stored", (worker, list(hashes), parent)))

    def removed(self, worker: int, hashes: Sequence[int]) -> None:
        self.log.append((self.clock(), "removed", (worker, list(hashes))))


def run(
    reqs: list[SimRequest], lag: float = 0.0, loss: float = 0.0
) -> list[tuple[float, str, object]]:
    clock = SimClock()
    d = Recorder(1, clock)
    replay(reqs, d, num_workers=1, config=CFG, event_lag=lag, event_loss=loss, clock=clock)
    return d.log


def test_lifecycle_calls_happen_at_simulated_times() -> None:
    log = run([SimRequest("a", 1.0, 8, 2, (1, 2))])
    assert log[0] == (1.0, "route", "a")
    kinds = [(round(t, 6), k) for t, k, _ in log]
    # 8 prompt tokens + first decode: 9 ms; then one decode step
    assert kinds == [(1.0, "route"), (1.009, "first"), (1.009, "stored"), (1.01, "finished")]


def test_events_arrive_after_the_lag() -> None:
    reqs = [SimRequest("a", 0.0, 8, 1, (1, 2)), SimRequest("b", 0.5, 12, 1, (5, 6, 7))]
    log = run(reqs, lag=0.25)
    ev = [(round(t, 6), k, x) for t, k, x in log if k in ("stored", "removed")]
    assert ev == [
        (0.259, "stored", (0, [1, 2], None)),
        # b needs 3 of the 4 slots: one eviction, and a's tail goes first
        (0.763, "removed", (0, [2])),
        (0.763, "stored", (0, [5, 6, 7], None)),
    ]


def test_lost_events_are_never_delivered() -> None:
    reqs = [SimRequest(i, i * 0.1, 8, 1, (10 * i, 10 * i + 1)) for i in range(5)]
    assert not [k for _, k, _ in run(reqs, loss=1.0) if k in ("stored", "removed")]
    some = [k for _, k, _ in run(reqs, loss=0.5) if k == "stored"]
    assert 0 < len(some) < 5


def test_replay_validates() -> None:
    r = [SimRequest("a", 1.0, 4, 1, ()), SimRequest("b", 0.0, 4, 1, ())]
    with pytest.raises(ValueError, match="sorted"):
        replay(r, RoundRobinDispatcher(1), num_workers=1, config=CFG)
    with pytest.raises(ValueError):
        replay(r[:1], RoundRobinDispatcher(1), num_workers=0)
    with pytest.raises(ValueError):
        replay(r[:1], RoundRobinDispatcher(1), num_workers=1, event_loss=2.0)

    class Bad(RoundRobinDispatcher):
        def route(self, req: SimRequest) -> int:
            return 7

    with pytest.raises(ValueError, match="worker 7"):
        replay(r[:1], Bad(1), num_workers=1)


def test_reuse_and_regret_accounting() -> None:
    cfg = EngineConfig(num_gpu_blocks=16, block_size=4, timing=UNIT)
    reqs = [
        SimRequest("a", 0.0, 12, 1, (1, 2, 3)),
        SimRequest("b", 1.0, 12, 1, (1, 2, 9)),  # round-robin sends it to the cold worker
        SimRequest("c", 2.0, 12, 1, (1, 2, 3)),  # back to worker 0: 2 blocks cached
    ]
    res = replay(reqs, RoundRobinDispatcher(2), num_workers=2, config=cfg)
    rec = res.records
    assert rec.worker.tolist() == [0, 1, 0]
    assert rec.cached_tokens.tolist() == [0, 0, 8]
    assert (rec.best_overlap - rec.chosen_overlap).tolist() == [0, 2, 0]
    assert res.summary["prefix_reuse"] == pytest.approx(8 / 36)


def test_percentiles_and_summary_on_known_inputs() -> None:
    assert percentiles([4, 1, 3, 2], (0, 50, 100)) == [1.0, 2.5, 4.0]
    assert percentiles([1.0, float("nan"), 3.0], (50,)) == [2.0]
    assert all(np.isnan(percentiles([], (50, 99))))
    with pytest.raises(ValueError):
        percentiles([1], (101,))
    r = Records.empty(4)
    r.arrival[:] = 0.0
    r.first_token[:] = [0.1, 0.2, 0.3, 0.4]
    r.finish[:] = [1.1, 1.2, 1.3, 0.4]
    r.prompt_tokens[:] = 100
    r.cached_tokens[:] = [100, 0, 0, 0]
    r.output_tokens[:] = [11, 11, 11, 1]
    r.worker[:] = [0, 0, 1, 1]
    r.best_overlap[:] = [3, 0, 0, 1]
    s = summarize(r, 2)
    assert s["prefix_reuse"] == 0.25
    assert s["ttft_ms"] == pytest.approx({"mean": 250.0, "p50": 250.0, "p95": 385.0, "p99": 397.0})
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)  # the 1-token request has no TPOT
    assert s["e2e_ms"]["p50"] == pytest.approx(1150.0)
    assert s["load_spread"]["requests"] == {"max_over_mean": 1.0, "cv": 0.0}
    assert s["overlap_regret_blocks"] == {"mean": 1.0, "share_positive": 0.5}
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(34 / 1.3)


def test_bounds() -> None:
    a = SimRequest(0, 0.0, 12, 1, (1, 2, 3))
    b = SimRequest(1, 1.0, 12, 1, (7, 8, 9))
    c = SimRequest(2, 2.0, 12, 1, (1, 2, 3))
    assert unbounded_reuse([a, b, c], 4)["prefix_reuse"] == pytest.approx(8 / 36)
    assert pooled_lru_reuse([a, b, c], 4, 6)["prefix_reuse"] == pytest.approx(8 / 36)
    assert pooled_lru_reuse([a, b, c], 4, 3)["prefix_reuse"] == 0.0
    with pytest.raises(ValueError):
        pooled_lru_reuse([a], 4, 0)


def test_router_adapter_drives_the_real_router() -> None:
    reqs = [
        SimRequest(i, i * 0.05, 40, 3, tuple(range(100 * (i % 3), 100 * (i % 3) + 10)))
        for i in range(30)
    ]
    cfg = EngineConfig(num_gpu_blocks=64, block_size=4)
    rr = replay(reqs, make_dispatcher("sim:round_robin"), num_workers=4, config=cfg)
    rrr = replay(reqs, make_dispatcher("round_robin"), num_workers=4, config=cfg)
    assert rrr.summary["completed"] == 30
    assert sorted(np.bincount(rrr.records.worker)) == sorted(np.bincount(rr.records.worker))
    # three prompt families on four workers: round-robin keeps moving each family,
    # a cache-aware policy keeps each on a worker that holds it (seeded tie-breaks)
    kv = replay(
        reqs,
        make_dispatcher("kv_cost", policy_params={"seed": 0}),
        num_workers=4,
        config=cfg,
        event_lag=0.01,
    )
    assert kv.summary["completed"] == 30
    assert kv.summary["prefix_reuse"] > rr.summary["prefix_reuse"] + 0.1


def test_round_robin_calibration_against_dynamo_mocker() -> None:
    """Dynamo 1.6.1 mocker, 8 x 2048 x 512, round-robin: prefix reuse 0.0824."""
    reqs = load_mooncake(block_size=512)
    cfg = EngineConfig(num_gpu_blocks=2048, block_size=512)
    res = replay(
        reqs, make_dispatcher("sim:round_robin"), num_workers=8, config=cfg, track_regret=False
    )
    assert res.summary["completed"] == 12031
    assert res.summary["prefix_reuse"] == pytest.approx(0.0824, abs=0.02)


def test_kv_cost_calibration_against_dynamo_mocker() -> None:
    """Dynamo 1.6.1 mocker with its KV router, same fleet: reuse 0.203, mean TTFT 277 ms.

    The simulator issue's bar is +/-0.02 reuse. This regression test caught
    the decode term: counting only each request's uncached blocks (instead of
    Dynamo's unique blocks of the requests in flight) gave 0.235.

    Seeded as ``kvroute replay default --policy kv_cost --workers 8
    --gpu-blocks 2048 --block-size 512 --seed 0`` is, the replay is one run:
    its exact figures are pinned (compiled cores and twins alike), so any
    change to what the simulator or the policy computes shows here.
    """
    reqs = load_mooncake(block_size=512)
    cfg = EngineConfig(num_gpu_blocks=2048, block_size=512)
    res = replay(
        reqs, make_dispatcher("kv_cost", seed=0), num_workers=8, config=cfg, track_regret=False
    )
    assert res.summary["completed"] == 12031
    assert res.summary["prefix_reuse"] == pytest.approx(0.203, abs=0.02)
    assert int(res.records.cached_tokens.sum()) == 29_774_336
    assert res.summary["prefix_reuse"] == 0.20563263945313467
    assert res.summary["ttft_ms"]["mean"] == pytest.approx(270.7062161886709, rel=1e-12)
