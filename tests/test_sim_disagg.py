"""The disaggregated replay: prefill pool, transfers, decode pool, the conditional rule, the CLI."""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import numpy as np
import pytest

import kvroute.sim.disagg
from kvroute import __main__ as cli
from kvroute.disagg import DisaggConfig
from kvroute.sim.disagg import DisaggFleet, replay_disagg
from kvroute.sim.engine import Engine, EngineConfig
from kvroute.sim.workloads import AgenticConfig, SimRequest, agentic_sessions

CFG = EngineConfig(num_gpu_blocks=256, block_size=64)


def sessions(n: int = 3, turns: int = 4) -> list[SimRequest]:
    """``n`` sessions of ``turns`` turns, each turn the previous context plus 2 blocks."""
    out = []
    for s in range(n):
        base = 10_000 * (s + 1)
        for t in range(turns):
            nblocks = 8 + 2 * t
            keys = tuple(base + k for k in range(nblocks + 1))  # one output block
            out.append(
                SimRequest(f"s{s}#{t}", 0.05 * s + 2.0 * t, nblocks * 64 + 10, 40, keys, f"s{s}")
            )
    out.sort(key=lambda r: r.arrival)
    return out


def test_doctests() -> None:
    result = doctest.testmod(kvroute.sim.disagg, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_every_request_is_prefilled_moved_then_decoded() -> None:
    reqs = sessions()
    r = replay_disagg(reqs, "kvroute", DisaggFleet(2, 2, CFG, CFG), policy_params={"seed": 0})
    rec = r.records
    assert r.summary["completed"] == len(reqs) and r.summary["local_share"] == 0.0
    assert set(rec.worker.tolist()) <= {0, 1} and set(r.decode_worker.tolist()) <= {2, 3}
    # the client's first token comes after the prefill and the transfer
    assert np.all(r.prefill_end > rec.arrival)
    assert np.all(rec.first_token >= r.prefill_end + r.transfer_s - 1e-9)
    assert (rec.output_tokens == 40).all()
    assert r.summary["router"] == {"remote_prefills": len(reqs), "local_prefills": 0}
    # a session's later turns: its prefill worker holds the context, its decode worker too
    for s in range(3):
        idx = [i for i, q in enumerate(reqs) if q.session_id == f"s{s}"]
        assert len(set(rec.worker[idx].tolist())) == 1
        assert len(set(r.decode_worker[idx].tolist())) == 1
        assert (rec.cached_tokens[idx[1:]] > 0).all()
        # only the blocks new to the decode worker move
        assert r.transfer_blocks[idx[0]] == 8 and (r.transfer_blocks[idx[1:]] <= 3).all()


def test_the_conditional_rule_prefills_warm_turns_on_the_decode_worker() -> None:
    reqs = sessions()
    fleet = DisaggFleet(2, 2, CFG, CFG)
    remote = replay_disagg(reqs, "kvroute", fleet, policy_params={"seed": 0})
    cond = replay_disagg(
        reqs, "kvroute", fleet, local_prefill_tokens=256, policy_params={"seed": 0}
    )
    first = [i for i, q in enumerate(reqs) if q.request_id.endswith("#0")]
    later = [i for i in range(len(reqs)) if i not in first]
    assert not cond.local[first].any() and cond.local[later].all()
    assert cond.summary["local_share"] == pytest.approx(len(later) / len(reqs))
    assert np.isnan(cond.transfer_s[later]).all() and np.isnan(cond.prefill_end[later]).all()
    # the warm turns skip the prefill worker and the transfer: sooner first tokens
    t_remote = remote.records.first_token - remote.records.arrival
    t_cond = cond.records.first_token - cond.records.arrival
    assert (t_cond[later] < t_remote[later]).all()
    assert cond.summary["ttft_ms"]["mean"] < remote.summary["ttft_ms"]["mean"]
    # a locally prefilled request's reuse is the decode worker's cache hit
    assert (cond.records.cached_tokens[later] > 0).all()


def test_the_transfer_time_follows_the_bytes_moved() -> None:
    reqs = sessions(1, 1)
    slow = DisaggFleet(1, 1, CFG, CFG, transfer_gbps=1.0, kv_bytes_per_token=100_000)
    r = replay_disagg(reqs, "round_robin", slow)
    assert r.transfer_blocks[0] == 8
    assert r.transfer_s[0] == pytest.approx(slow.transfer_s(8, 64))
    assert r.summary["transfer_gb"] == pytest.approx(8 * 64 * 100_000 / 1e9)
    fast = replay_disagg(reqs, "round_robin", DisaggFleet(1, 1, CFG, CFG, transfer_gbps=400.0))
    assert fast.transfer_s[0] < r.transfer_s[0]
    ttft = lambda x: x.records.first_token[0] - x.records.arrival[0]  # noqa: E731
    assert ttft(r) - ttft(fast) == pytest.approx(r.transfer_s[0] - fast.transfer_s[0])


def test_transfers_into_one_decode_worker_queue_on_its_link() -> None:
    reqs = [SimRequest(i, 0.0, 8 * 64 + 1, 4, tuple(range(100 * i, 100 * i + 8))) for i in range(2)]
    fleet = DisaggFleet(2, 1, CFG, CFG, transfer_gbps=1.0)
    r = replay_disagg(reqs, "round_robin", fleet)
    one = fleet.transfer_s(8, 64)
    # both prefills end together; the second transfer waits for the first
    assert sorted(r.transfer_s.tolist()) == pytest.approx([one, 2 * one], rel=1e-6)


def test_a_fleet_is_validated() -> None:
    with pytest.raises(ValueError, match="prefill"):
        DisaggFleet(0, 1)
    with pytest.raises(ValueError, match="block size"):
        DisaggFleet(1, 1, CFG, EngineConfig(block_size=16))
    with pytest.raises(ValueError, match="transfer_gbps"):
        DisaggFleet(1, 1, transfer_gbps=0.0)
    with pytest.raises(ValueError, match="sorted"):
        replay_disagg(list(reversed(sessions(1, 2))), "kvroute", DisaggFleet(1, 1, CFG, CFG))


def test_an_engine_caches_preloaded_blocks_without_computing_them() -> None:
    req = SimRequest("a", 0.0, 8 * 64 + 10, 3, tuple(range(1, 9)))
    cold = Engine(CFG)
    cold.enqueue(req)
    warm = Engine(CFG)
    warm.enqueue(req, preloaded=8 * 64)
    t_cold = cold.begin(0.0)
    t_warm = warm.begin(0.0)
    assert t_cold is not None and t_warm is not None and t_warm < t_cold
    r = warm.finish()
    assert r.first_token == [0]
    assert r.stored == [(list(range(1, 9)), None)]  # the moved blocks are cached and reported
    assert warm.requests[0].cached == 0  # not a hit of its own cache
    assert warm.cached_prefix(list(range(1, 9))) == 8
    warm._check()


def test_the_agentic_workload_runs_on_a_small_fleet() -> None:
    reqs = agentic_sessions(AgenticConfig(sessions=3, turns_median=4.0), block_size=512, seed=1)
    cfg = EngineConfig(num_gpu_blocks=512, block_size=512)
    r = replay_disagg(
        reqs, "kvroute", DisaggFleet(2, 2, cfg, cfg), disagg=DisaggConfig(local_prefill_tokens=2048)
    )
    s = r.summary
    assert s["completed"] == len(reqs)
    assert 0 < s["local_share"] < 1
    assert s["local_share"] == pytest.approx(s["router"]["local_prefills"] / len(reqs))
    assert math.isfinite(s["transfer_ms"]["mean"]) and s["transfer_gb"] > 0


def test_the_replay_command_runs_a_disaggregated_fleet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pd.json"
    code = cli.main([
        "replay", "agentic:3", "--policy", "round_robin,kvroute", "--block-size", "512",
        "--gpu-blocks", "512", "--prefill-workers", "2", "--decode-workers", "1",
        "--local-prefill-tokens", "0,2048", "--transfer-gbps", "50", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    for label in ("round_robin@0", "round_robin@2048", "kvroute@0", "kvroute@2048"):
        assert label in text
    doc = json.loads(out.read_text())
    assert doc["fleet"]["prefill_workers"] == 2 and doc["fleet"]["transfer_gbps"] == 50.0
    assert doc["policies"]["kvroute@0"]["local_share"] == 0.0
    assert doc["policies"]["kvroute@2048"]["local_prefill_tokens"] == 2048
    assert cli.main(["replay", "agentic:2", "--prefill-workers", "1"]) == 2
    assert "go together" in capsys.readouterr().err
