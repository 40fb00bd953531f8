"""The engine model on tiny hand-made cases, and bulk decode against single steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvroute.sim.engine import Engine, EngineConfig, TimingModel
from kvroute.sim.replay import RoundRobinDispatcher, replay
from kvroute.sim.workloads import SimRequest

# prefill: 1 ms per new token; decode: 1 ms per step -> durations are easy to read
UNIT = TimingModel(
    prefill_a=0.0, prefill_b=1.0, prefill_c=0.0, decode_a=0.0, decode_b=0.0, decode_c=1.0
)


def cfg(**kw: object) -> EngineConfig:
    base: dict[str, object] = {
        "num_gpu_blocks": 16,
        "block_size": 4,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 64,
        "timing": UNIT,
    }
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


def run(e: Engine, t: float = 0.0) -> list[tuple[float, list[int], list[int]]]:
    """Run passes until idle; (end time, first tokens, finished) per pass."""
    out = []
    while True:
        end = e.begin(t)
        if end is None:
            return out
        r = e.finish()
        e._check()
        out.append((end, r.first_token, r.finished))
        t = end


def test_timing_defaults_are_dynamos_polynomial() -> None:
    t = TimingModel()
    assert t.prefill_ms(0) == 0.0
    assert t.prefill_ms(1000) == pytest.approx(4.209989e-07 * 1e6 + 15.18344 + 16.50142)
    assert t.decode_ms(0.5) == pytest.approx(-25.74 * 0.25 + 54.01 * 0.5 + 5.74)
    assert t.decode_ms(2.0) == t.decode_ms(1.0)  # clamped
    assert TimingModel(speedup=2.0).decode_ms(0.0) == pytest.approx(5.74 / 2)
    with pytest.raises(ValueError):
        TimingModel(speedup=0.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        EngineConfig(num_gpu_blocks=0)
    with pytest.raises(ValueError):
        EngineConfig(decode_load="nope")


def test_chunked_prefill_respects_the_token_budget() -> None:
    e = Engine(cfg(max_num_batched_tokens=8))
    e.enqueue(SimRequest("a", 0.0, 20, 2, tuple(range(100, 105))))
    passes = run(e)
    # 8 + 8 + 4 prompt tokens, first token with the third pass, then one decode
    assert [p[0] for p in passes] == pytest.approx([0.008, 0.016, 0.021, 0.022])
    assert passes[2][1] == [0] and passes[3][2] == [0]


def test_decodes_use_the_budget_before_new_prefills() -> None:
    e = Engine(cfg(max_num_batched_tokens=4))
    e.enqueue(SimRequest("a", 0.0, 4, 3, ()))
    e.enqueue(SimRequest("b", 0.0, 8, 1, ()))
    end = e.begin(0.0)
    assert end == pytest.approx(0.005)  # a's 4 prompt tokens + a's first decode
    assert e.finish().first_token == [0]
    assert e.begin(end) == pytest.approx(end + 0.003 + 0.001)  # a decodes (1) + 3 of b
    assert [s.computed for s in e.running] == [5, 3]


def test_waiting_queue_and_max_num_seqs() -> None:
    e = Engine(cfg(max_num_seqs=2))
    for name in "abc":
        e.enqueue(SimRequest(name, 0.0, 4, 2, ()))
    e.begin(0.0)
    assert [s.req.request_id for s in e.running] == ["a", "b"]
    assert [s.req.request_id for s in e.waiting] == ["c"]
    e.finish()
    e.begin(1.0)
    r = e.finish()
    assert r.finished == [0, 1]
    e.begin(2.0)
    assert [s.req.request_id for s in e.running] == ["c"]


def test_prefix_reuse_is_counted_in_whole_blocks_and_never_the_whole_prompt() -> None:
    e = Engine(cfg())
    keys = (11, 12, 13)
    e.enqueue(SimRequest("a", 0.0, 12, 1, keys))
    run(e)
    e.enqueue(SimRequest("b", 0.0, 12, 1, keys))  # all cached: recompute the last block
    e.enqueue(SimRequest("c", 0.0, 10, 1, (11, 12, 99)))
    run(e)
    assert [s.cached for s in e.requests] == [0, 8, 8]


def test_output_blocks_named_by_the_workload_are_reused() -> None:
    e = Engine(cfg())
    e.enqueue(SimRequest("t0", 0.0, 6, 4, (1, 2)))  # prompt 6 + output 4 -> 2 full blocks
    run(e)
    e.enqueue(SimRequest("t1", 0.0, 12, 1, (1, 2, 3)))
    run(e)
    assert e.requests[1].cached == 8


def test_stored_events_chain_and_removed_events_name_evictions() -> None:
    e = Engine(cfg(num_gpu_blocks=3))
    e.enqueue(SimRequest("a", 0.0, 9, 1, (1, 2)))
    e.begin(0.0)
    r = e.finish()
    assert r.stored == [([1, 2], None)] and r.removed == []
    e.enqueue(SimRequest("b", 0.0, 9, 1, (1, 5)))
    e.begin(1.0)
    r = e.finish()
    # a released 2 then 1 (tail first); b reuses 1 and needs two slots: 2 is evicted
    assert r.removed == [2]
    assert r.stored == [([5], 1)]


def test_preemption_when_decode_outgrows_the_cache() -> None:
    e = Engine(cfg(num_gpu_blocks=4, max_num_batched_tokens=64))
    e.enqueue(SimRequest("a", 0.0, 4, 8, ()))
    e.enqueue(SimRequest("b", 0.0, 4, 8, ()))
    passes = run(e)
    assert e.preemptions > 0
    assert sorted(i for p in passes for i in p[2]) == [0, 1]


def test_a_request_that_can_never_fit_is_rejected() -> None:
    e = Engine(cfg(num_gpu_blocks=2))
    e.enqueue(SimRequest("big", 0.0, 40, 1, ()))
    e.begin(0.0)
    assert e.finish().rejected == [0]
    assert e.idle()


def test_interrupt_cuts_a_bulk_decode_stretch_after_the_running_step() -> None:
    e = Engine(cfg(block_size=64))
    e.enqueue(SimRequest("a", 0.0, 4, 50, ()))
    t = e.begin(0.0)
    e.finish()
    end = e.begin(t)  # bulk: 48 quiet steps of 1 ms
    assert end == pytest.approx(t + 0.048)
    cut = e.interrupt(t + 0.0105)  # steps starting before: 11
    assert cut == pytest.approx(t + 0.011)
    r = e.finish()
    assert r.steps == 11 and e.running[0].generated == 12


requests_st = st.lists(
    st.tuples(
        st.floats(0, 0.2),  # arrival gap (s)
        st.integers(1, 40),  # prompt
        st.integers(1, 30),  # output
        st.integers(0, 3),  # shared-prefix group
    ),
    min_size=1,
    max_size=25,
)


def _workload(spec: list[tuple[float, int, int, int]]) -> list[SimRequest]:
    t = 0.0
    out = []
    for i, (gap, p, o, g) in enumerate(spec):
        t += gap
        keys = tuple(1000 * g + j for j in range(p // 4))
        out.append(SimRequest(i, t, p, o, keys))
    return out


@given(requests_st, st.integers(1, 3), st.sampled_from(["logical", "physical"]))
def test_bulk_decode_matches_single_steps(
    spec: list[tuple[float, int, int, int]], workers: int, load: str
) -> None:
    reqs = _workload(spec)
    c = cfg(
        num_gpu_blocks=24,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        decode_load=load,
        timing=TimingModel(),
    )
    a = replay(reqs, RoundRobinDispatcher(workers), num_workers=workers, config=c)
    b = replay(
        reqs, RoundRobinDispatcher(workers), num_workers=workers, config=c, bulk_decode=False
    )
    for f in ("first_token", "finish"):
        x, y = getattr(a.records, f), getattr(b.records, f)
        assert np.array_equal(np.isnan(x), np.isnan(y))
        assert np.allclose(x[~np.isnan(x)], y[~np.isnan(y)], rtol=0, atol=1e-9)
    assert np.array_equal(a.records.cached_tokens, b.records.cached_tokens)
    for e in a.engines:
        e._check()


def test_decode_step_time_grows_with_the_batch() -> None:
    one = Engine(cfg(timing=TimingModel(), num_gpu_blocks=4))
    one.enqueue(SimRequest("a", 0.0, 8, 2, ()))
    many = Engine(cfg(timing=TimingModel(), num_gpu_blocks=4))
    for i in range(3):
        many.enqueue(SimRequest(i, 0.0, 8, 2, ()))
    d1 = one.begin(0.0)
    d3 = many.begin(0.0)
    assert d1 is not None and d3 is not None and d3 > d1
    assert math.isfinite(d3)
