"""A trace-driven fleet simulator: how a routing policy changes cache hits and latency.

:mod:`.engine` models one vLLM worker (prefix cache, chunked prefill, decode
batches, calibrated against NVIDIA Dynamo's mocker); :mod:`.workloads` turns
Mooncake traces and an agentic-session generator into requests;
:mod:`.replay` runs them through a dispatcher (the real
:class:`kvroute.router.Router`) on a simulated clock; :mod:`.metrics`
summarises the outcome; :mod:`.seeding` derives every random stream's seed
from the run's one seed; :mod:`.report` is the replay command's table and
JSON report. See docs/simulator.md.
"""

from __future__ import annotations

from .engine import Engine, EngineConfig, PassResult, TimingModel
from .metrics import Records, percentiles, summarize
from .replay import (
    Dispatcher,
    ReplayResult,
    RoundRobinDispatcher,
    RouterDispatcher,
    SimClock,
    make_dispatcher,
    pooled_lru_reuse,
    replay,
    unbounded_reuse,
)
from .workloads import (
    AgenticConfig,
    SimRequest,
    agentic_sessions,
    load_mooncake,
    mooncake_requests,
)

__all__ = [
    "AgenticConfig",
    "Dispatcher",
    "Engine",
    "EngineConfig",
    "PassResult",
    "Records",
    "ReplayResult",
    "RoundRobinDispatcher",
    "RouterDispatcher",
    "SimClock",
    "SimRequest",
    "TimingModel",
    "agentic_sessions",
    "load_mooncake",
    "make_dispatcher",
    "mooncake_requests",
    "percentiles",
    "pooled_lru_reuse",
    "replay",
    "summarize",
    "unbounded_reuse",
]
