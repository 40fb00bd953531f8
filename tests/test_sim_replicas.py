"""Router replicas in the simulator (kvroute.sim.replicas): sync through kvroute.remote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvroute import __main__ as cli
from kvroute.sim.engine import EngineConfig
from kvroute.sim.replay import SimClock, make_dispatcher, replay
from kvroute.sim.replicas import ReplicaDispatcher, make_replicas, spread_arrivals
from kvroute.sim.seeding import policy_parameters
from kvroute.sim.workloads import SimRequest

CFG = EngineConfig(num_gpu_blocks=256, block_size=16)


def conversations(n_conv: int = 5, turns: int = 6, gap: float = 2.0) -> list[SimRequest]:
    """Conversations whose prompts grow turn by turn; 5 of them over 3 replicas alternate."""
    reqs = []
    for c in range(n_conv):
        blocks: list[int] = []
        for t in range(turns):
            blocks = blocks + [10_000 * (c + 1) + t * 10 + k for k in range(4)]
            reqs.append(SimRequest(f"c{c}t{t}", c * 0.3 + t * gap, 16 * len(blocks), 4,
                                   tuple(blocks), session_id=f"conv{c}"))  # fmt: skip
    return sorted(reqs, key=lambda r: r.arrival)


def turns_on_one_worker(records: Any, reqs: list[SimRequest]) -> float:
    """Fraction of turns after the first that went where the conversation's first turn went."""
    first: dict[str, int] = {}
    same = total = 0
    for i, r in enumerate(reqs):
        w = int(records.worker[i])
        s = r.session_id
        assert s is not None
        if s not in first:
            first[s] = w
            continue
        total += 1
        same += w == first[s]
    return same / total


@pytest.mark.parametrize("approximate", [False, True])
def test_synced_replicas_keep_conversations_together(approximate: bool) -> None:
    reqs = conversations()
    kw: dict[str, Any] = {"kv_events": False} if approximate else {}
    kw["policy_params"] = {"seed": 0}
    synced = replay(reqs, make_replicas("kvroute", 3, sync_lag=0.01, **kw), num_workers=4,
                    config=CFG)  # fmt: skip
    assert turns_on_one_worker(synced.records, reqs) >= 0.9
    if approximate:  # without events an unsynced replica knows only what it routed
        alone = replay(reqs, make_replicas("kvroute", 3, sync=False, **kw), num_workers=4,
                       config=CFG)  # fmt: skip
        assert turns_on_one_worker(alone.records, reqs) < 0.9
        assert alone.summary["prefix_reuse"] < synced.summary["prefix_reuse"]


def test_lifecycle_goes_to_the_routing_replica_and_load_arrives_after_the_lag() -> None:
    clock = SimClock()
    d = ReplicaDispatcher("kvroute", clock, 2, 16, replicas=2, sync_lag=1.0)
    a, b = d.routers
    req = SimRequest("x", 0.0, 64, 4, (1, 2, 3, 4))
    w = d.route(req)  # replica 0 routes it
    assert a.load(w)["active_requests"] == 1 and b.load(w)["active_requests"] == 0
    clock.now = 0.5
    d.stored(w, [1, 2, 3, 4], None)  # events reach every replica at once
    assert a.index.match([1, 2]) == b.index.match([1, 2]) == {w: 2}
    assert b.load(w)["active_requests"] == 0
    clock.now = 1.0
    d.first_token("x")  # delivery happens at the next call after the lag
    assert b.load(w)["active_requests"] == 1 and a.load(w)["prefill_tokens"] == 0
    clock.now = 2.1
    d.finished("x")
    assert b.load(w)["active_requests"] == 1  # the finish arrives a lag later
    clock.now = 3.2
    d.route(SimRequest("y", 3.2, 16, 1, (9,)))
    assert a.load(w)["active_requests"] + b.load(w)["active_requests"] <= 2
    assert b.load(w)["active_requests"] == 0 or d.routers[1].remote_load()["active"] == {}


def test_one_synced_replica_is_one_router_with_rendezvous_ties() -> None:
    reqs = conversations(4, 4)
    one = replay(reqs, make_replicas("kvroute", 1, policy_params={"seed": 0}), num_workers=3,
                 config=CFG)  # fmt: skip
    plain = replay(
        reqs,
        make_dispatcher("kvroute", policy_params={"seed": 0, "tie_break": "rendezvous"}),
        num_workers=3,
        config=CFG,
    )
    assert one.records.worker.tolist() == plain.records.worker.tolist()


def test_synced_replicas_break_ties_by_rendezvous_whatever_the_parameters() -> None:
    # `kvroute replay` passes every parameter of the policy, tie_break="random" included
    params = policy_parameters("kvroute", None, seed=0)
    assert params["tie_break"] == "random"
    kw: dict[str, Any] = {"replicas": 2, "router_kwargs": {"policy_params": params}}
    synced = ReplicaDispatcher("kvroute", SimClock(), 2, 16, **kw)
    assert [r.policy.tie_break for r in synced.routers] == ["rendezvous"] * 2
    alone = ReplicaDispatcher("kvroute", SimClock(), 2, 16, sync=False, **kw)
    assert [r.policy.tie_break for r in alone.routers] == ["random"] * 2


def test_spread_arrivals_stays_in_the_window_and_sorted() -> None:
    reqs = [SimRequest(i, 3.0 * (i // 4), 16, 1, ()) for i in range(40)]
    out = spread_arrivals(reqs, 3.0, seed=1)
    arrivals = [r.arrival for r in out]
    assert arrivals == sorted(arrivals)
    by_id = {r.request_id: r.arrival for r in out}
    assert all(r.arrival <= by_id[r.request_id] < r.arrival + 3.0 for r in reqs)
    assert spread_arrivals(reqs, 0.0) == reqs
    with pytest.raises(ValueError):
        spread_arrivals(reqs, -1.0)
    with pytest.raises(ValueError):
        ReplicaDispatcher("kvroute", SimClock(), 2, 16, replicas=0)


def test_replay_command_takes_replicas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    code = cli.main(["replay", "agentic:6", "--workers", "3", "--replicas", "2", "--sync-lag",
                     "0.01", "--arrival-jitter", "0.5", "--json", str(out)])  # fmt: skip
    assert code == 0
    doc = json.loads(out.read_text())
    fleet, workload = doc["parameters"]["fleet"], doc["parameters"]["workload"]
    assert (fleet["replicas"], fleet["sync"], fleet["sync_lag_s"]) == (2, True, 0.01)
    assert workload["arrival_jitter_s"] == 0.5
    assert "--no-sync" not in doc["command"]
    # the report names the tie-break the synced replicas ran with
    assert doc["parameters"]["policies"]["kvroute"]["tie_break"] == "rendezvous"
    assert cli.main(["replay", "agentic:6", "--workers", "3", "--replicas", "2", "--no-sync",
                     "--json", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["parameters"]["fleet"]["sync"] is False and "--no-sync" in doc["command"]
    assert doc["parameters"]["policies"]["kvroute"]["tie_break"] == "random"
    assert "kvroute" in capsys.readouterr().out
