"""Mooncake loading and the agentic-session generator."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kvroute.sim.workloads import (
    AgenticConfig,
    SimRequest,
    agentic_sessions,
    load_mooncake,
    mix64,
    mooncake_requests,
)
from kvroute.traces import TraceError, TraceRequest

JSON_ROWS = [
    {"timestamp": 3000, "input_length": 1500, "output_length": 7, "hash_ids": [0, 1, 2]},
    {
        "timestamp": 1000,
        "input_length": 1100,
        "output_length": 3,
        "hash_ids": [0, 1, 5],
        "session_id": 42,
    },
]
ROWS = [
    TraceRequest(3000, 1500, 7, (0, 1, 2)),
    TraceRequest(1000, 1100, 3, (0, 1, 5), "42"),
]


def test_mooncake_rows_become_sorted_requests_with_full_block_keys() -> None:
    a, b = mooncake_requests(ROWS, block_size=512)
    assert (a.request_id, a.arrival, a.prompt_len, a.output_len, a.session_id) == (
        1,
        1.0,
        1100,
        3,
        "42",
    )
    assert len(a.hashes) == 2 and len(b.hashes) == 2  # partial last blocks get no key
    assert a.hashes == b.hashes  # shared ids 0, 1


def test_smaller_engine_blocks_split_trace_blocks_and_keep_sharing() -> None:
    a, b = mooncake_requests(ROWS, block_size=256)
    assert len(b.hashes) == 1500 // 256 and len(a.hashes) == 1100 // 256
    assert a.hashes[:4] == b.hashes[:4]
    assert len(set(b.hashes)) == len(b.hashes)


def test_larger_engine_blocks_key_on_the_last_trace_block() -> None:
    a, b = mooncake_requests(ROWS, block_size=1024)
    assert a.hashes == b.hashes and len(a.hashes) == 1
    assert mooncake_requests(ROWS, block_size=512)[0].hashes[0] != a.hashes[0]


def test_speedup_and_errors() -> None:
    a, _ = mooncake_requests(ROWS, block_size=512, speedup=4.0)
    assert a.arrival == 0.25
    with pytest.raises(ValueError):
        mooncake_requests(ROWS, block_size=384)
    with pytest.raises(ValueError):
        mooncake_requests(ROWS, block_size=512, speedup=0.0)


def test_load_mooncake_reads_plain_and_gzipped_files(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in JSON_ROWS) + "\n\n")
    assert [r.request_id for r in load_mooncake(p)] == [1, 0]
    assert len(load_mooncake(p, limit=1)) == 1
    reqs = load_mooncake(limit=50)  # the bundled trace
    assert len(reqs) == 50 and reqs[0].arrival == 0.0


def test_load_mooncake_names_the_line_of_a_malformed_row(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(JSON_ROWS[0]) + "\n" + json.dumps({**JSON_ROWS[0], "input_length": -1}))
    with pytest.raises(TraceError, match=r"bad.jsonl:2"):
        load_mooncake(p)


def test_mix64_is_a_bijection_on_a_sample() -> None:
    x = np.arange(100_000, dtype=np.uint64)
    assert len(np.unique(mix64(x))) == 100_000


SMALL = AgenticConfig(sessions=12, turns_median=8.0, fanout_prob=0.3, context_limit=60_000)


def _by_session(reqs: list[SimRequest]) -> dict[str, list[SimRequest]]:
    out: dict[str, list[SimRequest]] = defaultdict(list)
    for r in reqs:
        assert r.session_id is not None
        out[r.session_id].append(r)
    return out


def test_agentic_generator_is_deterministic_for_a_seed() -> None:
    a = agentic_sessions(SMALL, block_size=64, seed=3)
    b = agentic_sessions(SMALL, block_size=64, seed=3)
    c = agentic_sessions(SMALL, block_size=64, seed=4)
    assert a == b
    assert a != c
    assert [r.arrival for r in a] == sorted(r.arrival for r in a)


def test_agentic_sessions_share_the_harness_prefix() -> None:
    cfg = replace(SMALL, harnesses=1, harness_tokens=(10_000, 10_000))
    reqs = agentic_sessions(cfg, block_size=64, seed=0)
    firsts = [rs[0] for sid, rs in _by_session(reqs).items() if "/" not in sid]
    n = 10_000 // 64
    assert len(firsts) == cfg.sessions
    assert all(r.hashes[:n] == firsts[0].hashes[:n] for r in firsts)
    # the first user messages differ
    assert len({r.hashes[n + 1] for r in firsts}) == len(firsts)


def test_agentic_turns_grow_append_only_until_compaction() -> None:
    cfg = replace(SMALL, harness_tokens=(10_000, 10_000))
    reqs = agentic_sessions(cfg, block_size=64, seed=1)
    h = 10_000 // 64  # full blocks of pure harness
    grew = compacted = 0
    for rs in _by_session(reqs).values():
        for prev, cur in itertools.pairwise(rs):
            n = (prev.prompt_len + prev.output_len) // 64
            if cur.hashes[:n] == prev.hashes[:n]:
                # the previous prompt *and output* are a prefix of the next prompt
                assert cur.prompt_len >= prev.prompt_len + prev.output_len
                grew += 1
            else:
                # compaction: only the harness survives, and only past the limit
                assert cur.hashes[:h] == prev.hashes[:h]
                assert cur.hashes[h] != prev.hashes[h]
                assert prev.prompt_len + prev.output_len + cfg.tool_result_max > (
                    cfg.context_limit - cfg.subagent_result_tokens * 20
                )
                compacted += 1
    assert grew > 50 and compacted > 0


def test_agentic_subagents_fan_out_from_the_parent_context() -> None:
    reqs = agentic_sessions(SMALL, block_size=64, seed=2)
    by = _by_session(reqs)
    subs = [sid for sid in by if "/" in sid]
    assert subs
    fan: dict[str, list[SimRequest]] = defaultdict(list)
    for sid in subs:
        fan[sid.rsplit(".", 1)[0]].append(by[sid][0])
    for group, firsts in fan.items():
        parent = group.rsplit("/", 1)[0]
        prev = [r for r in by[parent] if r.arrival <= min(f.arrival for f in firsts)][-1]
        n = (prev.prompt_len + prev.output_len) // 64
        for f in firsts:  # siblings share the parent's context at the fan-out
            assert f.hashes[:n] == prev.hashes[:n]
            assert f.arrival >= prev.arrival
        # the parent resumes only after its subagents, with their results appended
        last = max(r.arrival for sid in by if sid.startswith(group + ".") for r in by[sid])
        after = [r for r in by[parent] if r.arrival > prev.arrival]
        if after:
            assert after[0].arrival > last
            assert after[0].hashes[:n] == prev.hashes[:n]


def test_agentic_defaults_give_claude_code_like_reuse() -> None:
    """An unbounded cache sees 85-97% prefix reuse after each session's first request."""
    reqs = agentic_sessions(block_size=64, seed=0)
    seen: set[int] = set()
    started: set[str | None] = set()
    cached = total = 0
    for r in reqs:
        keys = r.hashes[: min(len(r.hashes), (r.prompt_len - 1) // 64)]
        m = 0
        for k in keys:
            if k not in seen:
                break
            m += 1
        if r.session_id in started:
            cached += m * 64
            total += r.prompt_len
        started.add(r.session_id)
        seen.update(r.hashes)
    assert 0.85 <= cached / total <= 0.97


def test_agentic_config_validation() -> None:
    with pytest.raises(ValueError):
        agentic_sessions(replace(SMALL, harnesses=0))
    with pytest.raises(ValueError):
        agentic_sessions(replace(SMALL, fanout_width=(3, 2)))
